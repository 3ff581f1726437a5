"""Commands that explore a store beyond classification: cluster, dupes, map."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pinsearch.cli.common import (
    DEFAULT_STORE,
    BackboneOpt,
    JsonOpt,
    StoreOpt,
    app,
    console,
    emit_json,
    err_console,
    print_rows,
)


@app.command()
def cluster(
    store: StoreOpt = DEFAULT_STORE,
    backbone: BackboneOpt = None,
    method: Annotated[str, typer.Option(help="kmeans or agglomerative.")] = "kmeans",
    k: Annotated[int | None, typer.Option("-k", "--k", help="Clusters (default: choose).")] = None,
    k_min: Annotated[int | None, typer.Option(min=2, help="Least k tried (default 2).")] = None,
    k_max: Annotated[int | None, typer.Option(min=2, help="Most k tried (default 30).")] = None,
    choose: Annotated[
        str | None, typer.Option(help="elbow (kneedle) or silhouette (default elbow).")
    ] = None,
    level: Annotated[str, typer.Option(help="pins or boards.")] = "pins",
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1)] = 0,
    plot: Annotated[
        Path | None,
        typer.Option(help="Figure of the k sweep (.png, .pdf, .svg; when k is chosen, not given)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cluster pins or boards, choose k (elbow or silhouette), compare with the categories, and
    save the clusters in the catalog as proposed boards."""
    from pinsearch.clusters import ClusterConfig, check_plot_path, cluster_store, plot_sweep
    from pinsearch.store import Store

    sweep = {"--k-min": k_min, "--k-max": k_max, "--choose": choose, "--plot": plot}
    if k is not None and any(v is not None for v in sweep.values()):
        given = ", ".join(flag for flag, v in sweep.items() if v is not None)
        raise typer.BadParameter(
            f"{given}: for a sweep that chooses k, and -k gives it; leave out one or the other"
        )
    if plot is not None:
        check_plot_path(plot)  # before the work
    config = ClusterConfig(
        method=method, k=k, level=level, seed=seed,
        **{name: v for name, v in (("k_min", k_min), ("k_max", k_max), ("choose", choose))
           if v is not None},
    )  # fmt: skip
    with Store.open(store) as s:
        report = cluster_store(s, backbone, config)
    if plot is not None and report.sweep:
        try:
            report.plot = str(plot_sweep(report, plot))
        except ValueError as exc:  # (the run is saved: reported all the same)
            err_console.print(f"warning: {exc}")
    if as_json:
        emit_json(report)
        return
    silhouette = "undefined" if report.silhouette is None else f"{report.silhouette:.3f}"
    how = report.chosen_by
    if report.sweep:  # (a k given sweeps nothing)
        how += f"; elbow {report.elbow_k}, best silhouette {report.silhouette_k}"
    console.print(
        f"{report.method} on {report.items} {report.level} ({report.backbone}): k = {report.k} "
        f"({how}); "
        f"ARI {report.ari:.3f}, V-measure {report.v_measure:.3f}, purity {report.purity:.3f}, "
        f"silhouette {silhouette}; saved as run {report.run_id}"
        + (f"; sweep drawn in {report.plot}" if report.plot else "")
    )
    rows = [
        {
            "cluster": c["cluster"],
            "size": c["size"],
            "majority category": c["majority_category"],
            "purity": c["purity"],
            f"central {report.level}": ", ".join(c["central"][:3]),
        }
        for c in report.clusters
    ]
    print_rows("proposed boards", rows)


@app.command()
def dupes(
    store: StoreOpt = DEFAULT_STORE,
    backbone: BackboneOpt = None,
    threshold: Annotated[float, typer.Option(help="Cosine at or above which pins pair.")] = 0.95,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Neighbours examined per pin.")] = 20,
    top: Annotated[int, typer.Option(min=0, help="Groups shown.")] = 20,
    index: Annotated[
        str | None,
        typer.Option(help="The cosine index proposing neighbours (default: the backbone's)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of near-duplicate pins (same image re-pinned, resized, re-encoded, or the
    same object at a lower threshold)."""
    from pinsearch.dupes import find_dupes
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        report = find_dupes(s, backbone, threshold=threshold, k=k, index=index)
    if as_json:
        emit_json(report)
        return
    console.print(
        f"{len(report.groups)} groups ({report.pins_in_groups} of {report.pins} pins, "
        f"{report.pairs} pairs) at cosine >= {report.threshold} ({report.backbone}, index "
        f"{report.index})"
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
    store: StoreOpt = DEFAULT_STORE,
    out: Annotated[Path, typer.Option(help="Folder for map_<method>.png/.html.")] = Path("map"),
    backbone: BackboneOpt = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="pca and/or tsne (repeat).")
    ] = None,
    color: Annotated[str, typer.Option(help="category or cluster.")] = "category",
    sample: Annotated[int, typer.Option(min=10, help="Most pins drawn (stratified).")] = 5000,
    thumbnails: Annotated[int, typer.Option(min=0, help="Pins drawn as images (PNG).")] = 0,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1)] = 0,
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
