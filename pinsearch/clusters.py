"""``pinsearch cluster``: group pins (or boards) without labels, choose k, compare with categories.

k-means (FAISS, on the GPU when there is one and the data is large) or agglomerative (Ward,
SciPy's tree, cut at each k) clustering of L2-normalised vectors of any backbone. With no ``k``
given, a sweep over ``k_min..k_max`` records the k-means objective (inertia) and the
silhouette (cosine, on a sample) of each k; k is chosen at the elbow of the inertia curve
(kneedle, Satopaa et al. 2011, via ``kneed``) or at the best silhouette. The clustering is
compared with the categories (contingency matrix, adjusted Rand index, V-measure,
homogeneity, completeness, purity) and saved in the catalog (``cluster_runs``,
``clusters``), each cluster described as a proposed board: its size, majority category and
most central pins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.errors import DeviceError
from pinsearch.plots import literal, pyplot
from pinsearch.store import Store
from pinsearch.vectors import group_sums, in_sorted, unit_rows

__all__ = [
    "ClusterConfig",
    "ClusterReport",
    "check_plot_path",
    "check_seed",
    "choose_k",
    "cluster_store",
    "kmeans",
    "plot_sweep",
]

_logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_runs (
    run_id INTEGER PRIMARY KEY,
    backbone VARCHAR,
    method VARCHAR,                 -- kmeans or agglomerative
    level VARCHAR,                  -- pins or boards
    k INTEGER,
    config VARCHAR,                 -- JSON: ClusterConfig
    metrics VARCHAR,                -- JSON: ari, v_measure, ..., the k sweep
    created TIMESTAMP
);
CREATE TABLE IF NOT EXISTS clusters (
    run_id INTEGER,
    item VARCHAR,                   -- pin_id (level pins) or board key (level boards)
    cluster INTEGER,
    distance DOUBLE                 -- cosine distance to the cluster centre
);
"""

METHODS = ("kmeans", "agglomerative")
LEVELS = ("pins", "boards")


@dataclass
class ClusterConfig:
    """How to cluster (see the module docstring)."""

    method: str = "kmeans"
    k: int | None = None  # None: choose it over k_min..k_max
    k_min: int = 2
    k_max: int = 30
    choose: str = "elbow"  # elbow (kneedle on the inertia) or silhouette
    level: str = "pins"  # pins, or boards (their mean vectors)
    silhouette_sample: int = 5000
    seed: int = 0
    device: str = "auto"  # k-means on the GPU when available (auto, cpu, gpu)
    save: bool = True  # record the run in the catalog

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.choose not in ("elbow", "silhouette"):
            raise ValueError(f"choose must be elbow or silhouette, got {self.choose!r}")
        if self.k is not None and self.k < 2:
            raise ValueError(f"k must be at least 2, got {self.k}")
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        check_seed(self.seed)


@dataclass
class ClusterReport:
    """The chosen clustering, how k was chosen, and how it matches the categories."""

    store: str
    backbone: str
    method: str
    level: str
    items: int
    k: int
    chosen_by: str  # given, elbow, silhouette, or k_min (neither found one)
    elbow_k: int | None
    silhouette_k: int | None
    sweep: list[dict[str, Any]] = field(default_factory=list)  # k, inertia, silhouette (None
    # where undefined: the sample's pins all in one cluster)
    ari: float = 0.0
    v_measure: float = 0.0
    homogeneity: float = 0.0
    completeness: float = 0.0
    purity: float = 0.0
    silhouette: float | None = None  # (None: undefined, the sample all in one cluster)
    clusters: list[dict[str, Any]] = field(default_factory=list)  # proposed boards
    contingency: dict[str, dict[str, int]] = field(default_factory=dict)  # cluster -> cat -> n
    run_id: int | None = None
    plot: str | None = None  # the sweep's figure, where one was written
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, device: str = "auto") -> tuple[
    np.ndarray, np.ndarray, float
]:  # fmt: skip
    """FAISS k-means (spherical: unit centroids, for unit vectors), on the GPU(s) with
    ``device`` ``gpu``, or ``auto`` where FAISS sees one and there are 50,000 points or more.

    Returns:
        (labels, centroids, inertia = sum of squared distances to the assigned centroid).

    Raises:
        DeviceError: ``device="gpu"`` where FAISS sees no GPU.
    """
    import faiss

    from pinsearch.indexes import gpu_count
    from pinsearch.indexes.gpu import GPU_LOCK

    if device == "gpu" and gpu_count() == 0:
        raise DeviceError("k-means on device 'gpu' was asked for but faiss sees no GPU")
    use_gpu = device == "gpu" or (device == "auto" and gpu_count() > 0 and len(x) >= 50_000)
    km = faiss.Kmeans(
        x.shape[1], k, niter=25, nredo=3 if len(x) < 20_000 else 1, seed=seed,
        spherical=True, gpu=bool(use_gpu), max_points_per_centroid=100_000,
        min_points_per_centroid=1,
    )  # fmt: skip
    # FAISS's k-means makes GPU resources of its own: it takes its turn with pinsearch's
    points = np.ascontiguousarray(x, dtype=np.float32)
    with GPU_LOCK if use_gpu else contextlib.nullcontext():
        km.train(points)
        _, labels = km.index.search(points, 1)  # (its index is on the GPU(s) as well)
    centroids, labels = km.centroids, labels[:, 0].astype(np.int64)
    return labels, centroids, _inertia(points, centroids, labels)


