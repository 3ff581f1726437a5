"""Tests for pinsearch.embed: batching, failures, resumption, normalisation, dtypes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pinsearch.backbones import create_backbone
from pinsearch.embed import (
    EmbedConfig,
    PinImages,
    embed_images,
    embed_store,
    iter_embeddings,
    resolve_device,
)
from pinsearch.errors import BackboneMismatchError
from pinsearch.ingest import read_corpus
from pinsearch.pipeline import index_corpus
from pinsearch.store import Store

BACKBONE = "test_efficientnet"
FAST = {"workers": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def model():
    return create_backbone(BACKBONE)


def _ingest_only(corpus: Path, store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        store.catalog.add_ingest(read_corpus(corpus), "{}")


class _Interrupt:
    """Progress callback raising KeyboardInterrupt once ``after`` pins are done."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if done >= self.after:
            raise KeyboardInterrupt


def _part_keys(store: Store, backbone: str = BACKBONE) -> list[np.ndarray]:
    vs = store.vectors(backbone)
    return [vs._load_keys(p) for p in vs.parts()]


# -- the pieces -----------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_pin_images_turns_bad_files_into_failures(tmp_path: Path, model) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (50, 70), (9, 99, 199)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    ds = PinImages([(7, str(good)), (8, str(bad))], model.pixel_transform())
    key, tensor, path, reason, _ = ds[0]
    size = model.preprocess.input_size
    assert (key, path, reason) == (7, str(good), "") and tensor.shape == (3, size, size)
    assert tensor.dtype == torch.uint8 and tensor[2].float().mean() > 150  # 8-bit blue crop
    key, tensor, path, reason, detail = ds[1]
    assert (key, tensor, reason) == (8, None, "not_an_image") and detail


def test_iter_embeddings_batches_in_order(tmp_path: Path, model, tree_corpus) -> None:
    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:7]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    items = [(10 + i, str(p)) for i, p in enumerate(paths)]
    items.insert(3, (99, str(broken)))
    batches = list(iter_embeddings(model, items, EmbedConfig(workers=0, batch_size=3)))
    assert len(batches) == 3
    keys = np.concatenate([b.keys for b in batches])
    assert keys.tolist() == [10, 11, 12, 13, 14, 15, 16]
    failed = [f for b in batches for f in b.failures]
    assert [b.failed_keys for b in batches] == [[], [99], []]
    assert failed[0].reason == "empty_file" and failed[0].stage == "embed"
    vecs = np.concatenate([b.vectors for b in batches])
    assert vecs.shape == (7, model.dim) and vecs.dtype == np.float32
    assert np.isfinite(vecs).all()
    # The same images embedded as queries give the same vectors.
    direct = embed_images(model, [str(p) for p in paths])
    np.testing.assert_allclose(direct, vecs, rtol=1e-4, atol=1e-4)


def test_loader_plan_fits_the_workers_batches_in_shared_memory(
    tree_corpus, model, tmp_path
) -> None:
    """Each worker keeps 4 batches ready where they fit in half the free /dev/shm; with less
    room fewer batches, then fewer workers, at worst none (nothing is then shared)."""
    from pinsearch.embed import loader_plan

    pre = model.preprocess
    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    config = EmbedConfig(workers=4, batch_size=8)
    batch = 8 * 3 * pre.input_size**2  # uint8 crops, on the PIL path
    assert loader_plan(config, items, 8, pre, "pil", shm_free=32 * batch) == (4, 4)
    assert loader_plan(config, items, 8, pre, "pil", shm_free=16 * batch) == (4, 2)
    assert loader_plan(config, items, 8, pre, "pil", shm_free=5 * batch) == (2, 1)
    assert loader_plan(config, items, 8, pre, "pil", shm_free=batch) == (0, None)
    assert loader_plan(EmbedConfig(workers=0), items, 8, pre, "pil", shm_free=1) == (0, None)
    # the device path hands over the encoded files: these small JPEGs need far less room
    files = 8 * np.mean([Path(p).stat().st_size for _, p in items])
    assert files < batch / 10
    assert loader_plan(config, items, 8, pre, "device", shm_free=int(32 * files) + 8) == (4, 4)
    assert loader_plan(config, items, 8, pre, "device", shm_free=int(2 * files) + 8) == (1, 1)
    # a file the device decoder does not take (here a PNG) is decoded in the worker: its
    # model input travels, and half such files make a batch ~half the PIL path's
    mixed = []
    for i, (key, path) in enumerate(items[:16]):
        if i % 2:
            path = str(tmp_path / f"{key}.png")
            Image.open(items[i][1]).save(path)
        mixed.append((key, path))
    assert loader_plan(config, items[:16], 8, pre, "device", shm_free=16 * batch) == (4, 4)
    assert loader_plan(config, mixed, 8, pre, "device", shm_free=16 * batch) == (4, 3)
    # so is a JPEG of the cpu_share the workers decode anyway: half of them, as half PNGs
    half = replace(config, cpu_share=0.5)
    assert loader_plan(half, items[:16], 8, pre, "device", shm_free=16 * batch) == (4, 3)
    every = replace(config, cpu_share=1.0)  # all of them: the PIL path's batches
    assert loader_plan(every, items, 8, pre, "device", shm_free=16 * batch) == (4, 2)


