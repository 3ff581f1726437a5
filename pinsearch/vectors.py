"""Stored vectors: the source of truth every index is derived from.

The vectors of one backbone live in ``S/vectors/<backbone>/part-NNNNNN.npy`` with the pin keys
of their rows in ``part-NNNNNN.keys.npy``. A part is written to temporary files, renamed, and
only then recorded in the catalog (with its checksum), so an interrupted run leaves at worst an
unrecorded file that the next writer removes: resumption re-embeds nothing that was recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.catalog import Catalog
from pinsearch.errors import CatalogError
from pinsearch.indexes.pinindex import file_sha256, inside_store, replace_durably, temp_beside

__all__ = ["VECTOR_DTYPES", "VectorStore", "unit_rows"]

_logger = logging.getLogger(__name__)

VECTOR_DTYPES = ("float32", "float16")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")

_PART_FILE = re.compile(r"part-\d+(\.keys)?\.npy(\.tmp)?")  # what a writer may delete


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows (last axis) scaled to unit length as float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def in_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_keys)`` for an increasing ``sorted_keys``, by binary search:
    a few keys against a million cost microseconds, not the ~70 ms of ``isin``'s table."""
    keys = np.asarray(keys)
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def group_sums(
    groups: np.ndarray,
    n_groups: int,
    x: np.ndarray,
    chunk: int = 65_536,
    *,
    dtype: np.dtype | type = np.float64,
    weights: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``(n_groups, d)`` sums of the rows of ``x`` (each times its ``weights`` entry, when
    given) by their group (``groups[i]`` in ``0..n_groups-1``), added into ``out`` when given
    (else a new ``dtype`` array). ``chunk`` rows at a time: each chunk's rows are sorted by
    group and summed with ``np.add.reduceat`` into the groups it holds, so that neither a
    float64 copy of ``x`` nor a dense ``(n_groups, d)`` array per chunk is made (a sparse
    product made one: gigabytes for 100k boards)."""
    if out is None:
        out = np.zeros((n_groups, x.shape[1]), dtype)
    for i in range(0, len(x), chunk):
        g = np.asarray(groups[i : i + chunk])
        order = np.argsort(g, kind="stable")
        g = g[order]
        if len(g) == 0:
            continue
        rows = x[i : i + chunk][order]
        if weights is not None:
            rows = rows * weights[i : i + chunk][order][:, None]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        out[g[starts]] += np.add.reduceat(rows, starts, axis=0, dtype=out.dtype)
    return out


def backbone_dirname(backbone: str) -> str:
    """A file-system-safe folder name for a backbone name (``timm:a.b`` -> ``timm_a.b``)."""
    return _SAFE_NAME.sub("_", backbone)


@dataclass
class DropPlan:
    """A staged :meth:`VectorStore.drop_keys`: the parts to retire, the new parts' files
    written (``(number, file, rows, sha256, keys sha256)``), and the vectors removed."""

    retire: list[dict[str, object]] = field(default_factory=list)
    add: list[tuple[Any, ...]] = field(default_factory=list)
    removed: int = 0


class VectorStore:
    """Vectors of one backbone in a store.

    Args:
        store_root: the store folder.
        backbone: the backbone name (the embedding run's key in the catalog).
        catalog: the store's catalog.
    """

    def __init__(self, store_root: Path, backbone: str, catalog: Catalog) -> None:
        self.root = Path(store_root)
        self.backbone = backbone
        self.catalog = catalog
        self.folder = self.root / "vectors" / backbone_dirname(backbone)
        self._locator: tuple[list[dict[str, object]], np.ndarray, np.ndarray, np.ndarray] | None = (
            None
        )
        self._maps: dict[int, np.ndarray] = {}  # part index -> its vectors, memory-mapped
        self._part_keys: list[np.ndarray] = []  # each located part's keys, in row order
        self._dim_value = 0

    def _forget(self) -> None:
        """Drop what was cached about the parts (after a write changed them)."""
        self._locator = None
        self._maps = {}
        self._part_keys = []

    def parts(self) -> list[dict[str, object]]:
        """Committed parts, in order.

        Raises:
            CatalogError: a part's recorded file is not the one a writer makes for it
                (:meth:`part_file`): the catalog was altered, and would have a reader open
                any file (``pinsearch check`` names the part, ``repair`` forgets it).
        """
        rows = self.catalog.vector_parts(self.backbone)
        for p in rows:
            self._check_file(p)
        return rows

    def _check_file(self, part: dict[str, object]) -> None:
        """Raise :class:`CatalogError` unless ``part`` names the file a writer makes for it."""
        want = self.part_file(int(part["part"]))  # type: ignore[call-overload]
        if part["file"] != want:
            raise CatalogError(
                f"the catalog's vector part {part['part']} of {self.backbone!r} names the file "
                f"{part['file']!r}, not {want!r}: the catalog was altered; pinsearch check "
                "names it, pinsearch repair forgets it"
            )

    def part_file(self, number: int) -> str:
        """The vectors file, relative to the store, that a writer makes for part ``number``."""
        return (self.folder / f"part-{number:06d}.npy").relative_to(self.root).as_posix()

    def keys(self) -> np.ndarray:
        """Pin keys of every stored vector, in storage order."""
        arrays = [self._load_keys(p) for p in self.parts()]
        return np.concatenate(arrays) if arrays else np.empty(0, np.int64)

    def sorted_keys(self) -> np.ndarray:
        """Pin keys of every stored vector, sorted (the locator's, cached until a write)."""
        return self._locate()[1]

    def __len__(self) -> int:
        rows = self.catalog.vector_parts(self.backbone)  # (counted, no file opened)
        return int(sum(int(p["n"]) for p in rows))

    def _load_keys(self, part: dict[str, object]) -> np.ndarray:
        return np.load(self._keys_path(part), allow_pickle=False)

    def _locate(self) -> tuple[list[dict[str, object]], np.ndarray, np.ndarray, np.ndarray]:
        """Sorted keys with the part and row of each (cached until the next write)."""
        if self._locator is None:
            parts = self.parts()
            keys = [self._load_keys(p) for p in parts]
            self._part_keys = keys
            all_keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
            part_of = np.concatenate([np.full(len(k), i) for i, k in enumerate(keys)] or [[]])
            row_of = np.concatenate([np.arange(len(k)) for k in keys] or [[]])
            order = np.argsort(all_keys, kind="stable")
            self._locator = (
                parts,
                all_keys[order],
                part_of[order].astype(np.int64),
                row_of[order].astype(np.int64),
            )
        return self._locator

    def load(self, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors as float32 with their pin keys.

        Args:
            keys: only these pins (unknown keys are left out); None for all, in storage order.

        Returns:
            ``(vectors, keys)``; with ``keys`` given, rows follow its order.
        """
        if keys is None:
            return self._load_all()
        want = np.asarray(keys, dtype=np.int64).ravel()
        _, sorted_keys, part_of, row_of = self._locate()
        dim = self._dim()
        if len(sorted_keys) == 0 or len(want) == 0:
            return np.empty((0, dim), np.float32), np.empty(0, np.int64)
        at = np.clip(np.searchsorted(sorted_keys, want), 0, len(sorted_keys) - 1)
        found = sorted_keys[at] == want
        want, at = want[found], at[found]
        out = np.empty((len(want), dim), np.float32)
        for part in np.unique(part_of[at]).tolist():
            sel = part_of[at] == part
            out[sel] = self._mapped(part)[row_of[at][sel]]
        return out, want

    def _mapped(self, i: int) -> np.ndarray:
        """The vectors of part ``i`` (of :meth:`_locate`'s parts), memory-mapped once per
        reader: a warm reader's queries open no file."""
        if i not in self._maps:
            path = self.root / str(self._locate()[0][i]["file"])
            self._maps[i] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._maps[i]

    def iter_chunks(self, rows: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(vectors as float32, keys)`` of every stored vector, in storage order, at most
        ``rows`` at a time (one part read at a time, memory-mapped): a pass over a million
        vectors without holding them all."""
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        self._locate()  # keys read once (a later writer may delete a retired part's files)
        for i, keys in enumerate(self._part_keys):
            vectors = self._mapped(i)
            for start in range(0, len(keys), rows):
                chunk = np.asarray(vectors[start : start + rows], dtype=np.float32)
                yield chunk, keys[start : start + rows]

    def map_parts(self) -> int:
        """Map every committed part's vectors now (no data is read) and locate the keys, as a
        long-running reader does before its first query: it then reads its vectors through
        these maps even after a later writer deletes a retired part's file. Returns the
        number of parts."""
        parts = self._locate()[0]
        for i in range(len(parts)):
            self._mapped(i)
        return len(parts)

    def _dim(self) -> int:
        if not self._dim_value:  # a backbone's dimension never changes once recorded
            dim = self.catalog.scalar(
                "SELECT dim FROM embeddings WHERE backbone = ?", [self.backbone]
            )
            self._dim_value = int(dim or 0)
        return self._dim_value

    def _load_all(self) -> tuple[np.ndarray, np.ndarray]:
        vecs: list[np.ndarray] = []
        out_keys: list[np.ndarray] = []
        for part in self.parts():
            arr = np.load(self.root / str(part["file"]), allow_pickle=False)
            vecs.append(np.asarray(arr, dtype=np.float32))
            out_keys.append(self._load_keys(part))
        if not vecs:
            return np.empty((0, self._dim()), np.float32), np.empty(0, np.int64)
        return np.concatenate(vecs), np.concatenate(out_keys)

    def write_part(self, vectors: np.ndarray, keys: np.ndarray, dtype: str = "float32") -> int:
        """Write and commit one part; returns its number."""
        part = self._next_part()
        files = self._write_files(part, vectors, keys, dtype)
        with self.catalog.transaction():
            self.catalog.add_vector_part(self.backbone, part, *files)
        return part

    def _next_part(self) -> int:
        """A part number neither recorded nor on disk (retired parts stay on disk until the
        next writer opens: readers of the previous snapshot may still read them)."""
        last = self.catalog.scalar(
            "SELECT max(part) FROM vector_parts WHERE backbone = ?", [self.backbone]
        )
        numbers = [-1 if last is None else int(last)]
        if self.folder.is_dir():
            for f in self.folder.glob("part-*.npy"):
                digits = f.name[5:].split(".")[0]
                if digits.isdigit():
                    numbers.append(int(digits))
        return max(numbers) + 1

    def _write_files(
        self, part: int, vectors: np.ndarray, keys: np.ndarray, dtype: str
    ) -> tuple[str, int, str, str]:
        """Write a part's two files (temporary file, fsync, rename); not yet recorded.

        Returns:
            The vectors file relative to the store, rows, and the two files' SHA-256.
        """
        if dtype not in VECTOR_DTYPES:
            raise ValueError(f"unknown vector dtype {dtype!r}; expected one of {VECTOR_DTYPES}")
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(keys)} keys")
        stored = np.asarray(vectors, dtype=dtype)
        if not np.isfinite(stored).all():  # (one pass; float16 ends at 65,504: inf otherwise)
            if not np.isfinite(vectors).all():
                raise ValueError(f"backbone {self.backbone!r} produced non-finite vectors")
            raise ValueError(
                f"backbone {self.backbone!r} produced components past the {dtype} range; "
                "store its vectors as float32"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        rel = self.part_file(part)
        vec_path, key_path = self.root / rel, self._keys_path({"file": rel})
        for path, arr in ((vec_path, stored), (key_path, keys)):
            tmp = temp_beside(path)
            with tmp.open("wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            replace_durably(tmp, path)
        self._forget()
        return rel, len(keys), file_sha256(vec_path), file_sha256(key_path)

    def drop_keys(
        self,
        keys: np.ndarray,
        *,
        parts: list[int] | None = None,
        delete_retired: bool = False,
        new: tuple[np.ndarray, np.ndarray, str] | None = None,
        also: Callable[[], None] | None = None,
    ) -> int:
        """Remove the vectors of ``keys`` (and, with ``parts``, whole parts by number).

        Each part holding such a key is rewritten without it as a new part; the catalog swaps
        old for new parts in one transaction. A crash at any point leaves either the old parts
        or the new ones recorded. The old files stay until the second writer after this one
        opens (see :meth:`remove_orphans`): readers of the snapshot published before this
        write still read them. ``delete_retired`` deletes them at once (``repair``: damaged
        parts). A part is rewritten only once its files match their checksums.
        ``new`` (vectors, their keys, dtype) is written as one more part, committed in the
        same transaction (see :meth:`replace`), and so are ``also``'s catalog writes.
        (:meth:`stage_drop` and :meth:`commit_drop` are its two halves, for a caller that
        commits several backbones' swaps in one transaction of its own.)

        Returns:
            The number of vectors removed.
        """
        plan = self.stage_drop(keys, parts=parts, new=new)
        if plan is None:
            return 0
        try:
            with self.catalog.transaction():
                self.commit_drop(plan, delete_retired=delete_retired)
                if also is not None:
                    also()
        except BaseException:
            self.discard_drop(plan)
            raise
        self.finish_drop(delete_retired=delete_retired)
        return plan.removed

    def stage_drop(
        self,
        keys: np.ndarray,
        *,
        parts: list[int] | None = None,
        new: tuple[np.ndarray, np.ndarray, str] | None = None,
    ) -> DropPlan | None:
        """:meth:`drop_keys`' first half: the new parts' files written (each rewritten part
        checked against its checksums first), nothing recorded. None: nothing to drop.

        Raises:
            ValueError: a damaged part (its new files are deleted; nothing changed).
        """
        drop = np.unique(np.asarray(keys, dtype=np.int64))
        whole = set(parts or [])
        plan = DropPlan()
        next_part = self._next_part()
        rewrite = []  # (part, its keys, which go)
        for p in self.catalog.vector_parts(self.backbone):  # (a whole part is not read)
            number = int(p["part"])  # type: ignore[call-overload]
            if number in whole:
                plan.retire.append(p)
                plan.removed += int(p["n"])  # type: ignore[call-overload]
                continue
            self._check_file(p)
            part_keys = self._load_keys(p)
            hit = np.isin(part_keys, drop)
            if hit.any():
                rewrite.append((p, part_keys, hit))
        try:
            for p, part_keys, hit in rewrite:
                arr = self._checked_vectors(p)  # (read once: checked, then copied)
                plan.retire.append(p)
                plan.removed += int(hit.sum())
                if (~hit).any():
                    plan.add.append((next_part, *self._write_files(
                        next_part, arr[~hit], part_keys[~hit], str(arr.dtype)
                    )))  # fmt: skip
                    next_part += 1
            if new is not None:
                plan.add.append((next_part, *self._write_files(next_part, *new)))
        except BaseException:  # a damaged part (or a failed write): the new files go
            self.discard_drop(plan)
            raise
        return plan if plan.retire or plan.add else None

    def commit_drop(self, plan: DropPlan, *, delete_retired: bool = False) -> None:
        """:meth:`drop_keys`' second half, in the caller's transaction: the catalog's parts
        swapped (then :meth:`finish_drop` once it commits, or :meth:`discard_drop` if not)."""
        con = self.catalog.connection
        con.execute(
            "DELETE FROM vector_parts WHERE backbone = ? AND part IN (SELECT unnest(?))",
            [self.backbone, [int(p["part"]) for p in plan.retire]],  # type: ignore[call-overload]
        )
        con.execute(  # (the parts added below count theirs)
            "UPDATE embeddings SET count = count - ? WHERE backbone = ?",
            [sum(int(p["n"]) for p in plan.retire), self.backbone],  # type: ignore[call-overload]
        )
        for number, *files in plan.add:
            self.catalog.add_vector_part(self.backbone, number, *files)
        if plan.retire and not delete_retired:  # named, so that check tells them from crash
            names = [name for p in plan.retire for name in self._file_names(p)]  # leftovers
            self.catalog.set_meta(self._retired_key, json.dumps(self._listed(0) + names))

    def discard_drop(self, plan: DropPlan) -> None:
        """Delete the files a staged drop wrote that the catalog does not record (its
        transaction did not commit; one stopped just after its commit keeps them)."""
        recorded = {
            r[0]
            for r in self.catalog.connection.execute(
                "SELECT file FROM vector_parts WHERE backbone = ?", [self.backbone]
            ).fetchall()
        }
        for _, rel, *_ in plan.add:
            if rel in recorded:
                continue
            for f in (self.root / rel, self._keys_path({"file": rel})):
                f.unlink(missing_ok=True)

    def finish_drop(self, *, delete_retired: bool = False) -> None:
        """After a drop committed: the retired files deleted at once with
        ``delete_retired``, and what this object knew of the parts forgotten."""
        if delete_retired:
            self.remove_orphans(keep_last=False)
        self._forget()

    def _checked_vectors(self, part: dict[str, object]) -> np.ndarray:
        """A part's vectors, read once, after its files matched their recorded checksums: a
        copy of a damaged part would record the damage as sound.

        Raises:
            ValueError: naming the part and ``pinsearch repair``; nothing is changed.
        """
        path = self.root / str(part["file"])
        data = path.read_bytes()
        sums = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "keys_sha256": file_sha256(self._keys_path(part)),
        }
        for column, got in sums.items():
            if part.get(column) is not None and got != part[column]:
                raise ValueError(
                    f"vector part {path} of {self.backbone!r} does not match its checksum: it "
                    "is damaged; pinsearch repair drops it (pinsearch index then embeds its "
                    "pins again); nothing changed"
                )
        return np.load(io.BytesIO(data), allow_pickle=False)

    def replace(
        self,
        vectors: np.ndarray,
        keys: np.ndarray,
        dtype: str,
        also: Callable[[], None] | None = None,
    ) -> int:
        """Swap the vectors of ``keys`` (stored or not) for ``vectors``, and commit ``also``'s
        catalog writes, in one transaction: a crash leaves the old vectors or the new ones.
        Returns the number of old vectors replaced."""
        return self.drop_keys(keys, new=(vectors, keys, dtype), also=also)

    def _keys_path(self, part: dict[str, object]) -> Path:
        path = self.root / str(part["file"])
        return path.with_name(path.stem + ".keys.npy")

    def _file_names(self, part: dict[str, object]) -> tuple[str, str]:
        """The names of a part's two files (vectors, keys) in the backbone's folder."""
        return Path(str(part["file"])).name, self._keys_path(part).name

    def unrecorded_files(self) -> list[str]:
        """Names of files in the backbone's folder that no recorded part owns (sorted; a
        folder made in it is no part's, and is left alone)."""
        if not self.folder.is_dir() or not inside_store(self.root, self.folder):
            return []  # (a folder a link leads out to holds no file of ours to delete)
        rows = self.catalog.vector_parts(self.backbone)  # (names only: nothing is read)
        known = {name for p in rows for name in self._file_names(p)}
        return sorted(
            f.name
            for f in self.folder.iterdir()
            if f.name not in known
            and _PART_FILE.fullmatch(f.name)
            and (f.is_symlink() or not f.is_dir())
        )

    @property
    def _retired_key(self) -> str:
        return f"retired_vector_files/{self.backbone}"

    def _listed(self, generation: int) -> list[str]:
        """Files retired by the last write (0), or by the write before it (1)."""
        key = self._retired_key if generation == 0 else f"{self._retired_key}/before"
        return list(json.loads(self.catalog.get_meta(key) or "[]"))

    def retired(self) -> list[str]:
        """File names of parts the last two writes retired, kept on disk for readers of the
        snapshots published before them: a reader that opened while one write worked reads
        its snapshot until the second writer after it opens."""
        return self._listed(0) + self._listed(1)

    def remove_orphans(self, *, keep_last: bool = True) -> int:
        """Delete part files the catalog does not know: parts retired by the write before the
        last (the last's stay, unless not ``keep_last``: ``repair``) and files left by an
        interrupted one. The last write's retired parts become the write before's."""
        last = self._listed(0) if keep_last else []
        if self.retired():
            self.catalog.set_meta(f"{self._retired_key}/before", json.dumps(last))
            self.catalog.set_meta(self._retired_key, "[]")
        kept = set(last)
        unrecorded = [f for f in self.unrecorded_files() if f not in kept]
        for name in unrecorded:
            (self.folder / name).unlink()
        removed = len(unrecorded)
        if removed:
            _logger.info("removed %d unrecorded vector files of %s", removed, self.backbone)
        return removed
