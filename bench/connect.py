"""Handshakes per second on one server: concurrent clients from separate processes.

For each server in turn (meshpush 1 node, Node.js ``ws`` 8, Python ``websockets``, bare
trio-websocket, raw stdlib sockets), READERS worker processes open SESSIONS connections with
CONCURRENCY handshakes in flight in total and wait for each connection's first frame. On
meshpush that frame is the ``welcome``, sent after the JWT is verified, the user routed and the
resume points (cursor, last seq) read: a handshake here is the whole session start. The
connections are held (not closed) until all are open, as after a node failure when its clients
all come back. Rate = sessions / (last welcome - first connect). "CPU ms each" is the server
process's CPU over that window per session opened (meshpush: the node only, not NATS or etcd).

    meshpush bench connect [--sessions 2000] [--concurrency 128] [--readers 2]
        [--servers meshpush,node-ws,websockets,trio-websocket,raw]
        [--json .meshpush/bench/connect.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bench._targets import (
    ALL,
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


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    paths = target.paths(args.sessions, "conn-")  # tokens made before the clock starts
    with ReaderPool(args.readers) as pool:
        cpu0 = cpu_seconds(target.pid)
        opened = pool.connect(
            target.host, target.port, paths, concurrency=args.concurrency, timeout=args.timeout
        )
        server_cpu = cpu_seconds(target.pid) - cpu0
    elapsed = max(opened["t_end"] - opened["t_start"], 1e-9)
    return {
        "sessions": opened["ok"],
        "failed": opened["failed"],
        "errors": opened["errors"],
        "seconds": elapsed,
        "rate": opened["ok"] / elapsed,
        "server_cpu_seconds": server_cpu,
        "per_cpu_second": per_cpu(opened["ok"], server_cpu),
        "cpu_ms_per_handshake": 1000 * server_cpu / opened["ok"] if opened["ok"] else None,
        "reader_cpu_percent": [100 * c / elapsed for c in opened["reader_cpu"]],
    }


def report(data: dict[str, Any]) -> str:
    p, m = data["params"], data["machine"]
    rows = [
        [
            r["server"],
            f"{r['sessions']}/{p['sessions']}",
            f"{r['seconds']:.2f}",
            f"{r['rate']:,.0f}",
            ratio(r["vs_node_ws"]),
            f"{r['server_cpu_seconds']:.2f}",
            f"{r['per_cpu_second']:,.0f}" if r["per_cpu_second"] else "-",
            ratio(r["cpu_vs_node_ws"]),
            f"{r['cpu_ms_per_handshake']:.2f}" if r["cpu_ms_per_handshake"] else "-",
            " ".join(f"{c:.0f}%" for c in r["reader_cpu_percent"]),
        ]
        for r in data["results"]
    ]
    headers = ["server", "open", "seconds", "handshakes/s", "vs Node ws", "server CPU s"]
    headers += ["per CPU-s", "vs Node ws", "CPU ms each"]
    lines = [
        f"connect: {p['sessions']} sessions, {p['concurrency']} handshakes in flight, "
        f"{p['readers']} client processes; {m['nproc']} CPUs ({m['cpu']}), load average "
        f"at the start {_load(data.get('loadavg_start'))}, at the end {_load(m['loadavg'])}",
        table([*headers, "client CPU"], rows),
    ]
    lines += [f"skipped {name}: {why}" for name, why in data["skipped"].items()]
    lines += [f"{r['server']} errors: {r['errors']}" for r in data["results"] if r["failed"]]
    return "\n".join(lines)


def _load(values: list[float] | None) -> str:
    return " ".join(f"{x:.2f}" for x in values) if values else "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshpush bench connect", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=128, help="handshakes in flight")
    parser.add_argument("--readers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--servers", type=parse_servers, default=list(ALL))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=Path(".meshpush/bench/connect.json"))
    args = parser.parse_args(argv)
    raise_fd_limit()
    load_start = list(os.getloadavg())  # CPU per handshake is the number to compare when busy
    results, skipped = each_server("connect", args.servers, lambda t: measure(t, args))
    add_ratios(results, "rate")
    add_ratios(results, "per_cpu_second", "cpu_vs_node_ws")
    data = {
        "bench": "connect",
        "params": {
            "sessions": args.sessions,
            "concurrency": args.concurrency,
            "readers": args.readers,
        },
        "machine": machine(),
        "loadavg_start": load_start,
        "results": results,
        "skipped": skipped,
    }
    print(report(data))
    write_json(args.json, data)
    return 0 if results and all(r["failed"] == 0 for r in results) else 1
