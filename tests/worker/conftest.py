"""Worker tests: a migrated SQLite database and storage in a temporary data folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.config import Settings, get_settings
from app.runtime import Runtime
from tests.fakes import RecordingQueue


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Iterator[Settings]:
    import migrations
    from app import db

    monkeypatch.setenv("SPARSESHOT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSESHOT_BASE_MODEL", "sparseshot-tiny:random")
    monkeypatch.delenv("SPARSESHOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SPARSESHOT_BROKER_URL", raising=False)
    monkeypatch.setenv("SPARSESHOT_JOB_HEARTBEAT_TIMEOUT_S", "2")
    monkeypatch.setenv("SPARSESHOT_PROGRESS_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    db.dispose_engines()
    migrations.upgrade()
    yield get_settings()
    db.dispose_engines()
    get_settings.cache_clear()


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
