"""Sending the webhook outbox: due `WebhookDelivery` rows are POSTed, retried with backoff, logged.

Where it runs: a daemon thread (`Dispatcher`) in the worker's main process (started beside the
recovery sweep, worker.tasks) and in the `sparseshot serve` process (app.cli), so it runs in the
embedded setup too, and a job the API ends (a queued job cancelled) is notified without a worker.
Not a Celery task on the training queue: a worker's pool runs one training at a time, for hours,
and a notification would wait behind it. The thread only does short network calls, in a process
that never trains (the pool child does), so neither the training loop nor a request waits on a
receiver.

Every dispatcher may send any due row: an attempt is claimed by one conditional UPDATE (attempts
as read, due now) that also pushes `next_attempt_at` past the attempt's longest duration (a
lease), so two dispatchers never send the same attempt, and one that dies mid-attempt leaves the
row due again when the lease ends. The result is written conditionally on the attempt claimed.

One attempt: the target is checked again (app.webhooks.targets, fresh DNS) and the POST goes to
the address just checked; `webhook_timeout_s` for connect and response; redirects are not
followed (a 3xx is a failure); a 2xx is delivered; anything else is retried after
`webhook_backoff_s` x 2^(attempt-1) (at most `webhook_backoff_max_s`) until
`webhook_max_attempts`, then the row is `failed`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db import session_scope
from app.models import Job, Tenant, WebhookDelivery, utcnow
from app.runtime import Runtime
from app.webhooks import signing, targets

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
MAX_ERROR_CHARS = 300
LEASE_SLACK_S = 30.0
USER_AGENT = "SparseShot-Webhook/1"


def backoff_s(settings: Settings, attempt: int) -> float:
    """Seconds before the attempt after `attempt` (1-based): doubling, capped."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s))


def deliver_due(runtime: Runtime, *, limit: int = 20) -> int:
    """One pass: every delivery due now is attempted once (in due order); returns attempts made."""
    now = utcnow()
    with session_scope(runtime.engine) as s:
        due = s.execute(
            select(WebhookDelivery.id, WebhookDelivery.attempts)
            .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)
        ).all()
    return sum(attempt_once(runtime, delivery_id=d, seen_attempts=a) for d, a in due)


def attempt_once(runtime: Runtime, *, delivery_id: str, seen_attempts: int) -> bool:
    """Claim, send and record one attempt; False when another dispatcher had claimed it."""
    settings = runtime.settings
    started = utcnow()
    claimed = _claim(runtime, delivery_id, seen_attempts, started)
    if claimed is None:
        return False
    url, body, secret, event = claimed
    attempt = seen_attempts + 1
    entry = _send(settings, url=url, body=body, secret=secret, event=event, delivery_id=delivery_id)
    entry = {"attempt": attempt, "at": started.isoformat(), **entry}
    _record(runtime, delivery_id, attempt, entry)
    return True


def _claim(runtime: Runtime, delivery_id: str, seen: int,
           now: datetime) -> tuple[str, bytes, str, str] | None:
    # (url, body, secret, event) of the attempt just claimed; the body is fixed on the first one.
    lease = now + timedelta(seconds=2 * runtime.settings.webhook_timeout_s + LEASE_SLACK_S)
    with session_scope(runtime.engine) as s:
        won = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == PENDING,
                   WebhookDelivery.attempts == seen, WebhookDelivery.next_attempt_at <= now)
            .values(attempts=seen + 1, next_attempt_at=lease)
        ).rowcount == 1  # type: ignore[attr-defined]
        if not won:
            return None
        row = s.get(WebhookDelivery, delivery_id, populate_existing=True)
        assert row is not None
        if row.body is None:
            row.body = _body(s, row)
        return row.url, row.body.encode(), _secret(s, row.job_id), row.event


