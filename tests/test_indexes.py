"""Tests for pinsearch.indexes: exact and approximate search, filters, persistence, choices."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pinsearch.errors import BackboneMismatchError, DeviceError, IndexFileError
from pinsearch.indexes import (
    METRICS,
    IndexConfig,
    PinIndex,
    build_index,
    choose_factory,
    faiss_metric,
    ivf_nlist,
    load_index,
    search_overrides,
    validate_factory,
)
from pinsearch.indexes.pinindex import order_ties

CPU = {"device": "cpu"}


def _random(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _keys(n: int) -> np.ndarray:
    # Deliberately not 0..n-1, so positions and keys cannot be confused.
    return (np.arange(n, dtype=np.int64) * 7 + 1000)[::-1].copy()


def _brute_force(
    q: np.ndarray, x: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference: (scores, row positions), best first."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    if metric in ("ip", "cosine"):
        s = q64 @ x64.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    elif metric == "l2":
        s = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    else:  # l1
        s = np.abs(q64[:, None, :] - x64[None, :, :]).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def clustered() -> dict[str, np.ndarray]:
    x = _clustered(3000, 16, 30, seed=0)
    q = _clustered(50, 16, 30, seed=0)  # same centres, new draws
    q = q + np.random.default_rng(9).normal(size=q.shape).astype(np.float32) * 0.1
    return {"x": x, "q": q, "keys": _keys(len(x))}


# -- exact search ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "l2", "l1", "cosine"])
def test_flat_equals_numpy_brute_force(metric: str) -> None:
    x, q, keys = _random(400, 24, 1), _random(25, 24, 2), _keys(400)
    index = build_index(x, keys, IndexConfig(factory="Flat", metric=metric, **CPU))
    assert index.factory == "Flat" and index.ntotal == 400 and index.dim == 24
    scores, found = index.search(q, 10)
    ref_s, ref_pos = _brute_force(q, x, 10, metric)
    np.testing.assert_array_equal(found, keys[ref_pos])
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-3)
    assert index.higher_is_better is (metric in ("ip", "cosine"))
    # Scores come best first.
    diffs = np.diff(scores, axis=1)
    assert (diffs <= 1e-6).all() if index.higher_is_better else (diffs >= -1e-6).all()


def test_auto_factory_is_flat_for_small_sets() -> None:
    index = build_index(_random(50, 8, 0), _keys(50), IndexConfig(**CPU))
    assert index.factory == "Flat"
    assert index.config.metric == "cosine"


def test_cosine_normalises_queries_and_vectors() -> None:
    x = _random(100, 8, 3)
    index = build_index(x * 50.0, _keys(100), IndexConfig(factory="Flat", metric="cosine", **CPU))
    scores, keys = index.search(x[:5] * 0.01, 1)
    np.testing.assert_array_equal(keys[:, 0], _keys(100)[:5])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_search_pads_when_k_exceeds_ntotal() -> None:
    index = build_index(_random(5, 8, 0), _keys(5), IndexConfig(factory="Flat", metric="l2", **CPU))
    scores, keys = index.search(_random(2, 8, 1), 8)
    assert keys.shape == scores.shape == (2, 8)
    assert (keys[:, :5] >= 0).all() and (keys[:, 5:] == -1).all()
    assert np.isnan(scores[:, 5:]).all() and not np.isnan(scores[:, :5]).any()
    assert set(keys[0, :5]) == set(_keys(5))


def test_bad_queries_are_rejected() -> None:
    index = build_index(_random(20, 8, 0), _keys(20), IndexConfig(factory="Flat", **CPU))
    with pytest.raises(BackboneMismatchError, match="dim 9"):
        index.search(_random(1, 9, 0), 3)
    with pytest.raises(ValueError, match="positive"):
        index.search(_random(1, 8, 0), 0)
    _, keys = index.search(_random(1, 8, 0)[0], 3)  # a 1-D query is one query
    assert keys.shape == (1, 3)


def test_non_finite_vectors_and_repeated_keys_are_refused() -> None:
    x = _random(10, 4, 0)
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 of 10 vectors are not finite .* row 7"):
        build_index(x, _keys(10), IndexConfig(factory="Flat", **CPU))
    index = build_index(_random(10, 4, 0), _keys(10), IndexConfig(factory="Flat", **CPU))
    more = _random(3, 4, 1)
    more[1, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        index.add(more, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="not finite"):  # a NaN query is no query
        index.search(more, 2)
    with pytest.raises(ValueError, match=r"given more than once: \[5\]"):
        index.add(_random(3, 4, 1), np.array([5, 6, 5]))
    assert index.ntotal == 10 and len(index.ids) == 10  # nothing taken


def test_build_index_validates_input() -> None:
    x = _random(10, 4, 0)
    with pytest.raises(ValueError, match="not unique"):
        build_index(x, np.zeros(10, np.int64), IndexConfig(factory="Flat", **CPU))
    with pytest.raises(ValueError, match="10 vectors but 9"):
        build_index(x, _keys(9), IndexConfig(factory="Flat", **CPU))
    with pytest.raises(ValueError, match="FAISS cannot build"):
        build_index(x, _keys(10), IndexConfig(factory="NotAnIndex42", **CPU))
    with pytest.raises(ValueError, match="FAISS cannot build"):  # parses; PQ3 does not fit d=4
        build_index(x, _keys(10), IndexConfig(factory="PQ3", **CPU))
    with pytest.raises(ValueError, match="training"):
        build_index(
            np.empty((0, 4), np.float32),
            np.empty(0, np.int64),
            IndexConfig(factory="IVF4,Flat", **CPU),
        )


# -- approximate search ---------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine", "l1"])
def test_ivf_flat_recall(clustered, metric: str) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="IVF32,Flat", metric=metric, nprobe=16, **CPU))
    assert index.factory == "IVF32,Flat"
    _, truth = _brute_force(q, x, 10, metric)
    _, found = index.search(q, 10)
    assert _recall(found, keys[truth]) > 0.95  # half the lists probed


def test_ivf_nprobe_is_honoured_without_filters(clustered) -> None:
    # nprobe == nlist visits every list: the result must be exact, with or without a filter.
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="IVF32,Flat", metric="l2", nprobe=32, **CPU))
    _, truth = _brute_force(q, x, 10, "l2")
    _, filtered = index.search(q, 10, allowed=keys)
    assert _recall(filtered, keys[truth]) == 1.0
    _, unfiltered = index.search(q, 10)
    assert _recall(unfiltered, keys[truth]) == 1.0


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,PQ4", "IVF32,Flat,Refine(Flat)"])
def test_ivf_fills_answers_its_probed_lists_cannot(clustered, factory: str) -> None:
    # 3,000 vectors in 32 lists: one list holds ~100, so k=400 with nprobe=1 needs more lists
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=1, **CPU))
    scores, found = index.search(q, 400)
    assert (found >= 0).all() and np.isfinite(scores).all()
    assert all(len(set(row)) == 400 for row in found.tolist())
    assert (np.diff(scores, axis=1) >= -1e-4).all()  # still ranked nearest first
    _, first = index.search(q, 5)  # answers already full keep the lists nprobe asked for
    assert (first >= 0).all()


@pytest.mark.parametrize(
    ("factory", "inert"),
    [
        ("Flat", ["nprobe", "ef_search"]),
        ("IVF16,Flat", ["ef_search", "precision", "refine"]),
        ("OPQ4,IVF16,PQ4", ["ef_search", "precision", "refine"]),
        ("IVF16,PQ4,RFlat", ["ef_search", "precision"]),
        ("HNSW8", ["nprobe", "precision", "refine"]),
        ("IVF16_HNSW8,Flat", ["ef_search", "precision", "refine"]),  # HNSW is the quantizer
    ],
)
def test_inert_search_settings_are_named(clustered, factory: str, inert: list[str]) -> None:
    x, keys = clustered["x"][:800], clustered["keys"][:800]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", **CPU))
    asked = IndexConfig(nprobe=4, ef_search=32, precision="float16", refine=2)
    assert [s.split()[0] for s in index.inert_settings(asked)] == inert
    assert index.inert_settings(IndexConfig()) == []  # nothing asked, nothing ignored


def test_search_structure_looks_through_multi_gpu_shards_and_replicas(clustered) -> None:
    # sharded over several GPUs, FAISS wraps the IVF in IndexShards (IndexShardsIVF with a
    # common quantizer; replicas: IndexReplicas)
    import faiss

    from pinsearch.indexes.pinindex import _structure

    x = clustered["x"][:800]
    ivf = faiss.index_factory(16, "IVF8,Flat")
    ivf.train(x)
    shards = faiss.IndexShardsIVF(faiss.IndexFlatL2(16), 8)
    shards.add_shard(ivf)
    replicas = faiss.IndexReplicas()
    replicas.addIndex(ivf)
    flat_shards = faiss.IndexShards(16)
    flat_shards.add_shard(faiss.IndexFlatL2(16))
    assert _structure(shards) == _structure(replicas) == (True, False, False)
    assert _structure(flat_shards) == (False, False, False)


def test_hnsw_recall(clustered) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="HNSW16", metric="l2", **CPU))
    _, truth = _brute_force(q, x, 10, "l2")
    _, found = index.search(q, 10)
    assert _recall(found, keys[truth]) > 0.9


def test_ivf_pq_recall(clustered) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="IVF16,PQ8x4", metric="l2", nprobe=16, **CPU))
    assert index.ntotal == len(x)
    _, truth = _brute_force(q, x, 10, "l2")
    _, found = index.search(q, 10)
    recall = _recall(found, keys[truth])
    assert recall > 0.35  # 4-bit codes on 2-d sub-vectors: coarse but far above chance
    _, found50 = index.search(q, 50)
    hits = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found50, keys[truth])])
    assert hits > 0.8  # the true neighbours are in a short candidate list


def test_training_sample_is_capped(clustered) -> None:
    x, keys = clustered["x"], clustered["keys"]
    index = build_index(
        x, keys, IndexConfig(factory="IVF8,Flat", metric="l2", max_train=400, nprobe=8, **CPU)
    )
    assert index.ntotal == len(x)  # trained on a sample, every vector added
    _, found = index.search(x[:20], 1)
    np.testing.assert_array_equal(found[:, 0], keys[:20])


# -- filters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "extra"),
    [("Flat", {}), ("IVF32,Flat", {"nprobe": 32}), ("HNSW16", {"ef_search": 200})],
)
def test_filtered_search_returns_only_allowed_keys(clustered, factory: str, extra: dict) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", **extra, **CPU))
    rng = np.random.default_rng(4)
    allowed = rng.choice(keys, 60, replace=False)
    scores, found = index.search(q, 10, allowed=allowed)
    assert found.shape == (len(q), 10)
    if factory == "HNSW16":
        # A graph search with a sparse filter may stop short of k (PinSearcher tops it up);
        # whatever it returns must be allowed.
        assert np.isin(found[found >= 0], allowed).all()
        assert (found[:, 0] >= 0).all()
    else:
        assert np.isin(found, allowed).all()  # only allowed keys, and k of them (no -1)
        # Exactly the brute-force answer restricted to the allowed pins.
        rows = np.flatnonzero(np.isin(keys, allowed))
        ref_s, ref_pos = _brute_force(q, x[rows], 10, "l2")
        np.testing.assert_array_equal(found, keys[rows][ref_pos])
        np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("factory", ["PQ8", "LSH", "PQ8x4fs", "RQ2x8", "IVF32,RQ2x8"])
def test_filter_on_indexes_without_id_selectors(clustered, factory: str) -> None:
    # FAISS refuses a selector for these: the index's own ranking, restricted to the allowed
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=32, **CPU))
    allowed = np.random.default_rng(4).choice(keys, 60, replace=False)
    scores, found = index.search(q, 10, allowed=allowed)
    assert np.isin(found, allowed).all()
    all_s, all_k = index.search(q, len(keys))
    for row_s, s, k in zip(scores, all_s, all_k):
        np.testing.assert_allclose(row_s, s[np.isin(k, allowed)][:10], rtol=1e-5)
    three = keys[[3, 500, 2999]]
    _, found = index.search(q[:4], 10, allowed=np.concatenate([three, [-5]]))
    assert all(set(row[:3]) == set(three) and (row[3:] == -1).all() for row in found)


def test_post_filtering_in_query_chunks(clustered, monkeypatch) -> None:
    from pinsearch.indexes import pinindex

    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="PQ8", metric="l2", **CPU))
    allowed = keys[::7]
    whole = index.search(q, 10, allowed=allowed)
    monkeypatch.setattr(pinindex, "_POST_FILTER_ENTRIES", 3 * len(keys))  # 3 queries a chunk
    chunked = index.search(q, 10, allowed=allowed)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(chunked[0], whole[0])


@pytest.mark.parametrize("factory", ["IVF32,Flat,RFlat", "IVF32,PQ4,Refine(Flat)"])
def test_refine_wrappers_pass_nprobe_and_filters_to_their_base(clustered, factory: str) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    truth = keys[_brute_force(q, x, 10, "l2")[1]]
    full = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=32, **CPU))
    narrow = load_index_like(full, nprobe=1)
    assert _recall(narrow.search(q, 10)[1], truth) < _recall(full.search(q, 10)[1], truth)
    if factory.endswith("RFlat"):  # every list probed, re-scored exactly: the exact answer
        np.testing.assert_array_equal(full.search(q, 10)[1], truth)
    else:  # re-scoring more of the PQ candidates (config.refine = FAISS' k_factor) helps
        deeper = load_index_like(full, refine=8)
        assert _recall(deeper.search(q, 10)[1], truth) > _recall(full.search(q, 10)[1], truth)
        assert _recall(deeper.search(q, 10)[1], truth) == 1.0
    allowed = np.random.default_rng(4).choice(keys, 60, replace=False)
    _, found = full.search(q, 10, allowed=allowed)
    assert np.isin(found[found >= 0], allowed).all() and (found[:, 0] >= 0).all()


def load_index_like(index: PinIndex, **settings: object) -> PinIndex:
    """The same FAISS index under other search settings."""
    from dataclasses import replace

    return replace(index, config=replace(index.config, **settings))


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_filter_with_fewer_allowed_than_k(clustered, factory: str) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=32, **CPU))
    allowed = np.concatenate([keys[[3, 500, 2999]], [-5, 10**12]])  # unknown keys are ignored
    scores, found = index.search(q[:4], 10, allowed=allowed)
    for row, srow in zip(found, scores):
        assert set(row[:3]) == set(keys[[3, 500, 2999]])
        assert (row[3:] == -1).all() and np.isnan(srow[3:]).all()
    _, none = index.search(q[:2], 5, allowed=np.array([], np.int64))
    assert (none == -1).all()


def test_a_filtered_ivf_search_visits_more_lists_until_k_allowed_hits(clustered) -> None:
    """With nprobe 1 the lists a query visits may hold few of the allowed pins: the search
    goes deeper, as an unfiltered one does, until each has k allowed hits."""
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="IVF32,Flat", metric="l2", nprobe=1, **CPU))
    allowed = np.random.default_rng(5).choice(keys, 40, replace=False)
    _, found = index.search(q, 10, allowed=allowed)
    assert (found >= 0).all()  # (rows came back short, -1)
    assert np.isin(found, allowed).all() and all(len(set(row)) == 10 for row in found)


def test_positions_of(clustered) -> None:
    keys = clustered["keys"]
    index = build_index(clustered["x"][:50], keys[:50], IndexConfig(factory="Flat", **CPU))
    pos = index.positions_of(np.array([keys[10], keys[2], 123456789, keys[49]]))
    np.testing.assert_array_equal(pos, [2, 10, 49])


# -- add ------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16"])
def test_add_keeps_the_id_mapping(factory: str) -> None:
    x = _clustered(600, 12, 8, seed=5)
    keys = _keys(600)
    index = build_index(
        x[:400], keys[:400], IndexConfig(factory=factory, metric="l2", nprobe=8, **CPU)
    )
    index.add(x[400:], keys[400:])
    assert index.ntotal == 600
    np.testing.assert_array_equal(index.ids, keys)
    scores, found = index.search(x[400:], 1)
    np.testing.assert_array_equal(found[:, 0], keys[400:])
    np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:2], keys[:2])
    with pytest.raises(ValueError, match="2 vectors but 1"):
        index.add(x[:2], np.array([1], np.int64))
    index.add(np.empty((0, 12), np.float32), np.empty(0, np.int64))
    assert index.ntotal == 600


# -- remove ---------------------------------------------------------------------------------

REMOVABLE = [
    "Flat",
    "PQ4",
    "SQ8",
    "IVF16,Flat",
    "IVF16,PQ4",
    "IVF16,SQ8",
    "OPQ4,IVF16,PQ4",
    "PCA8,IVF16,Flat",
    "PCA8,Flat",
]


@pytest.mark.parametrize("factory", REMOVABLE)
def test_remove_in_place_equals_a_filtered_search(clustered, tmp_path: Path, factory: str) -> None:
    x, q, keys = clustered["x"][:1200], clustered["q"], clustered["keys"][:1200]
    config = IndexConfig(factory=factory, metric="l2", nprobe=4, **CPU)
    index = build_index(x, keys, config)
    index.save(tmp_path / "before")
    before = load_index(tmp_path / "before", config=IndexConfig(device="cpu"))
    rng = np.random.default_rng(3)
    gone = rng.choice(keys, 300, replace=False)
    # the nearest neighbours of the queries are among the removed, so the answer must change
    gone = np.union1d(gone, index.search(q, 3)[1].ravel())
    left = np.setdiff1d(keys, gone)
    assert index.removable()
    asked = np.concatenate([gone, gone[:7], [-5, 10**12]])  # repeats and unknown keys: ignored
    assert index.remove(asked) == len(gone)
    assert index.ntotal == len(left) == len(index.ids)
    np.testing.assert_array_equal(index.ids, keys[np.isin(keys, left)])  # order kept
    s_after, k_after = index.search(q, 10)
    assert not np.isin(k_after, gone).any() and (k_after >= 0).all()
    s_ref, k_ref = before.search(q, 10, allowed=left)
    np.testing.assert_array_equal(k_after, k_ref)
    np.testing.assert_allclose(s_after, s_ref, rtol=1e-5, atol=1e-5)
    # the same after a round trip, and new pins go after the kept ones
    index.save(tmp_path / "after")
    loaded = load_index(tmp_path / "after", config=IndexConfig(device="cpu"))
    np.testing.assert_array_equal(loaded.search(q, 10)[1], k_after)
    back = x[np.isin(keys, gone)][:5]  # vectors no kept pin has
    loaded.add(back, np.array([1, 2, 3, 4, 5]))
    scores, found = loaded.search(back, 50)
    for key, row_s, row_k in zip([1, 2, 3, 4, 5], scores, found):  # found, at the best score
        assert key in row_k and row_s[list(row_k).index(key)] == pytest.approx(row_s[0], abs=1e-5)
    assert loaded.remove(np.array([1, 2, 3, 4, 5])) == 5 and loaded.ntotal == len(left)


def test_remove_everything_then_add() -> None:
    x, keys = _clustered(300, 8, 4, seed=2), _keys(300)
    index = build_index(x, keys, IndexConfig(factory="IVF4,Flat", metric="l2", nprobe=4, **CPU))
    assert index.remove(keys) == 300 and index.ntotal == 0 and index.ids.size == 0
    assert index.remove(keys) == 0
    index.add(x[:10], keys[:10])
    np.testing.assert_array_equal(index.search(x[:10], 1)[1][:, 0], keys[:10])


@pytest.mark.parametrize(
    "factory",
    ["HNSW16", "IVF16,Flat,Refine(Flat)", "IVF16,PQ4x4fs", "IVF16,PQ4+4", "IVF16,FlatDedup"],
)
def test_remove_refused_where_faiss_cannot(clustered, factory: str) -> None:
    x, keys = clustered["x"][:500], clustered["keys"][:500]
    index = build_index(x, keys, IndexConfig(factory=factory, metric="l2", **CPU))
    assert not index.removable()
    assert index.remove(np.array([-1])) == 0  # nothing of it in the index: nothing to do
    with pytest.raises(ValueError, match="cannot remove vectors in place"):
        index.remove(keys[:3])
    assert index.ntotal == 500 and len(index.ids) == 500


# -- persistence ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_save_load_round_trip(clustered, tmp_path: Path, factory: str) -> None:
    x, q, keys = clustered["x"][:800], clustered["q"], clustered["keys"][:800]
    config = IndexConfig(factory=factory, metric="cosine", nprobe=4, **CPU)
    index = build_index(x, keys, config, backbone="test_bb")
    meta = index.save(tmp_path / "idx")
    for suffix in (".faiss", ".ids.npy", ".json"):
        assert (tmp_path / f"idx{suffix}").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    assert meta["ntotal"] == 800 and meta["factory"] == factory and meta["backbone"] == "test_bb"
    assert json.loads((tmp_path / "idx.json").read_text()) == meta

    loaded = load_index(tmp_path / "idx", config=IndexConfig(device="cpu"))
    assert isinstance(loaded, PinIndex)
    assert (loaded.factory, loaded.dim, loaded.ntotal, loaded.backbone) == (
        factory,
        16,
        800,
        "test_bb",
    )
    assert loaded.config.metric == "cosine" and loaded.config.nprobe == 4
    np.testing.assert_array_equal(loaded.ids, keys)
    a_s, a_k = index.search(q, 10)
    b_s, b_k = loaded.search(q, 10)
    np.testing.assert_array_equal(a_k, b_k)
    np.testing.assert_array_equal(a_s, b_s)
    allowed = keys[::3]
    np.testing.assert_array_equal(
        index.search(q, 5, allowed=allowed)[1], loaded.search(q, 5, allowed=allowed)[1]
    )


def test_load_overrides_search_settings(clustered, tmp_path: Path) -> None:
    index = build_index(
        clustered["x"],
        clustered["keys"],
        IndexConfig(factory="IVF32,Flat", metric="l2", nprobe=2, **CPU),
    )
    index.save(tmp_path / "ivf")
    loaded = load_index(tmp_path / "ivf", config=IndexConfig(device="cpu", nprobe=32, ef_search=7))
    assert loaded.config.nprobe == 32 and loaded.config.ef_search == 7
    assert loaded.config.metric == "l2" and loaded.config.factory == "IVF32,Flat"
    keep = load_index(tmp_path / "ivf", config=IndexConfig(device="cpu"))
    assert keep.config.nprobe == 2


def test_load_keeps_the_saved_settings_a_config_leaves_unset(tmp_path: Path) -> None:
    x = _random(300, 8, 0)
    config = IndexConfig(factory="Flat", refine=8, precision="float16", **CPU)
    build_index(x, _keys(300), config).save(tmp_path / "ix")
    partial = load_index(tmp_path / "ix", config=IndexConfig(nprobe=4))
    assert (partial.config.device, partial.config.refine) == ("cpu", 8)
    assert partial.config.precision == "float16" and partial.config.nprobe == 4
    named = load_index(tmp_path / "ix", config={"precision": "float32", "refine": 0})
    assert (named.config.precision, named.config.refine, named.config.device) == (
        "float32", 0, "cpu",
    )  # fmt: skip
    assert search_overrides(IndexConfig(refine=2, device="cpu")) == {"device": "cpu", "refine": 2}
    with pytest.raises(ValueError, match="not search-time settings: \\['factory'\\]"):
        load_index(tmp_path / "ix", config={"factory": "HNSW32"})
    with pytest.raises(ValueError, match="unknown precision"):
        load_index(tmp_path / "ix", config={"precision": "float8"})
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        IndexConfig(nprobe=0)


def test_an_index_saved_for_the_gpu_loads_on_the_cpu_without_one(tmp_path: Path) -> None:
    from pinsearch.indexes import gpu_count

    if gpu_count() > 0:
        pytest.skip("a GPU is visible")
    x = _random(50, 8, 0)
    build_index(x, _keys(50), IndexConfig(factory="Flat", **CPU)).save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix.json").read_text())
    meta["config"]["device"] = "gpu"  # as saved on a GPU machine (the JSON has no checksum)
    (tmp_path / "ix.json").write_text(json.dumps(meta))
    index = load_index(tmp_path / "ix")
    assert not index.on_gpu and index.config.device == "gpu"  # saved again as it was
    assert index.search(x[:2], 1)[1][:, 0].tolist() == _keys(50)[:2].tolist()
    with pytest.raises(DeviceError, match="no GPU"):  # asked for now: told it is not there
        load_index(tmp_path / "ix", config={"device": "gpu"})
    if torch_cuda_available():
        return
    half = load_index(tmp_path / "ix", config={"precision": "float16"})  # the 16-bit scan too
    assert half.search(x[:2], 1)[1][:, 0].tolist() == _keys(50)[:2].tolist()
    with pytest.raises(DeviceError, match="torch sees no CUDA"):  # (it saved, then failed)
        build_index(x, _keys(50), IndexConfig(factory="Flat", precision="float16", device="gpu"))


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _flip_bytes(path: Path, at: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_faiss_file_raises_and_is_left_alone(tmp_path: Path) -> None:
    index = build_index(_random(200, 16, 0), _keys(200), IndexConfig(factory="Flat", **CPU))
    index.save(tmp_path / "idx")
    faiss_file = tmp_path / "idx.faiss"
    _flip_bytes(faiss_file, faiss_file.stat().st_size // 2)
    damaged = faiss_file.read_bytes()
    mtime = faiss_file.stat().st_mtime_ns
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(tmp_path / "idx")
    assert faiss_file.read_bytes() == damaged
    assert faiss_file.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.faiss", "idx.ids.npy", "idx.json"]


def test_damaged_ids_file_raises(tmp_path: Path) -> None:
    index = build_index(_random(50, 8, 0), _keys(50), IndexConfig(factory="Flat", **CPU))
    index.save(tmp_path / "idx")
    ids = np.load(tmp_path / "idx.ids.npy")
    ids[0] = 42
    np.save(tmp_path / "idx.ids.npy", ids)
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(tmp_path / "idx")


@pytest.mark.parametrize("verify", [True, False])
def test_a_reader_meeting_a_save_half_swapped_reads_it_again(
    tmp_path: Path, verify, caplog
) -> None:
    import logging
    import os

    old = build_index(_random(30, 8, 0), _keys(30), IndexConfig(factory="Flat", **CPU))
    new = build_index(_random(40, 8, 1), _keys(40), IndexConfig(factory="Flat", **CPU))
    old.save(tmp_path / "idx")
    new.save(tmp_path / "next")
    # a writer's save stopped between its renames: the new index file, the old id map and JSON
    os.replace(tmp_path / "next.faiss", tmp_path / "idx.faiss")

    class FinishTheSave(logging.Handler):  # the writer's last two renames, while we wait
        def emit(self, record: logging.LogRecord) -> None:
            self.seen = record.getMessage()
            for suffix in (".ids.npy", ".json"):
                os.replace(tmp_path / f"next{suffix}", tmp_path / f"idx{suffix}")

    handler = FinishTheSave(logging.INFO)
    log = logging.getLogger("pinsearch.indexes.pinindex")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        loaded = load_index(tmp_path / "idx", verify=verify)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert "looking again" in handler.seen
    assert loaded.ntotal == 40 and (loaded.ids == new.ids).all()
    # one that stays mixed (no file renamed over it while it waits) is damaged: not read again
    os.replace(tmp_path / "idx.faiss", tmp_path / "new.faiss")
    old.save(tmp_path / "idx")
    os.replace(tmp_path / "new.faiss", tmp_path / "idx.faiss")
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="pinsearch.indexes.pinindex"),
        pytest.raises(IndexFileError, match="checksum" if verify else "holds 40 vectors"),
    ):
        load_index(tmp_path / "idx", verify=verify)
    assert caplog.text.count("looking again") == 1


def test_truncated_faiss_file_without_verification(tmp_path: Path) -> None:
    index = build_index(_random(200, 16, 0), _keys(200), IndexConfig(factory="Flat", **CPU))
    index.save(tmp_path / "idx")
    f = tmp_path / "idx.faiss"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(IndexFileError):
        load_index(tmp_path / "idx", verify=False)
    index.save(tmp_path / "idx")
    (tmp_path / "idx.ids.npy").write_bytes(b"")  # numpy says EOFError
    with pytest.raises(IndexFileError, match="cannot read index"):
        load_index(tmp_path / "idx", verify=False)


def test_missing_or_foreign_index_files(tmp_path: Path) -> None:
    index = build_index(_random(20, 8, 0), _keys(20), IndexConfig(factory="Flat", **CPU))
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx.json").read_text())
    (tmp_path / "idx.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexFileError, match="format 99"):
        load_index(tmp_path / "idx")
    (tmp_path / "idx.json").write_text("{broken")
    with pytest.raises(IndexFileError, match="unreadable"):
        load_index(tmp_path / "idx")
    for damage in ({"sha256": None}, {"config": {**meta["config"], "colour": "red"}}, {"dim": []}):
        (tmp_path / "idx.json").write_text(json.dumps({**meta, **damage}))
        with pytest.raises(IndexFileError, match=r"idx\.json is damaged"):
            load_index(tmp_path / "idx")
    (tmp_path / "idx.ids.npy").unlink()
    with pytest.raises(IndexFileError, match="missing"):
        load_index(tmp_path / "idx")
    with pytest.raises(IndexFileError, match="missing"):
        load_index(tmp_path / "nothing")


def test_id_map_length_mismatch_is_detected(tmp_path: Path) -> None:
    index = build_index(_random(20, 8, 0), _keys(20), IndexConfig(factory="Flat", **CPU))
    index.save(tmp_path / "idx")
    np.save(tmp_path / "idx.ids.npy", _keys(19))
    with pytest.raises(IndexFileError):
        load_index(tmp_path / "idx", verify=False)


# -- choosing and validating factories ------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "dim", "metric", "budget", "expected"),
    [
        (1_000, 64, "cosine", None, "Flat"),
        (100_000, 1024, "cosine", 64 << 30, "Flat"),
        (1_000_000, 1024, "cosine", 64 << 30, "IVF4096,Flat"),
        (1_000_000, 1024, "ip", 8 << 30, "IVF4096,Flat"),
        (200_000, 64, "l2", 64 << 30, "IVF2048,Flat"),
        (1_000_000, 1024, "cosine", 200_000_000, "IVF4096,PQ128"),
        (1_000_000, 1024, "cosine", 100_000_000, "IVF4096,PQ64"),
        (1_000_000, 1280, "cosine", 100_000_000, "IVF4096,PQ64"),
        (1_000, 64, "l1", None, "Flat"),
        (100_000, 1024, "l1", 64 << 30, "Flat"),
        (1_000_000, 1024, "l1", 64 << 30, "IVF4096,Flat"),
        (1_000_000, 1024, "l1", int(4.096e9 * 1.02), "Flat"),  # raw fits, IVF-Flat does not
        (50_000, 512, "cosine", 10_000_000, "IVF1024,PQ128"),
    ],
)
def test_choose_factory(n: int, dim: int, metric: str, budget: int | None, expected: str) -> None:
    assert choose_factory(n, dim, metric, budget) == expected
    validate_factory(expected, metric)


def test_choose_factory_errors() -> None:
    with pytest.raises(ValueError, match="too small"):
        choose_factory(1_000_000, 1024, "cosine", 1_000_000)
    with pytest.raises(ValueError, match="metric 'l1' cannot use compressed"):  # HNSW is larger
        choose_factory(1_000_000, 1024, "l1", 1 << 30)
    with pytest.raises(ValueError, match="dim 770 is divisible by none of the PQ sizes"):
        choose_factory(10_000_000, 770, "cosine", 2 << 30)
    with pytest.raises(ValueError):
        choose_factory(0, 64)
    with pytest.raises(ValueError):
        choose_factory(10, 0)


@pytest.mark.parametrize("n", [1, 38, 39, 600, 10_000, 1_000_000, 10**9])
def test_ivf_nlist(n: int) -> None:
    nlist = ivf_nlist(n)
    assert 1 <= nlist <= 65536
    if n >= 39:
        assert n >= 39 * nlist  # enough training points per list
    if n >= 39 * 16:
        assert nlist & (nlist - 1) == 0  # a power of two


@pytest.mark.parametrize(
    ("factory", "metric", "match"),
    [
        ("", "cosine", "empty"),
        ("   ", "l2", "empty"),
        ("IDMap,Flat", "cosine", "IDMap"),
        ("IDMap2,Flat", "l2", "IDMap"),
        ("idmap,HNSW32", "ip", "IDMap"),
        ("IVF64,PQ8", "l1", "l1"),
        ("PQ16", "l1", "l1"),
        ("IVF64,SQ8", "l1", "l1"),
        ("LSH", "l1", "l1"),
    ],
)
def test_validate_factory_errors(factory: str, metric: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_factory(factory, metric)
    with pytest.raises(ValueError, match=match):
        IndexConfig(factory=factory, metric=metric)  # type: ignore[arg-type]


def test_factory_syntax_is_checked_by_faiss_before_any_work() -> None:
    from pinsearch.indexes.spec import check_factory_syntax

    for bad in ("Blah", "IVF64;Flat", "NotAnIndex42", "OPQ128,IVF1024,PQ128,Refine(Flatt)"):
        with pytest.raises(ValueError, match="FAISS cannot parse"):
            check_factory_syntax(bad)
    for fine in ("auto", "Flat", " IVF64,Flat ", "OPQ16_64,IVF256,PQ16", "PQ7", "HNSW32"):
        check_factory_syntax(fine)  # PQ7 parses; whether it fits the vectors shows at build
    assert IndexConfig(factory=" IVF64,Flat ").factory == "IVF64,Flat"  # stored stripped


@pytest.mark.parametrize("factory", ["Flat", " HNSW32 ", "IVF64,Flat", "IVF64,PQ8"])
def test_validate_factory_accepts(factory: str) -> None:
    assert validate_factory(factory) == factory.strip()


def test_l1_accepts_uncompressed_factories() -> None:
    for factory in ("Flat", "HNSW32", "IVF64,Flat"):
        assert validate_factory(factory, "l1") == factory


def test_index_config_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="unknown metric 'euclid'"):
        IndexConfig(metric="euclid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device"):
        IndexConfig(device="tpu")  # type: ignore[arg-type]
    assert IndexConfig().factory == "auto" and IndexConfig().metric == "cosine"
    assert set(METRICS) == {"cosine", "ip", "l2", "l1"}


def test_faiss_metric() -> None:
    import faiss

    assert faiss_metric("cosine") == faiss_metric("ip") == faiss.METRIC_INNER_PRODUCT
    assert faiss_metric("l2") == faiss.METRIC_L2
    assert faiss_metric("l1") == faiss.METRIC_L1
    with pytest.raises(ValueError, match="unknown metric"):
        faiss_metric("hamming")


def test_device_gpu_without_gpu_raises() -> None:
    from pinsearch.indexes import gpu_count

    if gpu_count() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(DeviceError, match="no GPU"):
        build_index(_random(10, 4, 0), _keys(10), IndexConfig(factory="Flat", device="gpu"))


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.faiss_gpu
@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_gpu_index_matches_cpu(clustered, tmp_path: Path, factory: str) -> None:
    x, q, keys = clustered["x"], clustered["q"], clustered["keys"]
    cpu = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=32, device="cpu"))
    gpu = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=32, device="gpu"))
    assert gpu.on_gpu and not cpu.on_gpu
    _, truth = _brute_force(q, x, 10, "l2")
    assert _recall(gpu.search(q, 10)[1], keys[truth]) >= 0.99
    allowed = keys[::5]
    _, fk = gpu.search(q, 10, allowed=allowed)  # filtered searches use the CPU copy
    assert np.isin(fk, allowed).all()
    np.testing.assert_array_equal(fk, cpu.search(q, 10, allowed=allowed)[1])
    gpu.save(tmp_path / "g")
    loaded = load_index(tmp_path / "g", config=IndexConfig(device="cpu"))
    assert not loaded.on_gpu and loaded.ntotal == len(x)
    np.testing.assert_array_equal(loaded.ids, keys)


@pytest.mark.gpu
@pytest.mark.faiss_gpu
@pytest.mark.parametrize(
    ("factory", "fp16", "half"),
    [("Flat", True, True), ("IVF32,PQ16", False, False), ("IVF32,PQ16", True, True),
     ("IVF32,PQ64", False, True), ("IVF32,SQ8", True, False), ("OPQ16,IVF32,PQ16", False, False)],
)  # fmt: skip
def test_compressed_and_float16_gpu_indexes_recall_as_the_cpu(
    factory: str, fp16: bool, half: bool
) -> None:
    """Float16 Flat rows, IVF-PQ (float16 lookup tables asked, or needed by 64-byte codes),
    IVF-SQ and OPQ on the GPU find the true neighbours as often as on the CPU, trained there,
    and grow and shrink in place."""
    from pinsearch.indexes.gpu import gpu_float16

    both = _clustered(4300, 64, 40, seed=1)
    x, q = both[:4000], both[4000:]
    keys = _keys(len(x))
    _, truth = _brute_force(q, x, 10, "l2")
    config = {"factory": factory, "metric": "l2", "nprobe": 32, "fp16": fp16}
    made = {d: build_index(x, keys, IndexConfig(**config, device=d)) for d in ("cpu", "gpu")}
    gpu = made["gpu"]
    assert gpu.on_gpu and gpu_float16(gpu.cpu_index(), fp16) is half
    recall = {d: _recall(index.search(q, 10)[1], keys[truth]) for d, index in made.items()}
    assert recall["gpu"] >= recall["cpu"] - 0.05, recall  # (PQ16: ~0.63, SQ8: ~0.98)
    assert gpu.remove(keys[:100]) == 100 and gpu.on_gpu
    gpu.add(x[:50], keys[:50])
    _, found = gpu.search(x[:200], 1)
    assert gpu.ntotal == len(x) - 50 and gpu.on_gpu
    assert not np.isin(found, keys[50:100]).any()


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("Flat", (True, False)),
        ("IVF16,Flat", (True, False)),
        ("IVF16,PQ8", (True, False)),
        ("IVF16,PQ48", (True, False)),  # 48 x 256 x 4 B = 48 KiB: fits in shared memory
        ("IVF16,PQ64", (True, True)),  # only with float16 lookup tables
        ("IVF16,PQ96", (True, True)),
        ("IVF16,PQ128", (False, False)),  # no GPU kernel: stays on the CPU
        ("IVF16,PQ16x4", (False, False)),  # 4-bit codes: CPU only
        ("OPQ16,IVF16,PQ16", (True, False)),  # the pre-transform is cloned around it
        ("PCA64,IVF16,Flat", (True, False)),
        ("IVF16,SQ8", (True, False)),
        ("IVF16,SQfp16", (True, False)),
        ("IVF16,SQbf16", (False, False)),  # no bf16 scalar quantiser on the GPU
        ("HNSW32", (False, False)),  # no GPU clone for these: they stay on the CPU
        ("PQ16", (False, False)),
        ("SQ8", (False, False)),
        ("LSH", (False, False)),
        ("IVF16,PQ16x4fs", (False, False)),
        ("IVF16,Flat,RFlat", (False, False)),
        ("IVF16_HNSW32,Flat", (False, False)),  # coarse quantiser not flat
    ],
)
def test_gpu_settings_follow_faiss_gpu_limits(factory: str, expected: tuple) -> None:
    import faiss

    from pinsearch.indexes import gpu_settings

    assert gpu_settings(faiss.index_factory(384, factory)) == expected


@pytest.mark.parametrize(
    ("factory", "dim", "expected"),
    [("IVF4,SQ8", 6136, True), ("IVF4,SQ8", 6144, False), ("IVF4,SQ4", 6144, False),
     ("IVF4,SQ8_direct", 6144, True), ("IVF4,SQfp16", 6144, True)],
)  # fmt: skip
def test_gpu_settings_non_uniform_sq_below_shared_memory(
    factory: str, dim: int, expected: bool
) -> None:
    """FAISS-GPU's non-uniform SQ keeps two floats per dimension in 48 KiB of shared memory
    and needs ``d < 48 KiB / 8``; the other SQ types keep none."""
    import faiss

    from pinsearch.indexes import gpu_settings

    assert gpu_settings(faiss.index_factory(dim, factory)) == (expected, False)


@pytest.mark.parametrize(
    ("factory", "fp16", "expected"),
    [
        ("Flat", True, True),
        ("Flat", False, False),
        ("IVF16,Flat", True, False),  # FAISS-GPU ignores float16 for IVF-Flat storage
        ("IVF16,SQ8", True, False),
        ("IVF16,PQ8", True, True),  # lookup tables
        ("IVF16,PQ64", False, True),  # always: float32 tables would not fit
        ("HNSW32", True, False),  # stays on the CPU
    ],
)
def test_gpu_float16_says_what_faiss_gpu_does(factory: str, fp16: bool, expected: bool) -> None:
    import faiss

    from pinsearch.indexes.gpu import gpu_float16

    assert gpu_float16(faiss.index_factory(384, factory), fp16) is expected


def _gpu_nprobes(index: Any) -> set[int]:
    """nprobe of a placed IVF index: of each shard, when it is sharded over several GPUs."""
    import faiss

    from pinsearch.indexes.gpu import shards_of

    shards = shards_of(index)
    parts = [shards.at(i) for i in range(shards.count())] if shards is not None else [index]
    return {int(faiss.extract_index_ivf(part).nprobe) for part in parts}


@pytest.mark.parametrize(
    "factory", ["Flat", "IVF16,Flat", "IVF16,PQ8", "PCA8,Flat", "OPQ4,IVF16,PQ4"]
)
def test_gpu_placement_runs_against_faiss_gpu_entry_points(
    faiss_gpu_stand_in: list, tmp_path: Path, factory: str
) -> None:
    import faiss

    from pinsearch.indexes import gpu

    x = _clustered(600, 16, 8, 0)
    keys = _keys(600)
    q = x[:20] + 0.01
    cpu = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=16, **CPU))
    placed = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=16, fp16=True))
    # an index is placed empty; sharded over two GPUs (behind the pre-transform, if any), one
    # that needs training (IVF, PCA, OPQ) is trained on one GPU, then sharded. Flat vectors
    # are then added on the CPU and placed again: shards take one add, and float16 Flat
    # vectors on the GPU are rounded (the CPU copy is kept, as the vectors of record)
    one, two = (1, False, True), (2, True, True)
    flat = "IVF" not in factory
    if faiss.get_num_gpus() == 1:
        assert faiss_gpu_stand_in == ([one, one] if flat else [one])
    else:
        trained = [] if factory == "Flat" else [one, two]
        assert faiss_gpu_stand_in == [two, *trained, *([two] if flat else [])]
    assert placed.on_gpu and (placed._cpu is not None) is flat
    np.testing.assert_array_equal(placed.search(q, 5)[1], cpu.search(q, 5)[1])
    for allowed in (keys[::3], keys[:4]):  # filtered on the GPU copy: no CPU copy is made
        np.testing.assert_array_equal(
            placed.search(q, 5, allowed=allowed)[1], cpu.search(q, 5, allowed=allowed)[1]
        )
    assert (placed._cpu is not None) is flat  # no copy made for the filtered searches
    for index in (placed, cpu):  # a GPU index grows (sharded Flat: on a CPU copy), shrinks
        index.add(x[:3] * 2, np.array([1, 2, 3]))
        index.remove(np.array([1, 2]))
    assert placed.ntotal == 601 and placed.on_gpu
    q2 = np.concatenate([q, x[:3] * 2 + 0.01])
    np.testing.assert_array_equal(placed.search(q2, 5)[1], cpu.search(q2, 5)[1])
    placed.save(tmp_path / "i")
    assert load_index(tmp_path / "i").on_gpu  # device auto: placed again
    assert len(gpu._RESOURCES) == faiss.get_num_gpus()  # one per GPU, shared by placements
    if "IVF" in factory:  # lists short of k: filled by raising nprobe on the GPU copy itself
        shallow = load_index(tmp_path / "i", config=IndexConfig(nprobe=1))
        _, found = shallow.search(q, 300)
        assert shallow.on_gpu and (found >= 0).all()
        assert shallow._cpu is None  # no copy to the CPU was needed
        assert _gpu_nprobes(shallow.index) == {1}  # back where it was


@pytest.mark.parametrize("factory", ["Flat", "PCA8,Flat"])
def test_float16_flat_on_the_gpu_saves_its_vectors_as_given(
    faiss_gpu_stand_in: list, tmp_path: Path, factory: str
) -> None:
    """FAISS-GPU's float16 Flat storage keeps no float32 copy (a copy back is rounded): the
    CPU copy it was placed from is kept, takes adds and removals, and is what is saved."""
    import faiss

    x, keys = _clustered(700, 16, 8, 1), _keys(700)
    config = IndexConfig(factory=factory, metric="l2", fp16=True)
    placed = build_index(x[:600], keys[:600], config)
    placed.add(x[600:], keys[600:])
    placed.remove(keys[:50])
    assert placed.on_gpu and placed._rounds_vectors()
    placed.save(tmp_path / "i")
    reloaded = load_index(tmp_path / "i")  # placed again: the loaded CPU index is kept
    assert reloaded.on_gpu and reloaded._cpu is not None
    reference = build_index(x[50:], keys[50:], IndexConfig(factory="Flat", metric="l2", **CPU))
    for index in (placed, reloaded, load_index(tmp_path / "i", config=IndexConfig(**CPU))):
        stored = index.cpu_index()
        if factory == "Flat":  # the vectors themselves, not float16 roundings of them
            got = faiss.rev_swig_ptr(faiss.downcast_index(stored).get_xb(), 650 * 16)
            np.testing.assert_array_equal(np.asarray(got).reshape(650, 16), x[50:])
        else:  # the stored PCA projections, through the saved index's own transform
            inner = faiss.downcast_index(faiss.downcast_index(stored).index)
            got = np.asarray(faiss.rev_swig_ptr(inner.get_xb(), 650 * 8)).reshape(650, 8)
            projected = stored.chain.at(0).apply(x[50:])  # (BLAS blocking: 1e-6 apart)
            np.testing.assert_allclose(got, projected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(index.ids, reference.ids)


@pytest.mark.parametrize("faiss_gpu_stand_in", [1], indirect=True, ids=["one-gpu"])
def test_gpu_add_stopped_part_way_is_undone_and_done_on_a_cpu_copy(
    faiss_gpu_stand_in: Any, caplog: pytest.LogCaptureFixture
) -> None:
    x, keys = _clustered(700, 16, 8, 2), _keys(700)
    faiss_gpu_stand_in.add_limit = 650  # the "GPU" Flat runs out of memory past 650 rows
    placed = build_index(x[:600], keys[:600], IndexConfig(factory="Flat", metric="l2"))
    with caplog.at_level("WARNING", logger="pinsearch.indexes.pinindex"):
        with pytest.raises(BackboneMismatchError):  # refused before any batch, not retried
            placed.add(np.zeros((3, 9), np.float32), np.array([1, 2, 3]))
        assert not caplog.text and placed.ntotal == 600
        placed.add(x[600:], keys[600:], batch=30)  # 630 taken, then 20 of the next 30
    assert "FAISS-GPU did not take 100 vectors" in caplog.text
    assert placed.on_gpu and placed.ntotal == len(placed.ids) == 700
    cpu = build_index(x, keys, IndexConfig(factory="Flat", metric="l2", **CPU))
    for got, want in zip(placed.search(x[::7], 10), cpu.search(x[::7], 10)):
        np.testing.assert_array_equal(got, want)
    # and where the index with them no longer fits the GPU at all (650), or not even the
    # index without them (550): it holds them on the CPU (device auto: a warning; device
    # gpu: a DeviceError saying so)
    for limit, device in itertools.product((650, 550), ("auto", "gpu")):
        faiss_gpu_stand_in.place_limit = None
        config = IndexConfig(factory="Flat", metric="l2", device=device)  # type: ignore[arg-type]
        index = build_index(x[:600], keys[:600], config)
        faiss_gpu_stand_in.place_limit = limit
        refused = pytest.raises(DeviceError, match="on the CPU")
        with contextlib.nullcontext() if device == "auto" else refused:
            index.add(x[600:], keys[600:], batch=30)
        assert not index.on_gpu and index.ntotal == len(index.ids) == 700
        for got, want in zip(index.search(x[::7], 10), cpu.search(x[::7], 10)):
            np.testing.assert_array_equal(got, want)


def _failing_after(base: type, rows: int) -> type:
    """A FAISS index class whose adds past ``rows`` vectors take what fits, then fail (FAISS
    running out of memory part-way)."""

    class Failing(base):  # type: ignore[misc, valid-type]
        def add(self, x: np.ndarray) -> None:
            if self.ntotal + len(x) > rows:
                super().add(x[: rows - self.ntotal])
                raise RuntimeError("out of memory (stand-in)")
            super().add(x)

    return Failing


def test_add_stopped_part_way_in_an_index_without_removal_is_refused_after() -> None:
    """HNSW cannot remove the rows a stopped add took: it is left so, and takes no more."""
    import faiss

    x, keys = _clustered(200, 8, 4, 5), _keys(200)
    config = IndexConfig(factory="HNSW8", metric="l2", **CPU)
    hnsw = _failing_after(faiss.IndexHNSWFlat, 110)(8, 8)
    index = PinIndex(hnsw, np.empty(0, np.int64), config, "HNSW8", 8)
    index.add(x[:100], keys[:100])
    with pytest.raises(RuntimeError, match="out of memory"):
        index.add(x[100:], keys[100:])
    assert index.ntotal == 110 and len(index.ids) == 100  # what the recorded keys answer
    assert set(index.search(x[100:110], 5)[1].ravel().tolist()) <= {*keys[:100].tolist(), -1}
    with pytest.raises(IndexFileError, match="110 vectors for 100 pin keys"):
        index.add(x[150:], keys[150:])


def test_cpu_add_stopped_part_way_is_undone() -> None:
    import faiss

    x, keys = _clustered(200, 8, 4, 3), _keys(200)
    flat = _failing_after(faiss.IndexFlatL2, 120)(8)
    index = PinIndex(
        flat, np.empty(0, np.int64), IndexConfig(factory="Flat", metric="l2", **CPU), "Flat", 8
    )
    index.add(x[:100], keys[:100])
    with pytest.raises(RuntimeError, match="out of memory"):
        index.add(x[100:], keys[100:], batch=15)  # 15 taken, then 5 of the next 15
    assert index.ntotal == len(index.ids) == 100  # as it was
    np.testing.assert_array_equal(index.search(x[:5], 3)[1][:, 0], keys[:5])


def test_rows_a_stopped_gpu_add_leaves_are_dropped_or_refused() -> None:
    import faiss

    from pinsearch.indexes.pinindex import _check_positions, _drop_rows

    x = _clustered(300, 8, 4, 3)
    index = build_index(x, _keys(300), IndexConfig(factory="IVF4,Flat", metric="l2", **CPU))
    cpu = index.index
    cpu.add(x[:10])  # rows a stopped add took, counted: positions 300..309
    _drop_rows(cpu, 300)
    _check_positions(cpu, 300, "IVF4,Flat")
    assert cpu.ntotal == 300
    ivf = faiss.extract_index_ivf(cpu)
    code = faiss.swig_ptr(np.zeros(8, np.float32).view(np.uint8))
    ivf.invlists.add_entry(1, 10**6, code)  # an entry written, not counted (FAISS-GPU's OOM)
    _drop_rows(cpu, 300)  # the range is open-ended: the entry goes, the count is off by one
    with pytest.raises(IndexFileError, match="inconsistent with its 300 pin keys"):
        _check_positions(cpu, 300, "IVF4,Flat")
    fresh = build_index(x, _keys(300), IndexConfig(factory="IVF4,Flat", metric="l2", **CPU))
    faiss.extract_index_ivf(fresh.index).invlists.add_entry(2, 7, code)  # position 7 twice
    fresh.index.ntotal += 1  # counted: only the lists tell
    assert fresh.index.ntotal == 301
    with pytest.raises(IndexFileError, match="inconsistent with its 301 pin keys"):
        _check_positions(fresh.index, 301, "IVF4,Flat")


def test_searches_wait_while_an_edit_changes_a_cpu_index() -> None:
    import threading

    x = _random(200, 8, 0)
    index = build_index(x, _keys(200), IndexConfig(factory="Flat", **CPU))
    answers: list[np.ndarray] = []
    with index._edits.editing():  # what add (per batch) and remove hold
        searcher = threading.Thread(target=lambda: answers.append(index.search(x[:3], 1)[1]))
        searcher.start()
        searcher.join(0.3)
        assert searcher.is_alive() and not answers  # waiting for the edit
    searcher.join(10)
    assert not searcher.is_alive() and answers[0][:, 0].tolist() == _keys(200)[:3].tolist()
    # searches from several threads run alongside each other, and an add between them
    results: list[bool] = []

    def search_many() -> None:
        for _ in range(30):
            _, keys = index.search(x[:5], 1)
            results.append(keys[:, 0].tolist() == _keys(200)[:5].tolist())

    threads = [threading.Thread(target=search_many) for _ in range(2)]
    for t in threads:
        t.start()
    index.add(_random(3000, 8, 1) * 0.01, np.arange(3000) + 10**6, batch=100)
    for t in threads:
        t.join(30)
    assert len(results) == 60 and all(results) and index.ntotal == 3200


def test_positions_beyond_the_id_map_are_no_answer() -> None:
    """Vectors an add in another thread has put in the index but not yet recorded."""
    import faiss

    x, keys = _clustered(50, 8, 4, 4), _keys(50)
    flat = faiss.IndexFlatL2(8)
    flat.add(x)
    index = PinIndex(flat, keys[:40], IndexConfig(factory="Flat", metric="l2", **CPU), "Flat", 8)
    scores, found = index.search(x[45:], 50)
    recorded = PinIndex(flat, keys, IndexConfig(factory="Flat", metric="l2", **CPU), "Flat", 8)
    _, all_found = recorded.search(x[45:], 50)
    for row, want in zip(found, all_found):  # the recorded ones, in order; the others missing
        np.testing.assert_array_equal(row[row >= 0], want[np.isin(want, keys[:40])])
    assert np.isnan(scores[found == -1]).all() and (found == -1).sum() == 5 * 10


@pytest.mark.parametrize("factory", ["PQ2", "OPQ2,IVF8,PQ2,RFlat"])
def test_pq_indexes_skip_polysemous_training_and_answer_the_same(factory: str) -> None:
    """Polysemous training (FAISS's default) only permutes PQ centroids for Hamming filters,
    which pinsearch never uses; without it an index answers with the same distances."""
    import faiss

    x, keys = _clustered(1200, 16, 8, 3), _keys(1200)
    ours = build_index(x, keys, IndexConfig(factory=factory, metric="l2", nprobe=8, **CPU))
    node = faiss.downcast_index(ours.index)
    while not hasattr(node, "do_polysemous_training"):
        node = faiss.downcast_index(getattr(node, "index", None) or node.base_index)
    assert node.do_polysemous_training is False
    raw = faiss.index_factory(16, factory)  # FAISS's defaults, polysemous training on
    raw.train(x)
    raw.add(x)
    params = faiss.ParameterSpace()
    if "IVF" in factory:
        params.set_index_parameter(raw, "nprobe", 8)
    d_raw, i_raw = raw.search(x[:50], 5)
    d_ours, k_ours = ours.search(x[:50], 5)
    np.testing.assert_allclose(d_ours, d_raw, rtol=1e-4, atol=1e-4)
    assert (k_ours == keys[i_raw]).mean() > 0.95  # ties may swap


@pytest.mark.parametrize("free_gib", [1.0, 2 + 10_000 / 2**30, 64.0])
def test_gpu_placement_checks_free_gpu_memory(
    gpu_free_memory: dict[str, int], free_gib: float
) -> None:
    """An index larger than the free memory of the GPUs (CUDA's figure, here standing in)
    stays on the CPU under device auto, and is a clear error under device gpu."""
    import faiss

    from pinsearch.indexes.gpu import gpu_index_bytes

    gpu_free_memory["bytes"] = int(free_gib * 2**30)  # free on each GPU
    x, keys = _clustered(600, 16, 8, 0), _keys(600)
    flat = faiss.IndexFlatL2(16)
    flat.add(x)
    assert gpu_index_bytes(flat) == 600 * 16 * 4 and gpu_index_bytes(flat, fp16=True) == 600 * 32
    ivf = faiss.index_factory(16, "IVF8,SQ8")
    ivf.train(x)
    ivf.add(x)
    assert gpu_index_bytes(ivf) == 600 * (16 + 8) + 8 * 16 * 4  # 8-bit codes, ids, centroids
    # 1 GiB free is less than FAISS's scratch memory alone; 2 GiB + 10 kB holds the scratch
    # and the empty index a build places first, not the 38 kB of vectors it then gets
    # (19 kB per GPU over two); 64 GiB holds it
    fits = free_gib > 3
    auto = build_index(x, keys, IndexConfig(factory="Flat", metric="l2"))
    assert auto.on_gpu is fits
    if fits:
        assert build_index(x, keys, IndexConfig(factory="Flat", metric="l2", device="gpu")).on_gpu
    else:
        with pytest.raises(DeviceError, match=r"does not fit the GPU.*GiB is free"):
            build_index(x, keys, IndexConfig(factory="Flat", metric="l2", device="gpu"))


def test_a_gpu_index_stays_whole_when_placing_it_again_fails(
    gpu_free_memory: dict[str, int],
) -> None:
    """remove() changes the CPU copy and places it again: without room on the GPU any more,
    the index is left on the CPU, complete (device auto quietly, device gpu with the error)."""
    free = gpu_free_memory
    x, keys = _clustered(600, 16, 8, 0), _keys(600)
    for device in ("auto", "gpu"):
        index = build_index(x, keys, IndexConfig(factory="Flat", metric="l2", device=device))  # type: ignore[arg-type]
        assert index.on_gpu
        free["bytes"] = 1 << 30  # the GPU filled up meanwhile
        if device == "gpu":
            with pytest.raises(DeviceError, match="does not fit the GPU"):
                index.remove(keys[:10])
        else:
            assert index.remove(keys[:10]) == 10
        free["bytes"] = 64 << 30
        assert not index.on_gpu and index.ntotal == len(index.ids) == 590
        _, found = index.search(x[20:25], 3)
        assert (found[:, 0] == keys[20:25]).all()


def test_a_sharded_flat_index_that_outgrows_the_gpus_keeps_its_new_vectors(
    gpu_free_memory: dict[str, int],
) -> None:
    """Over several GPUs a Flat index grows on a CPU copy placed again: with no room left for
    it (device gpu) the add is an error, and the index holds the new vectors, on the CPU. On
    one GPU the vectors go straight to the GPU copy."""
    import faiss

    free = gpu_free_memory
    x, keys = _clustered(600, 16, 8, 0), _keys(600)
    index = build_index(x[:500], keys[:500], IndexConfig(factory="Flat", metric="l2", device="gpu"))
    free["bytes"] = 1 << 30  # the GPUs filled up meanwhile
    if faiss.get_num_gpus() > 1:
        with pytest.raises(DeviceError, match="does not fit the GPU"):
            index.add(x[500:], keys[500:], batch=32)
        assert not index.on_gpu
    else:
        index.add(x[500:], keys[500:], batch=32)
        assert index.on_gpu
    assert index.ntotal == len(index.ids) == 600
    _, found = index.search(x[550:555], 1)
    assert (found[:, 0] == keys[550:555]).all()


def test_small_gpu_indexes_are_placed_without_asking_cuda(
    faiss_gpu_stand_in: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    def no_cuda_here(i: int) -> tuple[int, int]:
        raise AssertionError("torch's CUDA was started for a 38 kB index")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda_here)
    x, keys = _clustered(600, 16, 8, 0), _keys(600)
    assert build_index(x, keys, IndexConfig(factory="Flat", metric="l2")).on_gpu


def test_gpu_searches_from_several_threads_take_turns(
    faiss_gpu_stand_in: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches filling short IVF answers raise the GPU copy's nprobe while they run: from
    several threads at once each answers as it would alone, and nprobe ends where it was."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    x, keys = _clustered(800, 16, 8, 5), _keys(800)
    placed = build_index(x, keys, IndexConfig(factory="IVF32,Flat", metric="l2", nprobe=1))
    assert placed.on_gpu
    queries = [x[i : i + 5] + 0.01 for i in range(0, 200, 5)]
    alone = [placed.search(q, 120)[1] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: placed.search(q, 120)[1], queries))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
        assert (b >= 0).all()
    assert _gpu_nprobes(placed.index) == {1}
    # rare filters answered from the CPU copy: threads asking at once share one copy
    copies: list = []
    clone = faiss.index_gpu_to_cpu
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda i: copies.append(1) or clone(i))
    placed._cpu = None
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda q: placed.search(q, 3, allowed=keys[:2])[1], queries))
    assert len(copies) == 1 and all(np.isin(f, [*keys[:2], -1]).all() for f in found)


def test_gpu_copy_is_freed_under_the_gpu_lock(faiss_gpu_stand_in: list) -> None:
    """A GPU index dropped by garbage collection (a searcher reloaded in another thread, say)
    frees its memory holding the GPU lock, as ``remove`` does."""
    import gc
    import weakref

    from pinsearch.indexes.gpu import GPU_LOCK

    x, keys = _clustered(300, 16, 4, 6), _keys(300)
    placed = build_index(x, keys, IndexConfig(factory="Flat", metric="l2"))
    assert placed.on_gpu and placed._cpu is None
    freed: list[bool] = []
    weakref.finalize(placed.index, lambda: freed.append(GPU_LOCK._is_owned()))
    del placed
    gc.collect()
    assert freed == [True]
    on_cpu = build_index(x, keys, IndexConfig(factory="Flat", metric="l2", **CPU))
    weakref.finalize(on_cpu.index, lambda: freed.append(GPU_LOCK._is_owned()))
    del on_cpu  # a CPU index needs no lock
    assert freed == [True, False]


def test_auto_index_for_the_gpu_fits_its_memory_and_kernels(
    faiss_gpu_stand_in: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` bound for GPUs chooses among the PQ codes FAISS-GPU implements (the CPU's
    PQ128 would stay on the CPU); under device gpu within their free memory too, as placement
    judges it (centroids on every shard), and under device auto not at all."""
    import faiss
    import torch

    from pinsearch.indexes import choose_factory, gpu
    from pinsearch.indexes.pinindex import _auto_factory

    assert choose_factory(1_000_000, 1024, memory_budget=200_000_000) == "IVF4096,PQ128"
    gpu_codes = {"pq_codes": gpu.GPU_PQ_CODES}
    assert choose_factory(1_000_000, 1024, memory_budget=200_000_000, **gpu_codes) == (
        "IVF4096,PQ64"  # 96 does not divide 1024
    )
    # small: CUDA is not asked, and the GPU's codes still apply (PQ128 stayed on the CPU)
    asked: list = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: asked.append(i) or (0, 0))
    for device, want in (("cpu", "IVF32,PQ128"), ("gpu", "IVF32,PQ64"), ("auto", "IVF32,PQ64")):
        config = IndexConfig(factory="auto", device=device, memory_budget=600_000)  # type: ignore[arg-type]
        assert _auto_factory(2000, 128, config) == want
    assert asked == []
    ngpu = faiss.get_num_gpus()
    monkeypatch.setattr(gpu, "ALWAYS_FITS", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: ngpu)

    def spare(room: int) -> None:  # bytes free past FAISS's scratch on each GPU
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((2 << 30) + room, 80 << 30))

    x, keys = _clustered(2000, 16, 8, 0), _keys(2000)  # 128 kB of float32
    spare(40_000)
    cpu = build_index(x, keys, IndexConfig(factory="auto", **CPU))
    auto = build_index(x, keys, IndexConfig(factory="auto"))
    placed = build_index(x, keys, IndexConfig(factory="auto", device="gpu"))
    assert cpu.factory == "Flat" and not cpu.on_gpu  # half the RAM: raw vectors fit
    assert auto.factory == "Flat" and not auto.on_gpu  # not traded to fit a busy GPU
    # IVF-Flat needs ~150 kB; with centroids and ids, 2,000 PQ16 codes take ~50 kB (two GPUs'
    # 80 kB), PQ8 ~34 kB (one GPU's 40 kB)
    assert placed.factory == ("IVF32,PQ8" if ngpu == 1 else "IVF32,PQ16") and placed.on_gpu
    spare(25_500)  # PQ16 fits the sum of two GPUs' room, not the shard plus its centroids
    if ngpu == 1:  # not even PQ4 fits one GPU: device gpu says so
        with pytest.raises(DeviceError, match="does not fit the GPU"):
            build_index(x, keys, IndexConfig(factory="auto", device="gpu"))
    else:
        built = build_index(x, keys, IndexConfig(factory="auto", device="gpu"))
        assert built.factory == "IVF32,PQ8" and built.on_gpu
    budget = IndexConfig(factory="auto", memory_budget=100_000)  # the CPU's choice is PQ16
    assert build_index(x, keys, budget).factory == "IVF32,PQ16"  # under auto, whatever room


