"""The matplotlib setup every figure pinsearch writes shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["pyplot"]


@contextlib.contextmanager
def pyplot() -> Iterator[Any]:
    """``matplotlib.pyplot`` on the Agg backend (files, no display) for figures drawn inside,
    their text taken as written: a ``$`` in a category name (``gifts_under_$10_$20``) is not
    read as mathematics, which failed the save."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):
        yield plt
