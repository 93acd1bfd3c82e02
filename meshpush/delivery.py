"""Resume and live delivery of one session: replay from the stream, then live, never a gap.

Each session has one :class:`Feed` per channel (``user``, ``broadcast``), a small pure state
machine over ``(seq, prev)``:

* it starts *replaying*: live notifications that arrive meanwhile are buffered, because the
  session was registered (and its slot subscribed) before the replay read the stream, and a
  message is stored before it is notified — so every message is either read by the replay or
  buffered, never neither;
* when a read comes back empty the buffered notifications are delivered in seq order as long
  as each one's ``prev`` is the seq sent before it; if one is not, the stream has what is
  missing and the feed reads again;
* live, a notification with ``seq <= sent`` is a duplicate (dropped), one with ``prev == sent``
  is delivered, any other means a notification was missed: the feed catches up from the stream
  at once (no reconnect needed).

A message read from the stream whose ``prev`` is not what the device last had means the
messages in between are gone (retention): that is reported as a ``gap`` frame, never skipped
silently. :class:`Feeder` is the I/O half: reads, flow control and frames.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from . import protocol
from .bridge import BridgeClosed
from .metrics import Metrics
from .retention import RetentionLosses
from .settings import Settings
from .store import Cursor, Cursors, Store, StoredMessage, StoreUnavailable

if TYPE_CHECKING:
    from .sessions import Session

log = logging.getLogger(__name__)
MAX_REREADS = 10_000
MAX_PENDING = 1024  # live notifications buffered per channel during a replay (then: re-read)


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DROP = "drop"
    BUFFER = "buffer"
    CATCH_UP = "catch_up"


class Chained(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def prev(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages with seq in ``[first, last]`` of this channel were lost to retention."""

    first: int
    last: int


class Feed:
    """Delivery state of one channel of one session (pure; no I/O)."""

    __slots__ = ("acked", "fresh", "overflow", "pending", "replaying", "sent", "skip")

    def __init__(self, sent: int = 0, fresh: bool = False, skip: int = 0) -> None:
        self.sent = sent  # last seq handed to the session's queue
        self.acked = sent  # last seq the device acknowledged (or resumed from)
        self.fresh = fresh  # a device with no history: its first message needs no prev
        self.skip = skip  # stored messages to pass over first (backlog "last N")
        self.replaying = True
        self.pending: list[Chained] | None = None
        self.overflow = False  # pending was full: what was dropped is in the stream

    def start(self, sent: int, fresh: bool = False, skip: int = 0) -> None:
        """Set the resume point (keeps notifications buffered so far)."""
        self.sent = self.acked = sent
        self.fresh, self.skip = fresh, skip

    def live(self, note: Chained) -> Verdict:
        if self.replaying:
            if self.pending is None:
                self.pending = []
            if len(self.pending) < MAX_PENDING:
                self.pending.append(note)
            else:
                self.overflow = True  # bounded memory: the stream has it, finish() re-reads
            return Verdict.BUFFER
        if note.seq <= self.sent:
            return Verdict.DROP
        if note.prev == self.sent:
            self.sent = note.seq
            self.fresh = False
            return Verdict.DELIVER
        self.replaying = True  # a notification was missed: the stream has it
        return Verdict.CATCH_UP

    def catch_up(self) -> bool:
        """Switch to replaying; False if a replay is already running."""
        if self.replaying:
            return False
        self.replaying = True
        return True

    def replayed(self, msg: Chained) -> tuple[bool, Gap | None]:
        """A message read from the stream in order: deliver it? and was anything lost before it?"""
        if msg.seq <= self.sent:
            return False, None
        if self.skip:
            self.skip -= 1
            self.sent = msg.seq
            self.fresh = False
            return False, None
        gap = None
        if msg.prev != self.sent and not self.fresh:
            gap = Gap(self.sent + 1, msg.prev if msg.prev > self.sent else msg.seq - 1)
        self.sent = msg.seq
        self.fresh = False
        return True, gap

    def finish(self) -> tuple[list[Chained], bool]:
        """The stream read came back empty: release buffered notifications in order.

        Returns what to deliver, and whether the feed is live now (False: read again)."""
        pending = sorted(self.pending or (), key=lambda n: n.seq)
        self.pending = None
        if self.overflow:
            self.overflow = False
            return [], False
        out: list[Chained] = []
        for note in pending:
            if note.seq <= self.sent:
                continue
            if note.prev != self.sent:
                return out, False
            out.append(note)
            self.sent = note.seq
            self.fresh = False
        self.replaying = False
        return out, True


# ---------------------------------------------------------------- I/O half


