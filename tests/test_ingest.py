"""Tests for pinsearch.ingest: the three readers, cleaning rules, sampling and accounting."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pinsearch.errors import CorpusError
from pinsearch.ingest import (
    IngestConfig,
    PinRecord,
    SkippedPin,
    detect_format,
    iter_folder,
    iter_manifest,
    iter_tree,
    normalize_category,
    read_corpus,
    sample_per_category,
)
from pinsearch.synth import make_image_folder, make_pinterest_tree, write_manifest

# Fields every reader fills the same way (board_name / board_description differ by design:
# a manifest has no board.json).
_COMMON = ("pin_id", "board", "user", "category", "title", "description", "link", "path")


def _key(p: PinRecord) -> tuple:
    return tuple(getattr(p, f) for f in _COMMON)


def _records(items) -> tuple[list[PinRecord], list[SkippedPin]]:
    items = list(items)
    return [i for i in items if isinstance(i, PinRecord)], [
        i for i in items if isinstance(i, SkippedPin)
    ]


def _balanced(result) -> bool:
    return (
        len(result.pins) + len(result.skipped) + result.sampled_out + result.already_present
        == result.found
    )


def _tree_manifest_rows(root: Path) -> list[dict[str, str]]:
    """A manifest describing every pin of a tree, with paths relative to ``root``."""
    rows = []
    for pin_json in sorted(root.glob("*/*/*/pin.json")):
        pin_dir = pin_json.parent
        board_dir = pin_dir.parent
        info = json.loads(pin_json.read_text())
        board = json.loads((board_dir / "board.json").read_text())
        rows.append(
            {
                "path": (pin_dir / f"{pin_dir.name}.jpg").relative_to(root).as_posix(),
                "category": board["category"],
                "pin_id": pin_dir.name,
                "user": board_dir.parent.name,
                "board": board_dir.name,
                "title": info["title"],
                "description": info["description"],
                "link": info["link"],
            }
        )
    return rows


def _write_board(board_dir: Path, category: str | None, name: str = "Board") -> None:
    board_dir.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "description": "d"}
    if category is not None:
        meta["category"] = category
    (board_dir / "board.json").write_text(json.dumps(meta))


def _write_pin(
    board_dir: Path, pin_id: str, colour=(120, 30, 30), pin_json: str | None = None
) -> Path:
    pin_dir = board_dir / pin_id
    pin_dir.mkdir(parents=True, exist_ok=True)
    path = pin_dir / f"{pin_id}.jpg"
    Image.new("RGB", (40, 40), colour).save(path, quality=90)
    if pin_json is not None:
        (pin_dir / "pin.json").write_text(pin_json)
    return path


# -- normalize_category -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Film, Music & Books", "film_music_books"),
        ("Cars & Motorcycles", "cars_motorcycles"),
        ("  DIY & Crafts ", "diy_crafts"),
        ("food-drink", "food_drink"),
        ("Food & Drink", "food_drink"),
        ("food_drink", "food_drink"),
        ("Health/Fitness", "health_fitness"),
        ("Hair + Beauty", "hair_beauty"),
        ("ART", "art"),
        ("-Weird--name-", "weird_name"),
        ("Arts \u2013 Crafts", "arts_crafts"),  # en dash
        ("Arts\u2014Crafts", "arts_crafts"),  # em dash
        ("Women\u2018s Fashion", "womens_fashion"),  # a left quote typed as an apostrophe
        ("Women\u2019s Fashion", "womens_fashion"),
        ("Women\u02bcs Fashion", "womens_fashion"),
        ("", ""),
        ("   ", ""),
        (None, ""),
    ],
)
def test_normalize_category(raw: str | None, expected: str) -> None:
    assert normalize_category(raw) == expected


def test_normalize_category_is_idempotent() -> None:
    for raw in ("Film, Music & Books", "  DIY & Crafts ", "food-drink"):
        once = normalize_category(raw)
        assert normalize_category(once) == once


# -- readers agree ------------------------------------------------------------------------------


def test_tree_reader_records(tree_corpus) -> None:
    pins, skipped = _records(iter_tree(tree_corpus.root))
    assert skipped == []
    assert len(pins) == tree_corpus.n_pins == 24
    assert len({p.pin_id for p in pins}) == 24
    assert {p.board for p in pins} == set(tree_corpus.boards)
    assert {p.user for p in pins} == set(tree_corpus.users)
    assert Counter(p.category for p in pins) == {c: 8 for c in tree_corpus.categories}
    for p in pins:
        assert p.path.is_absolute() and p.path.is_file()
        assert p.path.stem == p.pin_id
        assert p.board == f"{p.user}/{p.path.parent.parent.name}"
        assert p.title and p.description and p.link.endswith(p.pin_id)
        assert p.board_name  # from board.json "name"


def test_tree_and_manifest_give_the_same_records(tree_corpus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, _tree_manifest_rows(tree_corpus.root))
    tree_pins, _ = _records(iter_tree(tree_corpus.root))
    man_pins, man_skipped = _records(iter_manifest(manifest, root=tree_corpus.root))
    assert man_skipped == []
    assert sorted(map(_key, tree_pins)) == sorted(map(_key, man_pins))
    assert len(man_pins) == 24


def test_manifest_inside_the_tree_root(tree_copy: Path) -> None:
    manifest = write_manifest(tree_copy, _tree_manifest_rows(tree_copy))
    assert detect_format(tree_copy) == "tree"  # a CSV at the top does not confuse detection
    a = read_corpus(tree_copy)
    b = read_corpus(manifest)
    assert (a.format, b.format) == ("tree", "manifest")
    assert sorted(map(_key, a.pins)) == sorted(map(_key, b.pins))
    assert [(p.width, p.height) for p in a.pins][:1] == [(96, 96)]
    assert sorted((p.pin_id, p.width, p.height) for p in a.pins) == sorted(
        (p.pin_id, p.width, p.height) for p in b.pins
    )


def test_folder_and_manifest_give_the_same_records(tmp_path: Path) -> None:
    corpus = make_image_folder(
        tmp_path / "folder", categories=("art", "Food & Drink"), per_category=3, image_size=48
    )
    pins, skipped = _records(iter_folder(corpus.root))
    assert skipped == []
    assert len(pins) == 6
    ids = sorted(p.pin_id for p in pins)
    assert ids[0] == "Food & Drink/Food & Drink_0000"  # relative path without extension
    assert "art/art_0002" in ids
    for p in pins:
        assert p.user is None
        assert p.board == p.category
        assert p.category in {"art", "food_drink"}
    assert {p.board_name for p in pins} == {"art", "Food & Drink"}

    rows = [
        {
            "path": p.path.relative_to(corpus.root).as_posix(),
            "category": p.path.parent.name,
            "title": p.title,
        }
        for p in pins
    ]
    manifest = write_manifest(corpus.root, rows)
    man_pins, man_skipped = _records(iter_manifest(manifest))
    assert man_skipped == []
    assert sorted(map(_key, pins)) == sorted(map(_key, man_pins))
    assert detect_format(corpus.root) == "folder"


def test_folder_reader_nested_and_hidden(tmp_path: Path) -> None:
    root = tmp_path / "f"
    (root / "art" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for p in (
        root / "art" / "a.png",
        root / "art" / "sub" / "b.jpg",
        root / ".hidden" / "c.jpg",
        root / "art" / ".d.jpg",
    ):
        Image.new("RGB", (8, 8)).save(p)
    (root / "art" / "notes.txt").write_text("x")
    pins, _ = _records(iter_folder(root))
    assert sorted(p.pin_id for p in pins) == ["art/a", "art/sub/b"]
    assert all(p.board == "art" for p in pins)


def test_parquet_manifest(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(root / "img" / f"{i}.jpg")
    pq.write_table(
        pa.table({"path": [f"img/{i}.jpg" for i in range(3)], "category": ["Art", "Art", "DIY"]}),
        root / "m.parquet",
    )
    assert detect_format(root / "m.parquet") == "manifest"
    result = read_corpus(root / "m.parquet")
    assert sorted(p.pin_id for p in result.pins) == ["img/0", "img/1", "img/2"]
    assert Counter(p.category for p in result.pins) == {"art": 2, "diy": 1}
    assert all(p.board == p.category and p.user is None for p in result.pins)


# -- cleaning rules ---------------------------------------------------------------------------


def _tree_with_none_and_other(root: Path) -> Path:
    make_pinterest_tree(
        root, categories=("art",), n_users=1, boards_per_category=1, pins_per_board=2, image_size=40
    )
    _write_board(root / "u1" / "misc", "None")
    _write_pin(root / "u1" / "misc", "n1")
    _write_board(root / "u1" / "stuff", "Other")
    _write_pin(root / "u1" / "stuff", "o1")
    _write_pin(root / "u1" / "stuff", "o2")
    return root


def test_none_and_other_dropped_by_default(tmp_path: Path) -> None:
    root = _tree_with_none_and_other(tmp_path / "t")
    result = read_corpus(root)
    assert {p.category for p in result.pins} == {"art"}
    assert len(result.pins) == 2
    dropped = [s for s in result.skipped if s.reason == "excluded_category"]
    assert sorted(s.pin_id for s in dropped) == ["n1", "o1", "o2"]
    assert _balanced(result)

    kept = read_corpus(root, IngestConfig(drop_categories=()))
    assert Counter(p.category for p in kept.pins) == {"art": 2, "none": 1, "other": 2}
    assert kept.skipped == []


def test_categories_allow_list(tmp_path: Path) -> None:
    root = _tree_with_none_and_other(tmp_path / "t")
    result = read_corpus(root, IngestConfig(categories=("Other",), drop_categories=()))
    assert sorted(p.pin_id for p in result.pins) == ["o1", "o2"]
    assert Counter(s.reason for s in result.skipped) == {"unknown_category": 3}
    assert _balanced(result)


def test_broken_metadata_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    root = tmp_path / "t"
    good = root / "u" / "good"
    _write_board(good, "Art")
    _write_pin(good, "g1", pin_json=json.dumps({"title": "T1", "link": "L"}))
    _write_pin(good, "g2")  # no pin.json: allowed
    _write_pin(good, "bad_pin_json", pin_json="{not json")
    _write_pin(good, "list_pin_json", pin_json="[1, 2]")
    (good / "g3").mkdir()  # pin folder without an image
    (good / "g3" / "pin.json").write_text("{}")

    malformed = root / "u" / "malformed"
    malformed.mkdir(parents=True)
    (malformed / "board.json").write_text('{"name": "x", "category": ')
    _write_pin(malformed, "m1")

    nocat = root / "u" / "nocat"
    _write_board(nocat, None)
    _write_pin(nocat, "c1")

    nojson = root / "u" / "nojson"
    nojson.mkdir(parents=True)
    _write_pin(nojson, "j1")
    _write_pin(nojson, "j2")

    result = read_corpus(root)
    assert sorted(p.pin_id for p in result.pins) == ["g1", "g2"]
    g1 = next(p for p in result.pins if p.pin_id == "g1")
    assert (g1.title, g1.link, g1.category, g1.board, g1.user) == ("T1", "L", "art", "u/good", "u")
    reasons = {s.pin_id: s.reason for s in result.skipped}
    assert reasons == {
        "bad_pin_json": "malformed_pin_json",
        "list_pin_json": "malformed_pin_json",
        "g3": "no_image",
        "m1": "malformed_board_json",
        "c1": "missing_category",
        "j1": "missing_board_json",
        "j2": "missing_board_json",
    }
    for s in result.skipped:
        assert s.detail and s.stage == "ingest"
    assert "board.json" in next(s for s in result.skipped if s.pin_id == "m1").detail
    assert result.found == 9
    assert _balanced(result)


def test_duplicate_pin_ids_across_boards(tree_copy: Path) -> None:
    boards = sorted(p for p in tree_copy.glob("*/*") if p.is_dir())
    src_pin = sorted(d for d in boards[0].iterdir() if d.is_dir())[0]
    shutil.copytree(src_pin, boards[1] / src_pin.name)
    result = read_corpus(tree_copy)
    assert len(result.pins) == 24
    dups = [s for s in result.skipped if s.reason == "duplicate_id"]
    assert len(dups) == 1 and dups[0].pin_id == src_pin.name
    kept = [p for p in result.pins if p.pin_id == src_pin.name]
    assert len(kept) == 1
    assert kept[0].path.parent.parent.name == boards[0].name  # the first one read is kept
    assert str(kept[0].path) in dups[0].detail
    assert result.found == 25 and _balanced(result)


def test_a_duplicate_id_goes_to_the_first_usable_copy(tree_copy: Path) -> None:
    boards = sorted(p for p in tree_copy.glob("*/*") if p.is_dir())
    src_pin = sorted(d for d in boards[0].iterdir() if d.is_dir())[0]
    shutil.copytree(src_pin, boards[1] / src_pin.name)
    next(src_pin.glob("*.jpg")).write_bytes(b"")  # the first copy read cannot be used
    result = read_corpus(tree_copy)
    (kept,) = [p for p in result.pins if p.pin_id == src_pin.name]
    assert kept.path.parent.parent.name == boards[1].name  # the later, usable copy
    reasons = sorted(s.reason for s in result.skipped if s.pin_id == src_pin.name)
    assert reasons == ["empty_file"] and len(result.pins) == 24 and _balanced(result)
    image = next(src_pin.glob("*.jpg"))  # a copy whose header reads but whose pixels are cut
    image.write_bytes(next((boards[1] / src_pin.name).glob("*.jpg")).read_bytes()[:700])
    result = read_corpus(tree_copy)
    (kept,) = [p for p in result.pins if p.pin_id == src_pin.name]
    assert kept.path.parent.parent.name == boards[1].name
    reasons = sorted(s.reason for s in result.skipped if s.pin_id == src_pin.name)
    assert reasons == ["truncated"] and len(result.pins) == 24 and _balanced(result)


def test_bad_images_are_skipped_with_reasons(tree_copy: Path) -> None:
    pins = sorted(tree_copy.glob("*/*/*/*.jpg"))
    pins[0].write_bytes(b"")
    pins[1].write_text("not an image")
    result = read_corpus(tree_copy)
    assert len(result.pins) == 22
    assert sorted(s.reason for s in result.skipped) == ["empty_file", "not_an_image"]
    assert {s.pin_id for s in result.skipped} == {pins[0].stem, pins[1].stem}
    assert all(p.width == 96 and p.height == 96 for p in result.pins)
    unchecked = read_corpus(tree_copy, IngestConfig(check_images=False))
    assert len(unchecked.pins) == 24 and unchecked.skipped == []
    assert all(p.width is None for p in unchecked.pins)


def test_max_pixels_in_ingest(tree_copy: Path) -> None:
    result = read_corpus(tree_copy, IngestConfig(max_pixels=96 * 96 - 1))
    assert result.pins == []
    assert {s.reason for s in result.skipped} == {"too_large"}
    assert _balanced(result)


def test_non_utf8_file_name_is_skipped(tree_copy: Path) -> None:
    board = sorted(p for p in tree_copy.glob("*/*") if p.is_dir())[0]
    bad = os.path.join(os.fsencode(board), b"pin\xff.jpg")
    Image.new("RGB", (20, 20)).save(open(bad, "wb"), format="JPEG")  # noqa: SIM115
    good_loose = board / "loose.jpg"
    Image.new("RGB", (20, 20)).save(good_loose)
    result = read_corpus(tree_copy)
    assert len(result.pins) == 25  # the loose image with a valid name is a pin
    assert any(p.pin_id == "loose" for p in result.pins)
    bad_skips = [s for s in result.skipped if s.reason == "non_utf8_name"]
    assert len(bad_skips) == 1
    bad_skips[0].path.encode("utf-8")  # storable as text
    assert "pin" in bad_skips[0].path
    assert _balanced(result)
    json.dumps([s.__dict__ for s in result.skipped])  # nothing un-encodable


def test_non_utf8_name_in_folder_corpus(tmp_path: Path) -> None:
    root = tmp_path / "f"
    (root / "art").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "art" / "ok.jpg")
    with open(os.path.join(os.fsencode(root / "art"), b"\xfe\xff.jpg"), "wb") as fh:
        Image.new("RGB", (8, 8)).save(fh, format="JPEG")
    result = read_corpus(root)
    assert [p.pin_id for p in result.pins] == ["art/ok"]
    assert [s.reason for s in result.skipped] == ["non_utf8_name"]
    result.skipped[0].path.encode("utf-8")


# -- manifests --------------------------------------------------------------------------------


def _manifest_corpus(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (12, 12), (1, 2, 3)).save(root / "img" / "in.jpg")
    outside = tmp_path / "x.jpg"
    Image.new("RGB", (12, 12), (3, 2, 1)).save(outside)
    return root, outside


def test_manifest_paths_outside_root(tmp_path: Path) -> None:
    root, outside = _manifest_corpus(tmp_path)
    manifest = write_manifest(
        root,
        [
            {"path": "img/in.jpg", "category": "Art"},
            {"path": "../x.jpg", "category": "Art", "pin_id": "rel"},
            {"path": str(outside), "category": "Art", "pin_id": "abs"},
            {"path": "img/../../x.jpg", "category": "Art", "pin_id": "sneaky"},
            {"path": "", "category": "Art", "pin_id": "nopath"},
            {"path": "img/in.jpg", "category": "", "pin_id": "nocat"},
        ],
    )
    result = read_corpus(manifest)
    assert [p.pin_id for p in result.pins] == ["img/in"]
    reasons = Counter(s.reason for s in result.skipped)
    assert reasons == {"path_outside_root": 3, "missing_path": 1, "missing_category": 1}
    outside_skips = [s for s in result.skipped if s.reason == "path_outside_root"]
    assert {s.path for s in outside_skips} == {str(outside.resolve())}  # where they lead
    assert {s.detail.split("'")[1] for s in outside_skips} == {  # what the manifest says
        "../x.jpg",
        str(outside),
        "img/../../x.jpg",
    }
    assert _balanced(result)

    allowed = read_corpus(manifest, IngestConfig(allow_outside_root=True))
    by_id = {p.pin_id: p for p in allowed.pins}
    assert set(by_id) == {"img/in", "rel", "abs", "sneaky"}
    assert by_id["rel"].path == by_id["abs"].path == outside.resolve()
    assert Counter(s.reason for s in allowed.skipped) == {"missing_path": 1, "missing_category": 1}


def test_symbolic_links_out_of_a_tree_or_folder_are_skipped(
    tree_copy: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (12, 12)).save(outside / "x.jpg")
    pin_image = sorted(tree_copy.glob("*/*/*/*.jpg"))[0]
    pin_image.unlink()
    pin_image.symlink_to(outside / "x.jpg")  # a pin's image elsewhere on the machine
    result = read_corpus(tree_copy)
    (skip,) = result.skipped
    assert skip.reason == "path_outside_root" and skip.pin_id == pin_image.parent.name
    assert len(result.pins) == 23 and _balanced(result)
    assert len(read_corpus(tree_copy, IngestConfig(allow_outside_root=True)).pins) == 24
    folder = make_image_folder(tmp_path / "f", categories=("art",), per_category=2, image_size=32)
    (folder.root / "food").symlink_to(outside, target_is_directory=True)  # a category elsewhere
    result = read_corpus(folder.root)
    assert [s.reason for s in result.skipped] == ["path_outside_root"]
    assert sorted(p.category for p in result.pins) == ["art", "art"]


def test_manifest_root_argument(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = write_manifest(tmp_path / "elsewhere", [{"path": "img/in.jpg", "category": "a"}])
    pins, skipped = _records(iter_manifest(manifest, root=root))
    assert skipped == [] and pins[0].path == (root / "img" / "in.jpg").resolve()


def test_manifest_user_and_board_columns(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = write_manifest(
        root,
        [{"path": "img/in.jpg", "category": "Art", "user": "ann", "board": "walls", "pin_id": "p"}],
    )
    (pin,) = read_corpus(manifest).pins
    assert (pin.pin_id, pin.user, pin.board, pin.board_name) == ("p", "ann", "ann/walls", "walls")


def test_a_manifest_board_of_mixed_categories_takes_the_most_common(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    rows = [
        {"path": "img/in.jpg", "category": c, "board": "mix", "pin_id": f"p{i}"}
        for i, c in enumerate(["food", "cars", "food", "food", "cars"])  # the last: cars
    ] + [
        {"path": "img/in.jpg", "category": c, "board": "tie", "pin_id": f"t{i}"}
        for i, c in enumerate(["art", "cars", "art", "cars"])  # a tie: the first pin's
    ]
    result = read_corpus(write_manifest(root, rows))
    assert {b: r.category for b, r in result.boards.items()} == {"mix": "food", "tie": "art"}
    assert Counter(p.category for p in result.pins) == {"food": 3, "cars": 4, "art": 2}


def test_manifest_rows_that_do_not_fit_the_header_are_skipped_by_name(
    tmp_path: Path, monkeypatch
) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = root / "m.csv"
    long = "x" * 300_000  # beyond Python's default CSV field limit (128 KiB)
    manifest.write_bytes(
        b"path,category,title,note\n"
        b"img/in.jpg,art,Hello, world,nice pin\n"  # an unquoted comma: one field too many
        b"img/in.jpg,art,caf\xe9,latin-1\n" + f"img/in.jpg,art,fine,{long}\n".encode()  # not UTF-8
    )
    result = read_corpus(manifest)
    image = str((root / "img" / "in.jpg").resolve())  # resolved, as stored pins' paths are
    assert [(s.reason, s.path) for s in result.skipped] == [
        ("malformed_row", image),
        ("non_utf8_row", image),
    ]
    assert "row 2 of" in result.skipped[0].detail and "row 3 of" in result.skipped[1].detail
    (pin,) = result.pins
    assert pin.title == "fine" and dict(pin.extra)["note"] == long and _balanced(result)
    import csv

    import pinsearch.ingest as ingest

    before = csv.field_size_limit()
    monkeypatch.setattr(ingest, "_CSV_FIELD_LIMIT", 1000)  # a field the reader cannot take:
    csv.field_size_limit(1000)  # the manifest and line are named
    try:
        with pytest.raises(CorpusError, match=r"m\.csv, line 4: field larger than field limit"):
            read_corpus(manifest)
    finally:
        csv.field_size_limit(before)


def test_manifest_quotes_that_do_not_close(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = root / "m.csv"
    manifest.write_text(
        "path,category,title,pin_id\n"
        'img/in.jpg,art,"Sunset" at sea,a\n'  # text after a closing quote: kept, as Python reads
        'img/in.jpg,art,"silver car" ,b\n'  # (a space after it: strict reading lost the row)
        "img/in.jpg,art,plain,c\n"
        'img/in.jpg,art,"two\nlines",d\n'  # a last row over two lines, closed: read
    )
    result = read_corpus(manifest)
    assert result.skipped == [] and _balanced(result)
    titles = [p.title for p in _records(iter_manifest(manifest))[0]]
    assert titles == ["Sunset at sea", "silver car", "plain", "two\nlines"]
    manifest.write_text(  # a quote never closed: the rest of the file is not one title
        'path,category,title\nimg/in.jpg,art,ok\nimg/in.jpg,art,"open\nimg/in.jpg,art,b\n'
    )
    with pytest.raises(CorpusError, match=r"m\.csv: the quote .* starting on line 3 is never"):
        read_corpus(manifest)


def test_manifest_missing_category_column(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = root / "m.csv"
    manifest.write_text("path,title\nimg/in.jpg,hello\n")
    with pytest.raises(CorpusError, match="category"):
        read_corpus(manifest)
    with pytest.raises(CorpusError, match=r"m\.csv"):
        list(iter_manifest(manifest))


def test_manifest_with_bom(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    manifest = root / "m.csv"
    manifest.write_bytes("\ufeffpath,category\nimg/in.jpg,Art\n".encode())
    assert [p.category for p in read_corpus(manifest).pins] == ["art"]


# -- format detection -------------------------------------------------------------------------


def test_detect_format(tree_corpus, tmp_path: Path) -> None:
    assert detect_format(tree_corpus.root) == "tree"
    folder = make_image_folder(tmp_path / "f", categories=("art",), per_category=1, image_size=32)
    assert detect_format(folder.root) == "folder"
    csv = write_manifest(tmp_path, [{"path": "f/art/art_0000.jpg", "category": "art"}])
    assert detect_format(csv) == "manifest"
    assert read_corpus(csv).format == "manifest"


def test_nested_folder_corpus_is_detected_as_folder(tmp_path: Path) -> None:
    # iter_folder allows nested folders; a sub-folder that sorts before the images of its
    # category ("2019" < "b.jpg") must not make auto-detection call the corpus a tree.
    root = tmp_path / "nested"
    for cat in ("art", "food"):
        (root / cat / "2019").mkdir(parents=True)
        Image.new("RGB", (10, 10)).save(root / cat / "2019" / "a.jpg")
        Image.new("RGB", (10, 10)).save(root / cat / "b.jpg")
    assert detect_format(root) == "folder"
    result = read_corpus(root)
    assert sorted(p.pin_id for p in result.pins) == [
        "art/2019/a",
        "art/b",
        "food/2019/a",
        "food/b",
    ]
    assert result.skipped == [] and result.found == 4


def test_detection_looks_at_the_whole_corpus(tree_copy: Path, tmp_path: Path) -> None:
    user = sorted(p for p in tree_copy.iterdir() if p.is_dir())[0]
    Image.new("RGB", (10, 10)).save(user / "_avatar.jpg")  # a stray image at user level
    assert detect_format(tree_copy) == "tree"
    root = tmp_path / "nest"  # images only in sub-folders of the categories
    for cat, sub in (("cars", "sedan"), ("cars", "suv"), ("food", "cake")):
        (root / cat / sub).mkdir(parents=True)
        Image.new("RGB", (10, 10)).save(root / cat / sub / "a.jpg")
    assert detect_format(root) == "folder"
    result = read_corpus(root)
    assert sorted(p.category for p in result.pins) == ["cars", "cars", "food"]
    assert result.skipped == []


def test_tree_without_board_json_is_still_a_tree(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _write_pin(root / "u" / "b", "p1")
    assert detect_format(root) == "tree"
    assert [s.reason for s in read_corpus(root).skipped] == ["missing_board_json"]


def test_detect_format_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="neither"):
        detect_format(empty)
    with pytest.raises(CorpusError, match="does not exist"):
        detect_format(tmp_path / "missing")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing")
    with pytest.raises(CorpusError, match="neither"):
        read_corpus(empty)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match="not a manifest"):
        detect_format(tmp_path / "notes.txt")
    only_files = tmp_path / "only_files"
    (only_files / "cat").mkdir(parents=True)
    (only_files / "cat" / "readme.md").write_text("x")
    with pytest.raises(CorpusError):
        detect_format(only_files)


def test_corpus_error_is_a_value_error() -> None:
    assert issubclass(CorpusError, ValueError)


# -- sampling and accounting ------------------------------------------------------------------


def test_per_category_caps_each_category(tree_corpus) -> None:
    result = read_corpus(tree_corpus.root, IngestConfig(per_category=3, seed=0))
    assert Counter(p.category for p in result.pins) == {c: 3 for c in tree_corpus.categories}
    assert result.sampled_out == 24 - 9
    assert _balanced(result)
    big = read_corpus(tree_corpus.root, IngestConfig(per_category=100))
    assert len(big.pins) == 24 and big.sampled_out == 0


def test_a_resumed_sample_adds_what_the_uninterrupted_run_would(tree_corpus) -> None:
    config = IngestConfig(per_category=3, seed=0)
    whole = read_corpus(tree_corpus.root, config)
    drawn = sorted(p.pin_id for p in whole.pins)
    stored = drawn[::2]  # a first run killed after storing some of its draw
    again = read_corpus(tree_corpus.root, config, exclude_ids=stored)
    assert sorted(p.pin_id for p in again.pins) == sorted(set(drawn) - set(stored))
    assert again.already_present == len(stored) and _balanced(again)
    done = read_corpus(tree_corpus.root, config, exclude_ids=drawn)  # and once all are in
    assert done.pins == [] and done.sampled_out == 24 - 9


def test_a_grown_corpus_keeps_at_most_n_per_category(tmp_path: Path) -> None:
    config = IngestConfig(per_category=3, seed=0)
    folder = make_image_folder(tmp_path / "f", categories=("art", "food"), per_category=10)
    first = read_corpus(folder.root, config)
    stored = [p.pin_id for p in first.pins]
    make_image_folder(tmp_path / "f", categories=("art", "food"), per_category=30)  # grown
    again = read_corpus(folder.root, config, exclude_ids=stored)
    assert again.pins == [] and _balanced(again)  # 3 of each are in already


def test_sampling_is_deterministic_and_seed_dependent(tree_corpus) -> None:
    def ids(seed: int) -> frozenset[str]:
        return frozenset(
            p.pin_id
            for p in read_corpus(tree_corpus.root, IngestConfig(per_category=3, seed=seed)).pins
        )

    assert ids(0) == ids(0)
    assert ids(7) == ids(7)
    # C(8, 3)^3 possible draws: five seeds cannot all agree.
    assert len({ids(s) for s in range(5)}) > 1


def test_sampling_is_independent_of_reading_order(tree_corpus) -> None:
    pins, _ = _records(iter_tree(tree_corpus.root))
    forward = sample_per_category(pins, 2, seed=3)
    backward = sample_per_category(pins[::-1], 2, seed=3)
    assert {p.pin_id for p in forward} == {p.pin_id for p in backward}
    # The kept pins stay in reading order.
    assert [p.pin_id for p in backward] == [p.pin_id for p in pins[::-1] if p in forward]
    with pytest.raises(ValueError, match="positive"):
        sample_per_category(pins, 0, seed=0)


def test_sample_of_a_category_does_not_depend_on_other_categories(tree_corpus) -> None:
    # "The draw depends only on the pin ids of each category": narrowing the corpus to one
    # category (or other categories growing) must not change which pins that category keeps.
    def cars(config: IngestConfig) -> set[str]:
        result = read_corpus(tree_corpus.root, config)
        return {p.pin_id for p in result.pins if p.category == "cars_motorcycles"}

    everything = cars(IngestConfig(per_category=3, seed=0))
    alone = cars(IngestConfig(per_category=3, seed=0, categories=("cars_motorcycles",)))
    assert len(everything) == 3
    assert alone == everything

    pins, _ = _records(iter_tree(tree_corpus.root))
    cars_pins = [p for p in pins if p.category == "cars_motorcycles"]
    others = [p for p in pins if p.category != "cars_motorcycles"]
    for extra in (others[:3], others[:11], others):
        drawn = sample_per_category(cars_pins + extra, 3, seed=5)
        assert {p.pin_id for p in drawn if p in cars_pins} == {
            p.pin_id for p in sample_per_category(cars_pins, 3, seed=5)
        }


def test_accounting_with_every_outcome(tree_copy: Path) -> None:
    pins = sorted(tree_copy.glob("*/*/*/*.jpg"))
    pins[0].write_bytes(b"")  # skipped: empty_file
    already = {pins[1].stem, pins[2].stem}
    result = read_corpus(
        tree_copy, IngestConfig(per_category=5, seed=1), exclude_ids=already | {"not-there"}
    )
    assert result.found == 24
    assert result.already_present == 2
    assert [s.reason for s in result.skipped] == ["empty_file"]
    assert result.sampled_out > 0
    assert all(n <= 5 for n in Counter(p.category for p in result.pins).values())
    assert not already & {p.pin_id for p in result.pins}
    assert _balanced(result)
    assert set(result.boards) == {p.board for p in result.pins}


def test_a_manifest_row_fixed_since_is_no_longer_counted_as_skipped(tmp_path: Path) -> None:
    from pinsearch.store import Store

    root, _ = _manifest_corpus(tmp_path)
    rows = [{"path": "img/in.jpg", "category": ""}]  # relative, skipped before it resolves
    with Store.open(tmp_path / "s", create=True) as store:
        store.catalog.add_ingest(read_corpus(write_manifest(root, rows)), "{}")
        assert [r["reason"] for r in store.catalog.query("SELECT reason FROM skipped")] == [
            "missing_category"
        ]
        rows[0]["category"] = "art"  # fixed
        again = read_corpus(write_manifest(root, rows), exclude_ids=store.catalog.pin_ids())
        store.catalog.add_ingest(again, "{}")
        assert store.catalog.count_pins() == 1
        assert store.catalog.query("SELECT * FROM skipped") == []


# -- what the file system can hold ------------------------------------------------------------


def test_links_to_nothing_loops_and_strays_in_a_tree_are_counted(tree_copy: Path) -> None:
    """Nothing found is dropped unrecorded, and no entry stops the run: loops of links, links
    to nothing, a FIFO named like an image, images outside any board folder."""
    user = sorted(p for p in tree_copy.iterdir() if p.is_dir())[0]
    board = sorted(p for p in user.iterdir() if p.is_dir())[0]
    (board / "a.jpg").symlink_to(board / "b.jpg")  # a loop of two links
    (board / "b.jpg").symlink_to(board / "a.jpg")
    (board / "gone.jpg").symlink_to(board / "nowhere.jpg")
    (board / "gone_pin").symlink_to(board / "no_such_folder", target_is_directory=True)
    os.mkfifo(board / "fifo.jpg")
    (board / "notes.txt").write_text("not a pin")  # not an image: not one either
    Image.new("RGB", (20, 20)).save(user / "stray.jpg")
    Image.new("RGB", (20, 20)).save(tree_copy / "root.jpg")
    pin = sorted(p for p in board.iterdir() if p.is_dir() and not p.is_symlink())[0]
    (pin / "loop.jpg").symlink_to(pin / "loop.jpg")  # a pin folder's other file: ignored

    assert detect_format(tree_copy) == "tree"
    result = read_corpus(tree_copy)
    reasons = Counter(s.reason for s in result.skipped)
    assert reasons == {"broken_link": 4, "not_a_file": 1, "not_in_board": 2}, result.skipped
    assert len(result.pins) == 24 and result.found == 31 and _balanced(result)
    assert any(p.pin_id == pin.name for p in result.pins)
    stray = next(s for s in result.skipped if s.path.endswith("stray.jpg"))
    assert "outside any <user>/<board>/ folder" in stray.detail


def test_folder_corpus_follows_linked_folders_once(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "f", categories=("art", "food"), per_category=2,
                               image_size=32)  # fmt: skip
    root = folder.root
    extra = root / "art" / "more"
    extra.mkdir()
    Image.new("RGB", (20, 20)).save(extra / "m.jpg")
    (root / "art" / "linked").symlink_to(extra, target_is_directory=True)  # read once
    (root / "food" / "up").symlink_to(root / "food", target_is_directory=True)  # a loop
    (root / "food" / "self.jpg").symlink_to(root / "food" / "self.jpg")
    (root / "food" / "gone.jpg").symlink_to(root / "food" / "nowhere.jpg")
    (root / "food" / "to_art").symlink_to(root / "art", target_is_directory=True)
    (root / "aaa").symlink_to(root / "food", target_is_directory=True)  # a category's alias
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "o.jpg")
    (root / "art" / "out").symlink_to(outside, target_is_directory=True)
    (root / "food" / "sub").mkdir()  # reached first through a link from art: still food's
    Image.new("RGB", (20, 20)).save(root / "food" / "sub" / "f.jpg")
    (root / "art" / "x").symlink_to(root / "food" / "sub", target_is_directory=True)
    Image.new("RGB", (20, 20)).save(root / "loose.jpg")  # the root's own board
    (root / "art" / "up").symlink_to(root, target_is_directory=True)
    (root / "gone").symlink_to(root / "nothing")  # names without an image extension too
    (root / "art" / "gone").symlink_to(root / "nothing")
    (root / "+++").mkdir()  # a name that leaves no category
    Image.new("RGB", (20, 20)).save(root / "+++" / "x.jpg")
    os.mkfifo(root / "food" / "fifo.jpg")

    assert detect_format(root) == "folder"
    result = read_corpus(root)
    reasons = Counter(s.reason for s in result.skipped)
    assert reasons == {
        "folder_read_before": 6, "broken_link": 4, "missing_category": 1, "not_a_file": 1,
        "path_outside_root": 1,
    }, result.skipped  # fmt: skip
    assert sorted(p.pin_id for p in result.pins if p.category == "art")[-1] == "art/more/m"
    assert "food/sub/f" in {p.pin_id for p in result.pins}
    assert len(result.pins) == 7 and "" not in {p.category for p in result.pins}
    assert {p.category for p in result.pins} == {"art", "food", "f"}  # (ROOT is named f)
    assert len({p.path.resolve() for p in result.pins}) == 7  # no image under two labels
    assert _balanced(result)
    reached = read_corpus(root, IngestConfig(allow_outside_root=True))
    assert "art/out/o" in {p.pin_id for p in reached.pins} and _balanced(reached)


def test_folders_that_cannot_be_listed_are_counted(
    tree_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Permissions do not stop root, which runs the tests: the OS refusal is simulated.)"""
    user = sorted(p for p in tree_copy.iterdir() if p.is_dir())[0]
    board = sorted(p for p in user.iterdir() if p.is_dir())[0]
    pin = sorted(p for p in board.iterdir() if p.is_dir())[0]
    other_board = sorted(p for p in user.iterdir() if p.is_dir())[1]
    folder = make_image_folder(tmp_path / "f", categories=("art",), per_category=2, image_size=32)
    sub = folder.root / "art" / "sub"
    sub.mkdir()
    Image.new("RGB", (20, 20)).save(sub / "s.jpg")
    refused = {str(pin), str(other_board), str(sub)}
    scandir = os.scandir

    def guarded(path="."):
        if str(path) in refused:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    result = read_corpus(tree_copy)
    unreadable = sorted(s.path for s in result.skipped if s.reason == "unreadable")
    assert unreadable == sorted([str(pin), str(other_board)])
    assert len(result.pins) == 24 - 1 - 4 and _balanced(result)
    result = read_corpus(folder.root)
    assert [(s.reason, s.path) for s in result.skipped] == [("unreadable", str(sub))]
    assert len(result.pins) == 2 and _balanced(result)
    refused.add(str(folder.root))
    with pytest.raises(CorpusError, match="cannot be read: Permission denied"):
        list(iter_folder(folder.root))


