"""Corpus readers: a Pinterest tree, an image folder, or a manifest -> the same pin records.

Readers yield :class:`PinRecord` or :class:`SkippedPin`; :func:`read_corpus` then normalises
categories, drops excluded ones, removes duplicate ids, probes image headers and samples per
category. Every pin found ends up either kept, skipped (with a reason) or sampled out.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import json
import logging
import math
import os
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from pinsearch.errors import CorpusError
from pinsearch.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    is_image_file,
    load_rgb,
    probe_image,
)

__all__ = [
    "CORPUS_FORMATS",
    "IngestConfig",
    "IngestResult",
    "PinRecord",
    "SkippedPin",
    "category_rng",
    "detect_format",
    "iter_folder",
    "iter_manifest",
    "iter_tree",
    "normalize_category",
    "read_corpus",
    "sample_per_category",
]

_logger = logging.getLogger(__name__)

CorpusFormat = Literal["auto", "tree", "folder", "manifest"]
CORPUS_FORMATS: tuple[str, ...] = ("auto", "tree", "folder", "manifest")
_MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class PinRecord:
    """One pin as every reader produces it."""

    pin_id: str  # unique within the store
    board: str  # board key: "user/board" for a tree, the category for an image folder
    user: str | None  # owner, None when the format has no users
    category: str  # normalised category (the label)
    title: str
    description: str
    path: Path  # absolute path of the image
    link: str = ""
    board_name: str = ""  # display name of the board (board.json "name")
    board_description: str = ""
    width: int | None = None  # filled by the header probe
    height: int | None = None
    extra: tuple[tuple[str, str], ...] = ()  # other pin.json keys / manifest columns, as text
    file_size: int | None = None  # the image file as it was read (stat): pinsearch refresh
    file_mtime_ns: int | None = None  # re-embeds a pin whose file changed since


@dataclass(frozen=True)
class SkippedPin:
    """A pin that was found but not kept, and why."""

    path: str
    reason: str  # short code: empty_file, not_an_image, duplicate_id, excluded_category, ...
    detail: str  # human-readable explanation naming the culprit
    pin_id: str | None = None
    stage: str = "ingest"


@dataclass(frozen=True)
class IngestConfig:
    """How a corpus is read."""

    format: CorpusFormat = "auto"  # tree, folder or manifest; auto detects it
    drop_categories: tuple[str, ...] = ("none", "other")  # the paper's cleaning step
    categories: tuple[str, ...] | None = None  # keep only these (normalised names); None = all
    per_category: int | None = None  # stratified sample of at most N pins per category
    seed: int = 0  # seed of the sampling
    check_images: bool = True  # probe every image header (empty, non-image, bombs)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    allow_outside_root: bool = False  # accept files outside the corpus root (manifest paths,
    # symbolic links in trees and folders)
    workers: int = 8  # threads probing image headers

    def __post_init__(self) -> None:  # said before any corpus is read
        if self.per_category is not None and self.per_category < 1:
            raise ValueError(f"per_category must be positive, got {self.per_category}")
        if self.seed < 0:
            raise ValueError(f"the sampling seed must be 0 or more, got {self.seed}")


@dataclass
class IngestResult:
    """What :func:`read_corpus` found: kept pins, skipped pins and the counts."""

    root: Path
    format: str
    pins: list[PinRecord]
    skipped: list[SkippedPin]
    found: int
    sampled_out: int = 0
    already_present: int = 0  # pins whose id the store already holds
    boards: dict[str, PinRecord] = field(default_factory=dict)  # one example record per board
    stored: list[PinRecord] = field(default_factory=list)  # pins the store holds already, as
    # read now (those the rules keep; no header probed): their metadata may have changed


# (dashes: hyphen-minus, the hyphens, figure/en/em dashes, minus; apostrophes: typewriter, the
# typographic pair, the modifier letter, backtick)
_CATEGORY_SEP = re.compile(r"[\s,&/+\-\u2010-\u2015\u2212]+")
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")


def normalize_category(name: str | None) -> str:
    """Normalise a category label: ``"Film, Music & Books"`` -> ``"film_music_books"``.

    Unicode NFC (a name copied from macOS, decomposed, is the same category); lower case;
    apostrophes vanish, typographic ones too (``"Women's Fashion"`` and ``"Women’s Fashion"`` ->
    ``"womens_fashion"``); runs of spaces, commas, ``&``, ``/``, ``+`` and dashes (``-``, en and
    em dashes, the minus sign) become one underscore. Returns ``""`` for a missing or blank
    name.
    """
    if name is None:
        return ""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFC", str(name)).strip().lower())
    text = _CATEGORY_SEP.sub("_", text)
    text = re.sub(r"_+", "_", text).strip("_")
    return text


def unicode_spellings(text: str) -> list[str]:
    """``text`` first, then its other canonically equivalent spellings (NFC, NFD): a name
    typed on one system may be stored from another's file names (macOS writes ``é`` as ``e``
    and a combining accent)."""
    out = [text]
    for form in ("NFC", "NFD"):
        if (other := unicodedata.normalize(form, text)) not in out:
            out.append(other)
    return out


def _text(value: object) -> str:
    """A text field as text: JSON values that are not strings or numbers (a list for a
    title) are kept as their JSON, not as Python's repr."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and not math.isfinite(value):
        return ""  # (a Parquet column's missing value: NaN)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a Parquet id column of floats: 1.0 is the CSV's 1
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bytes | bytearray):  # (a Parquet binary column)
        return bytes(value).decode("utf-8", errors="replace").strip()
    if isinstance(value, decimal.Decimal | datetime.date | datetime.time):  # (Parquet types)
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _label(value: object) -> str:
    """A board.json category: text or a whole number (a class id); anything else is refused.

    Raises:
        ValueError: a list, object, boolean or fraction.
    """
    if value is None or isinstance(value, str):
        return normalize_category(value)
    whole = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if whole or (isinstance(value, int) and not isinstance(value, bool)):
        return normalize_category(_text(value))  # as a manifest's: -5 and "-5" are "5"
    raise ValueError(f"'category' must be text, got {json.dumps(value, default=str)}")


