"""The statuses a job row can have (stored as the enum's value in `jobs.status`, a String(16)).

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │  ▲               │
      │  └─requeue_stale─┘        (a worker that stopped beating)
      └──cancel / enqueue_failed / give_up──▶ cancelled | failed

Kept apart from `lifecycle` so that `app.models` can use it without an import cycle.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # f"{status}" gives the stored value
        return self.value

    def __hash__(self) -> int:  # as the plain string's, so "queued" in ACTIVE holds
        return str.__hash__(self)


# A job in one of these still uses its dataset and may still write to its row.
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
FINISHED = frozenset(JobStatus) - ACTIVE
