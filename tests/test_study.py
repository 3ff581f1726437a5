"""The study: config parsing, sampling and split, leak-free CV, resume, report, metrics."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pinsearch.eval.bench import synthetic_store
from pinsearch.eval.metrics import chance_macro_f1, classification_metrics
from pinsearch.eval.study import (
    StudyConfig,
    evaluate,
    load_study,
    run_study,
    select_pins,
)
from pinsearch.store import Store

N, DIM, CLASSES = 240, 16, 4


def _vectors(informative: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    if informative:  # pin i has category cat{i % 4}: shift each class along its own axis
        x[np.arange(N), np.arange(N) % CLASSES] += 3.0
    return x


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("study") / "store"
    synthetic_store(path, _vectors(True), categories=CLASSES)
    return path


def _copy(store: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped store, for a test that writes to it."""
    dst = tmp_path / "s"
    shutil.copytree(store, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _config(store: Path, **kw: object) -> StudyConfig:
    base = StudyConfig(
        name="t",
        store=str(store),
        backbones=("synthetic",),
        heads={"knn": {"n_neighbors": [1, 5]}, "lsvm": {"C": [0.1, 1.0]}},
        folds=3,
        test_size=0.25,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_load_study_parses_and_validates(tmp_path: Path) -> None:
    good = tmp_path / "s.toml"
    good.write_text(
        'name = "x"\nstore = "s"\nbackbones = ["effnet_lite0"]\nfolds = 4\n'
        "[heads.knn]\nn_neighbors = 5\n[heads.lsvm]\nC = [0.1, 1]\n"
    )
    cfg = load_study(good, store="other")
    assert cfg.store == "other" and cfg.folds == 4 and cfg.backbones == ("effnet_lite0",)
    assert cfg.heads["knn"] == {"n_neighbors": [5]}  # a scalar becomes a one-value grid
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nstore = "s"\nbackbones = ["a"]\nfoldz = 3\n[heads.knn]\n')
    with pytest.raises(ValueError, match="unknown keys \\['foldz'\\]"):
        load_study(bad)
    bad.write_text(
        'name = "x"\nstore = "s"\nbackbones = ["a"]\n[heads.knn]\nn_neighbors = [5, 2.5]\n'
    )
    with pytest.raises(ValueError, match=r"'n_neighbors' takes a whole number, not 2\.5"):
        load_study(bad)  # named before any cell runs (it failed in FAISS, mid-study)
    bad.write_text('name = "x"\nstore = "s"\nbackbones = ["a"]\n[heads.forest]\n')
    with pytest.raises(ValueError, match="unknown head 'forest'"):
        load_study(bad)
    with pytest.raises(FileNotFoundError):
        load_study(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[heads.lsvm]\nC = [1, -1.0]", "C must be a finite positive number, got -1.0"),
        ("[heads.mlp]\nhidden = [512, 256]", r"hidden = \[\[512, 256\]\]"),
        ("[heads.rbf_svm]\ngamma = [[0.1]]", "'gamma' takes text or a number"),
        ("test_size = 1.5\n[heads.knn]", "'test_size' is a fraction of the pins"),
        ("test_size = 0\n[heads.knn]", "'test_size' is a fraction of the pins"),
        ("min_per_class = 1\n[heads.knn]", "'min_per_class' must be at least 2"),
        ("seed = 5000000000\n[heads.knn]", "'seed' must be at most 4294967295"),
        ('device = "banana"\n[heads.knn]', "device must be auto, cpu, gpu or cuda"),
        ("n_jobs = 0\n[heads.knn]", "n_jobs must be a number of jobs"),
        ('backbones = ["a", "a+b"]\n[heads.zeroshot]', r"fused features \['a\+b'\] have no"),
        ('name = "../up"\n[heads.knn]', "'name' names its results folder"),
        ('name = "/tmp/elsewhere"\n[heads.knn]', "one folder name without"),
        ('name = " "\n[heads.knn]', "one folder name without"),
        ('paper_table = "4.1"\n[heads.knn]', '"001" shows the source paper\'s Table 4.1'),
    ],
)
def test_load_study_refuses_values_before_any_cell(tmp_path: Path, text: str, match: str) -> None:
    study = tmp_path / "s.toml"
    backbones = "" if text.startswith("backbones") else 'backbones = ["a"]\n'
    name = "" if text.startswith("name") else 'name = "x"\n'
    study.write_text(f'{name}store = "s"\n{backbones}{text}\n')
    with pytest.raises(ValueError, match=match):
        load_study(study)


def test_shipped_studies_load() -> None:
    root = Path(__file__).resolve().parents[1] / "eval" / "studies"
    paper = load_study(root / "paper.toml")
    assert paper.per_class == 1000 and paper.folds == 5 and paper.test_size == 0.2
    assert paper.heads["knn"]["n_neighbors"] == [1, 5, 10, 20, 50]
    assert paper.heads["lsvm"]["C"] == [0.01, 0.1, 1, 10, 100]
    assert paper.heads["mlp"]["batch_size"] == [32, 64, 128]
    assert len(paper.backbones) == 6
    assert load_study(root / "small.toml").backbones[0] == "effnet_lite0"


def test_select_pins_is_stratified_seeded_and_sampled(clustered_store: Path) -> None:
    with Store.open(clustered_store, read_only=True) as store:
        a = select_pins(store, _config(clustered_store, per_class=40))
        b = select_pins(store, _config(clustered_store, per_class=40))
        c = select_pins(store, _config(clustered_store, per_class=40, seed=1))
    assert len(a.keys) == 160
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.keys, c.keys)
    _, test_counts = np.unique(a.labels[a.test], return_counts=True)
    assert set(test_counts) == {10}  # the same count per class, as in the paper
    assert set(a.train) | set(a.test) == set(range(160)) and not set(a.train) & set(a.test)


