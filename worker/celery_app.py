"""The Celery application: broker from Settings, or an embedded transport that needs no server.

Job state lives in database rows, so there is no result backend. One training at a time per
worker process (one per GPU), messages acknowledged only after the task finishes, and a
message whose worker process died is handed back to the broker. Recovery from a lost worker
machine does not wait for the broker's redelivery: see worker.recovery.

Nothing is built at import: `make_celery(settings)` is called where a process is assembled
(worker.main for `celery -A worker.main`, the `sparseshot worker` command, worker.dispatch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery, signals

from app.core.config import Settings

TRAIN_TASK = "sparseshot.train_job"

# Redis hides an unacknowledged message for this long before handing it to another worker.
# Recovery of a dead worker's job is done by worker.recovery from the job's heartbeat, so the
# timeout only has to be long enough that a healthy long training is rarely redelivered (a
# redelivered duplicate is dropped by the task anyway).
REDIS_VISIBILITY_TIMEOUT_S = 12 * 3600


def embedded_broker_url(settings: Settings) -> str:
    """kombu's SQLAlchemy transport on a SQLite file under data_dir: no server, transactional."""
    path = (Path(settings.data_dir) / "broker.db").resolve()
    return f"sqla+sqlite:///{path.as_posix()}"


def ensure_broker_dir(app: Celery) -> None:
    """Create the folder of an embedded SQLite broker (SQLite creates the file, not its folder)."""
    url = str(app.conf.broker_url or "")
    if url.startswith("sqla+sqlite:///"):
        Path(url[len("sqla+sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def broker_url(settings: Settings) -> str:
    return settings.broker_url or embedded_broker_url(settings)


def _transport_options(url: str) -> dict[str, Any]:
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    return {}


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`; the training task (worker.tasks, a shared task) joins it."""
    url = broker_url(settings)
    app = Celery("sparseshot", broker=url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=_transport_options(url),
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_routes={TRAIN_TASK: {"queue": settings.queue_name}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A fresh child process may load a large base model before its first task.
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@signals.worker_init.connect
def _worker_init(sender: object = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if isinstance(app, Celery):
        ensure_broker_dir(app)
