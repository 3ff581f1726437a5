"""Text-to-pin search over a store: pins, boards, and the best title for a pin.

:class:`TextSearcher` is a :class:`~pinsearch.search.PinSearcher` that also embeds text with
the backbone's text encoder (its CLIP text tower, or the store's ``pinsearch align``
projection) and searches the backbone's image index with it.

Modes of :meth:`TextSearcher.search_text`:

- ``image``: the text vector against the pins' image vectors (the default);
- ``title``: against the pins' title vectors (``<backbone>#text``);
- ``fused``: both. Candidates are the union of the top ``max(10k, 100)`` of each; every
  candidate's image and title similarities are standardised over the candidates (z-scores),
  and ``fused = alpha * z_image + (1 - alpha) * z_title``. A pin without a title takes
  ``z_title = z_image``, so a missing title neither helps nor hurts it.

Board ranking (:meth:`TextSearcher.search_boards`) scores a board by the mean of its ``m`` best
pin scores (``topm``; over a candidate pool of the index's top hits, exact when the pool covers
the store) or by its centroid (``centroid``: the normalised mean of its pins' vectors, exact).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.errors import PinNotFoundError, PinsearchError
from pinsearch.ingest import unicode_spellings
from pinsearch.search import (
    _NO_KEYS,
    PinSearcher,
    SearchHit,
    SearchResult,
    _filters,
    category_key,
)
from pinsearch.text import (
    TextEncoder,
    pin_texts,
    text_candidates,
    text_encoder_for,
    text_space,
    title_space_outdated,
)
from pinsearch.vectors import group_sums, in_sorted, unit_rows

__all__ = [
    "BoardHit",
    "BoardResult",
    "TextMatch",
    "TextSearcher",
    "TitleResult",
]

_logger = logging.getLogger(__name__)

SEARCH_MODES = ("image", "title", "fused")
BOARD_SCORES = ("topm", "centroid")


@dataclass(frozen=True)
class BoardHit:
    """One ranked board with its best-matching pins."""

    rank: int
    board: str
    board_name: str
    user: str | None
    category: str | None
    score: float
    pins_in_board: int
    pins: list[SearchHit]


@dataclass
class BoardResult:
    """Boards ranked for a text query."""

    query: dict[str, Any]
    backbone: str
    text_encoder: str
    score: str  # topm or centroid
    per_board: int
    k: int
    filters: dict[str, str]
    boards: list[BoardHit] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TextMatch:
    """A candidate text and how well it fits the pin (cosine similarity)."""

    rank: int
    text: str
    score: float


@dataclass
class TitleResult:
    """Candidate titles or descriptions ranked for one pin or image."""

    query: dict[str, Any]
    backbone: str
    text_encoder: str
    matches: list[TextMatch] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(np.std(x)) if len(x) > 1 else 0.0
    return (x - float(np.mean(x))) / sd if sd > 1e-12 else np.zeros_like(x)


def text_index_problem(name: str, metric: str, unit: bool) -> str | None:
    """Why an index cannot answer text queries (None: it can): text scores are cosines, so
    the index must rank by them: a cosine index, or an inner-product one over unit vectors
    (``unit``: the backbone's run normalises them)."""
    if metric not in ("cosine", "ip"):
        return (
            f"index {name!r} uses the {metric} metric; text search needs a cosine or ip index "
            "(pinsearch index --metric cosine --rebuild)"
        )
    if metric == "ip" and not unit:
        return (
            f"index {name!r} ranks by inner product over vectors that are not unit length "
            "(their length counts), while text scores are cosines; text search needs a cosine "
            "index (pinsearch index --metric cosine --rebuild)"
        )
    return None


def text_index_for(store: Any, backbone: str | None) -> str | None:
    """The index a text query names when the user names none and the backbone's own one (the
    one image queries search) cannot rank by cosine (an l2 index): its first index that can
    (:func:`pinsearch.dupes.cosine_index`'s choice). None: the own one can, or none can
    (:class:`TextSearcher` says why)."""
    from pinsearch.dupes import cosine_index

    name = store.resolve_backbone(backbone)
    names = store.index_names(name, text_spaces=False)
    try:
        instead = cosine_index(store, name)
    except ValueError:  # (no index ranks by cosine, or no vector)
        return None
    own = name if name in names else names[0]
    if instead == own:
        return None
    _logger.info("text queries search index %s (%s ranks otherwise)", instead, own)
    return instead


class TextSearcher(PinSearcher):
    """Similar-pin and text queries over one backbone of a store.

    Args:
        store, backbone, index, config, cache_metadata: as for :class:`PinSearcher`.
        encoder: a text encoder into the backbone's space (default: found for the store).

    Raises:
        ValueError: the backbone's index measures distances (l2, l1): text scores are
            similarities, so text search needs a cosine or inner-product index.
    """

    def __init__(
        self,
        store: Any,
        *,
        backbone: str | None = None,
        index: str | None = None,
        config: Any = None,
        cache_metadata: bool = False,
        encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__(
            store, backbone=backbone, index=index, config=config, cache_metadata=cache_metadata
        )
        problem = text_index_problem(
            self.index_name, self.index.config.metric, bool(self._embedding.get("normalize"))
        )
        if problem:
            other = text_index_for(store, self.backbone) if index is None else None
            if other is not None:
                problem += f"; its index {other!r} ranks by cosine: --index {other}"
            raise ValueError(problem)
        self._encoder = encoder
        self._titles: PinSearcher | None = None
        self._centroids: tuple[np.ndarray, np.ndarray] | None = None
        # board names, categories, and each (board, category) pair's board, category, unit
        # centroid and the length of its sum
        self._pairs: tuple[np.ndarray, ...] | None = None
        self._board_size_memo: dict[tuple[str | None, str | None], dict[str, int]] = {}
        self._has_text: bool | None = None  # any pin with a title or description

    @property
    def encoder(self) -> TextEncoder:
        """The text encoder (built on first use: loading a text model takes seconds)."""
        if self._encoder is None:
            self._encoder = text_encoder_for(  # (a CLIP model shared with image queries)
                self.store, self.backbone, image_model=self.backbone_model
            )
        return self._encoder

    def warm(self) -> None:
        """As :meth:`PinSearcher.warm`, and what a first text request would load: the text
        encoder (an alignment is read and checked now: a later ``pinsearch align`` replaces
        its file) and the title vectors' index, their parts mapped (a later writer deletes
        them). A store without these warms the image side alone; text requests say why."""
        super().warm()
        for part, load in (("text encoder", lambda: self.encoder), ("titles", self._warm_titles)):
            try:
                load()
            except (PinsearchError, ValueError):  # no text tower or no titles: said per request
                pass
            except Exception as exc:  # a model folder broken, a GPU gone: text alone fails
                _logger.warning("text search not warmed (%s: %s); text requests say why", part, exc)

    def _warm_titles(self) -> None:
        self.titles().warm()

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(n, dim) unit query vectors in the backbone's space.

        Raises:
            ValueError: an empty text.
        """
        for t in texts:
            if not t or not t.strip():
                raise ValueError("text query is empty")
        return self.encoder.encode(texts)

    def titles(self) -> PinSearcher:
        """The searcher over the pins' title vectors.

        Raises:
            ValueError: no title vectors yet (they come with a CLIP index or pinsearch align).
        """
        if self._titles is None:
            name = text_space(self.backbone)
            if self.store.catalog.get_index(name) is None and not self._any_text():
                raise ValueError(
                    f"no pin of store {self.store.root} has a title or description: title "
                    "search has nothing to search (--mode image searches the images)"
                )
            if self.store.catalog.get_index(name) is None:
                raise ValueError(
                    f"store {self.store.root} has no title vectors for {self.backbone!r}; "
                    "they are made by pinsearch index (CLIP backbones) or pinsearch align, "
                    "and by pinsearch refresh after a run stopped before it made them"
                )
            if title_space_outdated(self.store, self.backbone):
                raise ValueError(
                    f"the title vectors of {self.backbone!r} in {self.store.root} were made by "
                    "another text encoder than its queries use (an align stopped before it "
                    "embedded them again); pinsearch refresh embeds them again (a running "
                    "pinsearch serve sees them once restarted)"
                )
            self._titles = PinSearcher(
                self.store,
                backbone=name,
                index=name,
                cache_metadata=self.cache_metadata,
                title_space=True,
            )
            self._titles.share_metadata(self)  # the same pins: one copy of their metadata
        return self._titles

    # -- pins ------------------------------------------------------------------------------

    def search_text(
        self,
        text: str,
        k: int = 10,
        *,
        board: str | None = None,
        user: str | None = None,
        category: str | None = None,
        mode: str = "image",
        alpha: float = 0.5,
    ) -> SearchResult:
        """Pins matching a text (see the module docstring for the modes)."""
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        start = time.perf_counter()
        q = self.embed_text([text])
        query = {"text": text, "mode": mode, "text_encoder": self.encoder.name}
        if mode == "image":
            res = self._run(q, k, query, board, user, category)
        elif mode == "title":
            res = self.titles()._run(q, k, query, board, user, category)
            res.backbone = self.backbone
        else:
            query["alpha"] = alpha
            res = self._fused(q, k, query, board, user, category, alpha)
        res.seconds = time.perf_counter() - start
        return res

    def _fused(
        self,
        q: np.ndarray,
        k: int,
        query: dict[str, Any],
        board: str | None,
        user: str | None,
        category: str | None,
        alpha: float,
    ) -> SearchResult:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        # no pin has a title or description: every pin takes its image score (where some
        # have, titles() says why their vectors are missing)
        untitled = self.store.catalog.get_index(text_space(self.backbone)) is None and (
            not self._any_text()
        )
        titles = None if untitled else self.titles()
        index = self.index_name + ("" if titles is None else f"+{titles.index_name}")
        allowed = self.filter_keys(board=board, user=user, category=category)
        pool = max(10 * k, 100)
        _, img_keys = self.search_keys(q, pool, allowed)
        tit_keys = titles.search_keys(q, pool, allowed)[1] if titles else np.empty((1, 0), int)
        cand = np.union1d(img_keys[0][img_keys[0] >= 0], tit_keys[0][tit_keys[0] >= 0])
        if cand.size == 0:
            return SearchResult(query, self.backbone, index, "fused-z", k,
                                _filters(board, user, category))  # fmt: skip
        iv, ik = self.store.vectors(self.backbone).load(cand)
        s_img = unit_rows(iv) @ q[0]
        s_tit = np.full(len(ik), np.nan, np.float32)
        if titles is not None:
            tv, tk = self.store.vectors(titles.backbone).load(ik)
            s_tit[np.searchsorted(ik, tk)] = unit_rows(tv) @ q[0]
        z_img = _z(s_img)
        has = ~np.isnan(s_tit)
        z_tit = z_img.copy()
        if has.any():
            z_tit[has] = _z(s_tit[has])
        fused = alpha * z_img + (1.0 - alpha) * z_tit
        order = np.argsort(-fused, kind="stable")
        hits = self.hits(ik[order[:k]], fused[order[:k]])
        if len(hits) < k:  # a snapshot's catalog lacks some pins: further candidates fill in
            hits = self.hits(ik[order], fused[order])[:k]
        return SearchResult(
            query=query,
            backbone=self.backbone,
            index=index,
            metric="fused-z",
            k=k,
            filters=_filters(board, user, category),
            hits=hits,
        )

    # -- boards ----------------------------------------------------------------------------

    def search_boards(
        self,
        text: str,
        k: int = 10,
        *,
        per_board: int = 3,
        score: str = "topm",
        user: str | None = None,
        category: str | None = None,
        pool: int | None = None,
    ) -> BoardResult:
        """Boards whose pins match a text best, each with its ``per_board`` best pins.

        Args:
            score: ``topm`` (mean of the board's ``per_board`` best pin scores) or
                ``centroid`` (similarity to the board's mean vector).
            pool: candidate pins for ``topm`` (default ``max(2000, 50 k per_board)``).
        """
        if score not in BOARD_SCORES:
            raise ValueError(f"score must be one of {BOARD_SCORES}, got {score!r}")
        if k <= 0 or per_board <= 0:
            raise ValueError(f"k and per_board must be positive, got {k}, {per_board}")
        start = time.perf_counter()
        q = self.embed_text([text])
        allowed = self.filter_keys(user=user, category=category)
        sizes = self._board_sizes(user, category)
        if score == "topm":
            ranked = self._boards_topm(q, k, per_board, allowed, pool)
        else:
            ranked = self._boards_centroid(q, k, per_board, sizes, user, category_key(category))
        info = self._board_info([b for b, _, _ in ranked])
        boards = []
        for board, board_score, pins in ranked:
            row = info.get(board, {})
            boards.append(
                BoardHit(
                    rank=len(boards) + 1,
                    board=board,
                    board_name=row.get("name") or board,
                    user=row.get("user_id"),
                    # (under a category filter, the category its pins here have: a
                    # manifest's board may mix categories)
                    category=row.get("category") if category is None else category_key(category),
                    score=float(board_score),
                    pins_in_board=int(sizes.get(board, 0)),
                    pins=pins,
                )
            )
        return BoardResult(
            query={"text": text, "text_encoder": self.encoder.name},
            backbone=self.backbone,
            text_encoder=self.encoder.name,
            score=score,
            per_board=per_board,
            k=k,
            filters=_filters(None, user, category),
            boards=boards,
            seconds=time.perf_counter() - start,
        )

    def _board_sizes(self, user: str | None, category: str | None) -> dict[str, int]:
        """Pins per board (of ``user``, in ``category``): one ``GROUP BY`` over the pins, kept
        per filter with ``cache_metadata`` (a warm process's store does not change under it)."""
        if not self.cache_metadata:
            return self._count_boards(user, category)
        memo, key = self._board_size_memo, (user, category)
        if key not in memo:
            if len(memo) >= 64:  # the oldest filter goes (each holds a count per board)
                memo.pop(next(iter(memo)))
            memo[key] = self._count_boards(user, category)
        return memo[key]

    def _count_boards(self, user: str | None, category: str | None) -> dict[str, int]:
        where: list[str] = []
        params: list[Any] = []
        if user is not None:  # (either Unicode spelling, as filter_keys matches)
            where.append("user_id IN (SELECT unnest(?))")
            params.append(unicode_spellings(user))
        if category is not None:
            where.append("category = ?")
            params.append(category_key(category))
        sql = "SELECT board, count(*) AS n FROM pins"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.store.catalog.query(sql + " GROUP BY board", params)
        return {r["board"]: int(r["n"]) for r in rows}

    def _any_text(self) -> bool:
        """Whether any pin has a title or description (read once per searcher)."""
        if self._has_text is None:
            candidates = text_candidates(self.store)
            self._has_text = any(  # (texts read a chunk at a time, up to the first found)
                len(pin_texts(self.store, candidates[i : i + 100_000])[0])
                for i in range(0, len(candidates), 100_000)
            )
        return self._has_text

    def _board_info(self, boards: list[str]) -> dict[str, dict[str, Any]]:
        if not boards:
            return {}
        rows = self.store.catalog.query(
            "SELECT board, name, user_id, category FROM boards WHERE board IN (SELECT unnest(?))",
            [boards],
        )
        return {r["board"]: r for r in rows}

    def _boards_topm(
        self,
        q: np.ndarray,
        k: int,
        m: int,
        allowed: np.ndarray | None,
        pool: int | None,
    ) -> list[tuple[str, float, list[SearchHit]]]:
        n = pool or max(2000, 50 * k * m)
        n = min(n, self.index.ntotal if allowed is None else len(allowed))
        if n <= 0:
            return []
        scores, keys = self.search_keys(q, n, allowed)
        ok = keys[0] >= 0
        keys, scores = keys[0][ok], scores[0][ok]
        if len(keys) == 0:
            return []
        meta = self._metadata(keys)
        floor = float(scores[-1])  # any pin outside the pool scores at most this
        by_board: dict[str, list[int]] = {}  # board -> positions in the pool, best first
        for i, key in enumerate(keys.tolist()):
            row = meta.get(int(key))
            if row is not None:
                by_board.setdefault(row["board"], []).append(i)
        short = sorted(b for b, pos in by_board.items() if len(pos) < m)  # the rest have m
        held = self._held_board_sizes(short, allowed)
        ranked = []
        for board, pos in by_board.items():
            want = min(m, held.get(board, len(pos)))
            top = [float(scores[i]) for i in pos[:want]]
            top += [floor] * (want - len(top))
            ranked.append((board, float(np.mean(top)), pos[:m]))
        ranked.sort(key=lambda r: (-r[1], r[0]))
        return [(b, sc, self.hits(keys[pos], scores[pos])) for b, sc, pos in ranked[:k]]

    def _held_board_sizes(self, boards: list[str], allowed: np.ndarray | None) -> dict[str, int]:
        """Pins of each of the (sorted) ``boards`` among ``allowed`` that have a vector in this
        index. A board's top-m pads with the pool's floor only for pins that have a score: in a
        store with several backbones, pins without this one's vector (outside a sample, or
        failed) have none."""
        if not boards:
            return {}
        if self.cache_metadata:
            groups = self._group("board")
            parts = [groups.get(b, _NO_KEYS) for b in boards]
            keys = np.concatenate(parts) if parts else _NO_KEYS
            code = np.repeat(np.arange(len(boards)), [len(p) for p in parts])
        else:
            cols = self.store.catalog.connection.execute(
                "SELECT board, pin_key FROM pins WHERE board IN (SELECT unnest(?))", [boards]
            ).fetchnumpy()
            keys = np.asarray(cols["pin_key"], dtype=np.int64)
            code = np.searchsorted(np.array(boards), np.asarray(cols["board"]).astype(str))
        keep = self.index.holds(keys)
        if allowed is not None:
            keep &= in_sorted(allowed, keys)
        counts = np.bincount(code[keep], minlength=len(boards))
        return dict(zip(boards, counts.tolist()))

    def _boards_centroid(
        self,
        q: np.ndarray,
        k: int,
        m: int,
        sizes: dict[str, int],
        user: str | None,
        category: str | None,
    ) -> list[tuple[str, float, list[SearchHit]]]:
        names, centroids = self.board_centroids(category=category)
        keep = np.isin(names, list(sizes))
        names, centroids = names[keep], centroids[keep]
        if len(names) == 0:
            return []
        s = centroids @ q[0]
        order = np.argsort(-s, kind="stable")[:k]
        within = self.filter_keys(user=user, category=category)
        out = []
        for i in order.tolist():
            board = str(names[i])
            # the board's own pins, by key (a board filter also takes display names: another
            # board's name may be this one's key)
            allowed = self._board_keys(board)
            if within is not None:
                allowed = np.intersect1d(allowed, within, assume_unique=True)
            sc, ks = self.search_keys(q, m, allowed)
            ok = ks[0] >= 0
            out.append((board, float(s[i]), self.hits(ks[0][ok], sc[0][ok])))
        return out

    def board_centroids(
        self, chunk: int = 65_536, *, category: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(board names, unit centroid per board) over the stored vectors; with ``category``,
        each board's centroid over its pins of that category (a manifest's board may mix
        categories), boards without one left out.

        The vectors are summed once per (board, category) pair, read ``chunk`` rows at a time
        with one sparse product per chunk: a million pins' vectors are never all in memory at
        once. Boards without a stored vector are left out."""
        if self._pairs is None:
            pk, cols = self.store.catalog.pin_columns("board", "category")
            boards, board_code = np.unique(cols["board"], return_inverse=True)
            cats, cat_code = np.unique(cols["category"], return_inverse=True)
            pairs, pair_code = np.unique(board_code * len(cats) + cat_code, return_inverse=True)
            sums = np.zeros((len(pairs), self.index.dim), np.float32)  # (float32: the memory)
            for vectors, keys in self.store.vectors(self.backbone).iter_chunks(chunk):
                found = np.flatnonzero(in_sorted(pk, keys))
                if found.size:
                    pair = pair_code[np.searchsorted(pk, keys[found])]
                    group_sums(pair, len(pairs), unit_rows(vectors[found]), out=sums)
            norms = np.linalg.norm(sums, axis=1)
            held = norms > 0
            pairs, sums, norms = pairs[held], sums[held], norms[held]
            sums /= norms[:, None]  # in place: each pair's unit centroid
            self._pairs = (boards, cats, pairs // len(cats), pairs % len(cats), sums, norms)
        boards, cats, pair_board, pair_cat, units, norms = self._pairs
        if category is not None:
            at = int(np.searchsorted(cats, category))
            sel = pair_cat == at if at < len(cats) and cats[at] == category else pair_cat < 0
            return boards[pair_board[sel]], units[sel]
        if self._centroids is None:
            if len(np.unique(pair_board)) == len(pair_board):  # no board mixes categories
                self._centroids = (boards[pair_board], units)  # (the same rows, not a copy)
            else:
                per_board = group_sums(
                    pair_board, len(boards), units, dtype=np.float32, weights=norms
                )
                held = np.abs(per_board).sum(axis=1) > 0
                self._centroids = (boards[held], unit_rows(per_board[held]))
        return self._centroids

    # -- titles ----------------------------------------------------------------------------

    def rank_texts(
        self,
        texts: list[str],
        *,
        pin_id: str | None = None,
        image: str | Path | Any = None,
    ) -> TitleResult:
        """Rank candidate titles or descriptions by how well they fit a pin or an image.

        Raises:
            PinNotFoundError: unknown pin id.
            ValueError: no candidates, or neither/both of pin_id and image.
        """
        if not texts:
            raise ValueError("give at least one candidate text")
        if (pin_id is None) == (image is None):
            raise ValueError("give exactly one of pin_id and image")
        start = time.perf_counter()
        if pin_id is not None:
            key = self.store.catalog.keys_for_ids([pin_id]).get(pin_id)
            if key is None:
                raise PinNotFoundError(f"pin {pin_id!r} is not in store {self.store.root}")
            vec, _ = self.store.vectors(self.backbone).load(np.array([key]))
            if key is None or len(vec) == 0:
                raise PinNotFoundError(f"pin {pin_id!r} has no {self.backbone!r} vector")
            query: dict[str, Any] = {"pin_id": pin_id}
        else:
            from pinsearch.embed import embed_like_run

            vec = embed_like_run(self.backbone_model(), [image], self._embedding)
            query = {"image": str(image) if isinstance(image, (str, Path)) else "<image>"}
        s = self.embed_text(list(texts)) @ unit_rows(vec)[0]
        order = np.argsort(-s, kind="stable")
        matches = [TextMatch(r + 1, texts[i], float(s[i])) for r, i in enumerate(order.tolist())]
        return TitleResult(
            query=query,
            backbone=self.backbone,
            text_encoder=self.encoder.name,
            matches=matches,
            seconds=time.perf_counter() - start,
        )
