"""Faults, scenarios and the seeded fault schedule.

A *fault* is one small async function ``fault(harness, spec)`` that injects something, waits
``spec.hold`` and puts things back (restart, SIGCONT, ...). :data:`FAULTS` maps names to them.
A *scenario* names the faults it draws from; ``mixed`` (and ``soak``) draw every fault.

The schedule is pure: :func:`make_schedule` uses ``random.Random(seed)`` only, and models the
node set (who is up, which id a scale-up gets), so the same seed and sizes give the same
faults, targets, holds and planned times — a failing run replays exactly. Faults run one at a
time; a fault that overruns only delays the next one (the record keeps planned and actual
times).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from meshpush.local.devcluster import CLUSTER_SIZE, ClusterError, Member

if TYPE_CHECKING:
    from .harness import Harness


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    at: float  # planned start, seconds after the load started
    target: str  # a node id, "etcd", "nats", or a device key "user/device"
    hold: float = 0.0  # how long the fault lasts before it is undone

    def describe(self) -> str:
        hold = f" for {self.hold:.1f}s" if self.hold else ""
        return f"t+{self.at:5.1f}  {self.kind:<13} {self.target}{hold}"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kinds: tuple[str, ...]
    about: str
    duration: float = 60.0  # default --duration
    users: int = 24  # default --users
    rate: float = 30.0  # default --rate (unicast publishes per second)
    nodes: int = 3  # default --nodes
    clustered: bool = False  # needs --backends clustered


Fault = Callable[["Harness", FaultSpec], Awaitable[None]]

# ---------------------------------------------------------------- the faults


async def kill(h: Harness, spec: FaultSpec) -> None:
    """SIGKILL a node (no drain, no lease revoke), restart it after ``hold``."""
    node = h.node(spec.target)
    h.expect_down(node.id)
    record = h.inject(spec, h.devices_on(node.id))
    await h.op(h.cluster.kill, node)
    await trio.sleep(spec.hold)
    await h.restart(node)
    h.finish(record, "SIGKILL; restarted")


async def drain(h: Harness, spec: FaultSpec) -> None:
    """SIGTERM a node (it drains: redirects every session, exits 0), restart it after ``hold``."""
    node = h.node(spec.target)
    h.expect_down(node.id)
    record = h.inject(spec, h.devices_on(node.id))
    code = await h.drain(node)
    await trio.sleep(spec.hold)
    await h.restart(node)
    h.finish(record, f"SIGTERM, exit {code}; restarted")


async def scale_up(h: Harness, spec: FaultSpec) -> None:
    """Add a node; recovery is measured for the devices whose users it takes over."""
    node = await h.op(h.cluster.start_node, False, spec.target)
    await h.op(h.cluster.wait_ready, node)
    record = h.inject(spec, h.devices_moving_to(node.id))
    await h.op(h.cluster.wait_converged)
    h.membership_changed()
    h.finish(record, "joined")


async def scale_down(h: Harness, spec: FaultSpec) -> None:
    """Remove a node for good (SIGTERM drain); the others take over its users."""
    node = h.node(spec.target)
    h.expect_down(node.id, for_good=True)
    record = h.inject(spec, h.devices_on(node.id))
    code = await h.drain(node)
    await h.op(h.cluster.wait_converged)
    h.membership_changed()
    h.finish(record, f"SIGTERM, exit {code}; removed")


async def etcd_restart(h: Harness, spec: FaultSpec) -> None:
    """SIGKILL etcd (every member), start it again after ``hold`` (same ports and data)."""
    names = [m.name for m in h.cluster.etcd_members]
    for name in names:
        h.expect_down(name)
    record = h.inject(spec, h.all_devices())
    await h.op(h.cluster.restart_etcd, spec.hold, signal.SIGKILL)
    for name in names:
        h.expect_up(name)
    await h.op(h.cluster.wait_converged)
    h.finish(record, "SIGKILL; restarted")


async def nats_restart(h: Harness, spec: FaultSpec) -> None:
    """SIGKILL nats-server (every server), start it again after ``hold`` (same ports and
    JetStream store)."""
    names = [m.name for m in h.cluster.nats_members]
    for name in names:
        h.expect_down(name)
    record = h.inject(spec, h.all_devices())
    await h.op(h.cluster.restart_nats, spec.hold, signal.SIGKILL)
    for name in names:
        h.expect_up(name)
    await h.wait_all_ready()
    h.finish(record, "SIGKILL; restarted")


async def _restart_member(h: Harness, spec: FaultSpec, member: Member, why: str) -> None:
    """SIGKILL one backend member, start it again after ``hold``; every node must be ready."""
    h.expect_down(member.name)
    record = h.inject(spec, h.all_devices())
    await h.op(h.cluster.restart_member, member, spec.hold)
    h.expect_up(member.name)
    await h.wait_all_ready()
    await h.op(h.cluster.wait_converged)
    h.finish(record, f"SIGKILL {member.name}{why}; restarted")


async def backend_member(h: Harness, spec: FaultSpec) -> None:
    """Kill one named member of the NATS or etcd cluster, restart it after ``hold``."""
    await _restart_member(h, spec, h.cluster.member(spec.target), "")


async def backend_leader(h: Harness, spec: FaultSpec) -> None:
    """Kill whichever member leads now: the etcd raft leader, the JetStream meta leader, or
    the leader of the stream of user messages (asked just before the kill)."""
    c = h.cluster
    if spec.kind == "etcd-leader":
        leader = await h.op(c.etcd_leader)
    elif spec.kind == "nats-meta-leader":
        leader = await h.op(c.nats_leader)
    else:
        leader = await h.op(c.nats_leader, f"MP_{c.cluster}_USER")
    if leader is None:
        raise ClusterError(f"{spec.kind}: no leader found")
    await _restart_member(h, spec, leader, " (the leader)")


#: The links each partition cuts (see :mod:`meshpush.local.faultproxy`).
PARTITIONS: dict[str, tuple[str, ...]] = {
    "partition-nats": ("nats",),
    "partition-etcd": ("etcd",),
    "partition-both": ("nats", "etcd"),
    "partition-clients": ("clients",),
}


async def partition(h: Harness, spec: FaultSpec) -> None:
    """Blackhole links of one node (bytes stop, nothing closes) for ``hold``, then heal; after
    the heal every session must be on its owner within the placement bound."""
    node = h.node(spec.target)
    links = PARTITIONS[spec.kind]
    record = h.inject(spec, h.devices_on(node.id))
    for link in links:
        h.cluster.cut(node, link)
    try:
        await trio.sleep(spec.hold)
    finally:
        for link in links:
            h.cluster.heal(node, link)
    healed = h.now()
    record.placed = await h.placed_within(h.config.placement_bound)
    placed = "not placed" if record.placed is None else f"placed {record.placed:.1f}s after"
    h.finish(record, f"cut {'+'.join(links)} {healed - record.t:.1f}s; healed, {placed}")


async def rolling_upgrade(h: Harness, spec: FaultSpec) -> None:
    """Drain (SIGTERM) and restart every node in turn, under the full load."""
    ids = h.running_ids()
    record = h.inject(spec, h.all_devices())
    codes = []
    for node_id in ids:
        node = h.node(node_id)
        h.expect_down(node.id)
        codes.append(await h.drain(node))
        await h.restart(node)
    record.placed = await h.placed_within(h.config.placement_bound)
    placed = "not placed" if record.placed is None else f"placed {record.placed:.1f}s after"
    h.finish(record, f"{len(ids)} nodes drained (exit {set(codes)}) and restarted; {placed}")


async def zombie(h: Harness, spec: FaultSpec) -> None:
    """SIGSTOP a node longer than its lease TTL, then SIGCONT it: it finds its lease gone,
    must give up its sessions (the others own its users now) and rejoin cleanly."""
    node = h.node(spec.target)
    record = h.inject(spec, h.devices_on(node.id))
    h.pause(node)
    try:
        await trio.sleep(spec.hold)
    finally:
        h.unpause(node)
    await h.op(h.cluster.wait_ready, node)
    await h.op(h.cluster.wait_converged)
    h.finish(record, "SIGSTOP/SIGCONT; rejoined")


async def client_kill(h: Harness, spec: FaultSpec) -> None:
    """Take a device offline, publish a burst to its user, start a fresh client instance and
    kill it in the middle of replaying the burst (like an app crash: unsent acks are lost);
    then a fresh instance must resume from the server-side cursor."""
    device = h.device(spec.target)
    record = h.inject(spec, [device.key], measure="any")
    await device.stop(clean=True)
    burst = h.config.burst
    await h.burst(device.user, burst)
    got = await device.run_until_killed(after=max(1, burst // 4), timeout=20)
    record.t = h.now()  # recovery: from the kill to the next instance's first message
    device.start()
    h.finish(record, f"instance killed after receiving {got} of a {burst}-message replay")


FAULTS: dict[str, Fault] = {
    "kill": kill,
    "drain": drain,
    "scale-up": scale_up,
    "scale-down": scale_down,
    "etcd-restart": etcd_restart,
    "nats-restart": nats_restart,
    "zombie": zombie,
    "client-kill": client_kill,
    "nats-member": backend_member,
    "nats-meta-leader": backend_leader,
    "nats-stream-leader": backend_leader,
    "etcd-member": backend_member,
    "etcd-leader": backend_leader,
    **dict.fromkeys(PARTITIONS, partition),
    "rolling-upgrade": rolling_upgrade,
}

_ABOUT = {
    "kill": "SIGKILL a random node, restart it a few seconds later",
    "drain": "SIGTERM a random node (graceful drain), restart it later",
    "scale-up": "add a node (users move to it by redirect)",
    "scale-down": "remove a node for good (SIGTERM drain)",
    "etcd-restart": "SIGKILL etcd, restart it 1-3 s later",
    "nats-restart": "SIGKILL nats-server (JetStream), restart it 1-3 s later",
    "zombie": "SIGSTOP a node for lease TTL + 2 s, then SIGCONT it",
    "client-kill": "kill a client instance in the middle of a replay, start a fresh one",
}
_ABOUT_CLUSTERED = {
    "nats-member": "SIGKILL one NATS server of the cluster, restart it 1-3 s later",
    "nats-meta-leader": "SIGKILL the JetStream meta leader, restart it 1-3 s later",
    "nats-stream-leader": "SIGKILL the leader of the user-message stream, restart it later",
    "etcd-member": "SIGKILL one etcd member, restart it 1-3 s later",
    "etcd-leader": "SIGKILL the etcd raft leader, restart it 1-3 s later",
    "partition-nats": "blackhole a node's links to NATS for lease TTL + 1-4 s, then heal",
    "partition-etcd": "blackhole a node's links to etcd (its lease expires), then heal",
    "partition-both": "blackhole a node's links to NATS and etcd, then heal",
    "partition-clients": "blackhole a node's client connections, then heal",
    "rolling-upgrade": "drain and restart every node in turn under the full load",
}
#: Whole-backend restarts: in a clustered run members fail one at a time instead.
SINGLE_ONLY = ("etcd-restart", "nats-restart")
CLUSTERED_KINDS = tuple(k for k in FAULTS if k not in SINGLE_ONLY)
SINGLE_KINDS = tuple(k for k in FAULTS if k not in _ABOUT_CLUSTERED)

SCENARIOS: dict[str, Scenario] = {
    **{name: Scenario(name, (name,), about) for name, about in _ABOUT.items()},
    **{
        name: Scenario(name, (name,), about, clustered=True)
        for name, about in _ABOUT_CLUSTERED.items()
    },
    "mixed": Scenario(
        "mixed", SINGLE_KINDS, "every fault, drawn at random from the seed", duration=120.0
    ),
    "soak": Scenario(
        "soak",
        SINGLE_KINDS,
        "mixed, longer and heavier: for people to run by hand",
        duration=1800.0,
        users=120,
        rate=80.0,
        nodes=4,
    ),
}


def kinds_for(scenario: Scenario, clustered: bool) -> tuple[str, ...]:
    """The faults a scenario draws from: ``mixed`` and ``soak`` on clustered backends draw the
    member, leader, partition and rolling-upgrade faults instead of whole-backend restarts."""
    if clustered and scenario.kinds == SINGLE_KINDS:
        return CLUSTERED_KINDS
    return scenario.kinds


# ---------------------------------------------------------------- the schedule


@dataclass
class _Model:
    """The node set as the schedule expects it to be when each fault starts."""

    live: list[str]
    next_id: int
    devices: Sequence[str]
    lease_ttl: float
    min_nodes: int
    max_nodes: int
    bag: list[str] = field(default_factory=list)


def _plan(kind: str, rng: random.Random, m: _Model) -> tuple[str, float, float]:
    """Target, hold and estimated length (for spacing) of a ``kind`` fault; updates the model."""
    if kind == "scale-up":
        target = f"n{m.next_id}"
        m.next_id += 1
        m.live.append(target)
        return target, 0.0, 3.0
    if kind == "scale-down":
        target = rng.choice(sorted(m.live))
        m.live.remove(target)
        return target, 0.0, 3.0
    if kind in ("etcd-restart", "nats-restart"):
        hold = round(rng.uniform(1.0, 3.0), 2)
        return kind.split("-")[0], hold, hold + 3.0
    if kind in ("nats-member", "etcd-member"):
        hold = round(rng.uniform(1.0, 3.0), 2)
        return f"{kind.split('-')[0]}{rng.randint(1, CLUSTER_SIZE)}", hold, hold + 5.0
    if kind in ("nats-meta-leader", "nats-stream-leader", "etcd-leader"):
        hold = round(rng.uniform(1.0, 3.0), 2)
        return "leader", hold, hold + 5.0
    if kind == "rolling-upgrade":
        return "all", 0.0, 6.0 * len(m.live)
    if kind in PARTITIONS:
        hold = round(rng.uniform(m.lease_ttl + 1.0, m.lease_ttl + 4.0), 2)
        return rng.choice(sorted(m.live)), hold, hold + 6.0
    if kind == "client-kill":
        return rng.choice(list(m.devices)), 0.0, 4.0
    target = rng.choice(sorted(m.live))
    if kind == "zombie":
        hold = m.lease_ttl + 2.0
    elif kind == "drain":
        hold = round(rng.uniform(1.0, 3.0), 2)
    else:
        hold = round(rng.uniform(2.0, 4.0), 2)
    return target, hold, hold + 4.0


def _feasible(kind: str, m: _Model) -> str:
    """Swap a scale-down that would go below ``min_nodes`` (or a scale-up above ``max_nodes``)."""
    if kind == "scale-down" and len(m.live) <= m.min_nodes:
        return "scale-up"
    if kind == "scale-up" and len(m.live) >= m.max_nodes:
        return "scale-down"
    return kind


def make_schedule(
    scenario: Scenario,
    duration: float,
    seed: int,
    nodes: int,
    devices: Sequence[str],
    lease_ttl: float = 2.0,
    clustered: bool = False,
) -> list[FaultSpec]:
    """The faults of a run, in order. Pure: the same arguments give the same list."""
    kinds = kinds_for(scenario, clustered)
    rng = random.Random(seed)
    model = _Model(
        live=[f"n{i}" for i in range(1, nodes + 1)],
        next_id=nodes + 1,
        devices=devices,
        lease_ttl=lease_ttl,
        min_nodes=min(2, nodes),
        max_nodes=nodes + 2,
    )
    out: list[FaultSpec] = []
    at = round(min(3.0, max(1.5, duration * 0.2)), 2)
    while at < max(duration - 1.0, 0.5) or not out:
        if not model.bag:
            model.bag = list(kinds)
            rng.shuffle(model.bag)
        kind = _feasible(model.bag.pop(), model)
        target, hold, length = _plan(kind, rng, model)
        out.append(FaultSpec(kind, at, target, hold))
        at = round(at + length + rng.uniform(2.0, 4.0), 2)
    return out
