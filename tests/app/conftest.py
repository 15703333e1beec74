"""Shared fixtures for the service tests: migrated SQLite and PostgreSQL databases, an app per test,
API keys, and image factories.

PostgreSQL: a fresh database `sparseshot_test_<random>` on 127.0.0.1:5432 (user postgres) for the
session, dropped at the end. Without a server the PostgreSQL cases are skipped, except under
CI=true where they fail.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from sqlalchemy import Engine, text

from app.core.config import Settings
from app.db import SessionLocal, make_engine
from app.main import create_app
from app.models import Base
from app.runtime import Runtime
from app.services import auth
from migrations import upgrade
from tests.fakes import RecordingQueue

BASE_SPEC = "sparseshot-tiny:random"


@pytest.fixture(scope="session")
def pg_url(fresh_pg_database) -> Iterator[str]:
    """A migrated, empty PostgreSQL database for this test session."""
    with fresh_pg_database("sparseshot_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def empty_pg_url(fresh_pg_database) -> Iterator[str]:
    """An empty (unmigrated) PostgreSQL database for one test."""
    with fresh_pg_database("sparseshot_test") as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def _truncate(engine: Engine) -> None:
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """An empty migrated database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    try:
        _truncate(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Small limits so each bad-input case needs only tiny files."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        base_model=BASE_SPEC,
        max_image_bytes=50_000,
        max_image_pixels=200 * 200,
        max_files_per_request=4,
        max_archive_bytes=400_000,
        max_archive_expanded_bytes=300_000,
        max_archive_files=10,
        max_classes=20,
    )


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def queue() -> RecordingQueue:
    """The app's training queue: a recorder (the real worker is exercised by the end-to-end tests)."""
    return RecordingQueue()


@pytest.fixture
def enqueued(queue: RecordingQueue) -> list[str]:
    """Job ids handed to the queue."""
    return queue.sent


@pytest.fixture
def client(settings: Settings, queue: RecordingQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, queue=queue), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def runtime(client: TestClient) -> Runtime:
    """The runtime context of the test's app: its base-model registry and its serving, new for
    each test and closed with the app."""
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    return rt


@pytest.fixture
def make_key(engine: Engine) -> Callable[[str], dict[str, str]]:
    """Authorization headers for a new key of the named tenant."""

    def make(tenant: str = "acme") -> dict[str, str]:
        with SessionLocal(bind=engine) as session:
            _row, plaintext = auth.create_key(session=session, tenant_name=tenant)
        return {"Authorization": f"Bearer {plaintext}"}

    return make


@pytest.fixture
def headers(make_key: Callable[[str], dict[str, str]]) -> dict[str, str]:
    return make_key("acme")


class Api:
    """Helpers over a TestClient authenticated as one tenant."""

    def __init__(self, client: TestClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    @staticmethod
    def image(
        color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (16, 16), fmt: str = "PNG"
    ) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format=fmt)
        return buf.getvalue()

    @staticmethod
    def zip(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    @staticmethod
    def problem(r: Response, status: int) -> dict[str, Any]:
        """Assert an RFC 7807 answer with this status; return its body."""
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert {"type", "title", "status", "detail"} <= set(body)
        assert body["status"] == status
        return body

    def dataset(self, classes: tuple[str, ...] = ("cat", "dog")) -> dict[str, Any]:
        r = self.client.post(
            "/v1/datasets", json={"name": "pets", "classes": list(classes)}, headers=self.headers
        )
        assert r.status_code == 201, r.text
        return r.json()

    def upload(
        self, dataset_id: str, label: str | None, *blobs: bytes, names: list[str] | None = None
    ) -> Response:
        names = names or [f"img{i}.png" for i in range(len(blobs))]
        files = [("files", (n, b, "image/png")) for n, b in zip(names, blobs, strict=True)]
        data = {"label": label} if label is not None else {}
        return self.client.post(
            f"/v1/datasets/{dataset_id}/images", data=data, files=files, headers=self.headers
        )

    def upload_archive(self, dataset_id: str, blob: bytes) -> Response:
        files = {"archive": ("set.zip", blob, "application/zip")}
        return self.client.post(f"/v1/datasets/{dataset_id}/images", files=files, headers=self.headers)

    def ready_dataset(self) -> dict[str, Any]:
        """A dataset with one image in each of its two classes."""
        ds = self.dataset()
        assert self.upload(ds["id"], "cat", self.image((255, 0, 0))).status_code == 201
        assert self.upload(ds["id"], "dog", self.image((0, 0, 255))).status_code == 201
        return ds

    def job(self, dataset_id: str, **extra: Any) -> Response:
        return self.client.post(
            "/v1/jobs", json={"dataset_id": dataset_id, "method": "so", **extra}, headers=self.headers
        )


@pytest.fixture
def api(client: TestClient, headers: dict[str, str]) -> Api:
    return Api(client, headers)
