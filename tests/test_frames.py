"""The node's own client-frame parser (``meshpush.core.frames``): every frame shape RFC 6455 allows
parses as wsproto's client writes it, and every frame it forbids ends with the documented close
code (1002, 1007, 1009) — in unit tests, and over a socket pair against a running session
while another session keeps being served."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio
from test_sessions import Peer, context, live, running
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import Opcode

from meshpush.core.frames import ClientFrames, ProtocolClose, close_payload, server_frame, unmask
from meshpush.core.machine import Limits
from meshpush.core.protocol import Close
from meshpush.server.sessions import Session
from meshpush.server.wire import Wire


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"abcd") -> bytes:
    """A masked client frame, written by hand (to make the ones wsproto would refuse to)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + mask + unmask(mask, payload)


def wsproto_client_bytes(*events: Any) -> bytes:
    """What wsproto's own client sends for ``events`` (an independent encoder)."""
    client = Connection(ConnectionType.CLIENT)
    return b"".join(client.send(e) for e in events)


def feed_bytewise(parser: ClientFrames, data: bytes) -> list[Any]:
    out: list[Any] = []
    for i in range(len(data)):
        out += parser.receive(data[i : i + 1])
    return out


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_text_and_binary_at_every_length_encoding(size: int) -> None:
    text = ("é" * size)[:size]
    data = wsproto_client_bytes(TextMessage(text), BytesMessage(os.urandom(size) or b"x"))
    events = ClientFrames().receive(data)
    assert [type(e) for e in events] == [TextMessage, BytesMessage]
    assert events[0].data == text
    assert events[0].message_finished and events[1].message_finished


def test_frames_split_anywhere_parse_the_same() -> None:
    data = wsproto_client_bytes(
        TextMessage('{"type":"ack","ch":"user","seq":1}'), Ping(b"hi"), BytesMessage(b"\x00" * 300)
    )
    whole = ClientFrames().receive(data)
    parser = ClientFrames()
    assert feed_bytewise(parser, data) == whole
    assert parser.buf == b"" and parser.parts is None  # nothing kept once complete


def test_fragmented_message_with_a_ping_in_between() -> None:
    data = (
        client_frame(1, "hé".encode()[:2], fin=False)  # a UTF-8 char split across fragments
        + client_frame(9, b"p")
        + client_frame(0, "hé".encode()[2:] + b"llo", fin=False)
        + client_frame(0, b"!", fin=True)
    )
    events = ClientFrames().receive(data)
    assert events == [Ping(b"p"), TextMessage("héllo!")]


def test_pongs_count_as_nothing_and_close_frames_carry_their_code() -> None:
    data = client_frame(10, b"x") + client_frame(8, close_payload(1000, "bye"))
    events = ClientFrames().receive(data)
    assert events == [CloseConnection(1000, "bye")]
    assert not isinstance(events[0], ProtocolClose)
    assert ClientFrames().receive(client_frame(8, b"")) == [CloseConnection(1005)]


def test_eof_is_1006_and_later_bytes_are_ignored() -> None:
    parser = ClientFrames()
    assert parser.receive(client_frame(1, b"partial")[:5]) == []
    assert parser.receive(b"") == [CloseConnection(1006)]
    assert parser.receive(client_frame(1, b"x")) == []


