"""Fair scheduling as a worker sees it: messages are work tokens consumed in order, each starting the
fairest queued job (worker.claims); training is the fake of test_tasks."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import select

import sparseshot
from app.db import session_scope
from app.models import Dataset, Image, Job, Tenant
from app.schemas import JobCreate
from app.services import jobs as jobs_svc
from app.storage import get_storage
from tests.fakes import RecordingQueue
from worker import tasks

from .test_tasks import _png, fake_adapt_factory, fake_lib  # noqa: F401  (fixture)


def _tenant(name: str, **limits: int) -> str:
    """A tenant with a two-class dataset of one image per class; returns the dataset id."""
    storage = get_storage()
    with session_scope() as s:
        tenant = Tenant(name=name, **limits)
        s.add(tenant)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="d", classes=["cat", "dog"])
        s.add(ds)
        s.flush()
        for i, label in enumerate(ds.classes):
            data = _png((i * 100, 7, len(name)))
            key = storage.put(data)
            s.add(Image(dataset_id=ds.id, label=label, sha256=key, storage_key=key, filename=f"{i}.png",
                        format="PNG", width=8, height=8, nbytes=len(data)))
        return ds.id


def _submit(runtime: Any, tenant: str, dataset_id: str) -> str:
    """POST /v1/jobs's service: commits the queued job, then sends its message to runtime.queue."""
    with session_scope(runtime.engine) as s:
        row = s.scalar(select(Tenant).where(Tenant.name == tenant))
        job = jobs_svc.create_job(session=s, settings=runtime.settings, queue=runtime.queue,
                                  bases=runtime.bases, tenant=row,
                                  body=JobCreate(dataset_id=dataset_id, params={"n_iters": 2}))
        return job.id


def _drain(runtime: Any, queue: RecordingQueue) -> list[str]:
    """One worker: takes the messages first in, first out (wake-ups join the end) until none are left."""
    outcomes = []
    while queue.sent:
        outcomes.append(tasks.run_job(queue.sent.pop(0), runtime=runtime, worker="w1"))
    return outcomes


def _start_order(names: dict[str, str]) -> list[str]:
    with session_scope() as s:
        rows = s.execute(select(Job.id, Job.started_at, Job.status)).all()
    assert all(r.status == "succeeded" for r in rows), rows
    return [names[r.id] for r in sorted(rows, key=lambda r: r.started_at)]


def test_a_second_tenant_starts_second_not_sixth(settings, runtime, queue: RecordingQueue,
                                                 fake_lib) -> None:  # noqa: F811
    names = {}
    a, b = _tenant("a"), _tenant("b")
    for i in range(5):
        names[_submit(runtime, "a", a)] = f"A{i + 1}"
    names[_submit(runtime, "b", b)] = "B1"
    assert len(queue.sent) == 6  # one token per queued job
    outcomes = _drain(runtime, queue)
    assert _start_order(names) == ["A1", "B1", "A2", "A3", "A4", "A5"]
    assert outcomes.count("succeeded") == 6 and set(outcomes) <= {"succeeded", "skipped"}
    assert len(fake_lib) == 6


def test_plain_fifo_within_one_tenant(settings, runtime, queue: RecordingQueue, fake_lib) -> None:  # noqa: F811
    names = {}
    a = _tenant("a")
    for i in range(3):
        names[_submit(runtime, "a", a)] = f"A{i + 1}"
    _drain(runtime, queue)
    assert _start_order(names) == ["A1", "A2", "A3"]


def test_job_held_back_by_the_running_limit_starts_when_the_first_ends(
    settings, runtime, queue: RecordingQueue, monkeypatch: pytest.MonkeyPatch, fake_lib,  # noqa: F811
) -> None:
    """Its token is used while the tenant is at its limit (dropped); the end of the first training
    sends a new one, so the job does not wait for the recovery sweep."""
    slow = threading.Event()

    def adapt(*args: Any, **kw: Any) -> Any:
        slow.set()
        time.sleep(0.5)
        return fake_adapt_factory([])(*args, **kw)

    monkeypatch.setitem(vars(sparseshot), "adapt", adapt)
    a = _tenant("a", max_running_jobs=1)
    first, second = _submit(runtime, "a", a), _submit(runtime, "a", a)
    tokens = [queue.sent.pop(0), queue.sent.pop(0)]
    out: list[str] = []
    worker1 = threading.Thread(
        target=lambda: out.append(tasks.run_job(tokens[0], runtime=runtime, worker="w1")))
    worker1.start()
    assert slow.wait(10)
    assert tasks.run_job(tokens[1], runtime=runtime, worker="w2") == "skipped"  # A is at its limit
    worker1.join(timeout=30)
    assert out == ["succeeded"]
    assert queue.sent == [second]  # the wake-up token
    assert _drain(runtime, queue) == ["succeeded"]
    with session_scope() as s:
        assert {s.get(Job, j).status for j in (first, second)} == {"succeeded"}  # type: ignore[union-attr]
