"""Trained heads kept in a store, and classification of stored pins or new images with them.

A head is trained on a backbone's stored vectors and saved under ``S/heads/`` as arrays plus
JSON (no pickle), with a row in the catalog's ``heads`` table. ``pinsearch query --classify``
answers "which category is this pin?" with it: the predicted label and every class's score.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.catalog import recorded_file
from pinsearch.errors import PinNotFoundError
from pinsearch.heads import create_head, load_head, save_head, saved_params
from pinsearch.labels import labelled_pins, load_vectors
from pinsearch.store import Store
from pinsearch.vectors import backbone_dirname, in_sorted

__all__ = ["Classification", "HeadInfo", "classify", "list_heads", "save_store_head", "train_head"]

_logger = logging.getLogger(__name__)
_NAME_CHARS = 80  # of a head's name in its file names (a file name has 255 bytes at most)


@dataclass
class HeadInfo:
    """A head stored in a store (its catalog row)."""

    name: str
    backbone: str
    head: str
    params: dict[str, Any]
    label: str
    classes: list[str]
    n_train: int
    normalize: bool
    source: str  # "train" or "study:<name> cell <digest>"
    stale: bool = False  # what it learnt from changed since: pins added, removed or embedded
    # again, labels edited, a new alignment (zero-shot)


@dataclass
class Classification:
    """The answer for one query: the predicted label and every class's score."""

    query: dict[str, Any]
    head: str
    backbone: str
    predicted: str
    scores: list[dict[str, Any]] = field(default_factory=list)  # [{class, score}], best first
    stale: bool = False  # the head was trained before its backbone's pins changed

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _head_base(store: Store, name: str) -> Path:
    """A new base path for a head's files: its name made safe, and a token of this save. Each
    save writes new files (two names made alike, such as ``my head`` and ``my_head``, never
    share them), and the catalog row switches to them at once: a retrain stopped midway
    leaves the previous head whole. The replaced files stay for readers of older snapshots
    until the second writer after this one opens
    (:meth:`~pinsearch.store.Store.remove_stray_head_files`)."""
    safe = backbone_dirname(name.replace("/", "__"))[:_NAME_CHARS]
    return store.root / "heads" / f"{safe}-{secrets.token_hex(6)}"


def save_store_head(
    store: Store,
    estimator: Any,
    *,
    name: str,
    backbone: str,
    label: str,
    n_train: int,
    normalize: bool,
    source: str,
) -> HeadInfo:
    """Save a fitted head into the store and record it in the catalog."""
    base = _head_base(store, name)
    save_head(estimator, base)
    old = store.catalog.query("SELECT file FROM heads WHERE name = ?", [name])
    if old:  # the replaced files, for readers of snapshots from before (see Store.open)
        store.retire_head_files(Path(str(old[0]["file"])))  # (its name only)
    info = HeadInfo(
        name=name,
        backbone=backbone,
        head=estimator.head_name,
        params=saved_params(estimator),
        label=label,
        classes=[str(c) for c in estimator.classes_],
        n_train=n_train,
        normalize=normalize,
        source=source,
    )
    store.catalog.connection.execute(
        "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), false)",
        [info.name, info.backbone, info.head, json.dumps(info.params), info.label,
         json.dumps(info.classes), info.n_train, base.relative_to(store.root).as_posix(),
         info.normalize, info.source],
    )  # fmt: skip
    return info


def head_context(store: Store, backbone: str, head: str) -> dict[str, Any]:
    """Parameters a head takes from the store rather than the user: the zero-shot head's
    text encoder into ``backbone``'s space."""
    if head != "zeroshot":
        return {}
    from pinsearch.text import text_encoder_for

    return {"text_encoder": text_encoder_for(store, backbone)}


def head_context_key(store: Store, backbone: str, head: str) -> str:
    """What identifies :func:`head_context`'s parameters without loading them: the zero-shot
    head's text encoder (a CLIP tower, or the checksum of the alignment in use)."""
    if head != "zeroshot":
        return ""
    from pinsearch.text import text_encoder_identity

    return text_encoder_identity(store, backbone) or ""


