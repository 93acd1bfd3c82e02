"""Sessions and the hub over real socket pairs (no node): the fast path and the buffered path
keep frame order, a reader that stops is cut with 4008 and its buffer stays bounded, fan-out
encodes once and yields, and the frames parse with wsproto's own client."""

from __future__ import annotations

import collections
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from meshpush.backends.bus import Notification
from meshpush.core.machine import Limits
from meshpush.core.protocol import Close
from meshpush.core.ring import slot
from meshpush.observe.metrics import Metrics
from meshpush.server import hub as hub_module
from meshpush.server.hub import Hub
from meshpush.server.sessions import Context, Session
from meshpush.server.wire import Wire

LIMITS = Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=64, slow_grace=0.5)


class FakeFeeder:
    def __init__(self) -> None:
        self.saved = 0

    async def replay(self, *args: Any) -> None:
        pass

    def save_cursor(self, session: Any) -> None:
        self.saved += 1

    def catch_up(self, *args: Any) -> None:
        pass


def context(limits: Limits = LIMITS) -> Context:
    return Context(limits, FakeFeeder(), Metrics("test"))  # type: ignore[arg-type]


def live(session: Session) -> Session:
    for feed in session.feeds.values():
        feed.start(0)
        feed.finish()
    return session


@dataclass
class Peer:
    """The client end of a socket pair, parsing what the server wrote with wsproto."""

    sock: trio.socket.SocketType
    proto: Connection
    parts: list[str] = field(default_factory=list)

    async def frames(self, count: int, read_bytes: int = 65536) -> list[Any]:
        """At least ``count`` whole frames (text messages reassembled)."""
        out: list[Any] = []
        while len(out) < count:
            data = await self.sock.recv(read_bytes)
            assert data, f"closed after {len(out)} frames"
            self.proto.receive_data(data)
            for event in self.proto.events():
                if not isinstance(event, TextMessage):
                    out.append(event)
                    continue
                self.parts.append(event.data)
                if event.message_finished:
                    out.append(TextMessage("".join(self.parts)))
                    self.parts.clear()
        return out


@asynccontextmanager
async def running(
    ctx: Context, user: str = "u", buffers: int = 0
) -> AsyncIterator[tuple[Session, Peer]]:
    server, client = trio.socket.socketpair()
    if buffers:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    wire = Wire(trio.SocketStream(server))
    session = live(Session(ctx, user, "d", expires_at=2e9))
    peer = Peer(client, Connection(ConnectionType.CLIENT))
    async with trio.open_nursery() as nursery:
        session.open(wire, '{"type":"welcome"}', {})
        await nursery.start(session.run)
        yield session, peer
        session.close(Close.GOING_AWAY, "test over")
    client.close()


def note(seq: int, prev: int, size: int = 10, ch: str = "user") -> Notification:
    return Notification(
        ch=ch,
        user="u",
        seq=seq,
        prev=prev,
        id=f"m{seq}",
        data_json=json.dumps("x" * size),
        published_at=0.0,
    )


def texts(events: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events if isinstance(e, TextMessage)]


async def test_hub_indexes_by_user_device_and_slot() -> None:
    ctx = context()
    hub = Hub()
    a1, a2, b = (
        Session(ctx, "a", "phone", 0),
        Session(ctx, "a", "web", 0),
        Session(ctx, "b", "x", 0),
    )
    for s in (a1, a2, b):
        hub.add(s)
    assert len(hub) == 3
    assert set(hub.of_user("a")) == {a1, a2}
    assert set(hub.in_slots([slot("a")])) >= {a1, a2}
    assert hub.statistics().users == 2 and hub.count_of_user("a") == 2
    hub.remove(a1)
    hub.remove(a1)  # idempotent
    assert set(hub.of_user("a")) == {a2}
    hub.remove(a2)
    hub.remove(b)
    assert len(hub) == 0
    assert hub.occupied_slots() == frozenset()


@pytest.mark.parametrize("size", [0, 100, 125, 126, 5000, 65535, 65536, 200_000])
async def test_frames_parse_with_wsproto_at_every_length_encoding(size: int) -> None:
    hub = Hub()
    with trio.fail_after(10):
        async with running(context()) as (session, peer):
            hub.add(session)
            assert await hub.deliver(note(5, 0, size)) == 1
            welcome, msg = texts(await peer.frames(2))
    assert welcome == {"type": "welcome"}
    assert msg["seq"] == 5 and msg["data"] == "x" * size


