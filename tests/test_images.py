"""Tests for pinsearch.images: safe opening, reason codes, colour modes and orientation."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pinsearch.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    ImageInfo,
    is_image_file,
    load_rgb,
    probe_image,
)


def _noise_jpeg(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (1-bit grey): a bomb on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def _reason(fn, *args, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args, **kwargs)
    return info.value


# -- extensions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpg", True),
        ("a.JPEG", True),
        ("a.png", True),
        ("a.WebP", True),
        ("a.txt", False),
        ("a.json", False),
        ("jpg", False),
        ("a.jpg.bak", False),
    ],
)
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(Path(name)) is expected


def test_extension_set_is_lower_case() -> None:
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


# -- bad files --------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [probe_image, load_rgb], ids=["probe", "load"])
def test_zero_byte_file(tmp_path: Path, fn) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _reason(fn, path)
    assert err.reason == "empty_file"
    assert err.path == str(path)
    assert str(path) in str(err)


def test_missing_file_is_named_so(tmp_path: Path) -> None:
    err = _reason(probe_image, tmp_path / "nope.jpg")
    assert err.reason == "missing_file"


def test_truncated_jpeg(tmp_path: Path) -> None:
    full = _noise_jpeg(tmp_path / "full.jpg")
    data = full.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    # The header is intact: the probe passes and reports the real size ...
    info = probe_image(path)
    assert (info.width, info.height, info.format) == (64, 48, "JPEG")
    # ... and only decoding finds the missing pixel data.
    err = _reason(load_rgb, path)
    assert err.reason == "truncated"


@pytest.mark.parametrize("fn", [probe_image, load_rgb], ids=["probe", "load"])
def test_random_bytes_named_jpg(tmp_path: Path, fn) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _reason(fn, path).reason == "not_an_image"


@pytest.mark.parametrize("fn", [probe_image, load_rgb], ids=["probe", "load"])
def test_text_file_named_jpg(tmp_path: Path, fn) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    assert _reason(fn, path).reason == "not_an_image"


def test_png_named_jpg_loads(tmp_path: Path) -> None:
    path = tmp_path / "actually_png.jpg"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(path, format="PNG")
    info = probe_image(path)
    assert info == ImageInfo(30, 20, "PNG", "RGB")
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.asarray(img)[5, 5].tolist() == [10, 200, 30]


# -- colour modes -----------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    assert probe_image(path).mode == "CMYK"
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    r, g, b = np.asarray(img)[5, 10].tolist()
    assert r > 200 and g < 60 and b < 60  # pure red, not inverted


def test_palette_png_with_transparency_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (5, 0, 10, 10))  # right half: opaque blue
    img.save(path, transparency=0)  # colour 0 (red) is transparent
    assert probe_image(path).mode == "P"
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (10, 10, 3)
    assert arr[3, 2].tolist() == [255, 255, 255]  # transparent -> white, not red
    assert arr[3, 7].tolist() == [0, 0, 255]


def test_rgba_png_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    arr = np.zeros((4, 8, 4), np.uint8)
    arr[:, :4] = (0, 0, 0, 0)  # fully transparent black
    arr[:, 4:6] = (0, 0, 0, 255)  # opaque black
    arr[:, 6:] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(arr, mode="RGBA").save(path)
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 4].tolist() == [0, 0, 0]
    assert all(120 <= v <= 135 for v in out[0, 7].tolist())  # grey, halfway to white


def test_la_png_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(path)
    assert np.asarray(load_rgb(path))[1, 1].tolist() == [255, 255, 255]


def test_16bit_grey_png_with_a_transparent_level_shows_it_white(tmp_path: Path) -> None:
    """A tRNS grey level is transparent: over white, as every other mode's (it was black)."""
    path = tmp_path / "grey16t.png"
    Image.fromarray(np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)).save(
        path, transparency=0
    )
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [4, 4, 4]


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    arr = np.zeros((8, 8), np.uint16)
    arr[:, :4] = 16384  # a quarter of the 16-bit range
    arr[:, 4:] = 49152  # three quarters
    Image.fromarray(arr).save(path)
    assert probe_image(path).mode == "I;16"
    out = np.asarray(load_rgb(path))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    left, right = out[0, 0], out[0, 7]
    assert (left == left[0]).all() and (right == right[0]).all()  # still grey
    # Scaled by 255/65535, not clipped to white (which would give 255 for both).
    assert abs(int(left[0]) - 16384 * 255 // 65535) <= 1
    assert abs(int(right[0]) - 49152 * 255 // 65535) <= 1


def test_grey_and_one_bit_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (6, 6), 77).save(tmp_path / "l.png")
    Image.new("1", (6, 6), 1).save(tmp_path / "one.png")
    assert np.asarray(load_rgb(tmp_path / "l.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_rgb(tmp_path / "one.png"))[0, 0].tolist() == [255, 255, 255]


# -- orientation ----------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (60, 40), (200, 200, 200))
    img.paste((255, 0, 0), (0, 0, 10, 40))  # red stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    assert (probe_image(path).width, probe_image(path).height) == (40, 60)  # as shown
    out = load_rgb(path)
    assert out.size == (40, 60)  # upright: width and height swapped
    arr = np.asarray(out)
    # The left edge ends up on top after a clockwise rotation.
    assert arr[2, 20, 0] > 200 and arr[2, 20, 1] < 80
    assert arr[-3, 20].tolist() == pytest.approx([200, 200, 200], abs=12)


# -- decompression bombs --------------------------------------------------------------------


@pytest.mark.parametrize("fn", [probe_image, load_rgb], ids=["probe", "load"])
def test_max_pixels_limit(tmp_path: Path, fn) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    err = _reason(fn, path, max_pixels=4999)
    assert err.reason == "too_large"
    assert "5000" in err.detail and "4999" in err.detail
    assert fn(path, max_pixels=5000) is not None  # exactly at the limit is fine


def test_header_claiming_huge_size_is_rejected_cheaply(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.jpg", 20000, 20000)
    assert path.stat().st_size < 200
    for fn in (probe_image, load_rgb):
        err = _reason(fn, path)
        assert err.reason == "too_large"
    assert DEFAULT_MAX_PIXELS < 20000 * 20000


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_documented_12k_square_photo_passes_the_probe(tmp_path: Path) -> None:
    # DEFAULT_MAX_PIXELS documents "A 12k x 12k photo passes". 144M pixels is above PIL's
    # *warning* threshold (89.5M) but below its error threshold (179M) and below our limit.
    path = _png_header_only(tmp_path / "photo.png", 12000, 12000)
    assert DEFAULT_MAX_PIXELS >= 12000 * 12000
    info = probe_image(path)
    assert (info.width, info.height) == (12000, 12000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_just_over_our_limit_is_stopped_by_our_check(tmp_path: Path) -> None:
    # 12500 x 12500 = 156M pixels: over DEFAULT_MAX_PIXELS (150M) yet below PIL's error
    # threshold (2 x 89.5M), so our own limit is what stops it, with our message.
    path = _png_header_only(tmp_path / "b.png", 12500, 12500)
    err = _reason(probe_image, path)
    assert err.reason == "too_large"
    assert "exceeds the limit of 150000000" in err.detail


def test_pil_bomb_error_maps_to_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL raises DecompressionBombError above twice MAX_IMAGE_PIXELS; that must become
    # ImageError("too_large") even though our own max_pixels would accept the image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "pilbomb.png"
    Image.new("L", (500, 10)).save(path)
    for fn in (probe_image, load_rgb):
        err = _reason(fn, path, max_pixels=10**9)
        assert err.reason == "too_large"
        assert "decompression bomb" in err.detail.lower()


def test_probe_does_not_decode(tmp_path: Path) -> None:
    # A PNG with a valid header but garbage pixel data probes fine; load_rgb reports it.
    path = _png_header_only(tmp_path / "hdr.png", 64, 64)
    info = probe_image(path)
    assert (info.width, info.height, info.format, info.mode) == (64, 64, "PNG", "1")
    assert _reason(load_rgb, path).reason in {"truncated", "corrupt"}


def test_probe_of_a_png_reads_no_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(A PNG's getexif decodes the whole image: the probe's orientation check skips it.)"""
    from PIL import PngImagePlugin

    Image.new("RGB", (300, 200)).save(tmp_path / "p.png")
    loads = []
    real = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda im: loads.append(1) or real(im))
    assert (probe_image(tmp_path / "p.png").width, loads) == (300, [])


def test_large_jpeg_decodes_at_reduced_scale_when_allowed(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    path = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    PILImage.fromarray(base).resize((1600, 1200), PILImage.BILINEAR).save(path, quality=92)
    full = load_rgb(path)
    small = load_rgb(path, min_side=256)
    assert full.size == (1600, 1200)
    assert small.size == (400, 300)  # 1/4 scale: both sides still >= 256
    assert min(load_rgb(path, min_side=700).size) >= 700
    # The reduced decode looks like the full one scaled down.
    ref = np.asarray(full.resize(small.size, PILImage.BILINEAR), dtype=float)
    assert np.abs(np.asarray(small, dtype=float) - ref).mean() < 6


def test_conversion_in_bands_gives_the_pixels_of_one_pass() -> None:
    """Large images are converted a band of rows at a time (memory): the same pixels as one
    band, for every mode that needs converting; a NaN in a float image is one black pixel."""
    from pinsearch.images import _to_rgb

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (53, 41, 4), dtype=np.uint8))
    wide = Image.new("I;16", (41, 53))
    wide.frombytes(rng.integers(0, 65536, (53, 41), dtype=np.uint16).tobytes())
    floats = rng.random((53, 41)).astype(np.float32) * 1000
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = 3
    images = [
        rgba, rgba.convert("LA"), rgba.convert("RGBa"), palette, wide, Image.fromarray(floats),
        Image.fromarray(rng.integers(-5, 300_000, (53, 41)).astype(np.int32)),
        rgba.convert("RGB").convert("CMYK"), rgba.convert("L"),
    ]  # fmt: skip
    for img in images:
        whole = np.asarray(_to_rgb(img, band=10**6))
        assert np.array_equal(np.asarray(_to_rgb(img, band=7)), whole), img.mode
    assert np.asarray(_to_rgb(wide)).max() > 250  # scaled, not clipped to white
    floats[3, 4], floats[5, 6] = np.nan, np.inf
    out = np.asarray(_to_rgb(Image.fromarray(floats), band=7))
    assert out[3, 4].tolist() == [0, 0, 0] and out[5, 6].tolist() == [255, 255, 255]
    assert 100 < out.mean() < 160  # the rest as before: not black, not white


def test_probe_reports_the_size_as_shown(tmp_path: Path) -> None:
    from pinsearch.images import load_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: stored 120 x 60, shown 60 x 120
    Image.new("RGB", (120, 60)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
        b'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    Image.new("RGB", (120, 60)).save(tmp_path / "r.tiff", exif=exif.tobytes())
    Image.new("RGB", (120, 60)).save(tmp_path / "r.webp", xmp=xmp)  # orientation in XMP only
    for name in ("r.jpg", "r.tiff", "r.webp"):
        info = probe_image(tmp_path / name)
        assert (info.width, info.height) == load_rgb(tmp_path / name).size == (60, 120), name


def test_a_colour_marked_transparent_is_white_too(tmp_path: Path) -> None:
    """PNG tRNS on grey and RGB images, as on palette ones: over white, not black."""
    for mode, clear in (("L", 0), ("RGB", (0, 0, 0))):
        img = Image.new(mode, (80, 80), clear)
        img.paste(200 if mode == "L" else (200, 10, 10), (40, 0, 80, 80))
        img.save(tmp_path / f"{mode}.png", transparency=clear)
        out = np.asarray(load_rgb(tmp_path / f"{mode}.png"))
        assert out[0, 0].tolist() == [255, 255, 255], mode
        assert out[0, 79].tolist() == ([200] * 3 if mode == "L" else [200, 10, 10])


def test_phone_mpo_jpegs_are_drafted_like_jpegs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)) for _ in "ab"]
    frames[0].save(tmp_path / "p.mpo", "MPO", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "p.jpg", "JPEG")
    with Image.open(tmp_path / "p.mpo") as opened:
        assert opened.format == "MPO"
    assert load_rgb(tmp_path / "p.mpo", min_side=100).size == (200, 150)  # as the JPEG's
    assert load_rgb(tmp_path / "p.jpg", min_side=100).size == (200, 150)
