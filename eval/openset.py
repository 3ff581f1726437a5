"""Open-set classification: a reject option ("unknown") evaluated on categories never seen.

The "rest" class of source document 002, done the standard way: for each of ``splits`` random
draws, a fraction of the categories is held out entirely as *unknown*. A head is trained on the
known categories' training pins; a confidence threshold is set on held-out *validation* pins of
the known categories (so that ``target_tpr`` of them are accepted); the test set is the known
categories' test pins plus every unknown pin. A pin whose confidence falls below the threshold
is answered "unknown".

Reported per backbone and head (mean ± std over the splits): known-class macro-F1 with the
reject option (a rejected known pin counts as an error), closed-set macro-F1 (no reject, for
reference), open-set macro-F1 (the "unknown" class included), AUROC of telling unknown from
known pins by confidence, and the share of known pins accepted / unknown pins rejected.

Confidences: the head's top class score (probability for knn and mlp, decision value for
lsvm); ``knn-sim`` is the KNN head's prediction with the cosine similarity to the nearest
training pin as confidence.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.eval.markdown import escape
from pinsearch.store import Store

__all__ = ["OpenSetConfig", "load_openset", "run_openset"]

HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "knn": {"n_neighbors": 10, "metric": "cosine"},
    "knn-sim": {"n_neighbors": 10, "metric": "cosine"},
    "lsvm": {"C": 0.1},
    "mlp": {"max_epochs": 40, "patience": 5},
}


def head_params(head: str, seed: int, n_train: int) -> dict[str, Any]:
    """A head's fixed settings for ``n_train`` training pins: the study's seed for the one that
    draws (the MLP's weights), no more neighbours than pins (small stores)."""
    params = dict(HEAD_DEFAULTS[head])
    if head == "mlp":
        params["random_state"] = seed
    if "n_neighbors" in params:
        params["n_neighbors"] = min(params["n_neighbors"], n_train)
    return params


@dataclass
class OpenSetConfig:
    """An open-set study (see eval/studies/pins-openset.toml)."""

    name: str
    store: str
    backbones: list[str] = field(default_factory=lambda: ["effnet_lite0"])
    heads: list[str] = field(default_factory=lambda: ["knn", "knn-sim", "lsvm", "mlp"])
    label: str = "category"
    drop: list[str] = field(default_factory=lambda: ["none", "other"])
    unknown_fraction: float = 0.25  # of the categories, held out as unknown
    splits: int = 3
    test_size: float = 0.2  # of the known pins
    val_fraction: float = 0.2  # of the known training pins, for the threshold
    target_tpr: float = 0.95  # share of known validation pins accepted
    per_class: int | None = None  # sample at most N pins per label (seeded): a million-pin store
    min_per_class: int = 10
    seed: int = 0
    device: str = "auto"


def load_openset(data: dict[str, Any], path: Path) -> OpenSetConfig:
    """Config from a parsed TOML (``kind = "openset"``).

    Raises:
        ValueError: unknown keys or heads, missing fields.
    """
    from pinsearch.eval.configs import config_from_toml

    config = config_from_toml(OpenSetConfig, data, path, "open-set study", ("name", "store"))
    bad = sorted(set(config.heads) - set(HEAD_DEFAULTS))
    if bad:
        raise ValueError(f"{path}: unknown open-set heads {bad}; known: {sorted(HEAD_DEFAULTS)}")
    for name in ("unknown_fraction", "test_size", "val_fraction"):
        if not 0.0 < getattr(config, name) < 1.0:
            raise ValueError(f"{path}: {name} must be in (0, 1), got {getattr(config, name)}")
    if not 0.0 < config.target_tpr <= 1.0:
        raise ValueError(f"{path}: target_tpr must be in (0, 1], got {config.target_tpr}")
    return config


def _unknown_count(n_categories: int, fraction: float) -> int:
    """Categories held out as unknown in each split."""
    return max(1, round(fraction * n_categories))


def _reject_label(labels: np.ndarray) -> str:
    """The answer "unknown", spelt so that no category has it (a category named "unknown")."""
    reject, taken = "unknown", set(labels.tolist())
    while reject in taken:
        reject += "_"
    return reject


def _confidence(head: str, model: Any, X: np.ndarray, X_train: np.ndarray) -> np.ndarray:
    if head == "knn-sim":
        import faiss

        from pinsearch.vectors import unit_rows

        sims, _ = faiss.knn(unit_rows(X), unit_rows(X_train), 1, metric=faiss.METRIC_INNER_PRODUCT)
        return sims[:, 0]
    return model.class_scores(X).max(axis=1)


def _split_once(
    labels: np.ndarray, config: OpenSetConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(fit, val, known test, unknown) indices and the unknown categories."""
    from sklearn.model_selection import train_test_split

    cats = np.unique(labels)
    n_unknown = _unknown_count(len(cats), config.unknown_fraction)
    unknown_cats = sorted(rng.choice(cats, n_unknown, replace=False).tolist())
    is_unknown = np.isin(labels, unknown_cats)
    known = np.flatnonzero(~is_unknown)
    seed = int(rng.integers(1 << 31))
    train, test = train_test_split(
        known, test_size=config.test_size, stratify=labels[known], random_state=seed
    )
    fit, val = train_test_split(
        train, test_size=config.val_fraction, stratify=labels[train], random_state=seed
    )
    return fit, val, test, np.flatnonzero(is_unknown), unknown_cats


def run_openset(config: OpenSetConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the open-set study; writes ``report.md`` and ``results.json``; returns the summary."""
    from sklearn import metrics as skm

    from pinsearch.eval.metrics import macro_f1
    from pinsearch.heads import create_head
    from pinsearch.labels import labelled_pins, load_vectors

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Store.open(config.store, read_only=True) as store:
        keys, labels, left_out = labelled_pins(
            store, config.label, drop=tuple(config.drop), per_class=config.per_class,
            min_per_class=config.min_per_class, seed=config.seed,
            context=f"open-set study {config.name!r}: ",
        )  # fmt: skip
        labels = labels.astype(str)
        n_cats = len(np.unique(labels))
        n_unknown = _unknown_count(n_cats, config.unknown_fraction)
        if n_cats - n_unknown < 2:
            raise ValueError(
                f"open-set study {config.name!r}: {n_cats} categories leave fewer than 2 known "
                f"ones once {n_unknown} are held out as unknown (unknown_fraction); it needs "
                "more categories or a smaller fraction"
            )
        reject = _reject_label(labels)
        splits = [
            _split_once(labels, config, np.random.default_rng([config.seed, s]))
            for s in range(config.splits)
        ]
        for backbone in config.backbones:
            X = load_vectors(store, backbone, keys, False)
            for head in config.heads:
                per_split = []
                for fit, val, test, unknown, unknown_cats in splits:
                    params = head_params(head, config.seed, len(fit))
                    if config.device != "auto":
                        knn_gpu = head.startswith("knn") and config.device.startswith("cuda")
                        params["device"] = "gpu" if knn_gpu else config.device
                    model = create_head(head.split("-")[0], **params).fit(X[fit], labels[fit])
                    val_conf = _confidence(head, model, X[val], X[fit])
                    thr = float(np.quantile(val_conf, 1 - config.target_tpr))
                    every = np.concatenate([test, unknown])
                    conf = _confidence(head, model, X[every], X[fit])
                    closed = model.predict(X[every])
                    is_known = ~np.isin(every, unknown)
                    pred = np.where(conf >= thr, closed, reject)
                    truth = np.where(is_known, labels[every], reject)
                    known_classes = sorted(set(labels[fit].tolist()))
                    per_split.append(
                        {
                            "known_macro_f1": macro_f1(
                                truth[is_known], pred[is_known], known_classes
                            ),
                            "closed_macro_f1": macro_f1(
                                truth[is_known], closed[is_known], known_classes
                            ),
                            "open_macro_f1": macro_f1(
                                truth, pred, [*known_classes, reject]
                            ),
                            "auroc_unknown": skm.roc_auc_score(~is_known, -conf),
                            "known_accepted": float(np.mean(pred[is_known] != reject)),
                            "unknown_rejected": float(np.mean(pred[~is_known] == reject)),
                            "unknown_categories": unknown_cats,
                        }
                    )  # fmt: skip
                row = {"backbone": backbone, "head": head}
                for metric in per_split[0]:
                    if metric == "unknown_categories":
                        continue
                    vals = [float(p[metric]) for p in per_split]
                    row[metric] = round(float(np.mean(vals)), 4)
                    row[f"{metric}_std"] = round(float(np.std(vals)), 4)
                row["splits"] = per_split
                rows.append(row)
    summary = {
        "study": config.name,
        "kind": "openset",
        "pins": len(keys),
        "classes": len(set(labels.tolist())),
        "left_out": left_out,
        "unknown_per_split": [s[4] for s in splits],
        "results": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    from pinsearch.eval.configs import write_study_files

    return write_study_files(config.name, out_dir, summary, _markdown(config, summary))


def _markdown(config: OpenSetConfig, summary: dict[str, Any]) -> str:
    cols = [
        ("known_macro_f1", "known macro-F1 (reject)"),
        ("closed_macro_f1", "closed-set macro-F1"),
        ("open_macro_f1", "open-set macro-F1"),
        ("auroc_unknown", "unknown AUROC"),
        ("known_accepted", "known accepted"),
        ("unknown_rejected", "unknown rejected"),
    ]
    lines = [
        f"# Open-set study `{config.name}`",
        "",
        f"Store `{config.store}`, label `{config.label}`: {summary['pins']} pins in "
        f"{summary['classes']} classes. {config.splits} splits, each holding out "
        f"{config.unknown_fraction:.0%} of the categories as unknown; thresholds set on "
        f"validation pins of the known categories to accept {config.target_tpr:.0%} of them. "
        "Mean ± std over the splits.",
        "",
        "| backbone | head | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for r in summary["results"]:
        cells = " | ".join(f"{r[c]:.3f} ± {r[c + '_std']:.3f}" for c, _ in cols)
        lines.append(f"| {r['backbone']} | {r['head']} | {cells} |")
    lines += ["", "Unknown categories per split:", ""]
    lines += [
        f"- split {i}: {', '.join(escape(c) for c in u)}"
        for i, u in enumerate(summary["unknown_per_split"])
    ]
    lines += ["", "Settings: `" + json.dumps(asdict(config)) + "`", ""]
    return "\n".join(lines)
