"""CLIP backbones, text-to-pin search, board ranking, title ranking and the zero-shot head.

Everything runs on ``test_clip``, a tiny randomly initialised OpenCLIP (bundled config): the
tests check the mechanics against brute-force answers computed here, not retrieval quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pinsearch.backbones import create_backbone, get_backbone_spec
from pinsearch.clip import ClipTextEncoder
from pinsearch.errors import WeightsNotFoundError
from pinsearch.heads import load_head, save_head
from pinsearch.store import Store
from pinsearch.text import NoTextTowerError, text_encoder_for, text_space
from pinsearch.textsearch import TextSearcher
from pinsearch.zeroshot import ZeroShotHead, label_text

CLIP = "test_clip"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip_store(tree_corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus

    path = tmp_path_factory.mktemp("clip") / "store"
    report = index_corpus(
        tree_corpus.root, path, backbone=CLIP, embed=EmbedConfig(workers=0, batch_size=16)
    )
    assert report.title_vectors == report.ntotal == 24  # every generated pin has a title
    return path


@pytest.fixture(scope="module")
def searcher(clip_store: Path):
    with Store.open(clip_store, read_only=True) as store:
        yield TextSearcher(store)


def _all_vectors(searcher: TextSearcher, space: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    vecs, keys = searcher.store.vectors(space or searcher.backbone).load()
    return _unit(vecs), keys


# -- the backbone ---------------------------------------------------------------------------


def test_clip_names_resolve() -> None:
    assert get_backbone_spec("clip-vit-b-32").arch == "ViT-B-32:laion2b_s34b_b79k"
    spec = get_backbone_spec("clip:ViT-B-16")
    assert spec.source == "open_clip" and spec.arch.startswith("ViT-B-16:")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        get_backbone_spec("clip:ViT-B-32:nope")
    with pytest.raises(ValueError, match="not an open_clip model"):
        get_backbone_spec("clip:NoSuchNet")


def test_offline_without_weights_says_what_to_provide() -> None:
    with pytest.raises(WeightsNotFoundError, match=r"--weights PATH.*pinsearch align"):
        create_backbone("clip-vit-b-32")


def test_local_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    tiny = create_backbone(CLIP)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(tiny.model.clip.state_dict(), ckpt)
    loaded = create_backbone("clip:pinsearch-test-clip", weights=ckpt)
    assert loaded.weights == f"file:{ckpt}"
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(tiny.model(x), loaded.model(x), atol=1e-6)
    bad = tmp_path / "bad.pt"
    torch.save({"visual.nope": torch.zeros(3)}, bad)
    with pytest.raises(Exception, match="cannot load"):
        create_backbone("clip:pinsearch-test-clip", weights=bad)


def test_text_and_images_share_one_normalised_space() -> None:
    bb = create_backbone(CLIP)
    enc = ClipTextEncoder(bb)
    t = enc.encode(["a red car", "a bowl of soup", "a tower"])
    assert t.shape == (3, bb.dim) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode(["a red car"])[0], t[0], atol=1e-5)  # deterministic
    assert enc.encode([]).shape == (0, bb.dim)


def test_index_keeps_title_space_apart(clip_store: Path) -> None:
    with Store.open(clip_store, read_only=True) as store:
        assert store.backbones() == [CLIP]
        assert text_space(CLIP) in store.backbones(text_spaces=True)
        assert len(store.vectors(text_space(CLIP))) == 24
        assert store.catalog.get_index(text_space(CLIP))["metric"] == "cosine"


def test_reindex_embeds_only_new_titles(tree_corpus, tmp_path: Path) -> None:
    import shutil

    from pinsearch.pipeline import index_corpus

    corpus = tmp_path / "corpus"
    shutil.copytree(tree_corpus.root, corpus)
    first = index_corpus(corpus, tmp_path / "s", backbone=CLIP)
    again = index_corpus(corpus, tmp_path / "s", backbone=CLIP)
    assert first.title_vectors == 24 and again.title_vectors == 0


# -- text search ------------------------------------------------------------------------


def test_text_search_is_exact_cosine_ranking(searcher: TextSearcher) -> None:
    res = searcher.search_text("a red sports car", k=5)
    q = searcher.encoder.encode(["a red sports car"])[0]
    vecs, keys = _all_vectors(searcher)
    s = vecs @ q
    top = keys[np.argsort(-s)[:5]]
    ids = searcher.store.catalog.query(
        "SELECT pin_key, pin_id FROM pins WHERE pin_key IN (SELECT unnest(?))", [top.tolist()]
    )
    by_key = {r["pin_key"]: r["pin_id"] for r in ids}
    assert [h.pin_id for h in res.hits] == [by_key[k] for k in top]
    np.testing.assert_allclose([h.score for h in res.hits], np.sort(s)[::-1][:5], atol=1e-5)
    assert res.query["text_encoder"] == f"clip:{CLIP}" and res.metric == "cosine"


@pytest.mark.parametrize(
    "filters",
    [{"category": "architecture"}, {"user": "user001"}, {"board": "user000/food_drink-1"}],
)
def test_text_search_filters(searcher: TextSearcher, filters: dict[str, str]) -> None:
    res = searcher.search_text("anything at all", k=3, **filters)
    assert len(res.hits) >= 1 and res.filters == filters
    for h in res.hits:
        got = {"category": h.category, "user": h.user, "board": h.board}
        assert all(got[name] == value for name, value in filters.items())


def test_title_mode_ranks_title_vectors(searcher: TextSearcher) -> None:
    res = searcher.search_text("modern art print", k=4, mode="title")
    q = searcher.encoder.encode(["modern art print"])[0]
    vecs, _ = _all_vectors(searcher, text_space(CLIP))
    np.testing.assert_allclose([h.score for h in res.hits], np.sort(vecs @ q)[::-1][:4], 1e-5)
    assert res.backbone == CLIP


def test_fused_mode_extremes(searcher: TextSearcher) -> None:
    text = "tall stone building"
    image = [h.pin_id for h in searcher.search_text(text, k=5).hits]
    title = [h.pin_id for h in searcher.search_text(text, k=5, mode="title").hits]
    assert [h.pin_id for h in searcher.search_text(text, k=5, mode="fused", alpha=1.0).hits] == (
        image
    )
    assert [h.pin_id for h in searcher.search_text(text, k=5, mode="fused", alpha=0.0).hits] == (
        title
    )
    mixed = searcher.search_text(text, k=5, mode="fused", alpha=0.5)
    assert mixed.metric == "fused-z" and len(mixed.hits) == 5
    with pytest.raises(ValueError, match="alpha"):
        searcher.search_text(text, mode="fused", alpha=2.0)
    with pytest.raises(ValueError, match="mode"):
        searcher.search_text(text, mode="nope")
    with pytest.raises(ValueError, match="empty"):
        searcher.search_text("  ")


# -- boards -------------------------------------------------------------------------------


def _board_scores(searcher: TextSearcher, text: str, m: int) -> dict[str, tuple[float, float]]:
    """Brute force: board -> (mean of top-m pin cosines, cosine to the centroid)."""
    q = searcher.encoder.encode([text])[0]
    vecs, keys = _all_vectors(searcher)
    rows = searcher.store.catalog.query("SELECT pin_key, board FROM pins")
    board_of = {r["pin_key"]: r["board"] for r in rows}
    out = {}
    for board in set(board_of.values()):
        sel = np.array([board_of[k] == board for k in keys.tolist()])
        s = np.sort(vecs[sel] @ q)[::-1]
        out[board] = (float(s[:m].mean()), float(_unit(vecs[sel].sum(0)) @ q))
    return out


@pytest.mark.parametrize("score", ["topm", "centroid"])
def test_board_ranking_matches_brute_force(searcher: TextSearcher, score: str) -> None:
    text = "a plate of food"
    res = searcher.search_boards(text, k=4, per_board=2, score=score)
    truth = _board_scores(searcher, text, 2)
    col = 0 if score == "topm" else 1
    expect = sorted(truth, key=lambda b: -truth[b][col])[:4]
    assert [b.board for b in res.boards] == expect
    for b in res.boards:
        assert b.score == pytest.approx(truth[b.board][col], abs=1e-5)
        assert b.pins_in_board == 4 and len(b.pins) == 2
        assert [p.rank for p in b.pins] == [1, 2] and all(p.board == b.board for p in b.pins)
        assert b.pins[0].score >= b.pins[1].score


def test_top_m_counts_only_pins_with_a_vector(tree_corpus, tmp_path: Path) -> None:
    """Pins in the catalog without this backbone's vector (outside a sample) have no score: a
    board with one such vector is ranked by it alone, not padded with the pool's floor."""
    from pinsearch.pipeline import index_corpus

    thin: list[str] = []

    def sample(store: Store) -> np.ndarray:
        keys, cols = store.catalog.pin_columns("board")
        thin.append(str(cols["board"][0]))
        drop = np.flatnonzero(cols["board"] == thin[0])[1:]  # the board keeps one pin
        return np.delete(keys, drop)

    index_corpus(tree_corpus.root, tmp_path / "s", backbone=CLIP, select=sample)
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert len(store.vectors(CLIP)) == 21 and store.catalog.count_pins() == 24
        for cache in (False, True):
            searcher = TextSearcher(store, cache_metadata=cache)
            truth = _board_scores(searcher, "a plate of food", 2)
            res = searcher.search_boards("a plate of food", k=10, per_board=2)
            assert len(res.boards) == len(truth) == 6
            for b in res.boards:
                assert b.score == pytest.approx(truth[b.board][0], abs=1e-5)
            got = {b.board: (b.pins_in_board, len(b.pins)) for b in res.boards}
            assert got[thin[0]] == (4, 1)
            # a pool of the best 5: a board's missing pins that have a vector count at the
            # pool's lowest score, up to per_board
            q = searcher.encoder.encode(["a plate of food"])[0]
            vecs, keys = _all_vectors(searcher)
            board_of = {
                r["pin_key"]: r["board"]
                for r in store.catalog.query("SELECT pin_key, board FROM pins")
            }
            s = vecs @ q
            order = np.argsort(-s, kind="stable")[:5]
            floor = float(s[order[-1]])
            held = {b: sum(board_of[k] == b for k in keys.tolist()) for b in truth}
            expect = {}
            for i in order.tolist():
                expect.setdefault(board_of[int(keys[i])], []).append(float(s[i]))
            res = searcher.search_boards("a plate of food", k=10, per_board=2, pool=5)
            assert {b.board for b in res.boards} == set(expect)
            for b in res.boards:
                want = min(2, held[b.board])
                top = expect[b.board][:want]
                assert b.score == pytest.approx(
                    np.mean(top + [floor] * (want - len(top))), abs=1e-5
                )