# -- from the review of the index layer --------------------------------------------------------


def test_a_factory_faiss_cannot_fill_is_a_clean_error() -> None:
    x = _random(120, 16, 0)
    with pytest.raises(ValueError, match=r"FAISS cannot fill index 'MinMax,SQ8' with 120"):
        build_index(x, np.arange(120), IndexConfig(factory="MinMax,SQ8", metric="l2", **CPU))
    for n in (50, 104):  # (FAISS aborted the process on 104 of these vectors)
        with pytest.raises(ValueError, match=f"'NSG16,Flat' needs at least 1000 vectors, got {n}"):
            build_index(x[:n], np.arange(n), IndexConfig(factory="NSG16,Flat", **CPU))


def test_an_index_faiss_adds_to_once_is_rebuilt_on_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.store import Store

    x = _random(1100, 16, 1)
    synthetic_store(tmp_path / "s", x[:1050], index=IndexConfig(factory="NSG16,Flat", metric="l2"))
    with Store.open(tmp_path / "s") as store:
        store.vectors("synthetic").write_part(x[1050:], np.arange(1050, 1100))
        index, added = store.update_index("synthetic")  # FAISS: no incremental add to NSG
        assert added == 50 and index.ntotal == 1100 and index.factory == "NSG16,Flat"
        assert sorted(index.ids.tolist()) == list(range(1100))
    assert "takes no more vectors" in caplog.text


