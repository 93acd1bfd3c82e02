"""The invariant checker: a recorded :class:`~chaos.events.EventLog` in, violations out. Pure.

What must hold once the run has settled (docs/chaos.md explains each rule):

* **delivery** — every message whose publish returned 202 was received by every device of its
  user (broadcasts: by every device), each seq at most once per ``Client`` instance, in
  increasing seq order per channel, every ``prev`` equal to the seq received just before it.
  Every device started before the first publish and stays running, so "every device" is exact.
  A device whose client instance was *killed* (the client-kill fault, like an app crash) may
  get again, in its next instance, seqs the killed instance had received (their acks may have
  died with it); a seq received by a *cleanly stopped* instance must never come again.
  The same publish id must never arrive under two seqs (the idempotency window held).
  The SDK must never report a gap (retention is days, far longer than a run).
* **placement** — every device is online, on its user's owner node (``GET /v1/route``); no node
  reports misplaced sessions (of slots it does not own); every node holds exactly the sessions
  of the clients connected to it (no stray or zombie sessions).
* **memory** — no node's sampled RSS went above the bound.
* **incidents** — anything the harness saw go wrong (a node crashed, a drain did not finish,
  views did not converge) is a violation too.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from .events import BROADCAST, USER, DeviceLog, EventLog, Instance, Published, Received


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # lost, duplicate, out_of_order, broken_chain, wrong_id, duplicate_id, gap,
    # offline, wrong_node, no_route, misplaced_sessions, stray_sessions, node_unreachable,
    # memory, or an incident kind (node_crashed, drain_failed, not_converged, ...)
    detail: str
    user: str | None = None
    device: str | None = None
    ch: str | None = None
    seq: int | None = None
    node: str | None = None

    def __str__(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (
                ("user", self.user),
                ("device", self.device),
                ("ch", self.ch),
                ("seq", self.seq),
                ("node", self.node),
            )
            if value is not None
        ]
        return f"{self.kind}: {' '.join(where)}{': ' if where else ''}{self.detail}"


def _on(
    kind: str, detail: str, device: DeviceLog, ch: str | None = None, seq: int | None = None
) -> Violation:
    """A violation about one device (and maybe one message of it)."""
    return Violation(kind, detail, device.user, device.device, ch, seq, device.node)


def check(log: EventLog, memory_bound_mb: float) -> list[Violation]:
    """Every violation of the run's invariants, in a stable order (empty: the run passed)."""
    return [
        *check_delivery(log),
        *check_placement(log),
        *check_memory(log, memory_bound_mb),
        *check_incidents(log),
    ]


# ---------------------------------------------------------------- delivery


def expected_for(log: EventLog, device: DeviceLog) -> dict[str, dict[int, Published]]:
    """What ``device`` must have received: every 202'd unicast of its user, every broadcast."""
    out: dict[str, dict[int, Published]] = {USER: {}, BROADCAST: {}}
    for p in log.published:
        if p.ch == BROADCAST or p.user == device.user:
            out[p.ch][p.seq] = p
    return out


def missing(log: EventLog) -> dict[str, int]:
    """Per device key, how many expected messages it has not received yet (used to settle)."""
    out: dict[str, int] = {}
    for device in log.devices:
        got = {(r.ch, r.seq) for inst in device.instances for r in inst.received}
        want = expected_for(log, device)
        out[device.key] = sum(1 for ch, seqs in want.items() for s in seqs if (ch, s) not in got)
    return out


def check_delivery(log: EventLog) -> Iterator[Violation]:
    yield from _seq_claims(log)
    have = {d.key: _seqs(d) for d in log.devices}
    for device in log.devices:
        yield from _device_delivery(log, device, have)


def _seq_claims(log: EventLog) -> Iterator[Violation]:
    """Two 202s (or two batch / multi-user items) naming one seq for different messages: the
    node answered with another item's seq (results out of order or mixed up)."""
    claims: dict[tuple[str, int], set[tuple[str | None, str]]] = defaultdict(set)
    for p in log.published:
        claims[(p.ch, p.seq)].add((p.user, p.id))
    for (ch, seq), owners in sorted(claims.items()):
        if len(owners) > 1:
            named = ", ".join(f"{u or 'broadcast'}/{i}" for u, i in sorted(owners, key=str))
            yield Violation(
                "seq_claimed_twice", f"the 202s of {named} all named it", ch=ch, seq=seq
            )


def _seqs(device: DeviceLog) -> dict[str, set[int]]:
    """Every seq a device received, per channel, over all its instances."""
    out: dict[str, set[int]] = {USER: set(), BROADCAST: set()}
    for inst in device.instances:
        for r in inst.received:
            out.setdefault(r.ch, set()).add(r.seq)
    return out


def _device_delivery(
    log: EventLog, device: DeviceLog, have: dict[str, dict[str, set[int]]]
) -> Iterator[Violation]:
    if not device.online:
        yield _on("offline", "the device was not online when the run was checked", device)
    for inst in device.instances:
        for ch in (USER, BROADCAST):
            yield from _order(inst, ch, device)
        if inst.gaps:
            detail = f"instance {inst.index}: the SDK reported {inst.gaps} gap(s)"
            yield _on("gap", detail, device)
    yield from _across_instances(device)
    yield from _ids(device)
    expected = expected_for(log, device)
    for ch, seqs in expected.items():
        yield from _lost(log, device, ch, seqs, have)


