"""Bad input end to end — every kind at once in one corpus, nothing lost — and fuzzing of the
readers (hypothesis): whatever the bytes, a reader either keeps a pin or skips it with a reason,
and the counts always add up."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pinsearch.check import check_store
from pinsearch.images import ImageError, load_rgb, probe_image
from pinsearch.ingest import CorpusError, read_corpus
from pinsearch.pipeline import index_corpus
from pinsearch.store import Store

B = "test_efficientnet"
FIXTURE_CHECK = HealthCheck.function_scoped_fixture  # each example resets its own folder


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(seed: int, mode: str = "RGB", size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _pin(board: Path, pin_id: str, data: bytes, meta: bytes | None = b"{}", name=None) -> None:
    folder = board / pin_id
    folder.mkdir(parents=True)
    (folder / (name or f"{pin_id}.jpg")).write_bytes(data)
    if meta is not None:
        (folder / "pin.json").write_bytes(meta)


def _board(root: Path, user: str, board: str, meta: bytes | None) -> Path:
    path = root / user / board
    path.mkdir(parents=True)
    if meta is not None:
        (path / "board.json").write_bytes(meta)
    return path


def _bad_corpus(root: Path) -> dict[str, str]:
    """A tree with every kind of bad input; returns pin id -> expected outcome."""
    good = _board(root, "u1", "good", json.dumps({"name": "Good", "category": "Art"}).encode())
    expect: dict[str, str] = {}

    def add(pin_id: str, data: bytes, outcome: str, **kw) -> None:
        _pin(good, pin_id, data, **kw)
        expect[pin_id] = outcome

    for i in range(6):
        add(f"ok{i}", _jpeg(_photo(i)), "kept")
    add("zero", b"", "empty_file")
    add("truncated", _jpeg(_photo(10))[:300], "embed_failed")
    add("garbage", os.urandom(2000), "not_an_image")
    add("text", b"this is a text file, not a photo\n" * 20, "not_an_image")
    add("pngjpg", _png(_photo(11)), "kept")
    add("cmyk", _jpeg(_photo(12, "CMYK")), "kept")
    add("palette", _png(_photo(13, "P")), "kept", name="palette.png")
    grey16 = Image.fromarray((np.arange(64 * 80).reshape(64, 80) * 10).astype(np.uint16))
    add("grey16", _png(grey16), "kept", name="grey16.png")
    add("rgba", _png(_photo(14, "RGBA")), "kept", name="rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    add("exif", _jpeg(_photo(15), exif=exif), "kept")

    # A PNG announcing 20k x 20k pixels in a few bytes: a decompression bomb, refused unread.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    bomb += chunk(b"IEND", b"")
    add("bomb", bomb, "too_large")
    add("badpinjson", _jpeg(_photo(16)), "malformed_pin_json", meta=b"{not json")
    add("nopinjson", _jpeg(_photo(17)), "kept", meta=None)
    add("x" * 200, _jpeg(_photo(18)), "kept")  # a very long (200-byte) file name
    # Boards: malformed, missing, without category; an unknown category is kept as it is.
    _pin(_board(root, "u1", "badjson", b"{oops"), "inbad", _jpeg(_photo(19)))
    expect["inbad"] = "malformed_board_json"
    _pin(_board(root, "u1", "nojson", None), "innojson", _jpeg(_photo(20)))
    expect["innojson"] = "missing_board_json"
    _pin(
        _board(root, "u2", "nocat", json.dumps({"name": "x"}).encode()),
        "innocat",
        _jpeg(_photo(21)),
    )
    expect["innocat"] = "missing_category"
    odd = _board(root, "u2", "odd", json.dumps({"category": "Underwater Basket Weaving"}).encode())
    _pin(odd, "oddcat", _jpeg(_photo(22)))
    expect["oddcat"] = "kept"
    # The same pin id in a second board: the first occurrence wins.
    _pin(odd, "ok0", _jpeg(_photo(23)))
    # A non-UTF-8 file name.
    raw = os.fsencode(str(good)) + b"/bad\xff\xfename"
    os.makedirs(raw)
    with open(raw + b"/x.jpg", "wb") as fh:
        fh.write(_jpeg(_photo(24)))
    return expect


def test_every_bad_input_at_once_loses_no_pin(tmp_path: Path) -> None:
    expect = _bad_corpus(tmp_path / "corpus")
    report = index_corpus(tmp_path / "corpus", tmp_path / "s", backbone=B)
    with Store.open(tmp_path / "s", read_only=True) as store:
        kept = {r["pin_id"] for r in store.catalog.query("SELECT pin_id FROM pins")}
        skipped = store.catalog.query("SELECT pin_id, path, stage, reason FROM skipped")
        info = store.info()
    reasons = {r["pin_id"]: r["reason"] for r in skipped if r["pin_id"]}
    for pin_id, outcome in expect.items():
        if outcome == "kept":
            assert pin_id in kept, pin_id
        elif outcome == "embed_failed":
            assert pin_id not in kept and reasons[pin_id] not in ("", None), reasons
        else:
            assert pin_id not in kept and reasons.get(pin_id) == outcome, (pin_id, reasons)
    # The duplicate id and the non-UTF-8 name are skipped too, with their reasons.
    all_reasons = sorted(r["reason"] for r in skipped)
    assert "duplicate_id" in all_reasons and "non_utf8_name" in all_reasons
    # Nothing lost: every pin found is stored or skipped (with a stage and a reason).
    assert report.found == len(kept) + len(skipped)
    assert info.pins == len(kept) and info.skipped == len(skipped)
    assert sum(r["pins"] for r in info.skipped_by_reason) == len(skipped)
    assert check_store(tmp_path / "s").ok


def test_manifest_paths_escaping_the_root_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(_jpeg(_photo(1)))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_jpeg(_photo(2)))
    rows = [
        ("img/a.jpg", "art"),
        (str(outside), "art"),
        ("../outside.jpg", "art"),
        ("img/missing.jpg", "art"),
    ]
    with (root / "pins.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "category"])
        w.writerows(rows)
    result = read_corpus(root / "pins.csv")
    assert [p.pin_id for p in result.pins] == ["img/a"]
    assert len(result.skipped) == 3 and result.found == 4
    assert all(s.reason for s in result.skipped)


def test_empty_and_one_category_corpora(tmp_path: Path, make_tree) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        index_corpus(tmp_path / "empty", tmp_path / "s0", backbone=B)
    one = make_tree(tmp_path / "one", categories=("art",), pins_per_board=3)
    report = index_corpus(one.root, tmp_path / "s1", backbone=B)
    assert report.added == report.ntotal == one.n_pins
    assert check_store(tmp_path / "s1").ok


# -- fuzzing ----------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_paths = st.one_of(
    _text,
    st.sampled_from(["img/a.jpg", "../x.jpg", "/etc/passwd", "img/../img/a.jpg", "", "img"]),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"path": _paths, "category": _text, "pin_id": _text, "board": _text, "title": _text}
        ),
        max_size=8,
    )
)
def test_fuzz_manifest_parser(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    root = tmp_path / "fuzz"
    if root.exists():
        shutil.rmtree(root)
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(_jpeg(_photo(0, size=(16, 16))))
    with (root / "pins.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "category", "pin_id", "board", "title"])
        w.writeheader()
        w.writerows(rows)
    result = read_corpus(root / "pins.csv")
    assert result.found == len(rows)
    assert len(result.pins) + len(result.skipped) + result.sampled_out == result.found
    for pin in result.pins:  # whatever was kept lies inside the corpus root
        assert Path(pin.path).resolve().is_relative_to(root.resolve())
    assert all(s.reason for s in result.skipped)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_subnormal=False)
    | _text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=8,
)
_meta = st.one_of(
    st.binary(max_size=60),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"category": _text, "title": _json_values}).map(
        lambda v: json.dumps(v).encode()
    ),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(board_meta=_meta, pin_metas=st.lists(_meta, min_size=1, max_size=3))
def test_fuzz_tree_reader(tmp_path: Path, board_meta: bytes, pin_metas: list[bytes]) -> None:
    root = tmp_path / "tree"
    if root.exists():
        shutil.rmtree(root)
    board = _board(root, "u", "b", board_meta)
    for i, meta in enumerate(pin_metas):
        _pin(board, f"p{i}", _jpeg(_photo(i, size=(16, 16))), meta=meta)
    result = read_corpus(root)
    assert result.found == len(pin_metas)
    assert len(result.pins) + len(result.skipped) + result.sampled_out == result.found
    assert all(s.reason for s in result.skipped)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from(["jpeg", "png"]),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
)
@example(base="png", cut=16, flips=[(11, 0)])  # found by this test: PIL's ValueError at open
def test_fuzz_image_reader(tmp_path: Path, base: str, cut: int, flips: list) -> None:
    """Truncated or bit-flipped JPEG/PNG bytes: an image comes out or an ImageError does."""
    img = _photo(3, size=(40, 30))
    data = bytearray(_jpeg(img) if base == "jpeg" else _png(img))[: max(cut, 1)]
    for at, value in flips:
        if at < len(data):
            data[at] = value
    path = tmp_path / "f.jpg"
    path.write_bytes(bytes(data))
    for reader in (probe_image, load_rgb):
        try:
            out = reader(path)
        except ImageError as exc:
            assert exc.reason
        else:
            assert out is not None
