"""Compact vectors: each variant's memory and decoding, the study on a planted store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.eval.bench import synthetic_store
from pinsearch.eval.compact import CompactConfig, compress, run_compact


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 64)).astype(np.float32), rng.normal(size=(50, 64)).astype(
        np.float32
    )


@pytest.mark.parametrize(
    ("variant", "nbytes", "dim"),
    [("float32", 256, 64), ("float16", 128, 64), ("pca16", 64, 64), ("sq8", 64, 64),
     ("pq8", 8, 64)],
)  # fmt: skip
def test_variants_memory_and_shape(data, variant: str, nbytes: float, dim: int) -> None:
    train, test = data
    a, b, got = compress(variant, train, test)
    assert got == nbytes and a.shape == (600, dim) and b.shape == (50, dim)
    # every variant decoded back into the same space (PCA with its mean added back)
    err = np.abs(b - test).mean() / np.abs(test).mean()
    assert err < {"float32": 1e-7, "float16": 1e-3, "sq8": 0.05, "pca16": 0.9, "pq8": 0.9}[variant]


def test_pq_codebooks_follow_the_studys_seed(data) -> None:
    train, test = data
    a0, _, _ = compress("pq8", train, test, seed=0)
    again, _, _ = compress("pq8", train, test, seed=0)
    a1, _, _ = compress("pq8", train, test, seed=1)
    assert np.array_equal(a0, again) and not np.array_equal(a0, a1)
    big, _, _ = compress("pq8", train, test, seed=2**32 - 1)  # (the largest seed a study takes)
    assert big.shape == a0.shape


def test_pca_keeps_the_neighbours_of_non_negative_features() -> None:
    # CNN features are non-negative: cosine between centred projections is another similarity
    # (it kept 0.86 of the neighbours at 127 of 128 dimensions); decoded, all of them
    rng = np.random.default_rng(2)
    low_rank = np.abs(rng.normal(size=(700, 8))) @ np.abs(rng.normal(size=(8, 32)))
    x = (low_rank + 0.01 * np.abs(rng.normal(size=(700, 32)))).astype(np.float32)
    train, test = x[:600], x[600:]
    a, b, _ = compress("pca8", train, test)  # nearly lossless: centred, 0.30 of them kept

    def top(base: np.ndarray, q: np.ndarray) -> np.ndarray:
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        return np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ base.T, axis=1)[:, :10]

    exact, approx = top(train, test), top(a, b)
    assert np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, approx)]) > 0.99


def test_variant_errors(data) -> None:
    train, test = data
    with pytest.raises(ValueError, match="do not divide"):
        compress("pq7", train, test)
    with pytest.raises(ValueError, match="fewer than"):
        compress("pca64", train, test)
    with pytest.raises(ValueError, match="unknown compact variant"):
        compress("zip", train, test)


def test_compact_study_on_planted_categories(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32)) * 3
    x = np.stack([centres[i % 4] + 0.5 * rng.normal(size=32) for i in range(400)])
    synthetic_store(tmp_path / "s", x.astype(np.float32), categories=4)
    config = CompactConfig(
        name="c", store=str(tmp_path / "s"), backbones=["synthetic"],
        variants=["float32", "float16", "pca8", "pq8", "pq5"], heads=["knn", "lsvm"],
    )  # fmt: skip
    summary = run_compact(config, tmp_path / "out")
    by = {r["variant"]: r for r in summary["results"]}
    assert by["float32"]["recall@10"] == 1.0 and by["float16"]["recall@10"] > 0.99
    assert by["float32"]["knn"] == pytest.approx(1.0) and by["pq8"]["compression"] == 16.0
    assert summary["skipped"] and "pq5" in summary["skipped"][0]
    assert "| synthetic | pca8 |" in (tmp_path / "out" / "report.md").read_text()


def test_compact_study_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    synthetic_store(tmp_path / "s", rng.normal(size=(120, 16)).astype(np.float32), categories=3)
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'kind = "compact"\nname = "c"\nstore = "{tmp_path / "s"}"\nbackbones = ["synthetic"]\n'
        'variants = ["float32", "sq8"]\nheads = ["knn"]\n'
    )
    out = CliRunner().invoke(app, ["evaluate", str(toml), "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    assert [r["variant"] for r in json.loads(out.output)["results"]] == ["float32", "sq8"]


def test_compact_settings_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    for line, message in (
        ("k = 0", "'k' must be at least 1"), ("test_size = 0", "test_size"),
        ('k = "10"', "'k' must be a whole number, got '10'"),
        ("k = true", "'k' must be a whole number"),
        ('variants = ["pq0"]', "pqN needs N >= 1"), ("variants = []", "list at least one"),
        ("test_size = nan", "'test_size' must be a number"),
        ('name = "../../up"', "'name' names its results folder"),
    ):  # fmt: skip
        name = "" if line.startswith("name") else 'name = "c"\n'
        toml.write_text(f'kind = "compact"\n{name}store = "{tmp_path}"\n{line}\n')
        out = CliRunner().invoke(app, ["evaluate", str(toml)])
        assert out.exit_code == 1 and message in str(out.exception), line
    rng = np.random.default_rng(3)
    synthetic_store(tmp_path / "s", rng.normal(size=(60, 8)).astype(np.float32), categories=3)
    config = CompactConfig(name="c", store=str(tmp_path / "s"), backbones=["synthetic"],
                           variants=["float32"], heads=["knn"], k=50, min_per_class=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"k = 50 .* exceeds the 48 training pins"):
        run_compact(config, tmp_path / "out")  # (FAISS pads with -1: recall came out 0.8)


def test_a_compact_study_of_fewer_training_pins_than_the_knn_default(tmp_path: Path) -> None:
    """9 training pins: the KNN head takes 9 neighbours (its default, 10, failed the study)."""
    rng = np.random.default_rng(4)
    synthetic_store(tmp_path / "s", rng.normal(size=(12, 16)).astype(np.float32), categories=2)
    config = CompactConfig(name="c", store=str(tmp_path / "s"), backbones=["synthetic"],
                           variants=["float32"], heads=["knn"], k=3, min_per_class=2,
                           test_size=0.25)  # fmt: skip
    summary = run_compact(config, tmp_path / "out")
    assert summary["train"] == 9 and 0 <= summary["results"][0]["knn"] <= 1
