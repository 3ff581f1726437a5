"""``pinsearch check`` and ``pinsearch repair``: verify a store end to end, fix what is derived.

The check reads everything a query relies on and reports each problem with where it is:

- vector parts: file present, SHA-256 as recorded, row count, dimension, key file; no pin with
  two vectors in one backbone; every vector's pin in the catalog;
- indexes: files present and matching their JSON checksums and the catalog's, ``ntotal`` equal
  in catalog, file and id map, every id a stored vector of that backbone's pins; stored vectors
  missing from the index;
- heads and alignments: files present (checksum for alignments), loadable, dimension matching;
- ingests: ``added + skipped + sampled_out + already_present = found``;
- files the catalog does not list (left by an interrupted write);
- the pins' image files (``sources``): a pin whose file is gone is a warning (its vectors
  still answer queries, which return its path; ``pinsearch remove`` drops it), and so is one
  whose file changed since it was read (``pinsearch refresh`` embeds it again).

Errors make ``check`` exit non-zero; warnings (a lagging index, pins not embedded yet) do not.
``repair`` rebuilds derived data only — indexes from the stored vectors, vector parts without
the vectors of unknown pins, one copy of a vector stored twice — and forgets what cannot be
trusted (a damaged vector part, whose pins the next ``pinsearch index`` re-embeds; a head or
alignment whose files are gone). It never invents vectors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.catalog import recorded_file
from pinsearch.errors import CatalogError, StoreLockedError
from pinsearch.indexes.pinindex import file_sha256
from pinsearch.store import Store, catalog_error, damaged, lock_holder
from pinsearch.text import (
    TEXT_SPACE_SUFFIX,
    lacking_titles,
    text_candidates,
    text_encoder_name,
    text_space,
    title_space_outdated,
)

__all__ = ["CheckReport", "Finding", "RepairReport", "check_store", "repair_store"]


@dataclass(frozen=True)
class Finding:
    """One problem: how bad, where, what."""

    level: str  # error or warning
    where: str  # "vectors effnet_lite0 part 3", "index effnet_lite0", "head x", ...
    problem: str  # a short code: missing_file, checksum, ntotal, unknown_pins, ...
    detail: str


@dataclass
class CheckReport:
    """Everything ``check`` looked at and found."""

    store: str
    ok: bool = True
    pins: int = 0
    checked: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, where: str, problem: str, detail: str) -> None:
        self.findings.append(Finding(level, where, problem, detail))
        if level == "error":
            self.ok = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RepairReport:
    """What ``repair`` changed, and the check after it."""

    store: str
    actions: list[str] = field(default_factory=list)
    after: CheckReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pin_keys(store: Store) -> np.ndarray:
    return store.catalog.pin_columns()[0]


def _check_parts(store: Store, name: str, pins: np.ndarray, report: CheckReport) -> np.ndarray:
    """Check one backbone's vector parts; returns the keys of the readable ones."""
    run = store.catalog.get_embedding(name) or {}
    dim = run.get("dim")
    vs = store.vectors(name)
    keys: list[np.ndarray] = []
    for part in store.catalog.vector_parts(name):
        where = f"vectors {name} part {part['part']}"
        path = store.root / str(part["file"])
        kpath = vs._keys_path(part)
        report.checked["vector_parts"] = report.checked.get("vector_parts", 0) + 1
        try:
            vs._check_file(part)  # (an altered catalog: no file of it is read)
        except CatalogError:
            report.add("error", where, "not_a_part_file", f"the catalog names {part['file']!r}")
            continue
        if not path.is_file() or not kpath.is_file():
            report.add("error", where, "missing_file", f"{path.name} or its key file is missing")
            continue
        if file_sha256(path) != part["sha256"]:
            report.add("error", where, "checksum", f"{path} does not match its recorded SHA-256")
            continue
        if part.get("keys_sha256") and file_sha256(kpath) != part["keys_sha256"]:
            report.add("error", where, "checksum", f"{kpath} does not match its recorded SHA-256")
            continue
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            k = np.load(kpath, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty key file
            report.add("error", where, "unreadable", f"{path}: {exc}")
            continue
        if arr.ndim != 2 or len(arr) != part["n"] or len(k) != part["n"]:
            report.add(
                "error", where, "row_count",
                f"catalog says {part['n']} rows; vectors {arr.shape}, keys {k.shape}",
            )  # fmt: skip
            continue
        if dim is not None and arr.shape[1] != dim:
            report.add("error", where, "dimension", f"{arr.shape[1]}-d vectors, run says {dim}")
            continue
        keys.append(k)
    allk = np.concatenate(keys) if keys else np.empty(0, np.int64)
    report.checked["vectors"] = report.checked.get("vectors", 0) + len(allk)
    uniq, counts = np.unique(allk, return_counts=True)
    if (counts > 1).any():
        report.add(
            "error", f"vectors {name}", "duplicate_vectors",
            f"{int((counts > 1).sum())} pins have several vectors (e.g. key {uniq[counts > 1][0]})",
        )  # fmt: skip
    unknown = np.setdiff1d(uniq, pins)
    if unknown.size:
        report.add(
            "error", f"vectors {name}", "unknown_pins",
            f"{unknown.size} vectors of pins not in the catalog (e.g. {unknown[:3].tolist()})",
        )  # fmt: skip
    if "#" not in name:
        lacking = np.setdiff1d(pins, uniq)
        if lacking.size:
            report.add(
                "warning", f"vectors {name}", "not_embedded",
                f"{lacking.size} pins have no {name} vector yet (pinsearch index embeds them)",
            )  # fmt: skip
    if run.get("count") is not None and int(run["count"]) != len(allk) and not report.errors:
        report.add(
            "warning", f"vectors {name}", "count",
            f"embedding run says {run['count']} vectors, the parts hold {len(allk)}",
        )  # fmt: skip
    orphans, retired = vs.unrecorded_files(), set(vs.retired())
    kept = [f for f in orphans if f in retired]  # for readers of the previous snapshot
    if kept:
        report.checked["retired_vector_files"] = report.checked.get(
            "retired_vector_files", 0
        ) + len(kept)
    leftovers = [f for f in orphans if f not in retired]
    if leftovers:
        report.add(
            "warning", f"vectors {name}", "orphan_files",
            f"{len(leftovers)} files not in the catalog (e.g. {leftovers[0]}): left by an "
            "interrupted write; the next writer removes them",
        )  # fmt: skip
    return uniq


def _check_index(
    store: Store, row: dict[str, Any], vec_keys: dict[str, np.ndarray], pins: np.ndarray,
    report: CheckReport,
) -> None:  # fmt: skip
    import faiss

    name = row["name"]
    where = f"index {name}"
    report.checked["indexes"] = report.checked.get("indexes", 0) + 1
    base = store.index_base(name)
    files = {s: base.with_name(base.name + s) for s in (".faiss", ".ids.npy", ".json")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        report.add("error", where, "missing_file", f"missing {missing}; pinsearch repair")
        return
    try:
        meta = json.loads(files[".json"].read_text())
        sums = meta["sha256"]
        if not isinstance(sums, dict):
            raise TypeError(f"its sha256 is a {type(sums).__name__}, not an object")
    except (ValueError, OSError, KeyError, TypeError) as exc:  # (valid JSON of another shape)
        report.add("error", where, "unreadable", f"{files['.json']}: {exc!r}; pinsearch repair")
        return
    for key, suffix in (("faiss", ".faiss"), ("ids", ".ids.npy")):
        if file_sha256(files[suffix]) != sums.get(key):
            report.add("error", where, "checksum", f"{files[suffix]} does not match its JSON")
            return
    if sums.get("faiss") != row["sha256"]:
        report.add("error", where, "checksum", "the catalog records another index file")
        return
    index = faiss.read_index(str(files[".faiss"]))
    ids = np.load(files[".ids.npy"], allow_pickle=False)
    if not (index.ntotal == row["ntotal"] == len(ids)):
        report.add(
            "error", where, "ntotal",
            f"file holds {index.ntotal}, id map {len(ids)}, catalog {row['ntotal']}",
        )  # fmt: skip
        return
    if index.d != row["dim"]:
        report.add("error", where, "dimension", f"file is {index.d}-d, catalog {row['dim']}")
    if len(np.unique(ids)) != len(ids):
        report.add("error", where, "duplicate_ids", "the id map names a pin twice")
    stray = np.setdiff1d(ids, pins)
    if stray.size:
        report.add(
            "error", where, "unknown_pins",
            f"{stray.size} ids are not pins of the catalog (e.g. {stray[:3].tolist()})",
        )  # fmt: skip
    stored = vec_keys.get(row["backbone"], np.empty(0, np.int64))
    extra = np.setdiff1d(ids, stored)
    if extra.size and not stray.size:
        report.add(
            "error", where, "no_vector",
            f"{extra.size} ids have no stored {row['backbone']} vector (e.g. {extra[:3].tolist()})",
        )  # fmt: skip
    lag = np.setdiff1d(stored, ids)
    if lag.size:
        report.add(
            "warning", where, "lagging",
            f"{lag.size} stored vectors are not in the index (pinsearch index or repair adds them)",
        )  # fmt: skip


def _check_heads(store: Store, report: CheckReport) -> None:
    from pinsearch.heads import load_head

    rows = store.catalog.query("SELECT name, backbone, file, classes FROM heads ORDER BY name")
    for row in rows:
        where = f"head {row['name']}"
        report.checked["heads"] = report.checked.get("heads", 0) + 1
        base = store.root / str(row["file"])
        try:
            head = load_head(recorded_file(store.root, row["file"], "heads", where))
        except Exception as exc:  # missing, truncated or altered files raise several types
            report.add("error", where, "unreadable", f"{base}: {exc}")
            continue
        recorded = json.loads(row["classes"] or "[]")
        if [str(c) for c in head.classes_] != recorded:  # another head's files
            report.add(
                "error", where, "classes",
                f"{base}: its classes {_few(head.classes_)} are not those recorded "
                f"{_few(recorded)}",
            )  # fmt: skip
            continue
        run = store.catalog.get_embedding(row["backbone"]) or {}
        dims = {run.get("dim")}
        if "+" in row["backbone"]:  # fused features: the blocks' dimensions add up
            parts = [store.catalog.get_embedding(b) or {} for b in row["backbone"].split("+")]
            dims = {sum(int(p.get("dim") or 0) for p in parts)}
        if head.n_features_in_ not in dims:
            report.add(
                "error", where, "dimension",
                f"expects {head.n_features_in_}-d vectors, {row['backbone']} has {dims.pop()}",
            )  # fmt: skip


def _check_alignments(store: Store, report: CheckReport) -> None:
    from pinsearch.align import load_alignment

    for row in store.info().alignments:
        where = f"alignment {row['backbone']}"
        report.checked["alignments"] = report.checked.get("alignments", 0) + 1
        try:
            found = load_alignment(store, row["backbone"])
        except Exception as exc:  # IndexFileError for a missing or altered file
            report.add("error", where, "unreadable", str(exc))
            continue
        run = store.catalog.get_embedding(row["backbone"]) or {}
        if found is not None and found[0]["image_weight"].shape[1] != run.get("dim"):
            report.add("error", where, "dimension", "projection does not fit the backbone")


def _renamed_categories(store: Store) -> dict[str, str]:
    """Stored categories today's cleaning rules spell otherwise (``arts_–_crafts`` ->
    ``arts_crafts``, stored before dashes and typographic apostrophes were cleaned)."""
    from pinsearch.ingest import normalize_category

    rows = store.catalog.query(
        "SELECT DISTINCT category AS c FROM pins WHERE category IS NOT NULL "
        "UNION SELECT DISTINCT category FROM boards WHERE category IS NOT NULL"
    )
    return {r["c"]: new for r in rows if (new := normalize_category(r["c"])) and new != r["c"]}


def _check_categories(store: Store, report: CheckReport) -> None:
    renamed = _renamed_categories(store)
    if renamed:
        pairs = ", ".join(f"{old!r} -> {new!r}" for old, new in sorted(renamed.items())[:5])
        report.add(
            "warning", "categories", "categories_not_normalised",
            f"{len(renamed)} categories stored before today's cleaning rules ({pairs}): a "
            "filter typed either way misses them and an add files new pins under the new "
            "name; pinsearch repair renames them (heads trained on them go stale)",
        )  # fmt: skip


def _check_ingests(store: Store, report: CheckReport) -> None:
    rows = store.catalog.query(
        "SELECT ingest_id, found, added, skipped, sampled_out, already_present FROM ingests"
    )
    for r in rows:
        accounted = r["added"] + r["skipped"] + r["sampled_out"] + r["already_present"]
        if accounted != r["found"]:
            report.add(
                "error", f"ingest {r['ingest_id']}", "pins_unaccounted",
                f"found {r['found']} but added + skipped + sampled out + already present = "
                f"{accounted}",
            )  # fmt: skip


def check_store(path: str | Path, *, sources: bool = True) -> CheckReport:
    """Verify a store (read-only) and report every problem found.

    Args:
        sources: also look for the pins' image files (a ``stat`` each, several at once).

    Raises:
        StoreLockedError: a writer is at work (a reader would see its snapshot of the catalog
            beside the files the writer is changing: differences that are not damage).
    """
    import duckdb

    with Store.open(path, read_only=True, verify=False) as store:
        if store.snapshot:
            raise StoreLockedError(
                f"store {store.root} is being written ({lock_holder(store.root)}); check it "
                "when that write is done"
            )
        try:
            report = _check_open(store)
            _check_refresh(store, report)
            if sources:
                _check_sources(store, report)
        except duckdb.Error as exc:  # (pages read as they are needed: damage shows here)
            if not damaged(exc):
                raise
            raise catalog_error(store.root, exc) from exc
        return report


def _check_refresh(store: Store, report: CheckReport) -> None:
    from pinsearch.edit import pending_refresh

    pending = pending_refresh(store)
    if pending:
        report.add(
            "warning", "refresh", "refresh_pending",
            f"an interrupted pinsearch refresh left the new vectors of "
            f"{len(set().union(*pending.values()))} pins out of the indexes of "
            f"{', '.join(sorted(pending))} (their old ones answer); pinsearch refresh finishes it",
        )  # fmt: skip
    texts = None
    for backbone in store.backbones():
        if text_encoder_name(store, backbone) is None:
            continue
        if title_space_outdated(store, backbone):
            report.add(
                "warning", "titles", "title_space_outdated",
                f"the title vectors of {backbone!r} were made by another text encoder or "
                "alignment than its text queries use (an align stopped before it embedded "
                "them again): title and fused queries refuse them; pinsearch refresh embeds "
                "them again",
            )  # fmt: skip
            continue
        space = text_space(backbone)
        if any(f.where.startswith(f"vectors {space} part ") for f in report.errors):
            continue  # (a part check could not read: no count of its pins would be right)
        texts = text_candidates(store) if texts is None else texts
        lacking = lacking_titles(store, backbone, texts)
        unindexed = len(store.vectors(space)) > 0 and store.catalog.get_index(space) is None
        if lacking or unindexed:
            report.add(
                "warning", "titles", "title_vectors_missing",
                f"{lacking} pins with a title or description have no vector in {space}"
                + (", and its vectors no index" if unindexed else "")
                + " (a run stopped before it made them): title and fused queries "
                + ("refuse the space" if unindexed else "miss those pins")
                + "; pinsearch refresh makes them",
            )  # fmt: skip
    retitled = store.catalog.titles_pending()
    spaces = [b for b in store.backbones(text_spaces=True) if b.endswith(TEXT_SPACE_SUFFIX)]
    if retitled and spaces:
        report.add(
            "warning", "titles", "titles_pending",
            f"{len(retitled)} pins' titles or descriptions changed and an interrupted run left "
            f"their title vectors in {', '.join(spaces)} of the old text; pinsearch refresh "
            "embeds them again",
        )  # fmt: skip


def _check_sources(store: Store, report: CheckReport) -> None:
    """Warn about pins whose image file is gone (or is no longer a file), or changed since it
    was read, and about a refresh left unfinished."""
    from pinsearch.edit import changed_files, stat_files

    states = store.catalog.file_states()
    size, mtime = stat_files(states["path"].tolist())
    report.checked["source_files"] = len(size)

    def examples(where: np.ndarray) -> str:
        return ", ".join(f"{states['pin_id'][i]} ({states['path'][i]})" for i in where[:3])

    gone = np.flatnonzero(size < 0)
    if gone.size:
        report.add(
            "warning", "sources", "missing_source_files",
            f"{gone.size} of {len(size)} pins' image files are gone (e.g. {examples(gone)}): "
            "their vectors still answer queries; pinsearch remove --pin drops them (pinsearch "
            "refresh --remove-missing: all of them)",
        )  # fmt: skip
    changed = np.flatnonzero(changed_files(states, size, mtime))
    if changed.size:
        report.add(
            "warning", "sources", "changed_source_files",
            f"{changed.size} of {len(size)} pins' image files changed since they were read "
            f"(e.g. {examples(changed)}): their vectors are of the old images; pinsearch "
            "refresh embeds them again",
        )  # fmt: skip


def _check_open(store: Store) -> CheckReport:
    report = CheckReport(store=str(store.root))
    pins = _pin_keys(store)
    report.pins = len(pins)
    vec_keys = {
        name: _check_parts(store, name, pins, report) for name in store.backbones(text_spaces=True)
    }
    for row in store.catalog.list_indexes():
        _check_index(store, row, vec_keys, pins, report)
    for backbone in _unindexed(store):
        kept = sorted(store.emptied_indexes_of(backbone))
        report.add(
            "error", f"backbone {backbone}", "no_index",
            f"{len(store.vectors(backbone))} stored vectors and no index (a run stopped before "
            "it built one" + (f"; kept settings of {kept}" if kept else "") + "): its queries "
            "fail; pinsearch repair builds it",
        )  # fmt: skip
    stray = store.stray_index_files()
    if stray:
        report.add(
            "warning", "indexes", "orphan_files",
            f"{len(stray)} files no index owns (e.g. {stray[0].name}): left by an interrupted "
            "write; the next writer removes them",
        )  # fmt: skip
    _check_heads(store, report)
    _check_alignments(store, report)
    _check_ingests(store, report)
    _check_categories(store, report)
    return report


def repair_store(path: str | Path) -> RepairReport:
    """Fix what ``check`` finds that can be derived again; see the module docstring."""
    out = RepairReport(store=str(path))
    with Store.open(path, verify=False) as store:  # a writer: orphan files go at open
        before = _check_open(store)
        bad_parts: dict[str, list[int]] = {}
        unknown: dict[str, bool] = {}
        twice: dict[str, bool] = {}
        for f in before.errors:
            kind, _, rest = f.where.partition(" ")
            if kind == "vectors" and " part " in rest and f.problem != "duplicate_vectors":
                name, _, number = rest.rpartition(" part ")
                bad_parts.setdefault(name, []).append(int(number))
            elif kind == "vectors" and f.problem == "unknown_pins":
                unknown[rest] = True
            elif kind == "vectors" and f.problem == "duplicate_vectors":
                twice[rest.partition(" part ")[0]] = True
        pins = _pin_keys(store)
        for name in store.backbones(text_spaces=True):
            vs = store.vectors(name)
            drop = np.empty(0, np.int64)
            if unknown.get(name):
                drop = np.setdiff1d(_readable_keys(store, name, bad_parts.get(name, [])), pins)
            if bad_parts.get(name) or drop.size:
                n = vs.drop_keys(drop, parts=bad_parts.get(name), delete_retired=True)
                store.catalog.upsert_embedding(name, count=len(vs))
                out.actions.append(
                    f"vectors {name}: removed {n} vectors (damaged parts "
                    f"{bad_parts.get(name, [])}, {drop.size} of unknown pins); "
                    "pinsearch index re-embeds the pins that lost theirs"
                )
            if twice.get(name):
                n = _keep_one_copy(vs)
                out.actions.append(
                    f"vectors {name}: kept one vector of each of {n} pins stored more than once "
                    "(the newest part's)"
                )
        for row in store.catalog.list_indexes():
            name, backbone = row["name"], row["backbone"]
            gone = backbone not in store.backbones(text_spaces=True)
            problems = [f for f in before.findings if f.where == f"index {name}"]
            if (
                gone
                or problems
                or backbone in bad_parts
                or unknown.get(backbone)
                or twice.get(backbone)
            ):
                if store.rebuild_index(name) == "dropped":
                    out.actions.append(f"index {name}: dropped (no stored vectors to rebuild from)")
                else:
                    n = len(store.vectors(backbone))
                    out.actions.append(f"index {name}: rebuilt from {n} stored vectors")
        renamed = _renamed_categories(store)
        if renamed:
            con = store.catalog.connection
            with store.catalog.transaction():
                for old, new in renamed.items():
                    for table in ("pins", "boards"):
                        con.execute(f"UPDATE {table} SET category = ? WHERE category = ?",
                                    [new, old])  # fmt: skip
                stale = store.mark_heads_stale(store.backbones())
            out.actions.append(
                f"categories: renamed {len(renamed)} to today's spelling"
                + (f"; heads now stale: {stale}" if stale else "")
            )
        for backbone in _unindexed(store):  # (with the settings a remove of every pin kept)
            built = store.revive_indexes(backbone)
            if not built:
                store.build_index(backbone)  # (the default settings, under its name)
                built = [backbone]
            out.actions.append(f"backbone {backbone}: built index(es) {built}")
        for f in before.errors:
            if f.where.startswith("head "):
                head = f.where.removeprefix("head ")
                store.catalog.connection.execute("DELETE FROM heads WHERE name = ?", [head])
                out.actions.append(f"head {head}: forgotten ({f.problem}); train it again")
            elif f.where.startswith("alignment "):
                backbone = f.where.removeprefix("alignment ")
                for table in ("alignments", "alignment_pins"):
                    if store.catalog.has_table(table):
                        store.catalog.connection.execute(
                            f"DELETE FROM {table} WHERE backbone = ?", [backbone]
                        )
                out.actions.append(f"alignment {backbone}: forgotten; run pinsearch align again")
    out.after = check_store(path, sources=False)  # (image files are not repair's business)
    return out


def _unindexed(store: Store) -> list[str]:
    """Image backbones with stored vectors and no index (title spaces are checked apart)."""
    return [
        b
        for b in store.backbones()
        if not store.index_names(b, text_spaces=False) and len(store.vectors(b))
    ]


def _keep_one_copy(vs: Any) -> int:
    """Swap every vector a backbone stores more than once for one copy, the last part's;
    returns how many pins had several."""
    parts = vs.parts()
    keys = [vs._load_keys(p) for p in parts]
    every = np.concatenate(keys) if keys else np.empty(0, np.int64)
    unique, counts = np.unique(every, return_counts=True)
    twice = unique[counts > 1]
    if not twice.size:
        return 0
    newest: dict[int, np.ndarray] = {}
    dtype = "float32"
    for part, part_keys in zip(parts, keys):
        hit = np.isin(part_keys, twice)
        if hit.any():
            rows = np.load(vs.root / str(part["file"]), allow_pickle=False)
            dtype = str(rows.dtype)
            newest.update(zip(part_keys[hit].tolist(), rows[hit]))
    order = np.array(sorted(newest), dtype=np.int64)
    vs.replace(np.stack([newest[int(k)] for k in order]), order, dtype)
    return len(order)


def _readable_keys(store: Store, name: str, skip: list[int]) -> np.ndarray:
    vs = store.vectors(name)
    parts = store.catalog.vector_parts(name)  # (the skipped ones are not checked)
    keys = [vs._load_keys(p) for p in parts if int(p["part"]) not in skip]
    return np.concatenate(keys) if keys else np.empty(0, np.int64)


def _few(values: Any, n: int = 5) -> str:
    """The first ``n`` of ``values`` as text, and how many more there are."""
    items = [str(v) for v in values]
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{items[:n]}{more}"
