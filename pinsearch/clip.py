"""OpenCLIP backbones: the image tower embeds pins, the text tower embeds queries.

A CLIP backbone is a registry entry like any other (``clip-vit-b-32``), or any open_clip model
and pretrained tag as ``clip:<model>:<tag>`` (``clip:ViT-B-16:laion2b_s34b_b88k``). Its image
vectors go to the store and a FAISS index as usual; :class:`ClipTextEncoder` maps text into the
same space for text-to-pin search and the zero-shot head.

Weights resolve from an explicit checkpoint (``weights=PATH``, loaded with
``weights_only=True``), the Hugging Face / OpenAI-CLIP cache, or the hub when downloads are
allowed; offline with none of these a :class:`~pinsearch.errors.WeightsNotFoundError` says what
to provide. ``test_clip`` is a tiny randomly initialised CLIP (config bundled) for tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pinsearch.backbones import (
    Backbone,
    BackboneSpec,
    Preprocess,
    downloads_allowed,
    register_backbone,
    register_source,
)
from pinsearch.errors import WeightsNotFoundError

__all__ = [
    "ClipImageTower",
    "ClipTextEncoder",
    "clip_input_size",
    "clip_spec",
    "clip_weights_cached",
]

_CONFIG_DIR = Path(__file__).parent / "clip_configs"
_registered_configs = False
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip() -> Any:
    """open_clip, with pinsearch's bundled model configs registered (once)."""
    global _registered_configs
    import open_clip

    if not _registered_configs:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered_configs = True
    return open_clip


class ClipImageTower(torch.nn.Module):
    """``forward(images) -> image embeddings``; holds the whole CLIP model for its text tower."""

    def __init__(self, clip: Any, tokenizer: Any, embed_dim: int) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.num_features = embed_dim
        self.eval_problem: str | None = None  # why pinsearch's eval transform is not its own

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


def clip_spec(name: str) -> BackboneSpec | None:
    """The spec for ``clip:<model>[:<tag>]`` (None when ``name`` has no ``clip:`` prefix).

    Raises:
        ValueError: unknown open_clip model or pretrained tag, naming the known ones.
    """
    prefix, sep, rest = name.partition(":")
    if prefix != "clip" or not sep or not rest:
        return None
    oc = _open_clip()
    model, _, tag = rest.partition(":")
    if model not in oc.list_models():
        raise ValueError(f"{model!r} is not an open_clip model (see open_clip.list_models())")
    tags = oc.list_pretrained_tags_by_model(model)
    if tag and tag not in tags:
        raise ValueError(f"open_clip model {model!r} has no pretrained tag {tag!r}; it has {tags}")
    tag = tag or (tags[0] if tags else "")
    return BackboneSpec(
        name=name, source="open_clip", arch=f"{model}:{tag}", description=f"OpenCLIP {model}"
    )


def clip_weights_cached(model: str, tag: str) -> Path | None:
    """A checkpoint for an open_clip model/tag already on this machine, if any."""
    oc = _open_clip()
    cfg = oc.get_pretrained_cfg(model, tag) or {}
    hub = str(cfg.get("hf_hub", "")).rstrip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for filename in _HF_FILES:
            found = try_to_load_from_cache(hub, filename)
            if isinstance(found, str):
                return Path(found)
    url = str(cfg.get("url", ""))
    if url:
        candidate = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _preprocess(oc: Any, model: str, tag: str, clip: Any) -> tuple[Preprocess, str | None]:
    """The eval transform open_clip gives the model (its own settings, its pretrained tag's
    over them), and why pinsearch's differs where it does (None: it does not).

    pinsearch resizes the shorter side and crops a centred square, as open_clip's
    ``resize_mode`` ``shortest`` does; a model evaluated otherwise (``squash``: the whole
    image stretched to the square, as SigLIP's) is refused for new runs, as timm's are.
    """
    cfg = dict(getattr(clip.visual, "preprocess_cfg", None) or {})
    cfg.update((oc.get_pretrained_cfg(model, tag) or {}) if tag else {})
    size = clip.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    mode = str(cfg.get("resize_mode") or "shortest")
    square = not isinstance(size, (tuple, list)) or size[0] == size[-1]
    problem = None
    if mode != "shortest" or not square:
        problem = (
            f"open_clip evaluates {model} ({tag or 'no tag'}) with resize_mode {mode!r} at "
            f"{size}; pinsearch resizes the short side and crops a centred square: pick "
            "another pretrained tag or model"
        )
    pre = Preprocess(
        input_size=side,
        mean=tuple(cfg.get("mean") or _OPENAI_MEAN),
        std=tuple(cfg.get("std") or _OPENAI_STD),
        interpolation=str(cfg.get("interpolation") or "bicubic"),
        crop_pct=1.0,  # CLIP resizes the shorter side to the input size, then centre-crops
    )
    return pre, problem