def _read_json(path: Path) -> dict[str, object]:
    """Read a JSON object; raises ValueError describing what is wrong."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # (a BOM is allowed)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError:  # (arrays in arrays, thousands deep)
        raise ValueError("JSON nested too deep") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


_PIN_JSON_KEYS = frozenset({"id", "title", "description", "link"})
_MANIFEST_KEYS = frozenset(
    {"path", "category", "pin_id", "board", "user", "title", "description", "link"}
)


def _extra(data: dict[str, object], known: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """Fields beyond the standard ones, kept as text (e.g. a manifest's fine label)."""
    out = []
    for key in sorted(k for k in data if k not in known):
        value = data[key]
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out.append((str(key), text))
    return tuple(out)


def _valid_name(name: str) -> bool:
    """Whether a file name can be stored as text (non-UTF-8 names arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _visible_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _kind(entry: os.DirEntry[str]) -> str:
    """``dir``, ``file``, ``broken`` (a symbolic link to nothing, or a loop of links) or
    ``other`` (a FIFO, socket or device); links are followed."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # ELOOP, EACCES on the target
        return "broken"
    return "broken" if entry.is_symlink() else "other"


def _unreadable(folder: str | Path, exc: OSError) -> SkippedPin:
    """A folder that cannot be listed: its pins are unknown, so it counts as one."""
    return SkippedPin(
        os.path.abspath(folder), "unreadable",
        f"folder {folder} cannot be read: {exc.strerror or exc}",
    )  # fmt: skip


def _stray(entry: os.DirEntry[str], kind: str, where: str) -> SkippedPin | None:
    """An entry that is not a pin where pins or their folders are expected: recorded when it
    may have been one (an image, a link to nothing, a FIFO named like an image), else None."""
    image = is_image_file(Path(entry.name))
    # absolute (not resolved: a link is named as it lies), so a run from another folder or by
    # another spelling of the root records the same file once
    path = os.path.abspath(entry.path).encode("utf-8", "backslashreplace").decode("utf-8")
    if kind == "broken":
        return SkippedPin(path, "broken_link", f"{path} is a symbolic link to nothing (or a loop)")
    if kind == "other" and image:
        return SkippedPin(path, "not_a_file", f"{path} is not a regular file (a FIFO or device?)")
    if kind == "file" and image and where:
        return SkippedPin(path, "not_in_board", f"image {path} lies {where}")
    return None


def _root_entries(root: Path) -> list[os.DirEntry[str]]:
    try:
        return _visible_entries(root)
    except OSError as exc:
        raise CorpusError(f"corpus {root} cannot be read: {exc.strerror or exc}") from exc


def _pick_image(pin_dir: Path, files: Sequence[os.DirEntry[str]]) -> Path | None:
    images = [Path(e.path) for e in files if is_image_file(Path(e.name))]
    if not images:
        return None
    for img in images:  # prefer <pin_id>.<ext>, the documented name
        if img.stem == pin_dir.name:
            return img
    return images[0]


def iter_tree(
    root: str | Path, *, allow_outside_root: bool = True
) -> Iterator[PinRecord | SkippedPin]:
    """Read a Pinterest tree ``ROOT/<user>/<board>/<pin>/``.

    Each board folder holds ``board.json`` (``name``, ``category``, ``description``); each pin
    folder holds one image (preferably ``<pin>.jpg``) and an optional ``pin.json`` (``title``,
    ``description``, ``link``). Images lying loose in a board folder are pins too (id = stem).
    Without ``allow_outside_root`` a ``board.json`` or ``pin.json`` that is a link out of the
    root is not read (``path_outside_root``: a corpus someone sent could otherwise copy any
    JSON file of the reader's into the catalog); images are confined by the caller.
    """
    root = Path(root)
    real_root = root.resolve()
    confine = None if allow_outside_root else real_root
    outside = "outside any <user>/<board>/ folder"
    for user_entry in _root_entries(root):
        kind = _kind(user_entry)
        if kind != "dir":
            if (stray := _stray(user_entry, kind, outside)) is not None:
                yield stray
            continue
        if (elsewhere := _read_elsewhere(user_entry, real_root, 1)) is not None:
            yield elsewhere
            continue
        try:
            boards = _visible_entries(Path(user_entry.path))
        except OSError as exc:
            yield _unreadable(user_entry.path, exc)
            continue
        for board_entry in boards:
            kind = _kind(board_entry)
            if kind == "dir" and (elsewhere := _read_elsewhere(board_entry, real_root, 2)):
                yield elsewhere
            elif kind == "dir":
                yield from _iter_board(Path(board_entry.path), user_entry.name, real_root, confine)
            elif (stray := _stray(board_entry, kind, outside)) is not None:
                yield stray


def _read_elsewhere(entry: os.DirEntry[str], root: Path, depth: int) -> SkippedPin | None:
    """A linked folder of a tree (user: ``depth`` 1, board 2, pin 3) whose real folder the
    tree reads where it lies, at that depth and not hidden (so with the user, board and id of
    its place: a link must not give its pins another's): ``folder_read_before``. None for any
    other entry: a link out of the tree follows the outside-the-root rule, and one to a folder
    the tree does not read (hidden, another depth) is read through the link."""
    if not entry.is_symlink():
        return None
    real = Path(os.path.realpath(entry.path))
    if not real.is_relative_to(root):
        return None
    parts = real.relative_to(root).parts
    if len(parts) != depth or any(p.startswith(".") for p in parts):
        return None
    path = os.path.abspath(entry.path)
    return SkippedPin(path, "folder_read_before", f"folder {path} is {real}, read where it lies")


def _leads_out(path: Path, confine: Path | None) -> str:
    """Why ``path`` may not be read (a link out of the ``confine`` root), or ""."""
    if confine is None or Path(os.path.realpath(path)).is_relative_to(confine):
        return ""
    return (
        f"path_outside_root: {path} leads outside the corpus root {confine} (a symbolic "
        "link); allow_outside_root (--allow-outside-root) reads it"
    )


def _iter_board(
    board_dir: Path, user: str, root: Path, confine: Path | None = None
) -> Iterator[PinRecord | SkippedPin]:
    try:
        entries = _visible_entries(board_dir)
    except OSError as exc:
        yield _unreadable(board_dir, exc)
        return
    board_key = f"{user}/{board_dir.name}"
    problem = category = ""
    meta: dict[str, object] = {}
    if not (_valid_name(user) and _valid_name(board_dir.name)):
        problem = "non_utf8_name: the user or board folder name is not valid UTF-8"
    elif not (board_dir / "board.json").is_file():
        problem = f"missing_board_json: {board_dir / 'board.json'} does not exist"
    elif outside := _leads_out(board_dir / "board.json", confine):
        problem = outside
    else:
        try:
            meta = _read_json(board_dir / "board.json")
            category = _label(meta.get("category"))
        except (ValueError, OSError) as exc:
            problem = f"malformed_board_json: {board_dir / 'board.json'}: {exc}"
    if not problem and not category:
        problem = f"missing_category: {board_dir / 'board.json'} has no 'category'"
    board_name = _text(meta.get("name")) or board_dir.name
    board_desc = _text(meta.get("description"))
    for entry in entries:
        if entry.name == "board.json":
            continue
        kind = _kind(entry)
        if kind == "dir" and (elsewhere := _read_elsewhere(entry, root, 3)) is not None:
            yield elsewhere
            continue
        if kind == "dir":
            pin_dir = Path(entry.path)
            try:
                with os.scandir(pin_dir) as it:  # (not hidden: macOS's ._photo.jpg)
                    listed = [(e, _kind(e)) for e in it if not e.name.startswith(".")]
                files = sorted((e for e, k in listed if k == "file"), key=lambda e: e.name)
            except OSError as exc:
                yield replace(_unreadable(pin_dir, exc), pin_id=entry.name)
                continue
            image = _pick_image(pin_dir, files)
            # no image, but one named like one is a link to nothing, or a FIFO: said so
            unusable = [
                _stray(e, k, "")
                for e, k in sorted(listed, key=lambda x: x[0].name)
                if image is None and k in ("broken", "other") and is_image_file(Path(e.name))
            ]
            why = next((u for u in unusable if u is not None), None)
            if why is not None:
                yield replace(why, pin_id=entry.name if _valid_name(entry.name) else None)
                continue
            pin_id = entry.name
            pin_json = pin_dir / "pin.json"
        elif kind == "file" and is_image_file(Path(entry.name)):
            image, pin_id, pin_json = Path(entry.path), Path(entry.name).stem, None
        else:
            if (stray := _stray(entry, kind, "")) is not None:
                yield stray
            continue
        # skipped pins are recorded by their resolved path, as stored ones are: a file fixed
        # since is recognised when it is stored by a later run
        resolved = Path(image or entry.path).resolve()
        where = str(resolved)
        if problem:
            reason, detail = problem.split(": ", 1)
            yield SkippedPin(where, reason, detail, pin_id if _valid_name(pin_id) else None)
            continue
        if not _valid_name(pin_id) or (image is not None and not _valid_name(image.name)):
            yield SkippedPin(
                where.encode("utf-8", "backslashreplace").decode("utf-8"),
                "non_utf8_name",
                "the pin's file or folder name is not valid UTF-8",
            )
            continue
        if image is None:
            yield SkippedPin(where, "no_image", f"no image file in pin folder {entry.path}", pin_id)
            continue
        info: dict[str, object] = {}
        if pin_json is not None and pin_json.is_file():
            if outside := _leads_out(pin_json, confine):
                reason, detail = outside.split(": ", 1)
                yield SkippedPin(where, reason, detail, pin_id)
                continue
            try:
                info = _read_json(pin_json)
            except (ValueError, OSError) as exc:
                yield SkippedPin(where, "malformed_pin_json", f"{pin_json}: {exc}", pin_id)
                continue
        yield PinRecord(
            pin_id=pin_id,
            board=board_key,
            user=user,
            category=category,
            title=_text(info.get("title")),
            description=_text(info.get("description")),
            link=_text(info.get("link")),
            path=resolved,
            board_name=board_name,
            board_description=board_desc,
            extra=_extra(info, _PIN_JSON_KEYS),
        )


def iter_folder(
    root: str | Path, *, allow_outside_root: bool = False
) -> Iterator[PinRecord | SkippedPin]:
    """Read an image folder ``ROOT/<category>/<image>`` (nested folders allowed).

    The board is the category folder, there are no users, and the pin id is the image's path
    relative to ROOT without its extension. Images lying directly in ROOT (a flat folder of
    photos) belong to one board and category named after ROOT itself.

    Linked folders are followed, each real folder read once over the whole corpus and from
    where it lies: a link to a folder of the corpus (another category's, a sub-folder, the
    root), a loop of links or a second link to a folder outside it is recorded as
    ``folder_read_before``, so an image keeps the category and id of the folder it lies in,
    never two. A linked folder outside ROOT is one ``path_outside_root`` entry unless
    ``allow_outside_root``. A folder that cannot be listed is recorded; so is a link to
    nothing (``broken_link``), whatever its name. A linked *file* is a pin of its own.
    """
    root = Path(root).resolve()
    kinds = [(e, _kind(e)) for e in _root_entries(root)]
    confine = not allow_outside_root
    loose = sorted(e.name for e, kind in kinds if kind != "dir")
    yield from _folder_pins(root, root.name, root, loose, confine)  # (links to nothing too)
    categories = [e for e, kind in kinds if kind == "dir"]
    real_dirs = {str(root)}  # the corpus's own folders (links not followed): read where they lie
    for entry in categories:
        if not entry.is_symlink():
            for dirpath, dirnames, _ in os.walk(entry.path, onerror=lambda _: None):
                real_dirs.add(dirpath)
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    seen: set[str] = set()
    for cat_entry in categories:
        errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(
            cat_entry.path, onerror=errors.append, followlinks=True
        ):
            yield from (_unreadable(e.filename, e) for e in errors)
            errors.clear()
            real = os.path.realpath(dirpath)
            linked = real != os.path.normpath(dirpath)
            if real in seen or (linked and real in real_dirs):
                dirnames[:] = []
                yield SkippedPin(
                    dirpath, "folder_read_before", f"folder {dirpath} is {real}, read where it lies"
                )
                continue
            if confine and not Path(real).is_relative_to(root):
                dirnames[:] = []
                yield SkippedPin(
                    dirpath,
                    "path_outside_root",
                    f"folder {dirpath} links to {real}, outside the corpus root {root}; "
                    "allow_outside_root (--allow-outside-root) reads it",
                )
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            yield from _folder_pins(root, cat_entry.name, Path(dirpath), filenames, confine)
        yield from (_unreadable(e.filename, e) for e in errors)


def _folder_pins(
    root: Path, folder_name: str, dirpath: Path, filenames: list[str], confine: bool
) -> Iterator[PinRecord | SkippedPin]:
    """The pins of one folder (``dirpath``, inside ``root`` once links are followed: the walk
    sees to that); with ``confine``, a file that links outside ``root`` is skipped."""
    category = normalize_category(folder_name)
    for name in sorted(filenames):
        path = dirpath / name
        if name.startswith("."):
            continue
        if not is_image_file(path):  # (few files: a stat each; an image's is the probe's)
            if os.path.islink(path) and not os.path.exists(path):
                yield SkippedPin(str(path), "broken_link", f"{path} is a symbolic link to nothing")
            continue
        rel = path.relative_to(root).with_suffix("").as_posix()
        if not _valid_name(rel):
            yield SkippedPin(
                str(path).encode("utf-8", "backslashreplace").decode("utf-8"),
                "non_utf8_name",
                "the file name is not valid UTF-8",
            )
            continue
        if not category:
            yield SkippedPin(
                str(path),
                "missing_category",
                f"folder name {folder_name!r} leaves no category (only separators)",
                rel,
            )
            continue
        # a file link only (a stat a pin; a loop of links resolves to itself, inside: the
        # probe names it broken_link)
        if confine and path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
            yield _outside_root(path, root, rel)
            continue
        yield PinRecord(
            pin_id=rel,
            board=category,
            user=None,
            category=category,
            title=path.stem.replace("_", " "),
            description="",
            path=path,
            board_name=folder_name,
        )


#: where ``csv.DictReader`` puts the fields of a row beyond the header's (a comma in an unquoted
#: title): such a row is skipped, not read with its columns shifted
_SURPLUS = "\x00surplus"
#: longest CSV field read (Python's default, 128 KiB, refuses a long description)
_CSV_FIELD_LIMIT = 64 << 20


def _manifest_rows(path: Path) -> tuple[list[str], Iterable[dict[str, object]]]:
    if path.suffix.lower() == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))  # process-wide
        # bytes that are not UTF-8 become surrogates: their rows are skipped by name
        fh = path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")
        reader = csv.DictReader(fh, restkey=_SURPLUS)
        try:
            columns = list(reader.fieldnames or [])
        except csv.Error as exc:
            fh.close()
            raise CorpusError(f"manifest {path}: its header is not CSV: {exc}") from exc
        return columns, _close_after(_csv_rows(reader, path), fh)
    import pyarrow.parquet as pq
    from pyarrow import types as pa_types

    columns = list(pq.read_schema(path).names)
    if _named_twice(columns):  # (named by read_manifest; the table would not read)
        return columns, iter(())
    table = pq.ParquetFile(path).read()  # (read_table refuses names given twice, blank too)
    keep = [i for i, c in enumerate(columns) if c.strip()]  # (blank ones, as CSV's: unused)
    rows = table.select(keep).to_pylist()
    id_type = table.schema.field("pin_id").type if "pin_id" in columns else None
    if id_type is not None and pa_types.is_floating(id_type):
        exact = 2 ** {16: 11, 32: 24, 64: 53}[id_type.bit_width]  # whole numbers held exactly
        for row in rows:
            value = row["pin_id"]
            if value is not None and math.isfinite(value) and abs(value) >= exact:
                row["pin_id"] = _InexactId(value, str(id_type), exact)
    return columns, iter(rows)


