"""The bus's round-trip health check, with a fake NATS connection (no server).

The real thing (a SIGSTOPped nats-server) is in tests/test_health.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import trio
import trio_asyncio

from meshpush.bridge import Bridge
from meshpush.bus import Bus
from meshpush.metrics import Metrics
from meshpush.settings import Settings


@dataclass
class Msg:
    data: bytes


class FakeNats:
    """Echoes what is published to the bus's inbox, unless stalled (then keeps it for later)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.stalled = False
        self.held: list[bytes] = []

    async def publish(self, subject: str, data: bytes) -> None:
        if self.stalled:
            self.held.append(data)
        else:
            asyncio.get_running_loop().create_task(self.bus._on_echo(Msg(data)))

    def resume(self) -> None:
        self.stalled = False
        for data in self.held:  # late echoes of checks that already timed out
            asyncio.get_running_loop().create_task(self.bus._on_echo(Msg(data)))
        self.held = []


def up(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("meshpush_backend_up", {"backend": "nats"})


async def test_a_stall_makes_the_bus_unhealthy_and_a_timely_echo_heals_it() -> None:
    metrics = Metrics("n1")
    bus = Bus(Settings(node_id="n1"), Bridge(), metrics)
    assert up(metrics) == 0  # not connected yet
    async with trio_asyncio.open_loop():
        fake = FakeNats(bus)
        bus.nc, bus.connected, bus._echo_subject = fake, True, "_INBOX.x"
        assert await bus.check(timeout=1.0)
        assert bus.healthy and up(metrics) == 1
        rtt = metrics.registry.get_sample_value("meshpush_backend_rtt_seconds", {"backend": "nats"})
        assert rtt is not None and 0 <= rtt < 1.0

        fake.stalled = True
        assert not await bus.check(timeout=0.05)
        assert not bus.healthy and up(metrics) == 0
        assert bus.unhealthy_reason() == "NATS round trip took longer than 0.05s"
        assert not await bus.check(timeout=0.05)  # still stalled: one error counted, not two
        errors = metrics.registry.get_sample_value(
            "meshpush_backend_errors_total", {"backend": "nats"}
        )
        assert errors == 1

        fake.resume()  # the two late echoes must not count as answers to the next check
        await trio.sleep(0.01)
        assert not bus.healthy
        assert await bus.check(timeout=1.0)
        assert bus.healthy and bus.unhealthy_reason() == "" and up(metrics) == 1


async def test_a_disconnected_bus_is_unhealthy_without_a_check() -> None:
    bus = Bus(Settings(node_id="n1"), Bridge(), Metrics("n1"))
    assert not await bus.check(timeout=0.1)
    assert not bus.healthy and bus.unhealthy_reason() == "NATS disconnected"


async def test_concurrent_round_trips_each_get_their_own_echo() -> None:
    bus = Bus(Settings(node_id="n1"), Bridge(), Metrics("n1"))
    results: list[bool] = []
    async with trio_asyncio.open_loop():
        bus.nc, bus.connected, bus._echo_subject = FakeNats(bus), True, "_INBOX.x"

        async def one() -> None:
            results.append(await bus.check(timeout=1.0))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert results == [True] * 5
    assert bus._echoes == {}
