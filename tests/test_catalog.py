"""Tests for pinsearch.catalog: the DuckDB tables, parameterised queries, transactions."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from pinsearch.catalog import PIN_COLUMNS, SCHEMA_VERSION, Catalog
from pinsearch.ingest import IngestConfig, SkippedPin, read_corpus

INJECTION = "x' OR '1'='1"


@pytest.fixture(scope="module")
def ingest_result(tree_corpus):
    return read_corpus(tree_corpus.root)


@pytest.fixture
def catalog(tmp_path: Path, ingest_result):
    with Catalog(tmp_path / "catalog.duckdb") as cat:
        cat.add_ingest(ingest_result, json.dumps({"test": True}))
        yield cat


def test_new_catalog_has_schema_and_version(tmp_path: Path) -> None:
    with Catalog(tmp_path / "c.duckdb") as cat:
        assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
        tables = {r[0] for r in cat.connection.execute("SHOW TABLES").fetchall()}
        assert {
            "meta",
            "users",
            "boards",
            "pins",
            "skipped",
            "ingests",
            "embeddings",
            "vector_parts",
            "indexes",
            "categories",
        } <= tables
        assert cat.count_pins() == 0 and cat.pin_ids() == set()
        assert cat.filter_keys() is None
        assert cat.pins_by_key([]) == {}


def test_add_ingest_stores_pins_boards_users(catalog: Catalog, ingest_result, tree_corpus) -> None:
    assert catalog.count_pins() == 24
    assert catalog.pin_ids() == {p.pin_id for p in ingest_result.pins}
    keys = sorted(k for k, _ in catalog.pin_paths())
    assert keys == list(range(24))  # dense keys from 0
    assert catalog.get_meta("next_pin_key") == "24"
    users = {r["user_id"] for r in catalog.query("SELECT user_id FROM users")}
    assert users == set(tree_corpus.users)
    boards = catalog.query("SELECT * FROM boards ORDER BY board")
    assert [b["board"] for b in boards] == sorted(tree_corpus.boards)
    assert all(b["name"] and b["category"] and b["user_id"] for b in boards)
    (ingest,) = catalog.query("SELECT * FROM ingests")
    assert (ingest["ingest_id"], ingest["found"], ingest["added"], ingest["skipped"]) == (
        1,
        24,
        24,
        0,
    )
    assert json.loads(ingest["config"]) == {"test": True}
    cats = catalog.query("SELECT * FROM categories ORDER BY category")
    assert [(c["category"], c["pins"], c["boards"]) for c in cats] == [
        ("architecture", 8, 2),
        ("cars_motorcycles", 8, 2),
        ("food_drink", 8, 2),
    ]


def test_second_ingest_continues_keys(catalog: Catalog, tmp_path: Path, make_tree) -> None:
    second = make_tree(tmp_path / "second", seed=5, categories=("art",), pins_per_board=2)
    result = read_corpus(second.root, exclude_ids=catalog.pin_ids())
    ingest_id, added, changes = catalog.add_ingest(result, "{}")
    assert (ingest_id, added, changes.pins) == (2, 4, [])
    new_keys = sorted(catalog.keys_for_ids([p.pin_id for p in result.pins]).values())
    assert new_keys == [24, 25, 26, 27]
    assert catalog.count_pins() == 28
    # Re-reading the same corpus adds nothing.
    again = read_corpus(second.root, exclude_ids=catalog.pin_ids())
    assert again.pins == [] and again.already_present == 4
    assert catalog.add_ingest(again, "{}")[:2] == (3, 0)
    assert catalog.count_pins() == 28


def test_pins_by_key_returns_metadata(catalog: Catalog, ingest_result) -> None:
    first = ingest_result.pins[0]
    key = catalog.keys_for_ids([first.pin_id])[first.pin_id]
    rows = catalog.pins_by_key([key, 10**9])
    assert list(rows) == [key]
    row = rows[key]
    assert tuple(row) == PIN_COLUMNS
    assert row["pin_id"] == first.pin_id
    assert row["title"] == first.title and row["category"] == first.category
    assert row["board"] == first.board and row["board_name"] == first.board_name
    assert row["user_id"] == first.user and row["path"] == str(first.path)
    assert (row["width"], row["height"]) == (96, 96)


def test_keys_for_ids_ignores_unknown(catalog: Catalog, ingest_result) -> None:
    ids = [p.pin_id for p in ingest_result.pins[:3]]
    found = catalog.keys_for_ids([*ids, "nope", INJECTION])
    assert set(found) == set(ids)
    assert catalog.keys_for_ids([]) == {}


def test_filter_keys(catalog: Catalog, ingest_result, tree_corpus) -> None:
    by_board = {
        b: {p.pin_id for p in ingest_result.pins if p.board == b} for b in tree_corpus.boards
    }
    board = tree_corpus.boards[0]
    keys = catalog.filter_keys(board=board)
    ids = {catalog.pins_by_key([int(k)])[int(k)]["pin_id"] for k in keys}
    assert ids == by_board[board] and len(ids) == 4
    # A board also matches its display name (board.json "name").
    display = next(p.board_name for p in ingest_result.pins if p.board == board)
    np.testing.assert_array_equal(np.sort(catalog.filter_keys(board=display)), np.sort(keys))

    user = tree_corpus.users[0]
    user_keys = catalog.filter_keys(user=user)
    assert len(user_keys) == sum(p.user == user for p in ingest_result.pins)
    cat_keys = catalog.filter_keys(category="food_drink")
    assert len(cat_keys) == 8
    both = catalog.filter_keys(user=user, category="food_drink")
    assert set(both.tolist()) == set(user_keys.tolist()) & set(cat_keys.tolist())
    assert catalog.filter_keys(category="nothing").size == 0
    assert cat_keys.dtype == np.int64


@pytest.mark.parametrize("field", ["board", "user", "category"])
def test_sql_injection_in_filters_is_harmless(catalog: Catalog, field: str) -> None:
    for value in (INJECTION, "'; DROP TABLE pins; --", 'x" OR 1=1 --'):
        keys = catalog.filter_keys(**{field: value})
        assert keys is not None and keys.size == 0
    assert catalog.count_pins() == 24
    assert catalog.scalar("SELECT count(*) FROM boards") == 6


def test_transaction_rolls_back_on_error(catalog: Catalog) -> None:
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.set_meta("k", "v")
        catalog.drop_pins([0, 1, 2])
        raise RuntimeError("boom")
    assert catalog.get_meta("k") is None
    assert catalog.count_pins() == 24
    with catalog.transaction():
        catalog.drop_pins([0, 1])
    assert catalog.count_pins() == 22
    assert 0 not in {k for k, _ in catalog.pin_paths()}


def test_insert_rows(catalog: Catalog) -> None:
    """One columnar insert: existing keys kept (keep_existing), numbers in text columns
    written as text, and a refused insert in a transaction fails with its own error."""
    import duckdb

    cols = (("board", "str"), ("user_id", "str"), ("name", "str"), ("category", "str"),
            ("description", "str"))  # fmt: skip
    (old,) = catalog.query("SELECT * FROM boards LIMIT 1")
    rows = [[old["board"], "someone", "renamed", "other", ""], ["new/board", None, 7, "c", None]]
    catalog.insert_rows("boards", cols, rows, keep_existing=True)
    assert catalog.query("SELECT * FROM boards WHERE board = ?", [old["board"]]) == [old]
    (new,) = catalog.query("SELECT * FROM boards WHERE board = 'new/board'")
    assert (new["user_id"], new["name"], new["description"]) == (None, "7", None)
    catalog.insert_rows("boards", cols, [])  # nothing to do
    with pytest.raises(duckdb.ConstraintException), catalog.transaction():
        catalog.insert_rows("boards", cols, [["new/board", "u", "again", "c", ""]])
    assert catalog.query("SELECT name FROM boards WHERE board = 'new/board'") == [{"name": "7"}]


def test_pin_paths_subset_in_key_order(catalog: Catalog) -> None:
    rows = catalog.pin_paths([5, 1, 3, 999])
    assert [k for k, _ in rows] == [1, 3, 5]
    assert all(Path(p).is_file() for _, p in rows)


def test_add_skipped_records_rows(catalog: Catalog) -> None:
    catalog.add_skipped(
        [SkippedPin("/a.jpg", "truncated", "half", "p1", "embed")], backbone="bb", ingest_id=None
    )
    catalog.add_skipped([])
    (row,) = catalog.query("SELECT * FROM skipped")
    assert (row["pin_id"], row["stage"], row["reason"], row["backbone"]) == (
        "p1",
        "embed",
        "truncated",
        "bb",
    )
    assert row["created_at"] is not None


def test_ingest_records_skipped(tmp_path: Path, tree_copy: Path) -> None:
    first = sorted(tree_copy.glob("*/*/*/*.jpg"))[0]
    first.write_bytes(b"")
    result = read_corpus(tree_copy, IngestConfig(per_category=6))
    with Catalog(tmp_path / "c.duckdb") as cat:
        ingest_id, added, _ = cat.add_ingest(result, "{}")
        assert added == 18
        rows = cat.query("SELECT pin_id, reason, stage, ingest_id FROM skipped")
        assert rows == [
            {
                "pin_id": first.stem,
                "reason": "empty_file",
                "stage": "ingest",
                "ingest_id": ingest_id,
            }
        ]
        (ing,) = cat.query("SELECT * FROM ingests")
        assert (ing["found"], ing["added"], ing["skipped"], ing["sampled_out"]) == (24, 18, 1, 5)


def test_embedding_rows_and_vector_parts(tmp_path: Path) -> None:
    with Catalog(tmp_path / "c.duckdb") as cat:
        assert cat.get_embedding("bb") is None
        cat.upsert_embedding(
            "bb",
            spec={"weights": "random", "dim": 8},
            preprocess={"size": 3},
            dim=8,
            dtype="float32",
            normalize=True,
        )
        emb = cat.get_embedding("bb")
        assert emb["spec"] == {"weights": "random", "dim": 8}
        assert emb["preprocess"] == {"size": 3}
        assert (emb["dim"], emb["dtype"], emb["normalize"], emb["count"]) == (8, "float32", True, 0)
        cat.add_vector_part("bb", 0, "vectors/bb/part-000000.npy", 5, "abc", "k0")
        cat.add_vector_part("bb", 1, "vectors/bb/part-000001.npy", 3, "def", "k1")
        assert cat.get_embedding("bb")["count"] == 8
        assert [(p["part"], p["keys_sha256"]) for p in cat.vector_parts("bb")] == [
            (0, "k0"),
            (1, "k1"),
        ]
        assert cat.vector_parts("other") == []
        cat.upsert_embedding("bb", seconds=1.5)
        assert cat.get_embedding("bb")["seconds"] == 1.5
        assert [e["backbone"] for e in cat.list_embeddings()] == ["bb"]
        with pytest.raises(duckdb.ConstraintException):
            cat.add_vector_part("bb", 1, "dup", 1, "x", "y")


def test_a_catalog_from_before_key_checksums(tmp_path: Path) -> None:
    """vector_parts without keys_sha256: readers see None, the first writer adds the column."""
    path = tmp_path / "c.duckdb"
    with Catalog(path) as cat:
        cat.connection.execute("ALTER TABLE vector_parts DROP COLUMN keys_sha256")
        cat.connection.execute("INSERT INTO vector_parts VALUES ('bb', 0, 'f.npy', 2, 'abc')")
    with Catalog(path, read_only=True) as cat:
        assert cat.vector_parts("bb") == [
            {"part": 0, "file": "f.npy", "n": 2, "sha256": "abc", "keys_sha256": None}
        ]
    with Catalog(path) as cat:
        cat.add_vector_part("bb", 1, "g.npy", 1, "def", "k1")
        assert [p["keys_sha256"] for p in cat.vector_parts("bb")] == [None, "k1"]


def test_index_rows(tmp_path: Path) -> None:
    with Catalog(tmp_path / "c.duckdb") as cat:
        row = {
            "name": "i",
            "backbone": "bb",
            "factory": "Flat",
            "metric": "cosine",
            "file": "indexes/i.faiss",
            "ntotal": 3,
            "dim": 8,
            "sha256": "s",
            "build_seconds": 0.1,
            "config": "{}",
        }
        cat.upsert_index(row)
        cat.upsert_index({**row, "ntotal": 5})
        assert cat.get_index("i")["ntotal"] == 5
        assert cat.get_index("nope") is None
        assert [r["name"] for r in cat.list_indexes()] == ["i"]


def test_read_only_catalog(tmp_path: Path, ingest_result) -> None:
    path = tmp_path / "c.duckdb"
    with Catalog(path) as cat:
        cat.add_ingest(ingest_result, "{}")
    with Catalog(path, read_only=True) as ro:
        assert ro.read_only and ro.count_pins() == 24
        with pytest.raises(duckdb.Error):
            ro.set_meta("x", "y")
    ro.close()  # idempotent


def test_user_values_with_quotes_round_trip(tmp_path: Path, tree_copy: Path) -> None:
    board = sorted(p for p in tree_copy.glob("*/*") if p.is_dir())[0]
    meta = json.loads((board / "board.json").read_text())
    meta["name"] = INJECTION
    (board / "board.json").write_text(json.dumps(meta))
    pin_json = sorted(board.glob("*/pin.json"))[0]
    info = json.loads(pin_json.read_text())
    info["title"] = "Robert'); DROP TABLE pins;--"
    pin_json.write_text(json.dumps(info))
    result = read_corpus(tree_copy)
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.add_ingest(result, "{}")
        assert cat.count_pins() == 24
        keys = cat.filter_keys(board=INJECTION)  # the display name matches literally
        assert len(keys) == 4
        titles = {r["title"] for r in cat.pins_by_key(keys.tolist()).values()}
        assert "Robert'); DROP TABLE pins;--" in titles


def test_embedding_rows_read_whole(catalog: Catalog) -> None:
    catalog.upsert_embedding("b", spec={"arch": "x"}, dim=8, count=3)
    row = catalog.get_embedding("b")
    assert (row["spec"], row["dim"], row["count"], row["seconds"]) == ({"arch": "x"}, 8, 3, 0)
    catalog.upsert_embedding("b", count=5)
    assert catalog.get_embedding("b")["count"] == 5 and catalog.get_embedding("b")["dim"] == 8
    # a row an older pinsearch was killed writing (its insert committed, its update not)
    catalog.connection.execute(
        "INSERT INTO embeddings (backbone, count, seconds) VALUES ('c', 0, 0)"
    )
    assert catalog.get_embedding("c")["spec"] == {}