def _order(inst: Instance, ch: str, device: DeviceLog) -> Iterator[Violation]:
    """Within one Client instance: each seq once, increasing, each prev the seq before it."""
    seen: set[int] = set()
    last: Received | None = None
    for r in (r for r in inst.received if r.ch == ch):
        if r.seq in seen:
            detail = f"instance {inst.index} received it twice (again at t+{r.t:.2f})"
            yield _on("duplicate", detail, device, ch, r.seq)
        elif last is not None and r.seq < last.seq:
            detail = f"instance {inst.index} received it at t+{r.t:.2f} after seq {last.seq}"
            yield _on("out_of_order", detail, device, ch, r.seq)
        elif last is not None and r.prev is not None and r.prev != last.seq:
            detail = (
                f"instance {inst.index}: prev is {r.prev} but the seq received before it was "
                f"{last.seq}"
            )
            yield _on("broken_chain", detail, device, ch, r.seq)
        seen.add(r.seq)
        if last is None or r.seq > last.seq:
            last = r


def _across_instances(device: DeviceLog) -> Iterator[Violation]:
    """A later instance may get again only what a *killed* instance had received."""
    first_by: dict[tuple[str, int], Instance] = {}
    for inst in device.instances:
        for r in inst.received:
            earlier = first_by.get((r.ch, r.seq))
            if earlier is None:
                first_by[(r.ch, r.seq)] = inst
            elif earlier is not inst and earlier.end != "killed":
                detail = (
                    f"instance {inst.index} received it again at t+{r.t:.2f}, though instance "
                    f"{earlier.index} had received it and was stopped cleanly (acked)"
                )
                yield _on("duplicate", detail, device, r.ch, r.seq)


def _ids(device: DeviceLog) -> Iterator[Violation]:
    """The same publish id under two different seqs: a retry was stored twice."""
    seqs_of: dict[tuple[str, str], set[int]] = defaultdict(set)
    for inst in device.instances:
        for r in inst.received:
            seqs_of[(r.ch, r.id)].add(r.seq)
    for (ch, msg_id), seqs in sorted(seqs_of.items()):
        if len(seqs) > 1:
            detail = f"publish id {msg_id!r} arrived as seqs {sorted(seqs)} (stored twice)"
            yield _on("duplicate_id", detail, device, ch, min(seqs))


def _lost(
    log: EventLog,
    device: DeviceLog,
    ch: str,
    expected: dict[int, Published],
    have: dict[str, dict[str, set[int]]],
) -> Iterator[Violation]:
    got: dict[int, Received] = {}
    for inst in device.instances:
        for seen in inst.received:
            if seen.ch == ch:
                got.setdefault(seen.seq, seen)
    order = sorted(got)
    for seq, p in sorted(expected.items()):
        r = got.get(seq)
        if r is None:
            yield _on("lost", _lost_detail(log, device, p, order, have), device, ch, seq)
        elif r.id != p.id:
            detail = f"received with id {r.id!r}, but the 202 for {p.id!r} named it"
            yield _on("wrong_id", detail, device, ch, seq)


def _lost_detail(
    log: EventLog,
    device: DeviceLog,
    p: Published,
    order: list[int],
    have: dict[str, dict[str, set[int]]],
) -> str:
    how = (
        f"via {p.node} (202 after {p.attempts} attempt(s))"
        if p.attempts
        else f"by {p.via} publish through the publisher SDK"
    )
    parts = [f"published at t+{p.t:.2f} {how}, never received by this device"]
    i = bisect.bisect_left(order, p.seq)
    before = order[i - 1] if i > 0 else None
    after = order[i] if i < len(order) else None
    parts.append(f"it received seq {before} before and {after} after it")
    others = [d for d in log.devices if d is not device and (p.ch == BROADCAST or d.user == p.user)]
    if others:
        had = sum(1 for d in others if p.seq in have[d.key].get(p.ch, ()))
        parts.append(f"{had} of {len(others)} other device(s) received it")
    nodes = [n for inst in device.instances for n in inst.nodes]
    parts.append(f"sessions on {','.join(nodes[-8:]) or 'none'}")
    return "; ".join(parts)


# ---------------------------------------------------------------- placement


def check_placement(log: EventLog) -> Iterator[Violation]:
    for device in log.devices:
        if not device.online:
            continue
        owner = log.routes.get(device.user)
        if owner is None:
            yield _on("no_route", "no owner known for the user (GET /v1/route)", device)
        elif device.node != owner:
            detail = f"its session is on {device.node}, the owner is {owner}"
            yield _on("wrong_node", detail, device)
    clients = Counter(d.node for d in log.devices if d.online)
    for node in log.nodes:
        if not node.reachable:
            yield Violation("node_unreachable", "GET /v1/nodes did not answer", node=node.id)
            continue
        if node.misplaced_sessions:
            yield Violation(
                "misplaced_sessions",
                f"holds {node.misplaced_sessions} session(s) of slots it does not own",
                node=node.id,
            )
        if node.sessions != clients[node.id]:
            yield Violation(
                "stray_sessions",
                f"holds {node.sessions} session(s), {clients[node.id]} client(s) are connected "
                "to it",
                node=node.id,
            )


# ---------------------------------------------------------------- memory and incidents


def check_memory(log: EventLog, bound_mb: float) -> Iterator[Violation]:
    for node, rss in sorted(log.rss_max_mb.items()):
        if rss > bound_mb:
            yield Violation(
                "memory",
                f"RSS reached {rss:.0f} MB, above the bound of {bound_mb:.0f} MB",
                node=node,
            )


def check_incidents(log: EventLog) -> Iterator[Violation]:
    for i in log.incidents:
        yield Violation(i.kind, f"t+{i.t:.2f}: {i.detail}", node=i.node)
