"""Tests for pinsearch.decode and the decode/compile/batch-size options of pinsearch.embed.

Everything here runs on the CPU: the device path with ``device=cpu`` is the same code as on
CUDA (torchvision's decode_jpeg takes a list on both), only nvJPEG is left to test_gpu_decode.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

import pinsearch.decode as decode_mod
from pinsearch.backbones import Preprocess, create_backbone
from pinsearch.decode import (
    EncodedPinImages,
    collate_prepared,
    decode_jpegs,
    decode_on_device,
    device_decoder_error,
    device_refusal,
    device_transform_supported,
    jpeg_hardware,
    prepare_image,
    transform_on_device,
    worker_decodes,
)
from pinsearch.embed import (
    EmbedConfig,
    PinImages,
    batch_size_for_memory,
    embed_images,
    embed_store,
    iter_embeddings,
    largest_batch_that_runs,
    resolve_batch_size,
    resolve_decode,
)
from pinsearch.ingest import read_corpus
from pinsearch.store import Store

BACKBONE = "test_efficientnet"  # the tiny seeded backbone of tests/test_embed.py
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return create_backbone(BACKBONE)


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour picture with some texture (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / max(width, 1) * 6.0),
            128 + 100 * np.cos(y / max(height, 1) * 5.0),
            (x + y) / max(width + height, 1) * 255,
        ],
        axis=-1,
    )
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _cases(root: Path) -> dict[str, Path]:
    """One file per routing case, all named ``.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    pic = _picture(120, 90)
    files = {name: root / f"{name}.jpg" for name in (
        "baseline", "progressive", "grey", "png", "cmyk", "rotated", "truncated", "random",
        "empty", "huge",
    )}  # fmt: skip
    pic.save(files["baseline"], "JPEG", quality=90)
    pic.save(files["progressive"], "JPEG", quality=90, progressive=True)
    pic.convert("L").save(files["grey"], "JPEG")
    pic.save(files["png"], "PNG")
    pic.convert("CMYK").save(files["cmyk"], "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pic.save(files["rotated"], "JPEG", exif=exif.tobytes())
    data = files["baseline"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(np.random.default_rng(1).bytes(5000))
    files["empty"].write_bytes(b"")
    _picture(400, 300).save(files["huge"], "JPEG")  # over the max_pixels used below
    return files


MAX_PIXELS = 100_000
EXPECTED = {
    "baseline": "encoded",
    "progressive": "encoded",
    "grey": "encoded",
    "png": "image",
    "cmyk": "image",
    "rotated": "image",
    "truncated": "failed",
    "random": "failed",
    "empty": "failed",
    "huge": "failed",
    "missing": "failed",
}


# -- the worker step --------------------------------------------------------------------------


def test_prepare_image_routes_each_kind_like_the_pil_path(tmp_path: Path, model) -> None:
    files = _cases(tmp_path)
    files["missing"] = tmp_path / "missing.jpg"
    transform = model.pixel_transform()
    side = model.preprocess.resize_side
    old = PinImages(
        [(i, str(p)) for i, p in enumerate(files.values())], transform, MAX_PIXELS, side
    )
    for i, (name, path) in enumerate(files.items()):
        got = prepare_image(i, str(path), transform, max_pixels=MAX_PIXELS, min_side=side)
        assert got.kind == EXPECTED[name], name
        key, tensor, _, reason, detail = old[i]
        assert got.key == key and got.path == str(path)
        if got.kind == "failed":
            assert tensor is None and (got.reason, got.detail) == (reason, detail), name
        elif got.kind == "image":
            assert got.image.dtype == torch.uint8  # the crop travels as 8-bit pixels
            assert torch.equal(got.image, tensor)  # exactly the PIL path's crop
        else:
            assert got.encoded.dtype == torch.uint8 and got.encoded.dim() == 1
            assert bytes(got.encoded.numpy()) == path.read_bytes()
            with Image.open(path) as img:
                assert got.size == (img.height, img.width)
    reasons = {n: prepare_image(0, str(p), transform, max_pixels=MAX_PIXELS).reason
               for n, p in files.items() if EXPECTED[n] == "failed"}  # fmt: skip
    assert reasons == {
        "truncated": "truncated",
        "random": "not_an_image",
        "empty": "empty_file",
        "huge": "too_large",
        "missing": "missing_file",
    }


def test_device_refusal_reads_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    _picture(64, 48).save(path, "JPEG")
    data = path.read_bytes()

    def refusal(blob: bytes, **info: object) -> str | None:
        with Image.open(io.BytesIO(blob)) as img:
            img.info.update(info)
            return device_refusal(img, blob)

    assert refusal(data) is None
    assert refusal(data + b"\x00" * 16) is None  # zero padding after the end marker
    assert refusal(data + b"trailer") == "no end-of-image marker"
    sof = data.index(b"\xff\xc0")
    extended = data[: sof + 1] + b"\xc1" + data[sof + 2 :]  # extended sequential frame
    assert refusal(extended) == "frame marker 0xffc1"
    assert refusal(data, adobe_transform=0) == "RGB-coded (not YCbCr) JPEG"
    assert refusal(data, adobe_transform=1) is None


def test_progressive_jpegs_are_decoded_in_the_workers_for_cuda(tmp_path: Path, model) -> None:
    """nvJPEG takes progressive JPEGs one at a time on the host: on CUDA the workers decode
    them (as the PIL path does); baseline ones still travel encoded; the CPU takes both."""
    from pinsearch.decode import takes_progressive
    from pinsearch.embed import loader_plan, pin_loader

    assert takes_progressive("cpu") and not takes_progressive("cuda")
    assert not takes_progressive(torch.device("cuda", 1))
    files = _cases(tmp_path)
    transform, side = model.pixel_transform(), model.preprocess.resize_side
    with Image.open(files["progressive"]) as img:
        data = files["progressive"].read_bytes()
        assert device_refusal(img, data) is None
        assert "progressive" in device_refusal(img, data, progressive=False)
    kinds = {
        name: prepare_image(0, str(files[name]), transform, min_side=side, progressive=False)
        for name in ("baseline", "progressive", "grey")
    }
    assert {n: k.kind for n, k in kinds.items()} == {
        "baseline": "encoded", "progressive": "image", "grey": "encoded"
    }  # fmt: skip
    pil = PinImages([(0, str(files["progressive"]))], transform, min_side=side)[0][1]
    assert torch.equal(kinds["progressive"].image, pil)  # the PIL path's own crop
    items = [(0, str(files["baseline"])), (1, str(files["progressive"]))]
    config = EmbedConfig(workers=2, batch_size=2)
    for device, progressive in (("cpu", True), ("cuda", False)):
        loader = pin_loader(items, transform, config, 2, model.preprocess, "device", device)
        assert loader.dataset.progressive is progressive  # type: ignore[attr-defined]
        assert loader.pin_memory is (device == "cuda")
    # the shared-memory plan charges a progressive file its crop on CUDA only
    pre, crop = model.preprocess, 3 * model.preprocess.input_size**2
    encoded = files["baseline"].stat().st_size + files["progressive"].stat().st_size
    room = int(2 * 4 * 2 * (encoded / 2) / 0.5) + 64  # 2 workers x 4 batches of 2, encoded
    assert loader_plan(config, items, 2, pre, "device", shm_free=room) == (2, 4)
    worse = loader_plan(config, items, 2, pre, "device", shm_free=room, device="cuda")
    assert crop > files["progressive"].stat().st_size and worse != (2, 4)


def test_collate_packs_encoded_bytes_back_to_back(tmp_path: Path, model) -> None:
    files = _cases(tmp_path)
    ds = EncodedPinImages(
        [(10 + i, str(p)) for i, p in enumerate(files.values())],
        model.pixel_transform(),
        MAX_PIXELS,
    )
    batch = collate_prepared([ds[i] for i in range(len(ds))])
    names = list(files)
    assert batch.keys == [10 + i for i in range(len(names))]
    assert [names[p] for p in batch.encoded_at] == ["baseline", "progressive", "grey"]
    assert [names[p] for p in batch.images_at] == ["png", "cmyk", "rotated"]
    assert [names[p] for p, _, _ in batch.failures] == ["truncated", "random", "empty", "huge"]
    for j, p in enumerate(batch.encoded_at):
        assert bytes(batch.encoded_item(j).numpy()) == files[names[p]].read_bytes()
    size = model.preprocess.input_size
    assert batch.images.shape == (3, 3, size, size)
    empty = collate_prepared([ds[names.index("empty")]])
    assert empty.encoded.numel() == 0 and len(empty.images) == 0 and len(empty.failures) == 1


# -- the device step (on the CPU) -------------------------------------------------------------


def test_decode_on_device_keeps_order_and_failures(tmp_path: Path, model) -> None:
    files = _cases(tmp_path)
    transform = model.pixel_transform()
    side = model.preprocess.resize_side
    items = [(100 + i, str(p)) for i, p in enumerate(files.values())]
    prepared = [prepare_image(k, p, transform, max_pixels=MAX_PIXELS, min_side=side)
                for k, p in items]  # fmt: skip
    out = decode_on_device(
        collate_prepared(prepared),
        model.preprocess,
        CPU,
        transform,
        max_pixels=MAX_PIXELS,
        min_side=side,
    )
    names = list(files)
    good = [100 + i for i, n in enumerate(names) if EXPECTED[n] != "failed"]
    assert out.keys.tolist() == good
    assert out.images.shape == (len(good), 3, 160, 160) and out.images.dtype == torch.float32
    old = PinImages(items, transform, MAX_PIXELS, side)
    normalize = model.preprocess.normalize
    reference = {k: normalize(old[i][1]) for i, (k, _) in enumerate(items) if old[i][1] is not None}
    for row, key in enumerate(good):
        # Same decoder (libjpeg) and the same resize maths: at most a rounding step apart.
        diff = (out.images[row] - reference[key]).abs()
        assert diff.max() < 0.05 and diff.mean() < 2e-3, names[key - 100]
    assert [(k, r) for k, _, r, _ in out.failures] == [
        (106, "truncated"),
        (107, "not_an_image"),
        (108, "empty_file"),
        (109, "too_large"),
    ]
    details = {k: d for k, _, _, d in out.failures}
    assert details == {k: old[i][4] for i, (k, _) in enumerate(items) if k in details}


def test_refused_jpegs_fall_back_to_pil_then_fail(
    tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _cases(tmp_path)
    transform = model.pixel_transform()
    good, other = files["baseline"], files["progressive"]
    # A JPEG that passes the header check but whose pixel data PIL cannot decode either:
    # its scan names a component the frame does not have.
    broken = tmp_path / "broken.jpg"
    data = bytearray(good.read_bytes())
    data[data.index(b"\xff\xda") + 5] = 0x09
    broken.write_bytes(bytes(data))
    refused = {good.read_bytes(), broken.read_bytes()}
    calls: list[int] = []
    real = decode_mod._decode

    def picky(data, device):  # type: ignore[no-untyped-def]
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(t.numpy()) in refused for t in batch):
            raise RuntimeError("nvjpeg says no")
        return real(data, device)

    monkeypatch.setattr(decode_mod, "_decode", picky)
    # the PNG is decoded in the worker: its crop joins the fallback's on the device, the
    # worker's first, though it comes later in the batch
    png = files["png"]
    items = [(1, str(good)), (2, str(broken)), (4, str(png)), (3, str(other))]
    prepared = [prepare_image(k, p, transform) for k, p in items]
    assert [p.kind for p in prepared] == ["encoded", "encoded", "image", "encoded"]
    out = decode_on_device(collate_prepared(prepared), model.preprocess, CPU, transform)
    assert calls == [3, 1, 2, 1, 1]  # the batch, then halves: [good] and [broken, other]
    assert out.keys.tolist() == [1, 4, 3]
    (failure,) = out.failures
    assert failure[:3] == (2, str(broken), "corrupt")
    pil = PinImages(items, transform, min_side=model.preprocess.resize_side)
    for row, i in ((0, 0), (1, 2)):  # the fallback, and the worker's crop: the PIL path itself
        assert torch.equal(out.images[row], model.preprocess.normalize(pil[i][1]))
    floats = collate_prepared([prepare_image(4, str(png), model.transform())])
    with pytest.raises(TypeError, match="uint8"):  # the eval transform's output, not crops
        decode_on_device(floats, model.preprocess, CPU, transform)


def test_pixel_budget_splits_decoding_without_changing_results(
    tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (200, 200), (64, 48), (120, 90)]):
        paths.append(tmp_path / f"{i}.jpg")
        _picture(w, h, seed=i).save(paths[-1], "JPEG")
    transform = model.pixel_transform()
    batch = collate_prepared([prepare_image(i, str(p), transform) for i, p in enumerate(paths)])
    calls: list[int] = []
    real = decode_mod._decode
    monkeypatch.setattr(decode_mod, "_decode", lambda d, dev: calls.append(len(d)) or real(d, dev))
    whole = decode_on_device(batch, model.preprocess, CPU, transform)
    assert calls == [5]
    calls.clear()
    split = decode_on_device(batch, model.preprocess, CPU, transform, pixel_budget=30_000)
    assert calls == [2, 1, 2]
    assert split.keys.tolist() == whole.keys.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(split.images, whole.images)


def test_decode_jpegs_flags_wrong_sizes_and_bad_streams(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    _picture(40, 30).save(path, "JPEG")
    good = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    bad = torch.frombuffer(
        bytearray(b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9"), dtype=torch.uint8
    )
    out = decode_jpegs([good, bad, good], CPU, [(30, 40), (30, 40), (40, 30)])
    assert out[0] is not None and out[0].shape == (3, 30, 40) and out[0].dtype == torch.uint8
    assert out[1] is None and out[2] is None  # undecodable; decoded to another size
    assert decode_jpegs([], CPU) == []
    assert device_decoder_error(CPU) is None


def test_decode_jpegs_finds_bad_streams_by_halving(tmp_path: Path, monkeypatch) -> None:
    import pinsearch.decode as decode_mod

    path = tmp_path / "a.jpg"
    _picture(40, 30).save(path, "JPEG")
    good = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 broken \xff\xd9"), dtype=torch.uint8)
    streams = [good] * 32
    streams[5] = streams[27] = bad
    calls: list[int] = []
    real = decode_mod._decode
    monkeypatch.setattr(decode_mod, "_decode", lambda d, dev: calls.append(len(d)) or real(d, dev))
    out = decode_jpegs(streams, CPU)
    assert [o is None for o in out] == [i in (5, 27) for i in range(32)]
    expected = real([good], CPU)[0]
    assert all(torch.equal(o, expected) for o in out if o is not None)
    assert len(calls) < 32 and calls[0] == 32  # not one call per image


def test_decode_jpegs_halves_on_out_of_memory_but_not_on_a_lost_context(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    import torchvision.io

    path = tmp_path / "a.jpg"
    _picture(40, 30).save(path, "JPEG")
    good = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    real = torchvision.io.decode_jpeg
    calls: list[int] = []

    def short_of_memory(data, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        if len(data) > 2:  # the decoder's buffers for more than 2 images do not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", short_of_memory)
    with caplog.at_level("WARNING", logger="pinsearch.decode"):
        out = decode_jpegs([good] * 8, CPU)
    assert all(o is not None for o in out) and calls == [8, 4, 2, 2, 4, 2, 2]
    assert "decoding 8 JPEGs at once on cpu ran out of memory" in caplog.text

    def context_lost(data, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        raise torch.AcceleratorError("CUDA error: an illegal memory access (stand-in)")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", context_lost)
    calls.clear()
    with pytest.raises(torch.AcceleratorError):
        decode_jpegs([good] * 8, CPU)
    assert calls == [8]  # no halving: every later call would fail as well


# -- the tensor transform against timm's --------------------------------------------------------


def _timm(pre: Preprocess):  # type: ignore[no-untyped-def]
    return create_transform(
        input_size=(3, pre.input_size, pre.input_size),
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        is_training=False,
    )


PREPROCESS = {
    "bicubic": Preprocess(160, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.95),
    "bilinear": Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.875),
    "pad": Preprocess(64, (0.4, 0.4, 0.4), (0.25, 0.25, 0.25), "bicubic", 1.25),  # crop > resize
}
SIZES = [(300, 200), (200, 300), (160, 168), (168, 160), (1001, 333), (50, 70), (9, 4), (1, 1)]


@pytest.mark.parametrize("kind", sorted(PREPROCESS))
def test_transform_on_device_matches_timm(kind: str) -> None:
    pre = PREPROCESS[kind]
    reference = _timm(pre)
    pics = [_picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    tensors = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pics]
    tensors.append(tensors[0].clone())  # two images of one size are resized together
    pics.append(pics[0])
    got = transform_on_device(tensors, pre)
    assert got.shape == (len(pics), 3, pre.input_size, pre.input_size)
    assert got.dtype == torch.float32
    step = 1.0 / 255 / min(pre.std)  # one 8-bit level after normalisation
    for i, pic in enumerate(pics):
        want = reference(pic)
        diff = (got[i] - want).abs()
        # PIL resamples in fixed point, torch in float: a few values in a thousand round to
        # the next 8-bit level (rarely two levels, where bicubic overshoots).
        assert diff.max() <= 2.01 * step, (kind, pic.size, float(diff.max()))
        assert diff.mean() <= 0.005 * step, (kind, pic.size, float(diff.mean()))
    torch.testing.assert_close(got[-1], got[0])


def test_transform_on_device_mixed_sizes_and_autocast() -> None:
    # a batch of many sizes (padded in groups) gives each image what it gets alone, and the
    # caller's bf16 autocast does not reach the resize products
    pre = PREPROCESS["bicubic"]
    rng = np.random.default_rng(5)
    sizes = [(int(rng.integers(20, 400)), int(rng.integers(20, 400))) for _ in range(30)]
    tensors = [
        torch.from_numpy(np.asarray(_picture(w, h, seed=i)).copy()).permute(2, 0, 1)
        for i, (h, w) in enumerate(sizes)
    ]
    together = transform_on_device(tensors, pre)
    alone = torch.cat([transform_on_device([t], pre) for t in tensors])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = transform_on_device(tensors, pre)
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, together, atol=1e-5, rtol=0)


@pytest.mark.parametrize("waste", [1.0, 1.5, 4.0])
def test_padding_groups_bound_the_padding(waste: float) -> None:
    from pinsearch.decode import _padding_groups

    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(1, 900)), int(rng.integers(1, 900))) for _ in range(200)]
    sizes += [(224, 224)] * 20  # one size: one group
    groups = _padding_groups(sizes, waste)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        padded = len(g) * max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g)
        assert len(g) == 1 or padded <= waste * sum(sizes[i][0] * sizes[i][1] for i in g)
    assert any(len(g) >= 20 for g in groups)
    assert len(_padding_groups(sizes, 1e9)) == 1 and _padding_groups([], 1.5) == []


