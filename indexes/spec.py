"""Index configuration: FAISS factory strings, metrics, and the automatic choice of index type.

Index types are FAISS ``index_factory`` strings (``"Flat"``, ``"IVF1024,Flat"``,
``"IVF4096,PQ32"``, ``"HNSW32"``), plus ``"auto"``, resolved by :func:`choose_factory` from the
number of vectors, their dimension and a memory budget (rules after autofaiss: exact search
while it is cheap, IVF-Flat while raw vectors fit the budget, IVF-PQ below it).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Literal

from pinsearch.indexes.exact import PRECISIONS

__all__ = [
    "METRICS",
    "IndexConfig",
    "check_factory_syntax",
    "choose_factory",
    "default_memory_budget",
    "faiss_metric",
    "ivf_nlist",
    "validate_factory",
]

Metric = Literal["cosine", "ip", "l2", "l1"]
#: Supported metrics. ``cosine`` is inner product over L2-normalised vectors; ``l2`` distances
#: are squared, as FAISS returns them.
METRICS: tuple[str, ...] = ("cosine", "ip", "l2", "l1")

#: Below this many vectors exact search is always chosen: it is fast and has perfect recall.
EXACT_MAX = 100_000

_PQ_CHOICES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
_PQ_TRAIN_MIN = 256  # vectors to train 8-bit PQ codes (one centroid each)


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built and searched."""

    factory: str = "auto"  # FAISS index_factory string, or "auto"
    metric: Metric = "cosine"  # cosine, ip, l2 or l1
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto = GPU whenever faiss sees one
    fp16: bool = False  # GPU: Flat vectors / IVF-PQ lookup tables in float16 (not IVF-Flat/SQ)
    # exact search (Flat) in torch at reduced precision: float32 (= FAISS), float16, bfloat16
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    # re-score refine * k candidates exactly (0 = off / FAISS' own k_factor): the float32 pass
    # of the reduced-precision scan, and the k_factor of FAISS refine wrappers (...,RFlat)
    refine: int = 0
    memory_budget: int | None = None  # bytes for the index; None = half the machine's RAM
    nprobe: int | None = None  # IVF lists visited per query (None: about nlist / 16)
    ef_search: int | None = None  # HNSW search breadth (None: 64); raised to k where smaller
    max_train: int = 200_000  # most vectors used to train IVF / PQ
    seed: int = 0  # seed of the training sample

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"unknown device {self.device!r}; expected auto, cpu or gpu")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; expected float32, float16 or bfloat16"
            )
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        for name in ("nprobe", "ef_search", "max_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.factory != "auto":
            object.__setattr__(self, "factory", validate_factory(self.factory, self.metric))


def faiss_metric(metric: str) -> int:
    """The FAISS metric constant for a pinsearch metric name."""
    import faiss

    table = {
        "cosine": faiss.METRIC_INNER_PRODUCT,
        "ip": faiss.METRIC_INNER_PRODUCT,
        "l2": faiss.METRIC_L2,
        "l1": faiss.METRIC_L1,
    }
    if metric not in table:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return table[metric]


# dims to parse factory strings at: divisible by most PQ / OPQ / PCA sizes (2^6 x 15), then
# by 128 and 256 too (2^8 x 15; larger PQ tables, so only when the first does not fit)
_PARSE_DIMS = (960, 3840)


def validate_factory(factory: str, metric: str = "cosine") -> str:
    """Check a factory string without building it.

    Raises:
        ValueError: empty string, an ``IDMap`` prefix (pinsearch keeps ids itself), or a
            quantiser that cannot compute the metric (L1 needs uncompressed vectors).
    """
    text = factory.strip()
    if not text:
        raise ValueError("index factory string is empty")
    if text.upper().startswith("IDMAP"):
        raise ValueError(
            f"factory {factory!r}: drop the IDMap prefix; pinsearch maps ids to pins itself"
        )
    if metric == "l1" and _NOT_L1.search(text):
        raise ValueError(
            f"factory {factory!r}: metric 'l1' needs the raw vectors, searched as they are: "
            "Flat, IVF<n>,Flat or HNSW<M> (no compression, transform or refine step)"
        )
    for name, value, least in _sizes(text):
        if value < least:
            raise ValueError(f"factory {factory!r}: {name} {value} must be at least {least}")
    return text


# what FAISS cannot compute L1 on: codes (PQ, SQ, LSH, residual quantisers, RaBitQ: it aborts),
# transforms (a rotation or PCA keeps L2 and inner products, not L1), refine steps (their
# flat store has no L1: every search fails)
_NOT_L1 = re.compile(r"PQ|SQ|LSH|RQ|RaBitQ|Refine|RFlat|PCA|RR\d|ITQ|L2norm")


def _sizes(text: str) -> Iterator[tuple[str, int, int]]:
    """``(what, value, least)`` of the sizes a factory string gives that FAISS would take
    and then crash, hang or fail every search on (``HNSW1``, ``IVF0``, ``PQ8x0``; an NSG
    graph of fewer than 8 neighbours: FAISS 1.15 built NSG2 to NSG5 of 2,000 random vectors
    for ever, and 6 and 7 leave no margin)."""
    least = {"IVF": 1, "HNSW": 2, "NSG": 8}
    for name, value in re.findall(r"(IVF|HNSW|NSG)(\d+)", text):
        yield f"{name}'s size", int(value), least[name]
    for m, bits in re.findall(r"PQ(\d+)(?:x(\d+))?", text):
        yield "PQ's sub-quantizers", int(m), 1
        if bits:
            yield "PQ's bits", int(bits), 1


@functools.lru_cache(maxsize=64)
def check_factory_syntax(factory: str) -> None:
    """Let FAISS parse a factory string before any work is done (an empty index, nothing
    trained; PQ tables are allocated, so not on every config). Only a parse error is final
    here: a size the string does not fit (PQ7 of 768) shows once the vectors do.

    Raises:
        ValueError: FAISS cannot parse it.
    """
    import faiss

    if factory.strip() == "auto":
        return
    for dim in _PARSE_DIMS:  # a size error at one (PQ128 of 960) may hide a parse error after it
        try:
            faiss.index_factory(dim, factory.strip())
            return
        except RuntimeError as exc:
            if "could not parse" in str(exc):
                raise ValueError(
                    f"FAISS cannot parse index factory {factory!r}; e.g. Flat, IVF1024,Flat, "
                    "IVF4096,PQ64, HNSW32, OPQ16_64,IVF1024,PQ16"
                ) from None


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: about 4 sqrt(n), a power of two, >= 39 per list."""
    if n < 39 * 16:
        return max(1, n // 39)
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def default_memory_budget() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def choose_factory(
    n: int,
    dim: int,
    metric: str = "cosine",
    memory_budget: int | None = None,
    *,
    pq_codes: Collection[int] | None = None,
) -> str:
    """Pick an index type for ``n`` vectors of ``dim`` floats.

    ``pq_codes``: the PQ code sizes (bytes) allowed, e.g. those FAISS-GPU implements; all
    by default.

    Returns:
        ``"Flat"`` for small corpora; ``"IVF{nlist},Flat"`` while raw float32 vectors fit
        the budget; ``"IVF{nlist},PQ{m}"`` with the largest code that fits it otherwise (for
        ``l1``, which FAISS measures on raw vectors only, ``"Flat"`` while those fit).

    Raises:
        ValueError: non-positive sizes, or a budget too small for even 4-byte codes (for
            ``l1``, for the raw vectors).
    """
    if n <= 0 or dim <= 0:
        raise ValueError(f"cannot choose an index for n={n}, dim={dim}")
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    raw = n * dim * 4
    if n <= EXACT_MAX and raw <= budget:
        return "Flat"
    nlist = ivf_nlist(n)
    # Coarse quantiser and list overhead: centroids plus 8 bytes of id per vector.
    overhead = nlist * dim * 4 + n * 8
    if raw * 1.05 + overhead <= budget:
        return f"IVF{nlist},Flat"
    if metric == "l1" and raw <= budget:  # FAISS measures L1 on raw vectors only (Flat,
        return "Flat"  # IVF-Flat, HNSW): an exact scan where IVF-Flat's lists would not fit
    if metric == "l1":
        raise ValueError(
            f"{n} vectors of dim {dim} take {raw} bytes uncompressed, over the memory budget "
            f"of {budget} bytes, and metric 'l1' cannot use compressed (PQ) codes; use metric "
            "cosine or l2, or a larger budget"
        )
    if n < _PQ_TRAIN_MIN:  # (auto would pick what it cannot train)
        raise ValueError(
            f"{n} vectors of dim {dim} take {raw} bytes, over the memory budget of {budget} "
            f"bytes, and are too few to train PQ codes ({_PQ_TRAIN_MIN} at least): use a "
            "larger budget"
        )
    for m in _PQ_CHOICES:
        if pq_codes is not None and m not in pq_codes:
            continue
        if dim % m == 0 and n * m + overhead <= budget:
            return f"IVF{nlist},PQ{m}"
    allowed = [m for m in _PQ_CHOICES if pq_codes is None or m in pq_codes]
    if not any(dim % m == 0 for m in allowed):
        raise ValueError(
            f"{n} vectors of dim {dim} need PQ codes to fit memory budget {budget} bytes, and "
            f"dim {dim} is divisible by none of the PQ sizes {allowed}; give a factory with a "
            "PCA or OPQ step (e.g. 'OPQ64_768,IVF4096,PQ64') or a larger budget"
        )
    raise ValueError(
        f"memory budget {budget} bytes is too small for {n} vectors of dim {dim} "
        "(even 4-byte PQ codes do not fit)"
    )
