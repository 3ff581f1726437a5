"""GPU placement of FAISS indexes: one GPU, or sharded over all of them; CPU copies for saving."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pinsearch.errors import DeviceError

__all__ = [
    "GPU_LOCK",
    "GPU_MAX_NPROBE",
    "GPU_PQ_CODES",
    "gpu_count",
    "gpu_float16",
    "gpu_index_bytes",
    "gpu_parts",
    "gpu_room",
    "gpu_settings",
    "ivf_of",
    "shards_of",
    "to_cpu",
    "to_gpu",
]

_logger = logging.getLogger(__name__)

#: Largest nprobe (and k) FAISS-GPU answers.
GPU_MAX_NPROBE = 2048
# FAISS-GPU IVF-PQ: bytes per code it implements (56, 64 and 96 only with float16 lookup
# tables), and the shared memory a float32 lookup table (M x 256 x 4 bytes) must fit in.
GPU_PQ_CODES = frozenset({1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96})
_GPU_PQ_FP16_ONLY = frozenset({56, 64, 96})
_SHARED_MEMORY = 48 * 1024
# one StandardGpuResources per GPU and process (scratch memory, cuBLAS handle), shared by every
# index placed there (FAISS's index_cpu_to_all_gpus would make new ones for each placement)
_RESOURCES: list[Any] = []
#: FAISS-GPU's resources take one call at a time, and all GPU indexes share them: searches,
#: adds, training and copies to and from the GPU hold this lock
GPU_LOCK = threading.RLock()
# StandardGpuResources' default temporary memory on a large GPU (1.5 GiB), plus headroom
_FAISS_SCRATCH = 2 << 30
#: Indexes smaller than this (per GPU) are placed without asking CUDA for free memory.
ALWAYS_FITS = 256 << 20


def ivf_of(index: Any) -> Any:
    """The IVF part of an index (its most specific class: IVF-Flat, IVF-PQ, ...), or None."""
    import faiss

    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except (RuntimeError, AttributeError):
        return None


def gpu_settings(index: Any) -> tuple[bool, bool]:
    """For a CPU index: ``(FAISS-GPU can hold it, it needs float16 lookup tables there)``.

    FAISS-GPU clones Flat, IVF-Flat, IVF-SQ and IVF-PQ indexes with a flat coarse quantiser,
    also behind a pre-transform (OPQ, PCA); anything else (HNSW, flat PQ/SQ, LSH, refine
    wrappers, fast-scan, residual quantisers, bf16 scalar quantisers) stays on the CPU.
    IVF-PQ needs 8-bit codes of a
    size FAISS-GPU implements; large codes (56+ bytes) need float16 lookup tables to fit in
    shared memory.
    """
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return gpu_settings(index.index)
    if type(index) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return True, False
    if type(index) not in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ):
        return False, False
    if not isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlat):
        return False, False
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        return _gpu_sq(index), False
    if not isinstance(index, faiss.IndexIVFPQ):
        return True, False
    m, nbits = int(index.pq.M), int(index.pq.nbits)
    if nbits != 8 or m not in GPU_PQ_CODES:
        return False, False
    return True, m in _GPU_PQ_FP16_ONLY or 4 * m * 256 > _SHARED_MEMORY


def _gpu_sq(index: Any) -> bool:
    """FAISS-GPU's scalar quantisers (not bf16 nor signed direct codes); 8-, 6- and 4-bit
    non-uniform ones keep two floats per dimension in shared memory (FAISS-GPU takes them
    while ``d`` is below a block's shared memory over 8 bytes: 6,144 dimensions)."""
    import faiss

    sq = faiss.ScalarQuantizer
    qtype = int(index.sq.qtype)
    allowed = {sq.QT_8bit, sq.QT_8bit_uniform, sq.QT_8bit_direct, sq.QT_4bit,
               sq.QT_4bit_uniform, sq.QT_6bit, sq.QT_fp16}  # fmt: skip
    if qtype not in allowed:
        return False
    return qtype not in (sq.QT_8bit, sq.QT_4bit, sq.QT_6bit) or 8 * index.d < _SHARED_MEMORY


def gpu_float16(index: Any, fp16: bool) -> bool:
    """Whether a CPU index placed on the GPU (with ``fp16`` asked) computes in float16 there:
    Flat vectors and IVF-PQ lookup tables can be float16; FAISS-GPU ignores the option for
    IVF-Flat and IVF-SQ (their storage is what the factory says)."""
    import faiss

    fits, tables = gpu_settings(index)
    if not fits:
        return False
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return tables or (fp16 and isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFPQ)))


