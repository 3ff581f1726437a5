"""Tests for pinsearch.backbones: the registry, specs, weights resolution and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pinsearch.backbones import (
    Backbone,
    BackboneSpec,
    Preprocess,
    create_backbone,
    downloads_allowed,
    get_backbone_spec,
    list_backbones,
    register_backbone,
    weights_available_offline,
)
from pinsearch.errors import BackboneMismatchError, WeightsNotFoundError

PAPER = {
    "efficientnetv2_b0",
    "efficientnetv2_b1",
    "efficientnetv2_b3",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
}


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return create_backbone("test_efficientnet")


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# -- registry -------------------------------------------------------------------------------


def test_registry_contents() -> None:
    names = {s.name for s in list_backbones()}
    assert names >= PAPER
    assert {"effnet_lite0", "effnet_lite1", "effnet_lite2", "classic"} <= names
    assert {"test_efficientnet", "test_convnext"} <= names
    assert {s.name for s in list_backbones() if s.paper} == PAPER
    assert [s.name for s in list_backbones()] == sorted(names)
    assert {s.name for s in list_backbones("effnet_lite*")} == {f"effnet_lite{i}" for i in range(3)}
    assert all(s.random_init and "test" in s.tags for s in list_backbones("test_*"))
    assert list_backbones("nothing*") == []


def test_paper_specs_have_dims_and_pretrained_tags() -> None:
    for name in PAPER:
        spec = get_backbone_spec(name)
        assert spec.source == "timm" and spec.dim in (768, 1024, 1280, 1536)
        assert "." in spec.arch  # a pinned pretrained tag
    lite = get_backbone_spec("effnet_lite0")
    assert (lite.source, lite.dim, lite.mean, lite.std) == ("lite", 1280, (0.5,) * 3, (0.5,) * 3)
    assert "default" in lite.tags


def test_unknown_name_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as info:
        get_backbone_spec("resnet9000")
    message = str(info.value)
    for name in ("effnet_lite0", "convnext_base", "classic", "test_efficientnet"):
        assert name in message
    assert "timm:" in message
    with pytest.raises(ValueError):
        create_backbone("resnet9000")
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone_spec("hub:resnet18")  # only the timm: prefix is understood


def test_duplicate_registration_raises() -> None:
    before = list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneSpec(name="test_efficientnet", source="timm", arch="x"))
    with pytest.raises(ValueError, match="unknown source"):
        register_backbone(BackboneSpec(name="brand_new_name", source="nowhere"))
    assert list_backbones() == before
    assert get_backbone_spec("test_efficientnet").arch == "test_efficientnet"


def test_timm_prefix_specs() -> None:
    spec = get_backbone_spec("timm:resnet18")
    assert (spec.name, spec.source, spec.arch) == ("timm:resnet18", "timm", "resnet18")
    assert spec.dim is None and not spec.paper
    tagged = get_backbone_spec("timm:resnet18.a1_in1k")
    assert tagged.arch == "resnet18.a1_in1k"
    with pytest.raises(ValueError, match="not a timm model"):
        get_backbone_spec("timm:not_a_model")
    with pytest.raises(ValueError):
        get_backbone_spec("timm:")


# -- offline behaviour ----------------------------------------------------------------------


def test_offline_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert downloads_allowed() is False  # conftest sets PINSEARCH_OFFLINE=1
    for var in ("PINSEARCH_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert downloads_allowed() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert downloads_allowed() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")  # (huggingface_hub: online)
    assert downloads_allowed() is True
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert downloads_allowed() is False


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("PINSEARCH_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads HF_HOME once, at import: point the cache it uses there too.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


def test_timm_model_without_weights_offline(empty_caches) -> None:
    assert torch.hub.get_dir().endswith("torch/hub")
    with pytest.raises(WeightsNotFoundError) as info:
        create_backbone("timm:resnet18")
    message = str(info.value)
    assert "--weights" in message and "resnet18" in message
    assert "effnet_lite0" in message  # it names the backbones that do work offline
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        create_backbone("convnext_tiny")


def test_weights_available_offline(empty_caches) -> None:
    assert weights_available_offline(get_backbone_spec("effnet_lite0"))
    assert weights_available_offline(get_backbone_spec("classic"))
    assert weights_available_offline(get_backbone_spec("test_convnext"))
    assert not weights_available_offline(get_backbone_spec("convnext_base"))


def test_cached_checkpoint_is_used_offline(empty_caches, tmp_path: Path) -> None:
    import os

    import timm

    # A checkpoint placed where torch.hub would have downloaded it is found offline.
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    if cfg is None or not cfg.url:
        pytest.skip("this timm version has no direct URL for resnet18.a1_in1k")
    ckpt_dir = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), ckpt_dir / os.path.basename(cfg.url))
    bb = create_backbone("timm:resnet18.a1_in1k")
    assert bb.weights == "pretrained:resnet18.a1_in1k" and bb.dim == 512


# -- building -------------------------------------------------------------------------------


def test_tiny_backbones(tiny: Backbone) -> None:
    assert tiny.weights == "random"
    assert tiny.preprocess.input_size == 160
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    out = tiny.model(_x(160))
    assert out.shape == (2, tiny.dim)
    conv = create_backbone("test_convnext")
    assert conv.weights == "random" and conv.model(_x(160)).shape == (2, conv.dim)
    again = create_backbone("test_efficientnet")  # seeded: the same weights every time
    for a, b in zip(tiny.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    desc = tiny.describe()
    assert desc["weights"] == "random" and desc["dim"] == tiny.dim
    assert desc["spec"]["name"] == "test_efficientnet"


def test_transform_output(tiny: Backbone) -> None:
    from PIL import Image

    t = tiny.transform()(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert t.shape == (3, 160, 160) and t.dtype == torch.float32
    # Red after mean/std normalisation: channel 0 high, the others low.
    assert t[0].mean() > 1.5 and t[1].mean() < 0 and t[2].mean() < 0


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit", "test_clip", "classic"])
def test_pixel_transform_then_normalize_is_the_eval_transform(name: str) -> None:
    """The embedding hands uint8 crops to the device and normalises them there: the result
    must be the eval transform's tensor bit for bit, for every kind of preprocessing (crop
    fractions, CLIP's and identity statistics) and image shape (padded when small)."""
    from PIL import Image

    bb = create_backbone(name)
    pixels, full = bb.pixel_transform(), bb.transform()
    rng = np.random.default_rng(3)
    for width, height in [(300, 200), (97, 411), (224, 224), (20, 30)]:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        crop = pixels(img)
        size = bb.preprocess.input_size
        assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
        assert torch.equal(bb.preprocess.normalize(crop), full(img)), (width, height)
    levels = crop.float()  # whole levels in float (the device transform's output) do too
    assert torch.equal(bb.preprocess.normalize(levels), full(img))
    assert torch.equal(levels, crop.float())  # and are left as they were
    batch = bb.preprocess.normalize(torch.stack([crop, crop]))
    assert batch.shape == (2, 3, size, size) and torch.equal(batch[1], full(img))
    assert torch.equal(bb.preprocess.normalize(levels, inplace=True), full(img))
    with pytest.raises(TypeError, match="float32"):
        bb.preprocess.normalize(crop, inplace=True)  # uint8 cannot hold the result


