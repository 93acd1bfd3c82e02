"""The node's wsproto connection layer through the public contract, on real nodes.

Frames from the fast path (plain) and the TLS path are parsed by an independent client
(Python ``websockets``); a client acking every message at 1,000 msg/s stays connected while a
frame flood is cut; a reader that stops reading is cut with 4008 — whether its messages come
live or through a replay — and then resumes without loss; a ``last`` from the future is refused.
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from conftest import make_cluster
from support import (
    Collector,
    api,
    assert_exact_chain,
    connected,
    publish,
    token,
    verify,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from meshpush.core.auth import issue_token
from meshpush.core.protocol import Close
from meshpush.local.devcluster import LocalCluster


@pytest.fixture(scope="module", params=["plain", "tls"])
def node_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, ssl.SSLContext | None]]:
    workdir = tmp_path_factory.mktemp(request.param)
    tls: dict[str, Any] = {}
    context = None
    if request.param == "tls":
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(workdir / "s.pem")
        )
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        tls = {"tls_cert_file": str(workdir / "s.pem"), "tls_key_file": str(workdir / "s.pem")}
        context = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
    with make_cluster(workdir / "c", nodes=1, heartbeat_timeout=30.0, **tls) as cluster:
        yield cluster, context


def open_ws(
    cluster: LocalCluster, user: str, context: ssl.SSLContext | None, query: str = ""
) -> ClientConnection:
    url = f"{cluster.live()[0].ws_url}?token={token(cluster, user)}&device=d1{query}"
    return connect(url, ssl=context, max_size=2**22, open_timeout=10)


def recv_json(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return frame


async def post(
    cluster: LocalCluster, context: ssl.SSLContext | None, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    node = cluster.live()[0]
    headers = {"authorization": f"Bearer {cluster.api_key}"}
    async with httpx.AsyncClient(verify=context or verify(), timeout=10) as http:
        resp = await http.post(f"{node.http_url}{path}", json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def test_frames_parse_with_an_independent_client(
    node_cluster: tuple[LocalCluster, ssl.SSLContext | None],
) -> None:
    """Replayed, live and broadcast frames of every WebSocket length encoding (7-bit, 16-bit,
    64-bit) are exactly the protocol's JSON for Python ``websockets``."""
    cluster, context = node_cluster
    user = f"indep-{time.monotonic_ns()}"
    sizes = [3, 300, 70_000]
    stored = [
        await post(cluster, context, "/v1/publish", {"user": user, "data": "s" * n}) for n in sizes
    ]
    ws = await trio.to_thread.run_sync(open_ws, cluster, user, context)
    try:
        welcome = await trio.to_thread.run_sync(recv_json, ws)
        assert welcome["type"] == "welcome" and welcome["user"] == user
        replayed = [await trio.to_thread.run_sync(recv_json, ws) for _ in sizes]
        assert [(m["seq"], m["data"]) for m in replayed] == [
            (s["seq"], "s" * n) for s, n in zip(stored, sizes, strict=True)
        ]
        live = [
            await post(
                cluster, context, "/v1/publish", {"user": user, "data": {"n": n, "p": "l" * n}}
            )
            for n in sizes
        ]
        bcast = await post(cluster, context, "/v1/broadcast", {"data": [1, "two", None]})
        got = [await trio.to_thread.run_sync(recv_json, ws) for _ in range(len(sizes) + 1)]
    finally:
        await trio.to_thread.run_sync(ws.close)
    assert [m["seq"] for m in got if m["ch"] == "user"] == [s["seq"] for s in live]
    assert [m["data"]["n"] for m in got if m["ch"] == "user"] == sizes
    assert next(m for m in got if m["ch"] == "broadcast")["seq"] == bcast["seq"]
    assert all(
        m["type"] == "msg" and set(m) == {"type", "ch", "seq", "prev", "id", "data"} for m in got
    )


