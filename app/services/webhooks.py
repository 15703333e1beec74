"""Webhooks as the API offers them: a job's target URL checked, the tenant's signing secret read
and rotated, a job's delivery log listed. Sending: app.webhooks.dispatch."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import InvalidInput, NotFound
from app.models import Job, Tenant, WebhookDelivery
from app.schemas import WebhookAttempt, WebhookDeliveryPublic
from app.webhooks import signing, targets
from app.webhooks.dispatch import PENDING


def check_url(*, url: str, settings: Settings) -> str:
    """The URL as given, when it is a target deliveries may go to (resolved now); else 422."""
    try:
        targets.check(url, allow_private=settings.webhook_allow_private)
    except targets.TargetRefused as e:
        raise InvalidInput(str(e)) from None
    return url


def ensure_secret(*, session: Session, tenant: Tenant) -> str:
    """The tenant's secret, made (not committed) when it has none."""
    if tenant.webhook_secret is None:
        tenant.webhook_secret = signing.new_secret()
    return tenant.webhook_secret


def get_secret(*, session: Session, tenant: Tenant) -> str:
    """The tenant's signing secret (made and committed on first use)."""
    secret = ensure_secret(session=session, tenant=tenant)
    session.commit()
    return secret


def rotate_secret(*, session: Session, tenant: Tenant) -> str:
    """A new signing secret; deliveries from now on, retries included, are signed with it."""
    tenant.webhook_secret = signing.new_secret()
    session.commit()
    return tenant.webhook_secret


def list_deliveries(*, session: Session, tenant: Tenant, job_id: str) -> list[WebhookDeliveryPublic]:
    """The job's notifications with their attempt log (404 for another tenant's job)."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant.id)) is None:
        raise NotFound(f"no job {job_id}")
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.created_at, WebhookDelivery.id))
    return [_public(r) for r in rows]


def _public(row: WebhookDelivery) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=row.id, event=row.event, url=row.url, state=row.state,  # type: ignore[arg-type]
        attempts=[WebhookAttempt.model_validate(a) for a in row.log or []],
        next_attempt_at=row.next_attempt_at if row.state == PENDING else None,
        created_at=row.created_at, delivered_at=row.delivered_at,
    )  # fmt: skip
