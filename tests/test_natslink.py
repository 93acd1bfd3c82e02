"""The trio NATS link against a real ``nats-server -js`` (and, for bad input, a fake server).

Publish/subscribe with synchronous callbacks, request rounds through the wildcard inbox,
JetStream acks and no-responders, a restarted server (reconnect + resubscribe), a SIGSTOPped
server (requests time out, pings too), a server speaking garbage, bounds and shutdown."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_asyncio

from meshpush.backends.bridge import Bridge
from meshpush.backends.bus import Bus
from meshpush.backends.natslink import (
    BufferFull,
    Link,
    LinkConfig,
    NoReply,
    NotConnected,
    NotSent,
    Request,
    parse_server,
)
from meshpush.backends.natswire import Msg
from meshpush.local.devcluster import Proc, binary, free_port, spawn, wait_tcp
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

pytestmark = pytest.mark.cluster


class NatsServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = ["-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.workdir / "js")]
        self.proc = spawn("nats", [binary("nats-server"), *argv], self.workdir)
        wait_tcp(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.send(signal.SIGCONT)
            self.proc.stop(signal.SIGKILL, timeout=10)

    @contextmanager
    def paused(self) -> Iterator[None]:
        assert self.proc is not None
        self.proc.send(signal.SIGSTOP)
        time.sleep(0.1)  # kill() returns before the process stopped (it may run on the other core)
        try:
            yield
        finally:
            self.proc.send(signal.SIGCONT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def link(server: NatsServer) -> AsyncIterator[Link]:
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([server.url], LinkConfig(connect_timeout=1)).run)
        yield link
        nursery.cancel_scope.cancel()


async def until(predicate: object, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.02)


def test_server_urls_in_the_forms_nats_py_takes() -> None:
    assert parse_server("nats://127.0.0.1:4222").port == 4222
    assert parse_server("127.0.0.1:5000").port == 5000
    s = parse_server("nats://u%40x:p@[::1]:4223")
    assert (s.host, s.port, s.user, s.password) == ("::1", 4223, "u@x", "p")
    assert parse_server("nats://tok@localhost:1").token == "tok"
    with pytest.raises(ValueError, match="scheme"):
        parse_server("tls://127.0.0.1:4222")


async def test_publish_reaches_a_subscription_with_headers(link: Link) -> None:
    got: list[Msg] = []
    link.subscribe("t.*", got.append)
    await link.ping(5)  # the server has the subscription
    link.publish("t.a", b"one")
    link.publish("t.b", b"two", headers={"traceparent": "00-x"})
    await until(lambda: len(got) == 2)
    assert [(m.subject, m.payload, m.headers) for m in got] == [
        ("t.a", b"one", None),
        ("t.b", b"two", {"traceparent": "00-x"}),
    ]


async def test_a_flush_larger_than_the_socket_buffer_arrives_whole_and_in_order(
    link: Link,
) -> None:
    """The writer writes a flush straight to the socket and sends what the kernel did not take
    at once through the stream; the reader reads what arrives in pieces: every message
    arrives, in order, byte for byte."""
    got: list[Msg] = []
    link.subscribe("big", got.append)
    await link.ping(5)
    payloads = [bytes([65 + i]) * 500_000 for i in range(24)]  # 12 MB in one flush
    for p in payloads:
        link.publish("big", p)
    await until(lambda: len(got) == len(payloads))
    assert [m.payload for m in got] == payloads


async def test_unsubscribe_stops_the_callback(link: Link) -> None:
    got: list[Msg] = []
    sid = link.subscribe("u", got.append)
    await link.ping(5)
    link.unsubscribe(sid)
    link.publish("u", b"x")
    await link.ping(5)
    assert got == []


async def test_a_message_over_max_payload_is_refused_and_the_link_stays_up(link: Link) -> None:
    assert link.max_payload == 1024 * 1024  # from the server's INFO
    with pytest.raises(ValueError, match="max_payload"):
        link.publish("big", b"x" * (link.max_payload - 10), headers={"Nats-Msg-Id": "abc"})
    [reply] = await link.request_many([Request("big", b"x" * (link.max_payload + 1))], 1)
    assert isinstance(reply, NotSent)
    assert await link.ping(5) >= 0 and link.connected


async def test_a_failing_callback_does_not_take_the_connection_down(link: Link) -> None:
    def boom(msg: Msg) -> None:
        raise RuntimeError("bug")

    got: list[Msg] = []
    link.subscribe("b", boom)
    link.subscribe("b", got.append)
    await link.ping(5)
    link.publish("b", b"x")
    await until(lambda: got)
    assert link.connected


async def test_a_request_round_gets_every_answer_in_order(link: Link) -> None:
    def echo(msg: Msg) -> None:
        assert msg.reply is not None
        link.publish(msg.reply, msg.payload.upper())

    link.subscribe("svc", echo)
    await link.ping(5)
    replies = await link.request_many([Request("svc", b"r%d" % i) for i in range(50)], 5)
    assert [r.payload for r in replies if isinstance(r, Msg)] == [b"R%d" % i for i in range(50)]


async def test_no_responders_is_a_503_status(link: Link) -> None:
    [reply] = await link.request_many([Request("nobody.home", b"x")], 5)
    assert isinstance(reply, Msg) and reply.headers is not None
    assert reply.headers["Status"] == "503"


async def test_jetstream_publishes_are_acked_in_one_round(link: Link) -> None:
    config = {"name": "S", "subjects": ["s.>"], "storage": "memory"}
    [created] = await link.request_many(
        [Request("$JS.API.STREAM.CREATE.S", json.dumps(config).encode())], 5
    )
    assert isinstance(created, Msg) and b"error" not in created.payload
    headers = {"Nats-Msg-Id": "m1", "Nats-Expected-Last-Subject-Sequence": "0"}
    again = {"Nats-Msg-Id": "m1"}
    requests = [Request("s.a", b"1", headers), Request("s.b", b"2"), Request("s.a", b"1", again)]
    replies = await link.request_many(requests, 5)
    acks = [json.loads(r.payload) for r in replies if isinstance(r, Msg)]
    assert acks[0]["seq"] == 1 and acks[1]["seq"] == 2
    assert acks[2]["seq"] == 1 and acks[2]["duplicate"] is True
    [wrong] = await link.request_many([Request("s.a", b"4", headers)], 5)
    assert isinstance(wrong, Msg) and json.loads(wrong.payload)["error"]["err_code"] == 10071


async def test_an_atomic_batch_is_one_write_with_one_answer_or_nothing_sent(link: Link) -> None:
    config = {"name": "A", "subjects": ["a.>"], "storage": "memory", "allow_atomic": True}
    [created] = await link.request_many(
        [Request("$JS.API.STREAM.CREATE.A", json.dumps(config).encode())], 5
    )
    assert isinstance(created, Msg) and b"error" not in created.payload

    def batch(n: int, big: int = -1) -> list[Request]:
        return [
            Request(
                f"a.{k % 2}",
                b"x" * (link.max_payload + 1 if k == big else 1),
                {"Nats-Batch-Id": f"b{n}{big}", "Nats-Batch-Sequence": str(k + 1)}
                | ({"Nats-Batch-Commit": "1"} if k == n - 1 else {}),
            )
            for k in range(n)
        ]

    answer = await link.request_batch(batch(3), 5)
    assert isinstance(answer, Msg)
    ack = json.loads(answer.payload)
    assert (ack["seq"], ack["count"], ack["batch"]) == (3, 3, "b3-1")
    refused = await link.request_batch(batch(3, big=1), 5)  # one cannot be encoded
    assert isinstance(refused, NotSent)
    again = await link.request_batch(batch(2), 5)
    assert isinstance(again, Msg) and json.loads(again.payload)["seq"] == 5  # nothing between


async def test_publishing_while_disconnected_is_not_sent(server: NatsServer) -> None:
    link = Link([server.url])
    with pytest.raises(NotConnected):
        link.publish("x", b"")
    [reply] = await link.request_many([Request("x", b"")], 1)
    assert isinstance(reply, NotSent)


async def test_a_full_buffer_is_an_error_the_caller_sees(server: NatsServer) -> None:
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([server.url], LinkConfig(max_buffer=100)).run)
        link.publish("x", b"a" * 80)  # one loop turn: nothing is written yet
        with pytest.raises(BufferFull):
            link.publish("x", b"a" * 80)
        await link.ping(5)  # the writer emptied it
        link.publish("x", b"a" * 80)
        nursery.cancel_scope.cancel()


async def test_the_first_reachable_server_of_the_list_is_used(server: NatsServer) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([dead, server.url]).run)
        assert link.connected and await link.ping(5) >= 0
        nursery.cancel_scope.cancel()
    assert not link.connected


async def test_a_restarted_server_reconnects_and_resubscribes(server: NatsServer) -> None:
    got: list[Msg] = []
    events: list[object] = []
    async with trio.open_nursery() as nursery:
        link = Link([server.url], LinkConfig(connect_timeout=1, backoff_max=0.2))
        link.on_connect = lambda again: events.append(("up", again))
        link.on_disconnect = lambda reason: events.append("down")
        link.subscribe("live", got.append)
        await nursery.start(link.run)
        server.stop()
        await until(lambda: not link.connected)
        [reply] = await link.request_many([Request("live", b"")], 1)
        assert isinstance(reply, NotSent)  # never left the process
        await trio.to_thread.run_sync(server.start)
        await until(lambda: link.connected)
        await link.ping(5)
        link.publish("live", b"after")
        await until(lambda: got)
        assert got[0].payload == b"after"
        assert events == [("up", False), "down", ("up", True)]
        assert link.statistics().reconnects == 1
        nursery.cancel_scope.cancel()


async def test_a_stopped_server_times_requests_out_without_losing_the_link(
    server: NatsServer, link: Link
) -> None:
    link.subscribe("svc", lambda m: link.publish(m.reply or "", b"ok"))
    await link.ping(5)
    with server.paused():
        replies = await link.request_many([Request("svc", b"1"), Request("svc", b"2")], 0.3)
        assert all(isinstance(r, NoReply) for r in replies)
        with pytest.raises(trio.TooSlowError):
            await link.ping(0.3)
    [reply] = await link.request_many([Request("svc", b"3")], 5)
    assert isinstance(reply, Msg) and reply.payload == b"ok"


async def test_requests_in_flight_at_a_disconnect_are_no_reply(server: NatsServer) -> None:
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([server.url], LinkConfig(backoff_max=0.2)).run)
        link.subscribe("slow", lambda m: None)  # takes it, never answers
        await link.ping(5)
        result: list[object] = []

        async def ask() -> None:
            result.extend(await link.request_many([Request("slow", b"")], 30))

        nursery.start_soon(ask)
        await trio.sleep(0.2)  # sent, waiting for the answer
        server.stop()
        await until(lambda: result)
        assert isinstance(result[0], NoReply) and "connection lost" in result[0].reason
        nursery.cancel_scope.cancel()


async def test_a_stale_connection_is_dropped(server: NatsServer) -> None:
    config = LinkConfig(ping_interval=0.1, max_pings_out=2, backoff_max=0.2)
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([server.url], config).run)
        with server.paused():
            await until(lambda: not link.connected, timeout=5)
        await until(lambda: link.connected)
        nursery.cancel_scope.cancel()


async def test_a_server_resetting_or_speaking_garbage_is_dropped_and_retried() -> None:
    accepted: list[int] = []

    async def liar(stream: trio.SocketStream) -> None:
        accepted.append(1)
        if len(accepted) == 1:  # the first connection is reset before INFO
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return
        await stream.send_all(b'INFO {"max_payload":1024}\r\n')
        await stream.receive_some(4096)  # CONNECT + PING
        await stream.send_all(b"PONG\r\n")
        await trio.sleep(0.05)
        await stream.send_all(b"MSG a 1 5000\r\n")  # over max_payload
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        link = Link([f"nats://127.0.0.1:{port}"], LinkConfig(backoff_max=0.1))
        downs: list[str] = []
        link.on_disconnect = downs.append
        await nursery.start(link.run)
        await until(lambda: len(accepted) >= 3)
        assert "over the bound" in downs[0]
        nursery.cancel_scope.cancel()


async def test_cancelling_run_closes_and_fails_what_waits(server: NatsServer) -> None:
    result: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer, trio.open_nursery() as inner:
            link = await inner.start(Link([server.url]).run)
            link.subscribe("slow", lambda m: None)
            await link.ping(5)

            async def ask() -> None:
                result.extend(await link.request_many([Request("slow", b"")], 30))

            outer.start_soon(ask)
            await trio.sleep(0.2)
            inner.cancel_scope.cancel()
    assert not link.connected
    assert isinstance(result[0], NoReply)
    with pytest.raises(NotConnected):
        link.publish("x", b"")


async def test_the_bus_on_a_stopped_server_is_unresponsive_then_heals(server: NatsServer) -> None:
    """The bus's echo check rides the link: a SIGSTOPped server makes it unhealthy with a
    reason, SIGCONT healthy again; the slot subscriptions made meanwhile are kept."""
    settings = Settings(node_id="n1", nats_url=server.url, cluster="lk")
    bus = Bus(settings, Bridge(), Metrics("n1"))
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await bus.subscribe_slots({1, 2})
        assert bus.healthy and bus.subscribed() == {1, 2}
        with server.paused():
            assert not await bus.check(0.3)
            assert not bus.healthy
            assert bus.unhealthy_reason() == "NATS round trip took longer than 0.3s"
        assert await bus.check(5) and bus.healthy
        bus.link.publish(bus.subjects.slot_live(2), b'{"u":"a","s":1,"i":"m","t":1}\n{}')
        with trio.fail_after(5):
            note = await bus.inbound.receive()
        assert note is not None and (note.user, note.seq) == ("a", 1)
        nursery.cancel_scope.cancel()


async def test_at_a_disconnect_buffered_requests_are_not_sent_and_written_ones_no_reply(
    server: NatsServer,
) -> None:
    """The honest split: bytes still in the buffer never left (not stored, 503); bytes the
    writer took may have reached the server (outcome unknown, 504)."""
    async with trio.open_nursery() as nursery:
        link = await nursery.start(Link([server.url], LinkConfig(backoff_max=0.2)).run)
        link.subscribe("slow", lambda m: None)
        await link.ping(5)
        result: list[object] = []

        async def ask() -> None:
            result.extend(await link.request_many([Request("slow", b"1")], 30))

        nursery.start_soon(ask)
        await until(lambda: link._waiting and not link._unsent)  # written, waiting
        conn = link._conn
        assert conn is not None
        result2: list[object] = []

        async def ask_and_drop() -> None:
            link._drop(conn, "cut by the test")  # the writer is cancelled from here on
            assert link.connected  # until the connection's tasks are gone
            result2.extend(await link.request_many([Request("slow", b"2")], 30))

        nursery.start_soon(ask_and_drop)
        await until(lambda: result and result2)
        assert isinstance(result[0], NoReply)
        assert isinstance(result2[0], NotSent) and "not sent" in result2[0].reason
        nursery.cancel_scope.cancel()
