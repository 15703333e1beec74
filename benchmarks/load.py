"""Load test: C concurrent clients mixing the API's operations against real service processes on
loopback, for a bounded time and a bounded number of requests.

Each client (a thread with its own HTTP connection, one of a few tenants) loops over a weighted mix:

- upload: 2 small generated PNGs (sparseshot.sample_data) into the client's own dataset;
- submit: a training job (tiny base, n_iters 1: seconds) on its tenant's ready dataset;
- poll: GET of one of its tenant's jobs (a job seen succeeded makes its model classifiable);
- classify: 2 images on one of its tenant's ready models (a zero-shot model from the start, then
  the trained ones).

Modes: `embedded` (the defaults: SQLite, no Redis, local storage, `sparseshot serve` with its
embedded worker) and `distributed` (a throwaway PostgreSQL database, Redis with a queue of its own,
`sparseshot serve` API only and N `sparseshot worker` processes; the database is dropped and the
queue's keys deleted afterwards). Per mode and operation: requests, ok (2xx), refused (4xx, e.g.
429 over a tenant limit), errors (5xx and transport errors: the target is 0), p50/p99 latency of
every request of the operation.

    python -m benchmarks.load --clients 32 --duration 60 --json load.json
    # or: sparseshot bench load --modes embedded --clients 4 --duration 10

--json FILE writes {"modes": {mode: {"ops": {op: {...}}, "jobs": {status: n}, ...}}, "config": {...}}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.procs import Proc, cli, create_key, redis_queue, serve, service_env, wait_up
from sparseshot.sample_data import CLASSES, render

OPS = ("upload", "submit", "poll", "classify")
MIX = {"upload": 2, "submit": 1, "poll": 4, "classify": 3}  # relative weights of the loop's picks
TRAIN_PER_CLASS = 2  # images per class in a tenant's training dataset
JOB_PARAMS = {"n_iters": 1, "batch_size": 6}  # 1 iteration x 2 shots: a job ends in seconds
TIMEOUT_S = 60.0  # one request; slower counts as a transport error


@dataclass(frozen=True)
class Config:
    modes: tuple[str, ...] = ("embedded", "distributed")
    clients: int = 32
    duration_s: float = 60.0
    max_requests: int = 200_000  # all clients together, per mode
    tenants: int = 4
    workers: int = 2  # distributed mode
    pg: str = "postgresql://postgres@127.0.0.1:5432"
    redis: str = "redis://127.0.0.1:6379/0"
    seed: int = 0


def percentile_ms(sorted_s: Sequence[float], p: float) -> float | None:
    """The nearest-rank p-quantile of sorted seconds, in milliseconds (None when empty)."""
    if not sorted_s:
        return None
    return sorted_s[max(0, math.ceil(p * len(sorted_s)) - 1)] * 1000


@dataclass
class OpStats:
    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    refused: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)  # the first few errors, then refusals, for the log

    def add(self, seconds: float, status: int | None, why: str = "") -> None:
        self.latencies_s.append(seconds)
        if status is not None and status < 400:
            self.ok += 1
            return
        refused = status is not None and status < 500
        if refused:
            self.refused += 1
        else:
            self.errors += 1
        if self.refused + self.errors <= 3 or (not refused and self.errors <= 5):
            self.samples.append(f"{status if status is not None else 'transport'}: {why[:200]}")

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {"requests": len(lat), "ok": self.ok, "refused": self.refused, "errors": self.errors,
                "p50_ms": percentile_ms(lat, 0.50), "p99_ms": percentile_ms(lat, 0.99),
                "mean_ms": statistics.fmean(lat) * 1000 if lat else None, "samples": self.samples}


class Recorder:
    """Per-operation figures, shared by the clients; counts every request against the budget."""

    def __init__(self, max_requests: int, deadline: float) -> None:
        self.ops = {op: OpStats() for op in OPS}
        self.max_requests, self.deadline = max_requests, deadline
        self.count = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        """A request may start: within the time and the request budget."""
        with self.lock:
            if self.count >= self.max_requests or time.monotonic() >= self.deadline:
                return False
            self.count += 1
            return True

    def call(self, op: str, h: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """One request, timed and recorded under `op`; None on a transport error."""
        t0 = time.perf_counter()
        try:
            r = h.request(method, path, **kw)
        except httpx.TransportError as e:
            with self.lock:
                self.ops[op].add(time.perf_counter() - t0, None, f"{type(e).__name__}: {e}")
            return None
        with self.lock:
            self.ops[op].add(time.perf_counter() - t0, r.status_code, "" if r.is_success else r.text)
        return r


# ---------------------------------------------------------------- tenants and clients


class Tenant:
    """A tenant's key, its training dataset, its jobs and its models ready to classify."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.train_dataset = ""
        self.jobs: list[str] = []  # not yet seen finished
        self.models: list[str] = []
        self.lock = threading.Lock()


