"""Pipelined JetStream publishes: many in flight, their acks awaited together, in trio.

nats-py's ``js.publish`` is a request per message: a future, a timer (``wait_for``) and a
response object each, and under trio-asyncio every timer and wake-up is a loop iteration with
its own cancel scope — measured ~190 µs of CPU per message, against ~45 µs for the same calls
under plain asyncio (docs/performance.md). :func:`publish_round` sends a whole *round* of
publishes with reply subjects on the node's trio NATS link (:mod:`meshpush.backends.natslink`: one
inbox subscription, one socket write) and waits once for the round: no future, timer or bridge
crossing per message. Each answer becomes an :class:`Ack`, the seq JetStream says is the real
last one (:class:`WrongLast`), :class:`Refused` (definitely not stored: JetStream said no, or
the publish never left the process) or :class:`NoAnswer` (sent, outcome unknown).
:class:`TrioGroupCommit` merges the publish requests that arrive while earlier ones are in
flight, so single publishes from many HTTP requests share rounds too. :func:`publish_batch`
sends a JetStream atomic batch (many publishes, one commit, one answer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from meshpush.backends.natslink import Link, NoReply, NotSent, Reply, Request

WRONG_LAST = 10071
_LAST_RE = re.compile(r"wrong last sequence: (\d+)")


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    duplicate: bool
    count: int = 1  # messages stored by an atomic batch's commit (its PubAck's "count")


@dataclass(frozen=True, slots=True)
class WrongLast:
    """JetStream refused the publish: the subject's last seq is ``last``, not the one sent."""

    last: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Definitely not stored (JetStream answered an error, or the publish was never sent)."""

    detail: str
    code: int = 0  # JetStream's err_code, if it answered one


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """Sent, but no answer in time: may or may not have been stored."""

    detail: str


Answer = Ack | WrongLast | Refused | NoAnswer


@dataclass(frozen=True, slots=True)
class BatchAck:
    """A JetStream atomic batch was stored: its ``count`` messages have the consecutive seqs
    ``seq - count + 1 .. seq`` (``seq``: the last one's)."""

    seq: int
    count: int


BatchAnswer = BatchAck | WrongLast | Refused | NoAnswer


def parse_ack(data: bytes, headers: dict[str, str] | None) -> Answer:
    """A JetStream publish answer: ``{"seq", "duplicate"?}`` or ``{"error": {...}}``."""
    status = (headers or {}).get("Status")
    if status == "503":
        return Refused("no JetStream responders")
    try:
        obj = json.loads(data)
    except ValueError:
        return NoAnswer(f"unreadable answer (status {status})")
    error = obj.get("error")
    if error is None:
        return Ack(int(obj["seq"]), bool(obj.get("duplicate", False)), int(obj.get("count", 1)))
    match = _LAST_RE.search(str(error.get("description", "")))
    if error.get("err_code") == WRONG_LAST and match:
        return WrongLast(int(match.group(1)))
    code = int(error.get("err_code") or 0)
    return Refused(f"JetStream refused: {error.get('description')}", code)


async def publish_round(link: Link, publishes: list[Request], timeout: float) -> list[Answer]:
    """Send every publish with its own reply subject (one write), then wait at most
    ``timeout`` for all the answers: one :data:`Answer` per publish, in order."""
    return [answer_of(r) for r in await link.request_many(publishes, timeout)]


async def publish_batch(
    link: Link, publishes: list[Request], timeout: float, opened: int = 0
) -> BatchAnswer:
    """Send a JetStream atomic batch (``publishes`` carry the ``Nats-Batch-*`` headers; the
    last one commits) in one write and wait at most ``timeout`` for its one answer.
    ``opened``: the batch's messages sent before (a batch opened ahead: its marker); the
    server's answer counts them, the :class:`BatchAck` does not (they come first)."""
    answer = answer_of(await link.request_batch(publishes, timeout))
    if isinstance(answer, Ack):
        return _batch_ack(answer, len(publishes), opened)
    return answer


def _batch_ack(ack: Ack, count: int, opened: int = 0) -> BatchAnswer:
    """A batch's PubAck. A plain or duplicate one (a server that took the commit for a lone
    message) stored nothing as a batch: refused (the caller falls back to single publishes)."""
    if ack.duplicate or ack.count != count + opened:
        return Refused(f"JetStream did not store the batch as one (ack {ack})")
    return BatchAck(ack.seq, count)


def answer_of(reply: Reply) -> Answer:
    """What a link reply says about a publish: never sent is definitely not stored; sent
    without an answer may have been."""
    if isinstance(reply, NotSent):
        return Refused(reply.reason)
    if isinstance(reply, NoReply):
        return NoAnswer(reply.reason)
    return parse_ack(reply.payload, reply.headers)


Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiting(Generic[Item, Result]):
    __slots__ = ("answered", "done", "error", "items", "lead", "result")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.done = trio.Event()
        self.lead = False  # woken to take a lane over (a lane's task was cancelled)
        self.answered = False
        self.result: Sequence[Result] = ()
        self.error: BaseException | None = None

    def answer(self, result: Sequence[Result], error: BaseException | None = None) -> None:
        if not self.answered:
            self.answered, self.result, self.error = True, result, error
            self.done.set()


class TrioGroupCommit(Generic[Item, Result]):
    """Merge concurrent small requests (single publishes): at most ``lanes`` merged batches
    run at once; the requests that arrive while every lane is busy wait and go together in the
    next one — one round of publishes (one socket write, one wait) for many HTTP requests
    (group commit, without waiting on a timer). ``run`` gets the concatenated items and
    returns one result per item, in order; it also gets ``idle``, to call when its batch only
    waits for others (the store: for users that other requests hold) — the lane then goes to
    the next request at once, and the batch goes on without one.

    A lane is the task of a request that found one free; it runs one batch, then the oldest
    request that queued meanwhile takes the lane over (so no request's answer waits for other
    requests' batches). If a lane's task is cancelled, its batch's outcome is unknown
    (``cancelled(items)`` answers it) and the lane is handed over the same way."""

    def __init__(
        self,
        run: Callable[[list[Item], Callable[[], None]], Awaitable[Sequence[Result]]],
        cancelled: Callable[[list[Item]], Sequence[Result]],
        lanes: int = 4,
        max_items: int | None = None,
    ) -> None:
        self._run = run
        self._cancelled = cancelled
        self._lanes = lanes
        self._max_items = max_items  # a merged batch takes requests up to this many items
        self._busy = 0
        self._queue: list[_Waiting[Item, Result]] = []
        self.batches = 0

    async def submit(self, items: list[Item]) -> Sequence[Result]:
        me: _Waiting[Item, Result] = _Waiting(items)
        self._queue.append(me)
        if self._busy < self._lanes:
            self._busy += 1
            await self._lane()
        while not me.answered:
            if me.lead:  # handed a lane (counted in _busy by _hand_over)
                me.lead = False
                await self._lane()
                continue
            if me.done.is_set():  # woken to lead, but another lane took our entry
                me.done = trio.Event()
            try:
                await me.done.wait()
            except BaseException:
                if me in self._queue:
                    self._queue.remove(me)
                if me.lead:  # the lane handed to us goes on to the next waiter
                    me.lead = False
                    self._busy -= 1
                    self._hand_over()
                raise
        if me.error is not None:
            raise me.error
        return me.result

    def _hand_over(self) -> None:
        waiting = [w for w in self._queue if not w.lead]
        if waiting and self._busy < self._lanes:
            self._busy += 1
            waiting[0].lead = True
            waiting[0].done.set()

    def _take(self) -> list[_Waiting[Item, Result]]:
        """The oldest queued requests, as many as fit in ``max_items`` (at least one)."""
        if self._max_items is None:  # the single publishes' lanes: everything queued
            batch, self._queue = self._queue, []
            return batch
        count, total = 0, 0
        for waiting in self._queue:
            total += len(waiting.items)
            if count and total > self._max_items:
                break
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    async def _lane(self) -> None:
        """Run one merged batch of everything queued (``_busy`` counts this lane already),
        then hand the lane to the oldest request that queued meanwhile: the task that ran a
        batch returns to its own caller at once."""
        batch = self._take()
        freed = False

        def idle() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._busy -= 1
                self._hand_over()

        try:
            if batch:
                self.batches += 1
                merged = [item for w in batch for item in w.items]
                try:
                    results = await self._run(merged, idle)
                except Exception as exc:
                    for w in batch:
                        w.answer((), exc)
                else:
                    start = 0
                    for w in batch:
                        w.answer(results[start : start + len(w.items)])
                        start += len(w.items)
        finally:
            for w in batch:
                w.answer(self._cancelled(w.items))  # no-op for those answered above
            idle()
