"""GPU placement of FAISS indexes: one GPU, or sharded over all of them; CPU copies for saving."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["gpu_count", "to_cpu", "to_gpu"]

_logger = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu or without CUDA)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def to_gpu(index: Any, *, fp16: bool = False) -> Any:
    """Copy a CPU index to the GPU(s): replicated data on one GPU, sharded over several.

    Args:
        index: a CPU faiss index.
        fp16: keep vectors (Flat) or lookup tables (IVF-PQ) in float16 on the GPU.
    """
    import faiss

    n = gpu_count()
    if n == 0:
        raise RuntimeError("no GPU visible to faiss; install faiss-gpu and check CUDA")
    if n == 1:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = fp16
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
        gpu.pinsearch_resources = res  # keep the resources alive as long as the index
        return gpu
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = fp16
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n)


def to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index."""
    import faiss

    return faiss.index_gpu_to_cpu(index)
