"""Inference: base model + delta + class embeddings -> top-k labels with probabilities.

Only the vision tower runs at prediction time: class text embeddings come with the delta (computed by
the adapted text encoder at training time) or are computed once at construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseshot.base import BaseModel
from sparseshot.delta import SparseDelta
from sparseshot.prompts import DEFAULT_TEMPLATE, class_text_embeddings, format_prompts

__all__ = ["Classifier", "DEFAULT_TEMPLATE", "class_text_embeddings", "format_prompts"]


def _logit_scale(model: nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    return float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0


class Classifier:
    """Zero-/few-shot CLIP classifier over a shared base model.

    Classes come from `classes` or delta.meta["classes"]; embeddings from `class_embeddings`, else
    delta.extras["class_embeddings"], else the (delta-applied) text tower with `template` (default:
    delta.meta["template"] or "a photo of a {}."). The delta is checked against the base's fingerprint
    once, here, and applied to the shared model under `base.lock` only for the duration of a forward.
    """

    def __init__(
        self,
        base: BaseModel,
        delta: SparseDelta | None = None,
        *,
        class_embeddings: torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        template: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.base = base
        self.delta = delta
        self.batch_size = int(batch_size)
        meta = delta.meta if delta is not None else {}
        names = list(classes) if classes is not None else list(meta.get("classes") or [])
        if not names:
            raise ValueError("no class names: pass classes= or a delta whose meta has 'classes'")
        self.classes = names
        if delta is not None:
            delta.check(base.model, fingerprint=base.fingerprint)  # DeltaError on a mismatched base
        emb = class_embeddings if class_embeddings is not None else (
            delta.class_embeddings if delta is not None else None)
        if emb is None:
            emb = self._encode_classes(template or meta.get("template") or DEFAULT_TEMPLATE)
        if emb.dim() != 2 or emb.shape[0] != len(names):
            raise ValueError(f"class embeddings of shape {tuple(emb.shape)} do not fit {len(names)} classes")
        self.class_embeddings = F.normalize(emb.detach().float(), dim=-1).to(base.device)  # (C, D)

    @staticmethod
    def encode_texts(
        base: BaseModel, classes: Sequence[str], template: str = DEFAULT_TEMPLATE
    ) -> torch.Tensor:
        """(C, D) normalised class embeddings from the base text tower (zero-shot)."""
        with base.lock:
            return class_text_embeddings(base.model, base.tokenizer, classes, template, base.device)

    def _encode_classes(self, template: str) -> torch.Tensor:
        with self.base.lock, self._delta_applied():
            return class_text_embeddings(self.base.model, self.base.tokenizer, self.classes, template,
                                         self.base.device)

    def _delta_applied(self) -> _Applied:
        return _Applied(self.base.model, self.delta)

    @property
    def nbytes(self) -> int:
        """Memory this classifier holds beyond the shared base: class embeddings + delta payload."""
        emb = self.class_embeddings.element_size() * self.class_embeddings.numel()
        return emb + (self.delta.nbytes if self.delta is not None else 0)

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, 3, S, S) eval-preprocessed images (PIL images, or tensors already preprocessed)."""
        tensors = [im if isinstance(im, torch.Tensor) else self.base.preprocess_eval(im) for im in images]
        return torch.stack(tensors)

    def image_features(self, images: Sequence[Any]) -> tuple[torch.Tensor, float]:
        """((N, D) normalised image features, logit scale), computed with the delta applied."""
        pixels = self._pixels(images)  # preprocessing outside the lock
        feats = []
        with self.base.lock, self._delta_applied(), torch.no_grad():
            model = self.base.model
            dtype = next(model.parameters()).dtype
            for i in range(0, len(pixels), self.batch_size):
                x = pixels[i : i + self.batch_size].to(self.base.device, dtype)
                feats.append(model.encode_image(x).float())  # type: ignore[operator]  # (b, D)
            scale = _logit_scale(model)
        return F.normalize(torch.cat(feats), dim=-1), scale

    def probabilities(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, C) softmax over logit_scale · cos(image, class)."""
        feats, scale = self.image_features(images)
        return (scale * feats @ self.class_embeddings.T).softmax(dim=-1)

    def predict(self, images: Sequence[Any], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the top_k (class, probability) pairs, most probable first."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if len(images) == 0:
            return []
        probs = self.probabilities(images).cpu()  # (N, C)
        values, indices = probs.topk(min(top_k, len(self.classes)), dim=-1)  # (N, k), descending
        return [
            [(self.classes[int(j)], float(p)) for p, j in zip(vrow, irow, strict=True)]
            for vrow, irow in zip(values.tolist(), indices.tolist(), strict=True)
        ]


class _Applied:
    """Context manager: delta applied to `model` (names/shapes re-validated), reverted on exit."""

    def __init__(self, model: nn.Module, delta: SparseDelta | None) -> None:
        self.model, self.delta = model, delta

    def __enter__(self) -> None:
        if self.delta is not None:
            self.delta.apply(self.model, check=False)

    def __exit__(self, *exc: object) -> None:
        if self.delta is not None:
            self.delta.revert(self.model)
