"""Worker tests: the process's settings from its environment (`env_settings`, tests/conftest.py:
a migrated SQLite database and storage in a temporary data folder), and the runtime over them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.config import Settings
from app.runtime import Runtime
from tests.fakes import RecordingQueue


@pytest.fixture
def settings(env_settings: Settings) -> Settings:
    """A worker reads its settings from the environment: here, `env_settings`."""
    return env_settings


@pytest.fixture
def queue() -> RecordingQueue:
    """The worker's queue (re-sends of the recovery sweep); reports an empty broker by default."""
    return RecordingQueue(depth=0)


@pytest.fixture
def runtime(settings: Settings, queue: RecordingQueue) -> Iterator[Runtime]:
    """The runtime context a worker process builds at its init, over the test settings."""
    rt = Runtime.build(settings, queue=queue)
    yield rt
    rt.close()
