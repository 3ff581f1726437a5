"""``pinsearch index``: corpus -> catalog -> vectors -> FAISS index, resumable and incremental.

Running it again on the same store adds only new pins, embeds only pins without vectors, and
adds the new vectors to the existing index without rebuilding it (unless asked to).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.backbones import Backbone, create_backbone, spec_as_recorded
from pinsearch.catalog import StoredChanges
from pinsearch.embed import EmbedConfig, EmbedReport, Progress, embed_store, resolve_device
from pinsearch.errors import BackboneMismatchError, DeviceError
from pinsearch.indexes import IndexConfig, gpu_count
from pinsearch.indexes.spec import check_factory_syntax
from pinsearch.ingest import IngestConfig, read_corpus
from pinsearch.store import Store
from pinsearch.text import refresh_titles

__all__ = [
    "DEFAULT_BACKBONE",
    "IndexReport",
    "default_backbone",
    "index_corpus",
    "index_into",
    "run_settings",
    "stored_run_settings",
]

_logger = logging.getLogger(__name__)
_SELECT_ROUNDS = 10  # embedding rounds of a selection whose pins fail to embed
#: The backbone of a new store when none is named.
DEFAULT_BACKBONE = "effnet_lite0"


@dataclass
class IndexReport:
    """What one ``index`` run did (JSON schema in the README)."""

    store: str
    corpus: str
    format: str
    backbone: str
    found: int
    added: int
    already_present: int
    updated: int  # of those, pins whose metadata changed (title, category, board, path, ...)
    moved: int  # of those, pins whose image path changed (their corpus moved)
    skipped: int
    sampled_out: int
    embedded: int
    embed_failed: int
    embed_seconds: float
    images_per_s: float
    index: str
    factory: str
    metric: str
    ntotal: int
    index_action: str  # built, rebuilt, updated (+N), unchanged
    index_seconds: float
    title_vectors: int = 0  # title vectors embedded in every text space (CLIP, align): new
    # pins', edited titles', and any missing or made by another encoder
    stale_heads: list[str] = field(default_factory=list)  # heads trained before these vectors

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _index_options(index: IndexConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a caller asked for: a mapping as given, a config's non-default fields."""
    if index is None:
        return {}
    if isinstance(index, IndexConfig):
        defaults = asdict(IndexConfig())
        return {k: v for k, v in asdict(index).items() if v != defaults[k]}
    config = IndexConfig(**index)  # validate names and values now, with a clear error
    return {k: getattr(config, k) for k in index}  # as the config holds them (factory stripped)


def index_corpus(
    corpus: str | Path | None,
    store_path: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    ingest: IngestConfig | None = None,
    embed: EmbedConfig | None = None,
    index: IndexConfig | Mapping[str, Any] | None = None,
    index_name: str | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
    select: Callable[[Store], np.ndarray] | None = None,
) -> IndexReport:
    """Ingest a corpus into a store (created if needed), embed new pins and index them.

    Args:
        corpus: a tree, folder or manifest; None to (re)embed and index what the store holds.
        store_path: the store folder.
        backbone: registry name or ``timm:<model>``.
        ingest: reading rules (format, categories, sampling).
        embed: embedding settings (batch, device, normalisation, dtype, weights).
        index: index settings: a mapping of only the settings to change (the rest come from
            the existing index, or the defaults for a new one), or an :class:`IndexConfig`,
            whose fields other than the defaults are those settings (a field left at its
            default keeps the existing index's: ask ``{"metric": "cosine"}`` to go back to
            it). Asking another factory or metric than the existing index has rebuilds it.
        index_name: defaults to the backbone name (or the backbone's only index). Every other
            index over the backbone is brought up to date as well.
        rebuild: rebuild the index from all stored vectors instead of adding to it.
        progress: ``callback(done, total)`` during embedding.
        select: embed only the pins whose keys ``select(store)`` returns (a study's sample;
            called again when embedding failures removed some of them); the other pins stay
            in the catalog without vectors.
    """
    ingest = ingest or IngestConfig()
    embed = embed or EmbedConfig()
    root = Path(store_path)
    fresh = not (root / "store.json").is_file()  # this call creates the store
    if fresh and corpus is None:
        raise ValueError(f"there is no store at {root}; give a corpus to create one")
    existed = root.exists()
    # Everything that can be refused is checked before the corpus is read: index options,
    # then the backbone and its weights (built once, used for the embedding below).
    asked = _index_options(index)
    if "factory" in asked:
        check_factory_syntax(str(asked["factory"]))
    if asked.get("device") == "gpu" and gpu_count() == 0:
        raise DeviceError("index device 'gpu' was asked for but faiss sees no GPU")
    model = create_backbone(backbone, weights=embed.weights, device=resolve_device(embed.device))
    try:
        with Store.open(store_path, create=True) as store:
            return index_into(
                store, corpus, model=model, backbone=backbone, ingest=ingest, embed=embed,
                asked=asked, index_name=index_name, rebuild=rebuild, progress=progress,
                select=select,
            )  # fmt: skip
    except BaseException:
        if fresh:  # a failed first run leaves no empty store behind (bad option, bad corpus)
            _remove_if_empty(root, keep_folder=existed)
        raise


