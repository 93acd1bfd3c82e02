"""Ring views in, routes and migrations out: the ring, the slot subscriptions, migration.

On every membership view the router builds the ring, subscribes the slots it gained *before*
it accepts sessions for them, then redirects the sessions of slots it lost (spread over a
jittered window) and only then unsubscribes those slots. ``route(user)`` answers the gateway:
serve here, redirect there, or not available yet. Live notifications go from the bus to the
:class:`~meshpush.server.hub.Hub` (fan-out); the router only pumps them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

from meshpush.backends.bus import Bus, Notification
from meshpush.core import protocol
from meshpush.core.protocol import Close
from meshpush.core.ring import EMPTY, NodeInfo, Ring, View, slot
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.server.delivery import Feeder
from meshpush.server.hub import Hub, waiting
from meshpush.server.sessions import Session
from meshpush.settings import Settings

if TYPE_CHECKING:
    from meshpush.backends.store import Store
    from meshpush.server.webhook import Webhook

log = logging.getLogger(__name__)


_NOT_READY = {
    "registered": "not registered in etcd (etcd unreachable, slow or lease lost)",
    "in_ring": "not in its own ring view yet",
    "subscribed": "still subscribing the slots it owns",
}


@dataclass(frozen=True, slots=True)
class Route:
    kind: Literal["local", "redirect", "unavailable"]
    node: NodeInfo | None = None
    reason: str = ""


@dataclass(slots=True)
class RouterStats:
    """Counted on ring changes and redirects; the gauges are filled in by ``statistics()``."""

    members: int = 0
    owned_slots: int = 0
    ready: float = 0.0
    ring_changes: int = 0
    redirects: Tally = field(default_factory=Tally)


class Router:
    """Owns the ring view, the slot subscriptions and session migration of one node."""

    def __init__(
        self, settings: Settings, registry: Hub, bus: Bus, feeder: Feeder, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.feeder = feeder
        self.me = settings.node_id
        self.registry = registry
        self.bus = bus
        self.stats = RouterStats()
        metrics.add_source(self)
        self.view: View = {}
        self.ring: Ring = EMPTY
        self.owned: frozenset[int] = frozenset()
        self.registered = False
        self.draining = False
        self._drain_ring: Ring = EMPTY
        self.changed = trio.Event()  # set (and replaced) whenever the ring changes
        self._lock = trio.Lock()
        self._dead: dict[str, tuple[NodeInfo, Ring, Ring]] = {}  # probed dead: info, ring, next
        self._nursery: trio.Nursery | None = None
        self._held: list[Notification | None] = []  # taken from the bus, not dispatched yet
        self._older_seen = False  # a view held a node that does not take republished hints
        #: atomic batches: "on"; "paused" while a view holds a node that does not read them;
        #: "resuming" while the streams are set up again after the last such node left
        self._batches: Literal["on", "paused", "resuming"] = "on"
        self.webhook: Webhook | None = None  # offline webhook hooks (meshpush/server/webhook.py)
        #: told of a node a client could not reach (Membership.suspect probes it)
        self.suspect: Callable[[str], None] = lambda node_id: None

    # ------------------------------------------------------------ state

    def statistics(self) -> RouterStats:
        ring, owned, ready = len(self.ring.nodes), len(self.owned), float(self.ready)
        return snapshot(self.stats, members=ring, owned_slots=owned, ready=ready)

    @property
    def ready(self) -> bool:
        return not self.not_ready_reason()

    def readiness(self) -> dict[str, bool]:
        return {
            "registered": self.registered,
            "in_ring": self.me in self.ring.nodes,
            "subscribed": self.owned <= self.bus.subscribed(),
            "nats": self.bus.healthy,
            "draining": self.draining,
        }

    def not_ready_reason(self) -> str:
        """Why ``/readyz`` answers 503 (the first failing check), or "" when ready."""
        checks = self.readiness()
        if checks["draining"]:
            return "draining"
        if not checks["nats"]:
            return self.bus.unhealthy_reason()
        for check, reason in _NOT_READY.items():
            if not checks[check]:
                return reason
        return ""

    def route(self, user: str) -> Route:
        owner = (self._drain_ring if self.draining else self.ring).owner(user)
        if owner is None:
            return Route("unavailable", reason="no ring")
        if owner == self.me:
            if self.bus.is_subscribed(slot(user)):
                return Route("local")
            return Route("unavailable", reason="slot not subscribed yet")
        info = self.view.get(owner)
        if info is None:
            return Route("unavailable", reason="owner unknown")
        return Route("redirect", info, "draining" if self.draining else "owner")

    async def route_avoiding(self, user: str, avoid: str, patience: float) -> Route:
        """Route ``user``, but if the owner is ``avoid`` (a client could not reach it), wait up
        to ``patience`` seconds for the ring to change before answering with it anyway."""
        route = self.route(user)
        if _points_at(route, avoid):
            self.suspect(avoid)
        with trio.move_on_after(patience):
            while _points_at(route, avoid):
                ahead = self._route_ahead(user, avoid)
                if ahead is not None:
                    return ahead
                await self.changed.wait()
                route = self.route(user)
        return route

    def peer_dead(self, node_id: str) -> None:
        """``node_id`` was probed dead (Membership.suspect): its lease is being revoked. Wake
        the handshakes held for it, so that those whose next owner is another node go there
        now, while the ring waits for etcd, instead of in the surge after the ring change."""
        info = self.view.get(node_id)
        if info is not None and node_id != self.me:
            self._dead[node_id] = (info, self.ring, self.ring.without(node_id))
            self.changed.set()
            self.changed = trio.Event()

    def _route_ahead(self, user: str, dead: str) -> Route | None:
        """A redirect to the owner ``user`` will have once ``dead`` leaves the ring, if that is
        known (``peer_dead`` for the same node, the same ring) and is another live node."""
        known = self._dead.get(dead)
        if known is None or known[1] is not self.ring or self.view.get(dead) != known[0]:
            return None
        owner = known[2].owner(user)
        info = self.view.get(owner) if owner is not None and owner != self.me else None
        return None if info is None else Route("redirect", info, "owner")

    def misplaced_sessions(self) -> int:
        """Sessions here whose slot this node does not own (0 once membership is stable)."""
        foreign = self.registry.occupied_slots() - self.owned
        return len(self.registry.in_slots(foreign))

    def owner_info(self, user: str) -> NodeInfo | None:
        owner = self.ring.owner(user)
        return self.view.get(owner) if owner else None

    # ------------------------------------------------------------ services

    async def run(self, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch live notifications to sessions; host migration tasks."""
        await self.bus.subscribe_broadcast()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await self._dispatch()

    async def _dispatch(self) -> None:
        inbound = self.bus.inbound
        while True:
            if self._held:
                first = self._held.pop()
            else:
                try:
                    first = await inbound.receive()
                except trio.EndOfChannel:
                    return
            runs = waiting(first, inbound)  # what arrived together: coalesced
            for k, notes in enumerate(runs):
                if notes is None:  # NATS reconnected: notifications may have been missed
                    await self.feeder.catch_up_all(self.registry.all())  # type: ignore[arg-type]
                else:  # the last run may take what arrives while it goes out (``_more``)
                    await self._deliver(notes, last=k == len(runs) - 1)

    def _more(self, accept: Callable[[Notification], bool]) -> Notification | None:
        """The next waiting notification if ``accept`` takes it (``Hub.deliver_many``); if
        not, it is held and dispatched first, so the order of arrival is kept."""
        if self._held:
            item = self._held.pop()
        else:
            try:
                item = self.bus.inbound.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return None
        if item is not None and accept(item):
            return item
        self._held.append(item)
        return None

    async def _deliver(self, notes: list[Notification], last: bool = False) -> None:
        webhook = self.webhook
        if webhook is not None:
            for note in notes:
                webhook.notified(note)
        if tracing.ON:
            sent = await tracing.deliver_many(self.registry.deliver_many, notes, self.me)
        else:
            sent = await self.registry.deliver_many(notes, self._more if last else None)
        if webhook is not None:
            for note, n in zip(notes, sent, strict=True):
                if n and note.user is not None:
                    webhook.reached(note.user, note.seq)

    # ------------------------------------------------------------ ring changes

    async def apply(self, view: View, registered: bool) -> None:
        """Adopt a membership view: subscribe gained slots, then migrate and drop lost ones."""
        async with self._lock:
            ring = Ring.build(view) if set(view) != self.ring.nodes else self.ring
            owned = ring.slots_of(self.me) if not self.draining else frozenset()
            await self.bus.subscribe_slots(set(owned))
            lost = self.owned - owned
            if ring is not self.ring:
                self.changed.set()
                self.changed = trio.Event()
            old_ring, old_owned = self.ring, self.owned
            self.view, self.ring, self.owned = dict(view), ring, owned
            self._dead = {k: v for k, v in self._dead.items() if v[1] is ring}
            if self.draining:
                self._drain_ring = ring.without(self.me) if self.me in ring.nodes else ring
            self.registered = registered
            checking = self._track_batches(view)  # first: it may set the streams up already
            self._track_republish(view, checking)
            if ring is not old_ring:
                self._ring_changed(old_ring, ring, len(owned - old_owned), len(lost))
            if lost:
                self._start_migration(lost)

    def _track_republish(self, view: View, checking: bool = False) -> None:
        """Publishers leave unicast hints to JetStream's republish only while every node in
        the view takes them (:attr:`Bus.owners_take_republish`; a rolling upgrade: while an
        older node is a member, this one notifies too). Once the last older node is gone, the
        stream is checked again before this node stops notifying: an older node that started
        meanwhile updated the stream without the republish (``Store.setup`` puts it back;
        ``checking``: :meth:`_track_batches` just started that setup)."""
        everyone = all(info.republish for info in view.values())
        if not everyone:
            self._older_seen = True
        elif self._older_seen and self._nursery is not None:
            self._older_seen = False
            store = self.feeder.store
            store.republished = False  # notify until the stream is checked
            if not checking:
                self._nursery.start_soon(self._check_stream, store)
        self.bus.owners_take_republish = everyone

    def _track_batches(self, view: View) -> bool:
        """Big requests go as atomic batches only while every node in the view reads their
        chain header (:attr:`NodeInfo.batches`, :attr:`Bus.peers_read_batches`; a rolling
        upgrade from an older version: in rounds, each message with its own ``Mp-Prev``,
        until the last older node is gone). Then the streams are set up again first (an older
        node that started meanwhile set the user stream up without ``allow_atomic``): batches
        resume once that succeeded (failed: at a later view). An empty view (no membership
        yet, or lost): rounds. True when it started that setup."""
        older = sorted(n for n, info in view.items() if not info.batches)
        started = False
        if older:
            if self._batches != "paused":
                log.info("big publish requests in rounds while %s cannot read batches", older)
            self._batches = "paused"
        elif self._batches == "paused" and self._nursery is not None:
            self._batches, started = "resuming", True
            self._nursery.start_soon(self._resume_batches, self.feeder.store)
        self.bus.peers_read_batches = bool(view) and self._batches == "on"
        return started

    async def _resume_batches(self, store: Store) -> None:
        if not await self._check_stream(store):
            self._batches = "paused"  # tried again at the next view
        elif self._batches == "resuming":
            self._batches = "on"
            self.bus.peers_read_batches = bool(self.view)
            log.info("big publish requests: atomic batches again (every node reads them)")

    @staticmethod
    async def _check_stream(store: Store) -> bool:
        """Apply the streams' configuration again (republish, allow_atomic), as at start."""
        try:
            await store.setup()
        except Exception as exc:  # nats/JetStream errors are many: notify, store in rounds
            log.warning("could not check the user stream (notifying, in rounds): %r", exc)
            return False
        return True

    def _ring_changed(self, old: Ring, new: Ring, gained: int, lost: int) -> None:
        """Count and log every ring change: grow, shrink (a leave or an expired lease), both."""
        self.stats.ring_changes += 1
        log.info(
            "ring: %d nodes (joined %s, left %s), own %d slots, gained %d, lost %d",
            len(new.nodes),
            _names(new.nodes - old.nodes),
            _names(old.nodes - new.nodes),
            len(self.owned),
            gained,
            lost,
        )

    def _start_migration(self, lost: frozenset[int]) -> None:
        assert self._nursery is not None
        sessions = self.registry.in_slots(lost)
        self._nursery.start_soon(self._migrate, sessions, lost, self.settings.drain_window)

    async def _migrate(self, sessions: list[Session], lost: frozenset[int], window: float) -> None:
        """Redirect ``sessions`` at jittered times over ``window``, then unsubscribe ``lost``."""
        await self.redirect_spread(sessions, window)
        await trio.sleep(0.05)  # let the last sessions' closes leave before the subscription goes
        still_lost = {s for s in lost if s not in self.owned}
        await self.bus.unsubscribe_slots(still_lost)

    async def redirect_spread(self, sessions: list[Session], window: float) -> None:
        start = trio.current_time()
        schedule = sorted((random.uniform(0.05 * window, window), s.id, s) for s in sessions)
        for offset, _, session in schedule:
            await trio.sleep_until(start + offset)
            self.redirect(session)

    def redirect(self, session: Session) -> None:
        """Send ``session`` to its current owner (if that is not this node) and close it 4302."""
        route = self.route(session.user)
        if route.kind == "local":
            return
        if route.node is None:
            session.close(Close.REDIRECT, "owner unavailable")
            self.stats.redirects["unavailable"] += 1
            return
        frame = protocol.redirect(node=route.node.id, url=route.node.ws_url, reason=route.reason)
        session.close(Close.REDIRECT, route.reason, frame)
        self.stats.redirects[route.reason] += 1

    # ------------------------------------------------------------ drain

    def begin_drain(self) -> None:
        """Stop owning anything: from now on every handshake is redirected to the next owner."""
        self._drain_ring = self.ring.without(self.me)
        self.draining = True
        self.owned = frozenset()

    async def drain(self) -> None:
        """Redirect every session to its next owner, spread over the drain window."""
        if not self.draining:
            self.begin_drain()
        await self.redirect_spread(self.registry.all(), self.settings.drain_window)


def _points_at(route: Route, node_id: str) -> bool:
    return route.kind == "redirect" and route.node is not None and route.node.id == node_id


def _names(nodes: frozenset[str], most: int = 8) -> str:
    """A short, bounded list of node ids for a log line."""
    ids = sorted(nodes)
    more = f" +{len(ids) - most} more" if len(ids) > most else ""
    return (",".join(ids[:most]) or "-") + more
