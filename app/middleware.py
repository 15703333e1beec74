"""ASGI middleware that guards every request before FastAPI parses it, and a last-resort 500.

- `RequestGuard`: paths with control characters are refused (404); requests with a body to /v1
  are authenticated from the header before one byte of the body is read (401, 503 when the
  database is down); bodies are bounded (413) from Content-Length, and a body sent without one
  (chunked) is cut off as soon as it passes the limit.
- `CatchAll`: an unexpected exception becomes a 500 problem+json response *here*, without
  re-raising it through Starlette's ServerErrorMiddleware (which would reset the keep-alive
  connection after answering).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from anyio import to_thread
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings
from app.errors import Problem, TooLarge, db_unavailable, problem_response

log = logging.getLogger(__name__)

_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_ARCHIVE_ROUTE = re.compile(r"^/v1/datasets/[^/]+/images/?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def body_limit(settings: Settings, path: str, content_type: str) -> int:
    """The most bytes a request body to `path` may have (the one place these limits are chosen)."""
    if not content_type.lower().startswith("multipart/"):
        return settings.max_json_body_bytes
    if _ARCHIVE_ROUTE.match(path):
        return settings.archive_body_limit
    return settings.upload_body_limit


class _BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_problem(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    response = problem_response(problem.status, problem.title, problem.detail, slug=problem.slug,
                                extra=problem.extra, headers=problem.headers)
    await response(scope, receive, send)


def _authenticate(engine: Any, header: str | None) -> None:
    """Raise Unauthorized (or 503 when the database is down) unless the header holds a live key."""
    from app.services import auth

    key = auth.key_from_header(header)
    try:
        with Session(bind=engine) as session:
            auth.authenticate(session=session, key=key)
    except Problem:
        raise
    except Exception as e:
        problem = db_unavailable(e)
        if problem is None:
            raise
        raise problem from e


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings, engine: Any) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            limit = await self._check(scope)
        except Problem as p:
            await _send_problem(scope, receive, send, p)
            return
        if limit is None:
            await self.app(scope, receive, send)
            return
        await self._bounded(scope, receive, send, limit)

    async def _check(self, scope: Scope) -> int | None:
        """Refusals from the request line and headers alone; the body limit (None: no body)."""
        from app.errors import NotFound

        path = scope.get("path", "")
        if _CONTROL.search(path):
            raise NotFound("no such resource (the path holds control characters)")
        if scope.get("method") not in _BODY_METHODS:
            return None
        if path.startswith("/v1/"):
            await to_thread.run_sync(_authenticate, self.engine, _header(scope, b"authorization"))
        limit = body_limit(self.settings, path, _header(scope, b"content-type") or "")
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise TooLarge(f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        return limit

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app on a receive channel that stops at `limit` bytes; once it did, whatever
        the app makes of the cut-off body is replaced by a 413."""
        state = {"read": 0, "over": False, "started": False}

        async def bounded_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                return  # the app's answer to a truncated body; ours follows
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            detail = f"request body is over the limit of {limit} bytes"
            await _send_problem(scope, receive, send, TooLarge(detail))


class CatchAll:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # nothing sensible can follow a response already under way
                raise
            response = problem_response(500, "Internal server error", "an unexpected error occurred",
                                        slug="internal")
            await response(scope, receive, send)
