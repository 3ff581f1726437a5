"""FAISS indexes over stored pin vectors: specs, automatic choice, GPU placement, persistence."""

from pinsearch.indexes.exact import PRECISIONS, TorchExact
from pinsearch.indexes.gpu import gpu_count, gpu_settings, to_cpu, to_gpu
from pinsearch.indexes.pinindex import (
    PinIndex,
    build_index,
    file_sha256,
    load_index,
    search_overrides,
)
from pinsearch.indexes.spec import (
    METRICS,
    IndexConfig,
    choose_factory,
    default_memory_budget,
    faiss_metric,
    ivf_nlist,
    validate_factory,
)

__all__ = [
    "METRICS",
    "PRECISIONS",
    "IndexConfig",
    "PinIndex",
    "TorchExact",
    "build_index",
    "choose_factory",
    "default_memory_budget",
    "faiss_metric",
    "file_sha256",
    "gpu_count",
    "gpu_settings",
    "ivf_nlist",
    "load_index",
    "search_overrides",
    "to_cpu",
    "to_gpu",
    "validate_factory",
]
