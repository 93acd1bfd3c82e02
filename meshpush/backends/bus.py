"""NATS: the node's connection and live routing (core subjects per slot, and broadcast).

Subjects (``<c>`` = cluster name, ``<slot>`` = 0..4095); storage is in
:mod:`meshpush.backends.store`:

* ``mp.<c>.rp.<slot>.<user>`` — a stored unicast as JetStream republishes it once stored (the
  user stream's ``republish``: ``mp.<c>.store.u.>`` -> ``mp.<c>.rp.>``), to the slot's owner,
  which subscribes ``mp.<c>.rp.<slot>.*`` for every slot it owns;
* ``mp.<c>.live.u.<slot>`` — live notification of a stored unicast from the publishing node
  (nodes before the republish, or on a server that does not echo it back), to the slot's owner;
* ``mp.<c>.live.b`` — live notification of a stored broadcast, to every node;
* ``mp.<c>.presence.<node>`` — presence requests answered by one node
  (:mod:`meshpush.server.presence`).

A live notification is ``<header JSON>\\n<data JSON>``; the data is spliced into client frames
unparsed. A republished unicast is the stored message itself: its payload is the data, its
headers say the rest (:func:`decode_republished`: ``Nats-Sequence``, ``Mp-Prev`` or
``Mp-Prev-Back``, ``Mp-Id``, ``Mp-T``, ``traceparent``); the user is the subject's last token.
Both travel on the node's trio-native NATS link (:mod:`meshpush.backends.natslink`):
the link's reader calls the subscription's synchronous callback, which hands each one to the
router through a bounded channel (``send_nowait``: no task, wake-up or bridge crossing per
message); when that channel is full the notification is dropped and counted — the stream
still has the message. When the link reconnects (its subscriptions were gone meanwhile),
``None`` goes into the channel: "catch every session up from the streams". nats-py keeps the
control plane (:attr:`Bus.nc`, :attr:`Bus.js`: streams, KV, reads, presence, and — for now —
the JetStream publishes of :mod:`meshpush.backends.store`).

Health: a stalled server (paused, overloaded, a half-dead TCP path) keeps the connection "up"
while nothing gets through, so every ``nats_check_interval`` the bus publishes a small echo to
an inbox it subscribes to and waits at most ``nats_check_timeout`` for it to come back through
the server. One late echo makes the bus *unresponsive* (the node turns unready), the next
timely one responsive again: a stall is noticed within ``interval + timeout`` (3 s by default).
The echo is a plain publish/subscribe on the link; the server handles a connection's protocol
in order, so the same echo confirms new slot subscriptions. (nats-py's ``flush(timeout)`` is
used nowhere: it cancels its PONG future on timeout and the late PONG then stops the client's
read loop — nats-py 2.16: "connected", receiving nothing more.)
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import trio

from meshpush.backends.bridge import Bridge, aio, best_effort
from meshpush.backends.natslink import Link, LinkConfig, LinkError
from meshpush.backends.natswire import Msg
from meshpush.core.encoding import decode_token, encode_token, user_of_token
from meshpush.core.ring import slot
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

log = logging.getLogger(__name__)
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SUBSCRIBE_TIMEOUT = 5.0  # seconds for the server to confirm new slot subscriptions


@dataclass(frozen=True, slots=True)
class Notification:
    """A live notification as received by the owner node."""

    ch: str  # "user" | "broadcast"
    user: str | None
    seq: int
    prev: int
    id: str
    published_at: float
    data_json: str
    trace: tracing.Trace | None = None  # set by meshpush.observe.tracing, only when tracing is on


class Subjects:
    """Every subject and stream name of one cluster, in one place."""

    def __init__(self, cluster: str) -> None:
        if not _CLUSTER_RE.match(cluster):
            raise ValueError("cluster name must match [A-Za-z0-9_-]{1,64}")
        self.cluster = cluster
        self.broadcast_live = f"mp.{cluster}.live.b"

    def slot_live(self, s: int) -> str:
        return f"mp.{self.cluster}.live.u.{s}"

    def slot_republished(self, s: int) -> str:
        """What the owner of slot ``s`` subscribes: every user's republished messages."""
        return f"mp.{self.cluster}.rp.{s}.*"

    def user_republish(self) -> tuple[str, str]:
        """The user stream's republish (source, destination): ``mp.<c>.store.u.<slot>.<user>``
        becomes ``mp.<c>.rp.<slot>.<user>`` (the destination may not overlap the stream)."""
        return f"mp.{self.cluster}.store.u.>", f"mp.{self.cluster}.rp.>"

    @property
    def batch_marker(self) -> str:
        """The first message of a batch a node opens ahead, in the user stream but no
        user's subject (``mp.<c>.store.u.<slot>.<user>`` has one more token): republished
        to ``mp.<c>.rp.batch``, which no node subscribes."""
        return f"mp.{self.cluster}.store.u.batch"

    def presence(self, node_id: str) -> str:
        """Request/reply subject where ``node_id`` answers presence for its users."""
        return f"mp.{self.cluster}.presence.{encode_token(node_id)}"