@dataclass(frozen=True)
class _InexactId:
    """A Parquet pin id in a float column, too large for the float to tell whole numbers
    apart (ids near 2^53 in a float64 column: 2^53 and 2^53 + 1 are one value)."""

    value: float
    type: str
    exact: int

    def problem(self) -> str:
        return (
            f"pin_id {self.value:.0f} of a {self.type} column is at or past {self.exact:,}, "
            "where that type cannot tell neighbouring whole numbers apart: the id may not be "
            "the one written (store pin ids as integers or text)"
        )


def _named_twice(columns: Sequence[str]) -> list[str]:
    """Column names a manifest's header gives more than once (blank ones aside: a
    spreadsheet export leaves those)."""
    return sorted(c for c, n in Counter(columns).items() if n > 1 and c.strip())


def _csv_rows(reader: csv.DictReader, path: Path) -> Iterator[dict[str, object]]:
    """The rows of a CSV manifest, read leniently (text after a closing quote is kept, as
    Python's reader does). A row the reader cannot take ends the read with its line named, and
    so does a quote the file never closes: the last row, if it spans lines, is checked by a
    strict read (else the rest of the file would be one field of it)."""
    lines = reader.reader  # (DictReader's own line_num stays at its last good row)
    last: dict[str, object] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise CorpusError(f"manifest {path}, line {lines.line_num}: {exc}") from exc
        if last is not None:
            yield last
        last = row
    if last is None:
        return
    spans = any(isinstance(v, str) and ("\n" in v or "\r" in v) for v in last.values())
    opened = _unclosed_quote(path) if spans else None
    if opened is not None:
        raise CorpusError(
            f"manifest {path}: the quote opened in the row starting on line {opened} is never "
            "closed (the rest of the file would be one field)"
        )
    yield last


