"""One writer, many readers: while a process writes to a store, a second writer gets a clear
"locked by PID" error and readers keep working on the last finished state (the snapshot)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pinsearch.check import check_store
from pinsearch.edit import remove_pins
from pinsearch.errors import StoreLockedError
from pinsearch.search import PinSearcher
from pinsearch.store import Store

_WRITER = """
import sys, time
from pathlib import Path
from pinsearch.store import Store
store = Store.open(sys.argv[1])
store.catalog.set_meta("note", "written by the writer")
if len(sys.argv) > 3:  # and a removal, which rewrites the vector parts holding the pin
    from pinsearch.edit import remove_pins
    remove_pins(store, pin_ids=sys.argv[3:])
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.05)
store.close()
"""


def _start_writer(store: Path, done: Path, *remove: str) -> subprocess.Popen:
    env = {**os.environ, "PINSEARCH_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store), str(done), *remove],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def _query(store: Store) -> int:
    pin = store.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key DESC LIMIT 1")[0]
    return len(PinSearcher(store).similar_to_pin(pin["pin_id"], 5).hits)


def test_readers_keep_working_while_a_writer_works(store_copy: Path, tmp_path: Path) -> None:
    with Store.open(store_copy) as s:  # a finished write publishes the readers' snapshot
        s.catalog.set_meta("note", "before")
    writer = _start_writer(store_copy, tmp_path / "done")
    try:
        with pytest.raises(StoreLockedError, match=f"locked by PID {writer.pid}"):
            Store.open(store_copy)
        with Store.open(store_copy, read_only=True) as reader:
            assert reader.snapshot
            assert reader.catalog.get_meta("note") == "before"  # not the writer's pending change
            assert reader.catalog.count_pins() == 24 and _query(reader) == 5
            assert reader.info().pins == 24
    finally:
        (tmp_path / "done").touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    with Store.open(store_copy, read_only=True) as after:  # the writer is gone: the catalog
        assert not after.snapshot
        assert after.catalog.get_meta("note") == "written by the writer"
        assert after.catalog.count_pins() == 24


def test_a_killed_writer_leaves_readers_the_last_snapshot(store_copy: Path, tmp_path: Path):
    writer = _start_writer(store_copy, tmp_path / "never")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=60)
    time.sleep(0.1)
    with Store.open(store_copy, read_only=True) as reader:  # its lock died with it
        assert _query(reader) == 5
    with Store.open(store_copy) as s:  # the next writer replays or drops its log, and works
        assert s.catalog.count_pins() == 24 and _query(s) == 5


def test_readers_of_the_snapshot_survive_a_remove(store_copy: Path, tmp_path: Path) -> None:
    with Store.open(store_copy, read_only=True) as s:
        gone = s.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]["pin_id"]
    writer = _start_writer(store_copy, tmp_path / "done", gone)  # removed, not yet closed
    try:
        with Store.open(store_copy, read_only=True) as reader:
            assert reader.snapshot and reader.catalog.count_pins() == 24
            vectors, _ = reader.vectors("test_efficientnet").load()  # the parts it lists
            assert len(vectors) == 24 and _query(reader) == 5
    finally:
        (tmp_path / "done").touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    # check knows the kept files for what they are: retired by the remove, not crash leftovers
    report = check_store(store_copy)
    assert report.ok and not report.findings and report.checked["retired_vector_files"] >= 2
    for kept in (True, False):  # the second writer after the remove deletes the retired parts
        with Store.open(store_copy) as store:
            assert store.catalog.count_pins() == 23
            vs = store.vectors("test_efficientnet")
            files = len(list(vs.folder.glob("part-*.npy")))
            assert (files > 2 * len(vs.parts())) is kept and bool(vs.retired()) is kept
    assert "retired_vector_files" not in check_store(store_copy).checked


def test_a_snapshot_reader_outlives_the_next_writer(store_copy: Path) -> None:
    """A reader that opened the snapshot while a remove worked reads the parts it retired
    after the next writer opened too (it deleted them at once: FileNotFoundError)."""
    with Store.open(store_copy) as writer:
        first = writer.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]
        remove_pins(writer, pin_ids=[first["pin_id"]])
        reader = Store.open(store_copy, read_only=True)  # the snapshot: before the remove
    try:
        assert reader.snapshot and reader.catalog.count_pins() == 24
        Store.open(store_copy).close()  # the next writer
        assert len(reader.vectors("test_efficientnet").load()[1]) == 24 and _query(reader) == 5
    finally:
        reader.close()
    Store.open(store_copy).close()  # the one after deletes them
    assert "retired_vector_files" not in check_store(store_copy).checked


_READER = """
import sys, time
from pathlib import Path
from pinsearch.store import Store
store = Store.open(sys.argv[1], read_only=True)
print("snapshot" if store.snapshot else "catalog", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.02)
store.close()
"""


def _start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PINSEARCH_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_writer_waits_for_readers_of_the_catalog(store_copy: Path, tmp_path: Path) -> None:
    """A reader holding the catalog (a CLI query) delays a writer instead of failing it, for up
    to ``wait``; readers that start meanwhile read the snapshot, so they cannot starve it."""
    with Store.open(store_copy) as s:  # publishes the snapshot
        s.catalog.set_meta("note", "before")
    reader = _start(_READER, str(store_copy), str(tmp_path / "reader-done"))
    writer = None
    try:
        assert reader.stdout.readline().strip() == "catalog"
        with pytest.raises(StoreLockedError, match=r"a reader that did not close it within 0\.2 s"):
            Store.open(store_copy, wait=0.2)
        writer = _start(_WRITER, str(store_copy), str(tmp_path / "writer-done"))
        deadline = time.monotonic() + 60
        while (store_copy / ".lock").read_text().strip() != str(writer.pid):
            assert time.monotonic() < deadline and writer.poll() is None, writer.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)
        assert writer.poll() is None  # holds the lock, waits for the catalog
        with Store.open(store_copy, read_only=True) as late:  # does not join the catalog's readers
            assert late.snapshot and late.catalog.get_meta("note") == "before"
            (tmp_path / "reader-done").touch()
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    finally:
        (tmp_path / "reader-done").touch()
        (tmp_path / "writer-done").touch()
        reader.wait(timeout=60)
        if writer is not None:
            writer.wait(timeout=60)
    assert reader.returncode == writer.returncode == 0, writer.stderr.read()
    with Store.open(store_copy, read_only=True) as after:
        assert not after.snapshot and after.catalog.get_meta("note") == "written by the writer"


def test_a_live_process_named_in_the_lock_file_is_not_taken_for_a_writer(store_copy: Path) -> None:
    """A killed writer leaves its PID in .lock; another process may get that PID later. The
    lock itself says whether a writer is at work."""
    with Store.open(store_copy) as s:  # publishes the snapshot
        s.catalog.set_meta("note", "latest")
    (store_copy / ".lock").write_text(str(os.getppid()))  # alive, and no writer
    with Store.open(store_copy, read_only=True) as reader:
        assert not reader.snapshot and reader.catalog.get_meta("note") == "latest"
    assert check_store(store_copy, sources=False).ok
