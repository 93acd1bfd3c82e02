"""Who the client is behind a proxy: PROXY protocol v1/v2, X-Forwarded-For, CIDR sets.

Pure logic, except :func:`read_header`, which reads through a ``receive`` function it is given.

Only a peer inside ``trusted_proxies`` (a :class:`CidrSet`) is believed about another address:

* **PROXY protocol** (HAProxy's spec, https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt),
  sent by a layer-4 load balancer before anything else on the connection. :func:`parse` reads a
  v1 (text) or v2 (binary) header from the first bytes and returns ``(client, consumed)``:
  ``client`` is the source address it carries, or None for v1 ``UNKNOWN`` / v2 ``LOCAL`` (the
  proxy's own connection, e.g. a health check) and v2 ``UNSPEC``/``AF_UNIX`` (no IP): then the
  TCP peer is the client. None instead of a tuple means "not complete yet"; anything malformed
  raises :class:`ProxyHeaderError`. :func:`to_read` says how many bytes to read next so a reader
  never reads past the header (the bytes after it may be a TLS handshake, read by someone else).
* **X-Forwarded-For**, appended to by HTTP proxies: :func:`forwarded_client` walks the list
  right to left (each hop was written by the proxy to its right), skips hops inside the trusted
  set, and the first untrusted hop is the client. The rule for the rest: if every hop is trusted
  the leftmost is the client; a malformed or empty hop (or more than ``MAX_HOPS``) ends the walk
  and the last good hop passed is the client — the walk never jumps over an entry it cannot
  check, because everything left of it may have been written by the client itself.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Awaitable, Callable, Sequence

from meshpush.core.limits import CidrSet, IpAddress, address
from meshpush.server.wire import HandshakeFailed

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/transport, length
V2_MAX = 4096  # the longest v2 header accepted (addresses + TLVs); the spec allows 64 KiB
FIRST_READ = 8  # bytes both versions have for sure (v1 >= 15, v2 >= 16): enough to tell them apart
MAX_HOPS = 32  # X-Forwarded-For hops examined at most
Parsed = tuple[str | None, int]  # (client address or None: use the TCP peer, bytes consumed)

_V1_MIN = {b"UNKNOWN": 15, b"TCP4": 32, b"TCP6": 22}  # shortest complete line of each kind
_V2_ADDRESSES: dict[int, tuple[int, Callable[[bytes], IpAddress]]] = {
    0x1: (4, ipaddress.IPv4Address),
    0x2: (16, ipaddress.IPv6Address),
}
_V2_LENGTH = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # address block of each family


class ProxyHeaderError(ValueError):
    """The first bytes from a trusted proxy are not a valid PROXY protocol header."""


# ------------------------------------------------------------------------ PROXY protocol


def parse(data: bytes) -> Parsed | None:
    """A v1 or v2 header at the start of ``data``; None while incomplete."""
    if _is_prefix(data, V2_SIGNATURE):
        return parse_v2(data)
    if _is_prefix(data, V1_PREFIX):
        return parse_v1(data)
    raise ProxyHeaderError(
        "no PROXY protocol header (neither the v1 'PROXY ' nor the v2 signature)"
    )


def to_read(data: bytes) -> int:
    """How many bytes to read next (at least 1) without reading past the header."""
    if len(data) < FIRST_READ:
        return FIRST_READ - len(data)
    if data.startswith(V2_SIGNATURE[:FIRST_READ]):
        if len(data) < V2_HEADER:
            return V2_HEADER - len(data)
        length: int = struct.unpack_from("!H", data, 14)[0]
        return max(1, V2_HEADER + length - len(data))
    shortest = _V1_MIN.get(data[6:].split(b" ", 1)[0], 15) if data.count(b" ") >= 2 else 15
    if len(data) < shortest:
        return shortest - len(data)
    return 1 if data.endswith(b"\r") else 2  # the line may end with the next CRLF


def parse_v1(data: bytes) -> Parsed | None:
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``."""
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in data or (b"\r" in data and not data.endswith(b"\r")):
            raise ProxyHeaderError("v1 header has a stray CR or LF")
        return None
    fields = data[:end].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("v1 header does not start with 'PROXY '")
    if fields[1] == b"UNKNOWN":
        return None, end + 2  # the rest of the line is ignored (spec 2.1)
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError("v1 header is not 'PROXY TCP4|TCP6 src dst sport dport'")
    version = 4 if fields[1] == b"TCP4" else 6
    src = _v1_address(fields[2], version)
    _v1_address(fields[3], version)
    for port in fields[4:6]:
        _v1_port(port)
    return src, end + 2


