"""Benchmarks that print numbers: embedding throughput, index build/search, query latency.

Each compares pinsearch with a baseline measured in the same run: the bare model forward on
random tensors (embedding), exact search (index recall), and raw FAISS on the same index
(query overhead). Results are dataclasses; the CLI prints them or dumps JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch._version import __version__

__all__ = [
    "CatalogBench",
    "EmbedBench",
    "EmbedTable",
    "ExactBench",
    "IndexBench",
    "QueryBench",
    "RemoveBench",
    "StudyBench",
    "StudyReference",
    "Timer",
    "bench_catalog",
    "bench_embed",
    "bench_embed_backbones",
    "bench_exact",
    "bench_index",
    "bench_query",
    "bench_remove",
    "bench_study",
    "bench_study_reference",
    "clustered_vectors",
    "format_result",
    "machine",
    "threads_limited",
]


@dataclass
class Timer:
    """Elapsed seconds of a ``with timed() as t:`` block, in ``t.seconds``."""

    seconds: float = 0.0
    start: float = 0.0  # time.perf_counter() when the block began


@contextmanager
def timed() -> Iterator[Timer]:
    """Context manager measuring wall time."""
    t = Timer(start=time.perf_counter())
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - t.start


# Figures the targets judge against a threshold are rounded the way that cannot flatter them:
# a time ratio up, a speed-up, rate ratio or agreement down (1.2004x of raw FAISS is not 1.2).
# Float noise a billionth of the last place off a round value does not count.


def round_up(x: float, places: int) -> float:
    """``x`` rounded up to ``places`` decimals (NaN and infinities as they are)."""
    if not math.isfinite(x):
        return x
    scale = 10**places
    return round(math.ceil(x * scale - 1e-9) / scale, places)


def round_down(x: float, places: int) -> float:
    """``x`` rounded down to ``places`` decimals (NaN and infinities as they are)."""
    if not math.isfinite(x):
        return x
    scale = 10**places
    return round(math.floor(x * scale + 1e-9) / scale, places)


def machine(*, jpeg: bool = False) -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores, GPU, library versions; with ``jpeg`` (the benches
    that decode JPEGs) also the GPU's hardware JPEG decoder (asked in a child process once)."""
    import os

    import faiss
    import torch

    info: dict[str, Any] = {
        "pinsearch": __version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()},
    }
    if jpeg and torch.cuda.is_available():  # A100 and H100 have NVJPG engines; most GPUs none
        from pinsearch.decode import jpeg_hardware

        info["jpeg_hardware"] = jpeg_hardware(torch.device("cuda", 0)).describe()
    return info


