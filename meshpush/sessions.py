"""One client session on its owner node, as one unit: :class:`Session` and its ``run``.

A session is a pure :class:`~meshpush.machine.SessionMachine` (feeds, acks, frame budget,
deadlines, slow-consumer rule) driven by one task, ``run``, which owns everything the session
does: it reads and parses client frames (and wakes up for the machine's next deadline), and
it hosts the session's on-demand tasks — stream replays and, only while the kernel will not
take more, the drain of the outbound buffer. An idle session is one task, no buffer.

Frames arrive already encoded (``wire.encode_text``: one ``bytes`` for every session a
message goes to) and are written at once when the socket takes them; what does not fit waits
in the session's outbound deque, and every later frame waits behind it (order is kept).

Anyone may end a session with ``close(code, reason, frame)``; the first decision wins, the
session's task is cancelled and ``run`` writes what was buffered, ``frame``, and the close.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from . import tracing
from .delivery import Feeder
from .feed import Chained, Feed, Verdict
from .machine import CloseDecision, Limits, SessionMachine
from .metrics import Metrics
from .protocol import Close
from .ring import slot
from .store import StoredMessage
from .wire import Wire, encode_text

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
FINISH_TIMEOUT = 2.0  # writing the last frames and the close, at most
GOODBYE_TIMEOUT = 1.0  # waiting for the client's close frame after ours
FINISH_CONCURRENCY = 256


@dataclass(frozen=True, slots=True)
class Context:
    """What every session of a node shares."""

    limits: Limits
    feeder: Feeder
    metrics: Metrics
    # sessions writing their last frames at once: a mass close (redirects, expiries, a
    # shutdown) is spread over many scheduler batches, so the loop never stalls
    finishing: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(FINISH_CONCURRENCY)
    )


class Session:
    """One client connection on its owner node."""

    __slots__ = (
        "ctx",
        "device",
        "draining",
        "id",
        "machine",
        "nursery",
        "out",
        "scope",
        "since",
        "slot",
        "user",
        "wire",
    )

    def __init__(self, ctx: Context, user: str, device: str, expires_at: float) -> None:
        self.id = next(_ids)
        self.ctx = ctx
        self.user = user
        self.device = device
        self.slot = slot(user)
        now = trio.current_time()
        token_deadline = now + max(0.0, expires_at - time.time())
        self.machine = SessionMachine(ctx.limits, now, token_deadline)
        self.wire: Wire | None = None
        self.out: deque[bytes] | None = None  # frames the kernel did not take yet
        self.draining = False
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.since = time.time()  # wall clock, for presence

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} device={self.device!r}>"

    # ------------------------------------------------------------ what others call

    @property
    def feeds(self) -> dict[str, Feed]:
        return self.machine.feeds

    @property
    def close_request(self) -> CloseDecision | None:
        return self.machine.closing

    def close(self, code: int, reason: str, frame: str | None = None) -> None:
        """Ask the session to end with ``code`` (``frame`` sent first); the first ask wins."""
        self.machine.close(code, reason, frame)
        if self.scope is not None:
            self.scope.cancel()

    def live(self, ch: str, note: Chained, frame: bytes) -> bool:
        """A live notification for this session; True if its (shared) frame was written."""
        verdict = self.machine.feeds[ch].live(note)
        if tracing.ON:
            tracing.fed(self, ch, note, verdict)
        if verdict is Verdict.DELIVER:
            return self.write(frame)
        if verdict is Verdict.CATCH_UP:
            self.ctx.feeder.catch_up(self, ch, "prev")
        return False

    def send_text(self, text: str) -> bool:
        return self.write(encode_text(text))

    def write(self, frame: bytes) -> bool:
        """Write an encoded frame now, or behind what waits; False if the session is closing."""
        if self.machine.closing is not None or self.wire is None:
            return False
        if tracing.ON:
            tracing.write(self._push, self, frame)
        else:
            self._push(frame)
        return True

    def write_many(self, frames: Sequence[bytes], joined: bytes) -> bool:
        """Write several encoded frames, ``joined`` being their concatenation (shared by every
        session they go to), with one syscall when nothing waits; what the kernel does not
        take is buffered frame by frame (so the slow-consumer bounds count frames). False if
        the session is closing."""
        if self.machine.closing is not None or self.wire is None:
            return False
        if self.out or len(frames) == 1:
            for frame in frames:
                self._push(frame)
            return True
        try:
            written = self.wire.try_send(joined)
        except OSError:
            self.close(Close.GOING_AWAY, "connection lost")
            return True
        if written < len(joined):
            self._buffer_rest(frames, written)
        return True

    def _buffer_rest(self, frames: Sequence[bytes], written: int) -> None:
        """Queue what the kernel did not take of ``frames`` (``written`` bytes went out)."""
        out = self.out = self.out if self.out is not None else deque()
        for frame in frames:
            if written >= len(frame):
                written -= len(frame)
                continue
            rest = frame[written:] if written else frame
            written = 0
            out.append(rest)
            self._queued(len(rest))
        self._start_drain()

    @property
    def buffered(self) -> int:
        """Frames waiting in the outbound buffer."""
        return self.machine.outbound.frames

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run a task of this session (a replay); False if the session is closing."""
        if self.nursery is None or self.machine.closing is not None:
            return False
        try:
            self.nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closing: the next connection resumes anyway
            return False
        return True

    # ------------------------------------------------------------ writing

    def _push(self, frame: bytes) -> None:
        assert self.wire is not None
        out = self.out
        if out:
            out.append(frame)
            self._queued(len(frame))
            return
        try:
            written = self.wire.try_send(frame)
        except OSError:
            self.close(Close.GOING_AWAY, "connection lost")
            return
        if written == len(frame):
            return
        if out is None:
            out = self.out = deque()
        out.append(frame[written:] if written else frame)
        self._queued(len(frame) - written)
        self._start_drain()

    def _queued(self, size: int) -> None:
        if self.machine.queued(size, trio.current_time()) is not None and self.scope is not None:
            self.ctx.metrics.rate_limited.labels(kind="slow_consumer").inc()
            self.scope.cancel()

    def _start_drain(self) -> None:
        if not self.draining and self.spawn(self._drain):
            self.draining = True

    async def _drain(self) -> None:
        """Write what waits whenever the socket takes it; 4008 if it stays over the bound."""
        assert self.wire is not None and self.out is not None
        try:
            while self.out:
                with trio.move_on_at(self.machine.outbound.deadline(self.ctx.limits)) as timer:
                    frames, size = await self.wire.send_buffered(self.out)
                    self.machine.written(frames, size, trio.current_time())
                if timer.cancelled_caught:
                    self.ctx.metrics.rate_limited.labels(kind="slow_consumer").inc()
                    self.close(Close.SLOW_CONSUMER, "slow consumer")
                    return
            self.out = None
        except _BROKEN:
            self.close(Close.GOING_AWAY, "connection lost")
        finally:
            self.draining = False

    # ------------------------------------------------------------ the session's task

    async def run(
        self,
        wire: Wire,
        welcome: str,
        first: dict[str, list[StoredMessage]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the session until it ends; every task of the session lives in here."""
        self.wire = wire
        try:
            with trio.CancelScope() as scope:
                self.scope = scope
                if self.machine.closing is not None:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    task_status.started()
                    self.send_text(welcome)
                    for ch in list(first):
                        self.ctx.feeder.begin(self, ch, first.pop(ch))
                    await self._read(wire)
                    nursery.cancel_scope.cancel()
        finally:
            self.nursery = None
            await self._finish(wire)

    async def _read(self, wire: Wire) -> None:
        parts: list[Any] = []
        machine = self.machine
        while machine.closing is None:
            with trio.move_on_at(machine.next_deadline()) as timer:
                try:
                    events = await wire.receive()
                except _BROKEN:
                    self.close(Close.NORMAL, "connection lost")
                    return
            now = trio.current_time()
            if timer.cancelled_caught:
                if machine.tick(now):
                    self._push(wire.ping_frame())
                continue
            machine.heard(now)
            for event in events:
                self._on_event(event, parts, now)
                if machine.closing is not None:
                    return

    def _on_event(self, event: object, parts: list[Any], now: float) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            parts.append(event.data)
            if sum(len(p) for p in parts) > self.ctx.limits.max_frame_bytes:
                self._frame_error("too_big", Close.TOO_BIG, "frame too big")
            elif event.message_finished:
                message = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                parts.clear()
                self._on_message(message, now)
        elif isinstance(event, Ping):
            decision = self.machine.control(len(event.payload), now)
            if decision is None:
                assert self.wire is not None
                self._push(self.wire.pong_frame(event))
            else:
                self._rate_limited()
        elif isinstance(event, CloseConnection):
            self._on_close(event)

    def _on_message(self, message: str | bytes, now: float) -> None:
        reply = self.machine.receive(message, now)
        for frame in reply.frames:
            self.send_text(frame)
        if reply.error:
            self.ctx.metrics.frame_errors.labels(code=reply.error).inc()
        if reply.acked:
            self.ctx.feeder.save_cursor(self)
        if reply.close is not None and reply.close.code == Close.RATE_LIMITED:
            self._rate_limited()

    def _rate_limited(self) -> None:
        self.ctx.metrics.rate_limited.labels(kind="frames").inc()

    def _frame_error(self, code: str, close: int, detail: str) -> None:
        self.ctx.metrics.frame_errors.labels(code=code).inc()
        self.close(close, detail)

    def _on_close(self, event: CloseConnection) -> None:
        assert self.wire is not None
        if self.wire.remote_closing or event.code == 1006:
            self.close(Close.NORMAL, "client closed")
        else:  # wsproto could not parse the client's bytes (1002, 1007, 1009)
            self._frame_error("bad_websocket_frame", event.code, event.reason or "bad frame")

    async def _finish(self, wire: Wire) -> None:
        """Write what is buffered, the last frame and the close; then hang up (bounded)."""
        decision = self.machine.closing or CloseDecision(Close.GOING_AWAY, "node stopping")
        self.machine.closing = decision
        self.ctx.metrics.closes.labels(code=str(decision.code)).inc()
        with trio.CancelScope(shield=True):
            async with self.ctx.finishing:  # held over one checkpoint: a mass close is spread
                self._last_frames(wire, decision)  # over scheduler batches of at most N
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(FINISH_TIMEOUT):
                try:
                    while self.out:
                        await wire.send_buffered(self.out)
                    await wire.goodbye(GOODBYE_TIMEOUT)
                except _BROKEN:
                    pass
            self.out = None
            with trio.move_on_after(0.5):
                await wire.stream.aclose()

    def _last_frames(self, wire: Wire, decision: CloseDecision) -> None:
        if decision.frame is not None and not wire.remote_closing:
            self._push(encode_text(decision.frame))
        self._push(wire.close_frame(decision.code, decision.reason))
