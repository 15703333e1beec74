"""End to end over real HTTP: `sparseshot serve` on a free port, real Celery worker processes.

1. Embedded defaults (SQLite, kombu's SQLite transport, embedded worker): key (CLI) -> dataset ->
   upload -> job -> poll -> classify, a zero-shot model, cancelling a running job, and the signed
   webhook of each job's end received by a local HTTP server.
2. Redis + PostgreSQL (fresh database, own queue name), API and `sparseshot worker` as separate
   processes: the same path, with the worker SIGKILLed mid-training; a new worker takes the job
   over after the heartbeat timeout and finishes it.

Tiny random base model; under CI=true a missing PostgreSQL or Redis fails instead of skipping.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.webhooks import signing
from benchmarks.procs import Proc, cli, free_port, service_env, wait_up
from benchmarks.procs import redis_queue as temporary_redis_queue
from tests.fakes import Receiver

pytestmark = pytest.mark.slow

BASE_SPEC = "sparseshot-tiny:random"
CLASSES = ["red", "green", "blue"]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (25, 30, 210)}
QUICK_PARAMS = {"n_iters": 6, "batch_size": 6}
LONG_PARAMS = {"n_iters": 100000, "batch_size": 6}
RECOVERY_ITERS = 200  # x 2 shots = 400 steps, ~10 s on one CPU core
# A dead worker's job is picked up after a 5 s silent heartbeat (default 60 s), swept every second.
FAST_RECOVERY = {"SPARSESHOT_JOB_HEARTBEAT_TIMEOUT_S": "5", "SPARSESHOT_RECOVERY_INTERVAL_S": "1"}


def _png(color: tuple[int, int, int], seed: int) -> bytes:
    im = Image.new("RGB", (32, 32), color)
    im.putpixel((seed % 32, seed // 32 % 32), (seed * 37 % 256, 0, 0))  # distinct bytes per image
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- processes (benchmarks.procs)


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    return service_env(data_dir, **extra)


def _cli(env: dict[str, str], *args: str) -> str:
    return cli(env, *args)


class Api:
    """HTTP client of one running service."""

    def __init__(self, port: int, proc: Proc) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def wait_up(self, timeout: float = 90) -> None:
        wait_up(self.base, self.proc, timeout)

    def auth(self, key: str) -> None:
        self.http.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, url: str, expect: int, **kw: Any) -> Any:
        r = self.http.request(method, url, **kw)
        assert r.status_code == expect, f"{method} {url}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def wait_job(self, job_id: str, done: tuple[str, ...], timeout: float, logs: list[Proc]) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            job = self.call("GET", f"/v1/jobs/{job_id}", 200)
            if job["status"] in done:
                return job
            time.sleep(0.25)
        tails = "\n----\n".join(p.tail() for p in logs)
        raise AssertionError(f"job {job_id} not {done} in {timeout}s: {job}\n{tails}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local webhook receiver answering 200."""
    r = Receiver(200)
    yield r
    r.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def _serve(env: dict[str, str], tmp: Path, procs: list[Proc]) -> Api:
    port = free_port()
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp / "serve.log")
    procs.append(proc)
    api = Api(port, proc)
    api.wait_up()
    return api


# ---------------------------------------------------------------- the used-by path


def _create_key(env: dict[str, str]) -> str:
    key = _cli(env, "keys", "create", "--tenant", f"e2e-{uuid.uuid4().hex[:6]}").strip().splitlines()[-1]
    assert key.startswith("sk_") and " " not in key
    return key


def _dataset_with_images(api: Api) -> str:
    ds = api.call("POST", "/v1/datasets", 201, json={"name": "colours", "classes": CLASSES})
    for label in CLASSES:
        files = [("files", (f"{label}{i}.png", _png(COLORS[label], i), "image/png")) for i in range(2)]
        out = api.call("POST", f"/v1/datasets/{ds['id']}/images", 201, data={"label": label}, files=files)
        assert len(out["added"]) == 2 and out["rejected"] == []
    got = api.call("GET", f"/v1/datasets/{ds['id']}", 200)
    assert got["image_counts"] == {c: 2 for c in CLASSES}
    return str(ds["id"])


