"""Near-duplicate groups on generated near-copies (real EfficientNet-Lite0 features)."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.dupes import _components, find_dupes
from pinsearch.pipeline import index_corpus
from pinsearch.store import Store
from pinsearch.synth import make_image_folder


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 distinct generated photos (one per category) and 3 near-copies of each."""
    root = tmp_path_factory.mktemp("dupes")
    made = make_image_folder(root / "src", per_category=1, image_size=160)
    flat = root / "photos"
    flat.mkdir()
    for p in sorted(Path(made.root).rglob("*.jpg")):
        img = Image.open(p).convert("RGB")
        stem = p.parent.name
        img.save(flat / f"{stem}_orig.jpg", quality=95)
        img.resize((80, 80)).save(flat / f"{stem}_half.jpg", quality=95)
        img.save(flat / f"{stem}_q30.jpg", quality=30)
        ImageOps.mirror(img).save(flat / f"{stem}_flip.jpg", quality=95)
    store = root / "store"
    index_corpus(flat, store, backbone="effnet_lite0")
    return store


def test_copies_group_by_source_photo(copies: Path) -> None:
    with Store.open(copies, read_only=True) as store:
        report = find_dupes(store, threshold=0.8)
    assert report.pins == 24
    groups = [sorted(p["pin_id"].rsplit("_", 1)[0] for p in g.pins) for g in report.groups]
    # Every group holds copies of one photo only (precision 1), and most copies are found.
    assert all(len(set(g)) == 1 for g in groups), groups
    assert report.pins_in_groups >= 18
    assert all(g.min_similarity >= 0.8 for g in report.groups)


def test_higher_threshold_finds_fewer_pairs(copies: Path) -> None:
    with Store.open(copies, read_only=True) as store:
        loose = find_dupes(store, threshold=0.8)
        strict = find_dupes(store, threshold=0.99)
    assert strict.pairs <= loose.pairs
    with Store.open(copies, read_only=True) as store, pytest.raises(ValueError, match="threshold"):
        find_dupes(store, threshold=0)


def test_components() -> None:
    a, b = np.array([1, 2, 10]), np.array([2, 3, 11])
    comps = sorted(_components(a, b, np.array([0.9, 0.95, 0.99])))
    assert comps == [([1, 2, 3], 0.9), ([10, 11], 0.99)]
    assert all(len(list(combinations(m, 2))) >= 1 for m, _ in comps)


def test_cli_dupes(copies: Path) -> None:
    out = CliRunner().invoke(app, ["dupes", "--store", str(copies), "--threshold", "0.8", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["threshold"] == 0.8 and data["groups"]


def test_pairs_are_judged_on_the_stored_vectors_not_a_compressed_index(tmp_path: Path) -> None:
    from pinsearch.dupes import near_pairs
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.indexes import IndexConfig

    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 64)) + 0.8 * rng.normal(size=(1, 64))  # a shared component
    x = np.vstack([base, base[:100] + 0.15 * rng.normal(size=(100, 64))]).astype(np.float32)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -1)
    truth = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(sims >= 0.95)))}
    assert len(truth) >= 90  # most planted copies, a few pushed below by the noise
    synthetic_store(tmp_path / "s", x, categories=4,
                    index=IndexConfig(factory="IVF32,PQ8", metric="cosine", nprobe=32))  # fmt: skip
    with Store.open(tmp_path / "s", read_only=True) as store:
        a, b, s = near_pairs(store, "synthetic", 0.95, k=20)
    assert set(zip(a.tolist(), b.tolist())) == truth  # PQ scores alone found about 8 %
    np.testing.assert_allclose(s, np.sum(u[a] * u[b], axis=1), atol=1e-5)


def test_threshold_one_finds_every_exact_copy(tmp_path: Path) -> None:
    # (float32 cosines of identical vectors come out 0.99999994 as often as 1.0)
    from pinsearch.dupes import near_pairs
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.indexes import IndexConfig

    base = np.random.default_rng(1).normal(size=(200, 1280)).astype(np.float32)
    synthetic_store(tmp_path / "s", np.vstack([base, base]), categories=4,
                    index=IndexConfig(factory="Flat", metric="cosine"))  # fmt: skip
    with Store.open(tmp_path / "s", read_only=True) as store:
        a, b, s = near_pairs(store, "synthetic", 1.0, k=5)
        keys = np.sort(store.vectors("synthetic").load()[1])
    assert len(a) == 200 and (s <= 1.0).all()
    assert set(zip(a.tolist(), b.tolist())) == {(int(k), int(k) + 200) for k in keys[:200]}


def test_the_cosine_index_is_found_or_named(tmp_path: Path) -> None:
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.indexes import IndexConfig

    base = np.random.default_rng(2).normal(size=(50, 32)).astype(np.float32)
    path = tmp_path / "s"
    synthetic_store(path, np.vstack([base, 3 * base]), categories=2,
                    index=IndexConfig(factory="Flat", metric="l2"))  # fmt: skip
    says = re.escape("'synthetic' has {'synthetic': 'l2'}: build one")
    with Store.open(path, read_only=True) as store, pytest.raises(ValueError, match=says):
        find_dupes(store)
    with Store.open(path) as store:
        store.build_index("synthetic", IndexConfig(factory="Flat", metric="ip"), name="ip")
        store.build_index("synthetic", IndexConfig(factory="Flat", metric="cosine"), name="cos")
    with Store.open(path, read_only=True) as store:
        report = find_dupes(store, threshold=0.999)  # the l2 default passed over
        assert report.index == "cos" and report.pairs == 50  # each vector and its multiple
        assert find_dupes(store, index="cos").groups == report.groups
        for name, says in (("synthetic", "'synthetic' is l2"), ("ip", "'ip' is ip"),
                           ("nope", "no index 'nope'")):  # fmt: skip
            with pytest.raises(ValueError, match=says):  # (ip: these vectors are not unit)
                find_dupes(store, index=name)
    out = CliRunner().invoke(app, ["dupes", "--store", str(path), "--index", "cos", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["index"] == "cos", out.output
