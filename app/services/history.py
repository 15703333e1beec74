"""Training history of jobs: the worker records a point every few steps; the API lists them.

The worker's progress callback hands each `sparseshot.Progress` to a `HistoryRecorder`, which
keeps at most one point per `history_every_steps` steps (widened so that a job keeps at most
`MAX_POINTS`) plus the final step. A point is written only while the job is still running under
the recording attempt; a resumed attempt first drops the points past its resume step, so the
curve stays one increasing sequence of steps. A point's `val_accuracy` is that of the latest
validation pass (jobs with a `validation` split) since the previous point, null when none ran.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.jobs.lifecycle import Claim, owned
from app.models import Job, JobHistory, Tenant
from app.schemas import HistoryPoint, JobHistoryPublic
from app.services.jobs import get_job

if TYPE_CHECKING:
    from sparseshot.train import Progress

log = logging.getLogger(__name__)

MAX_POINTS = 1000  # per job; the step interval widens for long runs


def _finite(x: Any) -> float | None:
    """A finite float or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class HistoryRecorder:
    """Callable taking a sparseshot.Progress; writes the points of one attempt (claim) of one job."""

    def __init__(self, *, claim: Claim, every_steps: int, engine: Engine | None = None) -> None:
        self.claim, self.job_id = claim, claim.job_id
        self.every_steps = max(1, every_steps)
        self.engine = engine
        self.last_step: int | None = None  # last step written by this attempt
        # The latest validation pass since the last point written (passes need not fall on a point).
        self.pending_val: float | None = None

    def _due(self, step: int, total: int | None) -> bool:
        every = max(self.every_steps, math.ceil((total or 0) / MAX_POINTS))
        if total is not None and step >= total:
            return step != self.last_step
        return self.last_step is None or step - self.last_step >= every

    def __call__(self, p: Progress) -> None:
        step = int(p.step)
        if getattr(p, "val_accuracy", None) is not None:
            self.pending_val = p.val_accuracy
        if not self._due(step, p.total_steps):
            return
        try:
            if self._write(p, step):
                self.last_step, self.pending_val = step, None
        except Exception as e:  # the history must never stop a training
            log.warning("job %s history write failed: %s", self.job_id, e)

    def _write(self, p: Progress, step: int) -> bool:
        with session_scope(self.engine) as s:
            if s.scalar(select(Job.id).where(owned(self.claim))) is None:
                return False
            if self.last_step is None:  # first point of this attempt: drop replayed steps
                s.execute(delete(JobHistory).where(JobHistory.job_id == self.job_id, JobHistory.step >= step))
            s.add(JobHistory(
                job_id=self.job_id, step=step, loss=_finite(p.loss), train_accuracy=_finite(p.train_accuracy),
                lr=_finite(getattr(p, "lr", None)), val_accuracy=_finite(self.pending_val),
                elapsed_s=_finite(getattr(p, "elapsed_seconds", None))))
        return True


def progress_recorder(
    *, claim: Claim, every_steps: int, engine: Engine | None = None
) -> Callable[[Progress], None]:
    """The worker's hook: a HistoryRecorder for this attempt."""
    return HistoryRecorder(claim=claim, every_steps=every_steps, engine=engine)


def list_history(*, session: Session, tenant: Tenant, job_id: str) -> JobHistoryPublic:
    """Every point of the tenant's job, by step (404 for another tenant's job)."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    rows = session.scalars(select(JobHistory).where(JobHistory.job_id == job.id)
                           .order_by(JobHistory.step, JobHistory.id))
    return JobHistoryPublic(items=[HistoryPoint(
        step=r.step, loss=r.loss, train_accuracy=r.train_accuracy, lr=r.lr, val_accuracy=r.val_accuracy,
        elapsed_s=r.elapsed_s) for r in rows])


# ---------------------------------------------------------------- where a job trained


def library_versions() -> dict[str, str]:
    """Versions that decide what a training computes (python, torch, open_clip, sparseshot, CUDA)."""
    import open_clip
    import torch

    import sparseshot

    out = {"python": platform.python_version(), "sparseshot": sparseshot.__version__,
           "torch": torch.__version__, "open_clip": getattr(open_clip, "__version__", "unknown")}
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


def device_name(device: Any) -> str:
    """"cpu", or "cuda:0 (NVIDIA H100 ...)" for a GPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"[:64]
    return str(dev)


def record_environment(*, claim: Claim, device: Any, engine: Engine | None = None) -> None:
    """Write the device and library versions of this attempt on the job (if still ours).

    Not a status change (those belong to app.jobs.lifecycle): two descriptive columns."""
    if device is None:
        return
    try:
        with session_scope(engine) as s:
            s.execute(update(Job).where(owned(claim)).values(device=device_name(device),
                                                             versions=library_versions()))
    except Exception as e:
        log.warning("job %s: could not record its device: %s", claim.job_id, e)
