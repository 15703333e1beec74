"""Stored files are reference-safe: deleting one tenant's data while another uploads the same content
(real concurrent requests against one app) never removes a file a committed row needs."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import Image as ImageRow
from app.models import ObjectPin
from app.services import objects
from app.storage import LocalStorage


@contextmanager
def paused_after_writes(monkeypatch: pytest.MonkeyPatch, files: int) -> Iterator[tuple[Any, Any]]:
    """Make the next upload stop once it wrote `files` files, before its rows are committed:
    yields (written, resume) events. (Requests run in the server's thread pool.)"""
    written, resume = threading.Event(), threading.Event()
    real_put = LocalStorage.put
    count = [0]

    def put(self: LocalStorage, data: bytes) -> str:
        key = real_put(self, data)
        count[0] += 1
        if count[0] == files:
            written.set()
            assert resume.wait(30)
        return key

    monkeypatch.setattr(LocalStorage, "put", put)
    yield written, resume


def _images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), (i * 40 % 256, 7, 200)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _run(target: Any, name: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=target()), name=name)
    t.start()
    return t, result


def test_delete_during_another_tenants_upload_of_the_same_images_loses_nothing(
    api, make_key, settings: Settings, monkeypatch
) -> None:
    from tests.app.conftest import Api

    tenant_b = Api(api.client, make_key("b"))
    blobs = _images(3)
    ds_b = tenant_b.dataset()
    assert tenant_b.upload(ds_b["id"], "cat", *blobs).status_code == 201
    ds_a = api.dataset()
    with paused_after_writes(monkeypatch, 3) as (written, resume):
        t, result = _run(lambda: api.upload(ds_a["id"], "cat", *blobs), "upload-a")
        assert written.wait(30)
        # B deletes its dataset while A's files are written but A's rows are not committed.
        r_del = tenant_b.client.delete(f"/v1/datasets/{ds_b['id']}", headers=tenant_b.headers)
        assert r_del.status_code == 204
        resume.set()
        t.join(30)
    r = result["r"]
    assert r.status_code == 201 and len(r.json()["added"]) == 3, r.text
    storage = LocalStorage(settings.storage_dir)
    engine_keys = _keys_of(settings, ds_a["id"])
    assert len(engine_keys) == 3
    for key in engine_keys:  # every image of the 201 is there and decodes
        with Image.open(io.BytesIO(storage.get(key))) as im:
            im.load()


def _keys_of(settings: Settings, dataset_id: str) -> list[str]:
    from app.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(select(ImageRow.storage_key).where(ImageRow.dataset_id == dataset_id)))
    finally:
        engine.dispose()


def test_dataset_deleted_during_its_own_upload_gives_404_and_leaves_no_files(
    api, settings: Settings, monkeypatch
) -> None:
    ds = api.dataset()
    with paused_after_writes(monkeypatch, 2) as (written, resume):
        t, result = _run(lambda: api.upload(ds["id"], "cat", *_images(2)), "upload")
        assert written.wait(30)
        assert api.client.delete(f"/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204
        resume.set()
        t.join(30)
    body = api.problem(result["r"], 404)
    assert "deleted" in body["detail"]
    root = settings.storage_dir
    assert not [p for p in root.rglob("*") if p.is_file()] if root.exists() else True


def test_pins_keep_files_until_released_and_lapse(engine, settings: Settings) -> None:
    storage = LocalStorage(settings.storage_dir)
    with Session(engine) as session:
        key = objects.put(session=session, storage=storage, data=b"shared delta",  # pinned, no row
                          ttl_s=settings.object_pin_ttl_s)
        assert objects.remove_unreferenced(session=session, storage=storage, keys=[key]) == 0
        assert storage.exists(key)
        pin_id = session.scalar(select(ObjectPin.pin_id).where(ObjectPin.key == key))
        assert pin_id is not None
        objects.unpin(session=session, pin_id=pin_id)
        session.commit()
        assert objects.remove_unreferenced(session=session, storage=storage, keys=[key]) == 1
        assert not storage.exists(key)
        # A writer that died: its pin lapses and the next collection removes the orphan file.
        key = objects.put(session=session, storage=storage, data=b"orphan", ttl_s=-1)
        assert objects.remove_unreferenced(session=session, storage=storage, keys=[]) == 1
        assert not storage.exists(key)
        assert session.scalar(select(ObjectPin.id)) is None


def test_delete_model_keeps_a_delta_that_a_pending_zeroshot_pinned(
    api, make_key, settings: Settings, monkeypatch
) -> None:
    """Tenant A's zero-shot model writes the same delta file as tenant B's; B deletes its model
    while A's file is written but A's row not yet committed: A's file must stay."""
    import json

    import app.services.inference as inference
    import app.services.models as models
    from sparseshot.delta import SparseDelta
    from tests.app.conftest import Api

    class SmallDelta(SparseDelta):
        def to_bytes(self) -> bytes:  # the same bytes for the same classes (a shared file)
            return json.dumps(self.meta, sort_keys=True).encode()

    monkeypatch.setattr(inference, "zeroshot_delta", lambda *, bases, classes, base_model, template:
                        SmallDelta({"classes": classes, "base": base_model}))
    calls = [0]
    written, resume = threading.Event(), threading.Event()
    store = models.store_delta

    def slow_store(**kw):
        key = store(**kw)
        calls[0] += 1
        if calls[0] == 2:  # tenant A's request, the second: pause between file and row
            written.set()
            assert resume.wait(30)
        return key

    monkeypatch.setattr(models, "store_delta", slow_store)
    tenant_b = Api(api.client, make_key("b"))
    body = {"classes": ["cat", "dog"]}
    model_b = tenant_b.client.post("/v1/models/zeroshot", json=body, headers=tenant_b.headers).json()
    t, result = _run(lambda: api.client.post("/v1/models/zeroshot", json=body, headers=api.headers),
                     "zeroshot-a")
    assert written.wait(30)
    assert tenant_b.client.delete(f"/v1/models/{model_b['id']}", headers=tenant_b.headers).status_code == 204
    resume.set()
    t.join(30)
    model_a = result["r"].json()
    assert model_a["id"] != model_b["id"]
    r = api.client.get(f"/v1/models/{model_a['id']}/delta", headers=api.headers)
    assert r.status_code == 200 and json.loads(r.content)["classes"] == ["cat", "dog"]
