"""A FAISS index over pin vectors, with its id map, GPU placement and self-describing files.

FAISS holds vectors at positions ``0..ntotal-1`` in the order they were added; ``ids`` maps each
position to its pin key. This works the same for every index type on CPU and GPU. On disk an
index is three files written atomically: ``NAME.faiss`` (the CPU index), ``NAME.ids.npy`` and
``NAME.json`` (how it was made, with checksums, checked when it is loaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import operator
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch._version import __version__
from pinsearch.errors import BackboneMismatchError, DeviceError, IndexFileError
from pinsearch.indexes.exact import TorchExact
from pinsearch.indexes.gpu import (
    GPU_LOCK,
    GPU_MAX_NPROBE,
    GPU_PQ_CODES,
    gpu_count,
    gpu_parts,
    gpu_room,
    gpu_settings,
    ivf_of,
    shards_of,
    to_cpu,
    to_gpu,
)
from pinsearch.indexes.spec import (
    IndexConfig,
    choose_factory,
    default_memory_budget,
    faiss_metric,
)

__all__ = [
    "INDEX_FORMAT_VERSION",
    "PinIndex",
    "build_index",
    "file_sha256",
    "fsync_dir",
    "fsync_file",
    "index_files",
    "load_index",
    "replace_durably",
]

_logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
# Most (query, neighbour) entries one post-filtered search holds at once (~200 MB).
_POST_FILTER_ENTRIES = 1 << 24


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file pinsearch wrote (``np.savez``: members stored as they
    are, so none holds more than the file's size).

    Raises:
        ValueError: a member is compressed, naming the file: pinsearch never writes one, and
            a few kilobytes of a crafted one can inflate past the machine's memory.
    """
    import zipfile

    with zipfile.ZipFile(path) as zf:
        packed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(
            f"{path} holds compressed arrays {packed[:3]}: pinsearch writes them uncompressed, "
            "so the file was altered"
        )
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    with path.open("rb") as fh:
        return _stream_sha256(fh, chunk)


