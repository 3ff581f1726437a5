"""A pinsearch store: one folder holding the catalog, the vectors and the indexes.

```
S/store.json            format version and the pinsearch version that created it
S/catalog.duckdb        users, boards, pins, skipped, embeddings, vector_parts, indexes
S/vectors/<backbone>/   part-NNNNNN.npy + part-NNNNNN.keys.npy (source of truth)
S/indexes/<name>.*      .faiss + .ids.npy + .json (derived; rebuildable from the vectors)
S/.lock                 held by the one writer (its PID inside)
S/catalog.readers.duckdb  the catalog as of the last finished write, for readers to open while
                        a writer holds catalog.duckdb (DuckDB allows one writer or readers)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import duckdb
import numpy as np

from pinsearch._version import __version__
from pinsearch.catalog import Catalog
from pinsearch.errors import (
    CatalogError,
    DeviceError,
    IndexFileError,
    StoreLockedError,
    StoreVersionError,
)
from pinsearch.indexes import IndexConfig, PinIndex, build_index, gpu_count, load_index
from pinsearch.indexes.pinindex import (
    file_sha256,
    index_files,
    inside_store,
    replace_durably,
    temp_beside,
)
from pinsearch.vectors import VectorStore, backbone_dirname, in_sorted

__all__ = ["STORE_FORMAT_VERSION", "Store", "StoreInfo"]

_logger = logging.getLogger(__name__)
T = TypeVar("T")

#: 2: vector parts record their key file's SHA-256 (``vector_parts.keys_sha256``). Version 1
#: stores are read as they are and upgraded by their first writer, so a pinsearch that only
#: knows version 1 refuses them cleanly afterwards instead of failing on the new column.
STORE_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_CATALOG = "catalog.duckdb"
_SNAPSHOT = "catalog.readers.duckdb"  # what readers open while a writer holds the catalog
_RETIRED_HEADS = "retired_head_files"  # catalog meta: heads' files the last write replaced
# catalog meta: {name: {backbone, config}} of indexes dropped when their backbone lost every
# vector (all pins removed), built again with those settings when pins come back
_EMPTIED_INDEXES = "emptied_indexes"
_STORE_FILE = "store.json"
# the names of the files pinsearch writes in its folders (the only ones a writer deletes)
_INDEX_FILE = re.compile(r".+\.(faiss|ids\.npy|json)(\.tmp)?")
_HEAD_FILE = re.compile(r".+\.(npz|json)(\.tmp)?")


@dataclass
class StoreInfo:
    """What ``pinsearch info`` reports (its JSON schema is documented in the README)."""

    path: str
    format_version: int
    pinsearch_version: str
    pins: int
    users: int
    boards: int
    categories: list[dict[str, Any]]
    embeddings: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    skipped: int
    skipped_by_reason: list[dict[str, Any]]
    ingests: list[dict[str, Any]] = field(default_factory=list)
    heads: list[dict[str, Any]] = field(default_factory=list)
    top_boards: list[dict[str, Any]] = field(default_factory=list)
    alignments: list[dict[str, Any]] = field(default_factory=list)  # pinsearch align


class _WriteLock:
    """An exclusive ``flock`` on ``S/.lock``; the holder's PID is written inside.

    A forked child (a DataLoader worker) closes its copy of the handle as it starts: the lock
    belongs to the open file, so a worker that outlives its killed writer by a few seconds
    would otherwise hold the store locked in the name of a dead process."""

    _held: ClassVar[set[_WriteLock]] = set()

    def __init__(self, path: Path) -> None:
        self.path = path
        try:  # (not through a link: a store someone sent could point .lock at any file)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreLockedError(f"store {path.parent}: cannot take {path.name}: {exc}") from None
        self._fh = os.fdopen(fd, "r+")
        try:  # a reader's probe (_writer_at_work) holds it shared for a moment: tried again
            _retry(
                lambda: fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB),
                seconds=0.2,
                when=lambda exc: isinstance(exc, BlockingIOError),
            )
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise StoreLockedError(
                f"store {path.parent} is locked by PID {holder}; wait for it to finish"
            ) from None
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(str(os.getpid()))
            self._fh.flush()
        except OSError as exc:  # (a full disk: the lock is let go with the file)
            with contextlib.suppress(OSError):
                self._fh.close()
            raise _disk_error(
                path.parent, f"its lock file {path.name}", exc, "nothing was changed"
            ) from exc
        _WriteLock._held.add(self)

    @classmethod
    def _close_in_child(cls) -> None:
        """Drop a forked child's reference to the locked file: its descriptor is pointed at
        /dev/null (closing it outright would leave the file object a number to close again)."""
        if not cls._held:
            return
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for lock in cls._held:
                    if not lock._fh.closed:
                        os.dup2(null, lock._fh.fileno())
            finally:
                os.close(null)
        cls._held.clear()

    def release(self) -> None:
        if self not in _WriteLock._held:  # never held, or a forked child's copy: closed only
            self._fh.close()
            return
        _WriteLock._held.discard(self)
        if not self._fh.closed:
            self._fh.seek(0)
            self._fh.truncate()  # no stale PID in later error messages
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


class Store:
    """Open with :meth:`Store.open`; use as a context manager to release it."""

    def __init__(self, root: Path, catalog: Catalog, lock: _WriteLock | None) -> None:
        self.root = root
        self.catalog = catalog
        self._lock = lock
        self._indexes: dict[str, PinIndex] = {}
        self._vectors: dict[str, VectorStore] = {}
        self.snapshot = False  # reading the readers' snapshot while a writer works
        self._private: Path | None = None  # a detached reader's own copy of the catalog

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        create: bool = False,
        read_only: bool = False,
        verify: bool = True,
        detach: bool = False,
        wait: float = 10.0,
    ) -> Store:
        """Open (or create) a store.

        Args:
            path: the store folder.
            create: create the store if it does not exist.
            read_only: open for reading; no lock is taken and nothing is written.
            verify: check every index's id map against the catalog (``pinsearch check`` and
                ``repair`` open without it, to report or fix what is wrong).
            detach: (read-only) read a private copy of the catalog, taken as it opens, so that
                a long-running reader (``pinsearch serve``) does not hold the store's catalog
                and writers can open while it runs. It answers from the store as it was when
                opened (indexes load then, vectors are read as needed); the copy goes on
                :meth:`close`.
            wait: (writing) seconds to wait for readers in other processes that hold the
                catalog (a ``pinsearch query``) to close it. Readers that start while a writer
                works read the snapshot, so they do not keep it waiting.

        Raises:
            FileNotFoundError: no store at ``path`` and ``create`` is False.
            StoreVersionError: the store has another format version.
            StoreLockedError: another process is writing to it, or a reader held the catalog
                for longer than ``wait``.
        """
        root = Path(path)
        meta_file = root / _STORE_FILE
        if not meta_file.is_file():
            if not create or read_only:
                raise FileNotFoundError(f"no pinsearch store at {root} (no {_STORE_FILE})")
            if root.exists() and any(root.iterdir()):
                raise FileExistsError(f"{root} exists, is not empty and is not a pinsearch store")
            root.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(
                meta_file,
                {
                    "format": "pinsearch-store",
                    "format_version": STORE_FORMAT_VERSION,
                    "created_by": __version__,
                },
            )
        meta = _read_store_meta(meta_file)
        lock = None if read_only else _WriteLock(root / ".lock")
        snapshot = False
        try:
            if lock is not None:
                _publish_snapshot(root)  # readers see the state before this writer's changes
                if meta["format_version"] != STORE_FORMAT_VERSION:  # before the catalog changes
                    meta = {**meta, "format_version": STORE_FORMAT_VERSION,
                            "upgraded_by": __version__}  # fmt: skip
                    _write_json_atomic(meta_file, meta)
            if lock is not None and (root / (_CATALOG + ".wal")).exists():
                # A crashed writer's log: replayed (opening the catalog) and checkpointed
                # (closing it), then published: readers must see that state before the files
                # it retired are deleted below. (Not while this process holds the catalog:
                # closing any handle of the file would drop DuckDB's lock on it.)
                _open_catalog(root / _CATALOG, wait).close()
                _publish_snapshot(root)
            if read_only:
                catalog, snapshot = _open_for_reading(root)
            else:
                catalog = _open_catalog(root / _CATALOG, wait)
            if detach and read_only:  # copied while this reader holds it: no write under way
                private = _private_copy(Path(catalog.path))
                catalog.close()
                try:
                    catalog = Catalog(private / _CATALOG, read_only=True)
                except BaseException:
                    shutil.rmtree(private, ignore_errors=True)
                    raise
        except Exception as exc:
            if lock is not None:
                lock.release()
            if _locked(exc):
                holder = (
                    f"a reader that did not close it within {wait:g} s (a long-running reader "
                    "should open with detach=True, as pinsearch serve does)"
                    if lock is not None
                    else lock_holder(root)
                )
                raise StoreLockedError(
                    f"store {root} is open in another process: {holder}; DuckDB allows one "
                    f"writer or several readers at a time: {exc}"
                ) from exc
            if damaged(exc):  # (a file cut short, overwritten, not DuckDB's)
                raise catalog_error(root, exc) from exc
            raise
        store = cls(root, catalog, lock)
        store.snapshot = snapshot
        if detach and read_only:
            store._private = Path(catalog.path).parent
        try:
            if not read_only:
                catalog.set_meta("last_written_by", __version__)
                for backbone in store.backbones(text_spaces=True):
                    store.vectors(backbone).remove_orphans()
                for stray in store.stray_index_files():  # a killed save's temporary files
                    stray.unlink()
                store.remove_stray_head_files()
            if verify and not snapshot:  # a snapshot may lag the index files a writer updates
                problems = store._id_map_problems(saves=not read_only)
                if problems and read_only:
                    raise IndexFileError(problems[0][1] + "; pinsearch repair rebuilds it")
                if problems:
                    store._heal_indexes(problems)
        except BaseException as exc:
            store.close()  # the lock goes with it
            if damaged(exc):  # (its pages are read as they are needed)
                raise catalog_error(root, exc) from exc
            raise
        _logger.debug("opened store %s (format %s)", root, meta["format_version"])
        return store

    def close(self) -> None:
        """Close the catalog and release the write lock (a writer first publishes the
        snapshot that readers use while the next writer works)."""
        self.catalog.close()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
        if self._lock is not None:
            try:
                _publish_snapshot(self.root, closing=True)
            finally:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        """True when opened without the write lock."""
        return self._lock is None

    # -- vectors -------------------------------------------------------------------------

    def backbones(self, *, text_spaces: bool = False) -> list[str]:
        """Backbones with an embedding run in this store (and their title spaces
        ``<backbone>#text`` when ``text_spaces``)."""
        names = [r["backbone"] for r in self.catalog.list_embeddings()]
        return names if text_spaces else [n for n in names if "#" not in n]

    def forget_cached(self, name: str) -> None:
        """Drop in-memory handles of a backbone's vectors and an index (after removing them)."""
        self._vectors.pop(name, None)
        self._indexes.pop(name, None)

    def vectors(self, backbone: str) -> VectorStore:
        """The vector store of a backbone (it may be empty)."""
        if backbone not in self._vectors:
            self._vectors[backbone] = VectorStore(self.root, backbone, self.catalog)
        return self._vectors[backbone]

    def resolve_backbone(self, backbone: str | None, *, text_spaces: bool = False) -> str:
        """The given backbone if the store has it; the only one when None. A title space
        (``<backbone>#text``) only with ``text_spaces`` (the store's own uses: its indexes).

        Raises:
            ValueError: unknown backbone, or several and none named.
        """
        if backbone is not None and not text_spaces and "#" in backbone:
            base = backbone.split("#")[0]
            raise ValueError(
                f"{backbone!r} names the title vectors of {base!r}, not a backbone; name {base!r}"
            )
        known = self.backbones()
        if backbone is None:
            if len(known) == 1:
                return known[0]
            if not known:
                raise ValueError(f"store {self.root} has no embeddings yet; run pinsearch index")
            raise ValueError(f"store {self.root} has several backbones {known}; name one")
        if backbone not in known and backbone not in self.backbones(text_spaces=True):
            raise ValueError(f"store {self.root} has no vectors for {backbone!r}; it has {known}")
        return backbone

    # -- indexes -------------------------------------------------------------------------

    def check_index_name(self, name: str) -> None:
        """Refuse a name whose files another index's are (``ivf:1`` and ``ivf_1``).

        Raises:
            ValueError: naming the other index.
        """
        base = self.index_base(name)
        for other in self.index_names():
            if other != name and self.index_base(other) == base:
                raise ValueError(
                    f"index name {name!r} would share its files ({base.name}.*) with index "
                    f"{other!r}; choose another name"
                )

    def stray_index_files(self) -> list[Path]:
        """Files of the index folder no recorded index owns: a killed save's ``.tmp`` files,
        files of an index a crash dropped from the catalog."""
        folder = self.root / "indexes"
        if not folder.is_dir() or not inside_store(self.root, folder):
            return []  # (a folder a link leads out to holds no file of ours to delete)
        bases = [self.index_base(name) for name in self.index_names()]
        owned = {f.name for base in bases for f in index_files(base).values()}
        return sorted(
            f
            for f in folder.iterdir()
            if f.is_file() and f.name not in owned and _INDEX_FILE.fullmatch(f.name)
        )

    def stray_head_files(self) -> list[Path]:
        """Files of the heads folder no head's catalog row names: those of a head trained
        again (kept a while for readers: :meth:`remove_stray_head_files`), of a save that was
        killed."""
        folder = self.root / "heads"
        if not folder.is_dir() or not inside_store(self.root, folder):
            return []  # (a folder a link leads out to holds no file of ours to delete)
        owned = {
            f"{Path(row['file']).name}{ext}"
            for row in self.catalog.query("SELECT file FROM heads")
            for ext in (".npz", ".json")
        }
        return sorted(
            f
            for f in folder.iterdir()
            if f.is_file() and f.name not in owned and _HEAD_FILE.fullmatch(f.name)
        )

    def retire_head_files(self, base: Path) -> None:
        """Note the files of a head a retrain replaced (``base`` + ``.npz``/``.json``): they
        stay, as retired vector parts do, until the second writer after this one opens, for
        readers of the snapshots published before (a head loads when first asked for)."""
        names = json.loads(self.catalog.get_meta(_RETIRED_HEADS) or "[]")
        self.catalog.set_meta(_RETIRED_HEADS, json.dumps([*names, base.name]))

    def remove_stray_head_files(self) -> int:
        """Delete the heads folder's files no row names (:meth:`stray_head_files`) but those
        the last write retired, which the write before's become (as vector parts'); returns
        how many went."""
        last = json.loads(self.catalog.get_meta(_RETIRED_HEADS) or "[]")
        if last or self.catalog.get_meta(_RETIRED_HEADS + "/before"):
            self.catalog.set_meta(_RETIRED_HEADS + "/before", json.dumps(last))
            self.catalog.set_meta(_RETIRED_HEADS, "[]")
        kept = {f"{name}{ext}" for name in last for ext in (".npz", ".json")}
        gone = [f for f in self.stray_head_files() if f.name not in kept]
        for f in gone:
            f.unlink()
        return len(gone)

    def index_base(self, name: str) -> Path:
        """Base path (no extension) of an index's files."""
        return self.root / "indexes" / backbone_dirname(name)

    def build_index(
        self, backbone: str, config: IndexConfig | None = None, *, name: str | None = None
    ) -> PinIndex:
        """(Re)build an index from the stored vectors of ``backbone`` (or a title space)
        and save it."""
        backbone = self.resolve_backbone(backbone, text_spaces=True)
        self.check_index_name(name or backbone)  # before minutes of building
        vectors, keys = self.vectors(backbone).load()
        if len(keys) == 0:
            raise ValueError(f"no stored vectors for {backbone!r}; nothing to index")
        index = build_index(vectors, keys, config, backbone=backbone)
        self.save_index(index, name or backbone)
        return index

    def update_index(self, name: str) -> tuple[PinIndex, int]:
        """Add to an index the stored vectors it does not hold yet (no rebuild; an index
        whose files are damaged, e.g. by a write killed while swapping them, is rebuilt).

        Returns:
            The index and the number of vectors added.
        """
        try:
            index = self.load_index(name)
        except IndexFileError as exc:
            _logger.warning("%s; rebuilding it from the stored vectors", exc)
            before = int((self.catalog.get_index(name) or {}).get("ntotal") or 0)
            self.rebuild_index(name)
            index = self.load_index(name)
            return index, max(index.ntotal - before, 0)
        vs = self.vectors(index.backbone)
        new = np.setdiff1d(vs.keys(), index.ids, assume_unique=True)
        if new.size:
            vectors, keys = vs.load(new)
            on_cpu = False
            try:
                index.add(vectors, keys)
            except DeviceError as exc:  # added, but no room on the GPUs: whole on the CPU
                _logger.warning("index %s: %s; saved from the CPU", name, exc)
                on_cpu = True
            except RuntimeError as exc:  # a type FAISS adds to only once (NSG): built again
                _logger.warning("index %s (%s) takes no more vectors (%s); rebuilding it",
                                name, index.factory, exc)  # fmt: skip
                self.forget_cached(name)
                self.rebuild_index(name)
                return self.load_index(name), int(new.size)
            self.save_index(index, name)
            if on_cpu:
                self.forget_cached(name)  # not kept placed against its settings
        return index, int(new.size)

    def save_index(self, index: PinIndex, name: str) -> None:
        """Write an index's files atomically and record it in the catalog.

        Raises:
            ValueError: another index's name gives the same file name (``ivf:1``, ``ivf_1``).
        """
        base = self.index_base(name)
        self.check_index_name(name)
        meta = index.save(base)
        self.catalog.upsert_index(
            {
                "name": name,
                "backbone": index.backbone,
                "factory": index.factory,
                "metric": index.config.metric,
                "file": base.relative_to(self.root).as_posix() + ".faiss",
                "ntotal": index.ntotal,
                "dim": index.dim,
                "sha256": meta["sha256"]["faiss"],
                "build_seconds": index.build_seconds,
                "config": json.dumps(meta["config"], sort_keys=True),
            }
        )
        self._indexes[name] = index

    def index_names(self, backbone: str | None = None, *, text_spaces: bool = True) -> list[str]:
        """Names of the indexes (of one backbone when given; without those of title spaces,
        ``<backbone>#text``, unless ``text_spaces``: the ones a user can name)."""
        return [
            r["name"]
            for r in self.catalog.list_indexes()
            if (backbone is None or r["backbone"] == backbone)
            and (text_spaces or "#" not in r["backbone"])
        ]

    def load_index(
        self,
        name: str | None = None,
        *,
        backbone: str | None = None,
        config: IndexConfig | Mapping[str, Any] | None = None,
    ) -> PinIndex:
        """Load an index (cached), by name or as the index of a backbone; ``config``: search
        settings over the saved ones (:func:`~pinsearch.indexes.load_index`), loaded afresh.

        Raises:
            IndexFileError: missing or damaged files.
            ValueError: no such index.
        """
        if name is None:
            backbone = self.resolve_backbone(backbone, text_spaces=True)
            names = self.index_names(backbone)
            if not names:
                raise ValueError(f"store {self.root} has no index over {backbone!r}")
            name = backbone if backbone in names else names[0]
        if name in self._indexes and config is None:
            return self._indexes[name]
        row = self.catalog.get_index(name)
        if row is None:
            raise ValueError(
                f"no index {name!r} in {self.root}; it has {self.index_names(text_spaces=False)}"
            )
        index = load_index(self.index_base(name), config=config)
        if index.ntotal != row["ntotal"] and self.snapshot:
            # The writer has updated the index since the snapshot: its files vouch for
            # themselves (checksums), and hits of pins the snapshot does not know are skipped.
            _logger.info(
                "index %s holds %d vectors, snapshot %d", name, index.ntotal, row["ntotal"]
            )
        elif index.ntotal != row["ntotal"]:
            raise IndexFileError(
                f"index {name!r}: the catalog says {row['ntotal']} vectors, the file holds "
                f"{index.ntotal}; pinsearch repair rebuilds it"
            )
        if config is None:  # search-time settings stay with the caller: they must not reach
            self._indexes[name] = index  # later callers, nor the files a writer saves
        return index

    def _id_map_problems(self, *, saves: bool) -> list[tuple[str, str, np.ndarray | None]]:
        """Indexes whose id map does not fit the catalog (checked at open): ``(name, problem,
        stray keys)``, the keys set only when pins the index names are gone (the one problem
        that leaves the index itself whole: a ``remove`` stopped before its index step).
        With ``saves`` (writers, who heal them), also indexes whose files mix two saves;
        readers meet those when the index loads (checksums)."""
        rows = self.catalog.list_indexes()
        if not rows:
            return []
        pin_keys, _ = self.catalog.pin_columns()  # sorted: membership by binary search
        problems: list[tuple[str, str, np.ndarray | None]] = []
        for row in rows:
            name = row["name"]
            files = index_files(self.index_base(name))
            ids_file = files["ids"]
            try:
                ids = np.load(ids_file, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                what = "is missing" if not ids_file.is_file() else f"is unreadable: {exc}"
                problems.append((name, f"index {name!r}: id map {ids_file} {what}", None))
                continue
            if len(ids) != row["ntotal"]:
                problems.append((name, f"index {name!r}: id map has {len(ids)} entries, catalog "
                                 f"says {row['ntotal']}", None))  # fmt: skip
                continue
            if saves and _torn_save(files):
                problems.append((name, f"index {name!r}: its files come from two saves (one was "
                                 "interrupted)", None))  # fmt: skip
                continue
            if saves and _saved_sha256(files["json"]) != row["sha256"]:
                problems.append((name, f"index {name!r}: its files are of a save the catalog "
                                 "did not record (one was interrupted)", None))  # fmt: skip
                continue
            ids = np.sort(ids)  # sorted queries: a cache-friendly binary search (0.1 s at 1M)
            stray = np.unique(ids[~in_sorted(pin_keys, ids)])
            if stray.size:
                problems.append((name, f"index {name!r} refers to {stray.size} pin keys not in "
                                 f"the catalog (e.g. {stray[:3].tolist()})", stray))  # fmt: skip
        return problems

    def _heal_indexes(self, problems: list[tuple[str, str, np.ndarray | None]]) -> None:
        """A writer's recovery from an interrupted write (indexes are derived data): entries
        of removed pins are taken out in place, any other mismatch rebuilds the index from the
        stored vectors with its saved settings; heads of a backbone that lost pins go stale."""
        for name, problem, stray in problems:
            _logger.warning("%s (an interrupted write); recovering it", problem)
            action = self.remove_from_index(name, stray) if stray is not None else ""
            if not action:
                action = self.rebuild_index(name)
            _logger.warning("index %s %s", name, action)
            if stray is not None:
                row = self.catalog.get_index(name)
                self.mark_heads_stale([row["backbone"]] if row else [])

    def rebuild_index(self, name: str) -> str:
        """Rebuild a saved index from its backbone's stored vectors with its saved settings,
        or drop it when none are left. Returns what was done: ``rebuilt`` or ``dropped``."""
        row = self.catalog.get_index(name)
        if row is None:
            raise ValueError(
                f"no index {name!r} in {self.root}; it has {self.index_names(text_spaces=False)}"
            )
        backbone = row["backbone"]
        if backbone not in self.backbones(text_spaces=True) or len(self.vectors(backbone)) == 0:
            with self.catalog.transaction():  # its settings kept for when pins come back
                kept = self._emptied_indexes()
                kept[name] = {"backbone": backbone, "config": json.loads(row["config"])}
                self.catalog.set_meta(_EMPTIED_INDEXES, json.dumps(kept, sort_keys=True))
                self.drop_index(name)
            return "dropped"
        self._build_saved(name, backbone, IndexConfig(**json.loads(row["config"])))
        return "rebuilt"

    def _emptied_indexes(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.catalog.get_meta(_EMPTIED_INDEXES) or "{}")

    def emptied_indexes_of(self, backbone: str) -> dict[str, dict[str, Any]]:
        """``{name: saved settings}`` of the indexes of ``backbone`` a remove of every pin
        dropped, by name."""
        kept = self._emptied_indexes()
        return {n: e["config"] for n, e in sorted(kept.items()) if e["backbone"] == backbone}

    def revive_indexes(self, backbone: str, but: str | None = None) -> list[str]:
        """Build again, with their saved settings, the indexes of ``backbone`` dropped when a
        remove left it no vector (every pin removed), now that it has vectors again; an
        index made since under the same name stands, and index ``but`` (one the caller
        builds with new settings, read first with :meth:`emptied_indexes_of`) is left to
        the caller. Returns the names built."""
        kept = self._emptied_indexes()
        mine = sorted(n for n, e in kept.items() if e["backbone"] == backbone)
        if not mine or len(self.vectors(backbone)) == 0:
            return []
        built = []
        for name in mine:
            if name != but and self.catalog.get_index(name) is None:
                self._build_saved(name, backbone, IndexConfig(**kept[name]["config"]))
                built.append(name)
            del kept[name]
            self.catalog.set_meta(_EMPTIED_INDEXES, json.dumps(kept, sort_keys=True))
        return built

    def _build_saved(self, name: str, backbone: str, config: IndexConfig) -> None:
        """Build index ``name`` from the stored vectors with saved settings (exact search
        when too few are left to train it; the GPU's settings for any device without one)."""
        self.forget_cached(name)
        if config.device == "gpu" and gpu_count() == 0:  # saved for a GPU: none here
            _logger.warning(
                "index %s was built for the GPU; faiss sees none: rebuilt for any", name
            )
            config = dataclasses.replace(config, device="auto")
        try:
            self.build_index(backbone, config, name=name)
        except ValueError as exc:  # too few vectors left to train it: exact search instead
            _logger.warning("index %s: %s; rebuilt as Flat", name, exc)
            self.build_index(backbone, dataclasses.replace(config, factory="Flat"), name=name)

    def remove_from_index(self, name: str, keys: np.ndarray) -> str:
        """Take pins out of a saved index without rebuilding it where FAISS can (Flat, IVF,
        PQ, SQ: no retraining). Returns ``removed``, or ``""`` when it must be rebuilt instead
        (an index type FAISS cannot remove from, or unreadable files); the files on disk are
        left whole either way."""
        try:
            index = self.load_index(name)
        except IndexFileError as exc:
            _logger.warning("index %s: %s; rebuilding it", name, exc)
            return ""
        except DeviceError as exc:  # no room on the GPU: the removal needs none
            _logger.warning("index %s: %s; editing it on the CPU", name, exc)
            index = load_index(self.index_base(name), place=False)
            self._indexes[name] = index
        if not index.removable():
            _logger.info("index %s (%s) cannot remove in place; rebuilding it", name, index.factory)
            return ""
        try:
            try:
                index.remove(keys)
            except DeviceError as exc:  # removed, but no room on the GPU: whole on the CPU
                _logger.warning("index %s: %s; saved from the CPU", name, exc)
                self.save_index(index, name)
                self.forget_cached(name)  # not kept placed against its settings
                return "removed"
            self.save_index(index, name)
        except (RuntimeError, IndexFileError) as exc:  # FAISS refused; the object is not whole
            self.forget_cached(name)
            _logger.warning("index %s (%s): %s; rebuilding it", name, index.factory, exc)
            return ""
        except BaseException:
            self.forget_cached(name)
            raise
        return "removed"

    def index_holds_any(self, name: str, keys: np.ndarray) -> bool:
        """Whether index ``name``'s id map names any of ``keys`` (sorted); an unreadable id
        map counts as yes (the index is then rebuilt)."""
        try:
            ids = np.load(index_files(self.index_base(name))["ids"], allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return True
        return bool(in_sorted(keys, ids).any())

    def renew_entries(self, backbone: str, keys: np.ndarray) -> list[tuple[str, bool]]:
        """Bring every index of a backbone up to its stored vectors after those of ``keys``
        (sorted) were replaced or removed: their entries are taken out where FAISS can (the
        index rebuilt otherwise), then the stored vectors it lacks are added.

        Returns:
            ``(index name, rebuilt)`` for each index.
        """
        out = []
        for name in self.index_names(backbone):
            if self.index_holds_any(name, keys) and not self.remove_from_index(name, keys):
                self.rebuild_index(name)  # from the vectors stored now: the new ones included
                out.append((name, True))
            else:
                self.update_index(name)  # the new vectors in
                out.append((name, False))
        return out

    def drop_index(self, name: str) -> None:
        """Forget an index and delete its files."""
        self.catalog.connection.execute("DELETE FROM indexes WHERE name = ?", [name])
        self.forget_cached(name)
        for f in index_files(self.index_base(name)).values():
            f.unlink(missing_ok=True)

    def mark_heads_stale(self, backbones: list[str], kinds: list[str] | None = None) -> list[str]:
        """Flag the heads trained on these backbones' vectors (of these kinds, e.g.
        ``["zeroshot"]``, when given); returns their names."""
        if not backbones:
            return []
        rows = self.catalog.query(
            "UPDATE heads SET stale = true WHERE backbone IN (SELECT unnest(?)) "
            "AND (? IS NULL OR head IN (SELECT unnest(?))) RETURNING name",
            [list(backbones), kinds, kinds],
        )
        return sorted(r["name"] for r in rows)

    # -- reporting -----------------------------------------------------------------------

    def info(self) -> StoreInfo:
        """Counts per category and board, backbones, indexes and skipped pins."""
        c = self.catalog
        meta = _read_store_meta(self.root / _STORE_FILE)
        embeddings = [
            {
                k: r.get(k)  # amp and decode: None in a read-only catalog from before them
                for k in (
                    "backbone",
                    "dim",
                    "dtype",
                    "normalize",
                    "count",
                    "seconds",
                    "images_per_s",
                    "device",
                    "amp",
                    "decode",
                )
            }
            | {"weights": json.loads(r["spec"] or "{}").get("weights")}
            for r in c.list_embeddings()
        ]
        indexes = [
            {k: r[k] for k in ("name", "backbone", "factory", "metric", "ntotal", "dim")}
            for r in c.list_indexes()
        ]
        return StoreInfo(
            path=str(self.root),
            format_version=int(meta["format_version"]),
            pinsearch_version=__version__,
            pins=c.count_pins(),
            users=int(c.scalar("SELECT count(*) FROM users")),
            boards=int(c.scalar("SELECT count(DISTINCT board) FROM pins")),
            categories=c.query("SELECT * FROM categories ORDER BY pins DESC, category"),
            embeddings=embeddings,
            indexes=indexes,
            skipped=int(c.scalar("SELECT count(*) FROM skipped")),
            skipped_by_reason=c.query(
                "SELECT stage, reason, count(*) AS pins, min(path) AS example FROM skipped "
                "GROUP BY stage, reason ORDER BY pins DESC, reason"
            ),
            ingests=c.query(
                "SELECT ingest_id, corpus, format, found, added, already_present, skipped, "
                "sampled_out FROM ingests ORDER BY ingest_id"
            ),
            heads=c.query(
                "SELECT name, backbone, head, label, n_train, source, stale FROM heads "
                "ORDER BY name"
            ),
            top_boards=c.query(
                "SELECT p.board, any_value(b.name) AS name, any_value(b.category) AS category, "
                "count(*) AS pins FROM pins p LEFT JOIN boards b ON b.board = p.board "
                "GROUP BY p.board ORDER BY pins DESC, p.board LIMIT 20"
            ),
            alignments=self._alignments(),
        )

    def _alignments(self) -> list[dict[str, Any]]:
        if not self.catalog.has_table("alignments"):
            return []
        rows = self.catalog.query(
            "SELECT backbone, text_model, pairs, images, source, metrics FROM alignments "
            "ORDER BY backbone"
        )
        return [{**r, "metrics": json.loads(r["metrics"] or "{}")} for r in rows]


def _torn_save(files: dict[str, Path]) -> bool:
    """Whether an index's files mix two saves (a save killed between its renames).

    A save renames its ``.faiss`` and ``.ids.npy`` into place before the ``.json`` that
    vouches for them, written last; so a data file newer than the JSON is suspect, and only
    then are the checksums read (a whole index at a million pins takes seconds to hash).
    """
    try:
        mtime = {kind: f.stat().st_mtime_ns for kind, f in files.items()}
        if max(mtime["faiss"], mtime["ids"]) <= mtime["json"]:
            return False
        sums = json.loads(files["json"].read_text())["sha256"]
        return any(file_sha256(files[kind]) != sums.get(kind) for kind in ("faiss", "ids"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # missing or unreadable files are reported when the index loads


def catalog_error(root: Path, exc: Exception) -> CatalogError:
    """The error a store whose catalog DuckDB cannot read gives (a file cut short, written
    over, not DuckDB's), with DuckDB's words (which name the file)."""
    return CatalogError(
        f"the catalog of store {root} cannot be read ({type(exc).__name__}: {exc}); if it was "
        f"damaged, restore {_CATALOG} from a copy: the vectors and indexes are read through it"
    )


def _locked(exc: BaseException) -> bool:
    """Whether a DuckDB error says another process holds the file (DuckDB: "Could not set
    lock on file ...: Conflicting lock is held"; not any message with "lock" in it, such as
    a damaged "block")."""
    text = str(exc).lower()
    return isinstance(exc, duckdb.Error) and (
        "could not set lock" in text or "conflicting lock" in text
    )


_NOT_DAMAGE = ("no space left", "disk full", "permission denied", "read-only file system")


def damaged(exc: BaseException) -> bool:
    """Whether a DuckDB error met opening or reading the catalog says the file is damaged:
    not a lock, nor a full disk or a permission (whose own words are clearer, and restoring
    an older copy would lose writes)."""
    text = str(exc).lower()
    return (
        isinstance(exc, duckdb.Error)
        and not _locked(exc)
        and not any(t in text for t in _NOT_DAMAGE)
    )


def _saved_sha256(description: Path) -> str | None:
    """The SHA-256 of the ``.faiss`` file an index description (``.json``) records (None:
    unreadable; the index's load names the problem)."""
    try:
        return str(json.loads(description.read_text())["sha256"]["faiss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish_snapshot(root: Path, *, closing: bool = False) -> None:
    """Copy the catalog to ``catalog.readers.duckdb`` (temporary file + rename) when it is newer.

    Called by the writer, under the write lock, when it opens (before any change) and when it
    closes (``closing``: its changes are saved, an error says so): readers that find the
    catalog held by the writer read this copy — the state of the last finished write. Nothing
    is copied while a write-ahead log is pending (a crashed writer): the next writer replays
    it, and publishes on close.
    """
    catalog, snap = root / _CATALOG, root / _SNAPSHOT
    if not catalog.is_file() or catalog.with_name(catalog.name + ".wal").exists():
        return
    if snap.is_file() and snap.stat().st_mtime_ns >= catalog.stat().st_mtime_ns:
        return
    tmp = temp_beside(snap)
    try:
        shutil.copyfile(catalog, tmp)
        replace_durably(tmp, snap)
    except BaseException as exc:  # (a full disk: no half copy left behind)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            size = catalog.stat().st_size / 2**20
            what = f"the copy of the catalog readers use while a write works ({size:.1f} MiB)"
            outcome = (
                "this write's changes are saved; readers see the store as it was before them "
                "until a writer closes with room for the copy"
                if closing
                else "nothing was changed"
            )
            raise _disk_error(root, what, exc, outcome) from exc
        raise


def _disk_error(root: Path, what: str, exc: OSError, outcome: str) -> OSError:
    """``exc`` of a writer's write of ``what`` named, with its ``outcome``: a full disk says so."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        said = f"no space left on the disk for {what}"
    else:
        said = f"cannot write {what}: {exc.strerror or exc}"
    return OSError(exc.errno, f"store {root}: {said}; {outcome}")


def _private_copy(catalog: Path) -> Path:
    """A folder of its own holding a copy of ``catalog`` (and its write-ahead log, if one is
    pending), named ``catalog.duckdb``."""
    folder = Path(tempfile.mkdtemp(prefix="pinsearch-reader-"))
    try:
        shutil.copyfile(catalog, folder / _CATALOG)
        wal = catalog.with_name(catalog.name + ".wal")
        if wal.is_file():
            shutil.copyfile(wal, folder / (_CATALOG + ".wal"))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


os.register_at_fork(after_in_child=_WriteLock._close_in_child)


def _open_catalog(path: Path, wait: float) -> Catalog:
    """The catalog opened for writing, retried for up to ``wait`` seconds while readers in
    other processes hold it (DuckDB's "Could not set lock on file")."""
    return _retry(
        lambda: Catalog(path),
        seconds=wait,
        when=_locked,
    )


def _open_for_reading(root: Path) -> tuple[Catalog, bool]:
    """(catalog, whether it is the snapshot): the catalog, or the last published snapshot while
    a writer works. A live writer's snapshot is opened without touching the catalog, not even
    for a moment: the writer may be waiting for the catalog's readers to let go."""
    has_snapshot = (root / _SNAPSHOT).is_file()
    if not (has_snapshot or (root / _CATALOG).is_file()):  # (DuckDB would say it in a page)
        if _writer_at_work(root):
            raise StoreLockedError(
                f"store {root} is being created ({lock_holder(root)}); read it when that write "
                "is done"
            )
        raise FileNotFoundError(f"store {root} has no catalog ({_CATALOG}): it is not whole")
    if not (has_snapshot and _writer_at_work(root)):
        try:
            return Catalog(root / _CATALOG, read_only=True), False
        except duckdb.Error as exc:
            locked = _locked(exc) or "configuration" in str(exc).lower()
            if not (locked and has_snapshot):
                raise
    _logger.info("store %s is being written (%s); reading its snapshot", root, lock_holder(root))
    return Catalog(root / _SNAPSHOT, read_only=True), True


def _writer_at_work(root: Path) -> bool:
    """Whether a writer holds ``S/.lock``: asked of the lock itself, by taking it shared for a
    moment (the PID written inside may name a process that is not the writer: a killed
    writer's, reused). A writer that meets the probe tries again (:class:`_WriteLock`)."""
    try:
        fh = (root / ".lock").open("rb")
    except OSError:  # no writer has ever opened the store, or it cannot be read
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without flock: DuckDB's own lock still decides
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _retry(take: Callable[[], T], *, seconds: float, when: Callable[[Exception], bool]) -> T:
    """``take()``, again while it raises an exception ``when`` accepts, for up to ``seconds``
    (pauses from 5 ms, doubling to 0.25 s)."""
    deadline, pause = time.monotonic() + seconds, 0.005
    while True:
        try:
            return take()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not when(exc) or left <= 0:
                raise
            time.sleep(min(pause, left))
            pause = min(2 * pause, 0.25)


def lock_holder(root: Path) -> str:
    """Who holds the write lock, for error messages."""
    try:
        pid = (root / ".lock").read_text().strip()
    except OSError:
        pid = ""
    return f"writer PID {pid}" if pid else "a reader or an unknown writer"


def _read_store_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreVersionError(f"{path} is unreadable: {exc}") from exc
    if meta.get("format") != "pinsearch-store":
        raise StoreVersionError(f"{path} does not describe a pinsearch store")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise StoreVersionError(
            f"store {path.parent} has format version {meta.get('format_version')!r} (written by "
            f"pinsearch {meta.get('created_by') or '(unknown version)'}); this pinsearch "
            f"{__version__} reads versions {', '.join(map(str, _READABLE_VERSIONS))}. "
            "Nothing was changed."
        )
    return meta


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = temp_beside(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    replace_durably(tmp, path)
