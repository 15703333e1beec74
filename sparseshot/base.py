"""Base CLIP models: `load_base("NAME[:PRETRAINED]")`.

NAME is one of
- an open_clip model name (``ViT-B-16``; see ``open_clip.list_models()``),
- the path of an open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg", ...}``, or the
  ``open_clip_config.json`` layout with a ``"model_cfg"`` key),
- the bundled ``sparseshot-tiny`` config (32 px images, 2+2 layers of width 64: tests and timing),
- ``hf-hub:ORG/REPO`` or ``local-dir:PATH`` (passed to open_clip as is; PRETRAINED is not used).

PRETRAINED is one of
- an open_clip pretrained tag of that model (``openai``, ``laion2b_s34b_b88k``...), downloaded into
  `cache_dir` on first use; with ``HF_HUB_OFFLINE=1`` only the local cache is looked at;
- the path of a checkpoint file: a state dict, or a dict holding it under ``"state_dict"`` or ``"model"``
  (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``, or ``.safetensors``). A checkpoint
  that also stores its model config under ``"config"`` can be given alone: ``load_base("ckpt.pt")``
  (for ``.safetensors``, the JSON metadata entry ``"config"``, as `sparseshot.export.merged_checkpoint`
  writes; in the ``open_clip_config.json`` layout its ``"preprocess_cfg"`` sets mean, std and resizing);
- ``random``: explicit random initialisation, seeded so that every process builds the same weights
  (and the same fingerprint).

There is no default: a spec without weights is an error, never a silently random model.

Parsing: a spec that names an existing file is that file. Otherwise the spec is split at a ``:`` such
that the left part is a known model name or existing config file and the right part is ``random``, a
tag of that model or an existing file, trying the rightmost ``:`` first, so that paths containing
``:`` on either side work. When nothing fits, the leftmost split whose NAME is known (else the rightmost
``:``) decides which error is reported.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import open_clip
import torch
from torch import nn
from torchvision import transforms

from sparseshot.fingerprint import weights_fingerprint
from sparseshot.sparse_grad import use_plain_attention

TINY_NAME = "sparseshot-tiny"
RANDOM = "random"
RANDOM_SEED = 0
_SCHEMAS = ("hf-hub:", "local-dir:")
_TRUE = {"1", "true", "yes", "on"}


class BaseModelError(RuntimeError):
    """A base model could not be built; the message says what was tried."""


@dataclass
class BaseModel:
    """A loaded base CLIP model, shared read-only between callers (see `lock`)."""

    spec: str
    model: nn.Module  # eval mode, requires_grad False everywhere, plain attention
    preprocess_train: Callable[[Any], torch.Tensor]  # PIL image -> (3, S, S), augmenting
    preprocess_eval: Callable[[Any], torch.Tensor]  # PIL image -> (3, S, S), deterministic
    tokenizer: Callable[..., torch.Tensor]  # list[str] -> (N, context_length) int64
    fingerprint: str  # sparseshot.fingerprint.weights_fingerprint of the weights
    device: torch.device
    image_size: int
    # Hold while a delta is applied to the shared `model` (Classifier does so around its forward).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # open_clip model config
    weights: str = ""  # what the weights came from: tag, checkpoint path or "random"
    # Eval preprocessing (mean, std, interpolation, resize_mode, size), open_clip's PreprocessCfg keys.
    preprocess_cfg: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------------
# Spec parsing


def _known_name(name: str) -> bool:
    return name == TINY_NAME or name in open_clip.list_models() or os.path.isfile(name)


def _tags(name: str) -> list[str]:
    return list(open_clip.list_pretrained_tags_by_model(name)) if name in open_clip.list_models() else []


def _fits(name: str, pretrained: str) -> bool:
    return pretrained == RANDOM or os.path.isfile(pretrained) or pretrained in _tags(name)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split "NAME[:PRETRAINED]" into (NAME, PRETRAINED or None); see the module doc for the rules."""
    spec = spec.strip()
    if not spec:
        raise BaseModelError("empty base model spec; expected NAME[:PRETRAINED], e.g. ViT-B-16:openai")
    if os.path.isfile(spec) or spec.startswith(_SCHEMAS):
        return spec, None
    colons = [i for i, ch in enumerate(spec) if ch == ":"]
    if not colons:
        return spec, None
    for i in reversed(colons):
        if _known_name(spec[:i]) and _fits(spec[:i], spec[i + 1 :]):
            return spec[:i], spec[i + 1 :]
    for i in colons:
        if _known_name(spec[:i]):
            return spec[:i], spec[i + 1 :]
    i = colons[-1]
    return spec[:i], spec[i + 1 :]


