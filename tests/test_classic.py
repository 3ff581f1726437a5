"""Tests for the weights-free classic descriptor."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinsearch.classic import ClassicDescriptor, rgb_to_hsv
from pinsearch.synth import draw_pin_image

HIST_BLOCKS = ("hsv", "grad_magnitude", "grad_orientation", "lbp")


def _to_tensor(image) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _solid(rgb: tuple[float, float, float], size: int = 32) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


@pytest.fixture(scope="module")
def desc() -> ClassicDescriptor:
    return ClassicDescriptor()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 48, 40, generator=gen)


def test_default_dimension_and_layout(desc: ClassicDescriptor) -> None:
    assert desc.num_features == 8 * 4 * 4 + 2 + 16 + 16 + 256 == 418
    assert list(desc.layout) == ["hsv", "grey_stats", *HIST_BLOCKS[1:]]
    covered = [i for s in desc.layout.values() for i in range(s.start, s.stop)]
    assert covered == list(range(desc.num_features))
    assert list(desc.parameters()) == []
    assert "num_features=418" in repr(desc)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"hsv_bins": (4, 2, 2), "grad_bins": 8, "lbp": False}, 16 + 2 + 8 + 8),
        ({"hsv_bins": (6, 3, 3), "grad_bins": 9, "lbp": True}, 54 + 2 + 9 + 9 + 256),
        ({"hsv_bins": [1, 1, 1], "grad_bins": 1, "lbp": False}, 1 + 2 + 1 + 1),
    ],
)
def test_custom_settings_shape(kwargs: dict, expected: int, batch: torch.Tensor) -> None:
    d = ClassicDescriptor(**kwargs)
    assert d.num_features == expected
    out = d(batch)
    assert out.shape == (batch.shape[0], expected)
    assert "lbp" in d.layout if kwargs["lbp"] else "lbp" not in d.layout


def test_output_shape_dtype_finite(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    out = desc(batch)
    assert out.shape == (4, desc.num_features)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out[:, desc.layout["hsv"]] >= 0).all()


def test_deterministic_and_batch_independent(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    first = desc(batch)
    assert torch.equal(first, desc(batch.clone()))
    assert torch.equal(first, desc.eval()(batch))
    single = torch.cat([desc(img.unsqueeze(0)) for img in batch])
    torch.testing.assert_close(single, first, atol=1e-3, rtol=0)


def test_histogram_blocks_have_unit_mass(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    out = desc(batch)
    for name in HIST_BLOCKS:
        block = out[:, desc.layout[name]]
        # Hellinger mapping: squares of a block are the L1-normalised histogram.
        torch.testing.assert_close(block.pow(2).sum(dim=1), torch.ones(4), atol=1e-5, rtol=0)


def test_grey_stats_match_numpy(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    stats = desc(batch)[:, desc.layout["grey_stats"]].numpy()
    grey = np.tensordot(np.array([0.299, 0.587, 0.114]), batch.numpy(), axes=([0], [1]))
    np.testing.assert_allclose(stats[:, 0], grey.reshape(4, -1).mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(stats[:, 1], grey.reshape(4, -1).std(axis=1), atol=1e-5)


def test_flat_image_histograms(desc: ClassicDescriptor) -> None:
    out = desc(_solid((0.2, 0.6, 0.3)).unsqueeze(0))[0]
    hsv = out[desc.layout["hsv"]]
    assert torch.count_nonzero(hsv) == 1 and hsv.max() == 1.0
    mag = out[desc.layout["grad_magnitude"]]
    assert mag[0] == 1.0 and mag[1:].abs().sum() == 0
    assert out[desc.layout["grad_orientation"]].abs().sum() == 0  # no gradient at all
    lbp = out[desc.layout["lbp"]]
    assert lbp[255] == 1.0 and lbp[:255].abs().sum() == 0  # all neighbours >= centre
    assert out[desc.layout["grey_stats"]][1] == pytest.approx(0.0, abs=1e-6)


def test_gradient_orientation_follows_edges() -> None:
    d = ClassicDescriptor(grad_bins=8, lbp=False)
    stripes = (torch.arange(32) // 4 % 2).float()
    vertical = stripes.view(1, 32).expand(32, 32)  # intensity varies along x
    horizontal = vertical.t()
    images = torch.stack([vertical.expand(3, 32, 32), horizontal.expand(3, 32, 32)])
    ori = d(images)[:, d.layout["grad_orientation"]]
    assert int(ori[0].argmax()) == 0  # gradient along x: angle 0
    assert int(ori[1].argmax()) == 4  # gradient along y: angle pi/2
    assert ori[0, 0] > 0.99 and ori[1, 4] > 0.99


def test_rgb_to_hsv_matches_colorsys() -> None:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 10, 10, generator=gen)
    pixels[:, 0, 0] = 0.5  # grey pixel: hue defined as 0
    pixels[:, 0, 1] = 0.0  # black pixel: saturation 0
    hsv = rgb_to_hsv(pixels)
    flat_rgb = pixels.reshape(3, -1).t().tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in flat_rgb]).t().reshape(3, 10, 10)
    torch.testing.assert_close(hsv, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_hsv(torch.rand(4, 8, 8))


def test_different_colours_differ_same_image_identical(desc: ClassicDescriptor) -> None:
    red, blue = _solid((0.9, 0.1, 0.1)), _solid((0.1, 0.2, 0.9))
    out = desc(torch.stack([red, blue, red]))
    assert torch.equal(out[0], out[2])
    assert torch.dist(out[0], out[1]) > 1.0  # disjoint colour histograms: distance sqrt(2)


def test_resized_copy_closer_than_other_category(desc: ClassicDescriptor) -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        scene = _to_tensor(draw_pin_image("outdoors", rng, size=160)).unsqueeze(0)
        other = _to_tensor(draw_pin_image("food_drink", rng, size=160)).unsqueeze(0)
        resized = F.interpolate(scene, size=(128, 128), mode="bilinear", antialias=True)
        feats = F.normalize(torch.cat([desc(scene), desc(resized), desc(other)]), dim=1)
        assert torch.dist(feats[0], feats[1]) < torch.dist(feats[0], feats[2])


def test_out_of_range_values_are_clamped(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    wild = batch * 3.0 - 1.0
    assert torch.equal(desc(wild), desc(wild.clamp(0.0, 1.0)))


def test_half_precision_input_gives_float32(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    out = desc(batch.half())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_empty_batch(desc: ClassicDescriptor) -> None:
    assert desc(torch.zeros(0, 3, 16, 16)).shape == (0, desc.num_features)


@pytest.mark.parametrize(
    "x",
    [
        torch.rand(3, 16, 16),
        torch.rand(2, 1, 16, 16),
        torch.rand(2, 4, 16, 16),
        torch.rand(2, 3, 2, 16),
        torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
    ],
)
def test_bad_input_raises(desc: ClassicDescriptor, x: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        desc(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hsv_bins": (8, 4)},
        {"hsv_bins": (8, 0, 4)},
        {"hsv_bins": (8, 4, 2.5)},
        {"grad_bins": 0},
        {"grad_bins": True},
    ],
)
def test_bad_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ClassicDescriptor(**kwargs)


def test_numpy_integer_bins_accepted() -> None:
    d = ClassicDescriptor(hsv_bins=tuple(np.array([4, 2, 2])), grad_bins=np.int64(4))
    assert d.num_features == 16 + 2 + 4 + 4 + 256


@pytest.mark.gpu
def test_cuda_matches_cpu(desc: ClassicDescriptor, batch: torch.Tensor) -> None:
    cpu = desc(batch)
    gpu = desc(batch.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu, desc(batch.cuda()))  # deterministic on the device too
    # CUDA divides by a Python float as a multiply by its reciprocal and its atan2 may differ
    # by an ulp: a pixel at a bin edge may change bins (about 3e-3 of a histogram entry)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=0)
    assert math.isfinite(float(gpu.sum()))
