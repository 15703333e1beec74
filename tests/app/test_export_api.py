"""GET /v1/models/{id}/export: the merged checkpoint and the ONNX file give the service's own
/classify answers; built once and stored beside the delta; tenant-scoped; 409 when not ready."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from sqlalchemy import update

from app import cli
from app.core.config import Settings
from app.db import SessionLocal
from app.models import Model, Tenant
from app.services import exports
from app.storage import LocalStorage
from sparseshot.client import Client, NotFound
from sparseshot.export import EXPORT_VERSION, checkpoint_classifier, onnx_classes
from tests.sparseshot.test_export import CLASSES, images, prototype_delta

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the export itself: one backend


def _import(api, settings: Settings) -> dict:
    bases = api.client.app.state.runtime.bases  # the app's registry
    data = prototype_delta(bases.get(settings.base_model)).to_bytes()
    files = {"delta": ("m.safetensors", data, "application/octet-stream")}
    r = api.client.post("/v1/models/import", files=files, headers=api.headers)
    assert r.status_code == 201, r.text
    return r.json()


def _sdk(api, headers: dict[str, str] | None = None) -> Client:
    key = (headers or api.headers)["Authorization"].split()[1]
    return Client("http://testserver", key, http=api.client)


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _classified(api, model_id: str, pngs: list[bytes]) -> np.ndarray:
    """(N, C) scores from POST /classify, columns in the model's class order."""
    files = [("files", (f"q{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = api.client.post(f"/v1/models/{model_id}/classify", files=files, data={"top_k": str(len(CLASSES))},
                        headers=api.headers)
    assert r.status_code == 200, r.text
    rows = [{lab["label"]: lab["score"] for lab in p["labels"]} for p in r.json()["predictions"]]
    return np.array([[row[c] for c in CLASSES] for row in rows])


@sqlite_only
def test_exports_give_the_service_answers(api, settings: Settings, tmp_path: Path) -> None:
    import onnxruntime as ort
    from PIL import Image

    model = _import(api, settings)
    pngs = [_png(im) for im in images(seed=3)]  # 8 images, sent 4 per request (the test settings' limit)
    served = np.concatenate([_classified(api, model["id"], pngs[i:i + 4]) for i in (0, 4)])
    assert len(set(served.argmax(1).tolist())) > 1  # varied predictions, so top-1 agreement tells
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    sdk = _sdk(api)

    # merged checkpoint: loaded alone, through sparseshot.load_base
    ckpt = sdk.export(model, "checkpoint", tmp_path)
    assert ckpt == tmp_path / f"{model['id']}-merged.safetensors"
    clf = checkpoint_classifier(ckpt, device="cpu")
    assert clf.classes == CLASSES
    probs = clf.probabilities(decoded).numpy()
    assert np.array_equal(probs.argmax(1), served.argmax(1))
    np.testing.assert_allclose(probs, served, atol=1e-5)

    # ONNX: preprocessing from its own metadata, run by onnxruntime
    onnx_path = sdk.export(model, "onnx", tmp_path)
    assert onnx_path.name == f"{model['id']}.onnx" and onnx_classes(onnx_path) == CLASSES
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pp = json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])
    transform = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"])
    pixels = torch.stack([transform(im) for im in decoded]).numpy()
    (onnx_probs,) = session.run(None, {"pixels": pixels})
    assert np.array_equal(onnx_probs.argmax(1), served.argmax(1))
    np.testing.assert_allclose(onnx_probs, served, atol=1e-5)

    # stored once beside the delta; later requests stream the stored file; gone with the model
    stored = sorted(p.name.split(".", 1)[1] for p in settings.storage_dir.rglob("*.*-*"))
    assert stored == [f"checkpoint-{EXPORT_VERSION}.safetensors", f"onnx-{EXPORT_VERSION}.onnx"]
    r = api.client.get(f"/v1/models/{model['id']}/export", params={"format": "onnx"}, headers=api.headers)
    assert r.status_code == 200 and r.content == onnx_path.read_bytes()
    assert f'filename="{model["id"]}.onnx"' in r.headers["content-disposition"]
    delta = sdk.export(model, "delta", tmp_path / "d.safetensors")
    assert delta.read_bytes() == sdk.download_delta(model, tmp_path / "d2.safetensors").read_bytes()
    sdk.delete_model(model)
    assert not [p for p in settings.storage_dir.rglob("*") if p.is_file()]


