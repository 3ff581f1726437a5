"""Clustering pins and boards: k chosen by kneedle and silhouette on data with a known answer,
agreement with the categories, runs saved in the catalog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.clusters import ClusterConfig, choose_k, cluster_store, kmeans
from pinsearch.errors import DeviceError
from pinsearch.eval.bench import synthetic_store
from pinsearch.indexes import gpu_count as faiss_gpu_count
from pinsearch.store import Store
from pinsearch.vectors import unit_rows

B = "test_efficientnet"


def _blobs(
    k: int = 5, per: int = 60, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    x = np.concatenate([c + 0.08 * rng.normal(size=(per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(k), per)


def test_kmeans_finds_planted_clusters() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, y = _blobs()
    labels, centroids, inertia = kmeans(x, 5)
    assert adjusted_rand_score(y, labels) == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert inertia == pytest.approx(float(((x - centroids[labels]) ** 2).sum()), rel=1e-5)
    if not faiss_gpu_count():
        with pytest.raises(DeviceError, match="no GPU"):  # not run on the CPU in silence
            kmeans(x, 5, device="gpu")


def test_ward_tree_built_once_cuts_as_scikit_learn_clusters() -> None:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    from pinsearch.clusters import _Ward

    x = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32)
    tree = _Ward(x, seed=0)
    for k in (2, 7, 15):
        ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        assert adjusted_rand_score(ref, tree.labels(k)) == pytest.approx(1.0)
        assert tree.labels(k).max() == k - 1


def test_ward_on_a_sample_keeps_the_tree_clusters_of_the_sampled_items(monkeypatch) -> None:
    """Beyond its limit the tree is built on a sample and the rest join the nearest centre;
    the sampled items keep the clusters the tree gave them (9-13% were moved)."""
    from scipy.cluster.hierarchy import fcluster

    from pinsearch.clusters import _Ward

    monkeypatch.setattr(_Ward, "limit", 100)  # (20,000 for a store)
    x = unit_rows(np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32))
    tree = _Ward(x, seed=0)
    assert tree.idx is not None and len(tree.idx) == 100
    for k in (3, 6, 10):
        labels = tree.labels(k)
        assert (labels[tree.idx] == fcluster(tree.tree, k, criterion="maxclust") - 1).all()
        assert len(labels) == 400 and set(labels.tolist()) == set(range(k))


def test_choose_k_on_a_planted_sweep() -> None:
    x, _ = _blobs(k=5)
    from sklearn.metrics import silhouette_score

    ks, inertias, sils = list(range(2, 12)), [], []
    for k in ks:
        labels, _, inertia = kmeans(x, k)
        inertias.append(inertia)
        sils.append(silhouette_score(x, labels, metric="cosine"))
    elbow, best = choose_k(ks, inertias, sils)
    assert elbow == 5 and best == 5


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_cluster_store_pins(store_copy: Path, method: str) -> None:
    with Store.open(store_copy) as store:
        report = cluster_store(store, B, ClusterConfig(method=method, k_max=6))
        assert report.items == 24 and 2 <= report.k <= 6 and len(report.sweep) == 5
        assert report.chosen_by in ("elbow", "silhouette")
        assert sum(c["size"] for c in report.clusters) == 24
        assert sum(sum(v.values()) for v in report.contingency.values()) == 24
        assert -0.5 <= report.ari <= 1.0 and 0.0 <= report.v_measure <= 1.0
        rows = store.catalog.query(
            "SELECT count(*) AS n, count(DISTINCT cluster) AS k FROM clusters WHERE run_id = ?",
            [report.run_id],
        )
        assert rows == [{"n": 24, "k": report.k}]
        run = store.catalog.query("SELECT * FROM cluster_runs WHERE run_id = ?", [report.run_id])
        assert json.loads(run[0]["metrics"])["ari"] == pytest.approx(report.ari)


def test_cluster_boards_with_given_k(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        report = cluster_store(store, B, ClusterConfig(level="boards", k=3))
    assert report.items == 6 and report.k == 3 and report.chosen_by == "given"
    assert report.run_id is None  # read-only: nothing saved
    central = {b for c in report.clusters for b in c["central"]}
    assert all("/" in b for b in central)  # board keys


def test_more_clusters_than_items_or_distinct_vectors(built_store, tmp_path: Path) -> None:
    from pinsearch.eval.bench import synthetic_store

    with (
        Store.open(built_store.path, read_only=True) as store,
        pytest.raises(ValueError, match="6 boards cannot make k_min=8 clusters"),
    ):
        cluster_store(store, B, ClusterConfig(level="boards", k_min=8, k_max=10))
    rng = np.random.default_rng(0)  # 5 distinct vectors, each pinned 20 times
    synthetic_store(tmp_path / "s", np.repeat(rng.normal(size=(5, 8)), 20, axis=0).astype(
        np.float32), categories=5)  # fmt: skip
    with Store.open(tmp_path / "s", read_only=True) as store:
        report = cluster_store(store, "synthetic", ClusterConfig(k=8))
    assert report.k == 5 and sorted(c["size"] for c in report.clusters) == [20] * 5


def test_cluster_config_errors() -> None:
    with pytest.raises(ValueError, match="method"):
        ClusterConfig(method="dbscan")
    with pytest.raises(ValueError, match="k must be"):
        ClusterConfig(k=1)
    with pytest.raises(ValueError, match="k_min"):
        ClusterConfig(k_min=5, k_max=3)


def test_cli_cluster(store_copy: Path, tmp_path: Path) -> None:
    out = CliRunner().invoke(
        app,
        ["cluster", "--store", str(store_copy), "--k-max", "5", "--plot", str(tmp_path / "k.png"),
         "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["run_id"] == 1 and (tmp_path / "k.png").stat().st_size > 1000
    assert report["plot"] == str(tmp_path / "k.png")


@pytest.mark.parametrize(
    ("name", "says"),
    [("k", "name a figure file ending in"), ("k.txt", "name a figure file ending in"),
     ("folder.png", "is a folder"), ("afile/k.png", "is not a folder"),
     ("k.pgf", "cannot be written here")],
)  # fmt: skip
def test_cli_cluster_refuses_a_plot_path_before_the_work(
    store_copy: Path, tmp_path: Path, name: str, says: str
) -> None:
    if name == "k.pgf" and shutil.which("xelatex"):
        pytest.skip("this machine writes .pgf (LaTeX installed)")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("")
    out = CliRunner().invoke(
        app, ["cluster", "--store", str(store_copy), "--plot", str(tmp_path / name)]
    )
    assert isinstance(out.exception, ValueError) and says in str(out.exception), out.output
    with Store.open(store_copy, read_only=True) as store:
        assert not store.catalog.has_table("cluster_runs")  # nothing run, nothing saved


def test_seed_bounds_and_an_undefined_silhouette(tmp_path: Path) -> None:
    for seed in (-1, 2**31):
        with pytest.raises(ValueError, match=r"seed must be in 0 \.\. 2147483647"):
            ClusterConfig(seed=seed)
    # every pin the same vector: one cluster whatever k, the silhouette undefined (not -1)
    store = tmp_path / "s"
    synthetic_store(store, np.ones((12, 8), np.float32))
    with Store.open(store) as s:
        report = cluster_store(s, "synthetic", ClusterConfig(k_max=4))
    assert report.k == 1 and report.silhouette is None
    assert all(row["silhouette"] is None for row in report.sweep)
    assert report.silhouette_k is None and report.chosen_by in ("elbow", "k_min")


def test_removed_pins_leave_the_saved_cluster_runs(store_copy: Path) -> None:
    from pinsearch.edit import remove_pins

    with Store.open(store_copy) as store:
        cluster_store(store, B, ClusterConfig(k=3))
        board = store.catalog.query("SELECT board FROM pins ORDER BY pin_key LIMIT 1")[0]["board"]
        cluster_store(store, B, ClusterConfig(level="boards", k=2))
        pins = [r["pin_id"] for r in store.catalog.query(
            "SELECT pin_id FROM pins WHERE board = ?", [board])]  # fmt: skip
        remove_pins(store, boards=[board])
        items = {r["item"] for r in store.catalog.query("SELECT item FROM clusters")}
        assert items and not items & {*pins, board}


def test_a_store_emptied_by_a_remove_is_too_few_to_cluster_or_search_for_copies(
    tmp_path: Path,
) -> None:
    from pinsearch.dupes import find_dupes
    from pinsearch.edit import remove_pins

    synthetic_store(tmp_path / "s", np.random.default_rng(0).normal(size=(4, 8)), categories=2)
    with Store.open(tmp_path / "s") as store:
        remove_pins(
            store, pin_ids=[r["pin_id"] for r in store.catalog.query("SELECT pin_id FROM pins")]
        )
        for level in ("pins", "boards"):  # (boards: argmax of an empty sequence)
            with pytest.raises(ValueError, match=f"0 {level} are too few to cluster"):
                cluster_store(store, "synthetic", ClusterConfig(level=level))
        with pytest.raises(ValueError, match="holds no pin with a 'synthetic' vector"):
            find_dupes(store, "synthetic")  # (it said: build a cosine index)