def test_transform_on_device_rejects_other_interpolations() -> None:
    pre = dataclasses.replace(PREPROCESS["bicubic"], interpolation="lanczos")
    assert not device_transform_supported(pre)
    assert device_transform_supported(PREPROCESS["bilinear"])
    with pytest.raises(ValueError, match="lanczos"):
        transform_on_device([torch.zeros(3, 8, 8, dtype=torch.uint8)], pre)
    assert transform_on_device([], PREPROCESS["bicubic"]).shape == (0, 3, 160, 160)


# -- iter_embeddings with decode="device" -------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_on_cpu_agrees_with_pil_path(
    tmp_path: Path, model, tree_corpus, workers: int
) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:10]
    files = _cases(tmp_path)
    items = [(10 + i, str(p)) for i, p in enumerate(paths)]
    items.insert(2, (90, str(files["png"])))
    items.insert(5, (91, str(files["truncated"])))
    items.insert(7, (92, str(files["rotated"])))
    items.append((93, str(files["random"])))
    out = {}
    for mode in ("pil", "device"):
        config = EmbedConfig(workers=workers, batch_size=4, decode=mode)
        out[mode] = list(iter_embeddings(model, items, config))
    pil, dev = out["pil"], out["device"]
    assert len(pil) == len(dev) == 4
    for a, b in zip(pil, dev):
        assert a.keys.tolist() == b.keys.tolist()
        assert a.failed_keys == b.failed_keys
        assert [(f.path, f.reason, f.detail, f.stage) for f in a.failures] == [
            (f.path, f.reason, f.detail, f.stage) for f in b.failures
        ]
    keys = np.concatenate([b.keys for b in dev])
    assert keys.tolist() == [10, 11, 90, 12, 13, 14, 92, 15, 16, 17, 18, 19]
    assert [b.failed_keys for b in dev] == [[], [91], [], [93]]
    va = np.concatenate([b.vectors for b in pil])
    vb = np.concatenate([b.vectors for b in dev])
    assert vb.dtype == np.float32 and vb.shape == va.shape
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    assert cos.min() > 0.98
    assert cos.min() > 0.9999  # same libjpeg, same resize maths on the CPU


