"""The TCP front of the WebSocket server: admission, TLS and the upgrade, all bounded.

Before a single byte is parsed, the :class:`Doorman` decides whether the peer may speak at
all: IP block/allow list (CIDR file, reloaded while running), a per-IP handshake rate (token
bucket), a per-IP connection cap and a node-wide connection cap. A refused peer gets a short
raw HTTP response with the documented status and JSON body (403, 429 or 503 with
``Retry-After``), written without reading its request, so refusing is cheaper than serving.

A peer inside ``trusted_proxies`` is a proxy: its connection counts only towards the node cap
until its client is known — from a PROXY protocol header (``proxy_protocol``: required from
such peers, read before TLS) or the upgrade request's ``X-Forwarded-For`` (``proxyproto``) —
and is then admitted by the client's address (the same refusals, raw HTTP, after the request).

An admitted connection must finish TLS (if configured) and the HTTP upgrade request within
``handshake_timeout`` — a client that trickles its headers (slowloris) is dropped — and the
request itself is bounded by h11's limits (``wire.Upgrade``, on wsproto). The handler (the
gateway's handshake) returns the session it opened, and this connection's task then runs it,
outside the handshake's frames and scope: a session needs no other task while it is idle.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import trio

from meshpush.core.limits import CidrSet, Counter, FilterError, IpFilter, KeyedBuckets, SampledLog
from meshpush.core.stats import Tally, snapshot
from meshpush.observe.logs import CLIENT_IP
from meshpush.observe.metrics import Metrics
from meshpush.server.proxyproto import ProxyHeaderError, forwarded_client, read_header
from meshpush.server.wire import HandshakeFailed, Upgrade
from meshpush.settings import Settings

log = logging.getLogger(__name__)


class Served(Protocol):
    """What a handler hands back once the handshake is done: a session to run in this task."""

    async def run(self) -> None: ...


# answers one upgrade (``request``, peer ``ip``); returns the session to run, or None if the
# connection is done (refused, redirected, the client left)
Handler = Callable[[Upgrade, str], Awaitable[Served | None]]
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
PENDING = ""  # the key counted for a trusted proxy's connection until its client is known
ACCEPT_BATCH = 64  # connections accepted per wake-up of an accept loop
ACCEPT_PAUSE = 0.1  # seconds an accept loop waits after running out of fds or memory
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_IGNORED_ERRNOS = frozenset(  # the connection died before accept (as trio ignores them)
    {errno.EPERM, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT}
    | {errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)


class Refusal(Exception):
    """A connection or handshake refused with an HTTP status and a documented error code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        retry_after: int | None = None,
        fields: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after
        self.fields = fields or {}  # extra fields of the error frame (e.g. bad_resume's "ch")

    def http(self) -> bytes:
        """The whole raw HTTP/1.1 response."""
        body = json.dumps({"error": self.code, "detail": self.detail}).encode()
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if self.retry_after is not None:
            lines.append(f"Retry-After: {self.retry_after}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class DoormanStats:
    """Counted at accept and handshake; ``connections`` is filled in by ``statistics()``."""

    connections: int = 0
    blocked: Tally = field(default_factory=Tally)
    rate_limited: Tally = field(default_factory=Tally)
    handshakes: Tally = field(default_factory=Tally)
    backend_errors: Tally = field(default_factory=Tally)
    session_errors: int = 0


class Doorman:
    """Admission at TCP accept. Pure bookkeeping plus a reloader for the IP filter file."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.stats = DoormanStats()
        metrics.add_source(self)
        self.buckets = KeyedBuckets(settings.handshake_rate, settings.handshake_burst)
        self.connections = Counter(settings.max_connections_per_ip, settings.max_connections)
        self.filter = IpFilter()
        self.trusted = CidrSet.parse(settings.trusted_proxies)
        self.sampled = SampledLog(log)
        self._filter_mtime: float | None = None
        if settings.ip_filter_file and not self.reload_filter():
            # fail closed: a node must not start unfiltered because its filter is broken
            raise ValueError(f"ip_filter_file {settings.ip_filter_file!r} cannot be loaded")

    def statistics(self) -> DoormanStats:
        return snapshot(self.stats, connections=self.connections.total)

    def admit(self, ip: str) -> Refusal | None:
        """None and one connection counted for ``ip``; or the refusal to send. ``PENDING``: a
        trusted proxy's connection whose client is not known yet (only the node cap applies)."""
        refusal = None if ip == PENDING else self._screen(ip)
        if refusal is not None:
            return refusal
        over = self.connections.acquire(ip, capped=ip != PENDING)
        if over == "total":
            return Refusal(503, "node_full", "this node is at its connection limit", 5)
        if over == "per_key":
            self.stats.rate_limited["connections"] += 1
            return Refusal(429, "too_many_connections", "too many connections from this address", 5)
        return None

    def readmit(self, old: str, ip: str) -> Refusal | None:
        """Count the connection counted for ``old`` for its real client ``ip`` instead (the
        filter and the limits of ``ip`` apply); refused, nothing stays counted."""
        self.release(old)
        return self.admit(ip)

    def _screen(self, ip: str) -> Refusal | None:
        """The IP filter and the handshake rate of ``ip``."""
        rules = self.filter
        # without rules every address passes (each ip here is a parsed one: accept's, or from
        # a PROXY header or X-Forwarded-For, both validated), so no ip_address() per connect
        verdict = rules.verdict(ip) if rules.allow or rules.block else None
        if verdict is not None:
            self.stats.blocked[verdict] += 1
            return Refusal(403, "ip_blocked", "this address may not connect")
        allowed, wait = self.buckets.take(ip, trio.current_time())
        if not allowed:
            self.stats.rate_limited["handshake"] += 1
            return Refusal(429, "rate_limited", "too many handshakes", max(1, round(wait)))
        return None

    def release(self, ip: str) -> None:
        self.connections.release(ip)

    def reload_filter(self) -> bool:
        """Re-read the IP filter file if it changed; keep the old filter if it is invalid."""
        path = self.settings.ip_filter_file
        try:
            mtime = os.stat(path).st_mtime
            if mtime == self._filter_mtime:
                return False
            with open(path, encoding="utf-8") as f:
                self.filter = IpFilter.parse(f.read())
        except (OSError, FilterError, UnicodeDecodeError) as exc:
            self.stats.backend_errors["ip_filter"] += 1
            log.error("IP filter %s not (re)loaded, keeping the previous one: %s", path, exc)
            return False
        self._filter_mtime = mtime
        log.info(
            "IP filter loaded: %d allow, %d block", len(self.filter.allow), len(self.filter.block)
        )
        return True

    async def watch_filter(self, interval: float = 2.0) -> None:
        """Poll the filter file's mtime (ConfigMap updates, editors): reload without restart."""
        if not self.settings.ip_filter_file:
            return
        while True:
            await trio.sleep(interval)
            self.reload_filter()


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


async def serve(
    settings: Settings,
    doorman: Doorman,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``ws_host:ws_port``; run ``handler(request, ip)`` for each admitted upgrade."""
    context = server_ssl_context(settings)
    listeners = await trio.open_tcp_listeners(settings.ws_port, host=settings.ws_host or None)
    port = listeners[0].socket.getsockname()[1]
    # the stdlib sockets, ours from here on (accepted in batches by _accept)
    socks = [socket.socket(fileno=listener.socket.detach()) for listener in listeners]
    connection = partial(_connection, settings, doorman, handler, context)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(doorman.watch_filter)
            for sock in socks:
                nursery.start_soon(_accept, sock, nursery, connection)
            task_status.started(port)
    finally:
        for sock in socks:
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def _accept(
    sock: socket.socket,
    nursery: trio.Nursery,
    connection: Callable[[trio.SocketStream, str], Awaitable[None]],
) -> None:
    """Accept every connection waiting (up to ``ACCEPT_BATCH``) each time the listening socket
    is readable, each served by ``connection(stream, peer ip)`` in its own task of
    ``nursery``: no scheduler round trip per accept (as ``trio.serve_listeners`` makes), and
    the peer address comes with the accept (no ``getpeername``)."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:  # out of fds or memory: later
                    log.error("accept failed (%s); retrying in %s s", exc, ACCEPT_PAUSE)
                    await trio.sleep(ACCEPT_PAUSE)
                    break
                if exc.errno in ACCEPT_IGNORED_ERRNOS:  # that connection is gone
                    continue
                raise
            tcp = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            nursery.start_soon(connection, tcp, str(address[0]))


async def _connection(
    settings: Settings,
    doorman: Doorman,
    handler: Handler,
    context: ssl.SSLContext | None,
    tcp: trio.SocketStream,
    address: str,
) -> None:
    ip = peer = address  # ip: the address counted; peer: the best known client address
    if peer in doorman.trusted:
        ip = PENDING  # admitted by its client's address once known
    refusal = doorman.admit(ip)  # None: one connection counted for ip
    session: Served | None = None
    try:
        stream: trio.abc.Stream = tcp
        with trio.move_on_after(settings.handshake_timeout) as timer:
            if ip == PENDING and settings.proxy_protocol:  # even refused: TLS comes after it
                peer = await read_header(tcp.receive_some) or peer
                if refusal is None and peer not in doorman.trusted:
                    ip, refusal = peer, doorman.readmit(PENDING, peer)
            if context is not None:
                stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
                await stream.do_handshake()
            if refusal is not None:
                await _refuse(doorman, stream, peer, refusal)
                return
            upgrade = await Upgrade.read(stream)
            if ip == PENDING:
                ip = peer = forwarded_client(_forwarded_for(upgrade), doorman.trusted, peer)
                refusal = doorman.readmit(PENDING, ip)
                if refusal is not None:
                    await _refuse(doorman, stream, peer, refusal)
                    return
            timer.deadline = float("inf")  # upgrade request complete: no more deadline
            CLIENT_IP.set(ip)  # log lines of this connection's task name its client
            session = await handler(upgrade, ip)
            del upgrade  # not kept for the session's life (its request headers)
        if timer.cancelled_caught:
            doorman.stats.handshakes["handshake_timeout"] += 1
        if session is not None:  # this task runs the session, outside the handshake's scope
            await session.run()
    except ProxyHeaderError as exc:
        doorman.stats.handshakes["bad_proxy_header"] += 1
        doorman.sampled.log(
            trio.current_time(), "bad_proxy_header", "bad PROXY header from %s: %s", peer, exc
        )
    except HandshakeFailed as exc:
        doorman.stats.handshakes["bad_request"] += 1
        log.debug("connection from %s sent no upgrade: %s", peer, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        doorman.stats.handshakes["transport_error"] += 1
        log.debug("connection from %s failed: %r", peer, exc)
    except Exception as exc:  # a bug: one connection ends, the node serves on
        doorman.stats.session_errors += 1
        log.warning("connection from %s ended by an error: %r", peer, exc)
    finally:
        if refusal is None:
            doorman.release(ip)
        tcp.socket.close()  # (what SocketStream.aclose does, without its checkpoint)


def _forwarded_for(upgrade: Upgrade) -> list[str]:
    """Every X-Forwarded-For line of the request, in order."""
    pairs = upgrade.request.extra_headers
    return [value.decode("latin-1") for key, value in pairs if key.lower() == b"x-forwarded-for"]


async def _refuse(doorman: Doorman, stream: trio.abc.Stream, ip: str, refusal: Refusal) -> None:
    CLIENT_IP.set(ip)
    doorman.sampled.log(trio.current_time(), refusal.code, "refused %s: %s", ip, refusal.code)
    doorman.stats.handshakes[refusal.code] += 1
    await _send_refusal(stream, refusal)


async def _send_refusal(stream: trio.abc.Stream, refusal: Refusal) -> None:
    """Write the refusal, half-close, and drain briefly so the peer can read it (not a RST)."""
    await stream.send_all(refusal.http())
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    with trio.move_on_after(0.5):
        for _ in range(16):
            if not await stream.receive_some(65536):
                break
