"""The WebSocket front door: handshake (token, device, route), then one session until it ends.

Handshake: ``/ws?token=<jwt>&device=<id>`` (or ``Authorization: Bearer``, or — with neither —
a first ``{"type":"auth","token":...}`` frame within ``handshake_timeout`` after the upgrade).
With ``refuse_after_upgrade`` (default) a refusal decided here is answered after the upgrade: an
``error`` frame, then close 4000 + the HTTP status (4400, 4401, 4403, 4429, 4503), so a browser
learns the reason; off, it is an HTTP status before any upgrade (and there is no auth frame).
A user owned by another node gets a ``redirect`` frame and close 4302; the owner registers the
session (live notifications buffer in its feeds from then on), reads where it resumes, accepts,
and hands the connection to ``Session.run`` in the same task.
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import trio
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from meshpush.backends.store import StoreUnavailable
from meshpush.core import protocol
from meshpush.core.auth import AuthError, TokenVerifier, bearer
from meshpush.core.encoding import BadId, check_id
from meshpush.core.limits import origin_allowed
from meshpush.core.machine import Limits
from meshpush.core.protocol import Close
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.server import listener
from meshpush.server.delivery import BadResume, Feeder
from meshpush.server.hub import Hub
from meshpush.server.listener import Doorman, Refusal
from meshpush.server.router import Route, Router
from meshpush.server.sessions import Context, Session
from meshpush.server.wire import Upgrade, Wire, encode_text
from meshpush.settings import Settings

log = logging.getLogger(__name__)
HANDSHAKE_CONCURRENCY = 128  # handshakes in progress at once (their store reads batch together)
START_TIMEOUT = 5.0  # seconds the resume-point reads of one handshake may take (then 503)


MAX_QUERY_FIELDS = 32


def _query(request: Upgrade) -> tuple[str, dict[str, str]]:
    path, _, qs = request.target.partition("?")
    try:
        pairs = _query_pairs(qs)
    except ValueError:
        raise Refusal(400, "bad_query", "malformed or too many query parameters") from None
    return path, dict(pairs)


def _query_pairs(qs: str) -> list[tuple[str, str]]:
    """``parse_qsl(qs, keep_blank_values=True, max_num_fields=32)``; a query with nothing to
    unquote (no ``%``, no ``+``: the common one) is split here, with the same result."""
    if "%" in qs or "+" in qs:
        return urllib.parse.parse_qsl(
            qs, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_QUERY_FIELDS
        )
    fields = qs.split("&") if qs else []
    if len(fields) > MAX_QUERY_FIELDS:
        raise ValueError("Max number of fields exceeded")
    return [(name, value) for name, _, value in (f.partition("=") for f in fields if f)]


def limits_of(s: Settings) -> Limits:
    return Limits(
        heartbeat_interval=s.heartbeat_interval,
        heartbeat_timeout=s.heartbeat_timeout,
        frame_rate=s.frame_rate,
        frame_burst=s.frame_burst,
        max_frame_bytes=s.max_frame_bytes,
        out_frames=s.session_queue,
        out_bytes=s.session_buffer_bytes,
        slow_grace=s.slow_consumer_grace,
    )


@dataclass(frozen=True, slots=True)
class Hello:
    """What a handshake asked for, validated."""

    user: str
    device: str
    expires_at: float
    avoid: str
    resume: dict[str, int]
    epoch: str


class Door:
    """How one handshake answers: HTTP before the upgrade, or frames once upgraded.

    ``after_upgrade`` (the setting): a refusal with a 44xx close code accepts the upgrade,
    sends an ``error`` frame and closes with that code. Once accepted (an auth frame was read,
    or a refusal came later), every refusal is answered that way."""

    __slots__ = ("after_upgrade", "request", "wire")

    def __init__(self, request: Upgrade, after_upgrade: bool) -> None:
        self.request = request
        self.after_upgrade = after_upgrade
        self.wire: Wire | None = None

    async def accept(self, first: bytes = b"") -> Wire:
        """Accept the upgrade (once), ``first`` in the same write as the 101."""
        if self.wire is None:
            self.wire = await self.request.accept(first)
        return self.wire

    async def refuse(self, rej: Refusal) -> None:
        code = close_code(rej)
        with trio.move_on_after(2):
            if self.wire is None and not (self.after_upgrade and code is not None):
                await self.request.reject(rej.status, _http_headers(rej), _body(rej))
                return
            wire = await self.accept()
            close = wire.close_frame(code or 1011, rej.code)  # 1011: no 44xx for it
            await wire.stream.send_all(encode_text(error_frame(rej)) + close)
            await wire.goodbye(1.0)


AFTER_UPGRADE = {  # HTTP status of a handshake refusal -> its close code after the upgrade
    400: Close.BAD_REQUEST,
    401: Close.TOKEN_EXPIRED,
    403: Close.FORBIDDEN,
    429: Close.RATE_LIMITED,
    503: Close.UNAVAILABLE,
}


def close_code(rej: Refusal) -> int | None:
    """The close code a refusal gets after the upgrade (None: HTTP only, e.g. 404)."""
    if rej.code == "binary_frame":
        return Close.POLICY
    return AFTER_UPGRADE.get(rej.status)


def error_frame(rej: Refusal) -> str:
    frame: dict[str, Any] = {"type": "error", "code": rej.code, "detail": rej.detail}
    if rej.retry_after is not None:
        frame["retry_after"] = rej.retry_after
    frame.update(rej.fields)
    return json.dumps(frame, separators=(",", ":"))


def _body(rej: Refusal) -> bytes:
    return json.dumps({"error": rej.code, "detail": rej.detail}).encode()


def _http_headers(rej: Refusal) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if rej.retry_after is not None:
        headers.append((b"retry-after", str(rej.retry_after).encode()))
    return headers


def parse_auth(message: str | bytes) -> str:
    """The token of a first ``{"type":"auth","token":...}`` frame; Refusal for anything else."""
    if isinstance(message, bytes):
        raise Refusal(400, "binary_frame", "binary frames are not accepted")
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or obj.get("type") != "auth":
        raise Refusal(401, "auth_expected", "the first frame must be an auth frame")
    token = obj.get("token")
    if set(obj) != {"type", "token"} or not isinstance(token, str) or not token:
        raise Refusal(401, "bad_auth", 'an auth frame is {"type":"auth","token":str}')
    return token


def _seq(query: dict[str, str], name: str) -> int:
    raw = query.get(name, "0") or "0"
    if not raw.isdigit() or len(raw) > 19:
        raise Refusal(400, "bad_resume", f"{name} must be a non-negative integer")
    return int(raw)


@dataclass(slots=True)
class GatewayStats:
    handshakes: Tally = field(default_factory=Tally)
    redirects: Tally = field(default_factory=Tally)
    rate_limited: Tally = field(default_factory=Tally)
    session_errors: int = 0


class Gateway:
    """Serves ``/ws`` for one node."""

    def __init__(
        self,
        settings: Settings,
        registry: Hub,
        router: Router,
        feeder: Feeder,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.context = Context(limits_of(settings), feeder, metrics, on_end=self._ended)
        self.router = router
        self.feeder = feeder
        self.stats = GatewayStats()
        metrics.add_source(self)
        self.doorman = Doorman(settings, metrics)
        self.verifier = TokenVerifier.from_settings(settings)
        self.handshaking = trio.CapacityLimiter(HANDSHAKE_CONCURRENCY)

    def statistics(self) -> GatewayStats:
        return snapshot(self.stats)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.feeder.starts.run)  # the batched resume-point reads
            await listener.serve(self.settings, self.doorman, self._handle, task_status=task_status)

    # ------------------------------------------------------------ handshake

    async def _handle(self, request: Upgrade, ip: str) -> Session | None:
        """One handshake; the session the listener then runs in the same task (its end is
        ``_ended``). Nothing a client does may escape into the server."""
        try:
            if tracing.ON:
                run = functools.partial(self._handshake, request)
                tp = request.header(b"traceparent")
                return await tracing.handshake(run, tp, self.settings.node_id)
            return await self._handshake(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise  # the transport failed: the listener counts it
        except Exception as exc:  # a bug, not a client's fault: log it, count it, serve on
            self.stats.session_errors += 1
            log.exception("session failed: %r", exc)
            return None

    def _ended(self, session: Session) -> None:
        """A session of this node has ended (``Context.on_end``)."""
        self.registry.remove(session)
        self.feeder.cursors.flush_soon()

    async def _handshake(self, request: Upgrade) -> Session | None:
        """Handshakes run at most ``HANDSHAKE_CONCURRENCY`` at once: a surge of thousands waits
        in line (parked, costing nothing) instead of stalling the loop in one huge batch. The
        wait for an auth frame comes first, outside that line (slow clients hold no slot)."""
        door = Door(request, self.settings.refuse_after_upgrade)
        hello = await self._hello(door)
        if hello is None:
            return None
        async with self.handshaking:
            return await self._open(door, hello)

    async def _hello(self, door: Door) -> Hello | None:
        """What the client asks for, its token verified; None once refused (or gone)."""
        try:
            query = self._preflight(door.request)
            token = query.get("token") or bearer(door.request.header(b"authorization"))
            if not token and door.after_upgrade:
                token = await self._auth_frame(door)
                if token is None:
                    return None
            return self._check(query, token)
        except Refusal as rej:
            await self._reject(door, rej)
            return None

    async def _auth_frame(self, door: Door) -> str | None:
        """Accept, then wait ``handshake_timeout`` for a first auth frame; None if the client
        left. Raises :class:`Refusal` for a late, missing or malformed one."""
        wire = await door.accept()
        with trio.move_on_after(self.settings.handshake_timeout):
            message = await self._first_message(wire)
            return None if message is None else parse_auth(message)
        raise Refusal(401, "missing_token", "no token, and no auth frame within handshake_timeout")

    async def _first_message(self, wire: Wire) -> str | bytes | None:
        """The client's first complete message (bounded by ``max_frame_bytes``)."""
        parts: list[Any] = []
        limit = self.settings.max_frame_bytes
        while True:
            for event in await wire.receive():
                if isinstance(event, CloseConnection):
                    return None  # the client left (the listener closes the socket)
                if isinstance(event, Ping):
                    await wire.stream.send_all(wire.pong_frame(event))
                elif isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    if sum(len(p) for p in parts) > limit:
                        raise Refusal(401, "bad_auth", "auth frame too big")
                    if event.message_finished:
                        text = isinstance(event, TextMessage)
                        return "".join(parts) if text else b"".join(parts)

    async def _open(self, door: Door, hello: Hello) -> Session | None:
        """Route and (if this node owns the user) open a session; None if refused."""
        route = await self._route(hello)
        if route.kind == "unavailable":
            await self._reject(door, Refusal(503, "unavailable", route.reason, 1))
        elif route.kind == "redirect":
            assert route.node is not None
            wire = await door.accept()
            await self._redirect_now(wire, route.node.id, route.node.ws_url, route.reason)
        else:
            return await self._open_local(door, hello)
        return None

    async def _route(self, hello: Hello) -> Route:
        if hello.avoid:
            return await self.router.route_avoiding(hello.user, hello.avoid, self._patience)
        return self.router.route(hello.user)

    async def _open_local(self, door: Door, hello: Hello) -> Session | None:
        """Register first (live notifications now buffer), read where to resume, accept."""
        if self.registry.count_of_user(hello.user) >= self.settings.max_sessions_per_user:
            self.stats.rate_limited["user_sessions"] += 1
            await self._reject(door, Refusal(429, "too_many_sessions", "session cap reached", 5))
            return None
        session = Session(self.context, hello.user, hello.device, hello.expires_at)
        self.registry.add(session)
        try:
            first, recovered = await self._start_points(door, session, hello)
            if first is None:  # refused (already answered)
                self.registry.remove(session)
                return None
            if self.router.route(hello.user).kind != "local":  # the ring moved meanwhile
                self.router.redirect(session)  # closing: no welcome, the redirect instead
            closing = session.close_request is not None
            welcome = None if closing else self._welcome(session, recovered)
            if door.wire is None and welcome is not None:  # the welcome goes with the 101
                wire = await door.accept(encode_text(welcome))
                welcome = None
            else:  # accepted before (auth frame), or no welcome
                wire = await door.accept()
        except BaseException:
            self.registry.remove(session)
            raise
        self.stats.handshakes["accepted"] += 1
        tracing.handshake_accepted(hello.user, session.id, recovered, redirected=closing)
        session.open(wire, welcome, first)
        return session

    async def _start_points(
        self, door: Door, session: Session, hello: Hello
    ) -> tuple[dict[str, list[Any]] | None, bool]:
        """Where the session resumes, or (None, False) once the handshake was refused."""
        try:
            # a bare scope, not fail_after (a generator context manager): one per handshake
            with trio.CancelScope(deadline=trio.current_time() + START_TIMEOUT):
                return await self.feeder.start_points(session, hello.resume, hello.epoch)
        except BadResume as exc:
            await self._reject(door, Refusal(400, "bad_resume", str(exc), fields={"ch": exc.ch}))
            return None, False
        except StoreUnavailable:
            pass
        await self._reject(door, Refusal(503, "store_unavailable", "cannot read the stream", 1))
        return None, False

    @property
    def _patience(self) -> float:
        """How long a handshake that avoids an unreachable owner may wait for the ring."""
        return min(self.settings.lease_ttl + 1.0, self.settings.handshake_timeout)

    def _preflight(self, request: Upgrade) -> dict[str, str]:
        """Path, query shape and Origin: the checks that need no token."""
        path, query = _query(request)
        if path != "/ws":
            raise Refusal(404, "not_found", "WebSocket endpoint is /ws")
        if not origin_allowed(request.header(b"origin"), self.settings.allowed_origins):
            raise Refusal(403, "origin_not_allowed", "this Origin may not connect")
        return query

    def _check(self, query: dict[str, str], token: str | None) -> Hello:
        try:
            identity = self.verifier.verify(token)
        except AuthError as exc:
            raise Refusal(401, exc.reason, exc.detail) from None
        try:
            device = check_id(query.get("device", "default"), "device")
        except BadId as exc:
            raise Refusal(400, "bad_device", str(exc)) from None
        if not identity.allows_device(device):
            raise Refusal(403, "device_not_allowed", "the token does not allow this device")
        resume = {"user": _seq(query, "last"), "broadcast": _seq(query, "blast")}
        return Hello(
            user=identity.user,
            device=device,
            expires_at=identity.expires_at,
            avoid=query.get("avoid", "")[:256],
            resume=resume,
            epoch=query.get("epoch", "")[:64],
        )

    async def _reject(self, door: Door, rej: Refusal) -> None:
        self.stats.handshakes[rej.code] += 1
        tracing.handshake_refused(rej.code, rej.status)
        self.doorman.sampled.log(trio.current_time(), rej.code, "handshake refused: %s", rej.code)
        await door.refuse(rej)

    async def _redirect_now(self, wire: Wire, node: str, url: str, reason: str) -> None:
        self.stats.handshakes["redirect"] += 1
        self.stats.redirects[reason] += 1
        tracing.handshake_redirected(node, reason)
        frame = encode_text(protocol.redirect(node=node, url=url, reason=reason))
        with trio.move_on_after(2):
            await wire.stream.send_all(frame + wire.close_frame(Close.REDIRECT, reason))
            await wire.goodbye(1.0)

    def _welcome(self, session: Session, recovered: bool) -> str:
        s = self.settings
        return protocol.welcome(
            node=s.node_id,
            user=session.user,
            device=session.device,
            epoch=self.feeder.store.epoch,
            interval=s.heartbeat_interval,
            timeout=s.heartbeat_timeout,
            recovered=recovered,
            resume={ch: feed.sent for ch, feed in session.feeds.items()},
        )