_OOM = (torch.cuda.OutOfMemoryError, "CUDA out of memory (stand-in)")
_CUBLAS = (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")


class _ShortOfMemory(torch.nn.Module):
    """A backbone's network on a GPU short of memory: passes of more than ``limit`` images
    raise ``error`` (the allocator's, or cuBLAS' RuntimeError)."""

    def __init__(
        self, net: torch.nn.Module, limit: int, error: tuple[type, str] = _OOM, times: int = -1
    ) -> None:
        super().__init__()
        self.net, self.limit, self.error, self.sizes = net, limit, error, []
        self.times = times  # failures to come (-1: every pass over the limit fails)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit and self.times != 0:
            self.times -= 1
            raise self.error[0](self.error[1])
        return self.net(x)


@pytest.mark.parametrize("error", [_OOM, _CUBLAS])
def test_a_forward_pass_out_of_memory_is_run_again_in_halves(
    model, tree_corpus, caplog, monkeypatch, error: tuple[type, str]
) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:11]
    items = [(i, str(p)) for i, p in enumerate(paths)]

    def run(net: torch.nn.Module, batch_size: int = 8) -> list[Any]:
        config = EmbedConfig(workers=0, batch_size=batch_size)
        return list(iter_embeddings(dataclasses.replace(model, model=net), items, config))

    whole = np.concatenate([b.vectors for b in run(model.model)])
    short = _ShortOfMemory(model.model, 3, error)
    with caplog.at_level("WARNING", logger="pinsearch.embed"):
        batches = run(short)
    assert [b.keys.tolist() for b in batches] == [list(range(8)), [8, 9, 10]]
    np.testing.assert_allclose(np.concatenate([b.vectors for b in batches]), whole, atol=1e-5)
    assert short.sizes == [8, 4, 2, 2, 2, 2, 2, 1]  # halved until it fits, and kept there
    assert "a forward pass of 8 images ran out of GPU memory; 4 from now on" in caplog.text
    with pytest.raises(error[0], match="CU"):  # not even one image fits
        run(_ShortOfMemory(model.model, 0, error))
    # a passing shortage: after _REGROW_AFTER passes the size is doubled again
    monkeypatch.setattr("pinsearch.embed._REGROW_AFTER", 2)
    passing = _ShortOfMemory(model.model, 3, error, times=1)
    batches = run(passing, batch_size=4)
    np.testing.assert_allclose(np.concatenate([b.vectors for b in batches]), whole, atol=1e-5)
    assert passing.sizes == [4, 2, 2, 4, 3]  # 4 fails once; two passes of 2, then 4 again
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not memory: not retried
        run(_ShortOfMemory(model.model, 3, (RuntimeError, "shape mismatch")))


