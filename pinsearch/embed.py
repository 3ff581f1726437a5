"""Embedding: pin images -> backbone vectors, batched, resumable, written into a store.

The stages are separate callables: :class:`PinImages` decodes, resizes and crops images to
8-bit pixels (in DataLoader workers; they are normalised on the model's device),
:func:`iter_embeddings` runs the model and yields float batches, and :func:`embed_store`
writes parts into the store and records failures. On CUDA the forward pass runs under bf16
autocast with channels_last inputs, JPEGs are decoded on the GPU (:mod:`pinsearch.decode`)
and each batch is handed over one step late, so the GPU computes the next batch while Python
stores the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pinsearch._version import __version__
from pinsearch.backbones import Backbone, Preprocess, create_backbone, recorded_network
from pinsearch.decode import (
    DEFAULT_PIXEL_BUDGET,
    EncodedPinImages,
    PinFiles,
    PreparedImage,
    collate_prepared,
    decode_on_device,
    device_decoder_error,
    device_refusal,
    device_transform_supported,
    jpeg_hardware,
    out_of_memory,
    prepare_image,
    takes_progressive,
)
from pinsearch.errors import BackboneMismatchError, DeviceError
from pinsearch.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb, load_rgb, open_image
from pinsearch.ingest import SkippedPin
from pinsearch.vectors import VECTOR_DTYPES, in_sorted

__all__ = [
    "DECODE_MODES",
    "EmbedConfig",
    "EmbedReport",
    "EmbeddedBatch",
    "PinImages",
    "batch_size_for_memory",
    "embed_images",
    "embed_like_run",
    "embed_store",
    "failed_to_embed",
    "iter_embeddings",
    "like_run",
    "loader_plan",
    "pin_loader",
    "resolve_batch_size",
    "resolve_decode",
    "resolve_device",
    "resolve_workers",
    "run_amp",
    "run_decode",
    "run_differences",
    "shared_memory_free",
]

_logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (pins done, pins to do)
Failure = tuple[int, str, str, str]  # (key, path, reason, detail)

#: Values of :attr:`EmbedConfig.decode`.
DECODE_MODES = ("auto", "device", "pil")
_CPU_AUTO_BATCH = 64
#: Device memory per decoded pixel while a batch is decoded and transformed on the device:
#: the uint8 image (3 B), its zero-padded float copy (12 B, up to 1.5x for padding) and the
#: first resize pass (about 5 B for pins ~560 px wide).
DECODE_BYTES_PER_PIXEL = 32.0


@dataclass(frozen=True)
class EmbedConfig:
    """How vectors are computed and stored.

    ``decode``, ``cpu_share``, ``compile``, ``batch_size`` and ``workers`` change speed, not
    the vectors' identity: a store's run record ignores them (see :func:`check_compatible`).
    Vectors from GPU decoding are close to, not identical with, the PIL path's (nvJPEG
    upsamples 4:2:0 chroma by nearest neighbour where libjpeg interpolates; on the CPU the two
    agree to a cosine of 0.9999 on small images).
    """

    batch_size: int = 64  # images per model batch; 0 = auto (by free GPU memory; 64 on CPU)
    workers: int | None = None  # DataLoader workers; None = min(8, CPUs - 1)
    device: str = "auto"  # auto = cuda when available
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last inputs and weights
    normalize: bool = False  # L2-normalise vectors before storing them (recorded in the run)
    dtype: str = "float32"  # stored dtype: float32 or float16
    part_size: int = 4096  # vectors per stored part
    flush_seconds: float = 30.0  # also commit a part after this long, to lose little on a crash
    weights: str | None = None  # local checkpoint overriding the backbone's default weights
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode: str = "auto"  # auto | device | pil, see resolve_decode
    # PIL path: reduced-scale decoding of JPEGs at least twice the resize side (faster); False
    # decodes them whole, as the device path does. A store's run keeps one way (embed_store).
    draft: bool = True
    # device path: share of the JPEGs the device could decode that the workers decode with
    # PIL anyway, so that CPU cores and the GPU's decoder work side by side (0: the device
    # decodes all it can; ignored on the PIL path)
    cpu_share: float = 0.0
    compile: bool = False  # torch.compile the model once per iter_embeddings call

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(
                f"EmbedConfig.decode must be one of {', '.join(DECODE_MODES)}, not {self.decode!r}"
            )
        if not 0.0 <= self.cpu_share <= 1.0:
            raise ValueError(f"EmbedConfig.cpu_share must be within 0 and 1, not {self.cpu_share}")
        if self.batch_size < 0:
            raise ValueError(
                f"EmbedConfig.batch_size must be positive, or 0 for auto; got {self.batch_size}"
            )
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(
                f"EmbedConfig.dtype must be one of {', '.join(VECTOR_DTYPES)}, not {self.dtype!r}"
            )
        whole = {"workers": (self.workers, 0), "part_size": (self.part_size, 1),
                 "max_pixels": (self.max_pixels, 1)}  # fmt: skip
        for name, (value, least) in whole.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ValueError(
                    f"EmbedConfig.{name} must be a whole number >= {least}, not {value!r}"
                )
        if not self.flush_seconds >= 0:  # (0: a part after every batch)
            raise ValueError(
                f"EmbedConfig.flush_seconds must be 0 or more, not {self.flush_seconds}"
            )
        resolve_device(self.device)  # a device this machine has, said before any work


@dataclass
class EmbeddedBatch:
    """One model batch: the vectors of the pins that decoded, and the pins that did not."""

    keys: np.ndarray
    vectors: np.ndarray
    failures: list[SkippedPin] = field(default_factory=list)
    failed_keys: list[int] = field(default_factory=list)


@dataclass
class EmbedReport:
    """What :func:`embed_store` did."""

    backbone: str
    embedded: int
    failed: int
    already: int
    seconds: float
    images_per_s: float
    dim: int
    device: str
    weights: str


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device.

    Raises:
        ValueError: not a device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU here; use cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s)")
    return dev


def resolve_workers(config: EmbedConfig) -> int:
    """DataLoader workers: as configured, else one per CPU but one (at most 8)."""
    if config.workers is not None:
        return config.workers
    return min(8, max(1, (os.cpu_count() or 1) - 1))


#: Share of the free shared memory (``/dev/shm``) the batches DataLoader workers hand over may
#: take at once: each worker keeps up to ``prefetch_factor`` batches ready there, and a worker
#: that finds no room dies with a bus error (a container's default /dev/shm is 64 MiB).
SHM_SHARE = 0.5
_PREFETCH = 4  # batches each worker keeps ready, when they fit
_SIZE_SAMPLE = 64  # files whose sizes estimate an encoded batch


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the file system DataLoader workers pass tensors through (None where
    there is none to ask)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # no such file system here (not Linux)
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def loader_plan(
    config: EmbedConfig,
    items: Sequence[tuple[int, str]],
    batch_size: int,
    preprocess: Preprocess,
    mode: str,
    shm_free: int | None = None,
    *,
    device: torch.device | str = "cpu",
) -> tuple[int, int | None]:
    """``(workers, prefetch_factor)`` for the DataLoader: :func:`resolve_workers` workers with 4
    batches each ready, fewer where their batches would not fit in ``SHM_SHARE`` of the free
    shared memory (``shm_free``, default :func:`shared_memory_free`): fewer batches each, then
    fewer workers, at worst none (the main process reads the files; nothing is shared).

    A worker batch is the model inputs as uint8 crops on the PIL path; on the device path the
    encoded files, and the crops of those the workers decode (PNGs, CMYK or rotated
    JPEGs, which the device decoder does not take, progressive ones on a CUDA ``device``
    (:func:`~pinsearch.decode.takes_progressive`), and ``config.cpu_share`` of the others), as
    the first files say.
    """
    workers = resolve_workers(config)
    if workers == 0:
        return 0, None
    free = shared_memory_free() if shm_free is None else shm_free
    if free is None:
        return workers, _PREFETCH
    if mode == "device":
        progressive = takes_progressive(device)
        sizes = [
            _shared_bytes(p, preprocess, config.max_pixels, config.cpu_share, progressive)
            for _, p in items[:_SIZE_SAMPLE]
        ]
        per_image = float(np.mean(sizes)) if sizes else 0.0
    else:
        per_image = 3.0 * preprocess.input_size**2
    per_batch = max(1.0, per_image * max(1, min(batch_size, len(items))))
    budget = free * SHM_SHARE
    prefetch = min(_PREFETCH, int(budget // (workers * per_batch)))
    plan: tuple[int, int | None] = (workers, prefetch)
    if prefetch < 1:
        fit = min(workers, int(budget // per_batch))
        plan = (fit, 1) if fit else (0, None)
    if plan != (workers, _PREFETCH):
        _logger.warning(
            "%.0f MiB of shared memory (/dev/shm) free for batches of ~%.0f MiB: DataLoader "
            "workers %d, batches ready per worker %s (asked: %d and %d); a larger /dev/shm "
            "(docker --shm-size) gives the full pipeline",
            free / 2**20, per_batch / 2**20, plan[0], plan[1] or 0, workers, _PREFETCH,
        )  # fmt: skip
    return plan


def _shared_bytes(
    path: str,
    preprocess: Preprocess,
    max_pixels: int,
    cpu_share: float = 0.0,
    progressive: bool = True,
) -> float:
    """Bytes one file sends through shared memory on the device path, on average: the file,
    or the uint8 crop a worker decodes it to when the device decoder does not take it (and
    for ``cpu_share`` of the others); nothing for a file that fails: only its reason travels."""
    try:
        data = Path(path).read_bytes()
        with open_image(path, max_pixels, data=data) as img:
            refused = device_refusal(img, data, progressive=progressive) is not None
    except Exception:  # unreadable, not an image, too large: a failure in the worker
        return 0.0
    decoded = 3.0 * preprocess.input_size**2
    return decoded if refused else (1 - cpu_share) * len(data) + cpu_share * decoded


def resolve_decode(config: EmbedConfig, device: torch.device, preprocess: Preprocess) -> str:
    """Where images are decoded: ``"device"`` (:mod:`pinsearch.decode`) or ``"pil"`` (workers).

    ``auto`` picks the device path when the model is on CUDA, its preprocessing can be done
    there (bilinear or bicubic), ``decode_jpeg`` works on it and the GPU has a hardware JPEG
    decoder (:func:`~pinsearch.decode.jpeg_hardware`: A100, H100; where that cannot be told,
    the device path); PIL otherwise. Without the hardware decoder torchvision decodes one
    JPEG after another with its Huffman stage on the host in the embedding's main thread,
    while the workers decode in parallel. ``device`` forces the device path on whatever
    device the model is on (the CPU too); ``pil`` is the worker path.

    Raises:
        ValueError: ``decode="device"`` with an interpolation the device path lacks.
        RuntimeError: ``decode="device"`` where torchvision cannot decode JPEGs.
    """
    if config.decode == "pil":
        return "pil"
    supported = device_transform_supported(preprocess)
    if config.decode == "device":
        if not supported:
            raise ValueError(
                f"decode='device' resizes with bilinear or bicubic interpolation; this backbone "
                f"uses {preprocess.interpolation!r} (use decode='pil')"
            )
        problem = device_decoder_error(device)
        if problem:
            raise DeviceError(
                f"decode='device': torchvision cannot decode JPEGs on {device}: {problem}"
            )
        return "device"
    if device.type != "cuda" or not supported:
        return "pil"
    hardware = jpeg_hardware(device)
    if hardware.available is False:
        _logger.info(
            "decoding JPEGs with PIL in the workers: %s has no hardware JPEG decoder, so "
            "torchvision would decode them one at a time in the main thread (--decode device "
            "forces it)",
            device,
        )
        return "pil"
    problem = device_decoder_error(device)
    if problem:
        _logger.warning("decoding with PIL: JPEG decoding on %s fails (%s)", device, problem)
        return "pil"
    return "device"


def batch_size_for_memory(
    free_bytes: float,
    per_image_bytes: float,
    fixed_bytes: float = 0.0,
    *,
    margin: float = 0.2,
    low: int = 8,
    high: int = 1024,
) -> int:
    """The largest batch that fits in free memory, kept between ``low`` and ``high``.

    Args:
        free_bytes: device memory free now.
        per_image_bytes: memory one more image in the batch costs at peak.
        fixed_bytes: memory a batch costs whatever its size (workspaces, decode buffers).
        margin: fraction of ``free_bytes`` left unused for fragmentation and other users.
        low: the smallest batch returned, even when memory looks short.
        high: the largest batch returned.

    Returns:
        A batch size in ``[low, high]``, rounded down to a multiple of 8 when above 8.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if per_image_bytes <= 0:
        return high
    n = int((free_bytes * (1.0 - margin) - fixed_bytes) // per_image_bytes)
    n = max(low, min(high, n))
    return max(low, n - n % 8) if n > 8 else n


def _forward_zeros(
    model: torch.nn.Module, n: int, input_size: int, device: torch.device, config: EmbedConfig
) -> None:
    """One forward pass of ``n`` zero images on CUDA, as the run does it."""
    x = torch.zeros(n, 3, input_size, input_size, device=device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with (
        torch.inference_mode(),
        torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=config.amp),
    ):
        model(x)
    torch.cuda.synchronize(device)


#: Forward passes at a size lowered for memory before the next doubling is tried (a memory
#: spike from another process must not leave a long run at a tenth of its batch size).
_REGROW_AFTER = 100


def largest_batch_that_runs(size: int, run: Callable[[int], None], low: int = 8) -> int:
    """``size``, halved (in multiples of 8) while ``run(size)`` runs out of CUDA memory
    (:func:`~pinsearch.decode.out_of_memory`), down to ``low``: an estimate from small batches
    can miss what a large one takes (another algorithm, workspace or fragmentation). Raises the
    last out-of-memory error at ``low``."""
    while True:
        try:
            run(size)
            return size
        except RuntimeError as exc:  # torch's OutOfMemoryError is one
            if size <= low or not out_of_memory(exc):
                raise
            smaller = max(low, size // 2 - (size // 2) % 8)
            _logger.warning("batch %d ran out of GPU memory; trying %d", size, smaller)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = smaller


def _probe_memory(
    model: torch.nn.Module, input_size: int, device: torch.device, config: EmbedConfig
) -> tuple[float, float]:
    """Peak bytes of a forward pass as ``(per image, fixed)``, from two small batches."""
    # one untimed pass first: one-off allocations (cuBLAS/cuDNN workspaces) must not inflate
    # the first peak
    _forward_zeros(model, 1, input_size, device, config)
    sizes = (8, 16)
    peaks = []
    for n in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _forward_zeros(model, n, input_size, device, config)
        peaks.append(float(torch.cuda.max_memory_allocated(device) - base))
    torch.cuda.empty_cache()
    input_bytes = 3.0 * input_size * input_size * 4
    per_image = max((peaks[1] - peaks[0]) / (sizes[1] - sizes[0]), input_bytes)
    fixed = max(peaks[0] - per_image * sizes[0], 0.0)
    return per_image, fixed


def resolve_batch_size(
    model: torch.nn.Module,
    preprocess: Preprocess,
    config: EmbedConfig,
    device: torch.device,
    decode: str = "pil",
) -> int:
    """``config.batch_size``, or for 0 (auto) a batch chosen by free memory on CUDA.

    On CUDA the model's peak memory is measured at two small batch sizes under the run's
    autocast and memory format; the inputs staged for the next batch (and, with ``decode``
    ``"device"``, the decode buffers) are added, and :func:`batch_size_for_memory` turns the
    free memory into a batch size, which one forward pass then checks (halved while it runs
    out of memory: :func:`largest_batch_that_runs`). On CPU auto means 64.
    """
    if config.batch_size > 0:
        return config.batch_size
    if device.type != "cuda":
        return _CPU_AUTO_BATCH
    per_image, fixed = _probe_memory(model, preprocess.input_size, device, config)
    input_bytes = 3.0 * preprocess.input_size**2 * 4
    # the next batch's float inputs, crops and stacks; on the PIL path its uint8 copy too
    per_image += (3 if decode == "device" else 1.25) * input_bytes
    if decode == "device":
        fixed += DEFAULT_PIXEL_BUDGET * DECODE_BYTES_PER_PIXEL
    free, _ = torch.cuda.mem_get_info(device)
    size = batch_size_for_memory(free, per_image, fixed)
    size = largest_batch_that_runs(
        size, lambda n: _forward_zeros(model, n, preprocess.input_size, device, config)
    )
    torch.cuda.empty_cache()  # the check's blocks: free for the decoder and FAISS
    _logger.info(
        "auto batch size %d on %s: %.1f GiB free, %.2f MiB per image, %.0f MiB fixed",
        size,
        device,
        free / 2**30,
        per_image / 2**20,
        fixed / 2**20,
    )
    return size


class PinImages(PinFiles):
    """Decodes pin images into the backbone's uint8 crops (its pixel transform); bad images
    become failures."""

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str, str]:
        key, path = self.items[i]
        try:
            img = load_rgb(path, self.max_pixels, min_side=self.min_side, draft=self.draft)
            return key, self.transform(img), path, "", ""
        except ImageError as exc:
            return key, None, path, exc.reason, exc.detail
        except Exception as exc:  # a transform failing on odd input must not stop the run
            return key, None, path, "transform_failed", f"{type(exc).__name__}: {exc}"


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str, str, str]],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str, str, str]]]:
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2], b[3], b[4]) for b in batch if b[1] is None]
    keys = torch.tensor([b[0] for b in good], dtype=torch.int64)
    images = (
        torch.stack([b[1] for b in good])  # type: ignore[misc]
        if good
        else torch.empty(0, dtype=torch.uint8)
    )
    return keys, images, bad