def index_into(
    store: Store,
    corpus: str | Path | None,
    *,
    model: Backbone,
    backbone: str,
    ingest: IngestConfig,
    embed: EmbedConfig,
    asked: Mapping[str, Any],
    index_name: str | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
    select: Callable[[Store], np.ndarray] | None = None,
    only: Callable[[Store], np.ndarray] | None = None,
) -> IndexReport:
    """:func:`index_corpus`'s work in a store opened for writing, with the backbone built
    (``model``) and the index settings asked for already checked (``asked``): several runs
    under one writer's open (``pinsearch add``, one per backbone). ``only``: instead of a
    ``select`` to fill, the pins to embed once, as every pin is embedded without either
    (one that fails is recorded skipped and stays out: ``add``'s new pins)."""
    store.check_index_name(index_name or backbone)  # before the corpus is read
    owner = (store.catalog.get_index(index_name) or {}).get("backbone") if index_name else None
    if (owner is not None and owner != backbone) or "#" in (index_name or ""):
        raise ValueError(  # (it was rebuilt from this backbone's vectors, or updated with them)
            f"index {index_name!r} "
            + (f"belongs to {owner!r}" if owner else "names a title space")
            + f"; choose another --index-name for {backbone!r}"
        )
    run = store.catalog.get_embedding(backbone)
    if model.new_run_refusal and run is None:
        raise BackboneMismatchError(model.new_run_refusal)  # (a run made before goes on)
    recorded = spec_as_recorded(model.spec, run)
    if recorded != model.spec:  # (built before the store was open)
        model = create_backbone(recorded, weights=embed.weights, device=model.device)
    found = added = already = skipped = sampled_out = 0
    fmt = ""
    changes = StoredChanges()
    if corpus is not None:
        result = read_corpus(corpus, ingest, exclude_ids=store.catalog.pin_id_paths())
        _, added, changes = store.catalog.add_ingest(
            result, json.dumps(asdict(ingest), default=str)
        )
        found, already = result.found, result.already_present
        skipped, sampled_out, fmt = len(result.skipped), result.sampled_out, result.format
    if store.catalog.count_pins() == 0:
        raise ValueError(
            f"store {store.root} has no pins to index "
            f"({skipped} of {found} found were skipped; see pinsearch info)"
        )
    # heads trained on this backbone's vectors will not know the pins it embeds now:
    # marked before, so a run stopped after the embedding cannot leave them unmarked
    if (
        select is None
        and only is None
        and len(store.vectors(backbone)) < store.catalog.count_pins()
    ):
        store.mark_heads_stale([backbone])
    if select is not None:
        report = _embed_selection(store, backbone, model, embed, select, progress)
    else:
        keys = None if only is None else only(store)
        report = embed_store(store, backbone, embed, progress=progress, backbone=model, keys=keys)
    # (named; a selection's marked now: a run stopped later embeds nothing again)
    stale = store.mark_heads_stale([backbone]) if report.embedded else []
    # After a remove of every pin the indexes' settings were kept: built again, but for the
    # one this run builds with new settings (once, from its kept ones and those asked)
    emptied = store.emptied_indexes_of(backbone)
    target = index_name or (backbone if backbone in emptied or not emptied else next(iter(emptied)))
    kept = emptied.get(target) if rebuild or asked else None
    revived = store.revive_indexes(backbone, but=target if kept is not None else None)
    names = store.index_names(backbone)
    # The backbone's index: the one of its name, else its first (a custom name).
    name = index_name or (backbone if backbone in names or not names else names[0])
    existing = store.catalog.get_index(name)
    saved = json.loads(existing["config"]) if existing is not None else (kept or {})
    config = IndexConfig(**{**saved, **asked})
    differs = [k for k in ("factory", "metric") if k in asked and asked[k] != saved.get(k)]
    if existing is not None and differs and not rebuild:
        rebuild = True
        _logger.info("index %s: %s changed; rebuilding", name, differs)
    if existing is None or rebuild:
        built = store.build_index(backbone, config, name=name)
        action = "rebuilt" if existing is not None else "built"
    else:
        built, n_new = store.update_index(name)
        action = "built" if name in revived else f"updated (+{n_new})" if n_new else "unchanged"
        settings = sorted(k for k in asked if asked[k] != saved.get(k))
        if settings:  # placement and search settings (fp16, device, nprobe, ...):
            built.config = config  # saved with the index, in effect when it loads
            store.save_index(built, name)
            store.forget_cached(name)  # this copy was placed with the old settings
            action += f", settings changed: {', '.join(settings)}"
    for other in names:  # the backbone's other indexes take the new pins too
        if other != name:
            store.update_index(other)
    titles = refresh_titles(store)  # (new pins' too, in every text space)
    stale = sorted({*stale, *changes.stale_heads})  # (and heads of changed labels)
    return IndexReport(
        store=str(store.root),
        corpus=str(corpus) if corpus is not None else "",
        format=fmt,
        backbone=backbone,
        found=found,
        added=added,
        already_present=already,
        updated=len(changes.pins),
        moved=changes.moved,
        skipped=skipped,
        sampled_out=sampled_out,
        embedded=report.embedded,
        embed_failed=report.failed,
        embed_seconds=round(report.seconds, 3),
        images_per_s=round(report.images_per_s, 1),
        index=name,
        factory=built.factory,
        metric=built.config.metric,
        ntotal=built.ntotal,
        index_action=action,
        index_seconds=round(built.build_seconds, 3),
        title_vectors=titles,
        stale_heads=stale,
    )


