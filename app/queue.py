"""The training queue as the API sees it: a port that `worker.dispatch.CeleryQueue` implements.

`app/` never imports `worker/`: the process that assembles the API (`sparseshot serve`) plugs a
queue into the runtime context (app.runtime). `UnconfiguredQueue` is what an API gets without one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Queue(Protocol):
    def enqueue_training(self, job_id: str) -> None:
        """Send the training message for a committed job row (workers drop duplicates)."""

    def queue_depth(self) -> int | None:
        """Messages waiting in the training queue, or None when the broker cannot be asked."""

    def ready(self) -> bool:
        """True when the broker accepts a connection within a couple of seconds."""


class UnconfiguredQueue:
    """No queue plugged in: jobs fail at once with a clear error, and /readyz reports the broker down."""

    def enqueue_training(self, job_id: str) -> None:
        raise RuntimeError("no training queue is configured for this process")

    def queue_depth(self) -> int | None:
        return None

    def ready(self) -> bool:
        return False
