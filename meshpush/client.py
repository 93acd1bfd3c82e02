"""The Python client SDK (trio): connect anywhere, follow redirects, reconnect forever.

::

    async with open_client("ws://127.0.0.1:8801/ws", token=token, device="phone") as client:
        async for msg in client:
            print(msg.ch, msg.seq, msg.data)

* Any node is a bootstrap (give one URL or several): a ``redirect`` frame (close 4302) sends
  the client to the owner, at most ``max_hops`` times in a row before it backs off and starts
  again from the next bootstrap URL (they are tried in turn, so one dead node is no trap).
* After any drop it reconnects with exponential backoff and full jitter (capped); the delay
  resets once a session reached ``welcome``.
* It answers the server's pings (trio-websocket does) and pings the server itself; a server
  that does not answer within the heartbeat timeout is treated as gone.
* It never yields a ``seq`` it has already yielded on the same channel (and epoch), so server
  replays after a reconnect cannot duplicate a message for the application.
* The token goes in a first ``{"type":"auth","token":...}`` frame (``auth="frame"``, the
  default: no token in URLs, where proxies log them) or in the query (``auth="query"``).
* Refusals (docs/protocol.md, "Close codes"): 1008 and 4403 are final, and so is 4401 with a
  fixed token string or after ``MAX_AUTH_FAILURES`` refusals in a row (a token function is
  asked again on every connect); the client then stops (state ``closed``, iteration ends).
  4429/4503 and every other close reconnect with backoff. A refusal that names a
  ``retry_after`` (its error frame, or an HTTP refusal's ``Retry-After``; capped at
  ``MAX_RETRY_AFTER``) keeps the client from that node for that long: the next bootstrap URL
  that did not ask to wait is tried instead, and a connect to a node that asked (a bootstrap,
  or a redirect's target) waits out the rest first. A ``bad_resume`` refusal (a
  position beyond the stream's end) resets that channel's position (event ``resume_reset``).
* Acks are cumulative and batched: with ``auto_ack`` a message counts as consumed when the
  application asks for the next one; at most one ack frame per channel goes out every
  ``ack_interval`` seconds (default 0.25; the first one after a quiet spell at once), and a
  clean close sends what is left. A reconnect replays at most what was not acked yet, and
  the client drops those repeats by seq.
* ``state`` is one of :class:`State`; ``on_state`` (optional) is called on every change.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import logging
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from meshpush.core.protocol import Close, ProtocolError, parse_server_frame, retry_after

log = logging.getLogger(__name__)

TokenSource = str | Callable[[], Awaitable[str]]
FINAL_CLOSE_CODES = frozenset({Close.POLICY, Close.FORBIDDEN})
MAX_AUTH_FAILURES = 3  # 4401 refusals in a row (no welcome between) before a client stops
AUTH_MODES = ("frame", "query")
#: seconds between two ack frames of a session (cumulative: one frame per channel acks
#: everything consumed meanwhile); a reconnect replays at most this much, deduplicated by seq
ACK_INTERVAL = 0.25
MAX_ACK_INTERVAL = 10.0
#: seconds at most that a refusal's ``retry_after`` holds a client back (a bound on a value
#: the network hands us)
MAX_RETRY_AFTER = 60.0
REFUSAL_CODES = frozenset(
    {Close.BAD_REQUEST, Close.TOKEN_EXPIRED, Close.FORBIDDEN, Close.RATE_LIMITED, Close.UNAVAILABLE}
)


class State(enum.Enum):
    CONNECTING = "connecting"
    ONLINE = "online"
    REDIRECTING = "redirecting"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Message:
    ch: str
    seq: int
    id: str
    data: Any
    prev: int | None = None


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """Something the application may want to know: ``gap`` (messages lost to retention),
    ``epoch_reset`` (the store was recreated; cursors reset), ``not_recovered`` (the resume was
    incomplete), ``chain_break`` (a seq went missing live; the SDK resumed), ``resume_reset``
    (the node refused a resume position beyond its stream's end: the channel starts over from
    the device's cursor), ``final`` (a refusal reconnecting cannot cure: the client stopped),
    ``error``."""

    kind: str
    ch: str | None
    detail: dict[str, Any]


@dataclass
class ClientStats:
    connects: int = 0
    welcomes: int = 0
    redirects: int = 0
    rejections: int = 0
    duplicates: int = 0
    gaps: int = 0
    chain_breaks: int = 0
    unexpected_errors: int = 0
    last_close: int | None = None
    final_close: int | None = None
    last_error: str = ""
    nodes: list[str] = field(default_factory=list)


class Refused(HandshakeError):
    """The node refused the handshake: ``code`` is the close code (after the upgrade) or
    4000 + the HTTP status (nodes with ``refuse_after_upgrade`` off); ``error`` its code."""

    def __init__(self, code: int, error: str, detail: str = "") -> None:
        super().__init__(f"refused {code} {error}: {detail}")
        self.code, self.error, self.detail = code, error, detail


class _Redirect(Exception):
    def __init__(self, url: str, node: str = "") -> None:
        super().__init__(url)
        self.url = url
        self.node = node


#: frames trio-websocket's reader may parse ahead of us (its default, 1, made it hand over
#: each frame of a burst before reading the next: a task switch per message)
MESSAGE_QUEUE = 64
_SESSION_ERRORS = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, ProtocolError)


class Client:
    """A resilient session for one (user, device). Create with :func:`open_client`."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: TokenSource,
        device: str = "default",
        max_hops: int = 5,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        connect_timeout: float = 10.0,
        buffer: int = 1024,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        on_state: Callable[[State], None] | None = None,
        on_event: Callable[[ClientEvent], None] | None = None,
        auto_ack: bool = True,
        auth: str = "frame",
        ack_interval: float = ACK_INTERVAL,
    ) -> None:
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}")
        self.auth = auth
        self.bootstraps = [url] if isinstance(url, str) else list(url)
        if not self.bootstraps:
            raise ValueError("at least one bootstrap URL is needed")
        self._next_bootstrap = 0
        self.device = device
        self.max_hops = max_hops
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.connect_timeout = connect_timeout
        if ssl_context is None and ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=ca_file)  # verifies, custom CA
        self.ssl_context = ssl_context  # None: wss:// verifies against the system CAs
        self.on_state = on_state
        self.on_event = on_event
        self.auto_ack = auto_ack
        if not 0 < ack_interval <= MAX_ACK_INTERVAL:
            raise ValueError(f"ack_interval must be in (0, {MAX_ACK_INTERVAL}] seconds")
        self.ack_interval = ack_interval
        self.events: collections.deque[ClientEvent] = collections.deque(maxlen=256)
        self._token = token
        self.state = State.CONNECTING
        self.node: str | None = None
        self.epoch: str | None = None
        self.last: dict[str, int] = {"user": 0, "broadcast": 0}  # newest seq received
        self.consumed: dict[str, int] = {"user": 0, "broadcast": 0}  # newest seq acked by app
        self._acked: dict[str, int] = {"user": 0, "broadcast": 0}  # newest ack sent (session)
        self._after_gap: set[str] = set()
        self._handed: Message | None = None
        self._ack_wake = trio.Event()
        self._ws: WebSocketConnection | None = None
        self.stats = ClientStats()
        self._send, self._recv = trio.open_memory_channel[Message](buffer)
        self._online = trio.Event()
        self._avoid = ("", "")  # (node id, url) of a node that just proved unreachable
        self._welcomed = ("", "")  # (node id, url) of the current session
        self._redirect_node = ""
        self._url = ""
        self._auth_failures = 0
        self._not_before: dict[str, float] = {}  # node (host:port) -> trio time it asked for

    # ------------------------------------------------------------ public

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                msg = await self.receive()
            except trio.EndOfChannel:
                return
            yield msg

    async def receive(self) -> Message:
        """The next message. With ``auto_ack`` the previous one counts as consumed (acked).
        Raises ``trio.EndOfChannel`` once the client stopped for good (a final refusal)."""
        if self.auto_ack and self._handed is not None:
            self.ack(self._handed)
        msg = await self._recv.receive()
        self._handed = msg
        return msg

    def ack(self, msg: Message) -> None:
        """Mark ``msg`` (and everything before it on its channel) consumed; sent soon, batched."""
        if msg.seq > self.consumed[msg.ch]:
            self.consumed[msg.ch] = msg.seq
            self._ack_wake.set()

    async def wait_online(self) -> None:
        """Wait until the current (or next) session has been welcomed."""
        await self._online.wait()

    # ------------------------------------------------------------ connection loop

    async def run(self) -> None:
        """Connect, follow redirects and reconnect until cancelled."""
        attempt = 0
        url, hops, target = self.bootstrap, 0, ("", "")
        while True:
            await self._honour_retry_after(url)
            self._set_state(State.REDIRECTING if hops else State.CONNECTING)
            try:
                await self._session(url)
            except _Redirect as redirect:
                if hops < self.max_hops:
                    url, hops, target = redirect.url, hops + 1, (redirect.node, redirect.url)
                    continue
            except _SESSION_ERRORS as exc:
                self._ended(url, exc)
                if self._final(exc):
                    await self._stop(exc)
                    return
                if self._unreachable(exc, target if hops else self._welcomed):
                    # that node is gone (its lease may not have expired yet): go straight to
                    # another node and ask it to hold us until the ring no longer names it
                    url, hops, target = self._rotate(), 0, ("", "")
                    self._welcomed = ("", "")
                    continue
            except Exception as exc:  # an SDK reconnects forever: log, count, back off
                self.stats.unexpected_errors += 1
                self._ended(url, exc, level=logging.WARNING)
            if self._online.is_set():
                attempt = 0
                self._online = trio.Event()
            url, hops, target = self._rotate(), 0, ("", "")
            attempt += 1
            await self._backoff(attempt)

    def _final(self, exc: Exception) -> bool:
        """Would reconnecting repeat this refusal? (docs/protocol.md, "Close codes")"""
        if self._online.is_set():
            self._auth_failures = 0
        code = _code_of(exc)
        if code in FINAL_CLOSE_CODES:
            return True
        if code != Close.TOKEN_EXPIRED or self._online.is_set():
            return False
        if isinstance(self._token, str):  # no way to get another token
            return True
        self._auth_failures += 1
        return self._auth_failures >= MAX_AUTH_FAILURES

    async def _stop(self, exc: Exception) -> None:
        """Stop for good: the state turns ``closed`` and iteration ends."""
        code = _code_of(exc)
        self.stats.final_close = code
        log.warning("client stops: %r", exc)
        self._event("final", None, code=code, detail=str(exc))
        self._set_state(State.CLOSED)
        await self._send.aclose()

    def _unreachable(self, exc: Exception, node: tuple[str, str]) -> bool:
        """Did ``node`` (id, url) just die under us? If so, avoid it until the next welcome."""
        dead = isinstance(exc, OSError | trio.TooSlowError) or (
            isinstance(exc, ConnectionClosed)
            and exc.reason is not None
            and exc.reason.code in (Close.ABNORMAL, Close.GOING_AWAY)
        )
        if not dead or not node[0] or node == self._avoid:
            return False
        self._avoid = node
        return True

    def _ended(self, url: str, exc: Exception, level: int = logging.DEBUG) -> None:
        self.stats.last_error = repr(exc)
        log.log(level, "session to %s ended: %r", url, exc)

    def _rotate(self) -> str:
        """The next bootstrap URL, skipping the node we avoid and the nodes that asked us to
        wait (``retry_after``) when there is another."""
        n = len(self.bootstraps)
        after = [self._next_bootstrap + k for k in range(1, n + 1)]
        free = [i for i in after if self._free(self.bootstraps[i % n])]
        if free:
            self._next_bootstrap = free[0]
        else:  # every one asked us to wait (or is avoided): the one free soonest
            allowed = [i for i in after if self._not_avoided(self.bootstraps[i % n])] or after
            self._next_bootstrap = min(
                allowed, key=lambda i: self._wait_for(self.bootstraps[i % n])
            )
        return self.bootstrap

    def _not_avoided(self, url: str) -> bool:
        return url != self._avoid[1]

    def _free(self, url: str) -> bool:
        return self._not_avoided(url) and not self._wait_for(url)

    async def _backoff(self, attempt: int) -> None:
        """Full jitter: sleep uniform(0, min(cap, base * 2**attempt)) (a node's own
        ``retry_after`` is waited out before connecting to it: :meth:`_honour_retry_after`)."""
        self._set_state(State.BACKING_OFF)
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** min(attempt, 20))
        await trio.sleep(random.uniform(0, ceiling))

    def _note_retry_after(self, url: str, value: object) -> None:
        """Keep ``url``'s node away for a refusal's ``retry_after`` (seconds; ignored unless a
        number >= 0; capped at ``MAX_RETRY_AFTER``)."""
        if isinstance(value, str):
            value = retry_after(value)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            return
        now = trio.current_time()
        self._not_before = {k: t for k, t in self._not_before.items() if t > now}
        self._not_before[_node_key(url)] = now + min(float(value), MAX_RETRY_AFTER)

    def _wait_for(self, url: str) -> float:
        """Seconds until ``url``'s node may be asked again (0: now)."""
        until = self._not_before.get(_node_key(url), 0.0)
        return max(0.0, until - trio.current_time())

    async def _honour_retry_after(self, url: str) -> None:
        """Wait out what ``url``'s node asked for (docs/protocol.md, "Close codes")."""
        wait = self._wait_for(url)
        if wait > 0:
            self._set_state(State.BACKING_OFF)
            await trio.sleep(wait)

    async def _session(self, url: str) -> None:
        self.stats.connects += 1
        self._url = url
        token = self._token if isinstance(self._token, str) else await self._token()
        try:
            async with self._open(self._target(url, token)) as ws:
                if self.auth == "frame":
                    await ws.send_message(json.dumps({"type": "auth", "token": token}))
                await self._serve(ws)
        except ConnectionRejected as exc:  # a node answering refusals before the upgrade
            self.stats.rejections += 1
            self.stats.last_error = f"rejected {exc.status_code}"
            error, detail = _rejection(exc.body)
            self._note_retry_after(url, _header(exc.headers, b"retry-after"))
            if error == "bad_resume":
                self._reset_resume(None, detail)
            raise Refused(4000 + exc.status_code, error, detail) from None

    def _open(self, target: str) -> AsyncContextManager[WebSocketConnection]:
        if urllib.parse.urlsplit(target).scheme == "wss":
            return self._open_tls(target)
        return open_websocket_url(
            target,
            message_queue_size=MESSAGE_QUEUE,
            connect_timeout=self.connect_timeout,
            disconnect_timeout=1.0,
        )

    @asynccontextmanager
    async def _open_tls(self, target: str) -> AsyncIterator[WebSocketConnection]:
        """wss://: finish (and verify) TLS ourselves first, so a bad certificate fails at once
        with its real reason instead of as a handshake timeout."""
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname or "", parts.port or 443
        context = self.ssl_context or ssl.create_default_context()
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=context, https_compatible=True
            )
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(stream)
                raise OSError(f"TLS handshake failed: {exc.__cause__!r}") from None
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        async with open_websocket_over(stream, host, resource, self.connect_timeout) as ws:
            yield ws

    def _target(self, url: str, token: str) -> str:
        params = {
            "device": self.device,
            "last": str(self.last["user"]),
            "blast": str(self.last["broadcast"]),
        }
        if self.auth == "query":
            params["token"] = token
        if self.epoch:
            params["epoch"] = self.epoch
        if self._avoid[0]:
            params["avoid"] = self._avoid[0]
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.urlencode(params)
        return urllib.parse.urlunsplit(parts._replace(query=query))

    async def _serve(self, ws: WebSocketConnection) -> None:
        """Read frames until the session ends; raise _Redirect or the reason it ended."""
        ended: Exception | None = None
        redirect: str | None = None
        welcomes = self.stats.welcomes
        async with trio.open_nursery() as nursery:
            try:
                redirect = await self._read_frames(ws, nursery)
            except (ConnectionClosed, ProtocolError) as exc:
                ended = exc
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(ended, ConnectionClosed):
            code = ended.reason.code if ended.reason else None
            self.stats.last_close = code
            if code == Close.REDIRECT:
                redirect = self.bootstrap
                ended = None
            elif code in REFUSAL_CODES and self.stats.welcomes == welcomes:
                self.stats.rejections += 1  # refused after the upgrade (docs/protocol.md §1)
                assert code is not None and ended.reason is not None
                ended = Refused(code, ended.reason.reason or "", "after the upgrade")
        if ended is not None:
            raise ended
        if redirect is not None:
            self.stats.redirects += 1
            node, self._redirect_node = self._redirect_node, ""
            raise _Redirect(redirect, node)

    async def _read_frames(self, ws: WebSocketConnection, nursery: trio.Nursery) -> str:
        first = True
        while True:
            frame = parse_server_frame(await self._next_message(ws, first))
            first = False
            redirect = await self._on_frame(ws, frame.type, frame.fields, nursery)
            if redirect:
                return redirect

    async def _next_message(self, ws: WebSocketConnection, first: bool) -> str | bytes:
        """The node answers an upgrade at once (welcome or redirect); a session that stays
        silent after the upgrade (a link cut mid-handshake) is given up after connect_timeout."""
        if not first:
            return await ws.get_message()
        with trio.move_on_after(self.connect_timeout):
            return await ws.get_message()
        raise OSError(f"no welcome within {self.connect_timeout} s of the upgrade")

    async def _on_frame(
        self, ws: WebSocketConnection, kind: str, f: dict[str, Any], nursery: trio.Nursery
    ) -> str | None:
        if kind == "msg":
            await self._on_message(f)
        elif kind == "welcome":
            self._on_welcome(ws, f, nursery)
        elif kind == "redirect":
            self._redirect_node = str(f.get("node") or "")
            return str(f.get("url") or self.bootstrap)
        elif kind == "gap":
            self._on_gap(f)
        elif kind == "error":
            self._event("error", None, code=f.get("code"), detail=f.get("detail"))
            log.warning("server error frame: %s", f)
            self._note_retry_after(self._url, f.get("retry_after"))
            if f.get("code") == "bad_resume":
                self._reset_resume(f.get("ch"), str(f.get("detail") or ""))
        return None

    def _reset_resume(self, ch: object, detail: str) -> None:
        """The node refused our position (beyond its stream's end): start ``ch`` (both if
        unknown) over from the device's cursor instead of retrying the same ``last``."""
        for name in [ch] if ch in self.last else list(self.last):
            assert isinstance(name, str)
            self._event("resume_reset", name, refused=self.last[name], detail=detail)
            self.last[name] = self.consumed[name] = self._acked[name] = 0

    def _on_welcome(
        self, ws: WebSocketConnection, f: dict[str, Any], nursery: trio.Nursery
    ) -> None:
        self.stats.welcomes += 1
        self.node = str(f.get("node"))
        self.stats.nodes.append(self.node)
        self._welcomed, self._avoid = (self.node, self._url), ("", "")
        self._adopt_epoch(str(f.get("epoch") or ""))
        self._adopt_resume(f.get("resume"))
        if f.get("recovered") is False:
            self._event("not_recovered", None)
        hb = f.get("heartbeat") or {}
        interval = float(hb.get("interval", 25.0))
        timeout = float(hb.get("timeout", 60.0))
        nursery.start_soon(self._pinger, ws, interval, timeout)
        nursery.start_soon(self._acker, ws)
        self._online.set()
        self._set_state(State.ONLINE)

    def _adopt_epoch(self, epoch: str) -> None:
        if self.epoch and epoch and epoch != self.epoch:
            log.warning("epoch changed %s -> %s: cursors reset", self.epoch, epoch)
            self._event("epoch_reset", None, old=self.epoch, new=epoch)
            self.last = {"user": 0, "broadcast": 0}
            self.consumed = {"user": 0, "broadcast": 0}
        self.epoch = epoch or self.epoch

    def _adopt_resume(self, resume: object) -> None:
        """The node resumes after these seqs: anything up to them was acked by this device."""
        if not isinstance(resume, dict):
            return
        for ch in self.last:
            seq = resume.get(ch)
            if isinstance(seq, int) and seq > self.last[ch] and self.last[ch] > 0:
                self.last[ch] = seq

    async def _on_message(self, f: dict[str, Any]) -> None:
        ch, seq, prev = str(f.get("ch")), f.get("seq"), f.get("prev")
        if not isinstance(seq, int) or ch not in self.last:
            raise ProtocolError("bad_msg", "msg frame without a valid ch/seq")
        if seq <= self.last[ch]:
            self.stats.duplicates += 1
            return
        if self._breaks_chain(ch, prev):
            self.stats.chain_breaks += 1
            self._event("chain_break", ch, expected=self.last[ch], prev=prev, seq=seq)
            raise ProtocolError("chain_break", f"prev {prev} != last {self.last[ch]}: resuming")
        msg = Message(ch=ch, seq=seq, id=str(f.get("id")), data=f.get("data"), prev=prev)
        # Count it as received only once the application has it: a session torn down at this
        # checkpoint (its acker raised, say) must resume *before* this seq, not after it.
        await self._send.send(msg)
        self._after_gap.discard(ch)
        self.last[ch] = seq

    def _breaks_chain(self, ch: str, prev: object) -> bool:
        """A msg whose prev is not the last seq we got means one went missing in between."""
        return (
            isinstance(prev, int)
            and self.last[ch] > 0
            and ch not in self._after_gap
            and prev != self.last[ch]
        )

    def _on_gap(self, f: dict[str, Any]) -> None:
        ch, last = str(f.get("ch")), f.get("to")
        if ch not in self.last or not isinstance(last, int):
            raise ProtocolError("bad_gap", "gap frame without a valid ch/to")
        self.stats.gaps += 1
        self._event("gap", ch, first=f.get("from"), last=last)
        self.last[ch] = max(self.last[ch], last)
        self._after_gap.add(ch)

    def _event(self, kind: str, ch: str | None = None, **detail: Any) -> None:
        event = ClientEvent(kind, ch, detail)
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def _acker(self, ws: WebSocketConnection) -> None:
        """Send cumulative acks for what the application consumed, at most every
        ``ack_interval`` seconds (one frame per channel for everything consumed meanwhile)."""
        self._acked = dict(self.consumed)  # the server resumed from at least these
        self._ws = ws
        try:
            while True:
                await self._ack_wake.wait()
                self._ack_wake = trio.Event()
                await self._send_acks(ws)
                await trio.sleep(self.ack_interval)
        finally:
            self._ws = None

    async def _send_acks(self, ws: WebSocketConnection) -> None:
        for ch, seq in self.consumed.items():
            if seq > self._acked[ch] and seq <= self.last[ch]:
                await ws.send_message(json.dumps({"type": "ack", "ch": ch, "seq": seq}))
                self._acked[ch] = seq

    async def flush_acks(self, timeout: float = 1.0) -> None:
        """Send what is consumed but not yet acked (called on a clean close)."""
        if self.auto_ack and self._handed is not None:
            self.ack(self._handed)
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(timeout), contextlib.suppress(ConnectionClosed):
                await self._send_acks(ws)

    async def _pinger(self, ws: WebSocketConnection, interval: float, timeout: float) -> None:
        """Ping the node; if it does not answer within ``timeout``, drop the connection."""
        while True:
            await trio.sleep(interval)
            try:
                with trio.move_on_after(timeout) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    self.stats.last_error = "server heartbeat timeout"
                    await ws.aclose(Close.HEARTBEAT_TIMEOUT, "server silent")
                    return
            except ConnectionClosed:
                return

    @property
    def bootstrap(self) -> str:
        """The bootstrap URL the next fresh connection starts from."""
        return self.bootstraps[self._next_bootstrap % len(self.bootstraps)]

    def _set_state(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state)


