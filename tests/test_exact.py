"""The torch exact scan (float32 / float16 / bfloat16) against FAISS' exact search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.eval.bench import clustered_vectors
from pinsearch.indexes import IndexConfig, TorchExact, build_index, load_index
from pinsearch.search import exact_search


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(r) for r, s in zip(a, b)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    both = clustered_vectors(6200, 64, clusters=32)
    return both[:6000], both[6000:]


def test_clustered_vectors_drawn_in_blocks_equal_one_whole_draw() -> None:
    # the benchmarks' data is drawn in row blocks (1M x 1024 without float64 temporaries); the
    # vectors must be those of drawing every array at once, so earlier figures stay comparable
    n, dim, clusters, intrinsic = 70_000, 24, 16, 5  # over two blocks of 32,768 rows
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    basis = (rng.standard_normal((intrinsic, dim)) / np.sqrt(intrinsic)).astype(np.float32)
    whole = centers[rng.integers(0, clusters, n)]
    whole += rng.standard_normal((n, intrinsic)).astype(np.float32) @ basis
    whole += 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    np.abs(whole, out=whole)
    got = clustered_vectors(n, dim, clusters=clusters, intrinsic=intrinsic, seed=3)
    assert got.dtype == np.float32 and got.shape == (n, dim)
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_scan_agrees_with_faiss(data, metric: str, precision: str) -> None:  # type: ignore[no-untyped-def]
    x, q = data
    d_ref, i_ref = exact_search(q, x, 10, metric)
    # small blocks: several query blocks and several column tiles with running top-k merges
    scan = TorchExact(x, metric=metric, precision=precision, device="cpu", block_bytes=40_000)
    d, i = scan.search(q, 10)
    assert d.shape == i.shape == (len(q), 10) and d.dtype == np.float32
    minimum = {"float32": 0.999, "float16": 0.99, "bfloat16": 0.97}[precision]
    assert _overlap(i, i_ref) >= minimum
    rel = np.abs(d - d_ref).max() / np.abs(d_ref).max()
    assert rel < {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[precision]
    order = np.diff(d, axis=1)
    assert (order <= 1e-6).all() if metric == "ip" else (order >= -1e-6).all()


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_refine_restores_the_float32_answer(data, precision: str) -> None:  # type: ignore[no-untyped-def]
    x, q = data
    d_ref, i_ref = exact_search(q, x, 10, "ip")
    scan = TorchExact(x, precision=precision, device="cpu", refine=4)
    d, i = scan.search(q, 10)
    assert _overlap(i, i_ref) == 1.0
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)
    assert scan.nbytes == x.size * 2 + x.size * 4  # the 16-bit copy and the float32 copy


def test_refine_pass_keeps_to_the_block_size(data, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The refine pass gathers (rows, refine * k, dim) float32 candidates: query blocks are
    cut so that it too stays within ``block_bytes`` (it was sized for the scores alone)."""
    x, q = data
    k, refine = 50, 4  # candidates (200 x 64 floats a query) outweigh scores (6,000 floats)
    block = 4 * refine * k * x.shape[1] * 3  # three queries' candidates, six queries' scores
    scan = TorchExact(x, precision="float16", device="cpu", refine=refine, block_bytes=block)
    gathered = []
    rescore = scan._rescore

    def counting(qb, cand, *args):  # type: ignore[no-untyped-def]
        gathered.append(tuple(cand.shape))
        return rescore(qb, cand, *args)

    monkeypatch.setattr(scan, "_rescore", counting)
    d, i = scan.search(q, k)
    assert gathered and max(rows for rows, _ in gathered) <= 3
    d_ref, i_ref = exact_search(q, x, k, "ip")
    assert _overlap(i, i_ref) == 1.0
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("filtered", [False, True])
def test_sixteen_bit_candidate_scores_keep_the_refined_answer(
    data, monkeypatch: pytest.MonkeyPatch, precision: str, metric: str, filtered: bool
) -> None:  # type: ignore[no-untyped-def]
    """``fast_scores``: the candidate pass selects over 16-bit scores (half the bytes for
    topk, the GPU's saving; emulated here by rounding), and refine still gives the float32
    answer, filtered or not."""
    import torch

    x, q = data
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # vectors on the sphere, as embeddings
    q = 10 * q  # far queries: for l2, |q|^2 alone would round 16-bit distances to ties
    allowed = np.arange(len(x)) % 3 != 0 if filtered else None
    rows = np.flatnonzero(allowed) if filtered else np.arange(len(x))
    d_ref, i_ref = exact_search(q, x[rows], 10, metric)
    scan = TorchExact(x, metric=metric, precision=precision, device="cpu", refine=4,
                      block_bytes=40_000, fast_scores=True)  # fmt: skip
    seen = []
    scan_pass = scan._scan

    def recording(*args):  # type: ignore[no-untyped-def]
        s, i = scan_pass(*args)
        seen.append((s.dtype, s.shape[0]))
        return s, i

    monkeypatch.setattr(scan, "_scan", recording)
    d, i = scan.search(q, 10, allowed=allowed)
    assert {dtype for dtype, _ in seen} == {getattr(torch, precision)}
    # 2-byte ip scores: twice the queries of a float32 block (40,000 B / (2 x 6,000) = 3);
    # l2 scores pass through float32 first, and the block is sized for those
    assert max(n for _, n in seen) == (3 if metric == "ip" else 1)
    assert _overlap(i, rows[i_ref]) == 1.0
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-4)


