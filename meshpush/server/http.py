"""A lean HTTP/1.1 server for the node's API, on trio: no framework, no ASGI on the hot path.

Why not hypercorn + Starlette: they cost ~1 ms of CPU per request here (ASGI wrappers, h11,
middleware, per-request task groups), a third of a node's CPU per single publish; this server
parses a request in a few µs (docs/decisions.md, docs/performance.md).

* HTTP/1.1 keep-alive (and HTTP/1.0 ``Connection: keep-alive``), pipelined requests answered
  in order; ``Content-Length`` and ``chunked`` bodies; ``Expect: 100-continue``.
* Bounded: at most ``max_connections`` open connections (503 above), request heads up to
  ``MAX_HEAD`` bytes (431), bodies up to ``max_body`` bytes (413, the body is drained within
  the request timeout so the client reads the answer rather than a reset), a request must
  arrive whole within ``request_timeout`` (408) and an idle keep-alive connection is closed
  after ``idle_timeout`` (at most ``min(IDLE_TICK, idle_timeout / 4)`` later: one task ends
  the idle connections, rather than a deadline moved twice per request).
* Every error is JSON ``{"error", "detail"}``: a malformed request 400 ``bad_request``, an
  unknown path 404 ``not_found``, a wrong method 405 ``method_not_allowed`` (with ``Allow``),
  an unexpected exception 500 ``internal_error`` (logged).
* :class:`Routes` is also an ASGI application (:meth:`Routes.asgi`), so tests can drive the
  same handlers through ``httpx.ASGITransport`` without a socket.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import trio

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
RECEIVE = 65536
IDLE_TICK = 1.0  # seconds between two looks for idle connections (at most)
REASONS = {s.value: s.phrase for s in HTTPStatus}
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "too_many_connections",
}
#: ``json.dumps(x, ensure_ascii=False, allow_nan=False, separators=(",", ":"))`` without
#: building an encoder per call (``dumps`` with arguments does)
compact_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class URL:
    __slots__ = ("path", "query")

    def __init__(self, path: str, query: str) -> None:
        self.path, self.query = path, query


class Request:
    """One request, its body already read (bounded)."""

    __slots__ = ("_query", "body", "headers", "method", "url")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.url = URL(path, query)
        self.headers = headers  # names in lower case
        self.body = body
        self._query: dict[str, str] | None = None

    @property
    def query_params(self) -> dict[str, str]:
        """The query string's parameters (the last value of a repeated name wins)."""
        if self._query is None:
            self._query = dict(parse_qsl(self.url.query, keep_blank_values=True))
        return self._query


class Response:
    __slots__ = ("body", "headers", "media_type", "status_code")

    def __init__(
        self,
        content: bytes | str = b"",
        status_code: int = 200,
        media_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = content.encode() if isinstance(content, str) else content
        self.status_code = status_code
        self.media_type = media_type
        self.headers = headers or {}


class JSONResponse(Response):
    __slots__ = ()

    def __init__(
        self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        body = compact_json(content)
        super().__init__(body.encode(), status_code, "application/json", headers)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    code = ERROR_CODES.get(status, f"http_{status}")
    return JSONResponse({"error": code, "detail": detail}, status, headers)


def render(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    """The response's bytes on the wire (``Content-Length`` framing)."""
    status = response.status_code
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
        f"content-type: {response.media_type}\r\ncontent-length: {len(response.body)}\r\n"
    ]
    lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
    if not keep_alive:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head if head_only else head + response.body


Handler = Callable[[Request], Awaitable[Response]]


class Routes:
    """Exact paths → methods → handlers; HEAD is answered wherever GET is."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Handler]] = {}

    def add(self, path: str, methods: Iterable[str], handler: Handler) -> None:
        table = self._paths.setdefault(path, {})
        for method in methods:
            table[method] = handler
            if method == "GET":
                table.setdefault("HEAD", handler)

    async def dispatch(self, request: Request) -> Response:
        """The handler's response, or a JSON 404/405/500."""
        table = self._paths.get(request.url.path)
        if table is None:
            return error_response(404, "Not Found")
        handler = table.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(table))
            return error_response(405, "Method Not Allowed", {"allow": allow})
        try:
            return await handler(request)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return error_response(500, "unexpected server error")

    def asgi(self, max_body: int) -> Callable[..., Awaitable[None]]:
        """The same routes as an ASGI 3 application (for in-process tests)."""

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            chunks, size, more = [], 0, True
            while more and size <= max_body:
                message = await receive()
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            query = scope.get("query_string", b"").decode("latin-1")
            request = Request(scope["method"], scope["path"], query, headers, b"".join(chunks))
            if size > max_body:
                response = error_response(413, f"body larger than {max_body} bytes")
            else:
                response = await self.dispatch(request)
            raw = [(b"content-type", response.media_type.encode())]
            raw.append((b"content-length", str(len(response.body)).encode()))
            raw += [(k.encode(), v.encode()) for k, v in response.headers.items()]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": raw}
            )
            await send({"type": "http.response.body", "body": response.body})

        return app


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def parse_head(head: bytes) -> tuple[str, str, str, bool, dict[str, str]]:
    """(method, path, query, HTTP/1.1?, headers) of a request head, or BadRequest."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method = parts[0]
    if not method or not _TOKEN.issuperset(method):
        raise BadRequest(400, "malformed method")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise BadRequest(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host", "transfer-encoding"):
                raise BadRequest(400, f"repeated {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text
    target = parts[1].decode("latin-1")
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be a path")
    path, _, query = target.partition("?")
    return method.decode("ascii"), unquote(path), query, parts[2] == b"HTTP/1.1", headers


def _keep_alive(http11: bool, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    return "close" not in connection if http11 else "keep-alive" in connection


def _buffered(buf: bytearray, max_body: int) -> tuple[Request, bool] | None:
    """The first request in ``buf`` (taken out of it) if it is there whole with a
    ``Content-Length`` body or none; None for anything else (the timed, general path)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD or buf.startswith(b"\r\n"):
        return None
    method, path, query, http11, headers = parse_head(bytes(buf[:end]))
    length = headers.get("content-length", "0")
    if "transfer-encoding" in headers or not (length.isdigit() and length.isascii()):
        return None
    n, start = int(length), end + 4
    if n > max_body or len(buf) < start + n:
        return None
    body = bytes(buf[start : start + n])
    del buf[: start + n]
    return Request(method, path, query, headers, body), _keep_alive(http11, headers)


