"""`sparseshot serve` stops its embedded worker when it is told to stop (SIGTERM or SIGINT)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from PIL import Image

from benchmarks.procs import free_port


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _call(port: int, method: str, path: str, key: str, body: bytes | None = None,
          ctype: str = "application/json") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _start_training(port: int, env: dict[str, str]) -> None:
    """A long training job, waited for until it runs."""
    out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "t"], env=env,
                         capture_output=True, text=True, check=True).stdout
    key = out.strip().splitlines()[-1]
    ds = _call(port, "POST", "/v1/datasets", key, json.dumps({"name": "d", "classes": ["a", "b"]}).encode())
    for label, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        body = (b"--B\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n" + label.encode()
                + b"\r\n--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
                + b"Content-Type: image/png\r\n\r\n" + buf.getvalue() + b"\r\n--B--\r\n")
        _call(port, "POST", f"/v1/datasets/{ds['id']}/images", key, body, "multipart/form-data; boundary=B")
    spec = {"dataset_id": ds["id"], "params": {"n_iters": 1_000_000, "early_stop_loss": 0.0}}
    job = _call(port, "POST", "/v1/jobs", key, json.dumps(spec).encode())
    _wait(lambda: _call(port, "GET", f"/v1/jobs/{job['id']}", key)["status"] == "running", 120, "training")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_serve_stops_the_embedded_worker(tmp_path, sig) -> None:
    env = {**os.environ, "SPARSESHOT_DATA_DIR": str(tmp_path), "SPARSESHOT_BROKER_URL": "",
           "SPARSESHOT_BASE_MODEL": "sparseshot-tiny:random", "SPARSESHOT_DATABASE_URL": "",
           "SPARSESHOT_MAX_STEPS_PER_JOB": "1000000000",  # a training that runs until stopped
           "PYTHONPATH": os.getcwd()}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env)
    workers: list[psutil.Process] = []
    try:
        _wait(lambda: _up(port), 90, "the server")
        serve = psutil.Process(proc.pid)
        _wait(lambda: any("celery" in " ".join(c.cmdline()) for c in serve.children()), 60, "the worker")
        _start_training(port, env)  # a busy worker: a warm shutdown alone would wait for the job
        workers[:] = serve.children(recursive=True)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"worker processes left behind: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in workers:  # never leave a training process behind, even when the test fails
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
