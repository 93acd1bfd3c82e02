"""The node's lean HTTP/1.1 server (meshpush/server/http.py) over real sockets on 127.0.0.1:
keep-alive, pipelining, chunked bodies, bounds (413, 431, 503), timeouts (408), JSON errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from meshpush.server.http import HttpServer, JSONResponse, Request, Response, Routes, parse_head

MAX_BODY = 1000


async def echo(request: Request) -> Response:
    return JSONResponse(
        {"method": request.method, "body": request.body.decode(), "q": request.query_params}
    )


async def boom(request: Request) -> Response:
    raise RuntimeError("a bug")


def routes() -> Routes:
    r = Routes()
    r.add("/echo", ["POST", "GET"], echo)
    r.add("/boom", ["GET"], boom)
    return r


@pytest.fixture
async def port(nursery: trio.Nursery) -> AsyncIterator[int]:
    server = HttpServer(
        routes(), max_body=MAX_BODY, max_connections=4, request_timeout=0.5, idle_timeout=0.5
    )
    yield await nursery.start(server.run, "127.0.0.1", 0)


async def exchange(port: int, raw: bytes, until_close: bool = True) -> bytes:
    """Send ``raw``; read until the server closes (at most 5 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
                if not until_close and data.endswith(b"}"):
                    break
        return data


def answers(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(status, JSON body) of each response in ``data``."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = int(
            next(h for h in head.split(b"\r\n") if h.startswith(b"content-length")).split(b":")[1]
        )
        out.append((status, json.loads(rest[:length])))
        data = rest[length:]
    return out


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /echo HTTP/1.1\r\nHost: x\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


async def test_keep_alive_and_pipelining_answer_in_order(port: int) -> None:
    raw = post(b"one") + post(b"two") + b"GET /echo?a=1&a=2 HTTP/1.1\r\nconnection: close\r\n\r\n"
    got = answers(await exchange(port, raw))
    assert [(s, b["body"]) for s, b in got] == [(200, "one"), (200, "two"), (200, "")]
    assert got[2][1]["q"] == {"a": "2"}


async def test_a_client_library_reuses_its_connection(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for i in range(3):
            resp = await http.post("/echo", content=f"m{i}".encode())
            assert resp.json()["body"] == f"m{i}"
        head = await http.head("/echo")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0


async def test_chunked_bodies_are_read(port: int) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n"
    )
    assert answers(await exchange(port, raw)) == [
        (200, {"method": "POST", "body": "abcde", "q": {}})
    ]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /nope HTTP/1.1\r\nconnection: close\r\n\r\n", 404, "not_found"),
        (b"DELETE /echo HTTP/1.1\r\nconnection: close\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /boom HTTP/1.1\r\nconnection: close\r\n\r\n", 500, "internal_error"),
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /echo HTTP/1.1\r\nbad header\r\n\r\n", 400, "bad_request"),
        (b"GET /echo HTTP/1.1\r\n folded: x\r\n\r\n", 400, "bad_request"),
        (b"GET http://x/echo HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"POST /echo HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400, "bad_request"),
        (
            b"POST /echo HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /echo HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"POST /echo HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501, "not_implemented"),
        (b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request"),
        (b"GET /echo HTTP/1.1\r\nx: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
    ],
)
async def test_every_error_is_json_and_documented(
    port: int, raw: bytes, status: int, code: str
) -> None:
    [(got, body)] = answers(await exchange(port, raw))
    assert (got, body["error"]) == (status, code)
    assert isinstance(body["detail"], str) and body["detail"]


async def test_a_body_over_the_limit_is_413_and_read_not_reset(port: int) -> None:
    big = b"x" * (MAX_BODY * 50)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        resp = await http.post("/echo", content=big)
        assert (resp.status_code, resp.json()["error"]) == (413, "too_large")

        async def parts() -> AsyncIterator[bytes]:
            yield big[:600]
            yield big[:600]

        chunked = await http.post("/echo", content=parts())
        assert (chunked.status_code, chunked.json()["error"]) == (413, "too_large")


async def test_a_slow_request_gets_408_and_an_idle_connection_is_closed(port: int) -> None:
    [(status, body)] = answers(
        await exchange(port, b"POST /echo HTTP/1.1\r\ncontent-length: 5\r\n\r\nab")
    )
    assert (status, body["error"]) == (408, "request_timeout")
    assert await exchange(port, b"") == b""  # idle: closed after idle_timeout, quietly


async def slow(request: Request) -> Response:
    await trio.sleep(1.0)  # twice the idle timeout: handling a request is not being idle
    return JSONResponse({"slow": True})


async def test_a_handler_slower_than_the_idle_timeout_is_answered_then_idle_closes(
    nursery: trio.Nursery,
) -> None:
    r = routes()
    r.add("/slow", ["GET"], slow)
    server = HttpServer(r, max_body=MAX_BODY, request_timeout=0.5, idle_timeout=0.5)
    port = await nursery.start(server.run, "127.0.0.1", 0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        sent = trio.current_time()
        await stream.send_all(b"GET /slow HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
        assert answers(data) == [(200, {"slow": True})]
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""  # idle, then closed quietly
        closed = trio.current_time() - sent
    assert closed >= 1.0 + 0.5  # the handler's second, then the whole idle timeout


async def test_connections_are_bounded(port: int) -> None:
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
    try:
        await trio.sleep(0.05)
        data = await exchange(port, b"GET /echo HTTP/1.1\r\n\r\n")
        [(status, body)] = answers(data)
        assert (status, body["error"]) == (503, "too_many_connections")
        assert b"\r\nretry-after: 1\r\n" in data.lower()
    finally:
        for stream in held:
            await stream.aclose()
    await trio.sleep(0.05)
    [(status, _)] = answers(
        await exchange(port, b"GET /echo HTTP/1.1\r\nconnection: close\r\n\r\n")
    )
    assert status == 200


async def test_http_1_0_closes_unless_asked_to_keep_alive(port: int) -> None:
    got = await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert b"connection: close" in got and answers(got)[0][0] == 200


def test_parse_head_lowercases_names_and_joins_repeats() -> None:
    method, path, query, http11, headers = parse_head(
        b"GET /a%20b?x=1 HTTP/1.1\r\nAccept: a\r\naccept: b\r\nAuthorization:  Bearer k "
    )
    assert (method, path, query, http11) == ("GET", "/a b", "x=1", True)
    assert headers == {"accept": "a, b", "authorization": "Bearer k"}


async def test_a_client_that_never_reads_its_answer_is_dropped(nursery: trio.Nursery) -> None:
    """An answer the client does not take within request_timeout ends its connection (the
    only connection slot here), so others are served again."""

    async def big(request: Request) -> Response:
        return JSONResponse({"x": "a" * 20_000_000})

    r = routes()
    r.add("/big", ["GET"], big)
    server = HttpServer(r, max_body=MAX_BODY, max_connections=1, request_timeout=0.5)
    port = await nursery.start(server.run, "127.0.0.1", 0)
    stalled = await trio.open_tcp_stream("127.0.0.1", port)
    await stalled.send_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")  # never read
    statuses = []
    with trio.fail_after(10):
        while 200 not in statuses:
            data = await exchange(port, b"GET /echo HTTP/1.1\r\nconnection: close\r\n\r\n")
            statuses += [status for status, _ in answers(data)]
            await trio.sleep(0.1)
    assert statuses[-1] == 200
    await stalled.aclose()


async def test_an_answer_larger_than_the_socket_buffer_arrives_whole(
    nursery: trio.Nursery,
) -> None:
    """An answer is written straight to the socket and what the kernel does not take at once
    goes through the stream: a slow reader still gets every byte, in order, and the same
    connection serves its next request."""
    text = "".join(chr(0x61 + i % 26) for i in range(1000)) * 3000  # 3 MB: not one write

    async def big(request: Request) -> Response:
        return JSONResponse({"x": text})

    r = routes()
    r.add("/big", ["GET"], big)
    server = HttpServer(r, max_body=MAX_BODY, request_timeout=5.0)
    port = await nursery.start(server.run, "127.0.0.1", 0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        await trio.sleep(0.2)  # the server's first write fills the socket buffers
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b"}"):
                data += await stream.receive_some(65536)
        [(status, body)] = answers(data)
        assert status == 200 and body == {"x": text}
        await stream.send_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while not data.endswith(b"}"):
                data += await stream.receive_some(65536)
        assert answers(data) == [(200, {"method": "GET", "body": "", "q": {}})]
