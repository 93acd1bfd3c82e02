"""The WebSocket front door: handshake (token, device, route), then one session until it ends.

Handshake: ``/ws?token=<jwt>&device=<id>`` (or ``Authorization: Bearer``). A bad, expired or
missing token is refused with HTTP 401 before any upgrade. A user owned by another node gets a
``redirect`` frame and close 4302; the owner registers the session (live notifications buffer
in its feeds from then on), reads where it resumes, accepts, and hands the connection to
``Session.run`` in the same task.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import trio

from . import listener, protocol
from .auth import AuthError, TokenVerifier, bearer
from .delivery import BadResume, Feeder
from .encoding import BadId, check_id
from .hub import Hub
from .limits import origin_allowed
from .listener import Doorman, Refusal
from .machine import Limits
from .metrics import Metrics
from .protocol import Close
from .router import Route, Router
from .sessions import Context, Session
from .settings import Settings
from .store import StoreUnavailable
from .wire import Upgrade, Wire, encode_text

log = logging.getLogger(__name__)
HANDSHAKE_CONCURRENCY = 128  # handshakes in progress at once (their store reads batch together)
START_TIMEOUT = 5.0  # seconds the resume-point reads of one handshake may take (then 503)


def _query(request: Upgrade) -> tuple[str, dict[str, str]]:
    path, _, qs = request.target.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(
            qs, keep_blank_values=True, strict_parsing=False, max_num_fields=32
        )
    except ValueError:
        raise Refusal(400, "bad_query", "malformed or too many query parameters") from None
    return path, dict(pairs)


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


@dataclass(slots=True)
class Opened:
    """A session registered, accepted and ready to run."""

    session: Session
    wire: Wire
    welcome: str
    first: dict[str, list[Any]] | None

    def parts(self) -> tuple[Wire, str, dict[str, list[Any]]]:
        """What ``Session.run`` takes; the first batches are handed over, not kept here."""
        first, self.first = self.first or {}, None
        return self.wire, self.welcome, first


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
        registry: Hub,
        router: Router,
        feeder: Feeder,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.context = Context(limits_of(settings), feeder, metrics)
        self.router = router
        self.feeder = feeder
        self.metrics = metrics
        self.doorman = Doorman(settings, metrics)
        self.verifier = TokenVerifier.from_settings(settings)
        self.handshaking = trio.CapacityLimiter(HANDSHAKE_CONCURRENCY)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await listener.serve(self.settings, self.doorman, self._handle, task_status=task_status)

    # ------------------------------------------------------------ handshake

    async def _handle(self, request: Upgrade, ip: str) -> None:
        """One connection, start to end. Nothing a client does may escape into the server."""
        try:
            await self._handshake(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise  # the transport failed: the listener counts it
        except Exception as exc:  # a bug, not a client's fault: log it, count it, serve on
            self.metrics.session_errors.inc()
            log.exception("session failed: %r", exc)

    async def _handshake(self, request: Upgrade) -> None:
        """Handshakes run at most ``HANDSHAKE_CONCURRENCY`` at once: a surge of thousands waits
        in line (parked, costing nothing) instead of stalling the loop in one huge batch."""
        session: Session | None = None
        try:
            async with self.handshaking:
                opened = await self._open(request)
            if opened is not None:
                session = opened.session
                await session.run(*opened.parts())
        finally:
            if session is not None:
                self.registry.remove(session)
                self._count()
                self.feeder.cursors.flush_soon()

    async def _open(self, request: Upgrade) -> Opened | None:
        """Check, route and (if this node owns the user) open a session; None if refused."""
        try:
            hello = self._check(request)
        except Refusal as rej:
            await self._reject(request, rej)
            return None
        route = await self._route(hello)
        if route.kind == "unavailable":
            await self._reject(request, Refusal(503, "unavailable", route.reason, 1))
        elif route.kind == "redirect":
            assert route.node is not None
            wire = await request.accept()
            await self._redirect_now(wire, route.node.id, route.node.ws_url, route.reason)
        else:
            return await self._open_local(request, hello)
        return None

    async def _route(self, hello: Hello) -> Route:
        if hello.avoid:
            return await self.router.route_avoiding(hello.user, hello.avoid, self._patience)
        return self.router.route(hello.user)

    async def _open_local(self, request: Upgrade, hello: Hello) -> Opened | None:
        """Register first (live notifications now buffer), read where to resume, accept."""
        if self.registry.count_of_user(hello.user) >= self.settings.max_sessions_per_user:
            self.metrics.rate_limited.labels(kind="user_sessions").inc()
            await self._reject(request, Refusal(429, "too_many_sessions", "session cap reached", 5))
            return None
        session = Session(self.context, hello.user, hello.device, hello.expires_at)
        self.registry.add(session)
        try:
            first, recovered = await self._start_points(request, session, hello)
            wire = await request.accept() if first is not None else None
        except BaseException:
            self.registry.remove(session)
            raise
        if first is None or wire is None:  # refused (already answered)
            self.registry.remove(session)
            return None
        if self.router.route(hello.user).kind != "local":  # the ring moved meanwhile
            self.router.redirect(session)
        self.metrics.handshakes.labels(result="accepted").inc()
        self._count()
        return Opened(session, wire, self._welcome(session, recovered), first)

    async def _start_points(
        self, request: Upgrade, session: Session, hello: Hello
    ) -> tuple[dict[str, list[Any]] | None, bool]:
        """Where the session resumes, or (None, False) once the handshake was refused."""
        try:
            with trio.fail_after(START_TIMEOUT):
                return await self.feeder.start_points(session, hello.resume, hello.epoch)
        except BadResume as exc:
            await self._reject(request, Refusal(400, "bad_resume", str(exc)))
        except (StoreUnavailable, trio.TooSlowError):
            await self._reject(
                request, Refusal(503, "store_unavailable", "cannot read the stream", 1)
            )
        return None, False

    @property
    def _patience(self) -> float:
        """How long a handshake that avoids an unreachable owner may wait for the ring."""
        return min(self.settings.lease_ttl + 1.0, self.settings.handshake_timeout)

    def _check(self, request: Upgrade) -> Hello:
        path, query = _query(request)
        if path != "/ws":
            raise Refusal(404, "not_found", "WebSocket endpoint is /ws")
        if not origin_allowed(request.header(b"origin"), self.settings.allowed_origins):
            raise Refusal(403, "origin_not_allowed", "this Origin may not connect")
        token = query.get("token") or bearer(request.header(b"authorization"))
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

    async def _reject(self, request: Upgrade, rej: Refusal) -> None:
        self.metrics.handshakes.labels(result=rej.code).inc()
        self.doorman.sampled.log(trio.current_time(), rej.code, "handshake refused: %s", rej.code)
        body = json.dumps({"error": rej.code, "detail": rej.detail}).encode()
        headers = [(b"content-type", b"application/json")]
        if rej.retry_after is not None:
            headers.append((b"retry-after", str(rej.retry_after).encode()))
        with trio.move_on_after(2):
            await request.reject(rej.status, headers, body)

    async def _redirect_now(self, wire: Wire, node: str, url: str, reason: str) -> None:
        self.metrics.handshakes.labels(result="redirect").inc()
        self.metrics.redirects.labels(reason=reason).inc()
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

    def _count(self) -> None:
        stats = self.registry.statistics()
        self.metrics.sessions.set(stats.sessions)
        self.metrics.users.set(stats.users)