@contextmanager
def threads_limited(threads: int | None) -> Iterator[None]:
    """Run the block with at most ``threads`` threads in torch, FAISS (OpenMP) and the BLAS and
    OpenMP pools numpy and scikit-learn use, and with ``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to it, so that worker processes
    started in the block (scikit-learn's, the study's) are held to it as well (``None``: leave
    every default). Beside another job on the same cores, oversubscribed pools can slow a run
    many times over; benchmarks compared with each other should run with the same count.
    ``machine()`` records the counts in force. Everything is restored on the way out."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    import os

    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {name: os.environ.get(name) for name in names}
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    with threadpool_limits(limits=threads):  # first: it records the pools' own counts
        try:
            os.environ.update(dict.fromkeys(names, str(threads)))
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(before[0])
            faiss.omp_set_num_threads(before[1])
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def clustered_vectors(
    n: int, dim: int, *, clusters: int = 256, intrinsic: int = 24, seed: int = 0
) -> np.ndarray:
    """Synthetic embeddings shaped like real ones, float32.

    Cluster centres plus variation along a shared low-dimensional subspace plus a little
    isotropic noise: neighbours are meaningful (unlike pure high-dimensional noise, where all
    distances concentrate and no approximate index can have good recall).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    basis = (rng.standard_normal((intrinsic, dim)) / np.sqrt(intrinsic)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    coords = rng.standard_normal((n, intrinsic)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    # in row blocks: the generator's stream is the same drawn in pieces (the vectors are
    # identical to one whole draw), without float64 temporaries of the whole array (8 GB at
    # 1M x 1024) and about 3x faster
    for start in range(0, n, 32768):
        part = x[start : start + 32768]
        np.take(centers, labels[start : start + len(part)], axis=0, out=part)
        part += coords[start : start + len(part)] @ basis
        noise = rng.standard_normal((len(part), dim)).astype(np.float32)
        noise *= 0.1
        part += noise
        np.abs(part, out=part)  # pooled CNN features are non-negative
    return x


def _data_and_queries(n: int, nq: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Database and held-out queries drawn from the same distribution."""
    both = clustered_vectors(n + nq, dim)
    return both[:n], both[n:]


# -- embedding ------------------------------------------------------------------------------


@dataclass
class EmbedBench:
    """End-to-end embedding rate vs the bare forward at the same batch size."""

    backbone: str
    weights: str  # where the weights came from ("random" with random_weights)
    device: str
    decode: str  # where JPEGs were decoded: device (torchvision on the model's device) or pil
    images: int
    batch_size: int
    workers: int  # DataLoader workers, as many as their batches fit in /dev/shm
    end_to_end_images_per_s: float  # the whole run: pipeline start and first batch included
    # past the pipeline's fill: the images of the batches after the workers' first wave,
    # over the time they took (steady_basis says which batches, or "whole run" when too few)
    steady_images_per_s: float
    first_batch_s: float  # workers started, first batch read, decoded, embedded, handed over
    forward_images_per_s: float
    ratio: float  # steady / forward
    prefetch: int | None = None  # batches each worker keeps ready (None: no workers)
    # device path: share of the JPEGs the device takes that the workers decoded with PIL
    cpu_share: float = 0.0
    # the device step alone (decode="device"): batches of files already read into memory
    # decoded, resized and normalised on the model's device, no reading, workers or model
    # (every JPEG the device takes, whatever the cpu_share)
    decode_images_per_s: float | None = None
    # the worker step alone: the run's DataLoader (its workers read the files, and decode
    # those of the PIL path or the cpu_share) drained with no device step and no model,
    # steady rate as above; under the end-to-end rate's bound when the workers set it
    loader_images_per_s: float | None = None
    # local wall-clock time of the whole run, "HH:MM:SS-HH:MM:SS" (as nvidia-smi dmon -o T
    # stamps its samples: eval/h100.sh's util-embed-*.txt)
    end_to_end_window: str = ""
    steady_basis: str = ""  # the batches the steady rate is taken over (see _steady_rate)
    machine: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbedTable:
    """:class:`EmbedBench` for several backbones over the same JPEG files, one row each."""

    images: int
    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)


_DISTINCT_IMAGES = 512  # generated images per embedding benchmark; the rest are file copies


def write_bench_images(folder: Path, n: int, width: int = 564) -> list[tuple[int, str]]:
    """``n`` generated pin JPEGs in ``folder`` as ``(key, path)`` items, sized like pins: widths
    0.8-1.3x ``width`` (Pinterest serves 564 px), heights 1-1.8x the width, every image a size
    of its own. Past 512 distinct drawings the files are copies (drawing is slow; decoding
    costs the same)."""
    from PIL import Image

    from pinsearch.synth import DEMO_CATEGORIES, draw_pin_image

    rng = np.random.default_rng(0)
    items: list[tuple[int, str]] = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        if i < _DISTINCT_IMAGES:
            w = int(width * rng.uniform(0.8, 1.3))
            h = int(w * rng.uniform(1.0, 1.8))
            img = draw_pin_image(DEMO_CATEGORIES[i % len(DEMO_CATEGORIES)], rng, 320)
            img.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
        else:
            shutil.copyfile(items[i % _DISTINCT_IMAGES][1], path)
        items.append((i, str(path)))
    return items


def corpus_bench_images(corpus: Path, n: int) -> list[tuple[int, str]]:
    """``n`` ``(key, path)`` items from the photos of a folder or manifest CSV (repeated in
    order when it has fewer)."""
    photos = _photos(corpus)
    if not photos:
        raise ValueError(f"no .jpg/.jpeg/.png photos under {corpus}")
    return [(i, str(photos[i % len(photos)])) for i in range(n)]


def bench_embed_backbones(
    backbones: Sequence[str], *, n: int = 256, corpus: Path | None = None, **options: Any
) -> EmbedTable:
    """:func:`bench_embed` for each backbone (``all``: every registered one but the test
    models) over one set of files (generated pins, or ``n`` photos of ``corpus``). A backbone
    that cannot run (weights not on this machine without ``random_weights``, out of memory,
    ...) gets its error in its row."""
    from pinsearch.backbones import list_backbones

    registered = [s.name for s in list_backbones() if not s.name.startswith("test_")]
    names = [name for b in backbones for name in (registered if b == "all" else [b])]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        items = corpus_bench_images(corpus, n) if corpus else write_bench_images(Path(tmp), n)
        for name in dict.fromkeys(names):
            try:
                row = asdict(bench_embed(name, n=n, items=items, **options))
                row.pop("machine")
            except Exception as exc:  # one backbone failing does not end the table
                row = {"backbone": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
    return EmbedTable(images=n, rows=rows, machine=machine(jpeg=True))


def bench_embed(
    backbone: str = "effnet_lite0",
    *,
    n: int = 256,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    random_weights: bool = False,
    decode: str = "auto",
    cpu_share: float = 0.0,
    compile: bool = False,
    items: Sequence[tuple[int, str]] | None = None,
) -> EmbedBench:
    """Embed ``n`` generated JPEGs from disk, then time the bare model on random tensors.

    The end-to-end rate covers the whole run, pipeline start included (workers forked, the
    first batch read, decoded and embedded: ``first_batch_s``). The steady rate is taken from
    the same run, batch by batch (:func:`_steady_rate`): the images handed over after the
    workers' first wave, over the time from that wave's end to the last batch -- what a
    large corpus runs at, and what the ratio to the bare forward compares.

    ``batch_size`` 0 picks the batch by free GPU memory (as ``pinsearch index``); ``workers``,
    ``decode``, ``cpu_share`` and ``compile`` are :class:`~pinsearch.embed.EmbedConfig`'s
    (``compile`` also applies to the bare forward). ``random_weights`` builds the
    architecture with seeded random weights: the same speed, for backbones whose pretrained
    weights are not on the machine. ``items``:
    ``(key, path)`` image files to use (:func:`write_bench_images`,
    :func:`corpus_bench_images`) instead of ``n`` generated pins.
    """
    import dataclasses

    import torch

    from pinsearch.backbones import create_backbone, get_backbone_spec
    from pinsearch.embed import (
        EmbedConfig,
        iter_embeddings,
        loader_plan,
        resolve_batch_size,
        resolve_decode,
        resolve_device,
    )

    dev = resolve_device(device)
    spec = get_backbone_spec(backbone)
    if random_weights:
        spec = dataclasses.replace(spec, random_init=True)
    model = create_backbone(spec, device=dev)
    config = EmbedConfig(
        batch_size=batch_size,
        workers=workers,
        device=str(dev),
        decode=decode,
        cpu_share=cpu_share,
        compile=compile,
    )
    decoder = resolve_decode(config, dev, model.preprocess)
    if config.channels_last:  # as iter_embeddings runs it, so the memory probe sees the same
        model.model.to(memory_format=torch.channels_last)
    batch_size = resolve_batch_size(model.model, model.preprocess, config, dev, decoder)
    config = dataclasses.replace(config, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = list(items) if items is not None else write_bench_images(Path(tmp), n)
        plan = loader_plan(config, files, batch_size, model.preprocess, decoder, device=dev)

        def embed(part: Sequence[tuple[int, str]]) -> int:
            return sum(len(b.keys) for b in iter_embeddings(model, part, config))

        for _, path in files:  # every file in the page cache: the timed run reads it warm
            Path(path).read_bytes()
        embed(files[:batch_size])  # warm-up
        done, stamps = 0, []
        began = time.strftime("%H:%M:%S")
        with timed() as t:
            for batch in iter_embeddings(model, files, config):
                done += len(batch.keys)
                stamps.append((time.perf_counter(), done))
        window = f"{began}-{time.strftime('%H:%M:%S')}"
        first_s = stamps[0][0] - t.start if stamps else t.seconds
        decode_rate = (
            _device_decode_rate(model, files, config, dev, transform=model.pixel_transform())
            if decoder == "device"
            else None
        )
        loader_rate = _loader_rate(model, files, config, decoder)
    e2e = done / t.seconds
    steady, basis = _steady_rate(stamps, t.start, plan[0])
    n = len(files)
    size = model.preprocess.input_size
    x = torch.randn(batch_size, 3, size, size, device=dev)
    net = model.model.to(memory_format=torch.channels_last)
    if compile:
        net = torch.compile(net)
    x = x.contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
        net(x)
        reps = max(2, n // batch_size)
        if cuda:
            torch.cuda.synchronize()
        with timed() as f:
            for _ in range(reps):
                net(x)
            if cuda:
                torch.cuda.synchronize()
    fwd = reps * batch_size / f.seconds
    return EmbedBench(
        backbone=backbone,
        weights=model.weights,
        device=str(dev),
        decode=decoder,
        images=done,
        batch_size=batch_size,
        workers=plan[0],
        prefetch=plan[1],
        cpu_share=cpu_share if decoder == "device" else 0.0,
        end_to_end_images_per_s=round(e2e, 1),
        steady_images_per_s=round(steady, 1),
        first_batch_s=round(first_s, 3),
        forward_images_per_s=round(fwd, 1),
        ratio=round_down(steady / fwd, 3),
        decode_images_per_s=None if decode_rate is None else round(decode_rate, 1),
        loader_images_per_s=round(loader_rate, 1),
        end_to_end_window=window,
        steady_basis=basis,
        machine=machine(jpeg=True),
    )


def _steady_rate(
    stamps: Sequence[tuple[float, int]], start: float, workers: int
) -> tuple[float, str]:
    """The rate past a pipeline's fill, from one run's ``(time, items so far)`` after each
    batch (``start``: when the run began), and the batches it was taken over.

    ``workers`` DataLoader workers start a batch each at once and hand those over together,
    wave after wave where they bound the rate: the first wave (one batch without workers)
    is the fill. The rate is the items of the later batches over the time from the first
    wave's last batch to the run's last (both ends of waves), when at least two more waves
    follow it; else the whole run's rate stands for it (start included: a rate that errs
    low), said in the basis.
    """
    wave = max(workers, 1)
    if len(stamps) >= 3 * wave:
        (t0, n0), (t1, n1) = stamps[wave - 1], stamps[-1]
        if t1 > t0:
            return (n1 - n0) / (t1 - t0), f"batches {wave + 1}-{len(stamps)} of {len(stamps)}"
    n, end = (stamps[-1][1], stamps[-1][0]) if stamps else (0, start)
    why = f"whole run: {len(stamps)} batches, too few past {wave} workers' first wave"
    return (n / (end - start) if end > start else 0.0), why


def _loader_rate(model: Any, files: Sequence[tuple[int, str]], config: Any, mode: str) -> float:
    """Images per second of the embedding's worker step alone: the DataLoader
    :func:`~pinsearch.embed.iter_embeddings` builds (same workers, prefetch, ``cpu_share``
    and pinning) drained with nothing else to do, its steady rate taken as the end-to-end
    one is (:func:`_steady_rate`). It says whether the workers (reading, and decoding on the
    PIL path or for the ``cpu_share``) bound the end-to-end rate."""
    from pinsearch.embed import pin_loader

    loader = pin_loader(
        files, model.pixel_transform(), config, config.batch_size, model.preprocess, mode,
        model.device,
    )  # fmt: skip
    stamps, done = [], 0
    start = time.perf_counter()
    for batch in loader:
        done += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        stamps.append((time.perf_counter(), done))
    return _steady_rate(stamps, start, loader.num_workers)[0]


def _device_decode_rate(
    model: Any, files: Sequence[tuple[int, str]], config: Any, dev: Any, *, transform: Any
) -> float:
    """Images per second of the embedding's device step alone: up to 8 batches of the files,
    read and packed as the workers do (untimed), then decoded and transformed on ``dev`` as
    :func:`~pinsearch.embed.iter_embeddings` does (a side stream on CUDA), twice: the second
    pass is timed. It says whether the decoder (nvJPEG's hardware engine, or its one-by-one
    fallback) or the rest of the pipeline bounds the end-to-end rate."""
    import torch

    from pinsearch.decode import (
        EncodedPinImages,
        collate_prepared,
        decode_on_device,
        takes_progressive,
    )

    pre, size = model.preprocess, config.batch_size
    data = EncodedPinImages(
        files[: 8 * size], transform, config.max_pixels, pre.resize_side, draft=False,
        progressive=takes_progressive(dev),
    )  # fmt: skip
    batches = [
        collate_prepared([data[j] for j in range(i, min(i + size, len(data)))])
        for i in range(0, len(data), size)
    ]
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev) if cuda else None
    seconds = 0.0
    for _ in range(2):  # the first pass warms the decoder up (nvJPEG's buffers, kernels)
        with timed() as t, torch.inference_mode():
            for batch in batches:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    decode_on_device(
                        batch, pre, dev, transform, max_pixels=config.max_pixels,
                        min_side=pre.resize_side, draft=False,
                    )  # fmt: skip
            if cuda:
                torch.cuda.synchronize(dev)
        seconds = t.seconds
    return sum(len(b) for b in batches) / seconds


@dataclass
class JpegBench:
    """JPEG decoding alone, baseline vs progressive copies of the same pictures: torchvision's
    batched ``decode_jpeg`` on a device (nvJPEG on CUDA: its hardware engine for baseline
    files where the GPU has one, one file at a time with the Huffman stage on the host for
    the rest) and PIL on one core, whole and at the reduced scale the PIL path decodes at."""

    images: int
    batch_size: int
    device: str
    reduced_side: int  # PIL's reduced-scale decoding keeps both sides at least this long
    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)


def bench_jpeg(
    *,
    n: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    reduced_side: int = 256,
    items: Sequence[tuple[int, str]] | None = None,
) -> JpegBench:
    """Decode ``n`` pin-sized JPEGs (:func:`write_bench_images`, or ``items``) saved baseline
    and progressive, from bytes already in memory: on ``device`` in batches of ``batch_size``
    (:func:`pinsearch.decode.decode_jpegs`, a warm-up call first), and with PIL on this
    thread, whole and drafted to ``reduced_side`` (256: the resize side of a 224 px model at
    crop 0.875). Rows: images/s and megapixels/s per kind and decoder. Says what the device
    decoder alone gives at pin sizes, and what progressive files cost it
    (:func:`pinsearch.decode.takes_progressive` sends them to the workers on CUDA)."""
    import io

    import torch
    from PIL import Image

    from pinsearch.decode import decode_jpegs
    from pinsearch.embed import resolve_device

    if batch_size < 1 or (items is None and n < 1):
        raise ValueError(f"bench jpeg: batch_size and n must be at least 1, got {batch_size}, {n}")
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        files = list(items) if items is not None else write_bench_images(Path(tmp), n)
        pictures = [Path(p).read_bytes() for _, p in files]
    kinds: dict[str, list[bytes]] = {"baseline": [], "progressive": []}
    for data in pictures:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        for kind in kinds:
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=90, progressive=kind == "progressive")
            with Image.open(out) as saved:  # what the row says it is
                if bool(saved.info.get("progressive")) != (kind == "progressive"):
                    raise RuntimeError(f"PIL did not write a {kind} JPEG")
            kinds[kind].append(out.getvalue())
    pixels = 0
    for data in kinds["baseline"]:
        with Image.open(io.BytesIO(data)) as img:
            pixels += img.size[0] * img.size[1]
    cuda = dev.type == "cuda"
    rows: list[dict[str, Any]] = []
    for kind, blobs in kinds.items():
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decode_jpegs(tensors[:batch_size], dev)  # warm-up: the decoder's buffers, kernels
        if cuda:
            torch.cuda.synchronize(dev)
        with timed() as t:
            for i in range(0, len(tensors), batch_size):
                out = decode_jpegs(tensors[i : i + batch_size], dev)
                if any(o is None for o in out):
                    raise RuntimeError(f"{dev} refused a {kind} JPEG")
            if cuda:
                torch.cuda.synchronize(dev)
        rows.append(_jpeg_row(kind, f"decode_jpeg ({dev.type})", len(blobs), pixels, t.seconds))
        for name, side in (("PIL, one core", None), ("PIL reduced, one core", reduced_side)):
            with timed() as t:
                for data in blobs:
                    with Image.open(io.BytesIO(data)) as img:
                        if side:
                            img.draft("RGB", (side, side))
                        img.load()
            rows.append(_jpeg_row(kind, name, len(blobs), pixels, t.seconds))
    return JpegBench(
        images=len(pictures),
        batch_size=batch_size,
        device=str(dev),
        reduced_side=reduced_side,
        rows=rows,
        machine=machine(jpeg=True),
    )


def _jpeg_row(kind: str, decoder: str, n: int, pixels: int, seconds: float) -> dict[str, Any]:
    return {
        "jpeg": kind,
        "decoder": decoder,
        "images_per_s": round(n / seconds, 1),
        "megapixels_per_s": round(pixels / 1e6 / seconds, 1),  # of the whole pictures
        "seconds": round(seconds, 3),
    }


# -- indexes --------------------------------------------------------------------------------


@dataclass
class IndexBench:
    """Build time, search rate and recall@10 vs exact search, per factory string."""

    n: int
    dim: int
    queries: int
    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)


def bench_index(
    *,
    n: int = 100_000,
    dim: int = 768,
    factories: Sequence[str] | None = None,
    metric: str = "cosine",
    nq: int = 1000,
    k: int = 10,
    fp16: bool = False,
    fp16_also: Sequence[str] = (),
) -> IndexBench:
    """Build each index type over synthetic clustered vectors and measure it. ``fp16``: GPU
    indexes in float16; ``fp16_also``: factories measured once more in float16, as extra rows
    over the same vectors (one draw of the data for both precisions)."""
    from pinsearch.indexes import IndexConfig, build_index, ivf_nlist

    nlist = ivf_nlist(n)
    m = max(1, dim // 16)  # PQ sub-quantizers: about 16 dims each, a divisor of dim
    while dim % m:
        m -= 1
    factories = list(factories or ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},PQ{m}", "HNSW32"])
    import faiss

    x, q = _data_and_queries(n, nq, dim)
    keys = np.arange(n, dtype=np.int64)
    exact = build_index(x, keys, IndexConfig(factory="Flat", metric=metric))  # type: ignore[arg-type]
    truth = exact.search(q, k)[1]  # float32 exact answers (on the GPU when faiss has one)
    del exact
    rows: list[dict[str, Any]] = []
    for fac, half in [(f, fp16) for f in factories] + [(f, True) for f in fp16_also]:
        try:  # (a factory refused by its settings is a row's error too)
            config = IndexConfig(factory=fac, metric=metric, fp16=half)  # type: ignore[arg-type]
            index = build_index(x, keys, config)
            index.search(q[:8], k)  # warm-up (GPU kernels, lazily built structures)
            with timed() as t:
                _, found = index.search(q, k)
        except (RuntimeError, ValueError, MemoryError) as exc:  # one type failing (e.g. a GPU
            rows.append({"factory": fac, "fp16": half,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
            continue  # limit) must not cost the other rows of a long run
        recall = overlap_at_k(found, truth)
        size = len(faiss.serialize_index(index.cpu_index()))
        device, gpu_mb = _placement(index, half)
        rows.append(
            {
                "factory": fac,
                "fp16": half,
                # the serialised index (codes + structure), saved from a float32 CPU copy
                "memory_mb": round(size / 2**20, 3),
                # on the GPU(s): vectors or codes as stored there (float16 Flat rows: half),
                # list ids and centroids, all shards together
                "gpu_memory_mb": gpu_mb,
                "build_s": round(index.build_seconds, 3),
                "search_s": round(t.seconds, 4),
                "qps": round(nq / t.seconds, 1),
                "recall_at_10": round(recall, 4),
                "device": device,
            }
        )
        del index
    return IndexBench(n=n, dim=dim, queries=nq, rows=rows, machine=machine())


def overlap_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's exact answers (``truth``) that ``found`` holds: recall@k, or
    top-k agreement. Padding (-1, where the store holds fewer than k) is no answer: an exact
    search of 5 vectors at k = 10 agrees with itself wholly (it scored 0.6)."""
    shares = []
    for a, b in zip(found.tolist(), truth.tolist()):
        want = set(b) - {-1}
        shares.append(len(want & set(a)) / len(want) if want else 1.0)
    return float(np.mean(shares)) if shares else 1.0


def _placement(index: Any, fp16: bool) -> tuple[str, float | None]:
    """Where an index lives: ``cpu``, ``gpu``, or ``gpu fp16`` (float16 Flat vectors or IVF-PQ
    lookup tables), and what it holds on its GPU(s) in MiB (None on the CPU)."""
    from pinsearch.indexes.gpu import gpu_float16, gpu_index_bytes

    if not index.on_gpu:
        return "cpu", None
    cpu = index.cpu_index()
    half = gpu_float16(cpu, fp16)
    return "gpu fp16" if half else "gpu", round(gpu_index_bytes(cpu, fp16=half) / 2**20, 3)


# -- exact k-NN at scale -------------------------------------------------------------------


@dataclass
class ExactBench:
    """Exact k-NN of a query batch: raw FAISS vs pinsearch on the same index, and 16-bit paths."""

    n: int
    dim: int
    queries: int
    k: int
    device: str
    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)
    status: str = "done"  # "running" in the snapshots a --progress file holds until the end


def _best_of(fn: Any, repeat: int) -> tuple[float, Any]:
    """Fastest of ``repeat`` timed calls after one warm-up call; returns (seconds, result)."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        with timed() as t:
            out = fn()
        best = min(best, t.seconds)
    return best, out


def bench_exact(
    *,
    n: int = 1_000_000,
    dim: int = 1024,
    nq: int = 6400,
    k: int = 10,
    device: str = "auto",
    repeat: int = 3,
    progress: Path | None = None,
) -> ExactBench:
    """Exact k-NN of ``nq`` queries over ``n`` clustered vectors (cosine), several ways.

    Rows: raw FAISS ``IndexFlatIP`` search (the baseline; on the GPU when faiss-gpu sees one),
    pinsearch's :class:`PinIndex` over that same index (query normalisation and the id map
    included: ``vs_raw`` should stay near 1), FAISS with float16 storage (GPU only), and the
    torch scan in float32, float16 and bfloat16, without and with a float32 re-scoring of
    4k candidates. ``agreement`` is the top-k overlap with the raw FAISS answer. On a GPU the
    float16 scans run once more with smaller and larger score blocks than the default
    (``block_mb``), the refined scans with float32 candidate scores instead of 16-bit ones
    (``scores``), and float16 scans selecting by one ``torch.topk`` instead of column groups
    (``select``): tuning rows, which the targets leave out (``targets.TUNING_KEYS``).
    ``progress``: a file rewritten whole after every row (``status`` ``running``, then
    ``done``), so a run stopped at a time limit keeps the rows it measured.
    """
    import faiss

    from pinsearch.indexes import IndexConfig, PinIndex, TorchExact, gpu_count, to_gpu
    from pinsearch.indexes.exact import PRECISIONS
    from pinsearch.store import _write_json_atomic
    from pinsearch.vectors import unit_rows

    x, q = _data_and_queries(n, nq, dim)
    faiss.normalize_L2(x)
    on_gpu = device != "cpu" and gpu_count() > 0
    placement = "gpu" if on_gpu else "cpu"
    cpu_index = faiss.IndexFlatIP(dim)
    cpu_index.add(x)
    raw_index = to_gpu(cpu_index) if on_gpu else cpu_index
    qn = unit_rows(q)
    raw_s, (_, truth) = _best_of(lambda: raw_index.search(qn, k), repeat)
    keys = np.arange(n, dtype=np.int64)

    def row(name: str, seconds: float, found: np.ndarray, **extra: Any) -> dict[str, Any]:
        agree = overlap_at_k(found, truth)
        return {
            "path": name,
            "seconds": round(seconds, 4),
            "qps": round(nq / seconds, 1),
            "vs_raw": round_up(seconds / raw_s, 3),
            "agreement": round_down(agree, 4),
            **extra,
        }

    result = ExactBench(n, dim, nq, k, placement, [], machine(), status="running")

    def save() -> None:
        if progress is not None:  # replaced whole: a reader never sees half a file
            _write_json_atomic(progress, asdict(result))

    def keep(entry: dict[str, Any]) -> None:
        result.rows.append(entry)
        save()

    keep(row("faiss Flat (raw)", raw_s, truth))
    config = IndexConfig(factory="Flat", device=placement)  # type: ignore[arg-type]
    ours = PinIndex(raw_index, keys, config, "Flat", dim, on_gpu=on_gpu)
    sec, (_, found) = _best_of(lambda: ours.search(q, k), repeat)
    keep(row("pinsearch Flat", sec, found))
    if on_gpu:
        half = to_gpu(cpu_index, fp16=True)
        sec, (_, found) = _best_of(lambda: half.search(qn, k), repeat)
        keep(row("faiss Flat fp16", sec, found))
    scans: list[tuple[str, int, dict[str, Any]]] = [
        (p, r, {}) for p in PRECISIONS for r in ((0, 4) if p != "float32" else (0,))
    ]
    if on_gpu:  # tuning, against the defaults: the score block's size (1 GiB), the refined
        # scans' 16-bit candidate scores, the grouped selection
        scans += [("float16", r, {"block_mb": mb}) for r in (0, 4) for mb in (256, 4096)]
        scans += [(p, 4, {"scores": "float32"}) for p in ("float16", "bfloat16")]
        scans += [("float16", r, {"select": "topk"}) for r in (0, 4)]
    for precision, refine, extra in scans:
        name = f"torch {precision}" + (f" refine {refine}k" if refine else "")
        name += f" (blocks {extra['block_mb']} MiB)" if "block_mb" in extra else ""
        name += f" ({extra['scores']} scores)" if "scores" in extra else ""
        name += " (plain topk)" if "select" in extra else ""
        try:
            block_mb = extra.get("block_mb")
            scan = TorchExact(x, precision=precision, device=placement, refine=refine,
                              block_bytes=block_mb and block_mb << 20,
                              fast_scores=False if "scores" in extra else None,
                              group_select="select" not in extra)  # fmt: skip
            sec, (_, found) = _best_of(lambda s=scan: s.search(qn, k), repeat)
        except (RuntimeError, MemoryError) as exc:  # one path failing ends only its row
            keep({"path": name, "error": f"{type(exc).__name__}: {exc}"[:300], **extra})
            continue
        keep(row(name, sec, found, **extra))
        del scan
    result.status = "done"
    save()
    return result


# -- query latency -------------------------------------------------------------------------


@dataclass
class QueryBench:
    """Single-query latency with metadata (pinsearch) vs the raw FAISS search (same index)."""

    n: int
    dim: int
    k: int
    queries: int
    factory: str
    # similar_to_pin: a stored pin's similar pins with metadata (its id looked up, its
    # vector read, itself left out) -- the similar-pin query
    pinsearch_p50_ms: float
    pinsearch_p99_ms: float
    pinsearch_qps: float
    # the raw FAISS search of the same pins' vectors (k + 1: the pin itself is found too)
    faiss_p50_ms: float
    faiss_p99_ms: float
    overhead_ratio_p50: float
    filtered_p50_ms: float  # similar_to_pin within one category
    # similar_to_vector: a new vector's similar pins with metadata (no id, no vector read)
    vector_p50_ms: float = 0.0
    vector_p99_ms: float = 0.0
    index_on_gpu: bool = False  # where the searched index lay
    machine: dict[str, Any] = field(default_factory=dict)


def synthetic_ingest(n: int, *, categories: int = 32, boards: int = 5000, skipped: int = 0) -> Any:
    """An :class:`~pinsearch.ingest.IngestResult` of ``n`` fake pins (no images) over
    ``boards`` boards of 500 users, and ``skipped`` skipped files."""
    from pinsearch.ingest import IngestResult, PinRecord, SkippedPin

    pins = [
        PinRecord(
            pin_id=f"p{i:09d}",
            board=f"user{i % boards % 500:03d}/board{i % boards}",  # board j: user j mod 500
            user=f"user{i % boards % 500:03d}",
            category=f"cat{i % categories:02d}",
            title=f"synthetic pin {i}",
            description="",
            path=Path(f"/nonexistent/{i}.jpg"),
        )
        for i in range(n)
    ]
    bad = [SkippedPin(f"/nonexistent/bad{i}.jpg", "not_an_image", "") for i in range(skipped)]
    by_board = {p.board: p for p in pins}
    return IngestResult(Path("synthetic"), "synthetic", pins, bad, n + skipped, boards=by_board)


def synthetic_store(
    path: Path, vectors: np.ndarray, *, categories: int = 32, index: Any = None
) -> None:
    """Write a store with fake pins (no images) and the given vectors, for query benchmarks;
    ``index``: the :class:`~pinsearch.indexes.IndexConfig` of its index (default: auto)."""
    from pinsearch.store import Store

    n = len(vectors)
    with Store.open(path, create=True) as store:
        store.catalog.add_ingest(synthetic_ingest(n, categories=categories), "{}")
        store.catalog.upsert_embedding(
            "synthetic", spec={"weights": "none", "dim": vectors.shape[1]}, preprocess={},
            dim=vectors.shape[1], dtype="float32", normalize=False, device="cpu",
            pinsearch_version=__version__,
        )  # fmt: skip
        keys = np.arange(n, dtype=np.int64)
        for start in range(0, n, 65536):
            store.vectors("synthetic").write_part(
                vectors[start : start + 65536], keys[start : start + 65536]
            )
        store.build_index("synthetic", index)


@dataclass
class CatalogBench:
    """Writing an ingest's rows to the catalog (DuckDB): pins, boards, users, skipped files."""

    pins: int
    boards: int
    users: int
    skipped: int
    add_ingest_s: float  # Catalog.add_ingest: every row, one transaction
    pins_per_s: float
    # the same boards inserted row by row with DuckDB's executemany (how boards, users and
    # skipped files were written before), into a fresh store, in the same run
    boards_executemany_s: float
    boards_speedup: float  # boards_executemany_s / boards_columnar_s
    boards_columnar_s: float  # the same boards in one columnar insert, into a fresh store
    # the same corpus read again into that store: every pin stored already, compared with
    # what the catalog holds; unchanged, then with 1% of the titles edited (written back)
    reread_s: float = 0.0
    reread_edited_s: float = 0.0
    reread_edited: int = 0  # pins the second re-read found changed
    machine: dict[str, Any] = field(default_factory=dict)


