"""The Celery app of a worker process, for `celery -A worker.main worker` (what `sparseshot worker`
and the embedded worker run): built here, at import, from the process settings."""

from __future__ import annotations

from app.core.config import get_settings
from worker.celery_app import make_celery

app = make_celery(get_settings())
