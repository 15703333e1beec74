"""sparseshot.export: the merged checkpoint loads alone (sparseshot and open_clip) and the ONNX
classifier run by onnxruntime gives the serving engine's probabilities; the base is never written."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from sparseshot.base import BaseModel, load_base
from sparseshot.classifier import class_text_embeddings
from sparseshot.delta import DeltaError, SparseDelta, weights_fingerprint
from sparseshot.export import (
    CHECKPOINT_FORMAT,
    ExportError,
    checkpoint_classifier,
    merged_checkpoint,
    onnx_classes,
    onnx_export,
    read_checkpoint_info,
)
from sparseshot.serving import ServingEngine, prepare

CLASSES = ["red", "green", "blue", "grey"]
COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 230), (128, 128, 128)]


def images(seed: int = 0, per_colour: int = 2) -> list[Image.Image]:
    """Noisy solid-colour images (16×20 px, resized by the eval transform), `per_colour` of each."""
    g = np.random.default_rng(seed)
    out = []
    for colour in COLOURS:
        for _ in range(per_colour):
            noise = g.integers(-25, 26, size=(20, 16, 3))
            out.append(Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype("uint8")))
    return out


def prototype_delta(base: BaseModel, classes: Sequence[str] = CLASSES, seed: int = 0) -> SparseDelta:
    """A delta over both towers (sparse entries, a dense-ish vision tensor, a low-rank block) whose
    class embeddings are the adapted features of one image per colour, so predictions vary."""
    g = torch.Generator().manual_seed(seed)
    adapted = copy.deepcopy(base.model)
    state = adapted.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in state.items():
            if name.endswith(("in_proj_weight", "c_fc.weight", "out_proj.weight")):
                flat = t.view(-1)
                flat[torch.randperm(flat.numel(), generator=g)[:60]] += 0.4
        state["visual.ln_post.bias"] += 0.1 * torch.randn(state["visual.ln_post.bias"].shape, generator=g)
    meta = {"base_model": base.spec, "base_fingerprint": base.fingerprint, "classes": list(classes),
            "template": "a photo of a {}.", "method": "so"}
    delta = SparseDelta.from_models(base.model, adapted, meta=meta)
    name = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    rows, cols = state[name].shape
    B, A = 0.2 * torch.randn(8, 2, generator=g), torch.randn(2, cols, generator=g)
    delta.add_lowrank(name, 4, B, A, 1.0, param_numel=rows * cols)
    with torch.no_grad():
        state[name][4:12] += B @ A
        protos = torch.stack([base.preprocess_eval(im) for im in images(seed=99, per_colour=1)])
        feats = adapted.encode_image(protos)  # (C, D)
    delta.extras["class_embeddings"] = F.normalize(feats + 0.01 * class_text_embeddings(
        adapted, base.tokenizer, list(classes)), dim=-1)
    return delta


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base("sparseshot-tiny:random", device="cpu")


@pytest.fixture(scope="module")
def delta(base: BaseModel) -> SparseDelta:
    return prototype_delta(base)


def _pixels(base: BaseModel) -> torch.Tensor:
    return torch.stack([base.preprocess_eval(im) for im in images()])  # (8, 3, S, S)


def _served(base: BaseModel, delta: SparseDelta | None, pixels: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities as the service computes them (ServingEngine over the shared base)."""
    prepared = prepare(base, delta, classes=CLASSES)
    return ServingEngine(base).probabilities(pixels, [(prepared, len(pixels))])[0]


def test_merged_checkpoint_loads_alone_and_scores_as_the_service(base, delta, tmp_path: Path) -> None:
    before = weights_fingerprint(base.model)
    path = tmp_path / "merged.safetensors"
    data = merged_checkpoint(base, delta, path)
    assert path.read_bytes() == data
    assert weights_fingerprint(base.model) == before  # the shared base was only read

    clf = checkpoint_classifier(path, device="cpu")  # load_base(path) + the file's classes
    assert clf.classes == CLASSES and clf.base.weights == str(path)
    assert clf.base.preprocess_cfg == base.preprocess_cfg
    pixels = _pixels(base)
    served = _served(base, delta, pixels)
    got = clf.probabilities(list(pixels))
    assert torch.equal(got.argmax(1), served.argmax(1))
    torch.testing.assert_close(got, served, atol=1e-5, rtol=1e-4)
    assert len(set(served.argmax(1).tolist())) > 1  # predictions vary: top-1 agreement means something
    bare = _served(base, SparseDelta(meta=delta.meta | {"classes": CLASSES}), pixels)
    assert (bare - served).abs().max() > 1e-3  # and the weights in the file are the adapted ones

    merged = {k: v for k, v in clf.base.model.state_dict().items()}
    own = base.model.state_dict()
    for name in own:
        want = delta.adapted_tensor(name, own[name]) if name in delta.names else own[name]
        assert torch.equal(merged[name], want), name


