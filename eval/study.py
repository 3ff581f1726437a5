"""The macro-F1 study: every backbone x head cell, grid search with CV, refit, test.

A study is a TOML file (see ``eval/studies/``). :func:`run_study` embeds what is missing, draws
the sample and the stratified split once (seeded), then runs each cell: ``GridSearchCV`` over
the head's grid with stratified, seeded folds on the training part (each fold's KNN index is
built from that fold's training vectors only, so nothing leaks), refit on all training data,
score the test part. Each finished cell is committed to the store's DuckDB catalog at once, so
an interrupted study resumes without redoing finished cells.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from pinsearch._version import __version__
from pinsearch.classify import head_context, head_context_key, save_store_head
from pinsearch.eval.metrics import classification_metrics
from pinsearch.eval.retrieval import RetrievalConfig, load_retrieval
from pinsearch.gridsearch import batched_grid_search, is_batchable
from pinsearch.heads import HEADS, create_head
from pinsearch.labels import labelled_pins as _labelled_pins
from pinsearch.labels import load_vectors
from pinsearch.store import Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CellResult",
    "StudyConfig",
    "StudyData",
    "cell_predictions",
    "evaluate",
    "labelled_pins",
    "load_study",
    "load_study_vectors",
    "run_study",
    "select_pins",
    "study_summary",
]

_logger = logging.getLogger(__name__)

_STUDY_SCHEMA = """
CREATE TABLE IF NOT EXISTS study_runs (
    study VARCHAR,
    config_hash VARCHAR,
    config VARCHAR,                 -- JSON: the whole StudyConfig
    pins INTEGER,
    train INTEGER,
    test INTEGER,
    left_out VARCHAR,               -- JSON: labels with too few pins
    started_at TIMESTAMP,
    finished_at TIMESTAMP,          -- NULL while running or after an interruption
    PRIMARY KEY (study, config_hash)
);
CREATE TABLE IF NOT EXISTS study_cells (
    study VARCHAR,
    config_hash VARCHAR,            -- hash of everything that decides the cell's result
    backbone VARCHAR,
    head VARCHAR,
    best_params VARCHAR,            -- JSON
    cv_mean DOUBLE,
    cv_std DOUBLE,
    cv_results VARCHAR,             -- JSON: params, mean, std and fold scores of every candidate
    test_macro_f1 DOUBLE,
    metrics VARCHAR,                -- JSON: ClassificationMetrics
    n_train INTEGER,
    n_test INTEGER,
    fit_seconds DOUBLE,
    predict_seconds DOUBLE,
    versions VARCHAR,               -- JSON: pinsearch, sklearn, torch, faiss
    finished_at TIMESTAMP,
    data_hash VARCHAR,              -- hash of the sample, split, vectors, grid (cell_digest)
    PRIMARY KEY (study, config_hash, backbone, head)
);
-- study_cells from before data_hash: the column is added, NULL (such a cell runs again)
ALTER TABLE study_cells ADD COLUMN IF NOT EXISTS data_hash VARCHAR;
CREATE TABLE IF NOT EXISTS study_predictions (
    study VARCHAR,
    config_hash VARCHAR,
    backbone VARCHAR,
    head VARCHAR,
    pin_key BIGINT,
    label VARCHAR,
    predicted VARCHAR,
    scores VARCHAR                  -- JSON list, in the order of the cell's classes
);
"""

# study_predictions' columns, as Catalog.insert_rows writes a cell's rows in one statement
_PREDICTION_COLUMNS = (
    ("study", "str"), ("config_hash", "str"), ("backbone", "str"), ("head", "str"),
    ("pin_key", "int64"), ("label", "str"), ("predicted", "str"), ("scores", "str"),
)  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    """A study, as read from its TOML file."""

    name: str
    store: str  # the store folder (created from ``corpus`` when missing)
    backbones: tuple[str, ...]
    heads: dict[str, dict[str, list[Any]]]  # head name -> parameter grid
    corpus: str | None = None  # indexed into the store first when given
    label: str = "category"  # a pins column or a key of pins.extra (e.g. source_label)
    drop: tuple[str, ...] = ("none", "other")  # label values left out
    per_class: int | None = None  # sample at most N pins per label (seeded)
    min_per_class: int = 10  # labels with fewer pins are left out (recorded)
    test_size: float = 0.2
    folds: int = 5
    seed: int = 0
    normalize: bool = False  # L2-normalise vectors before the heads
    device: str = "auto"  # heads: auto, cpu, cuda
    paper_table: str | None = None  # "001" to print the source paper's Table 4.1 beside ours
    n_jobs: int = 1  # parallel CV fits (joblib)
    batched_cv: bool = True  # batched grid search (pinsearch.gridsearch) where the head has one

    def fingerprint(self) -> str:
        """Hash of what decides every cell's results (not the name, store, device, n_jobs or
        batched_cv). A head's grid is not in it but in its own cells' digest
        (:func:`cell_digest`): adding a head, or changing one's grid, leaves the others'
        finished cells to be resumed."""
        keys = (
            "label",
            "drop",
            "per_class",
            "min_per_class",
            "test_size",
            "folds",
            "seed",
            "normalize",
        )
        data = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[
            :16
        ]


#: the command-line overrides each study kind other than classification takes
_OVERRIDES = {
    "retrieval": ("store", "corpus"),
    "compact": ("store",),
    "openset": ("store", "device"),
}


def load_study(path: str | Path, **overrides: Any) -> StudyConfig | RetrievalConfig:
    """Read a study TOML file; ``overrides`` (not None) replace its values.

    A file with ``kind = "retrieval"`` gives a :class:`RetrievalConfig` (only ``store`` and
    ``corpus`` overrides apply to it), ``kind = "openset"`` an
    :class:`~pinsearch.eval.openset.OpenSetConfig` (``store`` and ``device``).

    Raises:
        ValueError: unknown keys, heads or missing required fields, naming the culprit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"study file {path} is not valid TOML: {exc}") from exc
    kind = data.get("kind", "classification")
    takes = _OVERRIDES.get(kind) if isinstance(kind, str) else None
    if takes is not None:  # a study of another kind takes only some of the overrides
        given = {k: v for k, v in overrides.items() if v is not None}
        refused = sorted(set(given) - set(takes))
        if refused:
            flags = [f"--{k.replace('_', '-')}" for k in refused]
            raise ValueError(
                f"study {path} (kind = {kind!r}) has no use for {', '.join(flags)}; it takes "
                f"{', '.join(f'--{k}' for k in takes)} (the rest is in the study file)"
            )
        if kind == "retrieval":
            return replace(load_retrieval(data, path), **given)
        if kind == "compact":
            from pinsearch.eval.compact import load_compact

            return replace(load_compact(data, path), **given)  # type: ignore[return-value]
        from pinsearch.eval.openset import load_openset

        return replace(load_openset(data, path), **given)  # type: ignore[return-value]
    if data.pop("kind", "classification") != "classification":
        raise ValueError(
            f"study {path}: kind must be classification, retrieval, openset or compact"
        )
    known = {f for f in StudyConfig.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"study {path}: unknown keys {unknown}; known: {sorted(known)}")
    for key in ("name", "store", "backbones", "heads"):
        if key not in data:
            raise ValueError(f"study {path} lacks required key {key!r}")
    from pinsearch.eval.configs import check_fields

    check_fields(StudyConfig, data, path, "study", skip=("heads",))
    if not isinstance(data["heads"], dict) or not data["heads"]:
        raise ValueError(f"study {path}: [heads] must name at least one head, e.g. [heads.knn]")
    for head, grid in data["heads"].items():
        if head not in HEADS:
            raise ValueError(f"study {path}: unknown head {head!r}; known: {sorted(HEADS)}")
        for param, values in grid.items():
            if not isinstance(values, list):
                grid[param] = [values]
            for value in grid[param]:  # each value named here, not in a traceback mid-study
                try:
                    create_head(head, **{param: value})
                except ValueError as exc:
                    default = HEADS[head]().get_params().get(param)
                    hint = (
                        f" (a grid lists its values: one value of {param} is a list in a "
                        f"list, {param} = [{json.dumps(list(grid[param]))}])"
                        if isinstance(default, tuple) and not isinstance(value, list)
                        else ""
                    )
                    raise ValueError(f"study {path}: {exc}{hint}") from None
    if data.get("paper_table") not in (None, "001"):  # (the one published table shown)
        raise ValueError(
            f'study {path}: paper_table = {data["paper_table"]!r}; "001" shows the source '
            "paper's Table 4.1 beside this study's (or leave it out)"
        )
    fused = [b for b in data["backbones"] if "+" in b]
    if "zeroshot" in data["heads"] and fused:
        raise ValueError(
            f"study {path}: the zeroshot head compares prompts with one backbone's vectors; "
            f"fused features {fused} have no text encoder: list them in a study without it"
        )
    for key in ("backbones", "drop"):
        if key in data:
            data[key] = tuple(data[key])
    config = StudyConfig(**data)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.n_jobs == 0:
        raise ValueError(f"study {path}: n_jobs must be a number of jobs, or -1 for every core")
    try:  # (whether this machine has it is asked as the heads are fitted)
        create_head("knn", device=config.device)
    except ValueError:
        raise ValueError(
            f"study {path}: device must be auto, cpu, gpu or cuda[:N], got {config.device!r}"
        ) from None
    return config


