"""The trio -> asyncio bridge: results, errors, timeouts, and no head-of-line blocking."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import trio
import trio_asyncio

from meshpush.backends.bridge import Bridge


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        b = await nursery.start(Bridge(max_batch=8).run)
        yield b
        nursery.cancel_scope.cancel()


async def test_call_returns_the_asyncio_result(bridge: Bridge) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    with trio.fail_after(5):
        assert await bridge.call(answer) == 42


async def test_call_raises_the_asyncio_exception(bridge: Bridge) -> None:
    async def fail() -> None:
        raise KeyError("boom")

    with trio.fail_after(5), pytest.raises(KeyError):
        await bridge.call(fail)


async def test_call_times_out_on_the_asyncio_side(bridge: Bridge) -> None:
    async def hang() -> None:
        await asyncio.sleep(3600)

    with trio.fail_after(5), pytest.raises(TimeoutError):
        await bridge.call(hang, timeout=0.05)


async def test_a_stuck_call_does_not_delay_the_others(bridge: Bridge) -> None:
    """One crossing blocks (a stuck cursor flush); 200 others, queued after it and in the
    same batches, all finish while it is still stuck."""
    release = asyncio.Event()
    stuck_done = trio.Event()

    async def stuck() -> str:
        await release.wait()
        return "stuck"

    async def quick(i: int) -> int:
        await asyncio.sleep(0)
        return i

    results: list[int] = []

    async def run_stuck() -> None:
        assert await bridge.call(stuck, timeout=float("inf")) == "stuck"
        stuck_done.set()

    async def run_quick(i: int) -> None:
        results.append(await bridge.call(lambda: quick(i)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_stuck)
        await trio.sleep(0.01)  # the stuck call has crossed
        with trio.fail_after(5):
            async with trio.open_nursery() as quick_ones:
                for i in range(200):
                    quick_ones.start_soon(run_quick, i)
        assert sorted(results) == list(range(200))
        assert not stuck_done.is_set()
        assert bridge.statistics().inflight == 1
        release.set()
        with trio.fail_after(5):
            await stuck_done.wait()
    assert bridge.statistics().inflight == 0
    assert bridge.statistics().batches < 200 + 1  # batched: fewer crossings than calls


async def test_inflight_calls_are_bounded() -> None:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        b = await nursery.start(Bridge(max_inflight=2).run)
        release = asyncio.Event()

        async def wait() -> None:
            await release.wait()

        for _ in range(3):
            nursery.start_soon(b.call, wait)
        await trio.sleep(0.05)
        assert b.statistics().inflight == 2  # the third waits for a slot
        release.set()
        with trio.fail_after(5):
            while b.statistics().inflight:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
