"""Shared pieces of the command line: the Typer app, consoles, option types, output helpers."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

__all__ = [
    "DEFAULT_STORE",
    "AllowOutsideRootOpt",
    "EfSearchOpt",
    "JsonOpt",
    "NprobeOpt",
    "PrecisionOpt",
    "RefineOpt",
    "StoreOpt",
    "app",
    "console",
    "emit_json",
    "err_console",
    "make_config",
    "print_rows",
    "progress_bar",
    "search_config",
]

app = typer.Typer(
    name="pinsearch",
    help="Vector-database retrieval for Pinterest-style image collections.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Markup off: what is printed holds user data (a label "[vintage]_cars", a title "[DIY] ...",
# a path) that Rich would read as tags and swallow. A styled line asks for markup itself and
# escapes its data (rich.markup.escape).
# Control characters in stored text (a title holding ESC [2J clears the screen, ESC ] sets the
# window's title, OSC 8 fakes links) are shown as \xNN escapes: Rich passes ESC through.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class _Console(Console):
    def render_str(self, text: str, **kwargs: Any) -> Any:
        shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        return super().render_str(shown, **kwargs)


console = _Console(markup=False)
err_console = _Console(stderr=True, markup=False)

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
BackboneOpt = Annotated[
    str | None,
    typer.Option("--backbone", "-b", help="Backbone (default: the store's only one)."),
]
IndexOpt = Annotated[
    str | None, typer.Option("--index", help="Index of the backbone (default: its own).")
]
AllowOutsideRootOpt = Annotated[
    bool,
    typer.Option(
        "--allow-outside-root",
        help="Accept files outside the corpus root (manifest paths, links).",
    ),
]
StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
DEFAULT_STORE = Path("pinsearch-store")  # every command's store when --store is left out
# the reading rules of index and add
FormatOpt = Annotated[str | None, typer.Option("--format", help="auto, tree, folder, manifest")]
PerCategoryOpt = Annotated[int | None, typer.Option(help="Sample N pins per category.")]
SeedOpt = Annotated[int | None, typer.Option(help="Sampling seed.")]
KeepExcludedOpt = Annotated[
    bool, typer.Option("--keep-excluded", help="Keep the categories 'none' and 'other'.")
]
CategoriesOpt = Annotated[
    str | None, typer.Option(help="Comma-separated categories to keep (others skipped).")
]
CpuShareOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Device decoding: share of the JPEGs the workers decode with PIL anyway "
        "(CPU cores beside the GPU's decoder).",
    ),
]
# search-time index settings (the saved index is the same file whatever they are)
NprobeOpt = Annotated[
    int | None, typer.Option(min=1, help="IVF lists visited per query (default nlist / 16).")
]
EfSearchOpt = Annotated[
    int | None, typer.Option(min=1, help="HNSW efSearch (default 64; at least k).")
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(help="Exact (Flat) search in float32, float16 or bfloat16 (a GPU speed-up)."),
]
RefineOpt = Annotated[
    int | None,
    typer.Option(min=0, help="Re-score refine x k candidates exactly (16-bit scan, ...,RFlat)."),
]


def search_config(
    nprobe: int | None, ef_search: int | None, precision: str | None, refine: int | None
) -> dict[str, Any] | None:
    """The search-time options given, by name (each put over the saved index's setting,
    the others stay as saved), or None when none was (the index is searched as saved)."""
    from pinsearch.indexes import search_overrides

    given = {"nprobe": nprobe, "ef_search": ef_search, "precision": precision, "refine": refine}
    asked = {k: v for k, v in given.items() if v is not None}
    if not asked:
        return None
    try:
        return search_overrides(asked)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def make_config(cls: type[T], **overrides: Any) -> T:
    """Build a config dataclass from the options the user actually set."""
    return cls(**given(**overrides))


def given_flags(ctx: typer.Context) -> set[str]:
    """The options set on the command line (or from the environment), each by its long flag
    (``-k`` for one-letter ones): an option left out is not among them even where its value
    is what a user could have typed, so one its command has no use for is refused either way."""
    out = set()
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name or "")
        if (
            p.param_type_name == "option"
            and source is not None
            and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
        ):
            off = getattr(p, "secondary_opts", []) and ctx.params.get(p.name or "") is False
            names = p.secondary_opts if off else p.opts  # (--no-x given: named so)
            out.add(next((o for o in names if o.startswith("--") and len(o) > 3), names[0]))
    return out


def given(**options: Any) -> dict[str, Any]:
    """The options the user actually set (those not None)."""
    return {k: v for k, v in options.items() if v is not None}


def ingest_rules(
    fmt: str | None,
    per_category: int | None,
    seed: int | None,
    keep_excluded: bool,
    categories: str | None,
    allow_outside_root: bool,
) -> dict[str, Any]:
    """The :class:`~pinsearch.ingest.IngestConfig` fields that ``index``'s and ``add``'s
    reading options set (those given only)."""
    if seed is not None and per_category is None:
        raise typer.BadParameter("--seed draws the --per-category sample; give that too")
    return given(
        format=fmt,
        per_category=per_category,
        seed=seed,
        drop_categories=() if keep_excluded else None,
        categories=tuple(c.strip() for c in categories.split(",")) if categories else None,
        allow_outside_root=allow_outside_root or None,
    )


def emit_json(obj: Any) -> None:
    data = asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def progress_bar(enabled: bool) -> Any:
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


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*(fmt_value(v) for v in row.values()))
    console.print(table)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