@dataclass
class StudyData:
    """The study's sample: pin keys, labels, and the train/test split (indices into keys)."""

    keys: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    left_out: dict[str, int] = field(default_factory=dict)  # label -> pins (too few)


def select_pins(store: Store, config: StudyConfig) -> StudyData:
    """Labels from the catalog, dropped/rare labels removed, per-class sample, split."""
    keys, labels, too_few = labelled_pins(store, config)
    train, test = train_test_split(
        np.arange(len(keys)), test_size=config.test_size, stratify=labels,
        random_state=config.seed,
    )  # fmt: skip
    return StudyData(keys, labels, np.sort(train), np.sort(test), too_few)


def labelled_pins(
    store: Store, config: StudyConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Pin keys and labels of the study's sample (before the split), and the labels left out."""
    return _labelled_pins(
        store, config.label, drop=config.drop, per_class=config.per_class,
        min_per_class=config.min_per_class, seed=config.seed, context=f"study {config.name!r}: ",
    )  # fmt: skip


def load_study_vectors(
    store: Store, backbone: str, keys: np.ndarray, normalize: bool
) -> np.ndarray:
    """Vectors of ``keys`` in that order; a ``+``-joined name concatenates backbones (fusion)."""
    return load_vectors(store, backbone, keys, normalize)


@dataclass
class CellResult:
    """One backbone x head cell."""

    backbone: str
    head: str
    best_params: dict[str, Any]
    cv_mean: float
    cv_std: float
    test_macro_f1: float
    metrics: dict[str, Any]
    fit_seconds: float
    predict_seconds: float
    resumed: bool = False


def _versions() -> dict[str, str]:
    import faiss
    import sklearn
    import torch

    return {
        "pinsearch": __version__,
        "sklearn": sklearn.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }


def _scores(model: Any, X: np.ndarray) -> np.ndarray | None:
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)
    if hasattr(model, "decision_function"):
        return model.decision_function(X)
    return None