def _stream_sha256(fh: Any, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of an open binary file from its start (left at its start again)."""
    h = hashlib.sha256()
    fh.seek(0)
    while block := fh.read(chunk):
        h.update(block)
    fh.seek(0)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # an error here is one a durable write must not hide
    finally:
        os.close(fd)


def inside_store(root: Path, folder: Path) -> bool:
    """Whether ``folder`` lies inside the store at ``root`` as it is reached (no link leads
    out): only there may a writer delete the files no record names. A store someone sent
    could link its ``heads`` or ``indexes`` folder to any folder of the receiver's."""
    return folder.resolve().is_relative_to(root.resolve())


def temp_beside(path: Path) -> Path:
    """``path`` + ``.tmp``, to write and then :func:`replace_durably`: whatever lies there is
    removed first (a link left there, in a store someone sent, would have the write go
    wherever it leads)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    return tmp


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a written temporary file over ``path`` so that a power cut leaves the old file or
    the new one, whole: its data flushed before the rename, the rename flushed after."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():  # FAISS would file them anywhere, a 16-bit scan ranks NaN first for every query
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{rows.size} of {len(x)} vectors are not finite (NaN or infinity), the first at "
            f"row {rows[0]}"
        )
    return x


def unique_sorted(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)``, without its sort when ``a`` is already strictly increasing (a
    filter's keys usually are: a hash-and-sort of 300k keys costs ~100 ms per query)."""
    a = np.asarray(a)
    return a if a.size < 2 or bool((a[1:] > a[:-1]).all()) else np.unique(a)


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class _EditLock:
    """Searches at once, or one edit alone: FAISS indexes take concurrent searches but no
    search while an ``add`` or ``remove`` reallocates their arrays. A waiting edit goes
    before searches that come after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._searches = 0
        self._editing = False
        self._edits_waiting = 0

    def __getstate__(self) -> dict[str, Any]:  # a copied (pickled) index: a lock of its own
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    @contextlib.contextmanager
    def searching(self) -> Any:
        with self._cond:
            while self._editing or self._edits_waiting:
                self._cond.wait()
            self._searches += 1
        try:
            yield
        finally:
            with self._cond:
                self._searches -= 1
                if not self._searches:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def editing(self) -> Any:
        with self._cond:
            self._edits_waiting += 1
            while self._editing or self._searches:
                self._cond.wait()
            self._edits_waiting -= 1
            self._editing = True
        try:
            yield
        finally:
            with self._cond:
                self._editing = False
                self._cond.notify_all()


@dataclass
class PinIndex:
    """A built index: the FAISS object, its pin-key map, and its description."""

    index: Any  # faiss.Index, on CPU or GPU
    ids: np.ndarray  # int64 pin key of each position
    config: IndexConfig
    factory: str  # resolved factory string
    dim: int
    backbone: str = ""  # the embedding the vectors come from
    build_seconds: float = 0.0
    on_gpu: bool = False
    _cpu: Any = field(default=None, repr=False)  # cached CPU copy of a GPU index
    _order: tuple[np.ndarray, np.ndarray] | None = field(
        default=None, repr=False
    )  # argsort, sorted
    _exact: TorchExact | None = field(default=None, repr=False)  # reduced-precision scan
    # where it searches when not where it was saved for (a GPU index loaded without a GPU)
    _device: str | None = field(default=None, repr=False)
    _edits: _EditLock = field(default_factory=_EditLock, repr=False, compare=False)

    @property
    def reduced_precision(self) -> bool:
        """True when unfiltered searches run the torch float16/bfloat16 exact scan."""
        return _torch_exact(self.config, self.factory)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self.index.ntotal)

    @property
    def higher_is_better(self) -> bool:
        """True for similarities (cosine, ip), False for distances (l2, l1)."""
        return self.config.metric in ("cosine", "ip")

    def inert_settings(self, config: IndexConfig) -> list[str]:
        """The search-time settings ``config`` asks for that would change nothing here:
        ``nprobe`` without IVF lists, ``ef_search`` without an HNSW graph, ``precision``
        on anything but an exact Flat scan, ``refine`` with neither a refine wrapper nor a
        16-bit scan (``config.precision``)."""
        ivf, hnsw, refines = _structure(self.index)  # the placed index: no GPU-to-CPU copy
        flat = self.factory == "Flat" and self.config.metric != "l1"
        inert = []
        if config.nprobe is not None and not ivf:
            inert.append("nprobe (no IVF lists)")
        if config.ef_search is not None and not hnsw:
            inert.append("ef_search (no HNSW graph)")
        if config.precision != "float32" and not flat:
            inert.append("precision (16-bit scans are for exact Flat indexes)")
        if config.refine and not refines and not (flat and config.precision != "float32"):
            inert.append("refine (needs a refine wrapper like ...,RFlat, or a 16-bit scan)")
        return inert

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Cast to float32 and normalise when the metric is cosine."""
        x = _as_f32(x)
        if x.shape[1] != self.dim:
            raise BackboneMismatchError(
                f"vectors have dim {x.shape[1]}, index {self.backbone or ''!s} expects {self.dim}"
            )
        return _normalize(x) if self.config.metric == "cosine" else x

    def add(self, vectors: np.ndarray, keys: np.ndarray, batch: int = 65536) -> None:
        """Append vectors of new pins (trained indexes only; no rebuild needed), in batches of
        ``batch`` rows; searches from other threads may run between batches.

        All or nothing for the index types that can remove vectors (:meth:`removable`: every
        type FAISS-GPU holds): an add stopped part-way is undone, and the index, its kept CPU
        copy and its ids are as they were. HNSW, refine and fast-scan indexes keep the rows
        taken (logged), and take no further add until rebuilt (``pinsearch repair``).

        A GPU index takes them on the GPU, except (placed again after, from a fresh CPU copy
        that takes them) a Flat index sharded over several GPUs (FAISS's Flat shards number
        their rows on from shard to shard and take one ``add`` in their life) and a float16
        Flat index (its CPU copy holds the vectors as given, see :meth:`cpu_index`). An add
        FAISS-GPU refuses part-way (out of memory) is undone and done on a CPU copy.

        Raises:
            DeviceError: (device ``gpu``, an index added on a CPU copy) the index with the new
                vectors cannot be placed on the GPUs again; it holds them, on the CPU.
            IndexFileError: an earlier add left rows this index cannot remove.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(keys)} pin keys")
        if len(keys) == 0:
            return
        if self.ntotal != len(self.ids):
            raise IndexFileError(
                f"index {self.factory!r} holds {self.ntotal} vectors for {len(self.ids)} pin "
                "keys (an add stopped part-way); pinsearch repair rebuilds it"
            )
        clash = np.intersect1d(keys, self.ids)
        if clash.size:
            raise ValueError(f"pin keys already in the index: {clash[:5].tolist()}")
        unique, counts = np.unique(keys, return_counts=True)
        if unique.size != keys.size:
            raise ValueError(f"pin keys given more than once: {unique[counts > 1][:5].tolist()}")
        self.prepare(vectors[:1])  # a wrong shape is refused here, before any batch
        if not (self.on_gpu and self._adds_on_cpu()):
            was_gpu = self.on_gpu
            try:
                for start in range(0, len(keys), batch):
                    part = self.prepare(vectors[start : start + batch])
                    # per batch: searches go on between them
                    with self._edits.editing(), self._gpu_turn():
                        self.index.add(part)
            except Exception as exc:
                with self._edits.editing():
                    self._undo_partial_add()
                if not (was_gpu and isinstance(exc, RuntimeError)):
                    raise
                _logger.warning(
                    "index %s: FAISS-GPU did not take %d vectors (%s); adding them on a CPU copy",
                    self.factory, len(keys), _faiss_reason(exc),
                )  # fmt: skip
                if not self.on_gpu:  # placed again above, it stayed on the CPU
                    self.add(vectors, keys, batch)
                    if self.config.device == "gpu":
                        raise DeviceError(
                            f"index {self.factory}: FAISS-GPU could not take it back; it holds "
                            "the new vectors, on the CPU"
                        ) from exc
                    return
            else:
                self._added(keys)
                return
        # a CPU copy of its own takes them (no lock: searches go on with the placed index)
        target = self._fresh_cpu_copy()
        for start in range(0, len(keys), batch):
            target.add(self.prepare(vectors[start : start + batch]))
        with self._edits.editing():
            self._added(keys)
            self._place_again(target)
        if not self._rounds_vectors():
            self._cpu = None

    def _adds_on_cpu(self) -> bool:
        """Whether this GPU index takes new vectors on a CPU copy, placed again after."""
        shards = shards_of(self.index)
        return self._rounds_vectors() or (shards is not None and bool(shards.successive_ids))

    def _rounds_vectors(self) -> bool:
        """Whether the GPU copy holds the vectors in float16 only (a Flat index placed with
        ``fp16``): FAISS-GPU keeps no float32 copy of them, and one copied back would be
        rounded; the CPU copy is kept instead, as the vectors of record."""
        return self.on_gpu and self.config.fp16 and not _structure(self.index)[0]

    def _fresh_cpu_copy(self) -> Any:
        """A CPU copy of this GPU index of its own (the kept one, cloned, when there is one)."""
        import faiss

        return faiss.clone_index(self._cpu) if self._cpu is not None else to_cpu(self.index)

    def _added(self, keys: np.ndarray) -> None:
        """Record the keys of vectors just added (in their order)."""
        self._order = None
        self._exact = None
        self.ids = np.concatenate([self.ids, keys])
        if not self._rounds_vectors():
            self._cpu = None  # not kept: a host copy of every vector, made again when needed

    def _undo_partial_add(self) -> None:
        """Remove the rows an add stopped part-way left beyond the id map: on a GPU index
        from a CPU copy, placed again (on the CPU if that fails); an index without sound
        removal (HNSW, refine, fast-scan) keeps them, and the log says to rebuild it."""
        n = len(self.ids)
        if self.ntotal <= n:
            return
        if self.on_gpu:
            cpu = self._fresh_cpu_copy()
            _drop_rows(cpu, n)
            # FAISS-GPU stopped mid-add may leave its count, or list entries, as they fell
            _check_positions(cpu, n, self.factory)
            with contextlib.suppress(DeviceError):  # the add's own error is the one raised
                self._place_again(cpu)
        elif self.removable():
            _drop_rows(self.index, n)
        else:
            _logger.error(
                "index %s: %d vectors of a stopped add cannot be removed from it; rebuild it "
                "(pinsearch repair)", self.factory, self.ntotal - n,
            )  # fmt: skip

    def removable(self) -> bool:
        """Whether :meth:`remove` works in place for this index type.

        Flat-code indexes (Flat, PQ, SQ, LSH) and IVF indexes with in-memory lists (IVF-Flat,
        IVF-PQ, IVF-SQ; also behind a pre-transform such as OPQ or PCA) do. HNSW and refine
        wrappers have no removal in FAISS, and fast-scan's removal is unsound: those are
        rebuilt instead.
        """
        import faiss

        cpu = faiss.downcast_index(self.cpu_index())
        if isinstance(cpu, faiss.IndexPreTransform):
            cpu = faiss.downcast_index(cpu.index)
        if isinstance(cpu, faiss.IndexFlatCodes):
            return True
        if not isinstance(cpu, faiss.IndexIVF) or cpu.direct_map.type != faiss.DirectMap.NoMap:
            return False
        if isinstance(cpu, faiss.IndexIVFPQR | faiss.IndexIVFFlatDedup):
            return False  # refinement codes, a table of duplicates: no removal of their own
        # Only plain in-memory lists: FAISS 1.15 removes from fast-scan's packed blocks
        # (BlockInvertedLists) entry by entry and leaves vectors added afterwards unfindable.
        return isinstance(faiss.downcast_InvertedLists(cpu.invlists), faiss.ArrayInvertedLists)

    def remove(self, keys: np.ndarray) -> int:
        """Remove pins from the index in place (no retraining, no re-adding).

        FAISS compacts flat-code indexes itself; IVF lists keep the positions they were given,
        so the positions above each removed one are shifted down here, list by list. Either
        way positions stay ``0..ntotal-1`` in the id map's order. A GPU index is changed on
        its CPU copy and placed again.

        Args:
            keys: pin keys to remove (keys not in the index are ignored).

        Returns:
            The number of vectors removed.

        Raises:
            ValueError: this index type cannot remove in place (see :meth:`removable`).
        """
        import faiss

        positions = np.unique(self.positions_of(keys))
        if positions.size == 0:
            return 0
        if not self.removable():
            raise ValueError(f"index {self.factory!r} cannot remove vectors in place")
        with self._edits.editing():  # a CPU index is edited in place: no search meanwhile
            cpu = self.cpu_index()
            removed = cpu.remove_ids(faiss.IDSelectorBatch(positions))
            if removed != positions.size:
                raise IndexFileError(
                    f"index {self.factory!r}: removed {removed} of {positions.size} vectors; "
                    "pinsearch repair rebuilds it"
                )
            ivf = ivf_of(cpu)
            if ivf is not None:
                _shift_list_ids(ivf, positions)
            self.ids = np.delete(self.ids, positions)
            self._order = self._exact = None
            self._place_again(cpu)
        return int(removed)

    def _place_again(self, cpu: Any) -> None:
        """Make ``cpu`` (changed from this index's CPU copy) the index, where this one lived.
        Whole on the CPU first: the old GPU copy is freed before the new one is placed (its
        memory counts as free again), and a placement that fails leaves a usable index, on
        the CPU (a warning; under device ``gpu`` a :class:`DeviceError`)."""
        with self._gpu_turn():  # the GPU copy is freed here: FAISS-GPU's resources are shared
            was_gpu, self.index, self.on_gpu, self._cpu = self.on_gpu, cpu, False, None
        if not was_gpu:
            return
        try:
            self.index, self.on_gpu = _place(cpu, self.config, self.factory)
        except DeviceError:  # no room, under device gpu: it holds everything, on the CPU
            raise
        except RuntimeError as exc:  # FAISS-GPU refused the copy (out of memory)
            reason = f"FAISS-GPU could not place it ({_faiss_reason(exc)})"
            if self.config.device == "gpu":
                raise DeviceError(f"index {self.factory}: {reason}; it is on the CPU") from exc
            _logger.warning("index %s stays on the CPU: %s", self.factory, reason)
        self._cpu = cpu if self.on_gpu else None

    def _params(self, selector: Any = None, k: int = 0) -> Any:
        """Search parameters for this index on the CPU, for ``k`` neighbours: nprobe /
        efSearch and the selector."""
        if self.on_gpu:
            return None  # GPU indexes get nprobe when placed (_place) and take no selector
        return _search_params(self.index, self.config, selector, k)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        host_copy: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``k`` neighbours of each query (from any thread: calls into FAISS-GPU take
        turns).

        Args:
            queries: (nq, dim) vectors (normalised here when the metric is cosine).
            k: neighbours per query.
            allowed: if given, only these pin keys may be returned.
            host_copy: a GPU index may answer a filter its GPU copy cannot (one too rare for
                its 2,048-deep answer) from a CPU copy, made once and kept (host memory for
                the whole index). False: rows the GPU copy leaves short of ``k`` allowed hits
                are returned short (-1), for callers that fill them otherwise.

        Returns:
            ``(scores, keys)``, each (nq, k); missing results have key -1 and score NaN.
            Scores are similarities for cosine/ip and distances (squared for l2) otherwise.
        """
        k = operator.index(k)  # (a numpy integer: FAISS's binding takes a Python int)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = self.prepare(queries)
        with self._edits.searching():  # not while an add or remove changes the index
            k_eff = min(k, self.ntotal)
            if k_eff == 0:
                return _empty(len(q), k)
            if allowed is None:
                d, pos = self._deepen(q, *self._raw_search(q, k_eff, self._params(k=k_eff)))
            else:
                d, pos = self._filtered_search(q, k_eff, allowed, host_copy)
            return self._to_keys(d, pos, k)

    def __del__(self) -> None:
        # A FAISS-GPU index frees its memory through the shared resources too: whichever
        # thread collects this object drops the GPU copy under the GPU lock (the last holder
        # frees it; a shutting-down interpreter may already have lost the lock).
        if self.__dict__.get("on_gpu"):
            with contextlib.suppress(Exception), GPU_LOCK:
                self.index = None

    def _gpu_turn(self) -> Any:
        """The process's GPU lock while this index lives on the GPU: FAISS-GPU's shared
        resources take one call at a time (a no-op for CPU indexes, searched concurrently
        except while an add or remove edits them: ``_edits``)."""
        return GPU_LOCK if self.on_gpu else contextlib.nullcontext()

    def _raw_search(self, q: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.reduced_precision:
            return self._exact_engine().search(q, k)
        if self.on_gpu and k > GPU_MAX_NPROBE:  # the same limit holds for k
            cpu = self.cpu_index()
            return cpu.search(q, k, params=_search_params(cpu, self.config, k=k))
        with self._gpu_turn():
            return self.index.search(q, k, params=params)

    def _deepen(
        self, q: np.ndarray, d: np.ndarray, pos: np.ndarray, selector: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fill the rows an IVF search left short of ``k`` hits.

        IVF visits ``nprobe`` lists only: when they hold fewer than ``k`` vectors (small or
        unbalanced lists, a large ``k``, or few allowed pins with a ``selector``) FAISS pads
        the answer. Those queries are searched again, visiting four times more lists each
        round, until they have ``k`` hits or every list was visited. Other index types answer
        as they are.
        """
        short = np.flatnonzero((pos < 0).any(axis=1))
        if short.size == 0 or self.reduced_precision or not _structure(self.index)[0]:
            return d, pos
        k = pos.shape[1]
        d, pos = d.copy(), pos.copy()
        nlist = _nlist(self.index)
        nprobe = _nprobe(self.config, nlist)
        if self.on_gpu and selector is None and k <= GPU_MAX_NPROBE:  # deeper on the GPU copy
            # first, up to its limit (it takes no selector)
            import faiss

            nprobe = placed = min(nprobe, GPU_MAX_NPROBE)
            space, limit = faiss.GpuParameterSpace(), min(nlist, GPU_MAX_NPROBE)
            with GPU_LOCK:  # the raised nprobe is seen by no other search
                try:
                    while short.size and nprobe < limit:
                        nprobe = min(nprobe * 4, limit)
                        space.set_index_parameter(self.index, "nprobe", nprobe)
                        d[short], pos[short] = self.index.search(q[short], k)
                        short = short[(pos[short] < 0).any(axis=1)]
                finally:
                    space.set_index_parameter(self.index, "nprobe", placed)
        if short.size == 0:
            return d, pos
        cpu = self.cpu_index()  # past the GPU's nprobe limit: the CPU copy
        while short.size and nprobe < nlist:
            nprobe = min(nprobe * 4, nlist)
            params = _search_params(cpu, replace(self.config, nprobe=nprobe), selector, k=k)
            d[short], pos[short] = cpu.search(q[short], k, params=params)
            short = short[(pos[short] < 0).any(axis=1)]
        return d, pos

    def _filtered_search(
        self, q: np.ndarray, k: int, allowed: np.ndarray, host_copy: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        positions = unique_sorted(self.positions_of(allowed))
        if positions.size == 0:
            return _empty(len(q), k)
        k = min(k, positions.size)
        bitmap = np.zeros(self.ntotal, dtype=bool)
        bitmap[positions] = True
        if self.reduced_precision and self._exact_engine().device.type != "cpu":
            # the 16-bit scan, masked: a full scan, fast on a GPU (a CPU scans only the
            # allowed rows through FAISS's selector below, much less for small filters)
            return self._exact_engine().search(q, k, allowed=bitmap)
        target = self
        if self.on_gpu:
            # FAISS-GPU takes no id selector. While the filter's share of the index lets the
            # GPU's deepest answer (k <= 2,048) hold k allowed hits, search there and keep
            # them (the first k allowed of a ranking are the filtered top k); else the CPU copy.
            if not host_copy or self._gpu_answer_holds(k, positions.size):
                d, pos = self._post_filtered_search(q, k, bitmap, max_depth=GPU_MAX_NPROBE)
                if not host_copy or (pos >= 0).all():
                    return d, pos
            target = replace(self, index=self.cpu_index(), on_gpu=False)
        packed = np.packbits(bitmap, bitorder="little")
        selector = faiss.IDSelectorBitmap(packed.size, faiss.swig_ptr(packed))  # n: bytes
        try:
            d, pos = target.index.search(q, k, params=target._params(selector, k))
            d, pos = target._deepen(q, d, pos, selector)  # (IVF lists short of allowed pins)
        except RuntimeError as exc:
            # Some index types take no id selector (PQ, LSH, fast-scan, residual
            # quantisers, NSG): ask the index for more and keep the allowed hits.
            _logger.debug("index %s refuses a selector (%s): filtering after", self.factory, exc)
            d, pos = target._post_filtered_search(q, k, bitmap)
        del packed  # the selector reads this buffer during the search above
        return d, pos

    def _gpu_answer_holds(self, k: int, n_allowed: int) -> bool:
        """Whether an unfiltered answer of the GPU copy, at most 2,048 deep, may be expected
        to hold ``k`` of ``n_allowed`` allowed pins (twice their share's expectation)."""
        return max(4 * k, 2 * k * self.ntotal // max(n_allowed, 1)) <= GPU_MAX_NPROBE

    def filter_copies_to_cpu(self, k: int, n_allowed: int) -> bool:
        """Whether a search for ``k`` hits among ``n_allowed`` pins this index holds would
        make (or use) a CPU copy of it: it lives on the GPU, FAISS-GPU takes no id selector,
        and the filter is too rare for the GPU copy's deepest answer. Callers holding the pins'
        vectors can scan the allowed ones exactly instead (:class:`pinsearch.search.PinSearcher`
        does). (16-bit scans are never placed with FAISS: they filter by a mask.)"""
        return (
            self.on_gpu
            and n_allowed > 0
            and not self._gpu_answer_holds(min(k, n_allowed), n_allowed)
        )

    def _post_filtered_search(
        self, q: np.ndarray, k: int, bitmap: np.ndarray, max_depth: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` allowed hits, from unfiltered searches growing until every query has
        ``k`` of them (or the index has nothing more to give, or ``max_depth`` results were
        asked for: rows short of ``k`` are padded with -1)."""
        deepest = min(self.ntotal, max_depth or self.ntotal)
        rows = max(1, _POST_FILTER_ENTRIES // deepest)  # bounds the memory of deep searches
        if len(q) > rows:
            parts = [
                self._post_filtered_search(q[i : i + rows], k, bitmap, max_depth)
                for i in range(0, len(q), rows)
            ]
            return np.concatenate([d for d, _ in parts]), np.concatenate([p for _, p in parts])
        share = max(int(bitmap.sum()), 1) / self.ntotal
        depth = min(deepest, max(4 * k, int(2 * k / share)))
        while True:
            with self._gpu_turn():
                d, pos = self.index.search(q, depth, params=self._params(k=depth))
            keep = (pos >= 0) & bitmap[np.clip(pos, 0, None)]
            if depth >= deepest or (keep.sum(axis=1) >= k).all():
                break
            depth = min(deepest, depth * 4)
        first = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # allowed hits, in rank order
        d, pos = np.take_along_axis(d, first, 1), np.take_along_axis(pos, first, 1)
        found = np.take_along_axis(keep, first, 1)
        return np.where(found, d, np.nan), np.where(found, pos, -1)

    def _to_keys(self, d: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # a position beyond the id map is a vector an add in another thread has put in the
        # index but not yet recorded (or is undoing): not an answer yet
        ids = self.ids
        found = (pos >= 0) & (pos < len(ids))
        keys = np.full(pos.shape, -1, np.int64)
        keys[found] = ids[pos[found]]
        d = np.where(found, d, np.nan).astype(np.float32)
        d, keys = order_ties(d, keys, self.higher_is_better, by=pos)
        if keys.shape[1] < k:
            pad = k - keys.shape[1]
            keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.nan)
        return d, keys

    def _exact_engine(self) -> TorchExact:
        """The torch scan over this Flat index's vectors (built on first use)."""
        if self._exact is None:
            import faiss

            flat = faiss.downcast_index(self.cpu_index())
            x = faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim)
            x = np.asarray(x).reshape(self.ntotal, self.dim)
            self._exact = TorchExact(
                x,
                metric="l2" if self.config.metric == "l2" else "ip",
                precision=self.config.precision,
                device=self._device or self.config.device,
                refine=self.config.refine,
            )
        return self._exact

    def _sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, ids[order]): sorted once per index state, not per filtered query."""
        if self._order is None:
            order = np.argsort(self.ids, kind="stable")
            self._order = (order, self.ids[order])
        return self._order

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where each key is in the sorted ids, whether it is there)."""
        keys = np.asarray(keys, dtype=np.int64)
        sorted_ids = self._sorted_ids()[1]
        at = np.clip(np.searchsorted(sorted_ids, keys), 0, max(len(sorted_ids) - 1, 0))
        hit = sorted_ids[at] == keys if len(sorted_ids) else np.zeros(len(keys), bool)
        return at, hit

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Whether each of the given pin keys has a vector in this index."""
        return self._find(keys)[1]

    def positions_of(self, keys: np.ndarray) -> np.ndarray:
        """Positions of the given pin keys in this index (keys not in it are ignored)."""
        at, hit = self._find(keys)
        positions = self._sorted_ids()[0][at[hit]]
        if positions.size > 1 and not bool((positions[1:] >= positions[:-1]).all()):
            positions = np.sort(positions)  # (ids added in key order need none)
        return positions

    def cpu_index(self) -> Any:
        """The index on the CPU (a copy when it lives on the GPU, made once; a float16 Flat
        index on the GPU keeps the CPU index it was placed from, which holds the vectors as
        they were given: it is what is saved, searched past the GPU's limits and edited)."""
        if not self.on_gpu:
            return self.index
        with GPU_LOCK:  # threads asking at once share one copy
            if self._cpu is None:
                self._cpu = to_cpu(self.index)
            return self._cpu

    def describe(self) -> dict[str, Any]:
        """JSON-able description saved beside the index."""
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "pinsearch_version": __version__,
            "backbone": self.backbone,
            "factory": self.factory,
            "metric": self.config.metric,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "build_seconds": round(self.build_seconds, 4),
            "config": asdict(self.config),
        }

    def save(self, path: str | Path) -> dict[str, Any]:
        """Write ``PATH.faiss``, ``PATH.ids.npy`` and ``PATH.json`` atomically.

        Returns:
            The description written to the JSON file (with checksums).
        """
        import faiss

        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        files = index_files(base)
        tmp = {k: temp_beside(v) for k, v in files.items()}
        faiss.write_index(self.cpu_index(), str(tmp["faiss"]))
        with tmp["ids"].open("wb") as fh:
            np.save(fh, self.ids.astype(np.int64), allow_pickle=False)
        meta = self.describe()
        meta["sha256"] = {
            "faiss": file_sha256(tmp["faiss"]),
            "ids": file_sha256(tmp["ids"]),
        }
        tmp["json"].write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.values():  # on disk before any rename (a power loss leaves whole files)
            fsync_file(f)
        for key in ("faiss", "ids", "json"):  # the JSON last: it vouches for the others
            os.replace(tmp[key], files[key])
        fsync_dir(base.parent)  # the renames themselves
        return meta


def index_files(base: Path) -> dict[str, Path]:
    """An index's three files by kind (``faiss``, ``ids``, ``json``) from its base path."""
    return {
        "faiss": base.with_name(base.name + ".faiss"),
        "ids": base.with_name(base.name + ".ids.npy"),
        "json": base.with_name(base.name + ".json"),
    }


def _drop_rows(index: Any, n: int) -> None:
    """Remove the positions from ``n`` on from a CPU index (rows an add stopped part-way
    left, beyond its id map)."""
    import faiss

    if index.ntotal > n:  # open-ended: ids a failed add gave beyond ntotal go as well
        index.remove_ids(faiss.IDSelectorRange(n, np.iinfo(np.int64).max))


def _list_ids(ivf: Any) -> Iterator[np.ndarray]:
    """Views of the id arrays of an IVF's non-empty in-memory lists (writable)."""
    import faiss

    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size:
            yield faiss.rev_swig_ptr(lists.get_ids(list_no), size)


def _check_positions(index: Any, n: int, factory: str) -> None:
    """Raise :class:`IndexFileError` unless a CPU ``index`` holds positions ``0..n-1``, each
    once (an IVF's lists are read through), as the id map expects."""
    ivf = ivf_of(index)
    held = index.ntotal
    if held == n and ivf is not None:
        ids = np.concatenate([*_list_ids(ivf), np.empty(0, np.int64)])
        if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
            held = -1
    if held != n:
        raise IndexFileError(
            f"index {factory!r}: a stopped add left it inconsistent with its {n} pin keys; "
            "pinsearch repair rebuilds it"
        )


def _shift_list_ids(ivf: Any, removed: np.ndarray) -> None:
    """Renumber the ids left in an IVF's lists after ``removed`` (sorted) positions went."""
    for ids in _list_ids(ivf):  # views of the lists' own arrays (in-memory lists)
        ids -= np.searchsorted(removed, ids)


def _searched_part(index: Any) -> tuple[Any, bool]:
    """The index a search reaches through pre-transforms (OPQ, PCA), multi-GPU shards or
    replicas (alike inside) and a refine wrapper; and whether there was a refine wrapper."""
    import faiss

    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, (faiss.IndexShards, faiss.IndexReplicas)) and index.count():
            index = faiss.downcast_index(index.at(0))
        else:
            break
    refines = isinstance(index, faiss.IndexRefine)
    if refines:
        index = faiss.downcast_index(index.base_index)
    return index, refines


def _gpu_ivf(index: Any) -> bool:
    import faiss

    gpu_ivf = getattr(faiss, "GpuIndexIVF", None)  # FAISS-GPU builds only
    return gpu_ivf is not None and isinstance(index, gpu_ivf)


def _structure(index: Any) -> tuple[bool, bool, bool]:
    """``(IVF lists, HNSW graph, refine wrapper)`` of a CPU or FAISS-GPU index."""
    import faiss

    inner, refines = _searched_part(index)
    ivf = ivf_of(inner) is not None or _gpu_ivf(inner)
    return ivf, isinstance(inner, faiss.IndexHNSW), refines


def _nlist(index: Any) -> int:
    """IVF lists of a CPU or FAISS-GPU IVF index (no copy between them)."""
    inner, _ = _searched_part(index)
    ivf = ivf_of(inner)
    return int(ivf.nlist if ivf is not None else inner.nlist)


#: the largest k an HNSW search's efSearch is raised to (its cost grows about as ef^1.8: k =
#: 30k on 30k vectors took 282 ms, a Flat scan 4.5; rows a search leaves short of a deeper k
#: are topped up exactly by PinSearcher)
_EF_MAX_RAISE = 2048


def _search_params(index: Any, config: IndexConfig, selector: Any = None, k: int = 0) -> Any:
    """FAISS search parameters for a CPU index searched for ``k`` neighbours, following its
    wrappers.

    IVF gets ``nprobe`` (``config.nprobe``, else nlist / 16), HNSW ``efSearch``
    (``config.ef_search``, else 64; at least ``k`` up to :data:`_EF_MAX_RAISE`: FAISS takes
    a smaller one as it is, and answers fewer or worse neighbours), a refine wrapper its own
    parameters (``k_factor`` = ``config.refine`` when set) around its base index's, which
    searches ``k * k_factor``; a pre-transform passes its parameters on. None when there is
    nothing to set.
    """
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _search_params(index.index, config, selector, k)
    if isinstance(index, faiss.IndexRefine):
        k_factor = float(config.refine) if config.refine else index.k_factor
        base = _search_params(index.base_index, config, selector, math.ceil(k * k_factor))
        params = faiss.IndexRefineSearchParameters(k_factor=k_factor, sel=selector)
        params.base_index_params = base
        params.pinsearch_base = base  # the Python object owns the C++ one: keep it alive
        return params
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=_nprobe(config, index.nlist))
    if isinstance(index, faiss.IndexHNSW):
        ef = config.ef_search if config.ef_search is not None else 64
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef, min(k, _EF_MAX_RAISE)))
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def _nprobe(config: IndexConfig, nlist: int) -> int:
    """IVF lists visited per query: ``config.nprobe``, else about nlist / 16 (at most nlist)."""
    return min(config.nprobe or max(1, nlist // 16), nlist)


def order_ties(
    scores: np.ndarray, keys: np.ndarray, higher_is_better: bool, by: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an answer with equal scores ordered by ``by`` (default: the keys), ascending;
    missing hits (key -1) last.

    FAISS orders tied hits as its heap leaves them, which depends on ``k``: the first three of
    an 8-deep answer were not the 3-deep answer. Exact searches keep the tied candidates of
    lowest position, so ordered by position a shorter answer is a prefix of a longer one.
    Rows without ties (nearly all) are left as they are, without a sort.
    """
    found = keys >= 0
    tied = (scores[:, 1:] == scores[:, :-1]) & found[:, 1:] & found[:, :-1]
    rows = np.flatnonzero(tied.any(axis=1))
    if rows.size == 0:
        return scores, keys
    by = keys if by is None else by
    s, key, ok = scores[rows], keys[rows], found[rows]
    rank = np.where(ok, -s if higher_is_better else s, np.inf)
    order = np.lexsort((np.where(ok, by[rows], np.iinfo(np.int64).max), rank), axis=1)
    scores, keys = scores.copy(), keys.copy()
    scores[rows] = np.take_along_axis(s, order, 1)
    keys[rows] = np.take_along_axis(key, order, 1)
    return scores, keys


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), np.nan, np.float32), np.full((nq, k), -1, np.int64)


def _has_gpu(by_torch: bool) -> bool:
    """Whether the library that would search on it sees a GPU: torch (the 16-bit scan) or
    FAISS."""
    if by_torch:
        import torch

        return bool(torch.cuda.is_available())
    return gpu_count() > 0


def _torch_exact(config: IndexConfig, factory: str) -> bool:
    """Whether unfiltered searches use :class:`TorchExact` instead of FAISS."""
    return config.precision != "float32" and factory == "Flat" and config.metric != "l1"


def _place(
    cpu_index: Any, config: IndexConfig, factory: str, n_vectors: int | None = None
) -> tuple[Any, bool]:
    """The index where ``config`` wants it: on the GPU(s) when asked (or ``auto`` and FAISS
    sees one) and FAISS-GPU can hold it with ``n_vectors`` (default: what it holds)."""
    if _torch_exact(config, factory):  # torch holds the device copy, in 16 bits
        if config.device == "gpu" and not _has_gpu(True):
            raise DeviceError("index device 'gpu' was asked for but torch sees no CUDA device")
        return cpu_index, False
    if config.device == "gpu" and gpu_count() == 0:
        raise DeviceError("device='gpu' was asked for but faiss sees no GPU")
    if not _bound_for_gpu(config):
        return cpu_index, False
    fits, fp16_tables = gpu_settings(cpu_index)
    if not fits or config.metric == "l1":
        _logger.info("index %s (metric %s) stays on the CPU", factory, config.metric)
        return cpu_index, False
    too_big = gpu_room(cpu_index, config.fp16 or fp16_tables, n_vectors)
    if too_big and config.device == "gpu":
        raise DeviceError(
            f"index {factory} does not fit the GPU: {too_big}; use device cpu, or a compressed "
            "factory (IVF...,PQm)"
        )
    if too_big:
        _logger.warning("index %s stays on the CPU: %s", factory, too_big)
        return cpu_index, False
    if fp16_tables and not config.fp16:
        _logger.info("index %s on the GPU with float16 lookup tables (shared memory)", factory)
    gpu = to_gpu(cpu_index, fp16=config.fp16 or fp16_tables)
    ivf = ivf_of(cpu_index)
    if ivf is not None:
        import faiss

        nprobe = _nprobe(config, ivf.nlist)
        if nprobe > GPU_MAX_NPROBE:
            _logger.warning(
                "index %s: FAISS-GPU visits at most %d lists per query, not nprobe %d",
                factory, GPU_MAX_NPROBE, nprobe,
            )  # fmt: skip
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", min(nprobe, GPU_MAX_NPROBE))
    return gpu, True


def _bound_for_gpu(config: IndexConfig) -> bool:
    """Whether ``config`` puts an index on the GPU(s): asked for, or ``auto`` where FAISS sees
    one (whether FAISS-GPU can hold the index, and has room, is for :func:`_place`)."""
    return config.device == "gpu" or (config.device == "auto" and gpu_count() > 0)


def _auto_factory(n: int, dim: int, config: IndexConfig) -> str:
    """:func:`choose_factory` for where the index will live. Bound for the GPU(s), PQ codes
    are those FAISS-GPU implements (an ``IVF...,PQ128`` would stay on the CPU). Under device
    ``gpu`` the choice must also fit the GPUs' free memory, as :func:`gpu_room` judges it
    (each candidate checked, the next one smaller); under ``auto`` the budget stays the
    machine's (no index is traded for a smaller one to fit a busy GPU: placement keeps one too
    big for it on the CPU)."""
    choice = choose_factory(n, dim, config.metric, config.memory_budget)
    if not _bound_for_gpu(config) or config.metric == "l1":
        return choice
    import faiss

    budget = config.memory_budget or default_memory_budget()
    while True:
        try:
            gpu_choice = choose_factory(n, dim, config.metric, budget, pq_codes=GPU_PQ_CODES)
        except ValueError:  # nothing fits the GPU: placement says so (device gpu)
            return choice
        if config.device != "gpu":
            break
        # the placement's own judgement (which asks CUDA only about indexes worth it)
        probe = faiss.index_factory(dim, gpu_choice, faiss_metric(config.metric))
        if gpu_room(probe, config.fp16, n_vectors=n) is None:
            break
        budget = sum(gpu_parts(probe, config.fp16, n)) - 1  # the next one smaller
    if gpu_choice != choice:
        _logger.info("index auto on the GPU: %s (on the CPU it would be %s)", gpu_choice, choice)
    return gpu_choice


def build_index(
    vectors: np.ndarray,
    keys: np.ndarray,
    config: IndexConfig | None = None,
    *,
    backbone: str = "",
) -> PinIndex:
    """Build an index over ``vectors`` whose rows belong to pins ``keys``.

    Training (IVF, PQ) uses a seeded sample of at most ``config.max_train`` vectors.
    """
    import faiss

    config = config or IndexConfig()
    x = _as_f32(vectors)
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) != len(x):
        raise ValueError(f"{len(x)} vectors but {len(keys)} pin keys")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("pin keys passed to build_index are not unique")
    n, dim = x.shape
    factory = config.factory
    if factory == "auto":
        factory = _auto_factory(max(n, 1), dim, config)
    if re.search(r"(^|,)NSG", factory) and n < NSG_MIN_VECTORS:
        # FAISS 1.15's NNDescent refuses under 100 vectors, and on some sets of 101-121 fails
        # an assertion that aborts the whole process
        raise ValueError(
            f"index {factory!r} needs at least {NSG_MIN_VECTORS} vectors, got {n} (FAISS's "
            "graph build stops the process on some smaller sets); use Flat, HNSW or 'auto'"
        )
    start = time.perf_counter()
    try:
        cpu = faiss.index_factory(dim, factory, faiss_metric(config.metric))
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build index {factory!r}: {_faiss_reason(exc)}") from exc
    _skip_polysemous_training(cpu)
    index, on_gpu = _place(cpu, config, factory, n_vectors=n)  # placed empty: judge it full
    pin_index = PinIndex(index, np.empty(0, np.int64), config, factory, dim, backbone, 0.0, on_gpu)
    del index  # pin_index holds it (and frees it, under the GPU lock, when it places anew)
    if not pin_index.index.is_trained:
        if n == 0:
            raise ValueError(f"index {factory!r} needs training vectors; none given")
        rng = np.random.default_rng(config.seed)
        sample = x if n <= config.max_train else x[np.sort(rng.choice(n, config.max_train, False))]
        if on_gpu and shards_of(pin_index.index) is not None:
            # shards trained apart would each get centroids (and PQ codebooks) of their own:
            # the index is trained once, on one GPU, and sharded trained
            one = to_gpu(cpu, fp16=config.fp16 or gpu_settings(cpu)[1], one=True)
            with GPU_LOCK:
                try:
                    _train(one, pin_index.prepare(sample), factory)
                    cpu = to_cpu(one)
                finally:
                    del one  # freed here, under the lock
            pin_index._place_again(cpu)
        else:
            with pin_index._gpu_turn():
                _train(pin_index.index, pin_index.prepare(sample), factory)
    try:
        pin_index.add(x, keys)
    except DeviceError:
        raise
    except RuntimeError as exc:  # FAISS refused the vectors (NSG under 100 of them, ...)
        raise ValueError(
            f"FAISS cannot fill index {factory!r} with {n} vectors: {_faiss_reason(exc)}; "
            "pick another factory, or 'auto'"
        ) from exc
    pin_index.build_seconds = time.perf_counter() - start
    return pin_index


NSG_MIN_VECTORS = 1000  # below this an NSG graph is refused (a rebuild makes it Flat)


def _train(index: Any, sample: np.ndarray, factory: str) -> None:
    """Train ``index`` on ``sample``, a FAISS refusal told as the factory's problem."""
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ValueError(
            f"FAISS cannot train index {factory!r} on {len(sample)} vectors: "
            f"{_faiss_reason(exc)}; pick a smaller factory, or 'auto'"
        ) from exc


def _skip_polysemous_training(index: Any) -> None:
    """Turn off FAISS's polysemous training of PQ codes (on by default in ``index_factory``):
    an annealing that reorders each sub-quantizer's centroids for Hamming-distance filtering,
    which pinsearch never enables. It costs ~1.3 s per sub-quantizer on 2 cores whatever the
    data size (over 99% of training a small PQ index) and changes no ADC distance."""
    import faiss

    node = faiss.downcast_index(index)
    while node is not None:
        if hasattr(node, "do_polysemous_training"):
            node.do_polysemous_training = False
        inner = next(
            (getattr(node, a) for a in ("index", "base_index", "storage") if hasattr(node, a)),
            None,
        )
        node = faiss.downcast_index(inner) if inner is not None else None


def _faiss_reason(exc: Exception) -> str:
    """The readable end of a FAISS error ("Error in <C++ signature> at <file>: Error: '<check>'
    failed: <reason>")."""
    text = str(exc).strip()
    found = re.match(r"Error in .*? at \S+:\d+: (?:Error: )?(.*)", text, re.S)
    reason = found.group(1) if found else text
    return reason.split("' failed: ", 1)[-1]


#: The settings :func:`load_index` takes from a caller's config, and their unset values.
_SEARCH_SETTINGS = {
    "device": "auto",
    "fp16": False,
    "precision": "float32",
    "refine": 0,
    "nprobe": None,
    "ef_search": None,
}


def search_overrides(config: IndexConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The search-time settings a caller sets over a saved index's (:func:`load_index`).

    A mapping names them itself: any of device, fp16, precision, refine, nprobe and
    ef_search, each checked as :class:`IndexConfig` checks it (a saved float16 scan searched
    in float32 again: ``{"precision": "float32"}``). An :class:`IndexConfig` sets those it
    does not leave unset (None, or its default).

    Raises:
        ValueError: a name that is no search-time setting, or a value IndexConfig refuses.
    """
    if isinstance(config, IndexConfig):
        return {
            name: getattr(config, name)
            for name, unset in _SEARCH_SETTINGS.items()
            if getattr(config, name) != unset
        }
    unknown = sorted(set(config) - set(_SEARCH_SETTINGS))
    if unknown:
        raise ValueError(f"not search-time settings: {unknown}; they are {list(_SEARCH_SETTINGS)}")
    IndexConfig(**config)  # the values, checked
    return dict(config)


def load_index(
    path: str | Path,
    *,
    config: IndexConfig | Mapping[str, Any] | None = None,
    verify: bool = True,
    place: bool = True,
) -> PinIndex:
    """Load an index saved by :meth:`PinIndex.save`, checking its files against the JSON.

    Args:
        path: the base path (without ``.faiss``).
        config: search-time settings (device, nprobe, ef_search, fp16, precision, refine)
            put over the saved ones: a mapping of those named, or an :class:`IndexConfig`'s
            that are set (:func:`search_overrides`); the others stay as saved. An index
            saved with device ``gpu`` loads on the CPU (a warning) where faiss sees no GPU,
            unless the caller asks for the GPU.
        verify: check SHA-256 checksums (reads the whole file once).
        place: put it where its settings say (a GPU); False keeps it on the CPU with its
            settings unchanged (a writer editing it, whatever room the GPU has).

    Raises:
        IndexFileError: a file is missing or damaged, or the format is unknown.
    """
    files = index_files(Path(path))
    for wait in (*_SAVE_SWAP_WAITS, None):
        try:
            meta, saved, cpu, ids = _read_index_files(files, verify)
            break
        except _MixedSave as exc:  # perhaps read while a writer swapped the files: again
            if wait is None:
                raise
            _logger.info("%s; looking again in %.2f s", exc, wait)
            time.sleep(wait)
            if not exc.replaced():  # nothing renamed over them meanwhile: damaged
                raise
    asked = search_overrides(config) if config is not None else {}
    saved = replace(saved, **asked)
    where = saved
    by_torch = _torch_exact(saved, meta["factory"])  # (the 16-bit scan: torch's GPU)
    if place and saved.device == "gpu" and "device" not in asked and not _has_gpu(by_torch):
        # saved for a GPU, not asked for one now: the CPU searches it (saved as it was)
        _logger.warning("index %s was saved for the GPU; none is seen: on the CPU", path)
        where = replace(saved, device="cpu")
    index, on_gpu = _place(cpu, where, meta["factory"]) if place else (cpu, False)
    loaded = PinIndex(
        index,
        ids.astype(np.int64),
        saved,
        meta["factory"],
        int(meta["dim"]),
        meta.get("backbone", ""),
        float(meta.get("build_seconds", 0.0)),
        on_gpu,
        _device=where.device,
    )
    if loaded._rounds_vectors():
        loaded._cpu = cpu  # the vectors of record (the GPU copy holds them in float16)
    return loaded


#: A reader takes no lock: one loading an index while a writer renames its three new files into
#: place can read two saves' files. The renames take microseconds, so files that disagree are
#: read again after these waits (seconds) if a file was renamed over one of them meanwhile.
_SAVE_SWAP_WAITS = (0.05, 0.25)


class _MixedSave(IndexFileError):
    """An index's files disagree with each other: damaged, or read mid-swap. ``opened``: the
    path and (device, inode) of each file as read."""

    def __init__(self, message: str, opened: dict[str, tuple[Path, tuple[int, int]]]) -> None:
        super().__init__(message)
        self.opened = opened

    def replaced(self) -> bool:
        """Whether a path now names another file than the one read (or none)."""
        for path, identity in self.opened.values():
            try:
                st = os.stat(path)
            except OSError:
                return True
            if (st.st_dev, st.st_ino) != identity:
                return True
        return False


def _read_index_files(
    files: dict[str, Path], verify: bool
) -> tuple[dict[str, Any], IndexConfig, Any, np.ndarray]:
    """One read of an index's files: (description, saved config, FAISS index, id map). Each
    file is opened once, so what is hashed is what is read, even if a writer renames a new
    file over it meanwhile."""
    import faiss

    for key, f in files.items():
        if not f.is_file():
            raise IndexFileError(f"index file {f} is missing ({key})")
    with contextlib.ExitStack() as stack:
        fh: dict[str, Any] = {}
        opened: dict[str, tuple[Path, tuple[int, int]]] = {}
        for key, f in files.items():
            try:
                fh[key] = stack.enter_context(f.open("rb"))
            except OSError as exc:
                raise IndexFileError(f"index file {f} cannot be opened ({key}): {exc}") from exc
            st = os.fstat(fh[key].fileno())
            opened[key] = (f, (st.st_dev, st.st_ino))
        try:
            meta = json.loads(fh["json"].read())
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"index description {files['json']} is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise IndexFileError(f"index description {files['json']} is not a JSON object")
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexFileError(
                f"{files['json']}: index format {meta.get('format_version')!r}, "
                f"this pinsearch reads {INDEX_FORMAT_VERSION}"
            )
        try:
            sums = {key: str(meta["sha256"][key]) for key in ("faiss", "ids")}
            # as asked ("auto" stays auto: a rebuild chooses again); the factory it gave is
            saved = IndexConfig(**meta["config"])  # the index's own (PinIndex.factory)
            meta["factory"] = str(meta["factory"])
            size = int(meta["ntotal"]), int(meta["dim"])
        except (KeyError, TypeError, ValueError) as exc:  # a field missing, unknown or invalid
            raise IndexFileError(
                f"index description {files['json']} is damaged ({type(exc).__name__}: {exc})"
            ) from exc
        for key in ("faiss", "ids") if verify else ():
            try:
                digest = _stream_sha256(fh[key])
            except OSError as exc:
                raise IndexFileError(f"cannot read index file {files[key]}: {exc}") from exc
            if digest != sums[key]:
                raise _MixedSave(
                    f"index file {files[key]} does not match its checksum: it is damaged; "
                    "rebuild it from the stored vectors (pinsearch repair)",
                    opened,
                )
        # FAISS reads the open file: by its /proc path (Linux), else through Python reads
        by_fd = Path(f"/proc/self/fd/{fh['faiss'].fileno()}")
        source = str(by_fd) if by_fd.exists() else faiss.PyCallbackIOReader(fh["faiss"].read)
        try:
            cpu = faiss.read_index(source)
            ids = np.load(fh["ids"], allow_pickle=False)
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            raise IndexFileError(f"cannot read index {files['faiss']}: {exc}") from exc
    if cpu.ntotal != len(ids) or (cpu.ntotal, cpu.d) != size:
        raise _MixedSave(
            f"index {files['faiss']} holds {cpu.ntotal} vectors of dim {cpu.d}; its id map has "
            f"{len(ids)} and its description says {size[0]} x {size[1]}",
            opened,
        )
    return meta, saved, cpu, ids
