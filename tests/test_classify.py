"""Heads kept in a store: training, listing, and classifying stored pins or new images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.check import check_store, repair_store
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


def _head_files(store_root: Path) -> list[str]:
    return sorted(f.name for f in (store_root / "heads").iterdir())


def test_heads_whose_names_are_made_alike_keep_their_own_files(store_copy: Path) -> None:
    """``my head``, ``my_head`` and ``my/head`` are one safe file name: each save writes files
    of its own, so no head answers with another's model; ``.`` is a name like any."""
    with Store.open(store_copy) as store:
        made = [("my head", "lsvm", "category"), ("my_head", "knn", "board"),
                ("my/head", "knn", "user_id"), (".", "knn", "category")]  # fmt: skip
        for name, head, label in made:
            params = {"n_neighbors": 1} if head == "knn" else {}
            train_head(store, "test_efficientnet", head, params, name=name, label=label)
        pin = store.catalog.query("SELECT pin_id, category, board, user_id FROM pins LIMIT 1")[0]
        assert classify(store, pin_id=pin["pin_id"], head="my head").predicted == pin["category"]
        assert classify(store, pin_id=pin["pin_id"], head="my_head").predicted == pin["board"]
        assert classify(store, pin_id=pin["pin_id"], head="my/head").predicted == pin["user_id"]
        assert classify(store, pin_id=pin["pin_id"], head=".").predicted == pin["category"]
        files = {r["file"] for r in store.catalog.query("SELECT file FROM heads")}
    assert len(files) == 4 and all(f.startswith("heads/") for f in files)
    assert not (store_copy / "heads.npz").exists()  # (".": its files were the store's root)
    assert check_store(store_copy).ok


def test_a_retrain_switches_files_at_once_and_the_second_writer_after_deletes_the_old(
    store_copy: Path,
) -> None:
    from pinsearch.heads import create_head, save_head

    with Store.open(store_copy) as store:
        train_head(store, "test_efficientnet", "lsvm", {"C": 1.0}, name="h")
        first = _head_files(store_copy)
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, name="h", label="board")
        assert len(_head_files(store_copy)) == 4  # the old files stay while this writer works
        # a retrain killed between its files and its catalog row: new files, the old row
        vectors, _ = store.vectors("test_efficientnet").load()
        killed = create_head("knn", n_neighbors=1).fit(vectors, np.arange(len(vectors)) % 2)
        save_head(killed, store_copy / "heads" / "h-killed")
        pin = store.catalog.query("SELECT pin_id, board FROM pins LIMIT 1")[0]
        assert classify(store, pin_id=pin["pin_id"], head="h").predicted == pin["board"]
    with Store.open(store_copy):  # the next writer: the killed save's files go, the
        left = _head_files(store_copy)  # replaced ones stay for readers of older snapshots
        assert set(first) <= set(left) and "h-killed.npz" not in left and len(left) == 4
    with Store.open(store_copy) as store:  # the second writer after: only the row's are left
        left = _head_files(store_copy)
        assert len(left) == 2 and not set(left) & set(first)
        assert classify(store, pin_id=pin["pin_id"], head="h").predicted == pin["board"]
    assert check_store(store_copy).ok


def test_a_reader_of_an_older_snapshot_loads_the_head_it_knows_after_a_retrain(
    store_copy: Path,
) -> None:
    with Store.open(store_copy) as store:
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, name="h")
        pin = store.catalog.query("SELECT pin_id, category, board FROM pins LIMIT 1")[0]
    writer = Store.open(store_copy)
    try:
        reader = Store.open(store_copy, read_only=True)  # the snapshot of before the retrain
        train_head(writer, "test_efficientnet", "knn", {"n_neighbors": 1}, name="h",
                   label="board")  # fmt: skip
    finally:
        writer.close()
    with Store.open(store_copy):  # one more write
        pass
    with reader:
        assert reader.snapshot
        assert classify(reader, pin_id=pin["pin_id"], head="h").predicted == pin["category"]


def test_check_names_a_head_whose_files_hold_other_classes(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, name="a")
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, name="b", label="board")
        rows = {r["name"]: r["file"] for r in store.catalog.query("SELECT name, file FROM heads")}
    for ext in (".npz", ".json"):  # b's files copied over a's
        (store_copy / (rows["a"] + ext)).write_bytes((store_copy / (rows["b"] + ext)).read_bytes())
    report = check_store(store_copy)
    assert [(f.where, f.problem) for f in report.errors] == [("head a", "classes")]
    assert "head a: forgotten (classes); train it again" in repair_store(store_copy).actions


def test_a_label_key_with_a_dot_or_a_slash_is_a_key(store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        store.catalog.connection.execute(
            """UPDATE pins SET extra = json_object('a.b', category, 'c/d', board, '$x', 1)"""
        )
        for key, column in (("a.b", "category"), ("c/d", "board")):
            info = train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, label=key,
                              name=key)  # fmt: skip
            stored = store.catalog.query(f"SELECT DISTINCT {column} AS v FROM pins")
            assert sorted(info.classes) == sorted(r["v"] for r in stored)


def test_cli_prints_labels_and_errors_with_brackets_as_they_are(
    store_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from test_cli import _main_error

    with Store.open(store_copy) as store:
        store.catalog.connection.execute("UPDATE pins SET category = '[' || category || ']'")
        train_head(store, "test_efficientnet", "knn", {"n_neighbors": 1}, name="[bold]")
        pin = store.catalog.query("SELECT pin_id, category FROM pins LIMIT 1")[0]
    runner = CliRunner()
    out = runner.invoke(app, ["query", "--store", str(store_copy), "--pin", pin["pin_id"],
                              "--classify", "--head", "[bold]"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "head [bold]" in out.output
    for category in ("[architecture]", "[cars_motorcycles]", "[food_drink]"):  # the scores
        assert category in out.output
    study = tmp_path / "s.toml"
    study.write_text('name = "s"\nstore = "x"\nbackbones = ["b"]\nheads = 3\n')
    said = _main_error(["evaluate", str(study)], monkeypatch, capsys)
    assert "[heads] must name at least one head, e.g. [heads.knn]" in said
