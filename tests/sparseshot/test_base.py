"""load_base: spec parsing, config/checkpoint/random sources, caching, transforms and clear errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparseshot.base import BaseModelError, clear_cache, load_base, parse_spec
from sparseshot.delta import weights_fingerprint
from sparseshot.sparse_grad import PlainAttention

TINY = "sparseshot-tiny"


def _tiny_cfg() -> dict:
    return json.loads(resources.files("sparseshot").joinpath("model_configs", f"{TINY}.json").read_text())


def _perturbed_state() -> dict[str, torch.Tensor]:
    """A tiny model's state dict that differs from the seeded random init."""
    base = load_base(f"{TINY}:random", device="cpu")
    g = torch.Generator().manual_seed(5)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.model.state_dict().items()}


def _assert_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_tiny_random() -> None:
    base = load_base(f"{TINY}:random", device="cpu")
    assert base.image_size == 32 and base.device == torch.device("cpu") and base.weights == "random"
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    attns = [m for m in base.model.modules() if isinstance(m, torch.nn.MultiheadAttention | PlainAttention)]
    assert attns and all(isinstance(m, PlainAttention) for m in attns)
    assert base.fingerprint == weights_fingerprint(base.model)
    assert base.tokenizer(["a photo of a cat."]).shape == (1, 16)
    image = Image.new("L", (57, 41), color=128)  # grey, odd size: converted and cropped
    assert base.preprocess_eval(image).shape == (3, 32, 32)
    assert base.preprocess_train(image).shape == (3, 32, 32)
    with torch.no_grad():
        feats = base.model.encode_image(base.preprocess_eval(image)[None])
    assert feats.shape == (1, 32)


def test_cached_and_deterministic() -> None:
    base = load_base(f"{TINY}:random", device="cpu")
    assert load_base(f"{TINY}:random", device="cpu") is base
    clear_cache()
    again = load_base(f"{TINY}:random", device="cpu")
    assert again is not base and again.fingerprint == base.fingerprint  # seeded random init


def test_checkpoint_path(tmp_path: Path) -> None:
    state = _perturbed_state()
    ckpt = tmp_path / "weights.pt"
    torch.save(state, ckpt)
    base = load_base(f"{TINY}:{ckpt}", device="cpu")
    _assert_weights(base.model, state)
    assert base.weights == str(ckpt) and base.fingerprint == weights_fingerprint(state)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    _assert_weights(load_base(f"{TINY}:{wrapped}", device="cpu").model, state)


def test_checkpoint_carrying_its_config(tmp_path: Path) -> None:
    state = _perturbed_state()
    ckpt = tmp_path / "self-describing.pt"
    torch.save({"model": state, "config": _tiny_cfg()}, ckpt)
    base = load_base(str(ckpt), device="cpu")
    _assert_weights(base.model, state)
    assert base.image_size == 32


def test_config_json_path(tmp_path: Path) -> None:
    folder = tmp_path / "run:1"  # a ':' inside the path
    folder.mkdir()
    cfg_path = folder / "my model.json"
    cfg_path.write_text(json.dumps(_tiny_cfg()))
    assert parse_spec(f"{cfg_path}:random") == (str(cfg_path), "random")
    base = load_base(f"{cfg_path}:random", device="cpu")
    assert base.fingerprint == load_base(f"{TINY}:random", device="cpu").fingerprint

    state = _perturbed_state()
    ckpt = folder / "w:2.pt"
    torch.save(state, ckpt)
    assert parse_spec(f"{cfg_path}:{ckpt}") == (str(cfg_path), str(ckpt))
    _assert_weights(load_base(f"{cfg_path}:{ckpt}", device="cpu").model, state)


def test_parse_spec() -> None:
    assert parse_spec("ViT-B-16:openai") == ("ViT-B-16", "openai")
    assert parse_spec("ViT-B-16") == ("ViT-B-16", None)
    assert parse_spec(f"{TINY}:random") == (TINY, "random")
    assert parse_spec("ViT-B-16:/no/such:file.pt") == ("ViT-B-16", "/no/such:file.pt")
    assert parse_spec("hf-hub:org/repo") == ("hf-hub:org/repo", None)


def test_unknown_name_lists_nearby_names() -> None:
    with pytest.raises(BaseModelError) as info:
        load_base("ViT-B-61:openai", device="cpu")
    msg = str(info.value)
    assert "'ViT-B-61'" in msg and "ViT-B-16" in msg
    with pytest.raises(BaseModelError, match="config file not found"):
        load_base("/no/such/config.json:random", device="cpu")


def test_missing_weights_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(BaseModelError, match="checkpoint file not found") as info:
        load_base(f"{TINY}:{missing}", device="cpu")
    assert str(missing) in str(info.value)


def test_weights_required(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="no weights given"):
        load_base(TINY, device="cpu")
    with pytest.raises(BaseModelError, match="openai") as info:
        load_base("ViT-B-32", device="cpu")
    assert "ViT-B-32:random" in str(info.value)
    plain = tmp_path / "plain.pt"
    torch.save(_perturbed_state(), plain)
    with pytest.raises(BaseModelError, match="carries no model config"):
        load_base(str(plain), device="cpu")


def test_bad_tag_and_mismatched_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="known tags for ViT-B-32: .*openai"):
        load_base("ViT-B-32:nosuchtag", device="cpu")
    state = _perturbed_state()
    del state["visual.proj"]
    state["extra.weight"] = torch.zeros(2)
    ckpt = tmp_path / "partial.pt"
    torch.save(state, ckpt)
    with pytest.raises(BaseModelError, match=r"does not match.*visual\.proj.*extra\.weight"):
        load_base(f"{TINY}:{ckpt}", device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BaseModelError, match="cannot read checkpoint"):
        load_base(f"{TINY}:{junk}", device="cpu")


def test_offline_tag_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="offline") as info:
        load_base("ViT-B-32:openai", device="cpu", cache_dir=str(tmp_path))
    assert "ViT-B-32:openai" in str(info.value) and str(tmp_path) in str(info.value)


def test_safetensors_checkpoint_with_config(tmp_path: Path) -> None:
    import safetensors.torch

    state = {k: v.contiguous() for k, v in _perturbed_state().items()}
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(state, path, metadata={"config": json.dumps(_tiny_cfg())})
    _assert_weights(load_base(str(path), device="cpu").model, state)
    _assert_weights(load_base(f"{TINY}:{path}", device="cpu").model, state)


def test_unreachable_download_host_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(BaseModelError, match="cannot be reached") as info:
        load_base("ViT-B-32:openai", device="cpu", cache_dir=str(tmp_path))
    assert f"127.0.0.1:{port}" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
