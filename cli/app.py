"""The ``pinsearch`` command line: parse options, build configs, call the library, print.

Every command that reports something takes ``--json`` and then prints one JSON document
(schemas in the README). Library defaults live in the config dataclasses: options left unset
here are not passed on. The commands live in ``store_cmds``, ``search_cmds``, ``explore_cmds``
and ``study_cmds``; importing this module registers them all on :data:`app`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from typing import Annotated

import typer
from rich.markup import escape

from pinsearch._version import __version__
from pinsearch.cli.common import app, console, err_console
from pinsearch.errors import PinsearchError

__all__ = ["app", "main"]


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


def main() -> None:
    """Entry point: turns pinsearch errors into a one-line message and exit code 1."""
    try:
        app()
    except (PinsearchError, ValueError, OSError) as exc:  # OSError: paths (missing, a folder...)
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", markup=True)
        raise SystemExit(1) from None
    except Exception as exc:  # DuckDB's own (a disk full under the catalog): one line too
        duckdb = sys.modules.get("duckdb")
        if duckdb is None or not isinstance(exc, duckdb.Error):
            raise
        said = escape(f"the catalog: {type(exc).__name__}: {exc}")
        err_console.print(f"[red]error:[/red] {said}", markup=True)
        raise SystemExit(1) from None


# Registering the commands, in the order ``--help`` lists them (each module adds its own).
for _module in ("store_cmds", "search_cmds", "explore_cmds", "study_cmds"):
    importlib.import_module(f"pinsearch.cli.{_module}")
# The command list shows each docstring's first paragraph as one flowing line (rich markup
# keeps the source's line breaks, which cut the list's sentences where the code wraps).
for _command in app.registered_commands:
    if _command.short_help is None and _command.callback is not None:
        _summary = inspect.cleandoc(_command.callback.__doc__ or "").split("\n\n")[0]
        _command.short_help = " ".join(_summary.split()) or None

if __name__ == "__main__":
    main()
