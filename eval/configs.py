"""Plumbing shared by the study kinds: reading their TOML into config dataclasses (errors that
name the culprit) and writing their ``results.json`` + ``report.md``."""

from __future__ import annotations

import json
import math
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["check_fields", "config_from_toml", "write_study_files"]

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
    check_fields(cls, data, path, what)
    return cls(**data)


# The least values of settings several study kinds share, by name
_LEAST = {
    "per_class": 1,
    "min_per_class": 2,  # (a stratified split needs two pins of each label)
    "folds": 2,
    "seed": 0,  # (numpy's generators refuse a negative seed)
    "splits": 1,
    "k": 1,
    "train_images": 1,
}
_MOST = {"seed": 2**32 - 1}  # (numpy's and scikit-learn's seeds are 32-bit)
_FRACTIONS = ("test_size",)  # a share of the pins, strictly between 0 and 1
_NONEMPTY = ("backbones", "heads", "variants", "ks")  # lists a study cannot run without


def check_fields(
    cls: type, data: dict[str, Any], path: Path, what: str, skip: tuple[str, ...] = ()
) -> None:
    """Check each value a study file gives against its field's type in ``cls`` (a whole number
    where an ``int`` is due, not ``true``; a finite number; text; a list of such), and the
    shared bounds (``folds`` >= 2, ``per_class`` >= 1, ...): a wrong one is named here, not
    in a traceback mid-study. ``skip``: fields checked elsewhere.

    Raises:
        ValueError: naming the key, its value and what it must be.
    """
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key in skip or key not in hints:
            continue
        if not _fits(value, hints[key]):
            raise ValueError(
                f"{path}: {what} key {key!r} must be {_spelt(hints[key])}, got {value!r}"
            )
        least = _LEAST.get(key)
        if least is not None and isinstance(value, int) and value < least:
            raise ValueError(f"{path}: {what} key {key!r} must be at least {least}, got {value}")
        most = _MOST.get(key)
        if most is not None and isinstance(value, int) and value > most:
            raise ValueError(f"{path}: {what} key {key!r} must be at most {most}, got {value}")
        if key in _FRACTIONS and isinstance(value, (int, float)) and not 0 < value < 1:
            raise ValueError(
                f"{path}: {what} key {key!r} is a fraction of the pins, strictly between 0 "
                f"and 1, got {value}"
            )
        if key in _NONEMPTY and isinstance(value, list) and not value:
            raise ValueError(f"{path}: {what} key {key!r} must list at least one")
        if key == "name" and isinstance(value, str) and not _plain_name(value):
            raise ValueError(
                f"{path}: {what} key 'name' names its results folder (eval/results/NAME): "
                f"one folder name without '/', '\\' or '..', got {value!r}"
            )
        if key == "ks" and isinstance(value, list) and any(k < 1 for k in value):
            raise ValueError(f"{path}: {what} key 'ks' must hold whole numbers >= 1, got {value}")


def _plain_name(name: str) -> bool:
    """A name that is one folder name: not blank, no separator, not ``.`` or ``..``."""
    return bool(name.strip()) and not any(c in name for c in "/\\\0") and name not in (".", "..")


def _fits(value: Any, tp: Any) -> bool:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):  # a TOML array either way
        inner = args[0] if args else Any
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    if origin is dict:
        k_tp, v_tp = args if args else (Any, Any)
        return isinstance(value, dict) and all(
            _fits(k, k_tp) and _fits(v, v_tp) for k, v in value.items()
        )
    return True


def _spelt(tp: Any, plural: bool = False) -> str:
    """A type as a study file's author reads it."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_spelt(a, plural) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"a list of {_spelt(args[0], plural=True) if args else 'values'}"
    if origin is dict:
        return "tables" if plural else "a table"
    one, many = {
        int: ("a whole number", "whole numbers"),
        float: ("a number", "numbers"),
        str: ("text", "texts"),
        bool: ("true or false", "true or false values"),
    }.get(tp, (str(tp), str(tp)))
    return many if plural else one


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
