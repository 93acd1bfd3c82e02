"""Client addresses behind trusted proxies, against real nodes: the PROXY protocol (v1, v2) and
X-Forwarded-For from a trusted peer drive the IP filter, the per-IP cap and the logs; the same
from an untrusted peer is ignored (or refused); malformed PROXY headers are closed while other
clients are served. 127.0.0.1 is the trusted proxy; 127.0.0.2 and 127.0.0.3 (the same machine)
are untrusted peers."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import make_cluster
from support import api, publish
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster, NodeProc
from meshpush.server.proxyproto import V2_SIGNATURE

pytestmark = pytest.mark.cluster

FILTER = "block 198.51.100.0/24\nblock 2001:db8:bad::/48\n"
QUIET = {"heartbeat_interval": 25.0, "heartbeat_timeout": 60.0}  # raw clients answer no pings


@contextmanager
def node_of(tmp: Path, **settings: Any) -> Iterator[LocalCluster]:
    (tmp / "ipfilter").write_text(FILTER)
    with make_cluster(
        tmp / "c",
        nodes=1,
        trusted_proxies=("127.0.0.1/32",),
        max_connections_per_ip=1,
        handshake_timeout=2.0,
        ip_filter_file=str(tmp / "ipfilter"),
        log_format="json",
        **QUIET,
        **settings,
    ) as cluster:
        yield cluster
        assert all(n.proc.alive() for n in cluster.members)


@pytest.fixture(scope="module")
def pp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node: 127.0.0.1 is a trusted proxy that must send a PROXY header."""
    with node_of(tmp_path_factory.mktemp("pp"), proxy_protocol=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def xff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node: 127.0.0.1 is a trusted HTTP proxy (X-Forwarded-For), no PROXY protocol."""
    with node_of(tmp_path_factory.mktemp("xff")) as cluster:
        yield cluster


# ---------------------------------------------------------------- a raw WebSocket client


def v1(client: str) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {server} 40000 8800\r\n".encode()


def v2(client: str | None, command: int = 1) -> bytes:
    """A v2 header; ``client`` None: LOCAL, no addresses."""
    if client is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)
    src = ipaddress.ip_address(client)
    dst = ipaddress.ip_address("::1" if src.version == 6 else "127.0.0.1")
    family = 0x21 if src.version == 6 else 0x11
    body = src.packed + dst.packed + struct.pack("!HH", 40000, 8800) + b"\x04\x00\x02ok"  # a TLV
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


class Raw:
    """One connection from ``source`` that may send anything before its upgrade request."""

    def __init__(
        self, node: NodeProc, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self.tls = tls
        self.ws = WSConnection(ConnectionType.CLIENT)

    def open(
        self, cluster: LocalCluster, user: str, prefix: bytes = b"", xff: tuple[str, ...] = ()
    ) -> tuple[int, dict[str, Any]]:
        """(101, welcome frame), (HTTP status, error body), or (0, {}) if closed unanswered."""
        target = f"/ws?token={issue_token(cluster.token_secret, user)}&device=d1"
        headers = [(b"x-forwarded-for", value.encode()) for value in xff]
        request = Request(host="127.0.0.1", target=target, extra_headers=headers)
        if self.tls is not None:  # the PROXY header goes first, in clear; then TLS
            self.sock.sendall(prefix)
            prefix, self.sock = b"", self.tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.sock.sendall(prefix + self.ws.send(request))
        status, body = 0, b""
        while True:
            events = self.events()
            if events is None:
                return status, json.loads(body or b"{}")
            for event in events:
                if isinstance(event, AcceptConnection):
                    status = 101
                elif isinstance(event, RejectConnection):
                    status = event.status_code
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        return status, json.loads(body or b"{}")  # h11's 400 has no body
                elif isinstance(event, TextMessage):
                    return status, json.loads(event.data)

    def events(self) -> list[Any] | None:
        """The next events; None once the node closed (or reset: it had unread bytes)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        self.ws.receive_data(data)
        return list(self.ws.events())

    def frame(self) -> dict[str, Any]:
        while True:
            events = self.events()
            assert events is not None, "closed"
            for event in events:
                if isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                if isinstance(event, TextMessage):
                    return json.loads(event.data)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()


def answer(cluster: LocalCluster, user: str, prefix: bytes = b"", **kw: Any) -> tuple[int, str]:
    """Open, look at the answer, close: (101, "welcome") or (status, error code)."""
    raw = Raw(cluster.live()[0], kw.pop("source", "127.0.0.1"))
    try:
        status, body = raw.open(cluster, user, prefix, **kw)
    finally:
        raw.close()
    return status, str(body.get("type") if status == 101 else body.get("error", ""))


async def welcomed_soon(cluster: LocalCluster, user: str, prefix: bytes = b"", **kw: Any) -> None:
    """Welcomed, once the node has noticed that the address's previous connection closed."""
    with trio.fail_after(10):
        while (result := answer(cluster, user, prefix, **kw)) == (429, "too_many_connections"):
            await trio.sleep(0.1)
    assert result == (101, "welcome")


async def counted(cluster: LocalCluster, result: str) -> float:
    metrics = (await api(cluster, cluster.live()[0], "GET", "/metrics")).text
    found = re.search(rf'meshpush_handshakes_total\{{result="{result}"\}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def log_lines(cluster: LocalCluster) -> list[dict[str, Any]]:
    lines = cluster.live()[0].proc.log().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


# ---------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize(
    ("header", "a", "b", "blocked"),
    [
        (v1, "203.0.113.11", "203.0.113.12", "198.51.100.7"),
        (v2, "2001:db8::11", "203.0.113.13", "2001:db8:bad::7"),
    ],
    ids=["v1", "v2"],
)
async def test_proxy_header_carries_the_client_address(
    pp: LocalCluster, header: Any, a: str, b: str, blocked: str
) -> None:
    node = pp.live()[0]
    first, second = Raw(node), Raw(node)
    try:
        assert first.open(pp, "pa", header(a))[1]["type"] == "welcome"
        # max_connections_per_ip=1: another client behind the same proxy is another address
        assert second.open(pp, "pb", header(b))[1]["type"] == "welcome"
        assert answer(pp, "pc", header(a)) == (429, "too_many_connections")
        assert answer(pp, "pd", header(blocked)) == (403, "ip_blocked")
    finally:
        first.close()
        second.close()
    await welcomed_soon(pp, "pe", header(a))  # once the node has released the address
    refused = [line for line in log_lines(pp) if line["event"] == f"refused {blocked}: ip_blocked"]
    assert refused and refused[0]["client_ip"] == blocked


async def test_proxy_local_and_unknown_mean_the_proxy_itself(pp: LocalCluster) -> None:
    await welcomed_soon(pp, "local", v2(None))
    await welcomed_soon(pp, "unknown", b"PROXY UNKNOWN\r\n")  # 127.0.0.1 again: cap 1


async def test_a_proxy_chain_reads_forwarded_for_after_a_trusted_proxy_header(
    pp: LocalCluster,
) -> None:
    """A PROXY header naming another trusted proxy (or LOCAL): X-Forwarded-For is next."""
    blocked = ("198.51.100.9",)
    assert answer(pp, "c1", v1("127.0.0.1"), xff=blocked) == (403, "ip_blocked")
    assert answer(pp, "c2", v2(None), xff=blocked) == (403, "ip_blocked")
    # an untrusted address in the PROXY header is final: its X-Forwarded-For is not read
    assert answer(pp, "c3", v1("203.0.113.71"), xff=blocked) == (101, "welcome")


async def test_a_proxy_header_from_an_untrusted_peer_is_a_bad_request(pp: LocalCluster) -> None:
    before = await counted(pp, "bad_request")
    for header in (v1("203.0.113.20"), v2("203.0.113.20")):
        status, _ = answer(pp, "spoof", header, source="127.0.0.2")
        assert status == 400
    assert await counted(pp, "bad_request") >= before + 2
    # the same peer without a header is served by its own address
    await welcomed_soon(pp, "plain", source="127.0.0.2")


async def test_malformed_proxy_headers_are_closed_while_others_are_served(
    pp: LocalCluster,
) -> None:
    node = pp.live()[0]
    bystander = Raw(node)
    assert bystander.open(pp, "bystander", v1("203.0.113.30"))[1]["type"] == "welcome"
    before = await counted(pp, "bad_proxy_header")
    cases = {
        "missing": b"",  # required from a trusted peer: a plain upgrade request is refused
        "truncated": b"PROXY TCP4 203.0.11",
        "oversize": b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n",
        "bad_signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
        "v2_too_long": V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 5000),
        "bad_address": b"PROXY TCP4 203.0.113.999 127.0.0.1 1 2\r\n",
        "tls_first": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    }
    Raw(node).close()  # a load balancer's TCP health check: closed unanswered, not counted
    try:
        for name, prefix in cases.items():
            raw = Raw(node)
            try:
                if name == "truncated":
                    raw.sock.sendall(prefix)
                    raw.sock.shutdown(socket.SHUT_WR)  # and nothing more
                    assert raw.events() is None, name
                else:
                    assert raw.open(pp, "bad", prefix) == (0, {}), name  # closed, no answer
            finally:
                raw.close()
        seq = (await publish(pp, node, "bystander", {"still": "served"}))["seq"]
        frame = bystander.frame()
        assert (frame["type"], frame["seq"], frame["data"]) == ("msg", seq, {"still": "served"})
    finally:
        bystander.close()
    assert await counted(pp, "bad_proxy_header") == before + len(cases)
    assert any(
        line["event"].startswith("bad PROXY header from 127.0.0.1") for line in log_lines(pp)
    )


