"""Test doubles shared by several test folders."""

from __future__ import annotations

from typing import Literal


class RecordingQueue:
    """An app.queue.Queue that records the job ids sent; `fail` makes sends raise. `depth` is the
    depth it reports: a number, None (the broker cannot be asked) or "sent" (the ids recorded)."""

    def __init__(self, depth: int | None | Literal["sent"] = "sent") -> None:
        self.sent: list[str] = []
        self.depth = depth
        self.fail: Exception | None = None

    def enqueue_training(self, job_id: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(job_id)

    def queue_depth(self) -> int | None:
        return len(self.sent) if self.depth == "sent" else self.depth

    def ready(self) -> bool:
        return True
