"""Analyses beyond the paper, over a finished study.

- :func:`soft_vote`: average the stored per-pin test probabilities of several cells (decision
  values are turned into probabilities by a softmax first) -- does an ensemble beat its members?
- :func:`board_level`: classify boards (their mean-pooled pin vectors) instead of pins, against
  pin-level classification on the same board split -- the label's true unit is the board.
- :func:`ablation`: what drives KNN and linear SVM scores on the study's split: normalisation,
  k and the distance metric.
- :func:`near_copies`: test pins with a near-copy among the training pins (a random split puts
  re-pins on both sides), and every cell's test macro-F1 without them.
- :func:`beyond_section`: all of the above as the report's "Beyond the paper" section.

Everything is deterministic given the study's seed.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, train_test_split

from pinsearch.eval.markdown import escape
from pinsearch.eval.metrics import classification_metrics
from pinsearch.eval.study import (
    StudyConfig,
    StudyData,
    cell_predictions,
    load_study_vectors,
    select_pins,
)
from pinsearch.gridsearch import batched_grid_search
from pinsearch.heads import HEADS, create_head
from pinsearch.store import Store

__all__ = [
    "AblationRow",
    "BoardResult",
    "EnsembleResult",
    "NearCopyResult",
    "ablation",
    "beyond_section",
    "board_level",
    "l2_normalize",
    "mean_pool",
    "near_copies",
    "scores_to_proba",
    "soft_vote",
]

_logger = logging.getLogger(__name__)

_KNN_METRICS = ("l2", "cosine", "l1", "ip")


@dataclass
class EnsembleResult:
    """A soft vote of study cells, scored on the study's test part."""

    members: list[str]  # "backbone/head"
    macro_f1: float
    accuracy: float


@dataclass
class BoardResult:
    """Board-level classification against pin-level classification on the same board split."""

    backbone: str
    head: str
    boards: int
    classes: int
    macro_f1: float  # over test boards
    accuracy: float  # over test boards
    pin_level_macro_f1: float  # over pins of the test boards, trained on pins of the others
    params: dict[str, Any] = field(default_factory=dict)  # the head's, for both units
    cv_folds: int = 0  # folds of the grouped CV that chose them (0: given, not chosen)
    test_boards: int = 0  # of ``boards``, those scored (the rest trained)


@dataclass
class NearCopyResult:
    """Test pins with a training pin at cosine >= ``threshold``, and the cells without them."""

    backbone: str  # whose vectors tell near-copies
    threshold: float
    test: int  # test pins
    with_copy: int  # of them, those with a near-copy among the training pins
    same_label: int  # of those, how many have the label of their nearest training pin
    # (backbone, head, test macro-F1, test macro-F1 on the pins without a training near-copy)
    cells: list[tuple[str, str, float, float]] = field(default_factory=list)


@dataclass
class AblationRow:
    """Test macro-F1 of one variant (``setting``: normalization, k or metric)."""

    backbone: str
    setting: str
    value: str
    macro_f1: float


# -- pure helpers -----------------------------------------------------------------------------


