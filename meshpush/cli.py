"""``meshpush`` command line: node, dev, token, publish, listen, chaos."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from . import settings as settings_mod
from .auth import issue_token

DEV_JSON = Path(".meshpush/dev.json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (ValueError, OSError, CliError) as exc:
        print(f"meshpush: {exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpush", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node (flags or MESHPUSH_* env vars)")
    settings_mod.add_arguments(node)
    node.set_defaults(func=cmd_node)

    dev = sub.add_parser("dev", help="run etcd, NATS and N nodes on 127.0.0.1 until Ctrl-C")
    dev.add_argument("--nodes", type=int, default=3)
    dev.add_argument("--dir", type=Path, default=DEV_JSON.parent, help="state and logs")
    dev.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="print a client token for the dev cluster")
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=float, default=3600.0)
    _config_flag(token)
    token.set_defaults(func=cmd_token)

    pub = sub.add_parser("publish", help="publish to a user or broadcast; prints the seq")
    target = pub.add_mutually_exclusive_group(required=True)
    target.add_argument("--user")
    target.add_argument("--broadcast", action="store_true")
    pub.add_argument("--id", help="idempotency id")
    pub.add_argument("data", help="JSON value (a string is quoted: '\"text\"')")
    _config_flag(pub)
    pub.set_defaults(func=cmd_publish)

    listen = sub.add_parser("listen", help="print a user's messages as JSON lines, forever")
    listen.add_argument("--user", required=True)
    listen.add_argument("--device", default="cli")
    listen.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")
    _config_flag(listen)
    listen.set_defaults(func=cmd_listen)

    chaos = sub.add_parser(
        "chaos",
        help="run a chaos scenario on a local cluster it starts itself (see docs/chaos.md)",
    )
    chaos.add_argument("--scenario", default="mixed", help="scenario name (--list shows them)")
    chaos.add_argument("--duration", type=float, help="seconds of load and faults")
    chaos.add_argument("--seed", type=int, help="seed of the fault schedule (default: random)")
    chaos.add_argument("--json", type=Path, help="also write the report as JSON here")
    chaos.add_argument("--nodes", type=int, help="meshpush nodes to start")
    chaos.add_argument("--users", type=int, help="simulated users (1-3 devices each)")
    chaos.add_argument("--rate", type=float, help="unicast publishes per second")
    chaos.add_argument("--memory-mb", type=float, default=400.0, help="RSS bound per node")
    chaos.add_argument("--workdir", type=Path, help="logs and event log (default: a temp dir)")
    chaos.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    chaos.add_argument("--list", action="store_true", help="list the scenarios and exit")
    chaos.set_defaults(func=cmd_chaos)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEV_JSON, help="dev.json to read")


def load_dev(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"{path} not found: start a cluster with `meshpush dev`") from None
    if not data.get("nodes"):
        raise CliError(f"{path} lists no running node")
    return data


# ---------------------------------------------------------------- commands


def cmd_node(args: argparse.Namespace) -> int:
    from .node import main as node_main

    return node_main(settings_mod.from_sources(args))


def cmd_dev(args: argparse.Namespace) -> int:
    from .devcluster import LocalCluster

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir: Path = args.dir.resolve()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalCluster(workdir / "run", nodes=args.nodes) as cluster:
        cluster.write_json(workdir / "dev.json")
        print(_summary(cluster.describe(), workdir), flush=True)
        while not stop:
            time.sleep(0.2)
        print("stopping...", flush=True)
    (workdir / "dev.json").unlink(missing_ok=True)
    print("stopped", flush=True)
    return 0


def _summary(info: dict[str, Any], workdir: Path) -> str:
    lines = [
        f"meshpush dev cluster '{info['cluster']}' is up",
        f"  etcd   {info['etcd']}",
        f"  nats   {info['nats']}",
    ]
    for n in info["nodes"]:
        lines.append(f"  node {n['id']:4} ws {n['ws_url']:32} http {n['http_url']}")
    lines += [
        f"  state  {workdir}/dev.json (api_key, token_secret), logs in {workdir}/run/",
        "try:   meshpush listen --user alice     (in another terminal)",
        '       meshpush publish --user alice \'{"hello": "world"}\'',
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def cmd_token(args: argparse.Namespace) -> int:
    dev = load_dev(args.config)
    print(issue_token(dev["token_secret"], args.user, args.ttl))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publisher import Publisher, PublishError

    data = parse_data(args.data)
    dev = load_dev(args.config)
    urls = [node["http_url"] for node in dev["nodes"]]  # any node will do; failover in order
    try:
        with Publisher(urls, dev["api_key"], retries=max(2, len(urls))) as pub:
            if args.broadcast:
                done = pub.broadcast(data, id=args.id)
            else:
                done = pub.publish(args.user, data, id=args.id)
    except PublishError as exc:
        raise CliError(str(exc)) from None
    print(f"{done.seq} duplicate" if done.duplicate else done.seq)
    return 0


def parse_data(text: str) -> Any:
    """DATA must be JSON; a mistake is exit 2 with a hint (a bare word is not a string)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        quoted = json.dumps(text)
        raise CliError(
            f"DATA is not valid JSON ({exc}); to send a string, quote it as JSON: '{quoted}'"
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def cmd_listen(args: argparse.Namespace) -> int:
    from .client import open_client

    dev = load_dev(args.config)
    secret, user = dev["token_secret"], args.user

    async def token() -> str:
        return issue_token(secret, user, 3600)

    async def run() -> None:
        seen = 0
        urls = [n["ws_url"] for n in dev["nodes"]]
        async with open_client(urls, token=token, device=args.device) as c:
            async for msg in c:
                line = {
                    "ch": msg.ch,
                    "seq": msg.seq,
                    "id": msg.id,
                    "data": msg.data,
                    "node": c.node,
                }
                print(json.dumps(line, ensure_ascii=False), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    try:
        from chaos.faults import SCENARIOS
        from chaos.run import run_scenario
    except ImportError as exc:  # httpx and the server binaries come with the test extras
        raise CliError(f"chaos needs: pip install -e '.[local,test]' ({exc})") from None
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:<13} {scenario.about} (default {scenario.duration:g}s)")
        return 0
    try:
        return run_scenario(
            args.scenario,
            duration=args.duration,
            seed=args.seed,
            json_path=args.json,
            nodes=args.nodes,
            users=args.users,
            rate=args.rate,
            memory_mb=args.memory_mb,
            workdir=args.workdir,
            keep=args.keep,
        )
    except KeyboardInterrupt:  # the cluster is already torn down by then
        print("meshpush chaos: interrupted", file=sys.stderr)
        return 130