class Feeder:
    """Runs replays for sessions and hands live notifications to their feeds."""

    def __init__(self, settings: Settings, store: Store, cursors: Cursors, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.cursors = cursors
        self.metrics = metrics
        self.batch = max(1, min(200, settings.session_queue // 4))
        self.retention = RetentionLosses(metrics)

    # ------------------------------------------------------------ session start

    async def start_points(
        self, session: Session, client: dict[str, int], client_epoch: str
    ) -> tuple[dict[str, list[StoredMessage]], bool]:
        """Set where each channel of a new (already registered) session resumes; read the first
        batch of each; say whether the resume is complete (nothing lost to retention).

        Raises :class:`StoreUnavailable` when the stream cannot be read."""
        stored = await self.cursors.load(session.user, session.device)
        epoch = self.store.epoch
        first: dict[str, list[StoredMessage]] = {}
        recovered = True
        for ch, feed in session.feeds.items():
            resume = max(
                client.get(ch, 0) if client_epoch in ("", epoch) else 0,
                _cursor_of(stored, ch) if stored.epoch == epoch else 0,
            )
            await self._position(feed, ch, session.user, resume)
            batch = await self.store.read_after(ch, _owner(ch, session.user), feed.sent, self.batch)
            if batch and not feed.fresh and not feed.skip and batch[0].prev != feed.sent:
                recovered = False
            first[ch] = batch
        return first, recovered

    async def _position(self, feed: Feed, ch: str, user: str, resume: int) -> None:
        if resume > 0:
            feed.start(resume)
            return
        backlog = self.settings.backlog_user if ch == "user" else self.settings.backlog_broadcast
        if backlog < 0:
            feed.start(0, fresh=True)
        elif backlog == 0:
            feed.start(await self.store.last_seq(ch, _owner(ch, user)))
        else:
            count = await self.store.count(ch, _owner(ch, user))
            feed.start(0, fresh=True, skip=max(0, count - backlog))

    # ------------------------------------------------------------ live

    def live(self, session: Session, ch: str, note: Chained, frame: str) -> bool:
        """Offer a live notification to a session; True if its frame was queued."""
        feed = session.feeds[ch]
        verdict = feed.live(note)
        if verdict is Verdict.DELIVER:
            return session.offer(frame)
        if verdict is Verdict.CATCH_UP:
            self.metrics.catch_ups.labels(reason="prev").inc()
            self._spawn(session, ch, None)
        return False

    def catch_up_all(self, sessions: list[Session]) -> None:
        """After a NATS interruption: every live session re-reads what it may have missed."""
        for session in sessions:
            for ch, feed in session.feeds.items():
                if feed.catch_up():
                    self.metrics.catch_ups.labels(reason="reconnect").inc()
                    self._spawn(session, ch, None)

    def _spawn(self, session: Session, ch: str, first: list[StoredMessage] | None) -> None:
        if session.nursery is None or session.close_request is not None:
            return
        try:
            session.nursery.start_soon(self.replay, session, ch, first)
        except RuntimeError:  # the session is closing: its next connection resumes anyway
            log.debug("no replay for closing %r", session)

    # ------------------------------------------------------------ replay

    async def replay(
        self, session: Session, ch: str, first: list[StoredMessage] | None = None
    ) -> None:
        """Read the stream after ``sent`` in bounded batches (with flow control), then go live.

        ``first`` is a batch already read (``[]``: read and found empty; None: read now)."""
        feed = session.feeds[ch]
        batch = first
        try:
            for _ in range(MAX_REREADS):
                if batch is None:
                    batch = await self._read(session, ch, feed.sent)
                if batch:
                    self._send_batch(session, ch, feed, batch)
                    batch = None
                    await self._wait_for_room(session)
                    continue
                released, live = feed.finish()
                for note in released:
                    session.offer(_frame(ch, note))
                if live:
                    return
                batch = None
        except (StoreUnavailable, BridgeClosed) as exc:
            log.warning("replay for %r failed (%s); the session must resume", session, exc)
            self.metrics.backend_errors.labels(backend="replay").inc()
            session.close(protocol.Close.GOING_AWAY, "store unavailable")
            return
        session.close(protocol.Close.GOING_AWAY, "replay did not settle")

    async def _read(self, session: Session, ch: str, after: int) -> list[StoredMessage]:
        return await self.store.read_after(ch, _owner(ch, session.user), after, self.batch)

    def _send_batch(
        self, session: Session, ch: str, feed: Feed, batch: list[StoredMessage]
    ) -> None:
        for msg in batch:
            deliver, gap = feed.replayed(msg)
            if gap is not None:
                self.metrics.gaps.labels(ch=ch).inc()
                self.retention.report(session, ch, gap.first, gap.last)
                session.offer(protocol.gap(ch=ch, first=gap.first, last=gap.last))  # type: ignore[arg-type]
            if deliver:
                session.offer(_frame(ch, msg))
        self.metrics.replayed.labels(ch=ch).inc(len(batch))

    async def _wait_for_room(self, session: Session) -> None:
        """Flow control: let the socket drain below a quarter of the queue before reading on."""
        low = max(1, self.settings.session_queue // 4)
        while session.outbox.statistics().current_buffer_used > low:
            await trio.sleep(0.01)

    # ------------------------------------------------------------ acks

    def ack(self, session: Session, ch: str, seq: int, urgent: bool = False) -> None:
        """Record a cumulative ack; raises ValueError for a seq this session was never sent."""
        feed = session.feeds[ch]
        if seq > feed.sent:
            raise ValueError(f"ack {seq} is beyond the last seq sent ({feed.sent})")
        if seq > feed.acked:
            feed.acked = seq
            self.save_cursor(session, urgent)

    def save_cursor(self, session: Session, urgent: bool = False) -> None:
        user, bcast = session.feeds["user"].acked, session.feeds["broadcast"].acked
        cursor = Cursor(user, bcast, self.store.epoch)
        self.cursors.save(session.user, session.device, cursor, urgent)


def _owner(ch: str, user: str) -> str | None:
    return user if ch == "user" else None


def _cursor_of(cursor: Cursor, ch: str) -> int:
    return cursor.user if ch == "user" else cursor.broadcast


def _frame(ch: str, msg: StoredMessage | Chained) -> str:
    return protocol.message(
        ch=ch,  # type: ignore[arg-type]
        seq=msg.seq,
        id=msg.id,  # type: ignore[union-attr]
        data_json=msg.data_json,  # type: ignore[union-attr]
        prev=msg.prev,
    )
