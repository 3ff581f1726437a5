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
        ],
    )
    assert len(got[0]["hits"]) == 4 and got[0]["metric"] == "fused-z"
    assert len(got[1]["boards"]) == 2
    assert {m["text"] for m in got[2]["matches"]} == {"a cake", "a car"}
    assert "list of strings" in got[3]["error"]


def test_answer_rejects_non_objects(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as s, pytest.raises(ValueError, match="JSON"):
        answer(PinSearcher(s), [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"pin": "x", "kk": 5}, "unknown request key.*'kk'"),
        ({"pin": "x", "mode": "fused"}, "'mode' applies to 'text'"),
        ({"text": "cars", "per_board": 2}, "'per_board' applies to 'boards'"),
        ({"text": "cars", "boards": False, "board_score": "max"}, "'board_score' applies"),
        ({"text": "cars", "boards": True, "mode": "fused"}, "'boards' requests take no 'mode'"),
        ({"pin": "x", "titles": ["a"], "k": 3}, "'titles' requests take no 'k'"),
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