def test_a_loaded_index_keeps_the_factory_asked_for(tmp_path: Path) -> None:
    """``auto`` stays auto (what it gave is the index's factory): a rebuild chooses again."""
    x = _random(300, 16, 2)
    build_index(x, np.arange(300), IndexConfig(**CPU)).save(tmp_path / "i")
    loaded = load_index(tmp_path / "i")
    assert loaded.config.factory == "auto" and loaded.factory == "Flat"
    loaded.add(_random(5, 16, 3), np.arange(300, 305))
    loaded.save(tmp_path / "i")
    assert load_index(tmp_path / "i").config.factory == "auto"


def test_a_graph_index_searched_for_a_large_k_answers_all_of_it(tmp_path: Path) -> None:
    """efSearch is at least k: HNSW used to reach ~640 of 2,000 for k = 1,000 (the searcher
    topped the rows up exactly); now its own rows are whole, and the same set."""
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.search import PinSearcher
    from pinsearch.store import Store

    x = _random(2000, 16, 4)
    synthetic_store(tmp_path / "s", x, index=IndexConfig(factory="HNSW16"))
    with Store.open(tmp_path / "s", read_only=True) as store:
        searcher = PinSearcher(store)
        q = searcher.index.prepare(x[:3])
        raw = searcher.index.search(q, 1000)[1]
        assert (raw >= 0).all()
        scores, keys = searcher.search_keys(x[:3], 1000)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    top = np.argsort(-(unit[:3] @ unit.T), axis=1)[:, :1000]
    assert all(set(a) == set(b) for a, b in zip(keys.tolist(), top.tolist()))
    assert np.isfinite(scores).all()


