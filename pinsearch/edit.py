"""Incremental changes to a store: ``pinsearch add``, ``remove`` and ``refresh``.

``add`` ingests new pins or boards into an existing store and embeds only what is new, for every
backbone the store has, then updates each index (and title vectors). ``remove`` deletes pins —
by id, by board or by user — with their vectors in every backbone and their index entries
(derived indexes are rebuilt from the remaining vectors, so approximate indexes stay
consistent). ``refresh`` re-embeds the pins whose image files changed since they were read.
Each way, heads trained on the store's backbones are marked stale: their training data changed.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.errors import PinNotFoundError
from pinsearch.images import DEFAULT_MAX_PIXELS, ImageError, probe_image
from pinsearch.ingest import IngestConfig, unicode_spellings
from pinsearch.store import Store
from pinsearch.text import refresh_titles, text_candidates, title_work
from pinsearch.vectors import in_sorted

__all__ = [
    "AddReport",
    "RefreshReport",
    "RemoveReport",
    "add_corpus",
    "changed_files",
    "pending_refresh",
    "refresh_store",
    "remove_pins",
    "stat_files",
    "store_rules",
]

_logger = logging.getLogger(__name__)


@dataclass
class AddReport:
    """What ``add`` did: the ingest and one index report per backbone."""

    store: str
    corpus: str
    added: int
    skipped: int
    already_present: int
    rules: dict[str, Any] = field(default_factory=dict)  # the reading rules applied
    updated: int = 0  # of those, pins whose metadata changed (title, category, board, path, ...)
    moved: int = 0  # of those, pins whose image path changed
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


#: The reading rules ``add`` takes from the store's latest ingest unless told otherwise: which
#: categories a store holds, and how its images were checked (not the sampling of one
#: corpus, nor leave to read outside a corpus's root)
INHERITED_RULES = ("drop_categories", "categories", "check_images", "max_pixels")


_REPORTED_RULES = ("categories", "drop_categories", "per_category", "seed")
_ADD_PENDING = "add_pending"  # catalog meta: the first pin key of an add not finished yet


def store_rules(store: Store) -> dict[str, Any]:
    """The :data:`INHERITED_RULES` of the store's latest ingest (empty before any)."""
    rows = store.catalog.query("SELECT config FROM ingests ORDER BY ingest_id DESC LIMIT 1")
    saved = json.loads(rows[0]["config"] or "{}") if rows else {}
    return {
        k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in INHERITED_RULES
    }


