"""The DuckDB catalog: users, boards, pins, skipped pins, embedding runs, vector parts, indexes.

Every statement is parameterised; values from users never become SQL text. The schema is
plain SQL so that ``duckdb S/catalog.duckdb`` answers questions about a store directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import duckdb
import numpy as np

from pinsearch.errors import CatalogError
from pinsearch.ingest import IngestResult, PinRecord, SkippedPin, unicode_spellings

__all__ = ["PIN_COLUMNS", "SCHEMA_VERSION", "Catalog", "Ingested", "StoredChanges"]

_logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def recorded_file(root: Path, rel: object, folder: str, what: str) -> Path:
    """The store file a catalog row names: ``folder/NAME`` under the store ``root``.

    Raises:
        CatalogError: the row names anything else (a path out of the folder or the store, a
            device): the catalog was altered, and no file of it is opened.
    """
    parts = PurePosixPath(str(rel)).parts
    if len(parts) != 2 or parts[0] != folder or parts[1] in (".", ".."):
        raise CatalogError(
            f"the catalog's {what} names the file {rel!r}, not one in the store's {folder}/ "
            "folder: the catalog was altered; pinsearch check names it, pinsearch repair "
            "forgets it"
        )
    return Path(root) / folder / parts[1]


#: Columns returned for a pin by :meth:`Catalog.pins_by_key`, in order.
PIN_COLUMNS = (
    "pin_key",
    "pin_id",
    "title",
    "description",
    "board",
    "board_name",
    "user_id",
    "category",
    "path",
    "link",
    "width",
    "height",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS users (user_id VARCHAR PRIMARY KEY);
CREATE TABLE IF NOT EXISTS boards (
    board VARCHAR PRIMARY KEY,      -- "user/board" (tree) or the category (image folder)
    user_id VARCHAR,
    name VARCHAR,
    category VARCHAR,
    description VARCHAR
);
CREATE TABLE IF NOT EXISTS pins (
    pin_key BIGINT PRIMARY KEY,     -- the FAISS id of the pin in every index
    pin_id VARCHAR NOT NULL UNIQUE,
    board VARCHAR,
    user_id VARCHAR,
    category VARCHAR,
    title VARCHAR,
    description VARCHAR,
    link VARCHAR,
    path VARCHAR,
    width INTEGER,
    height INTEGER,
    ingest_id INTEGER,
    extra VARCHAR,                  -- JSON object: other pin.json keys / manifest columns
    file_size BIGINT,               -- the image file's size and modification time when it was
    file_mtime_ns BIGINT            -- read (NULL: not recorded); pinsearch refresh compares them
);
CREATE TABLE IF NOT EXISTS skipped (
    pin_id VARCHAR,
    path VARCHAR,
    stage VARCHAR,                  -- ingest (reading/probing) or embed (decoding)
    reason VARCHAR,
    detail VARCHAR,
    backbone VARCHAR,
    ingest_id INTEGER,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS ingests (
    ingest_id INTEGER PRIMARY KEY,
    corpus VARCHAR,
    format VARCHAR,
    config VARCHAR,                 -- JSON of the IngestConfig
    found INTEGER,
    added INTEGER,
    already_present INTEGER,
    skipped INTEGER,
    sampled_out INTEGER,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS embeddings (
    backbone VARCHAR PRIMARY KEY,
    spec VARCHAR,                   -- JSON: the backbone spec and resolved weights
    preprocess VARCHAR,             -- JSON: input size, mean, std, interpolation, crop
    dim INTEGER,
    dtype VARCHAR,
    normalize BOOLEAN,
    count BIGINT,
    seconds DOUBLE,
    images_per_s DOUBLE,
    device VARCHAR,
    amp BOOLEAN,                    -- the latest vectors came from bf16 autocast (on CUDA)
    decode VARCHAR,                 -- where their JPEGs were decoded: device or pil
    pinsearch_version VARCHAR,
    created TIMESTAMP,
    updated TIMESTAMP
);
CREATE TABLE IF NOT EXISTS vector_parts (
    backbone VARCHAR,
    part INTEGER,
    file VARCHAR,                   -- relative to the store
    n INTEGER,
    sha256 VARCHAR,                 -- of the vectors file
    keys_sha256 VARCHAR,            -- of the key file (NULL in parts written before it was kept)
    PRIMARY KEY (backbone, part)
);
CREATE TABLE IF NOT EXISTS indexes (
    name VARCHAR PRIMARY KEY,
    backbone VARCHAR,
    factory VARCHAR,
    metric VARCHAR,
    file VARCHAR,
    ntotal BIGINT,
    dim INTEGER,
    sha256 VARCHAR,
    build_seconds DOUBLE,
    config VARCHAR,
    built_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS heads (
    name VARCHAR PRIMARY KEY,
    backbone VARCHAR,
    head VARCHAR,                   -- registry name: knn, lsvm, mlp, ...
    params VARCHAR,                 -- JSON hyperparameters
    label VARCHAR,                  -- category, or a key of pins.extra
    classes VARCHAR,                -- JSON list
    n_train INTEGER,
    file VARCHAR,                   -- base path of .json + .npz, relative to the store
    normalize BOOLEAN,
    source VARCHAR,                 -- train, or study:<name>
    created_at TIMESTAMP,
    stale BOOLEAN                   -- training data changed since
);
CREATE OR REPLACE VIEW categories AS
    SELECT category, count(*) AS pins, count(DISTINCT board) AS boards,
           count(DISTINCT user_id) AS users
    FROM pins GROUP BY category;
"""


