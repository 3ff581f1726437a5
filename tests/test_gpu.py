"""GPU paths agree with the CPU ones (run on a CUDA machine with faiss-gpu: pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from pinsearch.indexes import IndexConfig, build_index, load_index

pytestmark = pytest.mark.gpu


def _data(n: int = 20_000, d: int = 64, nq: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)).astype("float32"), rng.standard_normal((nq, d)).astype(
        "float32"
    )


@pytest.mark.faiss_gpu
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_gpu_equals_cpu(metric: str) -> None:
    x, q = _data()
    keys = np.arange(len(x), dtype=np.int64) * 7
    cpu = build_index(x, keys, IndexConfig(factory="Flat", metric=metric, device="cpu"))  # type: ignore[arg-type]
    gpu = build_index(x, keys, IndexConfig(factory="Flat", metric=metric, device="gpu"))  # type: ignore[arg-type]
    assert gpu.on_gpu and not cpu.on_gpu
    d_cpu, k_cpu = cpu.search(q, 10)
    d_gpu, k_gpu = gpu.search(q, 10)
    assert (k_cpu == k_gpu).mean() > 0.99
    np.testing.assert_allclose(d_cpu, d_gpu, rtol=1e-3, atol=1e-3)


@pytest.mark.faiss_gpu
def test_ivf_gpu_save_load_and_filter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, q = _data()
    keys = np.arange(len(x), dtype=np.int64)
    gpu = build_index(x, keys, IndexConfig(factory="IVF64,Flat", device="gpu", nprobe=64))
    cpu = build_index(x, keys, IndexConfig(factory="IVF64,Flat", device="cpu", nprobe=64))
    assert (gpu.search(q, 10)[1] == cpu.search(q, 10)[1]).mean() > 0.98
    gpu.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix", config=IndexConfig(device="cpu", nprobe=64))
    assert (back.search(q, 10)[1] == gpu.search(q, 10)[1]).mean() > 0.98
    allowed = keys[::3]
    _, found = gpu.search(q, 5, allowed=allowed)
    assert np.isin(found, allowed).all()
    # the GPU index's structure is read where it lies (a GpuIndexIVF holds IVF lists)
    assert gpu.on_gpu and gpu.inert_settings(IndexConfig(nprobe=8)) == []
    assert gpu.inert_settings(IndexConfig(ef_search=8)) == ["ef_search (no HNSW graph)"]
    # k above what nprobe lists of ~300 vectors hold: the answer is filled from more lists
    short = load_index(tmp_path / "ix", config=IndexConfig(device="gpu", nprobe=1))
    assert short.on_gpu and (short.search(q[:5], 1000)[1] >= 0).all()


def test_cuda_embedding_matches_cpu(tree_corpus) -> None:  # type: ignore[no-untyped-def]
    import torch

    from pinsearch.backbones import create_backbone
    from pinsearch.embed import EmbedConfig, iter_embeddings
    from pinsearch.ingest import read_corpus

    pins = read_corpus(tree_corpus.root).pins
    items = [(i, str(p.path)) for i, p in enumerate(pins)]
    out = {}
    for device in ("cpu", "cuda"):
        model = create_backbone("effnet_lite0", device=torch.device(device))
        # both decoded by PIL: this is the model on the GPU (the GPU's JPEG decoding is
        # test_gpu_decode's)
        cfg = EmbedConfig(device=device, workers=0, batch_size=8, decode="pil")
        out[device] = np.concatenate([b.vectors for b in iter_embeddings(model, items, cfg)])
    a = out["cpu"] / np.linalg.norm(out["cpu"], axis=1, keepdims=True)
    b = out["cuda"] / np.linalg.norm(out["cuda"], axis=1, keepdims=True)
    assert np.min(np.sum(a * b, axis=1)) > 0.98  # bf16 autocast on the GPU


def test_cuda_query_image_lands_on_its_stored_vector(tree_corpus) -> None:  # type: ignore[no-untyped-def]
    # a query image is embedded as the pins were (bf16 autocast, channels_last, same decode
    # scale): each pin's own file must come back nearest to its own stored vector
    import torch

    from pinsearch.backbones import create_backbone
    from pinsearch.embed import EmbedConfig, embed_images, iter_embeddings
    from pinsearch.ingest import read_corpus

    paths = [str(p.path) for p in read_corpus(tree_corpus.root).pins]
    model = create_backbone("effnet_lite0", device=torch.device("cuda"))
    cfg = EmbedConfig(device="cuda", workers=0, batch_size=8, decode="pil", normalize=True)
    stored = np.concatenate(
        [b.vectors for b in iter_embeddings(model, list(enumerate(paths)), cfg)]
    )
    queries = embed_images(model, paths, normalize=True)
    sims = queries @ stored.T
    assert (sims.argmax(axis=1) == np.arange(len(paths))).all()
    assert np.diag(sims).min() > 0.99


@pytest.mark.faiss_gpu  # the KNN head on the GPU
def test_torch_heads_on_cuda_match_cpu() -> None:
    import torch
    from sklearn.datasets import make_classification

    from pinsearch.heads import KNNHead, LinearSVMHead, MLPHead

    X, y = make_classification(2000, 64, n_informative=20, n_classes=5, random_state=0)
    cpu = LinearSVMHead(C=1.0, solver="torch", device="cpu").fit(X, y)
    gpu = LinearSVMHead(C=1.0, device="cuda").fit(X, y)  # solver auto -> torch on CUDA
    assert (cpu.predict(X) == gpu.predict(X)).mean() > 0.98
    torch.cuda.manual_seed(11)  # a caller's seeded CUDA stream, which fitting leaves alone
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(11)
    mlp_gpu = MLPHead(hidden=(64, 32), max_epochs=20, device="cuda").fit(X, y)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    mlp_cpu = MLPHead(hidden=(64, 32), max_epochs=20, device="cpu").fit(X, y)
    assert abs((mlp_gpu.predict(X) == y).mean() - (mlp_cpu.predict(X) == y).mean()) < 0.05
    knn_gpu = KNNHead(5, device="gpu").fit(X, y)
    knn_cpu = KNNHead(5, device="cpu").fit(X, y)
    assert (knn_gpu.predict(X) == knn_cpu.predict(X)).mean() > 0.99


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_reduced_precision_scan_on_cuda(precision: str) -> None:
    from pinsearch.eval.bench import clustered_vectors
    from pinsearch.indexes import TorchExact
    from pinsearch.search import exact_search

    both = clustered_vectors(50_100, 128)
    x, q = both[:50_000], both[50_000:]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, truth = exact_search(q, x, 10, "ip")
    scan = TorchExact(x, precision=precision, device="gpu")
    assert scan.device.type == "cuda"
    _, found = scan.search(q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    # bfloat16's 8-bit mantissa swaps near ties (0.993 when simulated on the CPU); refine
    # gives the exact answer
    assert overlap >= (0.99 if precision == "float16" else 0.98)
    fine = TorchExact(x, precision=precision, device="gpu", refine=4)
    assert fine.fast_scores  # by default the candidate pass keeps 16-bit scores on CUDA
    _, refined = fine.search(q, 10)
    assert (refined == truth).mean() > 0.999
    slow = TorchExact(x, precision=precision, device="gpu", refine=4, fast_scores=False)
    assert (slow.search(q, 10)[1] == truth).mean() > 0.999
    _, l2_truth = exact_search(q, x, 10, "l2")  # l2: distances in float32, then 16-bit
    l2 = TorchExact(x, metric="l2", precision=precision, device="gpu", refine=4)
    # (float32 distances rescored as |q|^2 - 2 q.x + |x|^2: the closest pair of neighbours is
    # a few float32 steps apart, one swap in 1,000 places is rounding, not a wrong answer)
    assert (l2.search(q, 10)[1] == l2_truth).mean() >= 0.998
