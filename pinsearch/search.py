"""Similar-pin lookup over a store: by stored pin, by new image, or by raw vector.

A :class:`PinSearcher` is the warm query object: it keeps the index, the backbone (loaded on
the first image query) and the vector locator in memory, and fetches metadata for all hits in
one DuckDB query. Filters (board, user, category) are applied inside the index search, so a
filtered query returns ``k`` hits whenever ``k`` matching pins exist.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.errors import BackboneMismatchError, PinNotFoundError
from pinsearch.indexes import IndexConfig, PinIndex, faiss_metric, search_overrides
from pinsearch.indexes.pinindex import order_ties, unique_sorted
from pinsearch.ingest import unicode_spellings
from pinsearch.store import Store

__all__ = [
    "PinSearcher",
    "SearchHit",
    "SearchResult",
    "category_key",
    "exact_search",
    "run_weights_file",
    "store_backbone",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    """One result row (see the README for the JSON schema)."""

    rank: int
    pin_id: str
    score: float  # similarity (cosine, ip) or distance (l2 squared, l1)
    title: str
    board: str
    board_name: str
    user: str | None
    category: str
    path: str


@dataclass
class SearchResult:
    """The hits of one query and how they were found."""

    query: dict[str, Any]
    backbone: str
    index: str
    metric: str
    k: int
    filters: dict[str, str]
    hits: list[SearchHit] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stable schema)."""
        return asdict(self)


