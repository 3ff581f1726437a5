"""Embedding: pin images -> backbone vectors, batched, resumable, written into a store.

The stages are separate callables: :class:`PinImages` decodes and transforms (in DataLoader
workers), :func:`iter_embeddings` runs the model and yields float batches, and
:func:`embed_store` writes parts into the store and records failures. On CUDA the forward pass
runs under bf16 autocast with channels_last inputs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pinsearch._version import __version__
from pinsearch.backbones import Backbone, create_backbone
from pinsearch.errors import BackboneMismatchError
from pinsearch.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from pinsearch.ingest import SkippedPin

__all__ = [
    "EmbedConfig",
    "EmbedReport",
    "EmbeddedBatch",
    "PinImages",
    "embed_images",
    "embed_store",
    "iter_embeddings",
    "resolve_device",
    "resolve_workers",
]

_logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (pins done, pins to do)


@dataclass(frozen=True)
class EmbedConfig:
    """How vectors are computed and stored."""

    batch_size: int = 64
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
    """``auto`` -> cuda if available else cpu; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_workers(config: EmbedConfig) -> int:
    """DataLoader workers: as configured, else one per CPU but one (at most 8)."""
    if config.workers is not None:
        return config.workers
    return min(8, max(1, (os.cpu_count() or 1) - 1))


class PinImages(Dataset):  # type: ignore[type-arg]
    """Decodes pin images and applies the backbone transform; bad images become failures."""

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str, str]:
        key, path = self.items[i]
        try:
            img = load_rgb(path, self.max_pixels, min_side=self.min_side)
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
    images = torch.stack([b[1] for b in good]) if good else torch.empty(0)  # type: ignore[misc]
    return keys, images, bad


def iter_embeddings(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    config: EmbedConfig | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed ``(key, image path)`` items batch by batch, in order.

    Yields:
        One :class:`EmbeddedBatch` per DataLoader batch (vectors as float32 numpy).
    """
    config = config or EmbedConfig()
    device = next(backbone.model.parameters(), torch.empty(0)).device
    workers = resolve_workers(config)
    loader = DataLoader(
        PinImages(items, backbone.transform(), config.max_pixels, backbone.preprocess.resize_side),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    cuda = device.type == "cuda"
    model = backbone.model
    if config.channels_last:  # faster depthwise convolutions on both CPU (oneDNN) and GPU
        model = model.to(memory_format=torch.channels_last)
    if not cuda:
        torch.set_flush_denormal(True)  # pretrained weights produce denormals: 2x slower on CPU
    for keys, images, bad in loader:
        failures = [SkippedPin(p, r, d, None, "embed") for _, p, r, d in bad]
        failed_keys = [k for k, _, _, _ in bad]
        if len(keys) == 0:
            yield EmbeddedBatch(np.empty(0, np.int64), np.empty((0, backbone.dim), np.float32),
                                failures, failed_keys)  # fmt: skip
            continue
        x = images.to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=device.type, dtype=torch.bfloat16, enabled=cuda and config.amp
            ),
        ):
            out = model(x)
        vecs = out.float()
        if config.normalize:
            vecs = torch.nn.functional.normalize(vecs, dim=1)
        yield EmbeddedBatch(keys.numpy(), vecs.cpu().numpy(), failures, failed_keys)


def embed_images(
    backbone: Backbone, images: Sequence[Any], *, normalize: bool = False
) -> np.ndarray:
    """Embed in-memory PIL images or image paths with a backbone (for queries)."""
    from PIL import Image

    transform = backbone.transform()
    side = backbone.preprocess.resize_side  # the same reduced-scale JPEG decoding as the pins
    tensors = []
    for img in images:
        pil = img if isinstance(img, Image.Image) else load_rgb(img, min_side=side)
        tensors.append(transform(pil.convert("RGB")))
    device = next(backbone.model.parameters(), torch.empty(0)).device
    with torch.inference_mode():
        out = backbone.model(torch.stack(tensors).to(device)).float()
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out.cpu().numpy()


def _run_record(backbone: Backbone) -> dict[str, Any]:
    return {"spec": backbone.describe(), "preprocess": asdict(backbone.preprocess)}


def check_compatible(existing: dict[str, Any], backbone: Backbone, config: EmbedConfig) -> None:
    """Refuse to mix vectors of another model, preprocessing or normalisation into a run.

    Raises:
        BackboneMismatchError: naming what differs.
    """
    want = _run_record(backbone)
    have = {"spec": existing["spec"], "preprocess": existing["preprocess"]}
    problems = []
    if have["spec"].get("weights") != want["spec"]["weights"]:
        problems.append(f"weights {have['spec'].get('weights')} vs {want['spec']['weights']}")
    if have["spec"].get("dim") != want["spec"]["dim"]:
        problems.append(f"dim {have['spec'].get('dim')} vs {want['spec']['dim']}")
    if json.dumps(have["preprocess"], sort_keys=True) != json.dumps(
        json.loads(json.dumps(want["preprocess"])), sort_keys=True
    ):
        problems.append(f"preprocessing {have['preprocess']} vs {want['preprocess']}")
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
) -> EmbedReport:
    """Embed every pin of ``store`` that has no vector for ``backbone_name`` yet.

    Resumable: committed parts are never recomputed. Pins whose image fails to decode are
    recorded in ``skipped`` (stage ``embed``) and, when no other backbone has a vector for
    them, removed from ``pins``.
    """
    config = config or EmbedConfig()
    catalog = store.catalog
    device = resolve_device(config.device)
    model = backbone or create_backbone(backbone_name, weights=config.weights, device=device)
    existing = catalog.get_embedding(backbone_name)
    if existing is not None:
        check_compatible(existing, model, config)
    else:
        record = _run_record(model)
        catalog.upsert_embedding(
            backbone_name,
            spec=record["spec"],
            preprocess=record["preprocess"],
            dim=model.dim,
            dtype=config.dtype,
            normalize=config.normalize,
            device=str(device),
            pinsearch_version=__version__,
        )
    vs = store.vectors(backbone_name)
    done = vs.keys()
    done_set = set(done.tolist())
    todo = [(k, p) for k, p in catalog.pin_paths() if k not in done_set]
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

    try:
        for batch in iter_embeddings(model, todo, config):
            if batch.failures:
                _record_failures(store, backbone_name, batch)
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
    finally:
        seconds = time.perf_counter() - start
        prev = catalog.get_embedding(backbone_name) or {}
        total_seconds = float(prev.get("seconds") or 0.0) + seconds
        catalog.upsert_embedding(
            backbone_name,
            seconds=total_seconds,
            images_per_s=(embedded / seconds) if seconds > 0 and embedded else None,
            device=str(device),
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


def _record_failures(store: Any, backbone_name: str, batch: EmbeddedBatch) -> None:
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
    others = [b for b in store.backbones() if b != backbone_name]
    keep: set[int] = set()
    for other in others:
        keep |= set(store.vectors(other).keys().tolist()) & set(batch.failed_keys)
    with catalog.transaction():
        catalog.add_skipped(failures, backbone=backbone_name)
        catalog.drop_pins([k for k in batch.failed_keys if k not in keep])
    for f in failures:
        _logger.warning("skipped %s: %s (%s)", f.path, f.reason, f.detail)