def _code_of(exc: Exception) -> int | None:
    """The close code a session ended with (4000 + status for an HTTP refusal)."""
    if isinstance(exc, Refused):
        return exc.code
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        return exc.reason.code
    return None


def _rejection(body: bytes | None) -> tuple[str, str]:
    """(error, detail) of an HTTP refusal's JSON body ("" when it has none)."""
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        return "", ""
    if not isinstance(obj, dict):
        return "", ""
    return str(obj.get("error", "")), str(obj.get("detail", ""))


def _header(headers: Sequence[tuple[bytes, bytes]] | None, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) of an HTTP refusal, or None."""
    for key, value in headers or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


_DEFAULT_PORTS = {"ws": 80, "wss": 443, "http": 80, "https": 443}


def _node_key(url: str) -> str:
    """The node a URL names: host and port (the scheme's default when none), whatever its
    path and query (a URL that does not parse: itself)."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port or _DEFAULT_PORTS.get(u.scheme, 0)
    except ValueError:
        return url
    return f"{(u.hostname or '').lower()}:{port}"


@asynccontextmanager
async def open_websocket_over(
    stream: trio.SSLStream[trio.SocketStream] | trio.SocketStream,
    host: str,
    resource: str,
    timeout: float,
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket over an already connected stream (trio-websocket's lower layer)."""
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeout):
                ws = await wrap_client_stream(
                    nursery, stream, host, resource, message_queue_size=MESSAGE_QUEUE
                )
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the reader task's error (e.g. ConnectionRejected)
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_client(url: str | Sequence[str], **kwargs: Any) -> AsyncIterator[Client]:
    """Run a :class:`Client` in a nursery for the duration of the block."""
    client = Client(url, **kwargs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        try:
            yield client
            await client.flush_acks()
        finally:
            client._set_state(State.CLOSED)
            nursery.cancel_scope.cancel()