def test_embedding_with_little_shared_memory_gives_the_same_vectors(
    model, tree_corpus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pinsearch import embed

    items = [(i, str(p)) for i, p in enumerate(sorted(tree_corpus.root.glob("*/*/*/*.jpg")))]
    config = EmbedConfig(workers=2, batch_size=8)
    full = np.concatenate([b.vectors for b in iter_embeddings(model, items, config)])
    batch = 8 * 3 * model.preprocess.input_size**2  # uint8 crops
    monkeypatch.setattr(embed, "shared_memory_free", lambda: 2 * batch + 1)  # one batch fits
    with caplog.at_level("WARNING", logger="pinsearch.embed"):
        few = np.concatenate([b.vectors for b in iter_embeddings(model, items, config)])
    assert "DataLoader workers 1, batches ready per worker 1 (asked: 2 and 4)" in caplog.text
    np.testing.assert_array_equal(few, full)


def test_embed_images_accepts_pil_and_normalises(model, tree_corpus) -> None:
    path = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[0]
    pil = Image.open(path)
    a = embed_images(model, [path, pil])
    np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-5)
    n = embed_images(model, [pil], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(n[0], a[0] / np.linalg.norm(a[0]), rtol=1e-4, atol=1e-5)


def test_embedding_is_deterministic_across_model_builds(tree_corpus) -> None:
    path = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[0]
    a = embed_images(create_backbone(BACKBONE), [path])
    b = embed_images(create_backbone(BACKBONE), [path])
    np.testing.assert_array_equal(a, b)


# -- embed_store ----------------------------------------------------------------------------


def test_embed_store_embeds_every_pin(tree_corpus, tmp_path: Path) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    calls: list[tuple[int, int]] = []
    with Store.open(tmp_path / "s") as store:
        report = embed_store(
            store,
            BACKBONE,
            EmbedConfig(**FAST, part_size=10),
            progress=lambda d, t: calls.append((d, t)),
        )
        assert (report.embedded, report.failed, report.already) == (24, 0, 0)
        assert report.weights == "random" and report.device == "cpu"
        vs = store.vectors(BACKBONE)
        assert len(vs) == 24
        assert [p["n"] for p in vs.parts()] == [16, 8]  # a part is written once >= part_size
        vecs, keys = vs.load()
        assert sorted(keys.tolist()) == sorted(k for k, _ in store.catalog.pin_paths())
        assert vecs.shape == (24, report.dim)
        emb = store.catalog.get_embedding(BACKBONE)
        assert (
            emb["count"] == 24 and emb["dim"] == report.dim and emb["spec"]["weights"] == "random"
        )
        assert emb["preprocess"]["input_size"] == 160
        assert calls[0] == (0, 24) and calls[-1] == (24, 24)
        again = embed_store(store, BACKBONE, EmbedConfig(**FAST, part_size=10))
        assert (again.embedded, again.already) == (0, 24)
        assert len(vs.parts()) == 2


def test_resume_after_interrupt(tree_corpus, tmp_path: Path) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    config = EmbedConfig(workers=0, batch_size=8, part_size=8, flush_seconds=0.0)
    stop = _Interrupt(after=8)
    with Store.open(tmp_path / "s") as store, pytest.raises(KeyboardInterrupt):
        embed_store(store, BACKBONE, config, progress=stop)
    assert stop.calls[-1] == (8, 24)
    with Store.open(tmp_path / "s") as store:
        committed = _part_keys(store)
        assert [len(k) for k in committed] == [8]  # the first part survived the interrupt
        report = embed_store(store, BACKBONE, config)
        assert report.already == 8
        assert report.embedded == 24 - 8
        parts = _part_keys(store)
        all_keys = np.concatenate(parts)
        assert len(all_keys) == len(np.unique(all_keys)) == 24  # no duplicate across parts
        assert set(all_keys.tolist()) == {k for k, _ in store.catalog.pin_paths()}
        np.testing.assert_array_equal(parts[0], committed[0])
        assert store.catalog.get_embedding(BACKBONE)["count"] == 24


def test_resumed_vectors_equal_uninterrupted_ones(tree_corpus, tmp_path: Path, built_store) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    config = EmbedConfig(workers=0, batch_size=8, part_size=8, flush_seconds=0.0)
    with Store.open(tmp_path / "s") as store, pytest.raises(KeyboardInterrupt):
        embed_store(store, BACKBONE, config, progress=_Interrupt(after=16))
    with Store.open(tmp_path / "s") as store:
        embed_store(store, BACKBONE, config)
        vecs, keys = store.vectors(BACKBONE).load()
        ids = {k: i for i, k in store.catalog.pin_paths()}
        resumed = {
            store.catalog.pins_by_key([int(k)])[int(k)]["pin_id"]: v for k, v in zip(keys, vecs)
        }
    with Store.open(built_store.path, read_only=True) as ref:
        rv, rk = ref.vectors(BACKBONE).load()
        reference = {ref.catalog.pins_by_key([int(k)])[int(k)]["pin_id"]: v for k, v in zip(rk, rv)}
    assert len(ids) == 24 and set(resumed) == set(reference)
    for pin_id, vec in resumed.items():
        np.testing.assert_allclose(vec, reference[pin_id], rtol=1e-4, atol=1e-4)


def test_truncated_jpeg_is_skipped_at_embed_stage(tree_copy: Path, tmp_path: Path) -> None:
    victim = sorted(tree_copy.glob("*/*/*/*.jpg"))[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    report = index_corpus(tree_copy, tmp_path / "s", backbone=BACKBONE, embed=EmbedConfig(**FAST))
    assert (report.added, report.skipped, report.embedded, report.embed_failed) == (24, 0, 23, 1)
    assert report.ntotal == 23
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert victim.stem not in store.catalog.pin_ids()
        assert store.catalog.count_pins() == 23
        rows = store.catalog.query("SELECT * FROM skipped")
        assert len(rows) == 1
        row = rows[0]
        assert (row["pin_id"], row["stage"], row["reason"], row["backbone"]) == (
            victim.stem,
            "embed",
            "truncated",
            BACKBONE,
        )
        assert row["path"] == str(victim.resolve())
        _, keys = store.vectors(BACKBONE).load()
        assert len(keys) == 23
        assert set(keys.tolist()) == {k for k, _ in store.catalog.pin_paths()}
    # Nothing is retried on the next run: the pin is gone, not pending.
    again = index_corpus(None, tmp_path / "s", backbone=BACKBONE, embed=EmbedConfig(**FAST))
    assert (again.embedded, again.embed_failed, again.index_action) == (0, 0, "unchanged")
    # The file fixed and the corpus indexed again: stored, and no longer counted as skipped
    victim.write_bytes(data)
    fixed = index_corpus(tree_copy, tmp_path / "s", backbone=BACKBONE, embed=EmbedConfig(**FAST))
    assert (fixed.added, fixed.embedded, fixed.ntotal) == (1, 1, 24)
    with Store.open(tmp_path / "s", read_only=True) as store:
        assert store.catalog.query("SELECT * FROM skipped") == []


def test_failed_pin_is_kept_when_another_backbone_has_its_vector(
    store_copy: Path,
) -> None:
    with Store.open(store_copy) as store:
        victim = Path(store.catalog.pin_paths()[0][1])
        # Point the stored path at a broken copy, so only the second backbone fails on it.
        broken = store_copy.parent / "broken.jpg"
        broken.write_bytes(victim.read_bytes()[:200])
        store.catalog.connection.execute(
            "UPDATE pins SET path = ? WHERE path = ?", [str(broken), str(victim)]
        )
        report = embed_store(store, "test_convnext", EmbedConfig(**FAST))
        assert (report.embedded, report.failed) == (23, 1)
        assert store.catalog.count_pins() == 24  # test_efficientnet still has its vector
        (row,) = store.catalog.query("SELECT backbone, stage FROM skipped")
        assert row == {"backbone": "test_convnext", "stage": "embed"}
        assert sorted(store.backbones()) == ["test_convnext", BACKBONE]
        # the file fixed: the next run embeds it and it is no longer counted as skipped
        store.catalog.connection.execute(
            "UPDATE pins SET path = ? WHERE path = ?", [str(victim), str(broken)]
        )
        report = embed_store(store, "test_convnext", EmbedConfig(**FAST))
        assert (report.embedded, report.failed) == (1, 0)
        assert store.catalog.query("SELECT * FROM skipped") == []


def test_normalize_stores_unit_vectors(tree_corpus, tmp_path: Path) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    with Store.open(tmp_path / "s") as store:
        embed_store(store, BACKBONE, EmbedConfig(**FAST, normalize=True))
        vecs, _ = store.vectors(BACKBONE).load()
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
        assert store.catalog.get_embedding(BACKBONE)["normalize"] is True


def test_float16_round_trip(tree_corpus, tmp_path: Path, built_store) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    with Store.open(tmp_path / "s") as store:
        embed_store(store, BACKBONE, EmbedConfig(**FAST, dtype="float16"))
        vs = store.vectors(BACKBONE)
        part = vs.parts()[0]
        raw = np.load(store.root / str(part["file"]))
        assert raw.dtype == np.float16
        vecs, keys = vs.load()
        assert vecs.dtype == np.float32
        sub, _ = vs.load(keys[:3])
        assert sub.dtype == np.float32
        np.testing.assert_array_equal(sub, vecs[:3])
        assert store.catalog.get_embedding(BACKBONE)["dtype"] == "float16"
    with Store.open(built_store.path, read_only=True) as ref:
        ref_vecs, ref_keys = ref.vectors(BACKBONE).load()
    order = np.argsort(keys)
    ref_order = np.argsort(ref_keys)
    np.testing.assert_allclose(vecs[order], ref_vecs[ref_order], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"normalize": True}, "normalize"), ({"dtype": "float16"}, "dtype")],
)
def test_changed_settings_are_refused(store_copy: Path, change: dict, match: str) -> None:
    with Store.open(store_copy) as store:
        before = len(store.vectors(BACKBONE))
        with pytest.raises(BackboneMismatchError, match=match):
            embed_store(store, BACKBONE, EmbedConfig(**FAST, **change))
        assert len(store.vectors(BACKBONE)) == before
        emb = store.catalog.get_embedding(BACKBONE)
        assert emb["normalize"] is False and emb["dtype"] == "float32"


