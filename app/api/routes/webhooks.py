"""/v1/webhook-secret: the key that signs your job webhooks, read or rotated."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.api.responses import problem_responses
from app.schemas import WebhookSecretPublic
from app.services import webhooks as svc

router = APIRouter(prefix="/v1/webhook-secret", tags=["webhooks"], responses=problem_responses())


@router.get("")
def get_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecretPublic:
    """Get your webhook signing secret.

    Every webhook carries `X-SparseShot-Timestamp` and `X-SparseShot-Signature: v1=<hex>`, the
    HMAC-SHA256 with this secret of `<timestamp>.<raw body>`; recompute it and compare in
    constant time. Made on first use.
    """
    return WebhookSecretPublic(secret=svc.get_secret(session=session, tenant=tenant))


@router.post("")
def rotate_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecretPublic:
    """Rotate your webhook signing secret.

    Answers the new secret; every delivery attempt from now on, retries of earlier events
    included, is signed with it.
    """
    return WebhookSecretPublic(secret=svc.rotate_secret(session=session, tenant=tenant))
