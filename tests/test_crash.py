"""Kill -9 at random points of ``index``, ``add``, ``refresh`` and ``evaluate`` (real
subprocesses, killed several times each): the next run resumes, and the final store is the one
an uninterrupted run makes — same pins, same vectors, same index answers, same study results —
and checks clean."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pinsearch.check import check_store
from pinsearch.search import PinSearcher
from pinsearch.store import Store

pytestmark = pytest.mark.slow

B = "test_efficientnet"
KILLS = 3

_INDEX = """
import sys
from pinsearch.embed import EmbedConfig
from pinsearch.pipeline import index_corpus
print("ready", flush=True)
index_corpus(sys.argv[1], sys.argv[2], backbone="test_efficientnet",
             embed=EmbedConfig(part_size=4, batch_size=4, workers=0, flush_seconds=0))
"""

_ADD = """
import sys
from pinsearch.edit import add_corpus
print("ready", flush=True)
add_corpus(sys.argv[1], sys.argv[2], workers=0, batch_size=4)
"""

_REFRESH = """
import sys
from pinsearch.edit import refresh_store
print("ready", flush=True)
refresh_store(sys.argv[1], workers=0, batch_size=4)
"""

_STUDY = """
import json, sys
from pinsearch.eval.study import StudyConfig, run_study
kw = json.loads(sys.argv[1])
config = StudyConfig(store=sys.argv[2], **{**kw, "backbones": tuple(kw["backbones"])})
print("ready", flush=True)
run_study(config)
"""
STUDY = {
    "name": "crash",
    "backbones": [B],
    "heads": {
        "knn": {"n_neighbors": [1, 3]},
        "lsvm": {"C": [0.1, 1.0]},
        "mlp": {"max_epochs": [30], "batch_size": [16]},
    },
    "folds": 2,
    "test_size": 0.25,
    "min_per_class": 4,
    "device": "cpu",
}


def _run(script: str, *args: str, kill_after: float | None = None) -> tuple[bool, float]:
    """Run ``script`` in a fresh interpreter; kill -9 it ``kill_after`` seconds after it says
    "ready" (its imports done, its work about to start).

    Returns:
        (killed while still working, seconds of work it ran).
    """
    env = {**os.environ, "PINSEARCH_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    start = time.perf_counter()
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True, time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err[-2000:]
    return False, time.perf_counter() - start


def _kill_repeatedly(script: str, *args: str, work: float, seed: int) -> int:
    """Kill the script at random points of its work until ``KILLS`` kills landed (or it
    finished), then let it finish; returns the kills that landed mid-work."""
    rng = np.random.default_rng(seed)
    kills = 0
    for _ in range(2 * KILLS):
        killed, _ = _run(script, *args, kill_after=float(rng.uniform(0.05, 0.3) * work))
        if not killed:
            return kills  # the work was done before the kill: nothing left to interrupt
        kills += 1
        if kills == KILLS:
            break
    _run(script, *args)  # and the last run finishes
    return kills


def _snapshot(path: Path) -> dict:
    with Store.open(path, read_only=True) as store:
        vecs, keys = store.vectors(B).load()
        rows = store.catalog.pins_by_key(keys.tolist())
        ids = [rows[int(k)]["pin_id"] for k in keys]
        order = np.argsort(ids)
        searcher = PinSearcher(store, backbone=B)
        answers = [[h.pin_id for h in searcher.similar_to_pin(ids[i], 5).hits] for i in order[:6]]
        return {
            "ids": sorted(ids),
            "pins": sorted(r["pin_id"] for r in store.catalog.query("SELECT pin_id FROM pins")),
            "vectors": vecs[order],
            "ntotal": store.load_index(B).ntotal,
            "answers": answers,
        }


def _same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"] and a["pins"] == b["pins"] and a["ntotal"] == b["ntotal"]
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-5)
    assert a["answers"] == b["answers"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, make_tree):
    return make_tree(tmp_path_factory.mktemp("crash") / "corpus", pins_per_board=12)


@pytest.fixture(scope="module")
def indexed(corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus indexed once (in this process), for the add and evaluate tests to copy."""
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus

    path = tmp_path_factory.mktemp("indexed") / "store"
    index_corpus(corpus.root, path, backbone=B, embed=EmbedConfig(workers=0))
    return path


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def test_index_survives_kill_9(corpus, tmp_path: Path) -> None:
    _, work = _run(_INDEX, str(corpus.root), str(tmp_path / "ref"))
    kills = _kill_repeatedly(_INDEX, str(corpus.root), str(tmp_path / "s"), work=work, seed=1)
    assert kills == KILLS, "the runs ended before they could be killed"
    _same(_snapshot(tmp_path / "s"), _snapshot(tmp_path / "ref"))
    report = check_store(tmp_path / "s")
    assert report.ok and not report.errors, report.findings
    print(f"index: survived {kills} kill -9")