def test_board_centroids_read_in_chunks_equal_one_pass(clip_store: Path) -> None:
    with Store.open(clip_store, read_only=True) as store:
        whole = TextSearcher(store).board_centroids()
        chunked = TextSearcher(store).board_centroids(chunk=3)
        vecs, keys = store.vectors(TextSearcher(store).backbone).load()
        rows = store.catalog.query("SELECT pin_key, board FROM pins")
    board_of = {r["pin_key"]: r["board"] for r in rows}
    assert whole[0].tolist() == chunked[0].tolist() == sorted(set(board_of.values()))
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-6)
    for name, centroid in zip(whole[0], whole[1]):  # the mean direction of its unit vectors
        mine = _unit(vecs[[board_of[k] == name for k in keys.tolist()]])
        np.testing.assert_allclose(centroid, _unit(mine.sum(0)), atol=1e-5)


def test_centroid_boards_of_a_category_use_that_categorys_pins(
    clip_store: Path, tmp_path: Path
) -> None:
    import shutil

    path = tmp_path / "store"
    shutil.copytree(clip_store, path)
    with Store.open(path) as store:  # half of each board's pins in another category (a
        store.catalog.connection.execute(  # manifest gives each pin its own)
            "UPDATE pins SET category = 'other_thing' WHERE pin_key % 2 = 0"
        )
    with Store.open(path, read_only=True) as store:
        ts = TextSearcher(store)
        vecs, keys = store.vectors(ts.backbone).load()
        rows = store.catalog.query("SELECT pin_key, board, category FROM pins")
        q = ts.embed_text(["a plate of food"])[0]
        res = ts.search_boards("a plate of food", 20, score="centroid", category="Other Thing")
        whole = ts.search_boards("a plate of food", 20, score="centroid")
    pin = {r["pin_key"]: r for r in rows}
    assert res.boards and len(res.boards) == len(whole.boards)
    for b in res.boards:
        mine = [
            pin[k]["board"] == b.board and pin[k]["category"] == "other_thing"
            for k in keys.tolist()
        ]
        assert b.score == pytest.approx(float(_unit(_unit(vecs[mine]).sum(0)) @ q), abs=1e-5)
        assert b.pins and all(h.category == "other_thing" for h in b.pins)
    assert {b.board: b.score for b in res.boards} != {b.board: b.score for b in whole.boards}


