"""One meshpush node: the services it starts, in order, and how it stops.

Start: bridge -> HTTP API (healthz answers from here on) -> NATS bus -> router -> WebSocket
gateway -> membership (registers in etcd; /readyz turns 200 once registered, in the ring and
subscribed). SIGTERM drains (readiness off, lease revoked, sessions redirected over
``drain_window``, exit 0 within ``drain_timeout``); SIGINT stops at once (lease revoked).
Every stop step is bounded and a backend failing in it (etcd or NATS down or stalled) is only
logged: the node exits 0 whatever its backends do. As a backstop (a task that ignores
cancellation, e.g. a library call that swallows it), the process exits anyway ``STOP_BOUND``
seconds after a SIGINT (``drain_timeout + STOP_BOUND`` after a SIGTERM), logging the tasks it
left behind (``exit_deadline``; set by :func:`main` only, never when a node runs in-process).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio_asyncio

from meshpush.backends.bridge import Bridge, best_effort
from meshpush.backends.bus import Bus
from meshpush.backends.membership import Membership
from meshpush.backends.store import Cursors, Store
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import logs, tracing
from meshpush.observe.looplag import LoopLag
from meshpush.observe.metrics import Metrics
from meshpush.server.api import Api
from meshpush.server.delivery import Feeder
from meshpush.server.gateway import Gateway
from meshpush.server.hub import Hub
from meshpush.server.presence import Presence
from meshpush.server.router import Router
from meshpush.server.webhook import Webhook
from meshpush.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a stop may take before the process exits anyway. The stop steps together are
#: bounded by about 7 s (lease revoke 2 s, closes 0.1 s, cursor flush 3 s, NATS close 2 s).
STOP_BOUND = 10.0


@dataclass(slots=True)
class NodeStats:
    backend_errors: Tally = field(default_factory=Tally)
    backend_up: dict[str, float] = field(default_factory=dict)


class Node:
    """The services of one node, started by :meth:`run`."""

    def __init__(self, settings: Settings, exit_deadline: bool = False) -> None:
        self.settings = settings
        self.exit_deadline = exit_deadline
        self.metrics = Metrics(settings.node_id)
        self.stats = NodeStats()
        self.metrics.add_source(self)
        self.bridge = Bridge()
        self.registry = Hub(self.metrics)
        self.bus = Bus(settings, self.bridge, self.metrics)
        self.store = Store(settings, self.bus, self.bridge, self.metrics)
        self.cursors = Cursors(self.store, self.metrics, settings.cursor_flush_interval)
        self.feeder = Feeder(settings, self.store, self.cursors, self.metrics)
        self.router = Router(settings, self.registry, self.bus, self.feeder, self.metrics)
        self.presence = Presence(settings, self.registry, self.router, self.bus, self.metrics)
        self.webhook = self._webhook() if settings.offline_webhook_url else None
        self.api = Api(settings, self.router, self.store, self.metrics, self.presence)
        self.gateway = Gateway(settings, self.registry, self.router, self.feeder, self.metrics)
        self.membership: Membership | None = None
        self._nursery: trio.Nursery | None = None

    def statistics(self) -> NodeStats:
        # etcd is down (0) until the membership starts and reports for itself: never empty
        return snapshot(self.stats, backend_up={"etcd": 0.0} if self.membership is None else {})

    def _webhook(self) -> Webhook:
        """The offline webhook, hooked where live notifications and deliveries happen."""
        webhook = Webhook(
            self.settings, self.metrics, lambda user: self.router.route(user).kind == "local"
        )
        self.router.webhook = webhook
        self.feeder.on_sent = webhook.reached
        return webhook

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(self._asyncio_error)
            try:
                await self._services(task_status)
            except Exception:
                log.exception("node %s failed", self.settings.node_id)
                raise

    def _asyncio_error(self, loop: object, context: dict[str, object]) -> None:
        """An asyncio task failed with nobody awaiting it (e.g. a read cut off by shutdown).

        trio-asyncio would re-raise it into the loop and stop the node; log and count it."""
        self.stats.backend_errors["asyncio"] += 1
        log.warning("asyncio: %s %r", context.get("message"), context.get("exception"))

    async def _services(self, task_status: trio.TaskStatus[Node]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(LoopLag(self.metrics).run)
            nursery.start_soon(GcPacer().run)
            await nursery.start(self.bridge.run)
            http_port = await nursery.start(self.api.serve)
            await nursery.start(self.bus.run)
            await self._setup_store()
            nursery.start_soon(self.cursors.run)
            await nursery.start(self.router.run)
            await nursery.start(self.presence.run)
            if self.webhook is not None:
                await nursery.start(self.webhook.run)
            ws_port = await nursery.start(self.gateway.serve)
            public = self.settings.replace(ws_port=ws_port, http_port=http_port)
            self.membership = Membership(public, self.router.apply, self.metrics)
            self.router.suspect = self.membership.suspect
            self.membership.on_dead = self.router.peer_dead
            nursery.start_soon(self.membership.run)
            await nursery.start(self._signals)  # before announcing: a signal from then on is ours
            announce(public)
            task_status.started(self)

    async def _setup_store(self) -> None:
        """Create/update streams and the cursor bucket; retry while JetStream is not ready."""
        for attempt in range(1, 1_000_000):
            try:
                await self.store.setup()
                return
            except Exception as exc:  # nats/JetStream errors are many; logged and counted
                self.stats.backend_errors["jetstream"] += 1
                log.warning("JetStream setup attempt %d failed: %r", attempt, exc)
                await trio.sleep(min(0.2 * attempt, 3.0))

    async def _signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM drains, SIGINT stops; signals after the first are logged and ignored."""
        assert self._nursery is not None
        stopping = False
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if stopping:
                    log.info("already stopping; ignoring signal %d", signum)
                    continue
                stopping = True
                draining = signum == signal.SIGTERM
                if self.exit_deadline:
                    bound = STOP_BOUND + (self.settings.drain_timeout if draining else 0.0)
                    trio.lowlevel.spawn_system_task(_exit_after, bound)
                self._nursery.start_soon(self.drain if draining else self.stop)

    async def drain(self) -> None:
        """Leave the cluster without losing anyone: redirect every session, then stop."""
        log.info("draining %d sessions", len(self.registry))
        with trio.move_on_after(self.settings.drain_timeout):
            self.router.begin_drain()
            if self.membership is not None:
                await self.membership.leave()
            await self.router.drain()
            while len(self.registry):
                await trio.sleep(0.05)
        log.info("drained; %d sessions left", len(self.registry))
        await self.stop()

    async def stop(self) -> None:
        """Leave etcd, close every session, flush cursors, then cancel every service."""
        if self.membership is not None:
            await self.membership.leave()  # bounded; never raises
        await self.registry.close_all(self.registry.all(), 1001, "node stopping")
        await trio.sleep(0.1)
        await best_effort("cursor flush", self.cursors.flush, 3)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()


