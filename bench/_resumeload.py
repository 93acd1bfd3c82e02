"""Lean meshpush clients in worker processes: the resume protocol on raw sockets, and a publisher.

``bench/failover.py`` needs ~1,500 sessions that behave like the trio SDK (``meshpush.client``)
after a node dies, at a cost low enough that the clients never set the pace. One worker process
holds hundreds of sessions on ``select.epoll`` with a minimal RFC 6455 client and follows the
SDK's reconnect policy (docs/protocol.md §6, meshpush/client.py):

- the token goes in a first ``auth`` frame; ``device``, ``last``, ``epoch`` (and ``avoid``) in
  the query; ``last`` is the newest user seq received, so a resume replays only what is missing;
- a ``redirect`` frame (then close 4302) is followed at once, at most ``MAX_HOPS`` in a row;
- a welcomed session (or a redirect target) that ends abruptly (EOF or reset without a close
  frame, 1006/1001, connect refused, timeout) marks its node unreachable: the next attempt goes
  straight to the next bootstrap URL with ``avoid=<node>`` (the node holds the handshake until
  the ring no longer names the dead node);
- anything else backs off with full jitter: ``uniform(0, min(cap, base * 2**attempt))``, the
  attempt count reset by a welcome;
- every ``msg`` is acked at once (cumulative; acks that advance the cursor cost no credits).

Each session keeps a timeline (welcome, close, connect attempt, redirect; monotonic times from
the system-wide ``CLOCK_MONOTONIC``) and every user seq received with its receive time, so the
coordinator can say where the time went and check that nothing was lost or duplicated.

Worker protocol (one JSON object per line on stdin, each answered by one line on stdout):

- ``{"op": "connect", "bootstraps", "users", "secret", "concurrency", "timeout"}``: connect
  every user (user i starts at bootstrap i mod n); answers when each is welcomed (or timeout):
  ``{"ok", "failed", "nodes": {user: node}, "cpu", "t_start", "t_end"}``.
- ``{"op": "run", "seconds"}``: serve (read, ack, reconnect) for a while; answers ``{"cpu"}``.
- ``{"op": "report"}``: ``{user: {"node", "seqs": [[seq, t]], "dups", "breaks", "events"}}``.
- ``{"op": "close"}``: close everything and exit.

Publisher (``python -m bench._resumeload publisher URL... --api-key K``), same line protocol:

- ``{"op": "round", "users"}``: one message per user (``POST /v1/publish/batch``).
- ``{"op": "steady", "users", "rate", "seconds", "chunk", "burst_after"}``: round-robin over
  ``users`` at ``rate`` messages/s in batches of ``chunk`` for ``seconds``; ``burst_after``
  seconds in, one message to every user at once (``burst_done``: when it was stored).
  Both answer ``{"published": {user: [seq, ...]}, "failed", "requests", "late", "cpu"}``
  (``late``: the seconds the last request finished behind its schedule: > 0 means the
  publisher could not hold the rate).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import math
import os
import random
import select
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from bench._procs import Procs
from bench._wsload import take_frames

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
READ_SIZE = 64 * 1024
MAX_HOPS = 5
CONNECT_TIMEOUT = 10.0  # the SDK's connect_timeout: upgrade + first frame
MAX_EVENTS = 64  # per session timeline bound


def frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (all-zero mask key: valid, and the payload stays as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/ws"


@dataclass(slots=True)
class User:
    """One (user, device) as the SDK sees it across its connections."""

    name: str
    token: str
    bootstrap: int
    last: int = 0
    epoch: str = ""
    node: str = ""  # welcomed node of the current session ("" between sessions)
    node_url: str = ""
    next_url: str = ""  # where a backoff timer reconnects to
    avoid: tuple[str, str] = ("", "")
    attempt: int = 0
    welcomed: bool = False  # the current or last session reached welcome (resets backoff)
    dups: int = 0
    breaks: int = 0
    seqs: list[tuple[int, float]] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def note(self, kind: str, detail: str = "") -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append((time.monotonic(), kind, detail))


class Conn:
    __slots__ = (
        "buf",
        "close_code",
        "deadline",
        "hops",
        "redirect",
        "sock",
        "state",
        "target",
        "url",
        "user",
    )

    def __init__(self, user: User, url: str, hops: int, target: tuple[str, str]) -> None:
        self.user, self.url, self.hops, self.target = user, url, hops, target
        self.sock = socket.socket(socket.AF_INET)
        self.buf = bytearray()
        self.state = "connecting"  # -> handshake -> open -> closed
        self.close_code: int | None = None
        self.redirect: tuple[str, str] | None = None
        self.deadline = time.monotonic() + CONNECT_TIMEOUT


class Worker:
    def __init__(self, cmd: dict[str, Any]) -> None:
        from meshpush.core.auth import issue_token

        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.bootstraps: list[str] = list(cmd["bootstraps"])
        self.backoff_base = float(cmd.get("backoff_base", 0.05))
        self.backoff_cap = float(cmd.get("backoff_cap", 5.0))
        self.users = [
            User(name, issue_token(cmd["secret"], name, 3600), i % len(self.bootstraps))
            for i, name in enumerate(cmd["users"])
        ]
        self.timers: list[tuple[float, int, User]] = []  # (due, tiebreak, user)
        self.counter = 0
        self.connecting = 0

    # ------------------------------------------------------------ connecting

    def start(
        self, user: User, url: str, hops: int = 0, target: tuple[str, str] = ("", "")
    ) -> None:
        conn = Conn(user, url, hops, target)
        host, port, path = parse_url(url)
        query = {"device": "default", "last": str(user.last), "blast": "0"}
        if user.epoch:
            query["epoch"] = user.epoch
        if user.avoid[0]:
            query["avoid"] = user.avoid[0]
        conn.buf = bytearray(
            f"GET {path}?{urllib.parse.urlencode(query)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        user.note(
            "connect", f"{host}:{port}" + (f" avoid={user.avoid[0]}" if user.avoid[0] else "")
        )
        conn.sock.setblocking(False)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connecting += 1
        err = conn.sock.connect_ex((host, port))
        self.conns[conn.sock.fileno()] = conn
        if err not in (0, errno.EINPROGRESS):
            self.ended(conn, os.strerror(err), abrupt=True)
            return
        self.ep.register(conn.sock.fileno(), select.EPOLLOUT)

    def rotate(self, user: User) -> str:
        """The next bootstrap URL, skipping the avoided node's when there is another."""
        for _ in range(len(self.bootstraps)):
            user.bootstrap += 1
            if self.bootstraps[user.bootstrap % len(self.bootstraps)] != user.avoid[1]:
                break
        return self.bootstraps[user.bootstrap % len(self.bootstraps)]

    def ended(self, conn: Conn, why: str, abrupt: bool) -> None:
        """A connection is over: follow a redirect, go elsewhere at once, or back off."""
        if conn.state == "done":
            return
        if conn.state != "open" or conn.user.node == "":
            self.connecting -= 1
        conn.state = "done"
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.ep.unregister(conn.sock.fileno())
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        user = conn.user
        was = (user.node, user.node_url)
        user.node = ""
        user.note("closed", f"{conn.close_code or why}")
        if conn.redirect is not None and conn.hops < MAX_HOPS:
            user.note("redirect", conn.redirect[0])
            self.start(user, conn.redirect[1], conn.hops + 1, conn.redirect)
            return
        if conn.close_code == 4302 and conn.hops < MAX_HOPS:  # redirect without a frame
            self.start(user, self.rotate(user))
            return
        dead = abrupt or conn.close_code in (1001, 1006)
        node = conn.target if conn.hops else was
        if dead and node[0] and node != user.avoid:
            user.avoid = node  # that node just died under us: straight to another one
            self.start(user, self.rotate(user))
            return
        if user.welcomed:
            user.welcomed, user.attempt = False, 0
        user.attempt += 1
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** min(user.attempt, 20))
        delay = random.uniform(0, ceiling)
        user.note("backoff", f"{delay:.3f}")
        self.counter += 1
        user.next_url = self.rotate(user)
        heapq.heappush(self.timers, (time.monotonic() + delay, self.counter, user))

    # ------------------------------------------------------------ the loop

    def step(self, timeout: float) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, user = heapq.heappop(self.timers)
            self.start(user, user.next_url)
        if self.timers:
            timeout = max(0.0, min(timeout, self.timers[0][0] - now))
        for fd, events in self.ep.poll(timeout):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            try:
                if conn.state == "connecting":
                    self.send_request(conn, events)
                else:
                    self.read(conn)
            except OSError as exc:
                self.ended(conn, f"{type(exc).__name__}: {exc}", abrupt=True)

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if (conn.state != "open" or not conn.user.node) and now > conn.deadline:
                self.ended(conn, "connect timeout", abrupt=True)

    def send_request(self, conn: Conn, events: int) -> None:
        if events & (select.EPOLLERR | select.EPOLLHUP):
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            raise OSError(err, os.strerror(err))
        conn.sock.send(conn.buf)
        conn.buf = bytearray()
        conn.state = "handshake"
        self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def read(self, conn: Conn) -> None:
        data = conn.sock.recv(READ_SIZE)
        if not data:
            self.ended(conn, "eof", abrupt=conn.close_code is None)
            return
        conn.buf += data
        if conn.state == "handshake":
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(conn.buf[: conn.buf.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                conn.close_code = 4000 + int(status.split()[1])
                self.ended(conn, status.decode(errors="replace"), abrupt=False)
                return
            del conn.buf[: end + 4]
            conn.state = "open"
            token = json.dumps({"type": "auth", "token": conn.user.token}).encode()
            conn.sock.send(frame(0x1, token))
        self.frames(conn)

    def frames(self, conn: Conn) -> None:
        for opcode, payload in take_frames(conn.buf):
            if opcode == 1:
                self.on_text(conn, json.loads(payload))
            elif opcode == 9:
                conn.sock.send(frame(0xA, payload))
            elif opcode == 8:
                conn.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                with contextlib.suppress(OSError):
                    conn.sock.send(frame(0x8, payload[:2]))
                self.ended(conn, "close", abrupt=False)
                return

    def on_text(self, conn: Conn, f: dict[str, Any]) -> None:
        user, kind = conn.user, f.get("type")
        if kind == "msg" and f.get("ch") == "user":
            seq, prev = int(f["seq"]), f.get("prev")
            if seq <= user.last:
                user.dups += 1
                return
            if user.last and isinstance(prev, int) and prev != user.last:
                user.breaks += 1
            user.seqs.append((seq, time.monotonic()))
            user.last = seq
            ack = json.dumps({"type": "ack", "ch": "user", "seq": seq}).encode()
            conn.sock.send(frame(0x1, ack))
        elif kind == "welcome":
            self.connecting -= 1
            user.node, user.node_url = str(f["node"]), conn.url
            user.epoch = str(f.get("epoch") or user.epoch)
            user.avoid, user.welcomed = ("", ""), True
            user.note("welcome", user.node)
        elif kind == "redirect":
            conn.redirect = (str(f.get("node") or ""), str(f.get("url") or ""))
        elif kind == "error":
            user.note("error", str(f.get("code")))

    # ------------------------------------------------------------ commands

    def serve_for(self, seconds: float, until_settled: bool = False) -> None:
        deadline = time.monotonic() + seconds
        next_check = 0.0
        while (now := time.monotonic()) < deadline:
            if until_settled and self.connecting == 0 and not self.timers:
                return
            self.step(min(0.05, deadline - now))
            if now > next_check:
                self.check_timeouts()
                next_check = now + 0.5

    def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t_start, cpu = time.monotonic(), time.process_time()
        pending = list(reversed(self.users))
        concurrency = int(cmd.get("concurrency", 64))
        deadline = t_start + float(cmd.get("timeout", 120))
        while (pending or self.connecting or self.timers) and time.monotonic() < deadline:
            while pending and self.connecting < concurrency:
                user = pending.pop()
                self.start(user, self.bootstraps[user.bootstrap])
            self.serve_for(0.05)
        ok = sum(1 for u in self.users if u.node)
        return {
            "ok": ok,
            "failed": len(self.users) - ok,
            "nodes": {u.name: u.node for u in self.users},
            "t_start": t_start,
            "t_end": time.monotonic(),
            "cpu": time.process_time() - cpu,
        }

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cpu, t0 = time.process_time(), time.monotonic()
        self.serve_for(float(cmd["seconds"]))
        return {"cpu": time.process_time() - cpu, "wall": time.monotonic() - t0}

    def report(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            u.name: {
                "node": u.node,
                "seqs": u.seqs,
                "dups": u.dups,
                "breaks": u.breaks,
                "events": u.events,
            }
            for u in self.users
        }

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.sock.close()
        self.conns.clear()


def serve_clients() -> None:
    from bench._wsload import raise_fd_limit

    raise_fd_limit()
    worker: Worker | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "close":
            break
        if cmd["op"] == "connect":
            worker = Worker(cmd)
        assert worker is not None, "connect first"
        answer = getattr(worker, cmd["op"])(cmd)
        print(json.dumps(answer), flush=True)
    if worker is not None:
        worker.close()


# ---------------------------------------------------------------- the publisher


def serve_publisher(argv: list[str]) -> None:
    from meshpush.publisher import Failed, Publisher, PublishError

    api_key = argv[argv.index("--api-key") + 1]
    urls = [a for a in argv if a.startswith("http")]
    with Publisher(urls, api_key=api_key, timeout=10) as pub:

        def batch(users: list[str], published: dict[str, list[int]]) -> int:
            now = time.monotonic()
            try:
                results = pub.publish_many([{"user": u, "data": {"t": now}} for u in users])
            except PublishError:
                return len(users)  # outcome unknown: not counted as published
            failed = 0
            for user, result in zip(users, results, strict=True):
                if isinstance(result, Failed):
                    failed += 1
                else:
                    published.setdefault(user, []).append(result.seq)
            return failed

        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "close":
                break
            cpu, users = time.process_time(), list(cmd["users"])
            published: dict[str, list[int]] = {}
            failed = requests = 0
            late, burst_done = 0.0, 0.0
            if cmd["op"] == "round":
                for i in range(0, len(users), 200):
                    failed += batch(users[i : i + 200], published)
                    requests += 1
            else:
                chunk, rate = int(cmd["chunk"]), float(cmd["rate"])
                start, end, i = time.monotonic(), time.monotonic() + float(cmd["seconds"]), 0
                burst = start + float(cmd.get("burst_after", math.inf))
                while (due := start + i * chunk / rate) < end:
                    time.sleep(max(0.0, min(due, burst) - time.monotonic()))
                    if time.monotonic() >= burst:  # one message to every user, at once
                        for k in range(0, len(users), 200):
                            failed += batch(users[k : k + 200], published)
                            requests += 1
                        burst, burst_done = math.inf, time.monotonic()
                        continue
                    picked = [users[(i * chunk + k) % len(users)] for k in range(chunk)]
                    failed += batch(picked, published)
                    requests += 1
                    late = max(late, time.monotonic() - (due + chunk / rate))
                    i += 1
            answer = {
                "published": published,
                "failed": failed,
                "requests": requests,
                "late": late,
                "burst_done": burst_done,
                "cpu": time.process_time() - cpu,
            }
            print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------- the coordinator's side


def workers(argvs: list[list[str]]) -> Procs:
    """This module's worker processes (clients, or the publisher with ``["publisher", ...]``)."""
    return Procs("bench._resumeload", argvs)


if __name__ == "__main__":
    if sys.argv[1:2] == ["publisher"]:
        serve_publisher(sys.argv[2:])
    else:
        serve_clients()
