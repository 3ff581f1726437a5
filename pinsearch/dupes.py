"""``pinsearch dupes``: groups of pins that are the same image (re-pins, resized, re-encoded,
cropped, mirrored) or show the same object.

Every pin's ``k`` nearest neighbours come from the backbone's index (batched searches), and
are scored on the stored vectors (exact cosine, whatever the index compresses); pairs at or
above a cosine ``threshold`` are joined into connected groups of near-identical pins. A high
threshold (0.95+) finds copies; a lower one (about 0.85) also gathers photos of the same
object. ``eval/bench.py``'s ``bench_dupes`` measures precision and
recall of the pairs on generated near-copies of real photos.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pinsearch.store import Store
from pinsearch.vectors import unit_rows

__all__ = ["DupeGroup", "DupeReport", "cosine_index", "find_dupes", "near_pairs"]


@dataclass
class DupeGroup:
    """A connected group of near-identical pins."""

    size: int
    min_similarity: float  # the lowest similarity among the group's linked pairs
    boards: int  # distinct boards it spans (re-pins across boards)
    pins: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DupeReport:
    store: str
    backbone: str
    index: str  # the cosine index that proposed the neighbours
    threshold: float
    pins: int
    pairs: int
    groups: list[DupeGroup] = field(default_factory=list)
    pins_in_groups: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: float32 rounding of a cosine: identical vectors score 0.99999994 as often as 1.0, so a
#: score this close below the threshold counts (threshold 1.0 finds every exact copy)
COSINE_SLACK = 1e-5


def cosine_index(store: Store, backbone: str, index: str | None = None) -> str:
    """The index of ``backbone`` that ranks by cosine: ``index`` if given, else the
    backbone's own one if it does, else another of its indexes that does. An inner-product
    index of unit vectors ranks as cosine does.

    Raises:
        ValueError: no such index, or the one named ranks otherwise; no vector to search.
    """
    if len(store.vectors(backbone)) == 0:  # (every pin removed: its indexes went too)
        raise ValueError(f"store {store.root} holds no pin with a {backbone!r} vector")
    unit = bool((store.catalog.get_embedding(backbone) or {}).get("normalize"))

    def ranks_by_cosine(name: str) -> bool:
        metric = (store.catalog.get_index(name) or {}).get("metric")
        return metric == "cosine" or (metric == "ip" and unit)

    names = store.index_names(backbone)
    if index is not None:
        if index not in names:
            raise ValueError(f"no index {index!r} of {backbone!r} in {store.root}; it has {names}")
        if not ranks_by_cosine(index):
            raise ValueError(
                f"dupes need a cosine index; {index!r} is "
                f"{store.catalog.get_index(index)['metric']}"  # type: ignore[index]
            )
        return index
    ordered = sorted(names, key=lambda n: n != backbone)  # the backbone's own first
    for name in ordered:
        if ranks_by_cosine(name):
            return name
    metrics = {n: (store.catalog.get_index(n) or {}).get("metric") for n in names}
    raise ValueError(
        f"dupes need a cosine index; {backbone!r} has {metrics or 'none'}: build one with "
        f"pinsearch index --store {store.root} -b {backbone} --metric cosine --index-name NAME"
    )


def near_pairs(
    store: Store,
    backbone: str,
    threshold: float,
    k: int = 20,
    batch: int = 1024,
    index: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key a, key b, cosine) of every pair with cosine >= threshold among each pin's k nearest
    (found by the index, :func:`cosine_index`, scored on the stored vectors).

    Raises:
        ValueError: the backbone has no index ranking by cosine (or ``index`` does not).
    """
    from pinsearch.search import PinSearcher

    searcher = PinSearcher(store, index=cosine_index(store, backbone, index))
    vs = store.vectors(backbone)
    a, b, s = [], [], []
    for vectors, keys in vs.iter_chunks(batch):  # a chunk of pins at a time, memory-mapped
        _, nbrs = searcher.search_keys(vectors, k + 1)
        # the index proposes, the stored vectors decide: a compressed index's (PQ) scores are
        # off by a few hundredths, enough to lose most pairs near a 0.95 threshold
        flat = nbrs.ravel()
        nbr_vecs, nbr_keys = vs.load(np.unique(flat[flat >= 0]))  # sorted keys, as asked
        if len(nbr_keys) == 0:
            continue
        at = np.minimum(np.searchsorted(nbr_keys, flat), len(nbr_keys) - 1)
        found = (flat >= 0) & (nbr_keys[at] == flat)
        near = unit_rows(nbr_vecs)[at].reshape(*nbrs.shape, -1)
        scores = np.einsum("id,ikd->ik", unit_rows(vectors), near).ravel()
        np.clip(scores, -1.0, 1.0, out=scores)  # (identical vectors: 1.0000001)
        mine = np.repeat(keys, nbrs.shape[1])
        keep = found & (flat != mine) & (scores >= threshold - COSINE_SLACK)
        lo, hi = np.minimum(mine[keep], flat[keep]), np.maximum(mine[keep], flat[keep])
        a.append(lo)
        b.append(hi)
        s.append(scores[keep])
    if not a:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    pairs = np.stack([np.concatenate(a), np.concatenate(b)], axis=1)
    sims = np.concatenate(s)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], sims[first]


def _components(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[tuple[list[int], float]]:
    """Connected groups of the pairs' keys, each with the lowest similarity of its pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(a) == 0:
        return []
    nodes, idx = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = idx[: len(a)], idx[len(a) :]
    graph = coo_matrix((np.ones(len(a)), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    weakest = np.ones(label.max() + 1)
    np.minimum.at(weakest, label[ia], s)
    order = np.argsort(label, kind="stable")
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    return [
        (nodes[group].tolist(), float(weakest[label[group[0]]]))
        for group in np.split(order, bounds)
    ]


def find_dupes(
    store: Store,
    backbone: str | None = None,
    *,
    threshold: float = 0.95,
    k: int = 20,
    index: str | None = None,
) -> DupeReport:
    """Groups of near-duplicate pins (largest first); ``index`` names the cosine index that
    proposes the neighbours (default: :func:`cosine_index`'s choice)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    start = time.perf_counter()
    if index is not None and backbone is None:
        row = store.catalog.get_index(index)
        backbone = row["backbone"] if row is not None else None
        if backbone is not None and "#" in backbone:
            raise ValueError(
                f"index {index!r} holds title vectors; dupes compare images: name an index of "
                f"them: {store.index_names(text_spaces=False)}"
            )
    backbone = store.resolve_backbone(backbone)
    index = cosine_index(store, backbone, index)
    a, b, s = near_pairs(store, backbone, threshold, k, index=index)
    comps = _components(a, b, s)
    meta = store.catalog.pins_by_key(sorted({x for m, _ in comps for x in m}))
    groups = []
    for members, weakest in comps:
        pins = [
            {k_: meta[m][k_] for k_ in ("pin_id", "board", "category", "title", "path")}
            for m in members
            if m in meta
        ]
        groups.append(
            DupeGroup(
                size=len(pins),
                min_similarity=round(weakest, 4),
                boards=len({p["board"] for p in pins}),
                pins=pins,
            )
        )
    groups.sort(key=lambda g: (-g.size, -g.min_similarity))
    return DupeReport(
        store=str(store.root),
        backbone=backbone,
        index=index,
        threshold=threshold,
        pins=len(store.vectors(backbone)),
        pairs=len(a),
        groups=groups,
        pins_in_groups=sum(g.size for g in groups),
        seconds=time.perf_counter() - start,
    )
