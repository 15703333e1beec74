"""Per-tenant limits (app/quotas.py) through the API on SQLite and PostgreSQL: 429 problem+json
naming the limit, its value and the usage; tenant overrides; the last slot taken only once under
concurrent requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app import quotas
from app.core.config import Settings
from app.errors import QuotaExceeded
from app.models import Image, Job, Tenant
from app.schemas import JobCreate
from app.services import jobs as jobs_svc
from tests.fakes import RecordingQueue

from .test_models_api import fake_inference  # noqa: F401  (fixture)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update=dict(max_queued_jobs=3, max_steps_per_job=100, max_images_per_dataset=3,
                                           max_models=5))


def _quota(api: Any, r: Any, limit: str, value: int, current: int) -> dict[str, Any]:
    body = api.problem(r, 429)
    assert body["type"].endswith("/quota-exceeded") and limit in body["detail"]
    assert (body["limit"], body["value"], body["current"]) == (limit, value, current)
    return body


def _set(engine: Engine, tenant: str, **values: int | None) -> None:
    with Session(engine) as s:
        quotas.set_limits(session=s, tenant_name=tenant, values=values)


def test_queued_jobs_limit_per_tenant_with_override(api, make_key, engine: Engine, enqueued) -> None:
    ds = api.ready_dataset()
    for _ in range(3):
        assert api.job(ds["id"], params={"n_iters": 3}).status_code == 202
    _quota(api, api.job(ds["id"], params={"n_iters": 3}), "max_queued_jobs", 3, 3)
    assert len(enqueued) == 3  # the refused job was neither stored nor sent
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3
    # Another tenant has its own count.
    other = type(api)(api.client, make_key("other"))
    assert other.job(other.ready_dataset()["id"], params={"n_iters": 3}).status_code == 202
    # A tenant override replaces the default; a finished job frees its slot.
    _set(engine, "acme", max_queued_jobs=4)
    assert api.job(ds["id"], params={"n_iters": 3}).status_code == 202
    _quota(api, api.job(ds["id"], params={"n_iters": 3}), "max_queued_jobs", 4, 4)
    job_id = enqueued[0]
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers).status_code == 202
    assert api.job(ds["id"], params={"n_iters": 3}).status_code == 202


def test_steps_limit_counts_n_iters_times_shots(api, engine: Engine) -> None:
    _set(engine, "acme", max_images_per_dataset=10, max_queued_jobs=10)
    ds = api.ready_dataset()  # 2 images, 2 classes: 1 shot
    assert api.job(ds["id"], params={"n_iters": 100}).status_code == 202
    _quota(api, api.job(ds["id"], params={"n_iters": 101}), "max_steps_per_job", 100, 101)
    assert api.upload(ds["id"], "cat", api.image((9, 9, 9))).status_code == 201
    assert api.upload(ds["id"], "dog", api.image((8, 8, 8))).status_code == 201  # 4 images: 2 shots
    body = _quota(api, api.job(ds["id"], params={"n_iters": 60}), "max_steps_per_job", 100, 120)
    assert "n_iters x shots" in body["detail"]
    _set(engine, "acme", max_steps_per_job=120)
    assert api.job(ds["id"], params={"n_iters": 60}).status_code == 202


def test_images_per_dataset_limit(api, engine: Engine, settings: Settings) -> None:
    ds = api.dataset()
    assert api.upload(ds["id"], "cat", api.image((1, 0, 0)), api.image((2, 0, 0))).status_code == 201
    # Two more would make 4 > 3: the whole request is refused, nothing stored is kept.
    before = set((settings.storage_dir).rglob("*"))
    r = api.upload(ds["id"], "dog", api.image((3, 0, 0)), api.image((4, 0, 0)))
    _quota(api, r, "max_images_per_dataset", 3, 2)
    assert {p for p in settings.storage_dir.rglob("*") if p.is_file()} == {p for p in before if p.is_file()}
    assert api.upload(ds["id"], "dog", api.image((3, 0, 0))).status_code == 201
    _quota(api, api.upload(ds["id"], "dog", api.image((5, 0, 0))), "max_images_per_dataset", 3, 3)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 3


def test_models_limit_counts_models_and_active_jobs(api, engine: Engine, fake_inference) -> None:  # noqa: F811
    _set(engine, "acme", max_models=2)
    ds = api.ready_dataset()
    assert api.job(ds["id"], params={"n_iters": 3}).status_code == 202  # will create a model
    zs = {"classes": ["a", "b"]}
    assert api.client.post("/v1/models/zeroshot", json=zs, headers=api.headers).status_code == 201
    r = api.client.post("/v1/models/zeroshot", json=zs, headers=api.headers)
    _quota(api, r, "max_models", 2, 2)
    _quota(api, api.job(ds["id"], params={"n_iters": 3}), "max_models", 2, 2)


def test_concurrent_submits_take_the_last_slots_once(api, runtime, engine: Engine, settings: Settings,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads submit at once for 3 slots; counting is slowed down so that, without the tenant
    lock, every thread would count 0 queued jobs before any inserts."""
    ds = api.ready_dataset()
    count = quotas._count_jobs

    def slow_count(*args: Any) -> int:
        n = count(*args)
        time.sleep(0.2)
        return n

    monkeypatch.setattr(quotas, "_count_jobs", slow_count)
    queue, results = RecordingQueue(), []
    start = threading.Barrier(8)

    def submit() -> None:
        with Session(engine, expire_on_commit=False) as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == "acme"))
            assert tenant is not None
            start.wait()
            try:
                jobs_svc.create_job(session=s, settings=settings, queue=queue, bases=runtime.bases,
                                    tenant=tenant, body=JobCreate(dataset_id=ds["id"], params={"n_iters": 3}))
                results.append("ok")
            except QuotaExceeded as e:
                results.append(e.extra["limit"])

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["max_queued_jobs"] * 5 + ["ok"] * 3
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3
