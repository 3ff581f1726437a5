"""The Typer app end to end: index, query, info, backbones, bench, errors."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from pinsearch.cli.app import app
from pinsearch.eval.bench import overlap_at_k, round_up
from pinsearch.store import Store

runner = CliRunner()


def _json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


@pytest.fixture
def cli_store(tree_copy: Path, tmp_path: Path) -> tuple[Path, dict[str, object]]:
    store = tmp_path / "cli-store"
    report = _json(
        ["index", str(tree_copy), "--store", str(store), "--backbone", "test_efficientnet",
         "--workers", "0", "--json"]
    )  # fmt: skip
    return store, report  # type: ignore[return-value]


def test_index_json_report(cli_store: tuple[Path, dict[str, object]]) -> None:
    _, report = cli_store
    assert report["found"] == 24 and report["added"] == 24 and report["embedded"] == 24
    assert report["index_action"] == "built" and report["ntotal"] == 24
    assert report["factory"] == "Flat" and report["metric"] == "cosine"


def test_index_again_is_incremental(
    cli_store: tuple[Path, dict[str, object]], tree_copy: Path
) -> None:
    store, _ = cli_store
    first = _json(["info", "--store", str(store), "--json"])["embeddings"][0]  # type: ignore[index]
    again = _json(["index", str(tree_copy), "--store", str(store), "-b", "test_efficientnet",
                   "--workers", "0", "--json"])  # fmt: skip
    assert again["added"] == 0 and again["already_present"] == 24 and again["embedded"] == 0
    assert again["index_action"] == "unchanged"
    run = _json(["info", "--store", str(store), "--json"])["embeddings"][0]  # type: ignore[index]
    assert run["images_per_s"] == first["images_per_s"] > 0  # the run that embedded them


def test_query_by_pin_with_filters(cli_store: tuple[Path, dict[str, object]]) -> None:
    store, _ = cli_store
    info = _json(["info", "--store", str(store), "--json"])
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        pin = s.catalog.query("SELECT pin_id, category FROM pins ORDER BY pin_id LIMIT 1")[0]
    res = _json(["query", "--store", str(store), "--pin", pin["pin_id"], "-k", "5", "--json"])
    assert res["k"] == 5 and len(res["hits"]) == 5
    assert pin["pin_id"] not in [h["pin_id"] for h in res["hits"]]
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4, 5]
    other = next(c["category"] for c in info["categories"] if c["category"] != pin["category"])
    res = _json(["query", "-s", str(store), "--pin", pin["pin_id"], "-k", "3",
                 "--category", other, "--json"])  # fmt: skip
    assert len(res["hits"]) == 3 and {h["category"] for h in res["hits"]} == {other}
    assert res["filters"] == {"category": other}


def test_query_by_image_finds_itself(cli_store: tuple[Path, dict[str, object]]) -> None:
    store, _ = cli_store
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        pin = s.catalog.query("SELECT pin_id, path FROM pins ORDER BY pin_id LIMIT 1")[0]
    res = _json(["query", "-s", str(store), "--image", pin["path"], "-k", "2", "--json"])
    assert res["hits"][0]["pin_id"] == pin["pin_id"]
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_query_table_output(cli_store: tuple[Path, dict[str, object]]) -> None:
    store, _ = cli_store
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        pin_id = s.catalog.query("SELECT min(pin_id) AS p FROM pins")[0]["p"]
    result = runner.invoke(app, ["query", "-s", str(store), "--pin", pin_id, "-k", "2"])
    assert result.exit_code == 0 and "rank" in result.stdout


def test_query_needs_exactly_one_of_pin_or_image(cli_store: tuple[Path, dict[str, object]]) -> None:
    store, _ = cli_store
    result = runner.invoke(app, ["query", "-s", str(store)])
    assert result.exit_code != 0
    assert "exactly one of --pin, --image or --text" in result.output


def test_info_json_schema(cli_store: tuple[Path, dict[str, object]]) -> None:
    store, _ = cli_store
    info = _json(["info", "-s", str(store), "--json"])
    for key in ("path", "format_version", "pins", "users", "boards", "categories", "embeddings",
                "indexes", "skipped", "skipped_by_reason", "ingests", "top_boards"):  # fmt: skip
        assert key in info
    assert info["pins"] == 24 and info["users"] == 2 and info["boards"] == 6
    assert sum(c["pins"] for c in info["categories"]) == 24
    assert info["embeddings"][0]["backbone"] == "test_efficientnet"
    assert info["indexes"][0]["ntotal"] == 24
    table = runner.invoke(app, ["info", "-s", str(store)])
    assert table.exit_code == 0 and "food_drink" in table.stdout


def test_backbones_json_lists_registry() -> None:
    rows = _json(["backbones", "--json"])
    names = {r["name"] for r in rows}
    assert {"effnet_lite0", "convnext_base", "efficientnetv2_b3", "classic"} <= names
    lite0 = next(r for r in rows if r["name"] == "effnet_lite0")
    assert lite0["offline"] is True and lite0["dim"] == 1280 and lite0["input_size"] == 224
    assert sum(r["paper"] for r in rows) == 6
    only = _json(["backbones", "convnext*", "--json"])
    assert {r["name"] for r in only} == {"convnext_tiny", "convnext_small", "convnext_base"}


def test_bench_index_prints_numbers() -> None:
    result = runner.invoke(app, ["bench", "index", "--n", "2000", "--dim", "32",
                                 "--factory", "Flat", "--factory", "HNSW16",
                                 "--fp16-also", "Flat", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = [(r["factory"], r["fp16"]) for r in data["rows"]]
    assert rows == [("Flat", False), ("HNSW16", False), ("Flat", True)]
    fp16_flat = data["rows"][2]  # float16 storage is FAISS-GPU's: the CPU keeps float32
    assert fp16_flat["device"] == "cpu" and fp16_flat["recall_at_10"] == 1.0
    assert data["rows"][0]["recall_at_10"] == 1.0 and data["rows"][1]["qps"] > 0
    # Flat holds 2,000 x 32 float32 = 0.24 MiB (plus a small header).
    assert 0.24 <= data["rows"][0]["memory_mb"] <= 0.3
    assert {r["gpu_memory_mb"] for r in data["rows"]} == {None}


def test_bench_index_of_fewer_vectors_than_k_and_a_refused_factory() -> None:
    """5 vectors at k = 10: exact search scores recall 1 (the padding counted as a shared
    hit: 0.6); a factory its settings refuse is that row's error, not the whole run's."""
    result = runner.invoke(app, ["bench", "index", "--n", "5", "--dim", "8", "--factory", "Flat",
                                 "--factory", "IVF4,PQ0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    flat, bad = json.loads(result.stdout)["rows"]
    assert flat["recall_at_10"] == 1.0 and "PQ's sub-quantizers 0" in bad["error"]
    small = runner.invoke(app, ["bench", "index", "--n", "300", "--dim", "8", "--json"])
    assert small.exit_code == 0, small.output  # (the default list asked PQ0 of 8 dims)
    assert "IVF7,PQ1" in [r["factory"] for r in json.loads(small.stdout)["rows"]]
    assert overlap_at_k(np.array([[3, 1, -1]]), np.array([[1, 2, -1]])) == 0.5


def test_bench_index_reports_what_gpu_indexes_hold_there(faiss_gpu_stand_in: list) -> None:
    """On the GPU(s) float16 Flat rows take half the float32 bytes, all shards together."""
    result = runner.invoke(app, ["bench", "index", "--n", "2000", "--dim", "32",
                                 "--factory", "Flat", "--factory", "IVF8,PQ4",
                                 "--fp16-also", "Flat", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    flat, pq, half = json.loads(result.stdout)["rows"]
    assert [r["device"] for r in (flat, pq, half)] == ["gpu", "gpu", "gpu fp16"]
    assert flat["gpu_memory_mb"] == round(2000 * 32 * 4 / 2**20, 3)
    assert half["gpu_memory_mb"] == round(2000 * 32 * 2 / 2**20, 3)
    # 4-byte codes and 8-byte ids per vector, 8 centroids of 32 floats
    assert pq["gpu_memory_mb"] == round((2000 * (4 + 8) + 8 * 32 * 4) / 2**20, 3)


def test_unknown_store_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", "-s", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert isinstance(result.exception, FileNotFoundError)
    assert "no pinsearch store" in str(result.exception)


def test_main_turns_errors_into_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from pinsearch.cli.app import main

    monkeypatch.setattr("sys.argv", ["pinsearch", "info", "-s", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    assert "no pinsearch store" in capsys.readouterr().err


def test_index_with_device_decoding_and_auto_batch(tree_copy: Path, tmp_path: Path) -> None:
    """--decode device on the CPU (with or without a --cpu-share the workers decode) and
    --batch-size 0 give the same vectors as the PIL path."""
    import numpy as np

    from pinsearch.store import Store

    vectors = {}
    for decode, share in (("pil", "0"), ("device", "0"), ("device", "0.5")):
        store = tmp_path / f"{decode}-{share}"
        args = ["index", str(tree_copy), "--store", str(store), "-b", "test_efficientnet"]
        report = _json([*args, "--workers", "0", "--decode", decode, "--cpu-share", share,
                        "--batch-size", "0", "--json"])  # fmt: skip
        assert report["embedded"] == 24
        with Store.open(store, read_only=True) as s:
            x, keys = s.vectors("test_efficientnet").load()
            ids = s.catalog.pins_by_key(keys.tolist())
            vectors[decode, share] = {ids[int(k)]["pin_id"]: v for k, v in zip(keys, x)}
    pil = vectors.pop(("pil", "0"))
    for device in vectors.values():
        assert pil.keys() == device.keys()
        for pin, a in pil.items():
            b = device[pin]
            assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    bad = runner.invoke(app, ["index", str(tree_copy), "--store", str(tmp_path / "x"),
                              "-b", "test_efficientnet", "--decode", "gpu"])  # fmt: skip
    assert bad.exit_code != 0 and "decode" in str(bad.exception)


def test_bench_embed_one_and_several_backbones(tree_corpus, tmp_path: Path) -> None:
    base = ["bench", "embed", "--n", "20", "--batch-size", "8", "--decode", "device"]
    one = _json([*base, "-b", "test_efficientnet", "--cpu-share", "0.5", "--workers", "1",
                 "--json"])  # fmt: skip
    assert one["backbone"] == "test_efficientnet" and one["images"] == 20  # type: ignore[index]
    assert one["cpu_share"] == 0.5 and one["workers"] == 1  # type: ignore[index]
    assert one["decode"] == "device" and one["batch_size"] == 8  # type: ignore[index]
    assert one["decode_images_per_s"] > 0  # type: ignore[index]  # the device step alone
    assert one["loader_images_per_s"] > 0  # type: ignore[index]  # the workers alone
    began, ended = one["end_to_end_window"].split("-")  # type: ignore[index]
    assert len(began) == len(ended) == 8 and (began <= ended or began > "23:59:00")  # midnight
    assert one["end_to_end_images_per_s"] > 0 and one["forward_images_per_s"] > 0  # type: ignore[index]
    # steady: 3 batches with 1 worker, taken past its first (one batch) wave
    assert one["steady_images_per_s"] > 0 and one["first_batch_s"] > 0  # type: ignore[index]
    assert one["steady_basis"] == "batches 2-3 of 3"  # type: ignore[index]
    steady, forward = one["steady_images_per_s"], one["forward_images_per_s"]  # type: ignore[index]
    # rates and ratio are rounded (the ratio to 3 decimals: a slow, loaded run gives ~0.01)
    assert one["ratio"] == pytest.approx(steady / forward, rel=0.02, abs=6e-4)  # type: ignore[index]
    table = _json([*base, "-b", "test_vit", "-b", "no-such-net", "-b", "test_vit", "--json"])
    vit, bad = table["rows"]  # type: ignore[index]  # repeats measured once
    assert table["images"] == 20 and vit["images"] == 20 and vit["ratio"] > 0  # type: ignore[index]
    assert bad["backbone"] == "no-such-net" and "unknown backbone" in bad["error"]
    pil = _json(["bench", "embed", "--n", "16", "--batch-size", "8", "--decode", "pil",
                 "-b", "test_vit", "--json"])  # fmt: skip
    assert pil["decode"] == "pil" and pil["decode_images_per_s"] is None  # type: ignore[index]
    assert pil["cpu_share"] == 0.0 and pil["loader_images_per_s"] > 0  # type: ignore[index]
    real = _json([*base, "-b", "test_vit", "--corpus", str(tree_corpus.root), "--json"])
    assert real["rows"][0]["images"] == 20 and "error" not in real["rows"][0]  # type: ignore[index]
    missing = runner.invoke(app, [*base, "--corpus", str(tree_corpus.root / "nothing")])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, [*base, "--corpus", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "no .jpg" in str(empty.exception)
    dupes = runner.invoke(app, ["bench", "dupes", "--corpus", ".", "-b", "a", "-b", "b"])
    assert dupes.exit_code != 0 and "one --backbone" in str(dupes.output + str(dupes.exception))


def test_steady_rate_is_taken_past_the_workers_first_wave() -> None:
    from pinsearch.eval.bench import _steady_rate

    # 4 workers bound the rate: waves of 4 batches of 10 images, one a second after 2 s start
    waves = [(2.0 + w, 10 * (4 * w + b + 1)) for w in range(4) for b in range(4)]
    assert _steady_rate(waves, 0.0, 4) == (40.0, "batches 5-16 of 16")
    rate, basis = _steady_rate(waves[:11], 0.0, 4)  # under two waves past the first
    assert basis.startswith("whole run: 11 batches") and rate == pytest.approx(110 / 4.0)
    # the model bounds it, one batch at a time: the same taken past the first
    even = [(1.0 + 0.5 * i, 8 * (i + 1)) for i in range(6)]
    assert _steady_rate(even, 0.0, 0) == (16.0, "batches 2-6 of 6")
    assert _steady_rate([], 0.0, 2)[0] == 0.0


def test_bench_jpeg_decodes_baseline_and_progressive_copies(tree_corpus) -> None:
    data = _json(["bench", "jpeg", "--n", "12", "--batch-size", "5", "--json"])
    assert data["images"] == 12 and data["device"] == "cpu" and data["reduced_side"] == 256  # type: ignore[index]
    rows = data["rows"]  # type: ignore[index]
    assert [(r["jpeg"], r["decoder"]) for r in rows] == [
        (kind, decoder)
        for kind in ("baseline", "progressive")
        for decoder in ("decode_jpeg (cpu)", "PIL, one core", "PIL reduced, one core")
    ]
    assert all(r["images_per_s"] > 0 and r["megapixels_per_s"] > 0 for r in rows)
    real = _json(["bench", "jpeg", "--n", "6", "--corpus", str(tree_corpus.root), "--json"])
    assert real["images"] == 6 and len(real["rows"]) == 6  # type: ignore[index]
    bad = runner.invoke(app, ["bench", "jpeg", "--n", "4", "--batch-size", "0"])
    assert bad.exit_code != 0 and "batch_size" in str(bad.exception)


def test_bench_catalog() -> None:
    data = _json(["bench", "catalog", "--n", "600", "--boards", "40", "--skipped", "7", "--json"])
    assert (data["pins"], data["boards"], data["users"], data["skipped"]) == (600, 40, 40, 7)  # type: ignore[index]
    assert data["add_ingest_s"] > 0 and data["boards_executemany_s"] > 0  # type: ignore[index]
    assert data["boards_speedup"] > 0 and data["pins_per_s"] > 0  # type: ignore[index]


@pytest.mark.parametrize(("factory", "in_place"), [("IVF8,Flat", True), ("HNSW8", False)])
def test_bench_remove(factory: str, in_place: bool) -> None:
    data = _json(["bench", "remove", "--n", "1200", "--dim", "8", "--pins", "50",
                  "--factory", factory, "--json"])  # fmt: skip
    assert data["factory"] == factory and data["in_place"] is in_place  # type: ignore[index]
    assert data["pins"] == 50 and data["board_pins"] >= 1  # type: ignore[index]
    assert data["remove_s"] > 0 and data["rebuild_s"] > 0  # type: ignore[index]


def test_bench_threads_limit_the_run_and_are_restored_after() -> None:
    import os

    import faiss
    import torch

    from pinsearch.eval.bench import threads_limited

    outside = torch.get_num_threads(), faiss.omp_get_max_threads()
    env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(2)  # a count the run must change, whatever this process started with
    faiss.omp_set_num_threads(2)
    try:
        data = _json(["bench", "remove", "--n", "600", "--dim", "8", "--pins", "20",
                      "--factory", "Flat", "--threads", "1", "--json"])  # fmt: skip
        assert data["machine"]["threads"] == {"torch": 1, "faiss": 1}  # type: ignore[index]
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
        with threads_limited(3):  # worker processes inherit the limit through the environment
            assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"
        assert os.environ.get("OMP_NUM_THREADS") == env
    finally:
        torch.set_num_threads(outside[0])
        faiss.omp_set_num_threads(outside[1])
    bad = runner.invoke(app, ["bench", "remove", "--threads", "0"])
    assert bad.exit_code != 0 and "--threads" in bad.output


def test_bench_index_reports_a_failing_type_and_goes_on() -> None:
    data = _json(["bench", "index", "--n", "500", "--dim", "16",
                  "--factory", "IVF4096,Flat", "--factory", "Flat", "--json"])  # fmt: skip
    failed, flat = data["rows"]  # type: ignore[index]
    assert failed["factory"] == "IVF4096,Flat" and "training points" in failed["error"]
    assert flat["factory"] == "Flat" and flat["recall_at_10"] == 1.0 and "error" not in flat
    text = runner.invoke(app, ["bench", "index", "--n", "500", "--dim", "16",
                               "--factory", "IVF4096,Flat", "--factory", "Flat"])  # fmt: skip
    assert text.exit_code == 0 and "error" in text.output  # the table takes mixed rows


def test_bench_refuses_values_no_run_could_use() -> None:
    for args, says in (
        (["remove", "--n", "50", "--dim", "8", "--pins", "0"], "--pins"),
        (["study", "--n", "400", "--dim", "8", "--head", "knn", "--sklearn-timeout", "-5"],
         "--sklearn-timeout"),
        (["study", "--n", "100", "--dim", "8", "--head", "knn"], "give a larger --n"),
    ):  # fmt: skip
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code != 0 and says in result.output + str(result.exception), args


def test_bench_refuses_options_its_benchmark_has_no_use_for() -> None:
    for args, named in (
        (["index", "--queries", "50"], "--queries"),
        (["query", "--factory", "IVF16,Flat"], "--factory"),
        (["remove", "--device", "cpu"], "--device"),
        (["text", "--fp16"], "--fp16"),
        (["index", "--pins", "1000"], "--pins"),  # given at its default: given all the same
        (["query", "--device", "auto"], "--device"),
        (["catalog", "--sequential"], "--sequential"),
        (["catalog", "--no-sequential"], "--no-sequential"),
    ):
        bad = runner.invoke(app, ["bench", *args, "--n", "100"])
        assert bad.exit_code != 0 and f"has no use for {named}" in bad.output, bad.output
    two = runner.invoke(app, ["bench", "remove", "--factory", "Flat", "--factory", "HNSW8"])
    assert two.exit_code != 0 and "takes one --factory" in two.output  # (the second was dropped)
    zero = runner.invoke(app, ["bench", "catalog", "--n", "0"])  # (it meant the default)
    assert zero.exit_code != 0 and "--n" in zero.output


def test_bench_study_mlp_row_records_the_epochs_trained() -> None:
    args = ["bench", "study", "--n", "320", "--dim", "8", "--head", "mlp", "--no-sequential",
            "--sklearn-timeout", "0.01", "--json"]  # fmt: skip
    (row,) = _json(args)["rows"]  # type: ignore[index]
    epochs = row["pinsearch_epochs"]  # per batch size, each fold's member (at most 40)
    assert list(epochs) == ["32", "64", "128"]
    assert all(len(e) == 5 and all(1 <= n <= 40 for n in e) for e in epochs.values())
    assert 1 <= row["pinsearch_refit_epochs"] <= 40


def test_bench_study_batched_vs_sklearn_and_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = ["bench", "study", "--n", "320", "--dim", "8", "--head", "knn", "--json"]
    finished = _json(args)
    (row,) = finished["rows"]  # type: ignore[index]
    assert row["batched"] and row["f1_gap"] == 0.0  # the same votes as scikit-learn's brute KNN
    assert row["sequential_macro_f1"] == row["pinsearch_macro_f1"] == row["sklearn_macro_f1"]
    # the grids' own scores, per k, compared beyond the refit's test F1
    assert list(row["pinsearch_cv_macro_f1"]) == ["1", "5", "10", "20", "50"]
    assert row["sklearn_cv_macro_f1"] == row["pinsearch_cv_macro_f1"] and row["cv_gap"] == 0.0
    assert row["same_choice"] and row["pinsearch_best"] == row["sklearn_best"]
    best = max(row["pinsearch_cv_macro_f1"].values())
    assert row["pinsearch_cv_macro_f1"][str(row["pinsearch_best"])] == best
    late_args = [*args, "--no-sequential", "--sklearn-timeout", "0.01"]
    (late,) = _json(late_args)["rows"]  # type: ignore[index]
    assert late["sklearn_s"] is None and late["speedup_is_lower_bound"]
    # it had run at most the limit (not even started, at 0.01 s): a floor, the child's start
    # not counted
    assert late["sklearn_status"] == "stopped" and 0 <= late["sklearn_at_least_s"] <= 0.01
    assert late["sklearn_macro_f1"] is None and late["f1_gap"] is None
    assert late["cv_gap"] is None and late["same_choice"] is None
    assert "sequential_s" not in late and late["speedup"] >= 0
    # a stopped row takes scikit-learn's F1 and grid scores from a finished run on the split
    ref = tmp_path / "ref.json"
    finished["rows"][0]["sklearn_macro_f1"] = 0.25  # type: ignore[index]
    finished["rows"][0]["sklearn_cv_macro_f1"]["5"] += 0.03  # type: ignore[index]
    finished["rows"][0]["sklearn_best"] = 5  # type: ignore[index]
    ref.write_text(json.dumps(finished))
    done = _json([*late_args, "--sklearn-reference", str(ref)])
    (late,) = done["rows"]  # type: ignore[index]
    assert late["sklearn_s"] is None and late["sklearn_macro_f1"] == 0.25
    assert late["f1_gap"] == round_up(abs(late["pinsearch_macro_f1"] - 0.25), 4)
    assert late["cv_gap"] == 0.03 and late["same_choice"] is (late["pinsearch_best"] == 5)
    assert late["sklearn_f1_from"] == done["reference"][0]["file"] == str(ref)  # type: ignore[index]
    assert done["data_sha256"] == finished["data_sha256"]  # type: ignore[index]
    other = ["bench", "study", "--n", "336", "--dim", "8", "--head", "knn",
             "--sklearn-timeout", "0.01", "--sklearn-reference", str(ref), "--json"]  # fmt: skip
    with pytest.warns(UserWarning, match="not used: run on another split"):
        elsewhere = _json(other)  # still measured, without the reference's F1
    assert "another split" in elsewhere["reference"][0]["rejected"]  # type: ignore[index]
    assert elsewhere["rows"][0]["sklearn_macro_f1"] is None  # type: ignore[index]
    ref.write_text("{}")
    assert "not a `pinsearch bench study --json` result" in _main_error(other, monkeypatch, capsys)
    # several heads: their grids add up to the whole grid's figures (unfinished: floors)
    both = _json([*late_args, "--head", "lsvm"])
    assert finished["total"] is None and both["total"]["heads"] == ["knn", "lsvm"]  # type: ignore[index]
    total = both["total"]  # type: ignore[index]
    floors = sum(r["sklearn_at_least_s"] for r in both["rows"])  # type: ignore[index]
    assert total["sklearn_s"] == pytest.approx(floors) and total["speedup_is_lower_bound"]
    assert total["pinsearch_s"] == pytest.approx(sum(r["pinsearch_s"] for r in both["rows"]))  # type: ignore[index]
    unknown = [*args[:-3], "--head", "svm"]
    assert "unknown heads ['svm']" in _main_error(unknown, monkeypatch, capsys)


def test_bench_study_progress_file_outlasts_a_bounded_call(tmp_path: Path) -> None:
    """A background study keeps its result so far in a file a later (bounded) call reads:
    pinsearch's grids first, then scikit-learn's quickest first, a running one as a floor."""
    import threading
    import time

    from pinsearch.eval.bench import bench_study

    progress = tmp_path / "study.json"
    done: list[Any] = []
    run = threading.Thread(target=lambda: done.append(bench_study(
        n=320, dim=8, heads=("lsvm", "knn"), sequential=False, progress=progress,
        progress_every_s=0.02)))  # fmt: skip
    run.start()
    snapshots: list[dict[str, Any]] = []
    while run.is_alive():
        if progress.exists():  # replaced whole: always a complete JSON document
            snap = json.loads(progress.read_text())
            if not snapshots or snap != snapshots[-1]:
                snapshots.append(snap)
        time.sleep(0.005)
    run.join()
    final = json.loads(progress.read_text())
    assert final == json.loads(json.dumps(asdict(done[0]), default=str))
    assert final["status"] == "done" and not final["total"]["speedup_is_lower_bound"]
    assert [r["head"] for r in final["rows"]] == ["lsvm", "knn"]
    assert all(r["sklearn_status"] == "done" and r["speedup"] > 0 for r in final["rows"])

    def state(snap: dict[str, Any]) -> dict[str, str]:
        return {r["head"]: r["sklearn_status"] for r in snap["rows"]}

    running = [s for s in snapshots if s["status"] == "running"]
    assert {"lsvm": "pending", "knn": "pending"} in [state(s) for s in running]  # ours first
    # scikit-learn's KNN grid (quicker) ran before its LSVM grid, whatever the heads' order
    assert {"lsvm": "pending", "knn": "done"} in [state(s) for s in running]
    assert not any(state(s) == {"lsvm": "done", "knn": "pending"} for s in running)
    live = [r for s in running for r in s["rows"] if r["sklearn_status"] == "running"]
    assert all(r["sklearn_at_least_s"] >= 0 and r["speedup_is_lower_bound"] for r in live)
    assert any(r["sklearn_at_least_s"] > 0 for r in live)  # 0 until the child began
    for s in (s for s in running if len(s["rows"]) == 2):  # a floor until both are done
        unfinished = set(state(s).values()) != {"done"}
        assert s["total"]["speedup_is_lower_bound"] == unfinished


def test_bench_study_reference_resumes_to_what_grid_search_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """scikit-learn's grid fit by fit, stopped and resumed from its checkpoint, gives
    GridSearchCV's cross-validated scores, choice and test F1; bench study takes its F1."""
    from sklearn.model_selection import GridSearchCV

    from pinsearch.eval.bench import _study_grids, _study_split, bench_study_reference

    ckpt = tmp_path / "lsvm.json"
    part = bench_study_reference(head="lsvm", n=320, dim=8, jobs=2, checkpoint=ckpt, max_fits=4)
    saved = json.loads(ckpt.read_text())
    assert part.status == saved["status"] == "running" and len(saved["fits"]) == 4
    assert saved["rows"][0]["sklearn_macro_f1"] is None and saved["rows"][0]["fits_total"] == 26
    args = ["bench", "study-reference", "--n", "320", "--dim", "8", "--head", "lsvm",
            "--jobs", "1", "--checkpoint", str(ckpt), "--json"]  # fmt: skip
    done = _json(args)
    assert done["status"] == "done" and len(done["fits"]) == 26  # type: ignore[index]
    assert all(f in done["fits"] for f in saved["fits"])  # type: ignore[index]  # kept, not redone
    (row,) = done["rows"]  # type: ignore[index]
    xtr, _, ytr, _, cv = _study_split(320, 8, 32, 5)
    _, est, grid, _ = _study_grids()["lsvm"]
    search = GridSearchCV(est, {"linearsvc__C": grid["C"]}, scoring="f1_macro", cv=cv)
    search.fit(xtr, ytr)
    means = [round(float(m), 6) for m in search.cv_results_["mean_test_score"]]
    assert list(row["sklearn_cv_macro_f1"].values()) == means
    assert row["sklearn_best"] == search.best_params_["linearsvc__C"] and row["fits_done"] == 26
    study = ["bench", "study", "--n", "320", "--dim", "8", "--head", "lsvm", "--no-sequential"]
    (theirs,) = _json([*study, "--json"])["rows"]  # type: ignore[index]
    assert theirs["sklearn_macro_f1"] == row["sklearn_macro_f1"]  # what GridSearchCV gives
    late = _json([*study, "--sklearn-timeout", "0.01", "--sklearn-reference", str(ckpt), "--json"])
    (late_row,) = late["rows"]  # type: ignore[index]
    assert late_row["sklearn_status"] == "stopped" and late_row["sklearn_f1_from"] == str(ckpt)
    assert late_row["sklearn_macro_f1"] == row["sklearn_macro_f1"]
    for key in ("sklearn_cv_macro_f1", "sklearn_best"):  # a reference row has a study row's keys
        assert late_row[key] == row[key] == theirs[key]
    assert late_row["cv_gap"] == theirs["cv_gap"]
    assert _json(args) == done  # nothing left to fit: the same result
    other = [*args[:3], "336", *args[4:]]
    assert "is for another grid or split (data_sha256, n differ)" in _main_error(
        other, monkeypatch, capsys
    )
    assert json.loads(ckpt.read_text())["n"] == 320  # the checkpoint is left as it was
    two = [*args[:-3], "--head", "knn", "--json"]
    assert "takes one --head" in runner.invoke(app, two).output


