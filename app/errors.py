"""RFC 7807 problem details: the error type raised by services and the handlers that render it."""

from __future__ import annotations

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


class QuotaExceeded(Problem):
    """A per-tenant limit (app/quotas.py): the body names it, its value and the current usage."""

    status, title, slug = 429, "Quota exceeded", "quota-exceeded"

    def __init__(self, detail: str, *, limit: str, value: int, current: int) -> None:
        super().__init__(detail, extra={"limit": limit, "value": value, "current": current})


class Unavailable(Problem):
    status, title, slug = 503, "Service unavailable", "unavailable"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    body.update(extra or {})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Keep JSON-safe members only (pydantic's `ctx` may hold exception objects).
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in exc.errors()
    ]


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
    return problem_response(422, "Validation error", detail, slug="validation", extra={"errors": errors})


async def _on_http(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}.get(exc.status_code, "http")
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
    return problem_response(
        exc.status_code, title, str(exc.detail), slug=slug, headers=getattr(exc, "headers", None)
    )


async def _on_unexpected(_req: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "Internal server error", "an unexpected error occurred", slug="internal")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
