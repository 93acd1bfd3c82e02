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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import trio

from meshpush.backends.bus import Notification
from meshpush.core import protocol
from meshpush.core.stats import Buckets, Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import DELIVERY_BUCKETS, Metrics
from meshpush.server.sessions import Session
from meshpush.server.wire import encode_text

YIELD_EVERY = 256  # sessions fanned out to per scheduler turn, at most ...
YIELD_SLICE = 0.004  # ... and a turn lasts about this long at most (wall clock: seconds)
YIELD_CHECK = 32  # the clock is read every this many sessions
GIVE_WAY = 4  # extra scheduler batches the other tasks get at the end of each turn
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
        self._sessions: dict[Session, int] = {}  # every session -> its number, in arrival order
        self._added = 0  # sessions ever added (the last one's number)
        self._all: list[Session] | None = None  # a list of them, kept until one comes or goes
        self._unyielded = 0  # sessions fanned out to since the last checkpoint (weighted)
        self._check_at = YIELD_CHECK  # ... when to read the clock next
        self._yield_at = 0.0  # ... and the clock (perf_counter) by which to yield anyway

    # ------------------------------------------------------------ registry

    def add(self, session: Session) -> None:
        devices = self._by_user.setdefault(session.user, {})
        devices.setdefault(session.device, set()).add(session)
        self._by_slot.setdefault(session.slot, set()).add(session.user)
        self._added += 1
        self._sessions[session] = self._added
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

    async def deliver_many(
        self, notes: Sequence[Notification], more: More | None = None
    ) -> list[int]:
        """Hand live notifications (in arrival order) to their sessions, coalesced: each
        message's frame is encoded once, and a session that gets several of them gets their
        frames in one write. Returns how many sessions got each notification.

        ``more`` (optional): asked at the fan-out's scheduler turns for the next waiting
        notification, if ``accept`` takes it (a broadcast chained to the last one of a
        broadcast pass, room left in the pass); it joins the pass under way (group commit:
        the sessions not visited yet get it in the same write, the others in one more round).
        ``notes`` must then be a list: what ``more`` gave is appended to it (and counted)."""
        sent = [0] * len(notes)
        self._turn_started()
        groups = _groups(notes)
        for g, group in enumerate(groups):
            last = g == len(groups) - 1 and notes[group[0]].ch == "broadcast"
            await self._fan(group, notes, sent, more if last else None)
        return sent

    async def _fan(
        self,
        group: list[int],
        notes: Sequence[Notification],
        sent: list[int],
        more: More | None = None,
    ) -> None:
        """One group (notifications with the same targets), in chunks: a chunk never holds
        more frames or bytes than a session may buffer (``Limits.out_frames``/``out_bytes``),
        so a chunk alone never makes a session a slow consumer."""
        targets = self.targets(notes[group[0]])
        if not targets:
            return
        limits = targets[0].ctx.limits
        most = min(COALESCE_FRAMES, limits.out_frames), min(COALESCE_BYTES, limits.out_bytes)
        chunks = _chunks(group, notes, *most)
        for k, chunk in enumerate(chunks):
            if k:  # let the sessions' drains run; sessions may have come and gone meanwhile
                await self._yield()
                targets = self.targets(notes[group[0]])
            grow = None
            if more is not None and k == len(chunks) - 1:
                grow = _Growth(more, notes, sent, chunk, self._added, *most)
            run = _Run("broadcast" if notes[chunk[0]].ch == "broadcast" else "user")
            run.extend([notes[i] for i in chunk])
            await self._fan_run(targets, run, grow)
            if grow is not None and len(run.notes) > len(chunk):
                self._late_sessions(run, len(chunk), grow.added)
            counts = run.counts()
            for i, n in zip(grow.indexes if grow else chunk, counts, strict=True):
                sent[i] += n
            self._count_delivered(run.ch, run.notes, counts)

    async def _fan_run(self, targets: list[Session], run: _Run, grow: _Growth | None) -> None:
        """Write ``run`` to ``targets``, one write per session. While ``grow`` adds to the run
        (at the scheduler turns), the sessions visited before get what they lack in one more
        round; ``have`` cuts ``targets`` into (end, k): the sessions up to ``end`` (from the
        previous end) have the run's first ``k`` notifications. The loop is the fan-out's hot
        path: per session one feed check and one write."""
        ch, traced, chained = run.ch, tracing.ON, run.chained
        have: list[tuple[int, int]] = [(len(targets), 0)]
        while any(k < len(run.notes) for _, k in have):
            after: list[tuple[int, int]] = []  # ``have`` after this round
            start = 0
            for end, k in have:
                n = len(run.notes)
                if k >= n:  # has everything so far
                    _segment(after, end, k)
                    start = end
                    continue
                frames, joined, prev, last = run.tail(k)
                whole = 0  # sessions given notes[k:n] in one write (the common case)
                weight, check_at = self._unyielded, self._check_at
                for i in range(start, end):
                    session = targets[i]
                    if chained and session.feeds[ch].live_run(prev, last):
                        whole += session.write_many(frames, joined)
                        if traced:
                            tracing.wrote_run(session, ch, run.notes[k:n], len(joined))
                    else:  # a feed replaying, a duplicate or a missed notification: one by one
                        run.one_by_one(session, k, n)
                    weight += 1 if session.out is None else BUFFERED_WEIGHT
                    if weight < check_at:
                        continue
                    self._unyielded = weight
                    turn_over = await self._turn_check()
                    if turn_over and grow is not None and grow.take(run):
                        run.wrote(k, n, whole)
                        whole = 0
                        _segment(after, i + 1, n)  # the sessions so far have notes[:n]
                        n = len(run.notes)
                        frames, joined, prev, last = run.tail(k)
                    weight, check_at = self._unyielded, self._check_at
                self._unyielded = weight
                run.wrote(k, n, whole)
                _segment(after, end, n)
                start = end
            have = after

    def _late_sessions(self, run: _Run, start: int, added: int) -> None:
        """Sessions registered after the pass took its targets get the notifications that
        joined it later, one by one (the feed buffers them while it replays, drops what the
        replay read): they may have been stored after the session's replay read the stream."""
        for session, number in reversed(self._sessions.items()):
            if number <= added:
                break
            run.one_by_one(session, start, len(run.notes))

    # A scheduler turn of the fan-out ends after YIELD_EVERY sessions or YIELD_SLICE seconds,
    # whichever comes first: on a loaded machine (the node descheduled mid-turn) or with slow
    # syscalls, 256 sessions can take well over 10 ms of wall clock; and a session whose write
    # was buffered wakes its task for the drain in the next batch, so it weighs more.

    def _turn_started(self) -> None:
        self._unyielded = 0
        self._check_at = min(YIELD_CHECK, YIELD_EVERY)
        self._yield_at = _clock() + YIELD_SLICE

    async def _yield(self) -> None:
        """End a turn: give the other tasks ``1 + GIVE_WAY`` scheduler batches. A chain of
        wake-ups (a publish's round trip through the asyncio bridge takes a batch per hop)
        then advances several hops per turn instead of one, so a broadcast published while a
        pass runs is stored and notified before the pass ends and joins it (``_Growth``);
        with one batch per turn it arrived just after the pass, every time. When no other
        task is runnable, a batch is one idle pass of the scheduler (a few µs)."""
        for _ in range(1 + GIVE_WAY):
            await trio.lowlevel.checkpoint()
        self._turn_started()

    async def _turn_check(self) -> bool:
        """End the turn if it is over (True: the scheduler ran other tasks meanwhile)."""
        if self._unyielded >= YIELD_EVERY or _clock() >= self._yield_at:
            await self._yield()
            return True
        self._check_at = min(self._unyielded + YIELD_CHECK, YIELD_EVERY)
        return False

    def _count_delivered(self, ch: str, run: Sequence[Notification], sent: list[int]) -> None:
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


