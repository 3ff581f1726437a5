"""Tests for pinsearch.search and incremental indexing through pinsearch.pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pinsearch.embed import EmbedConfig
from pinsearch.errors import PinNotFoundError
from pinsearch.indexes import IndexConfig
from pinsearch.pipeline import index_corpus
from pinsearch.search import PinSearcher, SearchResult, exact_search
from pinsearch.store import Store

BACKBONE = "test_efficientnet"
FAST = EmbedConfig(workers=0, batch_size=16)


@pytest.fixture(scope="module", params=[False, True], ids=["duckdb", "cached"])
def searcher(built_store, request):
    """Metadata and filters from DuckDB per query, or from the in-memory columns."""
    store = Store.open(built_store.path, read_only=True)
    yield PinSearcher(store, cache_metadata=request.param)
    store.close()


@pytest.fixture(scope="module")
def pins(searcher) -> dict[str, dict]:
    """pin_id -> catalog row of every stored pin."""
    rows = searcher.store.catalog.pins_by_key(list(range(100)))
    return {r["pin_id"]: r for r in rows.values()}


def _vectors_by_id(store: Store) -> dict[str, np.ndarray]:
    vecs, keys = store.vectors(BACKBONE).load()
    meta = store.catalog.pins_by_key(keys.tolist())
    return {meta[int(k)]["pin_id"]: v for k, v in zip(keys, vecs)}


def test_searcher_defaults(searcher, built_store) -> None:
    assert searcher.backbone == BACKBONE
    assert searcher.index_name == BACKBONE
    assert searcher.index.ntotal == 24 and searcher.index.factory == "Flat"
    assert built_store.report.index_action == "built"


def test_similar_to_pin_excludes_itself_and_is_sorted(searcher, pins) -> None:
    pin_id = sorted(pins)[0]
    result = searcher.similar_to_pin(pin_id, k=6)
    assert isinstance(result, SearchResult)
    assert result.query == {"pin_id": pin_id} and result.k == 6 and result.filters == {}
    assert (result.backbone, result.index, result.metric) == (BACKBONE, BACKBONE, "cosine")
    assert len(result.hits) == 6
    assert pin_id not in [h.pin_id for h in result.hits]
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5, 6]
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    for hit in result.hits:
        row = pins[hit.pin_id]
        assert (hit.title, hit.board, hit.board_name, hit.user, hit.category, hit.path) == (
            row["title"],
            row["board"],
            row["board_name"],
            row["user_id"],
            row["category"],
            row["path"],
        )
        assert hit.title and hit.board_name != hit.board  # board.json display name
        assert Path(hit.path).is_file()
    assert result.seconds >= 0


def test_similar_to_pin_matches_exact_cosine(searcher, pins) -> None:
    vectors = _vectors_by_id(searcher.store)
    ids = sorted(vectors)
    matrix = np.stack([vectors[i] for i in ids])
    for pin_id in ids[:5]:
        q = vectors[pin_id][None, :]
        d, pos = exact_search(q, matrix, 6, "cosine")
        expected = [ids[p] for p in pos[0] if ids[p] != pin_id][:5]
        result = searcher.similar_to_pin(pin_id, k=5)
        assert [h.pin_id for h in result.hits] == expected
        exp_scores = [s for s, p in zip(d[0], pos[0]) if ids[p] != pin_id][:5]
        np.testing.assert_allclose([h.score for h in result.hits], exp_scores, atol=1e-5)


def test_k_larger_than_the_store(searcher, pins) -> None:
    result = searcher.similar_to_pin(sorted(pins)[3], k=100)
    assert len(result.hits) == 23
    assert len({h.pin_id for h in result.hits}) == 23


def test_filter_by_board(searcher, pins) -> None:
    pin_id = sorted(pins)[0]
    board = pins[pin_id]["board"]
    board_pins = {i for i, r in pins.items() if r["board"] == board}
    assert len(board_pins) == 4
    same = searcher.similar_to_pin(pin_id, k=10, board=board)
    assert {h.pin_id for h in same.hits} == board_pins - {pin_id}  # all 3 others, fewer than k
    assert same.filters == {"board": board}
    by_name = searcher.similar_to_pin(pin_id, k=10, board=pins[pin_id]["board_name"])
    assert [h.pin_id for h in by_name.hits] == [h.pin_id for h in same.hits]
    other = next(i for i, r in pins.items() if r["board"] != board)
    from_other = searcher.similar_to_pin(other, k=10, board=board)
    assert {h.pin_id for h in from_other.hits} == board_pins  # all 4, the query is elsewhere
    two = searcher.similar_to_pin(other, k=2, board=board)
    assert len(two.hits) == 2 and {h.pin_id for h in two.hits} <= board_pins


@pytest.mark.parametrize(("field", "column"), [("user", "user_id"), ("category", "category")])
def test_filter_by_user_and_category(searcher, pins, field: str, column: str) -> None:
    values = sorted({r[column] for r in pins.values()})
    for value in values:
        members = {i for i, r in pins.items() if r[column] == value}
        query = next(i for i, r in pins.items() if r[column] != value)
        result = searcher.similar_to_pin(query, k=5, **{field: value})
        assert len(result.hits) == 5  # exactly k: enough matching pins exist
        assert {h.pin_id for h in result.hits} <= members
        everything = searcher.similar_to_pin(query, k=50, **{field: value})
        assert {h.pin_id for h in everything.hits} == members  # all of them when fewer
        scores = [h.score for h in everything.hits]
        assert scores == sorted(scores, reverse=True)


def test_combined_filters(searcher, pins) -> None:
    user = sorted({r["user_id"] for r in pins.values()})[0]
    cat = sorted({r["category"] for r in pins.values() if r["user_id"] == user})[0]
    members = {i for i, r in pins.items() if r["user_id"] == user and r["category"] == cat}
    query = sorted(pins)[-1]
    result = searcher.similar_to_pin(query, k=50, user=user, category=cat)
    assert {h.pin_id for h in result.hits} == members - {query}
    assert result.filters == {"user": user, "category": cat}


def test_filters_with_no_match_and_injection(searcher, pins) -> None:
    pin_id = sorted(pins)[0]
    for value in ("no-such-board", "x' OR '1'='1"):
        assert searcher.similar_to_pin(pin_id, k=5, board=value).hits == []
        assert searcher.similar_to_pin(pin_id, k=5, user=value).hits == []
        assert searcher.similar_to_pin(pin_id, k=5, category=value).hits == []
    assert searcher.store.catalog.count_pins() == 24


def test_unmatched_filters_name_the_values_that_match_nothing_alone(searcher, pins) -> None:
    row = pins[sorted(pins)[0]]
    other_user = next(r["user_id"] for r in pins.values() if r["category"] != row["category"])
    assert searcher.unmatched_filters(category=row["category"], user=row["user_id"]) == []
    # each matches pins, together maybe none: not a misspelling
    assert searcher.unmatched_filters(category=row["category"], user=other_user) == []
    assert searcher.unmatched_filters(category="nosuch", board=row["board"]) == [
        "category 'nosuch'"
    ]
    assert searcher.unmatched_filters(board="x", user="y") == ["board 'x'", "user 'y'"]


def test_cli_says_which_filter_matched_nothing(built_store) -> None:
    from typer.testing import CliRunner

    from pinsearch.cli.app import app

    with Store.open(built_store.path, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    out = CliRunner().invoke(
        app, ["query", "--store", str(built_store.path), "--pin", pin, "--category", "nosuch"]
    )
    assert out.exit_code == 0 and "no pin of the store has category 'nosuch'" in out.output


def test_unknown_pin(searcher) -> None:
    with pytest.raises(PinNotFoundError, match="nope") as info:
        searcher.similar_to_pin("nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("pin 'nope'")
    with pytest.raises(PinNotFoundError):
        searcher.similar_to_pin("x' OR '1'='1")


def test_k_must_be_positive(searcher, pins) -> None:
    with pytest.raises(ValueError, match="positive"):
        searcher.similar_to_pin(sorted(pins)[0], k=0)


def test_similar_to_image_finds_the_pin_itself(searcher, pins) -> None:
    for pin_id in sorted(pins)[:3]:
        path = pins[pin_id]["path"]
        result = searcher.similar_to_image(path, k=3)
        assert result.hits[0].pin_id == pin_id
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert result.query == {"image": path}
    pil = Image.open(pins[sorted(pins)[0]]["path"])
    from_pil = searcher.similar_to_image(pil, k=1)
    assert from_pil.hits[0].pin_id == sorted(pins)[0]
    assert from_pil.query == {"image": "<image>"}


def test_similar_to_image_with_filter(searcher, pins) -> None:
    pin_id = sorted(pins)[0]
    other_cat = next(
        r["category"] for r in pins.values() if r["category"] != pins[pin_id]["category"]
    )
    result = searcher.similar_to_image(pins[pin_id]["path"], k=4, category=other_cat)
    assert len(result.hits) == 4
    assert all(h.category == other_cat for h in result.hits)


def test_similar_to_vector(searcher) -> None:
    vectors = _vectors_by_id(searcher.store)
    pin_id = sorted(vectors)[7]
    result = searcher.similar_to_vector(vectors[pin_id], k=2)
    assert result.hits[0].pin_id == pin_id
    assert result.query == {"vector": True}


def test_result_is_json(searcher, pins) -> None:
    result = searcher.similar_to_pin(sorted(pins)[0], k=3, category="food_drink")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["k"] == 3 and data["filters"] == {"category": "food_drink"}
    assert [h["rank"] for h in data["hits"]] == [1, 2, 3]
    assert set(data["hits"][0]) == {
        "rank",
        "pin_id",
        "score",
        "title",
        "board",
        "board_name",
        "user",
        "category",
        "path",
    }


def test_unknown_index_name(searcher) -> None:
    with pytest.raises(ValueError, match="no index"):
        PinSearcher(searcher.store, index="nope")


def test_approximate_index_filters_are_topped_up_to_k(store_copy: Path) -> None:
    """IVF with nprobe 1 visits more lists itself until k allowed pins: its raw rows are
    whole (they came back short and PinSearcher scanned the allowed pins exactly)."""
    factory = "IVF4,Flat"
    with Store.open(store_copy) as store:
        store.build_index(
            BACKBONE, IndexConfig(factory=factory, nprobe=1 if "IVF" in factory else None,
                                  device="cpu"), name="ann"
        )  # fmt: skip
    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store, index="ann")
        assert searcher.index.factory == factory and searcher.index_name == "ann"
        rows = store.catalog.pins_by_key(list(range(24)))
        vectors = _vectors_by_id(store)
        short = 0
        for cat in sorted({r["category"] for r in rows.values()}):
            members = {r["pin_id"] for r in rows.values() if r["category"] == cat}
            query = sorted(members)[0]
            allowed = np.array([k for k, r in rows.items() if r["pin_id"] in members - {query}])
            _, raw = searcher.index.search(vectors[query], 7, allowed=allowed)
            short += int((raw < 0).any())  # one probed list rarely holds 7 matching pins
            result = searcher.similar_to_pin(query, k=7, category=cat)
            assert {h.pin_id for h in result.hits} == members - {query}  # exactly k = 7
            scores = [h.score for h in result.hits]
            assert scores == sorted(scores, reverse=True)
            five = searcher.similar_to_pin(query, k=5, category=cat)
            assert len(five.hits) == 5 and {h.pin_id for h in five.hits} <= members
        assert short == 0


# -- incremental indexing -------------------------------------------------------------------


def test_incremental_index_adds_without_rebuild(
    store_copy: Path, tmp_path: Path, make_tree
) -> None:
    ids_file = store_copy / "indexes" / f"{BACKBONE}.ids.npy"
    old_ids = np.load(ids_file)
    second = make_tree(tmp_path / "second", seed=1)
    report = index_corpus(second.root, store_copy, backbone=BACKBONE, embed=FAST)
    assert (report.found, report.added, report.already_present) == (24, 24, 0)
    assert report.embedded == 24
    assert report.index_action == "updated (+24)"
    assert report.ntotal == 48 and report.factory == "Flat"
    new_ids = np.load(ids_file)
    np.testing.assert_array_equal(new_ids[:24], old_ids)  # appended, not rebuilt

    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store)
        assert searcher.index.ntotal == 48
        vectors = _vectors_by_id(store)
        new_pins = {p.name for p in second.root.glob("*/*/*") if p.is_dir()}
        assert len(new_pins) == 24 and new_pins <= set(vectors)
        for pin_id in sorted(new_pins):
            hit = searcher.similar_to_vector(vectors[pin_id], k=1).hits[0]
            assert hit.pin_id == pin_id  # the id mapping survived the append
        assert store.info().ingests[-1]["added"] == 24

    again = index_corpus(second.root, store_copy, backbone=BACKBONE, embed=FAST)
    assert (again.added, again.already_present, again.embedded) == (0, 24, 0)
    assert again.index_action == "unchanged" and again.ntotal == 48


def test_rebuild_and_config_change(store_copy: Path) -> None:
    rebuilt = index_corpus(None, store_copy, backbone=BACKBONE, embed=FAST, rebuild=True)
    assert rebuilt.index_action == "rebuilt" and rebuilt.ntotal == 24
    changed = index_corpus(
        None,
        store_copy,
        backbone=BACKBONE,
        embed=FAST,
        index=IndexConfig(metric="l2", device="cpu"),
    )
    assert changed.index_action == "rebuilt" and changed.metric == "l2"
    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store)
        assert searcher.index.config.metric == "l2"
        result = searcher.similar_to_pin(store.catalog.pins_by_key([0])[0]["pin_id"], k=5)
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores)  # distances: smaller first
        assert all(s >= 0 for s in scores)


def test_later_runs_keep_the_index_metric(store_copy: Path) -> None:
    # An l2 index must stay l2 when a later run only asks for something unrelated (the CLI
    # passes IndexConfig(device=...) for --index-device) or for a plain --rebuild.
    l2 = index_corpus(
        None, store_copy, backbone=BACKBONE, embed=FAST, index=IndexConfig(metric="l2")
    )
    assert (l2.index_action, l2.metric) == ("rebuilt", "l2")
    same = index_corpus(
        None, store_copy, backbone=BACKBONE, embed=FAST, index=IndexConfig(device="cpu")
    )
    assert (same.index_action, same.metric) == ("unchanged, settings changed: device", "l2")
    rebuilt = index_corpus(None, store_copy, backbone=BACKBONE, embed=FAST, rebuild=True)
    assert (rebuilt.index_action, rebuilt.metric) == ("rebuilt", "l2")


def test_index_corpus_on_empty_corpus_result(tmp_path: Path) -> None:
    root = tmp_path / "c" / "u" / "b"
    root.mkdir(parents=True)
    (root / "board.json").write_text('{"category": "art"}')
    (root / "p1").mkdir()
    (root / "p1" / "p1.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no pins"):
        index_corpus(tmp_path / "c", tmp_path / "s", backbone=BACKBONE, embed=FAST)


def test_cached_filters_equal_the_catalog_query(searcher, pins) -> None:
    catalog = searcher.store.catalog
    boards = {r["board"] for r in pins.values()} | {r["board_name"] for r in pins.values()}
    users = {r["user_id"] for r in pins.values()}
    cats = {r["category"] for r in pins.values()}
    cases = [{"board": b} for b in boards] + [{"user": u} for u in users]
    cases += [{"category": c, "user": u} for c in cats for u in users] + [{"board": "nope"}]
    cases += [{"board": b, "category": c} for b in list(boards)[:3] for c in cats]
    for case in cases:
        got = searcher.filter_keys(**case)
        assert got.tolist() == catalog.filter_keys(**case).tolist(), case
        assert got.dtype == np.int64
    assert searcher.filter_keys() is None


def test_rare_filters_on_a_gpu_index_scan_the_allowed_vectors(
    faiss_gpu_stand_in: list, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter too rare for the GPU copy's deepest answer is answered exactly from the
    allowed pins' stored vectors: no host copy of the whole index is made (and kept)."""
    from pinsearch.indexes import pinindex

    monkeypatch.setattr(pinindex, "GPU_MAX_NPROBE", 12)  # 24 pins: as rare as at 1M
    with Store.open(store_copy) as store:
        store.build_index(BACKBONE, IndexConfig(factory="IVF4,Flat", nprobe=1), name="gpu")
    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store, index="gpu")
        assert searcher.index.on_gpu
        vectors = _vectors_by_id(store)
        rows = store.catalog.pins_by_key(list(range(24)))
        for cat in sorted({r["category"] for r in rows.values()}):
            members = sorted(r["pin_id"] for r in rows.values() if r["category"] == cat)
            allowed = np.array([k for k, r in rows.items() if r["category"] == cat])
            assert searcher.index.filter_copies_to_cpu(3, len(allowed))
            result = searcher.similar_to_pin(members[0], k=3, category=cat)
            others = np.stack([vectors[m] for m in members[1:]])
            d, pos = exact_search(vectors[members[0]][None], others, 3, "cosine")
            assert [h.pin_id for h in result.hits] == [members[1:][p] for p in pos[0]]
            np.testing.assert_allclose([h.score for h in result.hits], d[0], rtol=1e-5)
        assert searcher.index._cpu is None  # the old path copied the index to the CPU here
        common = np.array(list(rows))  # every pin allowed: the GPU copy answers it
        assert not searcher.index.filter_copies_to_cpu(3, len(common))