@pytest.mark.parametrize(("share", "count"), [(0.0, 0), (0.25, 25), (0.3, 30), (1.0, 100)])
def test_worker_decodes_spreads_its_share(share: float, count: int) -> None:
    picked = [i for i in range(100) if worker_decodes(i, share)]
    assert len(picked) == count
    for start in range(0, 100, 20):  # every stretch of 20 items takes its part
        assert sum(start <= i < start + 20 for i in picked) == round(20 * share)


def test_cpu_share_decodes_part_of_the_jpegs_in_the_workers(
    tmp_path: Path, model, tree_corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:8]
    files = _cases(tmp_path)
    items = [(i, str(p)) for i, p in enumerate(paths)] + [(8, str(files["png"]))]
    transform, side = model.pixel_transform(), model.preprocess.resize_side
    data = EncodedPinImages(items, transform, MAX_PIXELS, side, cpu_share=0.5)
    # every other JPEG decoded in the worker, as the PIL path decodes it; the PNG always
    assert [data[i].kind for i in range(9)] == ["encoded", "image"] * 4 + ["image"]
    pil = PinImages(items, transform, MAX_PIXELS, side)
    assert torch.equal(data[1].image, pil[1][1])
    on_device: list[int] = []  # JPEGs handed to the device decoder, per call
    decode = decode_mod.decode_jpegs
    monkeypatch.setattr(decode_mod, "decode_jpegs",
                        lambda enc, *a: on_device.append(len(enc)) or decode(enc, *a))  # fmt: skip
    out = {}
    for share in (0.0, 0.5):
        on_device.clear()
        config = EmbedConfig(workers=1, batch_size=4, decode="device", cpu_share=share)
        out[share] = list(iter_embeddings(model, items, config))
        assert sum(on_device) == 8 - 8 * share
    assert [b.keys.tolist() for b in out[0.5]] == [b.keys.tolist() for b in out[0.0]]
    va, vb = (np.concatenate([b.vectors for b in out[s]]) for s in (0.0, 0.5))
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    assert cos.min() > 0.9999  # on the CPU both decoders are libjpeg


