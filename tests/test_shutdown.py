"""A node's stop is prompt and bounded (docs/operations.md, "Shutdown whatever the backends do").

The case that hung: on SIGINT the node revokes its lease, loses every slot it owns, and its
router unsubscribes them while the stop cancels everything. nats-py swallows the asyncio
cancellation in its flush, so the unsubscribe loop went on after ``close()`` had stopped the
flusher, waited on the full flush queue for ever, and trio (which waits for a cancelled
asyncio task to end) never finished the run: every fixture's teardown waited 10 s per node
for it, then SIGKILLed it. The bounds asserted here are the documented ones (a stop within
``STOP_BOUND``, a drain within ``drain_timeout + STOP_BOUND``), not speeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import FAST, make_cluster

from meshpush.bus import _unsubscribe_all
from meshpush.devcluster import STOP_BACKSTOP
from meshpush.node import STOP_BOUND, stuck_tasks


class _SwallowingSub:
    """Like a nats-py 2.16 subscription: its unsubscribe swallows a cancellation (and, to keep
    the test bounded, waits 2 s where the real one waited for ever)."""

    def __init__(self, unsubscribed: list[int], i: int) -> None:
        self.unsubscribed, self.i = unsubscribed, i

    async def unsubscribe(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(2)
        self.unsubscribed.append(self.i)


def test_unsubscribing_stops_when_cancelled_though_the_library_swallows_it() -> None:
    async def scenario() -> list[int]:
        done: list[int] = []
        task = asyncio.ensure_future(_unsubscribe_all([_SwallowingSub(done, i) for i in range(5)]))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait({task}, timeout=1)  # before the fix: one sub after another, 8 s
        assert task.cancelled()
        return done

    assert asyncio.run(scenario()) == [0]


async def test_stuck_tasks_names_the_task_and_where_it_waits() -> None:
    async def waits_for_ever() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waits_for_ever)
        await trio.testing.wait_all_tasks_blocked()
        left = stuck_tasks(trio.lowlevel.current_root_task())
        nursery.cancel_scope.cancel()
    assert "waits_for_ever at waits_for_ever:" in left, left


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("signum", "bound"),
    [(signal.SIGINT, STOP_BOUND), (signal.SIGTERM, float(FAST["drain_timeout"]))],  # type: ignore[arg-type]
    ids=["sigint", "sigterm"],
)
def test_a_node_owning_every_slot_stops_within_its_bound(
    tmp_path: Path, signum: int, bound: float
) -> None:
    """One node owns all 4096 slots and unsubscribes them all while it stops: it exits 0
    on its own within the bound (not killed by the fixture, not by its own backstop)."""
    with make_cluster(tmp_path / "c", nodes=1) as cluster:
        node = cluster.members[0]
        code = node.proc.stop(signum, timeout=bound)
        log = node.proc.log()
        assert code == 0, log[-3000:]  # -9: it did not exit within the bound
        assert STOP_BACKSTOP not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
