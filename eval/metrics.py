"""Classification metrics as pure functions over label and score arrays.

Everything the study reports: macro-F1 (the paper's metric), accuracy, balanced accuracy,
per-class precision/recall/F1, the confusion matrix, one-vs-rest ROC curves with AUC, and the
chance level of a label distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

__all__ = [
    "ClassificationMetrics",
    "chance_macro_f1",
    "classification_metrics",
    "macro_f1",
    "roc_curves",
]


@dataclass
class ClassificationMetrics:
    """Test-set scores of one classifier."""

    macro_f1: float
    accuracy: float
    balanced_accuracy: float
    auc_ovr: float | None  # macro one-vs-rest ROC AUC (None without scores)
    classes: list[str]
    per_class: list[dict[str, Any]] = field(
        default_factory=list
    )  # class, precision, recall, f1, support
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class, cols: predicted

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray | None = None,
) -> ClassificationMetrics:
    """Compute every reported metric.

    Args:
        y_true: true labels.
        y_pred: predicted labels.
        classes: the label order (columns of ``scores`` and of the confusion matrix).
        scores: (n, n_classes) probabilities or decision values for ROC AUC, if available.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    classes = np.asarray(classes)
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    per_class = [
        {
            "class": str(c),
            "precision": float(pi),
            "recall": float(ri),
            "f1": float(fi),
            "support": int(si),
        }
        for c, pi, ri, fi, si in zip(classes, p, r, f, s)
    ]
    auc = None
    if scores is not None and len(classes) > 1 and len(np.unique(y_true)) == len(classes):
        scores = np.asarray(scores, dtype=float)
        if scores.ndim == 1:  # binary decision function
            auc = float(skm.roc_auc_score(y_true == classes[1], scores))
        else:
            y_bin = label_binarize(y_true, classes=classes)
            if len(classes) == 2:
                y_bin = np.hstack([1 - y_bin, y_bin])
            auc = float(skm.roc_auc_score(y_bin, scores, average="macro"))
    return ClassificationMetrics(
        macro_f1=macro_f1(y_true, y_pred, classes),
        accuracy=float(skm.accuracy_score(y_true, y_pred)),
        balanced_accuracy=float(skm.balanced_accuracy_score(y_true, y_pred)),
        auc_ovr=auc,
        classes=[str(c) for c in classes],
        per_class=per_class,
        confusion=skm.confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    )


def macro_f1(y_true: Any, y_pred: Any, labels: Any = None) -> float:
    """Macro-F1 over the ``labels`` (default: every one seen) that the true or the predicted
    labels hold. A class with no test pin that is never predicted has no F1 to average (it
    would count 0 against a perfect classifier); one predicted without support counts 0. The
    set is scikit-learn's default, which the cross-validation scorer (``f1_macro``) uses."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    seen = np.union1d(y_true, y_pred)
    chosen = seen if labels is None else [c for c in labels if c in set(seen.tolist())]
    if len(chosen) == 0:
        return 0.0
    return float(skm.f1_score(y_true, y_pred, labels=chosen, average="macro", zero_division=0))


def roc_curves(
    y_true: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curve ``(fpr, tpr, auc)`` per class (classes absent from y skipped)."""
    out = {}
    scores = np.asarray(scores, dtype=float)
    for j, c in enumerate(classes):
        positive = np.asarray(y_true) == c
        if positive.all() or not positive.any():
            continue
        col = scores[:, j] if scores.ndim == 2 else (scores if j == 1 else -scores)
        fpr, tpr, _ = skm.roc_curve(positive, col)
        out[str(c)] = (fpr, tpr, float(skm.auc(fpr, tpr)))
    return out


def chance_macro_f1(y_true: np.ndarray) -> float:
    """Expected macro-F1 of guessing labels at random with the true label frequencies.

    For balanced classes this is ``1 / n_classes`` (0.031 for the paper's 32 categories).
    """
    _, counts = np.unique(np.asarray(y_true), return_counts=True)
    prior = counts / counts.sum()
    # Random guessing with the prior: precision = recall = prior for each class.
    return float(np.mean(prior))


def retrieval_metrics(
    scores: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Text-to-image retrieval quality: each query has one relevant item.

    Args:
        scores: (n_queries, n_items) similarities, higher is better.
        relevant: (n_queries,) column of each query's relevant item.

    Returns:
        ``recall@k`` for each k (fraction of queries whose item ranks in the top k), the
        median and mean rank (1 = first; an answer whose score is not finite ranks last),
        and ``chance_recall@k`` = k / n_items.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=np.int64)
    if scores.ndim != 2 or len(relevant) != len(scores):
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} do not match")
    target = scores[np.arange(len(scores)), relevant][:, None]
    # Ties count against the query: an item scoring as high as the answer ranks before it.
    ranks = (scores > target).sum(axis=1) + (scores == target).sum(axis=1)
    ranks[~np.isfinite(target[:, 0])] = scores.shape[1]  # an answer scored NaN: found last
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(ranks <= k))
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    for k in ks:
        out[f"chance_recall@{k}"] = min(1.0, k / scores.shape[1])
    out["queries"] = float(len(scores))
    out["items"] = float(scores.shape[1])
    return out