@sqlite_only
def test_an_export_is_built_once(api, settings: Settings, monkeypatch) -> None:
    model = _import(api, settings)
    calls = []
    fmt = exports.FORMATS["onnx"]
    monkeypatch.setitem(exports.FORMATS, "onnx", exports.Format(
        fmt.suffix, fmt.derived, lambda base, delta: calls.append(1) or b"onnx bytes"))
    for _ in range(2):
        r = api.client.get(f"/v1/models/{model['id']}/export?format=onnx", headers=api.headers)
        assert r.status_code == 200 and r.content == b"onnx bytes"
    assert calls == [1]


@sqlite_only
def test_a_model_deleted_while_its_export_is_built_leaves_no_file(api, settings: Settings, engine,
                                                                  monkeypatch) -> None:
    from app.services import models as models_svc
    from app.storage import get_storage

    model = _import(api, settings)

    def build_while_deleted(base, delta) -> bytes:
        with SessionLocal(bind=engine) as session:
            row = session.get(Model, model["id"])
            tenant = session.get(Tenant, row.tenant_id)
            models_svc.delete_model(session=session, storage=get_storage(settings), tenant=tenant,
                                    model_id=row.id)
        assert [p for p in settings.storage_dir.rglob("*") if p.is_file()]  # the pin keeps the delta
        return b"onnx bytes"

    fmt = exports.FORMATS["onnx"]
    monkeypatch.setitem(exports.FORMATS, "onnx", exports.Format(fmt.suffix, fmt.derived, build_while_deleted))
    r = api.client.get(f"/v1/models/{model['id']}/export?format=onnx", headers=api.headers)
    api.problem(r, 404)
    assert not [p for p in settings.storage_dir.rglob("*") if p.is_file()]  # delta and export both gone


def test_export_is_tenant_scoped_and_needs_a_ready_model(api, make_key, settings: Settings, engine,
                                                         tmp_path: Path) -> None:
    model = _import(api, settings)
    other = make_key("other")
    url = f"/v1/models/{model['id']}/export"
    for fmt in ("delta", "checkpoint", "onnx"):
        api.problem(api.client.get(url, params={"format": fmt}, headers=other), 404)
    api.problem(api.client.get(url, params={"format": "pickle"}, headers=api.headers), 422)
    api.problem(api.client.get(url, headers=api.headers), 422)  # the format is required
    with SessionLocal(bind=engine) as session:
        session.execute(update(Model).where(Model.id == model["id"]).values(status="training"))
        session.commit()
    for fmt in ("delta", "checkpoint", "onnx"):
        body = api.problem(api.client.get(url, params={"format": fmt}, headers=api.headers), 409)
        assert "not ready" in body["detail"]
    with SessionLocal(bind=engine) as session:
        row = session.get(Model, model["id"])
        row.status = "ready"
        LocalStorage(settings.storage_dir).path(row.delta_key).unlink()  # the delta file lost
        session.commit()
    body = api.problem(api.client.get(url, params={"format": "onnx"}, headers=api.headers), 409)
    assert "not available" in body["detail"]
    with pytest.raises(NotFound):
        _sdk(api, other).export(model, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@sqlite_only
def test_cli_export_formats(api, settings: Settings, tmp_path: Path, monkeypatch, capsys) -> None:
    model = _import(api, settings)
    monkeypatch.setattr(cli, "_client", lambda args: _sdk(api))
    assert cli.main(["models", "export", model["id"], "--format", "onnx", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == str(tmp_path / f"{model['id']}.onnx") and onnx_classes(Path(out)) == CLASSES
    assert cli.main(["models", "export", model["id"], "-o", str(tmp_path)]) == 0  # default: the delta
    assert capsys.readouterr().out.strip().endswith(f"{model['id']}.safetensors")


def test_format_names_agree() -> None:
    from typing import get_args

    from app.schemas import ExportFormat
    from sparseshot.client import EXPORT_SUFFIXES

    assert set(get_args(ExportFormat)) == set(exports.FORMATS) == set(EXPORT_SUFFIXES)
    assert {k: f.suffix for k, f in exports.FORMATS.items()} == EXPORT_SUFFIXES