def test_manifest_row_naming_a_loop_of_links_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,category\nloop.jpg,art\nok.jpg,art\n")
    result = read_corpus(manifest)
    assert [p.pin_id for p in result.pins] == ["ok"]
    assert [s.reason for s in result.skipped] == ["broken_link"] and _balanced(result)
    manifest.write_text("path,category,path\nok.jpg,art,x.jpg\n")
    with pytest.raises(CorpusError, match=r"names column\(s\) \['path'\] more than once"):
        read_corpus(manifest)


def test_board_and_pin_json_values(tmp_path: Path) -> None:
    root = tmp_path / "t"
    nfc, nfd = "Caf\u00e9", "Cafe\u0301"
    for board, category in (("a", nfc), ("b", nfd), ("c", 7), ("d", ["Food", "Drink"]),
                            ("e", True), ("f", {"a": 1})):  # fmt: skip
        _write_board(root / "u" / board, category)
        _write_pin(root / "u" / board, f"{board}1")
    (root / "u" / "g").mkdir()
    (root / "u" / "g" / "board.json").write_bytes(b"\xef\xbb\xbf" + b'{"category": "Art"}')
    _write_pin(root / "u" / "g", "g1", pin_json=json.dumps({"title": ["x", "y"], "link": 3}))
    result = read_corpus(root)
    got = {p.pin_id: (p.category, p.title, p.link) for p in result.pins}
    assert got == {
        "a1": ("caf\u00e9", "", ""), "b1": ("caf\u00e9", "", ""), "c1": ("7", "", ""),
        "g1": ("art", '["x", "y"]', "3"),
    }  # fmt: skip
    bad = {s.pin_id: s.detail for s in result.skipped}
    assert sorted(bad) == ["d1", "e1", "f1"]
    assert "'category' must be text" in bad["d1"] and _balanced(result)
    assert normalize_category(nfd) == normalize_category(nfc)


