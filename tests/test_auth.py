"""Tokens and API keys."""

from __future__ import annotations

import jwt
import pytest

from meshpush.core.auth import AuthError, TokenVerifier, bearer, check_api_key, issue_token

SECRET = "s" * 32


def _b64(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def test_round_trip() -> None:
    ident = TokenVerifier(SECRET).verify(issue_token(SECRET, "alice", 60))
    assert ident.user == "alice"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing_token"),
        ("", "missing_token"),
        ("garbage", "invalid_token"),
        (issue_token("other-secret-" * 3, "alice", 60), "invalid_token"),
        (issue_token(SECRET, "alice", -10), "expired_token"),
        (jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "invalid_token"),  # no exp
        (jwt.encode({"exp": 2**40}, SECRET, algorithm="HS256"), "invalid_token"),  # no sub
        (jwt.encode({"sub": "", "exp": 2**40}, SECRET, algorithm="HS256"), "invalid_token"),
        (jwt.encode({"sub": 5, "exp": 2**40}, SECRET, algorithm="HS256"), "invalid_token"),
        (jwt.encode({"sub": "a", "exp": 2**40}, None, algorithm="none"), "invalid_token"),
        (_b64("[" * 5000) + "." + _b64("{}") + ".x", "invalid_token"),  # deep header
        (_b64('{"alg":"HS256"}') + ".!!!." + "x", "invalid_token"),
    ],
)
def test_bad_tokens(token: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as err:
        TokenVerifier(SECRET).verify(token)
    assert err.value.reason == reason


def test_api_keys() -> None:
    check_api_key(["old", "new"], "new")
    for presented, reason in ((None, "missing_api_key"), ("nope", "invalid_api_key")):
        with pytest.raises(AuthError) as err:
            check_api_key(["old", "new"], presented)
        assert err.value.reason == reason


def test_bearer() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
    assert bearer("Bearer") is None