class _Conn:
    """One connection's buffered reads and its answers (bounded by its guard: the server's
    idle sweeper, the request timeout, the answer timeout).

    On a plain TCP connection (``fd`` >= 0) reads wait for the socket first and then read
    (a keep-alive client's next request is rarely there already: trio's ``receive_some``
    tries a ``recv`` that fails first), and an answer is written straight to the socket;
    only what the kernel does not take at once goes through ``send_all`` under the answer
    timeout. Each of trio's socket calls that succeeds also yields to the scheduler: two
    scheduler turns and two deadline moves per request less (docs/performance.md,
    "Single-publish CPU")."""

    def __init__(self, stream: trio.abc.Stream, guard: trio.CancelScope) -> None:
        self.stream = stream
        self.guard = guard  # cancelled: idle too long, or an answer not taken
        self.idle_until = math.inf  # while it waits for a request: when it is idle too long
        self.buf = bytearray()
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def fill(self) -> None:
        if self.fd < 0:
            data = await self.stream.receive_some(RECEIVE)
        else:
            data = await self._read_socket()
        if not data:
            raise EOFError
        self.buf += data

    async def _read_socket(self) -> bytes:
        while True:  # bounded by the guard or the caller's timeout; a spurious wake-up loops
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, RECEIVE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def send(self, data: bytes, timeout: float) -> None:
        """Send an answer; a client that does not take it within ``timeout`` cancels the
        connection's guard."""
        if self.fd >= 0:
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        self.guard.deadline = trio.current_time() + timeout
        await self.stream.send_all(data)
        self.guard.deadline = math.inf

    async def line(self, limit: int) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > limit:
                raise BadRequest(400, "chunk line too long")
            await self.fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            size_text = (await self.line(1024)).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(400, "malformed chunk size") from None
            if size < 0:
                raise BadRequest(400, "malformed chunk size")
            if size == 0:
                while await self.line(MAX_HEAD):  # trailer fields, ignored
                    pass
                return bytes(body)
            if len(body) + size > limit:
                raise BadRequest(413, f"body larger than {limit} bytes")
            body += await self.exactly(size)
            if await self.exactly(2) != b"\r\n":
                raise BadRequest(400, "malformed chunk")


