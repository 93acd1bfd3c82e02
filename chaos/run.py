"""Entry point: start a cluster, run a scenario on it, tear it down, check, report.

``meshpush chaos`` calls :func:`run_scenario`; so can a test or a script. The exit code is 0
iff the checker found no violation (2: the run itself could not be set up).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import trio

from meshpush.local.devcluster import ClusterError, LocalCluster

from . import report
from .checker import check
from .faults import SCENARIOS, Scenario, kinds_for, make_schedule
from .harness import Config, Harness, make_devices


def scenario_named(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None


def replay_command(config: Config, defaults: Scenario) -> str:
    """The command line that runs this exact schedule again."""
    parts = [
        "meshpush chaos",
        f"--scenario {config.scenario}",
        f"--duration {config.duration:g}",
        f"--seed {config.seed}",
    ]
    if config.nodes != defaults.nodes:
        parts.append(f"--nodes {config.nodes}")
    if config.users != defaults.users:
        parts.append(f"--users {config.users}")
    if config.rate != defaults.rate:
        parts.append(f"--rate {config.rate:g}")
    if config.backends != "single":
        parts.append(f"--backends {config.backends}")
    return " ".join(parts)


def run_scenario(
    name: str,
    duration: float | None = None,
    seed: int | None = None,
    json_path: Path | None = None,
    nodes: int | None = None,
    users: int | None = None,
    rate: float | None = None,
    memory_mb: float = 400.0,
    backends: str = "single",
    workdir: Path | None = None,
    keep: bool = False,
    out: TextIO = sys.stdout,
    progress: TextIO = sys.stderr,
) -> int:
    """Run scenario ``name`` on a fresh local cluster; print the report; 0 iff no violation."""
    scenario = scenario_named(name)
    config = Config(
        scenario=name,
        duration=float(duration if duration is not None else scenario.duration),
        seed=seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000),
        nodes=nodes or scenario.nodes,
        users=users or scenario.users,
        rate=rate or scenario.rate,
        memory_mb=memory_mb,
        backends=backends,
    )
    clustered = backends == "clustered"
    if scenario.clustered and not clustered:
        raise ValueError(f"scenario {name!r} needs --backends clustered")
    if config.nodes < 2 or config.users < 1 or config.duration <= 0 or config.rate <= 0:
        raise ValueError("chaos needs --nodes >= 2, --users >= 1, --duration > 0, --rate > 0")
    replay = replay_command(config, scenario)
    devices = [f"{u}/{d}" for u, d in make_devices(config.users, config.seed)]
    schedule = make_schedule(
        scenario, config.duration, config.seed, config.nodes, devices, config.lease_ttl, clustered
    )
    workdir = Path(workdir or tempfile.mkdtemp(prefix="meshpush-chaos-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _log_to(workdir / "harness.log")
    print(f"chaos {name}: seed {config.seed}, {len(schedule)} fault(s) planned:", file=progress)
    for spec in schedule:
        print(f"  {spec.describe()}", file=progress)
    print(f"  (logs in {workdir})", file=progress, flush=True)

    ops = ThreadPoolExecutor(1, thread_name_prefix="chaos-cluster")
    try:
        with LocalCluster(
            workdir / "cluster",
            nodes=config.nodes,
            cluster="chaos",
            node_settings=dict(config.node_settings),
            backends=backends,
            proxied=clustered,
        ) as cluster:
            harness = Harness(cluster, config, schedule, ops, progress)
            log = trio.run(harness.run)
    except ClusterError as exc:
        print(f"chaos: the cluster could not be run: {exc}", file=out)
        print(f"replay with: {replay}", file=out)
        return 2
    finally:
        ops.shutdown(wait=False, cancel_futures=True)

    log.meta.update(
        duration=config.duration,
        nodes=config.nodes,
        users=config.users,
        rate=config.rate,
        schedule=[spec.describe() for spec in schedule],
        node_settings=config.node_settings,
        backends=backends,
        kinds=list(kinds_for(scenario, clustered)),
    )
    log.save(workdir / "events.json")
    violations = check(log, config.memory_mb)
    result = report.build(log, violations, replay, config.memory_mb)
    print(report.render(result), file=out, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if violations:
        print(f"event log and process logs kept in {workdir}", file=out, flush=True)
        return 1
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _log_to(path: Path) -> None:
    """Harness and SDK logs go to a file in the work directory, not to the report."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_chaos", False):
            root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler._chaos = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
