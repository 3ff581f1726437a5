"""The zero-shot head: classify pins by their similarity to prompts built from class names.

No training: ``fit`` only embeds, for every class, the prompts ("a photo of {}." and variants)
with the backbone's text encoder (CLIP text tower or ``pinsearch align``) and averages them
into one unit vector per class (the prompt ensembling of Radford et al., 2021). A pin gets the
class whose vector is most similar to its own; ``predict_proba`` is the softmax of the scaled
similarities. In a study the head's grid can compare prompt sets, chosen on the training folds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils.validation import validate_data

from pinsearch.heads import _Head, register_head
from pinsearch.vectors import unit_rows

__all__ = ["DEFAULT_PROMPTS", "ZeroShotHead", "label_text"]

#: Prompt templates averaged per class (``{}`` is the class name in words).
DEFAULT_PROMPTS = (
    "a photo of {}.",
    "a pin about {}.",
    "a picture of {}.",
    "an image of {}.",
    "{}",
)


def label_text(label: Any) -> str:
    """A class label in words: ``home_decor`` -> ``home decor``."""
    return str(label).replace("_", " ").replace("-", " ").strip()


@register_head("zeroshot")
class ZeroShotHead(_Head):
    """Nearest class prompt in a shared text-image space.

    Args:
        text_encoder: maps texts into the backbone's space (see :mod:`pinsearch.text`);
            needed by ``fit`` only — a fitted head keeps its class vectors.
        prompts: templates with one ``{}`` for the class name, averaged per class.
        scale: logit scale of ``predict_proba`` (CLIP's is 100).
    """

    _array_names = ("class_vectors_",)
    _unsaved_params = ("text_encoder",)

    def __init__(
        self,
        text_encoder: Any = None,
        prompts: tuple[str, ...] = DEFAULT_PROMPTS,
        scale: float = 100.0,
    ) -> None:
        self.text_encoder = text_encoder
        self.prompts = prompts
        self.scale = scale

    def _prompts(self) -> tuple[Any, ...]:
        """The templates: one, or a list of them (anything else: none, refused)."""
        if isinstance(self.prompts, str):
            return (self.prompts,)
        return tuple(self.prompts) if isinstance(self.prompts, (list, tuple)) else ()

    def check_params(self) -> None:
        prompts = self._prompts()
        if not prompts or not all(isinstance(p, str) and _one_slot(p) for p in prompts):
            raise ValueError(
                f"every prompt needs exactly one '{{}}' for the class name and no other braces "
                f"(write {{{{ and }}}} for a literal brace): {prompts}"
            )
        if not self.scale > 0:
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")

    def fit(self, X: Any, y: Any) -> ZeroShotHead:
        """Embed the prompts of every class in ``y`` (``X`` only fixes the dimension)."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        self._encode(y)
        if self.text_encoder is None:
            raise ValueError(
                "the zeroshot head needs a text encoder (a CLIP backbone, or pinsearch align)"
            )
        self.check_params()
        prompts = self._prompts()
        names = [label_text(c) for c in self.classes_]
        vectors = np.zeros((len(names), 0), np.float32)
        for template in prompts:
            v = unit_rows(self.text_encoder.encode([template.format(n) for n in names]))
            vectors = v if vectors.shape[1] == 0 else vectors + v
        if vectors.shape[1] != X.shape[1]:
            raise ValueError(
                f"text encoder {getattr(self.text_encoder, 'name', '?')} gives "
                f"{vectors.shape[1]}-d vectors, the pins have {X.shape[1]}"
            )
        self.class_vectors_ = unit_rows(vectors)
        return self

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X) @ self.class_vectors_.T

    def decision_function(self, X: Any) -> np.ndarray:
        """Cosine similarity of each pin to each class."""
        return self._scores(self._check(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the scaled similarities."""
        z = self.scale * self._scores(self._check(X))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _one_slot(template: object) -> bool:
    """Whether a prompt template has exactly one empty ``{}`` field and no other."""
    import string

    if not isinstance(template, str):
        return False
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]  # fmt: skip
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]
