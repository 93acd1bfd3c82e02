"""The delivery state of one channel of one session, pure: replay from the stream, then live.

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
silently. ``delivery.Feeder`` is the I/O half: reads, flow control and frames.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

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

    def live_run(self, prev: int, last: int) -> bool:
        """A chain of live notifications at once (the first one's ``prev`` is ``prev``, each
        next one's ``prev`` the seq before it, the last seq ``last``): if it follows on what
        was sent, all are delivered — exactly what ``live`` one by one would do — and True.
        Otherwise nothing changes (False): hand them to ``live`` one by one."""
        if self.replaying or prev != self.sent:
            return False
        self.sent = last
        self.fresh = False
        return True

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
