"""Alembic environment: runs migrations on the settings' database (or sqlalchemy.url if given)."""

from __future__ import annotations

from alembic import context

from app.core.config import get_settings
from app.db import make_engine, normalize_url
from app.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    # Migrations stay independent of app code: the UTC wrapper is a plain timezone-aware DateTime.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _url() -> str:
    return normalize_url(config.get_main_option("sqlalchemy.url") or get_settings().database_url)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            # render_as_batch: later ALTERs also work on SQLite (table copy).
            context.configure(
                connection=conn,
                target_metadata=target_metadata,
                render_as_batch=True,
                render_item=_render_item,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
