"""``meshpush`` command line: node, dev, status, token, publish, listen, chaos, bench."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshpush import settings as settings_mod
from meshpush.client import State
from meshpush.core.auth import issue_token
from meshpush.core.encoding import BadId, check_id

if TYPE_CHECKING:
    from meshpush.client import Client

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


def package_version() -> str:
    """The installed distribution's version (what ``pip install`` put on this machine)."""
    try:
        return importlib.metadata.version("meshpush")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpush", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshpush {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node (flags or MESHPUSH_* env vars)")
    settings_mod.add_arguments(node)
    node.set_defaults(func=cmd_node)

    dev = sub.add_parser(
        "dev",
        help="run etcd, NATS and N nodes on 127.0.0.1 until Ctrl-C",
        description="Node settings come from MESHPUSH_* variables (see `meshpush node --help`)"
        " and --set; ports, node ids, etcd and NATS are chosen by `meshpush dev` itself.",
    )
    dev.add_argument(
        "--nodes", type=_count(1, 32), default=3, help="nodes to start, 1-32 (default: 3)"
    )
    _backends_flag(dev)
    dev.add_argument(
        "--dir", type=Path, default=DEV_JSON.parent, help="state and logs (default: .meshpush)"
    )
    dev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a node setting for every node, e.g. --set heartbeat_interval=5 (repeatable;"
        " overrides MESHPUSH_<NAME>)",
    )
    dev.set_defaults(func=cmd_dev)

    status = sub.add_parser("status", help="print the cluster: nodes, slots, sessions, users")
    status.add_argument("--url", help="any node's HTTP URL (default: the nodes in --config)")
    status.add_argument("--json", action="store_true", help="print each node's /v1/nodes JSON")
    _config_flag(status)
    status.set_defaults(func=cmd_status)

    token = sub.add_parser("token", help="print a client token for the dev cluster")
    token.add_argument("--user", required=True, type=_id("user"), help="the token's sub")
    token.add_argument("--ttl", type=_seconds, default=3600.0, help="seconds (default: 3600)")
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
    listen.add_argument("--user", required=True, type=_id("user"), help="user id to listen as")
    listen.add_argument(
        "--device", default="cli", type=_id("device"), help="device id (default: cli)"
    )
    listen.add_argument(
        "--count", type=_count(0), default=0, help="exit after N messages (default: 0, never)"
    )
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
    _backends_flag(chaos)
    chaos.add_argument("--workdir", type=Path, help="logs and event log (default: a temp dir)")
    chaos.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    chaos.add_argument("--list", action="store_true", help="list the scenarios and exit")
    chaos.set_defaults(func=cmd_chaos)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ against in-run references (see docs/performance.md)",
        description="meshpush bench NAME [ARGS]: runs bench/NAME.py's main(ARGS); "
        "`meshpush bench NAME --help` shows its flags.",
    )
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("name", nargs="?", help="benchmark name (--list shows them)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=cmd_bench)
    return parser


def _id(what: str) -> Callable[[str], str]:
    """An argparse type for a user or device id (1-256 bytes of UTF-8, no control chars)."""

    def parse(text: str) -> str:
        try:
            return check_id(text, what)
        except BadId as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high]."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, not {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _backends_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        choices=("single", "clustered"),
        default="single",
        help="single: one etcd, one NATS server; clustered: a 3-member etcd and a 3-server"
        " JetStream cluster (default: single)",
    )


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=DEV_JSON, help=f"dev.json to read (default: {DEV_JSON})"
    )


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
    from meshpush.server.node import main as node_main

    return node_main(settings_mod.from_sources(args))


def cmd_dev(args: argparse.Namespace) -> int:
    from meshpush.local.devcluster import LocalCluster

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir: Path = args.dir.resolve()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    overrides = dev_overrides(os.environ, args.set)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalCluster(
        workdir / "run", nodes=args.nodes, backends=args.backends, **_dev_cluster_args(overrides)
    ) as cluster:
        cluster.write_json(workdir / "dev.json")
        print(_summary(cluster.describe(), workdir, overrides), flush=True)
        while not stop:
            time.sleep(0.2)
        print("stopping...", flush=True)
    (workdir / "dev.json").unlink(missing_ok=True)
    print("stopped", flush=True)
    return 0


