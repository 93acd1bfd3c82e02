"""Client tokens (JWT) and publisher API keys.

A client token is a JWT signed with HS256 and the cluster's ``token_secret``: ``sub`` is the user
id, ``exp`` is required. Verification failures are :class:`AuthError` with a short reason that
becomes the 401 body and a metric label; the token itself is never logged.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from .encoding import BadId, check_id

ALGORITHMS = ["HS256"]


class AuthError(Exception):
    """A token or API key was missing, malformed, forged or expired. ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires_at: float


def issue_token(secret: str, user: str, ttl: float = 3600.0, now: float | None = None) -> str:
    """Make a client token (used by ``meshpush token`` and tests)."""
    issued = time.time() if now is None else now
    claims = {"sub": user, "iat": int(issued), "exp": int(issued + ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str | None, leeway: float = 0.0) -> Identity:
    """Check a client token; return who it names, or raise :class:`AuthError`."""
    if not token:
        raise AuthError("missing_token", "no token given")
    if not secret:
        raise AuthError("no_secret", "node has no token secret configured")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=ALGORITHMS,
            leeway=leeway,
            options={"require": ["exp", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired_token", "token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError("invalid_token", f"token rejected: {type(exc).__name__}") from None
    try:
        user = check_id(claims["sub"], "sub")
    except BadId as exc:
        raise AuthError("invalid_token", str(exc)) from None
    return Identity(user=user, expires_at=float(claims["exp"]))


def check_api_key(keys: Iterable[str], presented: str | None) -> None:
    """Constant-time comparison against every configured key; raise :class:`AuthError`."""
    if not presented:
        raise AuthError("missing_api_key", "Authorization: Bearer <api key> required")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key.encode(), presented.encode())
    if not ok:
        raise AuthError("invalid_api_key", "API key not accepted")


def bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer x`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