def _unclosed_quote(path: Path) -> int | None:
    """The line of the row a quote opens and the file never closes, by a strict read."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        strict = csv.reader(fh, strict=True)
        while True:
            start = strict.line_num + 1
            try:
                next(strict)
            except StopIteration:
                return None
            except csv.Error as exc:  # other strict complaints: the lenient read took those
                if str(exc).startswith("unexpected end of data"):
                    return start


def _row_problem(row: dict[str, object], columns: list[str]) -> tuple[str, str] | None:
    """Why a manifest row cannot be read as its header says: (reason, detail), or None."""
    surplus = row.get(_SURPLUS)
    if surplus:
        n = len(surplus)  # type: ignore[arg-type]
        return "malformed_row", (
            f"{n} field(s) more than the header's {len(columns)} (an unquoted comma?)"
        )
    for value in row.values():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "non_utf8_row", "the row holds bytes that are not UTF-8"
    return None


def _close_after(rows: Iterable[dict[str, object]], fh: object) -> Iterator[dict[str, object]]:
    try:
        yield from rows
    finally:
        fh.close()  # type: ignore[attr-defined]


def iter_manifest(
    manifest: str | Path, root: str | Path | None = None, *, allow_outside_root: bool = False
) -> Iterator[PinRecord | SkippedPin]:
    """Read a CSV or Parquet manifest.

    Required columns: ``path`` and ``category``. Optional: ``pin_id`` (default: the path without
    extension), ``board`` (default: the category), ``user``, ``title``, ``description``, ``link``.
    Relative paths are resolved against ``root`` (default: the manifest's folder); paths that
    are absolute or escape the root are skipped unless ``allow_outside_root``.

    Raises:
        CorpusError: the manifest lacks a required column.
    """
    manifest = Path(manifest)
    base = Path(root).resolve() if root is not None else manifest.resolve().parent
    columns, rows = _manifest_rows(manifest)
    twice = _named_twice(columns)
    if twice:
        raise CorpusError(f"manifest {manifest} names column(s) {twice} more than once")
    missing = [c for c in ("path", "category") if c not in columns]
    if missing:
        raise CorpusError(
            f"manifest {manifest} lacks required column(s) {missing}; it has {columns}"
        )
    for line, row in enumerate(rows, start=2):
        problem = _row_problem(row, columns)
        if problem is not None:
            path_text = _text(row.get("path")).encode("utf-8", "backslashreplace").decode()
            with contextlib.suppress(ValueError, OSError):  # resolved where it can be
                path_text = os.path.realpath(base / path_text) if path_text else ""
            yield SkippedPin(
                path_text or f"{manifest}:{line}",
                problem[0],
                f"row {line} of {manifest}: {problem[1]}",
            )
            continue
        raw_path = _text(row.get("path"))
        if not raw_path:
            yield SkippedPin(
                f"{manifest}:{line}", "missing_path", f"row {line} of {manifest} has no path"
            )
            continue
        try:
            if "\x00" in raw_path:
                raise ValueError("the path holds a NUL byte")
            rel = Path(raw_path)
            # (realpath, not resolve: a loop of links stays as it is on every Python, and the
            # probe names it broken_link)
            full = Path(os.path.realpath(base / rel))
            default_id = rel.with_suffix("").as_posix()
        except (ValueError, OSError) as exc:  # NUL bytes, names like "/" or "..", too long
            yield SkippedPin(
                raw_path.replace("\x00", "\\0"),
                "bad_path",
                f"row {line} of {manifest}: unusable path {raw_path!r}: {exc}",
            )
            continue
        if not allow_outside_root and (rel.is_absolute() or not full.is_relative_to(base)):
            yield SkippedPin(
                str(full),  # resolved, as stored pins' paths are
                "path_outside_root",
                f"row {line} of {manifest}: {raw_path!r} is outside the corpus root {base}",
            )
            continue
        if isinstance(row.get("pin_id"), _InexactId):
            yield SkippedPin(
                str(full), "inexact_pin_id",
                f"row {line} of {manifest}: {row['pin_id'].problem()}", _text(row["pin_id"].value)
            )  # fmt: skip
            continue
        if not full.exists() and os.path.islink(base / rel):  # (realpath followed it)
            yield SkippedPin(  # (by where it leads, as a stored pin's path: cleared once there)
                str(full), "broken_link",
                f"row {line} of {manifest}: {raw_path!r} is a symbolic link to nothing",
                _text(row.get("pin_id")) or default_id,
            )  # fmt: skip
            continue
        category = normalize_category(_text(row.get("category")))
        pin_id = _text(row.get("pin_id")) or default_id
        if not category:
            yield SkippedPin(
                str(full), "missing_category", f"row {line} of {manifest} has no category", pin_id
            )
            continue
        user = _text(row.get("user")) or None
        board = _text(row.get("board")) or category
        yield PinRecord(
            pin_id=pin_id,
            board=f"{user}/{board}" if user else board,
            user=user,
            category=category,
            title=_text(row.get("title")),
            description=_text(row.get("description")),
            link=_text(row.get("link")),
            path=full,
            board_name=board,
            extra=_extra(row, _MANIFEST_KEYS),
        )


def detect_format(root: str | Path) -> str:
    """Guess a corpus format: a CSV/Parquet file is a manifest; a folder whose second level
    holds ``board.json`` or pin folders is a tree; a folder of category folders of images (or
    of images) is a folder corpus.

    Raises:
        CorpusError: the path does not exist or matches no format.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() in _MANIFEST_SUFFIXES:
            return "manifest"
        raise CorpusError(f"{root} is a file but not a manifest (.csv or .parquet)")
    if not root.is_dir():
        raise CorpusError(f"corpus {root} does not exist")
    # Looked at whole, not by the first entry found: a stray image at user level does not make
    # a tree a folder corpus, nor sub-folders of images (cars/sedan/*.jpg) a folder one a tree.
    images = pin_folders = nested_images = boards = False

    def entries(folder: str | Path) -> list[os.DirEntry[str]]:
        try:  # (what cannot be read is recorded by the reader; it does not decide the format)
            return _visible_entries(Path(folder))
        except OSError:
            return []

    for first in _root_entries(root):
        if _kind(first) != "dir":
            images |= is_image_file(Path(first.name))  # a flat folder of images
            continue
        for second in entries(first.path):
            if _kind(second) != "dir":
                images |= is_image_file(Path(second.name))  # <category>/<image>
                continue
            with contextlib.suppress(OSError):
                if (Path(second.path) / "board.json").is_file():
                    return "tree"
            boards = True
            for third in entries(second.path):
                if _kind(third) == "dir":
                    pin_folders = True  # <user>/<board>/<pin>/
                else:
                    nested_images |= is_image_file(Path(third.name))  # <category>/<sub>/<image>
    if images:
        return "folder"
    if pin_folders:
        return "tree"  # boards without board.json: read as a tree, their pins skipped with reasons
    if nested_images:
        return "folder"
    if boards:
        return "tree"
    raise CorpusError(
        f"{root} holds neither <user>/<board>/ folders (tree) nor images or "
        "<category>/<image> files (folder)"
    )


def category_rng(seed: int, category: str) -> np.random.Generator:
    """A generator seeded by (seed, category): one category's draw ignores the others."""
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])


