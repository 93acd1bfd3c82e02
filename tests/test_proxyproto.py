"""PROXY protocol v1/v2 parsers, the X-Forwarded-For walk and CIDR sets: pure, every branch."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import struct
from collections.abc import Iterator
from io import StringIO

import pytest
import trio

from meshpush.core.limits import CidrSet
from meshpush.observe import logs
from meshpush.observe.metrics import Metrics
from meshpush.server.listener import PENDING, Doorman
from meshpush.server.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeaderError,
    forwarded_client,
    hop,
    parse,
    parse_v1,
    parse_v2,
    read_header,
    to_read,
)
from meshpush.server.wire import HandshakeFailed
from meshpush.settings import Settings, add_arguments, env_for, from_sources

TRUSTED = CidrSet.parse(["10.0.0.0/8", "fd00::/8", "192.0.2.1"])


def v2(
    command: int = 1,
    family: int = 1,
    transport: int = 1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    size = len(body) if length is None else length
    head = struct.pack("!BBH", version << 4 | command, family << 4 | transport, size)
    return V2_SIGNATURE + head + body


def inet(src: str, dst: str = "10.0.0.1", sport: int = 51234, dport: int = 8800) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return s.packed + d.packed + struct.pack("!HH", sport, dport)


# ------------------------------------------------------------------------ v1


@pytest.mark.parametrize(
    ("line", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8800\r\n", "203.0.113.7"),
        (b"PROXY TCP6 2001:db8::7 fd00::1 51234 443\r\n", "2001:db8::7"),
        (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 0 65535\r\n", "203.0.113.7"),  # mapped: shown v4
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    ],
)
def test_v1_headers(line: bytes, client: str | None) -> None:
    after = b"GET /ws HTTP/1.1\r\n"
    assert parse_v1(line + after) == (client, len(line))
    assert parse(line + after) == (client, len(line))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n",  # a field missing
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8800 9\r\n",  # one too many
        b"PROXY TCP5 203.0.113.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n",
        b"PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 123456 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # no zone ids
        b"PROXY  TCP4 203.0.113.7 10.0.0.1 1 2\r\n",  # two spaces
        b"PROXY TCP4 \xff\xfe 10.0.0.1 1 2\r\n",
        b"PROXY\r\n",
        b"PROXY TCP4 203.0.113.7\n10.0.0.1 1 2\r\n",  # a bare LF inside
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_v1(line)


def test_v1_incomplete_stray_and_oversize() -> None:
    assert parse_v1(b"PROXY TCP4 203.0.113.7") is None
    assert parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r") is None  # CRLF half there
    with pytest.raises(ProxyHeaderError, match="stray"):
        parse_v1(b"PROXY TCP4 203.0.113.7\rx")
    with pytest.raises(ProxyHeaderError, match="stray"):
        parse_v1(b"PROXY TCP4\n")
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse_v1(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14))
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert parse_v1(longest) == (None, V1_MAX)
    with pytest.raises(ProxyHeaderError, match="start with"):
        parse_v1(b"PROXZ TCP4 1.2.3.4 1.2.3.4 1 2\r\n")


# ------------------------------------------------------------------------ v2


def test_v2_proxy_inet_and_inet6_with_tlvs_skipped() -> None:
    tlvs = b"\x04\x00\x03abc" + b"\xea\x00\x01z"  # NOOP and an AWS-style TLV: skipped
    header = v2(addresses=inet("203.0.113.7"), tlvs=tlvs)
    assert parse_v2(header + b"GET") == ("203.0.113.7", len(header))
    six = v2(family=2, addresses=inet("2001:db8::7", "fd00::1"))
    assert parse(six) == ("2001:db8::7", 16 + 36)
    mapped = v2(family=2, addresses=inet("::ffff:203.0.113.7", "::1"))
    assert parse(mapped) == ("203.0.113.7", 16 + 36)


@pytest.mark.parametrize(
    "header",
    [
        v2(command=0, family=0, transport=0),  # LOCAL: a health check of the proxy
        v2(command=0, addresses=inet("203.0.113.7")),  # LOCAL: addresses ignored
        v2(family=0, transport=0),  # PROXY, UNSPEC
        v2(family=3, addresses=bytes(216)),  # AF_UNIX: no IP
    ],
)
def test_v2_without_a_client_ip(header: bytes) -> None:
    assert parse(header) == (None, len(header))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (v2(version=1, addresses=inet("203.0.113.7")), "version 1"),
        (v2(command=2, addresses=inet("203.0.113.7")), "command 2"),
        (v2(family=4, addresses=inet("203.0.113.7")), "family/transport"),
        (v2(transport=3, addresses=inet("203.0.113.7")), "family/transport"),
        (v2(transport=2, addresses=inet("203.0.113.7")), "STREAM"),  # UDP
        (v2(addresses=b"\x01\x02\x03"), "cannot hold"),
        (v2(family=2, addresses=inet("203.0.113.7")), "cannot hold"),  # 12 bytes for IPv6
        (v2(length=V2_MAX), f"more than {V2_MAX}"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "signature"),
    ],
)
def test_v2_malformed(header: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(header)


def test_v2_incomplete_and_bad_signature() -> None:
    header = v2(addresses=inet("203.0.113.7"))
    for n in range(len(header)):
        assert parse(header[:n]) is None, n
    assert parse_v2(b"") is None
    with pytest.raises(ProxyHeaderError, match="signature"):
        parse_v2(b"\r\n\r\nX")
    with pytest.raises(ProxyHeaderError, match="signature"):
        parse_v2(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n")


def test_neither_version() -> None:
    for data in (b"GET /ws HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"proxy tcp4"):
        with pytest.raises(ProxyHeaderError, match="no PROXY protocol header"):
            parse(data)


# ------------------------------------------------------------------------ reading exactly


def byte_feeder(data: bytes) -> tuple[list[int], object]:
    asked: list[int] = []
    view = memoryview(data)
    offset = 0

    async def receive(n: int) -> bytes:
        nonlocal offset
        asked.append(n)
        chunk = bytes(view[offset : offset + n])
        offset += len(chunk)
        return chunk

    return asked, receive


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8800\r\n", "203.0.113.7"),
        (b"PROXY TCP6 2001:db8::7 fd00::1 51234 443\r\n", "2001:db8::7"),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN x\r\n", None),
        (v2(addresses=inet("203.0.113.7"), tlvs=b"\x04\x00\x10" + bytes(16)), "203.0.113.7"),
        (v2(command=0, family=0, transport=0), None),
    ],
)
async def test_read_header_never_reads_past_the_header(header: bytes, client: str | None) -> None:
    rest = b"\x16\x03\x01 a TLS ClientHello that belongs to someone else"
    asked, receive = byte_feeder(header + rest)
    assert await read_header(receive) == client  # type: ignore[arg-type]
    assert sum(asked) == len(header), asked
    assert len(asked) <= 40


async def test_read_header_errors() -> None:
    _, receive = byte_feeder(b"")  # a TCP health check: connect, close
    with pytest.raises(HandshakeFailed):
        await read_header(receive)  # type: ignore[arg-type]
    _, receive = byte_feeder(b"PROXY TCP4 203.0")  # then the peer closes
    with pytest.raises(ProxyHeaderError, match="closed after 16 bytes"):
        await read_header(receive)  # type: ignore[arg-type]
    _, receive = byte_feeder(b"GET /ws HTTP/1.1\r\n\r\n")
    with pytest.raises(ProxyHeaderError, match="no PROXY"):
        await read_header(receive)  # type: ignore[arg-type]
    _, receive = byte_feeder(b"PROXY UNKNOWN " + b"x" * 200)
    with pytest.raises(ProxyHeaderError, match="longer than"):
        await read_header(receive)  # type: ignore[arg-type]


def test_to_read_asks_for_the_least_that_can_complete() -> None:
    assert to_read(b"") == 8
    assert to_read(b"PROXY") == 3
    assert to_read(V2_SIGNATURE[:8]) == 8
    assert to_read(v2(addresses=inet("203.0.113.7"))[:16]) == 12
    assert to_read(v2(command=0, family=0, transport=0)) == 1  # complete: never asked
    assert to_read(b"PROXY TC") == 7  # up to the 15 bytes of the shortest line
    assert to_read(b"PROXY TCP4 203.0") == 16  # 'PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n'
    assert to_read(b"PROXY TCP6 2001:db8::7 ") == 2
    assert to_read(b"PROXY TCP6 2001:db8::7 ::1 1 2\r") == 1


# ------------------------------------------------------------------------ X-Forwarded-For


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([], "10.0.0.9"),  # no header: the peer itself
        (["203.0.113.7"], "203.0.113.7"),
        (["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # the rightmost untrusted
        (["203.0.113.7, 10.1.1.1, 10.2.2.2"], "203.0.113.7"),  # trusted hops skipped
        (["spoofed, 203.0.113.7, 10.1.1.1"], "203.0.113.7"),
        (["10.3.3.3, 10.1.1.1"], "10.3.3.3"),  # all trusted: the leftmost
        (["203.0.113.7, garbage, 10.1.1.1"], "10.1.1.1"),  # never jump over garbage
        (["203.0.113.7, , 10.1.1.1"], "10.1.1.1"),  # an empty hop is garbage too
        (["203.0.113.7, unknown"], "10.0.0.9"),  # rightmost malformed: the peer
        ([""], "10.0.0.9"),
        (["198.51.100.1", "203.0.113.7, 10.1.1.1"], "203.0.113.7"),  # lines joined in order
        (["198.51.100.1", "10.1.1.1"], "198.51.100.1"),
        (["203.0.113.7:4711"], "203.0.113.7"),
        (["[2001:db8::7]:4711, fd00::2"], "2001:db8::7"),
        (["[2001:db8::7]"], "2001:db8::7"),
        (["2001:db8::7"], "2001:db8::7"),
        (["::ffff:203.0.113.7"], "203.0.113.7"),
        (["192.0.2.1, 192.0.2.2"], "192.0.2.2"),  # a single trusted address, not its /24
        ([", ".join(["10.9.9.9"] * 40)], "10.9.9.9"),  # bounded walk
        ([", ".join(["203.0.113.7"] + ["10.9.9.9"] * 40)], "10.9.9.9"),  # past MAX_HOPS: stop
    ],
)
def test_forwarded_client(values: list[str], client: str) -> None:
    assert forwarded_client(values, TRUSTED, "10.0.0.9") == client


@pytest.mark.parametrize(
    "entry",
    ["[203.0.113.7]", "[2001:db8::7", "[2001:db8::7]x", "[2001:db8::7]:", "1.2.3.4:", "1.2.3.4:x"],
)
def test_malformed_hops(entry: str) -> None:
    assert hop(entry) is None


# ------------------------------------------------------------------------ CIDR sets, settings


def test_cidr_set_membership() -> None:
    assert "10.20.30.40" in TRUSTED and "fd00::5" in TRUSTED and "192.0.2.1" in TRUSTED
    assert "192.0.2.2" not in TRUSTED and "11.0.0.1" not in TRUSTED
    assert "::ffff:10.0.0.1" in TRUSTED  # a dual-stack socket's view of an IPv4 peer
    assert "not an ip" not in TRUSTED and "" not in TRUSTED and 10 not in TRUSTED
    assert not CidrSet() and TRUSTED
    assert "127.0.0.1" not in CidrSet()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0", "example.com", "fd00::/129"])
def test_bad_trusted_proxies_name_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match=f"bad value for trusted_proxies: '{bad}'"):
        from_sources(None, {"MESHPUSH_TRUSTED_PROXIES": f"10.0.0.0/8,{bad}"})
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings(node_id="n", trusted_proxies=(bad,))


def test_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ValueError, match="bad value for proxy_protocol: it needs trusted_proxies"):
        from_sources(None, {"MESHPUSH_PROXY_PROTOCOL": "true"})


def test_trusted_proxies_from_env_and_flags() -> None:
    env = {"MESHPUSH_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8", "MESHPUSH_PROXY_PROTOCOL": "on"}
    s = from_sources(None, env)
    assert s.trusted_proxies == ("10.0.0.0/8", "fd00::/8") and s.proxy_protocol
    assert from_sources(None, env_for(s)) == s
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--trusted-proxies", "192.0.2.0/24", "--proxy-protocol", "false"])
    s = from_sources(args, env)
    assert s.trusted_proxies == ("192.0.2.0/24",) and not s.proxy_protocol
    defaults = Settings(node_id="n")
    assert defaults.trusted_proxies == () and not defaults.proxy_protocol


# ------------------------------------------------------------------------ admission, logs


async def test_doorman_counts_a_proxy_connection_by_its_client() -> None:
    settings = Settings(node_id="n", trusted_proxies=("10.0.0.0/8",), max_connections_per_ip=1)
    doorman = Doorman(settings, Metrics("n"))
    assert "10.1.1.1" in doorman.trusted
    assert doorman.admit(PENDING) is None and doorman.admit(PENDING) is None  # no per-IP cap
    assert doorman.readmit(PENDING, "203.0.113.7") is None
    refused = doorman.readmit(PENDING, "203.0.113.7")
    assert refused is not None and refused.code == "too_many_connections"
    assert doorman.connections.total == 1  # the refused one counts nowhere any more
    doorman.filter = doorman.filter.parse("block 198.51.100.0/24")
    assert doorman.admit(PENDING) is None
    refused = doorman.readmit(PENDING, "198.51.100.7")
    assert refused is not None and refused.code == "ip_blocked"
    assert doorman.connections.total == 1


async def test_node_cap_counts_pending_proxy_connections() -> None:
    settings = Settings(node_id="n", trusted_proxies=("10.0.0.0/8",), max_connections=2)
    doorman = Doorman(settings, Metrics("n"))
    assert doorman.admit(PENDING) is None and doorman.admit("203.0.113.7") is None
    refused = doorman.admit(PENDING)
    assert refused is not None and refused.code == "node_full"


@pytest.fixture
def root_logger() -> Iterator[None]:
    """logs.setup replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


async def connection(ip: str) -> None:
    """What a WebSocket connection's task does: name its client, then log."""
    logs.CLIENT_IP.set(ip)
    logging.getLogger("meshpush.server.gateway").warning("handshake refused: %s", "x")
    logging.getLogger("meshpush.server.listener").warning("refused %s: y", ip)


@pytest.mark.usefixtures("root_logger")
async def test_json_log_lines_of_a_connection_carry_its_client_ip() -> None:
    out = StringIO()
    logs.setup(Settings(node_id="n", log_format="json"), out)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection, "203.0.113.7")
    logging.getLogger("meshpush.node").warning("not about a connection")
    first, _, other = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["client_ip"] == "203.0.113.7"
    assert "client_ip" not in other  # the task's context, not the whole process


@pytest.mark.usefixtures("root_logger")
async def test_text_log_lines_of_a_connection_end_with_its_client_ip() -> None:
    out = StringIO()
    logs.setup(Settings(node_id="n"), out)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection, "2001:db8::7")
    first, second = out.getvalue().splitlines()
    assert first.endswith("meshpush.server.gateway: handshake refused: x [client 2001:db8::7]")
    assert second.endswith("meshpush.server.listener: refused 2001:db8::7: y")  # named once