async def post_one(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
    resp = await http.post("/v1/publish", json=body)
    assert resp.status_code == 202, resp.text


def ack_everything(ws: ClientConnection, count: int) -> tuple[list[int], str]:
    """Receive ``count`` messages, acking each one at once; (seqs, how it ended)."""
    seqs: list[int] = []
    try:
        while len(seqs) < count:
            frame = recv_json(ws, timeout=20)
            if frame["type"] == "msg":
                seqs.append(frame["seq"])
                ws.send(json.dumps({"type": "ack", "ch": frame["ch"], "seq": frame["seq"]}))
    except ConnectionClosed as exc:
        return seqs, f"closed {exc.rcvd.code if exc.rcvd else None}"
    except TimeoutError:
        return seqs, "timeout"
    return seqs, "ok"


@pytest.mark.parametrize("node_cluster", ["plain"], indirect=True)  # one transport is enough
async def test_an_acker_at_1000_msgs_per_second_stays_while_a_flood_is_cut(
    node_cluster: tuple[LocalCluster, ssl.SSLContext | None],
) -> None:
    cluster, context = node_cluster
    user = f"acker-{time.monotonic_ns()}"
    ws = await trio.to_thread.run_sync(open_ws, cluster, user, context)
    assert (await trio.to_thread.run_sync(recv_json, ws))["type"] == "welcome"
    total = 2_000
    result: list[tuple[list[int], str]] = []

    async def acker() -> None:
        result.append(await trio.to_thread.run_sync(ack_everything, ws, total))

    node = cluster.live()[0]
    headers = {"authorization": f"Bearer {cluster.api_key}"}
    async with (
        httpx.AsyncClient(base_url=node.http_url, headers=headers, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(acker)
        start = trio.current_time()
        for tick in range(total // 50):  # 50 messages every 50 ms: 1,000 msg/s
            async with trio.open_nursery() as publishers:
                for i in range(50):
                    body = {"user": user, "data": tick * 50 + i}
                    publishers.start_soon(post_one, http, body)
            await trio.sleep_until(start + (tick + 1) * 0.05)
    seqs, ended = result[0]
    assert ended == "ok" and len(seqs) == total
    assert seqs == sorted(seqs)
    # the same node still cuts a client that floods it with frames it must answer
    flood = await trio.to_thread.run_sync(open_ws, cluster, f"flood-{user}", context)

    def flood_pings() -> int | None:
        try:
            for _ in range(2_000):
                flood.send('{"type":"ping"}')
            while True:
                flood.recv(timeout=10)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    assert await trio.to_thread.run_sync(flood_pings) == Close.RATE_LIMITED
    await trio.to_thread.run_sync(ws.close)


async def test_a_resume_point_from_the_future_is_refused(
    node_cluster: tuple[LocalCluster, ssl.SSLContext | None],
) -> None:
    cluster, context = node_cluster
    ws = await trio.to_thread.run_sync(open_ws, cluster, "future", context, "&last=999999999")
    frame = await trio.to_thread.run_sync(recv_json, ws)
    assert (frame["type"], frame["code"], frame["ch"]) == ("error", "bad_resume", "user")
    with pytest.raises(ConnectionClosed) as closed:
        await trio.to_thread.run_sync(recv_json, ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == Close.BAD_REQUEST
    ws = await trio.to_thread.run_sync(open_ws, cluster, "future", context, "&blast=0&last=0")
    assert (await trio.to_thread.run_sync(recv_json, ws))["type"] == "welcome"
    await trio.to_thread.run_sync(ws.close)


# ---------------------------------------------------------------- slow consumers


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with make_cluster(
        tmp_path_factory.mktemp("slow"),
        nodes=1,
        session_queue=16,
        session_buffer_bytes=65536,
        slow_consumer_grace=1.0,
        heartbeat_timeout=60.0,
    ) as cluster:
        yield cluster


def stalled_reader(cluster: LocalCluster, user: str) -> socket.socket:
    """A client that completes the handshake and then stops reading (tiny receive buffer)."""
    node = cluster.live()[0]
    host, port = node.ws_url.split("//")[1].split("/")[0].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET /ws?token={token(cluster, user)}&device=d1 HTTP/1.1\r\nHost: {host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_until_close(sock: socket.socket) -> tuple[list[dict[str, Any]], int | None]:
    proto = Connection(ConnectionType.CLIENT)
    frames: list[dict[str, Any]] = []
    parts: list[str] = []
    while True:
        data = sock.recv(65536)
        proto.receive_data(data or None)
        for event in proto.events():
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    frames.append(json.loads("".join(parts)))
                    parts.clear()
            elif isinstance(event, CloseConnection):
                return frames, event.code
        if not data:
            return frames, None


async def wait_closed_by_server(cluster: LocalCluster, code: str, before: float) -> float:
    """Seconds until the node counted a close with ``code`` more than ``before`` times."""
    start = trio.current_time()
    with trio.fail_after(20):
        while await closes(cluster, code) <= before:
            await trio.sleep(0.1)
    return trio.current_time() - start


async def closes(cluster: LocalCluster, code: str) -> float:
    text = (await api(cluster, cluster.live()[0], "GET", "/metrics")).text
    needle = f'meshpush_session_closes_total{{code="{code}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(needle))


async def resume_all(cluster: LocalCluster, user: str, count: int) -> None:
    async with connected(cluster, user) as client:
        collector = Collector(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            await collector.wait_for(count)
            nursery.cancel_scope.cancel()
    assert len(collector.messages) == count
    assert_exact_chain(collector.messages)


async def publish_many(cluster: LocalCluster, user: str, count: int, payload: str) -> None:
    async def some(start: int) -> None:
        for i in range(start, count, 10):
            await publish(cluster, cluster.live()[0], user, f"{i}{payload}")

    async with trio.open_nursery() as nursery:
        for start in range(10):
            nursery.start_soon(some, start)


@pytest.mark.parametrize("path", ["live", "replay"])
async def test_a_reader_that_stops_is_cut_4008_and_resumes_losslessly(
    slow: LocalCluster, path: str
) -> None:
    """The close comes within the grace time whichever path the messages took (live or a
    replay from the stream); the client then reads what was buffered and the 4008 close."""
    user = f"slow-{path}-{time.monotonic_ns()}"
    count = 120
    payload = "p" * 4000
    before = await closes(slow, "4008")
    if path == "replay":
        await publish_many(slow, user, count, payload)
    sock = await trio.to_thread.run_sync(stalled_reader, slow, user)
    try:
        async with trio.open_nursery() as nursery:
            if path == "live":
                nursery.start_soon(publish_many, slow, user, count, payload)
            took = await wait_closed_by_server(slow, "4008", before)
            frames, code = await trio.to_thread.run_sync(read_until_close, sock)
    finally:
        sock.close()
    assert code == Close.SLOW_CONSUMER
    assert took < 15  # the grace (plus publishing), not the 60 s heartbeat timeout
    seqs = [f["seq"] for f in frames if f["type"] == "msg"]
    assert seqs == sorted(seqs) and len(seqs) < count
    await resume_all(slow, user, count)


# ---------------------------------------------------------------- mass closes


def hold_sessions(port: int, tokens: list[str], stop: threading.Event) -> tuple[int, float]:
    """Open a session per token (raw sockets) and read until the node has closed every one of
    them (or ``stop``). Returns (sessions welcomed, seconds until every handshake had an
    answer: a welcome or a refusal)."""
    start = time.monotonic()
    sel = selectors.DefaultSelector()
    for tok in tokens:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setblocking(False)
        sock.send(
            f"GET /ws?token={tok}&device=d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        sel.register(sock, selectors.EVENT_READ, [False])
    welcomed = answered = 0
    answered_in = float("inf")
    while sel.get_map() and not stop.is_set():
        for key, _ in sel.select(0.2):
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            welcome = b"welcome" in data
            if not key.data[0] and (welcome or b'"error"' in data or not data):
                key.data[0] = True  # answered: welcomed, refused, or closed
                answered += 1
                welcomed += int(welcome)
                if answered == len(tokens):
                    answered_in = time.monotonic() - start
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return welcomed, answered_in


def lease_of(cluster: LocalCluster, node_id: str) -> int:
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "etcdctl"),
            f"--endpoints={cluster.etcd_endpoint}",
            *("get", f"/meshpush/{cluster.cluster}/nodes/{node_id}", "-w", "json"),
        ],
        capture_output=True,
        check=True,
        timeout=10,
    )
    lease: int = json.loads(out.stdout)["kvs"][0]["lease"]
    return lease


async def mass_close(cluster: LocalCluster, count: int, ttl: float, name: str) -> tuple[int, float]:
    """``count`` sessions whose tokens all expire ``ttl`` s from now: wait until the node has
    closed every one (or refused it, if its token expired first). Returns what
    :func:`hold_sessions` does; when all were welcomed, checks that all closed with 4401."""
    node = cluster.live()[0]
    port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
    expiry = time.time() + ttl
    tokens = [
        issue_token(cluster.token_secret, f"{name}-{i}", ttl=ttl, now=expiry - ttl)
        for i in range(count)
    ]
    before = await closes(cluster, "4401")
    stop = threading.Event()
    try:
        with trio.fail_after(ttl + 90):
            welcomed, answered_in = await trio.to_thread.run_sync(
                hold_sessions, port, tokens, stop, abandon_on_cancel=True
            )
    finally:
        stop.set()  # the client thread ends whatever happened
    if welcomed == count:
        await wait_until(lambda: closes_above(cluster, "4401", before + count - 1), timeout=30)
        assert await closes(cluster, "4401") == before + count
    return welcomed, answered_in


async def closes_above(cluster: LocalCluster, code: str, floor: float) -> bool:
    return await closes(cluster, code) > floor


@pytest.mark.timeout(400)
async def test_thousands_of_sessions_closing_at_once_keep_the_lease(tmp_path: Path) -> None:
    """3,000 sessions arriving at once, then all closed at the same instant (their tokens expire
    together: 4401) by one node while its etcd lease (the default TTL, 3 s) stays the same:
    handshake surges and mass closes never starve the keepalive.

    Every session must be welcomed before the tokens expire; on a loaded machine the surge
    can take longer than the first tokens live (10 s). Then the round is done again with
    tokens that live twice as long as that surge took (at most 3 rounds); the lease must
    survive every round."""
    count = 3000
    with make_cluster(
        tmp_path / "c",
        nodes=1,
        lease_ttl=3,
        handshake_rate=1e6,
        handshake_burst=10**6,
        max_connections_per_ip=10**6,
        heartbeat_timeout=120.0,
        heartbeat_interval=60.0,
        token_leeway=0.0,
    ) as cluster:
        node = cluster.live()[0]
        lease = lease_of(cluster, node.id)
        ttl, rounds = 10.0, []
        for attempt in range(3):
            welcomed, answered_in = await mass_close(cluster, count, ttl, f"mass{attempt}")
            rounds.append((ttl, welcomed, answered_in))
            if welcomed == count:
                break
            ttl = min(max(2 * ttl, 2 * answered_in), 120.0)
        else:
            raise AssertionError(f"the surge never fit in the tokens' life: {rounds}")
        assert lease_of(cluster, node.id) == lease
        log = (tmp_path / "c" / f"{node.id}.log").read_text()
        assert log.count("registered ") == 1, log[-2000:]