def test_index_corpus_with_changed_normalize_is_refused(store_copy: Path, built_store) -> None:
    with pytest.raises(BackboneMismatchError, match="normalize"):
        index_corpus(
            built_store.corpus.root,
            store_copy,
            backbone=BACKBONE,
            embed=EmbedConfig(**FAST, normalize=True),
        )


def test_other_weights_are_refused(store_copy: Path, tmp_path: Path) -> None:
    model = create_backbone(BACKBONE)
    ckpt = tmp_path / "w.pth"
    torch.save(model.model.state_dict(), ckpt)
    with Store.open(store_copy) as store, pytest.raises(BackboneMismatchError, match="weights"):
        embed_store(store, BACKBONE, EmbedConfig(**FAST, weights=str(ckpt)))


def test_embed_run_record_is_json(built_store) -> None:
    with Store.open(built_store.path, read_only=True) as store:
        row = store.catalog.query("SELECT spec, preprocess FROM embeddings")[0]
    spec = json.loads(row["spec"])
    assert spec["spec"]["name"] == BACKBONE and spec["weights"] == "random"
    pre = json.loads(row["preprocess"])
    assert pre["input_size"] == 160 and len(pre["mean"]) == 3


@pytest.mark.gpu
def test_embedding_on_cuda_matches_cpu(tree_corpus) -> None:
    paths = [str(p) for p in sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:8]]
    cpu = create_backbone(BACKBONE, device="cpu")
    gpu = create_backbone(BACKBONE, device="cuda")
    items = list(enumerate(paths))
    a = np.concatenate([b.vectors for b in iter_embeddings(cpu, items, EmbedConfig(workers=0))])
    b = np.concatenate([b.vectors for b in iter_embeddings(gpu, items, EmbedConfig(workers=0))])
    # bf16 autocast on CUDA: close in direction, not bit-identical.
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert (cos > 0.98).all()