def sample_per_category(pins: Sequence[PinRecord], n: int, seed: int) -> list[PinRecord]:
    """Draw at most ``n`` pins per category, reproducibly for a given seed.

    The draw depends only on the pin ids of each category (not on reading order).
    """
    if n <= 0:
        raise ValueError(f"per_category must be positive, got {n}")
    by_cat: dict[str, list[PinRecord]] = defaultdict(list)
    for pin in pins:
        by_cat[pin.category].append(pin)
    chosen: set[str] = set()
    for cat in sorted(by_cat):
        group = sorted(by_cat[cat], key=lambda p: p.pin_id)
        rng = category_rng(seed, cat)
        order = rng.permutation(len(group))[:n]
        chosen.update(group[i].pin_id for i in order)
    return [p for p in pins if p.pin_id in chosen]


def _category_refusal(
    item: PinRecord, drop: set[str], allowed: set[str] | None
) -> SkippedPin | None:
    """Why the category rules skip a pin (``drop_categories``, ``categories``), or None."""
    if item.category in drop:
        return SkippedPin(
            str(item.path),
            "excluded_category",
            f"category {item.category!r} is dropped (drop_categories)",
            item.pin_id,
        )
    if allowed is not None and item.category not in allowed:
        return SkippedPin(
            str(item.path),
            "unknown_category",
            f"category {item.category!r} is not among the allowed {sorted(allowed)}",
            item.pin_id,
        )
    return None


