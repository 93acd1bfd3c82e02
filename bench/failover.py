"""Failover: SIGKILL a node of 3, time until each of its clients receives again (vs TTL + 1 s).

Starts a real 3-node cluster (etcd, NATS JetStream, nodes as processes, lease TTL ``--ttl``)
and connects ``--clients`` sessions held by ``--readers`` lean client processes
(``bench/_resumeload.py``: raw sockets, the SDK's resume and reconnect policy). A publisher
in its own process first sends one message to every user (everyone has a ``last`` to resume
from), then publishes round-robin to a sample of the victim's users (``--sample``, default
all) at a steady ``--rate`` in ``POST /v1/publish/batch`` requests. One second in, the node
holding the most sessions is SIGKILLed, and 50 ms later the publisher sends one message to
every sampled user at once, so each has a stored message waiting when it resumes (receiving
again then measures the failover, not the publisher's round-robin). Per client of the killed
node: receiving again = first message received after the kill minus the kill time
(``CLOCK_MONOTONIC`` is system-wide), beside
its timeline (connection seen closed, welcome from a survivor, attempts, redirects) and the
time each survivor's view dropped the dead node. Every message the publisher got a 202 for
must arrive exactly once for every sampled user. Prints p50/p99/max against the invariant-3
budget (lease TTL + 1 s), the clients' and publisher's CPU and the load average; writes JSON.

    meshpush bench failover [--clients 1500] [--readers 2] [--rate 0] [--ttl 3] [--no-peer-probe]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._resumeload import workers
from bench._stats import pct
from bench._targets import cpu_seconds, machine, table, write_json
from meshpush.local.devcluster import LocalCluster, NodeProc

SETTLE = 1.0  # seconds between the baseline round and the steady publishing
BEFORE_KILL = 1.0  # seconds of steady publishing before the kill
BURST_DELAY = 0.05  # after the kill, one message to every sampled user waits for its resume


def split(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n)]


def first_after(times: list[float], t: float) -> float | None:
    return next((x for x in times if x > t), None)


def timeline(record: dict[str, Any], t_kill: float) -> dict[str, Any]:
    """Where one affected client's time went after the kill (seconds from the kill)."""
    events = [(t, kind, detail) for t, kind, detail in record["events"] if t > t_kill]

    def first(kind: str) -> float | None:
        return next((t - t_kill for t, k, _ in events if k == kind), None)

    msg = first_after([t for _, t in record["seqs"]], t_kill)
    welcome = next((d for _, k, d in events if k == "welcome"), "")
    return {
        "closed": first("closed"),
        "welcome": first("welcome"),
        "received": None if msg is None else msg - t_kill,
        "node": welcome,
        "connects": sum(1 for _, k, _ in events if k == "connect"),
        "redirects": sum(1 for _, k, _ in events if k == "redirect"),
        "backoffs": sum(1 for _, k, _ in events if k == "backoff"),
        "errors": sorted({d for _, k, d in events if k == "error"}),
        "events": [(round(t - t_kill, 3), k, d) for t, k, d in events],
    }


