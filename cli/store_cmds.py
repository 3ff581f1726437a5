"""Commands that build and maintain a store: index, add, remove, refresh, check, repair, info."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pinsearch.cli.common import (
    DEFAULT_STORE,
    AllowOutsideRootOpt,
    CategoriesOpt,
    CpuShareOpt,
    FormatOpt,
    JsonOpt,
    KeepExcludedOpt,
    PerCategoryOpt,
    SeedOpt,
    StoreOpt,
    app,
    console,
    emit_json,
    ingest_rules,
    make_config,
    print_rows,
    progress_bar,
)

BatchSizeOpt = Annotated[
    int | None, typer.Option(help="Images per forward pass; 0 = by free GPU memory.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda ...")]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader workers.")]
DecodeOpt = Annotated[
    str | None, typer.Option(help="JPEG decoding: auto (GPU with CUDA), device or pil.")
]


@app.command()
def index(
    corpus: Annotated[
        Path | None,
        typer.Argument(
            help="Tree, image folder or CSV/Parquet manifest; leave out to embed the pins the "
            "store holds with --backbone."
        ),
    ] = None,
    store: StoreOpt = DEFAULT_STORE,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            "-b",
            help="Default: the store's only backbone; effnet_lite0 for a new store.",
        ),
    ] = None,
    fmt: FormatOpt = None,
    per_category: PerCategoryOpt = None,
    seed: SeedOpt = None,
    keep_excluded: KeepExcludedOpt = False,
    categories: CategoriesOpt = None,
    allow_outside_root: AllowOutsideRootOpt = False,
    weights: Annotated[str | None, typer.Option(help="Local checkpoint for the backbone.")] = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    decode: DecodeOpt = None,
    cpu_share: CpuShareOpt = None,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the backbone first.")
    ] = False,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Stored dtype: float32 or float16.")] = None,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory string (Flat, IVF1024,Flat, HNSW32) or auto.")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="cosine, ip, l2 or l1.")] = None,
    index_device: Annotated[str | None, typer.Option(help="Index on auto, cpu or gpu.")] = None,
    fp16: Annotated[
        bool | None,
        typer.Option("--fp16/--no-fp16", help="GPU index: float16 Flat vectors / PQ tables."),
    ] = None,
    index_name: Annotated[str | None, typer.Option(help="Defaults to the backbone name.")] = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Rebuild the index from all vectors.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a corpus, embed new pins with a backbone, and build or update its FAISS index."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.ingest import IngestConfig
    from pinsearch.pipeline import default_backbone, index_corpus, stored_run_settings

    if corpus is None:  # (they read a corpus)
        given = {"--format": fmt, "--per-category": per_category, "--seed": seed,
                 "--keep-excluded": keep_excluded or None, "--categories": categories,
                 "--allow-outside-root": allow_outside_root or None}  # fmt: skip
        unused = [flag for flag, value in given.items() if value is not None]
        if unused:
            raise typer.BadParameter(
                f"{', '.join(unused)}: {'options' if len(unused) > 1 else 'an option'} for "
                "reading a corpus; give one, or leave them out to embed the pins the store holds"
            )
    rules = ingest_rules(fmt, per_category, seed, keep_excluded, categories, allow_outside_root)
    backbone = backbone or default_backbone(store)
    # a store's existing run decides what was left unset: its vectors must stay alike
    stored = stored_run_settings(store, backbone)
    ingest_cfg = IngestConfig(**rules)
    embed_cfg = make_config(
        EmbedConfig,
        weights=weights if weights is not None else stored.get("weights"),
        batch_size=batch_size,
        workers=workers,
        device=device,
        decode=decode,
        cpu_share=cpu_share,
        compile=compile_model or None,
        normalize=normalize if normalize is not None else stored.get("normalize"),
        dtype=dtype if dtype is not None else stored.get("dtype"),
    )
    index_opts = {
        k: v
        for k, v in {
            "factory": factory,
            "metric": metric,
            "device": index_device,
            "fp16": fp16,
        }.items()
        if v is not None
    }
    update, bar = progress_bar(enabled=not as_json and sys.stderr.isatty())
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
        emit_json(report)
        return
    table = Table(title=f"indexed into {report.store}", show_header=False)
    for key, value in report.to_dict().items():
        if key != "stale_heads":
            table.add_row(key, str(value))
    console.print(table)
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def add(
    corpus: Annotated[Path, typer.Argument(help="Tree, image folder or manifest with new pins.")],
    store: StoreOpt = DEFAULT_STORE,
    fmt: FormatOpt = None,
    per_category: PerCategoryOpt = None,
    seed: SeedOpt = None,
    keep_excluded: KeepExcludedOpt = False,
    categories: CategoriesOpt = None,
    allow_outside_root: AllowOutsideRootOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    decode: DecodeOpt = None,
    cpu_share: CpuShareOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add new pins or boards to an existing store: only they are embedded, for every backbone
    of the store, and every index is updated; heads are marked stale. The corpus is read by
    the store's category rules (those of its latest ingest) unless options say otherwise."""
    from pinsearch.edit import add_corpus

    rules = ingest_rules(fmt, per_category, seed, keep_excluded, categories, allow_outside_root)
    update, bar = progress_bar(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = add_corpus(
            corpus, store, ingest=rules, device=device, batch_size=batch_size,
            workers=workers, decode=decode, cpu_share=cpu_share, progress=update,
        )  # fmt: skip
    if as_json:
        emit_json(report)
        return
    console.print(
        f"added {report.added} pins ({report.skipped} skipped, {report.already_present} already "
        f"there) to {report.store} in {report.seconds:.1f} s"
    )
    rules = report.rules
    said = []
    if rules["categories"] is not None:
        said.append(f"categories {', '.join(rules['categories'])}")
    if rules["per_category"] is not None:
        said.append(f"{rules['per_category']} per category (seed {rules['seed']})")
    if said:
        dropped = ", ".join(rules["drop_categories"]) or "none"
        console.print(f"read by the rules: {'; '.join(said)}; dropped: {dropped}")
    if report.updated:
        console.print(
            f"metadata updated for {report.updated} pins already there"
            + (f" ({report.moved} moved)" if report.moved else "")
        )
    for b in report.backbones:
        failed = b["embed_failed"]  # (dropped from the store, recorded in pinsearch info)
        console.print(
            f"  {b['backbone']}: embedded {b['embedded']}"
            + (f", {failed} failed to decode (skipped, see pinsearch info)" if failed else "")
            + f", index {b['index_action']}"
        )
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def remove(
    store: StoreOpt = DEFAULT_STORE,
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
        emit_json(report)
        return
    console.print(
        f"removed {report.pins} pins ({report.boards} boards, {report.users} users) from "
        f"{report.store}: vectors {report.vectors}; indexes updated {report.indexes}"
        + (f" (rebuilt: {report.rebuilt})" if report.rebuilt else "")
    )
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def refresh(
    store: StoreOpt = DEFAULT_STORE,
    pin: Annotated[
        list[str] | None,
        typer.Option("--pin", help="Embed this pin again whatever its file's state (repeat)."),
    ] = None,
    remove_missing: Annotated[
        bool, typer.Option("--remove-missing", help="Remove the pins whose file is gone.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what changed; write nothing.")
    ] = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    decode: DecodeOpt = None,
    cpu_share: CpuShareOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed again the pins whose image files changed since they were read, in every backbone
    and index; report (or remove) pins whose files are gone."""
    from pinsearch.edit import refresh_store

    update, bar = progress_bar(enabled=not as_json and sys.stderr.isatty())
    with bar:
        report = refresh_store(
            store, pin_ids=pin or [], remove_missing=remove_missing, dry_run=dry_run,
            device=device, batch_size=batch_size, workers=workers, decode=decode,
            cpu_share=cpu_share, progress=update,
        )  # fmt: skip
    if as_json:
        emit_json(report)
        return
    verb = "would embed again" if dry_run else "embedded again"
    console.print(
        f"{report.store}: {report.pins} pins' files looked at in {report.seconds:.1f} s: "
        f"{report.changed} changed, {report.missing} gone"
        + (f" ({report.removed} removed)" if report.removed else "")
        + f"; {verb} {report.refreshed} pins"
        + (f" ({report.unchanged} came out as stored: kept)" if report.unchanged else "")
        + (f" and {report.pending} left by an interrupted refresh" if report.pending else "")
        + (f"; file state recorded for {report.recorded}" if report.recorded else "")
    )
    for backbone, n in report.vectors.items():
        console.print(f"  {backbone}: {n} vectors")
    if report.titles:
        console.print(f"title vectors {'to embed' if dry_run else 'embedded'}: {report.titles} "
                      "(titles edited, or missing, or made by another encoder)")  # fmt: skip
    if report.indexes:
        console.print(
            f"indexes updated: {', '.join(report.indexes)}"
            + (f" (rebuilt: {', '.join(report.rebuilt)})" if report.rebuilt else "")
        )
    for what in ("unreadable", "missing"):
        for p in report.examples.get(what, [])[:5]:
            why = f": {p['reason']}: {p['detail']}" if what == "unreadable" else ""
            said = escape(f"{p['pin_id']} ({p['path']}){why}")
            console.print(f"[yellow]{what}[/yellow] {said}", markup=True)
    if report.unreadable:
        console.print(
            f"[yellow]{report.unreadable} changed files no longer decode: their pins keep "
            "their vectors (the next refresh tries again)[/yellow]",
            markup=True,
        )
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


@app.command()
def check(
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    sources: Annotated[
        bool,
        typer.Option(help="Also look at the pins' image files (missing or changed: a warning)."),
    ] = True,
) -> None:
    """Verify a store: vectors, indexes, heads, alignments, ingest counts, the pins' image
    files. Exit 1 on errors."""
    from pinsearch.check import check_store

    report = check_store(store, sources=sources)
    _show_check(report, as_json)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def repair(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Rebuild derived indexes from the stored vectors and drop what cannot be trusted."""
    from pinsearch.check import repair_store

    report = repair_store(store)
    if as_json:
        emit_json(report)
    else:
        for action in report.actions or ["nothing to repair"]:
            console.print(action)
        assert report.after is not None
        _show_check(report.after, False)
    if report.after is not None and not report.after.ok:
        raise typer.Exit(1)


def _show_check(report: Any, as_json: bool) -> None:
    if as_json:
        emit_json(report)
        return
    status = "[green]ok[/green]" if report.ok else "[red]errors[/red]"
    counts = ", ".join(f"{v} {k}" for k, v in report.checked.items())
    console.print(
        f"{escape(report.store)}: {status} ({report.pins} pins; checked {counts})", markup=True
    )
    for f in report.findings:
        colour = "red" if f.level == "error" else "yellow"
        said = escape(f"{f.where}: {f.problem}: {f.detail}")
        console.print(f"[{colour}]{f.level}[/{colour}] {said}", markup=True)


@app.command()
def info(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Counts per category and board, backbones, indexes, and skipped pins with reasons."""
    from pinsearch.store import Store

    # (catalog rows only: a damaged index leaves the counts readable; check says what is wrong)
    with Store.open(store, read_only=True, verify=False) as s:
        report = s.info()
    if as_json:
        emit_json(report)
        return
    console.print(
        f"[bold]{escape(report.path)}[/bold]: {report.pins} pins, {report.boards} boards, "
        f"{report.users} users, {len(report.categories)} categories, {report.skipped} skipped",
        markup=True,
    )
    print_rows("categories", report.categories)
    print_rows(f"largest boards (of {report.boards})", report.top_boards)
    print_rows("embeddings", report.embeddings)
    print_rows("indexes", report.indexes)
    print_rows("heads", report.heads)
    print_rows(  # validation recall of text -> image, not the whole metrics object
        "text alignments",
        [
            {**{k: v for k, v in a.items() if k != "metrics"},
             **{m: round(a["metrics"][m], 3) for m in ("recall@1", "recall@10")
                if m in a["metrics"]}}
            for a in report.alignments
        ],
    )  # fmt: skip
    print_rows("skipped pins by reason", report.skipped_by_reason)
    print_rows("ingests", report.ingests)
