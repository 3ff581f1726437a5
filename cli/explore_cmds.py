"""Commands that explore a store beyond classification: cluster, dupes, map."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pinsearch.cli.common import (
    JsonOpt,
    StoreOpt,
    app,
    console,
    emit_json,
    print_rows,
)


@app.command()
def cluster(
    store: StoreOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    method: Annotated[str, typer.Option(help="kmeans or agglomerative.")] = "kmeans",
    k: Annotated[int | None, typer.Option("-k", "--k", help="Clusters (default: choose).")] = None,
    k_min: Annotated[int, typer.Option(min=2)] = 2,
    k_max: Annotated[int, typer.Option(min=2)] = 30,
    choose: Annotated[str, typer.Option(help="elbow (kneedle) or silhouette.")] = "elbow",
    level: Annotated[str, typer.Option(help="pins or boards.")] = "pins",
    seed: Annotated[int, typer.Option()] = 0,
    plot: Annotated[
        Path | None, typer.Option(help="PNG of the k sweep (when k is chosen, not given).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cluster pins or boards, choose k (elbow or silhouette), compare with the categories, and
    save the clusters in the catalog as proposed boards."""
    from pinsearch.clusters import ClusterConfig, cluster_store, plot_sweep
    from pinsearch.store import Store

    if plot is not None and k is not None:
        raise typer.BadParameter("--plot draws the sweep that chooses k: leave out -k")
    config = ClusterConfig(
        method=method, k=k, k_min=k_min, k_max=k_max, choose=choose, level=level, seed=seed
    )
    with Store.open(store) as s:
        report = cluster_store(s, backbone, config)
    if plot is not None and report.sweep:
        plot_sweep(report, plot)
    if as_json:
        emit_json(report)
        return
    console.print(
        f"{report.method} on {report.items} {report.level} ({report.backbone}): k = {report.k} "
        f"({report.chosen_by}; elbow {report.elbow_k}, best silhouette {report.silhouette_k}); "
        f"ARI {report.ari:.3f}, V-measure {report.v_measure:.3f}, purity {report.purity:.3f}, "
        f"silhouette {report.silhouette:.3f}; saved as run {report.run_id}"
    )
    rows = [
        {
            "cluster": c["cluster"],
            "size": c["size"],
            "majority category": c["majority_category"],
            "purity": c["purity"],
            "central pins": ", ".join(c["central"][:3]),
        }
        for c in report.clusters
    ]
    print_rows("proposed boards", rows)


@app.command()
def dupes(
    store: StoreOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine at or above which pins pair.")] = 0.95,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Neighbours examined per pin.")] = 20,
    top: Annotated[int, typer.Option(min=0, help="Groups shown.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of near-duplicate pins (same image re-pinned, resized, re-encoded, or the
    same object at a lower threshold)."""
    from pinsearch.dupes import find_dupes
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        report = find_dupes(s, backbone, threshold=threshold, k=k)
    if as_json:
        emit_json(report)
        return
    console.print(
        f"{len(report.groups)} groups ({report.pins_in_groups} of {report.pins} pins, "
        f"{report.pairs} pairs) at cosine >= {report.threshold} ({report.backbone})"
    )
    rows = [
        {
            "size": g.size,
            "boards": g.boards,
            "min sim": g.min_similarity,
            "pins": ", ".join(f"{p['pin_id']} ({p['title'] or p['category']})" for p in g.pins[:4]),
        }
        for g in report.groups[:top]
    ]
    print_rows("near-duplicate groups", rows)


@app.command(name="map")
def map_(
    store: StoreOpt,
    out: Annotated[Path, typer.Option(help="Folder for map_<method>.png/.html.")] = Path("map"),
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="pca and/or tsne (repeat).")
    ] = None,
    color: Annotated[str, typer.Option(help="category or cluster.")] = "category",
    sample: Annotated[int, typer.Option(min=10, help="Most pins drawn (stratified).")] = 5000,
    thumbnails: Annotated[int, typer.Option(min=0, help="Pins drawn as images (PNG).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Draw the pins in 2-D (PCA, t-SNE), coloured by category or cluster: PNG + HTML."""
    from pinsearch.maps import PROJECTIONS, MapConfig, draw_map
    from pinsearch.store import Store

    config = MapConfig(
        methods=tuple(method or PROJECTIONS), color=color, sample=sample,
        thumbnails=thumbnails, seed=seed,
    )  # fmt: skip
    with Store.open(store, read_only=True) as s:
        report = draw_map(s, out, backbone, config)
    if as_json:
        emit_json(report)
        return
    console.print(
        f"{report.pins} of {report.total} pins ({report.backbone}, PCA explains "
        f"{sum(report.explained_variance):.1%}) in {report.seconds:.1f} s:"
    )
    for f in report.files:
        console.print(f"  {f}")
