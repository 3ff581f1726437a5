"""A whole store on the GPU (pytest -m gpu): CUDA embedding with nvJPEG decoding, a FAISS-GPU
index, heads, the warm query process, removal and additions, against the same store built on
the CPU. Skipped without CUDA and faiss-gpu (see conftest)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pinsearch.classify import classify, train_head
from pinsearch.edit import add_corpus, remove_pins
from pinsearch.embed import EmbedConfig
from pinsearch.indexes import IndexConfig
from pinsearch.pipeline import index_corpus
from pinsearch.search import PinSearcher
from pinsearch.serve import serve
from pinsearch.store import Store

pytestmark = [pytest.mark.gpu, pytest.mark.faiss_gpu]

B = "test_efficientnet"
ON = {"gpu": ("cuda", "device"), "cpu": ("cpu", "pil")}  # index device: (embedding, decoding)


def _build(corpus: Path, store: Path, device: str) -> None:
    embed_device, decode = ON[device]
    report = index_corpus(
        corpus, store, backbone=B,
        embed=EmbedConfig(device=embed_device, decode=decode, workers=0, batch_size=8),
        index={"factory": "Flat", "metric": "cosine", "device": device},
    )  # fmt: skip
    assert report.embedded == 24 and report.skipped == report.embed_failed == 0


def _ids(result: object) -> list[str]:
    return [h.pin_id for h in result.hits]  # type: ignore[attr-defined]


def test_a_store_built_and_queried_on_the_gpu_answers_as_on_the_cpu(
    tree_corpus, make_tree, tmp_path: Path
) -> None:
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    _build(tree_corpus.root, gpu, "gpu")
    _build(tree_corpus.root, cpu, "cpu")
    with Store.open(gpu, read_only=True) as g, Store.open(cpu, read_only=True) as c:
        assert g.catalog.get_embedding(B)["amp"] and not c.catalog.get_embedding(B)["amp"]
        (xg, kg), (xc, kc) = g.vectors(B).load(), c.vectors(B).load()
        by_key = dict(zip(kc.tolist(), xc))
        cos = [float(a @ by_key[k] / np.linalg.norm(a) / np.linalg.norm(by_key[k]))
               for a, k in zip(xg, kg.tolist())]  # fmt: skip
        assert min(cos) > 0.98  # nvJPEG pixels and bf16 autocast: close, not equal
        # the store's own vectors: the GPU index answers as a CPU copy of it, filters too
        on_gpu = PinSearcher(g, config=IndexConfig(device="gpu"))
        on_cpu = PinSearcher(g, config=IndexConfig(device="cpu"))
        assert on_gpu.index.on_gpu and not on_cpu.index.on_gpu
        pins = g.catalog.query("SELECT pin_id, category FROM pins ORDER BY pin_id")
        for pin in pins:
            a = on_gpu.similar_to_pin(pin["pin_id"], 5)
            b = on_cpu.similar_to_pin(pin["pin_id"], 5)
            assert _ids(a) == _ids(b) and pin["pin_id"] not in _ids(a)
            np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits],
                                       atol=1e-4)  # fmt: skip
            same = on_gpu.similar_to_pin(pin["pin_id"], 3, category=pin["category"])
            assert {h.category for h in same.hits} == {pin["category"]}
        # an image file embedded as the pins were lands on its own pin
        first = g.catalog.query("SELECT pin_id, path FROM pins ORDER BY pin_id LIMIT 4")
        for row in first:
            assert _ids(on_gpu.similar_to_image(row["path"], 1)) == [row["pin_id"]]
        del on_gpu, on_cpu
    # the warm query process on the GPU answers as the searcher does
    asked = [{"id": i, "pin": p["pin_id"], "k": 4} for i, p in enumerate(pins[:5])]
    out = io.StringIO()
    served = serve(gpu, requests=io.StringIO("".join(json.dumps(r) + "\n" for r in asked)),
                   responses=out, config=IndexConfig(device="gpu"))  # fmt: skip
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert served == 5 and lines[0]["ready"] and len(lines) == 6
    with Store.open(gpu, read_only=True) as g:
        searcher = PinSearcher(g, config=IndexConfig(device="gpu"))
        for request, response in zip(asked, lines[1:]):
            assert [h["pin_id"] for h in response["hits"]] == _ids(
                searcher.similar_to_pin(request["pin"], 4)
            )
        del searcher
    # heads trained on the GPU store: 1-NN (an index query on the GPU) and a CUDA linear SVM
    with Store.open(gpu) as g:
        train_head(g, B, "knn", {"n_neighbors": 1, "device": "gpu"}, name="knn")
        train_head(g, B, "lsvm", {"C": 1.0, "device": "cuda"}, name="svm")
        for pin in pins[:6]:
            assert classify(g, pin_id=pin["pin_id"], head="knn").predicted == pin["category"]
            assert classify(g, pin_id=pin["pin_id"], head="svm").predicted in {
                p["category"] for p in pins
            }
    # removal and additions keep the GPU index in step with the catalog
    board = pins[0]["pin_id"]
    with Store.open(gpu) as g:
        gone = g.catalog.query("SELECT board FROM pins WHERE pin_id = ?", [board])[0]
        report = remove_pins(g, boards=[gone["board"]])
        assert report.pins == 4 and report.indexes == [B] and not report.rebuilt
    more = make_tree(tmp_path / "more", seed=7, pins_per_board=1)
    added = add_corpus(more.root, gpu, device="cuda", decode="device", workers=0)
    assert added.added == 6 and added.backbones[0]["embedded"] == 6
    with Store.open(gpu, read_only=True) as g:
        searcher = PinSearcher(g, config=IndexConfig(device="gpu"))
        assert searcher.index.on_gpu and searcher.index.ntotal == 26
        kept = {r["pin_id"] for r in g.catalog.query("SELECT pin_id FROM pins")}
        new = g.catalog.query("SELECT pin_id, path FROM pins WHERE ingest_id = 2")
        assert len(kept) == 26 and len(new) == 6
        for row in new:
            assert _ids(searcher.similar_to_image(row["path"], 1)) == [row["pin_id"]]
            assert set(_ids(searcher.similar_to_pin(row["pin_id"], 25))) <= kept