def run_settings(run: Mapping[str, Any]) -> dict[str, Any]:
    """The embedding settings a later run over the same backbone must repeat: its local
    weights file (if any), normalisation and stored dtype."""
    from pinsearch.search import run_weights_file

    return {
        "weights": run_weights_file(dict(run)),
        "normalize": bool(run.get("normalize")),
        "dtype": str(run.get("dtype") or "float32"),
    }


def default_backbone(store_path: str | Path) -> str:
    """The backbone ``index`` uses when none is named: the store's only one, or
    :data:`DEFAULT_BACKBONE` for a new store (or one with none yet).

    Raises:
        ValueError: the store has several.
    """
    root = Path(store_path)
    if not (root / "store.json").is_file():
        return DEFAULT_BACKBONE
    with Store.open(root, read_only=True, verify=False) as store:
        known = store.backbones()
    if len(known) > 1:
        raise ValueError(f"store {root} has several backbones {known}; name one (--backbone)")
    return known[0] if known else DEFAULT_BACKBONE


def stored_run_settings(store_path: str | Path, backbone: str) -> dict[str, Any]:
    """:func:`run_settings` of a store's run for ``backbone``; ``{}`` without one."""
    root = Path(store_path)
    if not (root / "store.json").is_file():
        return {}
    with Store.open(root, read_only=True, verify=False) as store:  # the writer verifies
        run = store.catalog.get_embedding(backbone)
    return run_settings(run) if run else {}


def _embed_selection(
    store: Store,
    backbone: str,
    model: Backbone,
    embed: EmbedConfig,
    select: Callable[[Store], np.ndarray],
    progress: Progress | None,
) -> EmbedReport:
    """Embed the pins ``select`` picks. An image that fails to embed takes its pin out of the
    store, and the pick takes others in its place (a study's sample keeps the rest: see
    :func:`pinsearch.labels.labelled_pins`): those are embedded in turn, until every pin it
    names has a vector."""
    done: list[EmbedReport] = []
    tried = np.empty(0, np.int64)
    while True:
        missing = np.setdiff1d(select(store), store.vectors(backbone).keys())
        if done and missing.size == 0:
            break
        stuck = np.intersect1d(missing, tried)
        if stuck.size:  # failed, yet kept: another backbone has their vectors
            raise ValueError(
                f"{stuck.size} selected pins fail to embed with {backbone!r} (see pinsearch "
                "info) but stay in the store, since another backbone has their vectors; "
                "remove them (pinsearch remove --pin) or fix their files"
            )
        if len(done) == _SELECT_ROUNDS:
            raise ValueError(
                f"{backbone!r}: the pins drawn in place of those that failed to embed kept "
                f"failing for {_SELECT_ROUNDS} rounds (see pinsearch info)"
            )
        done.append(
            embed_store(store, backbone, embed, progress=progress, backbone=model, keys=missing)
        )
        tried = np.union1d(tried, missing)
    seconds = sum(r.seconds for r in done)
    embedded = sum(r.embedded for r in done)
    return replace(
        done[-1],
        embedded=embedded,
        failed=sum(r.failed for r in done),
        already=done[0].already,
        seconds=seconds,
        images_per_s=embedded / seconds if seconds > 0 else 0.0,
    )


def _remove_if_empty(root: Path, *, keep_folder: bool) -> None:
    """Delete a store this run created if nothing was recorded in it (no pin, no ingest: a
    corpus whose pins were all skipped keeps its store, to say why in ``pinsearch info``)."""
    try:
        with Store.open(root, read_only=True, verify=False) as store:
            if store.snapshot:  # another writer has started working in it meanwhile
                return
            if store.catalog.scalar("SELECT count(*) FROM ingests") or store.catalog.count_pins():
                return
    except Exception:  # unreadable: left for the user to look at
        return
    if not keep_folder:
        shutil.rmtree(root)
        return
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