def test_merged_checkpoint_metadata_and_open_clip_alone(base, delta, tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    merged_checkpoint(base, delta, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    assert set(config) == {"model_cfg", "preprocess_cfg"} and config["model_cfg"] == base.config
    info = read_checkpoint_info(path)
    assert info.meta["format"] == CHECKPOINT_FORMAT and info.meta["base_fingerprint"] == base.fingerprint
    torch.testing.assert_close(info.class_embeddings, prepare(base, delta).class_embeddings, atol=0, rtol=0)

    # open_clip's own loader, given the file and its config as a model folder
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(meta["config"])
    shutil.copy(path, folder / "open_clip_model.safetensors")
    model = open_clip.create_model(f"local-dir:{folder}", device="cpu").eval()
    pixels = _pixels(base)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(pixels), dim=-1)
    probs = (model.logit_scale.exp() * feats @ info.class_embeddings.T).softmax(-1)
    torch.testing.assert_close(probs, _served(base, delta, pixels), atol=1e-5, rtol=1e-4)


def test_onnx_export_matches_the_service(base, delta, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    before = weights_fingerprint(base.model)
    data = onnx_export(base, delta, tmp_path / "model.onnx")
    assert weights_fingerprint(base.model) == before
    assert (tmp_path / "model.onnx").read_bytes() == data
    assert onnx_classes(data) == CLASSES == onnx_classes(tmp_path / "model.onnx")
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert json.loads(props["preprocess"]) == base.preprocess_cfg
    assert props["base_fingerprint"] == base.fingerprint and props["template"] == "a photo of a {}."

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("pixels", "probabilities")
    assert inp.shape[1:] == [3, base.image_size, base.image_size] and isinstance(inp.shape[0], str)
    pixels = _pixels(base)
    served = _served(base, delta, pixels)
    for rows in (slice(0, 1), slice(0, 8)):  # the batch axis is dynamic
        (probs,) = session.run(None, {"pixels": pixels[rows].numpy()})
        assert probs.shape == (len(pixels[rows]), len(CLASSES))
        assert np.array_equal(probs.argmax(1), served[rows].argmax(1).numpy())
        np.testing.assert_allclose(probs, served[rows].numpy(), atol=1e-5, rtol=1e-4)


def test_what_cannot_be_exported_is_refused(base, delta, tmp_path: Path, monkeypatch) -> None:
    other = SparseDelta.from_bytes(delta.to_bytes())
    other.meta["base_fingerprint"] = "0" * 64
    for export in (merged_checkpoint, onnx_export):
        with pytest.raises(DeltaError, match="base model mismatch"):
            export(base, other)
    no_config = dataclasses.replace(base, config={"vision_cfg": {}, "text_cfg": {"context_length": 16}})
    with pytest.raises(ExportError, match="no open_clip model config"):  # an hf-hub:/local-dir: base
        merged_checkpoint(no_config, delta)
    with monkeypatch.context() as m:  # a tower over the 2 GB one ONNX file holds (ViT-H and larger)
        m.setattr("sparseshot.export.ONNX_MAX_WEIGHT_BYTES", 1000)
        with pytest.raises(ExportError, match="over the 2 GB"):
            onnx_export(base, delta)
    plain = tmp_path / "plain.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ExportError, match="not a sparseshot merged checkpoint"):
        read_checkpoint_info(plain)
    with pytest.raises(ExportError, match="not a sparseshot ONNX export"):
        onnx_classes(b"")


def test_a_quick_gelu_base_keeps_its_activation(tmp_path: Path) -> None:
    """OpenAI tags are built with force_quick_gelu, which their config does not say: the export does."""
    from open_clip.transformer import QuickGELU

    cfg = {**load_base("sparseshot-tiny:random", device="cpu").config, "quick_gelu": True}
    (tmp_path / "qg.json").write_text(json.dumps(cfg))
    qg = load_base(f"{tmp_path / 'qg.json'}:random", device="cpu")
    plain_cfg = {k: v for k, v in cfg.items() if k != "quick_gelu"}
    as_tag = dataclasses.replace(qg, config=plain_cfg)  # as `_from_tag` leaves it
    path = tmp_path / "m.safetensors"
    merged_checkpoint(as_tag, prototype_delta(qg), path)
    reloaded = checkpoint_classifier(path, device="cpu").base
    assert reloaded.config["quick_gelu"] is True
    assert any(isinstance(m, QuickGELU) for m in reloaded.model.modules())
    pixels = torch.stack([qg.preprocess_eval(im) for im in images()])
    torch.testing.assert_close(checkpoint_classifier(path, device="cpu").probabilities(list(pixels)),
                               _served(qg, prototype_delta(qg), pixels), atol=1e-5, rtol=1e-4)
