"""``pinsearch add`` and ``remove``: incremental changes keep catalog, vectors and indexes in
step, queries are right straight after, heads go stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.check import check_store
from pinsearch.classify import train_head
from pinsearch.cli.app import app
from pinsearch.edit import add_corpus, remove_pins
from pinsearch.errors import IndexFileError, PinNotFoundError
from pinsearch.ingest import IngestConfig
from pinsearch.pipeline import index_corpus
from pinsearch.search import PinSearcher
from pinsearch.store import Store

B = "test_efficientnet"


def _ids(store: Store) -> set[str]:
    return {r["pin_id"] for r in store.catalog.query("SELECT pin_id FROM pins")}


def _all_hits(store: Store, k: int = 50) -> set[str]:
    """Every pin id any query can return (k covers the whole store)."""
    searcher = PinSearcher(store, backbone=B)
    vec, _ = store.vectors(B).load()
    found: set[str] = set()
    for v in vec[:5]:
        found |= {h.pin_id for h in searcher.similar_to_vector(v, k).hits}
    return found


def test_remove_pins_takes_vectors_and_index_entries(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
        gone = sorted(_ids(store))[:3]
        report = remove_pins(store, pin_ids=gone)
        assert report.pins == 3 and report.vectors == {B: 3} and report.indexes == [B]
        assert report.stale_heads == [f"{B}/knn"]
        assert not (set(gone) & _ids(store)) and len(_ids(store)) == 21
        assert len(store.vectors(B)) == 21 and store.load_index(B).ntotal == 21
        assert not (set(gone) & _all_hits(store))
        assert store.catalog.query("SELECT stale FROM heads")[0]["stale"] is True
    assert check_store(store_copy).ok


def test_remove_board_and_user(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        board = store.catalog.query("SELECT board FROM boards ORDER BY board LIMIT 1")[0]["board"]
        r = remove_pins(store, boards=[board])
        assert r.pins == 4 and r.boards == 1
        assert not store.catalog.query("SELECT * FROM boards WHERE board = ?", [board])
        r = remove_pins(store, users=["user001"])
        assert r.users == 1 and r.boards >= 1
        left = store.catalog.query("SELECT DISTINCT user_id FROM pins")
        assert [row["user_id"] for row in left] == ["user000"]
        assert not store.catalog.query("SELECT * FROM boards WHERE user_id = 'user001'")
        assert store.load_index(B).ntotal == len(_ids(store))
    assert check_store(store_copy).ok


def test_remove_unknown_names_nothing_changes(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        before = _ids(store)
        pin = sorted(before)[0]
        with pytest.raises(PinNotFoundError, match="nope"):
            remove_pins(store, pin_ids=[pin, "nope"])
        with pytest.raises(PinNotFoundError, match="board"):
            remove_pins(store, boards=["no/such-board"])
        with pytest.raises(ValueError, match="name pins"):
            remove_pins(store)
        assert _ids(store) == before and len(store.vectors(B)) == 24


def test_remove_with_an_approximate_index(tree_corpus, tmp_path: Path) -> None:
    from pinsearch.indexes import IndexConfig

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B, index={"factory": "IVF4,Flat"})
    with Store.open(tmp_path / "s") as store:
        store.build_index(B, IndexConfig(factory="HNSW8", metric="cosine"), name="graph")
        store.build_index(B, IndexConfig(factory="Flat", metric="l2"), name="exact")
        ivf_sha = store.catalog.get_index(B)["sha256"]
        broken = store.index_base("exact").with_name("exact.ids.npy")
        broken.write_bytes(b"not an id map")  # damaged: removal falls back to a rebuild
        store.forget_cached("exact")
        gone = sorted(_ids(store))[5:15]
        gone_keys = _keys_of(store, gone)
        assert len(gone_keys) == 10 and np.isin(gone_keys, store.load_index(B).ids).all()
        report = remove_pins(store, pin_ids=gone)
        assert sorted(report.indexes) == sorted([B, "graph", "exact"])
        assert sorted(report.rebuilt) == ["exact", "graph"]  # the IVF one: in place
        assert store.catalog.get_index(B)["sha256"] != ivf_sha
        for name in (B, "graph", "exact"):
            index = store.load_index(name)
            assert index.ntotal == 14 and not np.isin(index.ids, gone_keys).any()
        assert store.load_index(B).factory == "IVF4,Flat"
        assert not (set(gone) & _all_hits(store))
    assert check_store(tmp_path / "s").ok
    with Store.open(tmp_path / "s", read_only=True) as store:  # what was saved is what is found
        assert not (set(gone) & _all_hits(store))


def test_index_with_new_pins_marks_the_backbones_heads_stale(
    tree_corpus, make_tree, tmp_path
) -> None:
    store = tmp_path / "s"
    index_corpus(tree_corpus.root, store, backbone=B)
    index_corpus(None, store, backbone="test_convnext")
    with Store.open(store) as s:
        train_head(s, B, "knn", {"n_neighbors": 1})
        train_head(s, "test_convnext", "knn", {"n_neighbors": 1})
    same = index_corpus(tree_corpus.root, store, backbone=B)  # nothing new: heads stay fresh
    assert same.embedded == 0 and same.stale_heads == []
    more = make_tree(tmp_path / "more", seed=7, pins_per_board=1)
    report = index_corpus(more.root, store, backbone=B)  # (add embeds for every backbone)
    assert report.embedded == 6 and report.stale_heads == [f"{B}/knn"]
    with Store.open(store, read_only=True) as s:
        stale = {r["name"]: r["stale"] for r in s.catalog.query("SELECT name, stale FROM heads")}
    assert stale == {f"{B}/knn": True, "test_convnext/knn": False}


def _keys_of(store: Store, pin_ids: list[str]) -> np.ndarray:
    rows = store.catalog.query(
        "SELECT pin_key FROM pins WHERE pin_id IN (SELECT unnest(?))", [pin_ids]
    )
    return np.array([r["pin_key"] for r in rows], dtype=np.int64)


def test_add_embeds_only_new_pins_for_every_backbone(tree_corpus, make_tree, tmp_path) -> None:
    store = tmp_path / "s"
    index_corpus(tree_corpus.root, store, backbone=B)
    index_corpus(None, store, backbone="test_convnext")
    with Store.open(store) as s:
        train_head(s, B, "knn", {"n_neighbors": 1})
    more = make_tree(tmp_path / "more", seed=7, pins_per_board=1)
    report = add_corpus(more.root, store)
    assert report.added == 6 and report.stale_heads == [f"{B}/knn"]
    assert {b["backbone"]: b["embedded"] for b in report.backbones} == {
        B: 6,
        "test_convnext": 6,
    }
    again = add_corpus(more.root, store)
    assert again.added == 0 and again.already_present == 6
    assert all(b["embedded"] == 0 for b in again.backbones)
    with Store.open(store, read_only=True) as s:
        assert {name: s.load_index(name).ntotal for name in s.index_names()} == {
            B: 30,
            "test_convnext": 30,
        }
        assert _all_hits(s) == _ids(s) and len(_ids(s)) == 30
    assert check_store(store).ok


def test_add_then_remove_gives_back_the_same_answers(store_copy: Path, make_tree, tmp_path):
    with Store.open(store_copy, read_only=True) as s:
        before = PinSearcher(s).similar_to_vector(s.vectors(B).load()[0][0], 10)
    more = make_tree(tmp_path / "more", seed=9, pins_per_board=1)
    add_corpus(more.root, store_copy)
    with Store.open(store_copy) as s:
        new = sorted(_ids(s) - {h.pin_id for h in before.hits})
        old = {r["pin_id"] for r in s.catalog.query("SELECT pin_id FROM pins WHERE ingest_id = 1")}
        remove_pins(s, pin_ids=sorted(set(new) - old))
    with Store.open(store_copy, read_only=True) as s:
        after = PinSearcher(s).similar_to_vector(s.vectors(B).load()[0][0], 10)
    assert [h.pin_id for h in after.hits] == [h.pin_id for h in before.hits]
    np.testing.assert_allclose([h.score for h in after.hits], [h.score for h in before.hits], 1e-6)


def test_add_reads_by_the_stores_category_rules(make_tree, tmp_path: Path) -> None:
    cats = ("art", "food_drink", "other")
    first = make_tree(tmp_path / "first", seed=3, categories=cats, pins_per_board=1)
    more = make_tree(tmp_path / "more", seed=4, categories=cats, pins_per_board=1)
    store = tmp_path / "s"
    index_corpus(first.root, store, backbone=B,
                 ingest=IngestConfig(categories=("art", "other"), drop_categories=()))  # fmt: skip

    def categories() -> dict[str, int]:
        with Store.open(store, read_only=True) as s:
            rows = s.catalog.query("SELECT category, pins FROM categories")
        return {r["category"]: r["pins"] for r in rows}

    held = categories()
    assert set(held) == {"art", "other"}
    report = add_corpus(more.root, store, workers=0)  # the store's rules: art and other kept
    assert report.rules["categories"] == ("art", "other") and report.rules["drop_categories"] == ()
    assert set(categories()) == {"art", "other"} and report.added == sum(held.values())
    with Store.open(store, read_only=True) as s:
        reasons = {r["reason"] for r in s.catalog.query(
            "SELECT reason FROM skipped WHERE ingest_id = 2")}  # fmt: skip
    assert reasons == {"unknown_category"}
    # options say otherwise; the CLI's too, and the next add follows the latest rules
    third = make_tree(tmp_path / "third", seed=5, categories=cats, pins_per_board=1)
    result = CliRunner().invoke(app, ["add", str(third.root), "--store", str(store),
                                      "--categories", "food_drink", "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "read by the rules: categories food_drink; dropped: none" in result.output
    assert categories()["food_drink"] == held["art"]
    assert store_rules_of(store) == {"categories": ("food_drink",), "drop_categories": (),
                                     "check_images": True, "max_pixels": 150_000_000}  # fmt: skip
    whole = add_corpus(more.root, store, ingest=IngestConfig(), workers=0)  # as given
    assert whole.rules["categories"] is None and whole.added == held["art"]  # food_drink's
    assert check_store(store).ok


def store_rules_of(path: Path) -> dict:
    from pinsearch.edit import store_rules

    with Store.open(path, read_only=True) as s:
        return store_rules(s)


def test_add_refuses_a_missing_store(tree_corpus, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no pinsearch store"):
        add_corpus(tree_corpus.root, tmp_path / "nothing")


def test_cli_add_remove(store_copy: Path, make_tree, tmp_path: Path) -> None:
    runner = CliRunner()
    more = make_tree(tmp_path / "more", seed=3, pins_per_board=1)
    out = runner.invoke(app, ["add", str(more.root), "--store", str(store_copy), "--decode",
                              "device", "--cpu-share", "0.5", "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["added"] == 6
    last = make_tree(tmp_path / "last", seed=4, pins_per_board=1)
    victim = sorted(last.root.glob("*/*/*/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # passes the probe
    out = runner.invoke(app, ["add", str(last.root), "--store", str(store_copy)])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())  # (the console wraps long lines)
    assert "added 6 pins" in said and "embedded 5, 1 failed to decode (skipped, see" in said
    with Store.open(store_copy, read_only=True) as s:
        pin = sorted(_ids(s))[0]
    out = runner.invoke(app, ["remove", "-s", str(store_copy), "--pin", pin, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["pins"] == 1
    out = runner.invoke(app, ["remove", "-s", str(store_copy), "--pin", pin])
    assert out.exit_code != 0


def test_pins_removed_one_by_one_take_their_emptied_board_and_user(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        rows = store.catalog.query("SELECT pin_id, board, user_id FROM pins ORDER BY pin_key")
        user = rows[0]["user_id"]
        of_user = [r for r in rows if r["user_id"] == user]
        boards = {r["board"] for r in of_user}
        report = remove_pins(store, pin_ids=[r["pin_id"] for r in of_user])  # by id, not name
        assert report.boards == len(boards) and report.users == 1
        assert not store.catalog.query(
            "SELECT board FROM boards WHERE board IN (SELECT unnest(?))", [sorted(boards)]
        )
        assert not store.catalog.query("SELECT * FROM users WHERE user_id = ?", [user])
        assert store.info().users == 1
    assert check_store(store_copy).ok


def test_an_interrupted_remove_is_finished_by_the_next_writer(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
        gone = _keys_of(store, sorted(_ids(store))[:3])
        # What remove_pins has done when it is killed before its index step:
        store.vectors(B).drop_keys(gone)
        store.catalog.connection.execute(
            "DELETE FROM pins WHERE pin_key IN (SELECT unnest(?))", [gone.tolist()]
        )
    with pytest.raises(IndexFileError, match="refers to 3 pin keys"):
        Store.open(store_copy, read_only=True)  # a reader is told; it changes nothing
    with Store.open(store_copy) as store:  # any writer takes the entries out
        index = store.load_index(B)
        assert index.ntotal == 21 and not np.isin(index.ids, gone).any()
        assert store.catalog.query("SELECT stale FROM heads")[0]["stale"]
    assert check_store(store_copy).ok


def test_a_remove_stopped_after_its_vector_step_and_run_again_updates_the_index(
    store_copy: Path,
) -> None:
    with Store.open(store_copy) as store:
        pin = sorted(_ids(store))[0]
        store.vectors(B).drop_keys(_keys_of(store, [pin]))  # where the first run was killed
    with Store.open(store_copy) as store:
        report = remove_pins(store, pin_ids=[pin])  # run again: no vector left to drop
        assert report.vectors == {} and report.indexes == [B]
        assert store.catalog.get_embedding(B)["count"] == len(store.vectors(B)) == 23
    with Store.open(store_copy, read_only=True) as store:  # readers can open it
        assert store.load_index(B).ntotal == 23 and pin not in _all_hits(store)
    assert check_store(store_copy).ok


def test_readers_keep_the_files_of_a_crashed_writers_last_state(store_copy: Path) -> None:
    import subprocess
    import sys

    with Store.open(store_copy, read_only=True) as store:
        pin = sorted(_ids(store))[0]
    crash = (
        "import os, sys\n"
        "from pinsearch.edit import remove_pins\n"
        "from pinsearch.store import Store\n"
        "store = Store.open(sys.argv[1])  # held: not closed (and checkpointed) on return\n"
        "remove_pins(store, pin_ids=[sys.argv[2]])\n"
        "os._exit(9)  # killed after the remove committed, before close publishes\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(store_copy), pin], capture_output=True)
    assert done.returncode == 9, done.stderr.decode()
    assert (store_copy / "catalog.duckdb.wal").exists()  # the crashed writer's log
    with Store.open(store_copy) as writer:  # replays it, deletes the parts it retired
        assert writer.catalog.count_pins() == 23
        with Store.open(store_copy, read_only=True) as reader:  # on the snapshot meanwhile
            assert reader.snapshot and reader.catalog.count_pins() == 23
            assert len(reader.vectors(B).load()[1]) == 23  # its parts are still there


def test_add_updates_every_index_of_the_backbone(store_copy: Path, make_tree, tmp_path) -> None:
    from pinsearch.indexes import IndexConfig

    with Store.open(store_copy) as store:
        store.build_index(B, IndexConfig(factory="HNSW8", metric="l2"), name="graph")
    more = make_tree(tmp_path / "more", seed=7, pins_per_board=1)
    add_corpus(more.root, store_copy)
    with Store.open(store_copy, read_only=True) as store:
        assert {n: store.load_index(n).ntotal for n in store.index_names()} == {B: 30, "graph": 30}
        assert store.load_index("graph").factory == "HNSW8"
    assert not check_store(store_copy).findings


def test_index_options_other_than_factory_and_metric_are_saved(store_copy: Path) -> None:
    report = index_corpus(None, store_copy, backbone=B, index={"fp16": True, "nprobe": 7})
    assert report.index_action == "unchanged, settings changed: fp16, nprobe"
    with Store.open(store_copy, read_only=True) as store:
        index = store.load_index(B)
        assert index.config.fp16 and index.config.nprobe == 7 and index.ntotal == 24


def test_an_index_too_big_to_retrain_on_what_is_left_becomes_flat(store_copy: Path) -> None:
    from pinsearch.indexes import IndexConfig

    with Store.open(store_copy) as store:  # 24 vectors train 16 lists; 14 cannot
        store.build_index(B, IndexConfig(factory="IVF16,Flat,Refine(Flat)"), name="refined")
        report = remove_pins(store, pin_ids=sorted(_ids(store))[:10])
        assert "refined" in report.rebuilt
        index = store.load_index("refined")
        assert index.factory == "Flat" and index.ntotal == 14
    assert check_store(store_copy).ok


def test_remove_from_a_gpu_index_without_room_left_saves_it_from_the_cpu(
    gpu_free_memory: dict[str, int], store_copy: Path
) -> None:
    """The index is device gpu; by the time pins are removed the GPU is full: the pins leave
    the index all the same (saved from its CPU copy), and the store stays consistent."""
    from pinsearch.embed import EmbedConfig

    free = gpu_free_memory
    index_corpus(None, store_copy, backbone=B, index={"device": "gpu"},
                 embed=EmbedConfig(workers=0, device="cpu"), rebuild=True)  # fmt: skip
    with Store.open(store_copy, read_only=True) as store:
        rows = store.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 2")
    first, second = (r["pin_id"] for r in rows)
    with Store.open(store_copy) as store:
        assert store.load_index(B).on_gpu  # placed while there was room
        free["bytes"] = 1 << 30  # then the GPU fills up: placing it again after the removal fails
        assert remove_pins(store, pin_ids=[first]).pins == 1
        assert store.catalog.get_index(B)["ntotal"] == 23
    with Store.open(store_copy) as store:  # and loading it on the GPU fails from the start
        assert remove_pins(store, pin_ids=[second]).pins == 1
        assert store.catalog.get_index(B)["ntotal"] == 22
    free["bytes"] = 64 << 30
    assert check_store(store_copy).ok


def test_update_of_a_gpu_index_without_room_left_saves_it_from_the_cpu(
    gpu_free_memory: dict[str, int], store_copy: Path
) -> None:
    """Stored vectors an index lacks are added to it; over several GPUs a Flat index then
    needs placing again, and with the GPUs full (device gpu) it is saved from the CPU, whole."""
    from pinsearch.embed import EmbedConfig

    free = gpu_free_memory
    index_corpus(None, store_copy, backbone=B, index={"device": "gpu"},
                 embed=EmbedConfig(workers=0, device="cpu"), rebuild=True)  # fmt: skip
    with Store.open(store_copy) as store:
        index = store.load_index(B)
        assert index.on_gpu and index.remove(index.ids[:3]) == 3  # 3 stored vectors left out
        store.save_index(index, B)
        free["bytes"] = 1 << 30  # the GPUs fill up
        index, added = store.update_index(B)
        assert added == 3 and index.ntotal == 24 and store.catalog.get_index(B)["ntotal"] == 24
    free["bytes"] = 64 << 30
    assert check_store(store_copy).ok


def test_index_options_are_compared_as_stored(store_copy: Path) -> None:
    # the saved factory is stripped: " Flat " asked again is the same index, not a rebuild
    from pinsearch.embed import EmbedConfig

    embed = EmbedConfig(workers=0)
    first = index_corpus(None, store_copy, backbone=B, index={"factory": " Flat "}, embed=embed)
    again = index_corpus(None, store_copy, backbone=B, index={"factory": "Flat "}, embed=embed)
    assert first.factory == "Flat" and again.index_action == "unchanged"


# -- from the review of ingest and incremental runs --------------------------------------------


def test_add_to_a_sampled_store_embeds_the_new_pins_only(make_tree, tmp_path: Path) -> None:
    from pinsearch.embed import EmbedConfig

    corpus = make_tree(tmp_path / "c", pins_per_board=4)
    index_corpus(
        corpus.root,
        tmp_path / "s",
        backbone=B,
        embed=EmbedConfig(workers=0),
        select=lambda store: store.catalog.pin_columns()[0][:8],
    )  # a study's sample
    more = make_tree(tmp_path / "more", seed=5, pins_per_board=1)
    report = add_corpus(more.root, tmp_path / "s", workers=0)
    assert report.added == 6 and report.backbones[0]["embedded"] == 6  # (it embedded 46)
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert len(store.vectors(B)) == 14 and store.catalog.count_pins() == 30


def test_add_records_a_pin_one_sampled_backbone_fails_and_retries_it_once_fixed(
    make_tree, tmp_path: Path
) -> None:
    """Both backbones hold a study's sample; a new pin's file is cut short between the two
    backbones' passes. The add stopped there ("selected pins fail to embed ... but stay"),
    and every later add did too; a fixed file was never embedded in that backbone."""
    from pinsearch.embed import EmbedConfig, failed_to_embed

    corpus = make_tree(tmp_path / "c", pins_per_board=2)
    sample = lambda store: store.catalog.pin_columns()[0][:7]  # noqa: E731
    index_corpus(corpus.root, tmp_path / "s", backbone=B, embed=EmbedConfig(workers=0),
                 select=sample)  # fmt: skip
    index_corpus(None, tmp_path / "s", backbone="test_convnext", select=sample)
    more = make_tree(tmp_path / "more", seed=5, pins_per_board=1)
    image = sorted(p for p in more.root.rglob("*.jpg"))[0]
    whole = image.read_bytes()
    starts = []

    def spoil(done: int, total: int) -> None:
        starts.append(done)
        if done == 0 and starts.count(0) == 2:  # the second backbone begins
            image.write_bytes(whole[: len(whole) // 3])

    report = add_corpus(more.root, tmp_path / "s", workers=0, progress=spoil)
    second = report.backbones[1]
    assert report.added == 6 and (second["embedded"], second["embed_failed"]) == (5, 1)
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert len(failed_to_embed(store, second["backbone"])) == 1
        assert store.catalog.count_pins() == 18  # (the first backbone holds it: it stays)
    image.write_bytes(whole)  # fixed
    again = add_corpus(more.root, tmp_path / "s", workers=0)
    assert again.added == 0 and [b["embedded"] for b in again.backbones] == [0, 1]
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert len(failed_to_embed(store, second["backbone"])) == 0
        assert [len(store.vectors(b["backbone"])) for b in again.backbones] == [13, 13]


@pytest.mark.parametrize("stop_in", [1, 2], ids=["first-backbone", "second-backbone"])
@pytest.mark.parametrize("sampled", [False, True], ids=["whole", "sampled"])
def test_an_add_stopped_after_its_ingest_is_finished_by_the_next(
    make_tree, tmp_path: Path, sampled: bool, stop_in: int
) -> None:
    """The pins an add stored before it stopped (a kill, a full disk) are embedded by the next
    add, in every backbone, a sampled one too (they were counted already present, and no
    backbone embedded them)."""
    from pinsearch.embed import EmbedConfig

    corpus = make_tree(tmp_path / "c", pins_per_board=2)
    sample = (lambda store: store.catalog.pin_columns()[0][:7]) if sampled else None
    index_corpus(corpus.root, tmp_path / "s", backbone=B, embed=EmbedConfig(workers=0),
                 select=sample)  # fmt: skip
    index_corpus(None, tmp_path / "s", backbone="test_convnext", select=sample)
    with Store.open(tmp_path / "s") as store:
        train_head(store, B, "knn", {"n_neighbors": 1}, only_embedded=True)
    more = make_tree(tmp_path / "more", seed=5, pins_per_board=1)

    calls = []

    def stop(done: int, total: int) -> None:  # in the second backbone: the first embedded
        calls.append(done)  # the add's pins already
        if done and calls.count(0) == stop_in:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        add_corpus(more.root, tmp_path / "s", workers=0, progress=stop)
    again = add_corpus(more.root, tmp_path / "s", workers=0)
    assert again.added == 0 and again.already_present == 6
    assert [b["embedded"] for b in again.backbones] == [6, 6] if stop_in == 1 else [0, 6]
    assert again.stale_heads == [f"{B}/knn"]
    with Store.open(tmp_path / "s", read_only=True) as store:
        held = 7 if sampled else 12  # (7 + 6 > 12: a sampled backbone is told by the pins
        # it holds of those stored before the add)
        assert [len(store.vectors(b)) for b in (B, "test_convnext")] == [held + 6] * 2
        assert store.catalog.get_meta("add_pending") is None
    assert not check_store(tmp_path / "s").errors  # (a sample's pins left out: warnings)
    assert add_corpus(more.root, tmp_path / "s", workers=0).stale_heads == []  # done


def test_a_damaged_part_in_any_backbone_stops_a_remove_with_nothing_changed(
    store_copy: Path,
) -> None:
    index_corpus(None, store_copy, backbone="test_convnext")
    with Store.open(store_copy) as store:
        last = store.backbones()[-1]  # checked before the first backbone's swap
        counts = {b: len(store.vectors(b)) for b in store.backbones()}
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        part = store.vectors(last).parts()[0]
    damaged = store_copy / "vectors" / last.replace(":", "_") / Path(str(part["file"])).name
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with Store.open(store_copy) as store:
        with pytest.raises(ValueError, match="damaged"):
            remove_pins(store, pin_ids=[pin])
        assert {b: len(store.vectors(b)) for b in store.backbones()} == counts
        assert pin in store.catalog.pin_ids()
    errors = {(f.where, f.problem) for f in check_store(store_copy).errors}
    assert (f"vectors {last} part 0", "checksum") in errors  # the other backbone: whole
    assert not [w for w, _ in errors if w.endswith(next(b for b in counts if b != last))]


def test_heads_go_stale_with_the_pins_a_remove_commits(store_copy: Path) -> None:
    """Marked in the transaction that removes the pins: a remove stopped later (before its
    index step) leaves nothing to remove, and would leave them fresh."""
    with Store.open(store_copy) as store:
        train_head(store, B, "knn", {"n_neighbors": 1})
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]

        def stop(*args: object, **kwargs: object) -> bool:
            raise KeyboardInterrupt  # the index step, after the catalog's commit

        store.remove_from_index = stop  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            remove_pins(store, pin_ids=[pin])
    with Store.open(store_copy, read_only=True, verify=False) as store:  # (a writer would
        assert pin not in store.catalog.pin_ids()  # mark them as it heals the index)
        assert [h["stale"] for h in store.info().heads] == [True]


def test_a_stored_id_from_another_image_is_skipped_as_a_duplicate(tmp_path: Path) -> None:
    from pinsearch.synth import make_image_folder

    one = make_image_folder(tmp_path / "one", per_category=2, image_size=64, seed=1)
    two = make_image_folder(tmp_path / "two", per_category=3, image_size=64, seed=2)
    index_corpus(one.root, tmp_path / "s", backbone=B)
    report = add_corpus(two.root, tmp_path / "s", workers=0)
    stored = len(list(Path(one.root).rglob("*.jpg")))
    fresh = len(list(Path(two.root).rglob("*.jpg"))) - stored
    assert (report.added, report.already_present, report.skipped) == (fresh, 0, stored)
    with Store.open(tmp_path / "s", read_only=True) as store:
        reasons = store.catalog.query("SELECT DISTINCT reason FROM skipped")
        assert [r["reason"] for r in reasons] == ["duplicate_id"]
    shutil.move(one.root, tmp_path / "moved")  # the stored files gone: a corpus moved
    again = add_corpus(tmp_path / "moved", tmp_path / "s", workers=0)
    assert (again.added, again.already_present, again.skipped) == (0, stored, 0)


def test_a_board_follows_the_categories_of_the_pins_added_to_it(tmp_path: Path) -> None:
    from pinsearch.synth import make_image_folder

    made = make_image_folder(tmp_path / "img", per_category=3, image_size=64)
    files = sorted(Path(made.root).rglob("*.jpg"))
    art = [f for f in files if f.parent.name == "art"]
    food = [f for f in files if f.parent.name == "food_drink"]

    def manifest(name: str, rows: list[tuple[Path, str]]) -> Path:
        path = tmp_path / name
        path.write_text("path,category,board,user\n" + "".join(
            f"{f},{c},B,u1\n" for f, c in rows))  # fmt: skip
        return path

    index_corpus(manifest("a.csv", [(art[0], "art")]), tmp_path / "s", backbone=B,
                 ingest=IngestConfig(allow_outside_root=True))  # fmt: skip
    add_corpus(manifest("b.csv", [(food[0], "food_drink"), (food[1], "food_drink")]),
               tmp_path / "s", ingest=IngestConfig(allow_outside_root=True), workers=0)  # fmt: skip
    with Store.open(tmp_path / "s", read_only=True) as store:
        row = store.catalog.query("SELECT category FROM boards WHERE board = 'u1/B'")
        assert row == [{"category": "food_drink"}]  # (it kept 'art', its first run's)
        assert store.info().top_boards[0]["category"] == "food_drink"


def test_indexes_of_a_store_emptied_by_a_remove_come_back_with_their_settings(
    tree_corpus, tmp_path: Path
) -> None:
    """Removing every pin drops the indexes (nothing to search); adding pins again builds
    them with the factories, metrics and names they had, not the default index alone."""
    from pinsearch.indexes import IndexConfig

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B, index={"factory": "HNSW8"})
    with Store.open(tmp_path / "s") as store:
        store.build_index(B, IndexConfig(factory="Flat", metric="l2", nprobe=3), name="exact")
        before = {r["name"]: r["config"] for r in store.catalog.list_indexes()}
        report = remove_pins(store, users=["user000", "user001"])
        assert report.pins == 24 and store.catalog.list_indexes() == []
    add_corpus(tree_corpus.root, tmp_path / "s")
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert {r["name"]: r["config"] for r in store.catalog.list_indexes()} == before
        assert {r["factory"] for r in store.catalog.list_indexes()} == {"HNSW8", "Flat"}
        assert (
            store.load_index("exact").ntotal == 24
            and store.catalog.get_meta("emptied_indexes") == "{}"
        )
    assert check_store(tmp_path / "s").ok


def test_an_index_asked_anew_after_every_pin_was_removed_is_built_once(
    tree_corpus, tmp_path: Path, monkeypatch
) -> None:
    """index --factory after a remove of every pin: the index is built with the kept settings
    and the asked ones over them, once (it was revived, then rebuilt for the new factory)."""
    from pinsearch.indexes import IndexConfig

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B,
                 index={"factory": "HNSW8", "ef_search": 40})  # fmt: skip
    with Store.open(tmp_path / "s") as store:
        remove_pins(store, users=["user000", "user001"])
    calls = []
    original = Store.build_index

    def counted(self, backbone, config=None, *, name=None):
        calls.append((name, (config or IndexConfig()).factory))
        return original(self, backbone, config, name=name)

    monkeypatch.setattr(Store, "build_index", counted)  # (counted, and done as always)
    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B, index={"factory": "Flat"})
    assert calls == [(B, "Flat")]
    with Store.open(tmp_path / "s", read_only=True) as store:
        config = json.loads(store.catalog.get_index(B)["config"])
        assert (config["factory"], config["ef_search"]) == ("Flat", 40)


def test_kept_index_settings_stay_with_their_backbone(tree_corpus, tmp_path: Path) -> None:
    """After a remove of every pin, index "hn" of one backbone keeps its settings for it: a
    new index of that name over another backbone is built as asked (it took HNSW16), and the
    kept one's return is reported as built (it said unchanged)."""
    from pinsearch.indexes import IndexConfig

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B)
    with Store.open(tmp_path / "s") as store:
        store.build_index(B, IndexConfig(factory="HNSW16", metric="l2"), name="hn")
        remove_pins(store, users=["user000", "user001"])
    other = index_corpus(tree_corpus.root, tmp_path / "s", backbone="test_vit", index_name="hn",
                         index={"metric": "ip"})  # fmt: skip
    assert other.index_action == "built"
    with Store.open(tmp_path / "s", read_only=True) as store:
        row = store.catalog.get_index("hn")
        assert (row["backbone"], row["factory"], row["metric"]) == ("test_vit", "Flat", "ip")
    back = index_corpus(tree_corpus.root, tmp_path / "s", backbone=B)
    assert back.index_action == "built" and back.ntotal == 24


def test_an_index_of_one_backbone_is_neither_taken_over_nor_searched_for_another(
    tree_corpus, tmp_path: Path
) -> None:
    """index -b B2 --index-name <B1's index> rebuilt B1's index from B2's vectors (B1 lost
    its only index); query -b B1 --index <B2's index> answered from B2."""
    from pinsearch.search import PinSearcher

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=B)
    index_corpus(tree_corpus.root, tmp_path / "s", backbone="test_vit")
    for name, says in ((B, f"belongs to {B!r}"), ("x#text", "names a title space")):
        with pytest.raises(ValueError, match=says):
            index_corpus(tree_corpus.root, tmp_path / "s", backbone="test_vit",
                         index_name=name, index={"metric": "l2"})  # fmt: skip
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert store.catalog.get_index(B)["backbone"] == B
        with pytest.raises(ValueError, match=f"no index 'test_vit' of {B!r}"):
            PinSearcher(store, backbone=B, index="test_vit")
        assert PinSearcher(store, backbone="test_vit", index="test_vit").backbone == "test_vit"
