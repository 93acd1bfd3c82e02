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
    """SIGKILL etcd, start it again after ``hold`` (same port and data)."""
    h.expect_down("etcd")
    record = h.inject(spec, h.all_devices())
    await h.op(h.cluster.restart_etcd, spec.hold, signal.SIGKILL)
    h.expect_up("etcd")
    await h.op(h.cluster.wait_converged)
    h.finish(record, "SIGKILL; restarted")


async def nats_restart(h: Harness, spec: FaultSpec) -> None:
    """SIGKILL nats-server, start it again after ``hold`` (same port and JetStream store)."""
    h.expect_down("nats")
    record = h.inject(spec, h.all_devices())
    await h.op(h.cluster.restart_nats, spec.hold, signal.SIGKILL)
    h.expect_up("nats")
    await h.wait_all_ready()
    h.finish(record, "SIGKILL; restarted")


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

SCENARIOS: dict[str, Scenario] = {
    **{name: Scenario(name, (name,), about) for name, about in _ABOUT.items()},
    "mixed": Scenario(
        "mixed", tuple(FAULTS), "every fault, drawn at random from the seed", duration=120.0
    ),
    "soak": Scenario(
        "soak",
        tuple(FAULTS),
        "mixed, longer and heavier: for people to run by hand",
        duration=1800.0,
        users=120,
        rate=80.0,
        nodes=4,
    ),
}

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
) -> list[FaultSpec]:
    """The faults of a run, in order. Pure: the same arguments give the same list."""
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
            model.bag = list(scenario.kinds)
            rng.shuffle(model.bag)
        kind = _feasible(model.bag.pop(), model)
        target, hold, length = _plan(kind, rng, model)
        out.append(FaultSpec(kind, at, target, hold))
        at = round(at + length + rng.uniform(2.0, 4.0), 2)
    return out
