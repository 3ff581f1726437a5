"""Compact vectors that keep accuracy (source document 003): what each smaller form of a
backbone's vectors costs in memory and in quality.

Variants of the stored vectors, every one fitted on the training pins only:

- ``float32`` (the reference), ``float16``;
- ``pcaN``: PCA to N dimensions (scikit-learn), N float32 values a vector, decoded with the
  mean added back (as the other variants are decoded);
- ``sq8``: FAISS 8-bit scalar quantisation (one byte per dimension);
- ``pqM``: FAISS product quantisation, M sub-vectors of 8 bits (M bytes per vector; M must
  divide the dimension, other values are skipped and reported).

For each: bytes per vector, compression against float32, KNN recall@k (the test pins'
k nearest training pins in the variant's space vs exact cosine neighbours in float32), and the
test macro-F1 of heads trained on the variant (fixed hyperparameters, so that only the vectors
change). ``kind = "compact"`` study files run it (eval/studies/pins-compact.toml).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pinsearch.eval.openset import HEAD_DEFAULTS, head_params
from pinsearch.store import Store
from pinsearch.vectors import unit_rows

__all__ = ["CompactConfig", "compress", "load_compact", "run_compact"]

#: The fixed head settings of the open-set study, so both studies train the same heads.
HEADS: dict[str, dict[str, Any]] = {h: HEAD_DEFAULTS[h] for h in ("knn", "lsvm", "mlp")}


@dataclass
class CompactConfig:
    name: str
    store: str
    backbones: list[str] = field(default_factory=lambda: ["effnet_lite0"])
    variants: list[str] = field(
        default_factory=lambda: [
            "float32", "float16", "pca256", "pca128", "pca64", "pca32", "sq8", "pq128", "pq64",
            "pq32", "pq16",
        ]
    )  # fmt: skip
    heads: list[str] = field(default_factory=lambda: ["knn", "lsvm"])
    label: str = "category"
    drop: list[str] = field(default_factory=lambda: ["none", "other"])
    test_size: float = 0.2
    k: int = 10  # recall@k
    per_class: int | None = None  # sample at most N pins per label (seeded): a million-pin store
    min_per_class: int = 10
    seed: int = 0


def load_compact(data: dict[str, Any], path: Path) -> CompactConfig:
    """Config from a parsed TOML (``kind = "compact"``).

    Raises:
        ValueError: unknown keys, heads or variants; missing fields.
    """
    from pinsearch.eval.configs import config_from_toml

    config = config_from_toml(CompactConfig, data, path, "compact study", ("name", "store"))
    bad_heads = sorted(set(config.heads) - set(HEADS))
    if bad_heads:
        raise ValueError(f"{path}: unknown heads {bad_heads}; known: {sorted(HEADS)}")
    for v in config.variants:
        _parse(v)
    if not 0.0 < config.test_size < 1.0:
        raise ValueError(f"{path}: test_size must be in (0, 1), got {config.test_size}")
    return config


def _parse(variant: str) -> tuple[str, int]:
    for prefix in ("pca", "pq"):
        if variant.startswith(prefix) and variant[len(prefix) :].isdigit():
            if int(variant[len(prefix) :]) < 1:
                raise ValueError(f"compact variant {variant!r}: {prefix}N needs N >= 1")
            return prefix, int(variant[len(prefix) :])
    if variant in ("float32", "float16", "sq8"):
        return variant, 0
    raise ValueError(f"unknown compact variant {variant!r}: float32, float16, pcaN, sq8 or pqM")


def compress(
    variant: str, train: np.ndarray, test: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(train, test) as the variant sees them (decoded back to float32), and bytes per vector.

    Raises:
        ValueError: the variant does not fit the dimension (PCA wider than the data, a PQ whose
            M does not divide it).
    """
    import faiss

    kind, n = _parse(variant)
    d = train.shape[1]
    train = np.ascontiguousarray(train, dtype=np.float32)
    test = np.ascontiguousarray(test, dtype=np.float32)
    if kind == "float32":
        return train, test, 4.0 * d
    if kind == "float16":
        return train.astype(np.float16).astype(np.float32), test.astype(np.float16).astype(
            np.float32
        ), 2.0 * d  # fmt: skip
    if kind == "pca":
        if n >= min(d, len(train)):
            raise ValueError(f"{variant}: needs fewer than {min(d, len(train))} dimensions")
        from sklearn.decomposition import PCA

        pca = PCA(n_components=n, random_state=seed).fit(train)

        def decoded(x: np.ndarray) -> np.ndarray:  # N floats a vector, the mean added back:
            # cosine between centred projections is another similarity (on non-negative CNN
            # features a near-lossless pca127 of 128-d vectors kept 0.86 of the neighbours)
            return pca.inverse_transform(pca.transform(x)).astype(np.float32)

        return decoded(train), decoded(test), 4.0 * n
    if kind == "sq8":
        sq = faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit)
        sq.train(train)
        return sq.decode(sq.compute_codes(train)), sq.decode(sq.compute_codes(test)), float(d)
    if d % n:
        raise ValueError(f"{variant}: {n} sub-vectors do not divide {d} dimensions")
    if len(train) < 256:
        raise ValueError(f"{variant}: 8-bit codebooks need 256+ training vectors, got {len(train)}")
    pq = faiss.ProductQuantizer(d, n, 8)
    pq.cp.seed = seed & 0x7FFFFFFF  # the study's seed (FAISS's k-means takes a C int)
    pq.train(train)
    return pq.decode(pq.compute_codes(train)), pq.decode(pq.compute_codes(test)), float(n)


