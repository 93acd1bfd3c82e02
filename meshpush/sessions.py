"""Who is connected to this node: one :class:`Session` per WebSocket, one :class:`Registry`.

A session holds only what an idle connection needs: ids, timestamps and a bounded outbound
queue. Deliveries are encoded once per message and offered to every target session without
awaiting (``offer``); a session whose queue is full is a slow consumer and is cut off (4008),
so memory stays bounded whatever a client does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import trio

from .delivery import Feed
from .limits import TokenBucket
from .protocol import Close
from .ring import slot

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class CloseRequest:
    code: int
    reason: str
    frame: str | None = None  # sent just before the close frame (e.g. a redirect)


class Session:
    """One client connection on its owner node."""

    __slots__ = (
        "cancel_scope",
        "close_request",
        "device",
        "expires_at",
        "feeds",
        "frames",
        "id",
        "last_seen",
        "nursery",
        "outbox",
        "queue",
        "since",
        "slot",
        "user",
    )

    def __init__(self, user: str, device: str, queue_size: int, expires_at: float) -> None:
        self.id = next(_ids)
        self.user = user
        self.device = device
        self.slot = slot(user)
        self.expires_at = expires_at  # wall clock, from the token's exp
        self.last_seen = trio.current_time()
        self.since = time.time()  # wall clock, for presence
        self.outbox, self.queue = trio.open_memory_channel[str](queue_size)
        self.cancel_scope: trio.CancelScope | None = None
        self.close_request: CloseRequest | None = None
        self.feeds: dict[str, Feed] = {"user": Feed(), "broadcast": Feed()}
        self.nursery: trio.Nursery | None = None  # where this session's replays run
        self.frames: TokenBucket | None = None  # inbound frame rate limit

    def offer(self, frame: str) -> bool:
        """Queue a frame without waiting. False (and the session is cut 4008) when it is full."""
        if self.close_request is not None:
            return False
        try:
            self.outbox.send_nowait(frame)
            return True
        except trio.WouldBlock:
            self.close(Close.SLOW_CONSUMER, "slow consumer")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    def close(self, code: int, reason: str, frame: str | None = None) -> None:
        """Ask the session to end: its handler sends ``frame`` (if any) and closes with ``code``."""
        if self.close_request is None:
            self.close_request = CloseRequest(code, reason, frame)
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} device={self.device!r}>"


@dataclass(frozen=True, slots=True)
class RegistryStats:
    sessions: int
    users: int


class Registry:
    """The one place that knows which sessions are on this node, by user and by slot."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, set[Session]]] = {}
        self._by_slot: dict[int, set[str]] = {}
        self._count = 0

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

    def statistics(self) -> RegistryStats:
        return RegistryStats(sessions=self._count, users=len(self._by_user))
