"""A non-linear SVM head: an approximate RBF kernel map followed by the linear SVM head.

:class:`RBFSVMHead` (registry name ``rbf_svm``) standardises the inputs, maps them with an
approximation of the RBF kernel ``k(x, x') = exp(-gamma |x - x'|^2)`` -- Nystroem (kernel
columns of a random subset of training points, whitened) or random Fourier features -- and
trains :class:`~pinsearch.heads.LinearSVMHead` on the mapped features. Inner products of mapped
features approximate the kernel, so the linear SVM on them approximates a kernel SVM at a cost
linear in the number of training pins.

The maps are fitted with :mod:`sklearn.kernel_approximation`; their arrays (Nystroem
``components_`` and ``normalization_``, or the Fourier ``random_weights_`` and
``random_offset_``) are kept as plain arrays with the linear SVM's weights, so the head is saved
by :func:`~pinsearch.heads.save_head` as ``.npz`` + JSON like every other head, without pickle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.utils.validation import validate_data

from pinsearch.heads import LinearSVMHead, _TorchHead, check_C, register_head

__all__ = ["KERNEL_MAPS", "RBFSVMHead", "rbf_features", "scale_gamma"]

#: Learned arrays of each kernel map, by ``method``.
KERNEL_MAPS: dict[str, tuple[str, ...]] = {
    "nystroem": ("components_", "normalization_"),
    "rff": ("random_weights_", "random_offset_"),
}


def scale_gamma(X: np.ndarray) -> float:
    """``1 / (n_features * X.var())``, scikit-learn's ``gamma="scale"`` (1.0 for constant X)."""
    var = float(np.asarray(X, dtype=np.float64).var())
    return 1.0 / (X.shape[1] * var) if var > 0 else 1.0


def rbf_features(
    X: np.ndarray, method: str, gamma: float, arrays: dict[str, np.ndarray]
) -> np.ndarray:
    """Map rows of ``X`` with a fitted kernel map (the transform of scikit-learn's maps).

    Args:
        X: (n, d) inputs, already standardised.
        method: ``nystroem`` or ``rff``.
        gamma: the RBF kernel's ``gamma`` (used by ``nystroem``; ``rff`` has it in its weights).
        arrays: the map's arrays, named as in :data:`KERNEL_MAPS`.

    Returns:
        (n, n_components) float64 features.
    """
    x = np.asarray(X, dtype=np.float64)
    if method == "nystroem":
        c = np.asarray(arrays["components_"], dtype=np.float64)
        sq = (x * x).sum(axis=1)[:, None] + (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)
        kernel = np.exp(-gamma * np.maximum(sq, 0.0))
        return kernel @ np.asarray(arrays["normalization_"], dtype=np.float64).T
    if method == "rff":
        w = np.asarray(arrays["random_weights_"], dtype=np.float64)
        proj = x @ w + np.asarray(arrays["random_offset_"], dtype=np.float64)
        return np.sqrt(2.0 / w.shape[1]) * np.cos(proj)
    raise ValueError(f"method must be one of {sorted(KERNEL_MAPS)}, got {method!r}")


