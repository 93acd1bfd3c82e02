"""Many minimal WebSocket client connections in one process, driven over stdin/stdout.

The benchmarks run several of these worker processes (``ReaderPool``) so that reading is not
done by the process that measures, and so that a saturated reader is visible: every answer
carries the CPU seconds the worker spent. The client is a raw nonblocking-socket RFC 6455 client
on ``select.epoll``: it sends the upgrade request, checks for ``101``, counts complete data
frames, answers pings with pongs (so a server's heartbeat keeps the sessions alive) and records
close codes. Nothing in it depends on which server is on the other side.

Worker protocol (one JSON object per line, each command answered by one line):

- ``{"op": "connect", "host", "port", "paths": [...], "concurrency", "timeout"}``: open one
  connection per path (at most ``concurrency`` handshakes in flight) and wait until each has
  received its first data frame (the welcome); answers ``{"ok", "failed", "errors", "t_start",
  "t_end", "cpu"}`` (times from the system-wide ``CLOCK_MONOTONIC``).
- ``{"op": "expect", "count": K, "timeout"}``: read until every open connection has received
  ``K`` more data frames (or the timeout); answers ``{"frames", "complete", "t_last", "cpu"}``.
- ``{"op": "idle", "seconds"}``: keep the connections (answering pings) for a while.
- ``{"op": "close"}``: close every connection and exit.

    python -m bench._wsload      # a worker; started by ReaderPool
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench._procs import Procs

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # any 16-byte base64 value will do for a benchmark client
READ_SIZE = 256 * 1024


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class Conn:
    __slots__ = ("buf", "close_code", "frames", "opened", "path", "sock", "state")

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.buf = bytearray()
        self.state = "connecting"  # -> handshake -> open -> closed
        self.frames = 0  # complete data frames received
        self.opened = False  # first data frame (the welcome) seen
        self.close_code: int | None = None


def frame_at(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """The server frame (unmasked) at ``pos`` of ``buf``: its payload's (start, end), or None
    while it is incomplete."""
    size = len(buf)
    if size - pos < 2:
        return None
    n, head = buf[pos + 1] & 0x7F, 2
    if n == 126:
        if size - pos < 4:
            return None
        n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
    elif n == 127:
        if size - pos < 10:
            return None
        n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
    end = pos + head + n
    return None if end > size else (pos + head, end)


def take_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete server frames off ``buf``: (opcode, payload) each."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while (span := frame_at(buf, pos)) is not None:
        out.append((buf[pos] & 0x0F, bytes(buf[span[0] : span[1]])))
        pos = span[1]
    del buf[:pos]
    return out


def parse_frames(conn: Conn) -> list[bytes]:
    """Consume complete frames from ``conn.buf``; count data frames, return ping payloads."""
    buf = conn.buf
    pos, pings = 0, []
    while (span := frame_at(buf, pos)) is not None:
        b0, (start, end) = buf[pos], span
        opcode = b0 & 0x0F
        if opcode < 3:
            if b0 & 0x80:
                conn.frames += 1
        elif opcode == 9:
            pings.append(bytes(buf[start:end]))
        elif opcode == 8:
            payload = buf[start:end]
            conn.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            conn.state = "closed"
        pos = end
    if pos:
        del buf[:pos]
    return pings


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (all-zero mask key: valid, and the payload stays as is)."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


@dataclass
class Worker:
    ep: select.epoll = field(default_factory=select.epoll)
    conns: dict[int, Conn] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed: int = 0
    received: int = 0  # data frames received on every connection so far (kept as they come)

    # ------------------------------------------------------------ connect

    def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        host, port = cmd["host"], int(cmd["port"])
        pending = list(reversed(cmd["paths"]))
        concurrency = int(cmd.get("concurrency", 100))
        deadline = time.monotonic() + float(cmd.get("timeout", 120))
        t_start, cpu = time.monotonic(), time.process_time()
        in_flight = 0
        while (pending or in_flight) and time.monotonic() < deadline:
            while pending and in_flight < concurrency:
                in_flight += self._open(host, port, pending.pop())
            for conn in self._poll(0.05):
                if conn.opened:
                    continue
                if conn.state == "open" and conn.frames:
                    conn.opened = True  # welcomed
                    in_flight -= 1
                elif conn.state == "closed":
                    conn.opened = True  # settled: failed
                    in_flight -= 1
                    self._fail(f"closed ({conn.close_code}) before a first frame")
        return {
            "ok": sum(1 for c in self.conns.values() if c.state == "open" and c.opened),
            "failed": self.failed + len(pending) + in_flight,
            "errors": self.errors[:5],
            "t_start": t_start,
            "t_end": time.monotonic(),
            "cpu": time.process_time() - cpu,
        }

    def _open(self, host: str, port: int, path: str) -> int:
        """Start one connection; 1 if it is under way, 0 if it failed at once."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, path)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(os.strerror(err))
            sock.close()
            return 0
        self.conns[sock.fileno()] = conn
        self.ep.register(sock.fileno(), select.EPOLLOUT)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        conn.buf = bytearray(request.encode())  # the request waits here until writable
        return 1

    def _fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(why)

    # ------------------------------------------------------------ the loop

    def _poll(self, timeout: float) -> Iterator[Conn]:
        """Handle ready sockets; yield each connection that had an event."""
        for fd, events in self.ep.poll(timeout):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            try:
                if conn.state == "connecting":
                    self._send_request(conn, events)
                else:
                    self._read(conn)
            except OSError as exc:
                self._drop(conn, f"{type(exc).__name__}: {exc}")
            yield conn

    def _send_request(self, conn: Conn, events: int) -> None:
        if events & (select.EPOLLERR | select.EPOLLHUP):
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            raise OSError(err, os.strerror(err))
        conn.sock.send(conn.buf)  # a few hundred bytes: fits in an empty socket buffer
        conn.buf = bytearray()
        conn.state = "handshake"
        self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def _read(self, conn: Conn) -> None:
        data = conn.sock.recv(READ_SIZE)
        if not data:
            if conn.state != "closed":
                conn.close_code = conn.close_code or 1006
                conn.state = "closed"
            self._unregister(conn)
            return
        conn.buf += data
        if conn.state == "handshake":
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(conn.buf[: conn.buf.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                raise OSError(f"upgrade refused: {status.decode(errors='replace')}")
            del conn.buf[: end + 4]
            conn.state = "open"
        before = conn.frames
        for payload in parse_frames(conn):
            conn.sock.send(client_frame(0xA, payload))
        self.received += conn.frames - before

    def _unregister(self, conn: Conn) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.ep.unregister(conn.sock.fileno())

    def _drop(self, conn: Conn, why: str) -> None:
        if conn.state != "closed":
            conn.state = "closed"
            conn.close_code = conn.close_code or 1006
        if not conn.opened and len(self.errors) < 20:
            self.errors.append(why)
        self._unregister(conn)

    # ------------------------------------------------------------ expect / idle / close

    def expect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count = int(cmd["count"])
        deadline = time.monotonic() + float(cmd.get("timeout", 120))
        live = [c for c in self.conns.values() if c.state == "open"]
        start = {id(c): c.frames for c in live}
        want = count * len(live)
        cpu = time.process_time()
        base, got, t_last = self.received, 0, time.monotonic()
        while got < want and time.monotonic() < deadline:
            for _ in self._poll(0.05):
                pass
            if self.received - base != got:  # a running total: no walk over every connection
                got, t_last = self.received - base, time.monotonic()
        complete = sum(1 for c in live if c.frames - start[id(c)] >= count)
        return {
            "frames": got,
            "wanted": want,
            "complete": complete,
            "connections": len(live),
            "t_last": t_last,
            "cpu": time.process_time() - cpu,
            "closes": self.close_codes(),
        }

    def idle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + float(cmd["seconds"])
        while time.monotonic() < deadline:
            for _ in self._poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                pass
        live = sum(1 for c in self.conns.values() if c.state == "open")
        return {"open": live, "closes": self.close_codes()}

    def close_codes(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        for c in self.conns.values():
            if c.close_code is not None:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        return codes

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.sock.close()
        self.conns.clear()


def serve() -> None:
    """The worker: read commands from stdin, answer on stdout, until ``close`` or EOF."""
    raise_fd_limit()
    worker = Worker()
    ops = {"connect": worker.connect, "expect": worker.expect, "idle": worker.idle}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "close":
            break
        answer = ops[cmd["op"]](cmd)
        print(json.dumps(answer), flush=True)
    worker.close()


class ReaderPool(Procs):
    """``workers`` reader processes sharing the connections of one benchmark run."""

    def __init__(self, workers: int) -> None:
        super().__init__("bench._wsload", [[]] * max(1, workers))

    def connect(
        self, host: str, port: int, paths: list[str], concurrency: int = 64, timeout: float = 300
    ) -> dict[str, Any]:
        """Open one connection per path, spread over the workers; totals of the answers."""
        n = len(self.procs)
        answers = self.ask(
            [
                {
                    "op": "connect",
                    "host": host,
                    "port": port,
                    "paths": paths[i::n],
                    "concurrency": max(1, concurrency // n),
                    "timeout": timeout,
                }
                for i in range(n)
            ]
        )
        return {
            "ok": sum(a["ok"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]][:5],
            "t_start": min(a["t_start"] for a in answers),
            "t_end": max(a["t_end"] for a in answers),
            "reader_cpu": [a["cpu"] for a in answers],
        }

    def send_expect(self, count: int, timeout: float = 300) -> None:
        """Start every worker counting ``count`` more frames per connection (no wait)."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "expect", "count": count, "timeout": timeout}))
            proc.stdin.write("\n")
            proc.stdin.flush()

    def collect(self) -> list[dict[str, Any]]:
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"reader worker {proc.pid} died (exit {proc.poll()})")
            answers.append(json.loads(line))
        return answers

    def idle(self, seconds: float) -> list[dict[str, Any]]:
        return self.ask([{"op": "idle", "seconds": seconds}] * len(self.procs))


if __name__ == "__main__":
    serve()