def exact_search(
    queries: np.ndarray, vectors: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k-NN with FAISS' exact kernels (rows of ``vectors`` as positions)."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return faiss.knn(q, x, min(k, len(x)), metric=faiss_metric(metric))


def run_weights_file(run: dict[str, Any]) -> str | None:
    """The local checkpoint an embedding run was made with (``file:PATH`` weights), if any."""
    weights = str(run.get("spec", {}).get("weights", ""))
    return weights.split(":", 1)[1] if weights.startswith("file:") else None


def store_backbone(store: Store, backbone: str) -> Any:
    """Build the backbone a store's vectors were made with, for embedding new query images.

    Raises:
        BackboneMismatchError: this machine builds other weights (or the weights file changed
            since), another dimension or other preprocessing.
    """
    from pinsearch.backbones import create_backbone
    from pinsearch.embed import resolve_device, run_differences

    run = store.catalog.get_embedding(backbone) or {}
    model = create_backbone(
        backbone, weights=run_weights_file(run), device=resolve_device("auto"), run=run
    )
    problems = run_differences(
        {"spec": run.get("spec") or {}, "preprocess": run.get("preprocess") or {}}, model
    )
    if problems:
        raise BackboneMismatchError(
            f"store vectors of {backbone!r} were made otherwise than this machine embeds "
            f"queries: {'; '.join(problems)}; use the same weights and versions"
        )
    return model


_NO_KEYS = np.empty(0, np.int64)
EXACT_FILTER_BYTES = 64 << 20  # filters scanned exactly rather than copying a GPU index
EXACT_TOP_UP_BYTES = 1 << 30  # most stored vectors read to answer a short unfiltered query


def _py(value: Any) -> Any:
    """A numpy scalar or masked value as a plain Python value."""
    if value is np.ma.masked:
        return None
    return value.item() if isinstance(value, np.generic) else value


def category_key(category: str | None) -> str | None:
    """A category filter as ingest stores categories ("Food & Drink" -> "food_drink")."""
    if category is None:
        return None
    from pinsearch.ingest import normalize_category

    return normalize_category(category) or category


def _filters(board: str | None, user: str | None, category: str | None) -> dict[str, str]:
    return {
        name: value
        for name, value in (("board", board), ("user", user), ("category", category))
        if value is not None
    }


class PinSearcher:
    """Similar-pin queries over one index of a store.

    Args:
        store: an open store (read-only is enough).
        backbone: which embedding to search (default: the store's only one).
        index: index name (default: the backbone's index).
        config: search-time settings over the saved index's (device, nprobe, ef_search,
            fp16, precision, refine): a mapping of those named, or an IndexConfig's that are
            set (:func:`~pinsearch.indexes.search_overrides`).
        cache_metadata: keep a columnar copy of the pins' metadata in memory (for long-running
            query processes; a few hundred MB per million pins) instead of one DuckDB query
            per search.
        title_space: search a backbone's title vectors (``<backbone>#text``): the text
            searcher's own use; refused otherwise.
    """

    def __init__(
        self,
        store: Store,
        *,
        backbone: str | None = None,
        index: str | None = None,
        config: IndexConfig | Mapping[str, Any] | None = None,
        cache_metadata: bool = False,
        title_space: bool = False,
    ) -> None:
        self.store = store
        self.cache_metadata = cache_metadata
        self._meta_cache: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        self._groups: dict[str, dict[Any, np.ndarray]] = {}  # column -> value -> sorted keys
        self._id_order: tuple[np.ndarray, np.ndarray] | None = None  # sorted ids, their keys
        if index is not None:
            row = store.catalog.get_index(index)
            if row is None:
                raise ValueError(
                    f"no index {index!r} in {store.root}; it has {store.index_names()}"
                )
            if backbone is not None and backbone != row["backbone"]:  # (as dupes refuses it)
                raise ValueError(
                    f"no index {index!r} of {backbone!r} in {store.root}; it has "
                    f"{store.index_names(backbone, text_spaces=title_space)}"
                )
            backbone = row["backbone"]
            if "#" in backbone and not title_space:
                raise ValueError(
                    f"index {index!r} holds the title vectors of {backbone.split('#')[0]!r}, "
                    "which text queries search by themselves (--mode title); name an index "
                    f"of its images: {store.index_names(backbone.split('#')[0])}"
                )
        self.backbone = store.resolve_backbone(backbone, text_spaces=title_space)
        self.index: PinIndex = store.load_index(index, backbone=self.backbone, config=config)
        self.index_name = index or (
            self.backbone
            if self.backbone in store.index_names(self.backbone)
            else store.index_names(self.backbone)[0]
        )
        # the settings asked for, judged with those in effect (a refine asked of an index
        # saved with a 16-bit scan refines it)
        asked = search_overrides(config) if config is not None else {}
        inert = [s for s in self.index.inert_settings(self.index.config) if s.split()[0] in asked]
        if inert:
            raise ValueError(
                f"index {self.index_name!r} ({self.index.factory}) would ignore {'; '.join(inert)}"
            )
        self._embedding = store.catalog.get_embedding(self.backbone) or {}
        self._model: Any = None

    # -- queries ---------------------------------------------------------------------------

    def similar_to_pin(
        self,
        pin_id: str,
        k: int = 10,
        *,
        board: str | None = None,
        user: str | None = None,
        category: str | None = None,
    ) -> SearchResult:
        """Pins most similar to a stored pin (the pin itself excluded).

        Raises:
            PinNotFoundError: unknown pin id, or the pin has no vector for this backbone.
        """
        key = self._key_of(pin_id)
        if key is None:
            raise PinNotFoundError(f"pin {pin_id!r} is not in store {self.store.root}")
        vectors, _ = self.store.vectors(self.backbone).load(np.array([key]))
        if len(vectors) == 0:
            raise PinNotFoundError(f"pin {pin_id!r} has no {self.backbone!r} vector")
        return self._run(
            vectors, k, {"pin_id": pin_id}, board, user, category, exclude=np.array([key])
        )

    def similar_to_image(
        self,
        image: str | Path | Any,
        k: int = 10,
        *,
        board: str | None = None,
        user: str | None = None,
        category: str | None = None,
    ) -> SearchResult:
        """Pins most similar to a new image (a path or a PIL image).

        The image is embedded with the backbone the store's vectors were made with.

        Raises:
            BackboneMismatchError: the model now built differs from the stored run.
        """
        from pinsearch.embed import embed_like_run

        vec = embed_like_run(self.backbone_model(), [image], self._embedding)
        label = str(image) if isinstance(image, (str, Path)) else "<image>"
        return self._run(vec, k, {"image": label}, board, user, category)

    def similar_to_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        board: str | None = None,
        user: str | None = None,
        category: str | None = None,
    ) -> SearchResult:
        """Pins nearest to a raw vector of this backbone."""
        return self._run(np.atleast_2d(vector), k, {"vector": True}, board, user, category)

    # -- internals -------------------------------------------------------------------------

    def filter_keys(
        self, *, board: str | None = None, user: str | None = None, category: str | None = None
    ) -> np.ndarray | None:
        """Sorted pin keys matching all given filters (None without filters).

        With ``cache_metadata`` the answer comes from the in-memory columns, grouped once per
        column (a million pins: one DuckDB query of ~15 ms per filtered search otherwise).
        """
        category = category_key(category)
        if not self.cache_metadata:
            return self.store.catalog.filter_keys(board=board, user=user, category=category)
        parts = []
        if board is not None:  # a board matches its key (user/board) or its display name
            parts.append(self._grouped(("board", "board_name"), board))
        if user is not None:
            parts.append(self._grouped(("user_id",), user))
        if category is not None:
            parts.append(self._group("category").get(category, _NO_KEYS))
        if not parts:
            return None
        out = parts[0]
        for more in parts[1:]:
            out = np.intersect1d(out, more, assume_unique=True)
        return out

    def unmatched_filters(
        self, *, board: str | None = None, user: str | None = None, category: str | None = None
    ) -> list[str]:
        """The filters whose value alone names no pin (``"category 'x'"``): what a query that
        found nothing may owe to a misspelling rather than to its filters together."""
        out = []
        for what, value in (("board", board), ("user", user), ("category", category)):
            alone = {"board": None, "user": None, "category": None, what: value}
            if value is not None and len(self.filter_keys(**alone)) == 0:  # type: ignore[arg-type]
                out.append(f"{what} {value!r}")
        return out

    def _board_keys(self, board: str) -> np.ndarray:
        """Sorted keys of the pins of the board whose key is ``board`` (not a display name)."""
        if self.cache_metadata:
            return self._group("board").get(board, _NO_KEYS)
        cur = self.store.catalog.connection.execute(
            "SELECT pin_key FROM pins WHERE board = ? ORDER BY pin_key", [board]
        )
        return np.asarray(cur.fetchnumpy()["pin_key"], dtype=np.int64)

    def _grouped(self, columns: tuple[str, ...], value: str) -> np.ndarray:
        """Sorted keys of the pins whose value in any of ``columns`` is ``value``, in any
        Unicode spelling (NFC, NFD), as the catalog's filter matches."""
        groups = [self._group(column) for column in columns]
        found = [g[v] for g in groups for v in unicode_spellings(value) if v in g]
        if len(found) <= 1:
            return found[0] if found else _NO_KEYS
        return functools.reduce(np.union1d, found)

    def _group(self, column: str) -> dict[Any, np.ndarray]:
        """``value -> sorted pin keys`` of one cached metadata column (built on first use)."""
        if column not in self._groups:
            sorted_keys, cols = self._columns()
            col = cols[column]
            null = np.ma.getmaskarray(col) | np.fromiter(
                (v is None for v in np.ma.getdata(col)), bool, len(col)
            )
            values, codes = np.unique(np.ma.getdata(col)[~null], return_inverse=True)
            keys = sorted_keys[~null]
            order = np.argsort(codes, kind="stable")  # keys stay sorted within each value
            bounds = np.searchsorted(codes[order], np.arange(len(values) + 1))
            groups = {
                v: keys[order[bounds[i] : bounds[i + 1]]] for i, v in enumerate(values.tolist())
            }
            for group in groups.values():
                group.setflags(write=False)  # handed out by filter_keys: not to be changed
            self._groups[column] = groups
        return self._groups[column]

    def _key_of(self, pin_id: str) -> int | None:
        """A pin id's key: from the cached columns (a binary search over the ids, sorted
        once) with ``cache_metadata``, else one catalog query."""
        if not self.cache_metadata:
            return self.store.catalog.keys_for_ids([pin_id]).get(pin_id)
        ids, keys = self._pin_ids()
        for spelled in unicode_spellings(pin_id):  # as the catalog: the id given first
            at = int(np.searchsorted(ids, spelled))
            if at < len(ids) and ids[at] == spelled:
                return int(keys[at])
        return None

    def _pin_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """The cached pin ids in sorted order, and the key of each (sorted on first use)."""
        if self._id_order is None:
            sorted_keys, cols = self._columns()
            ids = np.asarray(np.ma.getdata(cols["pin_id"]), dtype=object)
            order = np.argsort(ids, kind="stable")
            self._id_order = (ids[order], sorted_keys[order])
        return self._id_order

    def warm(self) -> None:
        """Load what a first query would (with ``cache_metadata``: the metadata columns, the
        filter groups and the pin ids' order; the vector parts, mapped), so that it is
        answered as fast as the next, and reads vectors a later writer deletes from disk."""
        self.store.vectors(self.backbone).map_parts()
        if self.cache_metadata:
            for column in ("board", "board_name", "user_id", "category"):
                self._group(column)
            self._pin_ids()

    def share_metadata(self, other: PinSearcher) -> None:
        """Use ``other``'s cached metadata (the same store's pins) instead of a copy."""
        if self.cache_metadata and other.cache_metadata:
            self._meta_cache, self._groups = other._columns(), other._groups
            self._id_order = other._pin_ids()

    def _columns(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The pins' metadata as columns sorted by pin key (loaded on first use)."""
        if self._meta_cache is None:
            cols = self.store.catalog.connection.execute(
                "SELECT p.pin_key, p.pin_id, p.title, p.board, coalesce(b.name, p.board) AS "
                "board_name, p.user_id, p.category, p.path FROM pins p LEFT JOIN boards b "
                "ON b.board = p.board ORDER BY p.pin_key"
            ).fetchnumpy()
            self._meta_cache = (np.asarray(cols.pop("pin_key"), dtype=np.int64), cols)
        return self._meta_cache

    def _metadata(self, keys: np.ndarray) -> dict[int, dict[str, Any]]:
        """Hit metadata: one DuckDB query, or an in-memory columnar copy (cache_metadata)."""
        if not self.cache_metadata:
            return self.store.catalog.pins_by_key(keys.tolist())
        sorted_keys, cols = self._columns()
        at = np.clip(np.searchsorted(sorted_keys, keys), 0, max(len(sorted_keys) - 1, 0))
        out = {}
        for key, i in zip(keys.tolist(), at.tolist()):
            if len(sorted_keys) and sorted_keys[i] == key:
                out[key] = {name: _py(col[i]) for name, col in cols.items()}
        return out

    def backbone_model(self) -> Any:
        """The backbone that made the store's vectors (built once, checked against the run)."""
        if self._model is None:
            self._model = store_backbone(self.store, self.backbone)
        return self._model

    def search_keys(
        self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index search with an optional allow-list of pin keys, topped up to ``k`` exactly.

        An approximate index (IVF, HNSW) may return fewer than ``k`` allowed hits; the query
        is then answered by exact search over the allowed pins' stored vectors (over all of
        them, up to 1 GiB, when no filter is given and a graph index reached fewer than ``k``
        pins). On a GPU index so is a filter of up to 64 MiB of vectors (16,384 pins of 1,024
        dims) that its GPU copy cannot answer (one too rare for its 2,048-deep answer): the
        index would otherwise be copied whole to host memory, and kept there, for a CPU search
        with a selector.
        Only pins the index holds are returned, at most as many as it holds (a ``k`` of
        millions asked of a small store allocated its answer at that size).
        """
        vectors = self.index.prepare(vectors)  # dimension checked on every path
        k = min(k, max(self.index.ntotal, 1))
        if allowed is None:
            scores, keys = self.index.search(vectors, k)
            short = (keys < 0).any(axis=1)  # a graph (HNSW, NSG) that reached fewer than k
            if short.any() and self.index.ntotal:
                if self.index.ntotal * 4 * self.index.dim <= EXACT_TOP_UP_BYTES:
                    scores[short], keys[short] = self._exact_allowed(
                        vectors[short], k, np.sort(self.index.ids)
                    )
                else:  # (a k near the size of a store this large)
                    _logger.warning(
                        "index %s reached fewer than k = %d pins; answered as it is (an exact "
                        "scan would read %d vectors)", self.index_name, k, self.index.ntotal
                    )  # fmt: skip
            return scores, keys
        allowed = self.index.ids[self.index.positions_of(unique_sorted(allowed))]
        small = self.index.on_gpu and len(allowed) * 4 * self.index.dim <= EXACT_FILTER_BYTES
        if small and self.index.filter_copies_to_cpu(k, len(allowed)):
            return self._exact_allowed(vectors, k, allowed)
        scores, keys = self.index.search(vectors, k, allowed=allowed, host_copy=not small)
        if (keys[:, : min(k, len(allowed))] >= 0).all():
            return scores, keys
        return self._exact_allowed(vectors, k, allowed)

    def _exact_allowed(
        self, vectors: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` among the allowed pins (keys the index holds, each once), from
        their stored vectors."""
        sub_vecs, sub_keys = self.store.vectors(self.backbone).load(allowed)
        out_s = np.full((len(vectors), k), np.nan, np.float32)
        out_k = np.full((len(vectors), k), -1, np.int64)
        if len(sub_keys) == 0:
            return out_s, out_k
        d, pos = exact_search(vectors, sub_vecs, min(k, len(sub_keys)), self.index.config.metric)
        out_s[:, : d.shape[1]] = d
        out_k[:, : d.shape[1]] = np.where(pos >= 0, sub_keys[np.clip(pos, 0, None)], -1)
        return order_ties(out_s, out_k, self.index.higher_is_better)

    def _run(
        self,
        vectors: np.ndarray,
        k: int,
        query: dict[str, Any],
        board: str | None,
        user: str | None,
        category: str | None,
        exclude: np.ndarray | None = None,
    ) -> SearchResult:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        start = time.perf_counter()
        filters = _filters(board, user, category)
        allowed = self.filter_keys(board=board, user=user, category=category)
        if allowed is not None and exclude is not None:  # filter keys: sorted, each once
            allowed = allowed[~np.isin(allowed, exclude)]
        want = k + (0 if exclude is None or allowed is not None else len(exclude))
        while True:
            scores, keys = self.search_keys(vectors, want, allowed)
            row_s, row_k = scores[0], keys[0]
            keep = row_k >= 0
            if exclude is not None:
                keep &= ~np.isin(row_k, exclude)
            hits = self.hits(row_k[keep], row_s[keep])[:k]
            # An index newer than a snapshot's catalog holds pins it does not know (left out
            # of the hits): ask for more until k known ones, or the index has no more.
            if len(hits) >= k or (row_k < 0).any() or want >= self.index.ntotal:
                break
            want = min(2 * want, self.index.ntotal)
        return SearchResult(
            query=query,
            backbone=self.backbone,
            index=self.index_name,
            metric=self.index.config.metric,
            k=k,
            filters=filters,
            hits=hits,
            seconds=time.perf_counter() - start,
        )

    def hits(self, keys: np.ndarray, scores: np.ndarray) -> list[SearchHit]:
        """Result rows for pin keys (in order) with their scores; keys no longer in the
        catalog are left out."""
        meta = self._metadata(np.asarray(keys, dtype=np.int64))
        out: list[SearchHit] = []
        for score, key in zip(np.asarray(scores).tolist(), np.asarray(keys).tolist()):
            m = meta.get(int(key))
            if m is None:  # removed from the catalog after the index was built
                continue
            out.append(
                SearchHit(
                    rank=len(out) + 1,
                    pin_id=m["pin_id"],
                    score=float(score),
                    title=m["title"] or "",
                    board=m["board"],
                    board_name=m["board_name"] or m["board"],
                    user=m["user_id"],
                    category=m["category"],
                    path=m["path"],
                )
            )
        return out
