"""The common WebSocket upgrade request, parsed without h11 (pure; a fast path).

Nearly every handshake is the same request: ``GET <target> HTTP/1.1``, a few plain ASCII
headers, complete in the first read. :func:`parse` recognises exactly that shape and returns
the same ``wsproto`` :class:`~wsproto.events.Request` that wsproto's h11-based handshake
would; for **anything else** (an incomplete or oversized request, bytes after it, an unusual
character, a repeated or missing upgrade header, a body, another method or version) it
returns None and the caller goes the h11 way, which then decides, refuses and answers exactly
as before. So the fast path accepts a subset of what h11 accepts and never refuses anything
itself. :func:`accept_response` is the 101 answer, byte for byte what wsproto writes for
``AcceptConnection()`` (no subprotocol, no extension; tests compare the two).
"""

from __future__ import annotations

import re

from wsproto.events import Request
from wsproto.utilities import generate_accept_token, split_comma_header

MAX_HEAD = 16384  # h11's default limit for a request head: longer ones go the h11 way
# every header line at once: an RFC 9110 token (h11's header name), a colon, a plain ASCII
# value (visible characters, inner spaces and tabs) between optional spaces and tabs
_LINES = re.compile(
    rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[ \t]*"
    rb"(?:[\x21-\x7e](?:[\x20\x21-\x7e\t]*[\x21-\x7e])?)?[ \t]*\r\n)*"
)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_SINGLE = frozenset(  # headers the handshake reads: a repeat goes the h11 way
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)
_BODY = frozenset({b"content-length", b"transfer-encoding"})


def parse(data: bytes) -> Request | None:
    """The upgrade request in ``data`` if it is the common, complete, unambiguous shape."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or len(data) > MAX_HEAD:
        return None
    first_end = data.find(b"\r\n")
    parts = data[:first_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    if not _TARGET.fullmatch(parts[1]) or not _LINES.fullmatch(data, first_end + 2, end + 2):
        return None
    fields: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    for line in data[first_end + 2 : end].split(b"\r\n") if end > first_end else ():
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        name = name.lower()
        if name in _BODY or (name in _SINGLE and name in fields):
            return None
        fields[name] = value
        if name not in (b"host", b"sec-websocket-extensions", b"sec-websocket-protocol"):
            headers.append((name, value))
    return _request(parts[1], fields, headers)


def _request(
    target: bytes, fields: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]
) -> Request | None:
    """wsproto's checks of an upgrade request; None where it would refuse (h11 answers)."""
    host = fields.get(b"host")
    connection = split_comma_header(fields.get(b"connection", b""))
    if (
        host is None
        or not any(token.lower() == "upgrade" for token in connection)
        or fields.get(b"sec-websocket-version") != b"13"
        or b"sec-websocket-key" not in fields
        or fields.get(b"upgrade", b"").lower() != b"websocket"
    ):
        return None
    optional = (b"sec-websocket-extensions", b"sec-websocket-protocol")
    extensions, protocols = (
        split_comma_header(fields[name]) if name in fields else [] for name in optional
    )
    return Request(
        host=_host(host),
        target=target.decode("ascii"),
        extensions=extensions,
        extra_headers=headers,
        subprotocols=protocols,
    )


_HOSTS: dict[bytes, str] = {}  # Host values decoded before (clients share a few)
MAX_HOSTS = 64


def _host(host: bytes) -> str:
    """``host.decode("idna")``, remembered for the few Host values a node sees."""
    text = _HOSTS.get(host)
    if text is None:
        text = host.decode("idna")
        if len(_HOSTS) < MAX_HOSTS:
            _HOSTS[host] = text
    return text


def accept_response(request: Request) -> bytes:
    """The ``101 Switching Protocols`` answer to ``request`` (nothing negotiated)."""
    key = dict(request.extra_headers)[b"sec-websocket-key"]
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )
