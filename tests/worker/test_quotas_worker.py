"""The worker checks the step limit again with the images the dataset has when the job starts."""

from __future__ import annotations

from app.db import session_scope
from app.models import Job, Tenant
from worker import tasks

from .test_tasks import fake_lib, get_job, make_job  # noqa: F401  (fixture)


def test_images_added_after_submit_cannot_raise_steps_over_the_limit(settings, runtime,
                                                                     fake_lib) -> None:  # noqa: F811
    job_id = make_job(n_per_class=4, params={"n_iters": 3})  # 8 images, 2 classes: 4 shots, 12 steps
    with session_scope() as s:
        job = s.get(Job, job_id)
        s.get(Tenant, job.tenant_id).max_steps_per_job = 11  # type: ignore[union-attr]
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "failed"
    job = get_job(job_id)
    assert "max_steps_per_job is 11" in (job.error or "") and "12 steps" in (job.error or "")
    assert fake_lib == []  # never trained

    ok = make_job(n_per_class=4, params={"n_iters": 3})
    with session_scope() as s:
        s.get(Tenant, s.get(Job, ok).tenant_id).max_steps_per_job = 12  # type: ignore[union-attr]
    assert tasks.run_job(ok, runtime=runtime, worker="w1") == "succeeded"
