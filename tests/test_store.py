"""Tests for pinsearch.store and pinsearch.vectors: opening, versions, locking, integrity, info."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pinsearch.embed import EmbedConfig
from pinsearch.errors import IndexFileError, StoreLockedError, StoreVersionError
from pinsearch.indexes import IndexConfig
from pinsearch.ingest import read_corpus
from pinsearch.pipeline import index_corpus
from pinsearch.store import STORE_FORMAT_VERSION, Store

BACKBONE = "test_efficientnet"


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _ids_file(root: Path, name: str = BACKBONE) -> Path:
    return root / "indexes" / f"{name}.ids.npy"


# -- creating and opening ---------------------------------------------------------------------


def test_create_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store.open(root, create=True) as store:
        assert not store.read_only
        assert store.catalog.count_pins() == 0
        assert store.backbones() == [] and store.index_names() == []
    meta = json.loads((root / "store.json").read_text())
    assert meta["format"] == "pinsearch-store" and meta["format_version"] == STORE_FORMAT_VERSION
    assert (root / "catalog.duckdb").is_file()
    with Store.open(root) as again:
        assert again.catalog.get_meta("last_written_by")
    with Store.open(root, read_only=True) as ro:
        assert ro.read_only and ro.info().pins == 0


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no pinsearch store"):
        Store.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        Store.open(tmp_path / "missing", create=True, read_only=True)
    assert not (tmp_path / "missing").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        Store.open(busy, create=True)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    Store.open(empty, create=True).close()  # an empty folder may become a store
    assert (empty / "store.json").is_file()


@pytest.mark.parametrize(
    "content",
    [
        {
            "format": "pinsearch-store",
            "format_version": STORE_FORMAT_VERSION + 1,
            "created_by": "9.9",
        },
        {"format": "pinsearch-store", "format_version": 0},
        {"format": "something-else", "format_version": STORE_FORMAT_VERSION},
        "not json at all",
    ],
    ids=["newer", "older", "foreign", "garbage"],
)
@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_other_format_version_changes_nothing(store_copy: Path, content, read_only: bool) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (store_copy / "store.json").write_text(text)
    lock = store_copy / ".lock"
    if lock.exists():
        lock.unlink()
    before = _snapshot(store_copy)
    with pytest.raises(StoreVersionError) as info:
        Store.open(store_copy, read_only=read_only)
    if isinstance(content, dict) and content["format"] == "pinsearch-store":
        assert "format version" in str(info.value) and "Nothing was changed" in str(info.value)
    assert _snapshot(store_copy) == before
    assert not lock.exists()


# -- the write lock -------------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(store_copy: Path) -> None:
    with Store.open(store_copy):
        with pytest.raises(StoreLockedError) as info:
            Store.open(store_copy)
        assert f"PID {os.getpid()}" in str(info.value)
    # Released on close: a new writer gets in.
    with Store.open(store_copy) as store:
        assert store.catalog.count_pins() == 24


_HOLDER = """
import sys
from pinsearch.store import Store
store = Store.open(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
store.close()
print("released", flush=True)
"""


def test_second_writer_in_another_process_is_refused(store_copy: Path) -> None:
    env = {**os.environ, "PINSEARCH_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(store_copy)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
        with pytest.raises(StoreLockedError) as info:
            Store.open(store_copy)
        assert f"PID {proc.pid}" in str(info.value)
        assert (store_copy / ".lock").read_text().strip() == str(proc.pid)
        # DuckDB admits one writer *or* readers: a reader reads the writer's published snapshot.
        with Store.open(store_copy, read_only=True) as reader:
            assert reader.snapshot and reader.catalog.count_pins() == 24
    finally:
        out, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0, err
    assert "released" in out
    with Store.open(store_copy):  # free again once the holder exited
        assert (store_copy / ".lock").read_text().strip() == str(os.getpid())


def test_read_only_store_takes_no_lock(store_copy: Path) -> None:
    with Store.open(store_copy, read_only=True) as ro:
        assert ro.read_only
        with Store.open(store_copy, read_only=True) as ro2:  # several readers at once
            assert ro2.catalog.count_pins() == ro.catalog.count_pins() == 24


# -- integrity checks at open ---------------------------------------------------------------


def test_index_id_map_with_unknown_key_is_refused_then_healed(store_copy: Path) -> None:
    ids = np.load(_ids_file(store_copy))
    ids[3] = 10**9  # a pin key the catalog does not know
    np.save(_ids_file(store_copy), ids)
    with pytest.raises(IndexFileError, match="not in the catalog"):
        Store.open(store_copy, read_only=True)  # a reader changes nothing
    with pytest.raises(IndexFileError, match="not in the catalog"):
        Store.open(store_copy, read_only=True)
    with Store.open(store_copy) as store:  # a writer rebuilds the index from the vectors
        index = store.load_index(BACKBONE)  # (it also sees the id map's checksum is off)
        assert index.ntotal == 24 and 10**9 not in index.ids
        assert sorted(index.ids) == sorted(store.vectors(BACKBONE).keys())


def test_index_id_map_of_wrong_length_or_missing(store_copy: Path) -> None:
    ids = np.load(_ids_file(store_copy))
    np.save(_ids_file(store_copy), ids[:-1])
    with pytest.raises(IndexFileError, match="entries"):
        Store.open(store_copy, read_only=True)
    _ids_file(store_copy).unlink()
    with pytest.raises(IndexFileError, match="missing"):
        Store.open(store_copy, read_only=True)


def test_damaged_index_file_is_reported_on_load(store_copy: Path) -> None:
    faiss_file = store_copy / "indexes" / f"{BACKBONE}.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    with Store.open(store_copy, read_only=True) as store, pytest.raises(IndexFileError):
        store.load_index(BACKBONE)
    assert faiss_file.read_bytes() == bytes(data)


def test_orphan_vector_files_are_removed_by_the_next_writer(store_copy: Path) -> None:
    folder = store_copy / "vectors" / BACKBONE
    kept = sorted(p.name for p in folder.iterdir())
    (folder / "part-000099.npy").write_bytes(b"leftover")
    (folder / "part-000099.npy.tmp").write_bytes(b"leftover")
    with Store.open(store_copy, read_only=True):
        pass
    assert (folder / "part-000099.npy").exists()  # readers never delete anything
    with Store.open(store_copy):
        pass
    assert sorted(p.name for p in folder.iterdir()) == kept


# -- vectors and indexes --------------------------------------------------------------------


def test_vectors_load_by_key(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        vs = store.vectors(BACKBONE)
        all_vecs, all_keys = vs.load()
        assert len(vs) == len(all_keys) == 24 and all_vecs.dtype == np.float32
        assert sorted(all_keys.tolist()) == list(range(24))
        np.testing.assert_array_equal(vs.keys(), all_keys)
        want = np.array([all_keys[5], 12345, all_keys[0], all_keys[17]])
        vecs, keys = vs.load(want)
        np.testing.assert_array_equal(keys, want[[0, 2, 3]])  # unknown key left out
        np.testing.assert_array_equal(vecs, all_vecs[[5, 0, 17]])
        empty_v, empty_k = vs.load(np.array([], np.int64))
        assert empty_v.shape == (0, all_vecs.shape[1]) and empty_k.size == 0


def test_a_reader_maps_each_part_once_and_a_write_drops_the_maps(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        vs = store.vectors(BACKBONE)
        all_vecs, all_keys = vs.load()
        first, _ = vs.load(all_keys[:3])
        mapped = dict(vs._maps)
        assert mapped and vs.load(all_keys[:3])[0].tobytes() == first.tobytes()
        assert all(vs._maps[p] is m for p, m in mapped.items())  # the same maps, no new opens
        vs.write_part(all_vecs[:2] * 2, np.array([1000, 1001]))
        assert vs._maps == {}  # parts changed: mapped again when next read
        vecs, keys = vs.load(np.array([1001, all_keys[0]]))
        assert keys.tolist() == [1001, all_keys[0]]
        chunks = list(vs.iter_chunks(5))  # storage order, five rows at a time, part by part
        assert max(len(k) for _, k in chunks) == 5
        np.testing.assert_array_equal(np.concatenate([k for _, k in chunks]), vs.keys())
        np.testing.assert_array_equal(np.concatenate([v for v, _ in chunks]), vs.load()[0])
        with pytest.raises(ValueError, match="rows must be at least 1"):
            next(vs.iter_chunks(0))
        np.testing.assert_array_equal(vecs, np.stack([all_vecs[1] * 2, all_vecs[0]]))


def test_write_part_rejects_bad_input(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        vs = store.vectors(BACKBONE)
        dim = vs.load()[0].shape[1]
        with pytest.raises(ValueError, match="non-finite"):
            vs.write_part(np.full((1, dim), np.nan, np.float32), np.array([0]))
        with pytest.raises(ValueError, match="dtype"):
            vs.write_part(np.zeros((1, dim), np.float32), np.array([0]), dtype="int8")
        with pytest.raises(ValueError, match="past the float16 range"):  # (inf was stored)
            vs.write_part(np.full((1, dim), 1e5, np.float32), np.array([0]), dtype="float16")
        with pytest.raises(ValueError, match="keys"):
            vs.write_part(np.zeros((2, dim), np.float32), np.array([0]))
        assert len(vs) == 24 and len(vs.parts()) == len(store.vectors(BACKBONE).parts())


def test_build_update_and_named_indexes(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        assert store.resolve_backbone(None) == BACKBONE
        with pytest.raises(ValueError, match="no vectors"):
            store.resolve_backbone("test_convnext")
        index = store.build_index(
            BACKBONE, IndexConfig(factory="Flat", metric="l2", device="cpu"), name="exact_l2"
        )
        assert index.ntotal == 24 and index.config.metric == "l2"
        assert sorted(store.index_names()) == sorted([BACKBONE, "exact_l2"])
        assert store.index_names("other") == []
        row = store.catalog.get_index("exact_l2")
        assert (row["factory"], row["metric"], row["ntotal"]) == ("Flat", "l2", 24)
        assert (store_copy / row["file"]).is_file()
        _, added = store.update_index("exact_l2")
        assert added == 0
        with pytest.raises(ValueError, match="no index"):
            store.load_index("nope")
        with pytest.raises(ValueError, match=r"would share its files .* with index 'exact_l2'"):
            store.build_index(BACKBONE, IndexConfig(factory="Flat", device="cpu"), name="exact:l2")
        assert store.catalog.get_index("exact_l2")["metric"] == "l2"  # left as it was
    with Store.open(store_copy, read_only=True) as ro:
        loaded = ro.load_index("exact_l2", config=IndexConfig(device="cpu"))
        assert loaded.ntotal == 24 and loaded.config.metric == "l2"
        assert ro.load_index(backbone=BACKBONE).factory == "Flat"


def test_empty_store_has_no_backbone(tmp_path: Path) -> None:
    with (
        Store.open(tmp_path / "s", create=True) as store,
        pytest.raises(ValueError, match="no embeddings"),
    ):
        store.resolve_backbone(None)


# -- info -----------------------------------------------------------------------------------


def test_info_counts(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        info = store.info()
    corpus = built_store.corpus
    assert info.format_version == STORE_FORMAT_VERSION
    assert (info.pins, info.users, info.boards) == (24, 2, 6)
    assert [(c["category"], c["pins"], c["boards"]) for c in info.categories] == [
        ("architecture", 8, 2),
        ("cars_motorcycles", 8, 2),
        ("food_drink", 8, 2),
    ]
    assert sorted(b["board"] for b in info.top_boards) == sorted(corpus.boards)
    assert all(b["pins"] == 4 and b["name"] for b in info.top_boards)
    (emb,) = info.embeddings
    assert (emb["backbone"], emb["count"], emb["dtype"], emb["weights"]) == (
        BACKBONE,
        24,
        "float32",
        "random",
    )
    assert emb["dim"] > 0 and emb["normalize"] is False
    assert (emb["device"], emb["amp"], emb["decode"]) == ("cpu", False, "pil")  # how it ran
    (idx,) = info.indexes
    assert (idx["name"], idx["factory"], idx["ntotal"], idx["metric"]) == (
        BACKBONE,
        "Flat",
        24,
        "cosine",
    )
    assert info.skipped == 0 and info.skipped_by_reason == []
    (ing,) = info.ingests
    assert (ing["found"], ing["added"], ing["format"]) == (24, 24, "tree")


def test_info_reports_skipped_reasons(tree_copy: Path, tmp_path: Path) -> None:
    jpgs = sorted(tree_copy.glob("*/*/*/*.jpg"))
    jpgs[0].write_bytes(b"")  # ingest: empty_file
    jpgs[1].write_text("text")  # ingest: not_an_image
    jpgs[2].write_text("more text")  # ingest: not_an_image
    data = jpgs[3].read_bytes()
    jpgs[3].write_bytes(data[: len(data) // 2])  # embed: truncated
    (jpgs[4].parent / "pin.json").write_text("{oops")  # ingest: malformed_pin_json
    report = index_corpus(
        tree_copy, tmp_path / "s", backbone=BACKBONE, embed=EmbedConfig(workers=0, batch_size=16)
    )
    assert (report.found, report.added, report.skipped, report.embed_failed) == (24, 20, 4, 1)
    with Store.open(tmp_path / "s", read_only=True) as store:
        info = store.info()
    assert info.pins == 19 and info.skipped == 5
    by = {(r["stage"], r["reason"]): r["pins"] for r in info.skipped_by_reason}
    assert by == {
        ("ingest", "not_an_image"): 2,
        ("ingest", "empty_file"): 1,
        ("ingest", "malformed_pin_json"): 1,
        ("embed", "truncated"): 1,
    }
    assert info.skipped_by_reason[0]["reason"] == "not_an_image"  # most frequent first
    assert sum(c["pins"] for c in info.categories) == 19


def test_store_survives_reading_a_corpus_twice(store_copy: Path, built_store) -> None:
    with Store.open(store_copy) as store:
        result = read_corpus(built_store.corpus.root, exclude_ids=store.catalog.pin_ids())
        assert result.pins == [] and result.already_present == 24


def test_search_time_settings_stay_with_their_caller(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        name = store.index_names()[0]
        tuned = store.load_index(name, config=IndexConfig(device="cpu", precision="float16"))
        assert tuned.config.precision == "float16"
        saved = store.load_index(name)  # not the tuned copy
        assert saved is not tuned and saved.config.precision == "float32"
        store.save_index(saved, name)
    with Store.open(store_copy, read_only=True) as store:
        assert json.loads(store.catalog.get_index(name)["config"])["precision"] == "float32"


def test_a_format_1_store_is_read_then_upgraded_by_its_first_writer(store_copy: Path) -> None:
    import duckdb

    meta = json.loads((store_copy / "store.json").read_text())
    (store_copy / "store.json").write_text(json.dumps({**meta, "format_version": 1}))
    con = duckdb.connect(str(store_copy / "catalog.duckdb"))
    con.execute("ALTER TABLE vector_parts DROP COLUMN keys_sha256")  # the format-1 schema
    con.close()
    with Store.open(store_copy, read_only=True) as store:
        assert store.info().format_version == 1 and store.vectors(BACKBONE).load()[0].shape[0] == 24
    assert json.loads((store_copy / "store.json").read_text())["format_version"] == 1
    with Store.open(store_copy) as store:
        assert store.info().format_version == STORE_FORMAT_VERSION == 2
        store.vectors(BACKBONE).drop_keys(store.vectors(BACKBONE).keys()[:1])
        assert store.vectors(BACKBONE).parts()[-1]["keys_sha256"]
    assert json.loads((store_copy / "store.json").read_text())["upgraded_by"]


def test_in_sorted_is_isin_for_sorted_keys() -> None:
    from pinsearch.vectors import in_sorted

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-50, 50, 40))
    probe = rng.integers(-60, 60, 200)
    np.testing.assert_array_equal(in_sorted(keys, probe), np.isin(probe, keys))
    assert not in_sorted(keys[:0], probe).any() and in_sorted(keys, probe[:0]).shape == (0,)


def test_group_sums_add_rows_by_group_in_chunks() -> None:
    from pinsearch.vectors import group_sums

    rng = np.random.default_rng(0)
    groups, x = rng.integers(0, 7, 1000), rng.normal(size=(1000, 5)).astype(np.float32)
    expected = np.zeros((7, 5))
    np.add.at(expected, groups, x.astype(np.float64))
    np.testing.assert_allclose(group_sums(groups, 7, x, chunk=64), expected, rtol=1e-12)
    assert group_sums(groups[:0], 3, x[:0]).shape == (3, 5)


_FORKING_WRITER = """
import os, sys, time
from pinsearch.store import Store
store = Store.open(sys.argv[1])
child = os.fork()
if child == 0:  # a DataLoader worker outliving its writer
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)  # (the test reads the writer's output to its end)
    store._lock.release()  # a child's copy: closed, nothing else (no error, no unlock)
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # killed: no release
"""


def test_a_killed_writers_forked_children_do_not_hold_its_lock(store_copy: Path) -> None:
    env = {**os.environ, "PINSEARCH_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _FORKING_WRITER, str(store_copy)],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    child = int(out.stdout.strip())
    try:
        os.kill(child, 0)  # still alive, holding a copy of the writer's descriptors
        with Store.open(store_copy, wait=0) as store:
            assert store.catalog.count_pins() == 24
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_writer_deletes_and_writes_nothing_through_links_a_store_holds(
    store_copy: Path, tmp_path: Path
) -> None:
    """A store someone sent may link its folders or its lock and temporary files at the
    receiver's files: a writer deleted every file of a linked heads/indexes/vectors folder
    and wrote its lock and catalog copy into the files the links named."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("thesis.docx", "config.json", "part-000001.npy"):
        (victim / name).write_text("precious")
    heads = store_copy / "heads"
    shutil.rmtree(heads, ignore_errors=True)
    heads.symlink_to(victim)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    snapshot_tmp = store_copy / "catalog.readers.duckdb.tmp"
    snapshot_tmp.symlink_to(notes)
    (store_copy / "catalog.readers.duckdb").unlink(missing_ok=True)
    with Store.open(store_copy):  # a writer: cleans its folders, publishes its snapshot
        pass
    assert sorted(p.name for p in victim.iterdir()) == [
        "config.json", "part-000001.npy", "thesis.docx"
    ]  # fmt: skip
    assert notes.read_text() == "my notes" and not snapshot_tmp.is_symlink()
    lock = store_copy / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(notes)
    with pytest.raises(StoreLockedError, match=r"cannot take \.lock"):
        Store.open(store_copy)
    assert notes.read_text() == "my notes"


