"""Client tokens (JWT) and publisher API keys.

A client token is a JWT: HS256 with the cluster's secret(s), or RS256/ES256 checked with a
public key or a JWKS file; ``sub`` is the user id, ``exp`` is required. Verification failures
are :class:`AuthError` with a short reason that
becomes the 401 body and a metric label; the token itself is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

from meshpush.core.encoding import BadId, check_id

HMAC_ALGORITHMS = frozenset({"HS256"})
PUBLIC_ALGORITHMS = frozenset({"RS256", "ES256"})


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
    devices: frozenset[str] | None = None  # the token's optional "devices" claim

    def allows_device(self, device: str) -> bool:
        return self.devices is None or device in self.devices


def issue_token(
    secret: str, user: str, ttl: float = 3600.0, now: float | None = None, **claims: Any
) -> str:
    """Make an HS256 client token (used by ``meshpush token`` and tests)."""
    issued = time.time() if now is None else now
    body = {"sub": user, "iat": int(issued), "exp": int(issued + ttl), **claims}
    return jwt.encode(body, secret, algorithm="HS256")


class TokenCache:
    """Tokens verified before, so a reconnect storm (every client of a dead node coming back
    with the token it already used) does not pay for verification again.

    A bounded LRU keyed by the whole token string (a forged or altered token is another key,
    verified in full). An entry is used only while its token is still valid on ``clock``
    (``exp`` + leeway: the same rule as the verification), then dropped; only successful
    verifications are kept, and tokens longer than ``max_token`` are not kept at all."""

    def __init__(
        self, size: int = 10_000, clock: Callable[[], float] = time.time, max_token: int = 4096
    ) -> None:
        self.size = size
        self.clock = clock
        self.max_token = max_token
        self._data: OrderedDict[str, Identity] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, token: str) -> Identity | None:
        identity = self._data.get(token)
        if identity is None:
            return None
        if self.clock() >= identity.expires_at:
            del self._data[token]
            return None
        self._data.move_to_end(token)
        self.hits += 1
        return identity

    def put(self, token: str, identity: Identity) -> None:
        if self.size <= 0 or len(token) > self.max_token:
            return
        self._data[token] = identity
        self._data.move_to_end(token)
        while len(self._data) > self.size:
            self._data.popitem(last=False)


class TokenVerifier:
    """Checks client tokens against the configured keys.

    * HS256 with ``secret`` or any of ``old_secrets`` (rotation: issue with the new secret,
      keep accepting the old ones until their tokens expired);
    * RS256 / ES256 with the PEM ``public_key`` or the JWKS keys (chosen by the token's kid);
    * an algorithm is only ever checked against keys of its family, so a public key can never
      be used as an HMAC secret, and ``alg: none`` is refused;
    * ``exp`` and ``sub`` required; ``aud`` / ``iss`` required when configured; ``leeway``
      seconds of clock skew;
    * a token verified once is not verified again while it is valid (:class:`TokenCache`).
    """

    def __init__(
        self,
        secret: str = "",
        old_secrets: tuple[str, ...] = (),
        public_key: str = "",
        jwks: dict[str, Any] | None = None,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
        cache: TokenCache | None = None,
    ) -> None:
        self.cache = cache if cache is not None else TokenCache()
        self.secrets = [k for k in (secret, *old_secrets) if k]
        self.public_keys: list[Any] = []
        if public_key:
            self.public_keys.append(load_public_key(public_key))
        self.jwks: dict[str, Any] = {}
        for key in (jwks or {}).get("keys", []):
            jwk = jwt.PyJWK.from_dict(key)
            self.jwks[str(key.get("kid", ""))] = jwk.key
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway
        # without aud/iss rules, the common HS256 token is checked without PyJWT (Hs256)
        plain = self.audience is None and self.issuer is None
        self.fast = Hs256(self.secrets, leeway) if plain and self.secrets else None

    @classmethod
    def from_settings(cls, s: Any) -> TokenVerifier:
        jwks = json.loads(Path(s.token_jwks_file).read_text()) if s.token_jwks_file else None
        pem = Path(s.token_public_key_file).read_text() if s.token_public_key_file else ""
        return cls(
            s.token_secret,
            s.token_old_secrets,
            pem,
            jwks,
            s.token_audience,
            s.token_issuer,
            s.token_leeway,
        )

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing_token", "no token given")
        identity = self.cache.get(token)
        if identity is None:
            identity = self._verify(token)
            self.cache.put(token, identity)
        return identity

    def _verify(self, token: str) -> Identity:
        if self.fast is not None:
            identity = self.fast.verify(token)
            if identity is not None:
                return identity
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, TypeError, RecursionError):
            raise AuthError("invalid_token", "token rejected: not a JWT") from None
        alg = header.get("alg")
        keys = self._keys_for(alg, header.get("kid"))
        if not keys:
            raise AuthError("invalid_token", f"token rejected: algorithm {alg!r} not accepted")
        error: AuthError | None = None
        for key in keys:
            try:
                return self._decode(token, key, str(alg))
            except AuthError as exc:
                error = exc
                if exc.reason != "bad_signature":
                    break
        assert error is not None
        raise AuthError(
            "invalid_token" if error.reason == "bad_signature" else error.reason, error.detail
        )

    def _keys_for(self, alg: object, kid: object) -> list[Any]:
        if alg in HMAC_ALGORITHMS:
            return list(self.secrets)
        if alg in PUBLIC_ALGORITHMS:
            if kid is not None and str(kid) in self.jwks:
                return [self.jwks[str(kid)]]
            return [*self.public_keys, *self.jwks.values()]
        return []

    def _decode(self, token: str, key: Any, alg: str) -> Identity:
        options = {
            "require": ["exp", "sub"]
            + (["aud"] if self.audience else [])
            + (["iss"] if self.issuer else [])
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired_token", "token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token rejected: bad signature") from None
        except (jwt.InvalidTokenError, ValueError, TypeError, RecursionError) as exc:
            raise AuthError("invalid_token", f"token rejected: {type(exc).__name__}") from None
        return _identity(claims, self.leeway)


class Hs256:
    """The common HS256 token verified without PyJWT: a fast path that never refuses itself.

    It accepts a token only where PyJWT (as ``TokenVerifier._decode`` calls it, no audience
    and no issuer configured) would accept it with the same claims: the header segment is one
    seen before that decodes to exactly ``{"alg":"HS256"}`` (``"typ":"JWT"`` allowed), the
    signature segment is the canonical base64url encoding of the HMAC of one of the secrets
    PyJWT takes as an HMAC key, the payload (decoded as PyJWT decodes it) is a JSON object of
    only ``sub`` (str), ``exp`` (int, not expired), ``iat`` / ``nbf`` (int, not in the future),
    ``jti`` (str) and ``devices``; then the claims are checked as after PyJWT (``_identity``:
    the same refusals for a bad ``sub`` or ``devices``). For anything else (another header, a
    signature encoded otherwise, a forged, expired or unusual token) it returns None and the
    caller verifies with PyJWT, which then accepts or refuses with its reason as before."""

    CLAIMS = frozenset({"sub", "exp", "iat", "nbf", "jti", "devices"})
    HEADERS = ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"})
    MAX_HEADERS = 64  # distinct header segments remembered

    def __init__(self, secrets: list[str], leeway: float, clock: Callable[[], float] = time.time):
        self.macs = [hmac.new(k, digestmod=hashlib.sha256) for k in _hmac_keys(secrets)]
        self.leeway = leeway
        self.clock = clock
        self.headers: dict[str, bool] = {}  # header segment -> is it the plain HS256 header

    def verify(self, token: str) -> Identity | None:
        if token.count(".") != 2 or not token.isascii() or not self.macs:
            return None
        head, payload, signature = token.split(".")
        if not self._plain_header(head) or not self._signed(token, signature):
            return None
        try:
            claims = json.loads(_b64decode(payload))
        except (ValueError, binascii.Error, RecursionError):
            return None
        if not isinstance(claims, dict) or not self._valid(claims):
            return None
        return _identity(claims, self.leeway)

    def _plain_header(self, head: str) -> bool:
        known = self.headers.get(head)
        if known is None:
            try:
                known = json.loads(_b64decode(head)) in self.HEADERS
            except (ValueError, binascii.Error, RecursionError):
                known = False
            if len(self.headers) < self.MAX_HEADERS:
                self.headers[head] = known
        return known

    def _signed(self, token: str, signature: str) -> bool:
        signing_input = token[: len(token) - len(signature) - 1].encode()
        given = signature.encode()
        for base in self.macs:
            mac = base.copy()
            mac.update(signing_input)
            if hmac.compare_digest(base64.urlsafe_b64encode(mac.digest()).rstrip(b"="), given):
                return True
        return False

    def _valid(self, claims: dict[str, Any]) -> bool:
        if not self.CLAIMS.issuperset(claims) or type(claims.get("sub")) is not str:
            return False
        now, leeway = self.clock(), self.leeway
        exp = claims.get("exp")
        if type(exp) is not int or exp <= now - leeway:
            return False
        for name in ("iat", "nbf"):
            value = claims.get(name, 0)
            if type(value) is not int or value > now + leeway:
                return False
        return "jti" not in claims or type(claims["jti"]) is str


def _b64decode(segment: str) -> bytes:
    """base64url as PyJWT decodes a segment (padding added, then urlsafe_b64decode)."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _hmac_keys(secrets: list[str]) -> list[bytes]:
    """The secrets PyJWT accepts as HS256 keys (it refuses e.g. a PEM key as a secret)."""
    keys = []
    for secret in secrets:
        try:
            keys.append(HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret))
        except jwt.InvalidKeyError:
            continue
    return keys


def _identity(claims: dict[str, Any], leeway: float) -> Identity:
    try:
        user = check_id(claims["sub"], "sub")
    except BadId as exc:
        raise AuthError("invalid_token", str(exc)) from None
    devices = claims.get("devices")
    if devices is not None and (
        not isinstance(devices, list) or not all(isinstance(d, str) for d in devices)
    ):
        raise AuthError("invalid_token", "devices claim must be a list of strings")
    allowed = frozenset(devices) if devices is not None else None
    return Identity(user=user, expires_at=float(claims["exp"]) + leeway, devices=allowed)


def load_public_key(pem: str) -> Any:
    """An RSA or EC public key from PEM text (ValueError if it is neither)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("token_public_key_file must hold an RSA or EC public key")
    return key


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