def test_gpu_filters_short_in_the_gpu_copy_are_filled_without_a_host_copy(
    faiss_gpu_stand_in: list, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter whose share promises k hits in the GPU copy's deepest answer may still find
    fewer there (pins far from the query): the rows are filled exactly from the stored
    vectors, still without a host copy of the index."""
    from pinsearch.indexes import pinindex

    monkeypatch.setattr(pinindex, "GPU_MAX_NPROBE", 12)  # 24 pins: as deep as 2,048 of 1M
    with Store.open(store_copy) as store:
        store.build_index(BACKBONE, IndexConfig(factory="Flat"), name="gpu")
    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store, index="gpu")
        vectors = _vectors_by_id(store)
        rows = list(store.catalog.pins_by_key(list(range(24))).items())
        short = 0
        for board in sorted({r["board"] for _, r in rows}):
            allowed = np.array([key for key, r in rows if r["board"] == board])  # 4 of 24
            assert not searcher.index.filter_copies_to_cpu(1, len(allowed))  # predicted to hold
            members = [r["pin_id"] for _, r in rows if r["board"] == board]
            for _, r in rows:
                if r["board"] == board:
                    continue
                query = vectors[r["pin_id"]][None]
                _, gpu_only = searcher.index.search(query, 1, allowed=allowed, host_copy=False)
                short += int(gpu_only[0, 0] < 0)
                hit = searcher.similar_to_vector(vectors[r["pin_id"]], k=1, board=board).hits
                _, pos = exact_search(query, np.stack([vectors[m] for m in members]), 1, "cosine")
                assert hit[0].pin_id == members[pos[0, 0]]
        assert short > 0  # so the filling path ran
        assert searcher.index._cpu is None


def test_filtered_searches_check_the_query_and_return_indexed_pins_once(
    store_copy: Path,
) -> None:
    from pinsearch.errors import BackboneMismatchError

    with Store.open(store_copy) as store:
        store.build_index(
            BACKBONE, IndexConfig(factory="IVF4,Flat", nprobe=1, device="cpu"), name="ivf"
        )
    with Store.open(store_copy, read_only=True) as store:
        searcher = PinSearcher(store, index="ivf")
        some = searcher.index.ids[:6]
        with pytest.raises(BackboneMismatchError, match="dim 16"):
            searcher.search_keys(np.ones((1, 16), np.float32), 3, allowed=some)
        # duplicated keys and keys the index does not hold: each indexed pin once
        allowed = np.concatenate([some, some, [10**9]])
        query = store.vectors(BACKBONE).load(some[:1])[0]
        _, keys = searcher.search_keys(query, 10, allowed=allowed)
        found = keys[0][keys[0] >= 0]
        assert sorted(found.tolist()) == sorted(some.tolist())


@pytest.mark.parametrize("cache", [False, True], ids=["duckdb", "cached"])
def test_names_stored_in_another_unicode_spelling_are_found(tree_copy: Path, tmp_path, cache):
    """Folders copied from macOS name ``é`` as ``e`` + a combining accent (NFD): pin ids,
    boards and users typed as one character (NFC) still find them, in queries and removes."""
    import unicodedata

    from pinsearch.edit import refresh_store, remove_pins

    nfd = unicodedata.normalize("NFD", "jos\u00e9")
    user = sorted(p for p in tree_copy.iterdir() if p.is_dir())[0].rename(tree_copy / nfd)
    board = sorted(p for p in user.iterdir() if p.is_dir())[0].rename(user / "caf\u0065\u0301")
    pin = sorted(p for p in board.iterdir() if p.is_dir())[0].rename(board / f"cr{nfd}me")
    index_corpus(tree_copy, tmp_path / "s", backbone=BACKBONE, embed=FAST)
    nfc = unicodedata.normalize("NFC", pin.name)
    assert nfc != pin.name
    with Store.open(tmp_path / "s", read_only=True) as store:
        searcher = PinSearcher(store, cache_metadata=cache)
        hits = searcher.similar_to_pin(nfc, k=3, board="jos\u00e9/caf\u00e9").hits
        assert hits and {h.board for h in hits} == {f"{nfd}/{board.name}"}
        by_user = searcher.similar_to_vector(np.ones(searcher.index.dim), k=50, user="jos\u00e9")
        assert {h.user for h in by_user.hits} == {nfd}
        assert searcher.unmatched_filters(board="jos\u00e9/caf\u00e9", user="jos\u00e9") == []
    assert refresh_store(tmp_path / "s", pin_ids=[nfc]).refreshed == 1  # (it was not found)
    with Store.open(tmp_path / "s") as store:
        n = store.catalog.count_pins()
        remove_pins(store, pin_ids=[nfc])
        remove_pins(store, boards=["jos\u00e9/caf\u00e9"])
        assert store.catalog.keys_for_ids([nfc, pin.name]) == {}
        assert store.catalog.count_pins() == n - sum(p.is_dir() for p in board.iterdir())
