"""The ``pinsearch`` command line: parse options, build configs, call the library, print.

Every command that reports something takes ``--json`` and then prints one JSON document
(schemas in the README). Library defaults live in the config dataclasses: options left unset
here are not passed on.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pinsearch._version import __version__
from pinsearch.errors import PinsearchError

__all__ = ["app", "main"]

app = typer.Typer(
    name="pinsearch",
    help="Vector-database retrieval for Pinterest-style image collections.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]


def _config(cls: type[T], **overrides: Any) -> T:
    """Build a config dataclass from the options the user actually set."""
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def _emit_json(obj: Any) -> None:
    data = asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _progress(enabled: bool) -> Any:
    """A rich progress bar with images/s and ETA, as a (callback, context) pair."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled,
    )
    task = bar.add_task("embed", total=None, rate="-")

    def update(done: int, total: int) -> None:
        speed = bar.tasks[task].speed
        bar.update(task, completed=done, total=total, rate=f"{speed:.1f}" if speed else "-")

    return update, bar


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug")
    ] = 0,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print the pinsearch version."""
    console.print(__version__)


@app.command()
def index(
    corpus: Annotated[
        Path | None, typer.Argument(help="Tree, image folder or CSV/Parquet manifest.")
    ] = None,
    store: StoreOpt = Path("pinsearch-store"),
    backbone: Annotated[str, typer.Option("--backbone", "-b")] = "effnet_lite0",
    fmt: Annotated[
        str | None, typer.Option("--format", help="auto, tree, folder, manifest")
    ] = None,
    per_category: Annotated[int | None, typer.Option(help="Sample N pins per category.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    keep_excluded: Annotated[
        bool, typer.Option(help="Keep the categories 'none' and 'other'.")
    ] = False,
    categories: Annotated[
        str | None, typer.Option(help="Comma-separated categories to keep (others skipped).")
    ] = None,
    allow_outside_root: Annotated[
        bool, typer.Option(help="Manifests: accept paths outside the corpus root.")
    ] = False,
    weights: Annotated[str | None, typer.Option(help="Local checkpoint for the backbone.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Stored dtype: float32 or float16.")] = None,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory string (Flat, IVF1024,Flat, HNSW32) or auto.")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="cosine, ip, l2 or l1.")] = None,
    index_device: Annotated[str | None, typer.Option(help="Index on auto, cpu or gpu.")] = None,
    index_name: Annotated[str | None, typer.Option(help="Defaults to the backbone name.")] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the index from all vectors.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a corpus, embed new pins with a backbone, and build or update its FAISS index."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.ingest import IngestConfig
    from pinsearch.pipeline import index_corpus

    ingest_cfg = _config(
        IngestConfig,
        format=fmt,
        per_category=per_category,
        seed=seed,
        drop_categories=() if keep_excluded else None,
        categories=tuple(c.strip() for c in categories.split(",")) if categories else None,
        allow_outside_root=allow_outside_root or None,
    )
    embed_cfg = _config(
        EmbedConfig,
        weights=weights,
        batch_size=batch_size,
        workers=workers,
        device=device,
        normalize=normalize,
        dtype=dtype,
    )
    index_opts = {
        k: v
        for k, v in {"factory": factory, "metric": metric, "device": index_device}.items()
        if v is not None
    }
    update, bar = _progress(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = index_corpus(
            corpus,
            store,
            backbone=backbone,
            ingest=ingest_cfg,
            embed=embed_cfg,
            index=index_opts,
            index_name=index_name,
            rebuild=rebuild,
            progress=update,
        )
    if as_json:
        _emit_json(report)
        return
    table = Table(title=f"indexed into {report.store}", show_header=False)
    for key, value in report.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def add(
    corpus: Annotated[Path, typer.Argument(help="Tree, image folder or manifest with new pins.")],
    store: StoreOpt,
    fmt: Annotated[
        str | None, typer.Option("--format", help="auto, tree, folder, manifest")
    ] = None,
    allow_outside_root: Annotated[
        bool, typer.Option(help="Manifests: accept paths outside the corpus root.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    batch_size: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add new pins or boards to an existing store: only they are embedded, for every backbone
    of the store, and every index is updated; heads are marked stale."""
    from pinsearch.edit import add_corpus
    from pinsearch.ingest import IngestConfig

    ingest_cfg = _config(IngestConfig, format=fmt, allow_outside_root=allow_outside_root or None)
    update, bar = _progress(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = add_corpus(
            corpus, store, ingest=ingest_cfg, device=device, batch_size=batch_size,
            workers=workers, progress=update,
        )  # fmt: skip
    if as_json:
        _emit_json(report)
        return
    console.print(
        f"added {report.added} pins ({report.skipped} skipped, {report.already_present} already "
        f"there) to {report.store} in {report.seconds:.1f} s"
    )
    for b in report.backbones:
        console.print(f"  {b['backbone']}: embedded {b['embedded']}, index {b['index_action']}")
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def remove(
    store: StoreOpt,
    pin: Annotated[list[str] | None, typer.Option("--pin", help="Pin id (repeat).")] = None,
    board: Annotated[list[str] | None, typer.Option("--board", help="Board key (repeat).")] = None,
    user: Annotated[list[str] | None, typer.Option("--user", help="User id (repeat).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove pins, boards or users with their vectors and index entries."""
    from pinsearch.edit import remove_pins
    from pinsearch.store import Store

    with Store.open(store) as s:
        report = remove_pins(s, pin_ids=pin or [], boards=board or [], users=user or [])
    if as_json:
        _emit_json(report)
        return
    console.print(
        f"removed {report.pins} pins ({report.boards} boards, {report.users} users) from "
        f"{report.store}: vectors {report.vectors}; indexes rebuilt {report.indexes}"
    )
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def check(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Verify a store: vectors, indexes, heads, alignments, ingest counts. Exit 1 on errors."""
    from pinsearch.check import check_store

    report = check_store(store)
    _show_check(report, as_json)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def repair(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Rebuild derived indexes from the stored vectors and drop what cannot be trusted."""
    from pinsearch.check import repair_store

    report = repair_store(store)
    if as_json:
        _emit_json(report)
    else:
        for action in report.actions or ["nothing to repair"]:
            console.print(action)
        assert report.after is not None
        _show_check(report.after, False)
    if report.after is not None and not report.after.ok:
        raise typer.Exit(1)


def _show_check(report: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(report)
        return
    status = "[green]ok[/green]" if report.ok else "[red]errors[/red]"
    counts = ", ".join(f"{v} {k}" for k, v in report.checked.items())
    console.print(f"{report.store}: {status} ({report.pins} pins; checked {counts})")
    for f in report.findings:
        colour = "red" if f.level == "error" else "yellow"
        console.print(f"[{colour}]{f.level}[/{colour}] {f.where}: {f.problem}: {f.detail}")


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
    plot: Annotated[Path | None, typer.Option(help="PNG of the k sweep.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cluster pins or boards, choose k (elbow or silhouette), compare with the categories, and
    save the clusters in the catalog as proposed boards."""
    from pinsearch.clusters import ClusterConfig, cluster_store, plot_sweep
    from pinsearch.store import Store

    config = ClusterConfig(
        method=method, k=k, k_min=k_min, k_max=k_max, choose=choose, level=level, seed=seed
    )
    with Store.open(store) as s:
        report = cluster_store(s, backbone, config)
    if plot is not None and report.sweep:
        plot_sweep(report, plot)
    if as_json:
        _emit_json(report)
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
    _print_rows("proposed boards", rows)


@app.command()
def dupes(
    store: StoreOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine at or above which pins pair.")] = 0.95,
    k: Annotated[int, typer.Option(min=1, help="Neighbours examined per pin.")] = 20,
    top: Annotated[int, typer.Option(help="Groups shown.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of near-duplicate pins (same image re-pinned, resized, re-encoded, or the
    same object at a lower threshold)."""
    from pinsearch.dupes import find_dupes
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        report = find_dupes(s, backbone, threshold=threshold, k=k)
    if as_json:
        _emit_json(report)
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
    _print_rows("near-duplicate groups", rows)


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
        _emit_json(report)
        return
    console.print(
        f"{report.pins} of {report.total} pins ({report.backbone}, PCA explains "
        f"{sum(report.explained_variance):.1%}) in {report.seconds:.1f} s:"
    )
    for f in report.files:
        console.print(f"  {f}")


TextOpt = Annotated[
    str | None, typer.Option("--text", "-t", help="Text query (CLIP tower or pinsearch align).")
]


@app.command()
def query(
    store: StoreOpt,
    pin: Annotated[str | None, typer.Option("--pin", help="A stored pin id.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="A new image file.")] = None,
    text: TextOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    board: Annotated[str | None, typer.Option(help="Only pins of this board.")] = None,
    user: Annotated[str | None, typer.Option(help="Only pins of this user.")] = None,
    category: Annotated[str | None, typer.Option(help="Only pins of this category.")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    index_name: Annotated[str | None, typer.Option("--index")] = None,
    classify: Annotated[
        bool, typer.Option("--classify", help="Predict the category with a stored head.")
    ] = False,
    head: Annotated[str | None, typer.Option(help="Head name for --classify.")] = None,
    boards: Annotated[
        bool, typer.Option("--boards", help="With --text: rank boards, each with its best pins.")
    ] = False,
    per_board: Annotated[int, typer.Option(min=1, help="Pins shown (and scored) per board.")] = 3,
    board_score: Annotated[str, typer.Option(help="Board score: topm or centroid.")] = "topm",
    mode: Annotated[
        str, typer.Option(help="With --text: match pin images, titles, or fused.")
    ] = "image",
    alpha: Annotated[float, typer.Option(help="Image weight of --mode fused.")] = 0.5,
    titles: Annotated[
        list[str] | None,
        typer.Option("--titles", help="Candidate title to rank for --pin/--image (repeat)."),
    ] = None,
    titles_file: Annotated[
        Path | None, typer.Option(help="Candidate titles, one per line.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find pins like a stored pin, a new image or a text; rank boards for a text; rank
    candidate titles for a pin; or classify a pin."""
    from pinsearch.store import Store

    if sum(x is not None for x in (pin, image, text)) != 1:
        raise typer.BadParameter("give exactly one of --pin, --image or --text")
    if image is not None and not image.is_file():
        raise typer.BadParameter(f"image {image} does not exist", param_hint="--image")
    candidates = list(titles or [])
    if titles_file is not None:
        lines = titles_file.read_text(encoding="utf-8").splitlines()
        candidates += [line.strip() for line in lines if line.strip()]
    if classify:
        _classify(store, pin, image, head, k, as_json)
        return
    with Store.open(store, read_only=True) as s:
        if text is not None or candidates:
            from pinsearch.textsearch import TextSearcher

            searcher: Any = TextSearcher(s, backbone=backbone, index=index_name)
        else:
            from pinsearch.search import PinSearcher

            searcher = PinSearcher(s, backbone=backbone, index=index_name)
        filters = {"board": board, "user": user, "category": category}
        if candidates:
            if text is not None:
                raise typer.BadParameter("--titles ranks texts for a --pin or --image")
            _show_titles(searcher.rank_texts(candidates, pin_id=pin, image=image), as_json)
            return
        if boards:
            if text is None:
                raise typer.BadParameter("--boards needs --text")
            found = searcher.search_boards(
                text, k, per_board=per_board, score=board_score, user=user, category=category
            )
            _show_boards(found, as_json)
            return
        if text is not None:
            result = searcher.search_text(text, k, mode=mode, alpha=alpha, **filters)
        elif pin is not None:
            result = searcher.similar_to_pin(pin, k, **filters)
        else:
            result = searcher.similar_to_image(image, k, **filters)
    if as_json:
        _emit_json(result)
        return
    what = f"pin {pin}" if pin else f"image {image}" if image else f"text {text!r}"
    _hits_table(
        f"{len(result.hits)} pins like {what} ({result.backbone}, {result.metric})", result.hits
    )


def _hits_table(title: str, hits: list[Any]) -> None:
    table = Table(title=title)
    for col in ("rank", "score", "pin_id", "title", "board", "category", "path"):
        table.add_column(col, overflow="fold")
    for h in hits:
        table.add_row(
            str(h.rank), f"{h.score:.4f}", h.pin_id, h.title, h.board_name, h.category, h.path
        )
    console.print(table)


def _show_boards(result: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(result)
        return
    table = Table(title=f"boards for {result.query['text']!r} ({result.score}, {result.backbone})")
    for col in ("rank", "score", "board", "user", "category", "pins", "best pins"):
        table.add_column(col, overflow="fold")
    for b in result.boards:
        best = "; ".join(f"{p.pin_id} {p.title}" for p in b.pins)
        table.add_row(
            str(b.rank), f"{b.score:.4f}", b.board_name, b.user or "", b.category or "",
            str(b.pins_in_board), best,
        )  # fmt: skip
    console.print(table)


def _show_titles(result: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(result)
        return
    what = result.query.get("pin_id") or result.query.get("image")
    table = Table(title=f"titles for {what} ({result.text_encoder})")
    for col in ("rank", "score", "text"):
        table.add_column(col, overflow="fold")
    for m in result.matches:
        table.add_row(str(m.rank), f"{m.score:.4f}", m.text)
    console.print(table)


@app.command()
def align(
    store: StoreOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    captions: Annotated[
        Path | None,
        typer.Option(help="CSV of image (or path, pin_id) + caption; default: pin titles."),
    ] = None,
    text_model: Annotated[
        str | None, typer.Option(help="Sentence model: minilm (bundled) or a local folder.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    dim: Annotated[
        int | None, typer.Option(min=0, help="Joint space size (0: the image space itself).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    from_store: Annotated[
        Path | None,
        typer.Option("--from", help="Copy the alignment of another store (same backbone)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn text search for an image backbone from the store's own pins (LiT-style), or
    reuse another store's alignment (--from)."""
    from pinsearch.align import AlignConfig, align_store, copy_alignment
    from pinsearch.store import Store

    if captions is not None and not captions.is_file():
        raise typer.BadParameter(f"captions file {captions} does not exist")
    config = _config(
        AlignConfig, text_model=text_model, epochs=epochs, dim=dim, device=device, seed=seed
    )
    with Store.open(store) as s:
        if from_store is not None:
            with Store.open(from_store, read_only=True) as src:
                report = copy_alignment(src, s, backbone)
        else:
            report = align_store(s, backbone, config, captions=captions)
    if as_json:
        _emit_json(report)
        return
    val = report.val
    if from_store is not None:
        console.print(
            f"copied the {report.text_model} -> {report.backbone} alignment of {from_store} "
            f"(trained on {report.pairs} texts of {report.images} images)"
        )
    else:
        console.print(
            f"aligned {report.text_model} -> {report.backbone} on {report.pairs} texts of "
            f"{report.images} pins ({report.source}; {report.unmatched} unmatched) in "
            f"{report.seconds:.1f} s, best epoch {report.best_epoch + 1}/{report.epochs}"
        )
    if val:
        console.print(
            "its held-out images: "
            + ", ".join(f"R@{k} {val[f'recall@{k}']:.3f}" for k in (1, 5, 10))
            + f" (chance R@10 {val['chance_recall@10']:.3f})"
        )
    console.print(f"title vectors: {report.title_vectors} pins")


def _classify(
    store: Path, pin: str | None, image: Path | None, head: str | None, top: int, as_json: bool
) -> None:
    from pinsearch.classify import classify
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        result = classify(s, pin_id=pin, image=image, head=head, top=top)
    if as_json:
        _emit_json(result)
        return
    console.print(f"[bold]{result.predicted}[/bold] (head {result.head}, {result.backbone})")
    _print_rows("class scores", result.scores)


@app.command()
def train(
    store: StoreOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b")] = None,
    head: Annotated[str, typer.Option(help="knn, lsvm, mlp, ...")] = "lsvm",
    param: Annotated[
        list[str] | None, typer.Option(help="Hyperparameter NAME=VALUE (JSON value), repeatable.")
    ] = None,
    label: Annotated[str, typer.Option(help="category, or a key of the pins' extra fields.")] = (
        "category"
    ),
    name: Annotated[str | None, typer.Option(help="Defaults to <backbone>/<head>.")] = None,
    normalize: Annotated[bool, typer.Option(help="L2-normalise vectors first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a classification head on a backbone's stored vectors and keep it in the store."""
    from pinsearch.classify import train_head
    from pinsearch.store import Store

    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    with Store.open(store) as s:
        info_ = train_head(
            s, backbone or s.resolve_backbone(None), head, params, label=label, name=name,
            normalize=normalize,
        )  # fmt: skip
    if as_json:
        _emit_json(info_)
        return
    console.print(
        f"trained head [bold]{info_.name}[/bold] ({info_.head} {info_.params}) on "
        f"{info_.n_train} pins, {len(info_.classes)} classes of {info_.label!r}"
    )


@app.command()
def info(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Counts per category and board, backbones, indexes, and skipped pins with reasons."""
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        report = s.info()
    if as_json:
        _emit_json(report)
        return
    console.print(
        f"[bold]{report.path}[/bold]: {report.pins} pins, {report.boards} boards, "
        f"{report.users} users, {len(report.categories)} categories, {report.skipped} skipped"
    )
    _print_rows("categories", report.categories)
    _print_rows("embeddings", report.embeddings)
    _print_rows("indexes", report.indexes)
    _print_rows("heads", report.heads)
    _print_rows("text alignments", report.alignments)
    _print_rows("skipped pins by reason", report.skipped_by_reason)
    _print_rows("ingests", report.ingests)


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


@app.command()
def backbones(
    pattern: Annotated[str, typer.Argument(help="Shell pattern on names.")] = "*",
    as_json: JsonOpt = False,
) -> None:
    """The backbone registry: name, source, dim, input size, weights available offline."""
    from pinsearch.backbones import list_backbones, weights_available_offline

    rows = []
    for spec in list_backbones(pattern):
        rows.append(
            {
                "name": spec.name,
                "source": spec.source,
                "arch": spec.arch,
                "dim": spec.dim,
                "input_size": _input_size(spec),
                "offline": weights_available_offline(spec),
                "paper": spec.paper,
                "description": spec.description,
            }
        )
    if as_json:
        _emit_json(rows)
        return
    short = [
        {k: r[k] for k in ("name", "source", "dim", "input_size", "offline", "paper")} for r in rows
    ]
    note = "any timm model works too, as timm:<name>; any OpenCLIP model as clip:<model>:<tag>"
    _print_rows(f"backbones ({note})", short)


def _input_size(spec: Any) -> int | None:
    if spec.source == "classic":
        return 224
    if spec.source == "open_clip":
        from pinsearch.clip import clip_input_size

        return clip_input_size(spec)
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.arch)
        return int(cfg.input_size[-1]) if cfg is not None else None
    except Exception:
        return None


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where to write the corpus and store (default: a temp dir).")
    ] = None,
    backbone: Annotated[str, typer.Option("--backbone", "-b")] = "effnet_lite0",
    k: Annotated[int, typer.Option("-k", "--k", min=1)] = 5,
    text: Annotated[
        bool, typer.Option("--text/--no-text", help="Also learn and show text search.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Offline tour: generate a Pinterest-style corpus, index it with real weights, query it
    by pin and by text."""
    from pinsearch.demo import run_demo

    folder = workdir or Path(tempfile.mkdtemp(prefix="pinsearch-demo-"))
    update, bar = _progress(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = run_demo(folder, backbone=backbone, k=k, progress=update, text=text)
    if as_json:
        _emit_json(report)
        return
    idx = report.index
    console.print(
        f"[bold]pinsearch demo[/bold]: {report.pins} pins in {len(report.categories)} categories "
        f"-> {report.store}\n{report.backbone} ({idx['images_per_s']} img/s), index "
        f"{idx['factory']} / {idx['metric']}, {idx['ntotal']} vectors"
    )
    for ex in report.examples:
        _print_rows(f"pins like {ex['query']}", ex["hits"])
    console.print(
        f"leave-one-out {report.knn_k}-NN category accuracy: [bold]{report.knn_accuracy:.3f}[/bold]"
        f" (chance {report.chance:.3f})"
    )
    for ex in report.text_examples:
        _print_rows(f"pins matching the text {ex['query']!r}", ex["hits"])
    if report.text_encoder:
        console.print(
            f"text search ({report.text_encoder}, learned from the pins' titles): asking each "
            f"category's name, [bold]{report.text_precision:.3f}[/bold] of the top {report.knn_k}"
            f" are in that category (chance {1 / max(len(report.categories), 1):.3f})"
        )
    console.print(
        f"try: pinsearch query --store {report.store} --pin {report.examples[0]['query']} -k 5"
    )
    if report.text_encoder:
        console.print(f'     pinsearch query --store {report.store} --text "a red car" --boards')


@app.command()
def evaluate(
    study: Annotated[Path, typer.Argument(help="Study TOML file (see eval/studies/).")],
    store: Annotated[
        Path | None, typer.Option("--store", "-s", help="Overrides the study's.")
    ] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus to index first (overrides).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default eval/results/NAME).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Heads on auto, cpu or cuda.")] = None,
    n_jobs: Annotated[int | None, typer.Option(help="Parallel CV fits.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run (or resume) a study: macro-F1 of every backbone x head cell, or text-to-image
    recall@k for a retrieval study (kind = "retrieval"); then a report."""
    from pinsearch.eval.retrieval import RetrievalConfig
    from pinsearch.eval.study import evaluate as run_evaluate
    from pinsearch.eval.study import load_study

    config = load_study(
        study,
        store=str(store) if store else None,
        corpus=str(corpus) if corpus else None,
        device=device,
        n_jobs=n_jobs,
    )
    if isinstance(config, RetrievalConfig):
        _retrieval(config, out, as_json)
        return
    from pinsearch.eval.openset import OpenSetConfig

    if isinstance(config, OpenSetConfig):
        _openset(config, out, as_json)
        return
    from pinsearch.eval.compact import CompactConfig, run_compact

    if isinstance(config, CompactConfig):
        summary = run_compact(config, out)
        if as_json:
            _emit_json(summary)
        else:
            _print_rows(f"compact vectors: {config.name}", summary["results"])
            console.print(f"report: {summary['report']}")
        return

    def show(cell: Any) -> None:
        if not as_json:
            tag = " (done before)" if cell.resumed else ""
            err_console.print(
                f"{cell.backbone} + {cell.head}: macro-F1 {cell.test_macro_f1:.3f} "
                f"(CV {cell.cv_mean:.3f} ± {cell.cv_std:.3f}) {cell.best_params}{tag}"
            )

    update, bar = _progress(enabled=not as_json and sys.stderr.isatty())
    with bar:
        summary = run_evaluate(config, out, on_cell=show, embed_progress=update)
    if as_json:
        _emit_json(summary)
        return
    from pinsearch.eval.report import markdown_table

    heads = list(config.heads)
    console.print(markdown_table(summary["macro_f1"], heads))
    console.print(f"report: {summary['report']}")


def _openset(config: Any, out: Path | None, as_json: bool) -> None:
    from pinsearch.eval.openset import run_openset

    summary = run_openset(config, out)
    if as_json:
        _emit_json(summary)
        return
    rows = [
        {k: r[k] for k in ("backbone", "head", "known_macro_f1", "closed_macro_f1",
                           "open_macro_f1", "auroc_unknown", "known_accepted",
                           "unknown_rejected")}
        for r in summary["results"]
    ]  # fmt: skip
    _print_rows(f"open set: {config.name} ({config.splits} splits)", rows)
    console.print(f"report: {summary['report']}")


def _retrieval(config: Any, out: Path | None, as_json: bool) -> None:
    from pinsearch.eval.retrieval import run_retrieval

    summary = run_retrieval(config, out)
    if as_json:
        _emit_json(summary)
        return
    table = Table(title=f"text-to-image retrieval: {config.name} ({summary['test_images']} images)")
    for col in ("backbone", "text encoder", *(f"R@{k}" for k in config.ks), "median rank"):
        table.add_column(col)
    for backbone, r in summary["results"].items():
        m = r["metrics"]
        table.add_row(
            backbone,
            r["text"],
            *(f"{m[f'recall@{k}']:.3f}" for k in config.ks),
            f"{m['median_rank']:.0f}",
        )
    console.print(table)
    console.print(f"report: {summary['report']}")


@app.command()
def bench(
    what: Annotated[str, typer.Argument(help="embed, index, query, study, text or dupes")],
    backbone: Annotated[str, typer.Option("--backbone", "-b")] = "effnet_lite0",
    n: Annotated[int | None, typer.Option(help="Images (embed) or vectors (index, query).")] = None,
    dim: Annotated[int, typer.Option(help="Vector dimension (index, query).")] = 768,
    batch_size: Annotated[int, typer.Option()] = 64,
    factory: Annotated[
        list[str] | None, typer.Option(help="Factory strings to compare (index).")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    corpus: Annotated[Path | None, typer.Option(help="Real photos (dupes).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Benchmarks that print numbers: embed (end-to-end vs bare forward), index, query, study
    (the paper's grid, pinsearch heads vs scikit-learn), text (text and board query latency),
    dupes (near-copy precision and recall on real photos)."""
    from pinsearch.eval import bench as b

    if what == "embed":
        result: Any = b.bench_embed(backbone, n=n or 256, batch_size=batch_size, device=device)
    elif what == "index":
        result = b.bench_index(n=n or 100_000, dim=dim, factories=factory or None)
    elif what == "query":
        result = b.bench_query(n=n or 100_000, dim=dim)
    elif what == "study":
        result = b.bench_study(n=n or 4000, dim=dim, device=device)
    elif what == "text":
        result = b.bench_text(n=n or 100_000, dim=dim)
    elif what == "dupes":
        if corpus is None:
            raise typer.BadParameter("bench dupes needs --corpus (a folder or manifest of photos)")
        result = b.bench_dupes(corpus, n=n or 200, backbone=backbone)
    else:
        raise typer.BadParameter(
            f"unknown benchmark {what!r}; expected embed, index, query, study, text or dupes"
        )
    if as_json:
        _emit_json(result)
        return
    console.print(b.format_result(result))


def main() -> None:
    """Entry point: turns pinsearch errors into a one-line message and exit code 1."""
    try:
        app()
    except (PinsearchError, ValueError, FileNotFoundError, FileExistsError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
