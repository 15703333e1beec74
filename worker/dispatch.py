"""The Celery-backed training queue: implements app.queue.Queue for the API and the recovery sweep.

Tasks are sent by name, so the API process never imports the training code (or torch).
"""

from __future__ import annotations

import logging

from celery import Celery

from app.core.config import Settings
from worker.celery_app import TRAIN_TASK, ensure_broker_dir, make_celery

log = logging.getLogger(__name__)

_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}


class CeleryQueue:
    """app.queue.Queue over a Celery app's broker and default queue."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self.queue = str(celery.conf.task_default_queue)
        ensure_broker_dir(celery)

    @classmethod
    def for_settings(cls, settings: Settings) -> CeleryQueue:
        return cls(make_celery(settings))

    def enqueue_training(self, job_id: str) -> None:
        """Send the training message for a committed job row (the task ignores duplicates)."""
        self.celery.send_task(TRAIN_TASK, args=[job_id], queue=self.queue, retry=True, retry_policy=_RETRY)

    def queue_depth(self) -> int | None:
        """Messages waiting in the training queue, or None when the broker cannot be asked."""
        try:
            with self.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                channel = conn.default_channel
                size = getattr(channel, "_size", None)
                if size is not None:
                    # kombu's virtual transports (Redis, SQLAlchemy): a queue that does not exist
                    # yet (Redis drops empty lists) counts as empty rather than as an error.
                    return int(size(self.queue))
                ok = channel.queue_declare(queue=self.queue, passive=True)
                return int(ok.message_count)
        except Exception as e:
            log.debug("queue depth unavailable: %s", e)
            return None

    def ready(self) -> bool:
        """True when the broker accepts a connection within a couple of seconds."""
        try:
            with self.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                _ = conn.default_channel  # opens the channel (embedded transport: creates its tables)
            return True
        except Exception as e:
            log.warning("broker not ready: %s", e)
            return False