def _body(s: Session, row: WebhookDelivery) -> str:
    """The event JSON: `{event, delivery_id, occurred_at, job: JobPublic, model_id}`."""
    from app.services.jobs import to_public

    job = s.get(Job, row.job_id, populate_existing=True)
    assert job is not None
    payload = {"event": row.event, "delivery_id": row.id, "occurred_at": row.occurred_at.isoformat(),
               "job": to_public(job).model_dump(mode="json"), "model_id": job.model_id}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _secret(s: Session, job_id: str) -> str:
    """The job's tenant's signing secret (made now if the tenant has none yet)."""
    tenant = s.scalar(select(Tenant).join(Job, Job.tenant_id == Tenant.id).where(Job.id == job_id))
    assert tenant is not None
    if tenant.webhook_secret is None:
        tenant.webhook_secret = signing.new_secret()
    return tenant.webhook_secret


def _send(settings: Settings, *, url: str, body: bytes, secret: str, event: str,
          delivery_id: str) -> dict[str, Any]:
    """POST once; the log entry's `status_code`, `error` and `duration_s`."""
    start = time.perf_counter()
    status: int | None = None
    error: str | None = None
    try:
        target = targets.check(url, allow_private=settings.webhook_allow_private)
        status = _post(target, body, _headers(secret, body, event, delivery_id), settings.webhook_timeout_s)
        if not 200 <= status < 300:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    except targets.TargetRefused as e:
        error = f"refused: {e}"
    except httpx.TimeoutException:
        error = f"timed out after {settings.webhook_timeout_s:g}s"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"status_code": status, "error": error[:MAX_ERROR_CHARS] if error else None,
            "duration_s": round(time.perf_counter() - start, 4)}


def _headers(secret: str, body: bytes, event: str, delivery_id: str) -> dict[str, str]:
    ts = int(time.time())
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            signing.EVENT_HEADER: event, signing.DELIVERY_HEADER: delivery_id,
            signing.TIMESTAMP_HEADER: str(ts), signing.SIGNATURE_HEADER: signing.signature(secret, ts, body)}


def _post(target: targets.Target, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST to the checked address (Host header and TLS server name: the URL's host); the status."""
    pinned = httpx.URL(target.url).copy_with(host=target.address)
    host = target.host if ":" not in target.host else f"[{target.host}]"
    default_port = 443 if target.scheme == "https" else 80
    headers = {**headers, "Host": host if target.port == default_port else f"{host}:{target.port}"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        response = client.post(pinned, content=body, headers=headers, extensions=extensions)
        return response.status_code


def _record(runtime: Runtime, delivery_id: str, attempt: int, entry: dict[str, Any]) -> None:
    # The attempt's outcome, if the row is still the one this attempt claimed.
    settings = runtime.settings
    now = utcnow()
    ok = entry["error"] is None
    values: dict[str, Any]
    if ok:
        values = {"state": DELIVERED, "delivered_at": now}
    elif attempt >= settings.webhook_max_attempts:
        values = {"state": FAILED}
    else:
        values = {"next_attempt_at": now + timedelta(seconds=backoff_s(settings, attempt))}
    with session_scope(runtime.engine) as s:
        row = s.get(WebhookDelivery, delivery_id, populate_existing=True)
        if row is None or row.attempts != attempt or row.state != PENDING:
            return
        values["log"] = [*(row.log or []), entry]
        s.execute(update(WebhookDelivery)
                  .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt,
                         WebhookDelivery.state == PENDING).values(**values))
    level = logging.INFO if ok else logging.WARNING
    log.log(level, "webhook %s attempt %d: %s", delivery_id, attempt, entry["error"] or entry["status_code"])


class Dispatcher:
    """A daemon thread running `deliver_due` every `webhook_poll_s` (see the module doc)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatch", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                deliver_due(self.runtime)
            except Exception as e:  # database down: try again next poll
                log.error("webhook dispatch failed: %s", e)
            self._stop.wait(self.runtime.settings.webhook_poll_s)


_dispatcher: Dispatcher | None = None
_start_lock = threading.Lock()


def start_dispatcher(runtime: Runtime) -> Dispatcher:
    """Start the process's dispatcher thread once."""
    global _dispatcher
    with _start_lock:
        if _dispatcher is None:
            _dispatcher = Dispatcher(runtime).start()
        return _dispatcher
