"""Beyond the paper: soft-vote ensembles, board-level labels, ablation, the report section."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from pinsearch.eval.bench import synthetic_store
from pinsearch.eval.beyond import (
    ablation,
    beyond_section,
    board_level,
    mean_pool,
    near_copies,
    scores_to_proba,
    soft_vote,
)
from pinsearch.eval.study import CellResult, StudyConfig, StudyData, run_study
from pinsearch.store import Store

DIM, CLASSES = 16, 4


def _board_store(
    path: Path, n: int, boards: int, shift: float, seed: int = 0, noise_on: tuple[int, ...] = ()
) -> None:
    """``n`` pins, pin i on board ``i % boards`` with category ``cat{i % 4}``.

    With ``boards`` a multiple of 4 every pin of a board shares its category (the board's).
    Vectors are noise plus ``shift`` along the category's own axis; the pins of the boards
    ``noise_on`` get other noise and no shift (the rest are the same as without it).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x[np.arange(n), np.arange(n) % CLASSES] += shift
    on = np.isin(np.arange(n) % boards, noise_on)
    x[on] = np.random.default_rng(seed + 1).standard_normal((int(on.sum()), DIM))
    synthetic_store(path, x, categories=CLASSES)
    with Store.open(path) as store:  # synthetic_store puts each pin on its own board
        store.catalog.connection.execute(
            "UPDATE pins SET board = 'user/board' || CAST(pin_key % ? AS VARCHAR)", [boards]
        )


def _config(store: Path, **kw: object) -> StudyConfig:
    base = StudyConfig(
        name="beyond",
        store=str(store),
        backbones=("synthetic",),
        heads={"knn": {"n_neighbors": [1, 5]}, "lsvm": {"C": [0.1, 1.0], "max_iter": [100]}},
        folds=3,
        test_size=0.25,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@dataclass
class Study:
    path: Path
    config: StudyConfig
    data: StudyData
    results: list[CellResult]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    # 480 pins on 40 boards of 12 pins (10 boards per category); a weak per-pin signal.
    path = tmp_path_factory.mktemp("beyond") / "store"
    _board_store(path, 480, boards=40, shift=1.5)
    config = _config(path, backbones=("synthetic", "synthetic+synthetic"))
    data, results = run_study(config)
    return Study(path, config, data, results)


@pytest.fixture(scope="module")
def few_boards(tmp_path_factory: pytest.TempPathFactory) -> Study:
    # 5 boards: cat00 has boards 0 and 4, every other category a single board.
    path = tmp_path_factory.mktemp("few") / "store"
    _board_store(path, 120, boards=5, shift=3.0)
    with Store.open(path) as store:  # board 4 holds pins of every category: make it cat00's
        store.catalog.connection.execute("UPDATE pins SET category = 'cat00' WHERE pin_key % 5 = 4")
    config = _config(path, heads={"knn": {"n_neighbors": [1]}})
    data, results = run_study(config)
    return Study(path, config, data, results)


def test_scores_to_proba() -> None:
    decision = np.array([[2.0, -1.0, 0.5], [-3.0, 4.0, 1.0]])
    p = scores_to_proba(decision, probabilities=False)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p.argmax(axis=1), decision.argmax(axis=1))
    np.testing.assert_allclose(p[0], np.exp(decision[0]) / np.exp(decision[0]).sum())
    binary = scores_to_proba(np.array([0.0, 2.0]), probabilities=False)
    np.testing.assert_allclose(binary[:, 1], [0.5, 1 / (1 + np.exp(-2.0))])
    votes = np.array([[0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_array_equal(scores_to_proba(votes, probabilities=True), votes)
    with pytest.raises(ValueError, match="shape"):
        scores_to_proba(np.zeros((2, 2, 2)), probabilities=False)


def test_mean_pool_is_normalised_group_mean() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    pooled = mean_pool(x, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(pooled, [[2**-0.5, 2**-0.5], [1.0, 0.0]], rtol=1e-6)


def test_soft_vote_of_every_cell(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        res = soft_vote(store, study.config)
    assert res.members == [  # in the study's order
        "synthetic/knn",
        "synthetic/lsvm",
        "synthetic+synthetic/knn",
        "synthetic+synthetic/lsvm",
    ]
    assert np.isfinite(res.macro_f1) and 0.0 <= res.accuracy <= 1.0
    assert res.macro_f1 >= min(r.test_macro_f1 for r in study.results)


def test_soft_vote_of_one_cell_is_that_cell(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        for cell in study.results:  # knn stores probabilities, lsvm decision values
            res = soft_vote(store, study.config, [(cell.backbone, cell.head)])
            assert res.members == [f"{cell.backbone}/{cell.head}"]
            assert res.macro_f1 == cell.test_macro_f1
            assert res.accuracy == cell.metrics["accuracy"]


def test_soft_vote_keeps_to_the_studys_own_cells(study: Study) -> None:
    # the same settings with fewer backbones: cells stored by the larger run do not vote
    fewer = replace(study.config, backbones=("synthetic+synthetic",))
    with Store.open(study.path, read_only=True) as store:
        res = soft_vote(store, fewer)
    assert res.members == ["synthetic+synthetic/knn", "synthetic+synthetic/lsvm"]


def test_soft_vote_rejects_unknown_members(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        with pytest.raises(ValueError, match=r"\[\('synthetic', 'mlp'\)\] are not scored cells"):
            soft_vote(store, study.config, [("synthetic", "knn"), ("synthetic", "mlp")])
        with pytest.raises(ValueError, match="no cell with stored test scores"):
            soft_vote(store, _config(study.path, seed=7))  # another fingerprint: no cells


def test_board_level_classifies_boards(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        res = board_level(store, study.config, "synthetic")
        rows = store.catalog.query("SELECT pin_key, board FROM pins")
        again = board_level(store, study.config, "synthetic")
        knn = board_level(store, study.config, "synthetic", "knn", {"n_neighbors": 1})
    board_of = {r["pin_key"]: r["board"] for r in rows}
    assert res.boards == len({board_of[int(k)] for k in study.data.keys}) == 40
    assert (res.backbone, res.head, res.classes) == ("synthetic", "lsvm", 4)
    assert res.macro_f1 > 0.7 and 0.0 <= res.pin_level_macro_f1 <= 1.0
    # A board's mean of 12 pins is far less noisy than one pin.
    assert res.macro_f1 >= res.pin_level_macro_f1
    assert again == res  # deterministic for the study seed
    assert knn.head == "knn" and knn.macro_f1 > 0.7


def test_board_level_chooses_c_on_the_training_boards_only(study: Study, tmp_path: Path) -> None:
    grid = {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}
    with Store.open(study.path, read_only=True) as store:
        res = board_level(store, study.config, "synthetic", grid=grid)
        given = board_level(store, study.config, "synthetic", params={"C": 1.0})
        sklearn_cv = board_level(
            store, replace(study.config, batched_cv=False), "synthetic", grid=grid
        )
    # 10 boards per category, a quarter of them tested: 7 or 8 train each, so the study's 3 folds
    assert res.cv_folds == 3 and set(res.params) == {"C"} and res.params["C"] in grid["C"]
    assert res.test_boards == 10  # a quarter of the 40
    assert (given.cv_folds, given.params) == (0, {"C": 1.0})
    assert sklearn_cv.params == res.params  # GridSearchCV's choice where the study asks for it
    # The test boards (the split board_level makes: boards by name, stratified, the study's
    # seed) get vectors of pure noise: the choice cannot change, only the test scores.
    names = [f"user/board{b}" for b in range(40)]
    order = np.argsort(names)
    _, test = train_test_split(
        order, test_size=0.25, stratify=order % CLASSES, random_state=study.config.seed
    )
    noisy = tmp_path / "noisy"
    _board_store(noisy, 480, boards=40, shift=1.5, noise_on=tuple(int(b) for b in test))
    with Store.open(noisy, read_only=True) as store:
        blind = board_level(store, study.config, "synthetic", grid=grid)
    assert blind.params == res.params and blind.cv_folds == 3
    assert blind.macro_f1 < res.macro_f1 and blind.pin_level_macro_f1 < 0.5
    # 8 boards, 2 per category, half tested: one training board a class, no grouped CV (its
    # folds would lack classes): the defaults, as the report says
    few = tmp_path / "few"
    _board_store(few, 96, boards=8, shift=3.0)
    config = _config(few, test_size=0.5)
    data, results = run_study(config)
    with Store.open(few, read_only=True) as store:
        res = board_level(store, config, "synthetic", grid=grid)
        md = beyond_section(store, config, data, results)
    assert (res.cv_folds, res.params, res.test_boards, res.boards) == (0, {}, 4, 8)
    assert "(the head's defaults: a class has a single training board, too few for a CV" in md
    assert "None of the 48 test pins has a training pin at cosine >= 0.95 on synthetic" in md


def test_board_level_errors(study: Study, few_boards: Study) -> None:
    few = Store.open(few_boards.path, read_only=True)
    with few, pytest.raises(ValueError, match="at least 2 classes with >= 2 boards"):
        board_level(few, few_boards.config, "synthetic")
    with Store.open(study.path, read_only=True) as store:
        with pytest.raises(ValueError, match=r"needs label 'category'.* got 'board'"):
            board_level(store, _config(study.path, label="board"), "synthetic")
        with pytest.raises(ValueError, match="cannot split 40 boards"):
            board_level(store, _config(study.path, test_size=0.05), "synthetic")


def test_near_copies_across_the_split_and_the_cells_without_them(tmp_path: Path) -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    x = rng.standard_normal((240, DIM)).astype(np.float32)
    x[np.arange(240), np.arange(240) % CLASSES] += 1.0
    x[200:240] = 2.0 * x[0:40]  # pins 200-239 copy 0-39 (scaled: the same direction)
    path = tmp_path / "store"
    synthetic_store(path, x, categories=CLASSES)
    config = _config(path, heads={"knn": {"n_neighbors": [1]}, "lsvm": {"C": [1.0]}})
    data, results = run_study(config)
    with Store.open(path, read_only=True) as store:
        res = near_copies(store, config, data, "synthetic", results)
        rows = store.catalog.connection.execute(
            "SELECT pin_key, label, predicted FROM study_predictions WHERE head = 'knn' "
            "ORDER BY pin_key"
        ).fetchall()
    # (synthetic_store gives the vector of row i to the pin of key i)
    twin = {r: (r + 200 if r < 40 else r - 200) for r in range(240) if r < 40 or r >= 200}
    train = set(data.keys[data.train].tolist())
    copied = [k for k in data.keys[data.test].tolist() if twin.get(k) in train]
    assert res.test == len(data.test) == 60 and res.with_copy == len(copied) > 0
    assert res.same_label == res.with_copy  # a copy has its twin's category
    assert [(b, h) for b, h, *_ in res.cells] == [("synthetic", "knn"), ("synthetic", "lsvm")]
    assert res.cells[0][2] == results[0].test_macro_f1
    kept = [(t, p) for k, t, p in rows if k not in set(copied)]
    truth, pred = zip(*kept)
    expected = f1_score(truth, pred, labels=sorted(set(truth) | set(pred)), average="macro")
    assert res.cells[0][3] == pytest.approx(expected)


def test_ablation_covers_normalization_k_and_metric(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        rows = ablation(store, study.config, study.data, "synthetic", ks=(1, 5, 10, 10_000))
        with pytest.raises(ValueError, match="ks must be positive integers, got \\[0\\]"):
            ablation(store, study.config, study.data, "synthetic", ks=(0, 5))
        with pytest.raises(ValueError, match="unknown KNN metrics \\['hamming'\\]"):
            ablation(store, study.config, study.data, "synthetic", metrics=("hamming",))
    by_setting: dict[str, list[str]] = {}
    for r in rows:
        assert r.backbone == "synthetic" and 0.0 <= r.macro_f1 <= 1.0
        by_setting.setdefault(r.setting, []).append(r.value)
    assert by_setting == {
        "normalization": ["knn raw", "knn normalised", "lsvm raw", "lsvm normalised"],
        "k": ["1", "5", "10"],  # k=10000 exceeds the 360 training pins
        "metric": ["l2", "cosine", "l1"],
    }
    assert all(r.macro_f1 > 0.5 for r in rows if r.setting != "k" or r.value != "1")
    with Store.open(study.path, read_only=True) as store:  # fused blocks are unit already:
        fused = ablation(store, study.config, study.data, "synthetic+synthetic", ks=(5,))
    assert {r.setting for r in fused} == {"k", "metric"}  # raw = normalised, not compared


def test_beyond_section(study: Study) -> None:
    with Store.open(study.path, read_only=True) as store:
        md = beyond_section(store, study.config, study.data, study.results)
    for header in (
        "## Beyond the paper",
        "### Ensembles",
        "### Feature fusion",
        "### Board level vs pin level",
        "### Near-copies across the split",
        "### Ablation",
    ):
        assert header in md
    assert "skipped" not in md
    assert "| all cells |" in md and "| best cell per head |" in md
    assert "| synthetic+synthetic | knn |" in md  # the fused cells are listed
    assert "| board (mean of its pins) |" in md and "| metric | cosine |" in md
    assert "chosen by a 3-fold CV on the training boards' pins, folds grouped by board" in md


def test_beyond_section_notes_a_failing_part(few_boards: Study) -> None:
    with Store.open(few_boards.path, read_only=True) as store:
        md = beyond_section(store, few_boards.config, few_boards.data, few_boards.results)
    notes = [line for line in md.splitlines() if "skipped" in line]
    assert len(notes) == 1 and notes[0].startswith("_board level skipped: board-level")
    assert "No fused features" in md
    assert "| all cells | synthetic/knn |" in md and "| k | 5 |" in md