#: Node settings ``meshpush dev`` chooses itself (free ports, ids, its own etcd and NATS).
DEV_MANAGED = frozenset(
    {"node_id", "ws_port", "http_port", "etcd", "nats_url", "public_ws_url", "public_http_url"}
)


def dev_overrides(env: Mapping[str, str], assignments: Sequence[str]) -> dict[str, Any]:
    """Node settings for ``meshpush dev``: ``MESHPUSH_*`` variables, then ``--set name=value``
    (validated like a node validates them; bad names and values are errors)."""
    names = {f.name for f in dataclasses.fields(settings_mod.Settings)}
    env_name = settings_mod.env_name
    raw = {
        name: env[env_name(name)] for name in sorted(names - DEV_MANAGED) if env_name(name) in env
    }
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or name not in names:
            near = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise CliError(f"--set {assignment!r}: expected NAME=VALUE with a node setting{hint}")
        if name in DEV_MANAGED:
            raise CliError(f"--set {name}: meshpush dev sets {name} itself")
        raw[name] = value
    parsed = settings_mod.from_sources(env={env_name(k): v for k, v in raw.items()})
    return {name: getattr(parsed, name) for name in raw}


def _dev_cluster_args(overrides: dict[str, Any]) -> dict[str, Any]:
    """LocalCluster arguments: the secrets and cluster name it reports in dev.json go there."""
    args: dict[str, Any] = {"node_settings": dict(overrides)}
    if overrides.get("cluster"):
        args["cluster"] = overrides["cluster"]
    if overrides.get("token_secret"):
        args["token_secret"] = overrides["token_secret"]
    if overrides.get("api_keys"):
        args["api_key"] = overrides["api_keys"][0]
    return args


def _summary(info: dict[str, Any], workdir: Path, overrides: dict[str, Any]) -> str:
    lines = [
        f"meshpush dev cluster '{info['cluster']}' is up",
        f"  etcd   {info['etcd']}",
        f"  nats   {info['nats']}",
    ]
    for n in info["nodes"]:
        lines.append(f"  node {n['id']:4} ws {n['ws_url']:32} http {n['http_url']}")
    secret = {"token_secret", "api_keys", "token_old_secrets"}
    shown = [f"{k}={'***' if k in secret else v}" for k, v in overrides.items()]
    if shown:
        lines.append(f"  set    {' '.join(shown)}")
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
    from meshpush.publisher import Publisher, PublishError

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


def cmd_status(args: argparse.Namespace) -> int:
    seeds = [args.url] if args.url else [n["http_url"] for n in load_dev(args.config)["nodes"]]
    view, errors = None, []
    for url in seeds:  # any node's view names every node
        try:
            view = get_json(url.rstrip("/") + "/v1/nodes")
            break
        except (OSError, ValueError, CliError) as exc:
            errors.append(f"{url}: {_reason(exc)}")
    if view is None:
        raise CliError("cannot reach the cluster: " + "; ".join(errors))
    rows = []
    for member in view["nodes"]:  # sessions and users are each node's own numbers
        try:
            own = get_json(member["http_url"].rstrip("/") + "/v1/nodes")
        except (OSError, ValueError, CliError) as exc:
            own = {"error": _reason(exc)}
        rows.append((member, own))
    if args.json:
        print(json.dumps([own for _, own in rows], indent=2))
    else:
        print(format_status(view, rows))
    return 0 if all(own.get("ready") for _, own in rows) else 1


def format_status(view: dict[str, Any], rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    lines = [
        f"{len(rows)} nodes (view of {view['self']})",
        f"{'node':<10} {'state':<11} {'slots':>5} {'sessions':>8} {'users':>6}  ws_url",
    ]
    total = {"sessions": 0, "users": 0}
    for member, own in rows:
        state = _node_state(own)
        if state != "unreachable":
            for key in total:
                total[key] += int(own.get(key, 0))
        lines.append(
            f"{member['id']:<10} {state:<11} {member['slots']:>5} {own.get('sessions', '-'):>8}"
            f" {own.get('users', '-'):>6}  {member['ws_url']}"
        )
    slots = sum(m["slots"] for m, _ in rows)
    lines.append(f"{'total':<10} {'':<11} {slots:>5} {total['sessions']:>8} {total['users']:>6}")
    return "\n".join(lines)


def _node_state(own: dict[str, Any]) -> str:
    if "error" in own:
        return "unreachable"
    if own.get("draining"):
        return "draining"
    return "ready" if own.get("ready") else "starting"


def get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as exc:
        raise CliError(f"{exc.code}: {exc.read().decode(errors='replace')}") from None


def _reason(exc: Exception) -> str:
    return str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc)