More = Callable[[Callable[[Notification], bool]], Notification | None]
"""``more(accept)``: the next waiting notification if ``accept`` takes it; else None, and it
stays first in line (``router.Router._more``)."""


class _Run:
    """The notifications of one chunk as they go out (a broadcast run may grow meanwhile):
    each frame encoded once, the concatenation of each tail ``frames[k:]`` (shared by every
    session that lacks exactly that tail), and how many sessions got each notification."""

    __slots__ = ("_got", "_tails", "_wrote", "ch", "chained", "frames", "notes", "size")

    def __init__(self, ch: protocol.Channel) -> None:
        self.ch = ch
        self.notes: list[Notification] = []
        self.frames: list[bytes] = []
        self.size = 0  # bytes of all frames
        self.chained = True  # each note's prev is the seq before it
        self._got: list[int] = []  # sessions that got each note one by one
        self._wrote: dict[tuple[int, int], int] = {}  # sessions given notes[k:n] in one write
        self._tails: dict[int, tuple[list[bytes], bytes, int, int]] = {}

    def extend(self, notes: Sequence[Notification]) -> None:
        for note in notes:
            after = self.notes[-1].seq if self.notes else note.prev
            self.chained = self.chained and note.prev == after and note.prev < note.seq
            frame = encode_text(_frame_text(self.ch, note))
            self.notes.append(note)
            self.frames.append(frame)
            self.size += len(frame)
            self._got.append(0)
        self._tails.clear()

    def tail(self, k: int) -> tuple[list[bytes], bytes, int, int]:
        """``frames[k:]`` (a copy: the run may grow), joined, the first one's prev, the last
        seq."""
        tail = self._tails.get(k)
        if tail is None:
            frames = self.frames[k:]
            joined = frames[0] if len(frames) == 1 else b"".join(frames)
            tail = self._tails[k] = (frames, joined, self.notes[k].prev, self.notes[-1].seq)
        return tail

    def wrote(self, k: int, n: int, sessions: int) -> None:
        if sessions:
            self._wrote[(k, n)] = self._wrote.get((k, n), 0) + sessions

    def one_by_one(self, session: Session, k: int, n: int) -> None:
        for j in range(k, n):
            self._got[j] += session.live(self.ch, self.notes[j], self.frames[j])

    def counts(self) -> list[int]:
        """Sessions that got each notification."""
        got = list(self._got)
        for (k, n), sessions in self._wrote.items():
            for j in range(k, n):
                got[j] += sessions
        return got