def _embedded(
    keys: torch.Tensor, output: _Output | None, failures: list[Failure], dim: int
) -> EmbeddedBatch:
    return EmbeddedBatch(
        keys.numpy() if len(keys) else np.empty(0, np.int64),
        output.numpy() if output is not None else np.empty((0, dim), np.float32),
        [SkippedPin(p, r, d, None, "embed") for _, p, r, d in failures],
        [k for k, _, _, _ in failures],
    )


def pin_loader(
    items: Sequence[tuple[int, str]],
    transform: Callable[[Any], torch.Tensor],
    config: EmbedConfig,
    batch_size: int,
    preprocess: Preprocess,
    mode: str,
    device: torch.device | str = "cpu",
) -> DataLoader:  # type: ignore[type-arg]
    """The DataLoader of the worker step, in item order: :class:`PinImages` batches on the
    ``"pil"`` path, :class:`~pinsearch.decode.PreparedBatch` on the ``"device"`` path, with
    the workers and prefetch :func:`loader_plan` gives.

    Args:
        items: ``(key, path)`` pairs.
        transform: the backbone's pixel transform (:meth:`Backbone.pixel_transform`).
        config: decoding limits, workers and ``cpu_share``.
        batch_size: items per batch.
        preprocess: the backbone's preprocessing.
        mode: :func:`resolve_decode`'s answer.
        device: the model's device: on CUDA the batches are page-locked (for asynchronous
            copies) and progressive JPEGs are decoded in the workers
            (:func:`~pinsearch.decode.takes_progressive`).
    """
    device = torch.device(device)
    workers, prefetch = loader_plan(config, items, batch_size, preprocess, mode, device=device)
    side = preprocess.resize_side
    dataset: Dataset = (  # type: ignore[type-arg]
        EncodedPinImages(
            items,
            transform,
            config.max_pixels,
            side,
            draft=False,  # decoded whole, as the device decodes: the same pixels either way
            cpu_share=config.cpu_share,
            progressive=takes_progressive(device),
        )
        if mode == "device"
        else PinImages(items, transform, config.max_pixels, side, draft=config.draft)
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_prepared if mode == "device" else _collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=prefetch,
    )


