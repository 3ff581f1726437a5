"""``pinsearch map``: the pins of a backbone drawn in 2-D (PCA and t-SNE), as PNG and HTML.

PCA is exact and fast; t-SNE (scikit-learn, cosine, after PCA to 50 dimensions) shows local
neighbourhoods. Large stores are drawn from a stratified sample (``sample`` pins, every category
kept). Points are coloured by category or by the clusters of a ``pinsearch cluster`` run; with
``thumbnails`` the PNG also shows small images of a sample of pins at their positions. The HTML
is one self-contained file (inline SVG, a title per point: pin id, category, title) that any
browser opens offline.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.clusters import check_seed
from pinsearch.plots import literal, pyplot
from pinsearch.store import Store
from pinsearch.vectors import in_sorted, unit_rows

__all__ = ["MapConfig", "MapReport", "draw_map", "embed_2d"]

PROJECTIONS = ("pca", "tsne")


@dataclass
class MapConfig:
    methods: tuple[str, ...] = PROJECTIONS
    color: str = "category"  # category, or cluster (the latest cluster run of the backbone)
    sample: int = 5000  # most pins drawn (stratified by category)
    thumbnails: int = 0  # pins drawn as small images on the PNG
    perplexity: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in PROJECTIONS]
        if bad or not self.methods:
            raise ValueError(f"methods must be among {PROJECTIONS}, got {self.methods}")
        if self.color not in ("category", "cluster"):
            raise ValueError(f"color must be category or cluster, got {self.color!r}")
        if self.sample < 2 or self.thumbnails < 0 or not self.perplexity > 0:
            raise ValueError(
                f"need sample >= 2, thumbnails >= 0 and perplexity > 0, got {self.sample}, "
                f"{self.thumbnails}, {self.perplexity}"
            )
        check_seed(self.seed)
        self.methods = tuple(dict.fromkeys(self.methods))  # each drawn once


@dataclass
class MapReport:
    store: str
    backbone: str
    pins: int  # drawn
    total: int  # in the store
    color: str
    files: list[str] = field(default_factory=list)
    explained_variance: list[float] = field(default_factory=list)  # of the 2 PCA axes
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed_2d(x: np.ndarray, method: str, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of unit vectors by PCA or t-SNE."""
    from sklearn.decomposition import PCA

    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))
    return TSNE(
        n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed
    ).fit_transform(reduced)