def test_a_k_beyond_the_store_answers_every_pin(searcher: TextSearcher) -> None:
    # (a k of 10**9 allocated answer arrays of that size: a MemoryError, not 24 hits)
    for mode in ("image", "title", "fused"):
        assert len(searcher.search_text("food", 10**9, mode=mode).hits) == 24
    pin = searcher.store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    assert len(searcher.similar_to_pin(pin, 10**9).hits) == 23
    boards = searcher.store.catalog.scalar("SELECT count(*) FROM boards")
    assert len(searcher.search_boards("food", 10**9, per_board=10**9).boards) == boards


def test_board_ranking_filters(searcher: TextSearcher, clip_store: Path) -> None:
    res = searcher.search_boards("anything", k=10, user="user000")
    assert res.boards and all(b.user == "user000" for b in res.boards)
    res = searcher.search_boards("anything", k=10, category="architecture", score="centroid")
    assert {b.category for b in res.boards} == {"architecture"} and len(res.boards) == 2
    with Store.open(clip_store, read_only=True) as store:  # a warm process: board sizes kept
        warm = TextSearcher(store, cache_metadata=True)
        for _ in range(2):
            for user, category in ((None, None), ("user000", None), (None, "architecture")):
                got = warm.search_boards("a plate of food", k=10, user=user, category=category)
                cold = searcher.search_boards("a plate of food", k=10, user=user, category=category)
                assert [(b.board, b.pins_in_board) for b in got.boards] == [
                    (b.board, b.pins_in_board) for b in cold.boards
                ]
        assert len(warm._board_size_memo) == 3


