"""Plumbing shared by the study kinds: reading their TOML into config dataclasses (errors that
name the culprit) and writing their ``results.json`` + ``report.md``."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["config_from_toml", "write_study_files"]

T = TypeVar("T")


def config_from_toml(
    cls: type[T], data: dict[str, Any], path: Path, what: str, required: tuple[str, ...]
) -> T:
    """``cls(**data)`` without the ``kind`` key, after checking the keys.

    Raises:
        ValueError: a key ``cls`` does not know, or a required one missing (named, with
            ``what`` — "retrieval study", ... — and the file).
    """
    data = {k: v for k, v in data.items() if k != "kind"}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {what} keys {unknown}; known: {sorted(known)}")
    for key in required:
        if key not in data:
            raise ValueError(f"{path}: {what} needs {key!r}")
    return cls(**data)


def write_study_files(
    name: str, out_dir: str | Path | None, summary: dict[str, Any], markdown: str
) -> dict[str, Any]:
    """Write ``results.json`` and ``report.md`` (default folder ``eval/results/NAME``); returns
    the summary with ``report`` set to the Markdown path."""
    out = Path(out_dir) if out_dir is not None else Path("eval") / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(markdown)
    summary["report"] = str(out / "report.md")
    return summary
