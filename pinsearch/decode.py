"""Decoding pin images next to the model: JPEG bytes from the workers, pixels on the device.

The work is split in two steps. In the DataLoader workers, :func:`prepare_image` reads a file
and looks at its header only. A plain JPEG (baseline, or progressive but not on CUDA:
:func:`takes_progressive`; YCbCr or grey, upright, within the pixel limit, ending in its
end-of-image marker) travels on as its encoded bytes; anything else (PNG, CMYK, EXIF-rotated,
odd files) is decoded right there by the PIL path of
:mod:`pinsearch.images` and the backbone's pixel transform, and travels as its 8-bit crop
(uint8: a quarter of the float input's bytes); unreadable files become failures with the same
reasons as the PIL path. A ``cpu_share`` of the JPEGs the device could take is decoded in the
workers too (:func:`worker_decodes`), so that the CPU cores and the GPU's decoder share the
work where the decoder alone would bound the rate.

In the main process, :func:`decode_on_device` decodes the encoded JPEGs of a batch at once with
``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA, libjpeg-turbo on the
CPU), resizes, crops and normalises them there the way timm's eval transform does
(:func:`transform_on_device`), normalises the worker-decoded crops there too
(:meth:`~pinsearch.backbones.Preprocess.normalize`), and puts all back in batch order. A JPEG
the device decoder refuses is decoded with PIL instead; only when that fails too is it a
failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pinsearch.backbones import Preprocess
from pinsearch.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_resized,
    decode_rgb,
    open_image,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PIXEL_BUDGET",
    "DecodedBatch",
    "EncodedPinImages",
    "JpegHardware",
    "PinFiles",
    "PreparedBatch",
    "PreparedImage",
    "collate_prepared",
    "decode_jpegs",
    "decode_on_device",
    "device_decoder_error",
    "device_refusal",
    "device_transform_supported",
    "jpeg_hardware",
    "prepare_image",
    "takes_progressive",
    "transform_on_device",
    "worker_decodes",
]

#: At most this many decoded pixels are held on the device at once while a batch is decoded
#: (about 3 bytes each, plus the resize's float copy): large photos go in several calls.
DEFAULT_PIXEL_BUDGET = 128_000_000

_DEVICE_MODES = frozenset({"RGB", "L"})
_SOF_BASELINE, _SOF_PROGRESSIVE = 0xFFC0, 0xFFC2
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112

Transform = Callable[[Any], torch.Tensor]


# -- worker side -----------------------------------------------------------------------------


@dataclass
class PreparedImage:
    """One pin after the worker step: encoded JPEG bytes, its uint8 crop, or a failure.

    Attributes:
        key: the caller's key for the pin.
        path: the image file.
        encoded: the file's bytes as a 1-D uint8 tensor, for the device decoder.
        image: the resized and cropped CHW uint8 pixels, for files decoded in the worker.
        size: ``(height, width)`` from the header of an encoded JPEG.
        reason: failure code (an :class:`~pinsearch.images.ImageError` reason), else "".
        detail: failure detail, else "".
    """

    key: int
    path: str
    encoded: torch.Tensor | None = None
    image: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)
    reason: str = ""
    detail: str = ""

    @property
    def kind(self) -> str:
        """``"encoded"``, ``"image"`` or ``"failed"``."""
        if self.encoded is not None:
            return "encoded"
        return "image" if self.image is not None else "failed"


def _frame_marker(data: bytes) -> int | None:
    """The JPEG start-of-frame marker (``0xFFC0``...), walking the segments before the scan."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 0xFF00 | marker
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def device_refusal(img: Image.Image, data: bytes, *, progressive: bool = True) -> str | None:
    """Why the device decoder should not take an image, from its header; None if it can.

    It takes baseline and (with ``progressive``) progressive 8-bit JPEGs, YCbCr or grey, whose
    EXIF orientation, if any, is 1 and whose bytes end with the end-of-image marker (a
    truncated file goes to PIL, which reports it as ``truncated``).

    Args:
        img: the image opened lazily by :func:`~pinsearch.images.open_image` (size already
            checked against the pixel limit).
        data: the file's bytes.
        progressive: whether progressive JPEGs go to the device (:func:`takes_progressive`).
    """
    if img.format != "JPEG":
        return f"format {img.format}"
    if img.mode not in _DEVICE_MODES:
        return f"mode {img.mode}"
    if img.mode == "RGB" and (
        img.info.get("adobe_transform") == 0
        or [layer[0] for layer in getattr(img, "layer", [])] in ([82, 71, 66], [b"R", b"G", b"B"])
    ):
        return "RGB-coded (not YCbCr) JPEG"  # libjpeg reads the markers; nvJPEG may not
    marker = _frame_marker(data)
    if marker not in (_SOF_BASELINE, _SOF_PROGRESSIVE):
        return "frame marker " + (f"{marker:#06x}" if marker is not None else "not found")
    if marker == _SOF_PROGRESSIVE and not progressive:
        return "progressive JPEG (nvJPEG decodes those one at a time)"
    if not data.rstrip(b"\x00").endswith(_EOI):
        return "no end-of-image marker"
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception as exc:  # a broken EXIF block: PIL's exif_transpose decides
        return f"unreadable EXIF ({type(exc).__name__})"
    if orientation not in (1, None):
        return f"EXIF orientation {orientation}"
    return None


