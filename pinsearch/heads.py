"""Classification heads over stored vectors, as scikit-learn estimators.

- :class:`KNNHead`: a vote of the k nearest training pins, found by a FAISS index query.
- :class:`LinearSVMHead`: one-vs-rest linear SVM (squared hinge, L2), trained full-batch with
  L-BFGS in torch (GPU when there is one).
- :class:`MLPHead`: input -> hidden -> hidden -> classes, Adam, early stopping.

All follow the estimator contract (hyperparameters in ``__init__``, learned state ending in
``_``, ``fit`` returns self), so ``GridSearchCV`` and pipelines accept them. Heads are saved as
arrays (``.npz``) plus a JSON description, never pickled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pinsearch._version import __version__
from pinsearch.indexes.pinindex import load_npz, replace_durably, temp_beside

__all__ = [
    "HEADS",
    "MLP_INITS",
    "MLP_PENALTIES",
    "MONITORS",
    "KNNHead",
    "LinearSVMHead",
    "MLPHead",
    "add_l2_gradient",
    "check_C",
    "check_solver_limits",
    "create_head",
    "knn_votes",
    "load_head",
    "mlp_optimizer",
    "register_head",
    "save_head",
    "saved_params",
    "scaler_stats",
]

HEADS: dict[str, type[BaseEstimator]] = {}
MONITORS = ("loss", "accuracy")  # what MLPHead's early stopping can watch
MLP_INITS = ("torch", "glorot")  # how MLPHead's layers start
MLP_PENALTIES = ("adamw", "l2")  # how MLPHead's weight_decay regularises


def register_head(name: str) -> Callable[[type[BaseEstimator]], type[BaseEstimator]]:
    """Class decorator adding a head to :data:`HEADS` under ``name``."""

    def wrap(cls: type[BaseEstimator]) -> type[BaseEstimator]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = cls
        cls.head_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def create_head(name: str, **params: Any) -> BaseEstimator:
    """A head by registry name (``knn``, ``lsvm``, ``mlp``) with hyperparameters.

    Raises:
        ValueError: unknown name (the message lists the registered ones) or parameter, or
            text for a numeric parameter.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; registered: {sorted(HEADS)}")
    defaults = HEADS[name]().get_params()
    for key, value in params.items():
        if key not in defaults:
            raise ValueError(
                f"head {name!r} has no parameter {key!r}; it takes {', '.join(sorted(defaults))}"
            )
        problem = _value_problem(key, value, defaults[key], HEADS[name])
        if problem:
            raise ValueError(f"head {name!r}: parameter {key!r} {problem}, not {value!r}")
    # numpy scalars as Python's (FAISS refuses a numpy k; JSON cannot save one)
    params = {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}
    head = HEADS[name](**params)
    try:
        head.check_params()  # (values that need no data: a study's grid, before any cell)
    except ValueError as exc:
        raise ValueError(f"head {name!r}: {exc}") from None
    return head


def _value_problem(key: str, value: Any, default: Any, kind: type) -> str | None:
    """What a parameter's value lacks, judged by its default's type (None: nothing): a whole
    number where the default is one (``n_neighbors=2.5`` reached FAISS), a finite number for
    a real one, true or false for a switch, text for text (a number is taken where the head
    names the parameter in ``_text_or_number``), a device's name (whether this machine has
    that device is asked when the head is fitted: a head saved on a GPU loads without one).
    Ranges are the head's :meth:`check_params`'."""
    if key == "device":
        import torch

        try:
            if not isinstance(value, str):
                raise TypeError
            torch.device("cuda" if value in ("auto", "gpu") else value)
        except (RuntimeError, TypeError):
            return "names a device: auto, cpu, gpu or cuda[:N]"
        return None
    if isinstance(default, bool):
        return None if isinstance(value, (bool, np.bool_)) else "takes true or false"
    if isinstance(default, str) and not isinstance(value, str):
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        either = key in getattr(kind, "_text_or_number", ())
        if not (number and either):
            return "takes text or a number" if either else "takes text"
    if isinstance(value, (bool, np.bool_)):
        return "takes a number" if isinstance(default, (int, float)) else None
    if isinstance(default, int) and not isinstance(value, (int, np.integer)):
        return "takes a whole number"
    if isinstance(default, float) and not (
        isinstance(value, (int, float, np.number)) and np.isfinite(value)
    ):
        return "takes a finite number"
    return None


