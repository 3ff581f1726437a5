"""A weights-free, hand-crafted image descriptor (colour + texture).

:class:`ClassicDescriptor` is the kind of feature vector a nearest-neighbour lecture starts
from before any deep network appears: a joint HSV colour histogram, a few grey-level
statistics, Sobel gradient histograms and a local-binary-pattern texture histogram. It has
no learned parameters, so it can stand in for a pretrained backbone anywhere pinsearch
expects a ``torch.nn.Module`` that maps images to embeddings (offline demos, tests, and as a
baseline in evaluations).

All histogram blocks are L1-normalised and then square-rooted (the Hellinger mapping), so
that each block has unit L2 norm and plain Euclidean / cosine distances between descriptors
approximate the Hellinger distance between the underlying distributions.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["ClassicDescriptor", "rgb_to_hsv"]

_EPS = 1e-12
# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)
# Largest possible Sobel magnitude for an image with values in [0, 1]: |gx|, |gy| <= 4.
_MAX_SOBEL = 4.0 * math.sqrt(2.0)
# Gradient magnitudes below this are treated as zero; an 8-bit image's smallest real edge
# (one grey level, 1/255) has a Sobel magnitude of about 4e-3.
_MIN_GRADIENT = 1e-4
# (dy, dx) offsets of the 8 neighbours at radius 1, clockwise from the top-left corner;
# neighbour k sets bit k of the local binary pattern code.
_LBP_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Convert RGB images to HSV.

    Args:
        rgb: Float tensor of shape ``(..., 3, H, W)`` with values in ``[0, 1]``.

    Returns:
        Tensor of the same shape holding hue, saturation and value, each in ``[0, 1]``
        (hue is in ``[0, 1)`` and wraps around; it is 0 for grey pixels).

    Raises:
        ValueError: If the channel dimension is not of size 3.
    """
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"expected a tensor of shape (..., 3, H, W), got {tuple(rgb.shape)}")
    r, g, b = rgb.unbind(dim=-3)
    maxc = rgb.amax(dim=-3)
    minc = rgb.amin(dim=-3)
    delta = maxc - minc
    # Hue sector: which channel is the maximum decides the numerator and the offset.
    is_r = maxc == r
    is_g = ~is_r & (maxc == g)
    numerator = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    hue = torch.remainder((numerator / delta.clamp_min(_EPS) + offset) / 6.0, 1.0)
    hue = torch.where(delta > 0, hue, 0.0)
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(_EPS), 0.0)
    return torch.stack((hue, sat, maxc), dim=-3)