def gpu_index_bytes(index: Any, fp16: bool = False, n: int | None = None) -> int:
    """Device memory a CPU index takes once cloned to the GPU(s), all shards together:
    its vectors or codes (IVF-Flat stores float32 there whatever ``fp16`` says), 8-byte ids
    of IVF lists, and the coarse centroids; with ``n`` vectors (default: what it holds; an
    index about to be built is placed empty)."""
    data, centroids = gpu_parts(index, fp16, n)
    return data + centroids


def gpu_parts(index: Any, fp16: bool, n: int | None) -> tuple[int, int]:
    """``(bytes split between shards, bytes every GPU holds: the coarse centroids)``."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    n, d = int(inner.ntotal if n is None else n), int(inner.d)
    ivf = ivf_of(inner)
    if ivf is None:  # Flat
        return n * d * (2 if fp16 else 4), 0
    code = d * 4 if isinstance(ivf, faiss.IndexIVFFlat) else int(ivf.code_size)
    return n * (code + 8), int(ivf.nlist) * d * 4


def gpu_free_bytes() -> list[int] | None:
    """Free memory of each GPU as CUDA reports it (via torch), or None when it cannot say."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        # blocks torch's caching allocator holds (an embedding run's batches) are free to
        # torch but not to FAISS: hand them back before counting
        torch.cuda.empty_cache()
        return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]
    except Exception:  # a driver problem: let FAISS try
        _logger.debug("cannot read free GPU memory", exc_info=True)
        return None


def gpu_room(index: Any, fp16: bool = False, n_vectors: int | None = None) -> str | None:
    """None when the index (with ``n_vectors``, default what it holds) fits the GPUs FAISS
    would place it on (sharded evenly over several, FAISS's scratch memory on each), else
    why not."""
    n = gpu_count()
    if n == 0:
        return None
    data, centroids = gpu_parts(index, fp16, n_vectors)
    per_gpu = -(-data // n) + centroids + _FAISS_SCRATCH
    if per_gpu - _FAISS_SCRATCH < ALWAYS_FITS:  # not worth starting CUDA in torch to ask
        return None
    free = gpu_free_bytes()
    if not free:
        return None
    room = min(free[:n])
    if per_gpu <= room:
        return None
    where = "the GPU" if n == 1 else f"each of {n} GPUs"
    return (
        f"it needs ~{per_gpu / 2**30:.1f} GiB on {where} (with FAISS's scratch memory), "
        f"{room / 2**30:.1f} GiB is free"
    )


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu or without CUDA)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def to_gpu(index: Any, *, fp16: bool = False, one: bool = False) -> Any:
    """Copy a CPU index to the GPU(s): whole on one GPU, sharded over several.

    Sharded as FAISS shards: a Flat index's rows in successive slices (the shards then take
    vectors in one ``add`` only: see :func:`shards_of`), an IVF index's lists by id, each
    shard with its own copy of the coarse quantizer (and PQ codebooks), trained or not.

    Args:
        index: a CPU faiss index.
        fp16: keep vectors (Flat) or lookup tables (IVF-PQ) in float16 on the GPU.
        one: on the first GPU only, however many there are (to train an index once before
            it is sharded).
    """
    import faiss

    n = gpu_count()
    if n == 0:
        raise DeviceError("no GPU visible to faiss; install faiss-gpu and check CUDA")
    with GPU_LOCK:
        n = 1 if one else n
        while len(_RESOURCES) < n:
            _RESOURCES.append(faiss.StandardGpuResources())
        # (no attribute may be set on the result: FAISS's Python wrappers refuse unknown
        # attributes; the module keeps the resources alive)
        if n == 1:
            co = _classic_kernels(faiss.GpuClonerOptions())
            co.useFloat16 = fp16
            return faiss.index_cpu_to_gpu(_RESOURCES[0], 0, index, co)
        co = _classic_kernels(faiss.GpuMultipleClonerOptions())
        co.shard = True
        co.useFloat16 = fp16
        return faiss.index_cpu_to_gpu_multiple_py(_RESOURCES[:n], index, co)


def shards_of(index: Any) -> Any:
    """The FAISS ``IndexShards`` an index placed on several GPUs searches through (behind a
    pre-transform, if any), or None for an index in one piece."""
    import faiss

    node = faiss.downcast_index(index)
    while isinstance(node, faiss.IndexPreTransform):
        node = faiss.downcast_index(node.index)
    return node if isinstance(node, faiss.IndexShards) else None


def _classic_kernels(options: Any) -> Any:
    """FAISS's own GPU kernels, also in builds with NVIDIA cuVS (whose IVF indexes have other
    limits and parameters than the ones pinsearch checks: k and nprobe <= 2,048, PQ codes)."""
    if hasattr(options, "use_cuvs"):
        options.use_cuvs = False
    return options


def to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index."""
    import faiss

    with GPU_LOCK:
        return faiss.index_gpu_to_cpu(index)