def test_query_images_follow_the_runs_precision() -> None:
    from pinsearch.embed import run_amp

    # a store embedded on CUDA (bf16 autocast) is queried under autocast; one embedded on the
    # CPU in float32, wherever the query runs
    assert run_amp({"device": "cuda", "amp": True})
    assert not run_amp({"device": "cpu", "amp": False}) and not run_amp({})
    # embedded on CUDA with autocast off (--no-amp): float32 vectors, float32 queries
    assert not run_amp({"device": "cuda", "amp": False})
    # runs recorded before the amp column: the device decides
    assert run_amp({"device": "cuda", "amp": None}) and run_amp({"device": "cuda:1"})
    assert not run_amp({"device": "cpu", "amp": None})


def test_store_records_the_runs_precision(built_store) -> None:
    from pinsearch.embed import run_amp

    with Store.open(built_store.path, read_only=True) as store:
        run = store.catalog.get_embedding(BACKBONE)
    assert run["amp"] is False and not run_amp(run)


@pytest.mark.gpu
def test_cuda_run_without_amp_is_recorded_as_float32(tree_corpus, tmp_path: Path) -> None:
    from pinsearch.embed import run_amp

    for amp in (False, True):
        path = tmp_path / f"amp-{amp}"
        _ingest_only(tree_corpus.root, path)
        with Store.open(path) as store:
            embed_store(store, BACKBONE, EmbedConfig(device="cuda", amp=amp, workers=0))
            run = store.catalog.get_embedding(BACKBONE)
        assert run["device"].startswith("cuda") and run["amp"] is amp and run_amp(run) is amp


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_query_images_are_decoded_as_the_run_decoded_its_pins(make_tree, tmp_path: Path) -> None:
    """A pin's own image file, queried, comes back as its stored vector whichever path decoded
    the pins: 400 px photos are decoded at half scale by PIL (libjpeg's DCT scaling) and whole
    by the device path, so the other path's vectors differ."""
    from pinsearch.embed import embed_like_run, run_decode

    corpus = make_tree(tmp_path / "corpus", image_size=400, pins_per_board=2)
    model = create_backbone(BACKBONE)
    for decode, other in (("device", "pil"), ("pil", "device")):
        path = tmp_path / decode
        index_corpus(corpus.root, path, backbone=BACKBONE,
                     embed=EmbedConfig(workers=0, batch_size=8, decode=decode))  # fmt: skip
        with Store.open(path, read_only=True) as store:
            run = store.catalog.get_embedding(BACKBONE)
            stored, keys = store.vectors(BACKBONE).load()
            paths = dict(store.catalog.pin_paths())
        assert run["decode"] == decode and run_decode(run, model) == decode
        files = [paths[k] for k in keys.tolist()]
        like = embed_like_run(model, files, run)
        np.testing.assert_allclose(like, stored, rtol=0, atol=1e-6)
        opened = embed_like_run(model, [Image.open(f) for f in files], run)  # still unread
        np.testing.assert_allclose(opened, stored, rtol=0, atol=1e-6)  # (drafted as files)
        unlike = embed_images(model, files, decode=other)
        assert _cosines(unlike, stored).min() < 0.999  # the check above has teeth


