"""GPU decoding (nvJPEG), auto batch size and torch.compile on CUDA (pytest -m gpu).

Skipped without CUDA (see conftest). The CPU side of the same code is tested in
tests/test_decode.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pinsearch.backbones import create_backbone
from pinsearch.decode import (
    collate_prepared,
    decode_jpegs,
    decode_on_device,
    device_decoder_error,
    jpeg_hardware,
    prepare_image,
    transform_on_device,
)
from pinsearch.embed import EmbedConfig, iter_embeddings, resolve_batch_size, resolve_decode

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(x / width * 6.0), 128 + 100 * np.cos(y / height * 5.0), (x + y) / 4],
        axis=-1,
    )
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _odd_files(root: Path) -> list[Path]:
    """Files each route differently: progressive, grey, PNG, CMYK, rotated, truncated, junk."""
    pic = _picture(300, 200)
    files = [root / f"{n}.jpg" for n in ("prog", "grey", "png", "cmyk", "rot", "trunc", "junk")]
    pic.save(files[0], "JPEG", progressive=True)
    pic.convert("L").save(files[1], "JPEG")
    pic.save(files[2], "PNG")
    pic.convert("CMYK").save(files[3], "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 8
    pic.save(files[4], "JPEG", exif=exif.tobytes())
    pic.save(files[5], "JPEG")
    files[5].write_bytes(files[5].read_bytes()[:900])
    files[6].write_bytes(b"\xff\xd8" + np.random.default_rng(3).bytes(3000))
    return files


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(model, items, config):  # type: ignore[no-untyped-def]
    batches = list(iter_embeddings(model, items, config))
    keys = np.concatenate([b.keys for b in batches])
    vecs = np.concatenate([b.vectors for b in batches])
    fails = [(k, f.reason) for b in batches for k, f in zip(b.failed_keys, b.failures)]
    return batches, keys, vecs, fails


def test_nvjpeg_is_available() -> None:
    assert device_decoder_error(CUDA) is None
    model = create_backbone("test_efficientnet", device=CUDA)
    hardware = jpeg_hardware(CUDA)
    auto = "pil" if hardware.available is False else "device"  # see test_jpeg_hardware
    assert resolve_decode(EmbedConfig(), CUDA, model.preprocess) == auto
    assert resolve_decode(EmbedConfig(decode="device"), CUDA, model.preprocess) == "device"


def test_jpeg_hardware() -> None:
    hardware = jpeg_hardware(CUDA)
    name = torch.cuda.get_device_name()
    print(f"{name}: hardware JPEG decoder {hardware.describe()}")
    assert hardware.available is not None, hardware.detail  # nvJPEG answered one way or other
    if any(gpu in name for gpu in ("A100", "H100", "H200")):  # NVJPG engines on these
        assert hardware.available and hardware.engines >= 1 and hardware.cores_per_engine >= 1
    assert jpeg_hardware("cuda:0") == hardware or torch.cuda.current_device() != 0


def test_cuda_decode_matches_cpu_pil_path(tree_corpus, tmp_path: Path) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))
    items = [(i, str(p)) for i, p in enumerate(paths)]
    for j, odd in enumerate(_odd_files(tmp_path)):
        items.insert(3 * j + 1, (1000 + j, str(odd)))
    cpu = create_backbone("effnet_lite0", device="cpu")
    gpu = create_backbone("effnet_lite0", device=CUDA)
    _, k_cpu, v_cpu, f_cpu = _embed(cpu, items, EmbedConfig(workers=0, batch_size=8, decode="pil"))
    batches, k_gpu, v_gpu, f_gpu = _embed(
        gpu, items, EmbedConfig(workers=2, batch_size=8, decode="device")
    )
    assert len(batches) == -(-len(items) // 8)
    assert k_gpu.tolist() == k_cpu.tolist()
    assert f_gpu == f_cpu == [(1005, "truncated"), (1006, "not_an_image")]
    # nvJPEG + bf16 autocast vs libjpeg + fp32. nvJPEG upsamples 4:2:0 chroma by nearest
    # neighbour, magnified 2.7x on these 96 px pins: mimicked on the CPU with pretrained
    # effnet_lite0 that alone gave a minimum cosine of 0.987 (mean 0.993), with +-1 level of
    # decoder rounding 0.977
    cos = _cosines(v_cpu, v_gpu)
    assert cos.mean() > 0.99 and cos.min() > 0.95


def test_many_batches_keep_order_through_the_pipeline(tree_corpus) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))
    items = [(i, str(paths[(7 * i) % len(paths)])) for i in range(400)]
    gpu = create_backbone("test_efficientnet", device=CUDA)
    _, k_pil, v_pil, _ = _embed(gpu, items, EmbedConfig(workers=2, batch_size=16, decode="pil"))
    _, k_dev, v_dev, _ = _embed(gpu, items, EmbedConfig(workers=2, batch_size=16, decode="device"))
    assert k_pil.tolist() == k_dev.tolist() == list(range(400))
    assert _cosines(v_pil, v_dev).min() > 0.98
    # The same image gives the same vector wherever it falls in the stream (no race).
    first: dict[str, np.ndarray] = {}
    for key, vec in zip(k_dev.tolist(), v_dev):
        ref = first.setdefault(items[key][1], vec)
        assert _cosines(vec[None], ref[None])[0] > 0.999, key


def test_transform_on_cuda_matches_cpu() -> None:
    pre = create_backbone("effnet_lite0").preprocess
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        for h, w in [(200, 300), (300, 200), (50, 70), (1024, 768), (200, 300)]
    ]
    cpu = transform_on_device(images, pre)
    gpu = transform_on_device([t.to(CUDA) for t in images], pre)
    assert gpu.device.type == "cuda"
    step = 1.0 / 255 / min(pre.std)
    diff = (gpu.cpu() - cpu).abs()  # float rounding may put a few values a level apart
    assert diff.max() <= 1.01 * step and diff.mean() <= 0.01 * step


def test_nvjpeg_pixels_close_to_libjpeg(tmp_path: Path) -> None:
    data = []
    for i, (w, h) in enumerate([(640, 480), (333, 500), (64, 64)]):
        path = tmp_path / f"{i}.jpg"
        # 4:4:4: nvJPEG upsamples 4:2:0 chroma by nearest neighbour, libjpeg smoothly
        _picture(w, h, seed=i).save(path, "JPEG", quality=90, subsampling=0)
        data.append(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    cpu = decode_jpegs(data, torch.device("cpu"))
    gpu = decode_jpegs(data, CUDA)
    for a, b in zip(cpu, gpu):
        assert a is not None and b is not None and b.device.type == "cuda"
        diff = (a.float() - b.cpu().float()).abs()
        assert diff.mean() < 2.0


def test_normalize_on_cuda_is_the_cpu_eval_transform() -> None:
    """uint8 crops normalised on the GPU are bit for bit the CPU's (and torchvision's): the
    divisors are device tensors, not numbers CUDA would turn into reciprocals."""
    pre = create_backbone("test_clip").preprocess  # CLIP's statistics, not round numbers
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)[None]  # every level
    cpu = pre.normalize(levels)
    assert torch.equal(pre.normalize(levels.to(CUDA)).cpu(), cpu)
    assert torch.equal(pre.normalize(levels.to(CUDA).float(), inplace=True).cpu(), cpu)


def test_bench_jpeg_on_cuda(tree_corpus) -> None:
    """`bench jpeg`'s device rows on nvJPEG: baseline files batched (the hardware engine where
    there is one), progressive ones one by one; both decode."""
    from pinsearch.eval.bench import bench_jpeg

    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    result = bench_jpeg(batch_size=8, device="cuda", items=items[:16])
    assert result.device.startswith("cuda") and result.images == 16
    device_rows = [r for r in result.rows if r["decoder"] == "decode_jpeg (cuda)"]
    assert [r["jpeg"] for r in device_rows] == ["baseline", "progressive"]
    assert all(r["images_per_s"] > 0 for r in device_rows)


def test_large_photos_are_decoded_in_pieces(tmp_path: Path) -> None:
    model = create_backbone("test_efficientnet", device=CUDA)
    transform = model.pixel_transform()
    paths = []
    for i, (w, h) in enumerate([(4000, 3000), (3000, 4000), (800, 600)]):
        paths.append(tmp_path / f"{i}.jpg")
        _picture(w, h, seed=i).save(paths[-1], "JPEG")
    batch = collate_prepared([prepare_image(i, str(p), transform) for i, p in enumerate(paths)])
    whole = decode_on_device(batch, model.preprocess, CUDA, transform)
    pieces = decode_on_device(batch, model.preprocess, CUDA, transform, pixel_budget=13_000_000)
    assert whole.keys.tolist() == pieces.keys.tolist() == [0, 1, 2]
    # Padded to other shapes, the matrix products may round differently: at most one 8-bit
    # level here and there.
    step = 1.0 / 255 / min(model.preprocess.std)
    diff = (whole.images.float() - pieces.images.float()).abs()
    assert diff.max() <= 1.01 * step and diff.mean() <= 0.01 * step


def test_auto_batch_size_on_cuda(tree_corpus) -> None:
    model = create_backbone("effnet_lite0", device=CUDA)
    config = EmbedConfig(batch_size=0, workers=0)
    size = resolve_batch_size(model.model, model.preprocess, config, CUDA, "device")
    assert 8 <= size <= 1024 and size % 8 == 0
    free, _ = torch.cuda.mem_get_info(CUDA)
    if free > 16 * 2**30:
        assert size >= 128  # a small model on a large GPU
    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    batches, keys, _, _ = _embed(model, items, config)
    assert len(batches) == 1 and len(keys) == len(items)


def test_compile_runs_and_agrees(tree_corpus) -> None:
    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    model = create_backbone("effnet_lite0", device=CUDA)
    # batches of 7: the short last one is padded (one compilation)
    _, k_eager, v_eager, _ = _embed(model, items, EmbedConfig(workers=0, batch_size=7))
    _, k_comp, v_comp, _ = _embed(model, items, EmbedConfig(workers=0, batch_size=7, compile=True))
    assert k_eager.tolist() == k_comp.tolist()
    assert _cosines(v_eager, v_comp).min() > 0.98