def test_device_path_agrees_for_effnet_lite0(tree_corpus) -> None:
    lite = create_backbone("effnet_lite0")
    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:6])]
    vecs = {}
    for mode in ("pil", "device"):
        batches = iter_embeddings(lite, items, EmbedConfig(workers=0, batch_size=4, decode=mode))
        vecs[mode] = np.concatenate([b.vectors for b in batches])
    a, b = vecs["pil"], vecs["device"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98


def test_embed_store_with_device_decoding_is_compatible(
    tree_corpus, tmp_path: Path, store_copy: Path, built_store
) -> None:
    # decode, compile and batch_size are not part of a run's identity.
    config = EmbedConfig(workers=0, batch_size=0, decode="device")
    with Store.open(store_copy) as store:
        report = embed_store(store, BACKBONE, config)
        assert (report.embedded, report.already) == (0, 24)
    with Store.open(tmp_path / "s", create=True) as store:
        store.catalog.add_ingest(read_corpus(tree_corpus.root), "{}")
        report = embed_store(store, BACKBONE, config)
        assert (report.embedded, report.failed) == (24, 0)
        vecs, keys = store.vectors(BACKBONE).load()
        ids = {k: store.catalog.pins_by_key([int(k)])[int(k)]["pin_id"] for k in keys.tolist()}
    with Store.open(built_store.path, read_only=True) as ref:
        rv, rk = ref.vectors(BACKBONE).load()
        ref_ids = {ref.catalog.pins_by_key([int(k)])[int(k)]["pin_id"]: v for k, v in zip(rk, rv)}
    for k, v in zip(keys.tolist(), vecs):
        np.testing.assert_allclose(v, ref_ids[ids[k]], rtol=1e-3, atol=1e-3)


def test_a_runs_new_pins_get_the_pixels_its_earlier_ones_got(
    tmp_path: Path, model, caplog: pytest.LogCaptureFixture
) -> None:
    """A run made with whole JPEGs (the device path) goes on whole where PIL decodes (a CPU, a
    GPU without a JPEG engine); one made with PIL's reduced-scale JPEGs goes on drafted."""
    import logging

    from pinsearch.embed import _decode_like_run, embed_like_run, run_drafts

    side = model.preprocess.resize_side
    root = tmp_path / "corpus" / "art"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    late = tmp_path / "p3.jpg"  # a pin added to each store after its first run
    for path in [root / f"p{i}.jpg" for i in range(3)] + [late]:  # short sides over twice the
        noise = rng.integers(0, 256, (4 * side, 3 * side, 3), dtype=np.uint8)  # resize side:
        Image.fromarray(noise).save(path, "JPEG", quality=92)  # PIL would draft them

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    whole = embed_images(model, [late], decode="device")[0]
    drafted = embed_images(model, [late], decode="pil")[0]
    assert cos(whole, drafted) < 0.99  # the two ways differ
    assert cos(embed_images(model, [late], decode="pil", draft=False)[0], whole) > 0.99999
    for first, expect in (("device", whole), ("pil", drafted)):
        with Store.open(tmp_path / first, create=True) as store:
            store.catalog.add_ingest(read_corpus(root.parent), "{}")
            embed_store(store, BACKBONE, EmbedConfig(workers=0, decode=first))
            (root / late.name).write_bytes(late.read_bytes())
            store.catalog.add_ingest(read_corpus(root.parent, exclude_ids=["art/p0", "art/p1",
                                                 "art/p2"]), "{}")  # fmt: skip
            assert embed_store(store, BACKBONE, EmbedConfig(workers=0)).embedded == 1  # auto
            vecs, keys = store.vectors(BACKBONE).load()
            run = store.catalog.get_embedding(BACKBONE)
            assert run["decode"] == first and run_drafts(run) == (first == "pil")
            assert cos(vecs[keys == keys.max()][0], expect) > 0.99999
            assert cos(embed_like_run(model, [late], run)[0], expect) > 0.99999
        (root / late.name).unlink()
    assert "differ slightly" not in caplog.text
    with caplog.at_level(logging.WARNING):
        forced = _decode_like_run(EmbedConfig(decode="device"), run, CPU, model.preprocess)
    assert forced.decode == "device" and "decoded at reduced scale (PIL)" in caplog.text
    assert _decode_like_run(EmbedConfig(), run, CPU, model.preprocess).draft is True
    assert _decode_like_run(EmbedConfig(decode="pil"), {"decode": "device"}, CPU,
                            model.preprocess).draft is False  # fmt: skip


# -- configuration ------------------------------------------------------------------------------


def test_decode_value_is_validated() -> None:
    with pytest.raises(ValueError, match="'gpu'"):
        EmbedConfig(decode="gpu")
    with pytest.raises(ValueError, match=r"cpu_share must be within 0 and 1, not 1\.5"):
        EmbedConfig(cpu_share=1.5)
    with pytest.raises(ValueError, match="-1"):
        EmbedConfig(batch_size=-1)
    assert EmbedConfig().decode == "auto" and EmbedConfig().compile is False


def test_resolve_decode_on_cpu(model) -> None:
    pre = model.preprocess
    assert resolve_decode(EmbedConfig(), CPU, pre) == "pil"  # auto: PIL unless on CUDA
    assert resolve_decode(EmbedConfig(decode="pil"), CPU, pre) == "pil"
    assert resolve_decode(EmbedConfig(decode="device"), CPU, pre) == "device"
    lanczos = dataclasses.replace(pre, interpolation="lanczos")
    with pytest.raises(ValueError, match="lanczos"):
        resolve_decode(EmbedConfig(decode="device"), CPU, lanczos)


def test_jpeg_hardware_off_cuda_and_the_library_it_asks() -> None:
    import ctypes

    import torchvision

    none = jpeg_hardware(CPU)
    assert none.available is False and (none.engines, none.cores_per_engine) == (0, 0)
    assert none.describe() == "none (not a CUDA device (cpu))"
    if not torch.cuda.is_available():  # asked for CUDA anyway: cannot tell, said so
        unknown = jpeg_hardware("cuda")
        assert unknown.available is None and unknown.describe() == "unknown (CUDA is not available)"
    bundled = list(Path(torchvision.__file__).parent.parent.glob("torchvision.libs/libnvjpeg*"))
    lib = decode_mod._nvjpeg_library()  # the one torchvision's image extension loaded
    if lib is None and not bundled:
        pytest.skip("this torchvision build has no nvJPEG")
    assert lib is not None
    if bundled:
        assert Path(lib._name).resolve() in {b.resolve() for b in bundled}
    major = ctypes.c_int(-1)
    assert lib.nvjpegGetProperty(0, ctypes.byref(major)) == 0 and major.value >= 11  # MAJOR_VERSION
    assert decode_mod.JpegHardware(True, 7, 5).describe() == "7 engines x 5 cores"
    assert decode_mod.JpegHardware(True, 1, 1).describe() == "1 engine x 1 core"
    # asked in a child process: its answer comes back whole, its failure as "unknown"
    child = decode_mod._probe_in_child(0)
    if not torch.cuda.is_available():  # (on a GPU, the probe stays out of this process)
        assert child == decode_mod._probe_jpeg_hardware(0)
        assert child.available is None and child.detail == "CUDA is not available"
    hung = decode_mod._probe_in_child(0, timeout=0.01)
    assert hung.available is None and hung.detail.startswith("probe failed (TimeoutExpired")


def test_auto_batch_size_on_cpu(model, tree_corpus) -> None:
    assert resolve_batch_size(model.model, model.preprocess, EmbedConfig(batch_size=0), CPU) == 64
    assert resolve_batch_size(model.model, model.preprocess, EmbedConfig(batch_size=5), CPU) == 5
    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    batches = list(iter_embeddings(model, items, EmbedConfig(workers=0, batch_size=0)))
    assert [len(b.keys) for b in batches] == [24]  # one batch of up to 64


def test_compiled_model_is_compiled_once(model, tree_corpus) -> None:
    # 24 pins in batches of 10: the short last batch is padded, so no second compilation
    import torch._dynamo

    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    eager = list(iter_embeddings(model, items, EmbedConfig(workers=0, batch_size=10)))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = list(
            iter_embeddings(model, items, EmbedConfig(workers=0, batch_size=10, compile=True))
        )
    assert [len(b.keys) for b in compiled] == [10, 10, 4]
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("free", "per_image", "fixed", "expected"),
    [
        (80 * 2**30, 2**20, 0, 1024),  # lots of memory: the cap
        (1000 * 2**20, 2**20, 0, 800),  # 20 % margin
        (1000 * 2**20, 2**20, 200 * 2**20, 600),  # fixed cost comes off first
        (1000 * 2**20, 3 * 2**20, 0, 264),  # 266 rounded down to a multiple of 8
        (100 * 2**20, 2**20, 0, 80),
        (10 * 2**20, 2**20, 0, 8),  # too little memory: still the floor
        (2**30, 2**20, 2**31, 8),  # fixed cost above free memory
        (2**30, 0, 0, 1024),  # no per-image cost measured
    ],
)
def test_batch_size_for_memory(free: int, per_image: int, fixed: int, expected: int) -> None:
    assert batch_size_for_memory(free, per_image, fixed) == expected


