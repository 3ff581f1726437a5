"""2-D maps: PCA and t-SNE coordinates, PNG and self-contained HTML, colour by cluster."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.clusters import ClusterConfig, cluster_store
from pinsearch.maps import MapConfig, draw_map, embed_2d
from pinsearch.store import Store


def test_pca_projection_keeps_planted_separation() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 8)) + 6 * np.eye(8)[i] for i in range(2)])
    for method in ("pca", "tsne"):
        xy = embed_2d(x, method, perplexity=10)
        assert xy.shape == (60, 2)
        a, b = xy[:30].mean(axis=0), xy[30:].mean(axis=0)
        spread = max(xy[:30].std(), xy[30:].std())
        assert np.linalg.norm(a - b) > 2 * spread, method  # the two groups stay apart


def test_draw_map_writes_png_and_html(built_store, tmp_path: Path) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        report = draw_map(store, tmp_path, config=MapConfig(thumbnails=5, perplexity=5))
    assert report.pins == report.total == 24 and len(report.explained_variance) == 2
    names = sorted(Path(f).name for f in report.files)
    assert names == ["map_pca.html", "map_pca.png", "map_tsne.html", "map_tsne.png"]
    page = (tmp_path / "map_tsne.html").read_text()
    assert page.count("<circle") == 24 and "food_drink" in page
    assert (tmp_path / "map_pca.png").stat().st_size > 10_000


def test_colour_by_cluster_needs_a_run(store_copy: Path, tmp_path: Path) -> None:
    with (
        Store.open(store_copy, read_only=True) as store,
        pytest.raises(ValueError, match="cluster"),
    ):
        draw_map(store, tmp_path, config=MapConfig(color="cluster", methods=("pca",)))
    with Store.open(store_copy) as store:
        cluster_store(store, config=ClusterConfig(k=3))
    with Store.open(store_copy, read_only=True) as store:
        draw_map(store, tmp_path, config=MapConfig(color="cluster", methods=("pca",)))
    page = (tmp_path / "map_pca.html").read_text()
    assert "cluster 0" in page
    assert re.search(r"<title>[^|<]+ \| [a-z_]+ \| [^<|]* \| cluster \d", page)  # and category


def test_the_html_map_is_the_png_way_up(tmp_path: Path) -> None:
    from pinsearch.maps import _html

    pins = [{"pin_id": "low", "category": "a"}, {"pin_id": "high", "category": "a"}]
    _html(np.array([[0.0, 0.0], [0.0, 1.0]]), np.array(["a", "a"]), pins, tmp_path / "m.html", "t")
    cy = [float(v) for v in re.findall(r'cy="([\d.]+)"', (tmp_path / "m.html").read_text())]
    assert cy[1] < cy[0]  # higher y, nearer the top of the page


def test_map_config_and_sampling(built_store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="methods"):
        MapConfig(methods=("umap",))
    assert MapConfig(methods=("pca", "tsne", "pca")).methods == ("pca", "tsne")  # each once
    with Store.open(built_store.path, read_only=True) as store:
        report = draw_map(store, tmp_path, config=MapConfig(methods=("pca",), sample=12))
    assert report.pins == 12 and report.total == 24  # 4 of each of the 3 categories


def test_the_sample_is_at_most_its_size_and_stratified() -> None:
    from pinsearch.maps import _sample

    cats = np.repeat([f"c{i:02d}" for i in range(12)], 2)  # 12 categories of 2
    for n in (20, 12, 10, 5):
        pick = _sample(cats, n, seed=0)
        assert len(pick) == n and len(set(pick.tolist())) == n
        drawn = {str(c) for c in cats[pick]}
        assert len(drawn) == min(n, 12)  # every category once before any twice
    cats = np.array(["big"] * 90 + ["small"] * 10)
    counts = dict(zip(*np.unique(cats[_sample(cats, 20, seed=1)], return_counts=True)))
    assert counts == {"big": 17, "small": 3}  # 1 each, the other 18 shared 89:9


def test_maps_refuse_what_cannot_be_laid_out(tmp_path: Path) -> None:
    from pinsearch.eval.bench import synthetic_store

    for seed in (-1, 2**31):
        with pytest.raises(ValueError, match="seed must be"):
            MapConfig(seed=seed)
    same = tmp_path / "same"
    synthetic_store(same, np.ones((6, 8), np.float32))  # copies of one image
    two = tmp_path / "two"
    synthetic_store(two, np.eye(2, 8, dtype=np.float32))
    for store, config, says in (
        (same, MapConfig(methods=("pca",)), "all have the same 'synthetic' vector"),
        (two, MapConfig(), "a t-SNE map needs at least 3 pins"),
    ):
        out = tmp_path / f"out-{store.name}"
        with Store.open(store, read_only=True) as s, pytest.raises(ValueError, match=says):
            draw_map(s, out, config=config)
        assert not out.exists()  # refused before anything was written
    with Store.open(two, read_only=True) as s:  # two pins lay out along one PCA axis
        assert draw_map(s, tmp_path / "ok", config=MapConfig(methods=("pca",))).pins == 2


def test_cli_map(built_store, tmp_path: Path) -> None:
    out = CliRunner().invoke(
        app,
        ["map", "--store", str(built_store.path), "--out", str(tmp_path), "--method", "pca",
         "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["files"]) == 2


def test_a_map_of_a_category_with_dollar_signs_is_drawn(store_copy: Path, tmp_path: Path) -> None:
    """matplotlib read ``$10_$`` in a legend as mathematics and failed the save."""
    with Store.open(store_copy) as store:
        store.catalog.connection.execute(
            "UPDATE pins SET category = 'gifts_under_$10_$20' WHERE pin_key % 3 = 0"
        )
        report = draw_map(store, tmp_path, config=MapConfig(methods=("pca",)))
    assert Path(report.files[0]).stat().st_size > 1000
