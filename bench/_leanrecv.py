"""The unicast benchmark's lean receivers: one user's session per raw socket, all on epoll.

``meshpush bench unicast --receiver lean`` (the default) reads the deliveries with this instead
of the client SDK, as the fan-out benchmark reads with ``bench._wsload``: the receivers are the
measuring apparatus, and on a 2-core machine every CPU second they spend is taken from the
nodes and NATS whose latency is measured. It still does what a client must: a token per user,
the redirect to the owner, the welcome, every ``msg`` frame parsed (its ``data`` carries the
send time and the message number), the chain checked (``prev`` is the seq before), a
cumulative ``ack`` per ``ack_interval`` (so the nodes write cursors as for real clients),
pongs to pings. ``--receiver sdk`` keeps the trio client SDK (meshpush.client).
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from bench import _hops
from bench._procs import tune_gc
from bench._wsload import KEY, READ_SIZE, client_frame, frame_at, take_frames

CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class Session:
    """One user's session: its socket, unparsed bytes, last seq and last acked seq."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    last: int = 0
    acked: int = 0
    breaks: int = 0


def _upgrade(url: str, query: str) -> tuple[socket.socket, bytearray]:
    """Open a WebSocket to ``url`` (blocking, bounded); the socket and what came after the 101."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=CONNECT_TIMEOUT)
    try:
        return sock, _handshake(sock, url, parts.path, parts.netloc, query)
    except BaseException:
        sock.close()
        raise


def _handshake(sock: socket.socket, url: str, path: str, netloc: str, query: str) -> bytearray:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = (
        f"GET {path}?{query} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(READ_SIZE)
        if not chunk:
            raise OSError(f"{url}: closed during the upgrade")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise OSError(f"{url}: upgrade refused: {head[:80]!r}")
    return bytearray(rest)


def _first_frame(sock: socket.socket, buf: bytearray) -> dict[str, Any]:
    """The session's first JSON frame (the welcome or a redirect), read blocking; what came
    after it stays in ``buf``."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        span = frame_at(buf, 0)
        if span is not None:
            opcode, payload = buf[0] & 0x0F, bytes(buf[span[0] : span[1]])
            del buf[: span[1]]
            if opcode == 1:
                obj: dict[str, Any] = json.loads(payload)
                return obj
            continue
        chunk = sock.recv(READ_SIZE)
        if not chunk:
            break
        buf += chunk
    raise OSError("no welcome")


def connect(ws_url: str, token: str) -> Session:
    """A session for the token's user: through ``ws_url``, then its owner if redirected."""
    query = f"token={quote(token)}&device=bench"
    for _ in range(3):
        sock, buf = _upgrade(ws_url, query)
        try:
            first = _first_frame(sock, buf)
        except BaseException:
            sock.close()
            raise
        if first.get("type") == "welcome":
            sock.setblocking(False)
            return Session(sock, buf)
        sock.close()
        if first.get("type") != "redirect":
            raise OSError(f"refused: {first}")
        ws_url = str(first["url"])
    raise OSError("redirected too often")


class Receiver:
    """Every session of this process on one epoll: read, check, record, ack."""

    def __init__(self, sessions: list[Session], ack_interval: float, hops: bool) -> None:
        self.sessions = {s.sock.fileno(): s for s in sessions}
        self.ack_interval = ack_interval
        self.hops = hops
        self.latencies: list[float] = []
        self.numbers: list[int] = []
        self.times: list[float] = []
        self.poll = select.epoll()
        for fd in self.sessions:
            self.poll.register(fd, select.EPOLLIN)

    def close(self) -> None:
        self.poll.close()
        for session in self.sessions.values():
            session.sock.close()

    def run(self, expected: int, timeout: float) -> None:
        """Read until ``expected`` messages arrived (or ``timeout`` s passed)."""
        deadline = time.monotonic() + timeout
        next_ack = time.monotonic() + self.ack_interval
        for session in self.sessions.values():
            self._handle(session)  # what came with the welcome
        while len(self.numbers) < expected and time.monotonic() < deadline:
            for fd, _ in self.poll.poll(min(max(self.ack_interval, 0.001), 0.5)):
                session = self.sessions[fd]
                try:
                    chunk = session.sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise OSError("a session was closed by the node")
                session.buf += chunk
                self._handle(session)
            if time.monotonic() >= next_ack:
                self._ack_all()
                next_ack = time.monotonic() + self.ack_interval
        self._ack_all()

    def _handle(self, session: Session) -> None:
        for opcode, payload in take_frames(session.buf):
            if opcode == 1:
                self._on_text(session, payload)
            elif opcode == 9:
                session.sock.send(client_frame(10, payload))
            elif opcode == 8:
                raise OSError(f"closed by the node: {payload[:2].hex()}")

    def _on_text(self, session: Session, payload: bytes) -> None:
        frame = json.loads(payload)
        if frame.get("type") != "msg":
            return
        now = time.monotonic()
        seq, prev, data = frame["seq"], frame.get("prev"), frame["data"]
        if seq <= session.last:  # a redelivery (as the SDK, skipped; the run counts numbers)
            return
        if session.last and isinstance(prev, int) and prev != session.last:
            session.breaks += 1
        session.last = seq
        self.latencies.append(now - data["t"])
        self.numbers.append(data["n"])
        self.times.append(now)
        if self.hops:
            _hops.record("send", data["n"], data["t"])
            _hops.record("read", data["n"], now)
            _hops.record("handler", data["n"], now)

    def _ack_all(self) -> None:
        for session in self.sessions.values():
            if session.last > session.acked:
                ack = json.dumps({"type": "ack", "ch": "user", "seq": session.last})
                session.sock.send(client_frame(1, ack.encode()))
                session.acked = session.last


def lean_receiver(
    ws_urls: list[str],
    secret: str,
    users: list[str],
    expected: int,
    ack_interval: float,
    out: Any,
) -> None:
    """Connect one lean session per user; report latencies once ``expected`` arrived (the
    same answer as ``bench.unicast.receiver``)."""
    from meshpush.core.auth import issue_token

    hops = _hops.start("receiver")
    sessions: list[Session] = []
    try:
        for i, user in enumerate(users):
            sessions.append(connect(ws_urls[i % len(ws_urls)], issue_token(secret, user, 3600)))
        receiver = Receiver(sessions, ack_interval, hops)
    except Exception as exc:
        for session in sessions:
            session.sock.close()
        out.put({"error": f"lean receiver: {exc!r}"})
        return
    tune_gc()
    out.put({"ready": os.getpid()})
    cpu = time.process_time()
    try:
        receiver.run(expected, 120)
    except Exception as exc:
        out.put({"error": f"lean receiver: {exc!r}"})
        return
    finally:
        cpu = time.process_time() - cpu
        receiver.close()
    out.put(
        {
            "latencies": receiver.latencies,
            "numbers": receiver.numbers,
            "last": max(receiver.times) if receiver.times else 0.0,
            "cpu": cpu,
            "pid": os.getpid(),
            "chain_breaks": sum(s.breaks for s in sessions),
        }
    )
