"""Labelled pins of a store and their vectors: the inputs every head is trained on.

A label is a pins column (``category``, ``board``, ``user_id``) or any key of the pins'
``extra`` JSON (e.g. a manifest's ``source_label``). Vectors of several backbones joined with
``+`` are concatenated (feature fusion), each block L2-normalised so none dominates.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from pinsearch.store import Store

__all__ = ["LABEL_COLUMNS", "labelled_pins", "load_vectors"]

_logger = logging.getLogger(__name__)

#: Labels read from a pins column; any other label is looked up in ``pins.extra``.
LABEL_COLUMNS = ("category", "board", "user_id")


def _draw_order(seed: int, pin_ids: Sequence[str]) -> np.ndarray:
    """Pins in the order a seeded per-class sample takes them: by a seeded hash of each pin
    id. A pin's rank does not depend on the others, so a pin that leaves the store (an image
    that failed to embed) is replaced by the next one and the rest of the sample stays."""
    salt = f"{seed}\0".encode()
    ranks = [
        int.from_bytes(hashlib.blake2b(salt + str(p).encode(), digest_size=8).digest(), "big")
        for p in pin_ids
    ]
    return np.argsort(np.array(ranks, dtype=np.uint64), kind="stable")


def labelled_pins(
    store: Store,
    label: str = "category",
    *,
    drop: Sequence[str] = (),
    per_class: int | None = None,
    min_per_class: int = 1,
    seed: int = 0,
    context: str = "",
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Pin keys and labels, with dropped and rare labels removed and an optional sample.

    Args:
        store: an open store.
        label: a pins column or a key of ``pins.extra``.
        drop: label values left out.
        per_class: draw at most this many pins per label (seeded; see :func:`_draw_order`).
        min_per_class: labels with fewer pins are left out.
        seed: seed of the per-label draw.
        context: prefix of error messages (e.g. the study's name).

    Returns:
        ``(keys, labels, left_out)`` ordered by pin id; ``left_out`` maps rare labels to counts.

    Raises:
        ValueError: no pin has the label, fewer than 2 labels remain, or ``per_class`` < 1.
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"{context}per_class must be at least 1, got {per_class}")
    con = store.catalog.connection
    if label in LABEL_COLUMNS:  # a fixed column name, never user text
        rows = con.execute(f"SELECT pin_key, {label}, pin_id FROM pins ORDER BY pin_id").fetchall()
    else:
        rows = con.execute(
            "SELECT pin_key, json_extract_string(extra, ?), pin_id FROM pins ORDER BY pin_id",
            [json_pointer(label)],
        ).fetchall()
    keys = np.array([r[0] for r in rows], dtype=np.int64)
    labels = np.array([r[1] if r[1] is not None else "" for r in rows], dtype=object)
    drop = _as_stored(store, label, drop, set(labels.tolist()), context)
    keep = (labels != "") & ~np.isin(labels, list(drop))
    if not keep.any():
        raise ValueError(f"{context}no pin of store {store.root} has a usable label {label!r}")
    ids = [r[2] for r, k in zip(rows, keep) if k]
    keys, labels = keys[keep], labels[keep]
    chosen = []
    for value in sorted(set(labels)):
        idx = np.flatnonzero(labels == value)
        if per_class is not None and len(idx) > per_class:
            idx = np.sort(idx[_draw_order(seed, [ids[i] for i in idx])[:per_class]])
        chosen.append(idx)
    sel = np.sort(np.concatenate(chosen))
    keys, labels = keys[sel], labels[sel].astype(str)
    counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    too_few = {c: n for c, n in counts.items() if n < min_per_class}
    if too_few:
        mask = ~np.isin(labels, list(too_few))
        keys, labels = keys[mask], labels[mask]
    if len(set(labels.tolist())) < 2:
        raise ValueError(
            f"{context}fewer than 2 labels with at least {min_per_class} pins (counts: {counts})"
        )
    return keys, labels, too_few


def _as_stored(
    store: Store, label: str, drop: Sequence[str], present: set[str], context: str
) -> list[str]:
    """Drop values as the catalog holds labels (categories normalised as ingest stores them:
    ``"Women's Fashion"`` is ``womens_fashion``); one that names no label is warned of, but
    for the categories ingest leaves out by default (never in a store indexed so)."""
    from pinsearch.ingest import IngestConfig, normalize_category

    if label == "category":
        drop = [normalize_category(d) or d for d in drop]
    unmatched = sorted(set(drop) - present - set(IngestConfig().drop_categories))
    if unmatched:
        _logger.warning(
            "%sdrop value(s) %s name no %r label of store %s", context, unmatched, label, store.root
        )
    return list(drop)


def load_vectors(
    store: Store, backbone: str, keys: np.ndarray, normalize: bool = False
) -> np.ndarray:
    """Vectors of ``keys`` in that order; ``a+b`` concatenates L2-normalised blocks (fusion).

    Raises:
        ValueError: some pins have no vector for a backbone.
    """
    parts = []
    for name in backbone.split("+"):
        if name not in store.backbones(text_spaces=True):
            raise ValueError(
                f"store {store.root} has no {name!r} vectors (it has {store.backbones()}); "
                f"embed its pins with pinsearch index --store {store.root} --backbone {name}"
            )
        vectors, found = store.vectors(name).load(keys)
        if len(found) != len(keys):
            raise ValueError(
                f"{len(keys) - len(found)} pins have no {name!r} vector; index them first"
            )
        if normalize or "+" in backbone:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        parts.append(vectors)
    return np.hstack(parts) if len(parts) > 1 else parts[0]


def json_pointer(key: str) -> str:
    """The JSON pointer (RFC 6901) of a top-level key, as DuckDB's JSON functions take it:
    any key (``a.b``, ``$x``, ``a/b``) names itself, where a ``$.`` path would parse it."""
    return "/" + key.replace("~", "~0").replace("/", "~1")
