"""Grid-search cross-validation of the heads, batched where a head allows it (GPU when there is
one, the same code on the CPU otherwise).

:func:`batched_grid_search` answers what ``GridSearchCV(head, grid, cv=cv).fit(X, y)`` answers
(``cv_results_``, ``best_index_``, ``best_params_``, ``best_score_``, ``best_estimator_``) but
does the cross-validation in batches instead of one fit per (candidate, fold):

- ``knn``: per fold, one index search at the largest k of the grid (one per metric / factory
  when those vary); every k and both vote weightings are read off the same neighbour lists. The
  first k of an exact search for K >= k neighbours are the k nearest, so the fold scores are
  exactly those of ``GridSearchCV(KNNHead)``. Only exact (``Flat``) indexes qualify.
- ``lsvm``: every (candidate, fold) problem is solved at once by one batched L-BFGS over stacked
  weights ``(B, d + 1, classes)``; each problem keeps its own fold mask, its own standardisation
  (folded into the weights: ``(X - mu) / s @ W = X @ (W / s) - mu @ (W / s)``, so X is shared
  and the B problems cost one matrix product), its own curvature history, step length and
  stopping test. The objective is that of :meth:`LinearSVMHead._fit_torch`: the squared hinge
  of each one-vs-rest class averaged over the problem's samples plus ``|w|^2 / (2 C n)`` (bias
  included). Problems are independent, so each converges to its own minimiser; the worst final
  gradient is reported in ``info``.
- ``mlp``: the folds of one grid candidate train together as a batched ensemble (``bmm`` over
  stacked parameters): each member has the initialisation, shuffling, validation split and
  early stopping :class:`MLPHead` would give it, its layers' weights and biases are
  parameters of one torch optimizer, the head's own (AdamW, or Adam with scikit-learn's L2
  gradient over each member's rows; fused where there is a kernel; members out of batches are
  frozen, stopped ones leave) and it keeps its best epoch.

Anything else (other heads, approximate KNN indexes, ``solver="liblinear"``, a scoring that is
not computed from predictions, a fold whose training part lacks a class) runs through
scikit-learn's ``GridSearchCV``, with the same outputs; :func:`unbatchable_reason` tells which
applies. The refit on all of X is always the head's own ``fit``, so ``best_estimator_`` is a
normal head (saved, loaded and used for prediction as before).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, ParameterGrid, check_cv
from sklearn.utils.validation import check_array

from pinsearch.heads import (
    HEADS,
    _torch_device,
    add_l2_gradient,
    check_C,
    check_solver_limits,
    create_head,
    knn_votes,
    mlp_optimizer,
    scaler_stats,
)

__all__ = [
    "BATCHED_HEADS",
    "GridSearchResult",
    "batched_grid_search",
    "is_batchable",
    "unbatchable_reason",
]

_logger = logging.getLogger(__name__)

#: Heads with a batched cross-validation.
BATCHED_HEADS = ("knn", "lsvm", "mlp")

#: Scorings computed here from fold predictions (the names of scikit-learn's scorers).
_SCORERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "f1_macro": lambda t, p: f1_score(t, p, average="macro"),
    "f1_micro": lambda t, p: f1_score(t, p, average="micro"),
    "f1_weighted": lambda t, p: f1_score(t, p, average="weighted"),
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
}

_LBFGS_HISTORY = 10
_ARMIJO = 1e-4
_MAX_BACKTRACKS = 30
_TOLERANCE_CHANGE = 1e-9  # torch.optim.LBFGS's default
_ROW_BLOCK = 4096  # rows per forward pass when the MLP scores validation or test rows


@dataclass
class GridSearchResult:
    """What ``GridSearchCV`` exposes after ``fit``, from either path.

    Attributes:
        cv_results_: ``params``, ``param_<name>``, ``mean_test_score``, ``std_test_score``,
            ``rank_test_score`` and ``split<i>_test_score`` (arrays over candidates, in the
            order of ``ParameterGrid(grid)``, as scikit-learn's).
        best_index_: the best candidate (the first of the highest mean, as scikit-learn).
        best_params_: its parameters.
        best_score_: its mean test score.
        best_estimator_: the head refitted on all of X with ``best_params_`` (None without
            refit).
        n_splits_: folds.
        batched: True when the batched path ran, False for ``GridSearchCV``.
        info: how it ran: ``path``, ``reason`` (why not batched), ``cv_seconds``,
            ``refit_seconds``, ``device`` and per-head solver diagnostics (``lsvm``:
            iterations, worst gradient, problems not converged; ``mlp``: epochs per member).
    """

    cv_results_: dict[str, Any]
    best_index_: int
    best_params_: dict[str, Any]
    best_score_: float
    best_estimator_: Any
    n_splits_: int
    batched: bool
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: Any) -> np.ndarray:
        """Predictions of ``best_estimator_``."""
        if self.best_estimator_ is None:
            raise ValueError("no refitted estimator (refit=False)")
        return self.best_estimator_.predict(X)


# -- which searches are batched ---------------------------------------------------------------


def unbatchable_reason(
    head: str,
    grid: dict[str, Sequence[Any]],
    estimator_params: dict[str, Any] | None = None,
    scoring: str = "f1_macro",
) -> str | None:
    """Why ``(head, grid)`` cannot run batched, or None when it can.

    Data-dependent reasons (a fold's training part without some class) are only known at fit
    time; :func:`batched_grid_search` falls back then and says so in ``info``.
    """
    base = dict(estimator_params or {})
    if head not in BATCHED_HEADS:
        return f"head {head!r} has no batched grid search (batched: {', '.join(BATCHED_HEADS)})"
    if not isinstance(scoring, str) or scoring not in _SCORERS:
        return f"scoring {scoring!r} is not one of {sorted(_SCORERS)}"
    known = set(HEADS[head]().get_params())
    unknown = sorted((set(grid) | set(base)) - known)
    if unknown:
        return f"parameters {unknown} are not parameters of head {head!r}"
    if any(len(v) == 0 for v in grid.values()):
        return "a grid parameter has no values"

    def values(name: str, default: Any) -> list[Any]:
        return list(grid[name]) if name in grid else [base.get(name, default)]

    if len({str(v) for v in values("device", "auto")}) > 1:
        return "the device varies within the grid"
    if head == "knn":
        if any(f != "Flat" for f in values("factory", "Flat")):
            return "an approximate index (factory other than Flat) may find other neighbours for k"
        if any(w not in ("uniform", "distance") for w in values("weights", "uniform")):
            return "unknown KNN weights"
        if "distance" in values("weights", "uniform") and "ip" in values("metric", "l2"):
            return "distance weights with metric ip (the head refuses them: no distance)"
        if not all(isinstance(k, (int, np.integer)) for k in values("n_neighbors", 5)):
            return "n_neighbors must be integers"
    if head == "lsvm" and "liblinear" in values("solver", "auto"):
        return "solver='liblinear' was asked for"
    return None


def is_batchable(
    head: str,
    grid: dict[str, Sequence[Any]],
    estimator_params: dict[str, Any] | None = None,
    scoring: str = "f1_macro",
) -> bool:
    """True when :func:`batched_grid_search` runs ``(head, grid)`` batched (data permitting)."""
    return unbatchable_reason(head, grid, estimator_params, scoring) is None


# -- the search ---------------------------------------------------------------------------------


def batched_grid_search(
    head: str,
    estimator_params: dict[str, Any] | None,
    grid: dict[str, Sequence[Any]],
    X: Any,
    y: Any,
    cv: Any = 5,
    scoring: str = "f1_macro",
    *,
    refit: bool = True,
    n_jobs: int | None = 1,
    memory_budget: int | None = None,
) -> GridSearchResult:
    """Grid-search CV of a registered head: batched when possible, ``GridSearchCV`` otherwise.

    Args:
        head: registry name (``knn``, ``lsvm``, ``mlp`` are batched).
        estimator_params: fixed hyperparameters of the head (e.g. ``device``).
        grid: parameter -> values, as for ``GridSearchCV``.
        X: (n, d) training vectors.
        y: (n,) labels.
        cv: folds (int) or a scikit-learn splitter, as for ``GridSearchCV``.
        scoring: a scikit-learn scorer name; batched for ``f1_macro``, ``f1_micro``,
            ``f1_weighted``, ``accuracy``, ``balanced_accuracy``.
        refit: refit the best candidate on all of X (``best_estimator_``).
        n_jobs: parallel fits of the ``GridSearchCV`` fallback.
        memory_budget: bytes the batched LSVM may use for its per-problem work arrays (the
            problems are solved in chunks that fit); default half the free GPU memory, or
            2 GiB on the CPU.

    Returns:
        A :class:`GridSearchResult`.
    """
    base = dict(estimator_params or {})
    reason = unbatchable_reason(head, grid, base, scoring)
    X = check_array(X, dtype=np.float32)
    y = np.asarray(y)
    if len(y) != len(X):
        raise ValueError(f"{len(X)} vectors but {len(y)} labels")
    classes, y_enc = np.unique(y, return_inverse=True)
    if len(classes) < 2:  # before any fold is fitted: a classifier needs two classes
        raise ValueError(f"a grid search needs at least 2 classes; y has {len(classes)}")
    splits = list(check_cv(cv, y, classifier=True).split(X, y))
    if reason is None and head in ("lsvm", "mlp"):
        for i, (train, _) in enumerate(splits):
            if len(np.unique(y_enc[train])) < len(classes):
                reason = f"the training part of fold {i} lacks some class"
                break
    if reason is not None:
        _logger.info("grid search of %s through GridSearchCV: %s", head, reason)
        return _sklearn_search(head, base, grid, X, y, splits, scoring, refit, n_jobs, reason)

    candidates = list(ParameterGrid(grid))
    start = time.perf_counter()
    info: dict[str, Any] = {"path": "batched", "reason": None}
    if head == "knn":
        preds, info["knn"] = _knn_predictions(X, y, candidates, splits, base)
    elif head == "lsvm":
        enc = _lsvm_predictions(X, y_enc, len(classes), candidates, splits, base, memory_budget)
        preds, info["lsvm"] = [[classes[p] for p in row] for row in enc[0]], enc[1]
    else:
        enc = _mlp_predictions(X, y_enc, len(classes), candidates, splits, base)
        preds, info["mlp"] = [[classes[p] for p in row] for row in enc[0]], enc[1]
    scorer = _SCORERS[scoring]
    scores = np.array(
        [[scorer(y[test], preds[c][f]) for f, (_, test) in enumerate(splits)]
         for c in range(len(candidates))],
        dtype=np.float64,
    )  # fmt: skip
    info["cv_seconds"] = time.perf_counter() - start
    info["device"] = str(_search_device(head, base))
    results = _cv_results(candidates, scores)
    best = int(results["rank_test_score"].argmin())
    estimator = None
    if refit:
        start = time.perf_counter()
        estimator = create_head(head, **{**base, **candidates[best]}).fit(X, y)
        info["refit_seconds"] = time.perf_counter() - start
    return GridSearchResult(
        cv_results_=results,
        best_index_=best,
        best_params_=dict(candidates[best]),
        best_score_=float(results["mean_test_score"][best]),
        best_estimator_=estimator,
        n_splits_=len(splits),
        batched=True,
        info=info,
    )


def _search_device(head: str, base: dict[str, Any]) -> Any:
    device = str(base.get("device", "auto"))
    if head == "knn":
        return device  # a FAISS placement (auto, cpu, gpu)
    return _torch_device(device)


def _sklearn_search(
    head: str,
    base: dict[str, Any],
    grid: dict[str, Sequence[Any]],
    X: np.ndarray,
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    scoring: str,
    refit: bool,
    n_jobs: int | None,
    reason: str,
) -> GridSearchResult:
    search = GridSearchCV(
        create_head(head, **base), grid, scoring=scoring, cv=splits, refit=refit,
        n_jobs=n_jobs, error_score="raise",
    )  # fmt: skip
    start = time.perf_counter()
    search.fit(X, y)
    return GridSearchResult(
        cv_results_=search.cv_results_,
        best_index_=int(search.best_index_),
        best_params_=search.best_params_,
        best_score_=float(search.best_score_),
        best_estimator_=search.best_estimator_ if refit else None,
        n_splits_=int(search.n_splits_),
        batched=False,
        info={"path": "sklearn", "reason": reason, "seconds": time.perf_counter() - start},
    )


def _cv_results(candidates: list[dict[str, Any]], scores: np.ndarray) -> dict[str, Any]:
    """``cv_results_`` as ``GridSearchCV`` builds it (same means, stds and ranking)."""
    from scipy.stats import rankdata

    results: dict[str, Any] = {"params": candidates}
    for name in sorted({k for c in candidates for k in c}):
        column = np.empty(len(candidates), dtype=object)
        column[:] = [c.get(name) for c in candidates]
        results[f"param_{name}"] = column
    for i in range(scores.shape[1]):
        results[f"split{i}_test_score"] = scores[:, i]
    means = np.average(scores, axis=1)
    results["mean_test_score"] = means
    results["std_test_score"] = np.sqrt(np.average((scores - means[:, None]) ** 2, axis=1))
    ranked = np.where(
        np.isnan(means), np.nanmin(means) - 1 if np.isfinite(means).any() else 0, means
    )
    results["rank_test_score"] = rankdata(-ranked, method="min").astype(np.int32)
    return results


# -- knn ----------------------------------------------------------------------------------------


def _knn_predictions(
    X: np.ndarray,
    y: np.ndarray,
    candidates: list[dict[str, Any]],
    splits: list[tuple[np.ndarray, np.ndarray]],
    base: dict[str, Any],
) -> tuple[list[list[np.ndarray]], dict[str, Any]]:
    """Fold predictions of every candidate from one search per (index settings, fold).

    The k nearest are the first k of the K >= k nearest unless the k-th and (k+1)-th are at the
    same distance: then which of the tied neighbours a k-search keeps is the index's choice
    (FAISS breaks ties differently for different k), so that k is searched on its own for the
    fold (counted in ``tie_searches``); exact duplicates in the data are the usual cause.
    """
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, cand in enumerate(candidates):
        index_params = {k: v for k, v in {**base, **cand}.items()
                        if k not in ("n_neighbors", "weights")}  # fmt: skip
        key = tuple(sorted((k, repr(v)) for k, v in index_params.items()))
        groups.setdefault(key, []).append(i)
    preds: list[list[Any]] = [[None] * len(splits) for _ in candidates]
    searches = tie_searches = 0
    for members in groups.values():
        params = {**base, **candidates[members[0]]}
        ks = {i: int({**base, **candidates[i]}.get("n_neighbors", 5)) for i in members}
        k_max = max(ks.values())
        params["n_neighbors"] = k_max
        for f, (train, test) in enumerate(splits):
            model = create_head("knn", **params).fit(X[train], y[train])
            dist, rows = model.kneighbors(X[test], k_max)
            searches += 1
            lists = {k_max: (dist, model.train_labels_[rows])}
            for k in sorted(set(ks.values())):
                if k in lists:
                    continue
                if np.any(dist[:, k - 1] == dist[:, k]):
                    d_k, r_k = model.kneighbors(X[test], k)
                    lists[k] = (d_k, model.train_labels_[r_k])
                    tie_searches += 1
                else:
                    lists[k] = (dist[:, :k], lists[k_max][1][:, :k])
            for i in members:
                d_k, labels = lists[ks[i]]
                weights = {**base, **candidates[i]}.get("weights", "uniform")
                votes = knn_votes(d_k, labels, len(model.classes_), weights)
                preds[i][f] = model.classes_[np.argmax(votes, axis=1)]
    return preds, {"searches": searches, "tie_searches": tie_searches}


# -- lsvm ---------------------------------------------------------------------------------------


@dataclass
class _Problems:
    """The stacked (candidate, fold) problems of one chunk, on the device."""

    mu: Any  # (B, d) fold mean minus the global centre (zeros + centre without standardising)
    inv_s: Any  # (B, d) 1 / fold scale
    mask: Any  # (n, B) 1 for the problem's training rows
    inv_n: Any  # (B,) 1 / training rows
    reg: Any  # (B,) 1 / (C n)


def _lsvm_objective(xc: Any, target: Any, pb: _Problems, wb: Any, sel: Any) -> tuple[Any, Any]:
    """Objectives (b,) and gradients (b, d + 1, K) of problems ``sel`` at weights ``wb``.

    Per problem: ``sum max(0, 1 - t (xs w + b))^2 / n + |wb|^2 / (2 C n)`` with
    ``xs = (x - mu) / s`` over its training rows, computed as ``x @ (w / s) - mu @ (w / s)``.
    """
    import torch

    n, d = xc.shape
    nb, k = wb.shape[0], wb.shape[2]
    inv_s, mu, inv_n, reg = pb.inv_s[sel], pb.mu[sel], pb.inv_n[sel], pb.reg[sel]
    v = wb[:, :d] * inv_s[:, :, None]  # (nb, d, K): weights on the unscaled inputs
    offset = wb[:, d] - torch.einsum("bd,bdk->bk", mu, v)
    s = (xc @ v.permute(1, 0, 2).reshape(d, nb * k)).view(n, nb, k)
    s += offset
    # s becomes the masked hinge residual max(0, 1 - t s), then dLoss/dscores, in place
    s.mul_(target[:, None, :]).neg_().add_(1.0).clamp_(min=0.0)
    s.mul_(pb.mask[:, sel, None])
    loss = torch.einsum("nbk,nbk->b", s, s) * inv_n + 0.5 * reg * torch.einsum("bdk,bdk->b", wb, wb)
    s.mul_(target[:, None, :]).mul_((-2.0 * inv_n)[None, :, None])
    dv = (xc.T @ s.view(n, nb * k)).view(d, nb, k).permute(1, 0, 2)
    doffset = s.sum(dim=0)
    dw = (dv - mu[:, :, None] * doffset[:, None, :]) * inv_s[:, :, None]
    grad = torch.cat([dw, doffset[:, None, :]], dim=1)
    grad += reg[:, None, None] * wb
    return loss, grad


def _lsvm_scores(xc: Any, pb: _Problems, wb: Any, sel: Any) -> Any:
    """Decision values (n, b, K) of problems ``sel`` on every row."""
    import torch

    n, d = xc.shape
    nb, k = wb.shape[0], wb.shape[2]
    v = wb[:, :d] * pb.inv_s[sel][:, :, None]
    offset = wb[:, d] - torch.einsum("bd,bdk->bk", pb.mu[sel], v)
    return (xc @ v.permute(1, 0, 2).reshape(d, nb * k)).view(n, nb, k) + offset


def _dot(a: Any, b: Any) -> Any:
    return (a * b).sum(dim=(-2, -1))


def _batched_lbfgs(
    objective: Callable[[Any, Any], tuple[Any, Any]],
    shape: tuple[int, int, int],
    tol: np.ndarray,
    max_iter: np.ndarray,
    device: Any,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Minimise B independent smooth convex objectives together.

    L-BFGS per problem (own history, own scaling, own backtracking line search from step 1),
    as batched tensor operations; only problems still running are evaluated. A step is taken
    when it satisfies Armijo's test or when the slope along the direction is still downhill at
    its end (for a convex objective the objective then fell along the whole step). A problem
    stops when its largest gradient entry is at most its ``tol`` (``torch.optim.LBFGS``'s
    test), when its steps become negligible, when the line search fails, or after
    ``max_iter`` iterations; ``status`` says which.
    """
    import torch

    b = shape[0]
    wb = torch.zeros(shape, device=device)
    every = torch.arange(b, device=device)
    f, g = objective(wb, every)
    s_hist = torch.zeros((_LBFGS_HISTORY, *shape), device=device)
    y_hist = torch.zeros((_LBFGS_HISTORY, *shape), device=device)
    rho = torch.zeros((_LBFGS_HISTORY, b), device=device)
    gamma = torch.ones(b, device=device)
    slot, filled = 0, 0
    n_iter = np.zeros(b, dtype=np.int64)
    gmax = g.abs().amax(dim=(1, 2)).cpu().numpy()
    done = (gmax <= tol) | (max_iter <= 0)
    status = np.where(done, "converged", "running").astype(object)
    evaluations = 1
    while not done.all():
        # two-loop recursion for all problems at once (a zero rho makes a history slot a no-op)
        q = -g
        order = [(slot - 1 - j) % _LBFGS_HISTORY for j in range(filled)]
        alphas = []
        for i in order:
            a = rho[i] * _dot(s_hist[i], q)
            q -= a[:, None, None] * y_hist[i]
            alphas.append(a)
        direction = q * gamma[:, None, None]
        for i, a in zip(reversed(order), reversed(alphas)):
            beta = rho[i] * _dot(y_hist[i], direction)
            direction += s_hist[i] * (a - beta)[:, None, None]
        gtd = _dot(g, direction)
        first = torch.from_numpy(n_iter == 0).to(device)
        step = torch.where(first, (1.0 / g.abs().sum(dim=(1, 2))).clamp(max=1.0), 1.0)
        no_descent = (gtd >= 0).cpu().numpy() & ~done
        status[no_descent] = "no descent direction"
        done |= no_descent
        pending = ~done
        moved = np.zeros(b, dtype=bool)
        s_hist[slot].zero_()
        y_hist[slot].zero_()
        for _ in range(_MAX_BACKTRACKS):
            idx = np.flatnonzero(pending)
            if idx.size == 0:
                break
            sel = torch.from_numpy(idx).to(device)
            trial = wb[sel] + step[sel][:, None, None] * direction[sel]
            f_new, g_new = objective(trial, sel)
            evaluations += 1
            # Armijo, or (convexity) a slope still downhill at the trial point: the objective
            # fell all along the step. The second test needs no objective values, whose float32
            # rounding hides the last decreases near the minimum.
            armijo = f_new <= f[sel] + _ARMIJO * step[sel] * gtd[sel]
            downhill = _dot(g_new, direction[sel]) <= 0
            ok = (armijo | downhill).cpu().numpy()
            if ok.any():
                acc = sel[torch.from_numpy(ok).to(device)]
                okt = torch.from_numpy(ok).to(device)
                s_hist[slot, acc] = trial[okt] - wb[acc]
                y_hist[slot, acc] = g_new[okt] - g[acc]
                wb[acc] = trial[okt]
                f[acc] = f_new[okt]
                g[acc] = g_new[okt]
                moved[idx[ok]] = True
                pending[idx[ok]] = False
            step = torch.where(torch.from_numpy(pending).to(device), step * 0.5, step)
        stalled = pending & ~done
        status[stalled] = "line search failed"
        done |= stalled
        ys, yy = _dot(s_hist[slot], y_hist[slot]), _dot(y_hist[slot], y_hist[slot])
        valid = torch.from_numpy(moved).to(device) & (ys > 1e-10)
        rho[slot] = torch.where(valid, 1.0 / torch.where(valid, ys, 1.0), 0.0)
        gamma = torch.where(valid, ys / torch.where(valid, yy, 1.0), gamma)
        slot, filled = (slot + 1) % _LBFGS_HISTORY, min(filled + 1, _LBFGS_HISTORY)
        n_iter[moved] += 1
        gmax = g.abs().amax(dim=(1, 2)).cpu().numpy()
        step_len = s_hist[slot - 1 if slot else _LBFGS_HISTORY - 1].abs().amax(dim=(1, 2))
        small_step = (step_len <= _TOLERANCE_CHANGE).cpu().numpy()
        converged = moved & (gmax <= tol)
        status[converged] = "converged"
        flat = moved & ~converged & small_step
        status[flat] = "no progress"
        out_of_iter = moved & ~converged & ~flat & (n_iter >= max_iter)
        status[out_of_iter] = "max_iter"
        done |= converged | flat | out_of_iter
    return wb, {
        "n_iter": n_iter,
        "grad_max": gmax,
        "status": status,
        "evaluations": np.int64(evaluations),
    }


def _default_budget(device: Any) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


def _lsvm_predictions(
    X: np.ndarray,
    y_enc: np.ndarray,
    n_classes: int,
    candidates: list[dict[str, Any]],
    splits: list[tuple[np.ndarray, np.ndarray]],
    base: dict[str, Any],
    memory_budget: int | None,
) -> tuple[list[list[np.ndarray]], dict[str, Any]]:
    """Encoded fold predictions of every candidate, all problems solved by one batched L-BFGS
    (in chunks of problems when their work arrays exceed ``memory_budget``)."""
    import torch

    heads = [create_head("lsvm", **{**base, **c}) for c in candidates]
    for h in heads:
        check_C(h.C)  # type: ignore[attr-defined]
        check_solver_limits(h.max_iter, h.tol)  # type: ignore[attr-defined]
    device = _torch_device(str(base.get("device", "auto")))
    n, d = X.shape
    k = n_classes
    centre = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    xc = torch.from_numpy(X - centre).to(device)
    target = -torch.ones(n, k, device=device)
    target[torch.arange(n, device=device), torch.from_numpy(y_enc).to(device)] = 1.0
    stats = {}
    for f, (train, _) in enumerate(splits):
        for standardize in {bool(h.standardize) for h in heads}:  # type: ignore[attr-defined]
            mean, scale = scaler_stats(X[train], standardize)
            stats[f, standardize] = (
                mean.astype(np.float32) - centre,
                1.0 / scale.astype(np.float32),
            )
    problems = [(c, f) for c in range(len(candidates)) for f in range(len(splits))]
    per_problem = 4 * (3 * n * k + 2 * n + (2 * _LBFGS_HISTORY + 10) * (d + 1) * k)
    budget = memory_budget if memory_budget is not None else _default_budget(device)
    chunk = max(1, min(len(problems), budget // per_problem))
    n_chunks = -(-len(problems) // chunk)
    chunk = -(-len(problems) // n_chunks)
    preds: list[list[Any]] = [[None] * len(splits) for _ in candidates]
    n_iter = np.zeros(len(problems), dtype=np.int64)
    grad_max = np.zeros(len(problems))
    status = np.empty(len(problems), dtype=object)
    evaluations = 0
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        hs = [heads[c] for c, _ in part]
        mask = np.zeros((n, len(part)), dtype=np.float32)
        for j, (_, f) in enumerate(part):
            mask[splits[f][0], j] = 1.0
        counts = mask.sum(axis=0).astype(np.float64)
        pb = _Problems(
            mu=torch.from_numpy(np.stack([stats[f, bool(h.standardize)][0]  # type: ignore[attr-defined]
                                          for h, (_, f) in zip(hs, part)])).to(device),
            inv_s=torch.from_numpy(np.stack([stats[f, bool(h.standardize)][1]  # type: ignore[attr-defined]
                                             for h, (_, f) in zip(hs, part)])).to(device),
            mask=torch.from_numpy(mask).to(device),
            inv_n=torch.from_numpy((1.0 / counts).astype(np.float32)).to(device),
            reg=torch.tensor([1.0 / (h.C * m) for h, m in zip(hs, counts)],  # type: ignore[attr-defined]
                             dtype=torch.float32, device=device),
        )  # fmt: skip
        tol = np.array([h.tol for h in hs], dtype=np.float64)  # type: ignore[attr-defined]
        max_iter = np.array([h.max_iter for h in hs], dtype=np.int64)  # type: ignore[attr-defined]

        def objective(wb: Any, sel: Any, pb: _Problems = pb) -> tuple[Any, Any]:
            return _lsvm_objective(xc, target, pb, wb, sel)

        wb, diag = _batched_lbfgs(objective, (len(part), d + 1, k), tol, max_iter, device)
        n_iter[start : start + len(part)] = diag["n_iter"]
        grad_max[start : start + len(part)] = diag["grad_max"]
        status[start : start + len(part)] = diag["status"]
        evaluations += int(diag["evaluations"])
        with torch.no_grad():
            every = torch.arange(len(part), device=device)
            best = _lsvm_scores(xc, pb, wb, every).argmax(dim=2).cpu().numpy()  # (n, b)
        for j, (c, f) in enumerate(part):
            preds[c][f] = best[splits[f][1], j]
    worst = int(np.argmax(grad_max))
    c_worst, f_worst = problems[worst]
    tolerances = np.array([heads[c].tol for c, _ in problems])  # type: ignore[attr-defined]
    info = {
        "problems": len(problems),
        "chunks": n_chunks,
        "chunk_size": chunk,
        "evaluations": evaluations,
        "max_iter_used": int(n_iter.max()),
        "mean_iter": float(n_iter.mean()),
        "worst_grad": float(grad_max[worst]),
        "worst_problem": {"params": candidates[c_worst], "fold": f_worst},
        "not_converged": int((grad_max > tolerances).sum()),
        "status": {str(s): int((status == s).sum()) for s in sorted(set(status.tolist()))},
    }
    if info["not_converged"]:
        # a near miss (within 10x the tolerance) changes no prediction worth a warning
        far = bool((grad_max > 10 * tolerances).any())
        _logger.log(
            logging.WARNING if far else logging.INFO,
            "batched LSVM: %d of %d problems stopped above their gradient tolerance (worst "
            "%.2e, %s fold %d)", info["not_converged"], len(problems), grad_max[worst],
            candidates[c_worst], f_worst,
        )  # fmt: skip
    return preds, info


# -- mlp ----------------------------------------------------------------------------------------


def _mlp_predictions(
    X: np.ndarray,
    y_enc: np.ndarray,
    n_classes: int,
    candidates: list[dict[str, Any]],
    splits: list[tuple[np.ndarray, np.ndarray]],
    base: dict[str, Any],
) -> tuple[list[list[np.ndarray]], dict[str, Any]]:
    """Encoded fold predictions: per candidate, its folds trained as one batched ensemble."""
    import torch

    device = _torch_device(str(base.get("device", "auto")))
    x_all = torch.from_numpy(X).to(device)
    y_all = torch.from_numpy(y_enc.astype(np.int64)).to(device)
    preds: list[list[Any]] = []
    epochs, best_epochs = [], []
    for cand in candidates:
        head = create_head("mlp", **{**base, **cand})
        fold_preds, n_epochs, best_epoch = _train_ensemble(
            head, X, y_enc, n_classes, splits, x_all, y_all, device
        )
        preds.append(fold_preds)
        epochs.append(n_epochs)
        best_epochs.append(best_epoch)
    return preds, {"epochs": epochs, "best_epochs": best_epochs}


def _layer_layout(net: Any) -> list[tuple[int, int, int, int]]:
    """(weight offset, bias offset, out, in) of each Linear layer in a flat parameter row
    (:func:`_flat_row`)."""
    layout, offset = [], 0
    linears = [m for m in net if hasattr(m, "weight")]
    for layer in linears:
        n_out, n_in = layer.weight.shape
        layout.append((offset, offset + n_out * n_in, n_out, n_in))
        offset += n_out * n_in + n_out
    return layout


def _flat_row(net: Any) -> Any:
    """The parameters of ``net`` in one row: each Linear layer's weight transposed (in x out,
    row-major), then its bias. Stored so, a weight's gradient comes out of the batched
    backward contiguous, as the optimizer takes it: stored as torch keeps it (out x in), every
    step copied each weight gradient out of a transposed view (a quarter of a step's time on
    the CPU at 1,024 inputs)."""
    import torch

    return torch.cat([(p.T if p.dim() == 2 else p).detach().reshape(-1) for p in net.parameters()])


def _layer_views(flat: Any, layout: list[tuple[int, int, int, int]]) -> list[Any]:
    """Weights (B, in, out) and biases (B, out) of every layer, as views into ``flat``."""
    b = flat.shape[0]
    views = []
    for w_at, b_at, n_out, n_in in layout:
        views.append(flat[:, w_at : w_at + n_out * n_in].view(b, n_in, n_out))
        views.append(flat[:, b_at : b_at + n_out])
    return views


def _ensemble_forward(views: list[Any], x: Any) -> Any:
    """Logits (B, r, K) of B stacked MLPs (:func:`_layer_views`) on inputs x (B, r, d)."""
    import torch

    h = x
    n_layers = len(views) // 2
    for i in range(n_layers):
        weight, bias = views[2 * i], views[2 * i + 1]
        h = torch.baddbmm(bias[:, None, :], h, weight)
        if i < n_layers - 1:
            h = torch.relu(h)
    return h


def _padded(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row lists stacked into (B, longest) indices (padding 0) and a validity mask."""
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
        valid[i, : len(r)] = True
    return idx, valid


def _train_ensemble(
    head: Any,
    X: np.ndarray,
    y_enc: np.ndarray,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    x_all: Any,
    y_all: Any,
    device: Any,
) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Train one MLP per fold as a batched ensemble, each as ``head.fit`` trains it alone:
    same scaling, validation split, initialisation, batch order, optimizer steps and early
    stopping. Members that stop early leave the batch."""
    import torch
    import torch.nn.functional as F

    b, d = len(splits), X.shape[1]
    means, scales, tr_rows, va_rows, has_val = [], [], [], [], np.zeros(b, dtype=bool)
    for i, (train, _) in enumerate(splits):
        mean, scale = scaler_stats(X[train], head.standardize)
        means.append(mean.astype(np.float32))
        scales.append(scale.astype(np.float32))
        tr, va, has_val[i] = head._validation_split(y_enc[train])
        tr_rows.append(train[tr])
        va_rows.append(train[va])
    mean_all = torch.from_numpy(np.stack(means)).to(device)[:, None, :]
    scale_all = torch.from_numpy(np.stack(scales)).to(device)[:, None, :]
    va_idx_np, va_valid_np = _padded(va_rows)
    va_idx_all = torch.from_numpy(va_idx_np).to(device)
    va_valid_all = torch.from_numpy(va_valid_np).to(device).float()

    net = head._seeded_network(d, n_classes)
    layout = _layer_layout(net)
    row = _flat_row(net).to(device)
    final = row.repeat(b, 1)  # each member's kept parameters (its best epoch with validation)
    flat = final.clone()
    bs = int(head.batch_size)
    members, opt = _member_optimizer(flat, layout, [None] * b, head)
    gens = [torch.Generator().manual_seed(head.random_state) for _ in range(b)]
    best_value = np.full(b, np.inf)  # of the monitored value, which is minimised
    best_epoch = np.zeros(b, dtype=np.int64)
    n_epochs = np.zeros(b, dtype=np.int64)
    alive = np.arange(b)  # members still training, in the order of the batched tensors
    sub = torch.arange(b, device=device)
    for epoch in range(int(head.max_epochs)):
        if alive.size == 0:
            break
        mean_t, scale_t = mean_all[sub], scale_all[sub]
        orders = [tr_rows[m][torch.randperm(len(tr_rows[m]), generator=gens[m]).numpy()]
                  for m in alive]  # fmt: skip
        n_steps = np.array([-(-len(o) // bs) for o in orders])
        width = max(int(n_steps.max()), 1) * bs
        idx_np, valid_np = _padded(orders)
        idx_t = torch.from_numpy(np.pad(idx_np, ((0, 0), (0, width - idx_np.shape[1]))))
        valid_t = torch.from_numpy(np.pad(valid_np, ((0, 0), (0, width - valid_np.shape[1]))))
        idx_t, valid_t = idx_t.to(device), valid_t.to(device).float()
        active_np = np.arange(int(n_steps.max()))[:, None] < n_steps  # (steps, members)
        for j in range(int(n_steps.max())):
            rows = idx_t[:, j * bs : (j + 1) * bs]
            weight = valid_t[:, j * bs : (j + 1) * bs]
            # leaves that share flat's memory: their gradients come out per layer, no scatter
            views = [v.detach().requires_grad_(True) for v in _layer_views(flat, layout)]
            logits = _ensemble_forward(views, (x_all[rows] - mean_t) / scale_t)
            loss = F.cross_entropy(logits.reshape(-1, n_classes), y_all[rows].reshape(-1),
                                   reduction="none").view(rows.shape)  # fmt: skip
            count = weight.sum(dim=1).clamp(min=1.0)  # each member's rows in this step
            per_member = (loss * weight).sum(dim=1) / count
            # each member's parameters take views of these: a fused Adam(W) needs a gradient laid
            # out as its parameter (on the CPU it silently misreads another layout); they come
            # out contiguous, so .contiguous() costs nothing but guards against a torch change
            grads = [g.contiguous() for g in torch.autograd.grad(per_member.sum(), views)]
            if head.penalty == "l2":  # the weights' L2 gradient, over each member's own rows
                add_l2_gradient(grads[0::2], views[0::2], float(head.weight_decay), count)
            for m, (params, on) in enumerate(zip(members, active_np[j])):
                for p, g in zip(params, grads):  # a member out of batches keeps its state
                    p.grad = g[m] if on else None
            opt.step()
        n_epochs[alive] = epoch + 1
        watched = has_val[alive]
        if not watched.any():
            continue
        with torch.no_grad():
            val = _ensemble_validation(
                flat, layout, x_all, y_all, mean_t, scale_t, va_idx_all[sub], va_valid_all[sub]
            )
        value = head.monitored(*(v.cpu().numpy().astype(np.float64) for v in val))
        improved = watched & (value < best_value[alive] - 1e-4)
        if improved.any():
            best_value[alive[improved]] = value[improved]
            best_epoch[alive[improved]] = epoch
            at = torch.from_numpy(np.flatnonzero(improved)).to(device)
            final[sub[at]] = flat[at]
        stop = watched & ~improved & (epoch - best_epoch[alive] >= int(head.patience))
        if stop.any():
            kept = np.flatnonzero(~stop)
            keep = torch.from_numpy(kept).to(device)
            alive, sub = alive[~stop], sub[keep]
            flat = flat[keep]
            if kept.size:  # else none is left and training ends (Adam needs a parameter)
                states = [[opt.state[p] for p in members[i]] for i in kept]
                members, opt = _member_optimizer(flat, layout, states, head)
    if alive.size:  # ran out of epochs: members without validation keep their last weights
        last = torch.from_numpy(np.flatnonzero(~has_val[alive])).to(device)
        final[sub[last]] = flat[last]
    best_epoch[~has_val] = n_epochs[~has_val] - 1  # the epoch of the weights they keep
    te_idx, te_valid = _padded([test for _, test in splits])
    out = np.zeros(te_idx.shape, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, te_idx.shape[1], _ROW_BLOCK):
            block = torch.from_numpy(te_idx[:, start : start + _ROW_BLOCK]).to(device)
            views = _layer_views(final, layout)
            logits = _ensemble_forward(views, (x_all[block] - mean_all) / scale_all)
            out[:, start : start + _ROW_BLOCK] = logits.argmax(dim=2).cpu().numpy()
    fold_preds = [out[i, te_valid[i]] for i in range(b)]
    return fold_preds, n_epochs.tolist(), best_epoch.tolist()


def _member_optimizer(
    flat: Any,
    layout: list[tuple[int, int, int, int]],
    states: list[list[dict[str, Any]] | None],
    head: Any,
) -> tuple[list[list[Any]], Any]:
    """Per ensemble member, one parameter per layer weight and bias, views of its row of
    ``flat`` (sharing its memory), all under one optimizer, the one ``head`` trains with
    (:func:`pinsearch.heads.mlp_optimizer`; fused where there is a kernel: one launch updates
    every member, where a hand-written batched update took some twenty per step). Each takes
    its gradient as a view of the batched backward's, with no copy. ``states``: each
    member's optimizer states so far (moments, step count; one per parameter), None for a new
    member. A member whose gradients are None in a step keeps its parameters, moments and
    step count."""
    import torch

    views = _layer_views(flat, layout)
    members = [[torch.nn.Parameter(v[m]) for v in views] for m in range(flat.shape[0])]
    everything = [p for member in members for p in member]
    opt = mlp_optimizer(everything, float(head.lr), float(head.weight_decay), head.penalty)
    for params, member_states in zip(members, states):
        for p, state in zip(params, member_states or ()):
            if state:
                opt.state[p] = state
    return members, opt


def _ensemble_validation(
    flat: Any,
    layout: list[tuple[int, int, int, int]],
    x_all: Any,
    y_all: Any,
    mean: Any,
    scale: Any,
    idx: Any,
    valid: Any,
) -> tuple[Any, Any]:
    """Mean cross-entropy and accuracy (each (B,)) of each member over its own (padded) rows,
    standardised with its own ``mean`` and ``scale`` (B, 1, d)."""
    import torch.nn.functional as F

    loss_sum, hits = 0.0, 0.0
    for start in range(0, idx.shape[1], _ROW_BLOCK):
        rows = idx[:, start : start + _ROW_BLOCK]
        weight = valid[:, start : start + _ROW_BLOCK]
        logits = _ensemble_forward(_layer_views(flat, layout), (x_all[rows] - mean) / scale)
        target = y_all[rows]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[2]), target.reshape(-1),
                               reduction="none").view(rows.shape)  # fmt: skip
        loss_sum = loss_sum + (loss * weight).sum(dim=1)
        hits = hits + ((logits.argmax(dim=2) == target).float() * weight).sum(dim=1)
    count = valid.sum(dim=1).clamp(min=1.0)
    return loss_sum / count, hits / count
