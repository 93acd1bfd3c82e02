"""Resume and live delivery of sessions: the I/O half of ``feed.Feed``.

:class:`Feeder` sets where a new session resumes (``start_points``: the device's cursor, the
client's ``last``/``blast`` and the stream's end, read concurrently so the reads of many
handshakes cross the bridge together), replays the stream in bounded batches with flow control,
and starts catch-ups when a feed detects a missed notification. It works on any
:class:`Target` (``sessions.Session`` is one), so it imports nothing of the session layer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol, TypeVar

import trio

from . import protocol, tracing
from .bridge import BridgeClosed
from .feed import MAX_PENDING, Chained, Feed, Gap, Verdict
from .metrics import Metrics
from .retention import RetentionLosses
from .settings import Settings
from .store import Cursor, Cursors, Store, StoredMessage, StoreUnavailable

__all__ = ["MAX_PENDING", "Chained", "Feed", "Feeder", "Gap", "Target", "Verdict"]
log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REREADS = 10_000
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


class Feeder:
    """Runs replays for sessions and hands live notifications to their feeds."""

    def __init__(self, settings: Settings, store: Store, cursors: Cursors, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.cursors = cursors
        self.metrics = metrics
        self.batch = max(1, min(200, settings.session_queue // 4))
        self.on_sent: Callable[[str, int], None] | None = None  # (user, seq): offline webhook
        self.retention = RetentionLosses(metrics)
        self.shared = SingleFlight()

    # ------------------------------------------------------------ session start

    async def start_points(
        self, session: Target, client: dict[str, int], client_epoch: str
    ) -> tuple[dict[str, list[StoredMessage]], bool]:
        """Set where each channel of a new (already registered) session resumes; read the first
        batch of each; say whether the resume is complete (nothing lost to retention).

        Raises :class:`BadResume` for a client position beyond the stream's end and
        :class:`StoreUnavailable` when the stream cannot be read."""
        epoch = self.store.epoch
        claimed = {ch: n for ch, n in client.items() if n > 0 and client_epoch in ("", epoch)}
        stored, *ends = await _gather(
            lambda: self.cursors.load(session.user, session.device),
            *(_bind(self._end_seq, ch) for ch in claimed),
        )
        for (ch, seq), end in zip(claimed.items(), ends, strict=True):
            await self._check_position(ch, seq, end)
        starts = {
            ch: max(claimed.get(ch, 0), _cursor_of(stored, ch) if stored.epoch == epoch else 0)
            for ch in session.feeds
        }
        batches = await _gather(
            *(_bind(self._first_batch, session, ch, n) for ch, n in starts.items())
        )
        first = dict(zip(starts, batches, strict=True))
        recovered = all(
            not batch or feed.fresh or feed.skip or batch[0].prev == feed.sent
            for feed, batch in ((session.feeds[ch], b) for ch, b in first.items())
        )
        return first, recovered

    async def _check_position(self, ch: str, seq: int, shared_end: int) -> None:
        """Refuse a client position beyond the stream's end. The shared end may come from a read
        that began before the client's last message was stored (it joined another handshake's
        read), so a position beyond it is checked again against a read of its own."""
        if seq <= shared_end:
            return
        end = await self.store.end_seq(ch)
        if seq > end:
            raise BadResume(ch, f"{ch} position {seq} is beyond the end of the stream ({end})")

    async def _first_batch(self, session: Target, ch: str, resume: int) -> list[StoredMessage]:
        feed = session.feeds[ch]
        await self._position(feed, ch, session.user, resume)
        return await self._read(session, ch, feed.sent)

    async def _end_seq(self, ch: str) -> int:
        return await self.shared.run(("end", ch), lambda: self.store.end_seq(ch))

    async def _last_seq(self, ch: str, user: str | None) -> int:
        if user is not None:
            return await self.store.last_seq(ch, user)
        return await self.shared.run(("last", ch), lambda: self.store.last_seq(ch, None))

    async def _position(self, feed: Feed, ch: str, user: str, resume: int) -> None:
        if resume > 0:
            feed.start(resume)
            return
        backlog = self.settings.backlog_user if ch == "user" else self.settings.backlog_broadcast
        if backlog < 0:
            feed.start(0, fresh=True)
        elif backlog == 0:
            feed.start(await self._last_seq(ch, _owner(ch, user)))
        else:
            count = await self.store.count(ch, _owner(ch, user))
            feed.start(0, fresh=True, skip=max(0, count - backlog))

    # ------------------------------------------------------------ live

    def catch_up(self, session: Target, ch: str, reason: str) -> None:
        """A feed missed a notification (or may have): re-read the stream for it."""
        self.metrics.catch_ups.labels(reason=reason).inc()
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
                released, live = feed.finish()
                for note in released:
                    session.send_text(_frame(ch, note))
                self._sent(session, ch, feed)
                if live:
                    return
                batch = None
        except (StoreUnavailable, BridgeClosed) as exc:
            log.warning("replay for %r failed (%s); the session must resume", session, exc)
            self.metrics.backend_errors.labels(backend="replay").inc()
            session.close(protocol.Close.GOING_AWAY, "store unavailable")
            return
        session.close(protocol.Close.GOING_AWAY, "replay did not settle")

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
                self.metrics.gaps.labels(ch=ch).inc()
                self.retention.report(session, ch, gap.first, gap.last)
                session.send_text(protocol.gap(ch=ch, first=gap.first, last=gap.last))  # type: ignore[arg-type]
            if deliver:
                session.send_text(_frame(ch, msg))
        self.metrics.replayed.labels(ch=ch).inc(len(batch))
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
                self.metrics.rate_limited.labels(kind="slow_consumer").inc()
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
    """Run ``calls`` concurrently (their bridge crossings batch together); the first error wins."""
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