def _pixels_problem(path: str, max_pixels: int) -> ImageError | None:
    """Why an image's pixels cannot be decoded, or None (JPEGs decoded at reduced scale:
    libjpeg still reads every scan, so a cut file fails)."""
    try:
        load_rgb(path, max_pixels, min_side=64)
    except ImageError as exc:
        return exc
    return None


def _probe(pin: PinRecord, max_pixels: int, check: bool = True) -> PinRecord | SkippedPin:
    """The pin with its file's state (size, modification time: taken before the file is
    read, so a change made meanwhile shows as one) and, when ``check``, its header probed."""
    with contextlib.suppress(OSError):  # (a file gone is the probe's to say)
        st = os.stat(pin.path)
        pin = replace(pin, file_size=st.st_size, file_mtime_ns=st.st_mtime_ns)
    if not check:
        return pin
    try:
        info = probe_image(pin.path, max_pixels)
    except ImageError as exc:
        return SkippedPin(str(pin.path), exc.reason, exc.detail, pin.pin_id)
    return replace(pin, width=info.width, height=info.height)


def _iter_records(root: Path, fmt: str, config: IngestConfig) -> Iterator[PinRecord | SkippedPin]:
    if fmt == "tree":
        records = iter_tree(root, allow_outside_root=config.allow_outside_root)
        return records if config.allow_outside_root else _confined(records, root.resolve())
    if fmt == "folder":
        return iter_folder(root, allow_outside_root=config.allow_outside_root)
    if fmt == "manifest":
        return iter_manifest(root, allow_outside_root=config.allow_outside_root)
    raise ValueError(f"unknown corpus format {fmt!r}; expected one of {CORPUS_FORMATS}")


