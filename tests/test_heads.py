"""Heads: scikit-learn contract, agreement with scikit-learn's own estimators, persistence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import f1_score
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from pinsearch.errors import DeviceError
from pinsearch.heads import (
    HEADS,
    KNNHead,
    LinearSVMHead,
    MLPHead,
    add_l2_gradient,
    create_head,
    load_head,
    mlp_optimizer,
    register_head,
    save_head,
)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = make_classification(
        1200, 32, n_informative=16, n_classes=6, n_clusters_per_class=1, class_sep=1.2,
        random_state=0,
    )  # fmt: skip
    labels = np.array([f"cat{i}" for i in y])
    return train_test_split(X, labels, test_size=0.3, stratify=labels, random_state=0)


def _fit_on_codes(model: Any, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, Any]:
    """A scikit-learn reference fitted on the labels' integer codes, and the labels by code
    (sorted as the labels are: classes and ties come in the same order). Before 1.9,
    KNeighborsClassifier with manhattan and MLPClassifier with early stopping fail on string
    labels, which the heads take as they are."""
    classes, codes = np.unique(y, return_inverse=True)
    return classes, model.fit(X, codes)


@parametrize_with_checks(
    [KNNHead(n_neighbors=3), LinearSVMHead(max_iter=50), MLPHead(hidden=(16, 8), max_epochs=60)]
)
def test_sklearn_estimator_contract(estimator: object, check: object) -> None:
    check(estimator)  # type: ignore[operator]


@pytest.mark.parametrize(("metric", "sk_metric"), [("l2", "euclidean"), ("l1", "manhattan"),
                                                   ("cosine", "cosine")])  # fmt: skip
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_predicts_exactly_what_sklearn_brute_predicts(data, metric, sk_metric, weights, k):  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = data
    ours = KNNHead(k, metric, weights).fit(Xtr, ytr)
    ref = KNeighborsClassifier(k, metric=sk_metric, weights=weights, algorithm="brute")
    classes, ref = _fit_on_codes(ref, Xtr, ytr)
    np.testing.assert_array_equal(ours.predict(Xte), classes[ref.predict(Xte)])
    np.testing.assert_allclose(ours.predict_proba(Xte), ref.predict_proba(Xte), atol=1e-5)


def test_knn_rejects_k_larger_than_training_set() -> None:
    with pytest.raises(ValueError, match="n_neighbors=10"):
        KNNHead(10).fit(np.eye(4), ["a", "b", "a", "b"])
    head = KNNHead(3).fit(np.eye(4), ["a", "b", "a", "b"])  # and when asked at query time
    with pytest.raises(ValueError, match="between 1 and the 4 training vectors, got 10"):
        head.kneighbors(np.eye(4)[:1], 10)


def test_constant_features_keep_scale_one_as_in_standard_scaler() -> None:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from pinsearch.heads import scaler_stats

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 6)).astype(np.float32)
    y = (X[:, 1] + X[:, 2] > 0).astype(int) + (X[:, 3] > 1)
    X[:, 0], X[:, 4] = 0.1, 100.3  # constant in training, not exactly representable
    mean, scale = scaler_stats(X, True)
    ref = StandardScaler().fit(X)
    np.testing.assert_allclose(scale, ref.scale_, rtol=1e-6)
    assert scale[0] == scale[4] == 1.0
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-6)
    test = X.copy()
    test[:, 0], test[:, 4] = 0.2, 101.0  # other values of the constant features at test time
    ours = LinearSVMHead(C=1.0, solver="liblinear").fit(X, y)
    sk = make_pipeline(StandardScaler(), LinearSVC(C=1.0, random_state=0)).fit(X, y)
    assert (ours.predict(test) == ours.predict(X)).mean() >= 0.95  # not blown up
    assert (ours.predict(test) == sk.predict(test)).mean() >= 0.99


@pytest.mark.parametrize("solver", ["liblinear", "torch"])
def test_two_class_decision_function_is_linearsvcs(solver: str) -> None:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = np.where(X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=300) > 0, "b", "a")
    ours = LinearSVMHead(C=1.0, solver=solver, tol=1e-7, max_iter=2000).fit(X, y)
    sk = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=20000, tol=1e-6)).fit(X, y)
    scores = ours.decision_function(X)
    assert scores.shape == (300,) and (np.where(scores > 0, "b", "a") == ours.predict(X)).all()
    np.testing.assert_allclose(scores, sk.decision_function(X), atol=5e-3)


@pytest.mark.parametrize("C", [float("nan"), float("inf"), 0.0, -1.0, "1"])
def test_bad_regularisation_is_refused_everywhere(C: Any) -> None:
    from pinsearch.gridsearch import batched_grid_search
    from pinsearch.kernel import RBFSVMHead

    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = np.arange(40) % 2
    with pytest.raises(ValueError, match="C must be a finite positive number"):
        LinearSVMHead(C=C).fit(X, y)
    with pytest.raises(ValueError, match="C must be a finite positive number"):
        RBFSVMHead(C=C).fit(X, y)
    with pytest.raises(
        ValueError, match=r"C must be a finite positive number|C' takes a finite number"
    ):
        batched_grid_search("lsvm", {"device": "cpu"}, {"C": [1.0, C]}, X, y, cv=2)
    with pytest.raises(ValueError, match="at least 2 classes; y has 1"):
        batched_grid_search("lsvm", {"device": "cpu"}, {"C": [1.0]}, X, np.zeros(40), cv=2)


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_linear_svm_macro_f1_matches_linearsvc(data, C) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, yte = data
    ours = f1_score(yte, LinearSVMHead(C=C).fit(Xtr, ytr).predict(Xte), average="macro")
    ref_model = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=20000)).fit(Xtr, ytr)
    ref = f1_score(yte, ref_model.predict(Xte), average="macro")
    assert abs(ours - ref) <= 0.02


def test_mlp_macro_f1_close_to_sklearn_mlp(data) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, yte = data
    ours = f1_score(yte, MLPHead(batch_size=64).fit(Xtr, ytr).predict(Xte), average="macro")
    ref_model = make_pipeline(
        StandardScaler(),
        MLPClassifier((512, 256), batch_size=64, early_stopping=True, random_state=0),
    )
    classes, ref_model = _fit_on_codes(ref_model, Xtr, ytr)
    ref = f1_score(yte, classes[ref_model.predict(Xte)], average="macro")
    assert ours > 0.6 and abs(ours - ref) <= 0.02


def test_mlp_is_deterministic_for_a_seed(data) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = data
    a = MLPHead(hidden=(32, 16), max_epochs=5, random_state=3).fit(Xtr, ytr).predict_proba(Xte)
    b = MLPHead(hidden=(32, 16), max_epochs=5, random_state=3).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("monitor", ["loss", "accuracy"])
def test_mlp_keeps_the_epoch_best_by_its_monitor(data, monitor: str) -> None:  # type: ignore[no-untyped-def]
    Xtr, _, ytr, _ = data
    head = MLPHead(hidden=(32, 16), max_epochs=60, patience=6, monitor=monitor).fit(Xtr, ytr)
    loss, acc = np.array(head.validation_history_).T
    assert len(loss) == head.n_epochs_
    column = loss if monitor == "loss" else -acc
    kept = int(np.argmax(column <= column.min() + 1e-4))  # the first epoch within tol of best
    assert (head.best_validation_loss_, head.best_validation_accuracy_) == (loss[kept], acc[kept])
    # stopped `patience` epochs after the kept one, or at the epoch cap
    assert head.n_epochs_ - 1 - kept in (6, 7) or head.n_epochs_ == 60
    # the kept weights are that epoch's: their accuracy on the validation rows is its
    _, va, _ = head._validation_split(head._encode(ytr))
    again = np.mean(head.predict(Xtr[va]) == np.asarray(ytr)[va])
    assert again == pytest.approx(acc[kept], abs=1e-6)


def test_mlp_monitors_can_keep_different_epochs(data) -> None:  # type: ignore[no-untyped-def]
    # the same seed, split and batches: the runs agree until the loss stops improving; the
    # accuracy-monitored run keeps going while its accuracy does
    Xtr, _, ytr, _ = data
    params = {"hidden": (64, 32), "max_epochs": 60, "patience": 6}
    by_loss = MLPHead(**params).fit(Xtr, ytr)
    by_acc = MLPHead(**params, monitor="accuracy").fit(Xtr, ytr)
    n = min(by_loss.n_epochs_, by_acc.n_epochs_)
    np.testing.assert_allclose(by_loss.validation_history_[:n], by_acc.validation_history_[:n])
    assert by_acc.n_epochs_ > by_loss.n_epochs_
    assert by_acc.best_validation_accuracy_ > by_loss.best_validation_accuracy_
    assert by_acc.best_validation_loss_ > by_loss.best_validation_loss_


@pytest.mark.parametrize(
    ("init", "bound"),
    [("torch", lambda o, i: 1 / np.sqrt(i)), ("glorot", lambda o, i: np.sqrt(6 / (o + i)))],
)
def test_mlp_initialisation_spans_its_bound(init: str, bound: Any) -> None:
    head = MLPHead(hidden=(256, 128), init=init, random_state=1)
    net = head._seeded_network(512, 32)
    for layer in net[::2]:
        limit = bound(*layer.weight.shape)
        for p in (layer.weight, layer.bias):
            values = p.detach().numpy()
            assert np.abs(values).max() <= limit and np.abs(values).max() > 0.95 * limit
    again = head._seeded_network(512, 32)  # seeded: the same start every time
    for a, b in zip(net.parameters(), again.parameters()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())


def _sklearn_steps(X: np.ndarray, y: np.ndarray, start: list[np.ndarray], **params: Any) -> Any:
    """MLPClassifier trained from ``start`` (weights (in, out), biases, layer by layer) with
    a fresh Adam: a first fit initialises it, then the warm start takes ``start``."""
    clf = MLPClassifier(warm_start=True, shuffle=False, tol=0.0, n_iter_no_change=1000,
                        random_state=0, **{**params, "max_iter": 1})  # fmt: skip
    with pytest.warns(UserWarning):  # ConvergenceWarning: one epoch
        clf.fit(X, y)
    clf.coefs_, clf.intercepts_ = [a.copy() for a in start[0::2]], [a.copy() for a in start[1::2]]
    clf.set_params(max_iter=params["max_iter"])
    with pytest.warns(UserWarning):
        clf.fit(X, y)
    return [a for pair in zip(clf.coefs_, clf.intercepts_) for a in pair]


def _gap(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """Largest difference between torch's (out, in) layers and scikit-learn's (in, out)."""
    return max(float(np.abs((o.T if o.ndim == 2 else o) - t).max()) for o, t in zip(ours, theirs))


@pytest.mark.parametrize(("penalty", "same"), [("l2", True), ("adamw", False)])
def test_l2_penalty_steps_as_mlpclassifier_alpha(penalty: str, same: bool) -> None:
    # five full-batch steps from the same start: penalty "l2" is MLPClassifier's alpha (an L2
    # term over the batch's rows, through Adam's moments, weights only); AdamW's decay is not
    import torch

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 6)).astype(np.float32)
    y = np.arange(60) % 3
    alpha, steps = 30.0, 5  # strong enough for the penalty to steer Adam's steps
    net = MLPHead(hidden=(5, 4), init="glorot")._seeded_network(6, 3)
    start = [p.detach().numpy().T.copy() if p.dim() == 2 else p.detach().numpy().copy()
             for p in net.parameters()]  # fmt: skip
    theirs = _sklearn_steps(X, y, start, hidden_layer_sizes=(5, 4), alpha=alpha,
                            batch_size=60, max_iter=steps)  # fmt: skip
    opt = mlp_optimizer(net.parameters(), 1e-3, alpha, penalty)
    weights = [p for p in net.parameters() if p.dim() == 2]
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        if penalty == "l2":
            add_l2_gradient([w.grad for w in weights], weights, alpha, len(X))
        opt.step()
    gap = _gap([p.detach().numpy() for p in net.parameters()], theirs)
    assert max(float(np.abs(t - s).max()) for t, s in zip(theirs, start)) > 3e-3  # they moved
    assert (gap < 1e-5) if same else (gap > 1e-3), gap


def test_mlp_fit_with_l2_penalty_is_mlpclassifier_also_past_the_rows() -> None:
    # MLPHead.fit end to end against MLPClassifier from the same start: a batch size above
    # the training rows is the rows (scikit-learn clips it), and so is the penalty's divisor
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 6)).astype(np.float32)
    y = np.arange(60) % 3
    params = {"hidden": (5, 4), "init": "glorot", "batch_size": 256, "max_epochs": 5,
              "validation_fraction": 0.0, "standardize": False, "weight_decay": 30.0,
              "penalty": "l2", "device": "cpu"}  # fmt: skip
    head = MLPHead(**params).fit(X, y)
    net = head._seeded_network(6, 3)  # the start fit began from (seeded)
    start = [p.detach().numpy().T.copy() if p.dim() == 2 else p.detach().numpy().copy()
             for p in net.parameters()]  # fmt: skip
    theirs = _sklearn_steps(X, y, start, hidden_layer_sizes=(5, 4), alpha=30.0,
                            batch_size=256, max_iter=5)  # fmt: skip
    assert _gap(list(head._layers()), theirs) < 1e-5


def test_heads_work_in_grid_search(data) -> None:  # type: ignore[no-untyped-def]
    Xtr, _, ytr, _ = data
    search = GridSearchCV(KNNHead(), {"n_neighbors": [1, 5]}, scoring="f1_macro", cv=3)
    search.fit(Xtr, ytr)
    assert search.best_params_["n_neighbors"] in (1, 5)
    assert search.best_estimator_.index_.ntotal == len(Xtr)


@pytest.mark.parametrize("name", ["knn", "lsvm", "mlp"])
def test_save_load_round_trip_without_pickle(data, name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = data
    params = {"mlp": {"hidden": (32, 16), "max_epochs": 5}, "lsvm": {"C": 0.5}, "knn": {}}[name]
    head = create_head(name, **params).fit(Xtr, ytr)
    meta = save_head(head, tmp_path / name)
    assert meta.is_file() and (tmp_path / f"{name}.npz").is_file()
    back = load_head(tmp_path / name)
    assert type(back) is type(head) and back.get_params() == head.get_params()
    np.testing.assert_array_equal(back.predict(Xte), head.predict(Xte))
    with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as saved:  # loads without pickle
        assert "classes" in saved.files


@pytest.mark.parametrize("name", ["lsvm", "mlp"])
def test_torch_heads_leave_the_global_generator_alone(data, name) -> None:  # type: ignore[no-untyped-def]
    """Fitting and predicting draw nothing from torch's global generator (a caller's seeded
    code is not perturbed), and the scores are the network's: an ``nn.Sequential`` rebuilt
    from the fitted weights gives the same values."""
    import torch

    Xtr, Xte, ytr, _ = data
    params = {"mlp": {"hidden": (32, 16), "max_epochs": 5}, "lsvm": {"C": 0.5, "solver": "torch"}}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    head = create_head(name, **params[name]).fit(Xtr, ytr)
    scores = head.decision_function(Xte)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())

    arrays = head._layers()
    layers: list[Any] = []
    for i in range(0, len(arrays), 2):
        linear = torch.nn.Linear(arrays[i].shape[1], arrays[i].shape[0])
        linear.weight.data, linear.bias.data = torch.tensor(arrays[i]), torch.tensor(arrays[i + 1])
        layers += [torch.nn.ReLU(), linear] if i else [linear]
    xs = torch.from_numpy(((Xte - head.mean_) / head.scale_).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(torch.nn.Sequential(*layers)(xs).numpy(), scores, atol=1e-5)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="registered"):
        create_head("forest")
    with pytest.raises(ValueError, match="already registered"):
        register_head("knn")(KNNHead)
    assert {"knn", "lsvm", "mlp"} <= set(HEADS)


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_knn_head_fitted_on_a_gpu_loads_without_one(data, tmp_path: Path, device: str) -> None:  # type: ignore[no-untyped-def]
    """A study on a GPU machine saves its KNN head with device gpu; it loads here (no GPU),
    placed where this machine allows, and votes alike."""
    Xtr, Xte, ytr, _ = data
    head = KNNHead(5, device="cpu").fit(Xtr, ytr)
    meta = save_head(head, tmp_path / "knn")
    saved = json.loads(meta.read_text())
    saved["params"]["device"] = device  # as written where it was fitted
    meta.write_text(json.dumps(saved))
    back = load_head(tmp_path / "knn")
    assert back.device == device and not back.index_.on_gpu
    np.testing.assert_array_equal(back.predict(Xte), head.predict(Xte))
    with pytest.raises(DeviceError, match="no GPU"):  # fitting there is still asked for one
        KNNHead(5, device=device).fit(Xtr, ytr)


def test_load_head_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved head"):
        load_head(tmp_path / "nothing")


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_linear_svm_torch_solver_agrees_with_liblinear(data, C) -> None:  # type: ignore[no-untyped-def]
    # The torch solver is the GPU path; on the CPU both solve the same objective.
    Xtr, Xte, ytr, _ = data
    torch_svm = LinearSVMHead(C=C, solver="torch", device="cpu").fit(Xtr, ytr)
    lib_svm = LinearSVMHead(C=C, solver="liblinear").fit(Xtr, ytr)
    assert (torch_svm.predict(Xte) == lib_svm.predict(Xte)).mean() >= 0.97
    with pytest.raises(ValueError, match="solver must be"):
        LinearSVMHead(solver="sgd").fit(Xtr, ytr)


def test_linear_svm_torch_solver_warns_when_it_runs_out_of_iterations(data) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    Xtr, _, ytr, _ = data
    with pytest.warns(ConvergenceWarning, match="stopped after .* of 3 iterations"):
        LinearSVMHead(C=100.0, solver="torch", device="cpu", max_iter=3).fit(Xtr, ytr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # converged: silent
        LinearSVMHead(C=1.0, solver="torch", device="cpu").fit(Xtr, ytr)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"hidden": 64}, "hidden must be two positive layer sizes"),
        ({"hidden": (64, 0)}, "hidden must be two positive layer sizes"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"max_epochs": 2.5}, "max_epochs must be a whole number"),
        ({"patience": True}, "patience must be"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
        ({"monitor": "f1"}, "monitor must be one of loss, accuracy, got 'f1'"),
        ({"init": "he"}, "init must be one of torch, glorot, got 'he'"),
        ({"penalty": "l1"}, "penalty must be one of adamw, l2, got 'l1'"),
        ({"random_state": None}, "random_state must be a whole number"),
    ],
)
def test_mlp_refuses_bad_values_by_name(data, params: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    Xtr, _, ytr, _ = data
    with pytest.raises(ValueError, match=match):
        MLPHead(**params).fit(Xtr, ytr)


@pytest.mark.parametrize(
    ("head", "params", "match"),
    [
        ("rbf_svm", {"gamma": [1]}, "'gamma' takes text or a number, not \\[1\\]"),
        ("rbf_svm", {"gamma": None}, "'gamma' takes text or a number"),
        ("rbf_svm", {"gamma": True}, "'gamma' takes text or a number"),
        ("rbf_svm", {"gamma": -0.5}, "gamma must be a positive number or 'scale'"),
        ("rbf_svm", {"method": [1]}, "'method' takes text"),
        ("knn", {"factory": 5}, "'factory' takes text, not 5"),
        ("knn", {"n_neighbors": 0}, "n_neighbors must be a whole number >= 1"),
        ("knn", {"metric": "hamming"}, "unknown metric 'hamming'"),
        ("knn", {"weights": "distance", "metric": "ip"}, "metric 'ip' has none"),
        ("lsvm", {"C": -1.0}, "C must be a finite positive number"),
        ("lsvm", {"solver": "sgd"}, "solver must be auto, torch or liblinear"),
        ("mlp", {"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ("zeroshot", {"prompts": 3}, "every prompt needs exactly one"),
        ("zeroshot", {"scale": -1.0}, "scale must be a positive number"),
    ],
)
def test_create_head_refuses_values_no_data_could_use(head: str, params: dict, match: str) -> None:
    """Named as the head is made (a study's grid is checked before any cell), not by a
    traceback in the fit."""
    with pytest.raises(ValueError, match=f"head '{head}': .*{match}"):
        create_head(head, **params)


def test_a_head_file_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    """Saved heads are plain arrays: an .npz smuggling a pickled object does not load."""
    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    y = np.array(["a", "b"] * 10)
    save_head(create_head("lsvm").fit(X, y), tmp_path / "h")
    with (tmp_path / "h.npz").open("wb") as fh:
        np.savez(fh, classes=np.array([{"evil": print}], dtype=object), coef=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="pickle"):
        load_head(tmp_path / "h")


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_knn_reduced_precision_votes_like_float32(tmp_path, precision: str) -> None:  # type: ignore[no-untyped-def]
    from sklearn.datasets import make_classification

    from pinsearch.heads import KNNHead, load_head, save_head

    X, y = make_classification(1500, 48, n_informative=20, n_classes=4, random_state=1)
    full = KNNHead(7, metric="cosine", device="cpu").fit(X[:1200], y[:1200])
    half = KNNHead(7, metric="cosine", device="cpu", precision=precision).fit(X[:1200], y[:1200])
    assert half.index_.reduced_precision
    assert (half.predict(X[1200:]) == full.predict(X[1200:])).mean() >= 0.98
    save_head(half, tmp_path / "knn")
    back = load_head(tmp_path / "knn")
    assert back.precision == precision and back.index_.reduced_precision
    np.testing.assert_array_equal(back.predict(X[1200:]), half.predict(X[1200:]))


def test_cosine_duplicates_decide_their_own_vote() -> None:
    """A training vector asked again is its own nearest neighbour at similarity 1, which FAISS
    may round to just above 1 (by its order of sums; a GPU's differs): its distance is 0,
    so with distance weights it decides alone (a negative distance voted against it)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 64)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    head = KNNHead(n_neighbors=5, weights="distance", metric="cosine", device="cpu").fit(X, y)
    dist, _ = head.kneighbors(X)
    assert (head.index_.search(X, 1)[0] > 1).any()  # the rounding this is about, here
    assert dist.min() >= 0
    np.testing.assert_array_equal(head.predict(X), y)
    with pytest.raises(ValueError, match="'ip' has none"):  # 1 - ip is no distance
        KNNHead(weights="distance", metric="ip", device="cpu").fit(X, y)