# --------------------------------------------------------------------------------------------------
# Model configs


def _tiny_config() -> dict[str, Any]:
    text = resources.files("sparseshot").joinpath("model_configs", f"{TINY_NAME}.json").read_text()
    return json.loads(text)


def _config_from_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"cannot read model config JSON {path!r}: {e}") from None
    return _normalise_config(cfg, f"config file {path!r}")


def _normalise_config(cfg: Any, what: str) -> dict[str, Any]:
    if isinstance(cfg, Mapping) and "model_cfg" in cfg:
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, Mapping) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise BaseModelError(f"{what} is not an open_clip model config "
                             f"(needs embed_dim, vision_cfg, text_cfg)")
    return copy.deepcopy(dict(cfg))


def _unknown_name_error(name: str) -> BaseModelError:
    if name.endswith(".json") or os.sep in name:
        return BaseModelError(f"model config file not found: {name!r}")
    choices = [TINY_NAME, *open_clip.list_models()]
    near = difflib.get_close_matches(name, choices, n=6, cutoff=0.5)
    hint = f"; nearby names: {', '.join(near)}" if near else ""
    return BaseModelError(
        f"unknown base model {name!r}: not an open_clip model name, not {TINY_NAME!r} and not an existing "
        f"config JSON file{hint} (open_clip.list_models() lists all names)"
    )


def _resolve_config(name: str) -> dict[str, Any]:
    if name == TINY_NAME:
        return _tiny_config()
    if name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise _unknown_name_error(name)
        return copy.deepcopy(cfg)
    if os.path.isfile(name):
        return _config_from_json(name)
    raise _unknown_name_error(name)


def tower_depths(spec: str) -> dict[str, int] | None:
    """Residual blocks per tower ({"vision": n, "text": m}) of the model `spec` names, read from its
    config alone (no weights); None where only loading tells (a checkpoint with its own config, hf-hub)."""
    try:
        name, pretrained = parse_spec(spec)
        if pretrained is None or name.startswith(_SCHEMAS):
            return None
        cfg = _resolve_config(name)
    except BaseModelError:
        return None
    layers = {tower: (cfg.get(f"{tower}_cfg") or {}).get("layers") for tower in ("vision", "text")}
    depths = {tower: n for tower, n in layers.items() if isinstance(n, int) and not isinstance(n, bool)}
    return depths or None


def _build(cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiate an open_clip model from its config, without downloading any tower weights."""
    config: dict[str, Any] = copy.deepcopy(dict(cfg))
    if "multimodal_cfg" in config:
        raise BaseModelError("CoCa models (multimodal_cfg) are not supported as base models")
    text_cfg, vision_cfg = config["text_cfg"], config["vision_cfg"]
    custom_text = bool(config.pop("custom_text", False)) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**config)
    except Exception as e:  # a config with unknown fields or inconsistent sizes
        raise BaseModelError(f"cannot build an open_clip model from this config: {e}") from None


def _build_random(cfg: Mapping[str, Any]) -> nn.Module:
    """Random init with a fixed seed, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return _build(cfg)


# --------------------------------------------------------------------------------------------------
# Weights


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, model config carried by the checkpoint or None)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
            cfg = json.loads(meta["config"]) if "config" in meta else None
            return state, cfg
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BaseModelError(f"cannot read checkpoint {path!r}: {e}") from None
    cfg = None
    if isinstance(obj, Mapping):
        cfg = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BaseModelError(f"checkpoint {path!r} holds no state dict (a dict of tensors, possibly under "
                             f"'state_dict' or 'model')")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, (dict(cfg) if cfg is not None else None)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BaseModelError(
            f"checkpoint {path!r} does not match the model config: missing keys {result.missing_keys[:5]}"
            f"{'…' if len(result.missing_keys) > 5 else ''}, unexpected keys {result.unexpected_keys[:5]}"
            f"{'…' if len(result.unexpected_keys) > 5 else ''}"
        )


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in flags)


def _cached_tag_file(tag_cfg: Mapping[str, Any], cache_dir: str | None) -> str | None:
    """Local file of a pretrained tag's weights if already downloaded, without network access."""
    hub = tag_cfg.get("hf_hub")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for fname in names:
            found = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


