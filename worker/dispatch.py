"""What the API needs from the queue: enqueue a training, queue depth, broker health.

Tasks are sent by name, so the API process never imports the training code (or torch).
"""

from __future__ import annotations

import logging

from celery import Celery

from worker import celery_app
from worker.celery_app import TRAIN_TASK

log = logging.getLogger(__name__)


def _app() -> Celery:
    app = celery_app.app
    celery_app.ensure_broker_dir(app)
    return app


def _queue() -> str:
    return str(_app().conf.task_default_queue)


def enqueue_training(job_id: str) -> None:
    """Send the training message for a committed job row (the task ignores duplicates)."""
    _app().send_task(TRAIN_TASK, args=[job_id], queue=_queue(), retry=True,
                  retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})


def queue_depth() -> int | None:
    """Messages waiting in the training queue, or None when the broker cannot be asked."""
    try:
        with _app().connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            channel = conn.default_channel
            size = getattr(channel, "_size", None)
            if size is not None:
                # kombu's virtual transports (Redis, SQLAlchemy): a queue that does not exist
                # yet (Redis drops empty lists) counts as empty rather than as an error.
                return int(size(_queue()))
            ok = channel.queue_declare(queue=_queue(), passive=True)
            return int(ok.message_count)
    except Exception as e:
        log.debug("queue depth unavailable: %s", e)
        return None


def broker_ready() -> bool:
    """True when the broker accepts a connection within a couple of seconds."""
    try:
        with _app().connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            _ = conn.default_channel  # opens the channel (embedded transport: creates its tables)
        return True
    except Exception as e:
        log.warning("broker not ready: %s", e)
        return False