def check_delivery(
    published: dict[str, list[int]], records: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Missing: published (202) but not received by the end of the run (lost, unless its
    client was still reconnecting); duplicated: received more than once."""
    lost = dup = 0
    for user, seqs in published.items():
        got = [s for s, _ in records[user]["seqs"]]
        lost += len(set(seqs) - set(got))
        dup += len(got) - len(set(got)) + records[user]["dups"]
    return {
        "users": len(published),
        "messages": sum(map(len, published.values())),
        "missing": lost,
        "duplicated": dup,
    }


def merge(answers: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for answer in answers:
        for user, seqs in answer.items():
            out.setdefault(user, []).extend(seqs)
    return out


def ring_change(
    survivors: list[NodeProc], cluster: LocalCluster, victim: str, t_kill: float, timeout: float
) -> dict[str, float | None]:
    """Seconds from the kill until each survivor's view no longer lists the victim."""
    seen: dict[str, float | None] = {n.id: None for n in survivors}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(v is None for v in seen.values()):
        for node in survivors:
            view = cluster.view_of(node)
            if seen[node.id] is None and view is not None and victim not in view:
                seen[node.id] = time.monotonic() - t_kill
        time.sleep(0.02)
    return seen


class CpuSampler:
    """CPU of some processes every ``every`` seconds, in a thread (percent of one core)."""

    def __init__(self, pids: dict[str, int], every: float = 0.25) -> None:
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last = {k: cpu_seconds(p) for k, p in self.pids.items()}
        t_last = time.monotonic()
        while not self._stop.wait(self.every):
            now = {k: cpu_seconds(p) for k, p in self.pids.items()}
            t = time.monotonic()
            self.samples.append(
                (t, {k: round(100 * (now[k] - last[k]) / (t - t_last)) for k in now})
            )
            last, t_last = now, t


def run(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    users = [f"fo-{i}" for i in range(args.clients)]
    bootstraps = [n.ws_url for n in cluster.live()]
    readers = max(1, min(args.readers, len(users)))
    publisher_argv = [
        "publisher",
        *(n.http_url for n in cluster.live()),
        "--api-key",
        cluster.api_key,
    ]
    with workers([[]] * readers) as clients, workers([publisher_argv]) as publisher:
        shares = split(users, readers)
        connect = {
            "op": "connect",
            "bootstraps": bootstraps,
            "secret": cluster.token_secret,
            "concurrency": max(1, args.concurrency // readers),
            "timeout": 120,
            "backoff_cap": args.backoff_cap,
        }
        answers = clients.ask([{**connect, "users": share} for share in shares])
        nodes = {u: n for a in answers for u, n in a["nodes"].items()}
        cold = max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers)
        connected = sum(a["ok"] for a in answers)
        per_node = {n.id: sum(1 for v in nodes.values() if v == n.id) for n in cluster.live()}
        victim = cluster.node(args.victim or max(per_node, key=lambda k: per_node[k]))
        affected = [u for u in users if nodes[u] == victim.id]
        sample = affected[: args.sample] if args.sample else affected
        survivors = [n for n in cluster.live() if n.id != victim.id]

        (baseline,) = publisher.ask([{"op": "round", "users": users}])
        clients.ask([{"op": "run", "seconds": SETTLE}] * readers)
        window = BEFORE_KILL + args.after
        clients.send([{"op": "run", "seconds": window + args.drain}] * readers)
        chunk = max(1, min(args.chunk, len(sample)))
        rate = args.rate or float(min(len(sample), 500))
        publisher.send(
            [
                {
                    "op": "steady",
                    "users": sample,
                    "rate": rate,
                    "chunk": chunk,
                    "seconds": window,
                    "burst_after": BEFORE_KILL + BURST_DELAY,
                }
            ]
        )
        cpu0 = {
            "clients": clients.cpu(),
            "publisher": publisher.cpu(),
            "survivors": [cpu_seconds(n.proc.pid) for n in survivors],
        }
        with CpuSampler({n.id: n.proc.pid for n in survivors}) as sampler:
            time.sleep(BEFORE_KILL)
            t_kill = time.monotonic()
            victim.proc.send(signal.SIGKILL)
            victim.proc.popen.wait(10)
            ring = ring_change(survivors, cluster, victim.id, t_kill, args.after)
            (steady,) = publisher.answers()
        survivor_cpu = [cpu_seconds(n.proc.pid) for n in survivors]
        t_cpu = time.monotonic()
        runs = clients.answers()
        cpu1 = {"clients": clients.cpu(), "publisher": publisher.cpu()}
        wall = t_cpu - (t_kill - BEFORE_KILL)
        records: dict[str, dict[str, Any]] = {}
        for report in clients.ask([{"op": "report"}] * readers):
            records.update(report)

    lines = {u: timeline(records[u], t_kill) for u in affected}
    others_dropped = sum(
        1
        for u in users
        if u not in set(affected) and timeline(records[u], t_kill)["closed"] is not None
    )
    published = merge([baseline["published"], steady["published"]])
    sampled = {u: published.get(u, []) for u in sample}
    everyone = {u: baseline["published"].get(u, []) for u in users}
    return {
        "clients": args.clients,
        "connected": connected,
        "cold_connect_seconds": cold,
        "per_node": per_node,
        "victim": victim.id,
        "affected": len(affected),
        "sample": len(sample),
        "ttl": args.ttl,
        "peer_probe": args.peer_probe,
        "budget": args.ttl + 1.0,
        "rate": rate,
        "chunk": chunk,
        "ring_change": ring,
        "timelines": lines,
        "others_dropped": others_dropped,
        "delivery_sampled": check_delivery(sampled, records),
        "delivery_baseline": check_delivery(everyone, records),
        "publisher": {k: steady[k] for k in ("failed", "requests", "late")}
        | {"burst_stored_after_kill": steady["burst_done"] - t_kill}
        | {"baseline_failed": baseline["failed"]},
        "cpu_percent": {
            "clients": [
                100 * (b - a) / wall for a, b in zip(cpu0["clients"], cpu1["clients"], strict=True)
            ],
            "clients_max_run": max(r["cpu"] / r["wall"] for r in runs) * 100,
            "publisher": 100 * (cpu1["publisher"][0] - cpu0["publisher"][0]) / wall,
            "survivors": [
                100 * (b - a) / (t_cpu - t_kill + BEFORE_KILL)
                for a, b in zip(cpu0["survivors"], survivor_cpu, strict=True)
            ],
        },
        "survivor_cpu_timeline": [(round(t - t_kill, 2), c) for t, c in sampler.samples],
        "machine": machine(),
    }


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """Percentiles of each phase over the affected clients."""
    lines = list(data["timelines"].values())
    rings: dict[str, float | None] = data["ring_change"]
    out: dict[str, Any] = {"recovered": sum(1 for x in lines if x["received"] is not None)}
    phases = {
        "closed seen": [x["closed"] for x in lines],
        "welcome": [x["welcome"] for x in lines],
        "receiving again": [x["received"] for x in lines],
        "welcome - ring change": [  # on the node that welcomed it
            x["welcome"] - rings[x["node"]]
            for x in lines
            if x["welcome"] is not None and rings.get(x["node"]) is not None
        ],
    }
    for name, values in phases.items():
        got = [v for v in values if v is not None]
        out[name] = (
            {"p50": pct(got, 0.5), "p99": pct(got, 0.99), "max": max(got), "n": len(got)}
            if got
            else None
        )
    out["connects_max"] = max((x["connects"] for x in lines), default=0)
    out["redirected"] = sum(1 for x in lines if x["redirects"])
    out["backed_off"] = sum(1 for x in lines if x["backoffs"])
    return out


def report(data: dict[str, Any], s: dict[str, Any]) -> str:
    def cell(phase: str, key: str) -> str:
        v = s[phase]
        return "-" if v is None else f"{v[key]:.2f}"

    rows = [
        [
            phase,
            cell(phase, "p50"),
            cell(phase, "p99"),
            cell(phase, "max"),
            str(0 if s[phase] is None else s[phase]["n"]),
        ]
        for phase in ("closed seen", "welcome", "receiving again", "welcome - ring change")
    ]
    recv = s["receiving again"]
    budget = data["budget"]
    cpu = data["cpu_percent"]
    m = data["machine"]
    ring = ", ".join(
        f"{k} {v:.2f} s" if v is not None else f"{k} never" for k, v in data["ring_change"].items()
    )
    d, b, pub = data["delivery_sampled"], data["delivery_baseline"], data["publisher"]
    verdict = "-" if recv is None else f"{recv['p99'] / budget:.2f}"
    lines = [
        f"clients {data['connected']}/{data['clients']} ({data['per_node']}), cold connect "
        f"{data['cold_connect_seconds']:.2f} s; SIGKILL {data['victim']} holding "
        f"{data['affected']}; recovered {s['recovered']}/{data['affected']}; lease TTL "
        f"{data['ttl']} s, peer probe {'on' if data['peer_probe'] else 'off'}",
        f"publisher: {data['rate']:.0f} msg/s to {data['sample']} of its users in batches of "
        f"{data['chunk']}; {pub['requests']} requests, {pub['failed']} failed, at most "
        f"{pub['late']:.2f} s behind schedule; the burst was stored "
        f"{pub['burst_stored_after_kill']:.2f} s after the kill",
        f"survivors' views dropped {data['victim']} after: {ring}",
        "",
        "seconds after the SIGKILL (affected clients):",
        table(["phase", "p50", "p99", "max", "n"], rows),
        "",
        f"budget (invariant 3: lease TTL + 1 s) = {budget:.2f} s; "
        f"ratio p99 / budget = {verdict} (must be < 1)",
        f"redirected {s['redirected']}, backed off {s['backed_off']}, most connects by one "
        f"client {s['connects_max']}; other nodes' clients dropped: {data['others_dropped']}",
        f"sampled users: {d['messages']} messages to {d['users']} users, missing {d['missing']}, "
        f"duplicated {d['duplicated']}; baseline round to all: missing {b['missing']}, "
        f"duplicated {b['duplicated']}",
        f"CPU (100% = one core) clients {' '.join(f'{c:.0f}%' for c in cpu['clients'])} "
        f"(busiest run {cpu['clients_max_run']:.0f}%), publisher {cpu['publisher']:.0f}%, "
        f"survivor nodes {' '.join(f'{c:.0f}%' for c in cpu['survivors'])}",
        f"machine: {m['nproc']} cores, load average at the end "
        f"{' '.join(f'{x:.2f}' for x in m['loadavg'])}",
    ]
    return "\n".join(lines)


def workdir(keep: bool) -> contextlib.AbstractContextManager[str]:
    """A temporary folder for the cluster, left in place with ``keep`` (its logs)."""
    if keep:
        return contextlib.nullcontext(tempfile.mkdtemp(prefix="meshpush-failover-"))
    return tempfile.TemporaryDirectory(prefix="meshpush-failover-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"meshpush bench {Path(__file__).stem}")
    parser.add_argument("--clients", type=int, default=1500)
    parser.add_argument("--readers", type=int, default=os.cpu_count() or 2, help="client processes")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL (s)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="messages/s to the sample (0: one per sampled user per second, at most 500)",
    )
    parser.add_argument("--chunk", type=int, default=50, help="messages per batch request")
    parser.add_argument(
        "--sample", type=int, default=0, help="publish to this many of the victim's users (0: all)"
    )
    parser.add_argument("--after", type=float, default=8.0, help="publishing after the kill (s)")
    parser.add_argument("--drain", type=float, default=3.0, help="reading after the publisher")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight")
    parser.add_argument("--backoff-cap", type=float, default=5.0, help="the SDK's default")
    parser.add_argument("--victim", default="", help="node id (default: the fullest)")
    parser.add_argument(
        "--peer-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="nodes probe a peer their clients report dead (off: wait for lease expiry)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster's logs (path)")
    parser.add_argument("--json", type=Path, default=Path(".meshpush/bench/failover.json"))
    args = parser.parse_args(argv)
    settings = {
        "lease_ttl": args.ttl,
        "max_connections_per_ip": 100_000,
        "peer_probe": args.peer_probe,
    }
    with (
        workdir(args.keep) as tmp,
        LocalCluster(Path(tmp), nodes=3, cluster="bench", node_settings=settings) as cluster,
    ):
        data = run(cluster, args)
        if args.keep:
            print(f"cluster logs kept in {tmp}")
    data["summary"] = summary(data)
    print(report(data, data["summary"]))
    write_json(args.json, data)
    s, d = data["summary"], data["delivery_sampled"]
    ok = s["recovered"] == data["affected"] and not d["missing"] and not d["duplicated"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