PROBE_TIMEOUT_S = 3.0  # how long the download host may take to accept a connection
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _download_host(tag_cfg: Mapping[str, Any]) -> tuple[str, int] | None:
    """(host, port) a download of this tag would connect to first; None when unknown."""
    from urllib.parse import urlsplit

    if tag_cfg.get("hf_hub"):
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    elif tag_cfg.get("url"):
        url = str(tag_cfg["url"])
    else:
        return None
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def _unreachable(tag_cfg: Mapping[str, Any]) -> str | None:
    """Why the download host cannot be reached (name does not resolve, no route, refused, no answer
    within PROBE_TIMEOUT_S), or None (reachable, unknown, or behind a proxy that may reach it).
    Asked before a download so that a machine without internet fails in seconds: the hub client
    would otherwise retry each file for a minute or more."""
    import socket

    where = _download_host(tag_cfg)
    if where is None or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    try:
        socket.create_connection(where, timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{where[0]}:{where[1]} cannot be reached ({type(e).__name__}: {e})"
    return None


def _from_tag(name: str, tag: str, cache_dir: str | None) -> nn.Module:
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    # A cached download is used as is (no network round trip); otherwise open_clip downloads it.
    cached = _cached_tag_file(tag_cfg, cache_dir)
    source: str = cached or tag
    if _offline() and cached is None:
        where = tag_cfg.get("hf_hub") or tag_cfg.get("url")
        raise BaseModelError(
            f"weights for {name}:{tag} are not in the local cache (cache_dir={cache_dir!r}, "
            f"source {where}) and offline mode is on (HF_HUB_OFFLINE); download them once online "
            f"or pass a checkpoint path"
        )
    down = None if cached is not None else _unreachable(tag_cfg)
    if down is not None:
        raise BaseModelError(
            f"weights for {name}:{tag} are not in the local cache (cache_dir={cache_dir!r}) and the "
            f"download failed at once: {down}; download them once online (or set HF_HUB_OFFLINE=1 "
            f"to look only at the cache) or pass a checkpoint path"
        )
    try:
        # OpenAI-trained tags use QuickGELU; build the architecture they were trained with.
        return open_clip.create_model(
            name, pretrained=source, cache_dir=cache_dir, device="cpu", require_pretrained=True,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
    except Exception as e:
        raise BaseModelError(
            f"could not get pretrained weights {name}:{tag} (cache_dir={cache_dir!r}"
            f"{', offline' if _offline() else ''}): {e}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Transforms and tokenizer


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def _preprocess_cfg(model: nn.Module, tag_cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    cfg.update({k: v for k, v in getattr(model.visual, "preprocess_cfg", {}).items() if v is not None})
    cfg.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    return cfg


def _transforms(image_size: int, pp: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """(train, eval) transforms: the recipe's augmentation, and open_clip's eval transform."""
    mean, std = tuple(pp["mean"]), tuple(pp["std"])
    train = transforms.Compose([
        _to_rgb,
        transforms.RandomResizedCrop(
            image_size, scale=(0.08, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    evaluate = open_clip.image_transform(
        image_size, is_train=False, mean=mean, std=std,
        interpolation=pp.get("interpolation"), resize_mode=pp.get("resize_mode"),
    )
    return train, evaluate


def _tokenizer(name: str, cfg: Mapping[str, Any], cache_dir: str | None) -> Callable[..., torch.Tensor]:
    text_cfg = cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", 77))
    if name in open_clip.list_models():
        return open_clip.get_tokenizer(name, context_length=ctx, cache_dir=cache_dir)
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx,
                                     **(text_cfg.get("tokenizer_kwargs") or {}))
    return open_clip.SimpleTokenizer(context_length=ctx)


def _image_size(model: nn.Module, cfg: Mapping[str, Any]) -> int:
    size = getattr(model.visual, "image_size", None) or cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise BaseModelError(f"non-square image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


# --------------------------------------------------------------------------------------------------
# Loading


def _create(spec: str, cache_dir: str | None) -> tuple[nn.Module, dict[str, Any], str, str, dict[str, Any]]:
    """(model on CPU, its config, NAME, weights source, tag preprocess config)."""
    name, pretrained = parse_spec(spec)
    if name.startswith(_SCHEMAS):
        try:
            model = open_clip.create_model(name, cache_dir=cache_dir, device="cpu", require_pretrained=True)
        except Exception as e:
            raise BaseModelError(f"could not load {name!r} through open_clip: {e}") from None
        return model, {}, name, name, {}
    if pretrained is None:
        return _create_single(name)
    cfg = _resolve_config(name)
    if pretrained == RANDOM:
        return _build_random(cfg), cfg, name, RANDOM, {}
    if os.path.isfile(pretrained):
        state, _ = _read_checkpoint(pretrained)
        model = _build(cfg)
        _load_state(model, state, pretrained)
        return model, cfg, name, pretrained, {}
    tags = _tags(name)
    if pretrained in tags:
        return _from_tag(name, pretrained, cache_dir), cfg, name, pretrained, \
            dict(open_clip.get_pretrained_cfg(name, pretrained))
    raise _bad_pretrained(name, pretrained, tags)


def _create_single(path: str) -> tuple[nn.Module, dict[str, Any], str, str, dict[str, Any]]:
    """A spec without PRETRAINED: a checkpoint carrying its config, else an error."""
    if not os.path.isfile(path):
        if _known_name(path):
            tags = _tags(path)
            hint = f"{path}:{tags[0]} (tags: {', '.join(tags)}) or " if tags else ""
            raise BaseModelError(f"no weights given for {path!r}; use {hint}{path}:random or "
                                 f"{path}:/path/to/checkpoint.pt")
        raise _unknown_name_error(path)
    if path.endswith(".json"):
        raise BaseModelError(f"no weights given for config {path!r}; use {path}:random or "
                             f"{path}:/path/to/checkpoint.pt")
    state, raw = _read_checkpoint(path)
    if raw is None:
        raise BaseModelError(f"checkpoint {path!r} carries no model config under 'config'; "
                             f"use NAME:{path} with an open_clip name or config JSON")
    cfg = _normalise_config(raw, f"the config in checkpoint {path!r}")
    model = _build(cfg)
    _load_state(model, state, path)
    pp = raw.get("preprocess_cfg") if "model_cfg" in raw else None  # the open_clip_config.json layout
    return model, cfg, path, path, dict(pp) if isinstance(pp, Mapping) else {}


def _bad_pretrained(name: str, pretrained: str, tags: list[str]) -> BaseModelError:
    if os.sep in pretrained or "." in pretrained:
        return BaseModelError(f"checkpoint file not found: {pretrained!r} (spec {name}:{pretrained})")
    known = f"known tags for {name}: {', '.join(tags)}" if tags else f"{name} has no pretrained tags"
    return BaseModelError(f"{pretrained!r} is neither a pretrained tag, an existing checkpoint file nor "
                          f"'random' ({known})")


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model = use_plain_attention(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


_CACHE: dict[tuple[str, str], BaseModel] = {}
_CACHE_LOCK = threading.Lock()  # guards the two dicts
_KEY_LOCKS: dict[tuple[str, str], threading.Lock] = {}  # one load at a time per (spec, device)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(
    spec: str, device: str | torch.device | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> BaseModel:
    """Load (once per process and device) the base model named by `spec`; see the module doc."""
    dev = torch.device(device) if device is not None else _default_device()
    key = (spec, str(dev))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # a slow download of one spec does not block the others
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
        if cached is not None:
            return cached
        base = _load_uncached(spec, dev, os.fspath(cache_dir) if cache_dir is not None else None)
        with _CACHE_LOCK:
            _CACHE[key] = base
        return base


def _load_uncached(spec: str, device: torch.device, cache_dir: str | None) -> BaseModel:
    model, cfg, name, weights, tag_cfg = _create(spec, cache_dir)
    if not cfg:
        cfg = {"vision_cfg": {}, "text_cfg": {"context_length": getattr(model, "context_length", 77)}}
    image_size = _image_size(model, cfg)
    pp = _preprocess_cfg(model, tag_cfg)
    train, evaluate = _transforms(image_size, pp)
    tokenizer = (open_clip.get_tokenizer(name, cache_dir=cache_dir) if name.startswith(_SCHEMAS)
                 else _tokenizer(name, cfg, cache_dir))
    model = _prepare(model, device)
    return BaseModel(
        spec=spec, model=model, preprocess_train=train, preprocess_eval=evaluate, tokenizer=tokenizer,
        fingerprint=weights_fingerprint(model), device=device, image_size=image_size, config=cfg,
        weights=weights, preprocess_cfg=_public_preprocess(pp, image_size),
    )


def _public_preprocess(pp: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """The eval preprocessing as JSON-ready open_clip PreprocessCfg fields."""
    out: dict[str, Any] = {"size": image_size, "mean": [float(m) for m in pp["mean"]],
                           "std": [float(s) for s in pp["std"]]}
    for k in ("interpolation", "resize_mode"):
        if pp.get(k) is not None:
            out[k] = str(pp[k])
    return out


def clear_cache() -> None:
    """Forget every loaded base model (tests; freeing memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
