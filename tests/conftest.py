"""Shared fixtures: offline environment, GPU skipping, a generated corpus and a built store."""

from __future__ import annotations

import os

# Set before anything imports pinsearch, timm or huggingface_hub: no test may try a hub.
os.environ["PINSEARCH_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# FAISS and torch each bring an OpenMP runtime; with the default busy-waiting, the idle threads
# of one steal the (few) cores of the other and the embedding tests run 3-4x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pinsearch.synth import SyntheticCorpus, make_pinterest_tree

#: The small corpus every store test shares: 3 categories x 2 boards x 4 pins, 2 users.
TREE_KW = {
    "categories": ("food_drink", "architecture", "cars_motorcycles"),
    "n_users": 2,
    "boards_per_category": 2,
    "pins_per_board": 4,
    "image_size": 96,
}
TEST_BACKBONE = "test_efficientnet"


def _cuda_missing() -> str | None:
    """Why torch cannot use CUDA here (None when it can)."""
    try:
        import torch

        return None if torch.cuda.is_available() else "needs CUDA (torch sees no GPU)"
    except Exception as exc:
        return f"needs CUDA ({type(exc).__name__}: {exc})"


def _faiss_gpu_missing() -> str | None:
    """Why FAISS cannot use a GPU here (None when it can), with the import error if any."""
    try:
        from pinsearch.indexes import gpu_count

        return None if gpu_count() > 0 else "needs faiss-gpu with a visible GPU"
    except Exception as exc:
        return f"needs faiss-gpu ({type(exc).__name__}: {exc})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA; those also marked ``faiss_gpu`` need faiss-gpu too.

    The two are checked apart, so that a faiss-gpu install problem skips only the index tests
    (and says why), not the CUDA embedding, decoding and head tests.
    """
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    cuda = _cuda_missing()
    faiss_gpu = None if cuda else _faiss_gpu_missing()
    for item in gpu_items:
        reason = cuda or (faiss_gpu if item.get_closest_marker("faiss_gpu") else None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


_REAL_GPU: dict[str, object] = {}  # torch's and FAISS's own GPU probes, while hidden


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_marked_gpu() -> Iterator[None]:
    """On a GPU machine, tests not marked ``gpu`` run as on a CPU one: torch and FAISS see no
    GPU (device ``auto`` is the CPU, indexes stay there, session stores are built alike) and
    their expectations hold. Tests marked ``gpu`` see it again (:func:`_gpu_for_gpu_tests`).
    Nothing changes where there is no GPU."""
    import faiss
    import torch

    real = {"torch": torch.cuda.is_available, "faiss": getattr(faiss, "get_num_gpus", None)}
    torch_gpu = real["torch"]()
    if not torch_gpu and not (real["faiss"] is not None and real["faiss"]() > 0):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        if real["faiss"] is not None:
            mp.setattr(faiss, "get_num_gpus", lambda: 0)
        # pinsearch started in a subprocess sees none either. CUDA reads the variable once,
        # when it starts: started here first, this process's gpu tests still see the GPU.
        if torch_gpu:
            torch.cuda.init()
        _REAL_GPU["env"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        _REAL_GPU.update(real)
        yield
        _REAL_GPU.clear()


@pytest.fixture(autouse=True)
def _gpu_for_gpu_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if _REAL_GPU and request.node.get_closest_marker("gpu") is not None:
        import faiss
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", _REAL_GPU["torch"])
        if _REAL_GPU["faiss"] is not None:
            monkeypatch.setattr(faiss, "get_num_gpus", _REAL_GPU["faiss"])
        if _REAL_GPU["env"] is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(_REAL_GPU["env"]))


@pytest.fixture(scope="session", autouse=True)
def _offline_env() -> Iterator[None]:
    """Keep the whole session offline even if a test or plugin touched the variables."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PINSEARCH_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def make_small_tree(root: Path, seed: int = 0, **overrides: object) -> SyntheticCorpus:
    """The standard small tree (``TREE_KW``) at ``root``, with optional overrides."""
    return make_pinterest_tree(root, **{**TREE_KW, "seed": seed, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_tree() -> object:
    """Factory ``make_tree(root, seed=0, **overrides)`` for the standard small tree."""
    return make_small_tree


@pytest.fixture(scope="session")
def tree_corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    """A generated Pinterest tree (24 pins). Read-only: copy it (``tree_copy``) to change it."""
    return make_small_tree(tmp_path_factory.mktemp("tree") / "corpus")


@pytest.fixture
def tree_copy(tree_corpus: SyntheticCorpus, tmp_path: Path) -> Path:
    """A private copy of ``tree_corpus`` that a test may modify."""
    dst = tmp_path / "corpus"
    shutil.copytree(tree_corpus.root, dst)
    return dst


@dataclass(frozen=True)
class BuiltStore:
    """A store built from ``tree_corpus`` with the tiny test backbone."""

    path: Path
    corpus: SyntheticCorpus
    report: object  # pinsearch.pipeline.IndexReport


@pytest.fixture(scope="session")
def built_store(
    tree_corpus: SyntheticCorpus, tmp_path_factory: pytest.TempPathFactory
) -> BuiltStore:
    """``index_corpus(tree_corpus)`` into a fresh store. Read-only: use ``store_copy`` to write."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus

    path = tmp_path_factory.mktemp("store") / "store"
    report = index_corpus(
        tree_corpus.root,
        path,
        backbone=TEST_BACKBONE,
        embed=EmbedConfig(workers=0, batch_size=16),
    )
    return BuiltStore(path, tree_corpus, report)


@pytest.fixture
def store_copy(built_store: BuiltStore, tmp_path: Path) -> Path:
    """A private copy of the built store's folder, for tests that write to it."""
    dst = tmp_path / "store"
    shutil.copytree(built_store.path, dst)
    return dst


class _StandInCalls(list):
    """The stand-in's placements; the rows its one-GPU Flat indexes take in adds, and the
    rows an index placed on one GPU may hold (None: any)."""

    add_limit: int | None = None
    place_limit: int | None = None


@pytest.fixture(params=[1, 2], ids=["one-gpu", "two-gpus"])
def faiss_gpu_stand_in(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> list:
    """FAISS-GPU's Python entry points, standing in on a CPU build: cloning "to the GPU(s)"
    returns a CPU clone (a FAISS index object, with the same attribute rules as a GPU one), so
    pinsearch's placement code runs here as it would with one GPU or sharded over two (it ran
    on no GPU before). Sharding builds CPU ``IndexShards`` as FAISS's multi-GPU cloner does
    (Flat rows in successive slices, which take one ``add`` only; IVF lists by id, each shard
    with its own quantizer copy, here seeded apart), and the copy back merges them as FAISS
    does (identical quantizers required). Behind a pre-transform (PCA, OPQ) the index inside is
    sharded, and the transforms copied around the shards, as FAISS's cloner does. Placed with
    float16, Flat vectors are held rounded to float16 (FAISS-GPU keeps no float32 copy: a copy
    back is rounded too). Records ``(GPUs, shard, float16)`` per placement; ``add_limit`` (rows)
    makes an add past it to a one-GPU Flat index fail part-way, as FAISS-GPU out of memory, and
    ``place_limit`` a placement on one GPU of an index holding more."""
    import faiss

    from pinsearch.indexes import gpu

    calls = _StandInCalls()
    halves: list = []  # placements holding float16 Flat vectors

    class Options:
        useFloat16 = False
        shard = False

    class LimitedFlat(faiss.IndexFlat):  # a "GPU" Flat that runs out of memory at add_limit
        def add(self, x: np.ndarray) -> None:
            room = calls.add_limit - self.ntotal
            if len(x) > room:
                super().add(x[: max(room, 0)])
                raise RuntimeError("Error in StandardGpuResources: alloc fail (stand-in)")
            super().add(x)

    def round_flat(index: object) -> object:  # Flat vectors in float16, in place
        node = faiss.downcast_index(index)
        if isinstance(node, faiss.IndexPreTransform):
            round_flat(node.index)
        elif isinstance(node, faiss.IndexShards):
            for i in range(node.count()):
                round_flat(node.at(i))
        elif isinstance(node, faiss.IndexFlat) and node.ntotal:
            xb = faiss.rev_swig_ptr(node.get_xb(), node.ntotal * node.d)
            xb[:] = xb.astype(np.float16).astype(np.float32)
        return index

    def placed(index: object, fp16: bool) -> object:
        if fp16:
            halves.append(round_flat(index))
        return index

    def to_gpu(resources: object, device: int, index: object, options: Options) -> object:
        calls.append((1, False, options.useFloat16))
        node = faiss.downcast_index(index)
        if calls.place_limit is not None and node.ntotal > calls.place_limit:
            raise RuntimeError("Error in StandardGpuResources: alloc fail (stand-in placement)")
        if calls.add_limit is not None and type(node) in (
            faiss.IndexFlat,
            faiss.IndexFlatL2,
            faiss.IndexFlatIP,
        ):
            limited = LimitedFlat(node.d, node.metric_type)
            faiss.IndexFlat.add(limited, node.reconstruct_n(0, node.ntotal))  # placed whole
            return placed(limited, options.useFloat16)
        return placed(faiss.clone_index(index), options.useFloat16)

    def around(pre: object, inner: object) -> object:  # pre's transforms copied around inner
        out = faiss.IndexPreTransform(inner)  # (FAISS's wrappers keep inner and the
        for i in reversed(range(pre.chain.size())):  # transforms alive with out)
            out.prepend_transform(faiss.Cloner().clone_VectorTransform(pre.chain.at(i)))
        return out

    def shards(index: object, n: int) -> object:
        node = faiss.downcast_index(index)
        if isinstance(node, faiss.IndexPreTransform):
            return around(node, shards(node.index, n))
        flat = isinstance(node, faiss.IndexFlat)
        if not (flat or isinstance(node, faiss.IndexIVF)):
            return faiss.clone_index(index)  # FAISS shards those two kinds only
        out = faiss.IndexShards(node.d, False, flat)
        for i in range(n):
            part = faiss.clone_index(node)
            part.reset()
            if flat:
                lo, hi = node.ntotal * i // n, node.ntotal * (i + 1) // n
                if hi > lo:
                    part.add(node.reconstruct_n(lo, hi - lo))
            else:
                ivf = faiss.extract_index_ivf(part)
                ivf.cp.seed += i  # trained apart, GPUs' k-means need not agree: here they do not
                if node.ntotal:
                    node.copy_subset_to(ivf, faiss.InvertedLists.SUBSET_TYPE_ID_MOD, n, i)
            out.add_shard(part)  # FAISS's wrapper keeps the shard alive with the shards
        return out

    def to_gpus(resources: list, index: object, co: Options, gpus: object = None) -> object:
        calls.append((len(resources), co.shard, co.useFloat16))
        out = shards(index, len(resources)) if co.shard else faiss.clone_index(index)
        return placed(out, co.useFloat16)

    def to_cpu(index: object) -> object:
        if any(index is half for half in halves):
            return round_flat(copied_back(index))
        return copied_back(index)

    def copied_back(index: object) -> object:
        node = faiss.downcast_index(index)
        if isinstance(node, faiss.IndexPreTransform):
            return around(node, copied_back(node.index))
        if not isinstance(node, faiss.IndexShards):
            return faiss.clone_index(index)
        parts = [faiss.clone_index(node.at(i)) for i in range(node.count())]
        whole = parts[0]
        for part in parts[1:]:  # FAISS's merge: checks that IVF quantizers are identical
            if node.successive_ids:
                whole.add(part.reconstruct_n(0, part.ntotal))
            else:
                whole.merge_from(part, 0)
        return whole

    for name, value in {
        "get_num_gpus": lambda: request.param,
        "StandardGpuResources": object,
        "GpuClonerOptions": Options,
        "GpuMultipleClonerOptions": Options,
        "index_cpu_to_gpu": to_gpu,
        "index_cpu_to_gpu_multiple_py": to_gpus,
        "index_gpu_to_cpu": to_cpu,
        "GpuParameterSpace": faiss.ParameterSpace,
    }.items():
        monkeypatch.setattr(faiss, name, value, raising=False)
    monkeypatch.setattr(gpu, "_RESOURCES", [])
    return calls


@pytest.fixture
def gpu_free_memory(faiss_gpu_stand_in: list, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The FAISS-GPU stand-in, with CUDA's free memory on each of its GPUs standing in too:
    ``free["bytes"]`` (64 GiB at first, changed by the test), asked about for small indexes
    as well."""
    import faiss
    import torch

    from pinsearch.indexes import gpu

    monkeypatch.setattr(gpu, "ALWAYS_FITS", 0)
    ngpu, free = faiss.get_num_gpus(), {"bytes": 64 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: ngpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free["bytes"], 80 << 30))
    return free
