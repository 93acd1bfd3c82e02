"""The NATS client protocol, sans-IO: commands to bytes, server bytes to events.

Encoders for what a client sends (``CONNECT``, ``PUB``, ``HPUB``, ``SUB``, ``UNSUB``, ``PING``,
``PONG``) and :class:`Parser`, an incremental parser of what a server sends (``INFO``, ``MSG``,
``HMSG``, ``PING``, ``PONG``, ``+OK``, ``-ERR``). No sockets and no async: the trio
connection is :mod:`meshpush.backends.natslink`. Headers are NATS/1.0 headers; a status line
(``NATS/1.0 503`` — no responders, ``NATS/1.0 408 Request Timeout``...) becomes the
``Status`` and ``Description`` headers, as nats-py presents them (so one answer parser
reads both). Everything is bounded: a control line by :data:`MAX_CONTROL_LINE`, a message by
the server's ``max_payload`` (from its INFO); anything malformed or over a bound raises
:class:`ProtocolError` and the connection is closed — it cannot be resynchronised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

MAX_CONTROL_LINE = 64 * 1024  # INFO of a big cluster lists many URLs; ops are far shorter
DEFAULT_MAX_PAYLOAD = 1024 * 1024
HEADER_LINE = b"NATS/1.0"
_BAD_KEY = re.compile(r"[:\s]")
_SPACE = re.compile(r"\s").search
_GOOD_KEYS: set[str] = set()
PING = b"PING\r\n"
PONG = b"PONG\r\n"


class ProtocolError(Exception):
    """The server sent something that is not the NATS protocol (or over a bound)."""


class EncodeError(ValueError):
    """A subject, header or payload the protocol cannot carry (our caller's mistake)."""


@dataclass(frozen=True, slots=True)
class Info:
    fields: dict[str, Any]

    @property
    def max_payload(self) -> int:
        return int(self.fields.get("max_payload", DEFAULT_MAX_PAYLOAD))


@dataclass(frozen=True, slots=True)
class Msg:
    subject: str
    sid: int
    reply: str | None
    payload: bytes
    headers: dict[str, str] | None = None
    #: the header block as received, unparsed (``headers`` is None then): for subscriptions
    #: that asked for it (:attr:`Parser.raw_sids`) and read only the few headers they need
    raw_headers: bytes | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    message: str


Event = Info | Msg | Ping | Pong | Ok | Err
_PING, _PONG, _OK = Ping(), Pong(), Ok()

# ---------------------------------------------------------------- encoding


def _token(subject: str, what: str = "subject") -> bytes:
    if not subject or _SPACE(subject):
        raise EncodeError(f"invalid {what}: {subject!r}")
    return subject.encode()


def connect(options: dict[str, Any]) -> bytes:
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + b"\r\n"


def pub(
    subject: str, payload: bytes, reply: str | None = None, max_payload: int | None = None
) -> bytes:
    head = _token(subject) + (b" " + _token(reply, "reply") if reply else b"")
    _check_size(len(payload), max_payload)
    return b"PUB %s %d\r\n%s\r\n" % (head, len(payload), payload)


def _check_size(total: int, max_payload: int | None) -> None:
    """A message over the server's max_payload would make it close the connection."""
    if max_payload is not None and total > max_payload:
        raise EncodeError(f"message of {total} bytes over the server's max_payload {max_payload}")


def encode_headers(headers: dict[str, str]) -> bytes:
    parts = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        if key not in _GOOD_KEYS:
            _check_key(key, value)
        if "\r" in value or "\n" in value:
            raise EncodeError(f"invalid header {key!r}: {value!r}")
        parts.append(f"{key}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


def _check_key(key: str, value: str) -> None:
    """Raise for a key that would break the header block; remember good ones (a few names
    recur: Nats-Msg-Id, traceparent...; bounded)."""
    if not key or _BAD_KEY.search(key):
        raise EncodeError(f"invalid header {key!r}: {value!r}")
    if len(_GOOD_KEYS) < 256:
        _GOOD_KEYS.add(key)


def hpub(
    subject: str,
    headers: dict[str, str],
    payload: bytes,
    reply: str | None = None,
    max_payload: int | None = None,
) -> bytes:
    head = _token(subject) + (b" " + _token(reply, "reply") if reply else b"")
    block = encode_headers(headers)
    total = len(block) + len(payload)
    _check_size(total, max_payload)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (head, len(block), total, block, payload)


def publish(
    subject: str,
    payload: bytes,
    reply: str | None = None,
    headers: dict[str, str] | None = None,
    max_payload: int | None = None,
) -> bytes:
    """PUB, or HPUB when there are headers; ``EncodeError`` over ``max_payload`` (the size
    the server counts: headers and payload)."""
    if headers:
        return hpub(subject, headers, payload, reply, max_payload)
    return pub(subject, payload, reply, max_payload)


def sub(subject: str, sid: int, queue: str | None = None) -> bytes:
    group = b" " + _token(queue, "queue group") if queue else b""
    return b"SUB %s%s %d\r\n" % (_token(subject), group, sid)


def unsub(sid: int, max_msgs: int | None = None) -> bytes:
    return b"UNSUB %d\r\n" % sid if max_msgs is None else b"UNSUB %d %d\r\n" % (sid, max_msgs)


# ---------------------------------------------------------------- parsing


def parse_headers(block: bytes) -> dict[str, str]:
    """A NATS/1.0 header block (``NATS/1.0[ status[ description]]\\r\\nKey: value\\r\\n...``)."""
    if not block.startswith(HEADER_LINE):
        raise ProtocolError("header block without NATS/1.0")
    lines = block.decode("utf-8", "replace").split("\r\n")
    out: dict[str, str] = {}
    status, _, description = lines[0][len(HEADER_LINE) :].strip().partition(" ")
    if status:
        if not (len(status) == 3 and status.isdigit()):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        out["Status"] = status
        if description.strip():
            out["Description"] = description.strip()
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ProtocolError(f"bad header line {line!r}")
        out[key.strip()] = value.strip()
    return out


class Parser:
    """Feed it what the socket gave, get the complete server ops back (in order). The header
    blocks of messages to the sids in ``raw_sids`` (a set the caller keeps up to date) are
    handed over unparsed (:attr:`Msg.raw_headers`)."""

    def __init__(
        self, max_payload: int = DEFAULT_MAX_PAYLOAD, raw_sids: Collection[int] = frozenset()
    ) -> None:
        self.max_payload = max_payload
        self.raw_sids = raw_sids
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data``; raises :class:`ProtocolError` on garbage."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = self._pos
        size = len(buf)
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > MAX_CONTROL_LINE:
                    raise ProtocolError("control line too long")
                break
            if end - pos > MAX_CONTROL_LINE:
                raise ProtocolError("control line too long")
            line = bytes(buf[pos:end])
            op = line[:4]
            if op == b"MSG " or op == b"HMSG":
                parsed = self._message_head(line)
                body_end = end + 2 + parsed[3] + parsed[4]
                if body_end + 2 > size:
                    break  # the payload is still coming
                if buf[body_end : body_end + 2] != b"\r\n":
                    raise ProtocolError("message payload not followed by CRLF")
                events.append(self._message(parsed, buf, end + 2))
                pos = body_end + 2
            else:
                events.append(self._simple(line))
                pos = end + 2
        if pos >= size:
            buf.clear()
            pos = 0
        elif pos > 65536:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return events

    def _message_head(self, line: bytes) -> tuple[str, int, str | None, int, int]:
        """(subject, sid, reply, header bytes, payload bytes) of a MSG/HMSG line."""
        parts = line.split()
        headers = parts[0] == b"HMSG"
        if len(parts) not in (4 + headers, 5 + headers):
            raise ProtocolError(f"bad {parts[0].decode()} line")
        try:
            sizes = [int(p) for p in parts[-1 - headers :]]
            sid = int(parts[2])
        except ValueError:
            raise ProtocolError("bad number in message line") from None
        reply_parts = len(parts) - 4 - headers
        if any(n < 0 for n in sizes):
            raise ProtocolError("bad message line")
        hlen, total = (sizes[0], sizes[1]) if headers else (0, sizes[0])
        if hlen > total or total > self.max_payload:
            raise ProtocolError(f"message of {total} bytes over the bound {self.max_payload}")
        reply = parts[3].decode() if reply_parts else None
        return parts[1].decode(), sid, reply, hlen, total - hlen

    def _message(self, head: tuple[str, int, str | None, int, int], buf: bytearray, at: int) -> Msg:
        subject, sid, reply, hlen, plen = head
        payload = bytes(buf[at + hlen : at + hlen + plen])
        if not hlen:
            return Msg(subject, sid, reply, payload)
        block = bytes(buf[at : at + hlen])
        if sid in self.raw_sids:
            if not block.startswith(HEADER_LINE):
                raise ProtocolError("header block without NATS/1.0")
            return Msg(subject, sid, reply, payload, None, block)
        return Msg(subject, sid, reply, payload, parse_headers(block))

    def _simple(self, line: bytes) -> Event:
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op == b"PING" and not rest:
            return _PING
        if op == b"PONG" and not rest:
            return _PONG
        if op == b"+OK" and not rest:
            return _OK
        if op == b"-ERR":
            return Err(rest.decode("utf-8", "replace").strip().strip("'"))
        if op == b"INFO":
            return self._info(rest)
        raise ProtocolError(f"unknown server op {line[:32]!r}")

    def _info(self, raw: bytes) -> Info:
        try:
            fields = json.loads(raw)
        except ValueError:
            raise ProtocolError("INFO is not JSON") from None
        if not isinstance(fields, dict):
            raise ProtocolError("INFO is not an object")
        info = Info(fields)
        try:
            self.max_payload = info.max_payload
        except (TypeError, ValueError):
            raise ProtocolError("INFO max_payload is not a number") from None
        return info