def test_a_writer_on_a_full_disk_says_so_and_changes_nothing(
    store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's first writes, before any change: its lock file's PID and the catalog's copy
    for readers. On a full disk either failed with a bare "[Errno 28] No space left on
    device" naming no store and no file."""
    import errno

    import pinsearch.store as store_module

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with Store.open(store_copy, read_only=True) as store:
        pins = store.catalog.count_pins()
    (store_copy / "catalog.readers.duckdb").unlink()  # (the next writer copies the catalog)
    with monkeypatch.context() as m:
        m.setattr(store_module.shutil, "copyfile", full)
        with pytest.raises(OSError, match=r"store .*: no space left on the disk for the copy "
                           r"of the catalog readers use while a write works \(.* MiB\); "
                           "nothing was changed") as caught:  # fmt: skip
            Store.open(store_copy)
    assert caught.value.errno == errno.ENOSPC
    assert not list(store_copy.glob("catalog.readers.duckdb*"))  # no half copy
    real = os.fdopen

    def lock_on_a_full_disk(fd: int, *args: object, **kw: object) -> object:
        fh = real(fd, *args, **kw)
        fh.flush = full  # (the PID written into .lock)
        return fh

    with monkeypatch.context() as m:
        m.setattr(store_module.os, "fdopen", lock_on_a_full_disk)
        with pytest.raises(OSError, match=r"no space left on the disk for its lock file \.lock"):
            Store.open(store_copy)
    with Store.open(store_copy) as store:  # the lock was let go; nothing changed
        assert store.catalog.count_pins() == pins
    writer = Store.open(store_copy)
    writer.catalog.set_meta("marker", "written")
    with monkeypatch.context() as m:  # on the way out the copy is after the changes
        m.setattr(store_module.shutil, "copyfile", full)
        with pytest.raises(OSError, match=r"for the copy of the catalog .*; this write's "
                           r"changes are saved; readers see the store as it was"):  # fmt: skip
            writer.close()
    with Store.open(store_copy) as store:
        assert store.catalog.get_meta("marker") == "written"
