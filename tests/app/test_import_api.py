"""POST /v1/models/import: a delta file for this server's base becomes a ready model; bad files are
refused with a clear 4xx and nothing is stored. Served for real on the tiny base."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from app.core.config import Settings
from app.services.bases import BaseRegistry
from sparseshot.classifier import class_text_embeddings
from sparseshot.delta import SparseDelta

CLASSES = ["cat", "dog", "boat"]


def _delta(bases: BaseRegistry, *, fingerprint: str | None = None, embeddings: bool = True) -> SparseDelta:
    """An SO-like delta over the app's (tiny) base: a few entries of two vision matrices changed."""
    base = bases.get()
    g = torch.Generator().manual_seed(0)
    adapted = copy.deepcopy(base.model)
    state = adapted.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in ("visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj"):
            flat = state[name].view(-1)
            flat[torch.randperm(flat.numel(), generator=g)[:30]] += 0.5
    meta = {"base_model": base.spec, "base_fingerprint": fingerprint or base.fingerprint,
            "classes": CLASSES, "template": "a photo of a {}.", "method": "so"}
    delta = SparseDelta.from_models(base.model, adapted, meta=meta)
    if embeddings:
        delta.extras["class_embeddings"] = class_text_embeddings(adapted, base.tokenizer, CLASSES)
    return delta


def _import(api, data: bytes, name: str | None = None):
    files = {"delta": ("model.safetensors", data, "application/octet-stream")}
    return api.client.post("/v1/models/import", files=files, data={"name": name} if name else {},
                           headers=api.headers)


def _stored(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.storage_dir.rglob("*") if p.is_file())


def test_import_makes_a_ready_model_that_classifies(api, runtime, settings: Settings) -> None:
    data = _delta(runtime.bases).to_bytes()
    r = _import(api, data, name="pets v2")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["status"] == "ready" and model["name"] == "pets v2" and model["method"] == "so"
    assert model["classes"] == CLASSES and model["base_model"] == settings.base_model
    assert model["delta"]["bytes"] == len(data) and model["delta"]["nnz"] == 60
    down = api.client.get(f"/v1/models/{model['id']}/delta", headers=api.headers)
    assert down.content == data  # the same file round-trips
    files = [("files", ("q.png", api.image((0, 200, 0)), "image/png"))]
    r = api.client.post(f"/v1/models/{model['id']}/classify", files=files, data={"top_k": "3"},
                        headers=api.headers)
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert {lab["label"] for lab in pred["labels"]} == set(CLASSES)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_bad_files_are_refused_and_nothing_is_stored(api, runtime, settings: Settings) -> None:
    good = _delta(runtime.bases).to_bytes()
    cases = {
        "garbage": (b"definitely not a delta", 422, "not a valid"),
        "truncated": (good[: len(good) // 2], 422, "truncated"),
        "tampered": (_flip(good, len(good) - 10), 422, "checksum"),
        "other base": (_delta(runtime.bases, fingerprint="ab" * 32).to_bytes(), 422, "another base"),
        "no embeddings": (_delta(runtime.bases, embeddings=False).to_bytes(), 422, "class_embeddings"),
        "empty": (b"", 422, "not a valid"),
    }
    before = _stored(settings)
    for label, (data, status, words) in cases.items():
        body = api.problem(_import(api, data), status)
        assert words in body["detail"], (label, body["detail"])
    settings.max_delta_bytes = len(good) - 1
    assert "limit" in api.problem(_import(api, good), 413)["detail"]
    assert _stored(settings) == before
    assert api.client.get("/v1/models", headers=api.headers).json() == []
    api.problem(api.client.post("/v1/models/import", headers=api.headers), 422)  # no file at all
