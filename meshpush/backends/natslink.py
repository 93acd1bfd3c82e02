"""A trio-native NATS connection for the node's hot paths (protocol:
:mod:`meshpush.backends.natswire`).

nats-py runs on the trio-asyncio loop, where every asyncio wake-up is a trio scheduler turn:
a JetStream publish cost ~200 µs of CPU there against ~45 µs on plain asyncio
(docs/performance.md, docs/decisions.md "NATS hot paths on a trio-native link"). The link
speaks the protocol itself, in trio, with no task or wake-up per message:

* :meth:`Link.publish` appends to an output buffer and wakes the writer task, which sends
  everything buffered with one ``send_all`` per loop turn. The buffer is bounded
  (``max_buffer``): a publish that would overflow it raises :class:`BufferFull`.
* One reader task parses what arrives and calls each subscription's *synchronous* callback.
* Request rounds (:meth:`Link.request_many`) go through one wildcard inbox subscription
  (``<inbox>.*``; the last token names the waiter): many publishes with reply subjects, one
  wait for all the answers, bounded by a timeout.
* Keepalive: a PING every ``ping_interval``; ``max_pings_out`` unanswered ones mean the
  connection is stale and it is dropped.
* Reconnect: on any failure the connection is dropped, in-flight requests are answered
  (:class:`NotSent` when their bytes never left the buffer — definitely not delivered;
  :class:`NoReply` when they may have reached the server), and the link reconnects to the
  first reachable server of the list, with bounded jittered backoff, resubscribing every
  subscription before it reports connected again. What was buffered is not replayed.

nats-py stays for the control plane (stream and KV management, direct gets, presence).
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import trio

from meshpush.backends import natswire
from meshpush.backends.natswire import Msg

log = logging.getLogger(__name__)
READ_SIZE = 65536
#: how often the link looks for request rounds past their timeout: a round without all its
#: answers ends at most this late (one timer task per connection instead of a cancel scope
#: per round, which was ~1.5 % of a node's CPU at ~4,000 single publishes/s)
EXPIRY_TICK = 0.05


class LinkError(Exception):
    """A publish the link could not take: it was **not sent**."""


class NotConnected(LinkError):
    """The link is between connections (or stopped)."""


class BufferFull(LinkError):
    """The output buffer is at ``max_buffer``: the server does not read fast enough."""


# a server that cannot be reached, resets, stalls or speaks garbage while we connect
_CONNECT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    natswire.ProtocolError,
    LinkError,
)


@dataclass(frozen=True, slots=True)
class NotSent:
    """A request that never left this process: definitely not delivered."""

    reason: str


@dataclass(frozen=True, slots=True)
class NoReply:
    """A request that may have reached the server, without an answer (in time)."""

    reason: str


Reply = Msg | NotSent | NoReply
Callback = Callable[[Msg], None]


@dataclass(frozen=True, slots=True)
class Request:
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class LinkConfig:
    name: str = "meshpush"
    connect_timeout: float = 2.0
    ping_interval: float = 10.0
    max_pings_out: int = 3  # stale after ping_interval * max_pings_out without a PONG
    max_buffer: int = 32 * 1024 * 1024
    backoff_min: float = 0.05
    backoff_max: float = 2.0


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    token: str | None = None


def parse_server(url: str) -> Server:
    """``nats://[user:pass@|token@]host:port``, or ``host:port`` (nats-py's plain forms)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme != "nats":
        raise ValueError(f"unsupported NATS URL scheme in {url!r} (only nats://)")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if user is not None and password is None:  # nats://<token>@host
        return Server(parts.hostname or "127.0.0.1", parts.port or 4222, token=user)
    return Server(parts.hostname or "127.0.0.1", parts.port or 4222, user, password)


@dataclass(frozen=True, slots=True)
class LinkStats:
    connected: bool
    reconnects: int
    buffered: int
    published: int
    received: int
    errors: int


class _Round:
    __slots__ = ("deadline", "done", "remaining", "replies")

    def __init__(self, size: int) -> None:
        self.replies: list[Reply | None] = [None] * size
        self.remaining = size
        self.done = trio.Event()
        self.deadline = math.inf

    def answer(self, i: int, reply: Reply) -> None:
        if self.replies[i] is None:
            self.replies[i] = reply
            self.remaining -= 1
            if not self.remaining:
                self.done.set()


