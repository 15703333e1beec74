"""Settings from SPARSESHOT_* environment variables."""

from __future__ import annotations

import pytest

from app.core.config import Settings
from app.db import normalize_url


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "DATA_DIR", "BASE_MODEL"):
        monkeypatch.delenv(f"SPARSESHOT_{name}", raising=False)
    s = Settings()
    assert s.database_url == "sqlite:///data/sparseshot.db" and s.broker_url == ""
    assert s.max_image_bytes == 10 * 1024 * 1024 and s.base_model == "ViT-B-16:openai"
    monkeypatch.setenv("SPARSESHOT_DATA_DIR", str(tmp_path))
    assert Settings().database_url == f"sqlite:///{tmp_path}/sparseshot.db"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSESHOT_DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("SPARSESHOT_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("SPARSESHOT_MAX_FILES_PER_REQUEST", "7")
    monkeypatch.setenv("SPARSESHOT_ALLOWED_BASE_MODELS", '["ViT-B-32:openai"]')
    s = Settings()
    assert (s.database_url, s.broker_url, s.max_files_per_request) == (
        "postgresql://u@db/x",
        "redis://redis:6379/0",
        7,
    )
    assert s.allowed_base_models == ["ViT-B-32:openai"]
    monkeypatch.setenv("SPARSESHOT_MAX_IMAGE_BYTES", "0")
    with pytest.raises(ValueError):
        Settings()


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