def test_query_and_serve_search_time_settings(
    tree_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import io

    from pinsearch.indexes import IndexConfig
    from pinsearch.serve import serve
    from pinsearch.store import Store

    store = tmp_path / "ivf"
    _json(["index", str(tree_copy), "--store", str(store), "-b", "test_efficientnet",
           "--workers", "0", "--factory", "IVF4,Flat", "--json"])  # fmt: skip
    with Store.open(store, read_only=True) as s:
        pins = [r["pin_id"] for r in s.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key")]
    base = ["query", "--store", str(store), "--pin", pins[0], "-k", "30", "--json"]
    # saved nprobe 4 // 16 -> 1 list; its pins alone cannot fill k: more lists are visited
    one_list = _json(base)["hits"]  # type: ignore[index]
    every_list = _json([*base, "--nprobe", "4"])["hits"]  # type: ignore[index]
    assert len(one_list) == len(every_list) == 23  # all other pins
    assert "would ignore precision" in _main_error(
        [*base, "--precision", "bfloat16"], monkeypatch, capsys
    )
    assert "would ignore ef_search" in _main_error(
        [*base, "--ef-search", "64"], monkeypatch, capsys
    )
    bad = runner.invoke(app, [*base, "--precision", "float8"])
    assert bad.exit_code != 0 and "precision" in bad.output

    def served(nprobe: int) -> list[list[str]]:
        out = io.StringIO()
        requests = "".join(json.dumps({"pin": p, "k": 3}) + "\n" for p in pins)
        serve(
            store, requests=io.StringIO(requests), responses=out, config=IndexConfig(nprobe=nprobe)
        )
        return [
            [h["pin_id"] for h in json.loads(line)["hits"]]
            for line in out.getvalue().splitlines()[1:]
        ]

    near, exact = served(1), served(4)  # nprobe reaches FAISS: 1 list misses some neighbours
    assert any(a != b for a, b in zip(near, exact))
    top3 = _json([*base[:-3], "-k", "3", "--nprobe", "4", "--json"])["hits"]  # type: ignore[index]
    assert [h["pin_id"] for h in top3] == exact[0]


def _main_error(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """Run ``pinsearch ARGV`` as the console script does; the one-line error it prints."""
    from pinsearch.cli.app import main

    monkeypatch.setattr("sys.argv", ["pinsearch", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error:"), err
    return " ".join(err.split())


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--head", "lsvm", "--param", "bogus=1"], "has no parameter 'bogus'"),
        (["train", "--head", "lsvm", "--param", "C=abc"], "'C' takes a finite number"),
        (["train", "--head", "knn", "--param", "n_neighbors=2.5"], "takes a whole number, not 2.5"),
        (["train", "--head", "lsvm", "--param", "device=tpu"], "names a device"),
        (["train", "--head", "mlp", "--param", "device=cuda:7"], "'cuda:7'"),  # at fit time
        (["train", "--head", "lsvm", "--param", "max_iter=-5"], "max_iter must be a whole"),
        (["train", "--head", "lsvm", "--param", "tol=0"], "tol must be a positive number"),
        (["train", "--head", "mlp", "--param", "hidden=64"], "hidden must be two positive"),
        (["train", "--head", "mlp", "--param", "batch_size=0"], "batch_size must be a whole"),
        (["index", "--device", "tpu"], "unknown device 'tpu'"),
        (["index", "--device", "cuda:99"], "'cuda:99'"),  # no such GPU, with CUDA or without
        (["index", "--factory", "IVF1024,Flat", "--rebuild"], "cannot train index 'IVF1024,Flat'"),
        (["query", "--pin", "PIN", "--titles-file", "DIR"], "Is a directory"),
        (["index", "--dtype", "int8"], "dtype must be one of float32, float16"),
    ],
)
def test_bad_options_are_one_line_errors(
    store_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, argv, says
) -> None:
    from pinsearch.store import Store

    with Store.open(store_copy, read_only=True) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
        before = store.info()
    argv = [{"PIN": pin, "DIR": str(tmp_path)}.get(a, a) for a in argv]
    argv += ["--store", str(store_copy)]
    if argv[0] == "index":
        argv += ["-b", "test_efficientnet"]
    assert says in _main_error(argv, monkeypatch, capsys)
    with Store.open(store_copy, read_only=True) as store:  # nothing was changed
        after = store.info()
        assert (after.pins, after.indexes, after.heads) == (before.pins, before.indexes, [])


def test_index_on_a_missing_gpu_is_a_one_line_error(
    store_copy: Path, tree_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from pinsearch.indexes import gpu_count

    if gpu_count():
        pytest.skip("faiss sees a GPU here")
    from pinsearch.store import Store

    argv = ["index", "--store", str(store_copy), "-b", "test_efficientnet", "--rebuild"]
    assert "faiss sees no GPU" in _main_error([*argv, "--index-device", "gpu"], monkeypatch, capsys)
    fresh = store_copy.parent / "fresh"  # refused before the corpus is read: no store made
    corpus = ["index", str(tree_copy), "--store", str(fresh), "--index-device", "gpu"]
    assert "faiss sees no GPU" in _main_error(corpus, monkeypatch, capsys)
    assert not fresh.exists()
    with Store.open(store_copy, read_only=True) as store:  # its index is still there, whole
        pin = store.catalog.query("SELECT pin_id FROM pins LIMIT 1")[0]["pin_id"]
    hits = _json(["query", "--store", str(store_copy), "--pin", pin, "-k", "3", "--json"])["hits"]  # type: ignore[index]
    assert len(hits) == 3


def test_dupes_options(store_copy: Path) -> None:
    report = _json(["dupes", "--store", str(store_copy), "-k", "5", "--top", "0", "--json"])
    assert isinstance(report, dict)
    assert "--top" in _usage_error(["dupes", "--store", str(store_copy), "--top", "-1"])


def test_category_filters_take_the_label_as_written(store_copy: Path) -> None:
    from pinsearch.store import Store

    with Store.open(store_copy, read_only=True) as store:
        pin, category = next(
            (r["pin_id"], r["category"])
            for r in store.catalog.query("SELECT pin_id, category FROM pins ORDER BY pin_key")
        )
    written = category.replace("_", " & ").title()  # "food_drink" -> "Food & Drink"
    base = ["query", "--store", str(store_copy), "--pin", pin, "-k", "3", "--json"]
    stored = _json([*base, "--category", category])
    typed = _json([*base, "--category", written])
    assert [h["pin_id"] for h in typed["hits"]] == [h["pin_id"] for h in stored["hits"]]
    assert stored["hits"] and all(h["category"] == category for h in typed["hits"])


def _usage_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("│", " ").split())  # unwrapped from rich's box


def test_an_option_given_at_its_default_is_given(store_copy: Path) -> None:
    query = ["query", "--store", str(store_copy)]
    for argv, says in (
        (["--pin", "p", "--titles", "a", "-k", "10"], "--titles queries take no -k"),
        (["--text", "x", "--alpha", "0.5"], "--alpha weighs --mode fused only"),
        (["--text", "x", "--per-board", "3"], "--text queries take no --per-board"),
        (["--pin", "p", "--mode", "image"], "--pin/--image queries take no --mode"),
        (["--pin", "p", "--board-score", "topm"], "--pin/--image queries take no --board-score"),
    ):
        assert says in _usage_error([*query, *argv]), argv


def test_index_defaults_to_the_stores_own_backbone(
    store_copy: Path, tree_corpus, make_tree, tmp_path: Path
) -> None:
    more = make_tree(tmp_path / "more", seed=21, pins_per_board=1)
    out = runner.invoke(app, ["index", str(more.root), "--store", str(store_copy), "--json",
                              "--workers", "0"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["backbone"] == "test_efficientnet"  # not a new effnet_lite0
    with Store.open(store_copy, read_only=True) as s:
        assert s.backbones() == ["test_efficientnet"]
    assert runner.invoke(app, ["index", "--store", str(store_copy), "-b", "test_convnext",
                               "--workers", "0"]).exit_code == 0  # fmt: skip
    two = runner.invoke(app, ["index", str(more.root), "--store", str(store_copy)])
    assert two.exit_code == 1 and "has several backbones" in str(two.exception)


def test_usage_errors_name_the_option(store_copy: Path, tmp_path: Path) -> None:
    query = ["query", "--store", str(store_copy)]
    assert "is a folder, not an image file" in _usage_error([*query, "--image", str(tmp_path)])
    assert "--classify takes a --pin or an --image" in _usage_error(
        [*query, "--text", "x", "--classify"]
    )
    assert "--classify queries take no --user" in _usage_error(
        [*query, "--pin", "p", "--classify", "--user", "u"]
    )
    assert "--pin/--image queries take no --mode" in _usage_error(
        [*query, "--pin", "p", "--mode", "fused"]
    )
    assert "--boards queries take no --board" in _usage_error(
        [*query, "--text", "x", "--boards", "--board", "b"]
    )
    assert "--alpha" in _usage_error([*query, "--text", "x", "--alpha", "7"])
    # options the query would ignore are refused by name (from a review)
    for argv, says in [
        (["--pin", "p", "--classify", "--index", "i", "--nprobe", "5"],
         "--classify queries take no --index, --nprobe"),
        (["--pin", "p", "--titles", "a", "--category", "c"], "--titles queries take no --category"),
        (["--text", "x", "--boards", "--mode", "fused"], "--boards queries take no --mode"),
        (["--text", "x", "--per-board", "5"], "--text queries take no --per-board"),
        (["--pin", "p", "--board-score", "centroid"], "--pin/--image queries take no --board-sc"),
        (["--pin", "p", "--head", "h"], "--pin/--image queries take no --head"),
        (["--text", "x", "--alpha", "0.3"], "--alpha weighs --mode fused only"),
        (["--pin", "p", "--titles-file", str(tmp_path / "empty.txt")], "holds no title"),
        (["--pin", "p", "--classify", "--titles", "a"], "--classify queries take no --titles"),
        (["--text", "x", "--mode", "title", "--nprobe", "4"], "--text queries take no --nprobe"),
    ]:  # fmt: skip
        (tmp_path / "empty.txt").write_text("\n  \n")
        assert says in _usage_error([*query, *argv]), argv
    cluster = ["cluster", "--store", str(store_copy), "-k", "3"]
    for argv in (["--plot", str(tmp_path / "k.png")], ["--k-max", "5"], ["--choose", "elbow"]):
        assert "for a sweep that chooses k, and -k gives it" in _usage_error([*cluster, *argv])


def test_a_failed_first_index_leaves_no_store(
    tree_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    manifest = tmp_path / "pins.csv"
    manifest.write_text("not,the,columns\n1,2,3\n")
    store = tmp_path / "new-store"
    _main_error(["index", str(manifest), "--store", str(store)], monkeypatch, capsys)
    assert not store.exists()
    store.mkdir()  # a folder the user made stays, empty
    _main_error(["index", str(tree_copy), "--format", "manifest", "--store", str(store)],
                monkeypatch, capsys)  # fmt: skip
    assert store.is_dir() and not any(store.iterdir())
    store.rmdir()
    # options refused before the corpus is read: no store with pins but no vectors is left
    for bad, says in (
        (["--metric", "cos"], "unknown metric 'cos'"),
        (["--factory", "Blah"], "cannot parse index factory 'Blah'"),
        (["-b", "convnext_tiny"], "convnext_tiny"),  # no weights offline
        (["--weights", str(manifest)], "pins.csv"),
    ):
        argv = ["index", str(tree_copy), "--store", str(store), *bad]
        assert says in _main_error(argv, monkeypatch, capsys)
        assert not store.exists(), bad
    assert "there is no store at" in _main_error(
        ["index", "--store", str(store)], monkeypatch, capsys
    )


def test_backbones_pattern_without_match(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert "no registered backbone matches 'zzz*'" in _main_error(
        ["backbones", "zzz*"], monkeypatch, capsys
    )


def test_info_text_lists_categories_and_boards(store_copy: Path) -> None:
    result = runner.invoke(app, ["info", "--store", str(store_copy)])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "24 pins" in text and "categories" in text and "largest boards (of" in text


def test_indexing_again_counts_each_skipped_file_once(tree_copy: Path, tmp_path: Path) -> None:
    files = sorted(tree_copy.rglob("*.jpg"))
    files[0].write_bytes(b"")  # skipped at ingest (empty_file)
    data = bytearray(files[1].read_bytes())  # passes the header check, fails to decode
    data[data.index(b"\xff\xda") + 5] = 0x09
    files[1].write_bytes(bytes(data))
    store = tmp_path / "s"
    args = ["index", str(tree_copy), "--store", str(store), "-b", "test_efficientnet"]
    for _ in range(3):
        report = _json([*args, "--workers", "0", "--json"])
    assert report["skipped"] == 1 and report["embed_failed"] == 1  # type: ignore[index]
    info = _json(["info", "--store", str(store), "--json"])
    assert info["pins"] == 22 and info["skipped"] == 2  # type: ignore[index]
    reasons = {(r["stage"], r["reason"]): r["pins"] for r in info["skipped_by_reason"]}  # type: ignore[index]
    assert sorted(reasons.values()) == [1, 1] and reasons[("ingest", "empty_file")] == 1


def test_indexing_again_repeats_the_stored_runs_settings(
    tree_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    store = tmp_path / "s"
    base = ["index", "--store", str(store), "-b", "test_efficientnet", "--workers", "0"]
    first = _json([*base[:1], str(tree_copy), *base[1:], "--normalize", "--dtype", "float16",
                   "--json"])  # fmt: skip
    assert first["embedded"] == 24  # type: ignore[index]
    again = _json([*base, "--rebuild", "--json"])  # unset: the stored run's normalize and dtype
    assert again["index_action"] == "rebuilt"  # type: ignore[index]
    assert "normalize True vs False" in _main_error(
        [*base, "--no-normalize"], monkeypatch, capsys
    )  # asked for explicitly: still refused


def test_help_lists_each_command_in_one_flowing_sentence() -> None:
    # (the docstrings' source line breaks cut the list's summaries where the code wraps)
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ ")}
    assert "embedded, for every backbone of the store, and every index is updated" in rows["add"]
    assert "ingest counts, the pins' image files. Exit 1 on errors." in rows["check"]
    assert {c.name or c.callback.__name__ for c in app.registered_commands} <= set(rows)


def test_index_without_a_corpus_refuses_the_options_that_read_one(built_store) -> None:
    for args, named in ((["--per-category", "2"], "--per-category"),
                        (["--categories", "art"], "--categories"),
                        (["--format", "folder"], "--format")):  # fmt: skip
        bad = runner.invoke(app, ["index", "--store", str(built_store.path), *args])
        assert bad.exit_code != 0 and named in bad.output and "for reading a corpus" in bad.output
    seed = runner.invoke(app, ["index", "x", "--store", str(built_store.path), "--seed", "3"])
    assert seed.exit_code != 0 and "--per-category" in seed.output


def test_control_characters_in_stored_text_are_shown_not_sent(store_copy: Path) -> None:
    """A title holding ESC [2J cleared the reader's screen (Rich passes ESC through)."""
    with Store.open(store_copy) as store:
        pin = store.catalog.query("SELECT pin_id FROM pins ORDER BY pin_key LIMIT 1")[0]["pin_id"]
        store.catalog.connection.execute("UPDATE pins SET title = 'a\x1b[2Jb\x07c'")
    result = runner.invoke(app, ["query", "-s", str(store_copy), "--pin", pin, "-k", "2"],
                           env={"COLUMNS": "400"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b" in result.output and "\\x07" in result.output  # shown as escapes
