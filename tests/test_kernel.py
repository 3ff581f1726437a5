"""The rbf_svm head: estimator contract, kernel maps, accuracy against SVC, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from pinsearch.heads import HEADS, LinearSVMHead, create_head, load_head, save_head
from pinsearch.kernel import RBFSVMHead, rbf_features, scale_gamma


def _shells(n: int, seed: int, dim: int = 8, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Concentric spherical shells in ``dim`` dimensions: no hyperplane separates them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    d = rng.standard_normal((n, dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    radius = 1.0 + y + rng.normal(0, 0.2, n)
    return (d * radius[:, None]).astype(np.float32), np.array([f"shell{i}" for i in y])


@pytest.fixture(scope="module")
def shells() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    Xtr, ytr = _shells(600, seed=0)
    Xte, yte = _shells(400, seed=1)
    return Xtr, Xte, ytr, yte


@parametrize_with_checks(
    [
        RBFSVMHead(n_components=64, max_iter=50),
        RBFSVMHead(n_components=64, max_iter=50, method="rff"),
    ]
)
def test_sklearn_estimator_contract(estimator: object, check: object) -> None:
    check(estimator)  # type: ignore[operator]


def test_registered_under_rbf_svm() -> None:
    assert HEADS["rbf_svm"] is RBFSVMHead
    head = create_head("rbf_svm", C=3.0, method="rff")
    assert isinstance(head, RBFSVMHead) and head.C == 3.0 and head.method == "rff"


# Random Fourier features approximate the kernel more coarsely than Nystroem: more components
# and a looser bound (they trail SVC by ~0.03 here).
@pytest.mark.parametrize(
    ("method", "n_components", "tolerance"), [("nystroem", 256, 0.03), ("rff", 1024, 0.05)]
)
def test_beats_linear_svm_and_matches_svc_on_concentric_shells(  # type: ignore[no-untyped-def]
    shells, method, n_components, tolerance
) -> None:
    Xtr, Xte, ytr, yte = shells
    ours = RBFSVMHead(n_components=n_components, method=method).fit(Xtr, ytr)
    f1_ours = f1_score(yte, ours.predict(Xte), average="macro")
    linear = LinearSVMHead(max_iter=100).fit(Xtr, ytr)
    f1_linear = f1_score(yte, linear.predict(Xte), average="macro")
    svc = make_pipeline(StandardScaler(), SVC(kernel="rbf", gamma="scale")).fit(Xtr, ytr)
    f1_svc = f1_score(yte, svc.predict(Xte), average="macro")
    assert f1_linear < 0.5  # the shells share their mean: a hyperplane is near chance (1/3)
    assert f1_ours > f1_linear + 0.4
    assert f1_svc > 0.9 and abs(f1_ours - f1_svc) <= tolerance


def test_gamma_scale_follows_sklearn_definition(shells) -> None:  # type: ignore[no-untyped-def]
    Xtr, _, ytr, _ = shells
    head = RBFSVMHead(n_components=32, max_iter=20).fit(Xtr, ytr)
    xs = StandardScaler().fit_transform(Xtr)
    assert float(head.gamma_) == pytest.approx(1.0 / (8 * xs.var()), rel=1e-5)
    assert float(RBFSVMHead(gamma=0.7, n_components=8, max_iter=5).fit(Xtr, ytr).gamma_) == 0.7
    assert scale_gamma(np.ones((5, 3))) == 1.0  # constant data: sklearn's fallback


@pytest.mark.parametrize("method", ["nystroem", "rff"])
def test_features_equal_sklearn_transform(shells, method) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = shells
    head = RBFSVMHead(n_components=50, method=method, random_state=4, max_iter=5).fit(Xtr, ytr)
    xs_tr = ((Xtr - head.mean_) / head.scale_).astype(np.float32)
    xs_te = ((Xte - head.mean_) / head.scale_).astype(np.float32)
    gamma = float(head.gamma_)
    cls = Nystroem if method == "nystroem" else RBFSampler
    ref = cls(gamma=gamma, n_components=50, random_state=4).fit(xs_tr).transform(xs_te)
    np.testing.assert_allclose(head.kernel_features(Xte), ref, atol=1e-5)
    if method == "nystroem":  # on its own basis points, Nystroem reproduces the kernel exactly
        basis = head.components_.astype(np.float64)
        f = head.kernel_features(basis * head.scale_ + head.mean_)
        d2 = ((basis[:, None, :] - basis[None, :, :]) ** 2).sum(-1)
        np.testing.assert_allclose(f @ f.T, np.exp(-gamma * d2), atol=1e-4)


def test_nystroem_components_capped_at_training_samples(shells) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = shells
    head = RBFSVMHead(n_components=1024, max_iter=10).fit(Xtr[:40], ytr[:40])
    assert head.components_.shape == (40, 8) and head.kernel_features(Xte).shape == (400, 40)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"method": "poly"}, "method must be one of .* got 'poly'"),
        ({"gamma": "auto"}, "gamma must be .* got 'auto'"),
        ({"gamma": -1.0}, "gamma must be .* got -1.0"),
        ({"n_components": 0}, "n_components must be a positive integer, got 0"),
        ({"C": 0.0}, "C must be a finite positive number, got 0.0"),
    ],
)
def test_bad_hyperparameters_are_named(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RBFSVMHead(**params).fit(np.eye(4), ["a", "b", "a", "b"])


@pytest.mark.parametrize("method", ["nystroem", "rff"])
def test_save_load_round_trip_without_pickle(shells, method, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    Xtr, Xte, ytr, _ = shells
    head = RBFSVMHead(C=2.0, n_components=64, method=method, max_iter=100).fit(Xtr, ytr)
    save_head(head, tmp_path / "rbf")
    back = load_head(tmp_path / "rbf")
    assert type(back) is RBFSVMHead and back.get_params() == head.get_params()
    np.testing.assert_array_equal(back.predict(Xte), head.predict(Xte))
    np.testing.assert_array_equal(back.decision_function(Xte), head.decision_function(Xte))
    with np.load(tmp_path / "rbf.npz", allow_pickle=False) as saved:
        names = set(saved.files)
    expected = {"components", "normalization"} if method == "nystroem" else {"random_weights"}
    assert expected <= names and {"classes", "svm_coef", "gamma"} <= names


def test_rbf_features_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="got 'linear'"):
        rbf_features(np.zeros((2, 2)), "linear", 1.0, {})
