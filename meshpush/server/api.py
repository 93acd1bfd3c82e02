"""The HTTP API of a node: routes and handlers, served by :mod:`meshpush.server.http` (lean HTTP/1.1
on trio; ``Api.app`` is the same routes as an ASGI app for in-process tests).

``POST /v1/publish`` (one user, or ``users``), ``POST /v1/publish/batch``,
``POST /v1/broadcast`` (API key), ``GET /v1/route``, ``GET /v1/nodes``, ``GET /metrics``,
``GET /healthz``, ``GET /readyz``. Errors are JSON ``{"error": code, "detail": text}``; every
code is listed in docs/protocol.md. Bodies are read with a size limit (413) and validated
strictly (400 names the field; NaN, Infinity and lone UTF-16 surrogates are not JSON);
nothing is stored unless the whole body is valid. A batch stores its valid items and answers
an error for each invalid one. Store outcomes: 503 ``store_unavailable`` = definitely not
stored; 504 ``store_timeout`` = unknown (retry with the same id). Any unexpected error is
answered as JSON 500, logged and counted.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from meshpush.backends.store import Outcome, Outgoing, Store, StoreTimeout, StoreUnavailable
from meshpush.core.auth import AuthError, bearer, check_api_key
from meshpush.core.encoding import BadId, check_id
from meshpush.core.ring import slot
from meshpush.core.stats import Buckets, Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import PUBLISH_BUCKETS, Metrics
from meshpush.server.http import HttpServer, JSONResponse, Request, Response, Routes, compact_json
from meshpush.server.listener import server_ssl_context
from meshpush.server.router import Router
from meshpush.settings import Settings

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from meshpush.server.presence import Presence

MAX_MSG_ID = 256
# a \uD800-\uDFFF escape or raw UTF-8 surrogate bytes: only then is the slow check needed
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


#: a 503/504 asks the client to wait this long before asking this node again (the publisher
#: SDK meanwhile tries its other nodes)
RETRY_AFTER = {"retry-after": "1"}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    headers = RETRY_AFTER if status in (503, 504) else None
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _not_json(constant: str) -> Any:
    raise ApiError(400, "bad_json", f"{constant} is not JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _not_json(text)
    return value


#: ``json.loads(raw, parse_constant=_not_json, parse_float=_finite)`` without building a
#: decoder per call (``loads`` with arguments does)
_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


def _loads(raw: bytes) -> Any:
    """``json.loads`` of bytes, step for step, with the one decoder."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (nor numbers that overflow to them), no lone surrogates."""
    try:
        body = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "body is not valid JSON") from None
    if _MAYBE_SURROGATE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_json", "body has a lone UTF-16 surrogate") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "body is nested too deeply") from None
    return body


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Parse the request's body (at most ``limit`` bytes) as a JSON object, or raise ApiError."""
    if len(request.body) > limit:
        raise ApiError(413, "too_large", f"body larger than {limit} bytes")
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_body", "body must be a JSON object")
    return body


def check_fields(body: dict[str, Any], required: set[str], optional: set[str]) -> None:
    unknown = set(body) - required - optional
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = required - set(body)
    if missing:
        raise ApiError(400, "missing_field", f"missing field(s): {', '.join(sorted(missing))}")


#: generated message ids: a random prefix per process and a counter (32 hex characters, as
#: a uuid4's hex). ``uuid.uuid4()`` reads the kernel's random source on every call: ~1% of a
#: node's CPU at ~1,000 single publishes/s (py-spy, docs/performance.md)
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_message_id() -> str:
    """A message id no other publish of this cluster uses (idempotency is per id)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def message_id(body: dict[str, Any]) -> str:
    given = body.get("id")
    if given is None:
        return new_message_id()
    if not isinstance(given, str) or not 1 <= len(given.encode()) <= MAX_MSG_ID:
        raise ApiError(400, "bad_id", f"id must be a string of 1..{MAX_MSG_ID} bytes")
    return given


def data_json(body: dict[str, Any]) -> str:
    return compact_json(body["data"])


def user_id(value: object, what: str = "user") -> str:
    try:
        return check_id(value, what)
    except BadId as exc:
        raise ApiError(400, "bad_user", str(exc)) from None


def unicast(item: object) -> Outgoing:
    """One ``{"user", "data", "id"?}`` object as a message to store, or ApiError (400)."""
    if not isinstance(item, dict):
        raise ApiError(400, "bad_body", "a message must be a JSON object")
    check_fields(item, {"user", "data"}, {"id"})
    return Outgoing("user", user_id(item["user"]), message_id(item), data_json(item))


def broadcast_item(item: object) -> Outgoing:
    """One ``{"data", "id"?}`` object as a broadcast to store, or ApiError (400)."""
    if not isinstance(item, dict):
        raise ApiError(400, "bad_body", "a message must be a JSON object")
    check_fields(item, {"data"}, {"id"})
    return Outgoing("broadcast", None, message_id(item), data_json(item))


def items_list(body: dict[str, Any], field: str, limit: int) -> list[Any]:
    """The body's non-empty list ``field`` of at most ``limit`` entries (else 400/413)."""
    value = body[field]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"bad_{field}", f"{field} must be a non-empty list")
    if len(value) > limit:
        raise ApiError(413, "too_many", f"{field} has {len(value)} entries; at most {limit}")
    return value


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, StoreUnavailable):
        return {"error": _store_error(outcome)[1], "detail": str(outcome)}
    return {"seq": outcome.seq, "duplicate": outcome.duplicate}


