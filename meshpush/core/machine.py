"""One session's rules, sans-IO: client frames and a clock in; frames and a close decision out.

:class:`SessionMachine` holds everything a session decides without touching a socket: the two
delivery feeds (``feed.Feed``), the ack rules, the inbound frame budget, the heartbeat and token
deadlines, and the slow-consumer rule over its outbound buffer (:class:`Outbound`). The I/O
layer (``sessions.Session``) feeds it what happened (``receive``, ``heard``, ``tick``,
``queued``/``written``) with ``now`` and does what it answers. Every decision to end the session
is a :class:`CloseDecision`: a code, a reason, whether the client should reconnect, and an
optional last frame (an ``error`` or a ``redirect``). The first decision wins.

Frames are charged by what they cost the node (docs/protocol.md, "Frame budget"): an ack that
advances the cursor is free (its message was already paid for, and there can be at most one
per message sent), a ping or a repeated ack costs one credit, a frame the node must answer with
an error costs four, and every 16 KiB of a frame one more.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshpush.core import protocol
from meshpush.core.feed import Feed
from meshpush.core.protocol import Close, ProtocolError

FINAL_CODES = frozenset({Close.NORMAL, Close.POLICY})  # docs/protocol.md, "Close codes"
COST_FREE = 0.0
COST_FRAME = 1.0
COST_ERROR = 4.0
COST_PER_BYTES = 16384  # one more credit per this many bytes of a frame


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """How a session ends: ``code`` and ``reason`` on the close frame, ``frame`` sent before it;
    ``reconnect`` tells a client SDK whether to come back (False: a bug or a clean goodbye)."""

    code: int
    reason: str
    frame: str | None = None

    @property
    def reconnect(self) -> bool:
        return self.code not in FINAL_CODES


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-session bounds, from settings (one frozen object, shared by every session)."""

    heartbeat_interval: float = 25.0
    heartbeat_timeout: float = 60.0
    frame_rate: float = 20.0
    frame_burst: float = 60.0
    max_frame_bytes: int = 65536
    out_frames: int = 1024  # outbound frames buffered before the slow-consumer clock starts
    out_bytes: int = 4 << 20  # outbound bytes buffered before the slow-consumer clock starts
    slow_grace: float = 5.0  # seconds over the bound (or without room for a replay) -> 4008

    def __post_init__(self) -> None:
        if min(self.heartbeat_interval, self.heartbeat_timeout, self.slow_grace) <= 0:
            raise ValueError("heartbeat and grace times must be positive")
        if min(self.out_frames, self.out_bytes, self.max_frame_bytes) < 1:
            raise ValueError("buffer bounds must be positive")


@dataclass(frozen=True, slots=True)
class Reply:
    """What one client frame asks of the I/O layer."""

    frames: tuple[str, ...] = ()
    close: CloseDecision | None = None
    acked: bool = False  # a cursor moved: save it
    error: str = ""  # the error code of a bad frame (for metrics)


NOTHING = Reply()
PONG = Reply(frames=(protocol.PONG,))


class Outbound:
    """The slow-consumer rule over one session's outbound buffer (pure bookkeeping).

    Over ``out_frames`` or ``out_bytes`` the grace clock starts; still over after ``slow_grace``,
    or over twice the bound at any moment (memory stays bounded), the session is a slow
    consumer. Back under the bound, the clock stops."""

    __slots__ = ("bytes", "frames", "over_since")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.over_since: float | None = None

    def queued(self, size: int, now: float, limits: Limits) -> bool:
        """A frame went into the buffer. False: the session must be cut (4008)."""
        self.frames += 1
        self.bytes += size
        return self._check(now, limits)

    def written(self, frames: int, size: int, now: float, limits: Limits) -> None:
        self.frames -= frames
        self.bytes -= size
        self._check(now, limits)

    def _check(self, now: float, limits: Limits) -> bool:
        frames_over = self.frames - limits.out_frames
        bytes_over = self.bytes - limits.out_bytes
        if frames_over <= 0 and bytes_over <= 0:
            self.over_since = None
            return True
        if frames_over > limits.out_frames or bytes_over > limits.out_bytes:
            return False
        if self.over_since is None:
            self.over_since = now
        return now - self.over_since < limits.slow_grace

    def deadline(self, limits: Limits) -> float:
        """When the grace runs out (inf while under the bound)."""
        return float("inf") if self.over_since is None else self.over_since + limits.slow_grace


