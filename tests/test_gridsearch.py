"""Batched grid-search CV (pinsearch.gridsearch) against scikit-learn's GridSearchCV."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold

from pinsearch.gridsearch import (
    batched_grid_search,
    is_batchable,
    unbatchable_reason,
)
from pinsearch.heads import KNNHead, LinearSVMHead, MLPHead, create_head, load_head, save_head

FOLDS = 5


def _data(n: int = 600, d: int = 32, classes: int = 5, sep: float = 1.0, seed: int = 0):  # type: ignore[no-untyped-def]
    X, y = make_classification(
        n, d, n_informative=min(16, d), n_redundant=0, n_classes=classes,
        n_clusters_per_class=1, class_sep=sep, random_state=seed,
    )  # fmt: skip
    return X.astype(np.float32), np.array([f"cat{i}" for i in y])


def _cv() -> StratifiedKFold:
    return StratifiedKFold(FOLDS, shuffle=True, random_state=0)


def _fold_scores(results: dict) -> np.ndarray:  # type: ignore[type-arg]
    return np.stack([results[f"split{i}_test_score"] for i in range(FOLDS)], axis=1)


def test_knn_fold_scores_equal_gridsearchcv_exactly() -> None:
    X, y = _data()
    X[100:140] = X[0:40]  # exact duplicates (other labels): ties the index breaks its own way
    grid = {"n_neighbors": [1, 5, 10, 20], "weights": ["uniform", "distance"],
            "metric": ["l2", "cosine"]}  # fmt: skip
    ours = batched_grid_search("knn", {"device": "cpu"}, grid, X, y, _cv())
    ref = GridSearchCV(KNNHead(device="cpu"), grid, scoring="f1_macro", cv=_cv()).fit(X, y)
    assert ours.batched and ours.info["knn"]["searches"] == 2 * FOLDS
    np.testing.assert_array_equal(_fold_scores(ours.cv_results_), _fold_scores(ref.cv_results_))
    assert ours.cv_results_["params"] == ref.cv_results_["params"]
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"],
                                  ref.cv_results_["mean_test_score"])  # fmt: skip
    np.testing.assert_array_equal(ours.cv_results_["std_test_score"],
                                  ref.cv_results_["std_test_score"])  # fmt: skip
    np.testing.assert_array_equal(ours.cv_results_["rank_test_score"],
                                  ref.cv_results_["rank_test_score"])  # fmt: skip
    assert ours.best_index_ == ref.best_index_ and ours.best_params_ == ref.best_params_
    assert isinstance(ours.best_estimator_, KNNHead)
    np.testing.assert_array_equal(ours.predict(X[:50]), ref.predict(X[:50]))


def test_knn_l1_and_single_k() -> None:
    X, y = _data(300, 16, 3)
    grid = {"n_neighbors": [3], "metric": ["l1"], "weights": ["distance"]}
    ours = batched_grid_search("knn", {"device": "cpu"}, grid, X, y, _cv())
    ref = GridSearchCV(KNNHead(device="cpu"), grid, scoring="f1_macro", cv=_cv()).fit(X, y)
    np.testing.assert_array_equal(_fold_scores(ours.cv_results_), _fold_scores(ref.cv_results_))


@pytest.fixture(scope="module")
def lsvm_runs():  # type: ignore[no-untyped-def]
    X, y = _data()
    grid = {"C": [0.01, 1.0, 100.0]}
    ours = batched_grid_search("lsvm", {"device": "cpu"}, grid, X, y, _cv())
    ref = GridSearchCV(LinearSVMHead(device="cpu", solver="torch"), grid, scoring="f1_macro",
                       cv=_cv()).fit(X, y)  # fmt: skip
    return X, y, grid, ours, ref


def test_lsvm_fold_scores_match_sequential_torch_solver(lsvm_runs) -> None:  # type: ignore[no-untyped-def]
    _, _, _, ours, ref = lsvm_runs
    assert ours.batched
    diff = np.abs(_fold_scores(ours.cv_results_) - _fold_scores(ref.cv_results_))
    assert diff.max() <= 0.01, diff
    assert ours.best_params_ == ref.best_params_
    info = ours.info["lsvm"]
    assert info["problems"] == 3 * FOLDS and info["not_converged"] == 0
    assert info["worst_grad"] <= 1e-5
    assert isinstance(ours.best_estimator_, LinearSVMHead)


def test_lsvm_chunks_of_problems_give_the_same_scores(lsvm_runs) -> None:  # type: ignore[no-untyped-def]
    X, y, grid, ours, _ = lsvm_runs
    tiny = batched_grid_search("lsvm", {"device": "cpu"}, grid, X, y, _cv(),
                               memory_budget=1)  # fmt: skip
    assert tiny.info["lsvm"]["chunks"] == 3 * FOLDS
    np.testing.assert_allclose(_fold_scores(tiny.cv_results_), _fold_scores(ours.cv_results_),
                               atol=0.01)  # fmt: skip


def test_lsvm_batched_minimiser_is_each_problems_minimiser() -> None:
    """The batched solver's weights reproduce a sequential fit's decision values."""
    import torch

    from pinsearch.gridsearch import _batched_lbfgs, _lsvm_objective, _Problems

    X, y = _data(300, 12, 3)
    _, enc = np.unique(y, return_inverse=True)
    train = np.arange(0, 300, 2)
    Cs = [0.1, 10.0]
    centre = X.mean(axis=0)
    xc = torch.from_numpy(X - centre)
    target = -torch.ones(300, 3)
    target[torch.arange(300), torch.from_numpy(enc)] = 1.0
    mean, scale = X[train].mean(axis=0), X[train].std(axis=0)
    mask = np.zeros((300, 2), np.float32)
    mask[train] = 1.0
    pb = _Problems(
        mu=torch.from_numpy(np.stack([mean - centre] * 2)),
        inv_s=torch.from_numpy(np.stack([1.0 / scale] * 2)),
        mask=torch.from_numpy(mask),
        inv_n=torch.full((2,), 1.0 / len(train)),
        reg=torch.tensor([1.0 / (C * len(train)) for C in Cs]),
    )
    wb, diag = _batched_lbfgs(
        lambda w, sel: _lsvm_objective(xc, target, pb, w, sel), (2, 13, 3),
        np.full(2, 1e-6), np.full(2, 1000), torch.device("cpu"),
    )  # fmt: skip
    assert (diag["grad_max"] <= 1e-5).all()
    for j, C in enumerate(Cs):
        head = LinearSVMHead(C=C, solver="torch", device="cpu", tol=1e-7, max_iter=2000)
        head.fit(X[train], y[train])
        xs = (X - mean) / scale
        ours = xs @ wb[j, :12].numpy() + wb[j, 12].numpy()
        np.testing.assert_allclose(ours, head.decision_function(X), atol=5e-3)


def test_mlp_fold_scores_close_to_sequential_heads() -> None:
    X, y = _data(500, 20, 4, sep=2.0)
    params = {"device": "cpu", "hidden": (32, 16), "max_epochs": 25, "patience": 4}
    grid = {"batch_size": [32, 64]}
    ours = batched_grid_search("mlp", params, grid, X, y, _cv())
    ref = GridSearchCV(MLPHead(**params), grid, scoring="f1_macro", cv=_cv()).fit(X, y)  # type: ignore[arg-type]
    assert ours.batched
    gap = np.abs(ours.cv_results_["mean_test_score"] - ref.cv_results_["mean_test_score"])
    assert gap.max() <= 0.03, gap
    assert ours.cv_results_["mean_test_score"].min() > 0.8
    epochs = ours.info["mlp"]["epochs"]
    assert len(epochs) == 2 and all(len(e) == FOLDS for e in epochs)
    assert all(1 <= e <= 25 for row in epochs for e in row)
    assert isinstance(ours.best_estimator_, MLPHead)


@pytest.mark.parametrize(
    ("monitor", "init", "penalty", "decay"),
    [("loss", "torch", "adamw", 1e-4), ("accuracy", "glorot", "l2", 1.0)],  # a penalty that steers
)
def test_mlp_members_train_as_the_head_alone_through_early_stops(
    monitor: str, init: str, penalty: str, decay: float
) -> None:
    # members share one optimizer (a parameter per layer tensor each) as MLPHead.fit trains with:
    # each member stops at the epoch its fold's head stops at (members stopping while others
    # go on keep their optimizer state), and the fold scores are GridSearchCV's
    X, y = _data(500, 20, 4, sep=1.0)
    params = {"device": "cpu", "hidden": (32, 16), "max_epochs": 200, "patience": 2,
              "monitor": monitor, "init": init, "penalty": penalty,
              "weight_decay": decay}  # fmt: skip
    ours = batched_grid_search("mlp", params, {"batch_size": [32]}, X, y, _cv(), refit=False)
    heads = [MLPHead(**params, batch_size=32).fit(X[tr], y[tr]) for tr, _ in _cv().split(X, y)]
    epochs = ours.info["mlp"]["epochs"][0]
    assert epochs == [h.n_epochs_ for h in heads] and len(set(epochs)) > 1
    assert max(epochs) < 200  # every member stopped early, the last ones ending the training
    ref = GridSearchCV(MLPHead(**params), {"batch_size": [32]}, scoring="f1_macro", cv=_cv())
    ref.fit(X, y)
    np.testing.assert_allclose(_fold_scores(ours.cv_results_), _fold_scores(ref.cv_results_),
                               atol=0.01)  # fmt: skip


def test_mlp_members_without_validation_split_train_all_epochs() -> None:
    X, y = _data(200, 8, 2, sep=2.0)
    params = {"device": "cpu", "hidden": (8, 8), "max_epochs": 6, "validation_fraction": 0.0}
    ours = batched_grid_search("mlp", params, {"batch_size": [16]}, X, y, _cv())
    ref = GridSearchCV(MLPHead(**params), {"batch_size": [16]}, scoring="f1_macro",  # type: ignore[arg-type]
                       cv=_cv()).fit(X, y)  # fmt: skip
    assert ours.info["mlp"]["epochs"] == [[6] * FOLDS]
    assert ours.info["mlp"]["best_epochs"] == [[5] * FOLDS]  # the last weights are kept
    gap = abs(ours.cv_results_["mean_test_score"][0] - ref.cv_results_["mean_test_score"][0])
    assert gap <= 0.03


def test_best_estimator_is_a_normal_head(lsvm_runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    X, _, _, ours, _ = lsvm_runs
    head = ours.best_estimator_
    assert head.get_params()["C"] == ours.best_params_["C"]
    save_head(head, tmp_path / "h")
    back = load_head(tmp_path / "h")
    np.testing.assert_array_equal(back.predict(X), head.predict(X))


def test_what_is_batchable() -> None:
    assert is_batchable("knn", {"n_neighbors": [1, 5], "metric": ["l2", "cosine"]})
    assert is_batchable("lsvm", {"C": [0.1, 1]}, {"device": "cpu"})
    assert is_batchable("mlp", {"batch_size": [32, 64]})
    assert "no batched" in str(unbatchable_reason("rbf_svm", {"C": [1.0]}))
    assert "Flat" in str(unbatchable_reason("knn", {"factory": ["HNSW32"]}))
    assert "liblinear" in str(unbatchable_reason("lsvm", {"C": [1]}, {"solver": "liblinear"}))
    assert "scoring" in str(unbatchable_reason("lsvm", {"C": [1]}, scoring="roc_auc_ovr"))
    assert "not parameters" in str(unbatchable_reason("lsvm", {"gamma": [1]}))
    assert "device" in str(unbatchable_reason("mlp", {"device": ["cpu", "cuda"]}))
    ip_distance = {"metric": ["ip"], "weights": ["uniform", "distance"]}
    assert "metric ip" in str(unbatchable_reason("knn", ip_distance))


def test_candidates_the_head_refuses_are_errors_naming_them() -> None:
    # (not scored: the batched path would have voted with negative weights; scikit-learn's
    # grid runs them, with error_score="raise" like every search here)
    X, y = _data(300, 16, 3)
    grid = {"metric": ["ip"], "weights": ["uniform", "distance"]}
    with pytest.raises(ValueError, match="'ip' has none"):
        batched_grid_search("knn", {"device": "cpu"}, grid, X, y, _cv())


def test_unbatchable_searches_fall_back_to_gridsearchcv() -> None:
    X, y = _data(300, 16, 3)
    grid = {"n_neighbors": [1, 5]}
    params = {"device": "cpu", "factory": "HNSW16"}
    ours = batched_grid_search("knn", params, grid, X, y, _cv())
    ref = GridSearchCV(create_head("knn", **params), grid, scoring="f1_macro", cv=_cv()).fit(X, y)
    assert not ours.batched and "Flat" in ours.info["reason"]
    np.testing.assert_array_equal(_fold_scores(ours.cv_results_), _fold_scores(ref.cv_results_))
    assert ours.best_params_ == ref.best_params_ and isinstance(ours.best_estimator_, KNNHead)


def test_a_fold_without_some_class_falls_back() -> None:
    X, y = _data(300, 16, 3)
    order = np.argsort(y, kind="stable")
    X, y = X[order], y[order]  # unshuffled KFold: fold 0's training part lacks cat0
    ours = batched_grid_search("lsvm", {"device": "cpu"}, {"C": [1.0]}, X, y, KFold(3))
    assert not ours.batched and "fold 0" in ours.info["reason"]


def test_study_uses_the_batched_search_with_the_same_outcome(tmp_path: Path) -> None:
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.eval.study import StudyConfig, load_study, run_study

    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 16)).astype(np.float32)
    x[np.arange(240), np.arange(240) % 4] += 3.0
    synthetic_store(tmp_path / "a", x, categories=4)
    synthetic_store(tmp_path / "b", x, categories=4)
    base = StudyConfig(
        name="t", store=str(tmp_path / "a"), backbones=("synthetic",),
        heads={"knn": {"n_neighbors": [1, 5]}, "lsvm": {"C": [0.1, 1.0]}},
        folds=3, test_size=0.25, device="cpu",
    )  # fmt: skip
    sequential = replace(base, store=str(tmp_path / "b"), batched_cv=False)
    assert base.fingerprint() == sequential.fingerprint()
    _, batched_cells = run_study(base)
    _, sequential_cells = run_study(sequential)
    for a, b in zip(batched_cells, sequential_cells):
        assert a.best_params == b.best_params
        assert a.cv_mean == pytest.approx(b.cv_mean, abs=0.01)
        assert a.test_macro_f1 == pytest.approx(b.test_macro_f1, abs=0.01)
    assert batched_cells[0].cv_mean == sequential_cells[0].cv_mean  # knn: exactly
    toml = tmp_path / "s.toml"
    toml.write_text(
        'name = "x"\nstore = "s"\nbackbones = ["b"]\nbatched_cv = false\n[heads.lsvm]\nC = [1]\n'
    )
    loaded = load_study(toml)
    assert isinstance(loaded, StudyConfig) and loaded.batched_cv is False