def test_add_survives_kill_9(indexed: Path, make_tree, tmp_path: Path) -> None:
    from pinsearch.edit import add_corpus

    more = make_tree(tmp_path / "more", seed=11, pins_per_board=6)
    for name in ("ref", "s"):
        shutil.copytree(indexed, tmp_path / name)
    work = _timed(add_corpus, more.root, tmp_path / "ref", workers=0, batch_size=4)
    kills = _kill_repeatedly(_ADD, str(more.root), str(tmp_path / "s"), work=work, seed=2)
    assert kills == KILLS
    _same(_snapshot(tmp_path / "s"), _snapshot(tmp_path / "ref"))
    assert check_store(tmp_path / "s").ok
    print(f"add: survived {kills} kill -9")


def test_refresh_survives_kill_9(make_tree, tmp_path: Path) -> None:
    """Every pin's image replaced by another's: the killed refreshes' store ends as the
    uninterrupted one (the plan written before any vector was dropped is finished)."""
    from pinsearch.edit import refresh_store
    from pinsearch.embed import EmbedConfig
    from pinsearch.pipeline import index_corpus

    made = make_tree(tmp_path / "corpus", seed=5, pins_per_board=8)
    index_corpus(made.root, tmp_path / "base", backbone=B, embed=EmbedConfig(workers=0))
    for name in ("ref", "s"):
        shutil.copytree(tmp_path / "base", tmp_path / name)
    files = sorted(Path(made.root).rglob("*.jpg"))
    data = [f.read_bytes() for f in files]
    for f, other in zip(files, data[1:] + data[:1]):  # each takes the next one's image
        f.write_bytes(other)
    work = _timed(refresh_store, tmp_path / "ref", workers=0, batch_size=4)
    kills = _kill_repeatedly(_REFRESH, str(tmp_path / "s"), work=work, seed=4)
    assert kills == KILLS
    _same(_snapshot(tmp_path / "s"), _snapshot(tmp_path / "ref"))
    assert not check_store(tmp_path / "s").findings
    assert refresh_store(tmp_path / "s", dry_run=True).changed == 0
    print(f"refresh: survived {kills} kill -9")


def test_evaluate_survives_kill_9(indexed: Path, tmp_path: Path) -> None:
    for name in ("ref", "s"):
        shutil.copytree(indexed, tmp_path / name)
    from pinsearch.eval.study import StudyConfig, run_study

    config = StudyConfig(store=str(tmp_path / "ref"), **{**STUDY, "backbones": (B,)})
    work = _timed(run_study, config)
    kills = _kill_repeatedly(_STUDY, json.dumps(STUDY), str(tmp_path / "s"), work=work, seed=3)
    assert kills == KILLS

    def cells(path: Path) -> dict:
        with Store.open(path, read_only=True) as store:
            rows = store.catalog.query(
                "SELECT backbone, head, test_macro_f1, best_params FROM study_cells "
                "ORDER BY backbone, head"
            )
            preds = store.catalog.query(
                "SELECT head, pin_key, predicted FROM study_predictions ORDER BY head, pin_key"
            )
        return {"cells": json.dumps(rows, default=str), "predictions": preds}

    assert cells(tmp_path / "s") == cells(tmp_path / "ref")
    assert check_store(tmp_path / "s").ok
    print(f"evaluate: survived {kills} kill -9")