def takes_progressive(device: torch.device | str) -> bool:
    """Whether progressive JPEGs should go to the device decoder on ``device``.

    Not on CUDA: torchvision's nvJPEG decoder decodes the baseline JPEGs of a call in one
    batch (on the GPU's hardware JPEG engine where there is one, as on A100 and H100) but the
    others one at a time, their Huffman stage on the host in the calling thread, which is the
    embedding's main loop. The DataLoader workers decode those with PIL instead, in parallel
    (whole, as the device decodes the others). On the CPU, libjpeg-turbo decodes both kinds
    alike.
    """
    return torch.device(device).type != "cuda"


def _pil_prepare(
    key: int,
    path: str,
    data: bytes,
    transform: Transform,
    max_pixels: int,
    min_side: int | None,
    *,
    allow_encoded: bool,
    progressive: bool = True,
    draft: bool = True,
) -> PreparedImage:
    try:
        img = open_image(path, max_pixels, data=data)
        if min_side:  # the PIL path's guard, so that both paths keep the same pins
            check_resized(img.size, min_side, max_pixels, path)
        if allow_encoded and device_refusal(img, data, progressive=progressive) is None:
            size = (img.size[1], img.size[0])
            img.close()
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return PreparedImage(key, path, encoded=encoded, size=size)
        rgb = decode_rgb(img, path, min_side=min_side, draft=draft, max_pixels=max_pixels)
        return PreparedImage(key, path, image=transform(rgb))
    except ImageError as exc:
        return PreparedImage(key, path, reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # a transform failing on odd input must not stop the run
        return PreparedImage(
            key, path, reason="transform_failed", detail=f"{type(exc).__name__}: {exc}"
        )


def prepare_image(
    key: int,
    path: str,
    transform: Transform,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
    encoded_ok: bool = True,
    progressive: bool = True,
    draft: bool = True,
) -> PreparedImage:
    """The worker step: read a file and route it by its header.

    Args:
        key: the pin's key, carried through.
        path: the image file.
        transform: the backbone's pixel transform (PIL image -> uint8 CHW crop,
            :meth:`~pinsearch.backbones.Backbone.pixel_transform`), for the files the device
            decoder does not take.
        max_pixels: decompression-bomb guard.
        min_side: the backbone's resize side: reduced-scale JPEG decoding for the PIL path,
            and the size guard of the resized copy (:func:`~pinsearch.images.load_rgb`).
        encoded_ok: False decodes the file here whatever its header says (the PIL path).
        progressive: False decodes progressive JPEGs here (:func:`takes_progressive`).
        draft: False decodes JPEGs whole here, as the device decoder does (a device-path run:
            its pins all see the same pixels, whichever decoder took them).

    Returns:
        Encoded bytes (see :func:`device_refusal`), a uint8 crop, or a failure whose reason
        and detail are those :func:`~pinsearch.images.load_rgb` reports.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block the read
            return PreparedImage(  # (load_rgb's reason and words)
                key, path, reason="not_a_file",
                detail="not a regular file (a FIFO, socket or device)",
            )  # fmt: skip
        data = Path(path).read_bytes()
    except FileNotFoundError:  # (load_rgb's reason: a broken link's is found by the stat)
        if os.path.islink(path):
            return PreparedImage(key, path, reason="broken_link", detail="a link to nothing")
        return PreparedImage(key, path, reason="missing_file", detail="no such file")
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL in it
        return PreparedImage(key, path, reason="unreadable", detail=str(exc))
    return _pil_prepare(
        key,
        path,
        data,
        transform,
        max_pixels,
        min_side,
        allow_encoded=encoded_ok,
        progressive=progressive,
        draft=draft,
    )


def worker_decodes(i: int, cpu_share: float) -> bool:
    """Whether item ``i`` is one of the ``cpu_share`` of items decoded in the worker: every
    item whose position moves ``i * cpu_share`` past a whole number, so the share is spread
    evenly over the items (and over every batch) and the same on every run."""
    return cpu_share > 0 and int((i + 1) * cpu_share) > int(i * cpu_share)


class PinFiles(Dataset):  # type: ignore[type-arg]
    """``(key, path)`` items with the backbone's pixel transform and decoding limits, for a
    DataLoader; subclasses say what one item becomes."""

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        transform: Transform,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None,
        *,
        draft: bool = True,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.draft = draft

    def __len__(self) -> int:
        return len(self.items)


class EncodedPinImages(PinFiles):
    """``(key, path)`` items -> :class:`PreparedImage` (the worker step, for a DataLoader).

    ``cpu_share`` (0 to 1) of the items are decoded in the worker whatever their header says
    (:func:`worker_decodes`); the others travel encoded where the device decoder takes them
    (progressive JPEGs only with ``progressive``: :func:`takes_progressive`).
    """

    def __init__(
        self, *args: Any, cpu_share: float = 0.0, progressive: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_share = cpu_share
        self.progressive = progressive

    def __getitem__(self, i: int) -> PreparedImage:
        key, path = self.items[i]
        return prepare_image(
            key,
            path,
            self.transform,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
            encoded_ok=not worker_decodes(i, self.cpu_share),
            progressive=self.progressive,
            draft=self.draft,
        )


@dataclass
class PreparedBatch:
    """A batch of :class:`PreparedImage` packed for the trip to the main process.

    The encoded JPEGs travel back to back in one uint8 tensor (one shared-memory block
    instead of one per image); positions refer to the batch order.

    Attributes:
        keys: every item's key, in batch order.
        paths: every item's path, in batch order.
        encoded: the encoded JPEGs concatenated (1-D uint8).
        offsets: encoded JPEG ``j`` is ``encoded[offsets[j]:offsets[j + 1]]``.
        encoded_at: the batch position of each encoded JPEG.
        sizes: ``(height, width)`` of each encoded JPEG.
        images: the worker-decoded uint8 crops stacked ``(n, 3, S, S)``.
        images_at: the batch position of each worker-decoded crop.
        failures: ``(position, reason, detail)`` of the items that failed in the worker.
    """

    keys: list[int]
    paths: list[str]
    encoded: torch.Tensor
    offsets: list[int]
    encoded_at: list[int]
    sizes: list[tuple[int, int]]
    images: torch.Tensor
    images_at: list[int]
    failures: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def encoded_item(self, j: int) -> torch.Tensor:
        """The ``j``-th encoded JPEG (a contiguous 1-D view)."""
        return self.encoded[self.offsets[j] : self.offsets[j + 1]]

    def pin_memory(self) -> PreparedBatch:
        """Page-locked worker tensors, for asynchronous copies (called by the DataLoader)."""
        return replace(self, images=self.images.pin_memory())


def collate_prepared(items: list[PreparedImage]) -> PreparedBatch:
    """DataLoader ``collate_fn`` for :class:`EncodedPinImages`."""
    encoded = [(i, it) for i, it in enumerate(items) if it.encoded is not None]
    ready = [(i, it) for i, it in enumerate(items) if it.encoded is None and it.image is not None]
    offsets = [0]
    for _, it in encoded:
        offsets.append(offsets[-1] + int(it.encoded.numel()))  # type: ignore[union-attr]
    return PreparedBatch(
        keys=[it.key for it in items],
        paths=[it.path for it in items],
        encoded=(
            torch.cat([it.encoded for _, it in encoded])  # type: ignore[misc]
            if encoded
            else torch.empty(0, dtype=torch.uint8)
        ),
        offsets=offsets,
        encoded_at=[i for i, _ in encoded],
        sizes=[it.size for _, it in encoded],
        images=(
            torch.stack([it.image for _, it in ready])  # type: ignore[misc]
            if ready
            else torch.empty(0, dtype=torch.uint8)
        ),
        images_at=[i for i, _ in ready],
        failures=[(i, it.reason, it.detail) for i, it in enumerate(items) if it.kind == "failed"],
    )


# -- device side -----------------------------------------------------------------------------


@dataclass
class DecodedBatch:
    """A batch ready for the model.

    Attributes:
        keys: int64 CPU tensor, the keys of the rows of ``images`` (batch order).
        images: ``(n, 3, S, S)`` float32 normalised inputs on the device.
        failures: ``(key, path, reason, detail)`` of the items that failed, in batch order.
    """

    keys: torch.Tensor
    images: torch.Tensor
    failures: list[tuple[int, str, str, str]]


def device_transform_supported(preprocess: Preprocess) -> bool:
    """Whether :func:`transform_on_device` reproduces this preprocessing (bilinear/bicubic)."""
    return preprocess.interpolation in ("bilinear", "bicubic")


def _settle(device: torch.device) -> None:
    # nvJPEG writes on torchvision's own stream into tensors the caching allocator hands out
    # on the current stream: a block freed there may still be read by queued kernels, so
    # nothing may be pending on the current stream when the decoder is called.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _decode(data: torch.Tensor | list[torch.Tensor], device: torch.device) -> Any:
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda" and device.index is None:
        # torchvision rebuilds (and leaks) its nvJPEG decoder whenever the device it is given
        # differs from the last one: "cuda" and "cuda:0" must be the same device here
        device = torch.device("cuda", torch.cuda.current_device())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in favour of torchcodec
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_jpegs(
    encoded: Sequence[torch.Tensor],
    device: torch.device,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[torch.Tensor | None]:
    """Decode JPEGs at once on ``device``; in halves if the batch call fails.

    One stream the decoder refuses fails a whole batched call: the batch is split in two
    and each half tried again, down to single images, so one bad file among ``n`` costs
    about ``2 log2 n`` calls instead of ``n``.

    Args:
        encoded: 1-D uint8 CPU tensors of encoded JPEGs.
        device: where to decode (``cuda`` uses nvJPEG; ``cpu`` works too).
        sizes: the expected ``(height, width)`` of each, from the header; an output of
            another shape counts as refused.

    Returns:
        A ``(3, H, W)`` uint8 tensor per input, or None where the decoder refused it.
    """
    if not encoded:
        return []
    out = _decode_halving(list(encoded), device)
    if sizes is not None:
        out = [
            o if o is not None and o.shape[0] == 3 and tuple(o.shape[1:]) == tuple(s) else None
            for o, s in zip(out, sizes)
        ]
    return out


# A CUDA error that poisons the context: no later call can succeed, so it is no bad stream to
# look for by halving (torch 2.8+ raises it apart from other RuntimeErrors)
_CONTEXT_LOST: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None),) if t is not None
)


#: How cuBLAS and cuDNN say they found no memory for a workspace or handle (a RuntimeError,
#: not torch's OutOfMemoryError): smaller work may still fit, as after an allocator failure.
_ALLOC_FAILED = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the GPU ran out of memory (torch's allocator, cuBLAS, cuDNN)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _ALLOC_FAILED)


def _decode_halving(encoded: list[torch.Tensor], device: torch.device) -> list[Any]:
    _settle(device)
    try:
        return list(_decode(encoded, device))
    except _CONTEXT_LOST:
        raise
    except Exception as exc:  # one bad stream fails the whole call: find it by halving
        if out_of_memory(exc):  # smaller calls may fit: say so
            _logger.warning(
                "decoding %d JPEGs at once on %s ran out of memory; trying halves",
                len(encoded), device,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if len(encoded) == 1:
            return [None]
        mid = len(encoded) // 2
        return _decode_halving(encoded[:mid], device) + _decode_halving(encoded[mid:], device)


def _interpolation(preprocess: Preprocess) -> str:
    if not device_transform_supported(preprocess):
        raise ValueError(
            f"device preprocessing supports bilinear and bicubic interpolation, "
            f"not {preprocess.interpolation!r}"
        )
    return preprocess.interpolation


def _to_device(values: Sequence[Any], dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A small tensor of Python numbers on ``device``, without waiting on it: a copy from
    pageable host memory synchronises the stream (every kernel queued so far), one from pinned
    memory is queued like a kernel, so a batch's many index and size tensors cost no waits."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """torchvision's ``Resize(side)`` rule: the shorter side becomes ``side``, the other is
    scaled and truncated."""
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def _resample_kernel(x: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's (and torch's antialiased) resampling filters: triangle, or cubic with a = -0.5."""
    ax = x.abs()
    if mode == "bilinear":
        return (1.0 - ax).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
    far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a
    return torch.where(ax < 1.0, near, torch.where(ax < 2.0, far, torch.zeros_like(ax)))


def _axis_weights(
    lengths: Sequence[int], resized: Sequence[int], size: int, span: int, mode: str, device: Any
) -> torch.Tensor:
    """Resize-then-centre-crop along one axis as a matrix per image: ``(n, size, span)``.

    Row ``i`` of image ``b`` holds the weights of input pixels ``0..span-1`` (zero past the
    image's ``lengths[b]``) for output pixel ``i`` of the crop: position ``i + offset`` of the
    axis resized to ``resized[b]`` with an antialiased filter (PIL's: its support widens by
    the downscaling factor; weights normalised over the pixels inside the image). Rows outside
    a resized axis shorter than the crop are zero: torchvision pads those with zeros.
    """
    length, new = _to_device([lengths, resized], torch.float32, device)[:, :, None]
    i = torch.arange(size, dtype=torch.float32, device=device)[None, :]
    # torchvision's centre crop: round((new - size) / 2) in (half to even, like torch.round),
    # or a pad of (size - new) // 2 before the image when it is shorter than the crop
    offset = torch.where(
        new >= size, torch.round((new - size) / 2), -torch.div(size - new, 2, rounding_mode="floor")
    )
    at = i + offset  # (n, size): the output pixel's position along the resized axis
    scale = length / new
    stretch = scale.clamp(min=1.0)[..., None]
    centre = ((at + 0.5) * scale)[..., None]
    j = torch.arange(span, dtype=torch.float32, device=device)[None, None, :]
    w = _resample_kernel((j + 0.5 - centre) / stretch, mode)
    w = w * (j < length[..., None])
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return w * ((at >= 0) & (at < new))[..., None]


def _padding_groups(sizes: Sequence[tuple[int, int]], waste: float = 1.5) -> list[list[int]]:
    """Indices grouped by size so that zero-padding each group to its largest height and width
    costs at most ``waste`` times its pixels."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    current: list[int] = []
    pixels = top_h = top_w = 0
    for i in order:
        h, w = sizes[i]
        th, tw = max(top_h, h), max(top_w, w)
        if current and (len(current) + 1) * th * tw > waste * (pixels + h * w):
            groups.append(current)
            current, pixels, th, tw = [], 0, h, w
        current.append(i)
        pixels += h * w
        top_h, top_w = th, tw
    if current:
        groups.append(current)
    return groups


def transform_on_device(images: Sequence[torch.Tensor], preprocess: Preprocess) -> torch.Tensor:
    """timm's eval transform on decoded uint8 tensors, where they are.

    Resize the shorter side to ``preprocess.resize_side`` (antialiased; horizontal then
    vertical pass, each rounded to 8-bit levels as PIL does), centre-crop ``input_size`` (zero
    padding if the image is smaller), scale to [0, 1] and normalise with the mean and std.

    Both passes are matrix products: the resize and the crop along an axis are one
    ``(size, length)`` weight matrix per image (:func:`_axis_weights`), so images of any mix
    of sizes go through a few batched kernels (zero-padded in groups of similar sizes) instead
    of several kernels per image. That suits a GPU; on a CPU the dense products cost more than
    torch's sparse antialiased interpolation (about 3x on 2 cores), and ``decode="auto"``
    keeps the CPU on the PIL path anyway.

    Args:
        images: ``(3, H, W)`` uint8 tensors, all on one device.
        preprocess: the backbone's preprocessing (bilinear or bicubic interpolation).

    Returns:
        ``(n, 3, S, S)`` float32 tensor on the images' device.

    Raises:
        ValueError: another interpolation (see :func:`device_transform_supported`).
    """
    mode = _interpolation(preprocess)
    size, side = preprocess.input_size, preprocess.resize_side
    if not images:
        return torch.empty(0, 3, size, size)
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=device)
    shapes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    for idx in _padding_groups(shapes):
        hs, ws = [shapes[i][0] for i in idx], [shapes[i][1] for i in idx]
        top_h, top_w = max(hs), max(ws)
        x = torch.zeros(len(idx), 3, top_h, top_w, dtype=torch.float32, device=device)
        for row, i in enumerate(idx):
            x[row, :, : hs[row], : ws[row]] = images[i]
        new = [_resized_size(h, w, side) for h, w in zip(hs, ws)]
        across = _axis_weights(ws, [w for _, w in new], size, top_w, mode, device)
        down = _axis_weights(hs, [h for h, _ in new], size, top_h, mode, device)
        # PIL resizes in two passes, horizontal then vertical, rounding to 8 bits in between;
        # doing the same keeps the pixels within a level of the PIL path's (one pass in float
        # would leave a fifth of them one level apart). An axis left at its length is an
        # identity matrix, so an image resized along one axis only is rounded there too.
        with torch.autocast(device.type, enabled=False):  # float32 products, whatever the caller
            rows = x.view(len(idx), 3 * top_h, top_w)  # the channels' rows, one batch each
            x = torch.bmm(rows, across.transpose(1, 2)).view(len(idx), 3, top_h, size)
            x = x.clamp_(0.0, 255.0).add_(0.5).floor_()
            x = torch.matmul(down[:, None], x)  # (n, 3, S, S)
        out.index_copy_(0, _to_device(idx, torch.int64, device), x)
    out.clamp_(0.0, 255.0).add_(0.5).floor_()  # 8-bit levels, then ToTensor and Normalize
    return preprocess.normalize(out, inplace=True)


def _chunks(sizes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group holds at most ``budget`` pixels."""
    groups: list[list[int]] = []
    current: list[int] = []
    pixels = 0
    for j, (h, w) in enumerate(sizes):
        if current and pixels + h * w > budget:
            groups.append(current)
            current, pixels = [], 0
        current.append(j)
        pixels += h * w
    if current:
        groups.append(current)
    return groups


def decode_on_device(
    batch: PreparedBatch,
    preprocess: Preprocess,
    device: torch.device | str,
    transform: Transform,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
    draft: bool = True,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
) -> DecodedBatch:
    """The device step: decode, transform and order a :class:`PreparedBatch`.

    Encoded JPEGs are decoded with :func:`decode_jpegs` in groups of at most ``pixel_budget``
    pixels and transformed with :func:`transform_on_device`. A JPEG the device decoder
    refuses is decoded on the CPU by the PIL path and ``transform``; if that fails too it is
    a failure with the PIL path's reason. Those crops and the worker-decoded ones are copied
    to the device as uint8 and normalised there.

    On CUDA, call this on a stream that has nothing else queued that matters for timing (a
    side stream): the decoder waits for the current stream to drain before each call.

    Args:
        batch: from :func:`collate_prepared`.
        preprocess: the backbone's preprocessing.
        device: where to decode and transform (the model's device).
        transform: the backbone's pixel transform (uint8 crops), for the CPU fallback.
        max_pixels: decompression-bomb guard of the CPU fallback.
        min_side: the backbone's resize side, for the CPU fallback (the size guard; with
            ``draft``, reduced-scale JPEG decoding).
        draft: reduced-scale JPEG decoding in the CPU fallback (False: decoded whole, as the
            device decodes: the same pixels whichever decoder took the file).
        pixel_budget: most decoded pixels held at once.

    Returns:
        The inputs and keys of every item that decoded, in batch order, and the failures.
    """
    if batch.images_at and batch.images.dtype != torch.uint8:
        raise TypeError(
            f"worker-decoded crops must be uint8 (Backbone.pixel_transform), not "
            f"{batch.images.dtype}"
        )
    device = torch.device(device)
    size = preprocess.input_size
    parts: list[tuple[list[int], torch.Tensor]] = []  # (batch positions, tensor)
    failures = list(batch.failures)
    pixels: list[tuple[int, torch.Tensor]] = []  # (batch position, uint8 crop) decoded by PIL
    for group in _chunks(batch.sizes, pixel_budget):
        decoded = decode_jpegs(
            [batch.encoded_item(j) for j in group], device, [batch.sizes[j] for j in group]
        )
        done = [(j, d) for j, d in zip(group, decoded) if d is not None]
        refused = [j for j, d in zip(group, decoded) if d is None]
        if done:
            x = transform_on_device([d for _, d in done], preprocess)
            parts.append(([batch.encoded_at[j] for j, _ in done], x))
        del decoded, done  # the full-size images: only the crops are kept
        for j in refused:
            pos = batch.encoded_at[j]
            data = batch.encoded_item(j).numpy().tobytes()
            got = _pil_prepare(
                batch.keys[pos],
                batch.paths[pos],
                data,
                transform,
                max_pixels,
                min_side,
                allow_encoded=False,
                draft=draft,
            )
            if got.image is not None:
                pixels.append((pos, got.image))
            else:
                failures.append((pos, got.reason, got.detail))
    if pixels or batch.images_at:
        crops = [batch.images] if batch.images_at else []
        crops += [t[None] for _, t in pixels]
        # the workers' crops alone stay the pinned tensor they came in: an asynchronous copy
        x = (crops[0] if len(crops) == 1 else torch.cat(crops)).to(device, non_blocking=True)
        parts.append(([*batch.images_at, *(p for p, _ in pixels)], preprocess.normalize(x)))
    ok = sorted(p for positions, _ in parts for p in positions)
    rank = {p: r for r, p in enumerate(ok)}
    images = torch.empty(len(ok), 3, size, size, dtype=torch.float32, device=device)
    for positions, x in parts:
        images.index_copy_(0, _to_device([rank[p] for p in positions], torch.int64, device), x)
    failures.sort(key=lambda f: f[0])
    return DecodedBatch(
        keys=torch.tensor([batch.keys[p] for p in ok], dtype=torch.int64),
        images=images,
        failures=[(batch.keys[p], batch.paths[p], r, d) for p, r, d in failures],
    )


@functools.lru_cache(maxsize=8)
def device_decoder_error(device: torch.device | str) -> str | None:
    """None when ``decode_jpeg`` works on ``device``, else why not (checked once per device)."""
    device = torch.device(device)
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 40, 10)).save(buf, "JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        _settle(device)
        (out,) = _decode([data], device)
    except Exception as exc:  # missing nvJPEG, missing image extension, driver problems
        return f"{type(exc).__name__}: {exc}"
    if tuple(out.shape) != (3, 8, 16):
        return f"decode_jpeg returned shape {tuple(out.shape)} for a 16x8 test image"
    return None


# -- the GPU's hardware JPEG decoder ---------------------------------------------------------

_NVJPEG_BACKEND_HARDWARE = 3  # nvjpegBackend_t
_NVJPEG_STATUS_SUCCESS, _NVJPEG_STATUS_ARCH_MISMATCH = 0, 7  # nvjpegStatus_t


@dataclass(frozen=True)
class JpegHardware:
    """Whether a device has a hardware JPEG decoder (:func:`jpeg_hardware`).

    Attributes:
        available: True where nvJPEG's hardware backend runs on the device (A100, H100: NVJPG
            engines), False where it does not (any other CUDA GPU, and every non-CUDA device),
            None where it could not be told (no nvJPEG library found, an unexpected status).
        engines: the hardware decoder's engines, 0 where unknown or none.
        cores_per_engine: the cores of each engine, 0 where unknown or none.
        detail: why ``available`` is False or None, else "".
    """

    available: bool | None
    engines: int = 0
    cores_per_engine: int = 0
    detail: str = ""

    def describe(self) -> str:
        """One line for reports: ``7 engines x 1 core``, ``none (...)``, ``unknown (...)``."""
        if self.available:
            e, c = self.engines, self.cores_per_engine
            return f"{e} engine{'s' * (e != 1)} x {c} core{'s' * (c != 1)}"
        return f"{'none' if self.available is False else 'unknown'} ({self.detail})"


def _nvjpeg_library() -> ctypes.CDLL | None:
    """The nvJPEG library torchvision's image extension uses (already loaded), else the system's."""
    import torchvision.io.image  # noqa: F401  (loads the image extension and its libnvjpeg)

    # no /proc (not Linux): the system's library below
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libnvjpeg"):
                return ctypes.CDLL(path)
    found = ctypes.util.find_library("nvjpeg")
    return ctypes.CDLL(found) if found else None


@functools.lru_cache(maxsize=8)
def jpeg_hardware(device: torch.device | str) -> JpegHardware:
    """Whether ``device`` has a hardware JPEG decoder nvJPEG can use (checked once per device).

    Asks nvJPEG as torchvision does before it decodes: a handle on the hardware backend is
    created on the device (``nvjpegCreateEx``), refused with ``ARCH_MISMATCH`` where there is
    no such decoder; its engines are counted (``nvjpegGetHardwareDecoderInfo``) and it is
    destroyed again. Without one, torchvision decodes each JPEG of a call one after another,
    its Huffman stage on the host in the calling thread, which is why ``decode="auto"`` leaves
    JPEGs to the DataLoader workers there (:func:`pinsearch.embed.resolve_decode`).

    The question is asked in a child process (a few seconds, once per device and process):
    whatever goes wrong in the driver or the library stays there, as ``available=None``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return JpegHardware(False, detail=f"not a CUDA device ({device.type})")
    if not torch.cuda.is_available():
        return JpegHardware(None, detail="CUDA is not available")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_in_child(index)


def _probe_in_child(index: int, timeout: float = 120.0) -> JpegHardware:
    """:func:`_probe_jpeg_hardware` run by a fresh Python process, its answer as JSON."""
    import json
    import subprocess
    import sys

    code = (
        "import dataclasses, json, sys; from pinsearch.decode import _probe_jpeg_hardware; "
        "print(json.dumps(dataclasses.asdict(_probe_jpeg_hardware(int(sys.argv[1])))))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(index)],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:  # a hang, no interpreter
        return JpegHardware(None, detail=f"probe failed ({type(exc).__name__}: {exc})")
    try:
        return JpegHardware(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):  # a crash: no answer, or not one
        why = f"the probe ended with status {done.returncode}: {done.stderr.strip()[-200:]}"
        return JpegHardware(None, detail=f"probe failed ({why})")


def _probe_jpeg_hardware(index: int) -> JpegHardware:
    """The nvJPEG question of :func:`jpeg_hardware`, asked in this process on GPU ``index``."""
    if not torch.cuda.is_available():
        return JpegHardware(None, detail="CUDA is not available")
    try:
        lib = _nvjpeg_library()
    except (ImportError, OSError) as exc:
        return JpegHardware(None, detail=f"nvJPEG not loadable: {exc}")
    if lib is None:
        return JpegHardware(None, detail="no nvJPEG library found")
    handle = ctypes.c_void_p()
    lib.nvjpegCreateEx.restype = ctypes.c_int
    lib.nvjpegCreateEx.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    with torch.cuda.device(index):
        torch.cuda.init()
        status = lib.nvjpegCreateEx(_NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
    if status == _NVJPEG_STATUS_ARCH_MISMATCH:
        return JpegHardware(False, detail=f"{torch.cuda.get_device_name(index)} has none")
    if status != _NVJPEG_STATUS_SUCCESS:
        return JpegHardware(None, detail=f"nvjpegCreateEx(hardware) returned status {status}")
    engines, cores = ctypes.c_uint(0), ctypes.c_uint(0)
    try:
        info = getattr(lib, "nvjpegGetHardwareDecoderInfo", None)  # nvJPEG 11.4 and later
        if info is not None:
            info.restype = ctypes.c_int
            info.argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_uint),
            ]
            info(handle, ctypes.byref(engines), ctypes.byref(cores))
    finally:
        lib.nvjpegDestroy.restype = ctypes.c_int
        lib.nvjpegDestroy.argtypes = [ctypes.c_void_p]
        lib.nvjpegDestroy(handle)
    return JpegHardware(True, engines=engines.value, cores_per_engine=cores.value)
