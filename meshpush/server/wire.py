"""The node's WebSocket server connections: no per-connection task, no per-connection wsproto.

* :class:`Upgrade` reads one HTTP upgrade request (h11 limits, through wsproto's
  ``H11Handshake``) and answers it: ``reject`` (HTTP status + JSON body) or ``accept``, which
  returns a :class:`Wire` and drops the HTTP machinery.
* :class:`Wire` is one open WebSocket: its client frames are parsed by
  ``frames.ClientFrames`` (``receive``; or, on plain TCP, ``read`` once the owner saw the fd
  readable, so an idle owner waits on the fd itself); writes take *already encoded* frames
  (``encode_text``: a server frame is never masked, so one ``bytes`` object serves every
  session it goes to).
* Writes on a plain TCP socket go straight to the kernel (``os.writev`` on the nonblocking fd,
  no await, no task) when it has room; only what does not fit is kept, and the owner drains it
  when the socket is writable (``send_buffered``). Over TLS the frame bytes are still shared,
  encryption is per connection through ``trio.SSLStream``: those writes are always buffered and
  drained by the owner, in order.

The ordering rule lives in the owner (``sessions.Session``): once anything is buffered, every
later frame goes behind it, so frames never interleave or reorder.
"""

from __future__ import annotations

import os
from collections import deque
from typing import cast

import trio
from wsproto import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from meshpush.core import upgrade
from meshpush.core.frames import (
    ABNORMAL,
    MAX_MESSAGE,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ClientFrames,
    ProtocolClose,
    close_payload,
    server_frame,
)

RECEIVE_BYTES = 65536
IOV_MAX = 64  # frames per writev call


class HandshakeFailed(Exception):
    """The peer closed, or sent something that is not a WebSocket upgrade request."""


def encode_text(text: str) -> bytes:
    """One complete, unmasked WebSocket text frame (RFC 6455 §5.2) carrying ``text``."""
    return server_frame(OP_TEXT, text.encode())


