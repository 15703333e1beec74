"""API keys: `sk_<prefix>_<secret>`, stored as the sha256 of the whole key, found by prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound, Unauthorized
from app.models import ApiKey, Tenant, utcnow

KEY_SCHEME = "sk"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if new). Returns the row and the plaintext, shown once."""
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name must not be empty")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)  # 12 hex chars, no "_" so the key splits unambiguously
    plaintext = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=_hash(plaintext))
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, plaintext


def list_keys(*, session: Session, tenant_name: str | None = None) -> list[ApiKey]:
    """Keys (with their tenant), oldest first; optionally of one tenant."""
    query = select(ApiKey).join(Tenant).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return list(session.scalars(query))


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    """Revoke by key id or by prefix; revoking twice keeps the first revocation time."""
    row = session.get(ApiKey, key_id) or session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def key_from_header(header: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; Unauthorized naming the right form else."""
    use = "send 'Authorization: Bearer <key>'"
    if not header or not header.strip():
        raise Unauthorized(f"missing API key: {use}")
    scheme, _, key = header.strip().partition(" ")
    if not key:
        raise Unauthorized(f"the Authorization header holds no scheme: {use}")
    if scheme.lower() != "bearer":
        raise Unauthorized(f"{scheme[:20]!r} authorization is not supported: {use}")
    return key.strip()


def authenticate(*, session: Session, key: str | None) -> Tenant:
    """The tenant owning an active key; Unauthorized for a missing, malformed, unknown or revoked key."""
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        raise Unauthorized("malformed API key")
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or not hmac.compare_digest(row.key_hash, _hash(key)):
        raise Unauthorized("invalid API key")
    if row.revoked_at is not None:
        raise Unauthorized("API key has been revoked")
    return row.tenant
