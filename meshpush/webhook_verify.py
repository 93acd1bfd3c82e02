"""Sign and verify the offline webhook's ``X-Meshpush-Signature`` header (standard library only).

A backend that receives the webhook can ``from meshpush.webhook_verify import verify`` (or copy
this file): the header is ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``, keyed
with ``offline_webhook_secret``. Verify the *raw* body bytes, before parsing them, and refuse
timestamps older than a few minutes so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Meshpush-Signature"
DEFAULT_TOLERANCE = 300.0


def signature(secret: str, body: bytes, t: int) -> str:
    """The hex HMAC-SHA256 of ``b"<t>." + body`` with ``secret``."""
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The header value for ``body``: ``t=<unix seconds>,v1=<hex>``."""
    t = int(time.time()) if t is None else t
    return f"t={t},v1={signature(secret, body, t)}"


def verify(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its time is within ``tolerance``.

    Several ``v1=`` entries are accepted (any may match), so a sender may sign with an old
    and a new secret during a rotation."""
    if not header:
        return False
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit() and len(value) <= 12:
            t = int(value)
        elif key == "v1":
            candidates.append(value)
    if t is None or not candidates:
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance:
        return False
    expected = signature(secret, body, t)
    return any(hmac.compare_digest(expected, c) for c in candidates)
