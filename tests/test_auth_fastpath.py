"""The HS256 fast path (``auth.Hs256``) accepts exactly what PyJWT accepts, or defers to it."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from meshpush.core.auth import AuthError, Hs256, Identity, TokenCache, TokenVerifier, issue_token

SECRET = "s" * 32
OLD = "o" * 32
NOW = time.time()  # tokens are made at import: valid for an hour from then


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(claims: Any, header: Any = None, secret: str = SECRET) -> str:
    """A token with exactly this header and payload JSON (PyJWT adds nothing)."""
    head = _b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signing = f"{head}.{body}".encode()
    import hashlib
    import hmac

    return f"{head}.{body}.{_b64(hmac.new(secret.encode(), signing, hashlib.sha256).digest())}"


def _slow(token: str, **kw: Any) -> Identity | str:
    """PyJWT's verdict: the identity, or the refusal reason."""
    verifier = TokenVerifier(SECRET, (OLD,), cache=TokenCache(size=0), **kw)
    verifier.fast = None
    try:
        return verifier.verify(token)
    except AuthError as exc:
        return exc.reason


def _fast(token: str) -> Identity | str:
    verifier = TokenVerifier(SECRET, (OLD,), cache=TokenCache(size=0))
    assert verifier.fast is not None
    try:
        return verifier.verify(token)
    except AuthError as exc:
        return exc.reason


GOOD = [
    issue_token(SECRET, "alice", 3600),
    issue_token(OLD, "bob", 3600),  # an old secret (rotation)
    issue_token(SECRET, "carol", 3600, devices=["phone", "web"]),
    _token({"sub": "dave", "exp": int(NOW) + 3600}, {"alg": "HS256"}),
    _token({"sub": "erin", "exp": int(NOW) + 3600, "nbf": int(NOW) - 5, "jti": "x"}),
]


@pytest.mark.parametrize("token", GOOD)
def test_common_tokens_take_the_fast_path_with_the_same_identity(token: str) -> None:
    fast = Hs256([SECRET, OLD], 0.0).verify(token)
    assert fast is not None
    assert fast == _slow(token)


EXP = int(NOW) + 3600
ODD = [
    _token({"sub": "a", "exp": EXP}, {"alg": "HS256", "typ": "JWT", "kid": "k"}),  # kid
    _token({"sub": "a", "exp": EXP}, {"alg": "HS512"}),
    _token({"sub": "a", "exp": EXP, "aud": "x"}),  # aud, none configured: PyJWT refuses
    _token({"sub": "a", "exp": EXP, "iss": "x"}),
    _token({"sub": "a", "exp": float(EXP)}),  # float exp: PyJWT accepts, we defer
    _token({"sub": "a", "exp": True}),
    _token({"sub": "a", "exp": int(NOW) - 1}),  # expired
    _token({"sub": "a", "exp": EXP, "iat": int(NOW) + 3600}),  # issued in the future
    _token({"sub": "a", "exp": EXP, "nbf": int(NOW) + 3600}),
    _token({"sub": "a", "exp": EXP, "iat": "yesterday"}),
    _token({"sub": "a", "exp": EXP, "jti": 5}),
    _token({"sub": 5, "exp": EXP}),
    _token({"sub": "", "exp": EXP}),  # PyJWT accepts, check_id refuses: same on both
    _token({"sub": "a/b", "exp": EXP}),
    _token({"sub": "a", "exp": EXP, "devices": "phone"}),  # devices not a list: refused
    _token({"exp": EXP}),
    _token(["sub", "a"]),
    _token({"sub": "a", "exp": EXP}, secret="wrong" * 8),  # forged
    _token({"sub": "a", "exp": EXP}) + "A",  # signature not canonical
    _token({"sub": "a", "exp": EXP}) + ".x",
    "a.b.c",
    "..",
    "é.b.c",
    jwt.encode({"sub": "a", "exp": EXP}, None, algorithm="none"),
]


@pytest.mark.parametrize("token", GOOD + ODD)
def test_fast_and_slow_verdicts_are_the_same(token: str) -> None:
    assert _fast(token) == _slow(token)


@pytest.mark.parametrize("token", ODD)
def test_the_fast_path_defers_or_agrees(token: str) -> None:
    """None (PyJWT decides) or PyJWT's verdict: the identity, or the claim check's refusal."""
    try:
        fast: Identity | str | None = Hs256([SECRET, OLD], 0.0).verify(token)
    except AuthError as exc:
        fast = exc.reason
    assert fast is None or fast == _slow(token)


def test_a_pem_secret_is_no_fast_hmac_key_pyjwt_decides() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    token = _token({"sub": "a", "exp": EXP}, secret=pem)
    assert Hs256([pem], 0.0).verify(token) is None  # PyJWT's InvalidKeyError, as before
    assert len(Hs256([pem, SECRET], 0.0).macs) == 1


def test_leeway_and_clock() -> None:
    token = _token({"sub": "a", "exp": 1000})
    assert Hs256([SECRET], 0.0, clock=lambda: 999.5).verify(token) is not None
    assert Hs256([SECRET], 0.0, clock=lambda: 1000.0).verify(token) is None  # exp <= now
    late = Hs256([SECRET], 30.0, clock=lambda: 1020.0).verify(token)
    assert late is not None and late.expires_at == 1030.0


def test_audience_or_issuer_rules_turn_the_fast_path_off() -> None:
    assert TokenVerifier(SECRET, audience="app").fast is None
    assert TokenVerifier(SECRET, issuer="me").fast is None
    assert TokenVerifier(SECRET).fast is not None


def test_headers_remembered_are_bounded() -> None:
    fast = Hs256([SECRET], 0.0)
    for i in range(Hs256.MAX_HEADERS + 10):
        fast.verify(_token({"sub": "a", "exp": EXP}, {"alg": "HS256", "x": i}))
    assert len(fast.headers) == Hs256.MAX_HEADERS