def _store_error(exc: StoreUnavailable) -> tuple[int, str]:
    return (504, "store_timeout") if isinstance(exc, StoreTimeout) else (503, "store_unavailable")


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(slots=True)
class ApiStats:
    published: Tally = field(default_factory=Tally)
    publish_errors: Tally = field(default_factory=Tally)
    api_errors: Tally = field(default_factory=Tally)
    publish_latency: Buckets = field(default_factory=lambda: Buckets(PUBLISH_BUCKETS))


class Api:
    """Routes and handlers; the node's services are passed in, nothing is global."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        store: Store,
        metrics: Metrics,
        presence: Presence | None = None,
    ) -> None:
        self.settings = settings
        self.presence = presence
        self.router = router
        self.store = store
        self.metrics = metrics  # GET /metrics renders its registry
        self.stats = ApiStats()
        metrics.add_source(self)
        self.port = settings.http_port
        self.routes = Routes()
        add = self.routes.add
        add("/v1/publish", ["POST"], self._guard(self.publish, auth=True))
        add("/v1/publish/batch", ["POST"], self._guard(self.batch, auth=True))
        add("/v1/broadcast", ["POST"], self._guard(self.broadcast, auth=True))
        add("/v1/route", ["GET"], self._guard(self.route))
        add("/v1/nodes", ["GET"], self._guard(self.nodes))
        # presence (meshpush/server/presence.py): reads of who is online need the API key
        add("/v1/presence", ["GET", "POST"], self._guard(self._presence, auth=True))
        add("/metrics", ["GET"], self._guard(self.metrics_page, auth=settings.protect_metrics))
        add("/healthz", ["GET"], self._guard(self.healthz))
        add("/readyz", ["GET"], self._guard(self.readyz))
        self.app = self.routes.asgi(settings.max_body_bytes)

    def statistics(self) -> ApiStats:
        return snapshot(self.stats)

    def _guard(self, handler: Handler, auth: bool = False) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                if auth:
                    self._authorize(request)
                return await handler(request)
            except ApiError as exc:
                self.stats.publish_errors[exc.code] += 1
                return _error(exc.status, exc.code, exc.detail)
            except Exception:
                self.stats.api_errors[request.url.path] += 1
                log.exception("unexpected error in %s %s", request.method, request.url.path)
                return _error(500, "internal_error", "unexpected server error")

        return guarded

    def _authorize(self, request: Request) -> None:
        try:
            check_api_key(self.settings.api_keys, bearer(request.headers.get("authorization")))
        except AuthError as exc:
            raise ApiError(401, exc.reason, exc.detail) from None

    # ------------------------------------------------------------ handlers

    @tracing.http("/v1/publish")
    async def publish(self, request: Request) -> Response:
        body = await read_json(request, self.settings.max_body_bytes)
        if "users" in body:
            return await self._publish_users(body)
        message = unicast(body)
        [outcome] = await self._store([message])
        if isinstance(outcome, StoreUnavailable):
            raise ApiError(*_store_error(outcome), str(outcome))
        return JSONResponse({**outcome_json(outcome), "id": message.id}, status_code=202)

    async def _publish_users(self, body: dict[str, Any]) -> Response:
        """``{"users": [...], "data", "id"?}``: one stored message (and chain) per user."""
        check_fields(body, {"users", "data"}, {"id"})
        raw = items_list(body, "users", self.settings.max_batch)
        users = [user_id(u, f"users[{i}]") for i, u in enumerate(raw)]
        if len(set(users)) != len(users):
            raise ApiError(400, "bad_users", "users must not repeat")
        msg_id, payload = message_id(body), data_json(body)
        outcomes = await self._store([Outgoing("user", u, msg_id, payload) for u in users])
        results = [{"user": u, **outcome_json(o)} for u, o in zip(users, outcomes, strict=True)]
        return JSONResponse({"id": msg_id, "results": results}, status_code=202)

    @tracing.http("/v1/publish/batch")
    async def batch(self, request: Request) -> Response:
        """``{"messages": [...]}``: each valid item stored, each invalid one answered."""
        body = await read_json(request, self.settings.max_body_bytes)
        return await self._store_items(body, unicast)

    async def _store_items(
        self, body: dict[str, Any], parse: Callable[[object], Outgoing]
    ) -> Response:
        """``{"messages": [...]}``: each valid item stored, each invalid one answered, in order
        (a malformed body as a whole: 400/413 and nothing stored)."""
        check_fields(body, {"messages"}, set())
        parsed: list[Outgoing | ApiError] = []
        for item in items_list(body, "messages", self.settings.max_batch):
            try:
                parsed.append(parse(item))
            except ApiError as exc:
                self.stats.publish_errors[exc.code] += 1
                parsed.append(exc)
        valid = [m for m in parsed if isinstance(m, Outgoing)]
        stored = iter(await self._store(valid))
        results = [
            {"error": m.code, "detail": m.detail}
            if isinstance(m, ApiError)
            else {**outcome_json(next(stored)), "id": m.id}
            for m in parsed
        ]
        return JSONResponse({"results": results}, status_code=202)

    @tracing.http("/v1/broadcast")
    async def broadcast(self, request: Request) -> Response:
        body = await read_json(request, self.settings.max_body_bytes)
        if "messages" in body:  # many broadcasts in one call (docs/protocol.md)
            return await self._store_items(body, broadcast_item)
        message = broadcast_item(body)
        [outcome] = await self._store([message])
        if isinstance(outcome, StoreUnavailable):
            raise ApiError(*_store_error(outcome), str(outcome))
        return JSONResponse({**outcome_json(outcome), "id": message.id}, status_code=202)

    async def _store(self, messages: list[Outgoing]) -> Sequence[Outcome]:
        if not messages:
            return []
        started = time.perf_counter()
        outcomes = await self.store.publish_many(messages)
        self.stats.publish_latency.observe(time.perf_counter() - started)
        for message, outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                self.stats.publish_errors[_store_error(outcome)[1]] += 1
            elif not outcome.duplicate:
                self.stats.published[message.ch] += 1
        return outcomes

    async def route(self, request: Request) -> Response:
        try:
            user = check_id(request.query_params.get("user"), "user")
        except BadId as exc:
            raise ApiError(400, "bad_user", str(exc)) from None
        info = self.router.owner_info(user)
        if info is None:
            raise ApiError(503, "no_ring", "this node does not know the ring yet")
        return JSONResponse({"node": info.id, "ws_url": info.ws_url, "slot": slot(user)})

    async def nodes(self, request: Request) -> Response:
        r = self.router
        nodes = [
            {
                "id": n.id,
                "ws_url": n.ws_url,
                "http_url": n.http_url,
                "started_at": n.started_at,
                "slots": len(r.ring.slots_of(n.id)),
            }
            for n in sorted(r.view.values(), key=lambda n: n.id)
        ]
        stats = r.registry.statistics()
        return JSONResponse(
            {
                "self": r.me,
                "ready": r.ready,
                "draining": r.draining,
                "sessions": stats.sessions,
                "users": stats.users,
                "misplaced_sessions": r.misplaced_sessions(),
                "nodes": nodes,
            }
        )

    async def _presence(self, request: Request) -> Response:
        if self.presence is None:
            raise ApiError(503, "no_ring", "presence is not running yet")
        return await self.presence.http(request)

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.settings.node_id})

    async def readyz(self, request: Request) -> Response:
        reason = self.router.not_ready_reason()
        body = {"ready": not reason, "reason": reason, **self.router.readiness()}
        return JSONResponse(body, status_code=503 if reason else 200)

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        server = HttpServer(
            self.routes,
            max_body=s.max_body_bytes,
            max_connections=s.max_http_connections,
            request_timeout=max(1.0, s.handshake_timeout),  # slowloris
            ssl_context=server_ssl_context(s),
        )
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(server.run, s.http_host, s.http_port)
            task_status.started(self.port)
