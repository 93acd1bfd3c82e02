"""The upgrade request's fast path (``meshpush.core.upgrade``): the same request and the same 101
as wsproto's h11 handshake for the common shape, and the h11 way for everything else."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

from meshpush.core import upgrade
from meshpush.server.wire import Upgrade

HEAD = (
    b"GET /ws?token=abc.def.ghi&device=phone%201&last=7 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: https://app.example\r\n"
    b"Authorization: Bearer  tok \r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Sec-WebSocket-Protocol: a, b\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"\r\n"
)


def _h11(head: bytes) -> tuple[H11Handshake, Request]:
    handshake = H11Handshake(ConnectionType.SERVER)
    handshake.receive_data(head)
    [request] = [e for e in handshake.events() if isinstance(e, Request)]
    return handshake, request


def test_the_common_request_is_what_wsproto_reads_and_the_101_what_it_writes() -> None:
    handshake, expected = _h11(HEAD)
    fast = upgrade.parse(HEAD)
    assert fast == expected
    assert upgrade.accept_response(fast) == handshake.send(AcceptConnection())


def _replace(old: bytes, new: bytes) -> bytes:
    assert old in HEAD
    return HEAD.replace(old, new)


@pytest.mark.parametrize(
    "head",
    [
        HEAD[:-2],  # incomplete
        HEAD + b"\x81\x00",  # bytes after the request
        HEAD + HEAD,
        _replace(b"GET ", b"POST "),
        _replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"),
        _replace(b"GET /ws", b"GET  /ws"),
        _replace(b"Host: 127.0.0.1:8080\r\n", b""),
        _replace(b"Host: 127.0.0.1:8080\r\n", b"Host: a\r\nHost: b\r\n"),
        _replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
        _replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"),
        _replace(b"Connection: keep-alive, Upgrade", b"Connection: keep-alive"),
        _replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        _replace(b"Origin: https://app.example", b"Origin: https://\xc3\xa9.example"),
        _replace(b"Origin: https://app.example", b"Origin: a\x00b"),
        _replace(b"User-Agent:", b" User-Agent:"),
        _replace(b"User-Agent: Mozilla", b"User Agent: Mozilla"),
        _replace(b"Origin: https://app.example\r\n", b"Origin: x\r\n folded\r\n"),
        _replace(b"Origin: https://app.example\r\n", b"Content-Length: 5\r\n"),
        _replace(b"Origin: https://app.example\r\n", b"Transfer-Encoding: chunked\r\n"),
        _replace(b"Origin: https://app.example\r\n", b"NoColon\r\n"),
        _replace(b"Origin: https://app.example", b"X-Big: " + b"x" * upgrade.MAX_HEAD),
    ],
)
def test_anything_else_goes_the_h11_way(head: bytes) -> None:
    assert upgrade.parse(head) is None


async def _serve_one(head: bytes, answer: str) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(head)
    request = await Upgrade.read(server)
    assert request.target.startswith("/ws?token=") and request.header(b"origin")
    if answer == "accept":
        await request.accept()
    else:
        await request.reject(403, [(b"content-type", b"application/json")], b"{}")
    return bytes(await client.receive_some(65536))


async def test_a_fast_path_request_is_accepted_or_refused_like_any_other() -> None:
    accepted = await _serve_one(HEAD, "accept")
    assert accepted.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accepted
    refused = await _serve_one(HEAD, "reject")
    assert refused.startswith(b"HTTP/1.1 403 ") and refused.endswith(b"\r\n\r\n{}")


async def test_a_request_in_pieces_still_goes_through_h11() -> None:
    client, server = trio.testing.memory_stream_pair()

    async def trickle() -> None:
        for i in range(0, len(HEAD), 50):
            await client.send_all(HEAD[i : i + 50])
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        request = await Upgrade.read(server)
    assert request.request == _h11(HEAD)[1]
    await request.accept()
    assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 101 ")


async def _accept_with_first(server: trio.abc.Stream, client: trio.abc.Stream) -> bytes:
    await client.send_all(HEAD)
    request = await Upgrade.read(server)
    wire = await request.accept(b"\x81\x02hi")  # the welcome frame, with the 101
    assert wire.stream is server
    expected = upgrade.accept_response(request.request) + b"\x81\x02hi"
    data = b""
    with trio.fail_after(5):
        while len(data) < len(expected):
            data += bytes(await client.receive_some(65536))
    assert data == expected
    return data


async def test_the_first_frame_goes_out_with_the_101_on_tcp_and_on_a_stream() -> None:
    a, b = trio.socket.socketpair()
    async with trio.SocketStream(a) as server, trio.SocketStream(b) as client:
        await _accept_with_first(server, client)  # plain fd: written straight to the kernel
    client_mem, server_mem = trio.testing.memory_stream_pair()
    await _accept_with_first(server_mem, client_mem)  # no fd (as over TLS): send_all


@pytest.mark.parametrize(
    "host", [b"127.0.0.1:8080", b"xn--bcher-kva.example", b"[::1]:80", b"push.example"]
)
def test_the_host_is_decoded_as_wsproto_does_also_when_remembered(host: bytes) -> None:
    head = HEAD.replace(b"Host: 127.0.0.1:8080", b"Host: " + host)
    for _ in range(2):  # the second time from upgrade's memory of Host values
        assert upgrade.parse(head) == _h11(head)[1]
    assert len(upgrade._HOSTS) <= upgrade.MAX_HOSTS
