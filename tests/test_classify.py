"""Heads kept in a store: training, listing, and classifying stored pins or new images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.classify import classify, list_heads, train_head
from pinsearch.cli.app import app
from pinsearch.errors import PinNotFoundError
from pinsearch.store import Store


def test_train_and_classify_stored_pins(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        info = train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1})
        assert info.name == "test_efficientnet/knn" and info.n_train == 24
        assert sorted(info.classes) == ["architecture", "cars_motorcycles", "food_drink"]
        pins = store.catalog.query("SELECT pin_id, category FROM pins ORDER BY pin_id")
        # 1-NN trained on every pin predicts each stored pin as itself: its own category.
        for pin in pins[:6]:
            result = classify(store, pin_id=pin["pin_id"])
            assert result.predicted == pin["category"]
            assert result.scores[0]["class"] == pin["category"] and result.scores[0]["score"] == 1
        assert [h.name for h in list_heads(store)] == ["test_efficientnet/knn"]
        assert store.info().heads[0]["head"] == "knn"


def test_classify_a_new_image_and_errors(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        with pytest.raises(ValueError, match="no trained head"):
            classify(store, pin_id="x")
        train_head(store, "test_efficientnet", "lsvm", {"C": 1.0}, name="svm")
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 3}, name="knn3")
        pin = store.catalog.query("SELECT pin_id, path, category FROM pins LIMIT 1")[0]
        with pytest.raises(ValueError, match="several heads"):
            classify(store, pin_id=pin["pin_id"])
        by_image = classify(store, image=pin["path"], head="knn3")
        by_pin = classify(store, pin_id=pin["pin_id"], head="knn3")
        assert by_image.predicted == by_pin.predicted
        assert len(classify(store, pin_id=pin["pin_id"], head="svm").scores) == 3
        with pytest.raises(PinNotFoundError):
            classify(store, pin_id="no-such-pin", head="svm")
        with pytest.raises(ValueError, match="exactly one"):
            classify(store, head="svm")


def test_classify_picks_the_backbones_head_and_says_when_it_is_stale(
    store_copy: Path, tree_corpus, make_tree, tmp_path: Path
) -> None:
    from pinsearch.pipeline import index_corpus

    index_corpus(None, store_copy, backbone="test_convnext")
    with Store.open(store_copy) as store:
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1})
        train_head(store, "test_convnext", "knn", {"n_neighbors": 1})
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        with pytest.raises(ValueError, match="several heads"):
            classify(store, pin_id=pin)
        got = classify(store, pin_id=pin, backbone="test_convnext")
        assert (got.head, got.backbone, got.stale) == ("test_convnext/knn", "test_convnext", False)
        with pytest.raises(ValueError, match="trained on 'test_efficientnet', not 'test_convnext'"):
            classify(store, pin_id=pin, head="test_efficientnet/knn", backbone="test_convnext")
        with pytest.raises(ValueError, match="no vectors for 'effnet_lite0'"):
            classify(store, pin_id=pin, backbone="effnet_lite0")
    more = make_tree(tmp_path / "more", seed=7, pins_per_board=1)
    index_corpus(more.root, store_copy, backbone="test_convnext")
    with Store.open(store_copy, read_only=True) as store:
        assert classify(store, pin_id=pin, backbone="test_convnext").stale
        assert not classify(store, pin_id=pin, backbone="test_efficientnet").stale


def test_train_on_the_pins_a_sample_embedded(store_copy: Path) -> None:
    from pinsearch.pipeline import index_corpus

    def keys(store: Store, where: str) -> np.ndarray:  # (as a study's sample is embedded)
        rows = store.catalog.query(f"SELECT pin_key FROM pins WHERE {where} ORDER BY pin_key")
        return np.array([r["pin_key"] for r in rows], dtype=np.int64)

    index_corpus(None, store_copy, backbone="test_convnext",
                 select=lambda s: keys(s, "category = 'food_drink'"))  # fmt: skip
    with Store.open(store_copy) as store:
        with pytest.raises(ValueError, match=r"\d+ pins have no .* --only-embedded"):
            train_head(store, "test_convnext", "knn", {"n_neighbors": 1})
        with pytest.raises(ValueError, match="1 'category' label"):  # one class: no head
            train_head(store, "test_convnext", "knn", {"n_neighbors": 1}, only_embedded=True)
    index_corpus(None, store_copy, backbone="test_convnext",
                 select=lambda s: keys(s, "pin_key % 2 = 0"))  # fmt: skip
    with Store.open(store_copy) as store:
        info = train_head(store, "test_convnext", "knn", {"n_neighbors": np.int64(1)},
                          only_embedded=True)  # fmt: skip
        assert info.n_train == len(store.vectors("test_convnext")) < 24
        assert info.params["n_neighbors"] == 1  # (a numpy integer: saved, and FAISS takes it)
        pin = store.catalog.query("SELECT pin_id FROM pins WHERE pin_key = 0")[0]["pin_id"]
        assert classify(store, pin_id=pin, head=info.name).predicted


def test_cli_train_and_query_classify(store_copy: Path) -> None:
    runner = CliRunner()
    args = ["train", "-s", str(store_copy), "--head", "mlp", "--param", "hidden=[16, 8]"]
    res = runner.invoke(app, [*args, "--param", "max_epochs=5", "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    info = json.loads(res.stdout)
    assert info["params"]["hidden"] == [16, 8] and info["head"] == "mlp"
    with Store.open(store_copy, read_only=True) as store:
        pin_id = store.catalog.query("SELECT min(pin_id) AS p FROM pins")[0]["p"]
    res = runner.invoke(app, ["query", "-s", str(store_copy), "--pin", pin_id, "--classify",
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["predicted"] in {"architecture", "cars_motorcycles", "food_drink"}
    assert abs(sum(s["score"] for s in out["scores"]) - 1.0) < 1e-4  # MLP probabilities
    bad = runner.invoke(app, ["train", "-s", str(store_copy), "--param", "C"])
    assert bad.exit_code != 0 and "NAME=VALUE" in bad.output


def test_study_cells_become_store_heads(tmp_path: Path) -> None:
    import numpy as np

    from pinsearch.eval.bench import synthetic_store
    from pinsearch.eval.study import StudyConfig, run_study

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    x[np.arange(120), np.arange(120) % 3] += 4
    synthetic_store(tmp_path / "s", x, categories=3)
    cfg = StudyConfig(name="st", store=str(tmp_path / "s"), backbones=("synthetic",),
                      heads={"knn": {"n_neighbors": [3]}}, folds=2)  # fmt: skip
    run_study(cfg)
    with Store.open(tmp_path / "s", read_only=True) as store:
        heads = list_heads(store)
        assert [h.name for h in heads] == ["st/synthetic/knn"]
        assert heads[0].source.startswith("study:st cell ")  # the cell it came from
        assert classify(store, pin_id="p000000001").predicted == "cat01"


def test_vectors_of_a_backbone_the_store_lacks_are_named(built_store) -> None:
    import numpy as np

    from pinsearch.labels import load_vectors

    with Store.open(built_store.path, read_only=True) as store:
        keys = np.array(store.vectors("test_efficientnet").keys()[:3])
        assert load_vectors(store, "test_efficientnet", keys).shape[0] == 3
        with pytest.raises(ValueError, match=r"has no 'nosuch' vectors .*--backbone nosuch"):
            load_vectors(store, "test_efficientnet+nosuch", keys)
