"""Exact k-NN by blocked matrix products in torch, in float32, float16 or bfloat16.

FAISS' exact search (``Flat``) computes every query-vector score in float32. On a GPU with
tensor cores the same scan in float16 or bfloat16 moves half the bytes and runs the products on
the tensor cores: several times faster, at the price of scores rounded from 16-bit inputs.
:class:`TorchExact` is that reduced-precision path: the database lives on the device in the
chosen dtype, queries are scanned in blocks (products accumulate in float32, and on CUDA come
out in float32), and each block keeps a running top-k. ``refine`` optionally re-scores the best
``refine * k`` candidates of each query in float32 against full-precision vectors on the same
device, which makes the answer exact whenever the true top-k is among those candidates.

With refine on a GPU the candidate pass also keeps its scores in 16 bits (``fast_scores``):
the products are written in float16/bfloat16, which halves the bytes of every score block
written and then read by the selection; the refine pass makes the final scores float32 again.
Float16 scores that could overflow (vectors and queries whose norms multiply past float16's
range) fall back to float32 scores for that search. Each block's best are selected through
column groups (:func:`top_k_grouped`): one reduction pass instead of ``torch.topk``'s several
over a million columns. (Both are expected savings on a GPU, where a block's product and its
selection cost about the same; ``pinsearch bench exact`` measures each against its
alternative.)

On a CPU without 16-bit matrix units the products run in float32 over upcast blocks (16-bit
storage then only halves the memory); the reduced-precision speed-up is a GPU feature.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pinsearch.errors import DeviceError

__all__ = ["PRECISIONS", "SCORE_BLOCK_BYTES", "TorchExact", "top_k_grouped", "torch_device"]

_logger = logging.getLogger(__name__)

#: Storage/compute precisions of the exact scan.
PRECISIONS: tuple[str, ...] = ("float32", "float16", "bfloat16")

#: Bytes of one (queries x vectors) score block, per device type.
SCORE_BLOCK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}

#: Largest score bound kept in float16 (its maximum is 65,504; margin for rounding).
_FLOAT16_SAFE = 6.0e4


def torch_device(device: str) -> Any:
    """``auto``/``gpu`` -> cuda when torch sees one (``gpu`` insists), else cpu."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if device == "gpu":
        raise DeviceError("device='gpu' was asked for but torch sees no CUDA device")
    return torch.device("cpu")


#: Columns per group of :func:`top_k_grouped`.
GROUP_WIDTH = 64


def _top_k(scores: Any, k: int, largest: bool) -> tuple[Any, Any]:
    import torch

    return torch.topk(scores, k, dim=1, largest=largest)


def top_k_grouped(scores: Any, k: int, largest: bool = True) -> tuple[Any, Any]:
    """``torch.topk(scores, k, dim=1)`` over a wide block, by way of column groups.

    Each row's best ``k`` lie in its ``k`` groups with the best extreme (a group holding one
    of them has an extreme at least as good, and at most ``k - 1`` groups can beat it), so
    one reduction pass over the block (each group's max, or min) and a ``topk`` over
    ``n / GROUP_WIDTH`` extremes pick the ``k * GROUP_WIDTH`` columns to select from. The
    answer is ``topk``'s (ties may be broken otherwise); ``topk`` itself makes several radix
    passes over a million columns on a GPU, a partial sort of each row on a CPU.
    """
    import torch

    rows, n = scores.shape
    groups = n // GROUP_WIDTH
    if groups < 8 * k:  # narrow: the groups would save little
        return _top_k(scores, k, largest)
    body = scores[:, : groups * GROUP_WIDTH].view(rows, groups, GROUP_WIDTH)
    extreme = body.amax(2) if largest else body.amin(2)
    _, best = torch.topk(extreme, k, dim=1, largest=largest)
    width = torch.arange(GROUP_WIDTH, device=scores.device)
    cols = (best[:, :, None] * GROUP_WIDTH + width).reshape(rows, k * GROUP_WIDTH)
    if groups * GROUP_WIDTH < n:  # the columns past the last whole group: candidates all
        tail = torch.arange(groups * GROUP_WIDTH, n, device=scores.device)
        cols = torch.cat([cols, tail.expand(rows, -1)], 1)
    s, at = torch.topk(torch.gather(scores, 1, cols), k, dim=1, largest=largest)
    return s, torch.gather(cols, 1, at)