def test_ef_search_below_64_is_used() -> None:
    x, q = _clustered(3000, 32, 30, 5), _clustered(300, 32, 30, 6)
    index = build_index(x, np.arange(3000), IndexConfig(factory="HNSW4", metric="l2", **CPU))
    truth = build_index(x, np.arange(3000), IndexConfig(factory="Flat", metric="l2", **CPU))
    exact = truth.search(q, 10)[1]

    def recall(ef: int) -> float:
        index.config = IndexConfig(factory="HNSW4", metric="l2", ef_search=ef, **CPU)
        got = index.search(q, 10)[1]
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]))

    assert recall(10) < recall(64) < recall(512)  # (10 searched as 64 before)


def test_refine_on_an_index_saved_with_a_16_bit_scan(tmp_path: Path) -> None:
    from pinsearch.eval.bench import synthetic_store
    from pinsearch.search import PinSearcher
    from pinsearch.store import Store

    synthetic_store(tmp_path / "s", _random(200, 16, 7), index=IndexConfig(factory="Flat"))
    with Store.open(tmp_path / "s") as store:
        index = store.load_index("synthetic")
        index.config = IndexConfig(factory="Flat", precision="float16")
        store.save_index(index, "synthetic")
    with Store.open(tmp_path / "s", read_only=True) as store:
        searcher = PinSearcher(store, config={"refine": 4})  # refused before: "ignore refine"
        assert searcher.index.config.refine == 4 and searcher.index.config.precision == "float16"
        with pytest.raises(ValueError, match="would ignore nprobe"):
            PinSearcher(store, config={"nprobe": 4})