def run_compact(config: CompactConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Measure every variant; write ``report.md`` and ``results.json``; return the summary."""
    import faiss
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    from pinsearch.heads import create_head
    from pinsearch.labels import labelled_pins, load_vectors

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with Store.open(config.store, read_only=True) as store:
        keys, labels, _ = labelled_pins(
            store, config.label, drop=tuple(config.drop), per_class=config.per_class,
            min_per_class=config.min_per_class, seed=config.seed,
            context=f"compact study {config.name!r}: ",
        )  # fmt: skip
        labels = labels.astype(str)
        tr, te = train_test_split(
            np.arange(len(keys)), test_size=config.test_size, stratify=labels,
            random_state=config.seed,
        )  # fmt: skip
        if config.k > len(tr):
            raise ValueError(
                f"compact study {config.name!r}: k = {config.k} (recall@k) exceeds the "
                f"{len(tr)} training pins the neighbours are drawn from"
            )
        for backbone in config.backbones:
            X = load_vectors(store, backbone, keys, False)
            exact = faiss.knn(
                unit_rows(X[te]), unit_rows(X[tr]), config.k, faiss.METRIC_INNER_PRODUCT
            )[1]
            base_bytes = 4.0 * X.shape[1]
            for variant in config.variants:
                try:
                    a, b, nbytes = compress(variant, X[tr], X[te], config.seed)
                except ValueError as exc:
                    skipped.append(f"{backbone} {variant}: {exc}")
                    continue
                got = faiss.knn(unit_rows(b), unit_rows(a), config.k, faiss.METRIC_INNER_PRODUCT)[1]
                recall = np.mean([len(set(g) & set(e)) / config.k for g, e in zip(got, exact)])
                row = {
                    "backbone": backbone,
                    "variant": variant,
                    "bytes": nbytes,
                    "compression": round(base_bytes / nbytes, 1),
                    f"recall@{config.k}": round(float(recall), 4),
                }
                for head in config.heads:
                    params = head_params(head, config.seed, len(tr))
                    model = create_head(head, **params).fit(a, labels[tr])
                    row[head] = round(
                        float(f1_score(labels[te], model.predict(b), average="macro")), 4
                    )
                rows.append(row)
    summary = {
        "study": config.name,
        "kind": "compact",
        "pins": len(keys),
        "train": len(tr),
        "test": len(te),
        "results": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 1),
    }
    from pinsearch.eval.configs import write_study_files

    return write_study_files(config.name, out_dir, summary, _markdown(config, summary))


def _markdown(config: CompactConfig, summary: dict[str, Any]) -> str:
    k = f"recall@{config.k}"
    lines = [
        f"# Compact vectors: `{config.name}`",
        "",
        f"Store `{config.store}`: {summary['pins']} pins, {summary['train']} train / "
        f"{summary['test']} test (stratified, seed {config.seed}). Each variant is fitted on "
        f"the training pins; {k} compares the test pins' nearest training pins with exact "
        "float32 cosine neighbours; heads use fixed hyperparameters "
        f"({', '.join(f'{h} {HEADS[h]}' for h in config.heads)}).",
        "",
        f"| backbone | variant | bytes / vector | compression | {k} | "
        + " | ".join(f"{h} macro-F1" for h in config.heads)
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(config.heads),
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['backbone']} | {r['variant']} | {r['bytes']:.0f} | {r['compression']}x | "
            f"{r[k]:.3f} | " + " | ".join(f"{r[h]:.3f}" for h in config.heads) + " |"
        )
    if summary["skipped"]:
        lines += ["", "Skipped: " + "; ".join(summary["skipped"])]
    lines += ["", "Settings: `" + json.dumps(asdict(config)) + "`", ""]
    return "\n".join(lines)