def test_a_format_given_that_the_corpus_cannot_be(tree_corpus, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"reads a \.csv or \.parquet file; .* is not one"):
        read_corpus(tree_corpus.root, IngestConfig(format="manifest"))
    (tmp_path / "m.txt").write_text("path,category\n")
    with pytest.raises(CorpusError, match=r"reads a \.csv"):
        read_corpus(tmp_path / "m.txt", IngestConfig(format="manifest"))
    with pytest.raises(CorpusError, match="format folder reads a folder"):
        read_corpus(tmp_path / "m.txt", IngestConfig(format="folder"))


def test_blank_header_cells_are_not_a_column_named_twice(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.jpg")
    (tmp_path / "m.csv").write_text("path,category,,\nok.jpg,art,,\n")
    assert [p.pin_id for p in read_corpus(tmp_path / "m.csv").pins] == ["ok"]


def test_sampling_settings_are_checked_up_front_and_parquet_float_ids_read_as_csv_ones(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="seed must be 0 or more"):
        IngestConfig(seed=-1, per_category=2)
    with pytest.raises(ValueError, match="per_category must be positive"):
        IngestConfig(per_category=0)
    from pinsearch.ingest import _text

    assert (_text(1.0), _text(float("nan")), _text(2.5)) == ("1", "", "2.5")


def test_a_board_mended_since_is_no_longer_counted_as_skipped(tmp_path: Path) -> None:
    """Its pins were skipped, then stored once board.json reads; and a pin folder whose image
    came back: reading them went well, so the old reasons go (info counted them for good)."""
    from pinsearch.store import Store

    board = tmp_path / "c" / "user0" / "board0"
    _write_board(board, "art")
    for pin in ("p1", "p2"):
        _write_pin(board, pin)
    image = _write_pin(board, "p3")
    (board / "board.json").write_text("{bad")
    moved = image.rename(tmp_path / "p3.jpg")
    with Store.open(tmp_path / "s", create=True) as store:
        store.catalog.add_ingest(read_corpus(tmp_path / "c"), "{}")
        reasons = sorted(r["reason"] for r in store.catalog.query("SELECT reason FROM skipped"))
        assert reasons == ["malformed_board_json"] * 3
        _write_board(board, "art")  # mended: two stored, one folder without its image
        store.catalog.add_ingest(read_corpus(tmp_path / "c"), "{}")
        assert [r["reason"] for r in store.catalog.query("SELECT reason FROM skipped")] == [
            "no_image"
        ]
        moved.rename(image)  # the image put back
        again = read_corpus(tmp_path / "c", exclude_ids=store.catalog.pin_id_paths())
        store.catalog.add_ingest(again, "{}")
        assert store.catalog.count_pins() == 3
        assert store.catalog.query("SELECT * FROM skipped") == []


def test_deep_json_and_hidden_files_in_pin_folders(tmp_path: Path) -> None:
    board = tmp_path / "c" / "user0" / "board0"
    _write_board(board, "art")
    _write_pin(board, "deep", pin_json='{"title": ' + "[" * 100_000 + "]" * 100_000 + "}")
    shown = _write_pin(board, "mac")  # copied from a Mac: its AppleDouble file beside it
    (shown.parent / f"._{shown.name}").write_bytes(b"\x00\x05\x16\x07 not an image")
    result = read_corpus(tmp_path / "c")
    assert [p.pin_id for p in result.pins] == ["mac"] and result.pins[0].path == shown
    assert [(s.pin_id, s.reason) for s in result.skipped] == [("deep", "malformed_pin_json")]
    assert "nested too deep" in result.skipped[0].detail


def test_a_manifest_row_naming_a_link_to_nothing_is_a_broken_link(tmp_path: Path) -> None:
    root, _ = _manifest_corpus(tmp_path)
    (root / "img" / "gone.jpg").symlink_to(root / "img" / "nowhere.jpg")
    rows = [{"path": "img/gone.jpg", "category": "art"}]
    result = read_corpus(write_manifest(root, rows))
    assert [s.reason for s in result.skipped] == ["broken_link"]


def test_parquet_columns_of_other_types_and_named_twice(tmp_path: Path) -> None:
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(root / "img" / "0.jpg")
    pq.write_table(
        pa.table({
            "path": pa.array([b"img/0.jpg"], pa.binary()),
            "category": ["Art"],
            "pin_id": pa.array([decimal.Decimal("260095629898002920")], pa.decimal128(20, 0)),
            "title": [datetime.date(2020, 1, 1)],
        }),
        root / "m.parquet",
    )  # fmt: skip
    (pin,) = read_corpus(root / "m.parquet").pins
    assert (pin.pin_id, pin.title, pin.path) == (
        "260095629898002920", "2020-01-01", (root / "img" / "0.jpg").resolve()
    )  # fmt: skip
    table = pa.table([pa.array(["img/0.jpg"]), pa.array(["a"]), pa.array(["b"])],
                     names=["path", "category", "category"])  # fmt: skip
    pq.write_table(table, root / "twice.parquet")
    with pytest.raises(CorpusError, match=r"names column\(s\) \['category'\] more than once"):
        read_corpus(root / "twice.parquet")


def test_a_short_last_row_without_a_final_newline_reads_as_any_short_row(tmp_path: Path) -> None:
    """Trailing fields left out of the last row of a file an editor saved without a final
    newline are empty, as in any other short row."""
    root, _ = _manifest_corpus(tmp_path)
    (root / "m.csv").write_text("path,category,title,description\nimg/in.jpg,art,Blue car")
    (pin,) = read_corpus(root / "m.csv").pins
    assert (pin.title, pin.description) == ("Blue car", "")


def test_a_pin_folder_whose_image_is_a_link_to_nothing_or_a_fifo_says_so(tmp_path: Path) -> None:
    board = tmp_path / "c" / "user0" / "board0"
    _write_board(board, "art")
    _write_pin(board, "good")
    (board / "gone").mkdir()
    (board / "gone" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (board / "pipe").mkdir()
    os.mkfifo(board / "pipe" / "pipe.jpg")
    (board / "empty").mkdir()
    result = read_corpus(tmp_path / "c")
    assert [p.pin_id for p in result.pins] == ["good"]
    assert sorted((s.pin_id, s.reason) for s in result.skipped) == [
        ("empty", "no_image"), ("gone", "broken_link"), ("pipe", "not_a_file")
    ]  # fmt: skip


def test_strays_are_recorded_once_whatever_the_roots_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pinsearch.store import Store

    board = tmp_path / "c" / "user0" / "board0"
    _write_board(board, "art")
    _write_pin(board, "p1")
    Image.new("RGB", (20, 20)).save(tmp_path / "c" / "stray.jpg")
    monkeypatch.chdir(tmp_path)
    with Store.open(tmp_path / "s", create=True) as store:
        for root in ("c", str(tmp_path / "c"), "./c"):
            read = read_corpus(root, exclude_ids=store.catalog.pin_id_paths())
            store.catalog.add_ingest(read, "{}")
        rows = store.catalog.query("SELECT path, reason FROM skipped")
    assert rows == [{"path": str(tmp_path / "c" / "stray.jpg"), "reason": "not_in_board"}]


def test_a_linked_folder_inside_a_tree_is_read_where_it_lies(tmp_path: Path) -> None:
    """A link to a user's, board's or pin's folder of the same tree gave its pins the link's
    user and board (first in name order), and the real copies were duplicates."""
    board = tmp_path / "c" / "user1" / "board0"
    _write_board(board, "art")
    _write_pin(board, "p1")
    (tmp_path / "c" / "aaa_user").symlink_to(tmp_path / "c" / "user1")
    (tmp_path / "c" / "user1" / "aaa_board").symlink_to(board)
    (board / "aaa_pin").symlink_to(board / "p1")
    result = read_corpus(tmp_path / "c")
    assert [(p.pin_id, p.user, p.board) for p in result.pins] == [("p1", "user1", "user1/board0")]
    assert sorted(s.reason for s in result.skipped) == ["folder_read_before"] * 3
    assert _balanced(result)


def test_a_tree_link_to_a_folder_it_does_not_read_is_read_through_the_link(
    tmp_path: Path,
) -> None:
    hidden = tmp_path / "c" / ".boards" / "cats"  # (hidden: the tree reads no such folder)
    _write_board(hidden, "art")
    _write_pin(hidden, "p1")
    (tmp_path / "c" / "alice").mkdir()
    (tmp_path / "c" / "alice" / "cats").symlink_to(hidden)
    result = read_corpus(tmp_path / "c")
    assert [(p.pin_id, p.board) for p in result.pins] == [("p1", "alice/cats")]


def test_reading_a_pin_well_keeps_another_files_duplicate_row(tmp_path: Path) -> None:
    from pinsearch.store import Store

    for name in ("a", "b"):
        board = tmp_path / name / "user0" / "board0"
        _write_board(board, "art")
        _write_pin(board, "x", colour=(10, 200, 10) if name == "b" else (200, 10, 10))
    with Store.open(tmp_path / "s", create=True) as store:
        store.catalog.add_ingest(read_corpus(tmp_path / "a"), "{}")
        for name in ("b", "a"):  # b's x is a duplicate; a read again keeps b's row
            read = read_corpus(tmp_path / name, exclude_ids=store.catalog.pin_id_paths())
            store.catalog.add_ingest(read, "{}")
        reasons = [r["reason"] for r in store.catalog.query("SELECT reason FROM skipped")]
    assert reasons == ["duplicate_id"]


def test_a_manifest_link_fixed_since_is_no_longer_counted(tmp_path: Path) -> None:
    from pinsearch.store import Store

    root, _ = _manifest_corpus(tmp_path)
    (root / "img" / "late.jpg").symlink_to(root / "img" / "later.jpg")
    manifest = write_manifest(root, [{"path": "img/late.jpg", "category": "art"}])
    with Store.open(tmp_path / "s", create=True) as store:
        store.catalog.add_ingest(read_corpus(manifest), "{}")
        assert [r["reason"] for r in store.catalog.query("SELECT reason FROM skipped")] == [
            "broken_link"
        ]
        Image.new("RGB", (12, 12)).save(root / "img" / "later.jpg")
        store.catalog.add_ingest(
            read_corpus(manifest, exclude_ids=store.catalog.pin_id_paths()), "{}"
        )
        assert store.catalog.count_pins() == 1
        assert store.catalog.query("SELECT * FROM skipped") == []


def test_parquet_blank_column_names_repeated_are_left_out(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(root / "img" / "0.jpg")
    table = pa.table([pa.array(["img/0.jpg"]), pa.array(["Art"]), pa.array(["x"]),
                      pa.array(["y"])], names=["path", "category", "", ""])  # fmt: skip
    pq.write_table(table, root / "m.parquet")
    (pin,) = read_corpus(root / "m.parquet").pins
    assert pin.category == "art" and not pin.extra


@pytest.mark.parametrize(("dtype", "big"), [("float64", 2.0**53 + 2), ("float32", 2.0**24)])
def test_parquet_float_ids_too_large_to_be_exact_are_skipped(tmp_path: Path, dtype, big) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 60, 0, 0)).save(root / "img" / f"{i}.jpg")
    pq.write_table(
        pa.table({
            "path": [f"img/{i}.jpg" for i in range(3)],
            "category": ["art"] * 3,
            "pin_id": pa.array([12.0, big, -big], getattr(pa, dtype)()),
        }),
        root / "m.parquet",
    )  # fmt: skip
    result = read_corpus(root / "m.parquet")
    assert [p.pin_id for p in result.pins] == ["12"]
    assert [s.reason for s in result.skipped] == ["inexact_pin_id"] * 2
    assert f"pin_id {big:.0f} of a {'double' if dtype == 'float64' else 'float'} column" in (
        result.skipped[0].detail
    )
    assert result.skipped[0].pin_id == f"{big:.0f}"


def test_board_json_number_categories_read_as_a_manifest_reads_them(tmp_path: Path) -> None:
    """A class id in board.json is the category a manifest gives for it: whole numbers as
    text (7.0 is 7), cleaned alike (-7 is 7, as "-7" in a manifest); fractions and booleans
    are malformed."""
    root = tmp_path / "c"
    for board, category in [("int", 7), ("neg", -7), ("whole", 7.0), ("half", 7.5), ("yes", True)]:
        _write_board(root / "u" / board, category)
        _write_pin(root / "u" / board, f"p_{board}")
    result = read_corpus(root)
    assert sorted((p.pin_id, p.category) for p in result.pins) == [
        ("p_int", "7"), ("p_neg", "7"), ("p_whole", "7")
    ]  # fmt: skip
    assert sorted((s.pin_id, s.reason) for s in result.skipped) == [
        ("p_half", "malformed_board_json"), ("p_yes", "malformed_board_json")
    ]  # fmt: skip
    (root / "img").mkdir()
    Image.new("RGB", (10, 10)).save(root / "img" / "0.jpg")
    (root / "m.csv").write_text("path,category\nimg/0.jpg,-7\n")
    assert [p.category for p in read_corpus(root / "m.csv").pins] == ["7"]


def test_tree_metadata_that_links_out_of_the_root_is_not_read(tmp_path: Path) -> None:
    """A pin.json or board.json linked to a file outside the corpus (a secret of the reader's)
    was read into the catalog; it is path_outside_root unless --allow-outside-root."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"name": "SECRET", "category": "art", "token": "s3cr3t"}')
    board = tmp_path / "c" / "u" / "b"
    _write_board(board, "art")
    _write_pin(board, "p1")
    _write_pin(board, "p2")
    (board / "p1" / "pin.json").unlink(missing_ok=True)
    (board / "p1" / "pin.json").symlink_to(secret)
    other = tmp_path / "c" / "u" / "linked"
    other.mkdir()
    _write_pin(other, "p3")
    (other / "board.json").symlink_to(secret)
    result = read_corpus(tmp_path / "c")
    assert [p.pin_id for p in result.pins] == ["p2"]
    assert sorted((s.pin_id, s.reason) for s in result.skipped) == [
        ("p1", "path_outside_root"), ("p3", "path_outside_root")
    ]  # fmt: skip
    trusted = read_corpus(tmp_path / "c", IngestConfig(allow_outside_root=True))
    assert {p.pin_id: dict(p.extra).get("token") for p in trusted.pins} == {
        "p1": "s3cr3t", "p2": None, "p3": None
    }  # fmt: skip