class SessionMachine:
    """The pure state of one session on its owner node."""

    __slots__ = (
        "closing",
        "credits",
        "credits_at",
        "feeds",
        "last_seen",
        "limits",
        "next_ping",
        "outbound",
        "token_deadline",
    )

    def __init__(self, limits: Limits, now: float, token_deadline: float) -> None:
        self.limits = limits
        self.feeds: dict[str, Feed] = {"user": Feed(), "broadcast": Feed()}
        self.last_seen = now
        self.next_ping = now + limits.heartbeat_interval
        self.token_deadline = token_deadline  # monotonic clock, from the token's exp
        self.credits = float(limits.frame_burst)
        self.credits_at = now
        self.closing: CloseDecision | None = None
        self.outbound = Outbound()

    # ------------------------------------------------------------ decisions

    def close(self, code: int, reason: str, frame: str | None = None) -> CloseDecision | None:
        """Decide to end the session; the first decision wins. Returns the new decision (None if
        one was made already)."""
        if self.closing is not None:
            return None
        self.closing = CloseDecision(code, reason, frame)
        return self.closing

    def slow_consumer(self) -> CloseDecision | None:
        return self.close(Close.SLOW_CONSUMER, "slow consumer")

    # ------------------------------------------------------------ time

    def heard(self, now: float) -> None:
        """Any bytes from the client (a frame, a pong) prove it is alive."""
        self.last_seen = now

    def next_deadline(self) -> float:
        silent = self.last_seen + self.limits.heartbeat_timeout
        slow = self.outbound.deadline(self.limits)
        return min(self.next_ping, silent, self.token_deadline, slow)

    def tick(self, now: float) -> bool:
        """Time passed: decide a close if a deadline is over; True if a ping is due now."""
        if now >= self.token_deadline:
            self.close(Close.TOKEN_EXPIRED, "token expired")
        elif now >= self.last_seen + self.limits.heartbeat_timeout:
            self.close(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        elif now >= self.outbound.deadline(self.limits):
            self.slow_consumer()
        elif now >= self.next_ping:
            self.next_ping = now + self.limits.heartbeat_interval
            return self.closing is None
        return False

    # ------------------------------------------------------------ client frames

    def receive(self, message: str | bytes, now: float) -> Reply:
        """One complete client message (text or binary) arrived at ``now``."""
        self.heard(now)
        try:
            frame = protocol.parse_client_frame(message)
        except ProtocolError as exc:
            return self._charged(COST_ERROR, len(message), now) or self._error(exc)
        if isinstance(frame, protocol.Ping):
            return self._charged(COST_FRAME, len(message), now) or PONG
        return self._ack(frame, len(message), now)

    def _ack(self, ack: protocol.Ack, size: int, now: float) -> Reply:
        feed = self.feeds[ack.ch]
        if ack.seq > feed.sent:
            detail = f"ack {ack.seq} is beyond the last seq sent ({feed.sent})"
            exc = ProtocolError("bad_ack", detail)
            return self._charged(COST_ERROR, size, now) or self._error(exc)
        if ack.seq <= feed.acked:
            return self._charged(COST_FRAME, size, now) or NOTHING
        feed.acked = ack.seq
        return self._charged(COST_FREE, size, now) or Reply(acked=True)

    def control(self, size: int, now: float) -> CloseDecision | None:
        """A WebSocket ping (answered with a pong) costs like a frame."""
        reply = self._charged(COST_FRAME, size, now)
        return reply.close if reply is not None else None

    def _charged(self, cost: float, size: int, now: float) -> Reply | None:
        """Spend credits for a frame; a Reply closing 4429 when the budget is exhausted."""
        cost += size // COST_PER_BYTES
        elapsed = max(0.0, now - self.credits_at)
        self.credits = min(self.limits.frame_burst, self.credits + elapsed * self.limits.frame_rate)
        self.credits_at = now
        if self.credits >= cost:
            self.credits -= cost
            return None
        decision = self.close(Close.RATE_LIMITED, "too many frames")
        return Reply(close=decision) if decision else NOTHING

    def _error(self, exc: ProtocolError) -> Reply:
        frame = protocol.error(exc.code, exc.detail)
        if exc.close is None:
            return Reply(frames=(frame,), error=exc.code)
        return Reply(close=self.close(exc.close, exc.code, frame), error=exc.code)

    # ------------------------------------------------------------ outbound

    def queued(self, size: int, now: float) -> CloseDecision | None:
        """A frame of ``size`` bytes is waiting in the outbound buffer."""
        if self.outbound.queued(size, now, self.limits):
            return None
        return self.slow_consumer()

    def written(self, frames: int, size: int, now: float) -> None:
        self.outbound.written(frames, size, now, self.limits)