def iter_embeddings(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    config: EmbedConfig | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed ``(key, image path)`` items batch by batch, in order.

    Images are decoded as :func:`resolve_decode` says (PIL in the DataLoader workers, or
    JPEGs on the model's device with :func:`pinsearch.decode.decode_on_device`), the batch size
    is :func:`resolve_batch_size`, and with ``config.compile`` the model is compiled first.
    On CUDA the outputs are copied into pinned memory asynchronously and each batch is yielded
    once the next one is queued on the GPU; batches and keys keep their order either way.

    Yields:
        One :class:`EmbeddedBatch` per DataLoader batch (vectors as float32 numpy).
    """
    config = config or EmbedConfig()
    device = backbone.device
    cuda = device.type == "cuda"
    pre = backbone.preprocess
    mode = resolve_decode(config, device, pre)
    model = backbone.model
    if config.channels_last:  # faster depthwise convolutions on both CPU (oneDNN) and GPU
        model = model.to(memory_format=torch.channels_last)
    if not cuda:
        torch.set_flush_denormal(True)  # pretrained weights produce denormals: 2x slower on CPU
    batch_size = resolve_batch_size(model, pre, config, device, mode)
    if config.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    transform = backbone.pixel_transform()
    loader = pin_loader(items, transform, config, batch_size, pre, mode, device)
    _logger.info("embedding on %s: decode=%s, batch size %d", device, mode, batch_size)
    # nvJPEG needs an idle current stream (see pinsearch.decode): decode on a side stream, so
    # the main stream keeps running the previous batch's forward pass meanwhile.
    main = torch.cuda.current_stream(device) if cuda else None
    side = torch.cuda.Stream(device) if cuda and mode == "device" else None

    def stage(raw: Any) -> tuple[torch.Tensor, torch.Tensor, list[Failure]]:
        if mode == "pil":
            keys, images, bad = raw
            if len(keys) and images.dtype != torch.uint8:
                raise TypeError(f"PinImages crops must be uint8, not {images.dtype}")
            x = images.to(device, non_blocking=True)
            return keys, pre.normalize(x) if len(keys) else x, list(bad)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            out = decode_on_device(
                raw,
                pre,
                device,
                transform,
                max_pixels=config.max_pixels,
                min_side=pre.resize_side,
                draft=False,
            )
        if side is not None:
            main.wait_stream(side)  # type: ignore[union-attr]
            if out.images.numel():
                out.images.record_stream(main)  # type: ignore[arg-type]
        return out.keys, out.images, out.failures

    chunk, calm = batch_size, 0  # images per forward pass; passes since one ran out of memory

    def forward(x: torch.Tensor) -> torch.Tensor:
        """The batch's vectors, in passes of ``chunk`` images. A pass that runs out of GPU
        memory (fragmentation, a decode's buffers, another process) is run again in halves,
        and later batches too until ``_REGROW_AFTER`` passes have gone through, when the size
        is doubled again towards the batch size (a compiled model's fixed shape cannot
        shrink: there it raises)."""
        nonlocal chunk, calm
        done: list[torch.Tensor] = []
        at = 0
        while at < len(x):
            m = min(chunk, len(x) - at)
            try:
                done.append(forward_pass(x[at : at + m]))
            except RuntimeError as exc:  # torch's OutOfMemoryError is one
                if config.compile or m == 1 or not out_of_memory(exc):
                    raise
            else:
                at, calm = at + m, calm + 1
                if chunk < batch_size and calm >= _REGROW_AFTER:
                    chunk, calm = min(batch_size, 2 * chunk), 0
                    _logger.info("forward passes of %d images again", chunk)
                continue
            # out of the except block: the failed pass's tensors are freed with its traceback
            chunk, calm = max(1, m // 2), 0
            _logger.warning("a forward pass of %d images ran out of GPU memory; %d from now on",
                            m, chunk)  # fmt: skip
            if cuda:
                torch.cuda.empty_cache()
        return done[0] if len(done) == 1 else torch.cat(done)

    def forward_pass(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if config.compile and n < batch_size:
            # A compiled model recompiles for every new batch shape (a short last batch, or
            # one with failed images): zero rows keep the shape; images do not mix in eval.
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=cuda and config.amp
        ):
            out = model(x)[:n]
        vecs = out.float()
        if config.normalize:
            vecs = torch.nn.functional.normalize(vecs, dim=1)
        return vecs

    def launch(x: torch.Tensor) -> _Output:
        vecs = forward(x)
        if not cuda:
            return _Output(vecs.numpy())
        host = torch.empty(vecs.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(vecs, non_blocking=True)
        done = torch.cuda.Event()
        done.record(main)
        return _Output(host, done)

    # On CUDA, batch n is queued (decode, forward, copy to pinned memory) before batch n-1 is
    # handed over: the GPU computes while the caller stores and the workers read.
    late = _hand_over_late(device)
    pending: tuple[torch.Tensor, _Output | None, list[Failure]] | None = None
    for raw in loader:
        with torch.inference_mode():
            keys, x, failures = stage(raw)
            result = launch(x) if len(keys) else None
            del x
        if not late:
            yield _embedded(keys, result, failures, backbone.dim)
            continue
        if pending is not None:
            yield _embedded(*pending, backbone.dim)
        pending = (keys, result, failures)
    if pending is not None:
        yield _embedded(*pending, backbone.dim)


def _hand_over_late(device: torch.device) -> bool:
    """Whether batches are yielded one step late (asynchronous devices)."""
    return device.type == "cuda"


@dataclass
class _Output:
    """A batch's vectors on the host, complete once ``done`` (a CUDA event) has fired."""

    host: torch.Tensor | np.ndarray
    done: Any = None

    def numpy(self) -> np.ndarray:
        if self.done is None:
            return np.asarray(self.host)
        self.done.synchronize()
        return self.host.numpy().copy()  # type: ignore[union-attr]  # pinned pages go back


def run_amp(run: dict[str, Any]) -> bool:
    """Whether a store's embedding run used bf16 autocast: on CUDA, unless ``amp`` was off.
    A run continued with another setting reports the latest that embedded pins; runs
    recorded before the ``amp`` column say only their device."""
    if run.get("amp") is not None:
        return bool(run["amp"])
    return str(run.get("device", "")).startswith("cuda")


def run_decode(run: dict[str, Any], backbone: Backbone) -> str:
    """How query image files are decoded to embed as a store's run embedded its pins:
    ``"device"`` where its latest vectors came from the device path (:mod:`pinsearch.decode`)
    and ``backbone``'s device can take it, else ``"pil"``. Runs recorded before the ``decode``
    column took the device path on CUDA wherever the preprocessing allowed it. (The pins of a
    run's ``cpu_share`` were decoded by PIL in the workers: a query cannot tell which they
    were, and their own files come back at the two paths' agreement, not as their vectors.)"""
    decode = run.get("decode")
    if decode is None and str(run.get("device", "")).startswith("cuda"):
        decode = "device"
    if decode != "device" or not device_transform_supported(backbone.preprocess):
        return "pil"
    return "pil" if device_decoder_error(backbone.device) else "device"


def run_drafts(run: dict[str, Any]) -> bool:
    """Whether a store's run decoded large JPEGs at reduced scale (PIL's draft mode; recorded
    as ``decode = "pil"``), not whole (``"device"``: the device decoder, or PIL without
    drafting where a device-path run went on without the device path)."""
    decode = run.get("decode")
    if decode is None:  # recorded before the column: the device path on CUDA
        return not str(run.get("device", "")).startswith("cuda")
    return decode != "device"


def embed_like_run(backbone: Backbone, images: Sequence[Any], run: dict[str, Any]) -> np.ndarray:
    """Embed query images as a store's embedding ``run`` embedded its pins: its normalisation,
    its precision (:func:`run_amp`) and its decoding of image files (:func:`run_decode`,
    :func:`run_drafts`)."""
    return embed_images(
        backbone,
        images,
        normalize=bool(run.get("normalize")),
        amp=run_amp(run),
        decode=run_decode(run, backbone),
        draft=run_drafts(run),
        # runs recorded before the decode column sent progressive JPEGs to the device too
        progressive=run.get("decode") is None or takes_progressive(str(run.get("device") or "cpu")),
    )


def embed_images(
    backbone: Backbone,
    images: Sequence[Any],
    *,
    normalize: bool = False,
    amp: bool = True,
    decode: str = "pil",
    progressive: bool | None = None,
    draft: bool = True,
) -> np.ndarray:
    """Embed in-memory PIL images or image paths with a backbone (for queries).

    Done as :func:`embed_store` does it, so that a stored pin's own image comes back next to
    its stored vector: on CUDA channels_last and bf16 autocast, and files decoded by the path
    the pins took (:func:`embed_like_run` passes a store's settings).

    Args:
        backbone: the model.
        images: PIL images or image file paths, in any mix.
        normalize: L2-normalise the vectors.
        amp: bf16 autocast on CUDA (off for a store embedded in float32).
        decode: ``"pil"``, or ``"device"`` for :mod:`pinsearch.decode` on the backbone's
            device.
        progressive: with ``decode="device"``, whether progressive JPEGs go to the device
            decoder (default: :func:`~pinsearch.decode.takes_progressive` for the backbone's
            device; :func:`embed_like_run` passes what it said for the run's device).

    Raises:
        ImageError: an image file that cannot be used (the reasons of the embedding runs).
    """
    from PIL import Image

    if decode not in ("pil", "device"):
        raise ValueError(f"decode must be 'pil' or 'device', got {decode!r}")
    pre, device = backbone.preprocess, backbone.device
    progressive = takes_progressive(device) if progressive is None else progressive
    transform = backbone.pixel_transform()
    side = pre.resize_side  # as for the pins: the size guard, and the PIL route's drafting
    if not images:
        return np.empty((0, backbone.dim), np.float32)

    def in_memory(img: Image.Image, draft: bool = False) -> Image.Image:  # as a file of it
        # would be: a JPEG still unread drafted where the run drafted (a decoded one is whole)
        return decode_rgb(img, "<image>", min_side=side, draft=draft)

    if decode == "device":  # files as the workers and the device step take them
        prepared = [
            PreparedImage(i, "<image>", image=transform(in_memory(img)))
            if isinstance(img, Image.Image)
            else prepare_image(
                i, str(img), transform, min_side=side, progressive=progressive, draft=False
            )
            for i, img in enumerate(images)
        ]
        out = decode_on_device(
            collate_prepared(prepared), pre, device, transform, min_side=side, draft=False
        )
        if out.failures:
            _, path, reason, detail = out.failures[0]
            raise ImageError(path, reason, detail)
        x = out.images
    else:
        tensors = []
        for img in images:
            pil = (
                in_memory(img, draft)
                if isinstance(img, Image.Image)
                else load_rgb(img, min_side=side, draft=draft)
            )
            tensors.append(transform(pil))
        x = pre.normalize(torch.stack(tensors).to(device))
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda and amp),
    ):
        out_vecs = backbone.model(x).float()
    if normalize:
        out_vecs = torch.nn.functional.normalize(out_vecs, dim=1)
    return out_vecs.cpu().numpy()


def _run_record(backbone: Backbone) -> dict[str, Any]:
    return {"spec": backbone.describe(), "preprocess": asdict(backbone.preprocess)}


def run_differences(run: dict[str, Any], backbone: Backbone) -> list[str]:
    """How ``backbone`` differs from the one a stored run embedded with: weights
    (:meth:`~pinsearch.backbones.Backbone.same_weights`), architecture, dimension,
    preprocessing."""
    want = _run_record(backbone)
    spec, problems = run["spec"], []
    if not backbone.same_weights(spec):
        changed = " (the file changed since)" if spec.get("weights") == backbone.weights else ""
        problems.append(f"weights {spec.get('weights')} vs {backbone.weights}{changed}")
    net, own = recorded_network(spec), recorded_network(backbone.describe())
    if net is not None and net != own:  # (the same weights string, padded otherwise)
        problems.append(f"architecture {net} vs {own}")
    if spec.get("dim") != backbone.dim:
        problems.append(f"dim {spec.get('dim')} vs {backbone.dim}")
    if json.dumps(run["preprocess"], sort_keys=True) != json.dumps(
        json.loads(json.dumps(want["preprocess"])), sort_keys=True
    ):
        problems.append(f"preprocessing {run['preprocess']} vs {want['preprocess']}")
    return problems


def check_compatible(existing: dict[str, Any], backbone: Backbone, config: EmbedConfig) -> None:
    """Refuse to mix vectors of another model, preprocessing or normalisation into a run.

    Raises:
        BackboneMismatchError: naming what differs.
    """
    problems = run_differences(existing, backbone)
    if bool(existing["normalize"]) != config.normalize:
        problems.append(f"normalize {existing['normalize']} vs {config.normalize}")
    if existing["dtype"] != config.dtype:
        problems.append(f"dtype {existing['dtype']} vs {config.dtype}")
    if problems:
        raise BackboneMismatchError(
            f"the store already holds {existing['backbone']!r} vectors made differently: "
            + "; ".join(problems)
            + ". Use the same settings, or another store."
        )


def embed_store(
    store: Any,
    backbone_name: str,
    config: EmbedConfig | None = None,
    *,
    progress: Progress | None = None,
    backbone: Backbone | None = None,
    keys: np.ndarray | None = None,
) -> EmbedReport:
    """Embed every pin of ``store`` (or of ``keys``) that has no vector for ``backbone_name``.

    Resumable: committed parts are never recomputed. Pins whose image fails to decode are
    recorded in ``skipped`` (stage ``embed``) and, when no other backbone has a vector for
    them, removed from ``pins``.
    """
    config = config or EmbedConfig()
    catalog = store.catalog
    existing = catalog.get_embedding(backbone_name)
    model = backbone or create_backbone(
        backbone_name, weights=config.weights, device=resolve_device(config.device), run=existing
    )
    device = model.device  # where the pins are embedded (iter_embeddings), whoever built it
    amp = device.type == "cuda" and config.amp  # recorded: queries embed alike (run_amp)
    if existing is not None and not existing["spec"] and not store.vectors(backbone_name).parts():
        existing = None  # a row an older pinsearch was killed writing, before any vector
    if existing is not None:
        config = like_run(existing, model, config)
    # recorded too (run_decode, run_drafts): "pil" for drafted JPEGs, "device" for whole ones
    decode = resolve_decode(config, device, model.preprocess)
    decode = "device" if decode == "device" or not config.draft else "pil"
    if existing is None and model.new_run_refusal:
        raise BackboneMismatchError(model.new_run_refusal)
    if existing is None:
        record = _run_record(model)
        catalog.upsert_embedding(
            backbone_name,
            spec=record["spec"],
            preprocess=record["preprocess"],
            dim=model.dim,
            dtype=config.dtype,
            normalize=config.normalize,
            device=str(device),
            amp=amp,
            decode=decode,
            pinsearch_version=__version__,
        )
    vs = store.vectors(backbone_name)
    done = vs.keys()
    # the pins without a vector, found as columns (a store of a million pins with nothing to
    # embed reads no path)
    every, _ = catalog.pin_columns()
    missing = every[~in_sorted(np.sort(done), every)]
    if keys is not None:
        missing = missing[in_sorted(np.unique(np.asarray(keys, dtype=np.int64)), missing)]
    if 4 * len(missing) >= len(every) > 0:  # most pins: one scan beats a long key list
        paths = catalog.pin_paths()
        keep = in_sorted(missing, np.fromiter((k for k, _ in paths), np.int64, len(paths)))
        todo = [paths[i] for i in np.flatnonzero(keep)]
    else:
        todo = catalog.pin_paths(missing.tolist()) if len(missing) else []
    total = len(todo)
    if progress:
        progress(0, total)
    buf_keys: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    embedded = failed = 0
    start = last_flush = time.perf_counter()

    def flush() -> None:
        nonlocal buf_keys, buf_vecs, last_flush
        if buf_keys:
            vs.write_part(np.concatenate(buf_vecs), np.concatenate(buf_keys), config.dtype)
        buf_keys, buf_vecs = [], []
        last_flush = time.perf_counter()

    held: np.ndarray | None = None  # pins other backbones hold vectors of (read once, sorted)
    try:
        for batch in iter_embeddings(model, todo, config):
            if batch.failures:
                if held is None:  # this run writes only its own backbone's vectors
                    held = _held_by_others(store, backbone_name)
                _record_failures(store, backbone_name, batch, held)
                failed += len(batch.failures)
            if len(batch.keys):
                buf_keys.append(batch.keys)
                buf_vecs.append(batch.vectors)
                embedded += len(batch.keys)
            buffered = sum(len(k) for k in buf_keys)
            if buffered >= config.part_size or (
                buffered and time.perf_counter() - last_flush > config.flush_seconds
            ):
                flush()
            if progress:
                progress(embedded + failed, total)
        flush()
        _forget_embedded_failures(store, backbone_name)
    finally:
        seconds = time.perf_counter() - start
        prev = catalog.get_embedding(backbone_name) or {}
        if embedded or not prev.get("images_per_s"):  # a run with nothing to embed keeps
            catalog.upsert_embedding(  # the figures of the last one that did
                backbone_name,
                seconds=float(prev.get("seconds") or 0.0) + seconds,
                images_per_s=(embedded / seconds) if seconds > 0 and embedded else None,
                device=str(device),
                **({"amp": amp, "decode": decode} if embedded else {}),
            )
    return EmbedReport(
        backbone=backbone_name,
        embedded=embedded,
        failed=failed,
        already=len(done),
        seconds=seconds,
        images_per_s=embedded / seconds if seconds > 0 else 0.0,
        dim=model.dim,
        device=str(device),
        weights=model.weights,
    )


def like_run(run: dict[str, Any], backbone: Backbone, config: EmbedConfig) -> EmbedConfig:
    """``config`` as it must be to embed more pins of a stored run with ``backbone``: the
    run's decoding (:func:`_decode_like_run`), after checking the model, preprocessing and
    normalisation match it (:func:`check_compatible`)."""
    check_compatible(run, backbone, config)
    return _decode_like_run(config, run, backbone.device, backbone.preprocess)


def _decode_like_run(
    config: EmbedConfig, run: dict[str, Any], device: torch.device, preprocess: Preprocess
) -> EmbedConfig:
    """The decoding that gives a run's new pins the pixels its earlier ones got: large JPEGs
    drafted (a ``"pil"`` run: the PIL path, even on a GPU that could decode them) or whole (a
    ``"device"`` run: the device path, or PIL without drafting where that is not taken).
    PIL's reduced-scale decoding moves a vector by a cosine of up to ~0.01, enough to put a
    pin's own image below others in a query. ``decode="pil"`` follows the run's drafting;
    ``decode="device"`` on a drafted run is obeyed, with a warning."""
    drafted = run_drafts(run)
    if config.decode == "device" or (config.decode == "auto" and not drafted):
        if drafted:
            _logger.warning(
                "the store's %s vectors were made from JPEGs decoded at reduced scale (PIL); "
                "decode=device decodes them whole: the new vectors differ slightly from what "
                "the same images gave before",
                run.get("backbone"),
            )
        return dataclasses.replace(config, draft=False)
    if config.decode == "auto" and resolve_decode(config, device, preprocess) == "device":
        _logger.info(
            "decoding with PIL, as the store's %s vectors were (reduced-scale JPEGs); "
            "--decode device is faster here but its vectors would differ slightly",
            run.get("backbone"),
        )
    return dataclasses.replace(config, decode="pil", draft=drafted)


def failed_to_embed(store: Any, backbone_name: str) -> np.ndarray:
    """Sorted keys of the stored pins whose image a run of this backbone failed to decode
    (skipped rows of stage ``embed``; such a pin stays while another backbone holds it)."""
    rows = store.catalog.connection.execute(
        "SELECT DISTINCT p.pin_key FROM skipped s JOIN pins p ON s.pin_id = p.pin_id "
        "WHERE s.stage = 'embed' AND s.backbone = ? ORDER BY p.pin_key",
        [backbone_name],
    ).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


def _forget_embedded_failures(store: Any, backbone_name: str) -> None:
    """Drop the embed-stage skipped rows of pins this backbone now holds a vector of (a file
    fixed since an earlier run failed on it)."""
    catalog = store.catalog
    keys = failed_to_embed(store, backbone_name)
    if not len(keys):
        return
    done = keys[in_sorted(store.vectors(backbone_name).sorted_keys(), keys)]
    if len(done):
        catalog.connection.execute(
            "DELETE FROM skipped WHERE stage = 'embed' AND backbone = ? AND pin_id IN "
            "(SELECT pin_id FROM pins WHERE pin_key IN (SELECT unnest(?)))",
            [backbone_name, done.tolist()],
        )


def _held_by_others(store: Any, backbone_name: str) -> np.ndarray:
    """Sorted keys of the pins another backbone than ``backbone_name`` holds a vector of."""
    keys = [store.vectors(b).keys() for b in store.backbones() if b != backbone_name]
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def _record_failures(
    store: Any, backbone_name: str, batch: EmbeddedBatch, held: np.ndarray
) -> None:
    """Record a batch's failed pins as skipped; drop from the catalog those no other backbone
    holds a vector of (``held``: those pins' keys, sorted)."""
    catalog = store.catalog
    rows = catalog.query(
        "SELECT pin_key, pin_id FROM pins WHERE pin_key IN (SELECT unnest(?))",
        [[int(k) for k in batch.failed_keys]],
    )
    ids = {int(r["pin_key"]): r["pin_id"] for r in rows}
    failures = [
        SkippedPin(f.path, f.reason, f.detail, ids.get(k), "embed")
        for k, f in zip(batch.failed_keys, batch.failures)
    ]
    failed = np.asarray(batch.failed_keys, dtype=np.int64)
    gone = failed[~in_sorted(held, failed)]
    with catalog.transaction():
        catalog.add_skipped(failures, backbone=backbone_name)
        catalog.drop_pins(gone.tolist())  # (their boards and users too, once left without pins)
    for f in failures:
        _logger.warning("skipped %s: %s (%s)", f.path, f.reason, f.detail)
