"""The database going away under a running app and coming back: a real PostgreSQL behind a TCP
proxy this test controls (the shared server itself is never stopped). While the proxy is cut,
endpoints answer 503 problem+json with Retry-After and /readyz says why; once it is restored,
the very next requests succeed with no restart, also when no request saw it down (stale pooled
connections are checked before use: pool_pre_ping).
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import suppress

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.db import SessionLocal, make_engine
from app.main import create_app
from app.services import auth
from tests.app.conftest import BASE_SPEC
from tests.fakes import RecordingQueue


class TcpProxy:
    """127.0.0.1:<port> forwarded to `target`. cut(): every open connection closed, new ones
    accepted and closed at once (the server is gone); restore(): forwarding again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = True
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        # One direction of a connection; either side ending (or cut()) closes both.
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._open.discard(s)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            socks = list(self._open)
        self._drop(*socks)

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = make_url(pg_url)
    p = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    yield p
    p.close()


def _problem_503(r) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["Retry-After"]) > 0 and r.json()["status"] == 503


def test_database_down_is_503_readyz_says_why_and_the_app_recovers(
        pg_url: str, proxy: TcpProxy, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"dbfault-{uuid.uuid4().hex[:6]}"
    engine = make_engine(pg_url)
    with SessionLocal(bind=engine) as session:
        _row, key = auth.create_key(session=session, tenant_name=tenant)
    engine.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    via_proxy = make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = Settings(data_dir=tmp_path / "data", database_url=via_proxy, base_model=BASE_SPEC)
    new_dataset = {"name": "pets", "classes": ["cat", "dog"]}

    api = create_app(settings, queue=RecordingQueue())
    monkeypatch.setattr(api.state.runtime.bases, "ready", lambda *_a, **_k: True)
    with TestClient(api, raise_server_exceptions=False) as c:
        ds = c.post("/v1/datasets", json=new_dataset, headers=headers)
        assert ds.status_code == 201, ds.text
        assert c.get("/readyz").status_code == 200  # the pool now holds live connections

        proxy.cut()
        for method, path, kw in (("GET", "/v1/datasets", {}), ("POST", "/v1/datasets", {"json": new_dataset}),
                                 ("GET", f"/v1/datasets/{ds.json()['id']}", {}), ("GET", "/v1/jobs", {}),
                                 ("GET", "/v1/models", {})):
            _problem_503(c.request(method, path, headers=headers, **kw))
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
        assert ready.json()["reasons"]["database"]  # why: the driver's error
        assert ready.json()["checks"]["broker"] is True

        proxy.restore()
        listed = c.get("/v1/datasets", headers=headers)  # the first request after: no retry needed
        assert listed.status_code == 200, listed.text
        assert [d["id"] for d in listed.json()] == [ds.json()["id"]]  # nothing was written meanwhile
        assert c.post("/v1/datasets", json=new_dataset, headers=headers).status_code == 201
        assert c.get("/readyz").status_code == 200

        # Down and back with no request in between (a database restart at night): the pooled
        # connections are all dead, and are checked before use rather than failing a request.
        proxy.cut()
        proxy.restore()
        for _ in range(3):
            r = c.get("/v1/datasets", headers=headers)
            assert r.status_code == 200 and len(r.json()) == 2, r.text
