"""Requests are refused early and answered truthfully: body limits before reading, auth before
parsing, bounded error bodies, no 500s on odd input, 503/507 on faults. Some cases need a real
server on loopback (raw sockets, keep-alive), the rest use the TestClient."""

from __future__ import annotations

import errno
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from app.core.config import Settings
from app.main import create_app
from app.storage import LocalStorage


@pytest.fixture
def server(settings: Settings, queue) -> Iterator[tuple[str, int]]:
    """The app under a real uvicorn on a free loopback port: (host, port)."""
    config = uvicorn.Config(create_app(settings, queue=queue), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    srv.should_exit = True
    t.join(10)


def _raw(addr: tuple[str, int], head: str, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send a request head (and optionally part of a body); return what the server answers."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + body)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b'"status"' in b"".join(chunks):
                break
        return b"".join(chunks)


def test_no_key_is_401_before_a_300_mb_body_is_read(server, settings: Settings, api) -> None:
    ds = api.dataset()
    head = (f"POST /v1/datasets/{ds['id']}/images HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 314572800\r\n\r\n")
    start = time.monotonic()
    answer = _raw(server, head, b"--b\r\n")  # the body is never sent: the answer must not wait for it
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"application/problem+json" in answer and time.monotonic() - start < 5


def test_content_length_over_the_limit_is_413_before_reading(server, headers, api) -> None:
    ds = api.dataset()
    auth = headers["Authorization"]
    head = (f"POST /v1/datasets/{ds['id']}/images HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 314572800\r\n\r\n")
    answer = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"over the limit" in answer


def test_chunked_body_is_cut_off_at_the_limit(server, headers, settings: Settings, api) -> None:
    ds = api.dataset()
    conn = http.client.HTTPConnection(*server, timeout=20)
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    chunk = part + b"x" * 65536
    sent = [0]

    def body() -> Iterator[bytes]:
        while sent[0] < 20 * settings.archive_body_limit:
            sent[0] += len(chunk)
            yield chunk

    try:
        conn.request("POST", f"/v1/datasets/{ds['id']}/images", body=body(), encode_chunked=True,
                     headers={**headers, "Content-Type": "multipart/form-data; boundary=b"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    r = conn.getresponse()
    assert r.status == 413, r.read()[:300]
    assert r.getheader("content-type").startswith("application/problem+json")
    conn.close()


def test_unexpected_error_is_500_and_the_keep_alive_connection_survives(server, headers, monkeypatch) -> None:
    from app.services import datasets

    def broken(**_: Any) -> list:
        raise RuntimeError("a bug")

    monkeypatch.setattr(datasets, "list_datasets", broken)
    conn = http.client.HTTPConnection(*server, timeout=10)
    conn.request("GET", "/v1/datasets", headers=headers)
    r = conn.getresponse()
    assert r.status == 500 and json.loads(r.read())["title"] == "Internal server error"
    conn.request("GET", "/healthz")  # the same connection
    r = conn.getresponse()
    assert r.status == 200 and r.read()
    conn.close()


def test_json_body_over_its_limit_is_413_and_details_never_echo_huge_input(api, settings: Settings) -> None:
    big = "x" * (settings.max_json_body_bytes + 10)
    api.problem(api.client.post("/v1/jobs", json={"dataset_id": big}, headers=api.headers), 413)
    under = "y" * (settings.max_json_body_bytes // 2)
    r = api.client.post("/v1/jobs", json={"dataset_id": under}, headers=api.headers)
    api.problem(r, 404)
    assert len(r.content) < 3000
    # 100k invalid classes: a bounded error body that still says how many were wrong.
    many = {"name": "x", "classes": ["\u001f"] * 100_000}
    r = api.client.post("/v1/datasets", json=many, headers=api.headers)
    body = api.problem(r, 422)
    assert len(r.content) < 10_000 and body["errors_total"] == 100_000


def test_offset_beyond_any_listing_is_422(api) -> None:
    for path in ("/v1/datasets", "/v1/jobs", "/v1/models"):
        api.problem(api.client.get(f"{path}?offset={2**63}", headers=api.headers), 422)
        assert api.client.get(f"{path}?offset={2**31 - 1}", headers=api.headers).json() == []


@pytest.mark.parametrize("bad", ["\u001f", "a\x00b", "  ", "\x7f", "cat\n", "a\u2028b", "\u2029"])
def test_class_names_with_control_characters_are_422(api, bad: str) -> None:
    for path in ("/v1/datasets", "/v1/models/zeroshot"):
        body: dict[str, Any] = {"classes": [bad, "dog"]}
        if path == "/v1/datasets":
            body["name"] = "pets"
        r = api.client.post(path, json=body, headers=api.headers)
        assert "control characters" in api.problem(r, 422)["detail"]


def test_labels_and_classes_are_nfc_normalised(api) -> None:
    ds = api.dataset(classes=("cafe\u0301", "tea"))
    assert ds["classes"] == ["caf\u00e9", "tea"]
    assert api.upload(ds["id"], "cafe\u0301", api.image()).status_code == 201
    assert api.upload(ds["id"], "caf\u00e9", api.image((0, 9, 0))).status_code == 201
    zf = api.zip({"cafe\u0301/a.png": api.image((1, 2, 3))})
    assert api.upload_archive(ds["id"], zf).json()["added"][0]["label"] == "caf\u00e9"
    r = api.client.post("/v1/datasets", json={"name": "x", "classes": ["caf\u00e9", "cafe\u0301"]},
                        headers=api.headers)
    assert "unique" in api.problem(r, 422)["detail"]


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "sk_abc_def", "Token sk_abc_def"])
def test_wrong_authorization_schemes_say_use_bearer(api, value: str) -> None:
    r = api.client.get("/v1/datasets", headers={"Authorization": value})
    assert "Authorization: Bearer <key>" in api.problem(r, 401)["detail"]
    body = {"name": "x", "classes": ["a", "b"]}
    r = api.client.post("/v1/datasets", json=body, headers={"Authorization": value})
    assert "Bearer" in api.problem(r, 401)["detail"]


def test_1001_files_is_413(api) -> None:
    ds = api.dataset()
    files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(1001)]
    path = f"/v1/datasets/{ds['id']}/images"
    r = api.client.post(path, data={"label": "cat"}, files=files, headers=api.headers)
    assert "at most" in api.problem(r, 413)["detail"]


def test_empty_archive_is_422(api) -> None:
    ds = api.dataset()
    api.problem(api.upload_archive(ds["id"], api.zip({})), 422)
    api.problem(api.upload_archive(ds["id"], api.zip({"__MACOSX/cat/._a.png": b"x"})), 422)


def test_nul_characters_and_long_names_are_4xx_on_every_backend(api) -> None:
    ds = api.dataset()
    assert api.client.get("/v1/datasets/a%00b", headers=api.headers).status_code == 404
    r = api.client.post("/v1/jobs", json={"dataset_id": "a\x00b"}, headers=api.headers)
    assert r.status_code in (404, 422), r.text
    r = api.client.post("/v1/datasets", json={"name": "a\x00", "classes": ["a", "b"]}, headers=api.headers)
    api.problem(r, 422)
    api.problem(api.upload(ds["id"], "x" * 10_000, api.image()), 422)
    api.problem(api.upload(ds["id"], "ca\x00t", api.image()), 422)
    r = api.upload(ds["id"], "cat", api.image(), names=["a\x00b.png"])
    assert r.status_code == 201 and "\x00" not in r.json()["added"][0]["filename"]
    r = api.client.post("/v1/models/zeroshot", json={"classes": ["a", "b"], "template": "x\x00 {}"},
                        headers=api.headers)
    assert r.status_code == 422, r.text


def test_disk_full_while_storing_is_507_and_loses_nothing(api, settings: Settings, monkeypatch) -> None:
    ds = api.dataset()
    kept = api.image((1, 1, 1))
    assert api.upload(ds["id"], "cat", kept).status_code == 201
    real_put, calls = LocalStorage.put, [0]

    def put(self: LocalStorage, data: bytes) -> str:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, data)

    monkeypatch.setattr(LocalStorage, "put", put)
    r = api.upload(ds["id"], "cat", api.image((2, 2, 2)), api.image((3, 3, 3)), kept)
    api.problem(r, 507)
    got = api.client.get(f"/v1/datasets/{ds['id']}", headers=api.headers).json()
    assert got["image_counts"] == {"cat": 1, "dog": 0}  # nothing half-written
    files = [p for p in settings.storage_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == kept  # nothing stored lost, no orphan


def test_zip_members_are_read_one_at_a_time(api, monkeypatch) -> None:
    from app.services import images

    live, peak = [0], [0]
    real = images._read_member

    def counting(*args: Any) -> Any:
        member = real(*args)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return member

    real_take = __import__("app.services.datasets", fromlist=["_take"])._take

    def take(*args: Any) -> None:
        real_take(*args)
        live[0] -= 1

    monkeypatch.setattr(images, "_read_member", counting)
    monkeypatch.setattr("app.services.datasets._take", take)
    ds = api.dataset()
    zf = api.zip({f"cat/{i}.png": api.image((i, 0, 0)) for i in range(6)})
    assert len(api.upload_archive(ds["id"], zf).json()["added"]) == 6
    assert peak[0] == 1


def test_readyz_says_why_the_database_is_not_ready(settings: Settings, enqueued, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    bad = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/none"})
    api = create_app(bad)
    monkeypatch.setattr(api.state.runtime.bases, "ready", lambda *_a, **_k: True)
    with TestClient(api, raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and not r.json()["checks"]["database"]
        assert "OperationalError" in r.json()["reasons"]["database"]
        r = c.get("/v1/datasets", headers={"Authorization": "Bearer sk_a_b"})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.headers["content-type"].startswith("application/problem+json")