def _outside_root(path: Path, root: Path, pin_id: str) -> SkippedPin:
    return SkippedPin(
        str(path),
        "path_outside_root",
        f"{path} is outside the corpus root {root} (through a symbolic link); "
        "allow_outside_root (--allow-outside-root) reads it",
        pin_id,
    )


def _confined(
    records: Iterator[PinRecord | SkippedPin], root: Path
) -> Iterator[PinRecord | SkippedPin]:
    """A tree's pins (their paths resolved) whose file lies under ``root``; the others
    skipped as ``path_outside_root``, as a manifest's and a folder corpus's are."""
    for record in records:
        if isinstance(record, PinRecord) and not record.path.is_relative_to(root):
            yield _outside_root(record.path, root, record.pin_id)
            continue
        yield record


def read_corpus(
    root: str | Path,
    config: IngestConfig | None = None,
    *,
    exclude_ids: Iterable[str] | Mapping[str, str] = (),
) -> IngestResult:
    """Read a corpus and apply the cleaning rules of ``config``.

    Args:
        root: a tree or folder corpus directory, or a manifest file.
        config: reading rules; defaults to :class:`IngestConfig`.
        exclude_ids: pin ids already stored; they are neither re-read nor counted as duplicates.
            Given with their paths (a mapping), a pin of a stored id at another path, while
            the stored path is still there, is skipped as ``duplicate_id`` (another image: a
            second folder laid out as the first).

    Returns:
        The kept pins (in reading order), the skipped pins with reasons, and counts such that
        ``len(pins) + len(skipped) + sampled_out + already_present == found``; ``stored``
        holds the records of the stored pins as read now (their title, board, path, ... may
        have changed since), those the rules keep.
    """
    config = config or IngestConfig()
    root = Path(root)
    fmt = detect_format(root) if config.format == "auto" else config.format
    if not root.exists():
        raise CorpusError(f"corpus {root} does not exist")
    if fmt == "manifest" and not (root.is_file() and root.suffix.lower() in _MANIFEST_SUFFIXES):
        raise CorpusError(f"format manifest reads a .csv or .parquet file; {root} is not one")
    if fmt in ("tree", "folder") and not root.is_dir():
        raise CorpusError(f"format {fmt} reads a folder; {root} is not one")
    drop = {normalize_category(c) for c in config.drop_categories}
    allowed = (
        None if config.categories is None else {normalize_category(c) for c in config.categories}
    )
    paths = dict(exclude_ids) if isinstance(exclude_ids, Mapping) else {}
    known = set(exclude_ids)
    present: dict[str, PinRecord] = {}  # stored pins the rules would keep (for the draw)
    candidates: list[PinRecord] = []
    skipped: list[SkippedPin] = []
    found = already_present = 0
    for item in _iter_records(root, fmt, config):
        found += 1
        if isinstance(item, SkippedPin):
            skipped.append(item)
            continue
        refusal = _category_refusal(item, drop, allowed)
        # a stored id at another path that is still there is another image (a stored path
        # that is gone: the corpus moved, and the pin is the stored one)
        stored = paths.get(item.pin_id)
        if stored is not None and stored != str(item.path) and os.path.exists(stored):
            skipped.append(
                SkippedPin(
                    str(item.path), "duplicate_id",
                    f"pin id {item.pin_id!r} is stored already, from {stored}; another image "
                    "needs another id",
                    item.pin_id,
                )
            )  # fmt: skip
            continue
        if item.pin_id in known:
            already_present += 1
            if refusal is None and (
                item.pin_id not in present  # several copies, the stored path gone: the copy
                # whose path ends most like it (the corpus moved: the same folders below it)
                or _common_tail(item.path, stored) > _common_tail(present[item.pin_id].path, stored)
            ):
                present[item.pin_id] = item
            continue
        if refusal is not None:
            skipped.append(refusal)
            continue
        candidates.append(item)
    if candidates:
        with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
            probed = list(
                pool.map(lambda p: _probe(p, config.max_pixels, config.check_images), candidates)
            )
        candidates = [p for p in probed if isinstance(p, PinRecord)]
        skipped.extend(p for p in probed if isinstance(p, SkippedPin))
    # One pin per id, the first usable one in reading order: a copy that cannot be read does
    # not take the id from a later one that can
    seen: dict[str, str] = {}
    kept: list[PinRecord] = []
    # several copies of an id: the first whose pixels decode (a truncated file passes the
    # header probe and would only fail at embedding, with the good copy skipped); each file
    # decoded once, at reduced scale, in the probe's threads
    copies = Counter(p.pin_id for p in candidates)
    doubtful = sorted({str(p.path) for p in candidates if copies[p.pin_id] > 1})
    broken: dict[str, ImageError | None] = {}
    if config.check_images and doubtful:
        with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
            found_bad = pool.map(lambda path: _pixels_problem(path, config.max_pixels), doubtful)
            broken = dict(zip(doubtful, found_bad))
    for item in candidates:
        problem = broken.get(str(item.path)) if item.pin_id not in seen else None
        if problem is not None:
            skipped.append(SkippedPin(str(item.path), problem.reason, problem.detail, item.pin_id))
            continue
        if item.pin_id in seen:
            skipped.append(
                SkippedPin(
                    str(item.path),
                    "duplicate_id",
                    f"pin id {item.pin_id!r} also at {seen[item.pin_id]}; the first usable one "
                    "is kept",
                    item.pin_id,
                )
            )
            continue
        seen[item.pin_id] = str(item.path)
        kept.append(item)
    sampled_out = 0
    if config.per_category is not None:
        # drawn from every pin the rules keep, stored ones included: a run resumed after a
        # kill adds what the uninterrupted run would have, not another draw from the rest
        # and never past N per category with the stored ones (a corpus grown since draws anew)
        everyone = [*present.values(), *kept]
        drawn = {p.pin_id for p in sample_per_category(everyone, config.per_category, config.seed)}
        room = Counter({c: config.per_category for c in {p.category for p in kept}})
        room.subtract(p.category for p in present.values())
        sampled = []
        for p in kept:
            if p.pin_id in drawn and room[p.category] > 0:
                sampled.append(p)
                room[p.category] -= 1
        sampled_out = len(kept) - len(sampled)
        kept = sampled
    for s in skipped:
        _logger.info("skipped %s: %s (%s)", s.path, s.reason, s.detail)
    return IngestResult(
        root, fmt, kept, skipped, found, sampled_out, already_present, _board_records(kept),
        list(present.values()),
    )  # fmt: skip


def _common_tail(path: Path, other: str | None) -> int:
    """How many trailing path components ``path`` and ``other`` share."""
    if other is None:
        return 0
    n = 0
    for a, b in zip(reversed(path.parts), reversed(Path(other).parts)):
        if a != b:
            break
        n += 1
    return n


def _board_records(pins: list[PinRecord]) -> dict[str, PinRecord]:
    """One pin record per board, giving its name, user and category: a pin of the board's
    most common category (ties: the first pin's). A manifest gives each pin its own category;
    a board mixing them took its last pin's."""
    by_board: dict[str, list[PinRecord]] = {}
    for p in pins:
        by_board.setdefault(p.board, []).append(p)
    out = {}
    for board, members in by_board.items():
        counts = Counter(p.category for p in members)
        most = max(counts.values())
        out[board] = next(p for p in members if counts[p.category] == most)
    return out
