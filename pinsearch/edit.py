"""Incremental changes to a store: ``pinsearch add`` and ``pinsearch remove``.

``add`` ingests new pins or boards into an existing store and embeds only what is new, for every
backbone the store has, then updates each index (and title vectors). ``remove`` deletes pins —
by id, by board or by user — with their vectors in every backbone and their index entries
(derived indexes are rebuilt from the remaining vectors, so approximate indexes stay
consistent). Either way, heads trained on the store's backbones are marked stale: their
training data changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.errors import PinNotFoundError
from pinsearch.indexes.pinindex import index_files
from pinsearch.store import Store
from pinsearch.vectors import in_sorted

__all__ = ["AddReport", "RemoveReport", "add_corpus", "remove_pins"]

_logger = logging.getLogger(__name__)


@dataclass
class AddReport:
    """What ``add`` did: the ingest and one index report per backbone."""

    store: str
    corpus: str
    added: int
    skipped: int
    already_present: int
    backbones: list[dict[str, Any]] = field(default_factory=list)
    stale_heads: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RemoveReport:
    """What ``remove`` deleted."""

    store: str
    pins: int
    boards: int
    users: int
    vectors: dict[str, int] = field(default_factory=dict)  # backbone -> vectors removed
    indexes: list[str] = field(default_factory=list)  # updated (or dropped when emptied)
    rebuilt: list[str] = field(default_factory=list)  # of those, rebuilt from the vectors
    stale_heads: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_corpus(
    corpus: str | Path,
    store_path: str | Path,
    *,
    ingest: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    decode: str | None = None,
    cpu_share: float | None = None,
    progress: Any = None,
) -> AddReport:
    """Add a corpus's new pins to an existing store, for every backbone it has.

    Each backbone embeds with the weights, normalisation and dtype of its stored run.

    Raises:
        FileNotFoundError: no store at ``store_path`` (use ``pinsearch index`` to create one).
        ValueError: the store has no backbone yet.
    """
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus, run_settings

    start = time.perf_counter()
    with Store.open(store_path, read_only=True, verify=False) as store:  # the writers verify
        backbones = store.backbones()
        runs = {b: store.catalog.get_embedding(b) or {} for b in backbones}
    if not backbones:
        raise ValueError(f"store {store_path} has no backbone yet; create it with pinsearch index")
    reports = []
    for i, backbone in enumerate(backbones):
        embed = EmbedConfig(
            **run_settings(runs[backbone]),
            device=device,
            **{
                k: v
                for k, v in (
                    ("batch_size", batch_size),
                    ("workers", workers),
                    ("decode", decode),
                    ("cpu_share", cpu_share),
                )
                if v is not None
            },
        )
        reports.append(
            index_corpus(
                corpus if i == 0 else None,
                store_path,
                backbone=backbone,
                ingest=ingest,
                embed=embed,
                progress=progress,
            )
        )
    first = reports[0]
    stale: list[str] = []
    if first.added or any(r.embedded for r in reports):  # (a killed add: pins in, no vectors)
        with Store.open(store_path) as store:
            stale = store.mark_heads_stale(backbones)
    return AddReport(
        store=str(store_path),
        corpus=str(corpus),
        added=first.added,
        skipped=first.skipped,
        already_present=first.already_present,
        backbones=[r.to_dict() for r in reports],
        stale_heads=stale,
        seconds=time.perf_counter() - start,
    )


def _keys_to_remove(
    store: Store, pin_ids: Sequence[str], boards: Sequence[str], users: Sequence[str]
) -> np.ndarray:
    found = store.catalog.keys_for_ids(list(pin_ids))
    missing = sorted(set(pin_ids) - set(found))
    if missing:
        raise PinNotFoundError(
            f"{len(missing)} pin id(s) not in store {store.root}: {missing[:5]}; nothing removed"
        )
    keys = set(found.values())
    for column, values in (("board", boards), ("user_id", users)):
        if not values:
            continue
        known = {
            r["v"]
            for r in store.catalog.query(
                f"SELECT DISTINCT {column} AS v FROM pins WHERE {column} IN (SELECT unnest(?))",
                [list(values)],
            )
        }
        unknown = sorted(set(values) - known)
        if unknown:
            what = "board" if column == "board" else "user"
            raise PinNotFoundError(
                f"no pins of {what}(s) {unknown[:5]} in store {store.root}; nothing removed"
            )
        rows = store.catalog.query(
            f"SELECT pin_key FROM pins WHERE {column} IN (SELECT unnest(?))", [list(values)]
        )
        keys |= {r["pin_key"] for r in rows}
    return np.array(sorted(keys), dtype=np.int64)


def _index_holds_any(store: Store, name: str, keys: np.ndarray) -> bool:
    """Whether index ``name``'s id map names any of ``keys`` (sorted); an unreadable id map
    counts as yes (the index is then rebuilt)."""
    try:
        ids = np.load(index_files(store.index_base(name))["ids"], allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return True
    return bool(in_sorted(keys, ids).any())


def remove_pins(
    store: Store,
    *,
    pin_ids: Sequence[str] = (),
    boards: Sequence[str] = (),
    users: Sequence[str] = (),
) -> RemoveReport:
    """Remove pins (by id, board or user) with their vectors and index entries.

    Order of work: vectors first (each backbone's parts swapped in one transaction), then the
    catalog rows (one transaction), then the derived indexes: their entries removed in place
    where FAISS can (Flat, IVF, PQ, SQ: no retraining, seconds at a million pins), rebuilt
    from the stored vectors otherwise (HNSW, refine, fast-scan). A crash before the
    catalog commit leaves the pins in place with fewer vectors (``pinsearch index`` re-embeds
    them); after it, ``pinsearch repair`` (or the next ``add``/``index``) rebuilds indexes.

    Raises:
        PinNotFoundError: an id, board or user matches nothing (nothing is removed).
        ValueError: nothing was asked.
    """
    if not (pin_ids or boards or users):
        raise ValueError("name pins, boards or users to remove")
    start = time.perf_counter()
    keys = _keys_to_remove(store, pin_ids, boards, users)
    vectors = {}
    for name in store.backbones(text_spaces=True):
        n = store.vectors(name).drop_keys(keys)
        if n:
            vectors[name] = n
    con = store.catalog.connection
    # Boards and users the removed pins belonged to (besides those named): any of them left
    # without pins goes too.
    owners = con.execute(
        "SELECT list(DISTINCT board), list(DISTINCT user_id) FROM pins "
        "WHERE pin_key IN (SELECT unnest(?))",
        [keys.tolist()],
    ).fetchone()
    touched_boards = sorted({*boards, *(b for b in owners[0] or [] if b is not None)})
    touched_users = sorted({*users, *(u for u in owners[1] or [] if u is not None)})
    with store.catalog.transaction():
        gone_ids = [
            r[0]
            for r in con.execute(
                "DELETE FROM pins WHERE pin_key IN (SELECT unnest(?)) RETURNING pin_id",
                [keys.tolist()],
            ).fetchall()
        ]
        gone_boards = [
            r[0]
            for r in con.execute(
                "DELETE FROM boards WHERE (board IN (SELECT unnest(?)) OR user_id IN "
                "(SELECT unnest(?))) AND board NOT IN "
                "(SELECT DISTINCT board FROM pins WHERE board IS NOT NULL) RETURNING board",
                [touched_boards, list(users)],
            ).fetchall()
        ]
        n_boards = len(gone_boards)
        if store.catalog.has_table("clusters"):  # saved cluster runs forget them too
            con.execute(
                "DELETE FROM clusters WHERE (item IN (SELECT unnest(?)) AND run_id IN (SELECT "
                "run_id FROM cluster_runs WHERE level = 'pins')) OR (item IN (SELECT unnest(?)) "
                "AND run_id IN (SELECT run_id FROM cluster_runs WHERE level = 'boards'))",
                [gone_ids, gone_boards],
            )
        n_users = len(
            con.execute(
                "DELETE FROM users WHERE user_id IN (SELECT unnest(?)) AND user_id NOT IN "
                "(SELECT DISTINCT user_id FROM pins WHERE user_id IS NOT NULL) RETURNING user_id",
                [touched_users],
            ).fetchall()
        )
        for name in store.backbones(text_spaces=True):  # (a remove stopped earlier may have
            # dropped vectors without counting them)
            store.catalog.upsert_embedding(name, count=len(store.vectors(name)))
    touched, rebuilt, lost = [], [], set(vectors)
    for row in store.catalog.list_indexes():
        # by what it holds, not by what this run dropped: a remove stopped after its vector
        # step and run again drops no vector, and its indexes still name the pins
        if row["backbone"] not in vectors and not _index_holds_any(store, row["name"], keys):
            continue
        touched.append(row["name"])
        lost.add(row["backbone"])
        emptied = len(store.vectors(row["backbone"])) == 0
        if emptied or not store.remove_from_index(row["name"], keys):
            action = store.rebuild_index(row["name"])  # dropped when emptied
            if action == "rebuilt":
                rebuilt.append(row["name"])
    stale = store.mark_heads_stale(sorted(b for b in lost if "#" not in b))
    return RemoveReport(
        store=str(store.root),
        pins=len(keys),
        boards=n_boards,
        users=n_users,
        vectors=vectors,
        indexes=touched,
        rebuilt=rebuilt,
        stale_heads=stale,
        seconds=time.perf_counter() - start,
    )