def scores_to_proba(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """Turn stored scores into class probabilities (rows summing to 1).

    Args:
        scores: (n, n_classes) scores, or (n,) binary decision values (``score(1) - score(0)``).
        probabilities: the scores already are probabilities (only renormalised); otherwise a
            softmax is taken, which keeps each row's ranking of classes.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:  # binary decision function: softmax([0, d]) = [1 - sigmoid(d), sigmoid(d)]
        s = np.column_stack([np.zeros_like(s), s])
    if s.ndim != 2:
        raise ValueError(f"scores must be 1-D or 2-D, got shape {s.shape}")
    if probabilities:
        total = s.sum(axis=1, keepdims=True)
        return s / np.where(total > 0, total, 1.0)
    z = np.exp(s - s.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_pool(vectors: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the rows of each group (``groups[i]`` in ``[0, n_groups)``), L2-normalised."""
    sums = np.zeros((n_groups, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, groups, vectors)
    counts = np.bincount(groups, minlength=n_groups)[:, None]
    return l2_normalize(sums / np.maximum(counts, 1)).astype(np.float32)


def _macro_f1(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> tuple[float, float]:
    m = classification_metrics(y_true, y_pred, np.asarray(classes))
    return m.macro_f1, m.accuracy


def _head_params(name: str, params: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """``params`` with the study's ``device`` added where the head takes one and they lack it."""
    out = dict(params or {})
    if device != "auto" and "device" in create_head(name).get_params() and "device" not in out:
        out["device"] = "gpu" if name == "knn" and device.startswith("cuda") else device
    return out


def _new_head(name: str, params: dict[str, Any] | None, device: str) -> BaseEstimator:
    return create_head(name, **_head_params(name, params, device))


# -- soft vote --------------------------------------------------------------------------------


def _scored_cells(store: Store, config: StudyConfig) -> list[tuple[str, str]]:
    if not store.catalog.has_table("study_predictions"):
        return []
    rows = store.catalog.connection.execute(
        "SELECT DISTINCT backbone, head FROM study_predictions WHERE study = ? AND "
        "config_hash = ? AND scores IS NOT NULL",
        [config.name, config.fingerprint()],
    ).fetchall()
    # only the study's own cells: an earlier run under the same settings may have stored
    # cells of backbones (or heads) this one no longer lists
    rank = {cell: i for i, cell in enumerate(itertools.product(config.backbones, config.heads))}
    cells = [(str(b), str(h)) for b, h in rows if (str(b), str(h)) in rank]
    return sorted(cells, key=rank.__getitem__)  # the study's cell order


def _is_probability(head: str, scores: np.ndarray) -> bool:
    cls = HEADS.get(head)
    if cls is not None:  # the study stored predict_proba when the head has it
        return hasattr(cls, "predict_proba")
    return bool(
        scores.ndim == 2 and (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    )


def _cell_scores(
    store: Store, config: StudyConfig, backbone: str, head: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    cell = store.catalog.query(
        "SELECT metrics FROM study_cells WHERE study = ? AND config_hash = ? AND backbone = ? "
        "AND head = ?",
        [config.name, config.fingerprint(), backbone, head],
    )
    classes = [str(c) for c in json.loads(cell[0]["metrics"])["classes"]]
    keys, labels, _, scores = cell_predictions(store, config, backbone, head)
    assert scores is not None  # (_scored_cells lists the cells that stored scores)
    return keys, labels, scores, classes


def soft_vote(
    store: Store, config: StudyConfig, members: list[tuple[str, str]] | None = None
) -> EnsembleResult:
    """Average the stored test probabilities of study cells and score the vote.

    Args:
        store: the study's store (open).
        config: the study (its name and fingerprint select the stored cells).
        members: ``(backbone, head)`` cells; None = every cell with stored scores.

    Raises:
        ValueError: no scored cell, an unknown member, or members scored on different pins.
    """
    available = _scored_cells(store, config)
    if members is None:
        chosen = available
        if not chosen:
            raise ValueError(f"study {config.name!r} has no cell with stored test scores")
    else:
        chosen = [(str(b), str(h)) for b, h in members]
        unknown = [m for m in chosen if m not in available]
        if unknown or not chosen:
            raise ValueError(
                f"members {unknown or chosen} are not scored cells of study {config.name!r}; "
                f"available: {available}"
            )
    parts = [_cell_scores(store, config, b, h) for b, h in chosen]
    classes = sorted({c for *_, cls in parts for c in cls})
    keys, labels = parts[0][0], parts[0][1]
    total = np.zeros((len(keys), len(classes)))
    for (backbone, head), (k, _, scores, cls) in zip(chosen, parts):
        if not np.array_equal(k, keys):
            raise ValueError(
                f"cell {backbone}/{head} was scored on other test pins than {chosen[0]}"
            )
        columns = [classes.index(c) for c in cls]
        total[:, columns] += scores_to_proba(scores, _is_probability(head, scores))
    pred = np.asarray(classes)[np.argmax(total, axis=1)]
    f1, acc = _macro_f1(labels, pred, classes)
    return EnsembleResult([f"{b}/{h}" for b, h in chosen], f1, acc)


# -- board level ------------------------------------------------------------------------------


def board_level(
    store: Store,
    config: StudyConfig,
    backbone: str,
    head: str = "lsvm",
    params: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
) -> BoardResult:
    """Classify boards (mean-pooled, L2-normalised pin vectors) by category, and compare.

    Boards of the study sample are split stratified by category (``config.seed`` and
    ``config.test_size``); classes with fewer than 2 boards are left out. The pin-level score
    trains the same head on the pins of the training boards and predicts each pin of the test
    boards, so no board is on both sides of either comparison. Pin vectors are L2-normalised
    for both.

    With a ``grid``, the head's hyperparameters (over ``params``) are chosen by a CV on the
    pins of the training boards only, folds grouped by board (``StratifiedGroupKFold``,
    ``config.folds`` or fewer: no more than the training boards of the smallest class),
    scored by macro-F1; both units use the choice. A choice made by the study's own CV would
    leak: its folds held pins of the test boards. Where a class has a single training board
    there is no such CV: ``params`` are used as given (``cv_folds`` 0).

    Raises:
        ValueError: the label is not ``category``, fewer than 2 classes have 2 boards, or the
            boards are too few for a stratified split.
    """
    if config.label != "category":
        raise ValueError(f"board_level needs label 'category' (a board's), got {config.label!r}")
    data = select_pins(store, config)
    board_of = dict(store.catalog.connection.execute("SELECT pin_key, board FROM pins").fetchall())
    pin_board = np.array([str(board_of.get(int(k)) or f"pin:{k}") for k in data.keys])
    names, groups = np.unique(pin_board, return_inverse=True)
    votes: list[Counter[str]] = [Counter() for _ in names]
    for g, label in zip(groups, data.labels):
        votes[g][str(label)] += 1
    board_label = np.array([min(v, key=lambda c: (-v[c], c)) for v in votes])  # majority
    per_class = Counter(board_label.tolist())
    kept = sorted(c for c, n in per_class.items() if n >= 2)
    if len(kept) < 2:
        raise ValueError(
            f"board-level classification needs at least 2 classes with >= 2 boards; boards per "
            f"class: {dict(sorted(per_class.items()))}"
        )
    boards = np.flatnonzero(np.isin(board_label, kept))
    try:
        train_b, test_b = train_test_split(
            boards,
            test_size=config.test_size,
            stratify=board_label[boards],
            random_state=config.seed,
        )
    except ValueError as exc:
        raise ValueError(
            f"cannot split {len(boards)} boards of {len(kept)} classes stratified with "
            f"test_size={config.test_size}: {exc}"
        ) from exc
    X = l2_normalize(load_study_vectors(store, backbone, data.keys, normalize=True))
    pin_train = np.isin(groups, train_b)
    pin_test = np.isin(groups, test_b)
    chosen, folds = dict(params or {}), 0
    fewest = min(Counter(board_label[train_b].tolist()).values())
    if grid and fewest >= 2:  # (a class of one training board would leave some folds
        folds = min(config.folds, fewest)  # without it: no grouped CV, ``params`` as given)
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=config.seed)
        y, g = data.labels[pin_train], groups[pin_train]
        base, splits = _head_params(head, chosen, config.device), list(cv.split(X[pin_train], y, g))
        search: Any
        if config.batched_cv:
            search = batched_grid_search(head, base, grid, X[pin_train], y, splits, refit=False)
        else:  # (the study asks for scikit-learn's own)
            search = GridSearchCV(
                create_head(head, **base), grid, scoring="f1_macro", cv=splits, refit=False,
                n_jobs=config.n_jobs, error_score="raise",
            ).fit(X[pin_train], y)  # fmt: skip
        chosen.update(search.best_params_)
    pooled = mean_pool(X, groups, len(names))
    model = _new_head(head, chosen, config.device).fit(pooled[train_b], board_label[train_b])
    f1, acc = _macro_f1(board_label[test_b], model.predict(pooled[test_b]), kept)
    pin_model = _new_head(head, chosen, config.device).fit(X[pin_train], data.labels[pin_train])
    pin_f1, _ = _macro_f1(data.labels[pin_test], pin_model.predict(X[pin_test]), kept)
    return BoardResult(
        backbone, head, len(boards), len(kept), f1, acc, pin_f1, chosen, folds, len(test_b)
    )


# -- near-copies across the split -------------------------------------------------------------

#: cosine at which two pins count as copies of one image (re-encoded, resized, a re-pin): the
#: threshold ``pinsearch dupes`` suggests for copies
COPY_THRESHOLD = 0.95


def near_copies(
    store: Store,
    config: StudyConfig,
    data: StudyData,
    backbone: str,
    results: list[Any],
    threshold: float = COPY_THRESHOLD,
) -> NearCopyResult:
    """How many test pins have a near-copy among the training pins, and each cell's test
    macro-F1 on the others (from its stored predictions: nothing is trained again).

    A random split, the paper's protocol, puts re-pins of one image on both sides; a test pin
    whose copy was trained on is easy for KNN in particular. Near-copies are told by exact
    cosine on ``backbone``'s L2-normalised vectors, a fused backbone's first part's (a flat
    inner-product search of the test pins among the training pins), counted from
    ``threshold`` less ``COSINE_SLACK``, as ``pinsearch dupes`` counts them.

    Raises:
        ValueError: a cell's stored predictions are missing or on other pins than the test part.
    """
    import faiss

    from pinsearch.dupes import COSINE_SLACK

    backbone = backbone.split("+")[0]  # (a fused cosine is the mean of its parts')
    X = l2_normalize(load_study_vectors(store, backbone, data.keys, normalize=True))
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X[data.train], dtype=np.float32))
    sims, nearest = index.search(np.ascontiguousarray(X[data.test], dtype=np.float32), 1)
    copy = sims[:, 0] >= threshold - COSINE_SLACK
    y_train, y_test = data.labels[data.train], data.labels[data.test]
    same = int(np.count_nonzero(y_train[nearest[copy, 0]] == y_test[copy]))
    test_keys = data.keys[data.test]
    order = np.argsort(test_keys)
    cells = []
    for r in results:
        keys, truth, pred, _ = cell_predictions(store, config, r.backbone, r.head)
        if not np.array_equal(keys, test_keys[order]):
            raise ValueError(
                f"cell {r.backbone}/{r.head} has no stored predictions of the test part"
            )
        kept = ~copy[order]
        classes = r.metrics["classes"]
        without = _macro_f1(truth[kept], pred[kept], classes)[0] if kept.any() else float("nan")
        cells.append((r.backbone, r.head, r.test_macro_f1, without))
    return NearCopyResult(
        backbone, threshold, len(test_keys), int(np.count_nonzero(copy)), same, cells
    )


# -- ablation ---------------------------------------------------------------------------------


def ablation(
    store: Store,
    config: StudyConfig,
    data: StudyData,
    backbone: str,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    metrics: Sequence[str] = ("l2", "cosine", "l1"),
) -> list[AblationRow]:
    """Test macro-F1 of KNN and linear-SVM variants on the study's split (no CV).

    Settings: ``normalization`` -- raw vs L2-normalised vectors for KNN (l2, k=10) and the
    linear SVM (C=1), not for a fused backbone (its blocks are normalised before they are
    joined: the two would be the same vectors up to a factor); ``k`` -- KNN (l2) on
    normalised vectors for each k (k larger than the training part skipped); ``metric`` --
    KNN (k=10) on the vectors as the study used them (on normalised vectors l2 and cosine
    rank neighbours alike). k=10 becomes the training part's size when that is smaller.

    Raises:
        ValueError: a k below 1 or an unknown metric (named).
    """
    bad_k = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad_k:
        raise ValueError(f"ks must be positive integers, got {bad_k}")
    bad_m = [m for m in metrics if m not in _KNN_METRICS]
    if bad_m:
        raise ValueError(f"unknown KNN metrics {bad_m}; known: {list(_KNN_METRICS)}")
    raw = load_study_vectors(store, backbone, data.keys, normalize=False)
    norm = l2_normalize(raw).astype(np.float32)
    as_study = load_study_vectors(store, backbone, data.keys, config.normalize)
    y, train, test = data.labels, data.train, data.test
    classes = sorted(set(y[train].tolist()))
    k10 = min(10, len(train))

    def score(head: str, params: dict[str, Any], X: np.ndarray) -> float:
        model = _new_head(head, params, config.device).fit(X[train], y[train])
        return _macro_f1(y[test], model.predict(X[test]), classes)[0]

    rows = []
    compared = (("raw", raw), ("normalised", norm)) if "+" not in backbone else ()
    for head, params in (("knn", {"n_neighbors": k10, "metric": "l2"}), ("lsvm", {"C": 1.0})):
        for tag, X in compared:
            rows.append(
                AblationRow(backbone, "normalization", f"{head} {tag}", score(head, params, X))
            )
    for k in ks:
        if k <= len(train):
            f1 = score("knn", {"n_neighbors": int(k), "metric": "l2"}, norm)
            rows.append(AblationRow(backbone, "k", str(int(k)), f1))
    for metric in metrics:
        f1 = score("knn", {"n_neighbors": k10, "metric": metric}, as_study)
        rows.append(AblationRow(backbone, "metric", metric, f1))
    return rows


# -- report section ---------------------------------------------------------------------------


def _part(name: str, lines: Callable[[], list[str]]) -> list[str]:
    """Run one part of the section; a failure becomes a one-line note."""
    try:
        return lines()
    except Exception as exc:  # one failing analysis must not sink the report
        _logger.warning("beyond the paper: %s failed: %s", name, exc)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return [f"_{name} skipped: {escape(reason)}_"]  # (the reason may name categories)


def _ensemble_lines(store: Store, config: StudyConfig, results: list[Any]) -> list[str]:
    scored = set(_scored_cells(store, config))
    best_per_head: dict[str, Any] = {}
    for r in results:
        if (r.backbone, r.head) in scored and (
            r.head not in best_per_head or r.cv_mean > best_per_head[r.head].cv_mean
        ):
            best_per_head[r.head] = r
    single = max(results, key=lambda r: r.cv_mean)
    everything = soft_vote(store, config)
    per_head = soft_vote(store, config, [(r.backbone, r.head) for r in best_per_head.values()])
    lines = [
        "Soft vote: the mean of the cells' test probabilities (decision values through a "
        "softmax). Best cells are chosen by CV macro-F1, not on the test part.",
        "",
        "| ensemble | members | macro-F1 | accuracy |",
        "| --- | --- | --- | --- |",
        f"| best single cell | {single.backbone}/{single.head} | {single.test_macro_f1:.3f} | "
        f"{single.metrics['accuracy']:.3f} |",
    ]
    for title, res in (("all cells", everything), ("best cell per head", per_head)):
        lines.append(
            f"| {title} | {', '.join(res.members)} | {res.macro_f1:.3f} | {res.accuracy:.3f} |"
        )
    return lines


def _fusion_lines(results: list[Any]) -> list[str]:
    fused = [r for r in results if "+" in r.backbone]
    if not fused:
        return [
            "No fused features in this study: a backbone named `a+b` concatenates the "
            "L2-normalised features of `a` and `b`; add one to `backbones` to compare."
        ]
    score = {(r.backbone, r.head): r.test_macro_f1 for r in results}
    lines = [
        "Fused backbones (concatenated L2-normalised features) are cells of the table above:",
        "",
        "| features | head | test macro-F1 | best single part | gain |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in fused:
        parts = [score[(p, r.head)] for p in r.backbone.split("+") if (p, r.head) in score]
        best = f"{max(parts):.3f}" if parts else "–"
        gain = f"{r.test_macro_f1 - max(parts):+.3f}" if parts else "–"
        lines.append(f"| {r.backbone} | {r.head} | {r.test_macro_f1:.3f} | {best} | {gain} |")
    return lines


def _board_lines(store: Store, config: StudyConfig, backbone: str) -> list[str]:
    grid = config.heads.get("lsvm")
    res = board_level(store, config, backbone, "lsvm", grid=grid)
    how = (
        f"chosen by a {res.cv_folds}-fold CV on the training boards' pins, folds grouped by board"
        if res.cv_folds
        else "the head's defaults: a class has a single training board, too few for a CV "
        "grouped by board"
        if grid
        else "the head's defaults: the study has no lsvm grid"
    )
    return [
        f"{res.boards} boards in {res.classes} classes, split by board (seed {config.seed}): "
        f"{res.test_boards} test boards; linear SVM `{json.dumps(res.params)}` ({how}) on "
        "L2-normalised vectors.",
        "",
        "| unit | macro-F1 | accuracy |",
        "| --- | --- | --- |",
        f"| board (mean of its pins) | {res.macro_f1:.3f} | {res.accuracy:.3f} |",
        f"| pin (same board split) | {res.pin_level_macro_f1:.3f} | |",
    ]


def _near_copy_lines(
    store: Store, config: StudyConfig, data: StudyData, backbone: str, results: list[Any]
) -> list[str]:
    res = near_copies(store, config, data, backbone, results)
    if not res.with_copy:
        return [
            f"None of the {res.test} test pins has a training pin at cosine >= "
            f"{res.threshold} on {res.backbone} (a copy of the same image): every cell's score "
            "is on pins without one."
        ]
    lines = [
        f"{res.with_copy} of the {res.test} test pins have a training pin at cosine >= "
        f"{res.threshold} on {res.backbone} (a copy of the same image: a re-pin, resized or "
        f"re-encoded), {res.same_label} of them of its label. Each cell scored without them "
        "(its stored predictions; nothing trained again):",
        "",
        "| features | head | all test pins | without near-copies | difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {b} | {h} | {f1:.3f} | {rest:.3f} | {rest - f1:+.3f} |" for b, h, f1, rest in res.cells
    ]
    return lines


def _ablation_lines(store: Store, config: StudyConfig, data: StudyData, backbone: str) -> list[str]:
    rows = ablation(store, config, data, backbone)
    lines = ["| setting | value | macro-F1 |", "| --- | --- | --- |"]
    lines += [f"| {r.setting} | {r.value} | {r.macro_f1:.3f} |" for r in rows]
    if "+" in backbone:  # (fused)
        lines += ["", "Normalisation is not compared for fused features: each block is "
                  "L2-normalised before they are joined."]  # fmt: skip
    return lines


def beyond_section(store: Store, config: StudyConfig, data: StudyData, results: list[Any]) -> str:
    """The report's ``## Beyond the paper`` section (Markdown, no trailing newline).

    Ensembles, feature fusion, board level vs pin level, near-copies across the split and the
    ablation, the last three for the backbone of the best cell by CV macro-F1. A part that
    fails becomes a one-line note.
    """
    md = ["## Beyond the paper", ""]
    if not results:
        return "\n".join([*md, "_No finished cells._"])
    backbone = max(results, key=lambda r: r.cv_mean).backbone
    parts: list[tuple[str, str, Callable[[], list[str]]]] = [
        ("Ensembles", "ensembles", lambda: _ensemble_lines(store, config, results)),
        ("Feature fusion", "feature fusion", lambda: _fusion_lines(results)),
        (
            f"Board level vs pin level ({backbone})",
            "board level",
            lambda: _board_lines(store, config, backbone),
        ),
        (
            f"Near-copies across the split ({backbone})",
            "near-copies",
            lambda: _near_copy_lines(store, config, data, backbone, results),
        ),
        (
            f"Ablation ({backbone})",
            "ablation",
            lambda: _ablation_lines(store, config, data, backbone),
        ),
    ]
    for title, name, lines in parts:
        md += [f"### {title}", "", *_part(name, lines), ""]
    return "\n".join(md).rstrip()
