"""``pinsearch refresh``: pins whose image files changed since they were read are embedded
again in every backbone and index; files gone are reported (or their pins removed); old
stores get their file states recorded; an interrupted refresh is finished by the next."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.check import check_store
from pinsearch.classify import train_head
from pinsearch.cli.app import app
from pinsearch.edit import refresh_store
from pinsearch.embed import EmbedConfig
from pinsearch.errors import PinNotFoundError
from pinsearch.pipeline import index_corpus
from pinsearch.search import PinSearcher
from pinsearch.store import Store

B = "test_efficientnet"
EMBED = EmbedConfig(workers=0, batch_size=16)


@pytest.fixture
def indexed(tree_copy: Path, tmp_path: Path) -> Path:
    """A store over a private copy of the small tree (its files may change)."""
    store = tmp_path / "store"
    index_corpus(tree_copy, store, backbone=B, embed=EMBED)
    return store


def _pins(store_path: Path) -> dict[str, dict]:
    with Store.open(store_path, read_only=True) as store:
        rows = store.catalog.query("SELECT * FROM pins ORDER BY pin_id")
    return {r["pin_id"]: r for r in rows}


def _vectors(store_path: Path, backbone: str = B) -> dict[str, np.ndarray]:
    with Store.open(store_path, read_only=True) as store:
        vecs, keys = store.vectors(backbone).load()
        rows = store.catalog.pins_by_key(keys.tolist())
    return {rows[int(k)]["pin_id"]: v for k, v in zip(keys, vecs)}


def _copy_over(src: str, dst: str) -> None:
    """Give ``dst`` the bytes of ``src`` (a newer modification time, whatever the size)."""
    shutil.copyfile(src, dst)
    st = os.stat(dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_ingest_records_each_files_state(indexed: Path) -> None:
    for row in _pins(indexed).values():
        st = os.stat(row["path"])
        assert (row["file_size"], row["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns)


def test_changed_file_is_embedded_again_everywhere(indexed: Path) -> None:
    pins = _pins(indexed)
    a, b = sorted(pins)[:2]  # a takes b's image
    before = _vectors(indexed)
    with Store.open(indexed) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
    # a second index that FAISS cannot remove from (rebuilt), beside the Flat one
    index_corpus(None, indexed, backbone=B, embed=EMBED, index={"factory": "HNSW8"},
                 index_name="hnsw")  # fmt: skip
    _copy_over(pins[b]["path"], pins[a]["path"])

    dry = refresh_store(indexed, dry_run=True)
    assert (dry.changed, dry.refreshed, dry.vectors, dry.dry_run) == (1, 1, {}, True)
    assert dry.examples["changed"] == [{"pin_id": a, "path": pins[a]["path"]}]
    np.testing.assert_array_equal(_vectors(indexed)[a], before[a])  # nothing written
    found = check_store(indexed)
    assert found.ok and [f.problem for f in found.findings] == ["changed_source_files"]
    assert a in found.findings[0].detail

    report = refresh_store(indexed)
    assert (report.changed, report.refreshed, report.missing, report.unreadable) == (1, 1, 0, 0)
    assert report.vectors == {B: 1} and sorted(report.indexes) == ["hnsw", B]
    assert report.rebuilt == ["hnsw"] and report.stale_heads == [f"{B}/knn"]
    after = _vectors(indexed)
    np.testing.assert_allclose(after[a], before[b], atol=1e-5)  # the new image's vector
    assert all(np.array_equal(after[p], before[p]) for p in pins if p != a)
    row = _pins(indexed)[a]
    st = os.stat(row["path"])
    assert (row["file_size"], row["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    with Store.open(indexed, read_only=True) as store:
        for name in (B, "hnsw"):
            assert store.load_index(name).ntotal == len(pins)
            hits = (
                PinSearcher(store, backbone=B, index=name)
                .similar_to_image(pins[b]["path"], k=2)
                .hits
            )
            assert {h.pin_id for h in hits} == {a, b} and hits[1].score > 0.999
        assert store.catalog.query("SELECT stale FROM heads")[0]["stale"] is True
    assert not check_store(indexed).findings
    again = refresh_store(indexed)
    assert (again.changed, again.refreshed, again.vectors) == (0, 0, {})


def test_named_pin_unreadable_file_and_unknown_id(indexed: Path) -> None:
    pins = _pins(indexed)
    a, b = sorted(pins)[:2]
    before = _vectors(indexed)
    with pytest.raises(PinNotFoundError, match="nope"):
        refresh_store(indexed, pin_ids=[a, "nope"])
    # named: embedded again whatever its state says (the same file: the same vector, kept)
    report = refresh_store(indexed, pin_ids=[a])
    assert (report.changed, report.refreshed, report.unchanged) == (0, 1, 1)
    assert report.vectors == {B: 0} and report.indexes == []
    np.testing.assert_array_equal(_vectors(indexed)[a], before[a])
    # a changed file cut short (its header reads, its pixels do not): its pin keeps its vector,
    # its index entry and its recorded state, and is tried again next time
    data = Path(pins[b]["path"]).read_bytes()
    Path(pins[b]["path"]).write_bytes(data[: len(data) // 2])
    report = refresh_store(indexed)
    assert (report.changed, report.refreshed, report.unreadable) == (1, 0, 1)
    assert report.vectors == {B: 0} and report.stale_heads == []
    assert report.examples["unreadable"][0]["pin_id"] == b
    assert set(_pins(indexed)) == set(pins)
    np.testing.assert_array_equal(_vectors(indexed)[b], before[b])
    assert not check_store(indexed, sources=False).findings
    assert refresh_store(indexed, dry_run=True).changed == 1
    Path(pins[b]["path"]).write_bytes(data)  # put back: its state differs still (time)
    report = refresh_store(indexed)
    assert (report.refreshed, report.unreadable, report.unchanged) == (1, 0, 1)
    assert report.vectors == {B: 0}  # the image is the stored one again: nothing swapped
    np.testing.assert_array_equal(_vectors(indexed)[b], before[b])
    assert refresh_store(indexed, dry_run=True).changed == 0  # its state recorded


def test_a_touched_file_keeps_its_vector_heads_and_index(indexed: Path) -> None:
    """A file touched, copied or checked out as it was: embedded again to the same vector,
    which is not swapped; its state is recorded, and no head goes stale."""
    pins = _pins(indexed)
    a = sorted(pins)[0]
    with Store.open(indexed) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
        index_before = store.catalog.get_index(B)["sha256"]
    st = os.stat(pins[a]["path"])
    os.utime(pins[a]["path"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = refresh_store(indexed)
    assert (report.changed, report.refreshed, report.unchanged, report.vectors) == (1, 1, 1, {B: 0})
    assert report.indexes == [] and report.stale_heads == []
    with Store.open(indexed, read_only=True) as store:
        assert store.catalog.query("SELECT stale FROM heads")[0]["stale"] is False
        assert store.catalog.get_index(B)["sha256"] == index_before
    assert _pins(indexed)[a]["file_mtime_ns"] == st.st_mtime_ns + 5_000_000_000
    assert not check_store(indexed).findings
    # a pin no backbone holds is read again, but is not one whose vectors came out the same
    c = sorted(pins)[1]
    with Store.open(indexed) as store:
        store.vectors(B).drop_keys(np.array([store.catalog.keys_for_ids([c])[c]]))
    report = refresh_store(indexed, pin_ids=[a, c])
    assert (report.refreshed, report.unchanged) == (2, 1)
    index_corpus(None, indexed, backbone=B, embed=EMBED)  # (c embedded again)


def test_missing_files_are_reported_then_removed(indexed: Path) -> None:
    pins = _pins(indexed)
    gone = sorted(pins)[:2]
    for p in gone:
        os.remove(pins[p]["path"])
    assert [f.problem for f in check_store(indexed).findings] == ["missing_source_files"]
    report = refresh_store(indexed)
    assert (report.missing, report.removed, report.refreshed) == (2, 0, 0)
    assert sorted(e["pin_id"] for e in report.examples["missing"]) == gone
    assert len(_pins(indexed)) == len(pins)
    # with a changed one beside them, and a graph index: each index updated once
    index_corpus(None, indexed, backbone=B, embed=EMBED, index={"factory": "HNSW8"},
                 index_name="hnsw")  # fmt: skip
    a, b = sorted(set(pins) - set(gone))[:2]
    _copy_over(pins[b]["path"], pins[a]["path"])
    with Store.open(indexed) as store:  # a refresh's note of a pin removed meanwhile goes too
        key = store.catalog.keys_for_ids([gone[0]])[gone[0]]
        store.catalog.set_meta("refresh_pending", json.dumps({B: [key]}))
    report = refresh_store(indexed, remove_missing=True)
    assert (report.missing, report.removed, report.refreshed) == (2, 2, 1)
    assert sorted(report.indexes) == ["hnsw", B] and report.rebuilt == ["hnsw"]
    assert set(_pins(indexed)) == set(pins) - set(gone)
    assert not check_store(indexed).findings


def test_store_from_before_file_states_gets_them_recorded(indexed: Path) -> None:
    with Store.open(indexed) as store:  # a catalog written before the columns existed
        con = store.catalog.connection
        con.execute("ALTER TABLE pins DROP COLUMN file_size")
        con.execute("ALTER TABLE pins DROP COLUMN file_mtime_ns")
    before = _vectors(indexed)
    with Store.open(indexed, read_only=True) as store:  # read as it is
        assert (store.catalog.file_states()["file_size"] == -1).all()
    assert not check_store(indexed).findings  # nothing recorded: nothing to compare
    report = refresh_store(indexed)
    assert (report.recorded, report.changed, report.refreshed, report.vectors) == (24, 0, 0, {})
    after = _vectors(indexed)
    assert all(np.array_equal(after[p], before[p]) for p in before)
    for row in _pins(indexed).values():
        assert row["file_size"] == os.stat(row["path"]).st_size
    assert refresh_store(indexed).recorded == 0


def test_interrupted_refresh_is_finished_by_the_next(indexed: Path) -> None:
    """New vectors replace old ones with a note of the pins whose index entries are still the
    old ones: a refresh killed after that (here, its state as such a kill leaves it) is a
    store whose old entries answer (check: a warning), and the next refresh replaces them."""
    pins = _pins(indexed)
    a, b = sorted(pins)[:2]
    before = _vectors(indexed)
    _copy_over(pins[b]["path"], pins[a]["path"])
    with Store.open(indexed) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
        key = store.catalog.keys_for_ids([a])[a]
        store.vectors(B).replace(
            before[b][None], np.array([key]), "float32",
            also=lambda: store.catalog.set_meta("refresh_pending", json.dumps({B: [key]})),
        )  # fmt: skip
    found = check_store(indexed)
    assert found.ok and {f.problem for f in found.findings} == {
        "refresh_pending", "changed_source_files"
    }  # fmt: skip
    assert refresh_store(indexed, dry_run=True).pending == 1
    report = refresh_store(indexed)
    assert (report.changed, report.pending, report.refreshed) == (1, 1, 1)
    # the swapped vector is already the new image's: embedded again, it is not swapped again
    assert report.vectors == {B: 0} and report.unchanged == 1 and report.indexes == [B]
    assert report.stale_heads == [f"{B}/knn"]  # a vector did change: the interrupted run's
    np.testing.assert_allclose(_vectors(indexed)[a], before[b], atol=1e-5)
    with Store.open(indexed, read_only=True) as store:
        hits = PinSearcher(store, backbone=B).similar_to_vector(before[b], k=2).hits
        assert {h.pin_id for h in hits} == {a, b} and hits[1].score > 0.999
    assert not check_store(indexed).findings


def test_two_backbones_failing_pins_and_the_missing_guard(indexed: Path) -> None:
    from PIL import Image

    index_corpus(None, indexed, backbone="classic", embed=EMBED)
    pins = _pins(indexed)
    a, b, c, d = sorted(pins)[:4]
    before = {name: _vectors(indexed, name) for name in (B, "classic")}
    _copy_over(pins[b]["path"], pins[a]["path"])
    data = Path(pins[c]["path"]).read_bytes()
    Path(pins[c]["path"]).write_bytes(data[: len(data) // 2])  # passes the header, not decoding
    # a 4000 x 1 strip: test_efficientnet (short side to 168) takes it, classic (224: 200M
    # pixels) refuses it as too large; it is swapped in neither
    Image.new("RGB", (4000, 1), (90, 30, 200)).save(pins[d]["path"], "PNG")
    with pytest.raises(ValueError, match="workers"):  # options checked before any work
        refresh_store(indexed, workers=-1)
    report = refresh_store(indexed)
    assert (report.changed, report.refreshed, report.unreadable) == (3, 1, 2)
    assert {e["pin_id"]: e["reason"] for e in report.examples["unreadable"]} == {
        c: "truncated", d: "too_large"
    }  # fmt: skip
    assert report.vectors == {B: 1, "classic": 1} and sorted(report.indexes) == ["classic", B]
    for name in (B, "classic"):
        after = _vectors(indexed, name)
        np.testing.assert_allclose(after[a], before[name][b], atol=1e-5)
        for kept in (c, d):  # in both backbones
            np.testing.assert_array_equal(after[kept], before[name][kept])
    assert set(_pins(indexed)) == set(pins)
    assert [f.problem for f in check_store(indexed).findings] == ["changed_source_files"]
    # the size limit given applies to the embedding too
    report = refresh_store(indexed, max_pixels=300_000_000)
    assert (report.refreshed, report.unreadable, report.vectors) == (1, 1, {B: 1, "classic": 1})
    # most files gone (a corpus moved): --remove-missing refuses, nothing removed
    for row in list(pins.values())[:13]:
        os.remove(row["path"])
    with pytest.raises(ValueError, match="13 of 24 pins' image files are gone"):
        refresh_store(indexed, remove_missing=True)
    assert set(_pins(indexed)) == set(pins)


def test_refresh_cli(indexed: Path) -> None:
    pins = _pins(indexed)
    a, b = sorted(pins)[:2]
    _copy_over(pins[b]["path"], pins[a]["path"])
    runner = CliRunner()
    out = runner.invoke(app, ["refresh", "--store", str(indexed), "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["changed"] == 1
    out = runner.invoke(app, ["refresh", "--store", str(indexed), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "1 changed" in out.output and "embedded again 1 pins" in out.output
    assert f"{B}: 1 vectors" in out.output
    out = runner.invoke(app, ["refresh", "--store", str(indexed), "--pin", "nope"])
    assert isinstance(out.exception, PinNotFoundError) and "nope" in str(out.exception)


def test_a_float16_store_keeps_a_vector_one_rounding_step_away(tree_copy: Path, tmp_path) -> None:
    from pinsearch.edit import _same_vectors

    path = tmp_path / "s16"
    index_corpus(tree_copy, path, backbone=B,
                 embed=EmbedConfig(workers=0, batch_size=16, dtype="float16"))  # fmt: skip
    with Store.open(path, read_only=True) as store:
        stored, keys = store.vectors(B).load()
        x = stored.astype(np.float32)
        step = np.spacing(stored).astype(np.float32)  # one float16 step of every component
        assert _same_vectors(store, B, keys, x + 0.9 * step, "float16").all()
        assert _same_vectors(store, B, keys, x, "float32").all()
        moved = x.copy()
        moved[:, 0] += 0.05 * np.abs(x).max(axis=1)  # another image's vector
        assert not _same_vectors(store, B, keys, moved, "float16").any()