def _bin_index(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Map values in ``[0, 1]`` to integer bin indices in ``[0, n_bins)``."""
    return (values * n_bins).long().clamp_(0, n_bins - 1)


def _count_hist(idx: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-row counts of bin indices.

    Args:
        idx: Integer tensor ``(B, N)`` with values in ``[0, n_bins)``.
        n_bins: Number of bins.

    Returns:
        Float32 tensor ``(B, n_bins)`` of counts. Integer counting is exact, hence
        deterministic on every device.
    """
    batch = idx.shape[0]
    offsets = torch.arange(batch, device=idx.device).unsqueeze(1) * n_bins
    counts = torch.bincount((idx + offsets).reshape(-1), minlength=batch * n_bins)
    return counts.view(batch, n_bins).to(torch.float32)


def _weighted_hist(idx: torch.Tensor, weights: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-row histogram of bin indices weighted by ``weights``.

    Args:
        idx: Integer tensor ``(B, N)`` with values in ``[0, n_bins)``.
        weights: Float tensor ``(B, N)``.
        n_bins: Number of bins.

    Returns:
        Float32 tensor ``(B, n_bins)`` of summed weights.
    """
    batch = idx.shape[0]
    if idx.device.type == "cpu":
        # The CPU kernel accumulates sequentially, so the result is reproducible.
        offsets = torch.arange(batch).unsqueeze(1) * n_bins
        sums = torch.bincount(
            (idx + offsets).reshape(-1), weights=weights.reshape(-1), minlength=batch * n_bins
        )
        return sums.view(batch, n_bins).to(torch.float32)
    # Accelerators accumulate float weights with atomics (non-deterministic order); one
    # masked reduction per bin is cheap there and reproducible.
    return torch.stack(
        [torch.where(idx == k, weights, 0.0).sum(dim=1) for k in range(n_bins)], dim=1
    ).to(torch.float32)


def _hellinger(hist: torch.Tensor) -> torch.Tensor:
    """L1-normalise each row, then take the element-wise square root.

    Rows summing to zero (e.g. the orientation histogram of a perfectly flat image) stay zero.
    """
    total = hist.sum(dim=1, keepdim=True)
    return torch.sqrt(hist / total.clamp_min(_EPS))


class ClassicDescriptor(torch.nn.Module):
    """Colour histogram + texture statistics, no learned weights.

    The descriptor concatenates, in this order (see :attr:`layout`):

    * ``hsv``: joint HSV colour histogram with ``hsv_bins`` bins per channel;
    * ``grey_stats``: mean and standard deviation of the grey level (raw values in
      ``[0, 1]`` and ``[0, 0.5]``);
    * ``grad_magnitude``: histogram of Sobel gradient magnitudes (binned uniformly on the
      square root of the magnitude relative to its maximum, which spreads the heavy
      low-gradient mass of natural images over several bins);
    * ``grad_orientation``: histogram of unsigned gradient orientations in ``[0, pi)``,
      weighted by gradient magnitude;
    * ``lbp`` (if enabled): 256-bin histogram of 8-neighbour, radius-1 local binary patterns.

    Every histogram block is Hellinger-mapped (L1-normalised, then square-rooted), so it has
    unit L2 norm; the orientation block is all zeros for a perfectly flat image. Gradients
    and LBP codes are computed on interior pixels only (no padding).

    The module has no parameters or buffers: it runs on whatever device its input lives on
    and ``train()`` / ``eval()`` make no difference. The output is deterministic.

    Attributes:
        num_features: Output dimension, fixed by the bin settings.
        layout: Mapping from block name to the slice of the output it occupies.

    Example:
        >>> desc = ClassicDescriptor()
        >>> desc(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 418])
    """

    def __init__(
        self,
        hsv_bins: tuple[int, int, int] = (8, 4, 4),
        grad_bins: int = 16,
        lbp: bool = True,
    ) -> None:
        """Create the descriptor.

        Args:
            hsv_bins: Number of bins for hue, saturation and value.
            grad_bins: Number of bins of each gradient histogram (magnitude, orientation).
            lbp: Whether to append the 256-bin local-binary-pattern histogram.

        Raises:
            ValueError: If a bin count is not a positive integer or ``hsv_bins`` does not
                have exactly three entries.
        """
        super().__init__()
        bins = tuple(hsv_bins)
        if len(bins) != 3 or not all(_is_positive_int(b) for b in bins):
            raise ValueError(f"hsv_bins must be three positive integers, got {hsv_bins!r}")
        if not _is_positive_int(grad_bins):
            raise ValueError(f"grad_bins must be a positive integer, got {grad_bins!r}")
        self.hsv_bins: tuple[int, int, int] = (int(bins[0]), int(bins[1]), int(bins[2]))
        self.grad_bins = int(grad_bins)
        self.lbp = bool(lbp)

        sizes = [
            ("hsv", math.prod(self.hsv_bins)),
            ("grey_stats", 2),
            ("grad_magnitude", self.grad_bins),
            ("grad_orientation", self.grad_bins),
        ]
        if self.lbp:
            sizes.append(("lbp", 256))
        layout: dict[str, slice] = {}
        start = 0
        for name, size in sizes:
            layout[name] = slice(start, start + size)
            start += size
        self.layout = layout
        self.num_features = start

    def extra_repr(self) -> str:
        """Summarise the settings for ``repr()``."""
        return (
            f"hsv_bins={self.hsv_bins}, grad_bins={self.grad_bins}, lbp={self.lbp}, "
            f"num_features={self.num_features}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Describe a batch of images.

        Args:
            x: Float tensor ``(B, 3, H, W)`` of RGB values in ``[0, 1]`` (not
                ImageNet-normalised); values outside the range are clamped. ``H`` and ``W``
                must be at least 3.

        Returns:
            Float32 tensor ``(B, num_features)``.

        Raises:
            ValueError: If ``x`` has the wrong shape or is not a floating-point tensor.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a tensor of shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor in [0, 1], got dtype {x.dtype}")
        if x.shape[2] < 3 or x.shape[3] < 3:
            raise ValueError(f"images must be at least 3x3 pixels, got {tuple(x.shape[2:])}")

        with torch.no_grad():
            x = x.detach().to(torch.float32).clamp(0.0, 1.0)
            batch = x.shape[0]
            if batch == 0:
                return x.new_zeros((0, self.num_features))
            parts = [self._colour(x)]
            grey = (_LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]).unsqueeze(1)
            flat = grey.flatten(1)
            parts.append(torch.stack((flat.mean(dim=1), flat.std(dim=1, correction=0)), dim=1))
            parts.extend(self._gradients(grey))
            if self.lbp:
                parts.append(self._lbp(grey[:, 0]))
            return torch.cat(parts, dim=1)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Hellinger-mapped joint HSV histogram, ``(B, prod(hsv_bins))``."""
        hb, sb, vb = self.hsv_bins
        hsv = rgb_to_hsv(x)
        joint = (
            _bin_index(hsv[:, 0], hb) * (sb * vb)
            + _bin_index(hsv[:, 1], sb) * vb
            + _bin_index(hsv[:, 2], vb)
        )
        return _hellinger(_count_hist(joint.flatten(1), hb * sb * vb))

    def _gradients(self, grey: torch.Tensor) -> list[torch.Tensor]:
        """Hellinger-mapped Sobel magnitude and orientation histograms."""
        # Sobel by shifted differences (the valid 3x3 window, like an unpadded convolution):
        # exact float32 sums on any device, where cuDNN's convolution may round through TF32
        g = grey[:, 0]
        dx = g[:, :, 2:] - g[:, :, :-2]  # right - left
        dy = g[:, 2:, :] - g[:, :-2, :]  # below - above
        gx = (dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]).flatten(1)
        gy = (dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]).flatten(1)
        magnitude = torch.sqrt(gx * gx + gy * gy)
        # Rounding in the convolution leaves ~1e-7 residues on flat regions; without this
        # cut-off they would be normalised into a spurious orientation histogram.
        magnitude = torch.where(magnitude < _MIN_GRADIENT, 0.0, magnitude)

        relative = (magnitude / _MAX_SOBEL).clamp_(0.0, 1.0)
        mag_hist = _count_hist(_bin_index(torch.sqrt(relative), self.grad_bins), self.grad_bins)

        angle = torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi
        ori_hist = _weighted_hist(_bin_index(angle, self.grad_bins), magnitude, self.grad_bins)
        return [_hellinger(mag_hist), _hellinger(ori_hist)]

    @staticmethod
    def _lbp(grey: torch.Tensor) -> torch.Tensor:
        """Hellinger-mapped 256-bin local-binary-pattern histogram of ``(B, H, W)`` images."""
        height, width = grey.shape[1:]
        centre = grey[:, 1 : height - 1, 1 : width - 1]
        code = torch.zeros(centre.shape, dtype=torch.uint8, device=grey.device)
        for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
            neighbour = grey[:, 1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx]
            code |= (neighbour >= centre).to(torch.uint8) << bit
        return _hellinger(_count_hist(code.flatten(1).long(), 256))


def _is_positive_int(value: object) -> bool:
    """Whether ``value`` is an integer (not a bool) greater than zero."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