def _torch_device(device: Any) -> Any:
    """torch's device for a head's ``device``: ``auto``, ``cpu``, ``cuda[:N]``, or FAISS's
    name ``gpu`` (as ``cuda``).

    Raises:
        ValueError: not a device name, or a CUDA device this machine lacks.
    """
    from pinsearch.embed import resolve_device

    if not isinstance(device, str):
        raise ValueError(f"a device is named by text (auto, cpu, cuda), got {device!r}")
    return resolve_device("cuda" if device == "gpu" else device)


def mlp_optimizer(params: Iterable[Any], lr: float, weight_decay: float, penalty: str) -> Any:
    """The optimizer :class:`MLPHead` trains with, over its parameters.

    ``penalty`` says what ``weight_decay`` is: ``adamw``, torch's AdamW, which shrinks every
    parameter by ``lr * weight_decay`` each step, apart from the gradient; ``l2``, plain Adam,
    the penalty's gradient being added to the weights' (:func:`add_l2_gradient`) before each
    step, so it goes through Adam's moments with the rest, as in scikit-learn's
    ``MLPClassifier``. Fused where the device and this torch have a kernel (one launch updates
    every parameter), else torch's default: the same update either way. A small network's
    steps are bound by launches and dispatch, not arithmetic: fused, ``MLPHead.fit`` on 16-d
    data takes a quarter less time on the CPU.

    Raises:
        ValueError: another penalty than those of :data:`MLP_PENALTIES`.
    """
    import torch

    if penalty not in MLP_PENALTIES:
        raise ValueError(f"penalty must be one of {', '.join(MLP_PENALTIES)}, got {penalty!r}")
    params = list(params)
    kind: Any = torch.optim.AdamW if penalty == "adamw" else torch.optim.Adam
    options = {"weight_decay": weight_decay} if penalty == "adamw" else {}
    try:
        return kind(params, lr=lr, fused=True, **options)
    except (RuntimeError, TypeError):  # no fused kernel here (torch < 2.4 on the CPU, ...)
        return kind(params, lr=lr, **options)


def add_l2_gradient(grads: Sequence[Any], weights: Sequence[Any], alpha: float, rows: Any) -> None:
    """Add scikit-learn ``MLPClassifier``'s penalty gradient to the weights' gradients, in
    place: ``alpha * W / rows``, the gradient of ``alpha / 2 * ||W||^2`` (weights only, not
    biases) divided by the batch's rows and added to its mean loss; Adam then takes it into
    its moments with the rest. (One fused update per weight; the same sum written into the
    loss would cost autograd a reduction and its backward per step.)

    Args:
        grads: the weights' gradients, written in place.
        weights: the weight matrices, or stacks of them with a leading member dimension (an
            ensemble's ``(B, in, out)``).
        alpha: the penalty's strength.
        rows: the batch's rows: a number, or a tensor of one per member.
    """
    for g, w in zip(grads, weights):
        if isinstance(rows, (int, float)):
            g.add_(w.detach(), alpha=alpha / rows)
        else:
            g.addcmul_(w.detach(), (alpha / rows).view(-1, *[1] * (w.dim() - 1)))


def check_C(C: Any) -> None:
    """Refuse a regularisation ``C`` that is not a finite positive number (NaN and infinity
    would pass a plain ``C <= 0`` test and fail, or score, far from here)."""
    if (
        isinstance(C, bool)
        or not isinstance(C, (int, float, np.number))
        or not (np.isfinite(C) and C > 0)
    ):
        raise ValueError(f"C must be a finite positive number, got {C!r}")


def check_solver_limits(max_iter: Any, tol: Any) -> None:
    """Refuse solver limits that stop it before it starts (``max_iter`` 0 or less gave an
    all-zero model that always answered the first class) or never (a tolerance of 0 or less)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a whole number >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.number)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")


def scaler_stats(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale a head standardises with (zeros and ones when ``standardize`` is off).

    As scikit-learn's ``StandardScaler``: accumulated in float64, and a feature whose
    variance is within rounding of zero (``n * eps * var + (n * mean * eps) ** 2``) is
    constant and keeps scale 1. (A float32 standard deviation of a column of 0.1s is about
    1e-5, not 0: dividing by it blew any other test value of that feature up.)
    """
    if not standardize:
        return np.zeros(X.shape[1], X.dtype), np.ones(X.shape[1], X.dtype)
    n = X.shape[0]
    mean = X.mean(axis=0, dtype=np.float64)
    var = X.var(axis=0, dtype=np.float64)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.where(constant, 1.0, np.sqrt(var))
    return mean.astype(X.dtype), scale.astype(X.dtype)


