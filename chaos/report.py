"""The run's report: one JSON-able dict (``--json``) and the table printed from it. Pure.

Recovery of an affected device after a fault = the first message it received after the fault
minus the fault's time, counting only messages first published after the fault (so a message
already on its way does not count as "receiving again"); for a client kill, any message the
fresh instance receives counts. The affected devices of a fault are those whose session was on
the victim node (kill, drain, scale-down, zombie), those whose users the new node takes over
(scale-up), every device (etcd, NATS restarts), or the killed client.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from .checker import Violation
from .events import BROADCAST, USER, DeviceLog, EventLog, FaultRecord
from .load import BATCH, MULTI, SINGLE

MAX_PRINTED = 25  # violations printed per kind (the JSON has them all, up to MAX_JSON)
MAX_JSON = 2000


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def recovery_of(fault: FaultRecord, device: DeviceLog) -> float | None:
    """Seconds from the fault until ``device`` received again (None: it never did)."""
    times = [
        r.t
        for inst in device.instances
        for r in inst.received
        if r.t >= fault.t and (fault.measure == "any" or (r.sent is not None and r.sent >= fault.t))
    ]
    return round(min(times) - fault.t, 3) if times else None


def recoveries(log: EventLog) -> list[tuple[FaultRecord, list[float], int]]:
    """Per fault: the recovery times of its affected devices, and how many never recovered."""
    devices = {d.key: d for d in log.devices}
    out = []
    for fault in log.faults:
        times, never = [], 0
        for key in fault.affected:
            device = devices.get(key)
            value = recovery_of(fault, device) if device else None
            if value is None:
                never += 1
            else:
                times.append(value)
        out.append((fault, times, never))
    return out


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def build(
    log: EventLog, violations: Sequence[Violation], replay: str, memory_mb: float
) -> dict[str, Any]:
    """The report as plain data."""
    per_fault = recoveries(log)
    by_kind: dict[str, list[float]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    affected: Counter[str] = Counter()
    never: Counter[str] = Counter()
    faults = []
    for fault, times, missed in per_fault:
        kinds[fault.kind] += 1
        affected[fault.kind] += len(fault.affected)
        never[fault.kind] += missed
        by_kind[fault.kind] += times
        faults.append(
            {
                "kind": fault.kind,
                "target": fault.target,
                "planned": fault.planned,
                "t": round(fault.t, 2),
                "end": round(fault.end, 2),
                "hold": fault.hold,
                "affected": len(fault.affected),
                "outcome": fault.outcome,
                "placed": fault.placed,
                "recovery": {**_stats(times), "never": missed},
            }
        )
    recovery = {
        kind: {"faults": kinds[kind], "affected": affected[kind], "never": never[kind]}
        | _stats(by_kind[kind])
        for kind in sorted(kinds)
    }
    placed: dict[str, list[float]] = defaultdict(list)
    for fault, _, _ in per_fault:
        if fault.placed is not None:
            placed[fault.kind].append(fault.placed)
    counted = Counter(v.kind for v in violations)
    lease_ttl = float(log.meta.get("node_settings", {}).get("lease_ttl", 3))
    return {
        "scenario": log.meta.get("scenario"),
        "seed": log.meta.get("seed"),
        "backends": log.meta.get("backends", "single"),
        "duration": log.meta.get("duration"),
        "nodes": log.meta.get("nodes"),
        "ok": not violations,
        "replay": replay,
        "faults": faults,
        "messages": _messages(log, counted),
        "recovery": recovery,
        "sigkill_budget": _budget(recovery.get("kill"), lease_ttl + 1.0),
        "placement_after_heal": {kind: _stats(v) for kind, v in sorted(placed.items())},
        "clients": _clients(log),
        "memory_mb": {"bound": memory_mb, **dict(sorted(log.rss_max_mb.items()))},
        "publish_problems": log.meta.get("counters", {}),
        "violation_counts": dict(sorted(counted.items())),
        "violations": [
            {k: v for k, v in vars_of(x).items() if v is not None} for x in violations[:MAX_JSON]
        ],
    }


def _budget(kill: dict[str, Any] | None, budget: float) -> dict[str, Any] | None:
    """DESIGN invariant 3: after a SIGKILL, clients receive again within lease TTL + 1 s (p99)."""
    if not kill or kill.get("p99") is None:
        return None
    return {"p99": kill["p99"], "budget": budget, "within": kill["p99"] <= budget}


def vars_of(v: Violation) -> dict[str, Any]:
    return {
        "kind": v.kind,
        "user": v.user,
        "device": v.device,
        "ch": v.ch,
        "seq": v.seq,
        "node": v.node,
        "detail": v.detail,
    }


def _messages(log: EventLog, counted: Counter[str]) -> dict[str, Any]:
    published = Counter(p.ch for p in log.published)
    delivered: Counter[str] = Counter()
    ids = {(p.ch, p.user, p.id) for p in log.published}
    unconfirmed: set[tuple[str, str | None, str]] = set()
    expected = 0
    for d in log.devices:
        expected += published[BROADCAST] + sum(
            1 for p in log.published if p.ch == USER and p.user == d.user
        )
        for inst in d.instances:
            for r in inst.received:
                delivered[r.ch] += 1
                key = (r.ch, d.user if r.ch == USER else None, r.id)
                if key not in ids:
                    unconfirmed.add(key)
    counters = log.meta.get("counters", {})
    return {
        "published": {USER: published[USER], BROADCAST: published[BROADCAST]},
        "unicast_by": {
            via: {
                "requests": counters.get(f"requests_{via}"),
                "published": sum(1 for p in log.published if p.ch == USER and p.via == via),
                "gave_up": sum(1 for f in log.failed if f.ch == USER and f.via == via),
            }
            for via in (SINGLE, BATCH, MULTI)
        },
        "gave_up": len(log.failed),
        "expected_deliveries": expected,
        "delivered": {USER: delivered[USER], BROADCAST: delivered[BROADCAST]},
        "duplicates_suppressed_by_sdk": sum(i.duplicates for d in log.devices for i in d.instances),
        "redelivered_after_client_kill": _redelivered(log),
        "delivered_without_202": len(unconfirmed),
        "lost": counted["lost"],
        "duplicates": counted["duplicate"] + counted["duplicate_id"],
        "out_of_order": counted["out_of_order"] + counted["broken_chain"],
    }


def _redelivered(log: EventLog) -> int:
    """Seqs a later instance got again after a killed one had them (allowed, counted)."""
    count = 0
    for d in log.devices:
        seen: set[tuple[str, int]] = set()
        for inst in d.instances:
            got = {(r.ch, r.seq) for r in inst.received}
            count += len(got & seen)
            seen |= got
    return count


def _clients(log: EventLog) -> dict[str, int]:
    instances = [i for d in log.devices for i in d.instances]
    return {
        "devices": len(log.devices),
        "users": len({d.user for d in log.devices}),
        "instances": len(instances),
        "reconnects": sum(max(0, i.welcomes - 1) for i in instances),
        "redirects": sum(i.redirects for i in instances),
        "connect_attempts": sum(i.connects for i in instances),
        "chain_breaks_resumed": sum(i.chain_breaks for i in instances),
        "gaps": sum(i.gaps for i in instances),
        "sdk_unexpected_errors": sum(i.unexpected_errors for i in instances),
    }


# ---------------------------------------------------------------- the table


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [
        f"meshpush chaos: scenario {report['scenario']}, seed {report['seed']}, "
        f"{report['duration']}s, {report['nodes']} nodes, {report['clients']['users']} users / "
        f"{report['clients']['devices']} devices"
        + (", clustered backends" if report.get("backends") == "clustered" else ""),
        "",
        f"faults injected: {len(report['faults'])}",
        f"  {'t':>7} {'kind':<18} {'target':<19} {'hold':>5} {'affected':>8} "
        f"{'recovery p50':>12} {'max':>7}  outcome",
    ]
    for f in report["faults"]:
        r = f["recovery"]
        lines.append(
            f"  {f['t']:>7.1f} {f['kind']:<18} {f['target'][:19]:<19} {f['hold']:>5.1f} "
            f"{f['affected']:>8} {_s(r['p50']):>12} {_s(r['max']):>7}  {f['outcome']}"
        )
    m = report["messages"]
    lines += [
        "",
        f"messages          {'published':>10} {'delivered':>10}",
        f"  unicast         {m['published'][USER]:>10} {m['delivered'][USER]:>10}",
        f"  broadcast       {m['published'][BROADCAST]:>10} {m['delivered'][BROADCAST]:>10}",
        _by_kind(m.get("unicast_by", {})),
        f"  expected deliveries {m['expected_deliveries']}, lost {m['lost']}, duplicates "
        f"{m['duplicates']}, out of order {m['out_of_order']}",
        f"  duplicates suppressed by the SDK {m['duplicates_suppressed_by_sdk']}, redelivered "
        f"after a client kill {m['redelivered_after_client_kill']}",
        f"  publishes given up {m['gave_up']}, delivered without a 202 "
        f"{m['delivered_without_202']}",
        "",
        f"recovery by fault  {'faults':>6} {'affected':>8} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'never':>5}",
    ]
    for kind, r in report["recovery"].items():
        lines.append(
            f"  {kind:<18} {r['faults']:>4} {r['affected']:>8} {_s(r['p50']):>7} "
            f"{_s(r['p99']):>7} {_s(r['max']):>7} {r['never']:>5}"
        )
    budget = report.get("sigkill_budget")
    if budget:
        verdict = "within" if budget["within"] else "OVER"
        lines.append(
            f"  SIGKILL recovery p99 {budget['p99']:.2f}s: {verdict} the budget of lease TTL + 1 s "
            f"= {budget['budget']:.1f}s"
        )
    placement = report.get("placement_after_heal") or {}
    if placement:
        lines += ["", f"sessions on their owners after the heal {'p50':>7} {'max':>7}"]
        lines += [
            f"  {kind:<37} {_s(p['p50']):>7} {_s(p['max']):>7}" for kind, p in placement.items()
        ]
    c = report["clients"]
    lines += [
        "",
        f"clients: {c['instances']} instances, reconnects {c['reconnects']}, redirects "
        f"{c['redirects']}, connect attempts {c['connect_attempts']}, chain breaks resumed "
        f"{c['chain_breaks_resumed']}, gaps {c['gaps']}, SDK errors {c['sdk_unexpected_errors']}",
        "memory (max RSS): "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in report["memory_mb"].items() if k != "bound")
        + f" (bound {report['memory_mb']['bound']:.0f} MB)",
    ]
    problems = {
        k: v for k, v in report["publish_problems"].items() if not k.startswith("requests_")
    }
    if problems:
        lines.append(
            "publish retries: " + ", ".join(f"{k} {v}" for k, v in sorted(problems.items()))
        )
    lines += ["", *_verdict(report)]
    return "\n".join(lines)


def _by_kind(by: dict[str, dict[str, int | None]]) -> str:
    """How the unicasts went in: single, batch and multi-user publishes (202'd items)."""
    names = {SINGLE: "single", BATCH: "batch", MULTI: "multi-user"}
    parts = []
    for via, name in names.items():
        b = by.get(via) or {}
        requests = "" if b.get("requests") is None else f" in {b['requests']} requests"
        parts.append(f"{name} {b.get('published', 0)}{requests} (gave up {b.get('gave_up', 0)})")
    return "  unicast by " + ", ".join(parts)


def _verdict(report: dict[str, Any]) -> list[str]:
    if report["ok"]:
        return ["invariants: OK (no violation)"]
    counts = report["violation_counts"]
    lines = [
        f"invariants: {sum(counts.values())} VIOLATION(S): "
        + ", ".join(f"{k} {n}" for k, n in counts.items())
    ]
    shown: Counter[str] = Counter()
    for v in report["violations"]:
        shown[v["kind"]] += 1
        if shown[v["kind"]] <= MAX_PRINTED:
            where = " ".join(
                f"{k}={v[k]}" for k in ("user", "device", "ch", "seq", "node") if k in v
            )
            lines.append(f"  {v['kind']}: {where}: {v['detail']}")
    for kind, n in counts.items():
        if n > MAX_PRINTED:
            lines.append(f"  ... and {n - MAX_PRINTED} more {kind} (all in the JSON report)")
    lines.append(f"replay with: {report['replay']}")
    return lines
