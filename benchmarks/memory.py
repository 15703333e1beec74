"""Peak server memory for the hostile-input cases of the hardening issue.

Each case runs in a fresh subprocess. HTTP cases start a real server (uvicorn, SQLite) in its own
process and stream the request from disk; a sampler reads the server's RSS every 5 ms and the
figure is peak - idle (idle: after start-up and the case's setup requests).

- classify16: classify 16 greyscale 6300x6300 PNGs (38 KB each, ~120 MB each as RGB)
- archive52:  one .zip of 52 stored PNGs of ~10 MB each (random pixels)
- dup200:     one .zip of 200 copies of one image (duplicates: time matters)
- worker10:   the worker loads a dataset of 10 greyscale 6300x6300 PNGs for training

The model is the tiny bundled one; classify's forward pass is replaced by a stand-in (decoding is
what is measured). worker10 runs in the case's process (the worker's loading function).

    python -m benchmarks.memory            # every case, one line each
    python -m benchmarks.memory classify16
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CASES = ("classify16", "archive52", "dup200", "worker10")
MB = 1024 * 1024


class Peak:
    """Samples this process's RSS in a thread until stopped; `.peak` in bytes."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _grey_png(side: int, shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), shade).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(nbytes: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _env(tmp: Path) -> None:
    os.environ.update({
        "SPARSESHOT_DATA_DIR": str(tmp), "SPARSESHOT_BASE_MODEL": "sparseshot-tiny:random",
        "SPARSESHOT_MAX_ARCHIVE_BYTES": str(1024 * MB),
        "SPARSESHOT_MAX_ARCHIVE_EXPANDED_BYTES": str(1024 * MB),
        "SPARSESHOT_MAX_IMAGE_BYTES": str(12 * MB),
    })


def _client(tmp: Path) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """A TestClient on a migrated SQLite database, a key, and a dataset with classes cat/dog."""
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app

    key = _key()
    headers = {"Authorization": f"Bearer {key}"}
    client = TestClient(create_app(get_settings()))
    ds = client.post("/v1/datasets", json={"name": "d", "classes": ["cat", "dog"]}, headers=headers).json()
    return client, headers, ds


def _key() -> str:
    import migrations
    from app.core.config import get_settings
    from app.db import SessionLocal, make_engine
    from app.services import auth

    settings = get_settings()
    migrations.upgrade(settings.database_url)
    with SessionLocal(bind=make_engine(settings.database_url)) as s:
        return auth.create_key(session=s, tenant_name=f"bench-{time.monotonic_ns()}")[1]


class Server:
    """`sparseshot serve --no-worker` in a subprocess (what is measured), with a fake forward pass
    for classify (installed by benchmarks.memory_server)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.key = _key()
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(self.port)])
        deadline = time.monotonic() + 60
        while not self._up():
            assert time.monotonic() < deadline and self.proc.poll() is None, "server did not start"
            time.sleep(0.2)

    def _up(self) -> bool:
        try:
            return self.call("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
             length: int | None = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": ctype}
        if length is not None:
            headers["Content-Length"] = str(length)
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data) if data else None

    def post_multipart(self, path: str, parts: list[tuple[str, str, bytes]], tmp: Path) -> tuple[int, Any]:
        """Stream a multipart body from a file on disk (the client holds one part at a time)."""
        body = tmp / "body.bin"
        with open(body, "wb") as f:
            for name, filename, data in parts:
                f.write(f'--B\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                        "Content-Type: application/octet-stream\r\n\r\n".encode())
                f.write(data + b"\r\n")
            f.write(b"--B--\r\n")
        with open(body, "rb") as f:
            return self.call("POST", path, f, "multipart/form-data; boundary=B", body.stat().st_size)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


_SERVER = """
import sys, uvicorn
import app.services.inference as inference
inference.classify = lambda *, model, images, top_k, **_: [
    {"filename": n, "labels": [{"label": "cat", "score": 1.0}]} for n, _ in images]