async def test_a_proxy_that_never_finishes_its_header_is_timed_out(pp: LocalCluster) -> None:
    raw = Raw(pp.live()[0])
    try:
        raw.sock.sendall(v2("203.0.113.40")[:20])  # 20 of 30 bytes, then silence
        with trio.fail_after(8):
            assert await trio.to_thread.run_sync(raw.events) is None  # handshake_timeout 2 s
    finally:
        raw.close()


# ---------------------------------------------------------------- X-Forwarded-For


async def test_forwarded_for_carries_the_client_address(xff: LocalCluster) -> None:
    node = xff.live()[0]
    first, second = Raw(node), Raw(node)
    try:
        chain = ("198.51.100.1, 203.0.113.41",)  # the client spoofed a blocked first hop
        assert first.open(xff, "xa", xff=chain)[1]["type"] == "welcome"
        assert second.open(xff, "xb", xff=("203.0.113.42, 127.0.0.1",))[1]["type"] == "welcome"
        assert answer(xff, "xc", xff=("203.0.113.41",)) == (429, "too_many_connections")
        assert answer(xff, "xd", xff=("198.51.100.7",)) == (403, "ip_blocked")
        assert answer(xff, "xe", xff=("203.0.113.43", "198.51.100.8")) == (403, "ip_blocked")
    finally:
        first.close()
        second.close()
    await welcomed_soon(xff, "xf", xff=("203.0.113.41",))
    # no header from the trusted peer: the peer is the client
    await welcomed_soon(xff, "xg")
    refused = [
        line for line in log_lines(xff) if line["event"] == "refused 198.51.100.7: ip_blocked"
    ]
    assert refused and refused[0]["client_ip"] == "198.51.100.7"


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(xff: LocalCluster) -> None:
    node = xff.live()[0]
    held = Raw(node, "127.0.0.3")
    try:
        # a blocked address claimed by an untrusted peer: ignored, 127.0.0.3 is the client
        assert held.open(xff, "ua", xff=("198.51.100.7",))[1]["type"] == "welcome"
        # and counted as 127.0.0.3 whatever it claims
        spoof = ("203.0.113.99",)
        assert answer(xff, "ub", xff=spoof, source="127.0.0.3") == (429, "too_many_connections")
    finally:
        held.close()