def _start_job(api: Api, dataset_id: str, params: dict[str, Any], **extra: Any) -> dict:
    r = api.http.post("/v1/jobs", json={"dataset_id": dataset_id, "method": "so", "params": params, **extra})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["status"] in ("queued", "running")
    return dict(job)


def _classify(api: Api, model_id: str) -> None:
    files = [("files", ("q-red.png", _png(COLORS["red"], 99), "image/png")),
             ("files", ("q-blue.png", _png(COLORS["blue"], 98), "image/png"))]
    out = api.call("POST", f"/v1/models/{model_id}/classify", 200, files=files, data={"top_k": "2"})
    preds = out["predictions"]
    assert [p["filename"] for p in preds] == ["q-red.png", "q-blue.png"]
    for p in preds:
        scores = [lab["score"] for lab in p["labels"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert 0 <= sum(scores) <= 1 + 1e-5
        assert {lab["label"] for lab in p["labels"]} <= set(CLASSES)


def _train_and_classify(api: Api, dataset_id: str, logs: list[Proc], **extra: Any) -> dict:
    job = _start_job(api, dataset_id, QUICK_PARAMS, **extra)
    job = api.wait_job(job["id"], ("succeeded", "failed", "cancelled"), 120, logs)
    assert job["status"] == "succeeded", job
    progress = job["progress"]
    assert job["model_id"] and job["finished_at"] and 0 < progress["step"] <= progress["total_steps"]
    model = api.call("GET", f"/v1/models/{job['model_id']}", 200)
    assert model["classes"] == CLASSES and model["delta"]["nnz"] > 0 and model["method"] == "so"
    _classify(api, model["id"])
    return job


def _hooks(receiver: Receiver, secret: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The first `n` webhook bodies the receiver got, each checked signed with `secret`."""
    deadline = time.monotonic() + timeout
    while len(receiver.requests) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(receiver.requests) >= n, receiver.requests
    out = []
    for req in receiver.requests[:n]:
        h = req["headers"]
        assert signing.verify(secret, timestamp=h["X-SparseShot-Timestamp"],
                              signature_header=h["X-SparseShot-Signature"], body=req["body"])
        out.append(json.loads(req["body"]))
    return out


def _wait_running(api: Api, job_id: str, logs: list[Proc], min_step: int = 1) -> dict:
    deadline = time.monotonic() + 90
    job: dict = {}
    while time.monotonic() < deadline:
        job = api.call("GET", f"/v1/jobs/{job_id}", 200)
        if job["status"] == "running" and job["progress"]["step"] >= min_step:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    tails = "\n----\n".join(p.tail() for p in logs)
    raise AssertionError(f"job {job_id} never ran: {job}\n{tails}")


# ---------------------------------------------------------------- tests


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return out


def test_embedded_defaults_used_by_path_cancel_and_recovery(tmp_path: Path, procs: list[Proc],
                                                            receiver: Receiver) -> None:
    env = _env(tmp_path / "data", SPARSESHOT_WEBHOOK_ALLOW_PRIVATE="true", SPARSESHOT_WEBHOOK_POLL_S="0.2",
               **FAST_RECOVERY)
    api = _serve(env, tmp_path, procs)
    api.auth(_create_key(env))
    dataset_id = _dataset_with_images(api)
    trained = _train_and_classify(api, dataset_id, procs, webhook_url=receiver.url)
    secret = api.call("GET", "/v1/webhook-secret", 200)["secret"]
    # Sent by the embedded worker's main process (the job ended there).
    [hook] = _hooks(receiver, secret, 1)
    assert hook["event"] == "job.succeeded" and hook["job"]["id"] == trained["id"]
    assert hook["model_id"] == trained["model_id"]
    deadline = time.monotonic() + 30  # the outcome is written once the receiver has answered
    delivery = api.call("GET", f"/v1/jobs/{trained['id']}/deliveries", 200)[0]
    while delivery["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
        delivery = api.call("GET", f"/v1/jobs/{trained['id']}/deliveries", 200)[0]
    assert delivery["state"] == "delivered" and delivery["attempts"][-1]["status_code"] == 200

    zs = api.call("POST", "/v1/models/zeroshot", 201, json={"classes": CLASSES})
    _classify(api, zs["id"])

    job = _start_job(api, dataset_id, LONG_PARAMS, webhook_url=receiver.url)
    _wait_running(api, job["id"], procs)
    t0 = time.monotonic()
    api.call("POST", f"/v1/jobs/{job['id']}/cancel", 202)
    job = api.wait_job(job["id"], ("cancelled", "succeeded", "failed"), 20, procs)
    assert job["status"] == "cancelled" and time.monotonic() - t0 < 15, job
    assert job["model_id"] is None
    assert _hooks(receiver, secret, 2)[1]["event"] == "job.cancelled"

    # SIGKILL the embedded worker mid-training: serve starts a new one, whose recovery sweep
    # re-queues the job (the SQLite transport never redelivers), and training resumes.
    job = _start_job(api, dataset_id, {**LONG_PARAMS, "n_iters": RECOVERY_ITERS})
    _wait_running(api, job["id"], procs, min_step=60)
    (worker_pid,) = _children(api.proc.p.pid)
    os.killpg(worker_pid, signal.SIGKILL)
    job = api.wait_job(job["id"], ("succeeded", "failed", "cancelled"), 120, procs)
    assert job["status"] == "succeeded" and job["attempts"] >= 2, job

    ready = api.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    metrics = api.http.get("/metrics").text
    assert "sparseshot_queue_depth" in metrics

    # Stopping the server stops its embedded worker too.
    pid = api.proc.p.pid
    children = _children(pid)
    assert children and worker_pid not in children, "no new embedded worker process"
    os.kill(pid, signal.SIGTERM)
    api.proc.p.wait(30)
    deadline = time.monotonic() + 20
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def pg_database(fresh_pg_database) -> Iterator[str]:
    with fresh_pg_database("sparseshot_e2e") as url:
        yield url


@pytest.fixture
def redis_queue(redis_url: str) -> Iterator[str]:
    with temporary_redis_queue(redis_url, prefix="sparseshot-e2e") as queue:
        yield queue


def test_redis_postgres_workers_and_sigkill_recovery(pg_database: str, redis_url: str, redis_queue: str,
                                                     tmp_path: Path, procs: list[Proc]) -> None:
    # (procs last: its teardown stops the processes before the database is dropped)
    env = _env(tmp_path / "data", SPARSESHOT_DATABASE_URL=pg_database, SPARSESHOT_BROKER_URL=redis_url,
               SPARSESHOT_QUEUE_NAME=redis_queue, **FAST_RECOVERY)
    _cli(env, "migrate")
    api = _serve(env, tmp_path, procs)  # a broker URL is set: API only, no embedded worker
    first = Proc(["worker"], env, tmp_path / "worker1.log")
    procs.append(first)
    api.auth(_create_key(env))
    dataset_id = _dataset_with_images(api)
    _train_and_classify(api, dataset_id, procs)

    # A longer job: SIGKILL its worker (the whole process group, as if the machine was lost).
    job = _start_job(api, dataset_id, {**LONG_PARAMS, "n_iters": RECOVERY_ITERS})
    # Killed after the first training checkpoint (every 50 steps), so the next attempt resumes.
    running = _wait_running(api, job["id"], procs, min_step=60)
    first.kill(signal.SIGKILL)
    first.p.wait(10)
    killed_at = time.monotonic()
    checkpoint = tmp_path / "data" / "checkpoints" / f"{job['id']}.pt"
    assert checkpoint.exists()  # what the next attempt resumes from
    second = Proc(["worker"], env, tmp_path / "worker2.log")
    procs.append(second)
    job = api.wait_job(job["id"], ("succeeded", "failed", "cancelled"), 120, procs)
    assert time.monotonic() - killed_at < 120
    assert job["status"] == "succeeded", job
    assert job["attempts"] >= 2 and job["progress"]["step"] == job["progress"]["total_steps"]
    assert running["attempts"] == 1 and not checkpoint.exists()
    _classify(api, job["model_id"])

