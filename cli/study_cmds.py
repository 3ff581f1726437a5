"""Studies, benchmarks and the tour: backbones, demo, evaluate, bench."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pinsearch.cli.common import (
    CpuShareOpt,
    JsonOpt,
    app,
    console,
    emit_json,
    err_console,
    given_flags,
    print_rows,
    progress_bar,
)


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
        emit_json(rows)
        return
    if not rows:
        raise ValueError(f"no registered backbone matches {pattern!r} (pinsearch backbones)")
    short = [
        {k: r[k] for k in ("name", "source", "dim", "input_size", "offline", "paper")} for r in rows
    ]
    note = "any timm model works too, as timm:<name>; any OpenCLIP model as clip:<model>:<tag>"
    print_rows(f"backbones ({note})", short)


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
    update, bar = progress_bar(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = run_demo(folder, backbone=backbone, k=k, progress=update, text=text)
    if as_json:
        emit_json(report)
        return
    idx = report.index
    console.print(
        f"[bold]pinsearch demo[/bold]: {report.pins} pins in {len(report.categories)} categories "
        + escape(
            f"-> {report.store}\n{report.backbone} ({idx['images_per_s']} img/s), index "
            f"{idx['factory']} / {idx['metric']}, {idx['ntotal']} vectors"
        ),
        markup=True,
    )
    for ex in report.examples:
        print_rows(f"pins like {ex['query']}", ex["hits"])
    console.print(
        f"leave-one-out {report.knn_k}-NN category accuracy: [bold]{report.knn_accuracy:.3f}[/bold]"
        f" (chance {report.chance:.3f})",
        markup=True,
    )
    for ex in report.text_examples:
        print_rows(f"pins matching the text {ex['query']!r}", ex["hits"])
    if report.text_encoder:
        console.print(
            f"text search ({escape(report.text_encoder)}, learned from the pins' titles): asking "
            f"each category's name, [bold]{report.text_precision:.3f}[/bold] of the top "
            f"{report.knn_k} are in that category "
            f"(chance {1 / max(len(report.categories), 1):.3f})",
            markup=True,
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
            emit_json(summary)
        else:
            print_rows(f"compact vectors: {config.name}", summary["results"])
            console.print(f"report: {summary['report']}")
        return

    def show(cell: Any) -> None:
        if not as_json:
            tag = " (done before)" if cell.resumed else ""
            err_console.print(
                f"{cell.backbone} + {cell.head}: macro-F1 {cell.test_macro_f1:.3f} "
                f"(CV {cell.cv_mean:.3f} ± {cell.cv_std:.3f}) {cell.best_params}{tag}"
            )

    update, bar = progress_bar(enabled=not as_json and sys.stderr.isatty())
    with bar:
        summary = run_evaluate(config, out, on_cell=show, embed_progress=update)
    if as_json:
        emit_json(summary)
        return
    from pinsearch.eval.report import markdown_table

    heads = list(config.heads)
    console.print(markdown_table(summary["macro_f1"], heads))
    console.print(f"report: {summary['report']}")


def _openset(config: Any, out: Path | None, as_json: bool) -> None:
    from pinsearch.eval.openset import run_openset

    summary = run_openset(config, out)
    if as_json:
        emit_json(summary)
        return
    rows = [
        {k: r[k] for k in ("backbone", "head", "known_macro_f1", "closed_macro_f1",
                           "open_macro_f1", "auroc_unknown", "known_accepted",
                           "unknown_rejected")}
        for r in summary["results"]
    ]  # fmt: skip
    print_rows(f"open set: {config.name} ({config.splits} splits)", rows)
    console.print(f"report: {summary['report']}")


def _retrieval(config: Any, out: Path | None, as_json: bool) -> None:
    from pinsearch.eval.retrieval import run_retrieval

    summary = run_retrieval(config, out)
    if as_json:
        emit_json(summary)
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
            f"{m['median_rank']:g}",
        )
    console.print(table)
    console.print(f"report: {summary['report']}")


# The options each benchmark takes (besides --threads and --json): another one given is refused
_BENCH_OPTIONS = {
    "embed": {"--backbone", "--n", "--batch-size", "--decode", "--cpu-share", "--workers",
              "--compile", "--device", "--random-weights", "--corpus"},
    "jpeg": {"--n", "--batch-size", "--device", "--corpus"},
    "index": {"--n", "--dim", "--factory", "--fp16", "--fp16-also"},
    "exact": {"--n", "--dim", "--queries", "--device", "--progress"},
    "query": {"--n", "--dim", "--queries"},
    "catalog": {"--n", "--boards", "--skipped"},
    "remove": {"--n", "--dim", "--pins", "--factory"},
    "study": {"--n", "--dim", "--device", "--head", "--sequential", "--no-sequential",
              "--sklearn-timeout", "--sklearn-reference", "--progress"},
    "study-reference": {"--head", "--n", "--dim", "--jobs", "--checkpoint"},
    "text": {"--n", "--dim"},
    "dupes": {"--corpus", "--n", "--backbone"},
}  # fmt: skip


@app.command()
def bench(
    ctx: typer.Context,
    what: Annotated[
        str,
        typer.Argument(
            help="embed, jpeg, index, exact, query, catalog, remove, study, study-reference, "
            "text or dupes"
        ),
    ],
    backbone: Annotated[
        list[str] | None,
        typer.Option(
            "--backbone",
            "-b",
            help="Embed: repeatable, or 'all' (every registered backbone); dupes: one. "
            "Default effnet_lite0.",
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option(min=1, help="Images (embed, jpeg) or vectors (index, query)."),
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Vector dimension (index, exact, query, remove, study, text; default: each "
            "benchmark's own: 768, 1024, 768, 64, 256, 768).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Embed: 0 = by free GPU memory; jpeg: files a call.")
    ] = 64,
    decode: Annotated[str, typer.Option(help="Embed: auto, device or pil.")] = "auto",
    cpu_share: CpuShareOpt = None,  # embed
    workers: Annotated[
        int | None, typer.Option(min=0, help="Embed: DataLoader workers (default: CPUs - 1, <= 8).")
    ] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="Embed: torch.compile.")] = False,
    factory: Annotated[
        list[str] | None, typer.Option(help="Factory strings to compare (index).")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="GPU indexes in float16 (index).")] = False,
    fp16_also: Annotated[
        list[str] | None,
        typer.Option(help="Index: also measure this factory in float16 (repeatable; same data)."),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(help="Heads: knn, lsvm, mlp (study: all; study-reference: one, lsvm)."),
    ] = None,
    sequential: Annotated[
        bool, typer.Option(help="Study: also time the heads one fit at a time.")
    ] = True,
    sklearn_timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Study: stop scikit-learn after this many seconds."),
    ] = None,
    sklearn_reference: Annotated[
        list[Path] | None,
        typer.Option(
            help="Study: finished --json runs on the same split (repeatable); stopped rows "
            "take their scikit-learn macro-F1 from them."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Study-reference: keep every finished fit in this JSON file and resume from "
            "it (a grid longer than a session)."
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option(help="Study-reference: fits at a time (-1: every core).")
    ] = -1,
    progress: Annotated[
        Path | None,
        typer.Option(
            help="Study, exact: keep the result so far in this JSON file (rewritten as the "
            "run goes; study grids still running report a lower bound), for runs that may be "
            "stopped."
        ),
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights", help="Seeded random weights: speed without the checkpoint (embed)."
        ),
    ] = False,
    queries: Annotated[
        int | None,
        typer.Option(min=1, help="Query batch (exact); single queries timed (query: 1000)."),
    ] = None,
    pins: Annotated[int, typer.Option(min=1, help="Remove: pins removed at random.")] = 1000,
    boards: Annotated[int, typer.Option(min=1, help="Catalog: boards the pins are in.")] = 5000,
    skipped: Annotated[int, typer.Option(min=0, help="Catalog: skipped files.")] = 1000,
    device: Annotated[str, typer.Option()] = "auto",
    corpus: Annotated[
        Path | None,
        typer.Option(help="Real photos: a folder or manifest CSV (embed, jpeg, dupes)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for torch, FAISS, BLAS and OpenMP, here and in the worker "
            "processes the run starts (default: theirs); study: scikit-learn's fits N at a "
            "time (default: one per core). Use 1 beside another job on a small machine.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Benchmarks that print numbers: embed (end-to-end vs bare forward), jpeg (decoding alone,
    baseline vs progressive, on the device and with PIL), index, exact (a query
    batch: raw FAISS vs pinsearch vs 16-bit exact scans), query, catalog (an ingest's rows
    written to DuckDB, vs row by row), remove (pins out of a store
    vs rebuilding its index), study (the paper's grid, pinsearch heads vs scikit-learn),
    study-reference (scikit-learn's grid for one head alone, fit by fit and resumable: the
    macro-F1 a bounded study takes with --sklearn-reference), text (text and board query
    latency),
    dupes (near-copy precision and recall on real photos)."""
    from pinsearch.eval import bench as b

    given = given_flags(ctx) - {"--threads", "--json"}  # (given, whatever the value)
    uses = _BENCH_OPTIONS.get(what)
    if uses is not None:  # (an unknown benchmark is named below)
        unused = sorted(given - uses)
        if unused:
            raise typer.BadParameter(
                f"bench {what} has no use for {', '.join(unused)}; it takes "
                f"{', '.join(sorted(uses))} and --threads"
            )
    backbones = backbone or ["effnet_lite0"]
    sized = {} if dim is None else {"dim": dim}  # each benchmark has its own default size
    with b.threads_limited(threads):
        if what == "embed":
            options = dict(
                n=n or 256, batch_size=batch_size, device=device, random_weights=random_weights,
                decode=decode, cpu_share=cpu_share or 0.0, workers=workers, compile=compile_model,
            )  # fmt: skip
            if len(backbones) == 1 and backbones[0] != "all" and corpus is None:
                result: Any = b.bench_embed(backbones[0], **options)
            else:
                result = b.bench_embed_backbones(backbones, corpus=corpus, **options)
        elif what == "jpeg":
            items = b.corpus_bench_images(corpus, n or 256) if corpus else None
            result = b.bench_jpeg(n=n or 256, batch_size=batch_size, device=device, items=items)
        elif what == "index":
            result = b.bench_index(
                n=n or 100_000, **sized, factories=factory or None, fp16=fp16,
                fp16_also=fp16_also or (),
            )  # fmt: skip
        elif what == "exact":
            result = b.bench_exact(
                n=n or 1_000_000, **sized, nq=queries or 6400, device=device, progress=progress
            )
        elif what == "query":
            result = b.bench_query(n=n or 100_000, **sized, nq=queries or 1000)
        elif what == "catalog":
            result = b.bench_catalog(n=n or 100_000, boards=boards, skipped=skipped)
        elif what == "remove":
            if factory is not None and len(factory) > 1:
                raise typer.BadParameter("bench remove takes one --factory")
            first = factory[0] if factory else "auto"
            result = b.bench_remove(n=n or 100_000, **sized, pins=pins, factory=first)
        elif what == "study":
            result = b.bench_study(
                n=n or 4000, **sized, device=device, heads=head or ("knn", "lsvm", "mlp"),
                sequential=sequential, sklearn_timeout_s=sklearn_timeout,
                sklearn_reference=sklearn_reference or (), progress=progress,
                sklearn_jobs=threads or -1,
            )  # fmt: skip
        elif what == "study-reference":
            if head is not None and len(head) != 1:
                raise typer.BadParameter("bench study-reference takes one --head")
            result = b.bench_study_reference(
                head=head[0] if head else "lsvm", n=n or 4000, **sized, jobs=jobs,
                checkpoint=checkpoint,
            )  # fmt: skip
        elif what == "text":
            result = b.bench_text(n=n or 100_000, **sized)
        elif what == "dupes":
            if corpus is None:
                raise typer.BadParameter(
                    "bench dupes needs --corpus (a folder or manifest of photos)"
                )
            if len(backbones) != 1 or backbones[0] == "all":
                raise typer.BadParameter("bench dupes takes one --backbone")
            result = b.bench_dupes(corpus, n=n or 200, backbone=backbones[0])
        else:
            raise typer.BadParameter(
                f"unknown benchmark {what!r}; expected embed, jpeg, index, exact, query, "
                "catalog, remove, study, study-reference, text or dupes"
            )
    if as_json:
        emit_json(result)
        return
    console.print(b.format_result(result))