def bench_catalog(*, n: int = 100_000, boards: int = 5000, skipped: int = 1000) -> CatalogBench:
    """Time :meth:`~pinsearch.catalog.Catalog.add_ingest` of ``n`` synthetic pins over
    ``boards`` boards with ``skipped`` skipped files (what ``pinsearch index`` writes to the
    catalog for such a corpus), the same boards written row by row as before, and the corpus
    read again (its pins compared with the stored ones: unchanged, then 1% of titles edited)."""
    from pinsearch.store import Store

    result = synthetic_ingest(n, boards=boards, skipped=skipped)
    again = dataclasses.replace(
        result, pins=[], skipped=[], already_present=n, boards={}, stored=result.pins
    )
    edited = dataclasses.replace(
        again,
        stored=[
            dataclasses.replace(p, title=p.title + " (edited)") if i % 100 == 0 else p
            for i, p in enumerate(result.pins)
        ],
    )
    records = list(result.boards.values())
    rows = [[b.board, b.user, b.board_name, b.category, b.board_description] for b in records]
    with tempfile.TemporaryDirectory() as tmp:
        with Store.open(Path(tmp) / "store", create=True) as store:
            with timed() as t:
                store.catalog.add_ingest(result, "{}")
            users = store.catalog.scalar("SELECT count(*) FROM users")
            with timed() as t_again:
                store.catalog.add_ingest(again, "{}")
            with timed() as t_edited:
                changes = store.catalog.add_ingest(edited, "{}").changes
        with Store.open(Path(tmp) / "boards", create=True) as store, timed() as t_boards:
            store.catalog.add_boards(records)  # alone
        with Store.open(Path(tmp) / "rows", create=True) as store, timed() as t_rows:
            store.catalog.connection.executemany(  # the same boards, as they were written
                "INSERT INTO boards VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows
            )
    return CatalogBench(
        pins=n,
        boards=len(rows),
        users=int(users),
        skipped=skipped,
        add_ingest_s=round(t.seconds, 3),
        pins_per_s=round(n / t.seconds, 1),
        boards_executemany_s=round(t_rows.seconds, 3),
        boards_speedup=round(t_rows.seconds / t_boards.seconds, 1),
        boards_columnar_s=round(t_boards.seconds, 4),
        reread_s=round(t_again.seconds, 3),
        reread_edited_s=round(t_edited.seconds, 3),
        reread_edited=len(changes.pins),
        machine=machine(),
    )


