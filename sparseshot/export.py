"""Exports of an adapted model: a merged open_clip checkpoint and an ONNX classifier.

Both are built from a base model and a delta without writing the shared base's weights: the
checkpoint takes `SparseDelta.adapted_tensor` per touched tensor, the ONNX export applies the delta
to a copy of the vision tower.

**Merged checkpoint** (`merged_checkpoint`): one ``.safetensors`` file holding the full adapted
open_clip state dict (the base's dtype) and, in the safetensors metadata (string → string):

- ``"config"``: JSON in open_clip's ``open_clip_config.json`` layout, ``{"model_cfg": …,
  "preprocess_cfg": {"size", "mean", "std", "interpolation", "resize_mode"}}``;
- ``"sparseshot"``: JSON ``{"format": "sparseshot-checkpoint", "version", "classes", "template",
  "method", "base_model", "base_fingerprint", "library_version", "class_embeddings": {"shape",
  "dtype": "float32", "base64"}}``; the class embeddings are the ones the service scores with
  (L2-normalised, fp32 little-endian bytes), kept out of the state dict so that it loads strictly.

``sparseshot.load_base("model.safetensors")`` loads it alone; `checkpoint_classifier` adds the
classes. With open_clip alone: write ``metadata["config"]`` as ``open_clip_config.json`` beside the
file renamed ``open_clip_model.safetensors`` and call ``open_clip.create_model("local-dir:FOLDER")``.

**ONNX** (`onnx_export`): the adapted vision tower, L2 normalisation, logits against the class
embeddings (logit scale of the base, as the service) and softmax. Input ``pixels`` (N, 3, S, S)
float32, eval-preprocessed; output ``probabilities`` (N, C); the batch axis is dynamic. The model's
``metadata_props`` carry ``classes`` (JSON list, the output's column order), ``preprocess`` (JSON,
as above), ``template``, ``method``, ``base_model``, ``base_fingerprint``, ``logit_scale``,
``format`` (``sparseshot-onnx``) and ``version``.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot import __version__
from sparseshot.base import BaseModel, load_base
from sparseshot.classifier import Classifier
from sparseshot.delta import DeltaError, SparseDelta
from sparseshot.io import atomic_write
from sparseshot.serving import _class_embeddings as serving_embeddings

__all__ = [
    "CHECKPOINT_FORMAT", "EXPORT_VERSION", "ONNX_FORMAT", "CheckpointInfo", "ExportError",
    "checkpoint_classifier", "merged_checkpoint", "onnx_classes", "onnx_export", "read_checkpoint_info",
]

CHECKPOINT_FORMAT = "sparseshot-checkpoint"
ONNX_FORMAT = "sparseshot-onnx"
EXPORT_VERSION = 1  # bumped when either file's layout changes (the service caches exports by it)
ONNX_OPSET = 17
# One ONNX file is a protobuf message, at most 2 GiB; room is left for the graph (towers over about
# 1.9 GB of fp32 weights, ViT-H/G, would need ONNX external data, which this export does not write).
ONNX_MAX_WEIGHT_BYTES = 2**31 - 2**27
VISION_PREFIX = "visual."


class ExportError(ValueError):
    """The model cannot be exported in this format (a base without an open_clip config, a tower the
    ONNX exporter cannot trace)."""


@dataclass
class CheckpointInfo:
    """What a merged checkpoint says about the classifier it holds."""

    classes: list[str]
    class_embeddings: Tensor  # (C, D) fp32, L2-normalised
    meta: dict[str, Any]  # the whole "sparseshot" metadata entry


# --------------------------------------------------------------------------------------------------
# What both exports share


def _classes(delta: SparseDelta) -> list[str]:
    names = delta.meta.get("classes")
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise DeltaError("no class names: the delta's meta has no 'classes'")
    return list(names)


def _class_embeddings(base: BaseModel, delta: SparseDelta, classes: list[str]) -> Tensor:
    """(C, D) fp32 L2-normalised on CPU: the serving path's embeddings, so exports score as the service."""
    return serving_embeddings(base, delta, classes).cpu()