def _inertia(x: np.ndarray, centres: np.ndarray, labels: np.ndarray, chunk: int = 65_536) -> float:
    """Sum of squared distances to the assigned centres, a chunk of rows at a time (the whole
    (n, d) array of differences is another copy of the vectors)."""
    total = 0.0
    for i in range(0, len(x), chunk):
        diff = x[i : i + chunk] - centres[labels[i : i + chunk]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


class _Ward:
    """Ward clustering of ``x`` (O(n^2) memory: beyond 20k items a sample, the rest by nearest
    centre). The tree is built once and cut at each k, so a sweep over k costs one build."""

    limit = 20_000

    def __init__(self, x: np.ndarray, seed: int) -> None:
        from scipy.cluster.hierarchy import ward

        self.x = x
        self.idx = (
            None
            if len(x) <= self.limit
            else np.sort(np.random.default_rng(seed).choice(len(x), self.limit, replace=False))
        )
        self.part = x if self.idx is None else x[self.idx]  # the rows the tree is built on
        self.tree = ward(self.part)

    def labels(self, k: int) -> np.ndarray:
        from scipy.cluster.hierarchy import fcluster

        sub = fcluster(self.tree, k, criterion="maxclust") - 1  # 0 .. k-1
        if self.idx is None:
            return sub.astype(np.int64)
        part = self.part
        centres = unit_rows(np.stack([part[sub == c].mean(axis=0) for c in range(sub.max() + 1)]))
        out = np.argmax(self.x @ centres.T, axis=1).astype(np.int64)  # the rest: nearest centre
        out[self.idx] = sub  # the sample keeps the tree's own clusters
        return out


def check_seed(seed: int) -> None:
    """A seed FAISS and scikit-learn both take (a 32-bit signed int, not negative)."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in 0 .. {2**31 - 1}, got {seed}")


def choose_k(ks: list[int], inertias: list[float], silhouettes: list[float | None]) -> tuple[
    int | None, int | None
]:  # fmt: skip
    """(elbow k by kneedle on the inertia curve, k of the best silhouette)."""
    from kneed import KneeLocator

    elbow = None
    if len(ks) >= 3:
        knee = KneeLocator(ks, inertias, curve="convex", direction="decreasing").knee
        elbow = int(knee) if knee is not None else None
    defined = [(v, k) for v, k in zip(silhouettes, ks) if v is not None and np.isfinite(v)]
    best = int(max(defined, key=lambda t: t[0])[1]) if defined else None  # (first of ties)
    return elbow, best


def _items(store: Store, backbone: str, level: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(unit vectors, item names, categories) of pins or boards."""
    pin_keys, cols = store.catalog.pin_columns("pin_id", "board", "category")
    vectors, keys = store.vectors(backbone).load()
    ok = in_sorted(pin_keys, keys)
    if not ok.all():  # (vectors of pins the catalog no longer has)
        vectors, keys = vectors[ok], keys[ok]
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # in place
    row = np.searchsorted(pin_keys, keys)
    cats = cols["category"][row]
    if level == "pins" or len(keys) == 0:  # (none: too few, said by the caller)
        return vectors, cols["pin_id"][row].tolist(), cats
    names, inv = np.unique(cols["board"][row], return_inverse=True)
    # a board's category: its pins' most common one (they share it, unless edited since)
    cat_names, cat_inv = np.unique(cats, return_inverse=True)
    counts = np.bincount(inv * len(cat_names) + cat_inv, minlength=len(names) * len(cat_names))
    board_cats = cat_names[counts.reshape(len(names), len(cat_names)).argmax(axis=1)]
    return unit_rows(group_sums(inv, len(names), vectors)), names.tolist(), board_cats


def _label(
    x: np.ndarray, k: int, config: ClusterConfig, ward: _Ward | None = None
) -> tuple[np.ndarray, float]:
    if config.method == "kmeans":
        labels, _, inertia = kmeans(x, k, seed=config.seed, device=config.device)
        return labels, inertia
    labels = (ward or _Ward(x, config.seed)).labels(k)
    k_made = int(labels.max()) + 1
    sizes = np.maximum(np.bincount(labels, minlength=k_made), 1)[:, None]
    centres = (group_sums(labels, k_made, x) / sizes).astype(x.dtype)
    return labels, _inertia(x, centres, labels)


def cluster_store(
    store: Store, backbone: str | None = None, config: ClusterConfig | None = None
) -> ClusterReport:
    """Cluster a backbone's pins (or boards), choose k if needed, compare, and save.

    Raises:
        ValueError: fewer items than clusters asked.
    """
    from sklearn import metrics as skm

    config = config or ClusterConfig()
    start = time.perf_counter()
    backbone = store.resolve_backbone(backbone)
    x, names, cats = _items(store, backbone, config.level)
    k_max = min(config.k_max, len(x) - 1)
    if len(x) < 3:
        raise ValueError(f"{len(x)} {config.level} are too few to cluster (3 at least)")
    if config.k is not None and config.k >= len(x):
        raise ValueError(
            f"{len(x)} {config.level} cannot make k={config.k} clusters (at most {len(x) - 1})"
        )
    if config.k is None and config.k_min > k_max:
        raise ValueError(
            f"{len(x)} {config.level} cannot make k_min={config.k_min} clusters (at most "
            f"{len(x) - 1}); lower k_min"
        )
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(len(x), min(config.silhouette_sample, len(x)), replace=False)

    def silhouette(labels: np.ndarray) -> float | None:
        if len(np.unique(labels[sample])) < 2:
            return None  # undefined
        return float(skm.silhouette_score(x[sample], labels[sample], metric="cosine"))

    sweep: list[dict[str, float]] = []
    elbow = best = None
    ward = _Ward(x, config.seed) if config.method == "agglomerative" else None
    if config.k is None:
        ks = list(range(config.k_min, max(k_max, config.k_min) + 1))
        for k in ks:
            labels, inertia = _label(x, k, config, ward)
            sweep.append({"k": k, "inertia": inertia, "silhouette": silhouette(labels)})
        with warnings.catch_warnings():  # (kneed: "no knee found" on a flat curve)
            warnings.simplefilter("ignore")
            elbow, best = choose_k(ks, [s["inertia"] for s in sweep],
                                   [s["silhouette"] for s in sweep])  # fmt: skip
        wanted = elbow if config.choose == "elbow" else best
        k, chosen_by = next(
            (k, by) for k, by in ((wanted, config.choose), (best, "silhouette"), (ks[0], "k_min"))
            if k is not None
        )  # fmt: skip
    else:
        k, chosen_by = config.k, "given"
    labels, _ = _label(x, k, config, ward)
    used = np.unique(labels)
    if len(used) < k:  # k-means leaves clusters empty when pins share vectors (re-pins)
        _logger.warning("%d of %d clusters came out empty (identical vectors); k = %d",
                        k - len(used), k, len(used))  # fmt: skip
        labels, k = np.searchsorted(used, labels), len(used)
    centres = unit_rows(np.stack([x[labels == c].mean(axis=0) for c in range(k)]))
    distance = 1.0 - np.sum(x * centres[labels], axis=1)
    contingency: dict[str, dict[str, int]] = {}
    proposals = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        counts = dict(zip(*np.unique(cats[members], return_counts=True)))
        counts = {str(a): int(b) for a, b in sorted(counts.items(), key=lambda t: -t[1])}
        contingency[str(c)] = counts
        top = members[np.argsort(distance[members])[:5]]
        major = next(iter(counts), "")
        proposals.append(
            {
                "cluster": c,
                "size": len(members),
                "majority_category": major,
                "purity": round(counts.get(major, 0) / max(len(members), 1), 4),
                "central": [names[i] for i in top],
            }
        )
    report = ClusterReport(
        store=str(store.root),
        backbone=backbone,
        method=config.method,
        level=config.level,
        items=len(x),
        k=int(k),
        chosen_by=chosen_by,
        elbow_k=elbow,
        silhouette_k=best,
        sweep=sweep,
        ari=float(skm.adjusted_rand_score(cats, labels)),
        v_measure=float(skm.v_measure_score(cats, labels)),
        homogeneity=float(skm.homogeneity_score(cats, labels)),
        completeness=float(skm.completeness_score(cats, labels)),
        purity=float(sum(max(v.values()) for v in contingency.values() if v) / len(x)),
        silhouette=silhouette(labels),
        clusters=sorted(proposals, key=lambda p: -p["size"]),
        contingency=contingency,
    )
    if config.save and not store.read_only:
        report.run_id = _save(store, report, config, names, labels, distance)
    report.seconds = time.perf_counter() - start
    return report


def _save(
    store: Store,
    report: ClusterReport,
    config: ClusterConfig,
    names: list[str],
    labels: np.ndarray,
    distance: np.ndarray,
) -> int:
    import pyarrow as pa

    con = store.catalog.connection
    con.execute(_SCHEMA)
    run_id = int(con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM cluster_runs").fetchone()[0])
    metrics = {
        k: getattr(report, k)
        for k in ("ari", "v_measure", "homogeneity", "completeness", "purity", "silhouette",
                  "elbow_k", "silhouette_k", "chosen_by", "sweep")
    }  # fmt: skip
    table = pa.table(
        {
            "run_id": pa.array([run_id] * len(names), pa.int32()),
            "item": pa.array(names, pa.string()),
            "cluster": pa.array(labels.astype(np.int32)),
            "distance": pa.array(distance.astype(np.float64)),
        }
    )
    with store.catalog.transaction():
        con.execute(
            "INSERT INTO cluster_runs VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [run_id, report.backbone, report.method, report.level, report.k,
             json.dumps(asdict(config)), json.dumps(metrics)],
        )  # fmt: skip
        con.register("_new_clusters", table)
        con.execute("INSERT INTO clusters SELECT * FROM _new_clusters")
        con.unregister("_new_clusters")
    return run_id


def check_plot_path(path: str | Path) -> None:
    """Refuse, before any work, a figure path matplotlib cannot write: no or an unknown
    format suffix, a format this machine cannot render (``.pgf`` without LaTeX), a folder, or
    a parent that is a file."""
    import io

    from matplotlib.figure import Figure

    path = Path(path)
    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(
            f"plot {path}: name a figure file ending in one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    probe = Figure(figsize=(1, 1))
    probe.text(0.5, 0.5, "k")  # (text: what .pgf hands to LaTeX)
    try:  # in memory: a format needing a program this machine lacks fails here
        probe.savefig(io.BytesIO(), format=suffix)
    except Exception as exc:  # (whatever the backend raises)
        raise ValueError(f"plot {path}: .{suffix} cannot be written here ({exc})") from None
    if path.is_dir():
        raise ValueError(f"plot {path} is a folder; name a file")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"plot {path}: {parent} is not a folder")


def plot_sweep(report: ClusterReport, path: str | Path) -> Path:
    """PNG of the k sweep: inertia with the elbow, and silhouette with its best k."""
    plt = pyplot()
    ks = [s["k"] for s in report.sweep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ks, [s["inertia"] for s in report.sweep], marker=".")
    a.set(xlabel="k", ylabel="inertia", title=f"elbow (kneedle): k = {report.elbow_k}")
    b.plot(ks, [np.nan if s["silhouette"] is None else s["silhouette"] for s in report.sweep],
           marker=".", color="tab:orange")  # fmt: skip
    b.set(
        xlabel="k",
        ylabel="silhouette (cosine)",
        title=f"best silhouette: k = {report.silhouette_k}",
    )
    for ax, k in ((a, report.elbow_k), (b, report.silhouette_k)):
        if k is not None:
            ax.axvline(k, color="grey", linestyle="--")
    fig.suptitle(literal(f"{report.method}, {report.items} {report.level}, {report.backbone}"))
    fig.tight_layout()
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except (OSError, RuntimeError) as exc:  # (the run itself is saved: say so, no traceback)
        raise ValueError(f"plot {out} not written: {exc}") from exc
    finally:
        plt.close(fig)
    return out
