"""The WebSocket front door: handshake (token, device, route), then one session until it ends.

Handshake: ``/ws?token=<jwt>&device=<id>`` (or ``Authorization: Bearer``). A bad, expired or
missing token is refused with HTTP 401 before any upgrade. A user owned by another node gets a
``redirect`` frame and close 4302; the owner registers the session and sends ``welcome``.

Per session: the handler task writes (queue -> socket, pings, heartbeat and token deadlines)
and one reader task parses client frames. Closing is always the handler's job: anyone may
call ``Session.close(code, ...)``, which cancels the session and lets the handler send the
final frame and the close code.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from . import listener, protocol
from .auth import AuthError, TokenVerifier, bearer
from .delivery import Feeder
from .encoding import BadId, check_id
from .limits import TokenBucket, origin_allowed
from .listener import Doorman, Refusal
from .metrics import Metrics
from .protocol import Close, ProtocolError
from .router import Route, Router
from .sessions import Registry, Session
from .settings import Settings
from .store import StoreUnavailable

log = logging.getLogger(__name__)


def _query(request: WebSocketRequest) -> tuple[str, dict[str, str]]:
    path, _, qs = request.path.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(
            qs, keep_blank_values=True, strict_parsing=False, max_num_fields=32
        )
    except ValueError:
        raise Refusal(400, "bad_query", "malformed or too many query parameters") from None
    return path, dict(pairs)


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


@dataclass(frozen=True, slots=True)
class Hello:
    """What a handshake asked for, validated."""

    user: str
    device: str
    expires_at: float
    avoid: str
    resume: dict[str, int]
    epoch: str


def _seq(query: dict[str, str], name: str) -> int:
    raw = query.get(name, "0") or "0"
    if not raw.isdigit() or len(raw) > 19:
        raise Refusal(400, "bad_resume", f"{name} must be a non-negative integer")
    return int(raw)


class Gateway:
    """Serves ``/ws`` for one node."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        router: Router,
        feeder: Feeder,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.feeder = feeder
        self.metrics = metrics
        self.doorman = Doorman(settings, metrics)
        self.verifier = TokenVerifier.from_settings(settings)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await listener.serve(self.settings, self.doorman, self._handle, task_status=task_status)

    # ------------------------------------------------------------ handshake

    async def _handle(self, request: WebSocketRequest, ip: str) -> None:
        """One connection, start to end. Nothing a client does may escape into the server."""
        try:
            await self._handshake(request)
        except Exception as exc:  # a bug, not a client's fault: log it, count it, serve on
            self.metrics.session_errors.inc()
            log.exception("session failed: %r", exc)

    async def _handshake(self, request: WebSocketRequest) -> None:
        try:
            hello = self._check(request)
        except Refusal as rej:
            await self._reject(request, rej)
            return
        route = await self._route(hello)
        if route.kind == "unavailable":
            await self._reject(request, Refusal(503, "unavailable", route.reason, 1))
        elif route.kind == "redirect":
            assert route.node is not None
            ws = await request.accept()
            await self._redirect_now(ws, route.node.id, route.node.ws_url, route.reason)
        else:
            await self._serve_local(request, hello)

    async def _route(self, hello: Hello) -> Route:
        if hello.avoid:
            return await self.router.route_avoiding(hello.user, hello.avoid, self._patience)
        return self.router.route(hello.user)

    async def _serve_local(self, request: WebSocketRequest, hello: Hello) -> None:
        """Register first (live notifications now buffer), read where to resume, then welcome."""
        if self.registry.count_of_user(hello.user) >= self.settings.max_sessions_per_user:
            self.metrics.rate_limited.labels(kind="user_sessions").inc()
            await self._reject(request, Refusal(429, "too_many_sessions", "session cap reached", 5))
            return
        session = Session(hello.user, hello.device, self.settings.session_queue, hello.expires_at)
        session.frames = TokenBucket(
            self.settings.frame_rate, self.settings.frame_burst, trio.current_time()
        )
        self.registry.add(session)
        try:
            with trio.fail_after(5):
                first, recovered = await self.feeder.start_points(
                    session, hello.resume, hello.epoch
                )
        except (StoreUnavailable, trio.TooSlowError):
            self.registry.remove(session)
            await self._reject(
                request, Refusal(503, "store_unavailable", "cannot read the stream", 1)
            )
            return
        try:
            ws = await request.accept()
        except BaseException:
            self.registry.remove(session)
            raise
        if self.router.route(hello.user).kind != "local":  # the ring moved meanwhile
            self.router.redirect(session)
        await self._run(ws, session, first, recovered)

    @property
    def _patience(self) -> float:
        """How long a handshake that avoids an unreachable owner may wait for the ring."""
        return min(self.settings.lease_ttl + 1.0, self.settings.handshake_timeout)

    def _check(self, request: WebSocketRequest) -> Hello:
        path, query = _query(request)
        if path != "/ws":
            raise Refusal(404, "not_found", "WebSocket endpoint is /ws")
        if not origin_allowed(_header(request, b"origin"), self.settings.allowed_origins):
            raise Refusal(403, "origin_not_allowed", "this Origin may not connect")
        token = query.get("token") or bearer(_header(request, b"authorization"))
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

    async def _reject(self, request: WebSocketRequest, rej: Refusal) -> None:
        self.metrics.handshakes.labels(result=rej.code).inc()
        self.doorman.sampled.log(trio.current_time(), rej.code, "handshake refused: %s", rej.code)
        body = json.dumps({"error": rej.code, "detail": rej.detail}).encode()
        headers = [(b"content-type", b"application/json")]
        if rej.retry_after is not None:
            headers.append((b"retry-after", str(rej.retry_after).encode()))
        with trio.move_on_after(2):
            await request.reject(rej.status, extra_headers=headers, body=body)

    async def _redirect_now(
        self, ws: WebSocketConnection, node: str, url: str, reason: str
    ) -> None:
        self.metrics.handshakes.labels(result="redirect").inc()
        self.metrics.redirects.labels(reason=reason).inc()
        with trio.move_on_after(2):
            try:
                await ws.send_message(protocol.redirect(node=node, url=url, reason=reason))
                await ws.aclose(Close.REDIRECT, reason)
            except ConnectionClosed:
                pass

    # ------------------------------------------------------------ session

    async def _run(
        self,
        ws: WebSocketConnection,
        session: Session,
        first: dict[str, list[Any]],
        recovered: bool,
    ) -> None:
        self.metrics.handshakes.labels(result="accepted").inc()
        self._count()
        try:
            with trio.CancelScope() as scope:
                session.cancel_scope = scope
                if session.close_request is not None:
                    scope.cancel()
                await ws.send_message(self._welcome(session, recovered))
                async with trio.open_nursery() as nursery:
                    session.nursery = nursery
                    for ch, batch in first.items():
                        nursery.start_soon(self.feeder.replay, session, ch, batch)
                    nursery.start_soon(self._reader, ws, session)
                    await self._writer(ws, session, nursery)
        except ConnectionClosed:
            pass
        finally:
            session.nursery = None
            self.registry.remove(session)
            self._count()
            self.feeder.cursors.flush_soon()
            await self._finish(ws, session)

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

    async def _writer(
        self, ws: WebSocketConnection, session: Session, nursery: trio.Nursery
    ) -> None:
        s = self.settings
        next_ping = trio.current_time() + s.heartbeat_interval
        token_deadline = trio.current_time() + max(0.0, session.expires_at - time.time())
        while True:
            silent_deadline = session.last_seen + s.heartbeat_timeout
            frame: str | None = None
            with trio.move_on_at(min(next_ping, silent_deadline, token_deadline)):
                frame = await session.queue.receive()
            if frame is not None:  # sent outside the deadline: a deadline never cuts a frame
                await self._send(ws, session, frame)
                continue
            now = trio.current_time()
            if now >= token_deadline:
                session.close(Close.TOKEN_EXPIRED, "token expired")
            elif now >= session.last_seen + s.heartbeat_timeout:
                session.close(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")
            elif now >= next_ping:
                nursery.start_soon(self._ping, ws, session)
                next_ping = now + s.heartbeat_interval

    async def _send(self, ws: WebSocketConnection, session: Session, frame: str) -> None:
        try:
            await ws.send_message(frame)
        except ConnectionClosed:
            session.close(Close.GOING_AWAY, "connection lost")

    async def _ping(self, ws: WebSocketConnection, session: Session) -> None:
        try:
            await ws.ping()
            session.last_seen = trio.current_time()
        except ConnectionClosed:
            pass

    async def _reader(self, ws: WebSocketConnection, session: Session) -> None:
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                session.close(Close.NORMAL, "client closed")
                return
            session.last_seen = trio.current_time()
            if session.frames is not None and not session.frames.take(session.last_seen):
                self.metrics.rate_limited.labels(kind="frames").inc()
                session.close(Close.RATE_LIMITED, "too many frames")
                return
            try:
                frame = protocol.parse_client_frame(message)
            except ProtocolError as exc:
                self._protocol_error(session, exc)
                continue
            if isinstance(frame, protocol.Ping):
                session.offer(protocol.PONG)
            elif isinstance(frame, protocol.Ack):
                self._ack(session, frame)

    def _ack(self, session: Session, frame: protocol.Ack) -> None:
        try:
            self.feeder.ack(session, frame.ch, frame.seq)
        except ValueError as exc:
            self._protocol_error(session, ProtocolError("bad_ack", str(exc)))

    def _protocol_error(self, session: Session, exc: ProtocolError) -> None:
        self.metrics.frame_errors.labels(code=exc.code).inc()
        if exc.close is not None:
            session.close(exc.close, exc.code, protocol.error(exc.code, exc.detail))
        else:
            session.offer(protocol.error(exc.code, exc.detail))

    async def _finish(self, ws: WebSocketConnection, session: Session) -> None:
        request = session.close_request
        code = request.code if request else Close.GOING_AWAY
        self.metrics.closes.labels(code=str(code)).inc()
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                if request and request.frame:
                    await ws.send_message(request.frame)
                await ws.aclose(code, request.reason if request else "node stopping")
            except ConnectionClosed:
                pass

    def _count(self) -> None:
        stats = self.registry.statistics()
        self.metrics.sessions.set(stats.sessions)
        self.metrics.users.set(stats.users)