class HttpServer:
    """Serves ``routes`` on one TCP port (optionally TLS); see the module docstring."""

    def __init__(
        self,
        routes: Routes,
        *,
        max_body: int,
        max_connections: int = 1024,
        request_timeout: float = 10.0,
        idle_timeout: float = 20.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = routes
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        self._slots = trio.Semaphore(max_connections)
        self._conns: set[_Conn] = set()
        self.requests = 0

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        bound = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_idle)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(bound)

    async def _close_idle(self) -> None:
        """End the connections that waited for a request longer than ``idle_timeout``."""
        tick = max(0.01, min(IDLE_TICK, self.idle_timeout / 4))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for conn in [c for c in self._conns if c.idle_until <= now]:
                conn.guard.cancel()

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._refuse(tcp)
            return
        try:
            stream: trio.abc.Stream = tcp
            if self.ssl_context is not None:
                stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
            await self._serve(stream)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        except OSError as exc:
            log.debug("HTTP connection failed: %r", exc)
        finally:
            self._slots.release()
            await trio.aclose_forcefully(tcp)

    async def _refuse(self, tcp: trio.SocketStream) -> None:
        with trio.move_on_after(1.0):
            try:
                refusal = error_response(503, "too many connections", {"retry-after": "1"})
                await tcp.send_all(render(refusal, False))
                await tcp.send_eof()
                while await tcp.receive_some(RECEIVE):  # let the client read the answer
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(tcp)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        """Serve requests until the connection ends. One cancel scope per connection ends it
        when it is idle too long (:meth:`_close_idle`) or an answer is not taken: two scopes
        entered and left per request were ~2% of a node's CPU at ~1,000 single publishes/s,
        and so were the two deadline moves per request that replaced them."""
        with trio.CancelScope() as guard:
            conn = _Conn(stream, guard)
            self._conns.add(conn)
            try:
                await self._requests(conn)
            finally:
                self._conns.discard(conn)

    async def _requests(self, conn: _Conn) -> None:
        while True:
            if not conn.buf:
                conn.idle_until = trio.current_time() + self.idle_timeout
                await conn.fill()
                conn.idle_until = math.inf
                if not conn.buf:
                    return
            failed: BadRequest | None = None
            try:  # usually the whole request is in the buffer already: no timer needed
                whole = _buffered(conn.buf, self.max_body)
            except BadRequest as exc:
                whole, failed = None, exc
            if whole is not None:
                request, keep_alive = whole
            elif failed is None:
                with trio.move_on_after(self.request_timeout) as timer:
                    try:
                        request, keep_alive = await self._read(conn)
                    except BadRequest as exc:
                        failed = exc
                if timer.cancelled_caught:
                    await conn.stream.send_all(
                        render(error_response(408, "request too slow"), False)
                    )
                    return
            if failed is not None:
                await self._fail(conn, failed)
                return
            self.requests += 1
            response = await self.routes.dispatch(request)
            answer = render(response, keep_alive, request.method == "HEAD")
            await conn.send(answer, self.request_timeout)
            if not keep_alive:
                return
            if conn.buf:  # pipelined requests: let others run between answers
                await trio.lowlevel.checkpoint()

    async def _fail(self, conn: _Conn, exc: BadRequest) -> None:
        """Answer a request that cannot be served, then close (after draining a 413's body
        for at most the request timeout, so the client reads the answer, not a reset)."""
        await conn.stream.send_all(render(error_response(exc.status, exc.detail), False))
        if exc.status == 413:
            with trio.move_on_after(self.request_timeout):
                while True:
                    conn.buf.clear()
                    await conn.fill()

    async def _read(self, conn: _Conn) -> tuple[Request, bool]:
        while (end := conn.buf.find(b"\r\n\r\n")) < 0:
            if len(conn.buf) > MAX_HEAD:
                raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
            await conn.fill()
        if end > MAX_HEAD:
            raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
        head = bytes(conn.buf[:end]).lstrip(b"\r\n")  # tolerate CRLFs between requests
        del conn.buf[: end + 4]
        method, path, query, http11, headers = parse_head(head)
        body = await self._body(conn, headers, http11)
        return Request(method, path, query, headers, body), _keep_alive(http11, headers)

    async def _body(self, conn: _Conn, headers: dict[str, str], http11: bool) -> bytes:
        length, coding = headers.get("content-length"), headers.get("transfer-encoding")
        if coding is not None:
            if length is not None:
                raise BadRequest(400, "both content-length and transfer-encoding")
            if coding.lower() != "chunked" or not http11:
                raise BadRequest(501, f"transfer-encoding {coding!r} is not supported")
            await self._continue(conn, headers)
            return await conn.chunked(self.max_body)
        if length is None:
            return b""
        if not length.isdigit() or not length.isascii():
            raise BadRequest(400, "malformed content-length")
        n = int(length)
        if n > self.max_body:
            raise BadRequest(413, f"body larger than {self.max_body} bytes")
        if n > len(conn.buf):
            await self._continue(conn, headers)
        return await conn.exactly(n)

    async def _continue(self, conn: _Conn, headers: dict[str, str]) -> None:
        if headers.get("expect", "").lower() == "100-continue" and not conn.buf:
            await conn.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