@pytest.mark.parametrize(
    ("factory", "metric", "match"),
    [
        ("IVF8,Flat,RFlat", "l1", "metric 'l1' needs the raw vectors"),
        ("Flat,RFlat", "l1", "metric 'l1' needs the raw vectors"),
        ("RaBitQ", "l1", "metric 'l1' needs the raw vectors"),  # (it aborted the process)
        ("PCA16,Flat", "l1", "metric 'l1' needs the raw vectors"),  # (not L1 distances)
        ("HNSW0", "l2", "HNSW's size 0 must be at least 2"),  # (an abort)
        ("HNSW1", "l2", "HNSW's size 1 must be at least 2"),  # (a segfault)
        ("PQ8x0", "l2", "PQ's bits 0 must be at least 1"),  # (a segfault at search)
        ("NSG0", "l2", "NSG's size 0 must be at least 8"),  # (a hang)
        ("NSG4,Flat", "l2", "NSG's size 4 must be at least 8"),  # (FAISS built it for ever)
        ("IVF0,Flat", "l2", "IVF's size 0 must be at least 1"),  # (every search failed)
    ],
)
def test_factories_faiss_would_crash_on_are_refused(factory: str, metric: str, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        validate_factory(factory, metric)
    for fine, m in (("Flat", "l1"), ("IVF8,Flat", "l1"), ("HNSW16,Flat", "l1"),
                    ("NSG32,Flat", "l1"), ("HNSW32_Flat", "l1"), ("IVF8(Flat),Flat", "l1"),
                    ("IVF8,FlatDedup", "l1"), ("OPQ16_64,IVF256_HNSW32,PQ16x4fs", "l2"),
                    ("IVF65536(IVF256,PQ32x4fs,RFlat),SQ8", "l2")):  # fmt: skip
        assert validate_factory(fine, m) == fine


def test_auto_does_not_choose_pq_codes_too_few_vectors_could_train() -> None:
    with pytest.raises(ValueError, match="too few to train PQ codes"):
        choose_factory(200, 64, "l2", memory_budget=20_000)


def test_hnsw_searches_at_least_k_broad(clustered) -> None:  # (up to 2,048)
    """FAISS takes an efSearch below k as it is (worse and missing neighbours)."""
    x, keys = clustered["x"], clustered["keys"]
    index = build_index(x, keys, IndexConfig(factory="HNSW16", metric="l2", ef_search=4, **CPU))
    exact = build_index(x, keys, IndexConfig(factory="Flat", metric="l2", **CPU))
    k = np.int64(100)  # (a numpy integer is taken too)
    _, found = index.search(clustered["q"], k)
    _, truth = exact.search(clustered["q"], 100)
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(found, truth)])
    assert (found >= 0).all() and recall > 0.9