def test_run_decode_for_older_runs_and_other_machines(model) -> None:
    from dataclasses import replace as swap

    from pinsearch.embed import run_decode

    # runs recorded before the decode column: CUDA runs took the device path
    assert run_decode({"device": "cuda:0", "decode": None}, model) == "device"
    assert run_decode({"device": "cpu"}, model) == "pil"
    # a CUDA store queried on a CPU: torchvision decodes the JPEGs there as the GPU did
    assert run_decode({"device": "cuda", "decode": "device"}, model) == "device"
    assert run_decode({"device": "cuda", "decode": "pil"}, model) == "pil"
    nearest = swap(model, preprocess=swap(model.preprocess, interpolation="nearest"))
    assert run_decode({"device": "cuda", "decode": "device"}, nearest) == "pil"


def test_embed_images_on_the_device_path_keeps_order_and_names_bad_files(
    model, tree_corpus, tmp_path: Path
) -> None:
    from pinsearch.images import ImageError

    paths = sorted(tree_corpus.root.glob("*/*/*/*.jpg"))[:3]
    pil = Image.open(paths[1]).convert("RGB")
    png = tmp_path / "a.png"
    Image.open(paths[2]).save(png)  # decoded by PIL on the device path too
    mixed = embed_images(model, [paths[0], pil, png], decode="device")
    alone = [embed_images(model, [item], decode="device")[0] for item in (paths[0], pil, png)]
    np.testing.assert_allclose(mixed, np.stack(alone), rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], embed_images(model, [pil])[0], rtol=0, atol=1e-6)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    for decode in ("device", "pil"):
        with pytest.raises(ImageError) as err:
            embed_images(model, [paths[0], bad], decode=decode)
        assert err.value.path == str(bad) and err.value.reason == "not_an_image"
    with pytest.raises(ValueError, match="decode"):
        embed_images(model, [pil], decode="gpu")


