"""Text from the data (category names, labels) written into the Markdown reports."""

from __future__ import annotations

import re

__all__ = ["escape"]

# Markdown's (and GitHub's) syntax characters a category name may hold; "_" within a word is
# literal on GitHub (food_drink), and names lose leading and trailing ones when cleaned
_SYNTAX = re.compile(r"([\\`*\[\]<>|$~#])")


def escape(text: object) -> str:
    """``text`` as Markdown shows it literally: ``a|b`` no longer splits a table cell, ``x*y*``
    is no emphasis, ``$10`` no mathematics."""
    return _SYNTAX.sub(r"\\\1", str(text))