def test_normalize_constants_made_under_inference_mode_serve_autograd_too() -> None:
    """The embedding asks first under inference_mode; a caller with gradients comes later."""
    from pinsearch.backbones import Preprocess

    pre = Preprocess(8, (0.25, 0.5, 0.75), (0.5, 0.25, 0.125))  # a key no other test uses
    with torch.inference_mode():
        pre.normalize(torch.zeros(3, 8, 8, dtype=torch.uint8))
    x = torch.full((3, 8, 8), 128.0, requires_grad=True)
    pre.normalize(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad[:, 0, 0], 1 / 255 / torch.tensor(pre.std))


def test_classic_backbone() -> None:
    bb = create_backbone("classic")
    assert bb.weights == "none" and bb.preprocess == Preprocess(
        224, (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0
    )
    assert bb.model(torch.rand(1, 3, 64, 64)).shape == (1, bb.dim)
    with pytest.raises(ValueError, match="no weights"):
        create_backbone("classic", weights=__file__)


def _perturbed_state(tiny: Backbone, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (
            v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        ).contiguous()
        for k, v in tiny.model.state_dict().items()
    }


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped-pth"])
def test_weights_file_round_trip(tiny: Backbone, tmp_path: Path, fmt: str) -> None:
    state = _perturbed_state(tiny)
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    else:  # a training checkpoint with a DataParallel prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    bb = create_backbone("test_efficientnet", weights=path)
    assert bb.weights == f"file:{path}"
    loaded = bb.model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    x = _x(160)
    assert not torch.allclose(bb.model(x), tiny.model(x))  # really other weights
    # The same file gives the same model twice.
    np.testing.assert_array_equal(
        create_backbone("test_efficientnet", weights=str(path)).model(x).numpy(),
        bb.model(x).numpy(),
    )


def test_weights_with_wrong_shapes(tiny: Backbone, tmp_path: Path) -> None:
    state = _perturbed_state(tiny)
    name = next(k for k, v in state.items() if v.ndim == 4)
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 2)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneMismatchError, match="shapes"):
        create_backbone("test_efficientnet", weights=path)


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    other = create_backbone("test_convnext")
    path = tmp_path / "convnext.pth"
    torch.save(other.model.state_dict(), path)
    with pytest.raises(BackboneMismatchError, match="do not fit"):
        create_backbone("test_efficientnet", weights=path)


