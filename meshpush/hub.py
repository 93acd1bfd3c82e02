"""The local sessions of a node: a registry by user, device and slot, and encode-once fan-out.

``deliver_many`` takes the live notifications that arrived together (``waiting``: what the bus
handed over since the last look, in arrival order) and *coalesces* them: notifications with the
same targets (a run of broadcasts; a run of one user's unicasts) form a group, each message's
frame is encoded once (``wire.encode_text``), and a session gets the whole group's frames in
one write (``Session.write_many``: the concatenation is the same ``bytes`` for every session).
A session's feed takes the group at once when it follows on what was sent (``Feed.live_run``);
otherwise (replaying, a duplicate, a missed notification) each notification goes through
``Session.live`` one by one, exactly as if it had arrived alone. Fan-out yields to the
scheduler every ``YIELD_EVERY`` sessions or ``YIELD_SLICE`` seconds, whichever comes first, so
a broadcast to 100k sessions never stalls the event loop. ``close_all`` spreads mass closes
the same way (the etcd keepalive must never miss a beat).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import trio

from . import protocol, tracing
from .bus import Notification
from .metrics import DELIVERY_BUCKETS, Metrics
from .sessions import Session
from .stats import Buckets, Tally, snapshot
from .wire import encode_text

YIELD_EVERY = 256  # sessions fanned out to per scheduler turn, at most ...
YIELD_SLICE = 0.002  # ... and a turn lasts about this long at most (wall clock: seconds)
YIELD_CHECK = 32  # the clock is read every this many sessions
BUFFERED_WEIGHT = 16  # a session whose write was buffered (its drain wakes) counts this much
COALESCE_FRAMES = 256  # frames of one group written to a session in one go, at most
COALESCE_BYTES = 64 * 1024  # ... and about this many bytes
DISPATCH_MAX = 1024  # notifications taken from the bus in one go, at most
_clock = time.perf_counter  # the fan-out's turns are measured in wall-clock time
FRAME_OVERHEAD = 80  # a msg frame's bytes beside its data and id (header, seq, prev), about


@dataclass(slots=True)
class HubStats:
    """Counted on fan-out; ``sessions`` and ``users`` are filled in by ``statistics()``."""

    sessions: int = 0
    users: int = 0
    delivered: Tally = field(default_factory=Tally)
    delivery_latency: Buckets = field(default_factory=lambda: Buckets(DELIVERY_BUCKETS))


class Hub:
    """The one place that knows which sessions are on this node."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.stats = HubStats()
        if metrics is not None:
            metrics.add_source(self)
        self._by_user: dict[str, dict[str, set[Session]]] = {}
        self._by_slot: dict[int, set[str]] = {}
        self._sessions: dict[Session, None] = {}  # every session, in arrival order
        self._all: list[Session] | None = None  # a list of them, kept until one comes or goes
        self._unyielded = 0  # sessions fanned out to since the last checkpoint (weighted)
        self._check_at = YIELD_CHECK  # ... when to read the clock next
        self._yield_at = 0.0  # ... and the clock (perf_counter) by which to yield anyway

    # ------------------------------------------------------------ registry

    def add(self, session: Session) -> None:
        devices = self._by_user.setdefault(session.user, {})
        devices.setdefault(session.device, set()).add(session)
        self._by_slot.setdefault(session.slot, set()).add(session.user)
        self._sessions[session] = None
        self._all = None

    def remove(self, session: Session) -> None:
        devices = self._by_user.get(session.user)
        sessions = devices.get(session.device) if devices else None
        if not sessions or session not in sessions:
            return
        sessions.discard(session)
        self._sessions.pop(session, None)
        self._all = None
        if not sessions:
            del devices[session.device]  # type: ignore[union-attr]
        if not devices:
            del self._by_user[session.user]
            users = self._by_slot[session.slot]
            users.discard(session.user)
            if not users:
                del self._by_slot[session.slot]

    def of_user(self, user: str) -> Iterator[Session]:
        for sessions in self._by_user.get(user, {}).values():
            yield from sessions

    def count_of_user(self, user: str) -> int:
        return sum(len(ss) for ss in self._by_user.get(user, {}).values())

    def in_slots(self, slots: Iterable[int]) -> list[Session]:
        return [s for sl in slots for user in self._by_slot.get(sl, ()) for s in self.of_user(user)]

    def all(self) -> list[Session]:
        """Every session (a new list: the caller may keep it while sessions come and go)."""
        return list(self._every())

    def _every(self) -> list[Session]:
        """Every session, listed once per change of the registry (broadcasts in a row share
        it); never modified, only replaced. A copy of one dict's keys: ~0.1 ms for 10,000
        sessions, where walking the by-user index took ~5 ms (a loop stall of its own)."""
        if self._all is None:
            self._all = list(self._sessions)
        return self._all

    def occupied_slots(self) -> frozenset[int]:
        return frozenset(self._by_slot)

    def __len__(self) -> int:
        return len(self._sessions)

    def statistics(self) -> HubStats:
        return snapshot(self.stats, sessions=len(self._sessions), users=len(self._by_user))

    # ------------------------------------------------------------ fan-out

    def targets(self, note: Notification) -> list[Session]:
        if note.ch == "broadcast":
            return self._every()
        return list(self.of_user(note.user)) if note.user is not None else []

    async def deliver(self, note: Notification) -> int:
        """Hand one live notification to its sessions; returns how many sessions got it."""
        [sent] = await self.deliver_many([note])
        return sent

    async def deliver_many(self, notes: Sequence[Notification]) -> list[int]:
        """Hand live notifications (in arrival order) to their sessions, coalesced: each
        message's frame is encoded once, and a session that gets several of them gets their
        frames in one write. Returns how many sessions got each notification."""
        sent = [0] * len(notes)
        self._turn_started()
        for group in _groups(notes):
            await self._fan(group, notes, sent)
        return sent

    async def _fan(self, group: list[int], notes: Sequence[Notification], sent: list[int]) -> None:
        """One group (notifications with the same targets), in chunks: a chunk never holds
        more frames or bytes than a session may buffer (``Limits.out_frames``/``out_bytes``),
        so a chunk alone never makes a session a slow consumer."""
        targets = self.targets(notes[group[0]])
        if not targets:
            return
        limits = targets[0].ctx.limits
        most = min(COALESCE_FRAMES, limits.out_frames), min(COALESCE_BYTES, limits.out_bytes)
        for k, chunk in enumerate(_chunks(group, notes, *most)):
            if k:  # let the sessions' drains run; sessions may have come and gone meanwhile
                await self._yield()
                targets = self.targets(notes[group[0]])
            await self._fan_chunk(targets, [notes[i] for i in chunk], chunk, sent)

    async def _fan_chunk(
        self, targets: list[Session], run: list[Notification], indexes: list[int], sent: list[int]
    ) -> None:
        """Notifications of one channel with the same targets: each frame encoded once, and
        one write per session for all of them."""
        ch: protocol.Channel = "broadcast" if run[0].ch == "broadcast" else "user"
        frames = [encode_text(_frame_text(ch, n)) for n in run]
        joined = frames[0] if len(frames) == 1 else b"".join(frames)
        first, last = run[0], run[-1]
        chained = _chained(run)
        whole = 0  # sessions that got every frame of the group (the common case)
        for session in targets:
            if chained and session.feeds[ch].live_run(first.prev, last.seq):
                whole += session.write_many(frames, joined)
                if tracing.ON:
                    tracing.wrote_run(session, ch, run, len(joined))
            else:  # a feed replaying, a duplicate or a missed notification: one by one
                for k, note in enumerate(run):
                    sent[indexes[k]] += session.live(ch, note, frames[k])
            self._unyielded += 1 if session.out is None else BUFFERED_WEIGHT
            if self._unyielded >= self._check_at:
                await self._turn_check()
        for i in indexes:
            sent[i] += whole
        self._count_delivered(ch, run, [sent[i] for i in indexes])

    # A scheduler turn of the fan-out ends after YIELD_EVERY sessions or YIELD_SLICE seconds,
    # whichever comes first: on a loaded machine (the node descheduled mid-turn) or with slow
    # syscalls, 256 sessions can take well over 10 ms of wall clock; and a session whose write
    # was buffered wakes its task for the drain in the next batch, so it weighs more.

    def _turn_started(self) -> None:
        self._unyielded = 0
        self._check_at = min(YIELD_CHECK, YIELD_EVERY)
        self._yield_at = _clock() + YIELD_SLICE

    async def _yield(self) -> None:
        await trio.lowlevel.checkpoint()
        self._turn_started()

    async def _turn_check(self) -> None:
        if self._unyielded >= YIELD_EVERY or _clock() >= self._yield_at:
            await self._yield()
        else:
            self._check_at = min(self._unyielded + YIELD_CHECK, YIELD_EVERY)

    def _count_delivered(self, ch: str, run: list[Notification], sent: list[int]) -> None:
        now = time.time()
        for note, n in zip(run, sent, strict=True):
            if n:
                self.stats.delivered[ch] += n
                self.stats.delivery_latency.observe(max(0.0, now - note.published_at))

    async def close_all(self, sessions: Iterable[Session], code: int, reason: str) -> None:
        """Close many sessions, yielding every ``YIELD_EVERY`` (their tasks finish meanwhile)."""
        for i, session in enumerate(sessions, 1):
            session.close(code, reason)
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()


