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

import signal
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import FAST, make_cluster
from test_fastpath import publish_many, stalled_reader

from meshpush.local import devcluster
from meshpush.local.devcluster import STOP_BACKSTOP, LocalCluster, NodeProc, spawn
from meshpush.server.node import STOP_BOUND, stuck_tasks
from meshpush.settings import Settings

# The slot subscribe/unsubscribe loops over nats-py (which swallowed the cancellation) are
# gone: live routing runs on the trio NATS link (meshpush/backends/natslink.py), where subscribing
# and unsubscribing are synchronous buffer writes; the node-level stops below still cover it.


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


def _node_that(tmp_path: Path, node_id: str, on_sigint: str, before: str = "") -> NodeProc:
    """A stand-in node process: prints ``before``, then waits; on SIGINT runs ``on_sigint``."""
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, {on_sigint})\n"
        f"print({before!r}, flush=True)\n"
        "time.sleep(60)\n"
    )
    return NodeProc(node_id, Settings(), spawn(node_id, [sys.executable, "-c", code], tmp_path))


def test_a_fixture_cluster_fails_when_a_node_does_not_stop_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite's own guard (tests/conftest.py make_cluster): a node that ignores SIGINT, or
    exits 0 only after its backstop cut its stop short, fails the ``with`` block."""
    monkeypatch.setattr(devcluster, "NODE_STOP_WAIT", 1.0)
    exit0 = "lambda *a: sys.exit(0)"
    cluster = LocalCluster(tmp_path, nodes=0, check_stops=True)
    cluster.members = [
        _node_that(tmp_path, "n1", "signal.SIG_IGN"),
        _node_that(
            tmp_path, "n2", exit0, before=f"ERROR meshpush.server.node: ... {STOP_BACKSTOP}"
        ),
        _node_that(tmp_path, "n3", exit0),
    ]
    deadline = time.monotonic() + 10
    while not all(n.proc.log() for n in cluster.members) and time.monotonic() < deadline:
        time.sleep(0.05)  # each has set its handler and printed its line
    with pytest.raises(devcluster.ClusterError, match="did not stop cleanly"):
        cluster.__exit__(None, None, None)
    assert [u.split(":")[0] for u in cluster.unclean_stops] == ["n1", "n2"]
    assert cluster.unclean_stops[0] == "n1: exit status -9"


@pytest.mark.cluster
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_a_node_whose_reader_stopped_reading_stops_within_its_bound(
    tmp_path: Path, signum: int
) -> None:
    """A session's writes are blocked on a client that stopped reading (its socket buffers
    full, the node's bound passed but not its grace): the stop neither waits for that write
    nor for the grace; a drain waits at most ``drain_timeout`` for the session to leave."""
    bound = STOP_BOUND + (float(FAST["drain_timeout"]) if signum == signal.SIGTERM else 0.0)  # type: ignore[arg-type]
    settings = {"session_queue": 16, "session_buffer_bytes": 65536, "slow_consumer_grace": 60.0}
    with make_cluster(tmp_path / "c", nodes=1, heartbeat_timeout=60.0, **settings) as cluster:
        node, user = cluster.members[0], "stalled-at-stop"
        sock = await trio.to_thread.run_sync(stalled_reader, cluster, user)
        try:
            await publish_many(cluster, user, 120, "p" * 4000)  # far beyond its buffers
            code = await trio.to_thread.run_sync(node.proc.stop, signum, bound)
        finally:
            sock.close()
        log = node.proc.log()
        assert code == 0, log[-3000:]  # -9: it did not exit within the bound
        assert STOP_BACKSTOP not in log, log[-3000:]


@pytest.mark.cluster
def test_a_node_stopped_while_it_subscribes_its_slots_stops_within_its_bound(
    tmp_path: Path,
) -> None:
    """SIGINT as soon as the node says it listens: it is still registering and subscribing
    its 4096 slots (the same swallowed cancellation hung it there). It exits 0 in time."""
    with make_cluster(tmp_path / "c", nodes=0) as cluster:
        node = cluster.start_node(wait=False)
        deadline = time.monotonic() + 30
        while '"listening"' not in node.proc.log():
            assert node.proc.alive() and time.monotonic() < deadline, node.proc.log()[-3000:]
            time.sleep(0.005)
        code = node.proc.stop(signal.SIGINT, timeout=STOP_BOUND)
        log = node.proc.log()
        assert code == 0, log[-3000:]
        assert STOP_BACKSTOP not in log, log[-3000:]