@dataclass
class RemoveBench:
    """Removing pins from a store: in place (the index keeps its training) vs a rebuild."""

    n: int
    dim: int
    factory: str
    in_place: bool  # False: this index type is rebuilt by remove
    pins: int  # removed at random, by id
    remove_s: float  # remove_pins: vectors, catalog rows, index entries, files saved
    board_pins: int
    board_remove_s: float  # remove_pins of one board
    rebuild_s: float  # rebuilding the same index from the remaining vectors (the old way)
    rebuild_over_remove: float
    machine: dict[str, Any] = field(default_factory=dict)


def bench_remove(
    *, n: int = 100_000, dim: int = 64, pins: int = 1000, factory: str = "auto"
) -> RemoveBench:
    """Time ``pinsearch remove`` on a synthetic store of ``n`` pins, and the index rebuild it
    avoids, in the same run."""
    from pinsearch.edit import remove_pins
    from pinsearch.indexes import IndexConfig
    from pinsearch.store import Store

    x = clustered_vectors(n, dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        synthetic_store(path, x, index=IndexConfig(factory=factory))
        with Store.open(path) as store:
            chosen = np.random.default_rng(1).choice(n, min(pins, n - 1), replace=False)
            with timed() as t:
                report = remove_pins(store, pin_ids=[f"p{i:09d}" for i in chosen])
            board = store.catalog.query("SELECT board FROM pins LIMIT 1")[0]["board"]
            with timed() as tb:
                by_board = remove_pins(store, boards=[board])
            row = store.catalog.get_index("synthetic")
            config = IndexConfig(**json.loads(row["config"]))
            with timed() as tr:
                store.build_index("synthetic", config)
    return RemoveBench(
        n=n,
        dim=dim,
        factory=row["factory"],
        in_place=not report.rebuilt,
        pins=report.pins,
        remove_s=round(t.seconds, 3),
        board_pins=by_board.pins,
        board_remove_s=round(tb.seconds, 3),
        rebuild_s=round(tr.seconds, 3),
        rebuild_over_remove=round(tr.seconds / t.seconds, 1),
        machine=machine(),
    )


def bench_query(
    *, n: int = 100_000, dim: int = 768, k: int = 10, nq: int = 1000, store: Path | None = None
) -> QueryBench:
    """p50/p99 latency of one similar-pin query with metadata, as a warm process answers it
    (``PinSearcher(cache_metadata=True)``, warmed as ``serve`` warms it), vs the raw FAISS
    search of the same pins' vectors on the same index; ``nq`` pins spread over the store,
    each queried once (after one warm-up query)."""
    from pinsearch.search import PinSearcher
    from pinsearch.store import Store

    x, q = _data_and_queries(n, nq, dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = store or Path(tmp) / "store"
        if store is None:
            synthetic_store(path, x)
        with Store.open(path, read_only=True) as s:
            searcher = PinSearcher(s, cache_metadata=True)
            searcher.warm()
            index = searcher.index
            rows = s.catalog.query("SELECT pin_id, pin_key FROM pins ORDER BY pin_key")
            picked = [rows[i] for i in np.linspace(0, len(rows) - 1, nq).astype(int)]
            own, _ = s.vectors(searcher.backbone).load(np.array([r["pin_key"] for r in picked]))
            prepared, held_out = index.prepare(own), index.prepare(q)
            params = index._params()  # the same search parameters (IVF nprobe) pinsearch uses
            ours, raw, vector, filtered = [], [], [], []
            searcher.similar_to_pin(picked[-1]["pin_id"], k)  # warm-up
            searcher.similar_to_vector(q[-1], k)
            for i, row in enumerate(picked):
                with timed() as t:
                    searcher.similar_to_pin(row["pin_id"], k)
                ours.append(t.seconds)
                with timed() as t:
                    index._raw_search(prepared[i : i + 1], k + 1, params)
                raw.append(t.seconds)
                with timed() as t:
                    searcher.similar_to_vector(held_out[i], k)
                vector.append(t.seconds)
            # warm-up: on a GPU, a filter too rare for the GPU copy's deepest answer copies
            # the index to the CPU once
            searcher.similar_to_pin(picked[0]["pin_id"], k, category="cat03")
            for row in picked[: min(nq, 50)]:
                with timed() as t:
                    searcher.similar_to_pin(row["pin_id"], k, category="cat03")
                filtered.append(t.seconds)
    ms = lambda a, p: round(float(np.percentile(a, p)) * 1000, 3)  # noqa: E731
    return QueryBench(
        n=n,
        dim=dim,
        k=k,
        queries=nq,
        factory=index.factory,
        pinsearch_p50_ms=ms(ours, 50),
        pinsearch_p99_ms=ms(ours, 99),
        pinsearch_qps=round(nq / float(np.sum(ours)), 1),
        faiss_p50_ms=ms(raw, 50),
        faiss_p99_ms=ms(raw, 99),
        overhead_ratio_p50=round(float(np.percentile(ours, 50) / np.percentile(raw, 50)), 2),
        filtered_p50_ms=ms(filtered, 50),
        vector_p50_ms=ms(vector, 50),
        vector_p99_ms=ms(vector, 99),
        index_on_gpu=index.on_gpu,
        machine=machine(),
    )


@dataclass
class TextBench:
    """Text query latency with a warm process: embed + search + metadata."""

    n: int
    dim: int
    k: int
    queries: int
    text_encoder: str
    boards: int
    encode_p50_ms: float  # the text encoder alone
    pins_p50_ms: float  # search_text: encode + index search + metadata
    pins_p99_ms: float
    boards_topm_p50_ms: float  # search_boards(score="topm"), 3 pins per board
    boards_topm_p99_ms: float
    boards_centroid_p50_ms: float  # search_boards(score="centroid")
    boards_centroid_p99_ms: float
    note: str = (
        "aligned text encoder (MiniLM + projection) with random projection weights over "
        "synthetic vectors: latency does not depend on the weights' values"
    )
    machine: dict[str, Any] = field(default_factory=dict)


def bench_text(*, n: int = 100_000, dim: int = 768, k: int = 10, nq: int = 100) -> TextBench:
    """p50/p99 of text queries (pins, and boards by top-m and by centroid) over ``n`` pins."""
    from pinsearch.align import save_alignment
    from pinsearch.store import Store
    from pinsearch.textsearch import TextSearcher

    x, _ = _data_and_queries(n, 1, dim)
    rng = np.random.default_rng(0)
    arrays = {
        "text_weight": rng.normal(size=(dim, 384)).astype(np.float32) / np.sqrt(384),
        "text_bias": np.zeros(dim, np.float32),
        "image_weight": np.eye(dim, dtype=np.float32),
        "image_mean": np.zeros(dim, np.float32),
    }
    words = ["red cars", "cozy reading nook", "vintage poster", "minimal kitchen"]
    texts = [f"{words[i % len(words)]} number {i}" for i in range(nq)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        synthetic_store(path, x)
        with Store.open(path) as s:
            save_alignment(
                s, "synthetic", arrays, text_model="minilm", pairs=0, images=0, source="bench"
            )
        with Store.open(path, read_only=True) as s:
            ts = TextSearcher(s, cache_metadata=True)
            ts.search_text("warm up", k)
            ts.search_boards("warm up", k, score="topm")
            ts.search_boards("warm up", k, score="centroid")
            enc, pins, topm, cent = [], [], [], []
            for text in texts:
                with timed() as t:
                    ts.encoder.encode([text])
                enc.append(t.seconds)
                with timed() as t:
                    ts.search_text(text, k)
                pins.append(t.seconds)
                with timed() as t:
                    ts.search_boards(text, k, score="topm")
                topm.append(t.seconds)
                with timed() as t:
                    ts.search_boards(text, k, score="centroid")
                cent.append(t.seconds)
            n_boards = len(ts.board_centroids()[0])
            name = ts.encoder.name
    ms = lambda a, p: round(float(np.percentile(a, p)) * 1000, 2)  # noqa: E731
    return TextBench(
        n=n,
        dim=dim,
        k=k,
        queries=nq,
        text_encoder=name,
        boards=n_boards,
        encode_p50_ms=ms(enc, 50),
        pins_p50_ms=ms(pins, 50),
        pins_p99_ms=ms(pins, 99),
        boards_topm_p50_ms=ms(topm, 50),
        boards_topm_p99_ms=ms(topm, 99),
        boards_centroid_p50_ms=ms(cent, 50),
        boards_centroid_p99_ms=ms(cent, 99),
        machine=machine(),
    )


@dataclass
class DupesBench:
    """Near-copy detection: precision and recall of duplicate pairs, per threshold."""

    backbone: str
    originals: int
    edits: list[str]
    images: int
    true_pairs: int
    rows: list[dict[str, float]] = field(default_factory=list)  # threshold, pairs, P, R
    similarity_by_edit: dict[str, dict[str, float]] = field(default_factory=dict)  # mean, min
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)


_EDITS = ("half", "crop80", "jpeg25", "flip")


def _edit(img: Any, edit: str) -> Any:
    from PIL import ImageOps

    w, h = img.size
    if edit == "half":
        return img.resize((max(w // 2, 8), max(h // 2, 8)))
    if edit == "crop80":
        dw, dh = int(w * 0.1), int(h * 0.1)
        return img.crop((dw, dh, w - dw, h - dh))
    if edit == "flip":
        return ImageOps.mirror(img)
    return img  # jpeg25: the quality is applied when saving


def _photos(corpus: Path) -> list[Path]:
    if not corpus.exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist (a folder of photos or a CSV)")
    if corpus.suffix.lower() == ".csv":
        import csv

        with corpus.open(newline="") as fh:
            return [corpus.parent / r["path"] for r in csv.DictReader(fh)]
    return sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def bench_dupes(
    corpus: str | Path,
    *,
    n: int = 200,
    backbone: str = "effnet_lite0",
    thresholds: Sequence[float] = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97),
    seed: int = 0,
) -> DupesBench:
    """Write ``n`` real photos and 4 near-copies of each (half size, 80 % centre crop, JPEG
    quality 25, mirrored), index them, and score the duplicate pairs found at each threshold
    against the truth (pairs of images made from the same photo)."""
    from itertools import combinations

    from PIL import Image

    from pinsearch.dupes import COSINE_SLACK, _components, near_pairs
    from pinsearch.pipeline import index_corpus
    from pinsearch.store import Store

    start = time.perf_counter()
    photos = _photos(Path(corpus))
    picks = np.random.default_rng(seed).choice(len(photos), min(n, len(photos)), replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "copies"
        folder.mkdir()
        for i, at in enumerate(sorted(picks.tolist())):
            img = Image.open(photos[at]).convert("RGB")
            img.save(folder / f"{i:05d}_orig.jpg", quality=95)
            for edit in _EDITS:
                quality = 25 if edit == "jpeg25" else 95
                _edit(img, edit).save(folder / f"{i:05d}_{edit}.jpg", quality=quality)
        index_corpus(folder, Path(tmp) / "store", backbone=backbone)
        with Store.open(Path(tmp) / "store", read_only=True) as store:
            a, b, sims = near_pairs(store, backbone, min(thresholds), k=20)
            vecs, keys = store.vectors(backbone).load()
            ids = {r["pin_key"]: r["pin_id"] for r in store.catalog.query(
                "SELECT pin_key, pin_id FROM pins")}  # fmt: skip
    src = {k: ids[k].split("/")[-1].split("_")[0] for k in ids}
    true = {
        (min(x, y), max(x, y))
        for group in _group_by(src).values()
        for x, y in combinations(group, 2)
    }
    rows = []
    for t in thresholds:
        keep = sims >= t - COSINE_SLACK  # (as pinsearch dupes --threshold t keeps pairs)
        pred = set()
        for members, _ in _components(a[keep], b[keep], sims[keep]):
            pred |= {(x, y) for x, y in combinations(members, 2)}
        hit = len(pred & true)
        rows.append(
            {
                "threshold": t,
                "pairs": len(pred),
                "precision": round(hit / len(pred), 4) if pred else 1.0,
                "recall": round(hit / len(true), 4) if true else 0.0,
            }
        )
    from pinsearch.vectors import unit_rows

    unit = unit_rows(vecs)
    row_of = {int(k): i for i, k in enumerate(keys.tolist())}
    by_name = {ids[k].split("/")[-1]: k for k in ids}
    by_edit: dict[str, dict[str, float]] = {}
    for edit in _EDITS:
        s_ = [
            float(unit[row_of[by_name[f"{i:05d}_orig"]]] @ unit[row_of[by_name[f"{i:05d}_{edit}"]]])
            for i in range(len(picks))
        ]
        by_edit[edit] = {"mean": round(float(np.mean(s_)), 4), "min": round(float(np.min(s_)), 4)}
    return DupesBench(
        backbone=backbone,
        originals=len(picks),
        edits=list(_EDITS),
        images=len(ids),
        true_pairs=len(true),
        rows=rows,
        similarity_by_edit=by_edit,
        seconds=round(time.perf_counter() - start, 1),
        machine=machine(),
    )


def _group_by(source: dict[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key, s in sorted(source.items()):
        out.setdefault(s, []).append(key)
    return out


def format_result(result: Any) -> str:
    """Plain-text rendering of a benchmark result."""
    data = asdict(result)
    lines = [type(result).__name__]
    rows = data.pop("rows", None)
    mach = data.pop("machine", {})
    if "fits" in data:  # one line per fit is for --json and the checkpoint
        data["fits"] = len(data["fits"])
    lines += [f"  {k}: {v}" for k, v in data.items()]
    if rows:
        cols = list(dict.fromkeys(c for r in rows for c in r))  # rows may differ (errors)
        lines.append("  " + " | ".join(cols))
        lines += ["  " + " | ".join(str(r.get(c, "")) for c in cols) for r in rows]
    lines.append("  machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()))
    return "\n".join(lines)


# -- study grid ----------------------------------------------------------------------------


@dataclass
class StudyBench:
    """The paper's grid for one backbone: pinsearch heads vs scikit-learn, same data and folds."""

    n: int
    dim: int
    classes: int
    folds: int
    device: str
    rows: list[dict[str, Any]]
    data_sha256: str = ""  # of the split (train and test vectors and labels)
    sklearn: str = ""  # scikit-learn's version
    reference: list[dict[str, Any]] | None = None  # where stopped rows' sklearn F1 came from
    total: dict[str, Any] | None = None  # the heads' grids together (the paper's whole grid)
    status: str = "done"  # "running" in the snapshots a --progress file holds until the end
    machine: dict[str, Any] = field(default_factory=dict)


#: scikit-learn's grids run quickest first: a run stopped at its limit, or by the end of a
#: bounded device call that reads the --progress snapshots, then loses the least.
_SKLEARN_ORDER = ("knn", "mlp", "lsvm")


def _check_heads(heads: Sequence[str]) -> None:
    unknown = [h for h in heads if h not in _SKLEARN_ORDER]
    if unknown:
        raise ValueError(f"bench study: unknown heads {unknown}; expected knn, lsvm or mlp")


def _study_split(
    n: int, dim: int, classes: int, folds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """The study benchmark's data: clustered synthetic vectors with ``classes`` labels, an
    80/20 stratified split and the CV folds, all from fixed seeds (the same on every machine
    with the same NumPy: ``data_sha256`` checks it)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    # overlapping classes, as much at any dim: centres sqrt(2 dim) apart, noise 4 sqrt(dim/128)
    # (a fixed 4 left 1,024-d classes linearly separable: LinearSVC's macro-F1 was 1.0)
    noise = 4.0 * float(np.sqrt(dim / 128))
    x = centers[y] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    least = int(np.bincount(y, minlength=classes).min())
    if least < 2:  # (scikit-learn's error names no option)
        raise ValueError(
            f"--n {n} draws {least} vector(s) of the least of the {classes} classes; a "
            f"stratified split needs 2 (and its {folds}-fold CV about {folds / 0.8:.0f}): give "
            "a larger --n"
        )
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return xtr, xte, ytr, yte, StratifiedKFold(folds, shuffle=True, random_state=0)


def _study_grids(
    torch_device: dict[str, Any] | None = None, knn_device: dict[str, Any] | None = None
) -> dict[str, tuple[dict[str, Any], Any, dict[str, list[Any]], str]]:
    """The paper's grid per head: (pinsearch head options, scikit-learn estimator, grid, the
    grid's parameter). scikit-learn's estimators are seeded, so a grid run fit by fit
    (:func:`bench_study_reference`) gives what ``GridSearchCV`` gives."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    torch_device, knn_device = torch_device or {}, knn_device or {}
    return {
        "knn": (knn_device, KNeighborsClassifier(algorithm="brute"),
                {"n_neighbors": [1, 5, 10, 20, 50]}, "n_neighbors"),
        "lsvm": (torch_device, make_pipeline(StandardScaler(),
                                             LinearSVC(max_iter=5000, random_state=0)),
                 {"C": [0.01, 0.1, 1, 10, 100]}, "C"),
        # MLPClassifier's recipe: its initialisation, its L2 penalty (alpha 1e-4 through Adam)
        # and its early stopping (validation accuracy; 10 epochs past tol, i.e. the 11th
        # epoch without a gain, stop it)
        "mlp": ({"max_epochs": 40, "monitor": "accuracy", "patience": 11, "init": "glorot",
                 "penalty": "l2", "weight_decay": 1e-4, **torch_device},
                make_pipeline(StandardScaler(), MLPClassifier((512, 256), early_stopping=True,
                                                              max_iter=40, random_state=0)),
                {"batch_size": [32, 64, 128]}, "batch_size"),
    }  # fmt: skip


def _sklearn_param(est: Any, param: str) -> str:
    """A grid parameter's name for ``set_params``: a pipeline's last step takes it."""
    return f"{est.steps[-1][0]}__{param}" if hasattr(est, "steps") else param


def _speedup(theirs: float, ours: float, slack: float = 0.005) -> float:
    """The least speed-up times given to 0.01 s can stand for (each off by up to ``slack``)."""
    return round_down(max(theirs - slack, 0.0) / max(ours + slack, 0.01), 2)


def _split_digest(*arrays: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def _load_reference(path: Path, bench: StudyBench) -> dict[str, Any]:
    """A finished ``bench study --json`` run: where it ran and its rows by head. One on
    another split (other sizes, or another NumPy drawing other vectors) lends no rows and
    says why (``rejected``): the benchmark still runs, which a bounded device call needs."""
    try:
        ref = json.loads(Path(path).read_text())
        same = {k: ref[k] for k in ("n", "dim", "classes", "folds", "data_sha256")}
        rows = {r["head"]: r for r in ref["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"scikit-learn reference {path}: not a `pinsearch bench study --json` result "
            f"({type(exc).__name__}: {exc})"
        ) from None
    out = {"file": str(path), "sklearn": ref.get("sklearn"), "machine": ref.get("machine"),
           "rows": rows}  # fmt: skip
    ours = {k: getattr(bench, k) for k in same}
    if same != ours:
        out["rows"] = {}
        out["rejected"] = f"run on another split: {same}, this run {ours}"
        warnings.warn(f"scikit-learn reference {path} not used: {out['rejected']}", stacklevel=2)
    return out


def _cv_scores(search: Any) -> dict[str, Any]:
    """A grid search's mean cross-validated score per value of its one parameter (keyed by
    the value as text, as JSON keeps it) and the value it chose: what a study row compares
    beyond the refit's test F1. ``search``: a fitted ``GridSearchCV`` or a pinsearch
    :class:`~pinsearch.gridsearch.GridSearchResult`."""
    results = search.cv_results_
    ((param,),) = {tuple(p) for p in results["params"]}
    values = [p[param] for p in results["params"]]
    means = results["mean_test_score"]
    return {"cv_macro_f1": {str(v): round(float(m), 6) for v, m in zip(values, means)},
            "best": search.best_params_[param]}  # fmt: skip


def _grid_search(
    est: Any, grid: dict[str, Any], cv: Any, jobs: int, xtr: Any, ytr: Any, xte: Any
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """Seconds of ``GridSearchCV(...).fit`` + predict, the test predictions and the grid's
    scores (:func:`_cv_scores`)."""
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(est, grid, scoring="f1_macro", cv=cv, n_jobs=jobs)
    with timed() as t:
        search.fit(xtr, ytr)
        pred = search.predict(xte)
    return t.seconds, pred, _cv_scores(search)


def _grid_search_child(conn: Any, args: tuple[Any, ...]) -> None:
    """Child process body: its own process group (killed whole at the limit), result back."""
    import os

    os.setsid()
    try:
        conn.send(("started", None))  # the parent's clock for a lower bound starts here
        conn.send(("ok", _grid_search(*args)))
    except BaseException as exc:  # reported to the parent, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _grid_search_limited(
    args: tuple[Any, ...],
    timeout_s: float | None,
    on_wait: Callable[[float], None] | None = None,
    every_s: float = 10.0,
) -> tuple[float, np.ndarray | None, dict[str, Any]]:
    """:func:`_grid_search` here, or in a child process given ``timeout_s`` or ``on_wait``.

    Returns ``(seconds, test predictions, grid scores)``; predictions are None (and the
    scores empty) when the search was still running at ``timeout_s``, and the seconds are
    then how long it had run (a lower bound of its time: the child's start and the data's
    trip to it are not counted).

    The child is a plain (non-daemon) process so that joblib can still use every core inside
    it; at the limit its whole process group (joblib's workers too) is killed. While it runs,
    ``on_wait(seconds so far)`` is called every ``every_s`` seconds.
    """
    if timeout_s is None and on_wait is None:
        return _grid_search(*args)
    import multiprocessing
    import os
    import signal

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_grid_search_child, args=(send, args))
    deadline = math.inf if timeout_s is None else time.perf_counter() + timeout_s
    began: float | None = None  # when the child began the search

    def ran() -> float:
        return 0.0 if began is None else time.perf_counter() - began

    proc.start()
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return ran(), None, {}
            if receive.poll(min(left, every_s)):
                status, value = receive.recv()
                if status != "started":
                    break
                began = time.perf_counter()
            elif on_wait is not None:
                on_wait(ran())
    finally:
        if proc.is_alive():
            with suppress(ProcessLookupError):  # no group yet if the child is still starting
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
        proc.join()
    if status != "ok":
        raise RuntimeError(f"scikit-learn grid search failed: {value}")
    return value


def _sklearn_floor(row: dict[str, Any]) -> tuple[float, bool]:
    """scikit-learn's seconds for a study row and whether they are only a lower bound (a grid
    stopped at its limit, still running, or not started yet)."""
    if row.get("sklearn_s") is not None:
        return float(row["sklearn_s"]), False
    return float(row.get("sklearn_at_least_s") or 0.0), True


def _study_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The heads' grids added up: the paper's whole grid for one backbone."""
    ours = sum(r["pinsearch_s"] for r in rows)
    floors = [_sklearn_floor(r) for r in rows]
    theirs = sum(s for s, _ in floors)
    return {
        "heads": [r["head"] for r in rows],
        "pinsearch_s": round(ours, 2),
        "sklearn_s": round(theirs, 2),
        "speedup": _speedup(theirs, ours, 0.005 * len(rows)),  # sums of rounded times
        "speedup_is_lower_bound": any(low for _, low in floors),
    }


def _sklearn_scores(
    row: dict[str, Any], f1: float | None, cv: dict[str, float] | None, best: Any
) -> None:
    """A study row's scikit-learn macro-F1 and grid scores (mean CV macro-F1 per value, the
    chosen value), compared with pinsearch's: the test F1 gap, the largest gap of the CV
    scores over the values both have (``cv_gap``) and whether both chose the same value."""
    row["sklearn_macro_f1"] = f1
    row["f1_gap"] = None if f1 is None else round_up(abs(row["pinsearch_macro_f1"] - f1), 4)
    ours, theirs = row.get("pinsearch_cv_macro_f1") or {}, cv or {}
    row["sklearn_cv_macro_f1"] = theirs or None
    both = [v for v in ours if v in theirs]
    row["cv_gap"] = round_up(max(abs(ours[v] - theirs[v]) for v in both), 4) if both else None
    row["sklearn_best"] = best
    row["same_choice"] = None if best is None else best == row.get("pinsearch_best")


def _sklearn_result(
    row: dict[str, Any],
    status: str,
    seconds: float,
    f1: float | None,
    references: list[dict[str, Any]],
    scores: dict[str, Any] | None = None,
) -> None:
    """Fill a study row's scikit-learn part: ``status`` is ``done`` (``seconds`` measured,
    ``scores`` its grid's, :func:`_cv_scores`), ``stopped`` (at its limit) or ``running``
    (for so long); an unfinished row's speed-up is a lower bound and its macro-F1 and grid
    scores come from a finished reference run on the same split, if any."""
    for key in ("sklearn_at_least_s", "speedup_is_lower_bound", "sklearn_f1_from"):
        row.pop(key, None)
    row["sklearn_status"] = status
    if status == "done":
        row["sklearn_s"] = round(seconds, 2)
        row["speedup"] = _speedup(row["sklearn_s"], row["pinsearch_s"])
        scores = scores or {}
        _sklearn_scores(row, f1, scores.get("cv_macro_f1"), scores.get("best"))
        return
    row["sklearn_s"] = None
    row["sklearn_at_least_s"] = round(seconds, 2)
    row["speedup"] = _speedup(seconds, row["pinsearch_s"])
    row["speedup_is_lower_bound"] = True
    _sklearn_scores(row, None, None, None)
    for ref in references:  # a bench study row or a study-reference row: the same keys
        ref_row = ref["rows"].get(row["head"], {})
        if ref_row.get("sklearn_macro_f1") is not None:
            _sklearn_scores(row, ref_row["sklearn_macro_f1"], ref_row.get("sklearn_cv_macro_f1"),
                            ref_row.get("sklearn_best"))  # fmt: skip
            row["sklearn_f1_from"] = ref["file"]
            break


def bench_study(
    *,
    n: int = 4000,
    dim: int = 256,
    classes: int = 32,
    folds: int = 5,
    device: str = "auto",
    heads: Sequence[str] = ("knn", "lsvm", "mlp"),
    sequential: bool = True,
    sklearn_jobs: int = -1,
    sklearn_timeout_s: float | None = None,
    sklearn_reference: Sequence[Path] = (),
    progress: Path | None = None,
    progress_every_s: float = 10.0,
) -> StudyBench:
    """Grid-search CV + refit + test for each head: pinsearch's batched grid search, the same
    heads one fit at a time (``GridSearchCV``), and scikit-learn's estimators, timed.

    The paper's grids: k in {1, 5, 10, 20, 50}; C in {0.01, 0.1, 1, 10, 100}; MLP batch size in
    {32, 64, 128}. Data: clustered synthetic vectors with ``classes`` labels, 80/20 split, the
    same folds everywhere. scikit-learn runs its CV fits in parallel on ``sklearn_jobs`` cores
    (-1: all). ``speedup`` is scikit-learn's time over the batched one. One small batched run
    per head first warms torch/CUDA up (not timed). With ``sklearn_timeout_s``, scikit-learn
    runs in a child process stopped at that limit; a row it did not finish reports how long
    its search had run (``sklearn_at_least_s``) and ``speedup_is_lower_bound`` (a benchmark
    must come back within a bounded call). With several heads, ``total`` adds their grids up
    (an unfinished one counts what it had run).
    ``sklearn_reference``: ``--json`` results of finished runs on the same split (checked by
    their ``data_sha256``), e.g. on a slower machine without a limit; a stopped row takes its
    scikit-learn macro-F1 (and F1 gap) from the first one with its head, marked
    ``sklearn_f1_from``, and its grid scores with it. Each row compares the two grids
    beyond the refit's test F1: mean cross-validated macro-F1 per value on both sides, their
    largest gap (``cv_gap``) and whether both chose the same value (``same_choice``).

    pinsearch's grids all run first, then scikit-learn's, quickest first (KNN, MLP, LSVM).
    ``progress``: a file holding the result so far (``status`` ``running``), rewritten whole
    after every step and every ``progress_every_s`` seconds while scikit-learn runs, where a
    grid still running reports ``sklearn_at_least_s`` and a lower-bound speed-up. A run
    started in the background (``setsid``) can then outlast a bounded device call, and a
    later call reads how far it got.
    """
    import sklearn
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    from pinsearch.gridsearch import batched_grid_search
    from pinsearch.heads import create_head
    from pinsearch.store import _write_json_atomic

    _check_heads(heads)
    xtr, xte, ytr, yte, cv = _study_split(n, dim, classes, folds)
    bench = StudyBench(n, dim, classes, folds, device, [], _split_digest(xtr, ytr, xte, yte),
                       sklearn.__version__, machine=machine())  # fmt: skip
    references = [_load_reference(path, bench) for path in sklearn_reference]
    if references:
        bench.reference = [{k: v for k, v in r.items() if k != "rows"} for r in references]
    torch_device = {"device": "cuda" if device == "gpu" else device} if device != "auto" else {}
    knn_device = (
        {"device": "gpu" if device.startswith("cuda") else device} if device != "auto" else {}
    )
    grids = _study_grids(torch_device, knn_device)

    def f1(pred: np.ndarray) -> float:
        return round(float(f1_score(yte, pred, average="macro")), 6)

    bench.status = "running"

    def snapshot() -> None:
        if len(bench.rows) > 1:  # so far: grids not finished count what they took (a floor)
            bench.total = _study_total(bench.rows)
        if progress is not None:  # replaced whole: a reader never sees half a file
            _write_json_atomic(progress, asdict(bench))

    for head in heads:  # pinsearch's grids (and one fit at a time) first, on an idle machine
        params, _, grid, param = grids[head]
        few = slice(0, min(len(xtr), 20 * classes))
        warm = {param: grid[param][-1:]}
        batched_grid_search(head, params, warm, xtr[few], ytr[few], StratifiedKFold(2))
        out: dict[str, Any] = {"head": head}
        with timed() as t:
            result = batched_grid_search(head, params, grid, xtr, ytr, cv)
            pred = result.predict(xte)
        out["pinsearch_s"] = round(t.seconds, 2)
        out["pinsearch_macro_f1"] = f1(pred)
        out["batched"] = result.batched
        scores = _cv_scores(result)
        out["pinsearch_cv_macro_f1"], out["pinsearch_best"] = scores["cv_macro_f1"], scores["best"]
        if "epochs" in result.info.get(head, {}):  # MLP: epochs each fold trained, per value
            values = [str(p[param]) for p in result.cv_results_["params"]]
            out["pinsearch_epochs"] = dict(zip(values, result.info[head]["epochs"]))
            out["pinsearch_refit_epochs"] = int(result.best_estimator_.n_epochs_)
        if sequential:
            seconds, pred, _ = _grid_search(create_head(head, **params), grid, cv, 1, xtr, ytr, xte)
            out["sequential_s"] = round(seconds, 2)
            out["sequential_macro_f1"] = f1(pred)
        out["sklearn_status"] = "pending"
        bench.rows.append(out)
        snapshot()
    for out in sorted(bench.rows, key=lambda r: _SKLEARN_ORDER.index(r["head"])):
        _, ref, grid, param = grids[out["head"]]
        ref_grid = {_sklearn_param(ref, param): grid[param]}

        def waiting(seconds: float, out: dict[str, Any] = out) -> None:
            _sklearn_result(out, "running", seconds, None, references)
            snapshot()

        args = (ref, ref_grid, cv, sklearn_jobs, xtr, ytr, xte)
        seconds, pred, scores = _grid_search_limited(
            args, sklearn_timeout_s, waiting if progress is not None else None, progress_every_s
        )
        if pred is None:  # still running at the limit: the speed-up is at least this
            _sklearn_result(out, "stopped", seconds, None, references)
        else:
            _sklearn_result(out, "done", seconds, f1(pred), references, scores)
        snapshot()
    bench.status = "done"
    snapshot()
    return bench


# -- scikit-learn's grid alone, fit by fit (a resumable reference) --------------------------


@dataclass
class StudyReference:
    """scikit-learn's grid for one head of the study benchmark, run fit by fit and kept in a
    checkpoint file, so that a grid longer than any one session (LinearSVC at the paper's size
    on 2 cores) finishes over several. Its ``rows`` have a study row's shape: a finished one
    is a ``--sklearn-reference`` for ``bench study``."""

    head: str
    n: int
    dim: int
    classes: int
    folds: int
    grid: dict[str, list[Any]]
    rows: list[dict[str, Any]]
    fits: list[dict[str, Any]]  # one per (value, fold); fold None: the refit, scored on test
    data_sha256: str = ""
    sklearn: str = ""
    jobs: int = 1
    status: str = "running"  # "done" once the refit is scored
    machine: dict[str, Any] = field(default_factory=dict)


_SPLITS: dict[tuple[int, ...], tuple[Any, ...]] = {}  # a fitting process draws its data once


def _reference_fit(task: tuple[str, int, int, int, int, Any, int | None]) -> dict[str, Any]:
    """One fit of a reference grid, in a worker: on fold ``fold``'s training part scored by
    macro-F1 on its held-out part (as ``GridSearchCV`` scores), or, with ``fold`` None, the
    refit on the whole training set scored on the test set."""
    import sklearn
    from sklearn.base import clone
    from sklearn.metrics import f1_score

    head, n, dim, classes, folds, value, fold = task
    key = (n, dim, classes, folds)
    if key not in _SPLITS:
        _SPLITS[key] = _study_split(*key)
    xtr, xte, ytr, yte, cv = _SPLITS[key]
    _, est, _, param = _study_grids()[head]
    est = clone(est).set_params(**{_sklearn_param(est, param): value})
    if fold is None:
        xa, ya, xb, yb = xtr, ytr, xte, yte
    else:
        train, held = list(cv.split(xtr, ytr))[fold]
        xa, ya, xb, yb = xtr[train], ytr[train], xtr[held], ytr[held]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinearSVC's convergence warnings, as in the study
        with timed() as t:
            est.fit(xa, ya)
            pred = est.predict(xb)
    score = round(float(f1_score(yb, pred, average="macro")), 6)
    return {"value": value, "fold": fold, "seconds": round(t.seconds, 2), "macro_f1": score,
            "sklearn": sklearn.__version__}  # fmt: skip


def _reference_row(ref: StudyReference) -> dict[str, Any]:
    """The study row a reference's fits make, with a study row's scikit-learn keys:
    cross-validated macro-F1 per value, the best (the first of the highest mean, as
    ``GridSearchCV`` picks) and, once refit, test F1."""
    ((param, values),) = ref.grid.items()
    cv = {v: [f["macro_f1"] for f in ref.fits if f["fold"] is not None and f["value"] == v]
          for v in values}  # fmt: skip
    row: dict[str, Any] = {"head": ref.head, "param": param}
    row["sklearn_cv_macro_f1"] = {str(v): round(float(np.mean(s)), 6) for v, s in cv.items() if s}
    row["fits_done"] = len(ref.fits)
    row["fits_total"] = len(values) * ref.folds + 1
    row["sklearn_fits_s"] = round(sum(f["seconds"] for f in ref.fits), 2)
    if all(len(s) == ref.folds for s in cv.values()):
        row["sklearn_best"] = values[int(np.argmax([np.mean(cv[v]) for v in values]))]
    refit = [f for f in ref.fits if f["fold"] is None]
    row["sklearn_status"] = "done" if refit else "running"
    row["sklearn_macro_f1"] = round(refit[0]["macro_f1"], 6) if refit else None
    return row


def _resume_reference(path: Path, ref: StudyReference) -> list[dict[str, Any]]:
    """The fits already in a checkpoint; one made for another grid or split is an error (a
    new file is needed), never mixed in."""
    try:
        old = json.loads(path.read_text())
        fits = list(old["fits"])
        keys = ("head", "n", "dim", "classes", "folds", "grid", "data_sha256")
        theirs = {k: old[k] for k in keys}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"reference checkpoint {path}: not a `pinsearch bench study-reference` file "
            f"({type(exc).__name__}: {exc})"
        ) from None
    ours = {k: getattr(ref, k) for k in keys}
    if theirs != ours:
        differ = sorted(k for k in keys if theirs[k] != ours[k])
        raise ValueError(
            f"reference checkpoint {path} is for another grid or split ({', '.join(differ)} "
            "differ); give a new --checkpoint file"
        )
    return fits


def bench_study_reference(
    *,
    head: str = "lsvm",
    n: int = 4000,
    dim: int = 256,
    classes: int = 32,
    folds: int = 5,
    jobs: int = -1,
    checkpoint: Path | None = None,
    max_fits: int | None = None,
) -> StudyReference:
    """scikit-learn's grid for one head of :func:`bench_study` (same data, folds, estimator
    and grid), fit by fit: each (value, fold) fit in a worker process, ``jobs`` at a time (-1:
    every core), then the refit with the best value, scored on the test set. Its macro-F1 is
    what ``GridSearchCV`` gives (the estimators are seeded).

    With ``checkpoint``, every finished fit is written to that JSON file at once (tmp +
    rename) and a later call with the same file runs only the fits it lacks: a grid that
    takes longer than any session (LinearSVC at 25,600 x 1,024 on 2 cores) finishes over
    several, losing at most the fits in flight when one is stopped. ``max_fits`` stops after
    that many new fits. ``sklearn_fits_s`` adds the fits' own seconds (each on one core).
    """
    import multiprocessing
    import os

    import sklearn

    from pinsearch.store import _write_json_atomic

    _check_heads([head])
    xtr, xte, ytr, yte, _ = _study_split(n, dim, classes, folds)
    _, _, grid, _ = _study_grids()[head]
    jobs = jobs if jobs > 0 else os.cpu_count() or 1
    digest = _split_digest(xtr, ytr, xte, yte)
    ref = StudyReference(head, n, dim, classes, folds, grid, [], [], digest, jobs=jobs,
                         machine=machine())  # fmt: skip
    del xtr, xte, ytr, yte  # the workers draw their own copy
    if checkpoint is not None and checkpoint.exists() and checkpoint.stat().st_size:
        ref.fits = _resume_reference(checkpoint, ref)

    (values,) = grid.values()
    order = {v: i for i, v in enumerate(values)}

    def save() -> None:
        ref.fits.sort(key=lambda f: (order[f["value"]], f["fold"] is None, f["fold"] or 0))
        ref.rows = [_reference_row(ref)]
        ref.status = ref.rows[0]["sklearn_status"]
        ref.sklearn = ", ".join(sorted({f["sklearn"] for f in ref.fits} | {sklearn.__version__}))
        if checkpoint is not None:
            _write_json_atomic(checkpoint, asdict(ref))

    base = (head, n, dim, classes, folds)
    budget = math.inf if max_fits is None else max_fits
    done = {(f["value"], f["fold"]) for f in ref.fits}
    cv_fits = [(*base, v, k) for v in values for k in range(folds) if (v, k) not in done]
    if cv_fits and budget > 0:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(cv_fits))) as pool:  # left early: its workers terminated
            for fit in pool.imap_unordered(_reference_fit, cv_fits):
                ref.fits.append(fit)
                save()
                budget -= 1
                if budget <= 0:
                    break
    save()
    best = ref.rows[0].get("sklearn_best")
    if best is not None and ref.status != "done" and budget > 0:
        ref.fits.append(_reference_fit((*base, best, None)))
        save()
    return ref
