"""Suite-wide settings (CPU only, few threads, seeded), the local test servers, and a process
configured through the environment (`env_settings`).

PostgreSQL and Redis are the real servers on this machine. A test that needs one and cannot reach
it is skipped, except under CI=true, where a missing server fails the run.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import AbstractContextManager, contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import text  # noqa: E402

import migrations  # noqa: E402
from app import db  # noqa: E402
from app.core.config import Settings, get_settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PG_SERVER = os.environ.get("SPARSESHOT_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("SPARSESHOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def server_unavailable(what: str, err: Exception) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true: {err}")
    pytest.skip(f"{what} not available: {err}")


@contextmanager
def _fresh_pg_database(prefix: str) -> Iterator[str]:
    """An empty database `<prefix>_<random>` on the local server, dropped (forcibly) afterwards."""
    admin = db.make_engine(f"{PG_SERVER}/postgres")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        admin.dispose()
        server_unavailable("PostgreSQL", e)
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def fresh_pg_database() -> Callable[[str], AbstractContextManager[str]]:
    """`with fresh_pg_database("prefix") as url:` a new empty PostgreSQL database for the block."""
    return _fresh_pg_database


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis, checked reachable."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as e:
        server_unavailable(f"Redis at {REDIS_URL}", e)
    return REDIS_URL



@pytest.fixture
def env_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The settings a process reads from its environment (`get_settings()`): a migrated SQLite
    database and storage in `tmp_path`, the tiny base, no broker, short heartbeat and progress
    intervals. For code that assembles a process (the CLI, a worker) or reads the process's settings."""
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
