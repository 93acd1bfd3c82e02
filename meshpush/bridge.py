"""The one crossing from trio into the asyncio libraries (nats-py, aetcd), done in batches.

The node opens one ``trio_asyncio`` loop at start. Short asyncio operations (a JetStream
publish, a KV write) are queued with :meth:`Bridge.call` and run by one pump task that takes
everything waiting (up to ``max_batch``) across the bridge in a single ``aio_as_trio`` call,
where they run concurrently. One crossing per message costs ~0.3 ms; one per batch is
amortised (see docs/decisions.md). Long-lived asyncio work (watches, subscriptions) crosses
with :func:`aio` directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
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


class _Call(Generic[T]):
    __slots__ = ("done", "error", "factory", "result", "timeout")

    def __init__(self, factory: Callable[[], Awaitable[T]], timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class Bridge:
    """Batches short asyncio calls from many trio tasks into few loop crossings."""

    def __init__(self, max_batch: int = 512, queue: int = 10000) -> None:
        self.max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Call[Any]](queue)
        self.batches = 0
        self.calls = 0

    async def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
        """Run ``factory()`` on the asyncio loop; return its result or raise its exception."""
        item: _Call[T] = _Call(factory, timeout)
        try:
            await self._send.send(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise BridgeClosed("bridge is closed") from None
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

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
            outcomes = await aio(_run_all)(batch)
        except BaseException as exc:
            for item in batch:
                item.error = BridgeClosed(f"bridge crossing failed: {exc!r}")
                item.done.set()
            raise
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                item.error = outcome
            else:
                item.result = outcome
            item.done.set()


async def _run_all(batch: list[_Call[Any]]) -> list[Any]:
    async def one(item: _Call[Any]) -> Any:
        timeout = None if math.isinf(item.timeout) else item.timeout
        return await asyncio.wait_for(item.factory(), timeout)

    return await asyncio.gather(*(one(item) for item in batch), return_exceptions=True)