async def test_order_holds_when_fast_and_buffered_writes_mix() -> None:
    """A reader with tiny socket buffers pauses and resumes: some frames go straight to the
    kernel, the rest wait in the session's buffer; every frame arrives once, in order."""
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=10_000))
    hub = Hub()
    with trio.fail_after(20):
        async with running(ctx, buffers=4096) as (session, peer):
            hub.add(session)
            received: list[dict[str, Any]] = []
            for seq in range(1, 401):
                await hub.deliver(note(seq, seq - 1, size=700))
                if seq % 100 == 0:  # the reader catches up now and then
                    assert session.buffered > 0  # the buffered path was taken
                    received += texts(await peer.frames(20, read_bytes=4096))
                    await trio.sleep(0.01)  # the session drains while the reader reads
            while len(received) < 401:
                received += texts(await peer.frames(1))
    seqs = [m["seq"] for m in received[1:]]
    assert seqs == list(range(1, 401))
    assert session.out is None or not session.out  # drained, the buffer released


async def test_a_reader_that_stops_is_cut_4008_with_a_bounded_buffer() -> None:
    ctx = context()
    hub = Hub()
    with trio.fail_after(20):
        async with running(ctx, buffers=4096) as (session, peer):
            hub.add(session)
            peak = 0
            seq = 0
            while session.close_request is None:
                seq += 1
                await hub.deliver(note(seq, seq - 1, size=1000))
                peak = max(peak, session.buffered)
                await trio.sleep(0.001)
            assert session.close_request.code == Close.SLOW_CONSUMER
            assert peak <= 2 * LIMITS.out_frames + 1  # the frame that crossed the hard bound
            # the client reads on: what was buffered, then the close frame with 4008
            events: list[Any] = []
            while not any(isinstance(e, CloseConnection) for e in events):
                events += await peer.frames(1)
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes[0].code == Close.SLOW_CONSUMER
    seqs = [m["seq"] for m in texts(events)[1:]]
    assert seqs == list(range(1, len(seqs) + 1))  # a prefix, in order, nothing skipped


async def turns_during(work: Callable[[], Awaitable[object]]) -> int:
    """How many times another task ran while ``work`` ran (the fan-out's scheduler turns)."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        await work()
        nursery.cancel_scope.cancel()
    return ticks - before


def hub_of(sessions: list[Session]) -> Hub:
    hub = Hub()
    for s in sessions:
        hub.add(s)
    return hub


async def test_fan_out_encodes_once_and_yields_to_the_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[str] = []
    real = hub_module.encode_text
    monkeypatch.setattr(hub_module, "encode_text", lambda t: encoded.append(t) or real(t))
    monkeypatch.setattr(hub_module, "YIELD_EVERY", 10)
    ctx = context()
    sessions = [live(Session(ctx, f"u{i}", "d", 0)) for i in range(100)]
    hub = hub_of(sessions)
    turns = await turns_during(lambda: hub.deliver(note(1, 0, ch="broadcast")))
    assert len(encoded) == 1
    assert turns >= 5  # the loop ran other tasks during the fan-out
    assert all(s.feeds["broadcast"].sent == 1 for s in sessions)


async def test_fan_out_yields_after_a_time_slice_even_before_its_session_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow turn (a loaded machine, slow writes) ends after YIELD_SLICE of wall clock."""
    clock = itertools.count()
    monkeypatch.setattr(hub_module, "_clock", lambda: next(clock) * 0.001)  # 1 ms per read
    monkeypatch.setattr(hub_module, "YIELD_SLICE", 0.002)
    ctx = context()
    sessions = [live(Session(ctx, f"u{i}", "d", 0)) for i in range(1000)]
    hub = hub_of(sessions)
    turns = await turns_during(lambda: hub.deliver(note(1, 0, ch="broadcast")))
    assert turns > 2 * (1000 // hub_module.YIELD_EVERY)  # by the count alone: 3
    assert all(s.feeds["broadcast"].sent == 1 for s in sessions)


async def test_fan_out_yields_sooner_when_writes_are_buffered() -> None:
    """A session whose write waits in its buffer wakes its task (the drain) in the next
    scheduler batch: such sessions weigh more, so a batch never wakes hundreds of them."""
    ctx = context()
    sessions = [live(Session(ctx, f"u{i}", "d", 0)) for i in range(200)]
    for s in sessions:  # each has something buffered already: the write queues behind it
        s.wire = object()  # type: ignore[assignment]
        s.out = collections.deque([b"waiting"])
    hub = hub_of(sessions)
    turns = await turns_during(lambda: hub.deliver(note(1, 0, ch="broadcast")))
    assert turns >= 200 * hub_module.BUFFERED_WEIGHT // hub_module.YIELD_EVERY // 2  # else 0
    assert all(s.out is not None and len(s.out) == 2 for s in sessions)  # queued behind


async def test_close_all_closes_every_session_in_chunks() -> None:
    ctx = context()
    hub = Hub()
    sessions = [Session(ctx, f"u{i}", "d", 0) for i in range(600)]
    await hub.close_all(sessions, Close.GOING_AWAY, "node stopping")
    assert all(s.close_request is not None for s in sessions)