# -- best title -----------------------------------------------------------------------------


def test_text_queries_share_the_clip_model_of_image_queries(searcher: TextSearcher) -> None:
    assert searcher.encoder.backbone is searcher.backbone_model()  # (it was built twice)


def test_rank_texts_for_a_pin(searcher: TextSearcher) -> None:
    pin = searcher.store.catalog.query("SELECT pin_id, pin_key FROM pins LIMIT 1")[0]
    texts = ["a sports car", "a cathedral", "a cup of coffee"]
    res = searcher.rank_texts(texts, pin_id=pin["pin_id"])
    vec, _ = searcher.store.vectors(CLIP).load(np.array([pin["pin_key"]]))
    s = searcher.encoder.encode(texts) @ _unit(vec)[0]
    assert [m.text for m in res.matches] == [texts[i] for i in np.argsort(-s)]
    np.testing.assert_allclose([m.score for m in res.matches], np.sort(s)[::-1], atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        searcher.rank_texts(texts)


def test_rank_texts_for_an_image(searcher: TextSearcher, tree_corpus) -> None:
    path = next(Path(tree_corpus.root).rglob("*.jpg"))
    res = searcher.rank_texts(["one", "two"], image=path)
    assert [m.rank for m in res.matches] == [1, 2] and res.query["image"] == str(path)


# -- zero-shot head -------------------------------------------------------------------------


def test_zero_shot_head_is_nearest_prompt_average(searcher: TextSearcher, tmp_path: Path) -> None:
    vecs, keys = _all_vectors(searcher)
    rows = searcher.store.catalog.query("SELECT pin_key, category FROM pins ORDER BY pin_key")
    cat = {r["pin_key"]: r["category"] for r in rows}
    y = np.array([cat[k] for k in keys.tolist()])
    prompts = ("a photo of {}.", "{}")
    head = ZeroShotHead(text_encoder=searcher.encoder, prompts=prompts).fit(vecs, y)
    classes = sorted(set(y))
    assert head.classes_.tolist() == classes
    enc = searcher.encoder
    expect = _unit(
        sum(_unit(enc.encode([p.format(label_text(c)) for c in classes])) for p in prompts)
    )
    np.testing.assert_allclose(head.class_vectors_, expect, atol=1e-5)
    pred = head.predict(vecs)
    assert pred.tolist() == [classes[i] for i in np.argmax(vecs @ expect.T, axis=1)]
    np.testing.assert_allclose(head.predict_proba(vecs).sum(1), 1.0, atol=1e-5)
    save_head(head, tmp_path / "zs")
    again = load_head(tmp_path / "zs")  # no text encoder needed once fitted
    assert again.text_encoder is None and again.prompts == prompts
    assert again.predict(vecs).tolist() == pred.tolist()


def test_zero_shot_head_errors(searcher: TextSearcher) -> None:
    X, y = np.ones((4, 32), np.float32), np.array(["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="needs a text encoder"):
        ZeroShotHead().fit(X, y)
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        ZeroShotHead(text_encoder=searcher.encoder, prompts=("no slot",)).fit(X, y)
    with pytest.raises(ValueError, match="32-d"):
        ZeroShotHead(text_encoder=searcher.encoder).fit(np.ones((4, 5), np.float32), y)


def test_zero_shot_head_in_a_study(clip_store: Path, tmp_path: Path) -> None:
    import shutil

    from pinsearch.eval.study import StudyConfig, run_study

    store = tmp_path / "store"
    shutil.copytree(clip_store, store)
    config = StudyConfig(
        name="zs",
        store=str(store),
        backbones=(CLIP,),
        heads={"zeroshot": {"prompts": [["a photo of {}."], ["{}", "a pin of {}."]]}},
        folds=2,
        test_size=0.25,
        min_per_class=4,
    )
    _, results = run_study(config)
    (cell,) = results
    assert cell.head == "zeroshot" and 0.0 <= cell.test_macro_f1 <= 1.0
    assert cell.best_params["prompts"] in (["a photo of {}."], ["{}", "a pin of {}."])
    from pinsearch.classify import classify

    with Store.open(store, read_only=True) as s:
        pin = s.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        out = classify(s, pin_id=pin, head=f"zs/{CLIP}/zeroshot")
    assert out.predicted in {"food_drink", "architecture", "cars_motorcycles"}


def test_backbone_without_text_tower_says_how_to_get_one(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        with pytest.raises(NoTextTowerError, match="pinsearch align"):
            text_encoder_for(store, "test_efficientnet")
        with pytest.raises(NoTextTowerError, match="CLIP backbone"):
            TextSearcher(store).search_text("a car")


def test_fused_hits_the_catalog_does_not_know_are_made_up_from_further_down(
    clip_store: Path, tmp_path: Path
) -> None:
    import shutil

    path = tmp_path / "s"
    shutil.copytree(clip_store, path)
    text = "tall stone building"
    with Store.open(path, read_only=True) as store:
        first = [h.pin_id for h in TextSearcher(store).search_text(text, 7, mode="fused").hits]
    with Store.open(path, verify=False) as store:  # as a snapshot older than its indexes
        store.catalog.connection.execute("DELETE FROM pins WHERE pin_id IN (?, ?)", first[:2])
    with Store.open(path, read_only=True, verify=False) as store:
        hits = TextSearcher(store).search_text(text, 5, mode="fused").hits
    assert [h.pin_id for h in hits] == first[2:] and [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_a_clip_checkpoint_holding_code_is_refused(tmp_path: Path) -> None:
    """open_clip loads local checkpoints with weights_only=True: pickled objects are refused."""
    import collections

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": collections.Counter(a=1), "hook": print}, evil)
    with pytest.raises(Exception, match="cannot load"):
        create_backbone("clip:pinsearch-test-clip", weights=evil)


def test_fused_queries_without_any_title_and_refusals(tree_copy: Path, tmp_path: Path) -> None:
    """No pin with a title: fused is the image ranking. An ip index over vectors that are not
    unit length, and an alignment of a CLIP backbone, are refused."""
    import json as _json

    from pinsearch.align import AlignConfig, align_store
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus

    for pin_json in tree_copy.rglob("pin.json"):
        data = _json.loads(pin_json.read_text())
        pin_json.write_text(_json.dumps({k: v for k, v in data.items()
                                         if k not in ("title", "description")}))  # fmt: skip
    path = tmp_path / "store"
    report = index_corpus(tree_copy, path, backbone=CLIP, embed=EmbedConfig(workers=0))
    assert report.title_vectors == 0
    with Store.open(path, read_only=True) as store:
        ts = TextSearcher(store)
        image = ts.search_text("a red car", k=5)
        fused = ts.search_text("a red car", k=5, mode="fused", alpha=0.3)
        assert [h.pin_id for h in fused.hits] == [h.pin_id for h in image.hits]
        assert fused.metric == "fused-z" and fused.index == ts.index_name
        empty = ts.search_text("a red car", k=5, mode="fused", category="nope")
        assert empty.hits == [] and empty.metric == "fused-z"
        with pytest.raises(ValueError, match=r"no pin of store .* has a title or description"):
            ts.search_text("a red car", k=5, mode="title")  # (it said: made by index or align)
    with Store.open(path) as store, pytest.raises(ValueError, match="is a CLIP backbone"):
        align_store(store, CLIP, AlignConfig(epochs=2))
    raw = tmp_path / "raw"
    index_corpus(tree_copy, raw, backbone=CLIP, index={"metric": "ip"},
                 embed=EmbedConfig(workers=0, normalize=False))  # fmt: skip
    with Store.open(raw, read_only=True) as store, pytest.raises(ValueError, match="not unit"):
        TextSearcher(store)
    with Store.open(raw) as store:  # a second index that ranks by cosine: text queries use it
        from pinsearch.indexes import IndexConfig

        store.build_index(CLIP, IndexConfig(factory="Flat", metric="cosine"), name="cos")
    with Store.open(raw, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        with pytest.raises(ValueError, match="--index cos"):
            TextSearcher(store)  # (the default index answers images: text names the other)
    _text_query_and_serve_on_an_l2_default_beside_a_cosine_index(raw, pin)


def _text_query_and_serve_on_an_l2_default_beside_a_cosine_index(store: Path, pin: str) -> None:
    import io
    import json

    from typer.testing import CliRunner

    from pinsearch.cli.app import app
    from pinsearch.serve import serve

    out = CliRunner().invoke(app, ["query", "-s", str(store), "--text", "a red car", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["index"] == "cos"  # the CLI's text query takes it
    answers = io.StringIO()  # serve: pins from the default index, text refused naming "cos"
    requests = json.dumps({"pin": pin, "k": 2}) + "\n" + json.dumps({"text": "a red car"}) + "\n"
    serve(store, requests=io.StringIO(requests), responses=answers)
    ready, by_pin, by_text = (json.loads(line) for line in answers.getvalue().splitlines())
    assert ready["index"] == CLIP and by_pin["index"] == CLIP
    assert "--index cos" in by_text["error"]


def test_serve_says_why_a_store_cannot_answer_text(clip_store: Path, tree_copy, tmp_path) -> None:
    import io

    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus
    from pinsearch.serve import answer, serve

    with Store.open(clip_store, read_only=True) as store:
        searcher = TextSearcher(store)
        with pytest.raises(ValueError, match="empty"):
            answer(searcher, {"text": "", "mode": "image"})
        for image, says in (("", "'image' is empty"), (str(tmp_path), "is a folder, not an image")):
            for request in ({"image": image}, {"image": image, "titles": ["a red car"]}):
                with pytest.raises(ValueError, match=says):  # (titles: "not_a_file: a FIFO")
                    answer(searcher, request)
    raw = tmp_path / "raw"
    index_corpus(tree_copy, raw, backbone=CLIP, index={"metric": "ip"},
                 embed=EmbedConfig(workers=0, normalize=False))  # fmt: skip
    out = io.StringIO()
    serve(raw, requests=io.StringIO('{"text": "a red car"}\n'), responses=out)
    assert "not unit length" in out.getvalue().splitlines()[1]


def test_board_ranking_keeps_boards_apart_and_filters_as_pin_search(tree_corpus, tmp_path) -> None:
    """A board keyed ``Recipes`` (a manifest row without a user) beside ``u2/Recipes`` and
    ``josé/Recipes``, both named "Recipes": each board shows its own pins (centroid ranking
    took the pins of every board named so). A user typed in the other Unicode spelling counts
    the same pins as pin search finds; under a category filter a board is of that category."""
    import csv
    import unicodedata

    from pinsearch.embed import EmbedConfig
    from pinsearch.ingest import IngestConfig
    from pinsearch.pipeline import index_corpus

    jose = unicodedata.normalize("NFC", "jos\u00e9")
    images = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:7]
    rows = [
        {"path": str(p), "category": "cars" if i in (3, 4) else "food", "pin_id": f"p{i}",
         "board": "Recipes", "user": ["u2", "u2", "u2", jose, jose, jose, ""][i],
         "title": f"soup {i}"}
        for i, p in enumerate(images)
    ]  # fmt: skip
    with (tmp_path / "m.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    index_corpus(tmp_path / "m.csv", tmp_path / "s", backbone=CLIP, embed=EmbedConfig(workers=0),
                 ingest=IngestConfig(allow_outside_root=True))  # fmt: skip
    nfd = unicodedata.normalize("NFD", jose)
    with Store.open(tmp_path / "s", read_only=True) as store:
        for cache in (False, True):
            ts = TextSearcher(store, cache_metadata=cache)
            for score in ("topm", "centroid"):
                boards = ts.search_boards("soup", 5, per_board=3, score=score).boards
                assert sorted(b.board for b in boards) == [
                    "Recipes",
                    f"{jose}/Recipes",
                    "u2/Recipes",
                ]
                for b in boards:
                    assert {p.board for p in b.pins} == {b.board}, (score, b.board)
                (mine,) = ts.search_boards("soup", 5, score=score, user=nfd).boards
                assert mine.pins_in_board == 3 and len(mine.pins) == 3
                (cars,) = ts.search_boards("soup", 5, score=score, category="cars").boards
                assert cars.category == "cars" and {p.category for p in cars.pins} == {"cars"}


def test_clip_models_open_clip_evaluates_by_squashing_are_refused_for_new_runs() -> None:
    """open_clip stretches SigLIP-style models' images to the square (resize_mode squash);
    pinsearch crops a centred square, which cut a quarter off each side of a 2:1 image: such a
    model is refused for new runs, as timm's other crop modes are. The settings are the
    model's own with its tag's over them."""
    from types import SimpleNamespace

    import open_clip

    from pinsearch.clip import _preprocess

    visual = SimpleNamespace(
        image_size=224, preprocess_cfg={"mean": (0.1, 0.2, 0.3), "resize_mode": "shortest"}
    )
    clip = SimpleNamespace(visual=visual)
    pre, problem = _preprocess(open_clip, "ViT-B-16-SigLIP", "webli", clip)
    assert "resize_mode 'squash'" in problem and pre.mean == (0.5, 0.5, 0.5)
    pre, problem = _preprocess(open_clip, "ViT-B-32", "laion2b_s34b_b79k", clip)
    assert problem is None and pre.input_size == 224 and pre.interpolation == "bicubic"
    assert create_backbone(CLIP).new_run_refusal is None


def test_a_title_index_left_behind_its_vectors_is_caught_up_by_the_next_run(
    clip_store: Path, tree_corpus, tmp_path: Path
) -> None:
    """A run killed between the title vectors and their index entries: the next index run
    adds them (only repair did; check's hint named index)."""
    import shutil

    from pinsearch.check import check_store
    from pinsearch.pipeline import index_corpus

    path = tmp_path / "s"
    shutil.copytree(clip_store, path)
    space = text_space(CLIP)
    with Store.open(path) as store:
        keys = np.sort(store.vectors(space).keys())[:3]
        assert store.remove_from_index(space, keys) == "removed"  # (as the killed run left it)
    assert "lagging" in str(check_store(path, sources=False).findings)
    index_corpus(tree_corpus.root, path, backbone=CLIP)  # nothing new to embed
    with Store.open(path, read_only=True) as store:
        assert store.load_index(space).ntotal == 24
    assert check_store(path, sources=False).ok
