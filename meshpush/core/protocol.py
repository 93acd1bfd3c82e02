"""The client <-> node frame protocol, sans-IO: frames in, text out, no sockets, no loop.

Every frame is one JSON object in a WebSocket text message. ``docs/protocol.md`` is the
reference; this module is its executable form. A peer's bad frame becomes a
:class:`ProtocolError` carrying the close code or error code to answer with, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

Channel = Literal["user", "broadcast"]
CHANNELS: tuple[Channel, ...] = ("user", "broadcast")


class Close(IntEnum):
    """WebSocket close codes used by meshpush (docs/protocol.md, "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # never sent: what a client sees when the TCP connection just drops
    INVALID_DATA = 1007  # a frame that is not valid JSON / UTF-8
    POLICY = 1008  # a forbidden frame (binary, unknown type after repeated errors)
    TOO_BIG = 1009
    SLOW_CONSUMER = 4008
    REDIRECT = 4302
    BAD_REQUEST = 4400  # a handshake refused after the upgrade: bad query/device/resume
    TOKEN_EXPIRED = 4401  # also: the handshake's token is missing, invalid or expired
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408
    RATE_LIMITED = 4429
    UNAVAILABLE = 4503


class ProtocolError(Exception):
    """A client sent something the protocol forbids.

    ``code`` is the ``error`` frame code; ``close`` is the WebSocket close code when the
    session must end, or None when an ``error`` frame is answer enough.
    """

    def __init__(self, code: str, detail: str, close: Close | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.close = close


def retry_after(value: str | None) -> float:
    """Seconds of a ``Retry-After`` header (or a refusal's ``retry_after``) in delta-seconds
    form; 0 for none, a date or anything else. Both SDKs bound what they wait."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


# ---------------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True)
class Ack:
    ch: Channel
    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientFrame = Ack | Ping
_ACK_KEYS = frozenset({"type", "ch", "seq"})


def parse_client_frame(message: str | bytes) -> ClientFrame:
    """Parse one client frame or raise :class:`ProtocolError`."""
    if isinstance(message, bytes):
        raise ProtocolError("binary_frame", "binary frames are not accepted", Close.POLICY)
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise ProtocolError("bad_json", "frame is not valid JSON", Close.INVALID_DATA) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError("unknown_type", f"unknown frame type {kind!r}"[:200])
    return parser(obj)


def _parse_ack(obj: dict[str, Any]) -> Ack:
    extra = set(obj) - _ACK_KEYS
    if extra:
        raise ProtocolError("bad_ack", f"unknown ack fields: {sorted(extra)}"[:200])
    ch, seq = obj.get("ch"), obj.get("seq")
    if ch not in CHANNELS:
        raise ProtocolError("bad_ack", "ack.ch must be 'user' or 'broadcast'")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise ProtocolError("bad_ack", "ack.seq must be a non-negative integer")
    return Ack(ch=ch, seq=seq)


def _parse_ping(obj: dict[str, Any]) -> Ping:
    return Ping()


_PARSERS: dict[str, Callable[[dict[str, Any]], ClientFrame]] = {
    "ack": _parse_ack,
    "ping": _parse_ping,
}

# ---------------------------------------------------------------- server frames


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def welcome(
    *,
    node: str,
    user: str,
    device: str,
    epoch: str,
    interval: float,
    timeout: float,
    recovered: bool = True,
    resume: dict[str, int] | None = None,
) -> str:
    return _dumps(
        {
            "type": "welcome",
            "node": node,
            "user": user,
            "device": device,
            "epoch": epoch,
            "heartbeat": {"interval": interval, "timeout": timeout},
            "recovered": recovered,
            "resume": resume or {"user": 0, "broadcast": 0},
        }
    )


def gap(*, ch: Channel, first: int, last: int) -> str:
    """Messages of ``ch`` with seq in [first, last] were lost to retention before delivery."""
    return _dumps({"type": "gap", "ch": ch, "from": first, "to": last})


def redirect(*, node: str, url: str, reason: str) -> str:
    return _dumps({"type": "redirect", "node": node, "url": url, "reason": reason})


def message(*, ch: Channel, seq: int, id: str, data_json: str, prev: int | None = None) -> str:
    """A ``msg`` frame; ``data_json`` is encoded JSON, spliced in (encode once, send many)."""
    prev_part = "" if prev is None else f',"prev":{prev}'
    return (
        f'{{"type":"msg","ch":"{ch}","seq":{seq}{prev_part},"id":{json.dumps(id)},'
        f'"data":{data_json}}}'
    )


PONG = '{"type":"pong"}'


def error(code: str, detail: str) -> str:
    return _dumps({"type": "error", "code": code, "detail": detail})


# ---------------------------------------------------------------- server frames, parsed (SDK)


@dataclass(frozen=True, slots=True)
class ServerFrame:
    """A frame from the node, as the client SDK sees it: ``type`` plus the raw fields."""

    type: str
    fields: dict[str, Any]


def parse_server_frame(message: str | bytes) -> ServerFrame:
    """Parse a node's frame (used by the SDK); raises :class:`ProtocolError` on garbage."""
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "server frame is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("bad_frame", "server frame has no type")
    return ServerFrame(type=obj["type"], fields=obj)
