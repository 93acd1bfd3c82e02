"""Ring-change bookkeeping and readiness of the router, with a fake bus (no servers)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from meshpush.backends.bus import Notification
from meshpush.core.ring import NodeInfo, View
from meshpush.observe.metrics import Metrics
from meshpush.server.hub import Hub
from meshpush.server.router import Router
from meshpush.settings import Settings


class FakeBus:
    """What the router asks of the bus: slot subscriptions and connection health."""

    def __init__(self) -> None:
        self.subs: set[int] = set()
        self.healthy = True
        self.reason = ""

    async def subscribe_slots(self, slots: set[int]) -> None:
        self.subs |= slots

    async def unsubscribe_slots(self, slots: set[int]) -> None:
        self.subs -= slots

    async def subscribe_broadcast(self) -> None:
        pass

    def subscribed(self) -> frozenset[int]:
        return frozenset(self.subs)

    def is_subscribed(self, s: int) -> bool:
        return s in self.subs

    def unhealthy_reason(self) -> str:
        return self.reason

    @property
    def inbound(self) -> Any:
        return trio.open_memory_channel[None](0)[1]


def view(*ids: str) -> View:
    return {i: NodeInfo(i, f"ws://{i}/ws", f"http://{i}", 0.0) for i in ids}


def router(bus: FakeBus | None = None) -> tuple[Router, Metrics]:
    metrics = Metrics("n1")
    settings = Settings(node_id="n1", drain_window=0.01)
    return Router(settings, Hub(), bus or FakeBus(), None, metrics), metrics  # type: ignore[arg-type]


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def test_every_ring_change_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    r, metrics = router()
    caplog.set_level(logging.INFO, logger="meshpush.server.router")
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        steps = [
            (view("n1"), 1),  # first view
            (view("n1"), 1),  # same membership again (a periodic re-list): no change
            (view("n1", "n2", "n3"), 2),  # grow
            (view("n1", "n3"), 3),  # shrink (a peer's lease expired after a SIGKILL)
            (view("n1", "n2"), 4),  # one joins as another leaves
        ]
        for members, changes in steps:
            await r.apply(members, registered=True)
            assert sample(metrics, "meshpush_ring_changes_total") == changes
            assert sample(metrics, "meshpush_cluster_nodes") == len(members)
        nursery.cancel_scope.cancel()
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("ring:")]
    assert len(lines) == 4
    assert "left n2" in lines[2] and "joined -" in lines[2]
    assert "joined n2" in lines[3] and "left n3" in lines[3]


async def test_readiness_names_the_failing_check_and_the_gauge_follows() -> None:
    bus = FakeBus()
    r, metrics = router(bus)
    assert r.not_ready_reason().startswith("not registered")
    await r.apply(view("n1", "n2"), registered=True)
    assert r.ready and r.not_ready_reason() == ""
    assert sample(metrics, "meshpush_ready") == 1
    bus.healthy, bus.reason = False, "NATS round trip took longer than 2s"
    assert not r.ready and r.readiness()["nats"] is False
    assert r.not_ready_reason() == "NATS round trip took longer than 2s"
    assert sample(metrics, "meshpush_ready") == 0  # read at scrape time, no apply needed
    bus.healthy = True
    assert sample(metrics, "meshpush_ready") == 1
    r.begin_drain()
    assert r.not_ready_reason() == "draining"
    assert sample(metrics, "meshpush_ready") == 0


async def test_what_a_pass_does_not_take_is_held_and_dispatched_first() -> None:
    """``Router._more`` (a fan-out pass asking for the next waiting notification): what the
    pass does not accept stays first in line, so the order of arrival is kept."""

    def n(ch: str, seq: int) -> Notification:
        return Notification(ch, "u" if ch == "user" else None, seq, seq - 1, f"m{seq}", 0.0, "1")

    send, receive = trio.open_memory_channel[Notification | None](10)

    class Bus(FakeBus):
        inbound = receive

    r, _ = router(Bus())
    b2, u1, b3 = n("broadcast", 2), n("user", 1), n("broadcast", 3)
    for item in (b2, u1, b3):
        send.send_nowait(item)
    assert r._more(lambda note: True) is b2
    assert r._more(lambda note: note.ch == "broadcast") is None  # u1 is held
    assert r._more(lambda note: note.ch == "broadcast") is None  # still first in line
    assert r._more(lambda note: True) is u1
    assert r._more(lambda note: True) is b3
    assert r._more(lambda note: True) is None  # nothing waits