def test_batch_size_for_memory_options() -> None:
    assert batch_size_for_memory(2**30, 2**20, margin=0.0, high=4096) == 1024
    assert batch_size_for_memory(2**30, 2**20, margin=0.5, low=16, high=256) == 256
    assert batch_size_for_memory(2**20, 2**20, low=16) == 16
    with pytest.raises(ValueError, match="margin"):
        batch_size_for_memory(2**30, 2**20, margin=1.0)


def test_largest_batch_that_runs_halves_on_out_of_memory(caplog) -> None:  # type: ignore[no-untyped-def]
    """The batch chosen from small probes is checked by one forward pass at its size."""
    tried: list[int] = []

    def forward(limit: int):  # type: ignore[no-untyped-def]
        def run(n: int) -> None:  # a model whose batches past `limit` do not fit
            tried.append(n)
            if n > limit:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {n} (stand-in)")

        return run

    assert largest_batch_that_runs(1024, forward(2000)) == 1024 and tried == [1024]
    tried.clear()
    with caplog.at_level("WARNING", logger="pinsearch.embed"):
        assert largest_batch_that_runs(1000, forward(300)) == 248
    assert tried == [1000, 496, 248] and "batch 1000 ran out of GPU memory" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not even the floor fits
        largest_batch_that_runs(64, forward(4))

    def workspace(n: int) -> None:  # cuBLAS says it in a RuntimeError of its own
        if n > 100:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")

    assert largest_batch_that_runs(256, workspace) == 64

    def broken(n: int) -> None:
        raise RuntimeError("Given groups=1, weight of size [8, 3, 3, 3]")

    with pytest.raises(RuntimeError, match="groups"):  # not memory: raised at once
        largest_batch_that_runs(256, broken)