BAD = [
    (client_frame(1, b"x")[:1] + bytes((1,)) + b"x", 1002),  # not masked
    (bytes((0x81 | 0x40,)) + client_frame(1, b"x")[1:], 1002),  # RSV1 without an extension
    (client_frame(3, b"x"), 1002),  # reserved data opcode
    (client_frame(11, b"x"), 1002),  # reserved control opcode
    (client_frame(9, b"x", fin=False), 1002),  # fragmented control frame
    (client_frame(9, b"x" * 126), 1002),  # control frame over 125 bytes
    (client_frame(0, b"x"), 1002),  # continuation without a message
    (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002),  # message inside one
    (client_frame(8, b"\x03"), 1002),  # close payload of one byte
    (client_frame(8, struct.pack("!H", 1005)), 1002),  # a code no peer may send
    (client_frame(8, struct.pack("!H", 999)), 1002),
    (client_frame(8, struct.pack("!H", 5000)), 1002),
    (client_frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
    (client_frame(1, b"\xc3\x28"), 1007),  # text not UTF-8
    (client_frame(1, b"\xc3", fin=False) + client_frame(0, b"\x28"), 1007),
    (bytes((0x81, 0xFF)) + b"\x80" + b"\x00" * 7, 1002),  # 64-bit length with the top bit
]


@pytest.mark.parametrize(("data", "code"), BAD)
def test_forbidden_frames_end_with_the_documented_code(data: bytes, code: int) -> None:
    parser = ClientFrames()
    events = parser.receive(data)
    assert isinstance(events[-1], ProtocolClose) and events[-1].code == code
    assert parser.failed and parser.buf == b""
    assert parser.receive(client_frame(1, b"more")) == []  # nothing after the error


def test_too_big_is_refused_from_the_header_never_buffered() -> None:
    parser = ClientFrames(max_message=1000)
    header = client_frame(2, b"x" * 5000)[:8]  # 126-length header + mask, no payload yet
    events = parser.receive(header)
    assert events == [ProtocolClose(1009, "message too big")]
    fragments = ClientFrames(max_message=1000)
    events = fragments.receive(
        client_frame(1, b"a" * 600, fin=False) + client_frame(0, b"b" * 600, fin=False)
    )
    assert isinstance(events[-1], ProtocolClose) and events[-1].code == 1009
    assert fragments.parts is None


def test_server_frames_parse_with_wsproto() -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(
        server_frame(1, b"x" * 70_000)
        + server_frame(Opcode.PING, b"")
        + server_frame(Opcode.CLOSE, close_payload(4008, "é" * 100))
    )
    events = list(client.events())
    assert isinstance(events[0], Message) and len(events[0].data) == 70_000
    assert isinstance(events[1], Ping)
    assert isinstance(events[2], CloseConnection) and events[2].code == 4008
    assert len(events[2].reason.encode()) <= 123  # cut to fit, on a whole character


# ------------------------------------------------------------ over sockets, against a session


async def _closed_with(peer: Peer) -> int:
    while True:
        for event in await peer.frames(1):
            if isinstance(event, CloseConnection):
                return event.code


@pytest.mark.parametrize(("data", "code"), [*BAD[:3], BAD[13], (client_frame(2, b"x" * 70), 1009)])
async def test_a_bad_frame_closes_its_session_and_the_other_is_served(
    data: bytes, code: int
) -> None:
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, max_frame_bytes=64))
    with trio.fail_after(10):
        async with running(ctx, "bad") as (bad, bad_peer), running(ctx, "good") as (good, peer):
            await bad_peer.frames(1)  # welcome
            await peer.frames(1)
            await bad_peer.sock.send(data)
            assert await _closed_with(bad_peer) == code
            await peer.sock.send(wsproto_client_bytes(TextMessage('{"type":"ping"}')))
            (pong,) = await peer.frames(1)
            assert isinstance(pong, TextMessage) and '"pong"' in pong.data
            assert good.close_request is None
            assert bad.close_request is not None and bad.close_request.code == code


async def test_a_websocket_ping_is_answered_and_a_client_close_is_echoed() -> None:
    with trio.fail_after(10):
        async with running(context()) as (session, peer):
            await peer.frames(1)
            await peer.sock.send(wsproto_client_bytes(Ping(b"hello")))
            await peer.sock.send(wsproto_client_bytes(CloseConnection(1000, "done")))
            events = await peer.frames(1)
            while not any(isinstance(e, CloseConnection) for e in events):
                events += await peer.frames(1)
    assert any(getattr(e, "payload", None) == b"hello" for e in events), events  # the pong
    assert session.close_request is not None and session.close_request.code == Close.NORMAL


# ------------------------------------------------------------ the session's task structure


async def test_helpers_open_the_nursery_on_demand_and_it_closes_after_them() -> None:
    """An idle session has no nursery; a spawned helper opens it, its end closes it again."""
    with trio.fail_after(10):
        async with running(context()) as (session, peer):
            await peer.frames(1)
            await trio.sleep(0.05)
            assert session.nursery is None and session.tasks == 0
            release = trio.Event()
            seen: list[trio.Nursery | None] = []

            async def helper() -> None:
                seen.append(session.nursery)
                await release.wait()

            assert session.spawn(helper)
            await trio.sleep(0.05)
            assert seen and seen[0] is not None and session.tasks == 1
            release.set()
            await trio.sleep(0.05)
            assert session.nursery is None and session.tasks == 0
            await peer.sock.send(wsproto_client_bytes(TextMessage('{"type":"ping"}')))
            assert '"pong"' in (await peer.frames(1))[0].data  # still served


async def test_cancelling_a_session_with_a_helper_finishes_it_and_reports_its_end() -> None:
    ended: list[Session] = []
    ctx = context()
    object.__setattr__(ctx, "on_end", ended.append)
    server, client = trio.socket.socketpair()
    session = live(Session(ctx, "u", "d", expires_at=2e9))
    session.open(Wire(trio.SocketStream(server)), '{"type":"welcome"}', {})
    cancelled = trio.Event()

    async def helper() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    peer = Peer(client, Connection(ConnectionType.CLIENT))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            session.spawn(helper)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()  # a node shutdown
        events = await peer.frames(2)
    assert cancelled.is_set() and ended == [session]
    assert isinstance(events[-1], CloseConnection) and events[-1].code == Close.GOING_AWAY
    client.close()


async def test_a_client_that_only_answers_pings_stays_connected() -> None:
    """Pongs carry no event, but they are traffic: the heartbeat timeout never fires."""
    ctx = context(Limits(heartbeat_interval=0.1, heartbeat_timeout=0.5))
    with trio.fail_after(10):
        async with running(ctx) as (session, peer):
            end = trio.current_time() + 1.5  # three heartbeat timeouts
            pings = 0
            while trio.current_time() < end:
                for event in await peer.frames(1):
                    if isinstance(event, Ping):
                        pings += 1
                        await peer.sock.send(peer.proto.send(event.response()))
            assert session.close_request is None and pings >= 5
