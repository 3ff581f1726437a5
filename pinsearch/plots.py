"""The matplotlib setup every figure pinsearch writes shares."""

from __future__ import annotations

from typing import Any

__all__ = ["literal", "pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def literal(text: object) -> str:
    """Text from the data (a category, a study's name) as a figure should show it: a ``$``
    in ``gifts_under_$10_$20`` is no mathematics (matplotlib failed the save)."""
    return str(text).replace("$", r"\$")