def test_unreadable_or_unsafe_weights(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneMismatchError, match="plain state dict: Unsupported operand"):
        create_backbone("test_efficientnet", weights=junk)  # (not torch's advice to unpickle)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(BackboneMismatchError, match="not a dict"):
        create_backbone("test_efficientnet", weights=listed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("test_efficientnet", weights=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        create_backbone("test_efficientnet", weights=tmp_path)


def test_spec_dim_is_checked() -> None:
    spec = BackboneSpec(
        name="tiny_wrong_dim", source="timm", arch="test_efficientnet", random_init=True, dim=7
    )
    with pytest.raises(BackboneMismatchError, match="7"):
        create_backbone(spec)


def test_spec_mean_std_override() -> None:
    spec = BackboneSpec(
        name="tiny_norm",
        source="timm",
        arch="test_efficientnet",
        random_init=True,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    bb = create_backbone(spec)
    assert bb.preprocess.mean == (0.1, 0.2, 0.3) and bb.preprocess.std == (0.4, 0.5, 0.6)


def test_effnet_lite0_bundled_weights() -> None:
    bb = create_backbone("effnet_lite0")
    assert bb.weights.startswith("bundled:")
    assert bb.dim == 1280
    assert bb.preprocess.input_size == 224
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        out = bb.model(_x(224))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert (out >= 0).all()  # pooled after ReLU6: non-negative features
    assert out.std() > 0


def test_a_checkpoint_holding_pickled_objects_is_refused_in_one_line(tmp_path: Path) -> None:
    from pinsearch.backbones import read_state_dict

    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "hook": print}, evil)
    with pytest.raises(BackboneMismatchError) as info:
        read_state_dict(evil)
    message = str(info.value)
    assert "hold pickled Python objects (print)" in message
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneMismatchError, match=r"cannot read weights .* as a plain state"):
        read_state_dict(junk)


# -- from the review of the backbone and embedding paths ---------------------------------------


def test_a_timm_model_with_a_head_of_its_own_records_its_output_width(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    assert model.num_features == 288 and model.head_hidden_size == 1024
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    bb = create_backbone("timm:mobilenetv3_small_050", weights=path)
    assert bb.dim == 1024 == bb.model(_x(224, 1)).shape[-1]  # (288 was recorded)


def test_bad_weights_files_and_tags_are_one_line_errors(tiny: Backbone, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackboneMismatchError, match="cannot read weights"):
        create_backbone("test_efficientnet", weights=bad)
    with pytest.raises(ValueError, match=r"Invalid pretrained tag.*its tags: resnet18\.a1_in1k"):
        get_backbone_spec("timm:resnet18.badtag")
    # BatchNorm step counters left out of a checkpoint: torch fills them in
    state = {k: v for k, v in _perturbed_state(tiny).items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "no_counters.pth")
    loaded = create_backbone("test_efficientnet", weights=tmp_path / "no_counters.pth")
    assert torch.equal(loaded.model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_weights_files_are_named_resolved_and_checked_by_checksum(
    tiny: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(_perturbed_state(tiny), tmp_path / "w.pth")
    bb = create_backbone("test_efficientnet", weights="w.pth")
    assert bb.weights == f"file:{tmp_path / 'w.pth'}"  # found from anywhere
    recorded = bb.describe()
    assert recorded["weights_sha256"] == bb.weights_sha256 and len(bb.weights_sha256) == 64
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "w.pth").write_bytes((tmp_path / "w.pth").read_bytes())
    assert create_backbone("test_efficientnet", weights="copy/w.pth").same_weights(recorded)
    torch.save(_perturbed_state(tiny, seed=5), tmp_path / "w.pth")  # another file, same path
    assert not create_backbone("test_efficientnet", weights="w.pth").same_weights(recorded)
    # a run recorded before checksums and absolute paths: the path, resolved here
    old = {"weights": "file:w.pth"}
    assert create_backbone("test_efficientnet", weights=tmp_path / "w.pth").same_weights(old)


def test_an_eval_crop_pinsearch_does_not_make_refuses_new_runs_only(
    tree_corpus, tmp_path: Path
) -> None:
    from dataclasses import replace

    from pinsearch.backbones import eval_crop_problem
    from pinsearch.embed import EmbedConfig, embed_store
    from pinsearch.pipeline import index_corpus
    from pinsearch.store import Store

    bb = create_backbone("test_efficientnet")
    assert bb.new_run_refusal is None and eval_crop_problem(bb.model) is None
    bb.model.pretrained_cfg = {**bb.model.pretrained_cfg, "crop_mode": "squash"}
    assert "crop_mode 'squash'" in eval_crop_problem(bb.model)
    squash = replace(bb, new_run_refusal=eval_crop_problem(bb.model))
    index_corpus(tree_corpus.root, tmp_path / "made", backbone="test_efficientnet",
                 embed=EmbedConfig(workers=0))  # fmt: skip
    with Store.open(tmp_path / "made") as store:  # a run made before goes on
        made = embed_store(store, "test_efficientnet", EmbedConfig(workers=0), backbone=squash)
        assert made.already == 24
    with (
        Store.open(tmp_path / "new", create=True) as store,
        pytest.raises(BackboneMismatchError, match="crop_mode 'squash'"),
    ):
        embed_store(store, "test_efficientnet", EmbedConfig(workers=0), backbone=squash)


def test_random_weights_for_the_lite_backbones() -> None:
    spec = get_backbone_spec("effnet_lite0")
    from dataclasses import replace

    bb = create_backbone(replace(spec, random_init=True))
    assert bb.weights == "random" and bb.dim == 1280