class ListenReporter:
    """``meshpush listen`` says on stderr what its connection is doing, once per change."""

    def __init__(self, urls: list[str], config: Path) -> None:
        self.urls = urls
        self.config = config
        self.client: Client | None = None
        self.failures = 0
        self.online = False

    def say(self, text: str) -> None:
        print(f"meshpush listen: {text}", file=sys.stderr, flush=True)

    def start(self) -> None:
        self.say(f"connecting to {len(self.urls)} node(s) from {self.config} ...")

    def on_state(self, state: State) -> None:
        client = self.client
        if client is None or state is State.CLOSED:
            return
        was_online, self.online = self.online, state is State.ONLINE
        if state is State.ONLINE:
            self.failures = 0
            self.say(f"connected to node {client.node} (device {client.device})")
            return
        if was_online:
            why = "redirected" if state is State.REDIRECTING else client.stats.last_error
            self.say(f"left node {client.node} ({why or 'connection closed'}); reconnecting")
        if state is State.BACKING_OFF:
            self.failures += 1
            error = client.stats.last_error or "connection closed"
            if self.failures == len(self.urls):
                self.say(
                    f"cannot reach the cluster: none of the {len(self.urls)} node(s) in "
                    f"{self.config} answers (last error: {error}). Is `meshpush dev` running? "
                    "Still retrying; Ctrl-C stops."
                )
            elif self.failures < len(self.urls) or self.failures % 10 == 0:
                self.say(f"connection failed ({error}); retrying")


def cmd_listen(args: argparse.Namespace) -> int:
    from meshpush.client import open_client

    dev = load_dev(args.config)
    secret, user = dev["token_secret"], args.user
    urls = [n["ws_url"] for n in dev["nodes"]]
    reporter = ListenReporter(urls, args.config)

    async def token() -> str:
        return issue_token(secret, user, 3600)

    async def run() -> None:
        seen = 0
        reporter.start()
        async with open_client(
            urls, token=token, device=args.device, on_state=reporter.on_state
        ) as c:
            reporter.client = c
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

    try:
        trio.run(run)
    except* KeyboardInterrupt:  # Ctrl-C, also when it arrives inside the client's nursery
        pass
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    try:
        from chaos.faults import SCENARIOS
        from chaos.run import run_scenario
    except ImportError as exc:  # httpx and the server binaries come with the test extras
        raise CliError(f"chaos needs: pip install -e '.[local,test]' ({exc})") from None
    if args.list:
        for scenario in SCENARIOS.values():
            needs = " [--backends clustered]" if scenario.clustered else ""
            print(f"{scenario.name:<18} {scenario.about} (default {scenario.duration:g}s){needs}")
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
            backends=args.backends,
            workdir=args.workdir,
            keep=args.keep,
        )
    except KeyboardInterrupt:  # the cluster is already torn down by then
        print("meshpush chaos: interrupted", file=sys.stderr)
        return 130


def cmd_bench(args: argparse.Namespace) -> int:
    """Dispatch to ``bench/<name>.py``'s ``main(argv) -> int`` (a dash maps to ``_``)."""
    import importlib

    found = bench_modules()
    if args.list or not args.name:
        if not args.list:
            print("meshpush bench: name a benchmark; available:", file=sys.stderr)
        for name, about in found.items():
            print(f"{name:<14} {about}", file=sys.stdout if args.list else sys.stderr)
        return 0 if args.list else 2
    if args.name not in found:
        names = ", ".join(found) or "none (is the bench package installed?)"
        raise CliError(f"unknown benchmark {args.name!r}; available: {names}")
    module = importlib.import_module(f"bench.{args.name.replace('-', '_')}")
    result: int = module.main(list(args.args))
    return result


def bench_modules() -> dict[str, str]:
    """Benchmark command names -> the first line of each module's docstring (not imported)."""
    import ast
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("bench")
    if spec is None or not spec.submodule_search_locations:
        return {}
    found: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        path = Path(info.module_finder.path) / f"{info.name}.py"  # type: ignore[union-attr]
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except (OSError, SyntaxError):
            doc = ""
        found[info.name.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found