def add_corpus(
    corpus: str | Path,
    store_path: str | Path,
    *,
    ingest: IngestConfig | Mapping[str, Any] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    decode: str | None = None,
    cpu_share: float | None = None,
    progress: Any = None,
) -> AddReport:
    """Add a corpus's new pins to an existing store, for every backbone it has.

    The corpus is read by the store's category and image rules (:func:`store_rules`: those of
    its latest ingest), with ``ingest``'s settings over them (a mapping of only those to
    change); a full :class:`~pinsearch.ingest.IngestConfig` is used as it is. Each backbone
    embeds with the weights, normalisation and dtype of its stored run.

    Raises:
        FileNotFoundError: no store at ``store_path`` (use ``pinsearch index`` to create one).
        ValueError: the store has no backbone yet.
    """
    from pinsearch.backbones import check_weights, create_backbone
    from pinsearch.embed import resolve_device
    from pinsearch.pipeline import index_into

    start = time.perf_counter()
    with Store.open(store_path, read_only=True, verify=False) as store:  # the writer verifies
        backbones = store.backbones()
        runs = {b: store.catalog.get_embedding(b) or {} for b in backbones}
        if not isinstance(ingest, IngestConfig):  # (checked here, before any work)
            ingest = IngestConfig(**{**store_rules(store), **(ingest or {})})
    if not backbones:
        raise ValueError(f"store {store_path} has no backbone yet; create it with pinsearch index")
    options = {"batch_size": batch_size, "workers": workers, "decode": decode,
               "cpu_share": cpu_share}  # fmt: skip
    embeds = {b: _run_config(runs[b], device, options) for b in backbones}
    for b in backbones:  # every backbone's weights, before the first embeds
        check_weights(b, embeds[b].weights)
    reports = []
    with Store.open(store_path) as store:  # one writer for the whole add
        # the pins this add stores: from the first key it gives, or the one of an add that
        # stopped before every backbone had embedded its pins (noted in the catalog)
        pending = store.catalog.get_meta(_ADD_PENDING)
        first_new = int(pending or store.catalog.get_meta("next_pin_key") or 0)
        if pending is None:
            store.catalog.set_meta(_ADD_PENDING, str(first_new))
        # a backbone holding some of the pins stored before (a study's per-class sample)
        # embeds the new ones only, not every pin it left out
        every, _ = store.catalog.pin_columns()
        before = int(np.count_nonzero(every < first_new))
        partial = {  # (by the pins stored before: a stopped add's may be embedded already)
            b for b in backbones
            if np.count_nonzero(store.vectors(b).sorted_keys() < first_new) < before
        }  # fmt: skip
        unfinished = len(every) > before  # (pins of the add that stopped: heads go stale)
        try:
            for i, backbone in enumerate(backbones):
                model = create_backbone(
                    backbone, weights=embeds[backbone].weights,
                    device=resolve_device(embeds[backbone].device), run=runs[backbone],
                )  # fmt: skip
                report = index_into(
                    store, corpus if i == 0 else None, model=model, backbone=backbone,
                    ingest=ingest, embed=embeds[backbone], asked={}, progress=progress,
                    only=_pins_for_add(first_new, backbone) if backbone in partial else None,
                )  # fmt: skip
                reports.append(report)
                del model
        except BaseException:
            stored = int(store.catalog.get_meta("next_pin_key") or 0) > first_new
            if pending is None and not stored:  # (stopped before storing a pin)
                store.catalog.delete_meta(_ADD_PENDING)
            raise
        first = reports[0]
        stale = sorted({h for r in reports for h in r.stale_heads})  # (labels changed)
        if first.added or unfinished or any(r.embedded for r in reports):
            stale = sorted({*stale, *store.mark_heads_stale(backbones)})
        store.catalog.delete_meta(_ADD_PENDING)  # every backbone holds this add's pins
    return AddReport(
        store=str(store_path),
        corpus=str(corpus),
        added=first.added,
        skipped=first.skipped,
        already_present=first.already_present,
        rules={k: getattr(ingest, k) for k in _REPORTED_RULES},
        updated=first.updated,
        moved=first.moved,
        backbones=[r.to_dict() for r in reports],
        stale_heads=stale,
        seconds=time.perf_counter() - start,
    )


def _pins_for_add(first: int, backbone: str) -> Any:
    """The pins an ``add`` embeds in a backbone that holds only some of the pins stored before
    (a study's sample; :func:`~pinsearch.pipeline.index_into`'s ``only``): those whose key is
    ``first`` or above (those the add stores), and the stored pins whose image this backbone
    failed to decode before while another backbone holds them (a file fixed since gets its
    vector; one still broken is recorded again)."""
    from pinsearch.embed import failed_to_embed

    def keys(store: Store) -> np.ndarray:
        every, _ = store.catalog.pin_columns()
        return np.union1d(every[every >= first], failed_to_embed(store, backbone))

    return keys


