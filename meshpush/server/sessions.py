"""One client session on its owner node, as one unit: :class:`Session` and its ``run``.

A session is a pure :class:`~meshpush.core.machine.SessionMachine` (feeds, acks, frame budget,
deadlines, slow-consumer rule) driven by one task, ``run``, which owns everything the session
does: it reads and parses client frames (and wakes up for the machine's next deadline), and
it hosts the session's on-demand tasks — stream replays and, only while the kernel will not
take more, the drain of the outbound buffer — in a nursery it opens only while there are
some. ``run`` is the connection's own task (the listener calls it once the handshake has
``open``-ed the session): an idle session is that one task parked on its socket under one
cancel scope, no nursery, no buffer.

Frames arrive already encoded (``wire.encode_text``: one ``bytes`` for every session a
message goes to) and are written at once when the socket takes them; what does not fit waits
in the session's outbound deque, and every later frame waits behind it (order is kept).

Anyone may end a session with ``close(code, reason, frame)``; the first decision wins, the
session's task is woken (its read scope cancelled) and ``run`` cancels the helpers, writes
what was buffered, ``frame``, and the close, then calls ``Context.on_end``.
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
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage

from meshpush.backends.store import StoredMessage
from meshpush.core.feed import Chained, Feed, Verdict
from meshpush.core.frames import ProtocolClose
from meshpush.core.machine import CloseDecision, Limits, SessionMachine
from meshpush.core.protocol import Close
from meshpush.core.ring import slot
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.server.delivery import Feeder
from meshpush.server.wire import Wire, encode_text

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
FINISH_TIMEOUT = 2.0  # writing the last frames and the close, at most
GOODBYE_TIMEOUT = 1.0  # waiting for the client's close frame after ours
FINISH_CONCURRENCY = 256


@dataclass(slots=True)
class SessionStats:
    """What the sessions of a node count (in their shared ``Context``)."""

    closes: Tally = field(default_factory=Tally)
    frame_errors: Tally = field(default_factory=Tally)
    rate_limited: Tally = field(default_factory=Tally)


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
    # called once a session has ended (its socket closed): the owner's bookkeeping (one
    # function shared by every session, so a session stores no callback of its own)
    on_end: Callable[[Session], None] | None = None
    stats: SessionStats = field(default_factory=SessionStats)

    def __post_init__(self) -> None:
        self.metrics.add_source(self)

    def statistics(self) -> SessionStats:
        return snapshot(self.stats)


class Session:
    """One client connection on its owner node."""

    __slots__ = (
        "ctx",
        "device",
        "draining",
        "feeds",
        "id",
        "machine",
        "nursery",
        "out",
        "pending",
        "scope",
        "since",
        "slot",
        "tasks",
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
        self.feeds: dict[str, Feed] = self.machine.feeds  # the machine's (a slot: fan-out reads it)
        self.wire: Wire | None = None
        self.out: deque[bytes] | None = None  # frames the kernel did not take yet
        self.draining = False
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None  # open only while helper tasks run
        self.tasks = 0  # helper tasks running in the nursery
        self.pending: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] | None = None
        self.since = time.time()  # wall clock, for presence

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} device={self.device!r}>"

    # ------------------------------------------------------------ what others call

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
        if self.out:  # behind what waits
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
        """Run a task of this session (a replay, the drain); False if the session is closing.

        The task starts in the session's nursery, which its own task opens on demand."""
        if self.machine.closing is not None:
            return False
        if self.nursery is not None:
            try:
                self.nursery.start_soon(self._helper, fn, args)
            except RuntimeError:  # the nursery is closing: the next connection resumes anyway
                return False
            self.tasks += 1
            return True
        if self.pending is None:
            self.pending = []
        self.pending.append((fn, args))
        self._wake()
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
            self.ctx.stats.rate_limited["slow_consumer"] += 1
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
                    self.ctx.stats.rate_limited["slow_consumer"] += 1
                    self.close(Close.SLOW_CONSUMER, "slow consumer")
                    return
            self.out = None
        except _BROKEN:
            self.close(Close.GOING_AWAY, "connection lost")
        finally:
            self.draining = False

    # ------------------------------------------------------------ the session's task

    def open(self, wire: Wire, welcome: str | None, first: dict[str, list[StoredMessage]]) -> None:
        """The upgrade was accepted: send the welcome (None: it went out with the 101), queue
        the first replays (they start when ``run`` does). Called by the handshake, in the
        connection's task."""
        self.wire = wire
        wire.frames.max_message = self.ctx.limits.max_frame_bytes  # larger: 1009 at its header
        if welcome is not None:
            self.send_text(welcome)
        for ch in list(first):
            self.ctx.feeder.begin(self, ch, first.pop(ch))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the session until it ends, in the connection's own task (after ``open``).

        Idle, the session is this one task parked in ``wait_readable`` under one cancel scope
        (its next deadline). Its helper tasks (replays, the drain) run in a nursery this task
        opens only while there are some: ``spawn`` wakes the task to open it, and the last
        helper to end wakes it to close it again. Every task of the session lives in here."""
        assert self.wire is not None, "open() first"
        try:
            task_status.started()
            while self.machine.closing is None:
                if self.pending:
                    await self._serve_with_helpers()
                else:
                    await self._serve()
        finally:
            self.pending = None
            await self._finish(self.wire)
            on_end = self.ctx.on_end
            if on_end is not None:
                on_end(self)

    async def _serve_with_helpers(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                while self.machine.closing is None and (self.pending or self._keep_nursery()):
                    pending, self.pending = self.pending, None
                    for fn, args in pending or ():
                        self.tasks += 1
                        nursery.start_soon(self._helper, fn, args)
                    await self._serve()
            finally:
                self.nursery = None
                nursery.cancel_scope.cancel()

    async def _helper(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self.tasks -= 1
            if not self.tasks:
                self._wake()  # the last helper: the session's task closes the nursery

    def _wake(self) -> None:
        """Make the session's task leave its wait and look at its state again."""
        if self.scope is not None:
            self.scope.cancel()

    def _idle(self) -> bool:
        """Nothing for the session's task to do but read: no helper to start, none to end."""
        if self.pending:
            return False
        return self.nursery is None or self._keep_nursery()

    def _keep_nursery(self) -> bool:
        """While helpers run; and always over TLS, where every write is drained by a helper
        (a TLS session costs ~30 KB anyway: its nursery is not worth a wake-up per burst)."""
        return self.tasks > 0 or (self.wire is not None and not self.wire.fast)

    async def _serve(self) -> None:
        """Read client frames and keep the deadlines until closing or ``_wake``.

        Plain TCP waits on the fd itself (``wait_readable``, then a nonblocking read): an idle
        session's stack is ``run`` → ``_serve`` → trio's wait, nothing in between."""
        machine = self.machine
        wire = self.wire
        assert wire is not None
        while machine.closing is None and self._idle():
            with trio.CancelScope(deadline=machine.next_deadline()) as scope:
                self.scope = scope
                try:
                    while machine.closing is None:
                        if wire.fd >= 0:
                            await trio.lowlevel.wait_readable(wire.fd)
                            events = wire.read()
                        else:
                            events = await wire.receive()
                        if events is not None:  # bytes came (a pong, part of a frame...)
                            self._on_events(events)
                        scope.deadline = machine.next_deadline()
                except _BROKEN:
                    self.close(Close.NORMAL, "connection lost")
            self.scope = None
            now = trio.current_time()
            if now >= machine.next_deadline() and machine.tick(now):
                self._push(wire.ping_frame())

    def _on_events(self, events: list[Event]) -> None:
        now = trio.current_time()
        self.machine.heard(now)
        for event in events:
            if isinstance(event, TextMessage):
                self._on_message(event.data, now)
            elif isinstance(event, BytesMessage):
                self._on_message(bytes(event.data), now)
            elif isinstance(event, Ping):
                self._on_ping(event, now)
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            if self.machine.closing is not None:
                return

    def _on_ping(self, event: Ping, now: float) -> None:
        if self.machine.control(len(event.payload), now) is None:
            assert self.wire is not None
            self._push(self.wire.pong_frame(event))
        else:
            self._rate_limited()

    def _on_message(self, message: str | bytes, now: float) -> None:
        reply = self.machine.receive(message, now)
        for frame in reply.frames:
            self.send_text(frame)
        if reply.error:
            self.ctx.stats.frame_errors[reply.error] += 1
        if reply.acked:
            self.ctx.feeder.save_cursor(self)
        if reply.close is not None and reply.close.code == Close.RATE_LIMITED:
            self._rate_limited()

    def _rate_limited(self) -> None:
        self.ctx.stats.rate_limited["frames"] += 1

    def _frame_error(self, code: str, close: int, detail: str) -> None:
        self.ctx.stats.frame_errors[code] += 1
        self.close(close, detail)

    def _on_close(self, event: CloseConnection) -> None:
        if not isinstance(event, ProtocolClose):  # the client's close frame, or EOF
            self.close(Close.NORMAL, "client closed")
        elif event.code == Close.TOO_BIG:
            self._frame_error("too_big", Close.TOO_BIG, "frame too big")
        else:  # the client's bytes broke the protocol (1002) or were not UTF-8 (1007)
            self._frame_error("bad_websocket_frame", event.code, event.reason or "bad frame")

    async def _finish(self, wire: Wire) -> None:
        """Write what is buffered, the last frame and the close; then hang up (bounded)."""
        decision = self.machine.closing or CloseDecision(Close.GOING_AWAY, "node stopping")
        self.machine.closing = decision
        self.ctx.stats.closes[str(decision.code)] += 1
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
