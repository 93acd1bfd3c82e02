"""Client frames of an open WebSocket, parsed sans-IO (RFC 6455 §5), server side.

The node only ever *receives* a few small frames per session (acks, pings, an auth frame), so
it needs no general WebSocket machinery per connection: :class:`ClientFrames` is one slotted
object that holds nothing while no frame is half-received (no buffer, no event queue, no
extension list). It replaced wsproto's ``Connection`` on the node's server side, which costs
~2 KB per idle session (see docs/decisions.md). ``receive(data)`` returns the events the bytes
complete, as wsproto event objects (``TextMessage``, ``BytesMessage``, ``Ping``,
``CloseConnection``) so callers read the same events they did before:

* text and binary messages are delivered whole (fragments reassembled), text decoded as UTF-8;
* pings are delivered (the caller answers them), pongs only count as traffic;
* a client close frame is delivered with its code (1005 when it has none);
* EOF (``receive(b"")``) is a ``CloseConnection(1006)``;
* anything the RFC forbids ends the parse with one ``CloseConnection`` carrying the close code
  the server must send: 1002 (protocol error: unmasked frame, reserved bits or opcode,
  fragmented or oversized control frame, bad continuation, bad close payload), 1007 (text
  or close reason that is not UTF-8), 1009 (a message over ``max_message`` bytes — refused
  from its header, never buffered). After that, further bytes are ignored.
"""

from __future__ import annotations

import struct

from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage

MAX_MESSAGE = 1 << 20  # default bound of one client message (the session sets its own)
MAX_CONTROL = 125
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
PROTOCOL_ERROR, INVALID_DATA, TOO_BIG, NO_STATUS, ABNORMAL = 1002, 1007, 1009, 1005, 1006


class FrameError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ProtocolClose(CloseConnection):
    """Not a close frame from the client: a frame that broke the protocol (``code`` is the
    close code to answer with)."""


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (one big-int operation, not a byte loop)."""
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def valid_close_code(code: int) -> bool:
    """Codes a peer may send in a close frame (RFC 6455 §7.4; 1005/1006/1015 never are)."""
    if 1000 <= code <= 1014:
        return code not in (1004, 1005, 1006)
    return 3000 <= code <= 4999


class ClientFrames:
    """The parse state of one connection's client frames (pure; no I/O)."""

    __slots__ = ("buf", "failed", "max_message", "opcode", "parts", "size")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.buf = b""  # bytes of a frame not complete yet
        self.opcode = 0  # of the fragmented message in progress (0: none)
        self.parts: list[bytes] | None = None  # its fragments so far
        self.size = 0  # its bytes so far
        self.failed = False  # a protocol error or EOF was reported: ignore the rest

    def receive(self, data: bytes) -> list[Event]:
        """The events that ``data`` completes; ``b""`` means the peer closed the TCP stream."""
        if self.failed:
            return []
        if not data:
            self.failed = True
            self.buf, self.parts = b"", None
            return [CloseConnection(ABNORMAL)]
        if self.buf:
            data = self.buf + data
        events: list[Event] = []
        try:
            offset = self._parse(data, events)
        except FrameError as exc:
            self.failed = True
            self.buf, self.parts = b"", None
            events.append(ProtocolClose(exc.code, exc.reason))
            return events
        self.buf = data[offset:] if offset < len(data) else b""
        return events

    def _parse(self, data: bytes, events: list[Event]) -> int:
        """Parse whole frames from ``data``; returns where the first incomplete one starts."""
        offset, end = 0, len(data)
        while end - offset >= 2:
            b0, b1 = data[offset], data[offset + 1]
            if b0 & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
            length, head = b1 & 0x7F, offset + 2
            if length == 126:
                if end - head < 2:
                    break
                (length,) = struct.unpack_from("!H", data, head)
                head += 2
            elif length == 127:
                if end - head < 8:
                    break
                (length,) = struct.unpack_from("!Q", data, head)
                head += 8
                if length >> 63:
                    raise FrameError(PROTOCOL_ERROR, "frame length out of range")
            self._check_header(b0, length)
            start = head + 4
            if end - start < length:
                break  # wait for the rest (bounded: the header passed the size checks)
            payload = unmask(data[head:start], data[start : start + length])
            self._frame(b0 & 0x80, b0 & 0x0F, payload, events)
            offset = start + length
        return offset

    def _check_header(self, b0: int, length: int) -> None:
        opcode = b0 & 0x0F
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise FrameError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
            if not b0 & 0x80 or length > MAX_CONTROL:
                raise FrameError(PROTOCOL_ERROR, "fragmented or oversized control frame")
            return
        if opcode > OP_BINARY:
            raise FrameError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if opcode == OP_CONTINUATION and not self.opcode:
            raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
        if opcode != OP_CONTINUATION and self.opcode:
            raise FrameError(PROTOCOL_ERROR, "new message inside a fragmented one")
        if self.size + length > self.max_message:
            raise FrameError(TOO_BIG, "message too big")

    def _frame(self, fin: int, opcode: int, payload: bytes, events: list[Event]) -> None:
        if opcode == OP_PING:
            events.append(Ping(payload))
        elif opcode == OP_CLOSE:
            events.append(self._close(payload))
        elif opcode == OP_PONG:
            pass
        elif fin and not self.opcode:  # a whole message in one frame: the common case
            events.append(_message(opcode, payload))
        else:
            if opcode:
                self.opcode, self.parts, self.size = opcode, [], 0
            assert self.parts is not None
            self.parts.append(payload)
            self.size += len(payload)
            if fin:
                whole, op = b"".join(self.parts), self.opcode
                self.opcode, self.parts, self.size = 0, None, 0
                events.append(_message(op, whole))

    def _close(self, payload: bytes) -> CloseConnection:
        if not payload:
            return CloseConnection(NO_STATUS)
        if len(payload) == 1:
            raise FrameError(PROTOCOL_ERROR, "close payload of one byte")
        (code,) = struct.unpack_from("!H", payload)
        if not valid_close_code(code):
            raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            raise FrameError(INVALID_DATA, "close reason is not UTF-8") from None
        return CloseConnection(code, reason)


def _message(opcode: int, payload: bytes) -> Event:
    if opcode == OP_BINARY:
        return BytesMessage(payload)
    try:
        return TextMessage(payload.decode())
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "text frame is not UTF-8") from None


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame (control frames: payload <= 125 bytes)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and the reason cut to fit 125 bytes (whole chars)."""
    raw = reason.encode()[: MAX_CONTROL - 2].decode(errors="ignore").encode()
    return struct.pack("!H", code) + raw
