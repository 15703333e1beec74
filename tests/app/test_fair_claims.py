"""Fair claiming (app.jobs.lifecycle.fair_order / claim_next) on SQLite and PostgreSQL: tenants with
fewer running jobs first, then the one that started longest ago; running limits hold; concurrent
claimers never take one job twice."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.jobs import lifecycle
from app.jobs.status import JobStatus
from app.models import Dataset, Job, Tenant, utcnow
from app.quotas import running_limit

T0 = utcnow() - timedelta(hours=1)


class Jobs:
    """Tenants and their job rows, created at increasing times (so FIFO order is the insert order)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tenants: dict[str, tuple[str, str]] = {}  # name -> (tenant id, dataset id)
        self.tick = 0
        self.names: dict[str, str] = {}  # job id -> "A1"

    def _tenant(self, s: Session, name: str, max_running: int | None) -> tuple[str, str]:
        if name not in self.tenants:
            tenant = Tenant(name=name, max_running_jobs=max_running)
            s.add(tenant)
            s.flush()
            ds = Dataset(tenant_id=tenant.id, name="d", classes=["a", "b"])
            s.add(ds)
            s.flush()
            self.tenants[name] = (tenant.id, ds.id)
        return self.tenants[name]

    def add(self, label: str, status: JobStatus = JobStatus.QUEUED, *, started: datetime | None = None,
            max_running: int | None = None) -> str:
        with Session(self.engine) as s:
            tenant_id, ds_id = self._tenant(s, label[0], max_running)
            self.tick += 1
            job = Job(tenant_id=tenant_id, dataset_id=ds_id, method="so", base_model="b", params={},
                      status=status.value, created_at=T0 + timedelta(seconds=self.tick), started_at=started,
                      heartbeat_at=started)
            s.add(job)
            s.commit()
            self.names[job.id] = label
            return job.id


def _claim(engine: Engine, settings: Settings, worker: str, now: datetime) -> tuple[str | None, bool]:
    with Session(engine) as s:
        out = lifecycle.claim_next(s, worker=worker, now=now, running_limit=running_limit(settings),
                                   max_attempts=settings.job_max_attempts)
        s.commit()
        return out


def _claim_all(engine: Engine, settings: Settings, jobs: Jobs) -> list[str]:
    order, now = [], utcnow()
    for i in range(100):
        job_id, _ = _claim(engine, settings, "w", now + timedelta(seconds=i))
        if job_id is None:
            return order
        order.append(jobs.names[job_id])
    raise AssertionError("claims did not end")


def test_claims_take_turns_across_tenants(engine: Engine, settings: Settings) -> None:
    jobs = Jobs(engine)
    for label in ("A1", "A2", "A3"):
        jobs.add(label)
    jobs.add("B0", JobStatus.SUCCEEDED, started=T0)  # B trained before: after A, which never did
    jobs.add("B1")
    jobs.add("C0", JobStatus.RUNNING, started=T0 - timedelta(minutes=5))  # one running already
    jobs.add("C1")
    jobs.add("A4", JobStatus.CANCELLED)  # not queued: never claimed
    with Session(engine) as s:
        ids = [r[0] for r in lifecycle.fair_order(s, running_limit=running_limit(settings),
                                                  max_attempts=3, limit=10)]
    assert [jobs.names[i] for i in ids] == ["A1", "A2", "A3", "B1", "C1"]  # the order right now
    # Claims change the counts: each tenant's first job before anyone's second.
    assert _claim_all(engine, settings, jobs) == ["A1", "B1", "C1", "A2", "A3"]


def test_running_limit_holds_jobs_back(engine: Engine, settings: Settings) -> None:
    jobs = Jobs(engine)
    jobs.add("A1", max_running=1)
    jobs.add("A2")
    jobs.add("B1", max_running=0)  # a tenant allowed no training at all
    assert _claim_all(engine, settings, jobs) == ["A1"]
    assert _claim(engine, settings, "w", utcnow()) == (None, False)  # nothing claimable: no candidate
    with Session(engine) as s:  # the first ends: the second may start
        s.execute(update(Job).where(Job.status == "running").values(status="succeeded"))
        s.commit()
    assert _claim_all(engine, settings, jobs) == ["A2"]


def test_unrunnable_queued_jobs_are_not_claimed(engine: Engine, settings: Settings) -> None:
    jobs = Jobs(engine)
    cancelled, spent = jobs.add("A1"), jobs.add("B1")
    with Session(engine) as s:
        s.get(Job, cancelled).cancel_requested = True  # type: ignore[union-attr]
        s.get(Job, spent).attempts = settings.job_max_attempts  # type: ignore[union-attr]
        s.commit()
    jobs.add("C1")
    assert _claim_all(engine, settings, jobs) == ["C1"]


def test_concurrent_claimers_never_share_a_job(engine: Engine, settings: Settings) -> None:
    jobs = Jobs(engine)
    for t in "ABCD":
        for i in range(5):
            jobs.add(f"{t}{i}", max_running=2 if t == "D" else None)
    claimed: list[str] = []
    start = threading.Barrier(6)

    def claimer(n: int) -> None:
        start.wait()
        while True:
            job_id, contended = _claim(engine, settings, f"w{n}", utcnow())
            if job_id is not None:
                claimed.append(job_id)
            elif not contended:
                return

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(claimed) == len(set(claimed))  # no job twice
    per_tenant = Counter(jobs.names[j][0] for j in claimed)
    # Settings' default max_running_jobs (4) for A-C, the override 2 for D.
    assert per_tenant == {"A": 4, "B": 4, "C": 4, "D": 2}
    with Session(engine) as s:
        rows = s.execute(select(Job.id, Job.status, Job.attempts, Job.worker)).all()
    running = {r.id for r in rows if r.status == "running"}
    assert running == set(claimed) and all(r.attempts == 1 for r in rows if r.id in running)