# Columns written in bulk by Catalog.insert_rows: (name, type), in the rows' order.
_USER_COLUMNS = (("user_id", "str"),)
_BOARD_COLUMNS = (
    ("board", "str"), ("user_id", "str"), ("name", "str"), ("category", "str"),
    ("description", "str"),
)  # fmt: skip
_PIN_COLUMNS = (
    ("pin_key", "int64"), ("pin_id", "str"), ("board", "str"), ("user_id", "str"),
    ("category", "str"), ("title", "str"), ("description", "str"), ("link", "str"),
    ("path", "str"), ("width", "int32"), ("height", "int32"), ("ingest_id", "int32"),
    ("extra", "str"), ("file_size", "int64"), ("file_mtime_ns", "int64"),
)  # fmt: skip
_FILE_STATE = ("pin_key", "file_size", "file_mtime_ns")
# A stored pin's fields an ingest reads again (Catalog.add_ingest), in _pin_row's types
_STORED_COLUMNS = (
    ("board", "str"), ("user_id", "str"), ("category", "str"), ("title", "str"),
    ("description", "str"), ("link", "str"), ("path", "str"), ("extra", "str"),
)  # fmt: skip
_TITLES_KEY = "titles_pending"  # meta: keys of pins whose title vectors are of an old title
_SKIPPED_COLUMNS = (
    ("pin_id", "str"), ("path", "str"), ("stage", "str"), ("reason", "str"),
    ("detail", "str"), ("backbone", "str"), ("ingest_id", "int32"),
    ("created_at", "timestamp"),
)  # fmt: skip


@dataclass(frozen=True)
class StoredChanges:
    """What an ingest changed in the pins and boards it found stored already."""

    pins: list[str] = field(default_factory=list)  # ids of pins whose metadata changed
    moved: int = 0  # of those, pins whose image path changed (their corpus moved)
    retitled: list[int] = field(default_factory=list)  # keys of pins whose title or
    # description changed (their title vectors are of the old text)
    labels: list[str] = field(default_factory=list)  # label fields changed in some pin:
    # category, board, user_id and keys of the extra fields (heads learning them are stale)
    boards: list[str] = field(default_factory=list)  # boards whose pins, category, owner,
    # name or description changed
    paths: list[str] = field(default_factory=list)  # the new paths of the moved pins
    stale_heads: list[str] = field(default_factory=list)  # heads marked stale: their label
    # changed in some pin


