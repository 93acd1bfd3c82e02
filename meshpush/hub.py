"""The local sessions of a node: a registry by user, device and slot, and encode-once fan-out.

``deliver`` encodes a live notification's frame once (``wire.encode_text``) and offers the same
``bytes`` to each target session's feed; it yields to the scheduler every ``YIELD_EVERY``
sessions, so a broadcast to 100k sessions never stalls the event loop. ``close_all`` spreads
mass closes the same way (the etcd keepalive must never miss a beat).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import trio

from . import protocol
from .bus import Notification
from .metrics import Metrics
from .sessions import Session
from .wire import encode_text

YIELD_EVERY = 256


@dataclass(frozen=True, slots=True)
class HubStats:
    sessions: int
    users: int


class Hub:
    """The one place that knows which sessions are on this node."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._by_user: dict[str, dict[str, set[Session]]] = {}
        self._by_slot: dict[int, set[str]] = {}
        self._count = 0

    # ------------------------------------------------------------ registry

    def add(self, session: Session) -> None:
        devices = self._by_user.setdefault(session.user, {})
        devices.setdefault(session.device, set()).add(session)
        self._by_slot.setdefault(session.slot, set()).add(session.user)
        self._count += 1

    def remove(self, session: Session) -> None:
        devices = self._by_user.get(session.user)
        sessions = devices.get(session.device) if devices else None
        if not sessions or session not in sessions:
            return
        sessions.discard(session)
        self._count -= 1
        if not sessions:
            del devices[session.device]  # type: ignore[union-attr]
        if not devices:
            del self._by_user[session.user]
            users = self._by_slot[session.slot]
            users.discard(session.user)
            if not users:
                del self._by_slot[session.slot]

    def of_user(self, user: str) -> Iterator[Session]:
        for sessions in self._by_user.get(user, {}).values():
            yield from sessions

    def count_of_user(self, user: str) -> int:
        return sum(len(ss) for ss in self._by_user.get(user, {}).values())

    def in_slots(self, slots: Iterable[int]) -> list[Session]:
        return [s for sl in slots for user in self._by_slot.get(sl, ()) for s in self.of_user(user)]

    def all(self) -> list[Session]:
        return [s for devices in self._by_user.values() for ss in devices.values() for s in ss]

    def occupied_slots(self) -> frozenset[int]:
        return frozenset(self._by_slot)

    def __len__(self) -> int:
        return self._count

    def statistics(self) -> HubStats:
        return HubStats(sessions=self._count, users=len(self._by_user))

    # ------------------------------------------------------------ fan-out

    def targets(self, note: Notification) -> list[Session]:
        if note.ch == "broadcast":
            return self.all()
        return list(self.of_user(note.user)) if note.user is not None else []

    async def deliver(self, note: Notification) -> int:
        """Hand a live notification to its sessions' feeds; the frame is encoded once."""
        targets = self.targets(note)
        if not targets:
            return 0
        ch: protocol.Channel = "broadcast" if note.ch == "broadcast" else "user"
        frame = encode_text(
            protocol.message(
                ch=ch, seq=note.seq, id=note.id, data_json=note.data_json, prev=note.prev
            )
        )
        sent = 0
        for i, session in enumerate(targets, 1):
            sent += session.live(ch, note, frame)
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
        if sent and self.metrics is not None:
            self.metrics.delivered.labels(ch=ch).inc(sent)
            self.metrics.delivery_latency.observe(max(0.0, time.time() - note.published_at))
        return sent

    async def close_all(self, sessions: Iterable[Session], code: int, reason: str) -> None:
        """Close many sessions, yielding every ``YIELD_EVERY`` (their tasks finish meanwhile)."""
        for i, session in enumerate(sessions, 1):
            session.close(code, reason)
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