def test_a_sample_keeps_its_pins_when_one_leaves_the_store(
    clustered_store: Path, tmp_path: Path
) -> None:
    # (an image that fails to embed takes its pin out: the draw must not start over)
    from pinsearch.edit import remove_pins

    store = _copy(clustered_store, tmp_path)
    config = _config(store, per_class=40)
    with Store.open(store) as s:
        before = select_pins(s, config)
        gone = int(before.keys[7])
        pin_id = s.catalog.query("SELECT pin_id FROM pins WHERE pin_key = ?", [gone])[0]["pin_id"]
        remove_pins(s, pin_ids=[pin_id])
        after = select_pins(s, config)
    lost, new = set(before.keys) - set(after.keys), set(after.keys) - set(before.keys)
    assert lost == {gone} and len(new) == 1 and len(after.keys) == len(before.keys)


def test_rare_and_dropped_labels_are_left_out(clustered_store: Path) -> None:
    with Store.open(clustered_store, read_only=True) as store:
        data = select_pins(store, _config(clustered_store, drop=("cat00",)))
        assert "cat00" not in set(data.labels) and len(data.keys) == 180
        data = select_pins(store, _config(clustered_store, per_class=20, min_per_class=20))
        assert data.left_out == {} and len(data.keys) == 80
        with pytest.raises(ValueError, match="fewer than 2 labels with at least 100 pins"):
            select_pins(store, _config(clustered_store, min_per_class=100))


def test_cross_validation_does_not_leak_held_out_pins(tmp_path: Path) -> None:
    # Labels independent of the vectors: 1-NN is at chance unless a held-out pin finds itself.
    synthetic_store(tmp_path / "store", _vectors(False), categories=CLASSES)
    _, cells = run_study(_config(tmp_path / "store", heads={"knn": {"n_neighbors": [1]}}))
    assert cells[0].cv_mean < 0.5 and cells[0].test_macro_f1 < 0.5
    # The same pins with informative vectors are learnt: the low score above is not a bug.
    synthetic_store(tmp_path / "good", _vectors(True), categories=CLASSES)
    _, cells = run_study(_config(tmp_path / "good", heads={"knn": {"n_neighbors": [1]}}))
    assert cells[0].cv_mean > 0.8


