"""Resume and live delivery of sessions: the I/O half of ``feed.Feed``.

:class:`Feeder` sets where a new session resumes (``start_points``: the device's cursor, the
client's ``last``/``blast`` and each channel's newest seq, read for a whole batch of concurrent
handshakes at once by a :class:`Batcher`, so a handshake storm costs one JetStream request per
batch, not several per handshake), replays the stream in bounded batches with flow control,
and starts catch-ups when a feed detects a missed notification. It works on any
:class:`Target` (``sessions.Session`` is one), so it imports nothing of the session layer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from meshpush.backends.bridge import BridgeClosed
from meshpush.backends.store import (
    Cursor,
    Cursors,
    Store,
    StoredMessage,
    StoreUnavailable,
    cursor_key,
)
from meshpush.core import protocol
from meshpush.core.feed import MAX_PENDING, Chained, Feed, Gap, Verdict
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.server.retention import RetentionLosses
from meshpush.settings import Settings

__all__ = ["MAX_PENDING", "Chained", "Feed", "Feeder", "Gap", "Target", "Verdict"]
log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REREADS = 10_000
FIRST_READS = 20  # reads of a first batch a lagging replica answered empty (then: resume)
STALE_READ_WAIT = 0.025  # seconds between them
ROOM_POLL = 0.01  # seconds between checks of a replay waiting for the socket to drain


class BadResume(ValueError):
    """A client's resume point lies beyond the end of the stream (it cannot be right)."""

    def __init__(self, ch: str, detail: str) -> None:
        super().__init__(detail)
        self.ch = ch


class Target(Protocol):
    """What the feeder needs of a session."""

    id: int
    user: str
    device: str

    @property
    def feeds(self) -> dict[str, Feed]: ...
    @property
    def buffered(self) -> int: ...
    def send_text(self, text: str) -> bool: ...
    def close(self, code: int, reason: str, frame: str | None = None) -> None: ...
    def spawn(self, fn: Any, *args: Any) -> bool: ...


class SingleFlight:
    """Concurrent calls with the same key share one call (e.g. the broadcast stream's end, read
    by every handshake at once): one bridge crossing instead of thousands."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, tuple[trio.Event, list[Any]]] = {}

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        shared = self._calls.get(key)
        if shared is not None:
            done, box = shared
            await done.wait()
            if isinstance(box[0], BaseException):
                raise box[0]
            result: T = box[0]
            return result
        done, box = trio.Event(), [None]
        self._calls[key] = (done, box)
        try:
            box[0] = value = await fn()
        except BaseException as exc:
            box[0] = exc if isinstance(exc, Exception) else StoreUnavailable("call cancelled")
            raise
        finally:
            del self._calls[key]
            done.set()
        return value


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Waiting(Generic[V]):
    """One queued request of a :class:`Batcher` and, once its batch is read, its outcome."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: Exception | None = None

    def settle(self, value: V | None, error: Exception | None) -> None:
        self.value, self.error = value, error
        self.done.set()

    def outcome(self) -> V:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class Batcher(Generic[K, V]):
    """Requests made together share one read: the resume points of concurrent handshakes.

    ``get(key)`` queues ``key`` and waits. The batcher's task (:meth:`run`) takes everything
    queued (up to ``max_batch`` keys) and calls ``fetch(keys)`` once for them, each batch in a
    task of its own. While ``max_inflight`` batches are being read, new requests gather for the
    next one — for at most ``patience`` seconds, so a slow or stuck read delays the next batch
    by that much at most: a quiet node reads at once, a busy one in large batches. The reads
    of a batch start after every request in it was made (what a handshake reads is never
    older than the handshake). If ``fetch`` raises, every request of that batch (and only of
    that batch) raises the same error. Callers bound their own wait (their cancel scope).
    Without the task running (unit tests), ``get`` reads a batch of one itself."""

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[dict[K, V]]],
        max_batch: int = 256,
        max_inflight: int = 1,
        patience: float = 0.05,
    ) -> None:
        self._fetch = fetch
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.patience = patience
        self._inflight = 0
        self._room = trio.Event()
        self._queued: dict[K, _Waiting[V]] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.batches = 0  # fetches made (statistics for benchmarks and tests)
        self.requests = 0  # keys read

    async def get(self, key: K) -> V:
        if self._nursery is None:
            return (await self._fetch([key]))[key]
        waiting = self._queued.get(key)
        if waiting is None:
            waiting = self._queued[key] = _Waiting()
            self._wake.set()
        await waiting.done.wait()
        return waiting.outcome()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await self._wake.wait()
                    await self._wait_for_room()
                    self._wake = trio.Event()
                    while self._queued:
                        self._inflight += 1
                        nursery.start_soon(self._read, self._take())
        finally:
            self._nursery = None
            self._fail(self._queued, StoreUnavailable("the node is stopping"))
            self._queued = {}

    async def _wait_for_room(self) -> None:
        """While ``max_inflight`` reads are under way, requests gather into the next batch (the
        busier the node, the larger its batches), but for at most ``patience`` seconds: a slow
        read never holds up the next batch for longer."""
        with trio.move_on_after(self.patience):
            while self._inflight >= self.max_inflight:
                await self._room.wait()
                self._room = trio.Event()

    def _take(self) -> dict[K, _Waiting[V]]:
        if len(self._queued) <= self.max_batch:
            batch, self._queued = self._queued, {}
            return batch
        keys = list(self._queued)[: self.max_batch]
        return {key: self._queued.pop(key) for key in keys}

    async def _read(self, batch: dict[K, _Waiting[V]]) -> None:
        self.batches += 1
        self.requests += len(batch)
        try:
            found = await self._fetch(list(batch))
        except Exception as exc:
            self._fail(batch, exc)
            return
        except BaseException:
            self._fail(batch, StoreUnavailable("read cancelled"))
            raise
        finally:
            self._inflight -= 1
            self._room.set()
        for key, waiting in batch.items():
            value = found.get(key)
            error = None if value is not None else StoreUnavailable("no answer for this key")
            waiting.settle(value, error)

    @staticmethod
    def _fail(batch: dict[K, _Waiting[V]], error: Exception) -> None:
        for waiting in batch.values():
            if not waiting.done.is_set():
                waiting.settle(None, error)


