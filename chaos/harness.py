"""The chaos harness: load on a :class:`~meshpush.local.devcluster.LocalCluster` while faults run.

One trio program drives everything and records an :class:`~chaos.events.EventLog`:

* **devices** — one real SDK :class:`~meshpush.client.Client` per (user, device), bootstrapped
  with every node's ws URL, each message recorded ``(ch, seq, prev, id)`` as the application
  receives it. All devices are online before the first publish and run until the end.
* **publishers** — unicast messages at a steady rate to random users (:mod:`chaos.load`: a
  seeded mix of single publishes through random live nodes, ``POST /v1/publish/batch`` and
  multi-user ``POST /v1/publish`` through :class:`~meshpush.publisher.AsyncPublisher`),
  broadcasts every ``broadcast_interval``; each message has an idempotency id that every retry
  reuses (on a transport error, a timeout, 503 or 504: the same id, bounded). Only a 202 (for
  a batch or multi-user item: a seq in its result) makes a message *expected*.
* **faults** — the schedule, one fault at a time (:mod:`chaos.faults`), each recorded with the
  devices it affects; between faults the cluster's views must converge.
* **watchers** — node RSS sampled every second; any process that exits without being told to
  is an incident.
* **settle** — after the duration: every process that should run runs, views converge, every
  device is online, and deliveries stop changing (bounded); then ``/v1/nodes`` and
  ``/v1/route`` are snapshot for the checker.

Cluster operations that block (waiting for readiness, convergence, a drain) run on one
long-lived worker thread owned by the caller: children get ``PR_SET_PDEATHSIG``, which Linux
fires when the *thread* that spawned them exits, so they must not be spawned from trio's
short-lived worker threads.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import httpx
import trio

from meshpush.client import Client, ClientEvent, State
from meshpush.core.auth import issue_token
from meshpush.core.ring import Ring
from meshpush.local.devcluster import ClusterError, LocalCluster, NodeProc, Proc
from meshpush.publisher import AsyncPublisher, Attempt, PublishError

from .checker import check_placement, missing
from .events import (
    BROADCAST,
    USER,
    DeviceLog,
    EventLog,
    FailedPublish,
    FaultRecord,
    Incident,
    Instance,
    NodeSnapshot,
    Published,
    Received,
)
from .faults import FAULTS, FaultSpec
from .load import BATCH, BROADCAST_VIA, MULTI, SINGLE, LoadPlan, Outcome, Request, gave_up, outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Node settings for chaos runs: short lease and heartbeats so faults resolve in seconds.
NODE_SETTINGS: dict[str, Any] = {
    "lease_ttl": 2,
    "heartbeat_interval": 1.0,
    "heartbeat_timeout": 3.0,
    "drain_window": 0.5,
    "drain_timeout": 8.0,
    "session_queue": 256,
}
ODD_USER = "odd.user *>é"  # user 0: ids with subject/key metacharacters must work too
DEVICE_NAMES = ("phone", "laptop", "tablet")
RETRYABLE = frozenset({429, 500, 502, 503, 504})
MAX_EVENTS = 100  # SDK events kept per client instance
FAULT_TIMEOUT = 90.0  # longest one fault (inject + undo + convergence) may take
SLOW_FAULTS = {"rolling-upgrade": 4.0}  # faults that take longer: FAULT_TIMEOUT times this


@dataclass(frozen=True)
class Config:
    scenario: str
    duration: float
    seed: int
    nodes: int = 3
    users: int = 24
    rate: float = 30.0  # unicast publishes per second, all users together
    broadcast_interval: float = 1.0
    burst: int = 200  # messages published to the victim of a client-kill, replayed to it
    memory_mb: float = 400.0
    settle_timeout: float = 30.0
    publish_budget: float = 20.0  # seconds one publish is retried
    publish_attempts: int = 50
    max_inflight: int = 200  # publishes in flight at once
    sdk_retries: int = 12  # AsyncPublisher retries per call (backoff 0.1 s doubling, cap 2 s)
    backends: str = "single"  # or "clustered": 3 etcd members, 3 NATS servers, proxied links
    placement_bound: float = 20.0  # after a heal, every session is on its owner within this
    node_settings: dict[str, Any] = field(default_factory=lambda: dict(NODE_SETTINGS))

    @property
    def lease_ttl(self) -> float:
        return float(self.node_settings.get("lease_ttl", 3))


def make_devices(users: int, seed: int) -> list[tuple[str, str]]:
    """(user, device) pairs: about half the users have one device, the rest two or three."""
    rng = random.Random(f"devices-{seed}")
    out: list[tuple[str, str]] = []
    for i in range(users):
        user = ODD_USER if i == 0 else f"user-{i:03d}"
        count = rng.choices((1, 2, 3), weights=(50, 35, 15))[0]
        out += [(user, DEVICE_NAMES[j]) for j in range(count)]
    return out


def _online(client: Client | None) -> bool:
    return client is not None and client.state is State.ONLINE


def read_rss_mb(pid: int) -> float | None:
    """Resident set size of a process from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def counting_publisher(
    urls: Sequence[str], api_key: str, counters: dict[str, int], retries: int
) -> AsyncPublisher:
    """The SDK's AsyncPublisher, counting every failed attempt (and every per-item error of a
    202) by reason into the harness's counters, so its silent retries show in the report."""

    def count(name: str) -> None:
        counters[name] = counters.get(name, 0) + 1

    def on_attempt(attempt: Attempt) -> None:
        if attempt.error:
            count(f"sdk_{attempt.error.split(':')[0]}")
        elif attempt.status // 100 != 2:
            count(f"sdk_http_{attempt.status}")
        for code in attempt.item_errors:
            count(f"sdk_item_{code}")

    return AsyncPublisher(
        urls, api_key, timeout=3.0, retries=retries, backoff=0.1, on_attempt=on_attempt
    )


