"""The offline demo with the real bundled EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.demo import knn_leave_one_out
from pinsearch.search import PinSearcher
from pinsearch.store import Store


def test_demo_runs_offline_with_real_weights(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.stdout)
    assert report["pins"] == 96 and len(report["categories"]) == 6
    assert report["index"]["backbone"] == "effnet_lite0"
    with Store.open(report["store"], read_only=True) as store:
        emb = store.catalog.get_embedding("effnet_lite0")
        assert emb is not None and emb["spec"]["weights"].startswith("bundled:")
    # Real ImageNet features separate the generated categories far above chance.
    assert report["chance"] < 0.2
    assert report["knn_accuracy"] > 0.8
    for ex in report["examples"]:
        assert len(ex["hits"]) == 5 and ex["query"] not in [h["pin_id"] for h in ex["hits"]]
    # Text search learned from the titles finds each category by its name in words.
    assert report["text_encoder"] == "align:minilm->effnet_lite0"
    assert report["text_precision"] > 0.5  # chance is 1/6
    assert [len(ex["hits"]) for ex in report["text_examples"]] == [5, 5]
    # Running it again reuses the store and its alignment: nothing is embedded twice.
    again = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--json", "--no-text"])
    again = json.loads(again.stdout)
    assert again["index"]["embedded"] == 0
    assert (again["text_encoder"], again["text_precision"], again["text_examples"]) == (
        None,
        None,
        [],
    )


def test_knn_leave_one_out_matches_a_manual_vote(built_store: object) -> None:
    with Store.open(built_store.path, read_only=True) as store:  # type: ignore[attr-defined]
        searcher = PinSearcher(store)
        acc, per_cat = knn_leave_one_out(searcher, k=1)
        vectors, keys = store.vectors(searcher.backbone).load()
        meta = store.catalog.pins_by_key(keys.tolist())
        import numpy as np

        x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        nearest = sims.argmax(axis=1)
        manual = np.mean([meta[int(keys[i])]["category"] == meta[int(keys[j])]["category"]
                          for i, j in enumerate(nearest)])  # fmt: skip
        assert acc == manual
        assert set(per_cat) == {"food_drink", "architecture", "cars_motorcycles"}
