"""The bus's round-trip health check and notification callback, with a fake NATS link (no
server).

The real thing (a SIGSTOPped nats-server) is in tests/test_health.py."""

from __future__ import annotations

import pytest
import trio

from meshpush.backends.bridge import Bridge
from meshpush.backends.bus import Bus, Notification
from meshpush.backends.natswire import Msg
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings


class FakeLink:
    """Echoes what is published to the bus's inbox (on the next loop turn, as the reader
    would), unless stalled (then keeps it for later)."""

    def __init__(self, bus: Bus, nursery: trio.Nursery) -> None:
        self.bus = bus
        self.nursery = nursery
        self.connected = True
        self.stalled = False
        self.held: list[bytes] = []

    def publish(self, subject: str, data: bytes) -> None:
        if self.stalled:
            self.held.append(data)
        else:
            self.nursery.start_soon(self.echo, data)

    async def echo(self, data: bytes) -> None:
        self.bus._on_echo(Msg("_INBOX.x.echo", 1, None, data))

    def resume(self) -> None:
        self.stalled = False
        for data in self.held:  # late echoes of checks that already timed out
            self.nursery.start_soon(self.echo, data)
        self.held = []


def faked(bus: Bus, nursery: trio.Nursery) -> FakeLink:
    fake = FakeLink(bus, nursery)
    bus.link, bus._nc_connected, bus._echo_subject = fake, True, "_INBOX.x.echo"  # type: ignore[assignment]
    return fake


def up(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("meshpush_backend_up", {"backend": "nats"})


async def test_a_stall_makes_the_bus_unhealthy_and_a_timely_echo_heals_it() -> None:
    metrics = Metrics("n1")
    bus = Bus(Settings(node_id="n1"), Bridge(), metrics)
    assert up(metrics) == 0  # not connected yet
    async with trio.open_nursery() as nursery:
        fake = faked(bus, nursery)
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
    async with trio.open_nursery() as nursery:
        faked(bus, nursery)

        async def one() -> None:
            results.append(await bus.check(timeout=1.0))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert results == [True] * 5
    assert bus._echoes == {}


async def test_a_notification_goes_from_the_link_callback_to_inbound() -> None:
    bus = Bus(Settings(node_id="n1"), Bridge(), Metrics("n1"))
    on_message = bus._callback("user")
    on_message(Msg("mp.c.live.u.1", 1, None, b'{"u":"a","s":3,"p":2,"i":"m","t":1.5}\n{"x":1}'))
    on_message(Msg("mp.c.live.u.1", 1, None, b"garbage"))
    assert bus.inbound.receive_nowait() == Notification(
        ch="user", user="a", seq=3, prev=2, id="m", published_at=1.5, data_json='{"x":1}'
    )
    assert bus.stats.backend_errors["bad_notification"] == 1


async def test_everyone_catches_up_once_both_connections_are_back() -> None:
    bus = Bus(Settings(node_id="n1"), Bridge(), Metrics("n1"))
    bus.link.connected, bus._nc_connected = True, True
    bus._link_up(False)
    bus.link.connected = False
    bus._link_down("gone")
    bus._nc_connected, bus._missed = False, True  # nats-py's disconnected callback
    bus.link.connected = True
    bus._link_up(True)
    assert bus.statistics().dropped == 0
    with pytest.raises(trio.WouldBlock):  # not before the control plane is back too
        bus.inbound.receive_nowait()
    bus._nc_connected = True
    bus._back_up()  # nats-py's reconnected callback
    assert bus.inbound.receive_nowait() is None
    assert bus.reconnects == 1 and bus.stats.backend_errors["nats"] == 1