# ---------------------------------------------------------------- devices


class _Running:
    """One Client instance of a device and the scopes that end it."""

    def __init__(self, client: Client, record: Instance, kill_after: int | None) -> None:
        self.client = client
        self.record = record
        self.kill_after = kill_after
        self.scope = trio.CancelScope()
        self.consume_scope = trio.CancelScope()
        self.consumer_done = trio.Event()
        self.done = trio.Event()

    def sync(self) -> None:
        """Copy the SDK's counters into the record."""
        s, r = self.client.stats, self.record
        r.duplicates, r.connects, r.welcomes = s.duplicates, s.connects, s.welcomes
        r.redirects, r.chain_breaks, r.gaps = s.redirects, s.chain_breaks, s.gaps
        r.unexpected_errors = s.unexpected_errors
        r.nodes = list(s.nodes[-50:])


class Device:
    """A (user, device): the Client instances it ran, one at a time, and what they received."""

    def __init__(self, h: Harness, user: str, name: str) -> None:
        self.h = h
        self.user = user
        self.name = name
        self.log = DeviceLog(user, name)
        self.current: _Running | None = None

    @property
    def key(self) -> str:
        return self.log.key

    @property
    def client(self) -> Client | None:
        return self.current.client if self.current else None

    async def _token(self) -> str:
        return issue_token(self.h.cluster.token_secret, self.user, 3600)

    def start(self, kill_after: int | None = None) -> _Running:
        """Start a fresh Client instance (it knows nothing: the server's cursor resumes it)."""
        record = Instance(index=len(self.log.instances), started=self.h.now())
        self.log.instances.append(record)
        client = Client(
            list(self.h.bootstraps),
            token=self._token,
            device=self.name,
            on_event=lambda event: self._event(record, event),
        )
        running = _Running(client, record, kill_after)
        self.current = running
        self.h.nursery.start_soon(self._run, running)
        return running

    def _event(self, record: Instance, event: ClientEvent) -> None:
        if len(record.events) < MAX_EVENTS:
            detail = {
                k: v if isinstance(v, int | str | None) else repr(v)
                for k, v in event.detail.items()
            }
            record.events.append(
                {"kind": event.kind, "ch": event.ch, "t": round(self.h.now(), 4), **detail}
            )

    async def _run(self, r: _Running) -> None:
        try:
            with r.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(r.client.run)
                    nursery.start_soon(self._consume, r)
        finally:
            r.sync()
            r.record.ended = self.h.now()
            r.done.set()

    async def _consume(self, r: _Running) -> None:
        try:
            with r.consume_scope:
                while True:
                    msg = await r.client.receive()
                    data = msg.data if isinstance(msg.data, dict) else {}
                    sent = data.get("t")
                    r.record.received.append(
                        Received(
                            msg.ch,
                            msg.seq,
                            msg.prev,
                            msg.id,
                            round(self.h.now(), 4),
                            float(sent) if isinstance(sent, int | float) else None,
                        )
                    )
                    if r.kill_after is not None and len(r.record.received) >= r.kill_after:
                        r.record.end = "killed"
                        r.scope.cancel()  # no checkpoint before: exactly kill_after received
                        return
        finally:
            r.consumer_done.set()

    async def stop(self, clean: bool) -> None:
        """End the current instance. Clean: stop consuming, flush acks, then close (recorded as
        ``stopped`` only if every consumed message was acked on a live session)."""
        r = self.current
        if r is None:
            return
        r.record.end = "killed"
        if clean:
            r.consume_scope.cancel()
            await r.consumer_done.wait()
            await r.client.flush_acks(1.0)
            await trio.sleep(0.3)  # let the node read the acks before the socket goes
            acked = getattr(r.client, "_acked", None)  # what was sent (SDK internals)
            if r.client.state is State.ONLINE and acked == r.client.consumed:
                r.record.end = "stopped"
        r.scope.cancel()
        with trio.move_on_after(10):
            await r.done.wait()

    async def run_until_killed(self, after: int, timeout: float) -> int:
        """Start a fresh instance, kill it once it has received ``after`` messages (or after
        ``timeout``). Returns how many it received."""
        r = self.start(kill_after=after)
        with trio.move_on_after(timeout):
            await r.done.wait()
        if not r.done.is_set():
            r.record.end = "killed"
            r.scope.cancel()
            await r.done.wait()
        return len(r.record.received)


