"""Service processes on loopback, for the load benchmark and the end-to-end tests: `sparseshot serve`
and `sparseshot worker` as child processes in their own groups, logging to files, over a data folder
and an environment of their own (the caller's SPARSESHOT_* variables are not inherited).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TINY_BASE = "sparseshot-tiny:random"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a service process: `data_dir`, the tiny random base, CPU, one thread,
    frequent progress reports, a step limit high enough for trainings that run until stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESHOT_")}
    env.update(
        SPARSESHOT_DATA_DIR=str(data_dir),
        SPARSESHOT_BASE_MODEL=TINY_BASE,
        SPARSESHOT_PROGRESS_INTERVAL_S="0.2",
        SPARSESHOT_MAX_STEPS_PER_JOB="1000000",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Proc:
    """`python -m app.cli ARGS` in its own process group, logging to `log`; stopped with its group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, stdout=self._fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL for anything left in the group (embedded worker, pool children)."""
        if self.p.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """`sparseshot ARGS` to completion; its stdout (RuntimeError with the output when it fails)."""
    out = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"sparseshot {' '.join(args)}: rc {out.returncode}\n{out.stdout}{out.stderr}")
    return out.stdout


def create_key(env: dict[str, str], tenant: str | None = None) -> str:
    """A new API key (plaintext) of `tenant` (default: a new random tenant name)."""
    tenant = tenant or f"t-{uuid.uuid4().hex[:6]}"
    return cli(env, "keys", "create", "--tenant", tenant).strip().splitlines()[-1]


def serve(env: dict[str, str], log: Path, *args: str) -> tuple[Proc, str]:
    """`sparseshot serve` on a free loopback port: (process, base URL). Not waited for: see wait_up."""
    port = free_port()
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port), *args], env, log)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(url: str, proc: Proc, timeout: float = 90, path: str = "/healthz") -> None:
    """Until GET `path` answers 200; RuntimeError (with the log's tail) when the process exits first
    or `timeout` passes."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.p.poll() is not None:
                raise RuntimeError(f"server exited:\n{proc.tail()}")
            try:
                if http.get(path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"server not up in {timeout}s:\n{proc.tail()}")


@contextmanager
def redis_queue(url: str, *, prefix: str) -> Iterator[str]:
    """A queue name of its own on Redis `url`; its keys, and its unacknowledged messages (kombu keeps
    those of every queue in one shared hash), are deleted afterwards."""
    import redis

    queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    client.ping()
    try:
        yield queue
    finally:
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)
        for tag, payload in client.hgetall("unacked").items():
            if queue.encode() in payload:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        client.close()