@pytest.mark.parametrize("mode", ["pil", "device"])
def test_late_hand_over_keeps_order(
    model, tree_corpus, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import pinsearch.embed as embed_mod

    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    items.insert(9, (99, str(tree_corpus.root / "missing.jpg")))
    config = EmbedConfig(workers=0, batch_size=4, decode=mode)
    eager = list(iter_embeddings(model, items, config))
    read: list[int] = []
    dataset = EncodedPinImages if mode == "device" else PinImages
    real = dataset.__getitem__
    monkeypatch.setattr(dataset, "__getitem__", lambda self, i: read.append(i) or real(self, i))
    monkeypatch.setattr(embed_mod, "_hand_over_late", lambda device: True)  # as on CUDA
    stream = iter_embeddings(model, items, config)
    first = next(stream)
    assert len(read) == 8  # batch 1 is handed over once batch 2 is under way
    late = [first, *stream]
    assert [b.keys.tolist() for b in late] == [b.keys.tolist() for b in eager]
    failed = [b.failed_keys for b in late]
    assert failed == [b.failed_keys for b in eager] == [[], [], [99], [], [], [], []]
    for a, b in zip(eager, late):
        np.testing.assert_array_equal(a.vectors, b.vectors)


@pytest.mark.parametrize("mode", ["pil", "device"])
def test_auto_batch_size_cuda_branch(model, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The CUDA branch's wiring, with the memory probe and the free memory stubbed."""
    import pinsearch.embed as embed_mod

    probed: list[torch.device] = []
    per_image, fixed, free = 4 * 2**20, 100 * 2**20, 10 * 2**30

    def probe(m, size, device, config):  # type: ignore[no-untyped-def]
        probed.append(device)
        return per_image, fixed

    checked: list[int] = []  # the forward pass that checks the chosen batch

    def forward(m, n, size, device, config):  # type: ignore[no-untyped-def]
        checked.append(n)
        if n > 512:
            raise torch.cuda.OutOfMemoryError("stand-in")

    monkeypatch.setattr(embed_mod, "_probe_memory", probe)
    monkeypatch.setattr(embed_mod, "_forward_zeros", forward)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * free))
    cuda = torch.device("cuda", 0)
    size = resolve_batch_size(model.model, model.preprocess, EmbedConfig(batch_size=0), cuda, mode)
    staged = 3 * 160 * 160 * 4 * (3 if mode == "device" else 1)
    budget = decode_mod.DEFAULT_PIXEL_BUDGET * embed_mod.DECODE_BYTES_PER_PIXEL
    extra = budget if mode == "device" else 0
    chosen = batch_size_for_memory(free, per_image + staged, fixed + extra)
    assert chosen > 512 and checked == [chosen, size] and size == chosen // 2 - chosen // 2 % 8
    assert probed == [cuda] and 8 <= size <= 1024
    assert resolve_batch_size(model.model, model.preprocess, EmbedConfig(batch_size=32), cuda) == 32