def test_query_files_take_the_routes_of_the_runs_device(model, tmp_path: Path) -> None:
    """A store embedded on CUDA had its progressive JPEGs decoded by PIL in the workers (whole,
    as the device decodes): a query file like them is decoded the same way wherever the query
    runs."""
    from pinsearch.embed import embed_like_run

    rng = np.random.default_rng(0)
    path = tmp_path / "progressive.jpg"
    pixels = rng.integers(0, 256, (70, 80, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
    Image.fromarray(pixels).save(path, "JPEG", quality=90, progressive=True)  # 800 x 700
    run = {"device": "cuda:0", "decode": "device", "normalize": False, "amp": False}
    like = embed_like_run(model, [path], run)
    workers = embed_images(model, [path], decode="device", progressive=False)
    device = embed_images(model, [path], decode="device", progressive=True)
    np.testing.assert_array_equal(like, workers)
    # both decoded whole (the workers do not decode at reduced scale on the device path), so
    # the two routes agree to float noise: PIL's resize against the device's weight matrices
    assert 0 < np.abs(like - device).max() < 1e-5
    on_cpu = {**run, "device": "cpu"}  # a CPU run's device path took it whole
    np.testing.assert_array_equal(embed_like_run(model, [path], on_cpu), device)
    older = {**run, "decode": None}  # CUDA runs from before the decode column did too
    np.testing.assert_array_equal(embed_like_run(model, [path], older), device)


def test_a_half_written_run_row_of_an_older_pinsearch_is_taken_over(
    tree_corpus, tmp_path: Path
) -> None:
    _ingest_only(tree_corpus.root, tmp_path / "s")
    with Store.open(tmp_path / "s") as store:  # killed between its insert and its update
        store.catalog.connection.execute(
            "INSERT INTO embeddings (backbone, count, seconds) VALUES (?, 0, 0)", [BACKBONE]
        )
        report = embed_store(store, BACKBONE, EmbedConfig(**FAST))
        assert report.embedded == 24 and store.catalog.get_embedding(BACKBONE)["dim"] > 0


# -- from the review of the backbone and embedding paths ---------------------------------------


def test_embed_settings_are_checked_before_any_work(tree_corpus, tmp_path: Path) -> None:
    for bad, match in (({"workers": -1}, "workers must be a whole number >= 0"),
                       ({"workers": 1.5}, "workers"), ({"part_size": 0}, "part_size"),
                       ({"max_pixels": 0}, "max_pixels"),
                       ({"flush_seconds": -1}, "flush")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            EmbedConfig(**bad)
    from typer.testing import CliRunner

    from pinsearch.cli.app import app

    out = CliRunner().invoke(
        app, ["index", str(tree_corpus.root), "--store", str(tmp_path / "s"), "-b", BACKBONE,
              "--workers", "-1"],
    )  # fmt: skip
    assert out.exit_code != 0 and "workers" in str(out.exception)
    assert not (tmp_path / "s").exists()  # refused before the corpus was read


def test_queries_are_refused_when_the_run_was_made_otherwise(
    tree_corpus, store_copy: Path, tmp_path: Path
) -> None:
    """Other preprocessing recorded (as after a timm upgrade), or the weights file written
    over since: a query image would be embedded otherwise than the pins were."""
    from pinsearch.search import store_backbone

    with Store.open(store_copy) as store:
        store.catalog.connection.execute(
            "UPDATE embeddings SET preprocess = json_merge_patch(preprocess, '{\"crop_pct\": 0.5}')"
        )
    with (
        Store.open(store_copy, read_only=True) as store,
        pytest.raises(BackboneMismatchError, match="preprocessing"),
    ):
        store_backbone(store, BACKBONE)
    model = create_backbone(BACKBONE)
    ckpt = tmp_path / "w.pth"
    torch.save(model.model.state_dict(), ckpt)
    weighted = tmp_path / "weighted"
    index_corpus(tree_corpus.root, weighted, backbone=BACKBONE,
                 embed=EmbedConfig(**FAST, weights=str(ckpt)))  # fmt: skip
    with Store.open(weighted, read_only=True) as store:
        assert store_backbone(store, BACKBONE).weights == f"file:{ckpt}"
    torch.save({k: v + 1 if v.is_floating_point() else v
                for k, v in model.model.state_dict().items()}, ckpt)  # fmt: skip
    with (
        Store.open(weighted, read_only=True) as store,
        pytest.raises(BackboneMismatchError, match="the file changed since"),
    ):
        store_backbone(store, BACKBONE)


def test_a_store_embedded_with_the_symmetric_padding_lite0_keeps_it(
    tree_corpus, tmp_path: Path
) -> None:
    """The bundled Lite weights are TensorFlow ports: new runs use timm's TF-padded
    architecture; a store embedded before with the symmetric-padding one goes on with it."""
    from pinsearch.backbones import get_backbone_spec, spec_as_recorded
    from pinsearch.embed import EmbedConfig, embed_images, run_differences
    from pinsearch.search import store_backbone

    name, store_path = "effnet_lite0", tmp_path / "s"
    assert get_backbone_spec(name).arch == "tf_efficientnet_lite0"
    index_corpus(tree_corpus.root, store_path, backbone=name, embed=EmbedConfig(workers=0))
    with Store.open(store_path) as store:  # made as a pinsearch before the change made it
        run = store.catalog.get_embedding(name)
        run["spec"]["spec"]["arch"] = "efficientnet_lite0"
        store.catalog.upsert_embedding(name, spec=run["spec"])
        keys = store.vectors(name).sorted_keys()[:4]
        store.vectors(name).drop_keys(keys)
        rows = store.catalog.pins_by_key(keys.tolist())
        paths = [rows[int(k)]["path"] for k in keys]
    new = create_backbone(name)
    assert run_differences(run, new) == ["architecture efficientnet_lite0 vs tf_efficientnet_lite0"]
    before = create_backbone(spec_as_recorded(get_backbone_spec(name), run))
    assert before.spec.arch == "efficientnet_lite0" and not run_differences(run, before)
    index_corpus(None, store_path, backbone=name)  # re-embeds the 4 pins as the run was made
    with Store.open(store_path, read_only=True) as store:
        again, _ = store.vectors(name).load(keys)
        assert store_backbone(store, name).spec.arch == "efficientnet_lite0"  # queries too
    np.testing.assert_allclose(again, embed_images(before, paths), atol=1e-4)
    assert np.abs(again - embed_images(new, paths)).max() > 0.05  # (the other padding differs)