def _logit_scale(base: BaseModel) -> float:
    """The logit scale the service multiplies cosines by (the base's, as `ServingEngine`)."""
    scale = getattr(base.model, "logit_scale", None)
    return float(scale.exp()) if isinstance(scale, Tensor) else 100.0


def _common_meta(base: BaseModel, delta: SparseDelta, classes: list[str]) -> dict[str, Any]:
    return {
        "version": EXPORT_VERSION, "classes": classes, "template": delta.meta.get("template"),
        "method": delta.meta.get("method"), "base_model": delta.meta.get("base_model") or base.spec,
        "base_fingerprint": base.fingerprint, "library_version": __version__,
    }  # fmt: skip


def _write(data: bytes, path: str | os.PathLike[str] | None) -> bytes:
    if path is not None:
        atomic_write(path, lambda fh: fh.write(data))
    return data


# --------------------------------------------------------------------------------------------------
# Merged checkpoint


def _uses_quick_gelu(model: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _open_clip_config(base: BaseModel) -> dict[str, Any]:
    """{"model_cfg", "preprocess_cfg"}: what rebuilds this architecture and its eval transform."""
    cfg = copy.deepcopy(base.config)
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ExportError(f"base {base.spec!r} has no open_clip model config (hf-hub:/local-dir: bases "
                          f"are loaded by open_clip alone); a merged checkpoint needs one")
    if _uses_quick_gelu(base.model):  # OpenAI-trained tags: the config alone says GELU
        cfg["quick_gelu"] = True
    return {"model_cfg": cfg, "preprocess_cfg": dict(base.preprocess_cfg)}


def _embeddings_json(emb: Tensor) -> dict[str, Any]:
    data = emb.float().contiguous().numpy().astype("<f4").tobytes()
    return {"shape": list(emb.shape), "dtype": "float32", "base64": base64.b64encode(data).decode()}


def merged_checkpoint(
    base: BaseModel, delta: SparseDelta, path: str | os.PathLike[str] | None = None
) -> bytes:
    """The merged checkpoint's bytes (module doc), also written atomically to `path` when given.

    Raises DeltaError when the delta does not fit `base`, ExportError when `base` has no config."""
    import safetensors.torch

    delta.check(base.model, fingerprint=base.fingerprint)
    classes = _classes(delta)
    config = _open_clip_config(base)
    info = {"format": CHECKPOINT_FORMAT, **_common_meta(base, delta, classes),
            "class_embeddings": _embeddings_json(_class_embeddings(base, delta, classes))}
    metadata = {"config": json.dumps(config), "sparseshot": json.dumps(info)}
    # Held while the base's own tensors are serialised (untouched ones are not copied), so a
    # Classifier applying a delta to the shared model cannot show through.
    with base.lock:
        state = {k: v.detach().cpu().contiguous() for k, v in base.model.state_dict().items()}
        for name in delta.names:
            state[name] = delta.adapted_tensor(name, state[name])
        data = safetensors.torch.save(state, metadata=metadata)
    return _write(data, path)


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Classes and class embeddings of a merged checkpoint; ExportError for other files."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
        info = json.loads(meta["sparseshot"])
        emb = info["class_embeddings"]
        raw = base64.b64decode(emb["base64"])
        vectors = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(emb["shape"]).clone()
    except Exception as e:
        raise ExportError(f"{os.fspath(path)!r} is not a sparseshot merged checkpoint: {e}") from None
    if info.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{os.fspath(path)!r} is not a sparseshot merged checkpoint")
    return CheckpointInfo(classes=list(info["classes"]), class_embeddings=vectors, meta=info)


def checkpoint_classifier(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> Classifier:
    """A `sparseshot.Classifier` over a merged checkpoint alone (its weights, classes and embeddings)."""
    info = read_checkpoint_info(path)
    base = load_base(os.fspath(path), device=device)
    return Classifier(base, classes=info.classes, class_embeddings=info.class_embeddings)


# --------------------------------------------------------------------------------------------------
# ONNX


class _ProbabilityHead(nn.Module):
    """pixels (N, 3, S, S) -> (N, C) softmax(scale · cos(vision(pixels), class embeddings))."""

    def __init__(self, visual: nn.Module, class_embeddings: Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.class_embeddings: Tensor
        self.register_buffer("class_embeddings", class_embeddings)  # (C, D), normalised
        self.logit_scale = logit_scale

    def forward(self, pixels: Tensor) -> Tensor:
        feats = F.normalize(self.visual(pixels).float(), dim=-1)  # (N, D)
        return (self.logit_scale * feats @ self.class_embeddings.T).softmax(dim=-1)  # (N, C)


def _adapted_visual(base: BaseModel, delta: SparseDelta) -> nn.Module:
    """A CPU fp32 copy of the base's vision tower with the delta's visual tensors written into it."""
    with base.lock:  # a Classifier may hold the shared model with its delta applied
        visual = copy.deepcopy(base.model.visual).cpu().float().eval()  # type: ignore[union-attr]
    own = visual.state_dict()
    adapted = {}
    for name in delta.names:
        if name.startswith(VISION_PREFIX):
            key = name[len(VISION_PREFIX):]
            adapted[key] = delta.adapted_tensor(name, own[key])
    result = visual.load_state_dict(adapted, strict=False)
    if result.unexpected_keys:
        raise DeltaError(f"delta tensors missing from the vision tower: {result.unexpected_keys[:5]}")
    return visual


def _props(base: BaseModel, delta: SparseDelta, classes: list[str], scale: float) -> dict[str, str]:
    meta = _common_meta(base, delta, classes)
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}
    props.update(format=ONNX_FORMAT, preprocess=json.dumps(base.preprocess_cfg), logit_scale=repr(scale),
                 input="pixels", output="probabilities")
    return props


def onnx_export(base: BaseModel, delta: SparseDelta, path: str | os.PathLike[str] | None = None) -> bytes:
    """The ONNX classifier's bytes (module doc), also written atomically to `path` when given.

    Raises DeltaError when the delta does not fit `base`, ExportError when the tower is over the size
    an ONNX file holds or tracing fails."""
    import onnx

    delta.check(base.model, fingerprint=base.fingerprint)
    classes = _classes(delta)
    scale = _logit_scale(base)
    visual: nn.Module = base.model.visual  # type: ignore[assignment]
    visual_bytes = 4 * sum(p.numel() for p in visual.parameters())
    if visual_bytes > ONNX_MAX_WEIGHT_BYTES:
        raise ExportError(f"the vision tower of {base.spec!r} has {visual_bytes / 1e9:.1f} GB of fp32 "
                          f"weights, over the 2 GB an ONNX file can hold")
    head = _ProbabilityHead(_adapted_visual(base, delta), _class_embeddings(base, delta, classes), scale)
    example = torch.zeros(2, 3, base.image_size, base.image_size)  # (N, 3, S, S); N is dynamic
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
            torch.onnx.export(  # a file object is accepted where the stubs say a path
                head, (example,), buf, input_names=["pixels"], output_names=["probabilities"],  # type: ignore[arg-type]
                dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
                opset_version=ONNX_OPSET, dynamo=False,
            )
    except Exception as e:  # an operator or module the exporter does not handle
        raise ExportError(f"the vision tower of {base.spec!r} cannot be exported to ONNX: {e}") from e
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in _props(base, delta, classes, scale).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "sparseshot", __version__
    return _write(proto.SerializeToString(), path)


def onnx_classes(model: bytes | str | os.PathLike[str]) -> list[str]:
    """The class names (output column order) stored in an exported ONNX model's metadata."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(os.fspath(model))
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != ONNX_FORMAT or "classes" not in props:
        raise ExportError("not a sparseshot ONNX export (no 'classes' in its metadata)")
    classes: Sequence[str] = json.loads(props["classes"])
    return list(classes)
