"""Text-to-image retrieval evaluation on image-caption data (``pinsearch evaluate``).

A retrieval study (``kind = "retrieval"`` in its TOML) indexes a folder of images, splits the
images into train and test (seeded), and measures how well each backbone's text encoder finds
the image of every test caption among the test images: recall@1/5/10, median and mean rank,
with chance levels beside them. The text encoder is the backbone's CLIP text tower, or a
``pinsearch align`` projection trained on the *train* images' captions only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.store import Store
from pinsearch.vectors import unit_rows

__all__ = ["RetrievalConfig", "load_retrieval", "run_retrieval"]


@dataclass
class RetrievalConfig:
    """A retrieval study (see eval/studies/flickr8k.toml)."""

    name: str
    store: str
    captions: str  # CSV: image (or path / pin_id), caption
    corpus: str | None = None  # images to index first (a folder or manifest)
    backbones: list[str] = field(default_factory=lambda: ["effnet_lite0"])
    text: str = "auto"  # auto (CLIP tower if the backbone has one, else align), clip, align
    train_images: int = 600  # images whose captions train an alignment; the rest are the test
    seed: int = 0
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    align: dict[str, Any] = field(default_factory=dict)  # AlignConfig overrides


def load_retrieval(data: dict[str, Any], base: Path) -> RetrievalConfig:
    """Build a config from a parsed TOML (``kind`` already checked); paths relative to cwd.

    Raises:
        ValueError: unknown or missing keys, naming them.
    """
    from pinsearch.align import AlignConfig
    from pinsearch.eval.configs import config_from_toml

    config = config_from_toml(
        RetrievalConfig, data, base, "retrieval study", ("name", "store", "captions")
    )
    bad = sorted(set(config.align) - {f.name for f in fields(AlignConfig)})
    if bad:
        raise ValueError(f"{base}: unknown [align] keys {bad}")
    try:  # (values checked now: they failed mid-study, or trained nothing)
        AlignConfig(**config.align)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{base}: [align]: {exc}") from None
    if config.text not in ("auto", "clip", "align"):
        raise ValueError(f"{base}: text must be auto, clip or align, got {config.text!r}")
    _check_train_images(config, str(base))
    return config


def _check_train_images(config: RetrievalConfig, where: str) -> None:
    from pinsearch.text import _is_clip  # (an unknown backbone: False, named when it runs)

    uses_align = config.text == "align" or (
        config.text == "auto" and not all(_is_clip(b) for b in config.backbones)
    )
    if uses_align and config.train_images < 2:
        raise ValueError(
            f"{where}: train_images = {config.train_images}: an alignment learns from the "
            "captions of at least 2 train images"
        )


def run_retrieval(
    config: RetrievalConfig, out_dir: str | Path | None = None, **overrides: Any
) -> dict[str, Any]:
    """Run a retrieval study and write ``report.md`` + ``results.json``; returns the summary."""
    from pinsearch.align import AlignConfig, caption_pairs, fit_alignment
    from pinsearch.backbones import check_weights, get_backbone_spec
    from pinsearch.eval.metrics import retrieval_metrics
    from pinsearch.pipeline import index_corpus, stored_run_settings
    from pinsearch.text import text_encoder_for

    _check_train_images(config, config.name)  # (a config made in Python, not loaded)
    modes = {}
    for backbone in config.backbones:  # before any work
        is_clip = get_backbone_spec(backbone).source == "open_clip"
        modes[backbone] = config.text if config.text != "auto" else ("clip" if is_clip else "align")
        if modes[backbone] == "clip" and not is_clip:
            raise ValueError(
                f'{config.name}: text = "clip" but backbone {backbone!r} has no CLIP text '
                'tower; use text = "align" (or "auto")'
            )
    if config.corpus is not None:
        for backbone in config.backbones:  # every backbone's weights, before the first embeds
            check_weights(backbone, stored_run_settings(config.store, backbone).get("weights"))
        for backbone in config.backbones:
            index_corpus(config.corpus, config.store, backbone=backbone)
    results: dict[str, dict[str, Any]] = {}
    # Read only: the alignments are trained on the train images in memory; the store's own
    # (pinsearch align) stays as it is
    with Store.open(config.store, read_only=True) as store:
        keys, captions, unmatched = caption_pairs(store, config.captions)
        # only images every backbone has a vector of (a classification study's sample embeds
        # some pins only): the others would be drawn into the split and queried by no caption
        held = None
        for backbone in config.backbones:
            have = store.vectors(backbone).keys()
            held = have if held is None else np.intersect1d(held, have)
        embedded = np.isin(keys, held)
        no_vector = int((~embedded).sum())
        keys = keys[embedded]
        captions = [c for c, m in zip(captions, embedded.tolist()) if m]
        images = np.unique(keys)
        if config.train_images >= len(images):
            raise ValueError(
                f"{config.name}: train_images={config.train_images} leaves no test images "
                f"({len(images)} images have captions)"
            )
        order = np.random.default_rng(config.seed).permutation(images)
        train, test = np.sort(order[: config.train_images]), np.sort(order[config.train_images :])
        for backbone in config.backbones:
            mode = modes[backbone]
            start = time.perf_counter()
            report = None
            if mode == "align":
                # (the study's seed, unless its [align] table gives one, seeds the training)
                align_cfg = AlignConfig(**{"seed": config.seed, **config.align, **overrides})
                encoder, report = fit_alignment(  # (trained in memory)
                    store, backbone, align_cfg, captions=config.captions, keys=train
                )
            else:
                encoder = text_encoder_for(store, backbone, device="auto")
            vectors, vkeys = store.vectors(backbone).load(test)
            vectors = unit_rows(vectors)
            in_test = np.isin(keys, vkeys)
            queries = encoder.encode([c for c, m in zip(captions, in_test) if m])
            relevant = np.searchsorted(vkeys, keys[in_test])
            m = retrieval_metrics(queries @ vectors.T, relevant, tuple(config.ks))
            results[backbone] = {
                "text": encoder.name,
                "metrics": m,
                "train_images": len(train) if mode == "align" else 0,
                "align": report.to_dict() if report is not None else None,
                "seconds": round(time.perf_counter() - start, 2),
            }
    summary = {
        "study": config.name,
        "kind": "retrieval",
        "images": len(images),
        "test_images": len(test),
        "captions": len(captions),
        "unmatched_captions": unmatched,
        "captions_without_vector": no_vector,
        "results": results,
    }
    from pinsearch.eval.configs import write_study_files

    return write_study_files(config.name, out_dir, summary, _markdown(config, summary))


def _markdown(config: RetrievalConfig, summary: dict[str, Any]) -> str:
    ks = config.ks
    lines = [
        f"# Text-to-image retrieval: {config.name}",
        "",
        f"{summary['images']} images with {summary['captions']} captions "
        f"({summary['unmatched_captions']} caption rows matched no image, "
        f"{summary['captions_without_vector']} named an image some backbone has no vector of); "
        + (
            f"{config.train_images} images train the alignment (seed {config.seed}), each of "
            if any(r["align"] is not None for r in summary["results"].values())
            else f"{config.train_images} images held out (seed {config.seed}), each of "
        )
        + f"the {summary['test_images']} test images' captions queries the test images.",
        "",
        "| backbone | text encoder | "
        + " | ".join(f"R@{k}" for k in ks)
        + " | median rank | mean rank |",
        "|---|---|" + "---:|" * (len(ks) + 2),
    ]
    for backbone, r in summary["results"].items():
        m = r["metrics"]
        lines.append(
            f"| {backbone} | {r['text']} | "
            + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in ks)
            + f" | {m['median_rank']:g} | {m['mean_rank']:.1f} |"
        )
    any_m = next(iter(summary["results"].values()))["metrics"]
    lines.append(
        "| chance | | "
        + " | ".join(f"{any_m[f'chance_recall@{k}']:.3f}" for k in ks)
        + f" | {(summary['test_images'] + 1) / 2:g} | |"
    )
    lines += ["", "Settings: `" + json.dumps(asdict(config)) + "`", ""]
    return "\n".join(lines)
