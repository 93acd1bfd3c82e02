"""Every chaos scenario on a real cluster, run the way users and CI run it: ``meshpush chaos``.

Each scenario runs once at a small size (8 s, 3 nodes, 6 users); ``mixed`` runs at CI size
(seed 1, 90 s, the default load) — that run is the CI gate: any violation fails it. A run
whose only violations are a core bug listed in :data:`KNOWN_CORE_BUGS` is an expected failure
(xfail) naming the bug: the chaos command still exits non-zero and prints it; remove the entry
when the bug is fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chaos.faults import SCENARIOS

pytestmark = pytest.mark.cluster

Match = Callable[[dict[str, Any]], bool]

KNOWN_CORE_BUGS: dict[str, Match] = {
    # Empty: the late-Ping crash (trio-websocket #184) is fixed in meshpush/server/listener.py and
    # regression-tested in tests/test_cluster.py. Add an entry only with a filed bug.
}


def run_chaos(tmp_path: Path, *args: str, timeout: float) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "meshpush", "chaos", *args, "--json", str(out)]
    cmd += ["--workdir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + "\n--- progress ---\n" + proc.stderr[-6000:]
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, text, report


def judge(code: int, text: str, report: dict[str, Any]) -> None:
    """Pass on exit 0; xfail if every violation is a known core bug; fail otherwise."""
    if code == 0:
        assert report["ok"] and "invariants: OK" in text, text
        return
    violations = report.get("violations") or []
    for reason, match in KNOWN_CORE_BUGS.items():
        if violations and all(match(v) for v in violations):
            pytest.xfail(f"known core bug: {reason}")
    raise AssertionError(f"meshpush chaos exited {code}:\n{text}")


SMALL = ["--duration", "8", "--nodes", "3", "--users", "6", "--rate", "12"]


SINGLE = sorted(n for n, sc in SCENARIOS.items() if n != "mixed" and not sc.clustered)


@pytest.mark.parametrize("name", SINGLE)
def test_each_scenario_at_a_small_size(tmp_path: Path, name: str) -> None:
    code, text, report = run_chaos(tmp_path, "--scenario", name, "--seed", "7", *SMALL, timeout=170)
    assert report, text
    injected = [f["kind"] for f in report["faults"]]
    assert injected and set(injected) <= set(SCENARIOS[name].kinds), text
    assert report["messages"]["published"]["user"] > 0
    assert report["messages"]["published"]["broadcast"] > 0
    judge(code, text, report)
    assert "replay with" not in text


@pytest.mark.timeout(420)
def test_ci_mixed_run_has_no_violation(tmp_path: Path) -> None:
    """The CI gate: mixed faults for 90 s with seed 1 (about 2 minutes on 2 cores)."""
    code, text, report = run_chaos(
        tmp_path, "--scenario", "mixed", "--duration", "90", "--seed", "1", timeout=400
    )
    print(text)
    assert report, text
    assert len({f["kind"] for f in report["faults"]}) >= 6, text  # a real mix was injected
    assert report["messages"]["published"]["user"] > 1000
    judge(code, text, report)


@pytest.mark.timeout(300)
def test_ci_clustered_run_with_partitions_has_no_violation(tmp_path: Path) -> None:
    """The short clustered gate: 3 etcd members, 3 NATS servers (replicas 3), every link
    proxied; seed 148 cuts a node off etcd (its lease expires while it still reaches NATS and
    holds sessions), then off NATS, kills the etcd leader (about two minutes on 2 cores).
    The full clustered run (180 s, seed 1) is documented in docs/chaos.md."""
    code, text, report = run_chaos(
        tmp_path,
        *("--backends", "clustered", "--scenario", "mixed", "--duration", "50", "--seed", "148"),
        timeout=280,
    )
    print(text)
    assert report, text
    injected = [f["kind"] for f in report["faults"]]
    assert "partition-etcd" in injected and "etcd-leader" in injected, text
    placed = [f for f in report["faults"] if f["kind"].startswith("partition")]
    assert all(f["placed"] is not None for f in placed), text
    judge(code, text, report)
