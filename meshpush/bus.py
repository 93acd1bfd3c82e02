"""NATS: live routing (core subjects per slot) and durable storage (JetStream streams).

Subjects (``<c>`` = cluster name, ``<slot>`` = 0..4095, ``<u>`` = encoded user id):

* ``mp.<c>.store.u.<slot>.<u>`` — the user stream ``MP_<c>_USER``: every unicast, stored first;
* ``mp.<c>.store.b`` — the broadcast stream ``MP_<c>_BCAST``;
* ``mp.<c>.live.u.<slot>`` — live notification of a stored unicast, to the slot's owner;
* ``mp.<c>.live.b`` — live notification of a stored broadcast, to every node.

A live notification is ``<header JSON>\\n<data JSON>``; the data is spliced into client frames
unparsed. Incoming notifications are handed to trio through a bounded channel from the NATS
callback (``send_nowait``, no crossing per message); when that channel is full the
notification is dropped and counted — the stream still has the message.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.api
import nats.js.errors
import trio

from .bridge import Bridge, aio
from .encoding import encode_token
from .metrics import Metrics
from .ring import slot
from .settings import Settings

log = logging.getLogger(__name__)
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class StoreUnavailable(Exception):
    """NATS / JetStream did not accept or confirm a store in time (the API answers 503)."""


@dataclass(frozen=True, slots=True)
class Notification:
    """A live notification as received by the owner node."""

    ch: str  # "user" | "broadcast"
    user: str | None
    seq: int
    id: str
    published_at: float
    data_json: str


@dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    duplicate: bool


class Subjects:
    """Every subject and stream name of one cluster, in one place."""

    def __init__(self, cluster: str) -> None:
        if not _CLUSTER_RE.match(cluster):
            raise ValueError("cluster name must match [A-Za-z0-9_-]{1,64}")
        self.cluster = cluster
        self.user_stream = f"MP_{cluster}_USER"
        self.bcast_stream = f"MP_{cluster}_BCAST"
        self.broadcast_live = f"mp.{cluster}.live.b"
        self.broadcast_store = f"mp.{cluster}.store.b"
        self.user_store_all = f"mp.{cluster}.store.u.>"

    def user_store(self, user: str) -> str:
        return f"mp.{self.cluster}.store.u.{slot(user)}.{encode_token(user)}"

    def slot_live(self, s: int) -> str:
        return f"mp.{self.cluster}.live.u.{s}"


def encode_notification(header: dict[str, Any], data_json: str) -> bytes:
    return (json.dumps(header, separators=(",", ":")) + "\n" + data_json).encode()


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
        id=str(h["i"]),
        published_at=float(h["t"]),
        data_json=data,
    )


class Bus:
    """The node's NATS connection: stores, notifies and receives notifications."""

    def __init__(self, settings: Settings, bridge: Bridge, metrics: Metrics) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.cluster)
        self.bridge = bridge
        self.metrics = metrics
        self.nc: Any = None
        self.js: Any = None
        self.epoch = ""
        self._subs: dict[int, Any] = {}
        self._bcast_sub: Any = None
        self._send, self.inbound = trio.open_memory_channel[Notification | None](16384)
        self.connected = False
        self.reconnects = 0

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Bus] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying with backoff), make sure the streams exist, then hold the line."""
        await self._connect_with_retry()
        task_status.started(self)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await aio(self.nc.close)()

    async def _connect_with_retry(self) -> None:
        delay = 0.1
        for attempt in range(1, 1_000_000):
            try:
                await self._connect()
                return
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                self.metrics.backend_errors.labels(backend="nats").inc()
                log.warning("NATS connect attempt %d failed: %r", attempt, exc)
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        async def disconnected() -> None:
            self.connected = False
            log.warning("NATS disconnected")

        async def reconnected() -> None:
            self.connected = True
            self.reconnects += 1
            log.info("NATS reconnected")

        async def error(exc: Exception) -> None:
            self.metrics.backend_errors.labels(backend="nats").inc()
            log.warning("NATS error: %r", exc)

        self.nc = await aio(nats.connect)(
            servers=[self.settings.nats_url],
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
        self.connected = True
        await aio(self._ensure_streams)()

    async def _ensure_streams(self) -> None:
        s, subj = self.settings, self.subjects
        common = dict(
            max_age=s.max_message_age,
            duplicate_window=s.duplicate_window,
            num_replicas=s.stream_replicas,
            storage=nats.js.api.StorageType.FILE,
        )
        user_cfg = nats.js.api.StreamConfig(
            name=subj.user_stream,
            subjects=[subj.user_store_all],
            max_msgs_per_subject=s.max_msgs_per_user,
            **common,  # type: ignore[arg-type]
        )
        bcast_cfg = nats.js.api.StreamConfig(
            name=subj.bcast_stream,
            subjects=[subj.broadcast_store],
            max_msgs=s.max_msgs_per_user,
            **common,  # type: ignore[arg-type]
        )
        infos = [await self._add_or_update(cfg) for cfg in (user_cfg, bcast_cfg)]
        self.epoch = f"{int(infos[0].created.timestamp() * 1000) if infos[0].created else 0}"

    async def _add_or_update(self, cfg: Any) -> Any:
        try:
            return await self.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            return await self.js.update_stream(cfg)

    # ------------------------------------------------------------ subscriptions

    async def subscribe_slots(self, slots: set[int]) -> None:
        """Subscribe the live subjects of ``slots`` (one crossing for the whole set)."""
        new = sorted(s for s in slots if s not in self._subs)
        if new:
            subs = await aio(self._subscribe_many)(new)
            self._subs.update(subs)

    async def unsubscribe_slots(self, slots: set[int]) -> None:
        gone = [self._subs.pop(s) for s in sorted(slots) if s in self._subs]
        if gone:
            await aio(_unsubscribe_all)(gone)

    def subscribed(self) -> frozenset[int]:
        return frozenset(self._subs)

    async def subscribe_broadcast(self) -> None:
        if self._bcast_sub is None:
            cb = self._callback("broadcast")
            self._bcast_sub = await aio(self.nc.subscribe)(self.subjects.broadcast_live, cb=cb)

    async def _subscribe_many(self, slots: list[int]) -> dict[int, Any]:
        cb = self._callback("user")
        out = {s: await self.nc.subscribe(self.subjects.slot_live(s), cb=cb) for s in slots}
        await self.nc.flush(timeout=5)
        return out

    def _callback(self, ch: str) -> Any:
        send = self._send
        metrics = self.metrics

        async def on_message(msg: Any) -> None:
            try:
                send.send_nowait(decode_notification(ch, msg.data))
            except trio.WouldBlock:
                metrics.dropped.inc()
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                metrics.backend_errors.labels(backend="bad_notification").inc()
                log.warning("dropping malformed notification on %s: %r", msg.subject, exc)

        return on_message

    # ------------------------------------------------------------ publishing

    async def store_user(self, user: str, msg_id: str, data_json: str) -> Stored:
        """Store a unicast in the user stream, then notify the slot's owner.

        Raises :class:`StoreUnavailable` when NATS or JetStream does not confirm in time.
        """
        live = self.subjects.slot_live(slot(user))
        return await self._store(self.subjects.user_store(user), live, msg_id, data_json, user)

    async def store_broadcast(self, msg_id: str, data_json: str) -> Stored:
        subj = self.subjects
        return await self._store(subj.broadcast_store, subj.broadcast_live, msg_id, data_json)

    async def _store(
        self, store: str, live: str, msg_id: str, data_json: str, user: str | None = None
    ) -> Stored:
        if self.js is None or not self.connected:
            raise StoreUnavailable("not connected to NATS")

        async def work() -> Stored:
            headers = {"Nats-Msg-Id": msg_id}
            ack = await self.js.publish(store, data_json.encode(), headers=headers)
            if not ack.duplicate:
                head = {"u": user, "s": ack.seq, "i": msg_id, "t": time.time()}
                await self.nc.publish(live, encode_notification(head, data_json))
            return Stored(seq=ack.seq, duplicate=bool(ack.duplicate))

        try:
            return await self.bridge.call(work, timeout=5.0)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self.metrics.backend_errors.labels(backend="nats").inc()
            raise StoreUnavailable(f"store failed: {type(exc).__name__}") from None


async def _unsubscribe_all(subs: list[Any]) -> None:
    for sub in subs:
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.warning("unsubscribe failed: %r", exc)