def _run_config(run: dict[str, Any], device: str, options: dict[str, Any]) -> Any:
    """The :class:`~pinsearch.embed.EmbedConfig` that embeds more pins like a stored run (its
    weights, normalisation and dtype) on ``device``, with the throughput ``options`` given
    (None: the default)."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import run_settings

    given = {k: v for k, v in options.items() if v is not None}
    return EmbedConfig(**run_settings(run), device=device, **given)


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
        spelled = {v: unicode_spellings(v) for v in values}  # (as the query filters match)
        wanted = sorted({s for forms in spelled.values() for s in forms})
        known = {
            r["v"]
            for r in store.catalog.query(
                f"SELECT DISTINCT {column} AS v FROM pins WHERE {column} IN (SELECT unnest(?))",
                [wanted],
            )
        }
        unknown = sorted(v for v, forms in spelled.items() if known.isdisjoint(forms))
        if unknown:
            what = "board" if column == "board" else "user"
            raise PinNotFoundError(
                f"no pins of {what}(s) {unknown[:5]} in store {store.root}; nothing removed"
            )
        rows = store.catalog.query(
            f"SELECT pin_key FROM pins WHERE {column} IN (SELECT unnest(?))", [wanted]
        )
        keys |= {r["pin_key"] for r in rows}
    return np.array(sorted(keys), dtype=np.int64)


def remove_pins(
    store: Store,
    *,
    pin_ids: Sequence[str] = (),
    boards: Sequence[str] = (),
    users: Sequence[str] = (),
) -> RemoveReport:
    """Remove pins (by id, board or user) with their vectors and index entries.

    Order of work: every backbone's rewritten vector parts written (each old part checked
    first: a damaged one stops the remove with nothing changed), then one transaction swaps
    them, deletes the pins' rows and marks the heads stale, then the derived indexes: their
    entries removed in place where FAISS can (Flat, IVF, PQ, SQ: no retraining, seconds at a
    million pins), rebuilt from the stored vectors otherwise (HNSW, refine, fast-scan). A
    crash before the commit changes nothing (its new files are removed by the next writer);
    after it, the next writer takes the entries out of the indexes.

    Raises:
        PinNotFoundError: an id, board or user matches nothing (nothing is removed).
        ValueError: nothing was asked.
    """
    if not (pin_ids or boards or users):
        raise ValueError("name pins, boards or users to remove")
    start = time.perf_counter()
    keys = _keys_to_remove(store, pin_ids, boards, users)
    # every backbone's new parts written (every part checked) before any is swapped: a
    # damaged part stops the remove with nothing changed
    plans: dict[str, Any] = {}
    try:
        for name in store.backbones(text_spaces=True):
            plans[name] = store.vectors(name).stage_drop(keys)
        plans = {name: plan for name, plan in plans.items() if plan is not None}
        with store.catalog.transaction():  # the swaps, the pins' rows and the heads at once
            for name, plan in plans.items():
                store.vectors(name).commit_drop(plan)
            # boards and users the removed pins belonged to (besides those named): any of
            # them left without pins goes too
            gone_ids, gone_boards, gone_users = store.catalog.drop_pins(
                keys.tolist(), boards=boards, users=users
            )
            n_boards, n_users = len(gone_boards), len(gone_users)
            store.catalog.forget_cluster_items(gone_ids, gone_boards)
            pending = pending_refresh(store)  # a refresh's note of these pins goes with them
            for name, noted in pending.items():
                _set_pending(store, name, np.setdiff1d(noted, keys).tolist())
            # heads that learnt from these pins (marked here: a remove stopped after this
            # commit finds nothing left to remove, and would not mark them)
            stale = store.mark_heads_stale([n for n in plans if "#" not in n])
    except BaseException:
        for name, plan in plans.items():
            if plan is not None:
                store.vectors(name).discard_drop(plan)
        raise
    for name in plans:
        store.vectors(name).finish_drop()
    vectors = {name: plan.removed for name, plan in plans.items() if plan.removed}
    with store.catalog.transaction():  # (a remove stopped earlier may have dropped vectors
        for name in store.backbones(text_spaces=True):  # without counting them)
            store.catalog.upsert_embedding(name, count=len(store.vectors(name)))
    touched, rebuilt, lost = [], [], set(vectors)
    for row in store.catalog.list_indexes():
        # by what it holds, not by what this run dropped: a remove stopped after its vector
        # step and run again drops no vector, and its indexes still name the pins
        if row["backbone"] not in vectors and not store.index_holds_any(row["name"], keys):
            continue
        touched.append(row["name"])
        lost.add(row["backbone"])
        emptied = len(store.vectors(row["backbone"])) == 0
        if emptied or not store.remove_from_index(row["name"], keys):
            action = store.rebuild_index(row["name"])  # dropped when emptied
            if action == "rebuilt":
                rebuilt.append(row["name"])
    stale = sorted({*stale, *store.mark_heads_stale(sorted(b for b in lost if "#" not in b))})
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


_PLAN_KEY = "refresh_pending"  # catalog meta: {backbone: [pin keys]} whose vectors a refresh
# replaced and whose index entries it has yet to replace
_EXAMPLES = 20  # pins named in a refresh report's lists
_REFRESH_ROUND = 16384  # pins embedded in every backbone before their vectors are swapped
_MISSING_SHARE = 0.5  # remove_missing refuses beyond this share of pins gone (a corpus moved)


@dataclass
class RefreshReport:
    """What ``refresh`` found and did (``dry_run``: found only)."""

    store: str
    pins: int  # pins whose files were looked at
    changed: int  # files changed since they were read (size or modification time)
    refreshed: int  # pins whose changed (or named) file was read again, and embedded again
    # in every backbone that has their vector (their file state recorded)
    pending: int  # pins whose new vectors an interrupted refresh left out of the indexes
    recorded: int  # pins whose file state was recorded for the first time (kept as they are)
    missing: int  # pins whose file is gone (or no longer a file)
    removed: int  # of those, removed (remove_missing)
    unreadable: int  # changed files that do not decode or embed: their pins keep their vectors
    unchanged: int = 0  # of the refreshed, pins whose new vectors equal the stored ones in
    # every backbone (a file touched, copied or checked out as it was): nothing swapped
    titles: int = 0  # title vectors embedded (dry_run: to embed), in every text space: of
    # edited titles no run re-embedded yet, missing, or made by another encoder
    vectors: dict[str, int] = field(default_factory=dict)  # backbone -> vectors replaced
    indexes: list[str] = field(default_factory=list)  # updated
    rebuilt: list[str] = field(default_factory=list)  # of those, rebuilt from the vectors
    stale_heads: list[str] = field(default_factory=list)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # changed, missing,
    # unreadable: the first pins of each ({pin_id, path}, and reason and detail if unreadable)
    dry_run: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def touched(self, index: str, rebuilt: bool = False) -> None:
        """Note an index updated (and rebuilt), once."""
        for names, yes in ((self.indexes, True), (self.rebuilt, rebuilt)):
            if yes and index not in names:
                names.append(index)


def stat_files(paths: Sequence[str], threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each path's size and modification time in ns (int64 arrays; -1 where it is not a
    regular file or cannot be read), a ``stat`` each in ``threads`` threads: they pay where a
    stat waits on a cold or remote disk."""
    chunks = [paths[i : i + 4096] for i in range(0, len(paths), 4096)]  # a future per stat
    # would cost 12x the stats
    with ThreadPoolExecutor(max_workers=threads) as pool:
        states = [s for part in pool.map(_stat_chunk, chunks) for s in part]
    out = np.array(states, dtype=np.int64).reshape(-1, 2)
    return out[:, 0], out[:, 1]