inference.create_zeroshot_delta = lambda *, classes, base_model, template: (
    __import__("app.storage", fromlist=["x"]).get_storage().put(repr(classes).encode()), 0, 1, 0.0)
uvicorn.run("app.main:create_app", factory=True, port=int(sys.argv[1]), log_level="warning")
"""


def _measure_server(server: Server, run: Callable[[], Any]) -> dict[str, Any]:
    idle = server.rss()
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            try:
                peak[0] = max(peak[0], server.rss())
            except Exception:
                return

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        detail = run()
    finally:
        stop.set()
        t.join()
        server.close()
    return {"peak_over_idle_mb": round((peak[0] - idle) / MB, 1),
            "seconds": round(time.perf_counter() - t0, 2), "result": detail}


def _measure(prepare: Callable[[], Callable[[], Any]]) -> dict[str, Any]:
    run = prepare()
    idle = Peak()._proc.memory_info().rss
    t0 = time.perf_counter()
    with Peak() as p:
        detail = run()
    seconds = round(time.perf_counter() - t0, 2)
    return {"peak_over_idle_mb": round((p.peak - idle) / MB, 1), "seconds": seconds, "result": detail}


def case_classify16(tmp: Path) -> dict[str, Any]:
    server = Server()
    _status, model = server.call("POST", "/v1/models/zeroshot", json.dumps({"classes": ["cat", "dog"]}))
    parts = [("files", f"{i}.png", _grey_png(6300, i)) for i in range(16)]
    path = f"/v1/models/{model['id']}/classify"
    return _measure_server(server, lambda: server.post_multipart(path, parts, tmp)[0])


def _archive_case(tmp: Path, members: Callable[[], dict[str, bytes]]) -> dict[str, Any]:
    server = Server()
    _status, ds = server.call("POST", "/v1/datasets", json.dumps({"name": "d", "classes": ["cat", "dog"]}))
    parts = [("archive", "a.zip", _zip(members()))]

    def run() -> Any:
        status, body = server.post_multipart(f"/v1/datasets/{ds['id']}/images", parts, tmp)
        counts = {k: len(body.get(k, [])) for k in ("added", "rejected")}
        return {"status": status, **counts}

    return _measure_server(server, run)


def case_archive52(tmp: Path) -> dict[str, Any]:
    return _archive_case(tmp, lambda: {f"cat/{i}.png": _noise_png(10 * MB - 4096, i) for i in range(52)})


def case_dup200(tmp: Path) -> dict[str, Any]:
    one = _noise_png(35_000, 0)
    return _archive_case(tmp, lambda: {f"cat/{i}.png": one for i in range(200)})


def case_worker10(tmp: Path) -> dict[str, Any]:
    from app.core.config import get_settings
    from app.runtime import Runtime
    from worker import tasks

    def prepare() -> Callable[[], Any]:
        client, headers, ds = _client(tmp)
        for label, shades in (("cat", range(5)), ("dog", range(5, 10))):
            files = [("files", (f"{i}.png", _grey_png(6300, i), "image/png")) for i in shades]
            r = client.post(f"/v1/datasets/{ds['id']}/images", data={"label": label}, files=files,
                            headers=headers)
            assert r.status_code == 201, r.text
        claim = tasks.Claim(job_id="j", worker="w", attempt=1, tenant_id="t", dataset_id=ds["id"],
                            method="so", base_model="sparseshot-tiny:random", params={})
        runtime = Runtime.build(get_settings())  # the worker process's context
        runtime.bases.get(claim.base_model)  # loaded before the measurement (as in a running worker)
        held: list[Any] = []
        return lambda: held.append(tasks.load_examples(claim, runtime)) or len(held[0][1])

    return _measure(prepare)


def _one(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        _env(Path(d))
        return {"case": name, **globals()[f"case_{name}"](Path(d))}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        print(json.dumps(_one(argv[1])))
        return 0
    for name in argv or CASES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", name],
                             capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        print(lines[-1] if out.returncode == 0 and lines else f"{name}: failed\n{out.stderr[-2000:]}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