@register_source("open_clip")
def _build_open_clip(spec: BackboneSpec, weights: Path | None) -> tuple[Any, Preprocess, str]:
    oc = _open_clip()
    model, _, tag = spec.arch.partition(":")
    if weights is not None:
        pretrained, origin = str(weights), f"file:{weights}"
    elif spec.random_init:
        pretrained, origin = None, "random"
    else:
        found = clip_weights_cached(model, tag)
        origin = f"pretrained:{model}:{tag}"
        if found is not None:
            pretrained = str(found)
        elif downloads_allowed():
            pretrained = tag
        else:
            raise WeightsNotFoundError(
                f"no weights for CLIP backbone {spec.name!r} ({model}, pretrained {tag!r}) on "
                "this machine. Provide one of: a local open_clip checkpoint (--weights PATH); "
                f"the Hugging Face cache (download it once while online: "
                f"open_clip.create_model('{model}', pretrained='{tag}')); or allow downloads "
                "(unset PINSEARCH_OFFLINE/HF_HUB_OFFLINE). Offline, text search works with "
                "`pinsearch align` on any image backbone."
            )
    try:
        with torch.random.fork_rng(devices=[]):
            # random-init test models: the same weights in every process (the CPU generator
            # only: torch.manual_seed would reseed CUDA's too, and fork_rng([]) keeps only this)
            torch.default_generator.manual_seed(0)
            clip = oc.create_model(model, pretrained=pretrained)
    except WeightsNotFoundError:
        raise
    except Exception as exc:  # hub, file and state-dict errors come in many types
        if weights is not None:
            from pinsearch.errors import BackboneMismatchError

            raise BackboneMismatchError(
                f"cannot load {weights} into open_clip {model}: {exc}"
            ) from exc
        raise WeightsNotFoundError(
            f"could not get weights for {spec.name!r} ({model}, {tag!r}): {exc}. "
            "Provide a local checkpoint with --weights PATH."
        ) from exc
    embed_dim = int(oc.get_model_config(model)["embed_dim"])
    tower = ClipImageTower(clip, oc.get_tokenizer(model), embed_dim)
    preprocess, tower.eval_problem = _preprocess(oc, model, tag, clip)
    return tower, preprocess, origin


class ClipTextEncoder:
    """Text -> L2-normalised vectors in a CLIP backbone's image space."""

    kind = "clip"

    def __init__(self, backbone: Backbone, *, batch_size: int = 256) -> None:
        if not isinstance(backbone.model, ClipImageTower):
            raise TypeError(f"backbone {backbone.spec.name!r} is not a CLIP model")
        self.backbone = backbone
        self.name = f"clip:{backbone.spec.name}"
        self.dim = backbone.dim
        self.batch_size = batch_size

    def __deepcopy__(self, memo: dict[int, Any]) -> ClipTextEncoder:
        return self  # read-only inference object: scikit-learn's clone may share it

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        tower = self.backbone.model
        device = next(tower.clip.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = tower.tokenizer(list(texts[i : i + self.batch_size])).to(device)
                emb = tower.clip.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, self.dim), np.float32)


def clip_input_size(spec: BackboneSpec) -> int | None:
    """The image side an open_clip spec's model takes (from its config; nothing is built)."""
    cfg = _open_clip().get_model_config(spec.arch.split(":", 1)[0]) or {}
    size = cfg.get("vision_cfg", {}).get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


for _name, _model, _tag, _dim in (
    ("clip-vit-b-32", "ViT-B-32", "laion2b_s34b_b79k", 512),
    ("clip-vit-b-16", "ViT-B-16", "laion2b_s34b_b88k", 512),
    ("clip-vit-l-14", "ViT-L-14", "laion2b_s32b_b82k", 768),
):
    register_backbone(
        BackboneSpec(
            name=_name,
            source="open_clip",
            arch=f"{_model}:{_tag}",
            dim=_dim,
            description=f"OpenCLIP {_model} ({_tag}): image + text towers",
            tags=("clip",),
        )
    )

register_backbone(
    BackboneSpec(
        name="test_clip",
        source="open_clip",
        arch="pinsearch-test-clip:",
        dim=32,
        random_init=True,
        description="tiny OpenCLIP with seeded random weights (tests only)",
        tags=("test", "clip"),
    )
)
