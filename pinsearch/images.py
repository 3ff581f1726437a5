"""Opening pin images safely: header probes, bomb guard, colour-mode and orientation fixes."""

from __future__ import annotations

import io
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageInfo",
    "check_resized",
    "decode_rgb",
    "is_image_file",
    "load_rgb",
    "open_image",
    "probe_image",
]

#: File extensions treated as pin images (lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

#: Largest image accepted, in pixels (width x height). A 12k x 12k photo passes; a bomb does not.
#: PIL refuses images over twice its own MAX_IMAGE_PIXELS (179 Mpixel) whatever this says.
DEFAULT_MAX_PIXELS = 150_000_000

# pinsearch checks sizes itself (max_pixels below); PIL's warning between 89 and 179 Mpixel
# would only repeat that check as noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code stored in the catalog."""

    def __init__(self, path: str | Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What a header probe learns about an image without decoding its pixels."""

    width: int
    height: int
    format: str
    mode: str


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (the content is checked later)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, data: bytes | None = None
) -> Image.Image:
    """Open an image lazily: the header is read and checked, the pixels are not decoded.

    This is the probe and bomb guard that :func:`probe_image` and :func:`load_rgb` share.

    Args:
        path: the image file (named in errors; read only when ``data`` is None).
        max_pixels: decompression-bomb guard (width x height).
        data: the file's bytes, when the caller has read them already.

    Returns:
        The opened image; the caller closes it or decodes it with :func:`decode_rgb`.

    Raises:
        ImageError: ``missing_file``, ``unreadable``, ``broken_link``, ``not_a_file``,
            ``empty_file``, ``not_an_image``, ``too_large`` or ``corrupt`` (an invalid size).
    """
    path = Path(path)
    if data is None:
        try:
            st = path.stat()
        except OSError as exc:
            if path.is_symlink():  # a link to nothing, or a loop of links
                raise ImageError(
                    path, "broken_link", f"a symbolic link that leads nowhere: {exc}"
                ) from exc
            if isinstance(exc, FileNotFoundError):
                raise ImageError(path, "missing_file", "no such file") from exc
            raise ImageError(path, "unreadable", str(exc)) from exc
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, a device never end
            raise ImageError(path, "not_a_file", "not a regular file (a FIFO, socket or device)")
        size = st.st_size
    else:
        size = len(data)
    if size == 0:
        raise ImageError(path, "empty_file", "the file has 0 bytes")
    try:
        img = Image.open(path if data is None else io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # far over any limit: PIL refuses to open it
        raise ImageError(path, "too_large", f"too large for PIL to open: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not_an_image", "not a recognised image format") from exc
    except OSError as exc:
        raise ImageError(path, "unreadable", str(exc)) from exc
    except (ValueError, SyntaxError, IndexError, struct.error) as exc:  # a mangled header
        raise ImageError(path, "corrupt", f"{type(exc).__name__}: {exc}") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageError(path, "corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise ImageError(
            path, "too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    return img


_ORIENTATION = 0x0112  # the EXIF tag


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read an image's header only.

    Catches empty files, non-images (whatever their extension) and decompression bombs
    cheaply; truncated pixel data is only found by :func:`load_rgb`.

    Raises:
        ImageError: with a reason code (``empty_file``, ``not_an_image``, ``too_large``, ...).
    """
    path = Path(path)
    with open_image(path, max_pixels) as img:
        width, height = img.size
        try:  # as shown: EXIF orientations 5-8 turn the image a quarter (load_rgb applies it)
            # Read with the base class's getexif: the EXIF and XMP that came with the header (a
            # PNG's own decodes the whole image); Pillow's TIFF reader reports the size as shown.
            shown = img.format == "TIFF"
            if not shown and Image.Image.getexif(img).get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
        except Exception:  # a broken EXIF block: the size as stored
            pass
        return ImageInfo(width, height, str(img.format), img.mode)


def _to_rgb(img: Image.Image, band: int = 1024) -> Image.Image:
    """8-bit RGB: high bit depths scaled (not clipped to white), alpha over white. Done
    ``band`` rows at a time, so that a 150-Mpixel image is never held whole in float64 or as
    extra RGBA copies (gigabytes per DataLoader worker); the pixels are those of one pass."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    w, h = img.size
    rows = [(0, y, w, min(h, y + band)) for y in range(0, h, band)]
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        top = 65535.0
        if not mode.startswith("I;16"):  # the largest finite value: one NaN is one black pixel
            top = 1.0
            for box in rows:
                part = np.asarray(img.crop(box), dtype=np.float64)
                finite = part[np.isfinite(part)]
                top = max(top, float(finite.max()) if finite.size else 1.0)
        clear = img.info.get("transparency")  # (a PNG tRNS grey level: over white)
        out = np.empty((h, w), np.uint8)
        for box in rows:
            part = np.asarray(img.crop(box), dtype=np.float64)
            see_through = part == clear if isinstance(clear, int | float) else None
            part = np.nan_to_num(part, nan=0.0, posinf=top, neginf=0.0)
            grey = np.clip(part / top * 255.0, 0, 255).astype(np.uint8)
            if see_through is not None:
                grey[see_through] = 255
            out[box[1] : box[3]] = grey
        return Image.fromarray(out, mode="L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a colour marked transparent (PNG tRNS): over white too
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        out_img = Image.new("RGB", img.size)
        for box in rows:
            part = img.crop(box).convert("RGBA")
            white = Image.new("RGBA", part.size, (255, 255, 255, 255))
            out_img.paste(Image.alpha_composite(white, part).convert("RGB"), box[:2])
        return out_img
    return img.convert("RGB")


def load_rgb(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    draft: bool = True,
) -> Image.Image:
    """Decode an image fully into 8-bit RGB, upright (EXIF orientation applied).

    Alpha is composited over white; CMYK, palette, grey and 16-bit images are converted.

    Args:
        path: the image file.
        max_pixels: decompression-bomb guard.
        min_side: the side the caller resizes the short side to (a backbone's resize side).
            A JPEG is then decoded directly at a reduced scale (1/2, 1/4 or 1/8, libjpeg's
            DCT scaling) as long as both sides stay at least this large -- several times
            faster for large photos -- unless ``draft`` is False; and an image whose resized
            copy would exceed ``max_pixels`` is ``too_large`` (a 1 x 20,000 strip resized to
            a short side of 168 is 168 x 3,360,000 pixels, 1.7 GB in 8-bit RGB).
        draft: reduced-scale JPEG decoding (False: every JPEG decoded whole, as a GPU
            decoder decodes it).

    Raises:
        ImageError: ``truncated`` or ``corrupt`` pixel data, plus every probe reason.
    """
    return decode_rgb(
        open_image(path, max_pixels), path, min_side=min_side, draft=draft, max_pixels=max_pixels
    )


def check_resized(size: tuple[int, int], side: int, max_pixels: int, path: str | Path) -> None:
    """Refuse an image whose copy resized to a short side of ``side`` (as timm's eval
    transform makes it before cropping) would hold more than ``max_pixels`` pixels.

    Raises:
        ImageError: ``too_large``.
    """
    w, h = size
    short, long = min(w, h), max(w, h)
    resized = side * max(round(long * side / max(short, 1)), 1)
    if resized > max_pixels:
        raise ImageError(
            path,
            "too_large",
            f"{w}x{h} resized to a short side of {side} would be {resized} pixels, over the "
            f"limit of {max_pixels}",
        )


def decode_rgb(
    img: Image.Image,
    path: str | Path,
    *,
    min_side: int | None = None,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an image opened by :func:`open_image` into upright 8-bit RGB (see :func:`load_rgb`).

    Args:
        img: the lazily opened image; its pixels are decoded here.
        path: the file, named in errors.
        min_side, draft, max_pixels: as for :func:`load_rgb` (reduced-scale JPEG decoding,
            and the resized copy's size).

    Raises:
        ImageError: ``truncated`` or ``corrupt`` pixel data; ``too_large`` (:func:`check_resized`).
    """
    path = Path(path)
    if min_side:
        check_resized(img.size, min_side, max_pixels, path)
    try:
        # (an MPO, as phones write, is JPEGs one after another: PIL reads the first)
        jpeg = img.format in ("JPEG", "MPO")
        if draft and min_side and jpeg and min(img.size) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageError(path, reason, str(exc)) from exc
    except (ValueError, SyntaxError, IndexError, struct.error) as exc:
        raise ImageError(path, "corrupt", f"{type(exc).__name__}: {exc}") from exc