class Ingested(NamedTuple):
    """What :meth:`Catalog.add_ingest` stored."""

    ingest_id: int
    added: int  # new pins
    changes: StoredChanges  # in pins stored before


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Catalog:
    """A connection to a store's ``catalog.duckdb``.

    Args:
        path: the DuckDB file.
        read_only: open without write access (several readers may share the file).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        # (absolute: DuckDB reads a path starting ":memory:" or "md:" as no file at all)
        self._con = duckdb.connect(str(self.path.absolute()), read_only=read_only)
        self._columns: dict[tuple[str, str], bool] = {}  # has_column's answers
        if not read_only:
            self._con.execute(_SCHEMA)
            # Added after schema version 1 shipped: catalogs from before get it on first write.
            self._con.execute(
                "ALTER TABLE vector_parts ADD COLUMN IF NOT EXISTS keys_sha256 VARCHAR"
            )
            self._con.execute("ALTER TABLE embeddings ADD COLUMN IF NOT EXISTS amp BOOLEAN")
            self._con.execute("ALTER TABLE embeddings ADD COLUMN IF NOT EXISTS decode VARCHAR")
            for column in ("file_size", "file_mtime_ns"):
                self._con.execute(f"ALTER TABLE pins ADD COLUMN IF NOT EXISTS {column} BIGINT")
            if self.get_meta("schema_version") is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._con is not None:
            self._con.close()
            self._con = None  # type: ignore[assignment]

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection, for ad-hoc SQL (``store.catalog.connection.sql(...)``)."""
        return self._con

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a parameterised query and return rows as dicts."""
        cur = self._con.execute(sql, list(params))
        cols = [d[0] for d in cur.description or []]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run a parameterised query returning one value."""
        rows = self._con.execute(sql, list(params)).fetchall()  # read whole: none left open
        return rows[0][0] if rows else None

    def has_table(self, name: str) -> bool:
        """Whether a table exists (tables of later features are created on first use)."""
        return bool(
            self.scalar(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
            )
        )

    def transaction(self) -> _Transaction:
        """``with catalog.transaction(): ...`` commits on success, rolls back on error."""
        return _Transaction(self._con)

    def get_meta(self, key: str) -> str | None:
        """A value of the ``meta`` table, or None."""
        return self.scalar("SELECT value FROM meta WHERE key = ?", [key])

    def set_meta(self, key: str, value: str) -> None:
        """Insert or replace a value of the ``meta`` table."""
        self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    def delete_meta(self, key: str) -> None:
        """Remove a value of the ``meta`` table (none: nothing to do)."""
        self._con.execute("DELETE FROM meta WHERE key = ?", [key])

    # -- pins -----------------------------------------------------------------------------

    def pin_ids(self) -> set[str]:
        """Every stored pin id."""
        return {r[0] for r in self._con.execute("SELECT pin_id FROM pins").fetchall()}

    def pin_id_paths(self) -> dict[str, str]:
        """Every stored pin id with its image's path."""
        return dict(self._con.execute("SELECT pin_id, path FROM pins").fetchall())

    def count_pins(self) -> int:
        """Number of stored pins."""
        return int(self.scalar("SELECT count(*) FROM pins"))

    def add_boards(self, boards: Iterable[PinRecord]) -> None:
        """Insert boards in one columnar write, each given by a pin record of it (board id,
        user, name, category, description); boards already stored are kept as they are."""
        rows = [_board_row(b) for b in boards]
        self.insert_rows("boards", _BOARD_COLUMNS, rows, keep_existing=True)

    def _board_categories(self, boards: Sequence[str]) -> None:
        """Set each of ``boards``' category to its stored pins' most common one (ties: the
        category of its first pin): a board a later ingest adds pins of another category to
        follows them, as one ingest's board does (:func:`pinsearch.ingest._board_records`)."""
        if not boards:
            return
        self._con.execute(
            "WITH c AS (SELECT board, category, count(*) AS n, min(pin_key) AS first FROM pins "
            "WHERE board IN (SELECT unnest(?)) GROUP BY board, category), "
            "best AS (SELECT board, category FROM (SELECT *, row_number() OVER (PARTITION BY "
            "board ORDER BY n DESC, first) AS r FROM c) WHERE r = 1) "
            "UPDATE boards SET category = best.category FROM best WHERE boards.board = best.board",
            [list(boards)],
        )

    def add_ingest(self, result: IngestResult, config_json: str) -> Ingested:
        """Store the pins, boards, users and skipped pins of an ingest in one transaction, and
        the metadata of the pins stored before as read now (``result.stored``: title,
        description, link, category, board, user, extra fields, path), with the boards' names
        and descriptions; a pin whose title or description changed is noted for its title
        vectors (:meth:`titles_pending`).

        Returns:
            ``(ingest_id, added, changes)``.
        """
        with self.transaction():
            ingest_id = int(self.scalar("SELECT coalesce(max(ingest_id), 0) + 1 FROM ingests"))
            next_key = int(self.get_meta("next_pin_key") or 0)
            read = [*result.pins, *result.stored]
            users = sorted({p.user for p in read if p.user})
            self.insert_rows("users", _USER_COLUMNS, [[u] for u in users], keep_existing=True)
            boards = _board_names(read, result.boards)
            # boards stored before take pins now: their category is their pins' again (a new
            # board's is its pins' already: ingest._board_records)
            grown = [
                r[0]
                for r in self._con.execute(
                    "SELECT board FROM boards WHERE board IN (SELECT unnest(?))",
                    [sorted(result.boards)],
                ).fetchall()
            ]
            self.add_boards(boards.values())
            rows = [_pin_row(p, next_key + i, ingest_id) for i, p in enumerate(result.pins)]
            self.insert_rows("pins", _PIN_COLUMNS, rows)
            changes, left = self._update_stored(result.stored)
            renamed = self._update_boards(boards.values())
            self._board_categories(sorted({*grown, *left[0], *changes.boards}))
            self.forget_cluster_items([], self._drop_empty(left[0], left[1])[0])
            # heads that learnt a changed label, marked in this transaction: a run killed
            # later finds the rows as read and would not see the change again
            stale = self.query(
                "UPDATE heads SET stale = true WHERE label IN (SELECT unnest(?)) RETURNING name",
                [changes.labels],
            )
            changes = replace(changes, boards=sorted({*changes.boards, *renamed}),
                              stale_heads=sorted(r["name"] for r in stale))  # fmt: skip
            if changes.retitled:
                self.set_meta(_TITLES_KEY, json.dumps(sorted({*self.titles_pending(),
                                                              *changes.retitled})))  # fmt: skip
            self.set_meta("next_pin_key", str(next_key + len(rows)))
            # files skipped by an earlier run (any stage) and stored now: fixed since, or a
            # copy that is a stored pin's image now its first is gone
            self._con.execute(
                "DELETE FROM skipped WHERE path IN (SELECT path FROM pins WHERE ingest_id = ?) "
                "OR path IN (SELECT unnest(?))",
                [ingest_id, changes.paths],
            )
            # reading a pin skipped before went well this time (a board.json mended, an
            # image put back in its folder): the reasons recorded at its file, or at its
            # folder under its id, are gone (another file's, a duplicate's, stay)
            self._forget_read_well(read)
            self.add_skipped(result.skipped, ingest_id=ingest_id)
            self._con.execute(
                "INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    ingest_id,
                    str(result.root),
                    result.format,
                    config_json,
                    result.found,
                    len(rows),
                    result.already_present,
                    len(result.skipped),
                    result.sampled_out,
                    _now(),
                ],
            )
        return Ingested(ingest_id, len(rows), changes)

    def _forget_read_well(self, read: Sequence[PinRecord]) -> None:
        """Delete the reading's skipped rows of pins read well now: those at a pin's file, or
        at its folder under its id. Matched here against the (few) rows recorded, so a clean
        corpus of a million pins costs one small query."""
        old = self._con.execute(
            "SELECT pin_id, path FROM skipped WHERE stage = 'ingest'"
        ).fetchall()
        if not old:
            return
        paths = {path for _, path in old}
        folders = {(pin_id, path) for pin_id, path in old if pin_id is not None}
        ids = {pin_id for pin_id, _ in folders}
        at_file, at_folder = [], []
        for p in read:
            path = str(p.path)
            if path in paths:
                at_file.append(path)
            if p.pin_id in ids and (p.pin_id, os.path.dirname(path)) in folders:
                at_folder.append(f"{p.pin_id}/{os.path.dirname(path)}")
        if at_file or at_folder:
            self._con.execute(
                "DELETE FROM skipped WHERE stage = 'ingest' AND (path IN (SELECT unnest(?)) "
                "OR pin_id || '/' || path IN (SELECT unnest(?)))",
                [at_file, at_folder],
            )

    def _update_stored(
        self, records: Sequence[PinRecord]
    ) -> tuple[StoredChanges, tuple[list[str], list[str]]]:
        """Write the metadata of stored pins as read now where it differs (NULL and empty
        text are the same; extra fields compared as objects).

        Returns:
            What changed, and the boards and users the changed pins were in before.
        """
        if not records:
            return StoredChanges(), ([], [])
        names = [n for n, _ in _STORED_COLUMNS]
        read = [
            [p.pin_id, p.board, p.user, p.category, p.title, p.description, p.link, str(p.path),
             json.dumps(dict(p.extra)) if p.extra else None]
            for p in records
        ]  # fmt: skip
        with self._rows_view("_read_pins", (("pin_id", "str"), *_STORED_COLUMNS), read) as view:
            found = self._con.execute(
                f"SELECT p.pin_key, {', '.join(f'p.{n}' for n in names)}, "
                f"{', '.join(f'v.{n}' for n in names)} FROM pins p JOIN {view} v "
                f"USING (pin_id) WHERE {_differs('p', 'v', names)} ORDER BY p.pin_key"
            ).fetchall()
        rows, ids, retitled, labels, boards = [], [], [], set(), set()
        old_boards, old_users, paths = set(), set(), []
        for key, *both in found:
            old = dict(zip(names, both[: len(names)]))
            new = dict(zip(names, both[len(names) :]))
            was, now = (json.loads(d["extra"] or "{}") for d in (old, new))
            fields = {n for n in names if n != "extra" and (old[n] or "") != (new[n] or "")}
            extra = {k for k in {*was, *now} if was.get(k) != now.get(k)}
            if not fields and not extra:  # the same extra fields in another order
                continue
            rows.append([key, *(new[n] for n in names)])
            retitled += [key] if fields & {"title", "description"} else []
            labels |= extra | ({"category", "board", "user_id"} & fields)
            paths += [new["path"]] if "path" in fields else []
            if fields & {"board", "user_id", "category"}:
                boards |= {b for b in (old["board"], new["board"]) if b is not None}
            if fields & {"board", "user_id"}:
                old_boards.add(old["board"])
                old_users.add(old["user_id"])
        if rows:
            with self._rows_view("_changed_pins", (("pin_key", "int64"), *_STORED_COLUMNS),
                                 rows) as view:  # fmt: skip
                sets = ", ".join(f"{n} = v.{n}" for n in names)
                self._con.execute(
                    f"UPDATE pins SET {sets} FROM {view} v WHERE pins.pin_key = v.pin_key"
                ).fetchall()
            ids = [r[0] for r in self._con.execute(
                "SELECT pin_id FROM pins WHERE pin_key IN (SELECT unnest(?)) ORDER BY pin_key",
                [[r[0] for r in rows]],
            ).fetchall()]  # fmt: skip
        changes = StoredChanges(ids, len(paths), retitled, sorted(labels), sorted(boards), paths)
        return changes, (sorted(b for b in old_boards if b), sorted(u for u in old_users if u))

    def _update_boards(self, boards: Iterable[PinRecord]) -> list[str]:
        """Give stored boards the owner, name and description read now; returns those
        changed."""
        rows = [[b.board, b.user, b.board_name, b.board_description] for b in boards]
        if not rows:
            return []
        cols = (("board", "str"), ("user_id", "str"), ("name", "str"), ("description", "str"))
        with self._rows_view("_read_boards", cols, rows) as view:
            changed = self._con.execute(
                f"UPDATE boards SET user_id = v.user_id, name = v.name, "
                f"description = v.description FROM {view} v WHERE boards.board = v.board AND "
                f"({_differs('boards', 'v', ('user_id', 'name', 'description'))}) "
                "RETURNING boards.board"
            ).fetchall()
        return sorted(r[0] for r in changed)

    def titles_pending(self) -> list[int]:
        """Keys of pins whose title or description changed since their title vectors were
        embedded (:func:`pinsearch.edit.refresh_titles` embeds them again)."""
        return [int(k) for k in json.loads(self.get_meta(_TITLES_KEY) or "[]")]

    def clear_titles_pending(self, keys: Sequence[int]) -> None:
        """Forget ``keys`` from :meth:`titles_pending` (their title vectors are new now)."""
        done = {int(k) for k in keys}
        self.set_meta(_TITLES_KEY, json.dumps([k for k in self.titles_pending() if k not in done]))

    def insert_rows(
        self,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        *,
        keep_existing: bool = False,
    ) -> None:
        """Insert rows (values in ``columns`` order: ``(name, type)``, the type ``str``,
        ``int32``, ``int64`` or ``timestamp``) in one columnar statement through Arrow;
        DuckDB's ``executemany`` takes about 1.4 ms a row (7 s for 5,000 boards).
        ``keep_existing``: rows whose key is stored already are left out."""
        if not rows:
            return
        names = ", ".join(name for name, _ in columns)
        with self._rows_view(f"_new_{table}", columns, rows) as view:
            self._con.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM {view}"
                + (" ON CONFLICT DO NOTHING" if keep_existing else "")
            ).fetchall()  # its count, read: DuckDB keeps the view in use until it is

    @contextlib.contextmanager
    def _rows_view(
        self, view: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]
    ) -> Iterator[str]:
        """``rows`` as a DuckDB view of ``columns`` (an Arrow table) while the block runs."""
        import pyarrow as pa

        types = {"str": pa.string(), "int32": pa.int32(), "int64": pa.int64(),
                 "timestamp": pa.timestamp("us")}  # fmt: skip

        def column(values: Sequence[Any], kind: str) -> Any:
            try:
                return pa.array(values, type=types[kind])
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                if kind != "str":
                    raise
                # another type in a text column (a number): its text, as executemany wrote it
                return pa.array([None if v is None else str(v) for v in values], pa.string())

        data = pa.table({name: column(col, kind) for (name, kind), col in zip(columns, zip(*rows))})
        self._con.register(view, data)
        try:
            yield view
        finally:
            # in a transaction a statement aborted, this fails too (the rollback drops the
            # view anyway): the statement's own error is the one to see
            with contextlib.suppress(duckdb.TransactionException):
                self._con.unregister(view)

    def add_skipped(
        self,
        skipped: Iterable[SkippedPin],
        *,
        ingest_id: int | None = None,
        backbone: str | None = None,
    ) -> None:
        """Record skipped pins: one row per file, stage and backbone (the latest reason), so
        indexing the same corpus again does not count its skipped files again."""
        now = _now()
        rows = [
            [s.pin_id, s.path, s.stage, s.reason, s.detail, backbone, ingest_id, now]
            for s in skipped
        ]
        if not rows:
            return
        for stage in sorted({r[2] for r in rows}):
            self._con.execute(
                "DELETE FROM skipped WHERE stage = ? AND backbone IS NOT DISTINCT FROM ? AND "
                "coalesce(nullif(path, ''), pin_id) IN (SELECT unnest(?))",  # file, else pin id
                [stage, backbone, [r[1] or r[0] for r in rows if r[2] == stage]],
            )
        self.insert_rows("skipped", _SKIPPED_COLUMNS, rows)

    def pin_columns(self, *names: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every pin's key (int64, sorted) and the named text columns of ``pins`` as str
        arrays in that order, read as columns: a million pins without a row object each."""
        self._known_columns("pins", names)
        sql = f"SELECT {', '.join(('pin_key', *names))} FROM pins ORDER BY pin_key"
        cols = self._con.execute(sql).fetchnumpy()
        keys = np.asarray(cols["pin_key"], dtype=np.int64)
        return keys, {n: np.asarray(cols[n], dtype=object).astype(str) for n in names}

    def pin_paths(self, keys: Sequence[int] | None = None) -> list[tuple[int, str]]:
        """``(pin_key, path)`` of the given pins (all pins when None), ordered by key."""
        if keys is None:
            cur = self._con.execute("SELECT pin_key, path FROM pins ORDER BY pin_key")
        else:
            cur = self._con.execute(
                "SELECT pin_key, path FROM pins WHERE pin_key IN (SELECT unnest(?)) "
                "ORDER BY pin_key",
                [list(map(int, keys))],
            )
        return [(int(k), str(p)) for k, p in cur.fetchall()]

    def file_states(self) -> dict[str, np.ndarray]:
        """Every pin's ``pin_key`` (sorted), ``pin_id``, ``path`` and its file's recorded
        ``file_size`` and ``file_mtime_ns`` (int64, -1 where none was recorded: pins stored
        before pinsearch kept them, or read from such a catalog), as columns."""
        stated = self.has_column("pins", "file_size")
        cols = self._con.execute(
            "SELECT pin_key, pin_id, path, "
            + (
                "coalesce(file_size, -1) AS file_size, coalesce(file_mtime_ns, -1) AS file_mtime_ns"
                if stated
                else "-1 AS file_size, -1 AS file_mtime_ns"
            )
            + " FROM pins ORDER BY pin_key"
        ).fetchnumpy()
        out = {n: np.asarray(cols[n], dtype=np.int64) for n in _FILE_STATE}
        for name in ("pin_id", "path"):
            out[name] = np.asarray(cols[name], dtype=object).astype(str)
        return out

    def set_file_states(self, rows: Sequence[tuple[int, int, int, int | None, int | None]]) -> None:
        """Record ``(pin_key, file_size, file_mtime_ns, width, height)`` of pins whose files
        were read again (a width or height of None keeps the stored one), in one statement."""
        if not rows:
            return
        import pyarrow as pa

        keys, sizes, mtimes, widths, heights = zip(*rows)
        data = pa.table(
            {
                "pin_key": pa.array(keys, pa.int64()),
                "file_size": pa.array(sizes, pa.int64()),
                "file_mtime_ns": pa.array(mtimes, pa.int64()),
                "width": pa.array(widths, pa.int32()),
                "height": pa.array(heights, pa.int32()),
            }
        )
        self._con.register("_file_states", data)
        try:
            self._con.execute(
                "UPDATE pins SET file_size = s.file_size, file_mtime_ns = s.file_mtime_ns, "
                "width = coalesce(s.width, pins.width), height = coalesce(s.height, pins.height) "
                "FROM _file_states s WHERE pins.pin_key = s.pin_key"
            ).fetchall()
        finally:
            with contextlib.suppress(duckdb.TransactionException):
                self._con.unregister("_file_states")

    def keys_for_ids(self, pin_ids: Sequence[str]) -> dict[str, int]:
        """Map pin ids to pin keys (unknown ids are absent from the result). An id stored in
        another Unicode spelling than the one given (NFC, NFD) is found when the given one is
        not stored."""
        spelled = {i: unicode_spellings(str(i)) for i in pin_ids}
        cur = self._con.execute(
            "SELECT pin_id, pin_key FROM pins WHERE pin_id IN (SELECT unnest(?))",
            [sorted({s for forms in spelled.values() for s in forms})],
        )
        stored = {str(i): int(k) for i, k in cur.fetchall()}
        out = {}
        for given, forms in spelled.items():
            if (form := next((s for s in forms if s in stored), None)) is not None:
                out[given] = stored[form]
        return out

    def pins_by_key(self, keys: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata rows for the given pin keys, in one query."""
        if len(keys) == 0:
            return {}
        rows = self.query(
            "SELECT p.pin_key, p.pin_id, p.title, p.description, p.board, "
            "coalesce(b.name, p.board) AS board_name, p.user_id, p.category, p.path, p.link, "
            "p.width, p.height FROM pins p LEFT JOIN boards b ON b.board = p.board "
            "WHERE p.pin_key IN (SELECT unnest(?))",
            [[int(k) for k in keys]],
        )
        return {int(r["pin_key"]): r for r in rows}

    def filter_keys(
        self,
        *,
        board: str | None = None,
        user: str | None = None,
        category: str | None = None,
    ) -> np.ndarray | None:
        """Pin keys matching all given filters (None when no filter is given).

        A board matches its key (``user/board``) or its display name; boards and users
        match in any Unicode spelling (NFC, NFD) of the value given.
        """
        clauses: list[str] = []
        params: list[Any] = []
        # (one equality per spelling: an IN over a list parameter made a 1M-pin board filter
        # 3-6x slower than "p.board = ?")
        if board is not None:
            forms = unicode_spellings(board)
            clauses.append("(" + " OR ".join(["p.board = ?", "b.name = ?"] * len(forms)) + ")")
            params += [v for form in forms for v in (form, form)]
        if user is not None:
            forms = unicode_spellings(user)
            clauses.append("(" + " OR ".join(["p.user_id = ?"] * len(forms)) + ")")
            params += forms
        if category is not None:
            clauses.append("p.category = ?")
            params.append(category)
        if not clauses:
            return None
        cur = self._con.execute(
            "SELECT p.pin_key FROM pins p LEFT JOIN boards b ON b.board = p.board WHERE "
            + " AND ".join(clauses)
            + " ORDER BY p.pin_key",
            params,
        )
        return np.asarray(cur.fetchnumpy()["pin_key"], dtype=np.int64)

    def drop_pins(
        self, keys: Sequence[int], *, boards: Sequence[str] = (), users: Sequence[str] = ()
    ) -> tuple[list[str], list[str], list[str]]:
        """Delete pins, and the boards and users left without pins: theirs, and those named
        (``info`` counts what is stored; ``remove`` could no longer name an empty one).

        Returns:
            The pin ids, boards and users deleted.
        """
        keys = [int(k) for k in keys]
        owners = self._con.execute(
            "SELECT list(DISTINCT board), list(DISTINCT user_id) FROM pins "
            "WHERE pin_key IN (SELECT unnest(?))",
            [keys],
        ).fetchone()
        touched_boards = sorted({*boards, *(b for b in owners[0] or [] if b is not None)})
        touched_users = sorted({*users, *(u for u in owners[1] or [] if u is not None)})
        ids = [
            r[0]
            for r in self._con.execute(
                "DELETE FROM pins WHERE pin_key IN (SELECT unnest(?)) RETURNING pin_id", [keys]
            ).fetchall()
        ]
        if self.titles_pending():
            self.clear_titles_pending(keys)
        return ids, *self._drop_empty(touched_boards, touched_users, users)

    def forget_cluster_items(self, pin_ids: Sequence[str], boards: Sequence[str]) -> None:
        """Take pins and boards that are gone out of the saved cluster runs of their level."""
        if self.has_table("clusters") and (pin_ids or boards):
            self._con.execute(
                "DELETE FROM clusters WHERE (item IN (SELECT unnest(?)) AND run_id IN (SELECT "
                "run_id FROM cluster_runs WHERE level = 'pins')) OR (item IN (SELECT unnest(?)) "
                "AND run_id IN (SELECT run_id FROM cluster_runs WHERE level = 'boards'))",
                [list(pin_ids), list(boards)],
            )

    def _drop_empty(
        self, boards: Sequence[str], users: Sequence[str], named_users: Sequence[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Delete those of ``boards`` and ``users`` (and the boards of ``named_users``) that
        hold no pin; returns the boards and users deleted."""

        def deleted(sql: str, params: list[Any]) -> list[str]:
            return [r[0] for r in self._con.execute(sql, params).fetchall()]

        gone_boards = deleted(
            "DELETE FROM boards WHERE (board IN (SELECT unnest(?)) OR user_id IN "
            "(SELECT unnest(?))) AND board NOT IN "
            "(SELECT DISTINCT board FROM pins WHERE board IS NOT NULL) RETURNING board",
            [list(boards), list(named_users)],
        )
        gone_users = deleted(
            "DELETE FROM users WHERE user_id IN (SELECT unnest(?)) AND user_id NOT IN "
            "(SELECT DISTINCT user_id FROM pins WHERE user_id IS NOT NULL) RETURNING user_id",
            [list(users)],
        )
        return gone_boards, gone_users

    # -- embeddings and vector parts -------------------------------------------------------

    def get_embedding(self, backbone: str) -> dict[str, Any] | None:
        """The embedding run of a backbone, with ``spec``/``preprocess`` decoded, or None."""
        rows = self.query("SELECT * FROM embeddings WHERE backbone = ?", [backbone])
        if not rows:
            return None
        row = rows[0]
        for key in ("spec", "preprocess"):  # (empty in a row an older pinsearch was killed
            row[key] = json.loads(row[key]) if row[key] is not None else {}  # writing)
        return row

    def list_embeddings(self) -> list[dict[str, Any]]:
        """Every embedding run, without the JSON columns decoded."""
        return self.query("SELECT * FROM embeddings ORDER BY backbone")

    def upsert_embedding(self, backbone: str, **fields: Any) -> None:
        """Create or update the embedding run row of a backbone, in one statement (a new row
        is never seen without its fields)."""
        now = _now()
        fields["updated"] = now
        for key in ("spec", "preprocess"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        self._known_columns("embeddings", fields)
        if not self.scalar("SELECT count(*) FROM embeddings WHERE backbone = ?", [backbone]):
            row = {"created": now, "count": 0, "seconds": 0, **fields, "backbone": backbone}
            self._con.execute(
                f"INSERT INTO embeddings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._con.execute(
            f"UPDATE embeddings SET {sets} WHERE backbone = ?", [*fields.values(), backbone]
        )

    def vector_parts(self, backbone: str) -> list[dict[str, Any]]:
        """The committed vector parts of a backbone, in order (``keys_sha256`` None for parts
        written before key files had checksums, or read from such a catalog)."""
        keys_sha = (
            "keys_sha256"
            if self.has_column("vector_parts", "keys_sha256")
            else "NULL AS keys_sha256"
        )
        return self.query(
            f"SELECT part, file, n, sha256, {keys_sha} FROM vector_parts WHERE backbone = ? "
            "ORDER BY part",
            [backbone],
        )

    def has_column(self, table: str, column: str) -> bool:
        """Whether ``table`` has ``column``: a catalog opened read-only keeps the schema of
        the pinsearch that wrote it (columns added since come with the first write)."""
        if (table, column) not in self._columns:
            self._columns[table, column] = bool(
                self._con.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_name = ? "
                    "AND column_name = ?",
                    [table, column],
                ).fetchall()
            )
        return self._columns[table, column]

    def add_vector_part(
        self, backbone: str, part: int, file: str, n: int, sha256: str, keys_sha256: str
    ) -> None:
        """Record a committed vector part (checksums of its two files) and bump the run's
        count."""
        self._con.execute(
            "INSERT INTO vector_parts (backbone, part, file, n, sha256, keys_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [backbone, part, file, n, sha256, keys_sha256],
        )
        self._con.execute(
            "UPDATE embeddings SET count = count + ?, updated = ? WHERE backbone = ?",
            [n, _now(), backbone],
        )

    # -- indexes --------------------------------------------------------------------------

    def _known_columns(self, table: str, names: Iterable[str]) -> None:
        """Column names reach SQL text only after this check against the table's schema."""
        cols = {
            r[0]
            for r in self._con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
            ).fetchall()
        }
        unknown = sorted(set(names) - cols)
        if unknown:
            raise ValueError(f"table {table} has no column(s) {unknown}")

    def upsert_index(self, row: dict[str, Any]) -> None:
        """Create or replace the catalog row of an index."""
        row = {**row, "built_at": _now()}
        self._known_columns("indexes", row)
        cols = list(row)
        self._con.execute(
            f"INSERT OR REPLACE INTO indexes ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' for _ in cols)})",
            list(row.values()),
        )

    def get_index(self, name: str) -> dict[str, Any] | None:
        """The catalog row of an index, or None."""
        rows = self.query("SELECT * FROM indexes WHERE name = ?", [name])
        return rows[0] if rows else None

    def list_indexes(self) -> list[dict[str, Any]]:
        """Every index row."""
        return self.query("SELECT * FROM indexes ORDER BY name")


def _board_names(
    records: Sequence[PinRecord], chosen: dict[str, PinRecord]
) -> dict[str, PinRecord]:
    """One record per board read, giving its owner, name and description: the least of
    those its pins carry (a folder corpus's "Home Decor" and "home-decor" are one board; a
    manifest's rows may disagree), whichever pins are new, so a board's name does not follow
    them from run to run; its category is ``chosen``'s (the new pins' most common) if there."""
    out: dict[str, PinRecord] = {}
    for p in records:
        best = out.get(p.board)
        mine = (p.board_name, p.board_description, p.user or "")
        if best is None or mine < (best.board_name, best.board_description, best.user or ""):
            out[p.board] = p
    return {
        b: replace(p, category=chosen[b].category) if b in chosen else p for b, p in out.items()
    }


def _differs(a: str, b: str, columns: Sequence[str]) -> str:
    """SQL: whether rows ``a`` and ``b`` differ in any of ``columns`` (NULL and empty text
    the same)."""
    return " OR ".join(f"coalesce({a}.{n}, '') IS DISTINCT FROM coalesce({b}.{n}, '')"
                       for n in columns)  # fmt: skip


def _board_row(b: PinRecord) -> list[Any]:
    """The ``boards`` row of the board a pin is in (``_BOARD_COLUMNS`` order)."""
    return [b.board, b.user, b.board_name, b.category, b.board_description]


def _pin_row(p: PinRecord, key: int, ingest_id: int) -> list[Any]:
    return [
        key,
        p.pin_id,
        p.board,
        p.user,
        p.category,
        p.title,
        p.description,
        p.link,
        str(p.path),
        p.width,
        p.height,
        ingest_id,
        json.dumps(dict(p.extra)) if p.extra else None,
        p.file_size,
        p.file_mtime_ns,
    ]


class _Transaction:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con

    def __enter__(self) -> None:
        self._con.execute("BEGIN TRANSACTION")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self._con.execute("COMMIT")
        else:
            self._con.execute("ROLLBACK")