#: ``json.dumps(x, separators=(",", ":"))`` without building an encoder per call
_HEADER_JSON = json.JSONEncoder(separators=(",", ":")).encode


def encode_notification(header: dict[str, Any], data_json: str) -> bytes:
    return (_HEADER_JSON(header) + "\n" + data_json).encode()


def decode_notification(ch: str, payload: bytes) -> Notification:
    """Parse a live notification; raises ValueError on garbage (counted, then ignored)."""
    head, sep, data = payload.decode().partition("\n")
    if not sep:
        raise ValueError("notification without data")
    h = json.loads(head)
    return Notification(
        ch=ch,
        user=h.get("u"),
        seq=int(h["s"]),
        prev=int(h.get("p", 0)),
        id=str(h["i"]),
        published_at=float(h["t"]),
        data_json=data,
    )


#: the headers a republished message is read by, in one pass over its raw block (a name
#: repeated: the last one, as a parsed block has it)
_WANTED = re.compile(rb"\r\n(Nats-Sequence|Mp-Prev|Mp-Prev-Back|Mp-Id|Mp-T|traceparent):([^\r]*)")


def decode_republished(subject: str, block: bytes | None, payload: bytes) -> Notification:
    """A stored unicast as JetStream republished it (``mp.<c>.rp.<slot>.<user>``, its raw
    header block) as the notification the router delivers; raises ValueError or KeyError on
    garbage (counted, then ignored). Reads only the headers it needs: ``Nats-Sequence`` (the
    seq), ``Mp-Prev-Back: k`` (prev = seq - k: a later message of an atomic batch) or else
    ``Mp-Prev`` (none: 0), ``Mp-Id`` (the id, a token) and ``Mp-T`` (publish time; a node
    before it sets none: the arrival time). The trace context: :func:`republished_trace`."""
    if not block or not block.startswith(b"NATS/1.0\r\n"):
        raise ValueError("republished message without headers")
    h = dict(_WANTED.findall(block))
    seq = int(h[b"Nats-Sequence"])
    back = h.get(b"Mp-Prev-Back")
    prev = seq - int(back) if back is not None else int(h.get(b"Mp-Prev", 0))
    if not 0 <= prev < seq:
        raise ValueError(f"republished message with prev {prev} for seq {seq}")
    sent = h.get(b"Mp-T")
    return Notification(
        ch="user",
        user=user_of_token(subject[subject.rindex(".") + 1 :]),
        seq=seq,
        prev=prev,
        id=decode_token(h[b"Mp-Id"].strip().decode()),
        published_at=float(sent) if sent is not None else time.time(),
        data_json=payload.decode(),
    )


def republished_trace(block: bytes | None) -> dict[str, str] | None:
    """The ``traceparent`` of a republished message, as :func:`tracing.received` takes it."""
    found = dict(_WANTED.findall(block)).get(b"traceparent") if block else None
    return None if found is None else {"traceparent": found.strip().decode()}


@dataclass(slots=True)
class BusStats:
    """Counted by the NATS connection; ``backend_up`` is filled in by ``statistics()``."""

    dropped: int = 0
    backend_errors: Tally = field(default_factory=Tally)
    backend_rtt: dict[str, float] = field(default_factory=dict)
    backend_up: dict[str, float] = field(default_factory=dict)