def waiting(
    first: Notification | None,
    inbound: trio.MemoryReceiveChannel[Notification | None],
    limit: int = DISPATCH_MAX,
) -> list[list[Notification] | None]:
    """``first`` and what already waits behind it in ``inbound`` (at most ``limit`` in all, no
    waiting): runs of notifications, each to deliver together, and a ``None`` (the bus's
    "catch up everyone") on its own, in arrival order."""
    items = [first]
    while len(items) < limit:
        try:
            items.append(inbound.receive_nowait())
        except trio.WouldBlock:
            break
    out: list[list[Notification] | None] = []
    for item in items:
        if item is None:
            out.append(None)
        elif out and out[-1] is not None:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def _frame_text(ch: protocol.Channel, note: Notification) -> str:
    return protocol.message(
        ch=ch, seq=note.seq, id=note.id, data_json=note.data_json, prev=note.prev
    )


def _chained(run: list[Notification]) -> bool:
    """Each notification follows the one before it (``prev`` = its seq): one chain."""
    if not run[0].prev < run[0].seq:
        return False
    return all(b.prev == a.seq < b.seq for a, b in itertools.pairwise(run))


def _chunks(
    indexes: list[int], notes: Sequence[Notification], frames: int, size: int
) -> list[list[int]]:
    """A group cut into pieces of at most ``frames`` frames and about ``size`` bytes (a
    single larger message is a piece of its own)."""
    if len(indexes) == 1:
        return [indexes]
    chunks: list[list[int]] = [[]]
    taken = 0
    for i in indexes:
        more = len(notes[i].data_json) + len(notes[i].id) + FRAME_OVERHEAD
        if chunks[-1] and (len(chunks[-1]) >= frames or taken + more > size):
            chunks.append([])
            taken = 0
        chunks[-1].append(i)
        taken += more
    return chunks


def _groups(notes: Sequence[Notification]) -> list[list[int]]:
    """Indexes of ``notes`` in groups with the same targets, each group in arrival order:
    a run of consecutive broadcasts is one group; within a run of unicasts, one group per
    user. Every session still sees its notifications in the order they arrived."""
    groups: list[list[int]] = []
    users: dict[str | None, list[int]] = {}
    for i, note in enumerate(notes):
        if note.ch == "broadcast":
            users.clear()
            if groups and notes[groups[-1][-1]].ch == "broadcast":
                groups[-1].append(i)
            else:
                groups.append([i])
            continue
        group = users.get(note.user)
        if group is None:
            group = users[note.user] = []
            groups.append(group)
        group.append(i)
    return groups