def test_interrupted_study_resumes_to_the_same_table(clustered_store: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(clustered_store, a)
    shutil.copytree(clustered_store, b)
    (a / ".lock").unlink(missing_ok=True)

    def stop(_: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(_config(a), on_cell=stop)
    _, resumed = run_study(_config(a))
    _, straight = run_study(_config(b))
    assert [c.resumed for c in resumed] == [True, False]
    for r, s in zip(resumed, straight):
        assert (r.backbone, r.head, r.best_params) == (s.backbone, s.head, s.best_params)
        assert r.test_macro_f1 == pytest.approx(s.test_macro_f1)
        assert r.cv_mean == pytest.approx(s.cv_mean)
    assert straight[0].test_macro_f1 > 0.8


def test_a_finished_cell_is_run_again_when_its_pins_or_vectors_change(
    clustered_store: Path, tmp_path: Path
) -> None:
    from pinsearch.edit import remove_pins

    store = _copy(clustered_store, tmp_path)
    config = _config(store, heads={"knn": {"n_neighbors": [1, 5]}})
    first, _ = run_study(config)
    _, again = run_study(config)
    assert [c.resumed for c in again] == [True]  # nothing changed
    with Store.open(store) as s:  # pins leave the store: another sample, another split
        gone = s.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 20")
        remove_pins(s, pin_ids=[r["pin_id"] for r in gone])
    data, after = run_study(config)
    assert [c.resumed for c in after] == [False] and len(data.keys) == len(first.keys) - 20
    with Store.open(store, read_only=True) as s:
        (row,) = s.catalog.query("SELECT n_train, n_test, data_hash FROM study_cells")
        n_pred = s.catalog.query("SELECT count(*) AS n FROM study_predictions")[0]["n"]
    assert (row["n_train"], row["n_test"]) == (len(data.train), len(data.test)) and row["data_hash"]
    assert n_pred == len(data.test)  # the predictions of the old test split are gone
    assert [c.resumed for c in run_study(config)[1]] == [True]


def test_a_resumed_cell_is_scored_again_from_its_stored_predictions(
    clustered_store: Path, tmp_path: Path
) -> None:
    store = _copy(clustered_store, tmp_path)
    config = _config(store, heads={"knn": {"n_neighbors": [1]}, "lsvm": {"C": [0.1]}})
    _, first = run_study(config)
    with Store.open(store) as s:  # as an older pinsearch, whose metric differed, left them
        s.catalog.connection.execute(
            "UPDATE study_cells SET test_macro_f1 = 0.5, metrics = json_object('classes', "
            "json_extract(metrics, '$.classes'), 'accuracy', 0.5)"
        )
        s.catalog.connection.execute("DELETE FROM study_predictions WHERE head = 'lsvm'")
    _, again = run_study(config)
    assert [c.resumed for c in again] == [True, False]  # lsvm's predictions are gone: run
    for a, f in zip(again, first):
        assert a.test_macro_f1 == f.test_macro_f1 and a.metrics == f.metrics
    with Store.open(store, read_only=True) as s:
        rows = s.catalog.query("SELECT test_macro_f1, metrics FROM study_cells ORDER BY head")
    assert [r["test_macro_f1"] for r in rows] == [f.test_macro_f1 for f in first]
    assert [json.loads(r["metrics"]) for r in rows] == [f.metrics for f in first]
    lsvm = again[1]
    assert lsvm.metrics["auc_ovr"] is not None  # (decision values, stored rounded)

    def stored_auc_plus(delta: float) -> float:
        with Store.open(store) as s:  # the AUC of the unrounded scores, as a run stores it
            s.catalog.connection.execute(
                "UPDATE study_cells SET metrics = ? WHERE head = 'lsvm'",
                [json.dumps({**lsvm.metrics, "auc_ovr": lsvm.metrics["auc_ovr"] + delta})],
            )
        return run_study(config)[1][1].metrics["auc_ovr"]

    # within what rounding the stored scores moves it: kept; beyond: computed again
    assert stored_auc_plus(5e-5) == lsvm.metrics["auc_ovr"] + 5e-5
    assert stored_auc_plus(-0.01) == lsvm.metrics["auc_ovr"]


def test_a_cell_is_resumed_with_its_own_grid_and_its_saved_head_only(
    clustered_store: Path, tmp_path: Path
) -> None:
    store = _copy(clustered_store, tmp_path)
    base = _config(store, heads={"knn": {"n_neighbors": [1]}, "lsvm": {"C": [0.01]}})

    def resumed(config: StudyConfig) -> list[bool]:
        return [c.resumed for c in run_study(config)[1]]

    def saved_c() -> float:
        with Store.open(store, read_only=True) as s:
            rows = s.catalog.query("SELECT params FROM heads WHERE name = 't/synthetic/lsvm'")
        return json.loads(rows[0]["params"])["C"]

    assert resumed(base) == [False, False]
    other_grid = replace(base, heads={**base.heads, "lsvm": {"C": [100.0]}})
    assert resumed(other_grid) == [True, False]  # knn's cell is not touched by lsvm's grid
    assert saved_c() == 100.0
    assert resumed(replace(base, heads={"knn": base.heads["knn"]})) == [True]  # one head less
    assert resumed(base) == [True, False] and saved_c() == 0.01  # back: lsvm's head with it
    assert resumed(replace(base, seed=1)) == [False, False]  # another split: other cells,
    assert resumed(base) == [False, False]  # which saved their heads under the same names
    assert resumed(base) == [True, True] and saved_c() == 0.01
    assert resumed(replace(base, folds=2)) == [False, False]  # the same data, other folds
    assert resumed(base) == [False, False]  # (the heads' sources tell the runs apart)
    with Store.open(store) as s:  # stale (pins added to a category the study drops, say):
        s.mark_heads_stale(["synthetic"])
    assert resumed(base) == [True, True]  # resumed, its heads are what it would train again
    with Store.open(store, read_only=True) as s:
        assert not any(r["stale"] for r in s.catalog.query("SELECT stale FROM heads"))
    with Store.open(store) as s:
        s.catalog.connection.execute("DELETE FROM heads WHERE head = 'knn'")
    assert resumed(base) == [False, True]  # a head removed is saved again


def test_study_files_need_heads_and_backbones_and_drop_names_as_stored(
    clustered_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nstore = "s"\nbackbones = ["a"]\n[heads]\n')
    with pytest.raises(ValueError, match="must name at least one head"):
        load_study(bad)
    bad.write_text('name = "x"\nstore = "s"\nbackbones = []\n[heads.knn]\n')
    with pytest.raises(ValueError, match="'backbones' must list at least one"):
        load_study(bad)
    for line, message in (("folds = 1", "'folds' must be at least 2"),
                          ('folds = "5"', "'folds' must be a whole number"),
                          ("normalize = 1", "'normalize' must be true or false"),
                          ("per_class = 0", "'per_class' must be at least 1"),
                          ("seed = -1", "'seed' must be at least 0")):  # fmt: skip
        bad.write_text(f'name = "x"\nstore = "s"\nbackbones = ["a"]\n{line}\n[heads.knn]\n')
        with pytest.raises(ValueError, match=message):
            load_study(bad)
    with Store.open(clustered_store, read_only=True) as store:
        data = select_pins(store, _config(clustered_store, drop=("CAT00", "none", "cats")))
    assert "cat00" not in set(data.labels) and len(data.keys) == 180  # as ingest stores it
    assert "['cats'] name no 'category' label" in caplog.text and "none" not in caplog.text


def test_the_study_seed_reaches_the_heads_it_can(clustered_store: Path, tmp_path: Path) -> None:
    import json

    store = _copy(clustered_store, tmp_path)
    mlp = {"max_epochs": [2], "hidden": [[8, 8]]}
    run_study(_config(store, seed=3, heads={"mlp": mlp, "knn": {"n_neighbors": [1]}}))
    run_study(_config(store, name="fixed", heads={"mlp": {**mlp, "random_state": [11]}}))
    with Store.open(store, read_only=True) as s:
        rows = s.catalog.query("SELECT name, params FROM heads ORDER BY name")
    params = {r["name"]: json.loads(r["params"]) for r in rows}
    assert params["t/synthetic/mlp"]["random_state"] == 3
    assert params["fixed/synthetic/mlp"]["random_state"] == 11  # a grid's own seed wins
    assert "random_state" not in params["t/synthetic/knn"]


def test_evaluate_writes_report_and_stores_results(clustered_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(clustered_store, store)
    summary = evaluate(_config(store, paper_table="001"), tmp_path / "report")
    report = Path(summary["report"]).read_text()
    assert "| features | KNN | LSVM | mean |" in report
    assert "The paper's Table 4.1" in report and "0.115" in report
    assert "Chance level" in report
    best = max(summary["cells"], key=lambda c: c["cv_mean"])  # chosen by CV, not on the test
    assert f"## Best cell: {best['backbone']} + {best['head']}\n\nChosen by CV macro-F1 (" in report
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "report" / "roc.png").stat().st_size > 1000
    assert set(summary["macro_f1"]["synthetic"]) == {"knn", "lsvm"}
    with Store.open(store, read_only=True) as s:
        rows = s.catalog.query("SELECT head, n_test FROM study_cells ORDER BY head")
        preds = s.catalog.scalar("SELECT count(*) FROM study_predictions")
        run = s.catalog.query("SELECT pins, test, finished_at FROM study_runs")[0]
    assert run["pins"] == N and run["finished_at"] is not None
    assert [r["head"] for r in rows] == ["knn", "lsvm"] and preds == 2 * rows[0]["n_test"]


def test_a_report_shows_odd_category_names_as_written(clustered_store: Path, tmp_path) -> None:
    """Cleaned names keep |, * and $: a | split the per-class row into one cell too many, and
    a $ made matplotlib read the name as mathematics and fail the figure (no report)."""
    store = _copy(clustered_store, tmp_path)
    odd = {"cat00": "a|b", "cat01": "x*y*", "cat02": "gifts_under_$10_$20"}
    with Store.open(store) as s:
        for old, new in odd.items():
            s.catalog.connection.execute("UPDATE pins SET category = ? WHERE category = ?",
                                         [new, old])  # fmt: skip
    summary = evaluate(_config(store, heads={"knn": {"n_neighbors": [1]}}), tmp_path / "r")
    report = Path(summary["report"]).read_text()
    for row in (r"| a\|b | ", r"| x\*y\* | ", r"| gifts_under_\$10_\$20 | "):
        assert row in report
    assert (tmp_path / "r" / "confusion.png").stat().st_size > 1000


def test_macro_f1_averages_the_classes_the_test_holds_or_predicts() -> None:
    """A class with no test pin that is never predicted has no F1 (it scored 0: a perfect
    classifier got 0.667); one predicted without support counts 0, as in scikit-learn's
    default, which the cross-validation scorer uses."""
    classes = np.array(["a", "b", "c"])
    y = np.array(["a", "a", "b", "b"])
    assert classification_metrics(y, y, classes).macro_f1 == 1.0
    wrong = np.array(["a", "c", "b", "b"])
    m = classification_metrics(y, wrong, classes)
    assert m.macro_f1 == pytest.approx(skm.f1_score(y, wrong, average="macro"))
    assert m.per_class[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0,
                              "support": 0}  # fmt: skip


def test_classification_metrics_agree_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    classes = np.array(["a", "b", "c"])
    y = classes[rng.integers(0, 3, 200)]
    scores = rng.random((200, 3))
    scores[np.arange(200), rng.integers(0, 3, 200)] += 0.5
    scores /= scores.sum(axis=1, keepdims=True)
    pred = classes[scores.argmax(1)]
    m = classification_metrics(y, pred, classes, scores)
    assert m.macro_f1 == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m.auc_ovr == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr"))
    assert np.array(m.confusion).sum() == 200 and len(m.per_class) == 3
    assert chance_macro_f1(np.repeat(np.arange(32), 10)) == pytest.approx(1 / 32)


def test_fused_backbones_concatenate_normalised_blocks(clustered_store: Path) -> None:
    from pinsearch.eval.study import load_study_vectors

    with Store.open(clustered_store, read_only=True) as store:
        keys = np.array([5, 1, 3], dtype=np.int64)
        single = load_study_vectors(store, "synthetic", keys, normalize=False)
        fused = load_study_vectors(store, "synthetic+synthetic", keys, normalize=False)
        raw, _ = store.vectors("synthetic").load(keys)
    np.testing.assert_allclose(single, raw)  # rows follow the order of the keys
    assert fused.shape == (3, 2 * DIM)
    np.testing.assert_allclose(np.linalg.norm(fused[:, :DIM], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fused[:, :DIM], fused[:, DIM:])


def test_a_study_without_a_corpus_names_a_backbone_without_vectors_before_any_cell(
    clustered_store: Path, tmp_path: Path
) -> None:
    store = _copy(clustered_store, tmp_path)
    config = _config(store, backbones=("synthetic", "synthetic+classic"))
    with pytest.raises(ValueError, match=r"no vectors of \['classic'\]; give the study a corpus"):
        run_study(config)
    with Store.open(store, read_only=True) as s:  # no cell ran
        assert not s.catalog.has_table("study_cells") or not s.catalog.scalar(
            "SELECT count(*) FROM study_cells WHERE study = 't'"
        )


def test_a_study_with_a_corpus_embeds_its_sample_only(tree_copy: Path, tmp_path: Path) -> None:
    # every pin is read and checked into the catalog; only the drawn sample is embedded
    config = StudyConfig(
        name="sampled", store=str(tmp_path / "s"), corpus=str(tree_copy),
        backbones=("test_efficientnet",), heads={"knn": {"n_neighbors": [1]}},
        per_class=3, min_per_class=2, folds=2, test_size=1 / 3,
    )  # fmt: skip
    data, _ = run_study(config)
    with Store.open(config.store, read_only=True) as s:
        assert s.catalog.count_pins() == 24
        embedded = np.sort(s.vectors("test_efficientnet").keys())
        assert s.index_names() == ["test_efficientnet"]
    assert len(data.keys) == 9 and np.array_equal(embedded, np.sort(data.keys))
    assert [c.resumed for c in run_study(config)[1]] == [True]  # nothing new to embed


def test_a_study_checks_every_backbones_weights_before_it_embeds(
    tree_copy: Path, tmp_path: Path
) -> None:
    from pinsearch.errors import WeightsNotFoundError

    config = StudyConfig(
        name="w", store=str(tmp_path / "s"), corpus=str(tree_copy),
        backbones=("test_efficientnet", "test_efficientnet+convnext_tiny"),
        heads={"knn": {"n_neighbors": [1]}}, min_per_class=2, folds=2,
    )  # fmt: skip
    with pytest.raises(WeightsNotFoundError, match="'convnext_tiny'"):  # offline, not cached
        run_study(config)
    assert not (tmp_path / "s").exists()  # (it failed after embedding the first backbone)


def test_a_selection_is_drawn_again_when_its_pins_fail_to_embed(
    tree_copy: Path, tmp_path: Path
) -> None:
    from pinsearch.pipeline import index_corpus

    # a JPEG whose header passes the ingest check but whose scan cannot be decoded
    victim = sorted(tree_copy.rglob("*.jpg"))[0]
    data = bytearray(victim.read_bytes())
    data[data.index(b"\xff\xda") + 5] = 0x09
    victim.write_bytes(bytes(data))
    picks: list[int] = []

    def every_pin(store: Store) -> np.ndarray:
        keys = np.array([r["pin_key"] for r in store.catalog.query("SELECT pin_key FROM pins")])
        picks.append(len(keys))
        return keys

    report = index_corpus(tree_copy, tmp_path / "s", backbone="test_efficientnet", select=every_pin)
    assert picks == [24, 23]  # the failed pin left the store; the second pick is all embedded
    assert (report.embedded, report.embed_failed, report.ntotal) == (23, 1, 23)


def test_other_kinds_refuse_overrides_they_have_no_use_for(tmp_path: Path) -> None:
    for kind, taken, refused in (("openset", "device", "corpus"), ("compact", "store", "n_jobs")):
        toml = tmp_path / f"{kind}.toml"
        toml.write_text(f'kind = "{kind}"\nname = "x"\nstore = "s"\nbackbones = ["b"]\n')
        assert getattr(load_study(toml, **{taken: "cpu"}), taken) == "cpu"
        flag = "--" + refused.replace("_", "-")
        with pytest.raises(ValueError, match=f"kind = '{kind}'.*no use for {flag}"):
            load_study(toml, **{refused: 2})
