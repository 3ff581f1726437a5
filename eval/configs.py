"""Reading study TOML sections into config dataclasses, with errors that name the culprit."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["config_from_toml"]

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