def _files(rng: random.Random, n: int, cls: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{uuid.uuid4().hex[:8]}.png", render(cls, rng), "image/png")) for _ in range(n)]


def _prepare_tenant(url: str, tenant: Tenant, rng: random.Random) -> None:
    """Its training dataset (TRAIN_PER_CLASS images per class) and a zero-shot model."""
    with _http(url, tenant.key) as h:
        ds = _ok(h.post("/v1/datasets", json={"name": "load-train", "classes": list(CLASSES)}))
        for cls in CLASSES:
            _ok(h.post(f"/v1/datasets/{ds['id']}/images", data={"label": cls},
                       files=_files(rng, TRAIN_PER_CLASS, cls)))
        tenant.train_dataset = ds["id"]
        tenant.models.append(_ok(h.post("/v1/models/zeroshot", json={"classes": list(CLASSES)}))["id"])


def _create_dataset(url: str, key: str, name: str) -> str:
    with _http(url, key) as h:
        return str(_ok(h.post("/v1/datasets", json={"name": name, "classes": list(CLASSES)}))["id"])


def _ok(r: httpx.Response) -> Any:
    if not r.is_success:
        raise RuntimeError(f"setup: {r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}")
    return r.json()


def _http(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)


def _client_loop(url: str, tenant: Tenant, own: str, rec: Recorder, seed: int) -> None:
    """One client (uploads into its dataset `own`): weighted picks until the budget runs out."""
    rng = random.Random(seed)
    ops, weights = list(MIX), list(MIX.values())
    submit = {"dataset_id": tenant.train_dataset, "method": "so", "params": JOB_PARAMS}
    with _http(url, tenant.key) as h:
        while rec.take():
            op = rng.choices(ops, weights)[0]
            if op == "upload":
                cls = rng.choice(list(CLASSES))
                rec.call(op, h, "POST", f"/v1/datasets/{own}/images", data={"label": cls},
                         files=_files(rng, 2, cls))
            elif op == "submit":
                r = rec.call(op, h, "POST", "/v1/jobs", json=submit)
                if r is not None and r.status_code == 202:
                    with tenant.lock:
                        tenant.jobs.append(r.json()["id"])
            elif op == "poll" and tenant.jobs:
                _poll(h, tenant, rec, rng.choice(tenant.jobs))
            else:  # classify, or a poll with no job to poll yet
                files = [("files", (f"q{i}.png", render(cls, rng), "image/png"))
                         for i, cls in enumerate(rng.sample(list(CLASSES), 2))]
                rec.call("classify", h, "POST", f"/v1/models/{rng.choice(tenant.models)}/classify",
                         files=files, data={"top_k": "2"})


def _poll(h: httpx.Client, tenant: Tenant, rec: Recorder, job_id: str) -> None:
    r = rec.call("poll", h, "GET", f"/v1/jobs/{job_id}")
    if r is None or r.status_code != 200:
        return
    job = r.json()
    if job["status"] in ("succeeded", "failed", "cancelled"):
        with tenant.lock:
            if job_id in tenant.jobs:
                tenant.jobs.remove(job_id)
            if job["status"] == "succeeded" and job.get("model_id"):
                tenant.models.append(job["model_id"])


def drive(url: str, keys: Sequence[str], cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Prepare the tenants, run cfg.clients clients for cfg.duration_s; the figures."""
    tenants = [Tenant(k) for k in keys]
    rng = random.Random(cfg.seed)
    for t in tenants:
        _prepare_tenant(url, t, rng)
    owners = [tenants[i % len(tenants)] for i in range(cfg.clients)]
    own = [_create_dataset(url, t.key, f"load-upload-{i}") for i, t in enumerate(owners)]
    log(f"  {len(tenants)} tenants ready; {cfg.clients} clients for {cfg.duration_s:g} s")
    rec = Recorder(cfg.max_requests, time.monotonic() + cfg.duration_s)
    t0 = time.monotonic()
    threads = [threading.Thread(target=_client_loop, args=(url, owners[i], own[i], rec, cfg.seed + 1 + i),
                                daemon=True) for i in range(cfg.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(cfg.duration_s + 2 * TIMEOUT_S)
    elapsed = time.monotonic() - t0
    ops = {op: s.summary() for op, s in rec.ops.items()}
    return {"elapsed_s": elapsed, "requests": rec.count, "ops": ops,
            "models_trained_seen": sum(len(t.models) - 1 for t in tenants)}


# ---------------------------------------------------------------- the two deployments


@contextmanager
def embedded(root: Path, cfg: Config, log: Callable[[str], None]) -> Iterator[tuple[str, list[str]]]:
    """`sparseshot serve` on the defaults (SQLite, embedded worker): (URL, API keys)."""
    env = service_env(root / "data")
    cli(env, "migrate")
    keys = [create_key(env, f"load-{i}") for i in range(cfg.tenants)]
    proc, url = serve(env, root / "serve.log")
    try:
        wait_up(url, proc, path="/readyz")
        log(f"  embedded: {url}, log {proc.log}")
        yield url, keys
    finally:
        proc.stop()


@contextmanager
def distributed(root: Path, cfg: Config, log: Callable[[str], None]) -> Iterator[tuple[str, list[str]]]:
    """PostgreSQL (a throwaway database) + Redis (a queue of its own), `serve` API only and
    cfg.workers `sparseshot worker` processes: (URL, API keys)."""
    with _pg_database(cfg.pg) as db_url, redis_queue(cfg.redis, prefix="sparseshot-load") as queue:
        env = service_env(root / "data", SPARSESHOT_DATABASE_URL=db_url, SPARSESHOT_BROKER_URL=cfg.redis,
                          SPARSESHOT_QUEUE_NAME=queue)
        cli(env, "migrate")
        keys = [create_key(env, f"load-{i}") for i in range(cfg.tenants)]
        procs: list[Proc] = []
        try:
            proc, url = serve(env, root / "serve.log")
            procs.append(proc)
            procs += [Proc(["worker"], env, root / f"worker{i}.log") for i in range(cfg.workers)]
            wait_up(url, proc, path="/readyz")
            log(f"  distributed: {url}, {cfg.workers} workers, queue {queue}, logs in {root}")
            yield url, keys
        finally:
            for p in reversed(procs):
                p.stop()


@contextmanager
def _pg_database(server: str) -> Iterator[str]:
    """A new empty database on `server`, dropped (forcibly) afterwards."""
    from sqlalchemy import text

    from app.db import make_engine

    name = f"sparseshot_load_{uuid.uuid4().hex[:10]}"
    admin = make_engine(f"{server}/postgres")
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield f"{server}/{name}"
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


DEPLOYMENTS = {"embedded": embedded, "distributed": distributed}


def run(cfg: Config, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": {}, "config": asdict(cfg)}
    for mode in cfg.modes:
        log(f"{mode}:")
        with tempfile.TemporaryDirectory(prefix=f"sparseshot-load-{mode}-") as tmp:
            with DEPLOYMENTS[mode](Path(tmp), cfg, log) as (url, keys):
                figures = drive(url, keys, cfg, log)
                figures["jobs"] = _job_counts(url, keys)
            out["modes"][mode] = figures
    return out


def _job_counts(url: str, keys: Sequence[str]) -> dict[str, int]:
    """Jobs of every tenant by status, at the end of the run."""
    counts: dict[str, int] = {}
    for key in keys:
        with _http(url, key) as h:
            offset = 0
            while True:
                page = h.get("/v1/jobs", params={"limit": 100, "offset": offset}).json()
                for job in page:
                    counts[job["status"]] = counts.get(job["status"], 0) + 1
                if len(page) < 100:
                    break
                offset += 100
    return counts


def server_errors(result: dict[str, Any]) -> int:
    """5xx and transport errors over every mode and operation."""
    return sum(op["errors"] for m in result["modes"].values() for op in m["ops"].values())


def print_table(result: dict[str, Any]) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{'mode':12} {'op':9} {'requests':>9} {'ok':>7} {'refused':>8} {'errors':>7} "
          f"{'p50 ms':>9} {'p99 ms':>9}")
    for mode, m in result["modes"].items():
        for op, s in m["ops"].items():
            print(f"{mode:12} {op:9} {s['requests']:>9} {s['ok']:>7} {s['refused']:>8} {s['errors']:>7} "
                  f"{fmt(s['p50_ms']):>9} {fmt(s['p99_ms']):>9}")
        print(f"{mode:12} {m['requests']} requests in {m['elapsed_s']:.1f} s; jobs at the end: {m['jobs']}")
        for op, s in m["ops"].items():
            for sample in s["samples"]:
                print(f"{mode:12} {op:9} e.g. {sample}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparseshot bench load", description=__doc__.splitlines()[0])
    d = Config()
    ap.add_argument("--modes", default=",".join(d.modes), help="comma-separated: embedded, distributed")
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--duration", type=float, default=d.duration_s, help="seconds per mode")
    ap.add_argument("--max-requests", type=int, default=d.max_requests, help="per mode, all clients")
    ap.add_argument("--tenants", type=int, default=d.tenants)
    ap.add_argument("--workers", type=int, default=d.workers, help="worker processes (distributed mode)")
    ap.add_argument("--pg", default=d.pg, help="PostgreSQL server URL (distributed mode)")
    ap.add_argument("--redis", default=d.redis, help="Redis URL (distributed mode)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    modes = tuple(m for m in a.modes.split(",") if m)
    unknown = set(modes) - set(DEPLOYMENTS)
    if unknown or a.clients < 1 or a.tenants < 1 or a.duration <= 0 or a.max_requests < 1:
        ap.error(f"bad arguments (unknown modes: {sorted(unknown)})" if unknown else "bad arguments")
    cfg = Config(modes=modes, clients=a.clients, duration_s=a.duration, max_requests=a.max_requests,
                 tenants=min(a.tenants, a.clients), workers=a.workers, pg=a.pg, redis=a.redis, seed=a.seed)
    result = run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print_table(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 1 if server_errors(result) else 0


if __name__ == "__main__":
    raise SystemExit(main())