def _v1_address(raw: bytes, version: int) -> str:
    try:
        addr = ipaddress.ip_address(raw.decode("ascii")) if b"%" not in raw else None
    except (UnicodeDecodeError, ValueError):
        addr = None
    if addr is None or addr.version != version:
        raise ProxyHeaderError(f"v1 header: {raw[:45]!r} is not an IPv{version} address")
    return str(_unmapped(addr))


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5:
        raise ProxyHeaderError(f"v1 header: bad port {raw[:8]!r}")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header: port {port} out of range")
    return port


def parse_v2(data: bytes) -> Parsed | None:
    """The binary header: signature, version 2, LOCAL or PROXY, addresses, TLVs (skipped)."""
    if len(data) < V2_HEADER:
        if not _is_prefix(data, V2_SIGNATURE):
            raise ProxyHeaderError("bad v2 signature")
        return None
    if not data.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("bad v2 signature")
    version_command, family_transport, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header: version {version_command >> 4}, expected 2")
    command = version_command & 0xF
    family, transport = family_transport >> 4, family_transport & 0xF
    if command > 1:
        raise ProxyHeaderError(f"v2 header: command {command}, expected LOCAL (0) or PROXY (1)")
    if family > 3 or transport > 2:
        raise ProxyHeaderError(f"v2 header: bad family/transport byte {family_transport:#04x}")
    if V2_HEADER + length > V2_MAX:
        raise ProxyHeaderError(f"v2 header of {V2_HEADER + length} bytes, more than {V2_MAX}")
    if len(data) < V2_HEADER + length:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (health check); addresses ignored
        return None, V2_HEADER + length
    if length < _V2_LENGTH[family]:
        raise ProxyHeaderError(f"v2 header: {length} bytes cannot hold its addresses")
    if family not in _V2_ADDRESSES:  # UNSPEC or AF_UNIX: no IP address to use
        return None, V2_HEADER + length
    if transport != 1:
        raise ProxyHeaderError("v2 header: an IP family must come with STREAM (TCP)")
    size, kind = _V2_ADDRESSES[family]
    return str(_unmapped(kind(data[V2_HEADER : V2_HEADER + size]))), V2_HEADER + length


def _unmapped(addr: IpAddress) -> IpAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_prefix(data: bytes, full: bytes) -> bool:
    """``data`` starts with ``full``, or is a (possibly empty) beginning of it."""
    n = min(len(data), len(full))
    return data[:n] == full[:n]


async def read_header(receive: Callable[[int], Awaitable[bytes]]) -> str | None:
    """Read one PROXY header with ``receive(max_bytes)`` (a stream's ``receive_some``), never
    a byte past it; returns the carried client address (None: the TCP peer is the client).
    Raises :class:`ProxyHeaderError` (malformed, oversize, or the peer closed before the end),
    or :class:`~meshpush.server.wire.HandshakeFailed` if it closed before sending anything (a load
    balancer's TCP health check, a port scan: no bad header)."""
    data = b""
    while True:
        chunk = await receive(to_read(data))
        if not chunk and not data:
            raise HandshakeFailed("peer closed before a PROXY header")
        if not chunk:
            raise ProxyHeaderError(f"peer closed after {len(data)} bytes of a PROXY header")
        data += chunk
        parsed = parse(data)
        if parsed is not None:
            return parsed[0]


# ------------------------------------------------------------------------ X-Forwarded-For


def hop(entry: str) -> str | None:
    """One X-Forwarded-For entry as an address: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``,
    ``[2001:db8::1]`` or ``[2001:db8::1]:5678``; None if it is none of those."""
    entry = entry.strip()
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        addr = address(inside)
        return str(addr) if isinstance(addr, ipaddress.IPv6Address) else None
    if entry.count(":") == 1:  # IPv4 with a port
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    addr = address(entry)
    return None if addr is None else str(addr)


def forwarded_client(values: Sequence[str], trusted: CidrSet, peer: str) -> str:
    """The client address from the X-Forwarded-For header lines ``values`` (in order) sent by
    the trusted ``peer``: the rightmost hop not in ``trusted`` (rules in the module doc)."""
    entries = [e for value in values for e in value.split(",")]
    client = peer
    for entry in reversed(entries[-MAX_HOPS:]):
        addr = hop(entry)
        if addr is None:
            break
        client = addr
        if addr not in trusted:
            break
    return client