@dataclass(frozen=True, slots=True)
class Start:
    """What one handshake needs to know to set its resume points (read in a batch)."""

    cursor: Cursor  # the device's cursor (pending in memory, else stored; empty if none)
    user: int  # seq of the user's newest stored message (0: none)
    broadcast: int  # seq of the newest stored broadcast (0: none)

    def last(self, ch: str) -> int:
        return self.user if ch == "user" else self.broadcast


@dataclass(slots=True)
class FeederStats:
    catch_ups: Tally = field(default_factory=Tally)
    gaps: Tally = field(default_factory=Tally)
    replayed: Tally = field(default_factory=Tally)
    rate_limited: Tally = field(default_factory=Tally)
    backend_errors: Tally = field(default_factory=Tally)


class Feeder:
    """Runs replays for sessions and hands live notifications to their feeds."""

    def __init__(self, settings: Settings, store: Store, cursors: Cursors, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.cursors = cursors
        self.stats = FeederStats()
        metrics.add_source(self)
        self.batch = max(1, min(200, settings.session_queue // 4))
        self.on_sent: Callable[[str, int], None] | None = None  # (user, seq): offline webhook
        self.retention = RetentionLosses(metrics)
        self.shared = SingleFlight()
        self.starts: Batcher[tuple[str, str], Start] = Batcher(self._read_starts)

    def statistics(self) -> FeederStats:
        return snapshot(self.stats)

    # ------------------------------------------------------------ session start

    async def start_points(
        self, session: Target, client: dict[str, int], client_epoch: str
    ) -> tuple[dict[str, list[StoredMessage]], bool]:
        """Set where each channel of a new (already registered) session resumes; read the first
        batch of each; say whether the resume is complete (nothing lost to retention).

        The device's cursor and the newest seq of each channel are read together with those of
        every concurrent handshake (:attr:`starts`); a channel whose resume point is already
        at its newest seq needs no read of its own (its first batch is empty).

        Raises :class:`BadResume` for a client position beyond the stream's end and
        :class:`StoreUnavailable` when the stream cannot be read."""
        epoch = self.store.epoch
        claimed = {ch: n for ch, n in client.items() if n > 0 and client_epoch in ("", epoch)}
        known = await self.starts.get((session.user, session.device))
        for ch, seq in claimed.items():
            await self._check_position(ch, seq, known.last(ch))
        stored = known.cursor
        unread: list[str] = []  # channels with messages stored after their resume point
        for ch, feed in session.feeds.items():
            resume = max(claimed.get(ch, 0), _cursor_of(stored, ch) if stored.epoch == epoch else 0)
            await self._position(feed, ch, session.user, resume, known.last(ch))
            if feed.sent < known.last(ch):
                unread.append(ch)
        batches = await _gather(
            *(
                _bind(self._read_first, session, ch, session.feeds[ch].sent, known.last(ch))
                for ch in unread
            )
        )
        read = dict(zip(unread, batches, strict=True))
        first = {ch: read.get(ch, []) for ch in session.feeds}
        recovered = all(
            not batch or feed.fresh or feed.skip or batch[0].prev == feed.sent
            for feed, batch in ((session.feeds[ch], b) for ch, b in first.items())
        )
        return first, recovered

    async def _read_starts(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Start]:
        """The :class:`Start` of a batch of (user, device): one crossing for all of them."""
        pending = {key: self.cursors.pending(cursor_key(*key)) for key in keys}
        wanted = [cursor_key(*key) for key, cursor in pending.items() if cursor is None]
        found = await self.store.start_reads({user for user, _ in keys}, wanted)
        cursors = found.cursors
        if isinstance(cursors, StoreUnavailable):
            self.stats.backend_errors["cursor_read"] += 1
            log.warning("cursor read failed, resuming from the clients' seqs: %s", cursors)
            cursors = {}
        return {
            key: Start(
                pending[key] or cursors.get(cursor_key(*key)) or Cursor(),
                found.users.get(key[0], 0),
                found.broadcast,
            )
            for key in keys
        }

    async def _check_position(self, ch: str, seq: int, known_end: int) -> None:
        """Refuse a client position beyond the stream's end. ``known_end`` is the channel's
        newest seq read for this handshake (never beyond the stream's end); a position beyond
        it (e.g. its messages were all removed by retention since) is checked against a read
        of the stream's end of its own."""
        if seq <= known_end:
            return
        end = await self.store.end_seq(ch)
        if seq > end:
            raise BadResume(ch, f"{ch} position {seq} is beyond the end of the stream ({end})")

    async def _position(self, feed: Feed, ch: str, user: str, resume: int, last: int) -> None:
        """Where ``feed`` starts: ``resume`` if there is one, else as the backlog setting says
        (``last``: the channel's newest seq, read for this handshake)."""
        if resume > 0:
            feed.start(resume)
            return
        backlog = self.settings.backlog_user if ch == "user" else self.settings.backlog_broadcast
        if backlog < 0:
            feed.start(0, fresh=True)
        elif backlog == 0:
            feed.start(last)
        else:
            count = await self.store.count(ch, _owner(ch, user))
            feed.start(0, fresh=True, skip=max(0, count - backlog))

    def begin(self, session: Target, ch: str, first: list[StoredMessage]) -> None:
        """Start delivering a new session's channel: with an empty first batch, at once (the
        notifications buffered meanwhile are released here, no task); else in a replay."""
        if first or not self._settle(session, ch, session.feeds[ch]):
            session.spawn(self.replay, session, ch, first or None)

    # ------------------------------------------------------------ live

    def catch_up(self, session: Target, ch: str, reason: str) -> None:
        """A feed missed a notification (or may have): re-read the stream for it."""
        self.stats.catch_ups[reason] += 1
        session.spawn(self.replay, session, ch, None)

    async def catch_up_all(self, sessions: list[Target], yield_every: int = 256) -> None:
        """After a NATS interruption: every live session re-reads what it may have missed."""
        for i, session in enumerate(sessions, 1):
            for ch, feed in session.feeds.items():
                if feed.catch_up():
                    self.catch_up(session, ch, "reconnect")
            if i % yield_every == 0:
                await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ replay

    async def replay(
        self, session: Target, ch: str, first: list[StoredMessage] | None = None
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
                    if not await self._wait_for_room(session):
                        return
                    continue
                if self._settle(session, ch, feed):
                    return
                batch = None
        except (StoreUnavailable, BridgeClosed) as exc:
            log.warning("replay for %r failed (%s); the session must resume", session, exc)
            self.stats.backend_errors["replay"] += 1
            session.close(protocol.Close.GOING_AWAY, "store unavailable")
            return
        session.close(protocol.Close.GOING_AWAY, "replay did not settle")

    def _settle(self, session: Target, ch: str, feed: Feed) -> bool:
        """The stream has nothing more: release what was buffered; True if the feed is live."""
        released, live = feed.finish()
        for note in released:
            session.send_text(_frame(ch, note))
        self._sent(session, ch, feed)
        return live

    async def _read_first(
        self, session: Target, ch: str, after: int, last: int
    ) -> list[StoredMessage]:
        """The first batch after ``after`` of a channel whose newest seq is ``last`` (> after).
        Reads are direct gets, which a lagging replica may answer: an empty answer cannot be
        right (``last`` is exact), so it is read again, a bounded number of times, before the
        session is sent away to resume (a live start here would lose what it did not read). With one
        replica every read is exact: one read (empty only if retention removed the rest)."""
        if self.settings.stream_replicas <= 1:
            return await self._read(session, ch, after)
        for _ in range(FIRST_READS):
            batch = await self._read(session, ch, after)
            if batch:
                return batch
            self.stats.backend_errors["stale_read"] += 1
            await trio.sleep(STALE_READ_WAIT)
        raise StoreUnavailable(f"{ch} read nothing after {after} though {last} is stored")

    async def _read(self, session: Target, ch: str, after: int) -> list[StoredMessage]:
        owner = _owner(ch, session.user)
        if owner is not None:
            return await self.store.read_after(ch, owner, after, self.batch)
        return await self.shared.run(  # broadcasts: every session reads the same
            ("read", ch, after), lambda: self.store.read_after(ch, None, after, self.batch)
        )

    def _send_batch(self, session: Target, ch: str, feed: Feed, batch: list[StoredMessage]) -> None:
        for msg in batch:
            deliver, gap = feed.replayed(msg)
            if gap is not None:
                self.stats.gaps[ch] += 1
                self.retention.report(session, ch, gap.first, gap.last)
                session.send_text(protocol.gap(ch=ch, first=gap.first, last=gap.last))  # type: ignore[arg-type]
            if deliver:
                session.send_text(_frame(ch, msg))
        self.stats.replayed[ch] += len(batch)
        if tracing.ON:
            tracing.replayed(session, ch, batch, self.settings.node_id)
        self._sent(session, ch, feed)

    def _sent(self, session: Target, ch: str, feed: Feed) -> None:
        if self.on_sent is not None and ch == "user" and feed.sent:
            self.on_sent(session.user, feed.sent)  # replayed up to here

    async def _wait_for_room(self, session: Target) -> bool:
        """Flow control: read on once the socket drained below a quarter of the bound. A socket
        that does not drain within the grace time is a slow consumer (4008), whichever path its
        messages took (replay, catch-up, live)."""
        low = max(1, self.settings.session_queue // 4)
        deadline = trio.current_time() + self.settings.slow_consumer_grace
        while session.buffered > low:
            if trio.current_time() >= deadline:
                self.stats.rate_limited["slow_consumer"] += 1
                session.close(protocol.Close.SLOW_CONSUMER, "slow consumer")
                return False
            await trio.sleep(ROOM_POLL)
        return True

    # ------------------------------------------------------------ acks

    def save_cursor(self, session: Target, urgent: bool = False) -> None:
        user, bcast = session.feeds["user"].acked, session.feeds["broadcast"].acked
        cursor = Cursor(user, bcast, self.store.epoch)
        self.cursors.save(session.user, session.device, cursor, urgent)


def _bind(fn: Callable[..., Awaitable[T]], *args: Any) -> Callable[[], Awaitable[T]]:
    return lambda: fn(*args)


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run ``calls`` concurrently (their bridge crossings batch together); the first error wins.
    One call (the common case) runs in the caller's task: no nursery, no task."""
    if len(calls) <= 1:
        return [await call() for call in calls]
    results: list[Any] = [None] * len(calls)
    errors: list[Exception] = []

    async def one(i: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[i] = await call()
        except Exception as exc:  # re-raised below, unwrapped from the nursery's group
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    if errors:
        raise errors[0]
    return results


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