def _plain_fd(stream: trio.abc.Stream) -> int:
    """The socket's fd if ``stream`` is plain TCP (fast path), else -1 (TLS: buffered)."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    return -1


_DONE = H11Handshake(ConnectionType.SERVER)  # stands in for a finished handshake (shared)


class Upgrade:
    """An HTTP upgrade request read from a fresh connection, not answered yet."""

    __slots__ = ("_handshake", "_head", "request", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream,
        handshake: H11Handshake | None,
        request: Request,
        head: bytes = b"",
    ):
        self.stream = stream
        self._handshake = handshake  # None: read by the fast path (``upgrade.parse``) ...
        self._head = head  # ... from these bytes (for h11, should a refusal need it)
        self.request = request

    @property
    def target(self) -> str:
        return self.request.target

    def header(self, name: bytes) -> str | None:
        for key, value in self.request.extra_headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @classmethod
    async def read(cls, stream: trio.abc.Stream) -> Upgrade:
        """Read until a complete upgrade request; raises :class:`HandshakeFailed`. The common
        request, whole in the first read, is parsed without h11 (``upgrade.parse``)."""
        handshake: H11Handshake | None = None
        fd = _plain_fd(stream)
        while True:
            data = await _receive(stream, fd)
            if not data:
                raise HandshakeFailed("peer closed during the handshake")
            if handshake is None:
                fast = upgrade.parse(bytes(data))
                if fast is not None:
                    return cls(stream, None, fast, bytes(data))
                handshake = H11Handshake(ConnectionType.SERVER)
            try:
                handshake.receive_data(cast(bytes, data))
                for event in handshake.events():
                    if isinstance(event, Request):
                        return cls(stream, handshake, event)
            except RemoteProtocolError as exc:
                await _answer_bad_request(stream, handshake, exc)
                raise HandshakeFailed(str(exc)) from None

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        handshake = self._handshake or _h11_after(self._head)
        data = handshake.send(RejectConnection(status, headers, has_body=True))
        data += handshake.send(RejectData(body, body_finished=True))
        await self.stream.send_all(data)

    async def accept(self, first: bytes = b"") -> Wire:
        """Answer 101, followed by the encoded frame(s) ``first`` (the welcome) in the same
        write; the HTTP machinery (h11) is dropped, only the frame parser stays. On plain TCP
        the answer goes straight to the kernel (no await) when it takes it all, as it does
        on a fresh connection; the rest, and TLS, through the stream."""
        if self._handshake is None:  # the fast path's request: the same answer, no h11
            data = upgrade.accept_response(self.request)
        else:
            data = self._handshake.send(AcceptConnection())
        # the HTTP machinery and its wsproto Connection are dropped: ClientFrames parses frames
        self._handshake, self._head = _DONE, b""
        data += first
        wire = Wire(self.stream)
        sent = wire.try_send(data)
        if sent < len(data):
            await self.stream.send_all(data[sent:])
        return wire


async def _receive(stream: trio.abc.Stream, fd: int) -> bytes | bytearray:
    """The next bytes of ``stream`` (b"": EOF); plain TCP (``fd`` >= 0) reads the fd directly,
    without a scheduler round trip when the bytes are there already. Raises OSError (or a
    trio resource error) when the connection is broken."""
    if fd < 0:
        return await stream.receive_some(RECEIVE_BYTES)
    while True:
        try:
            return os.read(fd, RECEIVE_BYTES)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


def _h11_after(head: bytes) -> H11Handshake:
    """An h11 handshake that has read ``head`` (to answer a fast-path request with a refusal)."""
    handshake = H11Handshake(ConnectionType.SERVER)
    handshake.receive_data(head)
    for _ in handshake.events():
        pass
    return handshake


async def _answer_bad_request(
    stream: trio.abc.Stream, handshake: H11Handshake, exc: RemoteProtocolError
) -> None:
    """A request that is no WebSocket upgrade gets the 4xx wsproto suggests (else nothing)."""
    hint = exc.event_hint
    if not isinstance(hint, RejectConnection):
        return
    try:
        data = handshake.send(RejectConnection(hint.status_code or 400, list(hint.headers)))
    except Exception:  # wsproto may refuse to answer in its state: then just hang up
        return
    await stream.send_all(data)


OPEN, LOCAL_CLOSING, REMOTE_CLOSING, CLOSED = range(4)  # Wire.state


class Wire:
    """One open WebSocket connection (server side)."""

    __slots__ = ("fd", "frames", "state", "stream")

    def __init__(self, stream: trio.abc.Stream, max_message: int = MAX_MESSAGE) -> None:
        self.stream = stream
        self.frames = ClientFrames(max_message)
        self.state = OPEN
        self.fd = _plain_fd(stream)

    @property
    def fast(self) -> bool:
        return self.fd >= 0

    # ------------------------------------------------------------ reading

    async def receive(self) -> list[Event]:
        """Wait for bytes; the events they complete (EOF: a 1006 CloseConnection)."""
        if self.fd < 0:
            return self.feed(cast(bytes, await self.stream.receive_some(RECEIVE_BYTES)))
        await trio.lowlevel.wait_readable(self.fd)
        return self.read() or []

    def read(self) -> list[Event] | None:
        """Plain TCP, once the fd is readable: read it directly, without waiting; None if
        nothing was there (a spurious wake-up). Raises OSError when the connection is broken."""
        try:
            data = os.read(self.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return None
        return self.feed(data)

    def feed(self, data: bytes) -> list[Event]:
        """The events that received ``data`` completes (``b""``: EOF)."""
        if self.state == CLOSED:
            return []
        events = self.frames.receive(data)
        for event in events:
            if isinstance(event, CloseConnection) and not isinstance(event, ProtocolClose):
                if event.code == ABNORMAL or self.state != OPEN:
                    self.state = CLOSED  # EOF, or the client's answer to our close
                else:
                    self.state = REMOTE_CLOSING
        return events

    @property
    def remote_closing(self) -> bool:
        return self.state == REMOTE_CLOSING

    # ------------------------------------------------------------ control frames

    def ping_frame(self) -> bytes:
        return server_frame(OP_PING, b"")

    def pong_frame(self, ping: Ping) -> bytes:
        """The answer to a client's ping (b"" once our close was sent; a client close read in
        the same batch after the ping does not stop it)."""
        if self.state not in (OPEN, REMOTE_CLOSING):
            return b""
        return server_frame(OP_PONG, bytes(ping.payload))

    def close_frame(self, code: int, reason: str) -> bytes:
        """The close frame (or b"" if one was sent already); answers a client's close too."""
        if self.state not in (OPEN, REMOTE_CLOSING):
            return b""
        self.state = LOCAL_CLOSING if self.state == OPEN else CLOSED
        return server_frame(OP_CLOSE, close_payload(code, reason))

    # ------------------------------------------------------------ writing

    def try_send(self, data: bytes) -> int:
        """Bytes of ``data`` the kernel took now, without waiting (0 over TLS or when full).

        Raises OSError when the connection is broken."""
        if self.fd < 0:
            return 0
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    async def send_buffered(self, frames: deque[bytes]) -> tuple[int, int]:
        """Wait until the socket takes some of the frames at the head of ``frames`` and remove
        what was written (a partly written frame keeps its rest at the head). Returns (whole
        frames, bytes) written. Raises OSError or a trio resource error when broken."""
        if self.fd < 0:
            count = len(frames)
            chunk = b"".join(frames)
            frames.clear()
            await self.stream.send_all(chunk)
            return count, len(chunk)
        await trio.lowlevel.wait_writable(self.fd)
        head = [frames[i] for i in range(min(IOV_MAX, len(frames)))]
        try:
            written = os.writev(self.fd, head)
        except BlockingIOError:
            return 0, 0
        before = len(frames)
        _consume(frames, written)
        return before - len(frames), written

    async def goodbye(self, timeout: float) -> None:
        """After our close frame: let the client answer (or hang up), then close the socket."""
        with trio.move_on_after(timeout):
            while self.state != CLOSED and not self.frames.failed:
                data = cast(bytes, await self.stream.receive_some(RECEIVE_BYTES))
                if not data:
                    break
                self.feed(data)
        await self.stream.aclose()


def _consume(frames: deque[bytes], written: int) -> None:
    while written and frames:
        head = frames[0]
        if written >= len(head):
            frames.popleft()
            written -= len(head)
        else:
            frames[0] = head[written:]
            written = 0