def _run_cell(
    config: StudyConfig,
    data: StudyData,
    X: np.ndarray,
    backbone: str,
    head: str,
    context: dict[str, Any] | None = None,
) -> tuple[CellResult, np.ndarray, np.ndarray | None, str, Any]:
    grid = config.heads[head]
    device = config.device
    if head == "knn" and device.startswith("cuda"):
        device = "gpu"  # FAISS placement names
    params = dict(context or {})
    if device != "auto" and head != "zeroshot":
        params["device"] = device
    if "random_state" in inspect.signature(HEADS[head]).parameters and "random_state" not in grid:
        params.setdefault("random_state", config.seed)  # the study's seed reaches the MLP's init
    cv = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    y = data.labels
    start = time.perf_counter()
    search: Any
    if config.batched_cv and is_batchable(head, grid, params):
        search = batched_grid_search(
            head, params, grid, X[data.train], y[data.train], cv, n_jobs=config.n_jobs
        )
    else:
        estimator = create_head(head, **params)
        search = GridSearchCV(
            estimator,
            grid,
            scoring="f1_macro",
            cv=cv,
            refit=True,
            n_jobs=config.n_jobs,
            error_score="raise",
        )
        search.fit(X[data.train], y[data.train])
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pred = search.best_estimator_.predict(X[data.test])
    scores = _scores(search.best_estimator_, X[data.test])
    predict_seconds = time.perf_counter() - start
    classes = search.best_estimator_.classes_
    m = classification_metrics(y[data.test], pred, classes, scores)
    i = search.best_index_
    res = CellResult(
        backbone=backbone,
        head=head,
        best_params={k: _plain(v) for k, v in search.best_params_.items()},
        cv_mean=float(search.cv_results_["mean_test_score"][i]),
        cv_std=float(search.cv_results_["std_test_score"][i]),
        test_macro_f1=m.macro_f1,
        metrics=m.to_dict(),
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
    )
    cv_rows = [
        {
            "params": {k: _plain(v) for k, v in p.items()},
            "mean": float(search.cv_results_["mean_test_score"][j]),
            "std": float(search.cv_results_["std_test_score"][j]),
            "folds": [
                float(search.cv_results_[f"split{s}_test_score"][j]) for s in range(config.folds)
            ],
        }
        for j, p in enumerate(search.cv_results_["params"])
    ]
    return res, pred, scores, json.dumps(cv_rows), search.best_estimator_


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def data_digest(data: StudyData, X: np.ndarray) -> str:
    """Hash of what a cell learns from besides its settings: the sample (pin keys and their
    labels), the train/test split, and the vectors. A finished cell is resumed only when
    it is unchanged (pins added or removed, or pins embedded again, change it)."""
    h = hashlib.sha256()
    for part in (data.keys, data.train, data.test):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    h.update("\0".join(map(str, data.labels.tolist())).encode())
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def cell_digest(data_hash: str, head: str, grid: dict[str, list[Any]], context: str) -> str:
    """Hash of what one cell learns from: :func:`data_digest`, its head's grid, and what the
    head takes from the store (:func:`~pinsearch.classify.head_context_key`: a zero-shot
    head's text encoder, so a new alignment runs it again)."""
    text = json.dumps([data_hash, head, grid, context], sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_predictions(
    store: Store, config: StudyConfig, backbone: str, head: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A cell's stored test predictions in pin-key order: the pins' keys, true and predicted
    labels (str), and the scores (n, classes; the cell's class order), None where the cell
    stored none. Empty arrays when it has no stored predictions."""
    rows = store.catalog.connection.execute(
        "SELECT pin_key, label, predicted, scores FROM study_predictions WHERE study = ? AND "
        "config_hash = ? AND backbone = ? AND head = ? ORDER BY pin_key",
        [config.name, config.fingerprint(), backbone, head],
    ).fetchall()
    keys = np.array([r[0] for r in rows], dtype=np.int64)
    truth = np.array([r[1] for r in rows], dtype=object).astype(str)
    pred = np.array([r[2] for r in rows], dtype=object).astype(str)
    scores = None
    if rows and all(r[3] is not None for r in rows):
        scores = np.array([json.loads(r[3]) for r in rows], dtype=np.float64)
    return keys, truth, pred, scores


def _rescored(store: Store, config: StudyConfig, cell: CellResult) -> CellResult | None:
    """A finished cell's test metrics computed again from its stored predictions and scores
    by this pinsearch (a metric's definition may have changed since it ran; its CV scores are
    scikit-learn's), written back to ``study_cells``; None when its predictions are missing.
    The ROC AUC stored is kept where the one of the stored scores, rounded to 5 decimals, is
    within 1e-4 of it."""
    keys, truth, pred, scores = cell_predictions(store, config, cell.backbone, cell.head)
    classes = cell.metrics.get("classes")
    if not len(keys) or not classes:
        return None
    m = classification_metrics(truth, pred, np.array(classes), scores)
    stored_auc = cell.metrics.get("auc_ovr")
    if m.auc_ovr is not None and stored_auc is not None and abs(m.auc_ovr - stored_auc) < 1e-4:
        m.auc_ovr = stored_auc  # (the scores are stored rounded: ties move the AUC a little)
    if m.macro_f1 == cell.test_macro_f1 and m.to_dict() == cell.metrics:
        return cell
    _logger.info(
        "study %s: cell %s/%s test metrics computed again from its predictions (macro-F1 "
        "%.4f -> %.4f)", config.name, cell.backbone, cell.head, cell.test_macro_f1, m.macro_f1
    )  # fmt: skip
    store.catalog.connection.execute(
        "UPDATE study_cells SET test_macro_f1 = ?, metrics = ? WHERE study = ? AND "
        "config_hash = ? AND backbone = ? AND head = ?",
        [
            m.macro_f1,
            json.dumps(m.to_dict()),
            config.name,
            config.fingerprint(),
            cell.backbone,
            cell.head,
        ],
    )
    return replace(cell, test_macro_f1=m.macro_f1, metrics=m.to_dict())


def _refuse_alignment_on_test(store: Store, config: StudyConfig, data: StudyData) -> None:
    """A zero-shot cell scores the test pins through a backbone's text alignment: one trained
    on those pins' own images and texts (titles that often name the label) would score them
    optimistically. Refused before any cell; an alignment of an older pinsearch, whose pins
    are not recorded, is warned of."""
    from pinsearch.align import alignment_pins, load_alignment

    if "zeroshot" not in config.heads:
        return
    test = data.keys[data.test]
    for backbone in (b for b in config.backbones if "+" not in b):
        trained = alignment_pins(store, backbone)
        if trained is None:
            if load_alignment(store, backbone, arrays=False) is not None:
                _logger.warning(
                    "study %s: which pins trained the %s alignment is not recorded (an older "
                    "pinsearch made it); if they include test pins, its zero-shot scores are "
                    "optimistic: align again with --study",
                    config.name, backbone,
                )  # fmt: skip
            continue
        seen = int(np.intersect1d(trained, test).size)
        if seen:
            raise ValueError(
                f"{config.name}: the {backbone!r} alignment of store {store.root} was trained "
                f"on the images and texts of {seen} of the study's {len(test)} test pins, so "
                "its zero-shot scores would be optimistic; align on the study's training part "
                f"(pinsearch align --store {store.root} --backbone {backbone} --study FILE), or "
                "copy another store's alignment (--from)"
            )


def _head_source(config: StudyConfig, digest: str) -> str:
    """The ``source`` a study head is saved with: the study and the cell it came from (the
    settings every cell shares, such as ``folds``, and the cell's own digest)."""
    return f"study:{config.name} cell {config.fingerprint()}/{digest}"


def _saved_by(store: Store, name: str) -> str | None:
    rows = store.catalog.query("SELECT source FROM heads WHERE name = ?", [name])
    return rows[0]["source"] if rows else None


def _done_cells(
    store: Store, config: StudyConfig
) -> dict[tuple[str, str], tuple[CellResult, str | None]]:
    """Finished cells of this study and fingerprint, with the data digest each was run on."""
    rows = store.catalog.query(
        "SELECT * FROM study_cells WHERE study = ? AND config_hash = ?",
        [config.name, config.fingerprint()],
    )
    return {
        (r["backbone"], r["head"]): (
            CellResult(
                r["backbone"],
                r["head"],
                json.loads(r["best_params"]),
                r["cv_mean"],
                r["cv_std"],
                r["test_macro_f1"],
                json.loads(r["metrics"]),
                r["fit_seconds"],
                r["predict_seconds"],
                resumed=True,
            ),
            r["data_hash"],
        )
        for r in rows
    }


def _save_cell(
    store: Store,
    config: StudyConfig,
    data: StudyData,
    res: CellResult,
    cv_json: str,
    pred: np.ndarray,
    scores: np.ndarray | None,
    digest: str,
) -> None:
    con = store.catalog
    h = config.fingerprint()
    test_keys = data.keys[data.test]
    rows = [
        [
            config.name,
            h,
            res.backbone,
            res.head,
            int(k),
            str(t),
            str(p),
            json.dumps(np.round(s, 5).tolist()) if scores is not None else None,
        ]
        for k, t, p, s in zip(
            test_keys,
            data.labels[data.test],
            pred,
            scores if scores is not None else [None] * len(pred),
        )
    ]
    with con.transaction():
        con.connection.execute(
            "DELETE FROM study_predictions WHERE study = ? AND config_hash = ? AND backbone = ? "
            "AND head = ?",
            [config.name, h, res.backbone, res.head],
        )
        con.insert_rows("study_predictions", _PREDICTION_COLUMNS, rows)
        con.connection.execute(
            "INSERT OR REPLACE INTO study_cells VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
            [
                config.name,
                h,
                res.backbone,
                res.head,
                json.dumps(res.best_params),
                res.cv_mean,
                res.cv_std,
                cv_json,
                res.test_macro_f1,
                json.dumps(res.metrics),
                len(data.train),
                len(data.test),
                res.fit_seconds,
                res.predict_seconds,
                json.dumps(_versions()),
                digest,
            ],
        )


def run_study(
    config: StudyConfig,
    *,
    on_cell: Callable[[CellResult], None] | None = None,
    embed_progress: Callable[[int, int], None] | None = None,
) -> tuple[StudyData, list[CellResult]]:
    """Run (or resume) a study; returns the sample and every cell's result.

    Cells already in the catalog with the same configuration fingerprint are not run again.
    """
    from pinsearch.backbones import check_weights
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus, stored_run_settings

    names = sorted({b for fused in config.backbones for b in fused.split("+")})
    if config.corpus is not None:  # every pin is read and checked; only the sample embedded
        for name in names:  # every backbone's weights, before the first embeds
            check_weights(name, stored_run_settings(config.store, name).get("weights"))
        for name in names:
            index_corpus(  # a store's own run settings (weights file, normalize, dtype) hold
                config.corpus, config.store, backbone=name, progress=embed_progress,
                embed=EmbedConfig(**stored_run_settings(config.store, name)),
                select=lambda store: select_pins(store, config).keys,
            )  # fmt: skip
    with Store.open(config.store) as store:
        missing = [b for b in names if not len(store.vectors(b))]
        if missing:  # (before any cell: the first backbones' cells would run, then it fail)
            raise ValueError(
                f"{config.name}: store {store.root} has no vectors of {missing}; give the study "
                "a corpus, or embed them first (pinsearch index --store S --backbone B)"
            )
        store.catalog.connection.execute(_STUDY_SCHEMA)
        data = select_pins(store, config)
        _refuse_alignment_on_test(store, config, data)
        store.catalog.connection.execute(
            "INSERT OR REPLACE INTO study_runs VALUES (?, ?, ?, ?, ?, ?, ?, now(), NULL)",
            [config.name, config.fingerprint(), json.dumps(asdict(config), default=list),
             len(data.keys), len(data.train), len(data.test), json.dumps(data.left_out)],
        )  # fmt: skip
        done = _done_cells(store, config)
        results = []
        vectors: dict[str, tuple[np.ndarray, str]] = {}  # once per backbone, for all its heads
        for backbone, head in itertools.product(config.backbones, config.heads):
            if backbone not in vectors:
                vectors.clear()  # keep one backbone's vectors in memory at a time
                X = load_study_vectors(store, backbone, data.keys, config.normalize)
                vectors[backbone] = (X, data_digest(data, X))
            X, data_hash = vectors[backbone]
            digest = cell_digest(
                data_hash, head, config.heads[head], head_context_key(store, backbone, head)
            )
            head_name = f"{config.name}/{backbone}/{head}"
            fused = "+" in backbone  # fused features have no single store vector to query
            finished, ran_on = done.get((backbone, head), (None, None))
            stale = None  # why a finished cell runs again
            if finished is not None and ran_on == digest:
                finished = _rescored(store, config, finished)
                if finished is None:
                    stale = "has no stored test predictions"
            if finished is not None and ran_on != digest:
                stale = (
                    "was run with another grid, text encoder, sample, split or vectors (pins "
                    "added, removed or embedded again since)"
                )
            elif (
                finished is not None
                and not fused
                and _saved_by(store, head_name) != _head_source(config, digest)
            ):
                stale = f"saved head {head_name} is another run's now, or was removed"
            if finished is not None and stale is None:
                res = finished
                if not fused:  # its saved head is what the study would train again
                    store.catalog.connection.execute(
                        "UPDATE heads SET stale = false WHERE name = ?", [head_name]
                    )
            else:
                if stale is not None:
                    _logger.warning(
                        "study %s: cell %s/%s %s: running it again",
                        config.name, backbone, head, stale,
                    )  # fmt: skip
                context = head_context(store, backbone, head)
                res, pred, scores, cv_json, best = _run_cell(
                    config, data, X, backbone, head, context
                )
                if not fused:
                    save_store_head(
                        store,
                        best,
                        name=head_name,
                        backbone=backbone,
                        label=config.label,
                        n_train=len(data.train),
                        normalize=config.normalize,
                        source=_head_source(config, digest),
                    )
                _save_cell(store, config, data, res, cv_json, pred, scores, digest)
            results.append(res)
            if on_cell:
                on_cell(res)
        store.catalog.connection.execute(
            "UPDATE study_runs SET finished_at = now() WHERE study = ? AND config_hash = ?",
            [config.name, config.fingerprint()],
        )
    return data, results


def study_summary(results: list[CellResult]) -> dict[str, Any]:
    """Macro-F1 table (backbone -> head -> score) for JSON output."""
    table: dict[str, dict[str, float]] = {}
    for r in results:
        table.setdefault(r.backbone, {})[r.head] = r.test_macro_f1
    return {"macro_f1": table, "cells": [asdict(r) for r in results]}


def evaluate(
    config: StudyConfig,
    out_dir: str | Path | None = None,
    *,
    on_cell: Callable[[CellResult], None] | None = None,
    embed_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run or resume a study, then write its report (``out_dir``, default ``eval/results/NAME``).

    Returns:
        The summary (macro-F1 table and cells) with ``report`` set to the Markdown path.
    """
    from pinsearch.eval.report import write_report

    data, results = run_study(config, on_cell=on_cell, embed_progress=embed_progress)
    out = Path(out_dir) if out_dir is not None else Path("eval") / "results" / config.name
    with Store.open(config.store, read_only=True) as store:
        path = write_report(store, config, data, results, out)
    summary = study_summary(results)
    summary.update(
        study=config.name,
        report=str(path),
        pins=len(data.keys),
        classes=len(set(data.labels.tolist())),
        train=len(data.train),
        test=len(data.test),
        left_out=data.left_out,
    )
    return summary