def test_device_path_workers_decode_whole_as_the_device_does(tmp_path: Path, model) -> None:
    from pinsearch.images import load_rgb

    side, transform = model.preprocess.resize_side, model.pixel_transform()
    path = tmp_path / "big.jpg"  # short side over twice the resize side: PIL would draft it
    _picture(3 * side, 4 * side).save(path, "JPEG", quality=92)
    items = [(0, str(path))]
    big = 10 * MAX_PIXELS
    drafted = PinImages(items, transform, big, side)[0][1]  # the PIL path's pixels
    worker = EncodedPinImages(items, transform, big, side, draft=False, cpu_share=1.0)
    whole = worker[0].image
    assert whole is not None and torch.equal(whole, transform(load_rgb(path, draft=False)))
    assert not torch.equal(whole, drafted)
    vectors = {}
    for share in (0.0, 1.0):  # the device decoder, or the workers: the same pixels
        config = EmbedConfig(workers=0, batch_size=1, decode="device", cpu_share=share)
        vectors[share] = np.concatenate([b.vectors for b in iter_embeddings(model, items, config)])
    a, b = vectors[0.0][0], vectors[1.0][0]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99999


def test_a_thin_strip_is_too_large_before_it_is_resized(tmp_path: Path, model) -> None:
    strip, fine = tmp_path / "strip.png", tmp_path / "fine.jpg"
    Image.new("RGB", (1, 2000), (10, 20, 30)).save(strip)  # 2,000 pixels; resized: 56 million
    Image.new("RGB", (2, 4000), (10, 20, 30)).save(tmp_path / "strip.jpg")  # one the device
    _picture(300, 200).save(fine, "JPEG")  # decoder takes: refused before it is sent there
    items = [(0, str(strip)), (1, str(fine)), (2, str(tmp_path / "strip.jpg"))]
    for decode in ("pil", "device"):
        config = EmbedConfig(workers=0, batch_size=2, decode=decode, max_pixels=10_000_000)
        batches = list(iter_embeddings(model, items, config))
        fails = [
            (k, f.reason, f.detail) for b in batches for k, f in zip(b.failed_keys, b.failures)
        ]
        assert [f[:2] for f in fails] == [(0, "too_large"), (2, "too_large")], decode
        assert "1x2000 resized to a short side of 168 would be" in fails[0][2]
        assert [k for b in batches for k in b.keys.tolist()] == [1]


def test_query_images_in_memory_are_converted_as_files_are(tmp_path: Path, model) -> None:
    rgba = tmp_path / "rgba.png"
    pic = _picture(120, 90).convert("RGBA")
    pic.putalpha(Image.linear_gradient("L").resize((120, 90)))
    pic.save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture(120, 90).save(rotated, "JPEG", exif=exif.tobytes())
    for decode in ("pil", "device"):
        for path in (rgba, rotated):
            from_file = embed_images(model, [path], decode=decode)
            with Image.open(path) as img:
                in_memory = embed_images(model, [img], decode=decode)
            np.testing.assert_allclose(in_memory, from_file, atol=1e-6)
        assert embed_images(model, [], decode=decode).shape == (0, model.dim)


def test_prepare_image_refuses_what_is_no_regular_file(tmp_path: Path, model) -> None:
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would block the worker for ever
    got = prepare_image(0, str(fifo), model.pixel_transform())
    assert got.reason == "not_a_file" and "not a regular file" in got.detail  # (as load_rgb)
    nul = prepare_image(1, str(tmp_path / "a\x00b.jpg"), model.pixel_transform())
    assert nul.reason == "unreadable"