@dataclass(slots=True)
class _Conn:
    """One TCP connection's state (a new one per reconnect)."""

    stream: trio.SocketStream
    parser: natswire.Parser
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pings_out: int = 0
    pongs: list[trio.Event | None] = field(default_factory=list)  # one per PING, in order
    pending: list[natswire.Event] = field(default_factory=list)  # read during the handshake
    error: str = ""


class Link:
    """One NATS connection in trio: publish, subscribe, request rounds, reconnect."""

    def __init__(self, servers: Iterable[str], config: LinkConfig | None = None) -> None:
        self.servers = [parse_server(url) for url in servers]
        if not self.servers:
            raise ValueError("no NATS server configured")
        self.config = config or LinkConfig()
        self.max_payload = natswire.DEFAULT_MAX_PAYLOAD
        self.inbox = "_INBOX." + secrets.token_hex(11)
        self.connected = False
        self.on_connect: Callable[[bool], None] = lambda reconnect: None
        self.on_disconnect: Callable[[str], None] = lambda reason: None
        self._subs: dict[int, tuple[str, Callback]] = {}
        self._raw_sids: set[int] = set()  # their messages come with raw_headers
        self._next_sid = 1
        self._out = bytearray()
        # request tokens whose bytes are still in _out (once the writer took them, they may
        # have reached the server)
        self._unsent: list[str] = []
        self._wake = trio.Event()
        self._waiting: dict[str, tuple[_Round, int]] = {}
        self._timed: list[_Round] = []  # rounds waiting for answers (``_expire`` ends them)
        self._timed_added = trio.Event()
        self._next_token = 0
        self._conn: _Conn | None = None
        self._reconnects = 0
        self._published = self._received = self._errors = 0
        self._inbox_sid = self.subscribe(self.inbox + ".*", self._on_reply)

    def statistics(self) -> LinkStats:
        return LinkStats(
            self.connected,
            self._reconnects,
            len(self._out),
            self._published,
            self._received,
            self._errors,
        )

    # ------------------------------------------------------------ publishing

    def publish(
        self,
        subject: str,
        payload: bytes,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Buffer one message for the writer (sent this loop turn). Raises
        :class:`NotConnected` or :class:`BufferFull` (not sent), or ``EncodeError`` (a
        ``ValueError``: a bad subject or header, or over the server's max_payload)."""
        if not self.connected:
            raise NotConnected("not connected to NATS")
        self._write(natswire.publish(subject, payload, reply, headers, self.max_payload))
        self._published += 1

    def _write(self, data: bytes) -> None:
        if len(self._out) + len(data) > self.config.max_buffer and self._out:
            raise BufferFull(f"NATS output buffer full ({len(self._out)} bytes)")
        self._out += data
        self._wake.set()

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, subject: str, callback: Callback, raw_headers: bool = False) -> int:
        """Subscribe ``subject``; ``callback`` runs in the reader task, synchronously, once per
        message (it must not block). Kept across reconnects. Returns the sid. ``raw_headers``:
        its messages' headers come unparsed (``Msg.raw_headers``)."""
        sid = self._next_sid
        self._next_sid += 1
        self._subs[sid] = (subject, callback)
        if raw_headers:
            self._raw_sids.add(sid)
        if self.connected:
            self._write(natswire.sub(subject, sid))
        return sid

    def unsubscribe(self, sid: int) -> None:
        self._raw_sids.discard(sid)
        if self._subs.pop(sid, None) is not None and self.connected:
            self._write(natswire.unsub(sid))

    # ------------------------------------------------------------ requests

    async def request_many(self, requests: list[Request], timeout: float) -> list[Reply]:
        """Publish every request with its own reply subject, then wait (at most ``timeout``)
        for all the answers: one reply per request, in order."""
        round_ = _Round(len(requests))
        tokens = []
        for i, req in enumerate(requests):
            token = self._token()
            tokens.append(token)
            self._waiting[token] = (round_, i)
            try:
                self.publish(req.subject, req.payload, f"{self.inbox}.{token}", req.headers)
                self._unsent.append(token)
            except (LinkError, ValueError) as exc:
                round_.answer(i, NotSent(f"not sent: {exc}"))
        return await self._answers(round_, tokens, timeout)

    async def request_batch(self, requests: list[Request], timeout: float) -> Reply:
        """Publish every request in one write, all or none (a request that cannot be encoded
        sends nothing: :class:`NotSent`), only the last one with a reply subject, then wait
        at most ``timeout`` for its answer (a JetStream atomic batch's commit)."""
        token = self._token()
        reply = f"{self.inbox}.{token}"
        last = len(requests) - 1
        try:
            if not self.connected:
                raise NotConnected("not connected to NATS")
            data = b"".join(
                natswire.publish(
                    r.subject, r.payload, reply if k == last else None, r.headers, self.max_payload
                )
                for k, r in enumerate(requests)
            )
            self._write(data)
        except (LinkError, ValueError) as exc:
            return NotSent(f"not sent: {exc}")
        self._published += len(requests)
        round_ = _Round(1)
        self._waiting[token] = (round_, 0)
        self._unsent.append(token)
        [answer] = await self._answers(round_, [token], timeout)
        return answer

    async def _answers(self, round_: _Round, tokens: list[str], timeout: float) -> list[Reply]:
        """Wait at most ``timeout`` (+ ``EXPIRY_TICK``) for a round's answers (those missing:
        :class:`NoReply`). Only a connected link has waiting rounds: ``_lost`` answers them
        all when the connection ends, and ``_expire`` runs while it lasts."""
        try:
            if round_.remaining:
                round_.deadline = trio.current_time() + timeout
                self._timed.append(round_)
                self._timed_added.set()
                await round_.done.wait()
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        return [r if r is not None else NoReply("no answer in time") for r in round_.replies]

    async def _expire(self) -> None:
        """End the rounds past their deadline (their missing answers: :class:`NoReply`),
        every ``EXPIRY_TICK`` while any round waits."""
        while True:
            if not self._timed:
                self._timed_added = trio.Event()
                await self._timed_added.wait()
            await trio.sleep(EXPIRY_TICK)
            now = trio.current_time()
            for round_ in self._timed:
                if round_.deadline <= now:
                    round_.done.set()
            self._timed = [r for r in self._timed if not r.done.is_set()]

    def _token(self) -> str:
        self._next_token += 1
        return str(self._next_token)

    def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if waiting is not None:
            waiting[0].answer(waiting[1], msg)

    async def ping(self, timeout: float) -> float:
        """One PING/PONG round trip through the server: its time in seconds. Raises
        :class:`NotConnected` or ``trio.TooSlowError``."""
        conn = self._conn
        if conn is None or not self.connected:
            raise NotConnected("not connected to NATS")
        pong = trio.Event()
        start = trio.current_time()
        with trio.fail_after(timeout):
            self._write(natswire.PING)
            conn.pongs.append(pong)
            await pong.wait()
        if self._conn is not conn:
            raise NotConnected("NATS connection lost during the round trip")
        return trio.current_time() - start

    # ------------------------------------------------------------ the connection

    async def run(self, *, task_status: trio.TaskStatus[Link] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then keep connected (reconnecting) until cancelled. Started once the first
        connection is up."""
        first = True
        while True:
            conn = await self._connect_any()
            try:
                await self._serve(conn, first, task_status)
            finally:
                self._lost(conn)
                conn.stream.socket.close()  # no close handshake in NATS; never blocks
            first = False

    async def _serve(self, conn: _Conn, first: bool, task_status: trio.TaskStatus[Link]) -> None:
        with conn.scope:
            async with trio.open_nursery() as nursery:
                self._conn, self.connected = conn, True
                nursery.start_soon(self._reader, conn)
                nursery.start_soon(self._writer, conn)
                nursery.start_soon(self._pinger, conn)
                nursery.start_soon(self._expire)
                if first:
                    task_status.started(self)
                else:
                    self._reconnects += 1
                log.info("NATS link connected")
                self.on_connect(not first)
        log.warning("NATS link lost: %s", conn.error)

    def _drop(self, conn: _Conn, reason: str) -> None:
        if not conn.error:
            conn.error = reason
            self._errors += 1
        conn.scope.cancel()

    def _lost(self, conn: _Conn) -> None:
        """Every request still waiting learns it will not be answered on this connection."""
        was_connected = self.connected
        self.connected, self._conn = False, None
        unsent = set(self._unsent)
        for token, (round_, i) in list(self._waiting.items()):
            if token in unsent:
                round_.answer(i, NotSent("not sent: NATS connection lost"))
            else:
                round_.answer(i, NoReply("NATS connection lost before the answer"))
        self._waiting.clear()
        self._unsent = []
        self._out = bytearray()
        for pong in conn.pongs:
            if pong is not None:
                pong.set()  # ping() sees the link disconnected
        if was_connected:
            self.on_disconnect(conn.error or "closed")

    async def _connect_any(self) -> _Conn:
        """The first server of the list that accepts us; bounded jittered backoff between
        passes over the list."""
        delay = self.config.backoff_min
        while True:
            for server in self.servers:
                try:
                    return await self._handshake(server)
                except _CONNECT_ERRORS as exc:
                    self._errors += 1
                    log.warning("NATS link: %s:%d unreachable: %r", server.host, server.port, exc)
            await trio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.config.backoff_max)

    async def _handshake(self, server: Server) -> _Conn:
        """TCP connect, INFO, CONNECT + every SUB + PING, then wait for the PONG."""
        with trio.fail_after(self.config.connect_timeout):
            stream = await trio.open_tcp_stream(server.host, server.port)
            try:
                conn = _Conn(stream, natswire.Parser(raw_sids=self._raw_sids))
                info = await self._next_event(conn)
                if not isinstance(info, natswire.Info):
                    raise natswire.ProtocolError(f"expected INFO, got {info!r}")
                self.max_payload = info.max_payload
                await stream.send_all(self._hello(server))
                while not isinstance(event := await self._next_event(conn), natswire.Pong):
                    if isinstance(event, natswire.Err):
                        raise LinkError(f"server refused: {event.message}")
                return conn
            except BaseException:
                stream.socket.close()
                raise

    def _hello(self, server: Server) -> bytes:
        options: dict[str, object] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "name": self.config.name,
            "lang": "python-trio",
            "version": "meshpush",
            "protocol": 1,
        }
        if server.user is not None:
            options |= {"user": server.user, "pass": server.password or ""}
        if server.token is not None:
            options["auth_token"] = server.token
        subs = b"".join(natswire.sub(subject, sid) for sid, (subject, _) in self._subs.items())
        return natswire.connect(options) + subs + natswire.PING

    @staticmethod
    async def _next_event(conn: _Conn) -> natswire.Event:
        """The next server op while handshaking (what comes with it waits in ``pending``)."""
        while not conn.pending:
            data = await conn.stream.receive_some(READ_SIZE)
            if not data:
                raise OSError("connection closed by the server")
            conn.pending = conn.parser.feed(data)
        return conn.pending.pop(0)

    async def _reader(self, conn: _Conn) -> None:
        try:
            for event in conn.pending:
                self._dispatch(conn, event)
            # wait, then read: trio's receive_some tries a recv first (usually in vain) and
            # yields once more after a read that succeeded (docs/performance.md)
            fd = conn.stream.socket.fileno()
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    return self._drop(conn, "connection closed by the server")
                for event in conn.parser.feed(data):
                    self._dispatch(conn, event)
        except (OSError, trio.BrokenResourceError, natswire.ProtocolError, LinkError) as exc:
            self._drop(conn, repr(exc))

    def _dispatch(self, conn: _Conn, event: natswire.Event) -> None:
        if isinstance(event, Msg):
            self._received += 1
            entry = self._subs.get(event.sid)
            if entry is not None:
                try:
                    entry[1](event)
                except Exception:  # a callback's bug must not take the connection down
                    self._errors += 1
                    log.exception("NATS link: callback for %s failed", event.subject)
        elif isinstance(event, natswire.Ping):
            self._write(natswire.PONG)
        elif isinstance(event, natswire.Pong):
            conn.pings_out = 0
            pong = conn.pongs.pop(0) if conn.pongs else None
            if pong is not None:
                pong.set()
        elif isinstance(event, natswire.Err):
            self._errors += 1
            log.warning("NATS link: server error %r", event.message)
        elif isinstance(event, natswire.Info):
            self.max_payload = event.max_payload

    async def _writer(self, conn: _Conn) -> None:
        """Send everything buffered, once per wake-up: straight to the socket, and only what
        the kernel did not take at once through ``send_all`` (whose every successful send
        also yields to the scheduler: one turn per flush less; docs/performance.md)."""
        fd = conn.stream.socket.fileno()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if not self._out:
                    continue
                data, self._out, self._unsent = self._out, bytearray(), []
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    await conn.stream.send_all(memoryview(data)[sent:])
        except (OSError, trio.BrokenResourceError) as exc:
            self._drop(conn, repr(exc))

    async def _pinger(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self.config.ping_interval)
            if conn.pings_out >= self.config.max_pings_out:
                return self._drop(conn, f"stale: {conn.pings_out} PINGs without a PONG")
            conn.pings_out += 1
            try:
                self._write(natswire.PING)
            except BufferFull as exc:
                return self._drop(conn, f"stalled: {exc}")
            conn.pongs.append(None)