@register_head("rbf_svm")
class RBFSVMHead(_TorchHead):
    """One-vs-rest SVM with an (approximate) RBF kernel.

    Args:
        C: inverse regularisation strength of the linear SVM on the mapped features (mapped
            features have unit-scale inner products, so ``C`` means what it means for ``SVC``).
        gamma: RBF width, a positive float or ``"scale"``: ``1 / (n_features * X.var())`` of
            the standardised training inputs.
        n_components: dimension of the kernel map (Nystroem uses at most the number of
            training samples).
        method: ``nystroem`` (data-dependent, usually more accurate) or ``rff`` (random Fourier
            features).
        random_state: seed of the map's random draws.
        max_iter: L-BFGS iterations of the linear SVM.
        tol: gradient tolerance of the linear SVM.
        device: where the linear SVM trains: ``auto``, ``cpu`` or ``cuda``.
    """

    _array_names = ("mean_", "scale_", "gamma_", "svm_coef_", "svm_intercept_")
    _text_or_number = ("gamma",)  # "scale" or a number
    _one_vs_rest = True

    def __init__(
        self,
        C: float = 1.0,
        gamma: float | str = "scale",
        n_components: int = 1024,
        method: str = "nystroem",
        random_state: int | None = 0,
        max_iter: int = 500,
        tol: float = 1e-5,
        device: str = "auto",
    ) -> None:
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.method = method
        self.random_state = random_state
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def check_params(self) -> None:
        if not isinstance(self.method, str) or self.method not in KERNEL_MAPS:
            raise ValueError(f"method must be one of {sorted(KERNEL_MAPS)}, got {self.method!r}")
        gamma = self.gamma
        number = isinstance(gamma, (int, float, np.number)) and not isinstance(gamma, bool)
        if gamma != "scale" and not (number and np.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive number or 'scale', got {gamma!r}")
        if isinstance(self.n_components, bool) or not (
            isinstance(self.n_components, (int, np.integer)) and self.n_components >= 1
        ):
            raise ValueError(f"n_components must be a positive integer, got {self.n_components!r}")
        check_C(self.C)

    def fit(self, X: Any, y: Any) -> RBFSVMHead:
        """Fit the kernel map on the standardised inputs, then the linear SVM on its output."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.check_params()
        encoded = self._encode(y)
        if len(self.classes_) < 2:
            raise ValueError(
                f"needs samples of at least 2 classes; got 1 class ({self.classes_.tolist()})"
            )
        xs = self._fit_scaler(X, standardize=True)
        gamma = scale_gamma(xs) if self.gamma == "scale" else float(self.gamma)
        self.gamma_ = np.asarray(gamma, dtype=np.float64)
        if self.method == "nystroem":
            m = min(int(self.n_components), len(xs))
            nys = Nystroem(
                kernel="rbf", gamma=gamma, n_components=m, random_state=self.random_state
            ).fit(xs)
            self.components_ = np.asarray(nys.components_, dtype=np.float32)
            self.normalization_ = np.asarray(nys.normalization_, dtype=np.float64)
        else:
            rff = RBFSampler(
                gamma=gamma, n_components=int(self.n_components), random_state=self.random_state
            ).fit(xs)
            self.random_weights_ = np.asarray(rff.random_weights_, dtype=np.float64)
            self.random_offset_ = np.asarray(rff.random_offset_, dtype=np.float64)
        features = self._features(xs).astype(np.float32)
        svm = LinearSVMHead(
            C=self.C, max_iter=self.max_iter, tol=self.tol, standardize=False, device=self.device
        ).fit(features, encoded)
        self.svm_coef_ = np.asarray(svm.coef_, dtype=np.float32)
        self.svm_intercept_ = np.asarray(svm.intercept_, dtype=np.float32)
        self.n_iter_ = svm.n_iter_
        return self

    def _features(self, xs: np.ndarray) -> np.ndarray:
        arrays = {name: getattr(self, name) for name in KERNEL_MAPS[self.method]}
        return rbf_features(xs, self.method, float(self.gamma_), arrays)

    def kernel_features(self, X: Any) -> np.ndarray:
        """The kernel map's features of ``X`` (what the linear SVM sees), float64."""
        return self._features(self._scale(self._check(X)))

    def _scores(self, X: np.ndarray) -> np.ndarray:
        features = self._features(self._scale(X))
        coef = np.asarray(self.svm_coef_, dtype=np.float64)
        return features @ coef.T + np.asarray(self.svm_intercept_, dtype=np.float64)

    def get_state(self) -> dict[str, np.ndarray]:
        """Learned arrays: scaler, gamma, the kernel map's arrays and the linear SVM's weights."""
        state = super().get_state()
        state.update({n: np.asarray(getattr(self, n)) for n in KERNEL_MAPS[self.method]})
        return state

    def _after_restore(self) -> None:
        # Arrays come back from .npz exactly as saved; only check that they fit the method.
        missing = [n for n in KERNEL_MAPS[self.method] if not hasattr(self, n)]
        if missing:
            raise ValueError(f"saved rbf_svm head (method={self.method!r}) lacks {missing}")
        self.gamma_ = np.asarray(self.gamma_, dtype=np.float64)
