"""A real Redis going away under the API: a submit answers 503 problem+json with Retry-After and
leaves no job row; once Redis is back, submits work again without a restart.

The Redis is a redis-server of this test's own on a free port (never the shared one), killed with
SIGKILL while the API holds pooled connections to it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import migrations
from app.core.config import Settings
from app.db import SessionLocal, make_engine
from app.main import create_app
from app.services import auth
from benchmarks.procs import free_port
from tests.conftest import server_unavailable
from worker.dispatch import CeleryQueue


class RedisServer:
    """redis-server on `port`, in memory only; start() waits until it answers PING."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            server_unavailable("redis-server", FileNotFoundError("redis-server not on PATH"))
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([str(exe), "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"], stdout=fh, stderr=fh)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def llen(self, queue: str) -> int:
        import redis

        return int(redis.Redis(port=self.port, socket_connect_timeout=1).llen(queue))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis.log")
    server.start()
    yield server
    server.kill()


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_redis_down_at_submit_is_503_with_no_job_and_recovers(tmp_path: Path, own_redis: RedisServer) -> None:
    settings = Settings(data_dir=tmp_path / "data", base_model="sparseshot-tiny:random",
                        broker_url=f"redis://127.0.0.1:{own_redis.port}/0", queue_name="faults")
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with SessionLocal(bind=engine) as session:
        _row, key = auth.create_key(session=session, tenant_name="acme")
    engine.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    queue = CeleryQueue.for_settings(settings)
    with TestClient(create_app(settings, queue=queue), raise_server_exceptions=False) as c:
        ds = c.post("/v1/datasets", json={"name": "pets", "classes": ["cat", "dog"]}, headers=headers).json()
        for label, color in (("cat", (250, 0, 0)), ("dog", (0, 0, 250))):
            files = [("files", ("a.png", _png(color), "image/png"))]
            r = c.post(f"/v1/datasets/{ds['id']}/images", data={"label": label}, files=files, headers=headers)
            assert r.status_code == 201, r.text
        body = {"dataset_id": ds["id"], "method": "so", "params": {"n_iters": 1}}

        first = c.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == 202, first.text
        assert own_redis.llen("faults") == 1  # really sent, over a pooled connection

        own_redis.kill()
        r = c.post("/v1/jobs", json=body, headers=headers)
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["status"] == 503 and "not created" in r.json()["detail"]
        jobs = c.get("/v1/jobs", headers=headers).json()
        assert [j["id"] for j in jobs] == [first.json()["id"]]  # no half-written job
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] is False

        own_redis.start()  # the same port, empty
        again = c.post("/v1/jobs", json=body, headers=headers)
        assert again.status_code == 202, again.text
        assert own_redis.llen("faults") == 1
        assert len(c.get("/v1/jobs", headers=headers).json()) == 2
