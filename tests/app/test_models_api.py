"""Models through the API: zero-shot creation, reading, delta download, classify, deletion.

The inference service is replaced by small stand-ins (it has its own tests); these check the
HTTP contract around it.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

import app.services.inference as inference
from app.core.config import Settings
from app.models import Job, Model
from app.storage import get_storage
from sparseshot.delta import SparseDelta


@pytest.fixture
def fake_inference(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> list[dict]:
    """Zero-shot deltas are small files; classify ranks classes by a fixed score."""
    calls: list[dict] = []

    class SmallDelta(SparseDelta):
        """Bytes that depend only on the meta (safetensors' header order is not fixed)."""

        def to_bytes(self) -> bytes:
            return json.dumps(self.meta, sort_keys=True).encode()

    def zeroshot_delta(*, bases, classes, base_model, template):
        return SmallDelta({"classes": classes, "base": base_model, "template": template, "created_at": "-"})

    def classify(*, model, images, top_k, storage, serving):
        calls.append({"model": model.id, "n": len(images), "top_k": top_k})
        scores = [0.6, 0.3, 0.1][: len(model.classes)]
        labels = [{"label": c, "score": s} for c, s in zip(model.classes, scores, strict=False)][:top_k]
        return [{"filename": name, "labels": labels} for name, _img in images]

    monkeypatch.setattr(inference, "zeroshot_delta", zeroshot_delta)
    monkeypatch.setattr(inference, "classify", classify)
    return calls


def _zeroshot(api, classes=("cat", "dog", "bird"), **extra) -> dict:
    r = api.client.post("/v1/models/zeroshot", json={"classes": list(classes), **extra}, headers=api.headers)
    assert r.status_code == 201, r.text
    return r.json()


def _classify(api, model_id: str, *blobs: bytes, top_k: int | None = None):
    files = [("files", (f"q{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    data = {"top_k": str(top_k)} if top_k is not None else {}
    return api.client.post(f"/v1/models/{model_id}/classify", files=files, data=data, headers=api.headers)


def test_zeroshot_model_read_list_and_download(api, fake_inference, settings: Settings) -> None:
    model = _zeroshot(api, template="a photo of a {}.")
    assert model["method"] == "zeroshot" and model["status"] == "ready"
    assert model["classes"] == ["cat", "dog", "bird"] and model["base_model"] == "sparseshot-tiny:random"
    assert set(model["delta"]) == {"nnz", "bytes", "density"} and model["created_at"]
    assert api.client.get(f"/v1/models/{model['id']}", headers=api.headers).json() == model
    assert [m["id"] for m in api.client.get("/v1/models", headers=api.headers).json()] == [model["id"]]
    r = api.client.get(f"/v1/models/{model['id']}/delta", headers=api.headers)
    assert r.status_code == 200
    assert f"{model['id']}.safetensors" in r.headers["content-disposition"]
    assert len(r.content) == model["delta"]["bytes"]


def test_zeroshot_input_checks(api, fake_inference) -> None:
    post = lambda body: api.client.post("/v1/models/zeroshot", json=body, headers=api.headers)  # noqa: E731
    api.problem(post({"classes": ["cat"]}), 422)
    api.problem(post({"classes": ["cat", "cat"]}), 422)
    api.problem(post({"classes": ["cat", "dog"], "template": "no placeholder"}), 422)
    api.problem(post({"classes": ["cat", "dog"], "base_model": "other:model"}), 422)


def test_zeroshot_records_the_default_template(api, fake_inference) -> None:
    assert _zeroshot(api)["template"] == "a photo of a {}."


def test_classify_returns_sorted_scores(api, fake_inference) -> None:
    model = _zeroshot(api)
    r = _classify(api, model["id"], api.image((1, 0, 0)), api.image((0, 1, 0), fmt="JPEG"), top_k=2)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == ["q0.png", "q1.png"]
    for p in preds:
        scores = [x["score"] for x in p["labels"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and sum(scores) <= 1
    assert fake_inference[-1] == {"model": model["id"], "n": 2, "top_k": 2}
    assert _classify(api, model["id"], api.image(), top_k=50).status_code == 200
    assert fake_inference[-1]["top_k"] == 3  # capped at the number of classes
    assert _classify(api, model["id"], api.image()).status_code == 200
    assert fake_inference[-1]["top_k"] == 3  # default 5, capped


def test_classify_bad_input(api, fake_inference) -> None:
    model = _zeroshot(api)
    body = api.problem(_classify(api, model["id"], api.image(), b"nope"), 422)
    assert body["rejected"] == [{"filename": "q1.png", "detail": body["rejected"][0]["detail"]}]
    api.problem(_classify(api, model["id"], api.image(), top_k=0), 422)
    api.problem(_classify(api, model["id"], api.image(), top_k=1000), 422)
    api.problem(_classify(api, model["id"], *[api.image((i, 0, 0)) for i in range(5)]), 413)
    api.problem(api.client.post(f"/v1/models/{model['id']}/classify", headers=api.headers), 422)
    api.problem(_classify(api, "00000000-0000-0000-0000-000000000000", api.image()), 404)
    assert fake_inference == []


def test_classify_on_model_not_ready_is_409(
    api, fake_inference, engine, settings: Settings, monkeypatch
) -> None:
    model = _zeroshot(api)
    with Session(engine) as s:
        s.execute(update(Model).where(Model.id == model["id"]).values(status="pending"))
        s.commit()
    assert "not ready" in api.problem(_classify(api, model["id"], api.image()), 409)["detail"]
    with Session(engine) as s:
        s.execute(update(Model).where(Model.id == model["id"]).values(status="ready"))
        s.commit()

    from app.errors import ModelNotReady

    def not_loaded(**_kw):
        raise ModelNotReady("base model is still loading")

    monkeypatch.setattr(inference, "classify", not_loaded)
    assert "loading" in api.problem(_classify(api, model["id"], api.image()), 409)["detail"]
    # A missing delta file: the model cannot be served or downloaded.
    get_storage(settings).delete(_delta_key(engine, model["id"]))
    api.problem(_classify(api, model["id"], api.image()), 409)
    api.problem(api.client.get(f"/v1/models/{model['id']}/delta", headers=api.headers), 409)


def _delta_key(engine, model_id: str) -> str:
    with Session(engine) as s:
        return s.get(Model, model_id).delta_key


def test_delete_model_keeps_shared_delta_and_detaches_jobs(api, fake_inference, engine, settings) -> None:
    a = _zeroshot(api)
    b = _zeroshot(api)  # same classes and template: same content-addressed delta
    key = _delta_key(engine, a["id"])
    assert key == _delta_key(engine, b["id"])
    ds = api.ready_dataset()
    job = api.job(ds["id"]).json()
    with Session(engine) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded", model_id=a["id"]))
        s.commit()
    storage = get_storage(settings)
    assert api.client.delete(f"/v1/models/{a['id']}", headers=api.headers).status_code == 204
    assert storage.exists(key)
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers).json()["model_id"] is None
    assert api.client.delete(f"/v1/models/{b['id']}", headers=api.headers).status_code == 204
    assert not storage.exists(key)
    api.problem(api.client.get(f"/v1/models/{a['id']}", headers=api.headers), 404)


def test_other_tenants_models_are_404(api, fake_inference, make_key) -> None:
    model = _zeroshot(api)
    other = make_key("globex")
    for method, path in [
        ("get", f"/v1/models/{model['id']}"),
        ("get", f"/v1/models/{model['id']}/delta"),
        ("delete", f"/v1/models/{model['id']}"),
    ]:
        api.problem(api.client.request(method, path, headers=other), 404)
    files = [("files", ("a.png", api.image(), "image/png"))]
    api.problem(api.client.post(f"/v1/models/{model['id']}/classify", files=files, headers=other), 404)
    assert api.client.get("/v1/models", headers=other).json() == []


def test_serving_failures_map_to_409_and_503(api, fake_inference, monkeypatch) -> None:
    from app.services.scheduler import QueueFull
    from app.storage import StorageError
    from sparseshot.base import BaseModelError
    from sparseshot.delta import DeltaError

    model = _zeroshot(api)

    def raiser(exc: Exception):
        def fail(**_kw):
            raise exc

        return fail

    monkeypatch.setattr(inference, "classify", raiser(DeltaError("checksum mismatch")))
    assert "checksum" in api.problem(_classify(api, model["id"], api.image()), 409)["detail"]
    monkeypatch.setattr(inference, "classify", raiser(BaseModelError("no weights")))
    api.problem(_classify(api, model["id"], api.image()), 503)
    monkeypatch.setattr(inference, "classify", raiser(QueueFull("512 images are queued")))
    r = _classify(api, model["id"], api.image())
    assert "busy" in api.problem(r, 503)["detail"] and r.headers["Retry-After"] == "1"
    monkeypatch.setattr(inference, "classify", raiser(StorageError("gone")))
    api.problem(_classify(api, model["id"], api.image()), 409)
    monkeypatch.setattr(inference, "zeroshot_delta", raiser(BaseModelError("no weights")))
    r = api.client.post("/v1/models/zeroshot", json={"classes": ["a", "b"]}, headers=api.headers)
    api.problem(r, 503)
    assert [m["id"] for m in api.client.get("/v1/models", headers=api.headers).json()] == [model["id"]]


def test_base_unavailable_while_serving_is_503_not_409(api, fake_inference, monkeypatch) -> None:
    """Through the real serving path: the base failing to load is the server's problem (503)."""
    from sparseshot.base import BaseModelError

    model = _zeroshot(api)
    monkeypatch.undo()  # the real inference.classify

    def no_base(spec=None):
        raise BaseModelError("weights not in the cache")

    monkeypatch.setattr(api.client.app.state.runtime.bases, "get", no_base)
    r = _classify(api, model["id"], api.image())
    assert "base model" in api.problem(r, 503)["detail"] and "Retry-After" in r.headers
