"""``pinsearch check`` finds each kind of damage precisely; ``repair`` fixes what is derived."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.check import check_store, repair_store
from pinsearch.classify import classify, train_head
from pinsearch.cli.app import app
from pinsearch.errors import CatalogError, IndexFileError
from pinsearch.pipeline import index_corpus
from pinsearch.store import Store

B = "test_efficientnet"


def _problems(path: Path) -> set[tuple[str, str, str]]:
    return {(f.level, f.where, f.problem) for f in check_store(path).findings}


def test_a_healthy_store_checks_ok(built_store) -> None:
    report = check_store(built_store.path)
    assert report.ok and report.findings == [] and report.pins == 24
    assert report.checked == {"vector_parts": 1, "vectors": 24, "indexes": 1, "source_files": 24}


def test_pins_whose_image_file_is_gone_are_a_warning(store_copy: Path, tree_copy: Path) -> None:
    from pinsearch.pipeline import index_corpus

    store = store_copy.parent / "own"
    index_corpus(tree_copy, store, backbone=B)
    gone = sorted(tree_copy.glob("*/*/*/*.jpg"))[:2]
    for path in gone:
        path.unlink()
    report = check_store(store)
    (finding,) = report.findings
    assert report.ok and (finding.level, finding.where, finding.problem) == (
        "warning", "sources", "missing_source_files",
    )  # fmt: skip
    assert (
        finding.detail.startswith("2 of 24 pins' image files are gone")
        and gone[0].parent.name in finding.detail
    )
    assert check_store(store, sources=False).findings == []
    out = CliRunner().invoke(app, ["check", "--store", str(store), "--no-sources", "--json"])
    assert out.exit_code == 0 and "source_files" not in json.loads(out.output)["checked"]


def test_damaged_index_file_is_found_and_rebuilt(store_copy: Path) -> None:
    faiss_file = store_copy / "indexes" / f"{B}.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-8] + b"\0" * 8)
    assert ("error", f"index {B}", "checksum") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert repaired.actions == [f"index {B}: rebuilt from 24 stored vectors"]
    assert repaired.after is not None and repaired.after.ok


def test_missing_id_map_is_found_and_rebuilt(store_copy: Path) -> None:
    (store_copy / "indexes" / f"{B}.ids.npy").unlink()
    assert ("error", f"index {B}", "missing_file") in _problems(store_copy)
    info = CliRunner().invoke(app, ["info", "-s", str(store_copy), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["pins"] == 24  # (counts still read)
    assert repair_store(store_copy).after.ok


def test_catalog_count_mismatch(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        store.catalog.connection.execute("UPDATE indexes SET ntotal = 23")
    assert ("error", f"index {B}", "ntotal") in _problems(store_copy)
    assert repair_store(store_copy).after.ok


def test_damaged_vector_part_is_forgotten_then_reembedded(store_copy: Path, built_store) -> None:
    with Store.open(built_store.path, read_only=True) as s:
        original, keys = s.vectors(B).load()
    part = store_copy / "vectors" / B / "part-000000.npy"
    part.write_bytes(part.read_bytes()[:-4] + b"\x01\x02\x03\x04")
    assert ("error", f"vectors {B} part 0", "checksum") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert any("removed 24 vectors" in a for a in repaired.actions)
    after = repaired.after
    assert after is not None and after.ok  # nothing left to trust is an error no more
    assert {(f.where, f.problem) for f in after.findings} == {(f"vectors {B}", "not_embedded")}
    index_corpus(None, store_copy, backbone=B)  # re-embeds exactly the pins that lost vectors
    with Store.open(store_copy, read_only=True) as s:
        again, _ = s.vectors(B).load(keys)
    np.testing.assert_allclose(again, original, atol=1e-5)
    assert check_store(store_copy).findings == []


def test_vectors_of_unknown_pins(store_copy: Path) -> None:
    with Store.open(store_copy) as store:  # what a crash between two writes could leave
        key = store.catalog.scalar("SELECT min(pin_key) FROM pins")
        store.catalog.connection.execute("DELETE FROM pins WHERE pin_key = ?", [key])
    problems = _problems(store_copy)
    assert ("error", f"vectors {B}", "unknown_pins") in problems
    assert ("error", f"index {B}", "unknown_pins") in problems
    with pytest.raises(IndexFileError, match="pinsearch repair"):
        Store.open(store_copy, read_only=True)  # a normal open refuses the stale id map
    repaired = repair_store(store_copy)
    assert repaired.after.ok and repaired.after.checked["vectors"] == 23


def test_head_and_alignment_files(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1}, name="h")
    (store_copy / "heads").glob("h-*.npz").__next__().unlink()
    assert ("error", "head h", "unreadable") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert "head h: forgotten (unreadable); train it again" in repaired.actions
    assert repaired.after.ok


def test_an_altered_part_of_an_unindexed_backbone_or_a_title_space_is_reported_and_repaired(
    store_copy: Path, tree_copy: Path
) -> None:
    with Store.open(store_copy) as store:  # vectors without an index, one part altered
        store.catalog.connection.execute("DELETE FROM indexes")
        store.catalog.connection.execute("UPDATE vector_parts SET file = '/etc/hostname'")
    problems = _problems(store_copy)
    assert ("error", f"vectors {B} part 0", "not_a_part_file") in problems
    assert ("error", f"backbone {B}", "no_index") in problems
    assert repair_store(store_copy).after.ok
    clip = store_copy.parent / "clip"  # a CLIP store's title space
    index_corpus(tree_copy, clip, backbone="test_clip")
    with Store.open(clip) as store:
        store.catalog.connection.execute(
            "UPDATE vector_parts SET file = '/etc/hostname' WHERE backbone = 'test_clip#text'"
        )
    assert ("error", "vectors test_clip#text part 0", "not_a_part_file") in _problems(clip)
    assert repair_store(clip).after.ok


def test_a_head_file_of_compressed_arrays_is_refused_unread(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1}, name="h")
    npz = next((store_copy / "heads").glob("h-*.npz"))
    arrays = dict(np.load(npz))
    arrays["fit_X"] = np.zeros((1 << 18, 16), np.float32)  # 16 MiB from 16 KiB: a zip bomb's kind
    np.savez_compressed(npz, **arrays)
    assert npz.stat().st_size < 1 << 16
    problems = {(f.where, f.problem, f.detail) for f in check_store(store_copy).findings}
    ((where, problem, detail),) = problems
    assert (where, problem) == ("head h", "unreadable") and "holds compressed arrays" in detail


def test_orphan_files_and_lagging_index(store_copy: Path) -> None:
    (store_copy / "vectors" / B / "part-000009.npy").write_bytes(b"left by a crash")
    with Store.open(store_copy, read_only=True) as store:
        keys = store.vectors(B).keys()
    with Store.open(store_copy, verify=False) as store:  # the writer removes the orphan...
        store.vectors(B).drop_keys(keys[:2])  # ...and vectors leave without the index update
    problems = _problems(store_copy)
    assert ("error", f"index {B}", "no_vector") in problems
    assert repair_store(store_copy).after.ok
    (store_copy / "vectors" / B / "part-000009.npy").write_bytes(b"left by a crash")
    assert ("warning", f"vectors {B}", "orphan_files") in _problems(store_copy)


def test_ingest_accounting(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        store.catalog.connection.execute("UPDATE ingests SET found = found + 1")
    assert ("error", "ingest 1", "pins_unaccounted") in _problems(store_copy)


def test_cli_check_exit_codes(store_copy: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["check", "--store", str(store_copy), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["ok"] is True
    (store_copy / "indexes" / f"{B}.json").unlink()
    out = runner.invoke(app, ["check", "--store", str(store_copy)])
    assert out.exit_code == 1 and "missing_file" in out.output
    out = runner.invoke(app, ["repair", "--store", str(store_copy), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["after"]["ok"] is True


def test_an_empty_key_file_is_reported_and_repaired(store_copy: Path) -> None:
    (store_copy / "vectors" / B / "part-000000.keys.npy").write_bytes(b"")
    assert ("error", f"vectors {B} part 0", "checksum") in _problems(store_copy)
    with Store.open(store_copy, verify=False) as store:  # a part from before key checksums
        store.catalog.connection.execute("UPDATE vector_parts SET keys_sha256 = NULL")
    assert ("error", f"vectors {B} part 0", "unreadable") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert repaired.after is not None and repaired.after.ok


def test_an_empty_index_description_is_reported_and_rebuilt(store_copy: Path) -> None:
    (store_copy / "indexes" / f"{B}.json").write_text("")
    assert ("error", f"index {B}", "unreadable") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert repaired.actions == [f"index {B}: rebuilt from 24 stored vectors"]
    assert repaired.after is not None and repaired.after.ok


def test_a_torn_index_save_is_rebuilt_by_the_next_writer(store_copy: Path) -> None:
    with Store.open(store_copy) as store:  # files of a new index saved, catalog not told
        index = store.load_index(B)
        index.remove(index.ids[:4])
        index.save(store.index_base(B))
    with pytest.raises(IndexFileError, match="id map has 20 entries, catalog says 24"):
        Store.open(store_copy, read_only=True)
    with Store.open(store_copy) as store:
        assert store.load_index(B).ntotal == 24
    assert check_store(store_copy).ok


def test_an_index_damaged_mid_swap_is_rebuilt_by_the_next_index_run(store_copy: Path) -> None:
    faiss_file = store_copy / "indexes" / f"{B}.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-8] + b"\0" * 8)  # id map still agrees
    report = index_corpus(None, store_copy, backbone=B)
    assert report.ntotal == 24
    assert check_store(store_copy).ok


def test_swapped_pin_keys_are_caught_by_their_checksum(store_copy: Path) -> None:
    keys_file = store_copy / "vectors" / B / "part-000000.keys.npy"
    keys = np.load(keys_file)
    keys[[0, 1]] = keys[[1, 0]]  # two pins answer with each other's vectors: still a valid file
    np.save(keys_file, keys)
    assert ("error", f"vectors {B} part 0", "checksum") in _problems(store_copy)


def test_a_save_killed_between_its_renames_is_caught_at_open(store_copy: Path, tmp_path) -> None:
    import os

    base = store_copy / "indexes" / B
    faiss_file = base.with_name(B + ".faiss")
    os.utime(faiss_file, ns=(faiss_file.stat().st_atime_ns, 2**62))  # newer than its JSON...
    with Store.open(store_copy, read_only=True) as store:  # ...but whole: nothing to say
        assert store.load_index(B).ntotal == 24
    with Store.open(store_copy) as store:  # a save of other contents, killed after .faiss
        index = store.load_index(B)
        index.remove(index.ids[:3])
        index.save(tmp_path / "other")
        os.replace(tmp_path / "other.faiss", faiss_file)
    with Store.open(store_copy, read_only=True) as store, pytest.raises(IndexFileError):
        store.load_index(B)  # a reader is told when it loads the index (checksum)
    with Store.open(store_copy) as store:  # the next writer rebuilds it at open
        assert store.load_index(B).ntotal == 24
    assert check_store(store_copy).ok


def test_check_waits_for_a_writer(store_copy: Path) -> None:
    from pinsearch.errors import StoreLockedError

    with (  # a writer at work: its snapshot beside its changing files
        Store.open(store_copy),
        pytest.raises(StoreLockedError, match="being written"),
    ):
        check_store(store_copy)
    assert check_store(store_copy).ok


def test_stray_index_files_are_reported_then_removed_by_the_next_writer(store_copy: Path) -> None:
    leftovers = [store_copy / "indexes" / n for n in (f"{B}.faiss.tmp", "gone.ids.npy")]
    for f in leftovers:  # a save killed before its renames; an index a crash left unrecorded
        f.write_bytes(b"x")
    report = check_store(store_copy)
    assert [(f.level, f.where, f.problem) for f in report.findings] == [
        ("warning", "indexes", "orphan_files")
    ]
    with Store.open(store_copy) as store:
        assert store.load_index(B).ntotal == 24
    assert not any(f.exists() for f in leftovers) and check_store(store_copy).ok


# -- from the review of the store's integrity machinery ------------------------------------------


def test_a_damaged_part_is_not_rewritten_with_fresh_checksums(store_copy: Path) -> None:
    from pinsearch.edit import remove_pins

    with Store.open(store_copy, read_only=True) as store:
        part = store.vectors(B).parts()[0]
        key = int(store.vectors(B)._load_keys(part)[0])
        pin = store.catalog.pins_by_key([key])[key]["pin_id"]
    path = store_copy / str(part["file"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the last vector
    path.write_bytes(bytes(data))
    damaged = [f.problem for f in check_store(store_copy).errors]
    assert "checksum" in damaged
    with Store.open(store_copy) as store, pytest.raises(ValueError, match="pinsearch repair"):
        remove_pins(store, pin_ids=[pin])  # (it recorded the damage as sound: check ok)
    assert [f.problem for f in check_store(store_copy).errors] == damaged
    with Store.open(store_copy, read_only=True) as store:
        assert store.catalog.count_pins() == 24


def test_an_index_description_of_another_shape_is_reported(store_copy: Path) -> None:
    for text in ("null", '{"sha256": "x"}', "[]"):
        (store_copy / "indexes" / f"{B}.json").write_text(text)
        report = check_store(store_copy)
        assert [f.problem for f in report.errors] == ["unreadable"], text
    repaired = repair_store(store_copy)
    assert repaired.after is not None and repaired.after.ok


def test_a_pin_dropped_at_embedding_takes_its_empty_board_and_user(
    tree_copy: Path, tmp_path: Path
) -> None:
    board = tree_copy / "user009" / "lonely"
    (board / "999").mkdir(parents=True)
    (board / "board.json").write_text(json.dumps({"name": "Lonely", "category": "Art"}))
    good = next(tree_copy.rglob("*.jpg")).read_bytes()
    (board / "999" / "999.jpg").write_bytes(good[: len(good) // 2])  # header whole, pixels cut
    index_corpus(tree_copy, tmp_path / "s", backbone=B)
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert not store.catalog.query("SELECT * FROM pins WHERE pin_id = '999'")
        assert not store.catalog.query("SELECT * FROM boards WHERE board = 'user009/lonely'")
        assert not store.catalog.query("SELECT * FROM users WHERE user_id = 'user009'")


def test_a_store_without_its_catalog_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "store.json").write_text(
        json.dumps({"format": "pinsearch-store", "format_version": 2, "created_by": "0.1.0"})
    )
    with pytest.raises(FileNotFoundError, match="has no catalog"):
        Store.open(tmp_path / "s", read_only=True)


def test_repair_keeps_one_copy_of_a_vector_stored_twice(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        vecs, keys = store.vectors(B).load()
        store.vectors(B).write_part(vecs[:3] + 1.0, keys[:3])  # a second, newer copy
    assert "duplicate_vectors" in [f.problem for f in check_store(store_copy).errors]
    report = repair_store(store_copy)
    assert any("kept one vector of each of 3 pins" in a for a in report.actions)
    assert report.after is not None and report.after.ok, report.after.findings
    with Store.open(store_copy, read_only=True) as store:
        after, _ = store.vectors(B).load(keys[:3])
        np.testing.assert_array_equal(after, vecs[:3] + 1.0)  # the newest part's
        assert len(store.vectors(B)) == 24 and store.load_index(B).ntotal == 24


def test_an_index_saved_but_not_recorded_is_rebuilt_by_the_next_writer(store_copy: Path) -> None:
    """A save's files renamed into place, killed before its catalog row: a writer compares
    the description's checksum with the catalog's and rebuilds what the catalog records."""
    from pinsearch.indexes import IndexConfig, build_index

    with Store.open(store_copy) as store:
        vectors, keys = store.vectors(B).load()
        other = build_index(vectors, keys, IndexConfig(factory="IVF2,Flat"), backbone=B)
        other.save(store.index_base(B))  # (no catalog row)
    assert ("error", f"index {B}", "checksum") in _problems(store_copy)
    with Store.open(store_copy) as store:  # healed as it opens
        assert store.catalog.get_index(B)["factory"] == "Flat"  # type: ignore[index]
        assert store.load_index(B).factory == "Flat"
    assert check_store(store_copy).ok


def test_a_folder_among_the_vector_parts_stops_no_writer(store_copy: Path) -> None:
    (store_copy / "vectors" / B / "made-by-hand").mkdir()
    (store_copy / "vectors" / B / "part-000042.npy").write_bytes(b"left by a crash")
    with Store.open(store_copy) as store:  # the stray file goes, the folder stays
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        from pinsearch.edit import remove_pins

        remove_pins(store, pin_ids=[pin])
    assert (store_copy / "vectors" / B / "made-by-hand").is_dir()
    assert not (store_copy / "vectors" / B / "part-000042.npy").exists()
    assert check_store(store_copy).ok


def test_a_damaged_catalog_is_one_clear_error(store_copy: Path, monkeypatch, capsys) -> None:
    from test_cli import _main_error

    from pinsearch.errors import CatalogError

    catalog = store_copy / "catalog.duckdb"
    good = catalog.read_bytes()
    with Store.open(store_copy):  # (a writer publishes the readers' snapshot)
        pass
    assert (store_copy / "catalog.readers.duckdb").is_file()
    catalog.write_bytes(good[:4096] + bytes(4096) + good[8192:])  # "Corrupt ... block"
    with pytest.raises(CatalogError, match="cannot be read"):  # (not a writer's lock: the
        Store.open(store_copy, read_only=True)  # snapshot is not read in its place)
    with pytest.raises(CatalogError, match="cannot be read"):
        check_store(store_copy)
    catalog.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(CatalogError, match="cannot be read"):
        check_store(store_copy)
    said = _main_error(["check", "--store", str(store_copy)], monkeypatch, capsys)
    assert said.startswith(f"error: the catalog of store {store_copy} cannot be read")


def test_a_store_path_duckdb_would_read_as_memory_is_a_folder(tree_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index_corpus(tree_corpus.root, ":memory:s", backbone=B)
    assert (tmp_path / ":memory:s" / "catalog.duckdb").is_file()
    with Store.open(":memory:s", read_only=True) as store:
        assert store.catalog.count_pins() == 24


def test_vectors_without_any_index_are_an_error_repair_builds(store_copy: Path, tree_corpus):
    """A run killed between its vectors and its index (or an add after a remove of every pin,
    killed before the kept indexes came back): check said ok and every query failed."""
    from pinsearch.edit import remove_pins
    from pinsearch.embed import EmbedConfig, embed_store
    from pinsearch.indexes import IndexConfig
    from pinsearch.ingest import read_corpus

    with Store.open(store_copy) as store:
        store.drop_index(B)  # (as a first index run killed before its index)
    report = check_store(store_copy)
    assert [f.problem for f in report.errors] == ["no_index"] and "repair builds it" in str(
        report.errors[0]
    )
    assert repair_store(store_copy).after.ok
    with Store.open(store_copy) as store:
        assert store.index_names(B) == [B]
        store.build_index(B, IndexConfig(factory="HNSW8", metric="l2"), name="graph")
        store.drop_index(B)
        remove_pins(store, users=["user000", "user001"])  # every pin: "graph" kept for later
    with Store.open(store_copy) as store:  # pins back, embedded, the add killed before indexes
        store.catalog.add_ingest(read_corpus(tree_corpus.root), "{}")
        embed_store(store, B, EmbedConfig(workers=0))
    found = check_store(store_copy).errors
    assert [f.problem for f in found] == ["no_index"] and "['graph']" in str(found[0])
    repaired = repair_store(store_copy)
    assert repaired.after.ok and any("['graph']" in a for a in repaired.actions)
    with Store.open(store_copy, read_only=True) as store:
        assert store.catalog.get_index("graph")["factory"] == "HNSW8"


def test_categories_stored_before_todays_cleaning_rules_are_renamed_by_repair(
    store_copy: Path,
) -> None:
    """A category stored with an en dash (cleaned into '_' since) matched no filter typed
    either way; check warns, repair renames it in pins and boards and marks heads stale."""
    from pinsearch.search import PinSearcher

    with Store.open(store_copy) as store:
        old = store.catalog.query("SELECT category FROM pins ORDER BY pin_key LIMIT 1")[0]
        con = store.catalog.connection
        for table in ("pins", "boards"):
            con.execute(f"UPDATE {table} SET category = 'arts_\u2013_crafts' WHERE category = ?",
                        [old["category"]])  # fmt: skip
        train_head(store, B, "knn", {"n_neighbors": 1})
    assert ("warning", "categories", "categories_not_normalised") in _problems(store_copy)
    repaired = repair_store(store_copy)
    assert repaired.after.ok and not repaired.after.findings
    assert any("renamed 1" in a and "stale" in a for a in repaired.actions)
    with Store.open(store_copy, read_only=True) as store:
        found = PinSearcher(store).filter_keys(category="Arts \u2013 Crafts")
        assert len(found) == 8
        assert store.catalog.query("SELECT count(*) AS n FROM boards WHERE category = "
                                   "'arts_crafts'")[0]["n"] > 0  # fmt: skip


def test_catalog_rows_naming_files_out_of_their_folder_are_refused_and_repaired(
    store_copy: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.npy"  # a file of the reader's, not the store's
    outside.write_bytes((store_copy / "vectors" / B / "part-000000.npy").read_bytes())
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1}, name="h")
        store.catalog.connection.execute("UPDATE vector_parts SET file = ?", [str(outside)])
        store.catalog.connection.execute("UPDATE heads SET file = '../../etc/hostname'")
    with (
        pytest.raises(CatalogError, match=r"names the file .*outside\.npy.* was altered"),
        Store.open(store_copy, read_only=True, verify=False) as s,
    ):
        s.vectors(B).load()
    with (
        pytest.raises(CatalogError, match=r"head 'h' names the file '\.\./\.\./etc/hostname'"),
        Store.open(store_copy, read_only=True, verify=False) as s,
    ):
        classify(s, pin_id=s.catalog.scalar("SELECT min(pin_id) FROM pins"), head="h")
    problems = _problems(store_copy)
    assert ("error", f"vectors {B} part 0", "not_a_part_file") in problems
    assert ("error", "head h", "unreadable") in problems
    repaired = repair_store(store_copy)
    assert any("removed 24 vectors" in a for a in repaired.actions)
    assert "head h: forgotten (unreadable); train it again" in repaired.actions
    assert outside.is_file() and repaired.after.ok
    index_corpus(None, store_copy, backbone=B)  # re-embeds the pins of the forgotten part
    assert check_store(store_copy).findings == []