class Bus:
    """The node's NATS connection: stores, notifies and receives notifications."""

    def __init__(self, settings: Settings, bridge: Bridge, metrics: Metrics) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.cluster)
        self.bridge = bridge
        self.stats = BusStats()
        metrics.add_source(self)
        self.nc: Any = None  # nats-py, for the control plane
        self.js: Any = None
        self.link = Link(settings.nats_servers, LinkConfig(name=settings.node_id))
        self.link.on_connect = self._link_up
        self.link.on_disconnect = self._link_down
        self._subs: dict[int, tuple[int, int]] = {}  # slot -> link sids (live, republished)
        self._bcast_sub: int | None = None
        self._send, self.inbound = trio.open_memory_channel[Notification | None](16384)
        self._nc_connected = False
        self._missed = False  # a connection was down: catch everyone up once both are back
        self.reconnects = 0
        self.responsive = True  # the last round-trip check came back in time
        self.unresponsive_reason = ""
        self._echo_subject = ""
        self._echoes: dict[bytes, trio.Event] = {}  # round trips in flight, by token
        self._probes = 0
        #: every node in the ring view subscribes republished unicasts (set by the router;
        #: until then, and while an older node is a member, publishers notify too)
        self.owners_take_republish = False
        #: every node in the ring view reads the chain of an atomic batch (``Mp-Prev-Back``;
        #: set by the router: until the first view, and while an older node is a member, big
        #: requests are stored in rounds)
        self.peers_read_batches = False

    @property
    def connected(self) -> bool:
        """Both connections are up: the link (live routing) and nats-py (control plane)."""
        return self.link.connected and self._nc_connected

    def statistics(self) -> BusStats:
        return snapshot(self.stats, backend_up={"nats": float(self.healthy)})

    @property
    def healthy(self) -> bool:
        """Connected, and the last round trip through the server came back in time."""
        return self.connected and self.responsive

    def unhealthy_reason(self) -> str:
        if not self.connected:
            return "NATS disconnected"
        return self.unresponsive_reason if not self.responsive else ""

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Bus] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect both (retrying with backoff), then check the line until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.link.run)
            self._echo_subject = self.link.inbox + ".echo"
            self.link.subscribe(self._echo_subject, self._on_echo)
            await self._connect_with_retry()
            task_status.started(self)
            try:
                await self._check_forever()
            finally:
                await self._close()

    async def _close(self) -> None:
        """Close the connection; whatever NATS does (stalled, gone), shutdown goes on."""
        if self.nc is not None:
            await best_effort("NATS close", aio(self.nc.close), 2)

    async def _connect_with_retry(self) -> None:
        delay = 0.1
        for attempt in range(1, 1_000_000):
            try:
                await self._connect()
                return
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                self.stats.backend_errors["nats"] += 1
                log.warning("NATS connect attempt %d failed: %r", attempt, exc)
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        async def disconnected() -> None:
            self._nc_connected, self._missed = False, True
            log.warning("NATS (control plane) disconnected")

        async def reconnected() -> None:
            self._nc_connected = True
            log.info("NATS (control plane) reconnected")
            self._back_up()

        async def error(exc: Exception) -> None:
            self.stats.backend_errors["nats"] += 1
            log.warning("NATS error: %r", exc)

        self.nc = await aio(nats.connect)(
            servers=self.settings.nats_servers,
            name=self.settings.node_id,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self.js = self.nc.jetstream(timeout=5)
        self._nc_connected = True

    def _link_up(self, reconnect: bool) -> None:
        self._back_up()

    def _link_down(self, reason: str) -> None:
        self._missed = True
        self.stats.backend_errors["nats"] += 1
        log.warning("NATS disconnected: %s", reason)

    def _back_up(self) -> None:
        """After an interruption, once *both* connections are back (the link had lost its
        subscriptions; catching up reads the streams through nats-py): catch everyone up."""
        if not (self._missed and self.connected):
            return
        self._missed = False
        self.reconnects += 1
        log.info("NATS reconnected: catching up every session from the streams")
        try:
            self._send.send_nowait(None)  # None = "catch up everyone"
        except trio.WouldBlock:
            self.stats.dropped += 1

    # ------------------------------------------------------------ health

    async def _check_forever(self) -> None:
        """Round-trip the connection every ``nats_check_interval`` (bounded by the timeout)."""
        while True:
            await self.check(self.settings.nats_check_timeout)
            await trio.sleep(self.settings.nats_check_interval)

    async def check(self, timeout: float) -> bool:
        """One round trip through the server; updates :attr:`responsive`. True if in time."""
        if not self.connected:
            return False  # the disconnect/reconnect callbacks own this state
        try:
            rtt = await self._round_trip(timeout)
        except trio.TooSlowError:
            self._set_unresponsive(f"NATS round trip took longer than {timeout:g}s")
        except LinkError as exc:
            self._set_unresponsive(f"NATS round trip failed: {exc!r}")
        else:
            self.stats.backend_rtt["nats"] = rtt
            if not self.responsive:
                log.info("NATS answers again (round trip %.3fs): ready again", rtt)
            self.responsive, self.unresponsive_reason = True, ""
            return True
        return False

    async def _round_trip(self, timeout: float) -> float:
        self._probes += 1
        token, arrived = str(self._probes).encode(), trio.Event()
        self._echoes[token] = arrived
        start = trio.current_time()
        try:
            with trio.fail_after(timeout):
                self.link.publish(self._echo_subject, token)
                await arrived.wait()
        finally:
            del self._echoes[token]
        return trio.current_time() - start

    def _on_echo(self, msg: Msg) -> None:
        arrived = self._echoes.get(msg.payload)
        if arrived is not None:  # a late echo of a check that gave up is ignored
            arrived.set()

    def _set_unresponsive(self, reason: str) -> None:
        if self.responsive:
            self.stats.backend_errors["nats"] += 1
            log.warning("%s: NATS is stalled, not ready", reason)
        self.responsive, self.unresponsive_reason = False, reason

    # ------------------------------------------------------------ subscriptions

    async def subscribe_slots(self, slots: set[int]) -> None:
        """Subscribe the live subjects of ``slots``; returns once the server has them."""
        new = sorted(s for s in slots if s not in self._subs)
        if new:
            live, republished = self._callback("user"), self._republished_callback()
            for s in new:
                self._subs[s] = (
                    self.link.subscribe(self.subjects.slot_live(s), live),
                    self.link.subscribe(self.subjects.slot_republished(s), republished, True),
                )
            # the server handles a connection's protocol in order: once the echo is back, it
            # has the subscriptions
            if not await self.check(SUBSCRIBE_TIMEOUT):
                raise TimeoutError("NATS did not confirm the new subscriptions")

    async def unsubscribe_slots(self, slots: set[int]) -> None:
        for s in sorted(slots):
            for sid in self._subs.pop(s, ()):
                self.link.unsubscribe(sid)

    def subscribed(self) -> frozenset[int]:
        return frozenset(self._subs)

    def is_subscribed(self, s: int) -> bool:
        return s in self._subs

    async def subscribe_broadcast(self) -> None:
        if self._bcast_sub is None:
            cb = self._callback("broadcast")
            self._bcast_sub = self.link.subscribe(self.subjects.broadcast_live, cb)

    def _callback(self, ch: str) -> Callable[[Msg], None]:
        """For the live notifications of ``ch`` (:func:`decode_notification`)."""
        return self._receiver(
            lambda msg: decode_notification(ch, msg.payload), lambda msg: msg.headers
        )

    def _republished_callback(self) -> Callable[[Msg], None]:
        """For stored unicasts republished by JetStream (:func:`decode_republished`; the
        subscription takes raw headers)."""
        return self._receiver(
            lambda msg: decode_republished(msg.subject, msg.raw_headers, msg.payload),
            lambda msg: republished_trace(msg.raw_headers),
        )

    def _receiver(
        self,
        decode: Callable[[Msg], Notification],
        trace: Callable[[Msg], Mapping[str, str] | None],
    ) -> Callable[[Msg], None]:
        """The link calls it in its reader, once per message: decode, hand over (with the
        trace context when tracing is on)."""
        send = self._send
        stats = self.stats

        def on_message(msg: Msg) -> None:
            try:
                note = decode(msg)
                if tracing.ON and (headers := trace(msg)):
                    note = tracing.received(note, headers)
                send.send_nowait(note)
            except trio.WouldBlock:
                stats.dropped += 1
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                stats.backend_errors["bad_notification"] += 1
                log.warning("dropping malformed notification on %s: %r", msg.subject, exc)

        return on_message

    def live_subject(self, ch: str, user: str | None) -> str:
        if ch == "broadcast":
            return self.subjects.broadcast_live
        assert user is not None
        return self.subjects.slot_live(slot(user))
