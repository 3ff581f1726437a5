"""Tests for the synthetic Pinterest-style corpora."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pinsearch.synth import (
    DEMO_CATEGORIES,
    SyntheticCorpus,
    draw_pin_image,
    make_image_folder,
    make_pinterest_tree,
    write_manifest,
)

SMALL = {
    "categories": ("food_drink", "cars_motorcycles", "art"),
    "n_users": 2,
    "boards_per_category": 2,
    "pins_per_board": 3,
    "image_size": 64,
}


def _snapshot(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes for every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    return make_pinterest_tree(tmp_path_factory.mktemp("demo"))


def test_demo_categories() -> None:
    assert len(DEMO_CATEGORIES) == 6
    assert len(set(DEMO_CATEGORIES)) == 6
    assert "food_drink" in DEMO_CATEGORIES and "art" in DEMO_CATEGORIES


def test_demo_tree_counts(demo: SyntheticCorpus) -> None:
    assert demo.n_pins == 6 * 2 * 8
    assert demo.categories == DEMO_CATEGORIES
    assert demo.users == ("user000", "user001", "user002")
    assert len(demo.boards) == 12 and len(set(demo.boards)) == 12
    assert len(list(demo.root.glob("*/*/*/*.jpg"))) == demo.n_pins
    assert len(list(demo.root.glob("*/*/board.json"))) == 12
    assert sorted(p.name for p in demo.root.iterdir()) == list(demo.users)


def test_demo_tree_spreads_categories_over_users(demo: SyntheticCorpus) -> None:
    per_user: dict[str, set[str]] = {}
    for board in demo.boards:
        user, name = board.split("/")
        category = json.loads((demo.root / board / "board.json").read_text())["category"]
        assert name.rsplit("-", 1)[0] == category
        per_user.setdefault(user, set()).add(category)
    assert set(per_user) == set(demo.users)
    assert all(len(cats) >= 3 for cats in per_user.values())


def test_layout_files_parse(tmp_path: Path) -> None:
    corpus = make_pinterest_tree(tmp_path, **SMALL)
    assert corpus.n_pins == 3 * 2 * 3
    assert corpus.users == ("user000", "user001")
    pin_ids: list[str] = []
    for board in corpus.boards:
        board_dir = tmp_path / board
        meta = json.loads((board_dir / "board.json").read_text(encoding="utf-8"))
        assert set(meta) == {"name", "category", "description"}
        assert meta["category"] in SMALL["categories"]
        category, number = board_dir.name.rsplit("-", 1)
        assert meta["category"] == category
        assert re.fullmatch(r"[A-Z][\w ]* \d+", meta["name"]) and meta["name"].endswith(number)
        assert meta["description"]
        pin_dirs = sorted(p for p in board_dir.iterdir() if p.is_dir())
        assert len(pin_dirs) == SMALL["pins_per_board"]
        for pin_dir in pin_dirs:
            pin = json.loads((pin_dir / "pin.json").read_text(encoding="utf-8"))
            assert set(pin) == {"id", "title", "description", "link"}
            assert re.fullmatch(r"[1-9]\d{17}", pin["id"])
            assert pin_dir.name == pin["id"]
            assert pin["link"] == f"https://example.com/{pin['id']}"
            assert pin["title"].strip() and len(pin["title"].split()) >= 2
            assert pin["description"].endswith(".")
            with Image.open(pin_dir / f"{pin['id']}.jpg") as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert img.size == (SMALL["image_size"], SMALL["image_size"])
            pin_ids.append(pin["id"])
    assert len(pin_ids) == len(set(pin_ids)) == corpus.n_pins


def test_tree_is_deterministic(tmp_path: Path) -> None:
    first = make_pinterest_tree(tmp_path / "a", **SMALL)
    second = make_pinterest_tree(tmp_path / "b", **SMALL)
    other = make_pinterest_tree(tmp_path / "c", **SMALL, seed=1)
    assert first.boards == second.boards
    snap_a, snap_b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert snap_a == snap_b
    assert set(_snapshot(tmp_path / "c")) != set(snap_a)  # new seed, new pin ids
    assert other.n_pins == first.n_pins


def test_titles_vary(demo: SyntheticCorpus) -> None:
    titles = [json.loads(p.read_text())["title"] for p in demo.root.rglob("pin.json")]
    assert len(set(titles)) >= demo.n_pins // 3


def test_unknown_category(tmp_path: Path) -> None:
    image = draw_pin_image("home_decor", np.random.default_rng(3), size=48)
    again = draw_pin_image("home_decor", np.random.default_rng(3), size=48)
    assert image.size == (48, 48) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(again))
    corpus = make_pinterest_tree(
        tmp_path, categories=("home_decor", "diy-crafts"), n_users=1, pins_per_board=2
    )
    assert corpus.n_pins == 2 * 2 * 2
    assert corpus.users == ("user000",)
    names = {json.loads((tmp_path / b / "board.json").read_text())["name"] for b in corpus.boards}
    assert names == {"Home Decor 1", "Home Decor 2", "Diy Crafts 1", "Diy Crafts 2"}


def test_draw_pin_image_categories_differ() -> None:
    images = []
    for category in DEMO_CATEGORIES:
        image = draw_pin_image(category, np.random.default_rng(0), size=64)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float32)
        assert pixels.std() > 5.0  # not a flat image
        images.append(pixels)
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 20.0


def test_draw_pin_image_varies_within_category() -> None:
    a = np.asarray(draw_pin_image("architecture", np.random.default_rng(0), size=64))
    b = np.asarray(draw_pin_image("architecture", np.random.default_rng(1), size=64))
    assert not np.array_equal(a, b)


def test_draw_pin_image_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="8"):
        draw_pin_image("art", np.random.default_rng(0), size=8)


def test_image_folder(tmp_path: Path) -> None:
    corpus = make_image_folder(tmp_path, categories=("art", "outdoors"), per_category=3)
    assert corpus.n_pins == 6
    assert corpus.users == () and corpus.boards == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "outdoors"]
    for category in ("art", "outdoors"):
        files = sorted((tmp_path / category).glob("*.jpg"))
        assert len(files) == 3
        with Image.open(files[0]) as img:
            assert img.size == (128, 128)
    again = make_image_folder(tmp_path / "again", categories=("art", "outdoors"), per_category=3)
    assert again.n_pins == 6
    snap = _snapshot(tmp_path)
    assert {k: v for k, v in snap.items() if not k.startswith("again/")} == _snapshot(
        tmp_path / "again"
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    corpus = make_image_folder(tmp_path, categories=("food_drink", "art"), per_category=2)
    rows = [
        {"category": p.parent.name, "path": p.relative_to(tmp_path).as_posix()}
        for p in sorted(tmp_path.rglob("*.jpg"))
    ]
    rows[0]["title"] = "bowl of limes, with a comma"
    rows[1]["note"] = 'quoted "text"'
    manifest = write_manifest(tmp_path, rows)
    assert manifest == tmp_path / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["path", "category", "title", "note"]
        read = list(reader)
    assert len(read) == corpus.n_pins
    for original, back in zip(rows, read, strict=True):
        assert back == {key: original.get(key, "") for key in reader.fieldnames}
    for row in read:
        assert (tmp_path / row["path"]).is_file()


def test_manifest_custom_name_and_empty(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "sub", [], name="empty.csv")
    assert path.read_text(encoding="utf-8").splitlines() == ["path,category"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_users": 0},
        {"boards_per_category": 0},
        {"pins_per_board": -1},
        {"image_size": 16},
        {"seed": -1},
        {"categories": ()},
        {"categories": ("art", "art")},
        {"categories": ("a/b",)},
        {"categories": "art"},
    ],
)
def test_tree_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_pinterest_tree(tmp_path, **kwargs)
