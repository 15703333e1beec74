"""RFC 7807 problem details: the error type raised by services and the handlers that render it."""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://sparseshot.dev/problems/"


class Problem(Exception):
    """An error shown to the client as `application/problem+json`.

    `extra` members are added to the body (for example the list of rejected files).
    """

    status = 400
    title = "Bad request"
    slug = "bad-request"

    def __init__(
        self, detail: str, *, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}


class NotFound(Problem):
    status, title, slug = 404, "Not found", "not-found"


class Conflict(Problem):
    status, title, slug = 409, "Conflict", "conflict"


class ModelNotReady(Conflict):
    """The model cannot serve requests (yet): raised by the inference service, answered 409."""

    title, slug = "Model not ready", "model-not-ready"


class InvalidInput(Problem):
    status, title, slug = 422, "Invalid input", "invalid-input"


class TooLarge(Problem):
    status, title, slug = 413, "Payload too large", "too-large"


class Unauthorized(Problem):
    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Unavailable(Problem):
    status, title, slug = 503, "Service unavailable", "unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 5, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail, extra=extra, headers={"Retry-After": str(retry_after_s)})


class InsufficientStorage(Problem):
    status, title, slug = 507, "Insufficient storage", "insufficient-storage"


MAX_DETAIL_CHARS = 1000  # client input is quoted in details; never echo more than this
MAX_ERRORS = 20  # validation errors listed in a problem body


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` cut to `limit` characters, marked when cut."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def db_unavailable(exc: BaseException) -> Problem | None:
    """The problem to answer for a database failure that is not the request's fault, or None.

    Connection failures and timeouts: 503 with Retry-After (the engine reconnects by itself once the
    server is back). SQLite out of space: 507.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.OperationalError) and "disk is full" in str(exc.orig):
        return InsufficientStorage("the database is out of disk space; nothing was changed")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        return Unavailable("the database is unavailable; retry shortly")
    return None


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": clip(detail)}
    body.update(extra or {})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # JSON-safe members only (pydantic's `ctx` may hold exception objects), each clipped: the
    # location can hold client text (an unknown field's name) and the list can be long.
    from app.schemas import NAME_PATTERN

    out = []
    for e in exc.errors()[:MAX_ERRORS]:
        msg = str(e.get("msg", ""))
        if e.get("type") == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == NAME_PATTERN:
            msg = "must hold a visible character and no control characters"
        loc = [clip(str(p), 100) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": clip(msg, 300), "type": str(e.get("type", ""))})
    return out


async def _on_problem(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(
        exc.status, exc.title, exc.detail, slug=exc.slug, extra=exc.extra, headers=exc.headers
    )


async def _on_validation(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    extra: dict[str, Any] = {"errors": errors}
    if len(exc.errors()) > len(errors):
        extra["errors_total"] = len(exc.errors())
    return problem_response(422, "Validation error", detail, slug="validation", extra=extra)


async def _on_http(req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    if exc.status_code == 400 and detail.startswith(("Too many files", "Too many fields")):
        # The multipart parser's own cap (1000 parts): the request is too large, not malformed.
        limit = req.app.state.runtime.settings.max_files_per_request
        return _render(TooLarge(f"{detail.rstrip('.')}; this service takes at most {limit} files"))
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(req))
    slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}.get(exc.status_code, "http")
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
    return problem_response(exc.status_code, title, detail, slug=slug, headers=headers or None)


def _allowed_methods(req: Request) -> list[str]:
    """Every method of every route on this path (Starlette's own Allow names only one route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in req.app.routes:
        match, _ = route.matches({**req.scope, "method": "GET"}) if hasattr(route, "matches") else (None, {})
        if match in (Match.FULL, Match.PARTIAL):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _render(p: Problem) -> JSONResponse:
    return problem_response(p.status, p.title, p.detail, slug=p.slug, extra=p.extra, headers=p.headers)


async def _on_database(_req: Request, exc: Exception) -> JSONResponse:
    """Database failures: 503/507 when the database is down or full; NUL characters (PostgreSQL
    cannot store them) and other refused values: 422; anything else is a bug (500)."""
    from sqlalchemy import exc as sa_exc

    problem = db_unavailable(exc)
    if problem is None and isinstance(exc, sa_exc.DataError):
        problem = InvalidInput("a value cannot be stored: text must not hold NUL characters, and must fit")
    if problem is None:
        log.exception("database error", exc_info=exc)
        return problem_response(500, "Internal server error", "an unexpected error occurred", slug="internal")
    log.warning("database: %s", exc)
    return _render(problem)


async def _on_os_error(_req: Request, exc: Exception) -> JSONResponse:
    """Out of disk space while storing: 507 (what was being stored is not kept, nothing else lost)."""
    assert isinstance(exc, OSError)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full: %s", exc)
        return _render(InsufficientStorage("the service is out of storage space; nothing was stored"))
    log.exception("unhandled OS error", exc_info=exc)
    return problem_response(500, "Internal server error", "an unexpected error occurred", slug="internal")


def install_handlers(app: FastAPI) -> None:
    """Problem, validation, HTTP, database and OS errors. Everything else reaches
    app.middleware.CatchAll (a handler for `Exception` here would run in Starlette's
    ServerErrorMiddleware, which re-raises and drops the connection)."""
    from sqlalchemy.exc import SQLAlchemyError

    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(SQLAlchemyError, _on_database)
    app.add_exception_handler(OSError, _on_os_error)
