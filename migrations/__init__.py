"""Alembic migrations for the service's database (`sparseshot migrate` runs `upgrade head`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

INI = Path(__file__).with_name("alembic.ini")


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic Config for this package; `database_url` overrides the settings' URL."""
    cfg = Config(str(INI))
    cfg.set_main_option("script_location", str(INI.parent))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `database_url` (default: settings) to `revision`."""
    command.upgrade(alembic_config(database_url), revision)
