"""The one crossing from trio into the asyncio libraries (nats-py, aetcd), done in batches.

The node opens one ``trio_asyncio`` loop at start, for the control plane (the NATS hot paths
— publishes, notifications — run on the trio link, :mod:`meshpush.backends.natslink`, and never
cross).
Short asyncio operations (a KV write, a stream read) are queued with :meth:`Bridge.call`; one
pump task takes everything waiting (up to ``max_batch``) across the bridge in a single
``aio_as_trio`` call that only *starts* each operation as its own asyncio task and returns at
once. Each operation reports back to its trio caller when it finishes, on its own (the done
callback runs on the trio thread and sets a trio event: no crossing per result). So
crossings are amortised (one per batch, see docs/decisions.md) and independent operations
never wait for each other: a stuck cursor flush does not delay a stream read (no
head-of-line blocking). At most ``max_inflight`` operations run at once; callers beyond that wait.
Long-lived asyncio work (watches, subscriptions) crosses with :func:`aio` directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio
import trio_asyncio

log = logging.getLogger(__name__)
T = TypeVar("T")


class BridgeClosed(Exception):
    """The bridge's pump is not running (the node is stopping)."""


def aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wrap an asyncio coroutine function so trio can await it (one crossing)."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


async def best_effort(what: str, fn: Callable[[], Awaitable[object]], timeout: float) -> bool:
    """Run ``fn()`` for at most ``timeout`` seconds, shielded from cancellation; log and swallow
    any failure — asyncio's ``CancelledError`` too, which grpc raises when a channel is closed
    under a call. For cleanup steps (shutdown, closing a backend) that must never keep the node
    from stopping cleanly, whatever the backend does. True if ``fn`` completed in time."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await fn()
            return True
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("%s failed: %r", what, exc)
            return False
    log.warning("%s did not finish within %ss", what, timeout)
    return False


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """What the bridge has done so far (read by metrics and benchmarks)."""

    batches: int
    calls: int
    inflight: int
    queued: int


class _Call(Generic[T]):
    __slots__ = ("done", "error", "factory", "result", "timeout")

    def __init__(self, factory: Callable[[], Awaitable[T]], timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class Bridge:
    """Batches short asyncio calls from many trio tasks into few, non-blocking crossings."""

    def __init__(self, max_batch: int = 512, queue: int = 10000, max_inflight: int = 8192):
        self.max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Call[Any]](queue)
        self._slots = trio.Semaphore(max_inflight)
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Future[Any]] = set()
        self.batches = 0
        self.calls = 0

    async def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
        """Run ``factory()`` on the asyncio loop; return its result or raise its exception.

        ``timeout`` bounds the operation on the asyncio side (``TimeoutError`` after it).
        If the caller is cancelled the operation still runs to its end or its timeout."""
        item: _Call[T] = _Call(factory, timeout)
        await self._slots.acquire()
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send_waiting(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._slots.release()
            raise BridgeClosed("bridge is closed") from None
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    async def _send_waiting(self, item: _Call[Any]) -> None:
        try:
            await self._send.send(item)
        except BaseException:
            self._slots.release()
            raise

    def statistics(self) -> BridgeStats:
        return BridgeStats(
            batches=self.batches,
            calls=self.calls,
            inflight=self._max_inflight - self._slots.value,
            queued=self._send.statistics().current_buffer_used,
        )

    async def run(self, *, task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump. Needs an open ``trio_asyncio`` loop around it."""
        task_status.started(self)
        async with self._recv:
            while True:
                batch = [await self._recv.receive()]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._cross(batch)

    async def _cross(self, batch: list[_Call[Any]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            await aio(self._start_all)(batch)
        except BaseException as exc:
            for item in batch:
                if not item.done.is_set():
                    self._finish(item, None, BridgeClosed(f"bridge crossing failed: {exc!r}"))
            raise

    async def _start_all(self, batch: list[_Call[Any]]) -> None:
        """On the asyncio loop: start every call as its own task; do not wait for any."""
        for item in batch:
            task = asyncio.ensure_future(_run_one(item))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._on_done, item))

    def _on_done(self, item: _Call[Any], task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._finish(item, None, BridgeClosed("bridge call cancelled"))
        else:
            self._finish(
                item, task.result() if task.exception() is None else None, task.exception()
            )

    def _finish(self, item: _Call[Any], result: Any, error: BaseException | None) -> None:
        if item.done.is_set():
            return
        item.result, item.error = result, error
        item.done.set()
        self._slots.release()


async def _run_one(item: _Call[Any]) -> Any:
    timeout = None if math.isinf(item.timeout) else item.timeout
    return await asyncio.wait_for(item.factory(), timeout)