def _stat_chunk(paths: Sequence[str]) -> list[tuple[int, int]]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # (ValueError: a NUL in the path)
            out.append((-1, -1))
            continue
        out.append((st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else (-1, -1))
    return out


def changed_files(states: dict[str, np.ndarray], size: np.ndarray, mtime: np.ndarray) -> np.ndarray:
    """Which pins' files (``Catalog.file_states`` rows, stat as now) differ from the state
    recorded when they were read; pins without a recorded state or a file are not counted."""
    recorded = states["file_size"] >= 0
    return (
        recorded
        & (size >= 0)
        & ((size != states["file_size"]) | (mtime != states["file_mtime_ns"]))
    )


def _shown_size(path: str, max_pixels: int) -> tuple[int, int] | ImageError:
    """An image's shown size from its header, or why it cannot be read (a file whose pixels
    fail to decode is found by the embedding, which leaves its pin as it was)."""
    try:
        info = probe_image(path, max_pixels)
    except ImageError as exc:
        return exc
    return info.width, info.height


def pending_refresh(store: Store) -> dict[str, list[int]]:
    """The pins whose new vectors an interrupted refresh left out of the indexes, by backbone
    (empty when none)."""
    return {b: list(k) for b, k in json.loads(store.catalog.get_meta(_PLAN_KEY) or "{}").items()}


def _set_pending(store: Store, backbone: str, keys: Sequence[int]) -> None:
    plan = pending_refresh(store)
    if len(keys):
        plan[backbone] = sorted({int(k) for k in keys})
    else:
        plan.pop(backbone, None)
    store.catalog.set_meta(_PLAN_KEY, json.dumps(plan))


def refresh_store(
    store_path: str | Path,
    *,
    pin_ids: Sequence[str] = (),
    remove_missing: bool = False,
    dry_run: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    decode: str | None = None,
    cpu_share: float | None = None,
    progress: Any = None,
) -> RefreshReport:
    """Bring a store up to date with its pins' image files.

    Every pin's file is looked at (a ``stat`` each). A pin whose file changed since it was
    read (size or modification time), or that ``pin_ids`` names, is read again: in every
    backbone that has its vector, the new image is embedded (with the run's weights,
    normalisation, dtype and decoding) and its vector replaces the old one, then its entry in
    every index; its width, height and file state are recorded once every backbone took it.
    Heads trained on those backbones are marked stale. A changed file that cannot be read or
    embedded leaves its pin as it was (``unreadable``; the next refresh tries it again). Pins
    stored before pinsearch recorded file states get theirs recorded and keep their vectors.
    Pins whose file is gone are counted, and removed with ``remove_missing`` (refused when
    more than half of the store's are gone: a corpus moved or not mounted).

    Crash-safe: new vectors replace old ones in one transaction per part written, with a note
    of the pins whose index entries are still old; a refresh run after an interrupted one
    puts those in the indexes first, and embeds again the pins whose state was not recorded.

    Raises:
        FileNotFoundError: no store at ``store_path``.
        PinNotFoundError: a pin id in ``pin_ids`` is not in the store (nothing is done).
        ValueError: ``remove_missing`` with most pins' files gone (nothing is done).
    """
    start = time.perf_counter()
    with Store.open(store_path, read_only=dry_run, verify=not dry_run) as store:
        catalog = store.catalog
        states = catalog.file_states()
        found = catalog.keys_for_ids(list(pin_ids))  # (either Unicode spelling, as remove)
        unknown = sorted(set(pin_ids) - set(found))
        if unknown:
            raise PinNotFoundError(
                f"{len(unknown)} pin id(s) not in store {store.root}: {unknown[:5]}; "
                "nothing refreshed"
            )
        options = {"batch_size": batch_size, "workers": workers, "decode": decode,
                   "cpu_share": cpu_share, "max_pixels": max_pixels}  # fmt: skip
        runs = {b: catalog.get_embedding(b) or {} for b in store.backbones()}
        # every backbone's settings built here, so checked before any work
        configs = {b: _run_config(run, device, options) for b, run in runs.items()}
        plan = pending_refresh(store)
        size, mtime = stat_files(states["path"].tolist())
        gone = size < 0
        changed = changed_files(states, size, mtime)
        named = np.isin(states["pin_key"], list(found.values()))
        todo = np.flatnonzero((changed | named) & ~gone)
        first = np.flatnonzero((states["file_size"] < 0) & ~gone & ~named)  # (named: read again)
        with ThreadPoolExecutor(max_workers=8) as pool:
            read = list(pool.map(lambda i: _shown_size(states["path"][i], max_pixels), todo))
        bad = [(int(i), r) for i, r in zip(todo, read) if isinstance(r, ImageError)]
        good = {int(i): r for i, r in zip(todo, read) if not isinstance(r, ImageError)}

        def pin(i: int, **more: str) -> dict[str, str]:
            return {"pin_id": str(states["pin_id"][i]), "path": str(states["path"][i]), **more}

        report = RefreshReport(
            store=str(store.root),
            pins=len(gone),
            changed=int(changed.sum()),
            refreshed=0,
            recorded=len(first),
            missing=int(gone.sum()),
            removed=0,
            unreadable=0,
            pending=len(set().union(*plan.values())),
            examples={
                "changed": [pin(i) for i in np.flatnonzero(changed)[:_EXAMPLES]],
                "missing": [pin(i) for i in np.flatnonzero(gone)[:_EXAMPLES]],
                "unreadable": [],
            },
            dry_run=dry_run,
        )

        def unreadable(i: int, reason: str, detail: str) -> None:
            report.unreadable += 1
            _logger.warning("%s changed and cannot be read: %s: %s", states["path"][i], reason,
                            detail)  # fmt: skip
            if len(report.examples["unreadable"]) < _EXAMPLES:
                report.examples["unreadable"].append(pin(i, reason=reason, detail=detail))

        for i, r in bad:
            unreadable(i, r.reason, r.detail)
        if dry_run:
            report.refreshed = len(good)  # (would be)
            candidates = text_candidates(store)
            report.titles = sum(title_work(store, b, candidates) for b in store.backbones())
            report.seconds = time.perf_counter() - start
            return report
        if remove_missing and gone.any():
            if gone.mean() > _MISSING_SHARE:
                raise ValueError(
                    f"{int(gone.sum())} of {len(gone)} pins' image files are gone (e.g. "
                    f"{states['path'][np.flatnonzero(gone)[0]]}): is the corpus moved or not "
                    "mounted? --remove-missing removes at most half of a store's pins; "
                    "pinsearch remove --board/--user removes more; nothing removed"
                )
            removal = remove_pins(store, pin_ids=states["pin_id"][gone].tolist())
            report.removed = removal.pins
            for name in removal.indexes:
                report.touched(name, name in removal.rebuilt)
            report.stale_heads += removal.stale_heads
        plan = pending_refresh(store)  # (a removal takes its pins out of it)
        for backbone, keys in sorted(plan.items()):  # an interrupted refresh's new vectors
            if backbone in store.backbones():
                _update_indexes(store, backbone, np.asarray(keys, np.int64), report)
                # (their heads were marked with the swap; named here as the run's)
                report.stale_heads += store.mark_heads_stale([backbone]) if len(keys) else []
            _set_pending(store, backbone, [])
        by_key = {int(states["pin_key"][i]): i for i in good}
        wanted = np.array(sorted(by_key), dtype=np.int64)
        held = {b: store.vectors(b).sorted_keys() for b in runs}
        held = {b: k for b, k in held.items() if in_sorted(k, wanted).any()}
        failures, swapped = _reembed(
            store, wanted, {b: (runs[b], configs[b], k) for b, k in held.items()}, progress,
            report,
        )  # fmt: skip
        failed = set(failures)
        for key, (reason, detail) in sorted(failures.items()):
            unreadable(by_key[key], reason, detail)
        for backbone, done in swapped.items():
            if len(done):
                _update_indexes(store, backbone, done, report)
            _set_pending(store, backbone, [])
        refreshed = [i for key, i in by_key.items() if key not in failed]
        report.refreshed = len(refreshed)
        # pins a backbone holds, read again, whose vectors no backbone swapped
        kept = np.unique(np.concatenate([np.empty(0, np.int64), *held.values()]))
        kept = kept[np.isin(kept, wanted) & ~np.isin(kept, list(failed))]
        moved = np.unique(np.concatenate([np.empty(0, np.int64), *swapped.values()]))
        report.unchanged = int((~np.isin(kept, moved)).sum())
        catalog.set_file_states(
            [(int(states["pin_key"][i]), int(size[i]), int(mtime[i]), *good[i]) for i in refreshed]
            + [(int(states["pin_key"][i]), int(size[i]), int(mtime[i]), None, None) for i in first]
        )
        stale = [b for b, n in report.vectors.items() if n]
        report.stale_heads = sorted({*report.stale_heads, *store.mark_heads_stale(stale)})
        # title vectors last: an encoder that cannot load leaves them (with a warning), not
        # the images
        report.titles = refresh_titles(store)
    report.seconds = time.perf_counter() - start
    return report


def _reembed(
    store: Store,
    keys: np.ndarray,
    backbones: dict[str, tuple[dict[str, Any], Any, np.ndarray]],
    progress: Any,
    report: RefreshReport,
) -> tuple[dict[int, tuple[str, str]], dict[str, np.ndarray]]:
    """Embed the new images of ``keys`` in every backbone that holds them (``{backbone: (run,
    its EmbedConfig, its stored keys sorted)}``), a part at a time, and swap the new vectors of
    the pins no backbone failed on for the stored ones: each backbone's swap one transaction,
    committed with the note that those pins' index entries are still old. A pin whose image
    fails in any backbone keeps every vector it has; a new vector equal to the stored one (a
    file touched, copied or checked out unchanged) is not swapped (``report.vectors`` counts
    the swapped).

    Returns:
        The failed pins' ``{key: (reason, detail)}``, and each backbone's swapped keys
        (sorted).
    """
    from pinsearch.backbones import create_backbone
    from pinsearch.embed import iter_embeddings, like_run, resolve_device

    models = {}
    for backbone, (run, config, _) in backbones.items():
        model = create_backbone(backbone, weights=config.weights,
                                device=resolve_device(config.device), run=run)  # fmt: skip
        models[backbone] = (model, like_run(run, model, config))
    mine = {b: keys[in_sorted(held, keys)] for b, (_, _, held) in backbones.items()}
    total, done = sum(len(k) for k in mine.values()), 0
    # pins per round (each backbone's loader started once a round): a part or more
    step = max([_REFRESH_ROUND, *(config.part_size for _, config in models.values())])
    failures: dict[int, tuple[str, str]] = {}
    swapped: dict[str, list[int]] = {b: [] for b in backbones}
    if progress:
        progress(0, total)
    for start in range(0, len(keys), step):
        chunk = keys[start : start + step]
        new: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for backbone, (model, config) in models.items():
            part = chunk[in_sorted(mine[backbone], chunk)]
            got_k, got_v = [], []
            for batch in iter_embeddings(model, store.catalog.pin_paths(part.tolist()), config):
                for key, f in zip(batch.failed_keys, batch.failures):
                    failures.setdefault(int(key), (f.reason, f.detail))
                got_k.append(batch.keys)
                got_v.append(batch.vectors)
                done += len(batch.keys) + len(batch.failed_keys)
                if progress:
                    progress(done, total)
            if got_k:
                new[backbone] = (np.concatenate(got_k), np.concatenate(got_v))
        for backbone, (k, v) in new.items():
            dtype = models[backbone][1].dtype  # (the run's: run_settings)
            ok = ~np.isin(k, list(failures)) & ~_same_vectors(store, backbone, k, v, dtype)
            if not ok.any():
                continue
            noted = [*swapped[backbone], *k[ok].tolist()]
            store.vectors(backbone).replace(
                v[ok], k[ok], dtype, also=lambda b=backbone, n=noted: _swapped(store, b, n)
            )
            swapped[backbone] = noted
    for backbone, keys_done in swapped.items():
        report.vectors[backbone] = len(keys_done)
    return failures, {b: np.sort(np.asarray(k, np.int64)) for b, k in swapped.items()}


def _swapped(store: Store, backbone: str, keys: list[int]) -> None:
    """The catalog writes that go with a swap of ``keys``' vectors (in its transaction): the
    note that their index entries are still old, and the backbone's heads marked stale (a
    refresh stopped after it finds the new vectors stored: as they are, nothing is swapped)."""
    _set_pending(store, backbone, keys)
    store.mark_heads_stale([backbone])


def _same_vectors(
    store: Store, backbone: str, keys: np.ndarray, vectors: np.ndarray, dtype: str
) -> np.ndarray:
    """Which of ``vectors`` (new ones of stored ``keys``) equal the stored ones as they would
    be stored (in ``dtype``), to a relative 1e-5 of each row's largest component."""
    stored, _ = store.vectors(backbone).load(keys)  # (rows in the order asked)
    old = stored.astype(np.float32)
    new = vectors.astype(dtype).astype(np.float32)
    scale = np.maximum(np.abs(old).max(axis=1, keepdims=True), 1e-12)
    tol = 1e-5 * scale
    if np.dtype(dtype).itemsize < 4:  # a rounding flip is one step of the stored type
        tol = np.maximum(tol, 2 * np.spacing(np.abs(stored).astype(dtype)).astype(np.float32))
    return np.all(np.abs(new - old) <= tol, axis=1)


def _update_indexes(store: Store, backbone: str, keys: np.ndarray, report: RefreshReport) -> None:
    """Replace the entries of ``keys`` in every index of the backbone, noted in ``report``."""
    for name, rebuilt in store.renew_entries(backbone, keys):
        report.touched(name, rebuilt)
