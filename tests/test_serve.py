"""``pinsearch serve``: a warm process answering JSON lines — pins, images, text, boards,
titles — and bad requests without dying."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pinsearch.search import PinSearcher
from pinsearch.serve import answer, serve
from pinsearch.store import Store


def _run(store: Path, lines: list[str]) -> list[dict]:
    out = io.StringIO()
    n = serve(store, requests=io.StringIO("\n".join(lines) + "\n"), responses=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0]["ready"] is True and n == len(rows) - 1
    return rows[1:]


def test_serve_answers_like_the_searcher(built_store, tree_corpus) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]["pin_id"]
        direct = PinSearcher(store).similar_to_pin(pin, 5, category="architecture")
    image = next(Path(tree_corpus.root).rglob("*.jpg"))
    got = _run(
        built_store.path,
        [
            json.dumps({"id": 1, "pin": pin, "k": 5, "category": "architecture"}),
            json.dumps({"id": 2, "image": str(image), "k": 3}),
            "",
            "{not json",
            json.dumps({"id": 4, "pin": "nope"}),
            json.dumps({"id": 5, "text": "a car"}),  # no text tower in this store
            json.dumps({"id": 6, "pin": pin, "image": str(image)}),
        ],
    )
    assert [r["id"] for r in got] == [1, 2, None, 4, 5, 6]
    assert [h["pin_id"] for h in got[0]["hits"]] == [h.pin_id for h in direct.hits]
    assert len(got[1]["hits"]) == 3 and got[1]["query"]["image"] == str(image)
    assert "error" in got[2] and "nope" in got[3]["error"]
    assert "text tower" in got[4]["error"] and "exactly one" in got[5]["error"]
    assert all(r["ms"] >= 0 for r in got)


def test_serve_text_boards_titles(tmp_path: Path, built_store) -> None:
    import shutil

    from pinsearch.align import AlignConfig, align_store

    store = tmp_path / "s"
    shutil.copytree(built_store.path, store)
    with Store.open(store) as s:
        align_store(s, config=AlignConfig(epochs=10))
        pin = s.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    got = _run(
        store,
        [
            json.dumps({"text": "food", "k": 4, "mode": "fused"}),
            json.dumps({"text": "food", "boards": True, "k": 2, "per_board": 2}),
            json.dumps({"pin": pin, "titles": ["a cake", "a car"]}),
            json.dumps({"pin": pin, "titles": "a cake"}),
            json.dumps({"pin": pin, "titles": ["a cake"] * 1001}),  # (minutes of a server)
        ],
    )
    assert len(got[0]["hits"]) == 4 and got[0]["metric"] == "fused-z"
    assert len(got[1]["boards"]) == 2
    assert {m["text"] for m in got[2]["matches"]} == {"a cake", "a car"}
    assert "list of strings" in got[3]["error"]
    assert "at most 1,000 of up to 10,000 characters" in got[4]["error"]


def test_answer_rejects_non_objects(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as s, pytest.raises(ValueError, match="JSON"):
        answer(PinSearcher(s), [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"pin": "x", "kk": 5}, "unknown request key.*'kk'"),
        ({"pin": "x", "mode": "fused"}, "'mode' applies to 'text'"),
        ({"text": "cars", "alpha": 0.3}, "'alpha' weighs mode 'fused' only"),
        ({"text": "cars", "titles": ["a"]}, "rank texts for a 'pin' or an 'image', not a 'text'"),
        ({"text": "cars", "per_board": 2}, "'per_board' applies to 'boards'"),
        ({"text": "cars", "boards": False, "board_score": "max"}, "'board_score' applies"),
        ({"text": "cars", "boards": True, "mode": "fused"}, "'boards' requests take no 'mode'"),
        ({"pin": "x", "titles": ["a"], "k": 3}, "'titles' requests take no 'k'"),
        ({"text": "cars", "boards": "false"}, "'boards' must be true or false, got 'false'"),
        ({"image": " "}, "'image' is empty; give the path of an image file"),
        ({"text": "", "mode": "image"}, "cannot answer text"),  # an empty text, not a 'mode'
    ],
)
def test_answer_refuses_keys_it_would_ignore(built_store, request_: dict, match: str) -> None:
    with Store.open(built_store.path, read_only=True) as s, pytest.raises(ValueError, match=match):
        answer(PinSearcher(s), request_)


def test_cli_serve_process(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    proc = subprocess.run(
        [sys.executable, "-m", "pinsearch.cli.app", "serve", "--store", str(built_store.path)],
        input=json.dumps({"id": 7, "pin": pin, "k": 2}) + "\n",
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PINSEARCH_OFFLINE": "1"},
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(lines[0])["ready"] and json.loads(lines[1])["id"] == 7
    assert "answered 1 requests" in proc.stderr


def test_serve_answers_every_bad_line_and_goes_on(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    lines = [
        b'{"id": 1, "pin": "%s", "k": 1e400}' % pin.encode(),
        json.dumps({"id": 2, "pin": pin, "k": 10**12}).encode(),
        json.dumps({"id": 3, "pin": pin, "k": True}).encode(),
        json.dumps({"id": 4, "text": 5}).encode(),
        json.dumps({"id": 5, "pin": pin, "board": ["a"]}).encode(),
        b'{"id": NaN, "pin": "x"}',
        b"[" * 100_000,
        b'{"id": 8, "pin": "\xff\xfe"}',
        json.dumps({"id": 9, "pin": pin, "k": 2}).encode(),
        json.dumps({"id": 10, "pin": [pin]}).encode(),
        b"\xef\xbb\xbf" + json.dumps({"id": 11, "pin": pin, "k": 1}).encode(),  # a BOM first
    ]
    out = io.StringIO()
    assert serve(built_store.path, requests=io.BytesIO(b"\n".join(lines) + b"\n"), responses=out)
    got = [json.loads(line) for line in out.getvalue().splitlines()[1:]]  # all valid JSON
    assert len(got) == 11 and all("error" in r for r in got[:8])
    assert "1e400 is out of range" in got[0]["error"]
    assert "'k' must be a whole number from 1 to 10000, got 1000000000000" in got[1]["error"]
    assert "got True" in got[2]["error"] and "'text' must be a string" in got[3]["error"]
    assert "'board' must be a string" in got[4]["error"] and "NaN" in got[5]["error"]
    assert (
        "RecursionError" in got[6]["error"]
        and "not UTF-8 (invalid start byte at byte 18)" in got[7]["error"]
    )
    assert got[8]["id"] == 9 and len(got[8]["hits"]) == 2
    assert "'pin' must be a pin id" in got[9]["error"]
    assert got[10]["id"] == 11 and len(got[10]["hits"]) == 1


def test_a_detached_reader_lets_writers_in_and_answers_as_opened(built_store, tmp_path) -> None:
    import shutil

    path = tmp_path / "s"
    shutil.copytree(built_store.path, path)
    with Store.open(path, read_only=True, detach=True) as reader:
        private = reader._private
        assert private is not None and private.is_dir() and not reader.snapshot
        searcher = PinSearcher(reader, cache_metadata=True)
        pin = reader.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]["pin_id"]
        before = [h.pin_id for h in searcher.similar_to_pin(pin, 3).hits]
        with Store.open(path) as writer:  # the live catalog is free: a writer opens
            writer.catalog.connection.execute("UPDATE pins SET title = 'changed'")
        assert [h.pin_id for h in searcher.similar_to_pin(pin, 3).hits] == before
        assert all(h.title != "changed" for h in searcher.similar_to_pin(pin, 3).hits)
        keys = searcher.filter_keys(category="architecture")
        with pytest.raises(ValueError, match="read-only"):
            keys[:] = -5  # the cache's own groups: not the caller's to change
    assert not private.exists()


def test_hits_the_catalog_does_not_know_are_made_up_from_further_down(
    built_store, tmp_path
) -> None:
    import shutil

    path = tmp_path / "s"
    shutil.copytree(built_store.path, path)
    with Store.open(path, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]["pin_id"]
        first = PinSearcher(store).similar_to_pin(pin, 6).hits
    with Store.open(path, verify=False) as store:  # as a snapshot older than its index
        store.catalog.connection.execute(
            "DELETE FROM pins WHERE pin_id IN (?, ?)", [first[0].pin_id, first[1].pin_id]
        )
    with Store.open(path, read_only=True, verify=False) as store:
        for cache in (False, True):
            hits = PinSearcher(store, cache_metadata=cache).similar_to_pin(pin, 5).hits
            assert [h.pin_id for h in hits][:4] == [h.pin_id for h in first[2:]]
            assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_a_warm_reader_keeps_reading_parts_a_later_writer_deletes(built_store, tmp_path) -> None:
    import shutil

    from pinsearch.edit import remove_pins

    path = tmp_path / "s"
    shutil.copytree(built_store.path, path)
    query = "SELECT pin_id FROM pins ORDER BY pin_key"
    with Store.open(path, read_only=True) as cold:  # the answer, before any writer
        ids = [r["pin_id"] for r in cold.catalog.query(query)]
        before = [h.pin_id for h in PinSearcher(cold).similar_to_pin(ids[5], 3).hits]
    with Store.open(path, read_only=True, detach=True) as reader:
        searcher = PinSearcher(reader, cache_metadata=True)
        searcher.warm()  # as serve does: every vector part mapped, none read yet
        files = [path / str(p["file"]) for p in reader.vectors(searcher.backbone).parts()]
        with Store.open(path) as writer:  # retires the parts holding the removed pin
            remove_pins(writer, pin_ids=[ids[0]])
        for _ in range(2):  # the second writer after the remove deletes its retired parts
            Store.open(path).close()
        assert not all(f.exists() for f in files)
        assert [h.pin_id for h in searcher.similar_to_pin(ids[5], 3).hits] == before


def test_serve_answers_from_a_named_index(store_copy: Path) -> None:
    from pinsearch.pipeline import index_corpus

    index_corpus(None, store_copy, backbone="test_efficientnet", index={"factory": "HNSW16"},
                 index_name="hnsw")  # fmt: skip
    out = io.StringIO()
    serve(store_copy, index="hnsw", requests=io.StringIO(""), responses=out)
    assert json.loads(out.getvalue())["index"] == "hnsw"
    with pytest.raises(ValueError, match="no index 'nope'"):
        serve(store_copy, index="nope", requests=io.StringIO(""), responses=io.StringIO())