# ---------------------------------------------------------------- the harness


class Harness:
    """Runs load and faults on a started cluster; :meth:`run` returns the event log."""

    def __init__(
        self,
        cluster: LocalCluster,
        config: Config,
        schedule: list[FaultSpec],
        ops: ThreadPoolExecutor,
        progress: TextIO = sys.stderr,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.schedule = schedule
        self._ops = ops
        self._progress = progress
        self.log = EventLog(meta={"scenario": config.scenario, "seed": config.seed})
        self.devices = {
            f"{u}/{d}": Device(self, u, d) for u, d in make_devices(config.users, config.seed)
        }
        self.log.devices = [d.log for d in self.devices.values()]
        self.users = sorted({d.user for d in self.devices.values()})
        self.bootstraps = [n.ws_url for n in cluster.members]
        self._t0 = 0.0
        self._down: set[str] = set()  # processes we stopped on purpose (not crashes)
        self._gone: set[str] = set()  # nodes scaled down for good
        self._paused: set[str] = set()
        self._reported: set[int] = set()  # id() of Proc objects whose exit was reported
        self._rng = random.Random(f"nodes-{config.seed}")
        self._inflight = trio.Semaphore(config.max_inflight)
        self._auth = {"authorization": f"Bearer {cluster.api_key}"}
        self.http: httpx.AsyncClient
        self.nursery: trio.Nursery
        self.counters: dict[str, int] = {}  # publish retries by reason
        self._bursts = 0
        self._plan = LoadPlan(self.users, config.seed)
        self._publishers: list[AsyncPublisher] = []  # the last one is current

    # ------------------------------------------------------------ small services for faults

    def now(self) -> float:
        return trio.current_time() - self._t0

    async def op(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking cluster operation on the long-lived cluster thread."""
        future = self._ops.submit(fn, *args)
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    def say(self, text: str) -> None:
        print(f"[chaos t+{self.now():6.1f}] {text}", file=self._progress, flush=True)

    def node(self, node_id: str) -> NodeProc:
        return self.cluster.node(node_id)

    def device(self, key: str) -> Device:
        return self.devices[key]

    def all_devices(self) -> list[str]:
        return list(self.devices)

    def devices_on(self, node_id: str) -> list[str]:
        return [d.key for d in self.devices.values() if d.client and d.client.node == node_id]

    def running_ids(self) -> list[str]:
        return [n.id for n in self.cluster.members if n.id not in self._gone and n.proc.alive()]

    def devices_moving_to(self, node_id: str) -> list[str]:
        ring = Ring.build(self.running_ids())
        return [d.key for d in self.devices.values() if ring.owner(d.user) == node_id]

    def expect_down(self, name: str, for_good: bool = False) -> None:
        self._down.add(name)
        if for_good:
            self._gone.add(name)

    def expect_up(self, name: str) -> None:
        self._down.discard(name)

    def pause(self, node: NodeProc) -> None:
        self._paused.add(node.id)
        self.cluster.pause(node)

    def unpause(self, node: NodeProc) -> None:
        self.cluster.resume(node)
        self._paused.discard(node.id)

    def membership_changed(self) -> None:
        """Nodes came or went for good: bootstraps are every node meant to run (like DNS)."""
        self.bootstraps = [n.ws_url for n in self.cluster.members if n.id not in self._gone]
        for d in self.devices.values():
            if d.client is not None:
                d.client.bootstraps = list(self.bootstraps)
        self._new_publisher()

    def _new_publisher(self) -> None:
        """A publisher SDK client for the nodes meant to run now (in seeded random order);
        calls in flight finish on the previous one (closed at the end of the run)."""
        urls = [n.http_url for n in self.cluster.members if n.id not in self._gone]
        self._rng.shuffle(urls)
        self._publishers.append(
            counting_publisher(urls, self.cluster.api_key, self.counters, self.config.sdk_retries)
        )

    def inject(self, spec: FaultSpec, affected: list[str], measure: str = "new") -> FaultRecord:
        record = FaultRecord(
            kind=spec.kind,
            target=spec.target,
            planned=spec.at,
            t=self.now(),
            hold=spec.hold,
            affected=sorted(affected),
            measure=measure,
        )
        self.log.faults.append(record)
        self.say(f"fault {spec.kind} {spec.target}: {len(affected)} device(s) affected")
        return record

    def finish(self, record: FaultRecord, outcome: str) -> None:
        record.end, record.outcome = self.now(), outcome
        self.say(f"fault {record.kind} {record.target} over: {outcome}")

    def incident(self, kind: str, node: str | None, detail: str) -> None:
        self.log.incidents.append(Incident(kind, node, detail, self.now()))
        self.say(f"INCIDENT {kind} {node or ''}: {detail}")

    async def restart(self, node: NodeProc) -> None:
        await self.op(self.cluster.restart_node, node, False)
        self.expect_up(node.id)
        await self.op(self.cluster.wait_ready, node)
        await self.op(self.cluster.wait_converged)

    async def drain(self, node: NodeProc) -> int | None:
        """SIGTERM and wait for the exit; a drain that does not exit 0 in time is an incident."""
        timeout = float(self.config.node_settings.get("drain_timeout", 15)) + 5.0
        code = await self.op(self.cluster.stop_node, node, signal.SIGTERM, timeout)
        if code != 0:
            self.incident("drain_failed", node.id, f"exit code {code} after SIGTERM ({timeout}s)")
        return code

    async def placed_within(self, bound: float) -> float | None:
        """Seconds until every device is online with its session on its user's owner and no
        node holds a stray or misplaced session; None (and an incident) after ``bound``."""
        start = trio.current_time()
        problems: list[str] = []
        while trio.current_time() - start < bound:
            await self._snapshot()
            problems = [
                f"{v.kind} {v.node or f'{v.user}/{v.device}'}" for v in check_placement(self.log)
            ]
            offline = self.offline()
            if not problems and not offline:
                return round(trio.current_time() - start, 2)
            problems += [f"offline {key}" for key in offline]
            await trio.sleep(0.5)
        self.incident(
            "not_placed", None, f"{bound:.0f}s after the heal: {len(problems)}: {problems[:5]}"
        )
        return None

    async def wait_all_ready(self) -> None:
        for node in list(self.cluster.members):
            if node.id not in self._gone and node.proc.alive():
                await self.op(self.cluster.wait_ready, node)

    async def burst(self, user: str, count: int) -> None:
        """Publish ``count`` messages to ``user`` (4 at a time), like any other publish."""
        self._bursts += 1
        base = self._bursts
        limit = trio.Semaphore(4)

        async def one(i: int) -> None:
            async with limit:
                await self.publish(USER, user, f"k{base}-{i}")

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)

    # ------------------------------------------------------------ run

    async def run(self) -> EventLog:
        cfg = self.config
        self._t0 = trio.current_time()
        timeout = httpx.Timeout(3.0, connect=1.0, pool=10.0)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._new_publisher()
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            self.http = http
            try:
                await self._run_all(cfg)
            finally:
                for publisher in self._publishers:
                    with trio.CancelScope(shield=True):
                        await publisher.aclose()
        return self.log

    async def _run_all(self, cfg: Config) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._sample_memory)
            nursery.start_soon(self._watch_processes)
            with trio.move_on_after(cfg.duration + FAULT_TIMEOUT + cfg.settle_timeout + 120):
                await self._run(nursery)
                nursery.cancel_scope.cancel()
            if not nursery.cancel_scope.cancel_called:
                self.incident("harness_timeout", None, "the run did not finish in time")
                for node in self.cluster.members:
                    self.cluster.resume(node)
                with trio.move_on_after(60):
                    await self._snapshot()
                nursery.cancel_scope.cancel()

    async def _run(self, nursery: trio.Nursery) -> None:
        cfg = self.config
        for device in self.devices.values():
            device.start()
        await self._wait_online()
        shift = trio.current_time() - self._t0
        self._t0 += shift  # t = 0: the load starts (what happened before is negative)
        for device in self.devices.values():
            device.log.instances[0].started -= shift
        self.say(f"{len(self.devices)} devices online; load and faults start")
        async with trio.open_nursery() as load:
            load.start_soon(self._publish_ticker)
            load.start_soon(self._broadcast_ticker)
            await self._run_faults()
            await trio.sleep_until(self._t0 + cfg.duration)
            load.cancel_scope.cancel()
        self.say("load stopped; settling")
        await self._settle()
        await self._snapshot()
        self.log.meta["counters"] = dict(self.counters)

    def offline(self) -> list[str]:
        """Devices whose current instance is not online (welcomed) now."""
        return [d.key for d in self.devices.values() if not _online(d.client)]

    async def _wait_online(self) -> None:
        with trio.move_on_after(30):
            while self.offline():
                await trio.sleep(0.1)
            return
        offline = self.offline()
        self.incident("not_online", None, f"{len(offline)} device(s) never online: {offline[:5]}")

    async def _run_faults(self) -> None:
        for spec in self.schedule:
            if spec.at >= self.config.duration or self.now() >= self.config.duration - 0.5:
                self.say(f"no time left for {spec.kind} {spec.target} (planned t+{spec.at})")
                continue
            await trio.sleep_until(self._t0 + spec.at)
            try:
                with trio.fail_after(FAULT_TIMEOUT * SLOW_FAULTS.get(spec.kind, 1.0)):
                    await FAULTS[spec.kind](self, spec)
            except Exception as exc:  # a fault that failed or overran: record it, go on
                self.incident("fault_failed", spec.target, f"{spec.kind}: {exc!r}"[:2000])
            await self._converge()

    async def _converge(self) -> None:
        try:
            await self.op(self.cluster.wait_converged)
        except ClusterError as exc:
            self.incident("not_converged", None, str(exc))

    # ------------------------------------------------------------ load

    def _count(self, name: str) -> int:
        self.counters[name] = self.counters.get(name, 0) + 1
        return self.counters[name]

    async def _publish_ticker(self) -> None:
        await self._tick(1.0 / self.config.rate, self._plan.request)

    async def _broadcast_ticker(self) -> None:
        await self._tick(
            self.config.broadcast_interval,
            lambda n: Request(BROADCAST, BROADCAST_VIA, ((None, f"b{n}"),)),
        )

    async def _tick(self, interval: float, make: Callable[[int], Request]) -> None:
        """Start one publish request per message slot of ``interval`` (a request of k messages
        takes k slots); each in its own task (a stuck one does not slow the rate), at most
        ``max_inflight`` in flight."""
        next_at = trio.current_time()
        n = 0
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep_until(next_at)
                request = make(n)
                next_at = max(next_at + interval * request.slots, trio.current_time() - 1.0)
                await self._inflight.acquire()
                nursery.start_soon(self._publish_task, request)
                n += request.slots

    async def _publish_task(self, request: Request) -> None:
        try:
            if request.via in (SINGLE, BROADCAST_VIA):
                user, msg_id = request.items[0]
                await self.publish(request.ch, user, msg_id)
            else:
                await self.publish_sdk(request)
        finally:
            self._inflight.release()

    async def publish_sdk(self, request: Request) -> None:
        """A batch or multi-user request through the publisher SDK (which retries with the same
        ids), bounded by ``publish_budget``; every item answered with a seq is recorded."""
        first = round(self.now(), 4)
        publisher = self._publishers[-1]
        self._count(f"requests_{request.via}")
        result: Outcome | None = None
        with trio.move_on_after(self.config.publish_budget):
            try:
                result = outcome(request, await self._sdk_call(publisher, request, first), first)
            except PublishError as exc:
                result = gave_up(request, first, str(exc))
                if not exc.retryable:
                    self.incident("publish_rejected", None, f"{request.via}: {exc}"[:500])
        if result is None:
            result = gave_up(request, first, f"no answer within {self.config.publish_budget}s")
        self.log.published += result.published
        self.log.failed += result.failed
        for text in result.rejected:
            self.incident("publish_rejected", None, f"{request.via} item {text}")

    @staticmethod
    def _sdk_call(
        publisher: AsyncPublisher, request: Request, first: float
    ) -> Awaitable[list[Any]]:
        if request.via == BATCH:
            return publisher.publish_many(
                [{"user": u, "data": {"t": first, "i": i}, "id": i} for u, i in request.items]
            )
        assert request.via == MULTI
        users = [u for u, _ in request.items if u is not None]
        msg_id = request.items[0][1]
        return publisher.publish_users(users, {"t": first, "i": msg_id}, id=msg_id)

    def _pick(self, avoid: str | None) -> NodeProc | None:
        live = [n for n in self.cluster.members if n.proc.alive()]
        choices = [n for n in live if n.id != avoid] or live
        return self._rng.choice(choices) if choices else None

    async def publish(self, ch: str, user: str | None, msg_id: str) -> bool:
        """POST with retries (same id) until a 202; record it, or record that we gave up."""
        cfg = self.config
        first = round(self.now(), 4)
        body: dict[str, Any] = {"data": {"t": first, "i": msg_id}, "id": msg_id}
        if user is not None:
            body["user"] = user
        path = "/v1/publish" if ch == USER else "/v1/broadcast"
        via = SINGLE if ch == USER else BROADCAST_VIA
        self._count(f"requests_{via}")
        deadline = trio.current_time() + cfg.publish_budget
        error, last = "no live node", None
        for attempt in range(1, cfg.publish_attempts + 1):
            node = self._pick(last)
            if node is not None:
                last = node.id
                try:
                    resp = await self.http.post(node.http_url + path, json=body, headers=self._auth)
                except httpx.HTTPError as exc:
                    error = f"{node.id}: {type(exc).__name__}"
                    self._count(f"publish_{type(exc).__name__}")
                else:
                    if resp.status_code == 202:
                        seq = int(resp.json()["seq"])
                        self.log.published.append(
                            Published(ch, user, seq, msg_id, node.id, first, attempt, via)
                        )
                        return True
                    error = f"{node.id}: HTTP {resp.status_code} {resp.text[:120]}"
                    self._count(f"publish_http_{resp.status_code}")
                    if resp.status_code not in RETRYABLE:
                        self.incident("publish_rejected", node.id, f"{msg_id}: {error}")
                        break
            if trio.current_time() >= deadline:
                break
            await trio.sleep(min(0.05 * attempt, 0.5))
        self.log.failed.append(FailedPublish(ch, user, msg_id, first, attempt, error, via))
        return False

    # ------------------------------------------------------------ watchers

    async def _sample_memory(self) -> None:
        rss = self.log.rss_max_mb
        while True:
            for node in list(self.cluster.members):
                if node.proc.alive():
                    mb = read_rss_mb(node.proc.pid)
                    if mb is not None:
                        rss[node.id] = round(max(rss.get(node.id, 0.0), mb), 1)
            await trio.sleep(1.0)

    async def _watch_processes(self) -> None:
        """A process that exits without being told to is an incident (with its log's tail)."""
        while True:
            procs: list[tuple[str, Proc | None]] = [
                (m.name, m.proc) for m in self.cluster.backend_members()
            ]
            procs += [(n.id, n.proc) for n in self.cluster.members]
            procs += [(p.name, p) for n in self.cluster.members for p in n.proxies.values()]
            for name, proc in procs:
                if proc is None or id(proc) in self._reported or name in self._down:
                    continue
                if not proc.alive():
                    self._reported.add(id(proc))
                    tail = "\n    ".join(proc.log().splitlines()[-15:])
                    self.incident(
                        "process_crashed",
                        name,
                        f"exited with code {proc.popen.returncode} unasked; log tail:\n    {tail}",
                    )
            await trio.sleep(0.25)

    # ------------------------------------------------------------ settle and snapshot

    async def _settle(self) -> None:
        """Everything that should run runs, views converge, devices online, deliveries done."""
        cfg = self.config
        deadline = trio.current_time() + cfg.settle_timeout
        for node in self.cluster.members:
            self.cluster.resume(node)
        self._paused.clear()
        try:
            await self._restore_processes()
        except (ClusterError, OSError) as exc:
            self.incident("restore_failed", None, str(exc)[:2000])
        await self._converge()
        while trio.current_time() < deadline:
            if await self._settled():
                break
            await trio.sleep(0.5)
        else:
            self.say("settle timed out; checking what there is")
        await trio.sleep(1.0)  # a quiet second: late duplicates would show up now

    async def _restore_processes(self) -> None:
        c = self.cluster
        for member in c.backend_members():
            if not member.alive():
                self.expect_down(member.name)
                await self.op(c.start_member, member)
                self.expect_up(member.name)
        for node in list(c.members):
            for link in node.proxies:
                c.heal(node, link)
        for node in list(c.members):
            if node.id not in self._gone and not node.proc.alive():
                self.say(f"restarting {node.id}, which should be running")
                self.expect_down(node.id)
                await self.restart(node)

    async def _settled(self) -> bool:
        if self.offline():
            return False
        if any(missing(self.log).values()):
            return False
        await self._snapshot()
        return not any(check_placement(self.log))

    async def _snapshot(self) -> None:
        """Fill the log with what the checker needs: node states, routes, where devices are."""
        running = [n for n in self.cluster.members if n.id not in self._gone and n.proc.alive()]
        self.log.nodes = [await self._node_snapshot(n) for n in running]
        routes: dict[str, str] = {}
        for user in self.users:
            owner = await self._route(user, running)
            if owner is not None:
                routes[user] = owner
        self.log.routes = routes
        for d in self.devices.values():
            if d.current is not None:
                d.current.sync()
            d.log.online = _online(d.client)
            d.log.node = d.client.node if d.client else None

    async def _node_snapshot(self, node: NodeProc) -> NodeSnapshot:
        try:
            resp = await self.http.get(f"{node.http_url}/v1/nodes", timeout=2.0)
            info = resp.json()
            return NodeSnapshot(
                id=node.id,
                sessions=int(info["sessions"]),
                misplaced_sessions=int(info["misplaced_sessions"]),
                view=tuple(sorted(n["id"] for n in info["nodes"])),
            )
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return NodeSnapshot(id=node.id, reachable=False)

    async def _route(self, user: str, nodes: list[NodeProc]) -> str | None:
        for node in nodes:
            try:
                resp = await self.http.get(
                    f"{node.http_url}/v1/route", params={"user": user}, timeout=2.0
                )
                if resp.status_code == 200:
                    return str(resp.json()["node"])
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        return None
