"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from app import __doc__ as app_doc
from app.api.responses import install_openapi
from app.api.routes import console, datasets, health, images, jobs, models, webhooks
from app.core.config import Settings, get_settings
from app.errors import install_handlers
from app.metrics import LATENCY, REQUESTS
from app.middleware import CatchAll, RequestGuard
from app.queue import Queue
from app.runtime import Runtime


def _route_label(request: Request) -> str:
    # The route template (/v1/jobs/{job_id}), never the raw path: bounded label values.
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _summaries_from_docstrings(router: APIRouter) -> None:
    """Each operation's summary is its view's docstring's first line; the rest is its description."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.summary is None and route.description:
            first, _, rest = route.description.strip().partition("\n")
            route.summary = first.strip().rstrip(".")
            route.description = rest.strip() or first.strip()


def create_app(settings: Settings | None = None, *, queue: Queue | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment). The schema must be migrated.

    `queue` is the training queue (`sparseshot serve` passes worker.dispatch.CeleryQueue); without
    one, job creation fails cleanly and /readyz reports the broker not ready.
    """
    runtime = Runtime.build(settings or get_settings(), queue=queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runtime.close()

    app = FastAPI(
        title="SparseShot",
        version="1.0.0",
        summary=app_doc,
        description="Few-shot CLIP adaptation: datasets, training jobs, sparse-delta models, classify.",
        lifespan=lifespan,
        docs_url=None,  # served by app.api.routes.console from local assets (no CDN)
        redoc_url=None,
    )
    app.state.runtime = runtime
    install_handlers(app)
    install_openapi(app)
    # Added innermost first: observe -> CatchAll -> RequestGuard -> FastAPI's exception handling.
    app.add_middleware(RequestGuard, settings=runtime.settings, engine=runtime.engine)
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

    for module in (datasets, images, jobs, models, webhooks, health, console):
        _summaries_from_docstrings(module.router)
        app.include_router(module.router)
    app.mount(console.STATIC_URL, StaticFiles(directory=console.STATIC_DIR), name="static")
    return app