def test_float16_candidate_scores_that_could_overflow_stay_float32(data) -> None:  # type: ignore[no-untyped-def]
    import torch

    x, q = data
    # 100 vectors along one direction, 73 of them scoring past float16's 65,504 against the
    # query: in float16 they would all tie at inf and refine would see 40 of them at random
    u = np.zeros(64, np.float32)
    u[0] = 1.0
    big = np.concatenate([x, np.linspace(300, 400, 100, dtype=np.float32)[:, None] * u])
    query = 200 * u[None]
    scan = TorchExact(big, precision="float16", device="cpu", refine=4, fast_scores=True)
    assert scan._score_dtype(query) == torch.float32
    assert scan._score_dtype(q / 100) == torch.float16  # a small query: 16 bits are safe
    d, i = scan.search(query, 10)
    assert sorted(i[0]) == list(range(len(big) - 10, len(big)))  # the 10 longest
    np.testing.assert_allclose(d[0], 200 * np.linspace(300, 400, 100)[-10:][::-1], rtol=1e-6)
    bf = TorchExact(big, precision="bfloat16", device="cpu", refine=4, fast_scores=True)
    assert bf._score_dtype(query) == torch.bfloat16  # float32's range: no overflow
    assert sorted(bf.search(query, 10)[1][0]) == list(range(len(big) - 10, len(big)))
    # the default: 16-bit candidate scores on CUDA only (a CPU upcasts the products anyway)
    assert not TorchExact(x, precision="float16", device="cpu", refine=4).fast_scores


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grouped_selection_is_topk(dtype: str, largest: bool, device: str) -> None:
    import torch

    from pinsearch.indexes.exact import GROUP_WIDTH, top_k_grouped

    gen = torch.Generator().manual_seed(0)
    # a partial last group, whose columns are candidates too; on CUDA the scan's block width
    # at a million vectors
    n = {"cpu": 300, "cuda": 15_625}[device] * GROUP_WIDTH + 37
    scores = torch.randn(16, n, generator=gen).to(device, getattr(torch, dtype))
    scores[:, n - 5 :] += 8.0 if largest else -8.0  # the best in the partial tail
    scores[3] = scores[3].round()  # many ties
    scores[4, ::2] = -torch.inf if largest else torch.inf  # filtered columns
    scores[5, : n - 3] = -torch.inf if largest else torch.inf  # fewer allowed than k
    for k in (1, 10, 37, 2 * n // GROUP_WIDTH):  # the last: too few groups, plain topk
        want, _ = torch.topk(scores, k, dim=1, largest=largest)
        got, at = top_k_grouped(scores, k, largest)
        assert at.dtype == torch.int64 and at.shape == (16, k)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(torch.gather(scores, 1, at), want, rtol=0, atol=0)
        assert all(len(set(row.tolist())) == k for row in at)  # no column twice
    assert set(top_k_grouped(scores, 5, largest)[1][0].tolist()) == set(range(n - 5, n))


def test_grouped_and_plain_selection_scan_alike(data) -> None:  # type: ignore[no-untyped-def]
    x, q = data
    grouped = TorchExact(x, precision="float32", device="cpu")
    plain = TorchExact(x, precision="float32", device="cpu", group_select=False)
    d, i = grouped.search(q, 10)
    d_ref, i_ref = plain.search(q, 10)
    np.testing.assert_array_equal(d, d_ref)
    assert _overlap(i, i_ref) == 1.0


@pytest.mark.parametrize(("precision", "refine"), [("float32", 0), ("float16", 4)])
def test_the_scan_holds_copies_of_its_own(data, precision: str, refine: int) -> None:  # type: ignore[no-untyped-def]
    x, q = data[0].copy(), data[1]  # as a FAISS index's vectors, which its next add may move
    scan = TorchExact(x, precision=precision, refine=refine, device="cpu")
    before = scan.search(q, 5)
    x[:] = 0
    after = scan.search(q, 5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_more_neighbours_than_vectors_are_padded() -> None:
    x = np.eye(3, 8, dtype=np.float32)
    d, i = TorchExact(x, device="cpu").search(x[:2], 5)
    assert i[:, 0].tolist() == [0, 1] and sorted(i[0, :3]) == sorted(i[1, :3]) == [0, 1, 2]
    assert (i[:, 3:] == -1).all() and np.isnan(d[:, 3:]).all()
    empty_d, empty_i = TorchExact(x, device="cpu").search(np.empty((0, 8), np.float32), 3)
    assert empty_d.shape == empty_i.shape == (0, 3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("refine", [0, 4])
def test_a_masked_scan_is_the_scan_of_the_allowed_rows(data, metric: str, refine: int) -> None:  # type: ignore[no-untyped-def]
    x, q = data
    allowed = np.zeros(len(x), bool)
    allowed[np.random.default_rng(0).choice(len(x), 300, replace=False)] = True
    rows = np.flatnonzero(allowed)
    d_ref, i_ref = exact_search(q, x[rows], 10, metric)
    scan = TorchExact(x, metric=metric, precision="float32", device="cpu", block_bytes=40_000,
                      refine=refine)  # fmt: skip
    d, i = scan.search(q, 10, allowed=allowed)
    assert allowed[i].all() and _overlap(i, rows[i_ref]) >= 0.999
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    few = np.zeros(len(x), bool)
    few[[3, 9]] = True  # fewer allowed rows than k: padded like FAISS
    d, i = scan.search(q[:2], 5, allowed=few)
    assert sorted(i[0, :2]) == [3, 9] and (i[:, 2:] == -1).all() and np.isnan(d[:, 2:]).all()
    with pytest.raises(ValueError, match="mask of 6000 rows"):
        scan.search(q, 3, allowed=few[:10])


def test_bad_arguments_are_named() -> None:
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="precision 'int8'"):
        TorchExact(x, precision="int8")
    with pytest.raises(ValueError, match="ip or l2"):
        TorchExact(x, metric="cosine")
    with pytest.raises(ValueError, match="refine"):
        TorchExact(x, refine=-1)
    with pytest.raises(ValueError, match=r"fast_scores needs .* refine > 0"):
        TorchExact(x, precision="float16", fast_scores=True)
    with pytest.raises(ValueError, match="fast_scores needs a 16-bit precision"):
        TorchExact(x, precision="float32", refine=4, fast_scores=True)
    with pytest.raises(ValueError, match=r"\(nq, 8\)"):
        TorchExact(x, device="cpu").search(np.ones((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="precision 'half'"):
        IndexConfig(precision="half")  # type: ignore[arg-type]


def test_pin_index_uses_the_scan_and_keeps_faiss_for_the_rest(data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, q = data
    keys = np.arange(len(x), dtype=np.int64) * 5 + 1
    ref = build_index(x, keys, IndexConfig(factory="Flat", device="cpu"))
    half = build_index(x, keys, IndexConfig(factory="Flat", device="cpu", precision="float16"))
    assert half.reduced_precision and not ref.reduced_precision
    d_ref, k_ref = ref.search(q, 10)
    d, k = half.search(q, 10)
    assert half._exact is not None  # the torch scan answered
    assert _overlap(k, k_ref) >= 0.99
    np.testing.assert_allclose(d, d_ref, atol=2e-3)
    # filters: the masked 16-bit scan on a GPU, FAISS's selector on the CPU (fewer rows)
    allowed = keys[::4]
    _, kf = half.search(q, 5, allowed=allowed)
    assert np.isin(kf, allowed).all()
    assert _overlap(kf, ref.search(q, 5, allowed=allowed)[1]) >= 0.99
    # vectors added later are searched too (the scan is rebuilt)
    half.add(q[:3] * 10, np.array([-7, -8, -9]))
    assert half._exact is None
    assert half.search(q[:3], 1)[1][:, 0].tolist() == [-7, -8, -9]
    # precision is a search-time setting: saved as float16, loaded back as float32 or bfloat16
    half.save(tmp_path / "ix")
    same = load_index(tmp_path / "ix", config=IndexConfig(device="cpu"))  # precision not set
    assert same.config.precision == "float16" and same.reduced_precision
    back = load_index(tmp_path / "ix", config={"device": "cpu", "precision": "float32"})
    assert back.config.precision == "float32" and not back.reduced_precision
    bf = load_index(tmp_path / "ix", config=IndexConfig(device="cpu", precision="bfloat16"))
    assert bf.reduced_precision
    assert _overlap(bf.search(q, 10)[1], back.search(q, 10)[1]) >= 0.97
    # approximate and l1 indexes ignore the setting
    ivf = build_index(x, keys, IndexConfig(factory="IVF16,Flat", device="cpu", precision="float16"))
    l1 = build_index(x, keys, IndexConfig(factory="Flat", metric="l1", precision="float16"))
    assert not ivf.reduced_precision and not l1.reduced_precision


def test_bench_exact_prints_every_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    progress = tmp_path / "exact-progress.json"
    result = CliRunner().invoke(
        app, ["bench", "exact", "--n", "3000", "--dim", "32", "--queries", "50", "--json",
              "--progress", str(progress)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "done"
    assert json.loads(progress.read_text()) == data  # the last snapshot is the result
    paths = [r["path"] for r in data["rows"]]
    assert paths[:2] == ["faiss Flat (raw)", "pinsearch Flat"]
    assert {"torch float16", "torch bfloat16 refine 4k"} <= set(paths)
    for r in data["rows"]:
        assert r["seconds"] > 0 and 0.9 <= r["agreement"] <= 1.0
    assert data["rows"][1]["agreement"] == 1.0