async def test_a_proxy_header_is_a_bad_request_when_the_protocol_is_off(xff: LocalCluster) -> None:
    assert answer(xff, "off", v1("203.0.113.50"))[0] == 400


async def test_tls_behind_a_proxy_v2_load_balancer(tmp_path: Path) -> None:
    """The node reads exactly the PROXY header, then its TLS handshake (an NLB passing TLS);
    every refusal (per-IP cap, node cap) reaches the client through both."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    pem = str(tmp_path / "s.pem")
    tls_node = {"tls_cert_file": pem, "tls_key_file": pem, "max_connections": 2}
    with node_of(tmp_path, proxy_protocol=True, **tls_node) as cluster:
        raws: list[Raw] = []

        def through_tls(user: str, header: bytes) -> tuple[int, dict[str, Any]]:
            raws.append(Raw(cluster.live()[0], tls=tls))  # connected now: counted from now
            return raws[-1].open(cluster, user, header)

        try:
            assert through_tls("t1", v2("203.0.113.60"))[1]["type"] == "welcome"
            status, body = through_tls("t2", v2("203.0.113.60"))
            assert (status, body["error"]) == (429, "too_many_connections")
            raws.pop().close()
            assert through_tls("t3", v1("203.0.113.61"))[1]["type"] == "welcome"
            # two open: the node is full, and says so after the header and TLS
            status, body = through_tls("t4", v2("203.0.113.62"))
            assert (status, body["error"]) == (503, "node_full")
        finally:
            for raw in raws:
                raw.close()