def test_float16_refuses_components_it_cannot_hold() -> None:
    x = _random(50, 8, seed=1) * 1e5
    with pytest.raises(ValueError, match="overflow float16"):
        index = build_index(
            x, _keys(50), IndexConfig(factory="Flat", metric="ip", precision="float16", **CPU)
        )
        index.search(x[:2], 3)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_tied_scores_are_ordered_as_stored_so_a_shorter_answer_is_a_prefix(factory, metric):
    # 30 copies of one vector: FAISS returned the tied hits in an order that depended on k
    # (the first three of a 8-deep answer were not the 3-deep answer)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[10:40] = x[5]
    keys = np.arange(300, dtype=np.int64)[::-1] * 7  # keys in the other order than positions
    index = build_index(x, keys, IndexConfig(factory=factory, metric=metric, nprobe=4))
    answers = {k: index.search(x[5:6].repeat(3, 0), k)[1] for k in (3, 8, 25)}
    for k in (3, 8, 25):
        row = answers[k][0]
        assert (answers[k] == row).all()
        if factory == "Flat":  # exact: the tied group is the 31 copies, first stored first
            assert row.tolist() == keys[[5, *range(10, 40)]][:k].tolist()
        else:
            assert (np.diff(row) < 0).all()  # every hit tied: in stored order


def test_order_ties_sorts_only_tied_rows_and_keeps_missing_hits_last():
    scores = np.array([[0.1, 0.1, 0.3, np.nan], [0.1, 0.2, 0.3, 0.4]], np.float32)
    keys = np.array([[9, 4, 7, -1], [5, 3, 2, 1]], np.int64)
    s, k = order_ties(scores, keys, higher_is_better=False)
    assert k.tolist() == [[4, 9, 7, -1], [5, 3, 2, 1]]  # the second row has no tie: as it was
    assert np.isnan(s[0, 3]) and s[0, :3].tolist() == pytest.approx([0.1, 0.1, 0.3])
    s, k = order_ties(scores[:1], keys[:1], higher_is_better=True, by=np.array([[1, 0, 2, 3]]))
    assert k.tolist() == [[7, 4, 9, -1]]  # similarities: highest first, ties by `by`
