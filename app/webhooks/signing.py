"""Webhook signatures: HMAC-SHA256 with the tenant's secret over `timestamp.body`.

A receiver verifies a delivery by recomputing
`hex(hmac_sha256(secret, f"{X-SparseShot-Timestamp}.{raw body}"))`, comparing it in constant time
with the `v1=` value of `X-SparseShot-Signature`, and refusing timestamps far from its clock
(e.g. more than 5 minutes: replays). `verify` is that check, for receivers written in Python.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SECRET_PREFIX = "whsec_"
TIMESTAMP_HEADER = "X-SparseShot-Timestamp"
SIGNATURE_HEADER = "X-SparseShot-Signature"
EVENT_HEADER = "X-SparseShot-Event"
DELIVERY_HEADER = "X-SparseShot-Delivery"
SCHEME = "v1"


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + 64 hex digits (256 bits)."""
    return SECRET_PREFIX + secrets.token_hex(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The header value `v1=<hex digest>` for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify(secret: str, *, timestamp: str, signature_header: str, body: bytes,
           tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether a received delivery is authentic and recent (what a receiver runs)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    expected = signature(secret, ts, body)
    offered = [part.strip() for part in signature_header.split(",")]
    return any(hmac.compare_digest(expected, part) for part in offered)
