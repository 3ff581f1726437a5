"""The batched grid search on CUDA agrees with itself on the CPU and with GridSearchCV (run on a
CUDA machine with faiss-gpu: pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from pinsearch.gridsearch import batched_grid_search
from pinsearch.heads import KNNHead, LinearSVMHead, MLPHead

pytestmark = pytest.mark.gpu

FOLDS = 5


def _data(n: int = 2000, d: int = 64, classes: int = 8, sep: float = 1.5):  # type: ignore[no-untyped-def]
    X, y = make_classification(
        n, d, n_informative=min(24, d), n_redundant=0, n_classes=classes,
        n_clusters_per_class=1, class_sep=sep, random_state=0,
    )  # fmt: skip
    return X.astype(np.float32), np.array([f"cat{i}" for i in y])


def _cv() -> StratifiedKFold:
    return StratifiedKFold(FOLDS, shuffle=True, random_state=0)


def _folds(search) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([search.cv_results_[f"split{i}_test_score"] for i in range(FOLDS)], axis=1)


@pytest.mark.faiss_gpu
def test_knn_on_gpu_equals_gridsearchcv_and_the_cpu() -> None:
    X, y = _data()
    X[200:240] = X[0:40]  # exact ties
    grid = {"n_neighbors": [1, 5, 10, 20, 50], "weights": ["uniform", "distance"],
            "metric": ["l2", "cosine"]}  # fmt: skip
    gpu = batched_grid_search("knn", {"device": "gpu"}, grid, X, y, _cv())
    ref = GridSearchCV(KNNHead(device="gpu"), grid, scoring="f1_macro", cv=_cv()).fit(X, y)
    assert gpu.batched and gpu.best_estimator_.index_.on_gpu
    np.testing.assert_array_equal(_folds(gpu), _folds(ref))
    cpu = batched_grid_search("knn", {"device": "cpu"}, grid, X, y, _cv())
    # the duplicated rows carry other labels: CPU FAISS keeps the lower id of equal distances,
    # FAISS-GPU's selection either one, which moves a fold's macro-F1 by up to ~0.02 at k = 1
    np.testing.assert_allclose(_folds(gpu), _folds(cpu), atol=0.03)


def test_lsvm_on_gpu_equals_the_cpu_and_converges() -> None:
    X, y = _data()
    grid = {"C": [0.01, 0.1, 1, 10, 100]}
    gpu = batched_grid_search("lsvm", {"device": "cuda"}, grid, X, y, _cv())
    cpu = batched_grid_search("lsvm", {"device": "cpu"}, grid, X, y, _cv())
    assert gpu.info["device"].startswith("cuda")
    # converged: at the CPU's tolerance (1e-5) but for float32 summation order on the GPU
    assert gpu.info["lsvm"]["worst_grad"] < 1e-4
    np.testing.assert_allclose(_folds(gpu), _folds(cpu), atol=0.01)
    assert gpu.best_params_ == cpu.best_params_
    ref = GridSearchCV(LinearSVMHead(device="cuda", solver="torch"), grid, scoring="f1_macro",
                       cv=_cv()).fit(X, y)  # fmt: skip
    np.testing.assert_allclose(_folds(gpu), _folds(ref), atol=0.01)


def test_lsvm_on_gpu_in_chunks_gives_the_same_scores() -> None:
    X, y = _data(3000, 128, 16)
    grid = {"C": [0.1, 10]}
    whole = batched_grid_search("lsvm", {"device": "cuda"}, grid, X, y, _cv())
    parts = batched_grid_search("lsvm", {"device": "cuda"}, grid, X, y, _cv(),
                                memory_budget=2 << 20)  # fmt: skip
    assert whole.info["lsvm"]["chunks"] == 1 and parts.info["lsvm"]["chunks"] > 1
    np.testing.assert_allclose(_folds(parts), _folds(whole), atol=0.01)


@pytest.mark.parametrize(("monitor", "penalty"), [("loss", "adamw"), ("accuracy", "l2")])
def test_mlp_on_gpu_close_to_the_cpu_and_sequential_heads(monitor: str, penalty: str) -> None:
    X, y = _data(1500, 32, 4, sep=2.0)
    params = {"hidden": (64, 32), "max_epochs": 30, "patience": 5, "monitor": monitor,
              "penalty": penalty}  # fmt: skip
    grid = {"batch_size": [32, 64, 128]}
    gpu = batched_grid_search("mlp", {**params, "device": "cuda"}, grid, X, y, _cv())
    cpu = batched_grid_search("mlp", {**params, "device": "cpu"}, grid, X, y, _cv())
    ref = GridSearchCV(MLPHead(**params, device="cuda"), grid, scoring="f1_macro",  # type: ignore[arg-type]
                       cv=_cv()).fit(X, y)  # fmt: skip
    means = gpu.cv_results_["mean_test_score"]
    assert np.abs(means - cpu.cv_results_["mean_test_score"]).max() <= 0.03
    assert np.abs(means - ref.cv_results_["mean_test_score"]).max() <= 0.03
    assert isinstance(gpu.best_estimator_, MLPHead) and gpu.info["device"].startswith("cuda")
