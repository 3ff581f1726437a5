"""Exceptions raised by pinsearch; each names the culprit (file, value, backbone) in its message."""

from __future__ import annotations

__all__ = [
    "BackboneMismatchError",
    "CatalogError",
    "CorpusError",
    "DeviceError",
    "IndexFileError",
    "PinNotFoundError",
    "PinsearchError",
    "StoreLockedError",
    "StoreVersionError",
    "WeightsNotFoundError",
]


class PinsearchError(Exception):
    """Base class of every error pinsearch raises on purpose."""


class CorpusError(PinsearchError, ValueError):
    """A corpus cannot be read as a whole (missing root, unknown format, nothing usable)."""


class StoreVersionError(PinsearchError):
    """The store was written by an incompatible pinsearch store format."""


class CatalogError(PinsearchError):
    """A store's catalog (its DuckDB file) cannot be read: damaged, cut short, not DuckDB."""


class StoreLockedError(PinsearchError):
    """Another process holds the store's write lock."""


class BackboneMismatchError(PinsearchError, ValueError):
    """A query or artefact does not match the backbone (name, weights or dim) it is used with."""


class WeightsNotFoundError(PinsearchError, FileNotFoundError):
    """No pretrained weights could be found offline for a backbone."""


class DeviceError(PinsearchError, RuntimeError):
    """The device asked for is missing or cannot do the job (no GPU, too little GPU memory,
    no GPU JPEG decoder)."""


class IndexFileError(PinsearchError):
    """An index file is missing, damaged, or does not match its description."""


class PinNotFoundError(PinsearchError, KeyError):
    """A pin id is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "pin not found"
