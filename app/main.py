"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from app import __doc__ as app_doc
from app.api.responses import install_openapi
from app.api.routes import datasets, health, jobs, models
from app.core.config import Settings, get_settings
from app.db import make_engine
from app.errors import install_handlers
from app.metrics import LATENCY, REQUESTS
from app.middleware import CatchAll, RequestGuard
from app.storage import get_storage


def _route_label(request: Request) -> str:
    # The route template (/v1/jobs/{job_id}), never the raw path: bounded label values.
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment). The schema must be migrated."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="SparseShot",
        version="1.0.0",
        summary=app_doc,
        description="Few-shot CLIP adaptation: datasets, training jobs, sparse-delta models, classify.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.storage = get_storage(settings)
    install_handlers(app)
    install_openapi(app)
    # Added innermost first: observe -> CatchAll -> RequestGuard -> FastAPI's exception handling.
    app.add_middleware(RequestGuard, settings=settings, engine=engine)
    app.add_middleware(CatchAll)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = _route_label(request)
            REQUESTS.labels(request.method, route, str(status)).inc()
            LATENCY.labels(request.method, route).observe(time.perf_counter() - start)

    for module in (datasets, jobs, models, health):
        app.include_router(module.router)
    return app
