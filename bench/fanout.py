"""Broadcast fan-out: messages delivered per second to N sessions, beside Node ws and others.

For each server in turn (meshpush 1 node, Node.js ``ws`` 8, Python ``websockets``, bare
trio-websocket, raw stdlib sockets: see bench/_servers.py), READERS worker processes open
SESSIONS WebSocket connections (a raw epoll client, bench/_wsload.py), then the server sends
BROADCASTS messages of SIZE bytes to every connection; the references on a trigger, meshpush
through its HTTP API, two ways on the same sessions (two rows):

* ``meshpush``: ``POST /v1/broadcast`` once per message, one after the other (each call
  returns once the message is stored: the pace of a publisher that waits for every answer);
* ``meshpush-batch``: ``POST /v1/broadcast {"messages": [...]}`` with up to ``--per-call``
  messages per call (default all of them in one), the way a backend sends in volume.

Rate = frames received by all readers / (last frame received - trigger). Reader CPU is
reported (100% = one core): a reader at ~100% means the readers, not the server, set the pace.
Then meshpush alone broadcasts once to STALL_SESSIONS sessions and the longest event-loop stall
is read from its /metrics (``meshpush_event_loop_stall_max_seconds``).

    meshpush bench fanout [--sessions 2000] [--broadcasts 100] [--size 100] [--readers 2]
        [--servers meshpush,node-ws,websockets,trio-websocket,raw] [--stall-sessions 10000]
        [--per-call 100] [--profile DIR] [--json .meshpush/bench/fanout.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._targets import (
    ALL,
    MeshpushTarget,
    Target,
    add_ratios,
    cpu_seconds,
    each_server,
    machine,
    parse_servers,
    per_cpu,
    ratio,
    table,
    write_json,
)
from bench._wsload import ReaderPool, raise_fd_limit

STALL_GAUGE = "meshpush_event_loop_stall_max_seconds"
STALL_HISTOGRAM = "meshpush_event_loop_stall_seconds"
NOTICE = 0.001  # the histogram observes stalls from 1 ms (meshpush/observe/looplag.py)


Send = Callable[[int, int], None]  # (count, size): make the server send ``count`` broadcasts

#: what each meshpush row does, printed under the table
MESHPUSH_ROWS = {
    "meshpush": "one POST /v1/broadcast per message, sequential (each stored before it returns)",
    "meshpush-batch": 'POST /v1/broadcast {{"messages": [...]}}, {per_call} messages per call',
}


def measure(target: Target, args: argparse.Namespace, sessions: int, count: int) -> dict[str, Any]:
    """Connect ``sessions`` readers, broadcast ``count`` messages, count what arrives."""
    with ReaderPool(args.readers) as pool:
        opened = connect(pool, target, sessions)
        return deliver(pool, target, target.broadcast, args, count, opened["ok"])


def connect(pool: ReaderPool, target: Target, sessions: int) -> dict[str, Any]:
    opened = pool.connect(target.host, target.port, target.paths(sessions, "fan-"))
    if opened["ok"] < sessions:
        print(f"  {target.name}: only {opened['ok']}/{sessions} connected: {opened['errors']}")
    time.sleep(0.5)
    return opened


def deliver(
    pool: ReaderPool, target: Target, send: Send, args: argparse.Namespace, count: int, ok: int
) -> dict[str, Any]:
    """One measured round on connected readers: ``send`` ``count`` broadcasts, count frames."""
    cpu0 = cpu_seconds(target.pid)
    pool.send_expect(count, timeout=args.timeout)
    t0 = time.monotonic()
    send(count, args.size)
    target.wait_done()
    answers = pool.collect()
    elapsed = max(max(a["t_last"] for a in answers) - t0, 1e-9)
    server_cpu = cpu_seconds(target.pid) - cpu0
    frames = sum(a["frames"] for a in answers)
    closes: dict[str, int] = {}
    for a in answers:
        for code, n in a["closes"].items():
            closes[code] = closes.get(code, 0) + n
    return {
        "sessions": ok,
        "delivered": frames,
        "expected": sum(a["wanted"] for a in answers),
        "seconds": elapsed,
        "rate": frames / elapsed,
        "server_cpu_seconds": server_cpu,
        "per_cpu_second": per_cpu(frames, server_cpu),
        "reader_cpu_percent": [100 * a["cpu"] / elapsed for a in answers],
        "closes": closes,
    }


def measure_meshpush(
    target: MeshpushTarget, args: argparse.Namespace, sessions: int, count: int
) -> list[dict[str, Any]]:
    """Both meshpush rows on the same sessions: sequential single POSTs, then batches."""
    rows = {"meshpush": target.broadcast, "meshpush-batch": batch_sender(target, args.per_call)}
    results = []
    with ReaderPool(args.readers) as pool:
        ok = connect(pool, target, sessions)["ok"]
        for name, send in rows.items():
            with profiled(target.pid, args.profile, name):
                results.append({"server": name, **deliver(pool, target, send, args, count, ok)})
    return results


@contextlib.contextmanager
def profiled(pid: int, folder: Path | None, name: str) -> Iterator[None]:
    """With ``--profile DIR``: py-spy samples process ``pid`` meanwhile (raw stacks, one line
    per stack with its count) into ``DIR/<name>.txt``; py-spy comes from PyPI (not installed
    by the bench: ``pip install py-spy``)."""
    if folder is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "--nonblocking"]
    proc = subprocess.Popen(
        [*argv, "-o", str(folder / f"{name}.txt")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def hottest(path: Path, most: int = 6) -> list[tuple[str, float]]:
    """The functions with the most samples of their own in a raw py-spy profile (share)."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        name = leaf.split(" (")[0] + " " + leaf.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
        counts[name] = counts.get(name, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:most]
    return [(name, n / total) for name, n in ranked] if total else []


def batch_sender(target: MeshpushTarget, per_call: int) -> Send:
    """``POST /v1/broadcast {"messages": [...]}``, ``per_call`` messages per call."""

    def send(count: int, size: int) -> None:
        for start in range(0, count, per_call):
            n = min(per_call, count - start)
            body = {"messages": [{"data": "x" * size}] * n}
            status, answer = target.request("POST", "/v1/broadcast", body)
            results = json.loads(answer).get("results", []) if status == 202 else []
            failed = [r for r in results if "error" in r]
            if status != 202 or failed or len(results) != n:
                raise RuntimeError(f"broadcast batch at {start}: {status} {answer[:200]!r}")

    return send


def measure_stall(target: MeshpushTarget, args: argparse.Namespace) -> dict[str, Any]:
    """One broadcast to ``--stall-sessions`` sessions; the longest loop stall from /metrics."""
    with ReaderPool(args.readers) as pool:
        paths = target.paths(args.stall_sessions, "stall-")
        opened = pool.connect(target.host, target.port, paths, timeout=args.timeout * 5)
        connect_seconds = opened["t_end"] - opened["t_start"]
        quiet = wait_quiet(target, pool, args.quiet_wait)
        before = target.metrics()
        pool.send_expect(1, timeout=args.timeout)
        target.broadcast(1, args.size)
        answers = pool.collect()
        after = target.metrics()
    return {
        "sessions": opened["ok"],
        "connect_seconds": connect_seconds,
        "stall_before_seconds": quiet,
        "delivered": sum(a["frames"] for a in answers),
        "longest_stall_seconds": after.get(STALL_GAUGE, float("nan")),
        "longest_stall_bucket_seconds": stall_bucket(before, after),
    }


def stall_bucket(before: dict[str, float], after: dict[str, float]) -> list[float] | None:
    """From the stall histogram: the bucket (low, high] of the longest stall between the two
    scrapes (None: no stall of a millisecond or more). Unlike the gauge, it is not blurred by
    stalls of the 30 s before."""
    prefix = STALL_HISTOGRAM + '_bucket{le="'
    new = sorted(
        (float(key[len(prefix) : -2]), after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith(prefix)
    )
    total = new[-1][1] if new else 0.0
    if total <= 0:
        return None
    i = next(i for i, (_, n) in enumerate(new) if n >= total)
    return [new[i - 1][0] if i else NOTICE, new[i][0]]


def wait_quiet(target: MeshpushTarget, pool: ReaderPool, limit: float) -> float:
    """Wait (at most ``limit`` s) until the stall gauge (max of the last 30 s) no longer shows
    the connect phase's stalls; returns the gauge then."""
    deadline = time.monotonic() + limit
    stall = target.metrics().get(STALL_GAUGE, 0.0)
    while stall > 0.005 and time.monotonic() < deadline:
        pool.idle(2.0)  # the readers answer the node's pings meanwhile
        stall = target.metrics().get(STALL_GAUGE, 0.0)
    return stall


def run(args: argparse.Namespace) -> dict[str, Any]:
    stall: dict[str, Any] | None = None

    extra: list[dict[str, Any]] = []

    def one(target: Target) -> dict[str, Any]:
        nonlocal stall
        if not isinstance(target, MeshpushTarget):
            return measure(target, args, args.sessions, args.broadcasts)
        single, *more = measure_meshpush(target, args, args.sessions, args.broadcasts)
        extra.extend(more)
        if args.stall_sessions > 0:
            stall = measure_stall(target, args)
        return {k: v for k, v in single.items() if k != "server"}

    results, skipped = each_server("fanout", args.servers, one)
    at = next((i for i, r in enumerate(results) if r["server"] == "meshpush"), len(results))
    results[at + 1 : at + 1] = extra
    add_ratios(results, "rate")
    add_ratios(results, "per_cpu_second", "cpu_vs_node_ws")
    return {
        "bench": "fanout",
        "params": {
            "sessions": args.sessions,
            "broadcasts": args.broadcasts,
            "size": args.size,
            "readers": args.readers,
            "per_call": args.per_call,
        },
        "machine": machine(),
        "results": results,
        "skipped": skipped,
        "stall": stall,
        "profiles": {
            name: hottest(args.profile / f"{name}.txt")
            for name in MESHPUSH_ROWS
            if args.profile is not None and (args.profile / f"{name}.txt").exists()
        },
    }


def report(data: dict[str, Any]) -> str:
    p = data["params"]
    m = data["machine"]
    rows = [
        [
            r["server"],
            f"{r['delivered']}/{r['expected']}",
            f"{r['rate']:,.0f}",
            ratio(r["vs_node_ws"]),
            f"{r['server_cpu_seconds']:.2f}",
            f"{r['per_cpu_second']:,.0f}" if r["per_cpu_second"] else "-",
            ratio(r["cpu_vs_node_ws"]),
            " ".join(f"{c:.0f}%" for c in r["reader_cpu_percent"]),
        ]
        for r in data["results"]
    ]
    headers = ["server", "delivered", "msgs/s", "vs Node ws", "server CPU s"]
    headers += ["msgs/CPU-s", "vs Node ws", "reader CPU"]
    lines = [
        f"fanout: {p['sessions']} sessions x {p['broadcasts']} broadcasts of {p['size']} bytes, "
        f"{p['readers']} reader processes; {m['nproc']} CPUs ({m['cpu']}), "
        f"load average at the end {' '.join(f'{x:.2f}' for x in m['loadavg'])}",
        table(headers, rows),
    ]
    for r in data["results"]:
        if r["server"] in MESHPUSH_ROWS:
            per_call = min(p.get("per_call", p["broadcasts"]), p["broadcasts"])
            what = MESHPUSH_ROWS[r["server"]].format(per_call=per_call)
            lines.append(f"{r['server']}: {what}")
    for name, hot in data.get("profiles", {}).items():
        lines.append(
            f"{name} node profile (own samples): " + ", ".join(f"{f} {x:.0%}" for f, x in hot)
        )
    for name, why in data["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    for r in data["results"]:
        if r["closes"]:
            lines.append(f"{r['server']}: connections closed by the server: {r['closes']}")
    if s := data["stall"]:
        lines.append(
            f"meshpush event-loop stalls, one broadcast to {s['sessions']} sessions: every "
            f"stall <= {fmt_bucket(s['longest_stall_bucket_seconds'])} (histogram); longest stall "
            f"of the last 30 s {s['longest_stall_seconds'] * 1000:.1f} ms (gauge); delivered "
            f"{s['delivered']}; {s['sessions']} handshakes took {s['connect_seconds']:.1f} s"
        )
    return "\n".join(lines)


def fmt_bucket(bucket: list[float] | None) -> str:
    """The longest stall's histogram bucket as text."""
    if bucket is None:
        return f"{NOTICE * 1000:g} ms"
    low, high = (x * 1000 for x in bucket)
    if high == float("inf"):
        return f"? (longest over {low:g} ms, above the top bucket)"
    return f"{high:g} ms (longest over {low:g} ms)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshpush bench fanout", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--broadcasts", type=int, default=100)
    parser.add_argument("--size", type=int, default=100, help="bytes of data per message")
    parser.add_argument("--readers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--servers", type=parse_servers, default=list(ALL))
    parser.add_argument(
        "--stall-sessions", type=int, default=10_000, help="0 skips the stall measurement"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=35.0,
        help="seconds to wait at most for the stall gauge to forget the connect phase",
    )
    parser.add_argument(
        "--per-call",
        type=int,
        default=100,
        help="broadcasts per POST in the meshpush-batch row (at most the node's max_batch)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder: py-spy profiles of the node during each meshpush row (needs py-spy)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per phase, seconds")
    parser.add_argument("--json", type=Path, default=Path(".meshpush/bench/fanout.json"))
    args = parser.parse_args(argv)
    raise_fd_limit()
    data = run(args)
    print(report(data))
    write_json(args.json, data)
    incomplete = [r["server"] for r in data["results"] if r["delivered"] < r["expected"]]
    if incomplete:
        print(f"fanout: incomplete delivery on {', '.join(incomplete)}", file=sys.stderr)
    return 1 if incomplete or not data["results"] else 0
