"""pinsearch: vector-database retrieval for Pinterest-style image collections.

Pins are embedded with pretrained backbones, stored once per backbone, indexed with FAISS and
described in a DuckDB catalog; one :class:`~pinsearch.store.Store` answers similar-pin queries.
"""

from pinsearch._version import __version__

__all__ = ["__version__"]