class _Growth:
    """Lets the last chunk of a broadcast pass take the broadcasts that arrive while it runs,
    within the chunk's bounds (frames and bytes); records where they went in ``notes``."""

    __slots__ = ("added", "frames", "indexes", "more", "notes", "sent", "size")

    def __init__(
        self,
        more: More,
        notes: Sequence[Notification],
        sent: list[int],
        chunk: list[int],
        added: int,
        frames: int,
        size: int,
    ) -> None:
        assert isinstance(notes, list), "deliver_many(notes, more): notes must be a list"
        self.more, self.notes, self.sent = more, notes, sent
        self.indexes = list(chunk)  # in ``notes``, of the run's notifications
        self.added = added  # the number of the last session registered when the pass began
        self.frames, self.size = frames, size

    def take(self, run: _Run) -> bool:
        """Append to ``run`` what waits and follows on it; True if anything did."""
        grew = False
        while len(run.notes) < self.frames:
            last = run.notes[-1].seq
            room = self.size - run.size

            def accept(note: Notification, last: int = last, room: int = room) -> bool:
                size = len(note.data_json) + len(note.id) + FRAME_OVERHEAD
                return note.ch == "broadcast" and note.prev == last < note.seq and size <= room

            note = self.more(accept)
            if note is None:
                return grew
            run.extend([note])
            self.notes.append(note)
            self.sent.append(0)
            self.indexes.append(len(self.notes) - 1)
            grew = True
        return grew


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


def _segment(have: list[tuple[int, int]], end: int, k: int) -> None:
    """Sessions up to ``end`` have the first ``k`` notifications (merged with the last piece
    if it has as many)."""
    if have and have[-1][1] == k:
        have[-1] = (end, k)
    else:
        have.append((end, k))


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