async def _exit_after(seconds: float) -> None:
    """The backstop of a stop: a system task (a cancelled nursery does not cancel it; it ends
    with the run) that exits the process if the run is still going after ``seconds``."""
    await trio.sleep(seconds)
    left = stuck_tasks(trio.lowlevel.current_root_task())
    log.error("stop did not finish within %.0fs; exiting anyway. Left: %s", seconds, left)
    logging.shutdown()
    os._exit(0)


def stuck_tasks(root: trio.lowlevel.Task | None, limit: int = 20) -> str:
    """The innermost tasks under ``root`` with where each waits (for the backstop's log)."""
    found: list[str] = []
    pending = [root] if root is not None else []
    while pending and len(found) < limit:
        task = pending.pop()
        children = [t for n in task.child_nurseries for t in n.child_tasks]
        if children:
            pending.extend(children)
            continue
        if task is trio.lowlevel.current_task() or task.name.startswith("<"):
            continue  # the backstop itself, trio's own
        frames = [
            f"{f.f_code.co_name}:{lineno}"
            for f, lineno in task.iter_await_frames()
            if "/site-packages/trio" not in f.f_code.co_filename  # trio, trio_asyncio
        ]
        found.append(f"{task.name} at {' > '.join(frames[-3:])}")
    return "; ".join(found)


def announce(settings: Settings) -> None:
    """One JSON line on stdout with where this node listens (read by devcluster and people)."""
    line = {
        "event": "listening",
        "node": settings.node_id,
        "ws_url": settings.ws_url,
        "http_url": settings.http_url,
    }
    print(json.dumps(line), flush=True)
    log.info(
        "node %s listening: ws %s, http %s", settings.node_id, settings.ws_url, settings.http_url
    )


GC_THRESHOLDS = (10_000, 20, 10)  # young objects between collections (default 700, 10, 10)


def tune_gc() -> None:
    """What exists at start (modules, classes, settings) lives as long as the process: freeze
    it out of the cyclic collector's scans, and collect young objects less often. In a
    handshake storm the default settings made the collector ~20% of the node's CPU (full
    collections of ~250k objects every few hundred handshakes; docs/performance.md)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: seconds between paced collections (GcPacer)
GC_PACE = 1.0


def paced_generation(counts: tuple[int, int, int], thresholds: tuple[int, int, int]) -> int:
    """The generation a paced collection takes: the middle one once more young collections
    than its threshold ran since it last did (what an allocation-triggered collection would
    take then), else the young one. Never the oldest: full collections stay the
    interpreter's (its rule: only when a quarter of the long-lived objects are new)."""
    return 1 if counts[1] > thresholds[1] else 0


class GcPacer:
    """Collects the young generation every ``interval`` s, so it never holds more than about
    a second of survivors. CPython counts *net* allocations towards the young threshold
    (every deallocation, of any generation, takes one off), so a session that replaces a
    long-lived object by a new one (a deadline, a buffer) adds to the young list without
    moving the counter: at 10,000 sessions the young list grew to ~110,000 objects between
    collections, and each such collection stalled the loop 40-60 ms (docs/performance.md,
    "Event-loop stalls and the garbage collector")."""

    def __init__(
        self,
        interval: float = GC_PACE,
        collect: Callable[[int], object] = gc.collect,
        counts: Callable[[], tuple[int, int, int]] = gc.get_count,
        thresholds: Callable[[], tuple[int, int, int]] = gc.get_threshold,
    ) -> None:
        self.interval = interval
        self.collect = collect
        self.counts = counts
        self.thresholds = thresholds

    def step(self) -> None:
        self.collect(paced_generation(self.counts(), self.thresholds()))

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.step()


def main(settings: Settings) -> int:
    logs.setup(settings)
    tracing.setup(settings.node_id)  # on only when OTEL_* variables ask (docs/operations.md)
    tune_gc()
    try:
        trio.run(Node(settings, exit_deadline=True).run)
    except KeyboardInterrupt:  # a signal arrived after the signal handler was gone
        return 130
    finally:
        tracing.stop()  # exports what is batched, for at most tracing.STOP_TIMEOUT
    return 0