class TorchExact:
    """Exact inner-product / L2 k-NN over a fixed set of vectors, held by torch on a device.

    Args:
        vectors: (n, d) float32 vectors, already prepared (normalised for cosine).
        metric: ``ip`` (also used for cosine over normalised vectors) or ``l2`` (squared).
        precision: storage and product precision: ``float32``, ``float16`` or ``bfloat16``.
        device: ``auto``, ``cpu`` or ``gpu``.
        refine: re-score the best ``refine * k`` candidates in float32 (0 = off). Keeps a
            float32 copy of the vectors on the device.
        block_bytes: size of one block of scores (default: 1 GiB on CUDA, 128 MiB on CPU).
        fast_scores: keep the candidate pass's scores in the 16-bit ``precision`` (needs
            ``refine``, which re-scores them in float32). ``None``: on CUDA whenever it
            applies; on a CPU it saves nothing (16-bit products are upcast there).
        group_select: select each block's best through column groups
            (:func:`top_k_grouped`, the same answer) instead of one ``torch.topk``.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        metric: str = "ip",
        precision: str = "float16",
        device: str = "auto",
        refine: int = 0,
        block_bytes: int | None = None,
        fast_scores: bool | None = None,
        group_select: bool = True,
    ) -> None:
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if metric not in ("ip", "l2"):
            raise ValueError(f"TorchExact scores ip or l2, got {metric!r}")
        if refine < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        if fast_scores and (not refine or precision == "float32"):
            raise ValueError(
                "fast_scores needs a 16-bit precision and refine > 0 (the refine pass gives "
                f"the float32 scores back); got precision={precision!r}, refine={refine}"
            )
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.device = torch_device(device)
        self.metric = metric
        self.precision = precision
        self.refine = refine
        self.block_bytes = block_bytes or SCORE_BLOCK_BYTES.get(self.device.type, 1 << 27)
        self.dtype = getattr(torch, precision)
        self.n, self.dim = x.shape
        if precision == "float16" and x.numel():
            lo, hi = torch.aminmax(x)  # (no copy of the vectors)
            peak = max(-float(lo), float(hi))
            if peak > 65504:
                raise ValueError(
                    f"vector components up to {peak:.3g} overflow float16 (at most 65,504): "
                    "use precision bfloat16, or float32"
                )
        # copies of their own (copy=True: float32 on the CPU would otherwise share the
        # caller's memory, such as a FAISS index's vectors, which its next add may move)
        self.x = x.to(self.device, dtype=self.dtype, copy=True)
        # the norms the scan sees: those of the stored (rounded) vectors, for consistent L2
        self.sq = (self.x.float() ** 2).sum(1) if metric == "l2" else None
        self.full = x.to(self.device, copy=True) if refine else None
        if fast_scores is None:
            fast_scores = self.device.type == "cuda" and bool(refine) and precision != "float32"
        self.fast_scores = fast_scores
        self.group_select = group_select
        self.max_norm = 0.0  # the largest stored norm bounds every score: float16's overflow
        if fast_scores and precision == "float16" and len(x):
            norms = np.einsum("ij,ij->i", x.numpy(), x.numpy())  # no (n, d) temporary
            self.max_norm = float(np.sqrt(norms.max()))
        # 16-bit products are only fast where the hardware has 16-bit matrix units
        self._upcast = self.device.type == "cpu" and precision != "float32"
        # float32 output straight from 16-bit CUDA products: torch.mm's out_dtype (torch 2.8+);
        # before it, the product is rounded to 16 bits and then widened
        self._out_dtype = self.device.type == "cuda" and torch.__version__ >= (2, 8)

    @property
    def nbytes(self) -> int:
        """Device bytes held (16-bit copy plus the float32 copy when refining)."""
        size = self.x.element_size() * self.x.numel()
        return size + (4 * self.full.numel() if self.full is not None else 0)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows per query: (scores, positions), like ``faiss.Index.search``.

        Scores are inner products (higher first) or squared L2 distances (lower first);
        positions are -1 where fewer than ``k`` vectors exist. ``allowed``: a boolean mask
        over the rows; the others are scanned but never returned (a filter).
        """
        import torch

        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (nq, {self.dim}), got {q.shape}")
        nq = len(q)
        kk = min(k, self.n)
        mask = None
        if allowed is not None:
            if allowed.shape != (self.n,):
                raise ValueError(f"allowed must be a mask of {self.n} rows, got {allowed.shape}")
            kk = min(kk, int(allowed.sum()))
            mask = torch.from_numpy(np.asarray(allowed, dtype=bool)).to(self.device)
        if nq == 0 or kk == 0:
            return np.full((nq, k), np.nan, np.float32), np.full((nq, k), -1, np.int64)
        kc = min(self.n, kk * self.refine) if self.refine else kk
        qt = torch.from_numpy(q).to(self.device)
        score_dtype = self._score_dtype(q)
        # bytes per score: 16-bit ip scores are written as such; l2 ones pass through float32
        size = 2 if score_dtype != torch.float32 and self.sq is None else 4
        rows = max(1, min(nq, self.block_bytes // (size * self.n)))
        if self.refine:  # the refine pass gathers (rows, kc, dim) float32 candidates
            rows = max(1, min(rows, self.block_bytes // (4 * kc * self.dim)))
        cols = min(self.n, max(kc, self.block_bytes // (size * rows)))
        out_s = torch.empty(nq, kk, dtype=torch.float32, device=self.device)
        out_i = torch.empty(nq, kk, dtype=torch.int64, device=self.device)
        largest = self.metric == "ip"
        with torch.inference_mode():
            for a in range(0, nq, rows):
                qb = qt[a : a + rows]
                s, i = self._scan(qb, kc, cols, largest, mask, score_dtype)
                if self.refine:
                    s, i = self._rescore(qb, i, kk, largest, mask)
                out_s[a : a + rows], out_i[a : a + rows] = s, i
        scores, pos = out_s.cpu().numpy(), out_i.cpu().numpy()
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=np.nan)
            pos = np.pad(pos, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, pos

    def _score_dtype(self, q: np.ndarray) -> Any:
        """The candidate pass's score type for these queries: the 16-bit storage type with
        ``fast_scores`` unless float16 could overflow, else float32."""
        import torch

        if not self.fast_scores:
            return torch.float32
        if self.dtype == torch.float16:
            qmax = float(np.sqrt(np.einsum("ij,ij->i", q, q).max()))
            bound = qmax * self.max_norm if self.metric == "ip" else (qmax + self.max_norm) ** 2
            if not bound < _FLOAT16_SAFE:
                _logger.debug("scores up to %.3g: float32 candidate scores", bound)
                return torch.float32
        return self.dtype

    def _scores(self, qb: Any, lo: int, hi: int, mask: Any = None, out: Any = None) -> Any:
        """Scores (``out``: their dtype, default float32) of a query block against rows
        lo:hi (ip, or squared l2); rows outside ``mask`` score worst."""
        import torch

        out = torch.float32 if out is None else out
        xb = self.x[lo:hi]
        if self._upcast:
            s = qb @ xb.float().T
        elif self.dtype == torch.float32:
            s = qb @ xb.T
        elif self.sq is None and out == self.dtype:  # accumulated in float32, written in 16
            s = qb.to(self.dtype) @ xb.T
        elif self._out_dtype:
            s = torch.mm(qb.to(self.dtype), xb.T, out_dtype=torch.float32)
        else:
            s = (qb.to(self.dtype) @ xb.T).float()
        if self.sq is not None:  # squared l2: |x|^2 - 2 q.x, plus |q|^2 for float32 scores
            s = self.sq[lo:hi] - 2 * s
            if out == torch.float32:  # 16-bit candidates: |q|^2 would round away the ranking
                s += (qb * qb).sum(1, keepdim=True)
        s = s.to(out)
        if mask is not None:  # filtered out: never among the best
            s.masked_fill_(~mask[lo:hi], -torch.inf if self.metric == "ip" else torch.inf)
        return s

    def _scan(
        self, qb: Any, k: int, cols: int, largest: bool, mask: Any, out: Any
    ) -> tuple[Any, Any]:
        import torch

        select = top_k_grouped if self.group_select else _top_k
        best_s = best_i = None
        for lo in range(0, self.n, cols):
            hi = min(self.n, lo + cols)
            scores = self._scores(qb, lo, hi, mask, out)
            s, i = select(scores, min(k, hi - lo), largest)
            i = i + lo
            if best_s is None:
                best_s, best_i = s, i
                continue
            s = torch.cat([best_s, s], 1)
            i = torch.cat([best_i, i], 1)
            best_s, at = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
            best_i = torch.gather(i, 1, at)
        return best_s, best_i

    def _rescore(
        self, qb: Any, cand: Any, k: int, largest: bool, mask: Any = None
    ) -> tuple[Any, Any]:
        import torch

        vecs = self.full[cand]  # (rows, kc, d) float32
        s = torch.einsum("rd,rcd->rc", qb, vecs)
        if self.metric == "l2":
            s = (qb * qb).sum(1, keepdim=True) - 2 * s + (vecs * vecs).sum(2)
        if mask is not None:  # candidates of a filtered scan past the allowed rows
            s.masked_fill_(~mask[cand], -torch.inf if largest else torch.inf)
        s, at = torch.topk(s, k, dim=1, largest=largest)
        return s, torch.gather(cand, 1, at)