def _sample(cats: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows, stratified by category: one of each category first (of ``n``
    categories drawn at random when there are more), the rest shared in proportion to the
    categories' sizes (largest remainders), each category's rows drawn at random."""
    if len(cats) <= n:
        return np.arange(len(cats))
    rng = np.random.default_rng(seed)
    names, inverse, sizes = np.unique(cats, return_inverse=True, return_counts=True)
    take = np.zeros(len(names), np.int64)
    if len(names) >= n:
        take[rng.choice(len(names), n, replace=False)] = 1
    else:
        take[:] = 1
        share = (n - len(names)) * (sizes - 1) / (sizes - 1).sum()
        take += np.floor(share).astype(np.int64)
        left = n - int(take.sum())
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        take[order[:left]] += 1
        take = np.minimum(take, sizes)
    out = [
        rng.choice(np.flatnonzero(inverse == c), int(t), replace=False)
        for c, t in enumerate(take)
        if t
    ]
    return np.sort(np.concatenate(out))


def _colours(store: Store, backbone: str, pin_ids: list[str], cats: np.ndarray, how: str):
    if how == "category":
        return cats
    rows = store.catalog.query(
        "SELECT c.item, c.cluster FROM clusters c WHERE c.run_id = (SELECT max(run_id) FROM "
        "cluster_runs WHERE backbone = ? AND level = 'pins')",
        [backbone],
    ) if store.catalog.has_table("cluster_runs") else []  # fmt: skip
    if not rows:
        raise ValueError(
            f"no pins cluster run of {backbone!r} (--color cluster colours pins by the latest "
            "one; a boards run colours none); run pinsearch cluster --level pins first"
        )
    by_pin = {r["item"]: f"cluster {r['cluster']}" for r in rows}
    return np.array([by_pin.get(p, "unclustered") for p in pin_ids])


def draw_map(
    store: Store,
    out_dir: str | Path,
    backbone: str | None = None,
    config: MapConfig | None = None,
) -> MapReport:
    """Write ``map_<method>.png`` and ``map_<method>.html`` per projection into ``out_dir``."""
    from sklearn.decomposition import PCA

    config = config or MapConfig()
    start = time.perf_counter()
    backbone = store.resolve_backbone(backbone)
    # the sample is drawn from the keys and categories; only its vectors and rows are read
    vs = store.vectors(backbone)
    keys = vs.keys()
    pin_keys, cols = store.catalog.pin_columns("category")
    keys = keys[in_sorted(pin_keys, keys)]  # pins still in the catalog, in storage order
    cats_all = cols["category"][np.searchsorted(pin_keys, keys)]
    pick = _sample(cats_all, config.sample, config.seed)
    least = 3 if "tsne" in config.methods else 2  # (t-SNE: a perplexity below the pins)
    if len(pick) < least:
        raise ValueError(
            f"a {'t-SNE ' if least == 3 else ''}map needs at least {least} pins with a "
            f"{backbone!r} vector; {len(pick)} drawn of the store's {len(keys)}"
        )
    vectors, _ = vs.load(keys[pick])  # rows in the order asked
    x = unit_rows(vectors)
    if not (x != x[0]).any():  # no spread: PCA's ratios are NaN and t-SNE crashes
        raise ValueError(
            f"the {len(pick)} pins drawn all have the same {backbone!r} vector (copies of one "
            "image): there is nothing to lay out"
        )
    meta = store.catalog.pins_by_key(keys[pick].tolist())
    pins = [meta[int(k)] for k in keys[pick]]
    labels = _colours(store, backbone, [p["pin_id"] for p in pins], cats_all[pick], config.color)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = MapReport(str(store.root), backbone, len(pick), len(keys), config.color)
    pca = PCA(n_components=2, random_state=config.seed).fit(x)
    report.explained_variance = [round(float(v), 4) for v in pca.explained_variance_ratio_]
    for method in config.methods:
        if method == "pca":
            xy = pca.transform(x)
        else:
            xy = embed_2d(x, method, perplexity=config.perplexity, seed=config.seed)
        title = f"{backbone}: {len(pick)} pins, {method.upper()}, coloured by {config.color}"
        png = out / f"map_{method}.png"
        _png(xy, labels, pins, png, title, config)
        page = out / f"map_{method}.html"
        _html(xy, labels, pins, page, title)
        report.files += [str(png), str(page)]
    report.seconds = time.perf_counter() - start
    return report


def _palette(labels: np.ndarray) -> dict[str, str]:
    import matplotlib

    names = sorted(set(labels.tolist()))
    cmap = matplotlib.colormaps["tab20"] if len(names) <= 20 else matplotlib.colormaps["hsv"]
    return {
        # hsv is a circle: n steps of 1/n, so the last colour is not the first one again
        n: matplotlib.colors.to_hex(cmap(i / len(names) if len(names) > 20 else i))
        for i, n in enumerate(names)
    }


def _png(
    xy: np.ndarray, labels: np.ndarray, pins: list[dict[str, Any]], path: Path, title: str,
    config: MapConfig,
) -> None:  # fmt: skip
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    plt = pyplot()
    colours = _palette(labels)
    fig, ax = plt.subplots(figsize=(11, 8))
    for name, colour in colours.items():
        sel = labels == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colour, label=literal(name), alpha=0.75)
    if config.thumbnails:
        from pinsearch.images import ImageError, load_rgb

        rng = np.random.default_rng(config.seed)
        for i in rng.choice(len(pins), min(config.thumbnails, len(pins)), replace=False):
            try:
                img = load_rgb(pins[i]["path"], min_side=48)
            except (ImageError, OSError):
                continue
            img.thumbnail((40, 40))
            box = AnnotationBbox(OffsetImage(np.asarray(img), zoom=0.6), xy[i], frameon=False)
            ax.add_artist(box)
    ax.set_title(literal(title))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html(
    xy: np.ndarray, labels: np.ndarray, pins: list[dict[str, Any]], path: Path, title: str
) -> None:
    colours = _palette(labels)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pts = (xy - lo) / span * 760 + 20
    pts[:, 1] = 800 - pts[:, 1]  # SVG's y grows downwards: up as in the PNG

    def hover(p: dict[str, Any], lab: str) -> str:  # pin id | category | title (| cluster)
        parts = [p["pin_id"], p.get("category") or "", p.get("title") or ""]
        parts += [lab] if lab != parts[1] else []
        return " | ".join(html.escape(str(part)) for part in parts)

    circles = "\n".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colours[str(lab)]}">'
        f"<title>{hover(p, str(lab))}</title></circle>"
        for (x, y), lab, p in zip(pts.tolist(), labels.tolist(), pins)
    )
    legend = " ".join(
        f'<span style="color:{c}">&#9679; {html.escape(n)}</span>' for n, c in colours.items()
    )
    path.write_text(
        "<!doctype html><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><h3>{html.escape(title)}</h3>"
        f"<p style='font:12px sans-serif'>{legend}</p>"
        f"<svg width='800' height='800' style='border:1px solid #ccc'>{circles}</svg>",
        encoding="utf-8",
    )