def knn_votes(dist: np.ndarray, labels: np.ndarray, n_classes: int, weights: str) -> np.ndarray:
    """(n, n_classes) votes of neighbours with distances ``dist`` and encoded ``labels`` (n, k).

    ``distance`` weights are 1 / distance; a query with an exact match (distance 0) is decided
    by its exact matches alone, as in scikit-learn.
    """
    if weights == "uniform":
        w = np.ones_like(dist)
    else:
        with np.errstate(divide="ignore"):
            w = 1.0 / dist
        exact = np.isinf(w)
        rows = exact.any(axis=1)
        w[rows] = exact[rows]
    votes = np.zeros((len(dist), n_classes))
    np.add.at(votes, (np.arange(len(dist))[:, None], labels), w)
    return votes


class _Head(ClassifierMixin, BaseEstimator):
    """Shared plumbing: label encoding, standardisation, (de)serialisation of arrays."""

    _array_names: tuple[str, ...] = ()

    def check_params(self) -> None:
        """Refuse hyperparameters no data could make sense of (a range, a choice), before
        any fitting: :func:`create_head` calls it, and ``fit`` again (a head built or changed
        by ``set_params``, as a grid search's are).

        Raises:
            ValueError: naming the parameter and its value.
        """

    def _encode(self, y: np.ndarray) -> np.ndarray:
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        return encoded

    def _fit_scaler(self, X: np.ndarray, standardize: bool) -> np.ndarray:
        self.mean_, self.scale_ = scaler_stats(X, standardize)
        return self._scale(X)

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean_) / self.scale_).astype(np.float32)

    def _check(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float32)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        scores = self._scores(self._check(X))
        return self.classes_[np.argmax(scores, axis=1)]

    def _scores(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def class_scores(self, X: Any) -> np.ndarray:
        """(n, n_classes) scores, higher is more likely: probabilities where the head has
        them, decision values otherwise."""
        X = self._check(X)
        return self.predict_proba(X) if hasattr(self, "predict_proba") else self._scores(X)

    def get_state(self) -> dict[str, np.ndarray]:
        """Learned arrays (for saving)."""
        check_is_fitted(self)
        return {n: np.asarray(getattr(self, n)) for n in ("classes_", *self._array_names)}

    def set_state(self, arrays: dict[str, np.ndarray], n_features: int) -> None:
        """Restore learned arrays saved by :meth:`get_state`."""
        for name, value in arrays.items():
            setattr(self, name, value)
        self.n_features_in_ = n_features
        self._after_restore()

    def _after_restore(self) -> None:
        return None


@register_head("knn")
class KNNHead(_Head):
    """k-nearest-neighbour vote through a FAISS index (exact ``Flat`` by default).

    Args:
        n_neighbors: k.
        metric: ``l2``, ``l1``, ``cosine`` or ``ip``.
        weights: ``uniform`` or ``distance`` (1 / distance; cosine/ip use 1 - similarity).
        factory: FAISS factory string of the index built over the training vectors.
        device: index placement: ``auto``, ``cpu`` or ``gpu`` (``cuda`` too); a head saved
            with ``gpu`` is loaded with ``auto`` (on a machine without one, on the CPU).
        precision: ``float32`` (FAISS), or ``float16`` / ``bfloat16`` for the exact torch scan
            of a ``Flat`` index (:class:`~pinsearch.indexes.TorchExact`; a GPU speed-up).
    """

    _array_names = ("train_vectors_", "train_labels_")

    def __init__(
        self,
        n_neighbors: int = 5,
        metric: str = "l2",
        weights: str = "uniform",
        factory: str = "Flat",
        device: str = "auto",
        precision: str = "float32",
    ) -> None:
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.factory = factory
        self.device = device
        self.precision = precision

    def check_params(self) -> None:
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        if self.weights == "distance" and self.metric == "ip":
            raise ValueError(
                "weights='distance' needs a distance, and metric 'ip' has none (1 - an inner "
                "product past 1 would weigh negatively): use cosine, l2 or l1"
            )
        k = self.n_neighbors
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_neighbors must be a whole number >= 1, got {k!r}")
        if not all(isinstance(v, str) for v in (self.factory, self.metric, self.precision)):
            raise ValueError(
                "factory, metric and precision are text, got "
                f"{self.factory!r}, {self.metric!r}, {self.precision!r}"
            )
        from pinsearch.indexes import IndexConfig

        IndexConfig(factory=self.factory, metric=self.metric, precision=self.precision)  # type: ignore[arg-type]

    def fit(self, X: Any, y: Any) -> KNNHead:
        """Index the training vectors."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.check_params()
        k = self.n_neighbors
        if not k <= len(X):
            raise ValueError(
                f"n_neighbors={self.n_neighbors} must be between 1 and the number of "
                f"training samples, n_samples={len(X)}"
            )
        self.train_labels_ = self._encode(y)
        self.train_vectors_ = np.ascontiguousarray(X)
        self._build_index(self.device)
        return self

    def _after_restore(self) -> None:
        # a head fitted on a GPU loads anywhere: placed where this machine allows
        gpu = self.device == "gpu" or self.device.startswith("cuda")
        self._build_index("auto" if gpu else self.device)

    def _build_index(self, device: str) -> None:
        from pinsearch.indexes import IndexConfig, build_index

        config = IndexConfig(
            factory=self.factory,
            metric=self.metric,  # type: ignore[arg-type]
            device="gpu" if device.startswith("cuda") else device,  # type: ignore[arg-type]
            precision=self.precision,  # type: ignore[arg-type]
        )
        keys = np.arange(len(self.train_vectors_), dtype=np.int64)
        self.index_ = build_index(self.train_vectors_, keys, config)

    def kneighbors(self, X: Any, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Euclidean for l2, 1 - similarity for cosine/ip) and training rows."""
        X = self._check(X)
        k = n_neighbors or self.n_neighbors
        if not 1 <= k <= len(self.train_vectors_):
            raise ValueError(
                f"n_neighbors must be between 1 and the {len(self.train_vectors_)} training "
                f"vectors, got {k}"
            )
        raw, idx = self.index_.search(X, int(k))  # (FAISS takes no numpy integer)
        if self.metric == "l2":
            dist = np.sqrt(np.maximum(raw, 0))
        elif self.metric == "cosine":
            # a duplicate's similarity may round to just above 1 (by the order of the sums:
            # the GPU's differs from the CPU's); its distance is 0, not a negative vote weight
            dist = np.maximum(1.0 - raw, 0.0)
        elif self.metric == "ip":
            dist = 1.0 - raw
        else:
            dist = raw
        return dist, idx

    def _scores(self, X: np.ndarray) -> np.ndarray:
        dist, idx = self.kneighbors(X)
        return knn_votes(dist, self.train_labels_[idx], len(self.classes_), self.weights)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Share of (weighted) votes per class."""
        votes = self._scores(self._check(X))
        return votes / votes.sum(axis=1, keepdims=True)


class _TorchHead(_Head):
    """Heads trained with torch on standardised float32 inputs."""

    #: one-vs-rest margins (the SVMs): with two classes, class 0's problem is class 1's negated
    _one_vs_rest = False

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores; one column for two classes, as scikit-learn returns (an SVM's is
        class 1's margin, as ``LinearSVC``'s: half the difference of the two problems')."""
        scores = self._scores(self._check(X))
        if len(self.classes_) != 2:
            return scores
        return (scores[:, 1] - scores[:, 0]) / (2 if self._one_vs_rest else 1)

    def _forward(self, X: np.ndarray) -> np.ndarray:
        """The fitted layers applied functionally (ReLU between them): no module is built,
        so predicting neither re-initialises weights it would overwrite nor draws from torch's
        global random generator."""
        import torch
        from torch.nn.functional import linear, relu

        arrays = self._layers()
        h = torch.from_numpy(self._scale(X))
        with torch.inference_mode():
            for i in range(0, len(arrays), 2):
                w, b = (torch.from_numpy(np.asarray(a, np.float32)) for a in arrays[i : i + 2])
                h = linear(relu(h) if i else h, w, b)
        return h.numpy()

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return self._forward(X)

    def _layers(self) -> tuple[np.ndarray, ...]:
        """Weight (out x in) and bias of each linear layer, in order."""
        raise NotImplementedError


_LIBLINEAR_MAX_CLASSES = 12


@register_head("lsvm")
class LinearSVMHead(_TorchHead):
    """One-vs-rest linear SVM: ``0.5 |w|^2 + C sum max(0, 1 - y f(x))^2`` per class.

    The objective of scikit-learn's ``LinearSVC`` (squared hinge, L2, bias regularised), solved
    full-batch with L-BFGS in torch (all classes at once; GPU when there is one) or, for a few
    classes on the CPU, by liblinear through ``LinearSVC``. Both reach the same minimiser.

    Args:
        C: inverse regularisation strength.
        max_iter: solver iterations (L-BFGS; liblinear gets at least 1000).
        tol: tolerance (L-BFGS gradient; liblinear uses its own default).
        standardize: scale features to zero mean and unit variance first (recorded).
        device: ``auto``, ``cpu`` or ``cuda``.
        solver: ``auto`` (liblinear on the CPU for up to 12 classes, torch otherwise),
            ``torch`` or ``liblinear``.
    """

    _array_names = ("coef_", "intercept_", "mean_", "scale_")
    _one_vs_rest = True

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 500,
        tol: float = 1e-5,
        standardize: bool = True,
        device: str = "auto",
        solver: str = "auto",
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.device = device
        self.solver = solver

    def check_params(self) -> None:
        check_C(self.C)
        check_solver_limits(self.max_iter, self.tol)
        if self.solver not in ("auto", "torch", "liblinear"):
            raise ValueError(f"solver must be auto, torch or liblinear, got {self.solver!r}")

    def fit(self, X: Any, y: Any) -> LinearSVMHead:
        """Train the one-vs-rest problems (torch: all at once, their objectives are independent)."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.check_params()
        encoded = self._encode(y)
        if len(self.classes_) < 2:
            raise ValueError(
                f"needs samples of at least 2 classes; got 1 class ({self.classes_.tolist()})"
            )
        dev = _torch_device(self.device)
        xs = self._fit_scaler(X, self.standardize)
        solver = self.solver
        if solver == "auto":
            # liblinear solves one problem per class: fast for a few classes on the CPU; the
            # batched torch solver wins on a GPU and, measured, beyond a dozen classes on CPU too
            # (100 classes, 4,000 x 1,280: 15 s vs over 5 minutes).
            few = len(self.classes_) <= _LIBLINEAR_MAX_CLASSES
            solver = "liblinear" if dev.type == "cpu" and few else "torch"
        if solver == "liblinear":
            self._fit_liblinear(xs, encoded)
        else:
            self._fit_torch(xs, encoded, dev)
        return self

    def _fit_liblinear(self, xs: np.ndarray, encoded: np.ndarray) -> None:
        from sklearn.svm import LinearSVC

        svc = LinearSVC(C=self.C, max_iter=max(1000, self.max_iter), random_state=0)
        svc.fit(xs, encoded)
        coef, intercept = svc.coef_, svc.intercept_
        if len(self.classes_) == 2:  # one decision function f: class 1 scores f, class 0 -f
            coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
        self.coef_ = coef.astype(np.float32)
        self.intercept_ = intercept.astype(np.float32)
        self.n_iter_ = int(np.max(svc.n_iter_))

    def _fit_torch(self, xs: np.ndarray, encoded: np.ndarray, dev: Any) -> None:
        import torch

        n, d = xs.shape
        x = torch.from_numpy(xs).to(dev)
        n_out = len(self.classes_)
        target = -torch.ones(n, n_out, device=dev)
        target[torch.arange(n, device=dev), torch.from_numpy(encoded).to(dev)] = 1.0
        w = torch.zeros(d, n_out, device=dev, requires_grad=True)
        b = torch.zeros(n_out, device=dev, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], max_iter=self.max_iter, tolerance_grad=self.tol, line_search_fn="strong_wolfe"
        )
        inv = 1.0 / (self.C * n)  # objective divided by C n: same minimiser, tamer scale

        def closure() -> Any:
            opt.zero_grad()
            margin = torch.clamp(1 - target * (x @ w + b), min=0)
            loss = (margin**2).sum() / n + 0.5 * inv * ((w**2).sum() + (b**2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        state = opt.state[opt.param_groups[0]["params"][0]]
        self.n_iter_ = int(state.get("n_iter", 0))
        ran_out = (
            self.n_iter_ >= self.max_iter
            or int(state.get("func_evals", 0)) >= opt.param_groups[0]["max_eval"]
        )
        closure()  # the gradient at the solution
        grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))  # type: ignore[union-attr]
        if ran_out and grad > 10 * self.tol:
            # as LinearSVC does. (L-BFGS also stops when float32 cannot lower the loss any
            # more, a gradient near 1e-4 on standardised features: that is converged enough.)
            warnings.warn(
                f"LinearSVMHead(C={self.C}): L-BFGS stopped after {self.n_iter_} of "
                f"{self.max_iter} iterations with a gradient of {grad:.1e} (tolerance "
                f"{self.tol:.0e}); raise max_iter",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.coef_ = w.detach().cpu().numpy().T.copy()
        self.intercept_ = b.detach().cpu().numpy().copy()

    def _layers(self) -> tuple[np.ndarray, ...]:
        return self.coef_, self.intercept_


@register_head("mlp")
class MLPHead(_TorchHead):
    """A 3-layer perceptron: input -> hidden -> hidden -> classes (ReLU), Adam, early stopping.

    Args:
        hidden: sizes of the two hidden layers.
        batch_size: mini-batch size.
        lr: Adam learning rate.
        max_epochs: most passes over the training data.
        patience: epochs without validation improvement before stopping.
        monitor: what early stopping watches on the validation split, and which epoch's
            weights are kept: ``loss`` (cross-entropy, the lowest) or ``accuracy`` (the
            highest, as scikit-learn's ``MLPClassifier(early_stopping=True)`` and Keras'
            ``val_accuracy`` do). On overlapping classes accuracy often still rises for
            epochs after the loss has turned up from over-confidence.
        validation_fraction: stratified share of the training data held out for early stopping.
        init: ``torch`` (torch's default for linear layers: weights and biases uniform within
            1/sqrt(fan_in)) or ``glorot`` (weights and biases uniform within
            sqrt(6 / (fan_in + fan_out)), as scikit-learn's ``MLPClassifier`` starts).
        weight_decay: strength of the penalty on the parameters.
        penalty: what ``weight_decay`` does: ``adamw`` (AdamW's decoupled decay of every
            parameter) or ``l2`` (scikit-learn's ``alpha``: an L2 penalty on the weights,
            divided by the batch's rows, through Adam); see :func:`mlp_optimizer` and
            :func:`add_l2_gradient`.
        standardize: scale features first (recorded).
        device: ``auto``, ``cpu`` or ``cuda``.
        random_state: seed of initialisation, shuffling and the validation split.

    After ``fit``: ``n_epochs_`` trained, ``validation_history_`` (validation loss, accuracy)
    per epoch, and, with a validation split, the kept epoch's ``best_validation_loss_`` and
    ``best_validation_accuracy_``.
    """

    _array_names = ("mean_", "scale_", "w1_", "b1_", "w2_", "b2_", "w3_", "b3_")

    def __init__(
        self,
        hidden: tuple[int, int] = (512, 256),
        batch_size: int = 64,
        lr: float = 1e-3,
        max_epochs: int = 100,
        patience: int = 8,
        monitor: str = "loss",
        validation_fraction: float = 0.1,
        init: str = "torch",
        weight_decay: float = 1e-4,
        penalty: str = "adamw",
        standardize: bool = True,
        device: str = "auto",
        random_state: int = 0,
    ) -> None:
        self.hidden = hidden
        self.batch_size = batch_size
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.monitor = monitor
        self.validation_fraction = validation_fraction
        self.init = init
        self.weight_decay = weight_decay
        self.penalty = penalty
        self.standardize = standardize
        self.device = device
        self.random_state = random_state

    def check_params(self) -> None:
        """Clear errors for values that would otherwise fail deep in torch (or loop forever)."""
        hidden = self.hidden
        if (
            not isinstance(hidden, (tuple, list))
            or len(hidden) != 2
            or not all(isinstance(h, (int, np.integer)) and h > 0 for h in hidden)
        ):
            raise ValueError(
                f"MLPHead: hidden must be two positive layer sizes like [512, 256], got {hidden!r}"
            )
        for name, low, strict in (("batch_size", 1, False), ("max_epochs", 1, False),
                                  ("patience", 0, False), ("lr", 0, True),
                                  ("weight_decay", 0, False)):  # fmt: skip
            value = getattr(self, name)
            whole = name in ("batch_size", "max_epochs", "patience")
            kinds = (int, np.integer) if whole else (int, float, np.number)
            if (
                isinstance(value, bool)
                or not isinstance(value, kinds)
                or value < low
                or (strict and value == low)
            ):
                bound = f"> {low}" if strict else f">= {low}"
                what = "a whole number " if whole else ""
                raise ValueError(f"MLPHead: {name} must be {what}{bound}, got {value!r}")
        if isinstance(self.random_state, bool) or not isinstance(
            self.random_state, (int, np.integer)
        ):
            raise ValueError(
                f"MLPHead: random_state must be a whole number (the seed of initialisation, "
                f"shuffling and the validation split), got {self.random_state!r}"
            )
        for name, allowed in (("monitor", MONITORS), ("init", MLP_INITS),
                              ("penalty", MLP_PENALTIES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"MLPHead: {name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")  # fmt: skip
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"MLPHead: validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )

    def _build(self, n_in: int, n_out: int) -> Any:
        import torch

        self.check_params()
        h1, h2 = self.hidden
        return torch.nn.Sequential(
            torch.nn.Linear(n_in, h1),
            torch.nn.ReLU(),
            torch.nn.Linear(h1, h2),
            torch.nn.ReLU(),
            torch.nn.Linear(h2, n_out),
        )

    def _validation_split(self, encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Training rows, validation rows (stratified, seeded) and whether there is a split."""
        from sklearn.model_selection import train_test_split

        n, n_classes = len(encoded), int(encoded.max()) + 1
        counts = np.bincount(encoded)
        use_val = self.validation_fraction > 0 and counts.min() >= 2 and n >= 10
        if not use_val:
            return np.arange(n), np.arange(0), False
        n_val = max(round(self.validation_fraction * n), n_classes)
        stratify = encoded if n_val <= n - n_classes else None
        tr, va = train_test_split(
            np.arange(n), test_size=n_val, stratify=stratify, random_state=self.random_state
        )
        return tr, va, True

    def _seeded_network(self, n_in: int, n_out: int) -> Any:
        """The untrained network, initialised from ``random_state`` (on the CPU) as ``init``
        says. Only a network about to train is built: prediction applies the saved weights
        functionally (``_forward``)."""
        import torch

        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.default_generator.manual_seed(self.random_state)  # the CPU's, restored
            net = self._build(n_in, n_out)
            if self.init == "glorot":
                for layer in net[::2]:
                    bound = float(np.sqrt(6.0 / sum(layer.weight.shape)))
                    layer.weight.uniform_(-bound, bound)
                    layer.bias.uniform_(-bound, bound)
            return net

    def monitored(self, loss: Any, accuracy: Any) -> Any:
        """The validation value early stopping minimises: the loss, or minus the accuracy."""
        return loss if self.monitor == "loss" else -accuracy

    def fit(self, X: Any, y: Any) -> MLPHead:
        """Train with early stopping on a stratified validation split (``monitor``); keep the
        best epoch."""
        import torch

        self.check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        encoded = self._encode(y)
        xs = self._fit_scaler(X, self.standardize)
        tr, va, use_val = self._validation_split(encoded)
        dev = _torch_device(self.device)
        gen = torch.Generator().manual_seed(self.random_state)
        net = self._seeded_network(X.shape[1], len(self.classes_)).to(dev)
        opt = mlp_optimizer(net.parameters(), self.lr, self.weight_decay, self.penalty)
        weights = [p for p in net.parameters() if p.dim() > 1] if self.penalty == "l2" else []
        x_tr = torch.from_numpy(xs[tr]).to(dev)
        y_tr = torch.from_numpy(encoded[tr]).long().to(dev)
        x_va = torch.from_numpy(xs[va]).to(dev)
        y_va = torch.from_numpy(encoded[va]).long().to(dev)
        # the kept epoch, its weights and its validation (loss, accuracy): none yet
        best = (0, [p.detach().clone() for p in net.parameters()], (np.inf, -np.inf))
        loss_fn = torch.nn.CrossEntropyLoss()
        self.n_epochs_, self.validation_history_ = 0, []
        for epoch in range(self.max_epochs):
            net.train()
            order = torch.randperm(len(tr), generator=gen).to(dev)
            for start in range(0, len(tr), self.batch_size):
                batch = order[start : start + self.batch_size]
                opt.zero_grad()
                loss_fn(net(x_tr[batch]), y_tr[batch]).backward()
                if weights:
                    grads = [w.grad for w in weights]
                    add_l2_gradient(grads, weights, self.weight_decay, len(batch))
                opt.step()
            self.n_epochs_ = epoch + 1
            if not use_val:
                continue
            net.eval()
            with torch.no_grad():
                logits = net(x_va)
                val = float(loss_fn(logits, y_va)), float((logits.argmax(1) == y_va).float().mean())
            self.validation_history_.append(val)
            if self.monitored(*val) < self.monitored(*best[2]) - 1e-4:
                best = (epoch, [p.detach().clone() for p in net.parameters()], val)
            elif epoch - best[0] >= self.patience:
                break
        if use_val:
            with torch.no_grad():
                for p, saved in zip(net.parameters(), best[1]):
                    p.copy_(saved)
            self.best_validation_loss_, self.best_validation_accuracy_ = best[2]
        params = [p.detach().cpu().numpy().copy() for p in net.parameters()]
        self.w1_, self.b1_, self.w2_, self.b2_, self.w3_, self.b3_ = params
        return self

    def _layers(self) -> tuple[np.ndarray, ...]:
        return self.w1_, self.b1_, self.w2_, self.b2_, self.w3_, self.b3_

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the network's outputs."""
        z = self._scores(self._check(X))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


# -- persistence ----------------------------------------------------------------------------


def saved_params(head: BaseEstimator) -> dict[str, Any]:
    """A head's hyperparameters as JSON values (tuples as lists), without the ones that
    come from the store at fit time (``_unsaved_params``, e.g. a text encoder)."""
    unsaved = getattr(head, "_unsaved_params", ())
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in head.get_params().items()
        if k not in unsaved
    }


def save_head(head: BaseEstimator, path: str | Path) -> Path:
    """Save a fitted head as ``PATH.npz`` (arrays) + ``PATH.json`` (class, params, classes).

    Returns:
        The JSON path.
    """
    name = getattr(head, "head_name", None)
    if name is None or not isinstance(head, _Head):
        raise ValueError(f"{type(head).__name__} is not a registered pinsearch head")
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    state = head.get_state()
    classes = state.pop("classes_")
    arrays = {k.rstrip("_"): v for k, v in state.items()}
    npz = base.with_name(base.name + ".npz")
    tmp = temp_beside(npz)
    with tmp.open("wb") as fh:
        # Object arrays would need pickle: labels are stored as text unless already numeric.
        np.savez(fh, classes=classes.astype(str) if classes.dtype == object else classes, **arrays)
    replace_durably(tmp, npz)
    params = saved_params(head)
    meta = {
        "head": name,
        "params": params,
        "classes": [str(c) for c in classes],
        "n_features": int(head.n_features_in_),
        "pinsearch_version": __version__,
    }
    out = base.with_name(base.name + ".json")
    tmp = temp_beside(out)
    tmp.write_text(json.dumps(meta, indent=2))
    replace_durably(tmp, out)
    return out


def load_head(path: str | Path) -> BaseEstimator:
    """Load a head saved by :func:`save_head` (no pickle involved)."""
    base = Path(path)
    meta_file = base.with_name(base.name + ".json")
    if not meta_file.is_file():
        raise FileNotFoundError(f"no saved head at {base} ({meta_file.name} missing)")
    meta = json.loads(meta_file.read_text())
    params = dict(meta["params"])
    for key in ("hidden", "prompts"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    head = create_head(meta["head"], **params)
    arrays = {f"{k}_": v for k, v in load_npz(base.with_name(base.name + ".npz")).items()}
    head.set_state(arrays, int(meta["n_features"]))  # type: ignore[attr-defined]
    return head


import pinsearch.kernel  # noqa: E402  (registers the rbf_svm head; kernel imports heads)
import pinsearch.zeroshot  # noqa: E402, F401  (registers the zeroshot head)
