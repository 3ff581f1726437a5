"""A corpus read again: the stored pins' metadata as read now replaces what was stored.

A title edited in ``pin.json``, a board's category or name edited in ``board.json``, a pin
folder moved to another board, an extra field changed, a manifest row rewritten: ``index`` and
``add`` run over the corpus again update the catalog, re-embed the title vectors of the pins
whose text changed, recompute board categories, drop boards and users left empty, and mark
stale only the heads whose labels changed. Everything runs on ``test_clip`` (a tiny random
OpenCLIP) so that the title space is real.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pinsearch.catalog import Catalog
from pinsearch.check import check_store
from pinsearch.classify import train_head
from pinsearch.clusters import ClusterConfig, cluster_store
from pinsearch.edit import add_corpus, refresh_store
from pinsearch.embed import EmbedConfig
from pinsearch.ingest import read_corpus
from pinsearch.pipeline import index_corpus
from pinsearch.store import Store
from pinsearch.text import text_encoder_for, text_space
from pinsearch.textsearch import TextSearcher

CLIP = "test_clip"
EMBED = EmbedConfig(workers=0, batch_size=16)


def _pin_dirs(root: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sorted(root.rglob("pin.json"))}


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _pins(store: Path) -> dict[str, dict]:
    with Store.open(store, read_only=True) as s:
        return {r["pin_id"]: r for r in s.catalog.query("SELECT * FROM pins")}


def _boards(store: Path) -> dict[str, dict]:
    with Store.open(store, read_only=True) as s:
        return {r["board"]: r for r in s.catalog.query("SELECT * FROM boards")}


def _heads_stale(store: Path) -> dict[str, bool]:
    with Store.open(store, read_only=True) as s:
        return {r["name"]: r["stale"] for r in s.catalog.query("SELECT name, stale FROM heads")}


def _title_vector(store: Path, pin_id: str) -> np.ndarray | None:
    with Store.open(store, read_only=True) as s:
        key = s.catalog.keys_for_ids([pin_id])[pin_id]
        vecs, keys = s.vectors(text_space(CLIP)).load()
    return vecs[keys == key][0] if (keys == key).any() else None


def _encoded(store: Path, text: str) -> np.ndarray:
    with Store.open(store, read_only=True) as s:
        return text_encoder_for(s, CLIP).encode([text])[0]


@pytest.fixture
def corpus(tree_copy: Path) -> Path:
    """The small tree, every pin.json with an extra field ``mood`` (a label for a head)."""
    for i, pin_dir in enumerate(_pin_dirs(tree_copy).values()):
        _edit_json(pin_dir / "pin.json", mood=("calm", "bold")[i % 2])
    return tree_copy


@pytest.fixture
def store(corpus: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store"
    report = index_corpus(corpus, path, backbone=CLIP, embed=EMBED)
    assert report.title_vectors == 24 and report.updated == 0
    with Store.open(path) as s:
        train_head(s, CLIP, "knn", {"n_neighbors": 3}, name="by_category")
        train_head(s, CLIP, "knn", {"n_neighbors": 3}, label="mood", name="by_mood")
    return path


def test_reading_an_unchanged_corpus_again_changes_nothing(corpus: Path, store: Path) -> None:
    before = _pins(store)
    # the same extra fields in another order are the same metadata
    first = next(iter(_pin_dirs(corpus).values())) / "pin.json"
    data = json.loads(first.read_text())
    first.write_text(json.dumps(dict(reversed(list(data.items())))))
    report = index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    assert (report.already_present, report.updated, report.moved) == (24, 0, 0)
    assert report.title_vectors == 0 and report.stale_heads == []
    assert _pins(store) == before
    assert _heads_stale(store) == {"by_category": False, "by_mood": False}


def test_an_edited_title_is_stored_and_embedded_again(corpus: Path, store: Path) -> None:
    dirs = _pin_dirs(corpus)
    edited, emptied, untouched = list(dirs)[:3]
    old_untouched = _title_vector(store, untouched)
    _edit_json(dirs[edited] / "pin.json", title="a bright red kayak")
    _edit_json(dirs[emptied] / "pin.json", title=None, description=None)
    report = index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    assert (report.updated, report.moved, report.added) == (2, 0, 0)
    assert report.title_vectors == 1  # the emptied pin has no text to embed any more
    pins = _pins(store)
    assert pins[edited]["title"] == "a bright red kayak"
    assert pins[emptied]["title"] in ("", None) and pins[emptied]["description"] in ("", None)
    text = f"a bright red kayak. {pins[edited]['description']}"
    np.testing.assert_allclose(_title_vector(store, edited), _encoded(store, text), atol=1e-5)
    assert _title_vector(store, emptied) is None
    np.testing.assert_array_equal(_title_vector(store, untouched), old_untouched)
    with Store.open(store, read_only=True) as s:
        hits = TextSearcher(s).search_text(text, k=30, mode="title").hits
        assert hits[0].pin_id == edited and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert emptied not in {h.pin_id for h in hits} and len(hits) == 23
        assert s.catalog.titles_pending() == []
    # a title is not a label: no head is stale
    assert report.stale_heads == [] and not any(_heads_stale(store).values())
    assert check_store(store).ok and not check_store(store).findings


def test_category_and_board_edits_stale_only_the_heads_of_that_label(
    corpus: Path, store: Path
) -> None:
    board_dir = corpus / "user001" / "architecture-2"
    _edit_json(board_dir / "board.json", category="Travel", name="Trips", description="away")
    report = index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    assert report.updated == 4 and report.title_vectors == 0
    assert report.stale_heads == ["by_category"]
    assert _heads_stale(store) == {"by_category": True, "by_mood": False}
    pins = [p for p in _pins(store).values() if p["board"] == "user001/architecture-2"]
    assert len(pins) == 4 and {p["category"] for p in pins} == {"travel"}
    board = _boards(store)["user001/architecture-2"]
    assert (board["category"], board["name"], board["description"]) == ("travel", "Trips", "away")
    with Store.open(store, read_only=True) as s:
        assert s.catalog.query("SELECT pins FROM categories WHERE category = 'travel'") == [
            {"pins": 4}
        ]
    # an extra field is a label too: only the heads learning it go stale
    with Store.open(store) as s:
        train_head(s, CLIP, "knn", {"n_neighbors": 3}, name="by_category")
    pin_dir = next(iter(_pin_dirs(corpus).values()))
    mood = json.loads((pin_dir / "pin.json").read_text())["mood"]
    _edit_json(pin_dir / "pin.json", mood="calm" if mood == "bold" else "bold")
    report = add_corpus(corpus, store, device="cpu", workers=0)
    assert (report.added, report.updated) == (0, 1) and report.stale_heads == ["by_mood"]
    assert _heads_stale(store) == {"by_category": False, "by_mood": True}
    assert check_store(store).ok


def test_pins_moved_to_another_board_and_a_moved_corpus(
    corpus: Path, store: Path, tmp_path: Path
) -> None:
    with Store.open(store) as s:
        train_head(s, CLIP, "knn", {"n_neighbors": 3}, label="board", name="by_board")
        cluster_store(s, CLIP, ClusterConfig(level="boards", k=2))
    # every pin of user000 moves to user001's board of its category: user000's boards and
    # user000 go
    targets = {}
    for source in sorted((corpus / "user000").iterdir()):
        target = corpus / "user001" / source.name.replace("-1", "-2")
        for pin_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            targets[pin_dir.name] = target
            shutil.move(pin_dir, target / pin_dir.name)
    report = index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    assert (report.updated, report.moved, report.added) == (len(targets), len(targets), 0)
    pins = _pins(store)
    for name, target in targets.items():
        assert pins[name]["board"] == f"user001/{target.name}"
        assert pins[name]["user_id"] == "user001"
        assert Path(pins[name]["path"]).parent == (target / name).resolve()
    assert not any(b.startswith("user000/") for b in _boards(store))
    with Store.open(store, read_only=True) as s:
        assert [r["user_id"] for r in s.catalog.query("SELECT * FROM users")] == ["user001"]
        items = {r["item"] for r in s.catalog.query("SELECT item FROM clusters")}
        assert items == {b for b in _boards(store)} and len(items) == 3  # the saved run's
    assert report.stale_heads == ["by_board"]  # same category and mood: their heads hold
    # the whole corpus moved (mtimes kept): paths follow, and no image counts as changed
    elsewhere = tmp_path / "moved"
    shutil.move(corpus, elsewhere)
    report = index_corpus(elsewhere, store, backbone=CLIP, embed=EMBED)
    assert report.updated == report.moved == 24 and report.embedded == 0
    assert all(p["path"].startswith(str(elsewhere.resolve())) for p in _pins(store).values())
    refreshed = refresh_store(store, device="cpu", workers=0)
    assert (refreshed.changed, refreshed.missing, refreshed.refreshed) == (0, 0, 0)
    assert check_store(store).ok and not check_store(store).findings


@pytest.mark.parametrize("killed_after_drop", [False, True])
def test_titles_left_by_an_interrupted_run_are_finished_by_refresh(
    corpus: Path, store: Path, killed_after_drop: bool
) -> None:
    dirs = _pin_dirs(corpus)
    pin_id = next(iter(dirs))
    _edit_json(dirs[pin_id] / "pin.json", title="stormy harbour")
    # the ingest's transaction committed, then the run was killed: the note says so
    with Store.open(store) as s:
        changes = s.catalog.add_ingest(read_corpus(corpus, exclude_ids=s.catalog.pin_id_paths()),
                                       "{}").changes  # fmt: skip
        assert changes.pins == [pin_id] and len(changes.retitled) == 1
    report = check_store(store)
    assert report.ok and [f.problem for f in report.findings] == ["titles_pending"]
    assert refresh_store(store, dry_run=True).titles == 1
    if killed_after_drop:  # killed later: the old title vector dropped, its entry not yet
        with Store.open(store) as s:
            s.vectors(text_space(CLIP)).drop_keys(np.asarray(changes.retitled))
    refreshed = refresh_store(store, device="cpu", workers=0)
    assert refreshed.titles == 1 and refreshed.refreshed == 0
    text = f"stormy harbour. {_pins(store)[pin_id]['description']}"
    np.testing.assert_allclose(_title_vector(store, pin_id), _encoded(store, text), atol=1e-5)
    assert check_store(store).ok and not check_store(store).findings
    with Store.open(store, read_only=True) as s:
        hit = TextSearcher(s).search_text(text, k=1, mode="title").hits[0]
        assert hit.pin_id == pin_id and hit.score == pytest.approx(1.0, abs=1e-4)


def test_a_rewritten_manifest_row(tmp_path: Path, tree_copy: Path) -> None:
    rows = [
        {"path": str(p.path.relative_to(tree_copy.resolve())), "pin_id": p.pin_id,
         "board": p.board, "category": p.category, "title": p.title, "season": "summer"}
        for p in read_corpus(tree_copy).pins
    ]  # fmt: skip
    manifest = tree_copy / "pins.csv"

    def write() -> None:
        with manifest.open("w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)

    write()
    store = tmp_path / "store"
    index_corpus(manifest, store, backbone=CLIP, embed=EMBED)
    rows[0]["category"], rows[1]["season"], rows[2]["board"] = "travel", "winter", "new-board"
    rows[3]["title"] = ""
    write()
    report = index_corpus(manifest, store, backbone=CLIP, embed=EMBED)
    assert report.updated == 4
    pins = _pins(store)
    assert pins[rows[0]["pin_id"]]["category"] == "travel"
    assert json.loads(pins[rows[1]["pin_id"]]["extra"]) == {"season": "winter"}
    assert pins[rows[2]["pin_id"]]["board"] == "new-board"
    assert _boards(store)["new-board"]["category"] == rows[2]["category"]
    assert not pins[rows[3]["pin_id"]]["title"] and _title_vector(store, rows[3]["pin_id"]) is None
    with Catalog(store / "catalog.duckdb", read_only=True) as cat:
        assert cat.titles_pending() == []
    assert check_store(store).ok


def test_heads_of_a_changed_label_are_stale_once_the_catalog_has_it(
    corpus: Path, store: Path
) -> None:
    """Marked in the ingest's transaction: a run killed right after would not see the change
    again (the rows hold the new labels)."""
    _edit_json(corpus / "user000" / "food_drink-1" / "board.json", category="Travel")
    with Store.open(store) as s:
        result = read_corpus(corpus, exclude_ids=s.catalog.pin_id_paths())
        changes = s.catalog.add_ingest(result, "{}").changes
    assert changes.labels == ["category"] and changes.stale_heads == ["by_category"]
    assert _heads_stale(store) == {"by_category": True, "by_mood": False}
    assert index_corpus(corpus, store, backbone=CLIP, embed=EMBED).updated == 0


def test_a_moved_corpus_keeps_the_stored_copy_of_a_duplicate_id(
    corpus: Path, tmp_path: Path
) -> None:
    dirs = _pin_dirs(corpus)
    stored = next(d for d in dirs.values() if d.parts[-3] == "user001")  # read after user000
    # a copy of its folder, read first, whose image is cut: the first run kept the good one
    copy = corpus / "user000" / "architecture-1" / stored.name
    shutil.copytree(stored, copy)
    image = next(copy.glob("*.jpg"))
    image.write_bytes(image.read_bytes()[:400])
    store = tmp_path / "store"
    index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    first = _pins(store)[stored.name]
    assert Path(first["path"]).parent == stored.resolve()
    elsewhere = tmp_path / "moved"
    shutil.move(corpus, elsewhere)
    index_corpus(elsewhere, store, backbone=CLIP, embed=EMBED)
    now = _pins(store)[stored.name]
    assert (now["board"], now["category"]) == (first["board"], first["category"])
    assert Path(now["path"]).parent == (elsewhere / stored.relative_to(corpus)).resolve()


def test_a_copy_that_becomes_the_stored_image_leaves_the_skipped_table(
    corpus: Path, store: Path
) -> None:
    dirs = _pin_dirs(corpus)
    pin_id, original = next(iter(dirs.items()))
    other_board = next(d.parent for d in dirs.values() if d.parent != original.parent)
    shutil.copytree(original, other_board / pin_id)  # a re-pin: skipped, the id is stored
    assert index_corpus(corpus, store, backbone=CLIP, embed=EMBED).skipped == 1

    def skipped() -> list[str]:
        with Store.open(store, read_only=True) as s:
            return [r["reason"] for r in s.catalog.query("SELECT reason FROM skipped")]

    assert skipped() == ["duplicate_id"]
    shutil.rmtree(original)  # the first is gone: the copy is the pin's image now
    report = index_corpus(corpus, store, backbone=CLIP, embed=EMBED)
    assert (report.moved, report.skipped) == (1, 0) and skipped() == []
    assert _pins(store)[pin_id]["board"] == f"{other_board.parent.name}/{other_board.name}"


def test_a_boards_name_does_not_follow_the_new_pins(tmp_path: Path, tree_corpus) -> None:
    """Two folders of one board ("Home Decor", "home-decor"): its name is the least of its
    pins', whichever are new."""
    images = sorted(Path(tree_corpus.root).rglob("*.jpg"))
    root = tmp_path / "photos"
    for folder, picked in (("Home Decor", images[:2]), ("home-decor", images[2:4])):
        (root / folder).mkdir(parents=True)
        for f in picked:
            shutil.copy(f, root / folder / f.name)
    store = tmp_path / "store"
    index_corpus(root, store, backbone=CLIP, embed=EMBED)
    assert _boards(store)["home_decor"]["name"] == "Home Decor"
    shutil.copy(images[4], root / "home-decor" / images[4].name)  # new pins in the other
    assert index_corpus(root, store, backbone=CLIP, embed=EMBED).added == 1
    assert _boards(store)["home_decor"]["name"] == "Home Decor"
    assert index_corpus(root, store, backbone=CLIP, embed=EMBED).updated == 0
