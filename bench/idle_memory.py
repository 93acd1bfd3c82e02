"""Idle memory: server RSS per idle WebSocket session at N sessions, beside Node ws and others.

For each server in turn (meshpush 1 node, Node.js ``ws`` 8, Python ``websockets``, bare
trio-websocket, raw stdlib sockets), READERS worker processes open SESSIONS connections that
then stay idle (they only answer pings); RSS of the server process is read from /proc before
the first connection and after the last one has been greeted and SETTLE seconds have passed.
KB/session = RSS delta / sessions. Printed with the ratio to Node ws and to the 10 KB budget.
The soft open-files limit is raised to the hard one (``ulimit -Hn``); sessions beyond what it
allows fail to connect and are reported.

    meshpush bench idle-memory [--sessions 10000] [--readers 2] [--settle 3]
        [--servers meshpush,node-ws,websockets,trio-websocket,raw]
        [--json .meshpush/bench/idle-memory.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench._targets import (
    ALL,
    Target,
    add_ratios,
    each_server,
    machine,
    parse_servers,
    ratio,
    rss_bytes,
    table,
    write_json,
)
from bench._wsload import ReaderPool, raise_fd_limit

BUDGET_KB = 10.0


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    time.sleep(1.0)
    before = rss_bytes(target.pid)
    with ReaderPool(args.readers) as pool:
        opened = pool.connect(
            target.host, target.port, target.paths(args.sessions, "idle-"), timeout=args.timeout
        )
        pool.idle(args.settle)
        after = rss_bytes(target.pid)
    ok = max(1, opened["ok"])
    if opened["ok"] < args.sessions:
        print(f"  only {opened['ok']}/{args.sessions} connected: {opened['errors']}")
    return {
        "sessions": opened["ok"],
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kb_per_session": (after - before) / ok / 1024,
        "connect_seconds": opened["t_end"] - opened["t_start"],
    }


def report(data: dict[str, Any]) -> str:
    m = data["machine"]
    rows = [
        [
            r["server"],
            str(r["sessions"]),
            f"{r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f}",
            f"{r['kb_per_session']:.1f}",
            ratio(r["vs_node_ws"]),
            f"{r['kb_per_session'] / BUDGET_KB:.2f}x",
        ]
        for r in data["results"]
    ]
    headers = ["server", "sessions", "RSS MiB", "KB/session", "vs Node ws", "vs 10 KB budget"]
    lines = [
        f"idle-memory: {data['params']['sessions']} idle sessions; {m['nproc']} CPUs "
        f"({m['cpu']}), load average at the end {' '.join(f'{x:.2f}' for x in m['loadavg'])}",
        table(headers, rows),
    ]
    lines += [f"skipped {name}: {why}" for name, why in data["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshpush bench idle-memory", description=__doc__)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--readers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    parser.add_argument("--servers", type=parse_servers, default=list(ALL))
    parser.add_argument("--timeout", type=float, default=600.0, help="connect phase, seconds")
    parser.add_argument("--json", type=Path, default=Path(".meshpush/bench/idle-memory.json"))
    args = parser.parse_args(argv)
    limit = raise_fd_limit()
    if limit < args.sessions + 100:
        print(
            f"idle-memory: open-files limit {limit} < sessions; raise `ulimit -Hn`", file=sys.stderr
        )
    results, skipped = each_server("idle-memory", args.servers, lambda t: measure(t, args))
    add_ratios(results, "kb_per_session")
    data = {
        "bench": "idle-memory",
        "params": {"sessions": args.sessions, "readers": args.readers, "settle": args.settle},
        "machine": machine(),
        "results": results,
        "skipped": skipped,
    }
    print(report(data))
    write_json(args.json, data)
    return 0 if results else 1
