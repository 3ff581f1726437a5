"""Study reports: Markdown with the paper's Table 4.1 layout, plus PNG figures.

``write_report`` renders the macro-F1 table (backbones x heads, row and column means, best in
bold), chance level, the paper's published table when the study reproduces it, the chosen
hyperparameters with CV mean +- std and wall times, accuracy / balanced accuracy / ROC AUC, the
per-class precision/recall/F1 and confusion matrix of the best cell by CV, and ROC curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.eval.beyond import beyond_section
from pinsearch.eval.markdown import escape
from pinsearch.eval.metrics import chance_macro_f1, roc_curves
from pinsearch.eval.study import cell_predictions
from pinsearch.plots import literal, pyplot

__all__ = ["PAPER_TABLE_001", "markdown_table", "write_report"]

#: Table 4.1 of the source paper (macro-F1 on the test part), by backbone then head.
PAPER_TABLE_001: dict[str, dict[str, float]] = {
    "efficientnetv2_b0": {"knn": 0.042, "lsvm": 0.040, "mlp": 0.002},
    "efficientnetv2_b1": {"knn": 0.090, "lsvm": 0.076, "mlp": 0.062},
    "efficientnetv2_b3": {"knn": 0.089, "lsvm": 0.087, "mlp": 0.053},
    "convnext_tiny": {"knn": 0.077, "lsvm": 0.083, "mlp": 0.067},
    "convnext_small": {"knn": 0.077, "lsvm": 0.086, "mlp": 0.075},
    "convnext_base": {"knn": 0.115, "lsvm": 0.110, "mlp": 0.088},
}

_HEAD_TITLES = {"knn": "KNN", "lsvm": "LSVM", "mlp": "NN", "rbf_svm": "RBF-SVM"}


def markdown_table(table: dict[str, dict[str, float]], heads: list[str]) -> str:
    """Backbones x heads with row and column means; the best cell in bold."""
    values = [v for row in table.values() for v in row.values()]
    best = max(values) if values else None
    title = [_HEAD_TITLES.get(h, h) for h in heads]
    lines = [
        "| features | " + " | ".join(title) + " | mean |",
        "| --- |" + " --- |" * (len(heads) + 1),
    ]
    for backbone, row in table.items():
        cells = []
        for h in heads:
            v = row.get(h)
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and v == best else text)
        present = [row[h] for h in heads if h in row]
        mean = f"{np.mean(present):.3f}" if present else ""
        lines.append(f"| {backbone} | " + " | ".join(cells) + f" | {mean} |")
    col_means = []
    for h in heads:
        col = [row[h] for row in table.values() if h in row]
        col_means.append(f"{np.mean(col):.3f}" if col else "")
    lines.append("| mean | " + " | ".join(col_means) + " | |")
    return "\n".join(lines)


def _plot_confusion(path: Path, confusion: list[list[int]], classes: list[str], title: str) -> None:
    plt = pyplot()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [literal(c) for c in classes]
    ax.set_xticks(range(len(classes)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(
    path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str
) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (fpr, tpr, auc) in sorted(curves.items(), key=lambda kv: -kv[1][2]):
        ax.plot(fpr, tpr, lw=1, label=f"{literal(name)} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    if len(curves) <= 34:
        ax.legend(fontsize=6, loc="lower right", ncol=2 if len(curves) > 12 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    store: Any, config: Any, data: Any, results: list[Any], out_dir: str | Path
) -> Path:
    """Write ``report.md``, ``confusion.png`` and ``roc.png`` for a finished study.

    Returns:
        The Markdown file's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = list(dict.fromkeys(r.head for r in results))
    table: dict[str, dict[str, float]] = {}
    for r in results:
        table.setdefault(r.backbone, {})[r.head] = r.test_macro_f1
    classes = sorted(set(data.labels.tolist()))
    chance = chance_macro_f1(data.labels[data.test])
    # (chosen as a user would, by CV on the training part: the test part only scores it)
    best = max(results, key=lambda r: r.cv_mean)
    md = [
        f"# Study `{config.name}`",
        "",
        f"Store `{config.store}`, label `{config.label}`: {len(data.keys)} pins in "
        f"{len(classes)} classes; stratified split {len(data.train)} train / {len(data.test)} "
        f"test (seed {config.seed}); {config.folds}-fold grid-search CV on the training part, "
        f"scored by macro-F1; vectors {'L2-normalised' if config.normalize else 'as stored'} "
        "(heads with `standardize`, LSVM and MLP by default, scale them on the training part; "
        "fused backbones join L2-normalised blocks).",
        "",
        "## Macro-F1 on the test part",
        "",
        markdown_table(table, heads),
        "",
        f"Chance level (random guessing): {chance:.3f}.",
    ]
    if data.left_out:
        left = ", ".join(f"{escape(c)} ({n})" for c, n in sorted(data.left_out.items()))
        md += ["", f"Left out (fewer than {config.min_per_class} pins): {left}."]
    if config.paper_table == "001":
        # the whole table, so that its means are the paper's (ours average the heads and
        # backbones this study ran, extra heads included)
        md += [
            "",
            "### The paper's Table 4.1 (for comparison)",
            "",
            markdown_table(PAPER_TABLE_001, ["knn", "lsvm", "mlp"]),
        ]
    md += [
        "",
        "## Cells",
        "",
        "| features | head | best parameters | CV macro-F1 (mean ± std) | test macro-F1 | "
        "accuracy | balanced acc. | ROC AUC (OvR) | fit s | predict s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        m = r.metrics
        auc = f"{m['auc_ovr']:.3f}" if m.get("auc_ovr") is not None else "–"
        md.append(
            f"| {r.backbone} | {r.head} | `{json.dumps(r.best_params)}` | {r.cv_mean:.3f} ± "
            f"{r.cv_std:.3f} | {r.test_macro_f1:.3f} | {m['accuracy']:.3f} | "
            f"{m['balanced_accuracy']:.3f} | {auc} | {r.fit_seconds:.1f} | "
            f"{r.predict_seconds:.2f} |"
        )
    m = best.metrics
    md += [
        "",
        f"## Best cell: {best.backbone} + {best.head}",
        "",
        f"Chosen by CV macro-F1 ({best.cv_mean:.3f}), not on the test part; test macro-F1 "
        f"{best.test_macro_f1:.3f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in sorted(m["per_class"], key=lambda x: -x["f1"]):
        md.append(
            f"| {escape(row['class'])} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} | {row['support']} |"
        )
    title = literal(f"{config.name}: {best.backbone} + {best.head}")
    _plot_confusion(out / "confusion.png", m["confusion"], m["classes"], title)
    md += ["", "![confusion matrix](confusion.png)"]
    scores = _stored_scores(store, config, best)
    if scores is not None:
        y_true, s = scores
        _plot_roc(out / "roc.png", roc_curves(y_true, s, np.array(m["classes"])), title)
        md += ["", "![ROC one-vs-rest](roc.png)"]
    md += ["", beyond_section(store, config, data, results)]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _stored_scores(store: Any, config: Any, cell: Any) -> tuple[np.ndarray, np.ndarray] | None:
    keys, truth, _, scores = cell_predictions(store, config, cell.backbone, cell.head)
    return None if not len(keys) or scores is None else (truth, scores)