def train_head(
    store: Store,
    backbone: str,
    head: str = "lsvm",
    params: dict[str, Any] | None = None,
    *,
    label: str = "category",
    name: str | None = None,
    normalize: bool = False,
    only_embedded: bool = False,
) -> HeadInfo:
    """Train a head on every stored pin of ``backbone`` that has a label, and save it.

    Args:
        store: a store opened for writing.
        backbone: whose vectors to train on.
        head: registry name (``knn``, ``lsvm``, ``mlp``, ...).
        params: the head's hyperparameters.
        label: ``category`` or a key of the pins' ``extra`` fields.
        name: defaults to ``<backbone>/<head>``.
        normalize: L2-normalise vectors first (recorded; applied to queries too).
        only_embedded: train on the labelled pins that have a vector of ``backbone`` (a
            study's ``per_class`` sample embeds only its pins); otherwise a pin without one
            is an error.
    """
    backbone = store.resolve_backbone(backbone)
    keys, labels, _ = labelled_pins(store, label)
    held = in_sorted(store.vectors(backbone).sorted_keys(), keys)
    if not held.all():
        lacking = int((~held).sum())
        if not only_embedded:
            raise ValueError(
                f"{lacking} pins have no {backbone!r} vector; index them first (or train on "
                "the pins that have one: --only-embedded)"
            )
        _logger.warning(
            "training %s on the %d labelled pins with a vector (%d have none)",
            backbone, int(held.sum()), lacking,
        )  # fmt: skip
        keys, labels = keys[held], labels[held]
        if len(set(labels.tolist())) < 2:
            raise ValueError(
                f"the pins with a {backbone!r} vector have {len(set(labels.tolist()))} "
                f"{label!r} label(s); a head needs at least 2"
            )
    X = load_vectors(store, backbone, keys, normalize)
    estimator = create_head(head, **head_context(store, backbone, head), **(params or {}))
    estimator.fit(X, labels)
    return save_store_head(
        store, estimator, name=name or f"{backbone}/{head}", backbone=backbone, label=label,
        n_train=len(keys), normalize=normalize, source="train",
    )  # fmt: skip


def list_heads(store: Store) -> list[HeadInfo]:
    """Every head stored in the store."""
    rows = store.catalog.query("SELECT * FROM heads ORDER BY name")
    return [
        HeadInfo(r["name"], r["backbone"], r["head"], json.loads(r["params"]), r["label"],
                 json.loads(r["classes"]), r["n_train"], bool(r["normalize"]), r["source"],
                 bool(r["stale"]))
        for r in rows
    ]  # fmt: skip


def _pick(store: Store, name: str | None, backbone: str | None = None) -> tuple[HeadInfo, Any]:
    heads = {h.name: h for h in list_heads(store)}
    if not heads:
        raise ValueError(
            f"store {store.root} has no trained head; run pinsearch train or pinsearch evaluate"
        )
    if backbone is not None:  # the heads trained on this backbone's vectors
        backbone = store.resolve_backbone(backbone)
        if name in heads and heads[name].backbone != backbone:
            raise ValueError(
                f"head {name!r} was trained on {heads[name].backbone!r}, not {backbone!r}"
            )
        heads = {n: h for n, h in heads.items() if h.backbone == backbone}
        if not heads:
            raise ValueError(
                f"store {store.root} has no head trained on {backbone!r}; run pinsearch train "
                f"--backbone {backbone}"
            )
    if name is None:
        if len(heads) > 1:
            raise ValueError(f"store {store.root} has several heads {sorted(heads)}; name one")
        name = next(iter(heads))
    if name not in heads:
        raise ValueError(f"no head {name!r} in {store.root}; it has {sorted(heads)}")
    row = store.catalog.query("SELECT file FROM heads WHERE name = ?", [name])[0]
    return heads[name], load_head(recorded_file(store.root, row["file"], "heads", f"head {name!r}"))


def classify(
    store: Store,
    *,
    pin_id: str | None = None,
    image: Any = None,
    head: str | None = None,
    top: int = 5,
    backbone: str | None = None,
) -> Classification:
    """Classify a stored pin or a new image with a stored head (``head`` by name, or the one
    head of the store, or of ``backbone``).

    Raises:
        ValueError: neither or both of ``pin_id`` and ``image``; unknown or ambiguous head, or
            one of another backbone than ``backbone``.
        PinNotFoundError: unknown pin, or no vector for the head's backbone.
    """
    if (pin_id is None) == (image is None):
        raise ValueError("give exactly one of pin_id or image")
    info, estimator = _pick(store, head, backbone)
    if pin_id is not None:
        key = store.catalog.keys_for_ids([pin_id]).get(pin_id)
        if key is None:
            raise PinNotFoundError(f"pin {pin_id!r} is not in store {store.root}")
        vec, found = store.vectors(info.backbone).load(np.array([key]))
        if len(found) == 0:
            raise PinNotFoundError(f"pin {pin_id!r} has no {info.backbone!r} vector")
        query: dict[str, Any] = {"pin_id": pin_id}
    else:
        from pinsearch.embed import embed_like_run
        from pinsearch.search import store_backbone

        # Only the backbone is needed here: no index is loaded to classify an image.
        emb = store.catalog.get_embedding(info.backbone) or {}
        model = store_backbone(store, info.backbone)
        vec = embed_like_run(model, [image], emb)
        query = {"image": str(image) if isinstance(image, (str, Path)) else "<image>"}
    if info.normalize:
        vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    scores = estimator.class_scores(vec)[0]
    order = np.argsort(-scores, kind="stable")
    classes = estimator.classes_
    return Classification(
        query=query,
        head=info.name,
        backbone=info.backbone,
        predicted=str(classes[order[0]]),
        scores=[{"class": str(classes[i]), "score": float(scores[i])} for i in order[:top]],
        stale=info.stale,
    )
