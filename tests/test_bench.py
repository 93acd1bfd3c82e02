"""``meshpush bench``: the dispatcher, and a fan-out smoke run with tiny numbers.

These check behaviour only (the benchmarks run, deliver everything and write their JSON);
speed is what the benchmarks themselves report, never asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshpush.cli import main

BENCHES = {"fanout", "idle-memory", "connect", "failover", "throughput"}


def test_list_names_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed >= BENCHES
    assert not any(name.startswith("_") for name in listed)  # helpers are not benchmarks


def test_unknown_benchmark_exits_2_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no-such-bench'" in err
    assert "fanout" in err and "idle-memory" in err


def test_no_name_exits_2_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "fanout" in capsys.readouterr().err


def test_entry_point_passes_flags_through_to_the_benchmark() -> None:
    meshpush = Path(sys.executable).with_name("meshpush")
    result = subprocess.run(
        [str(meshpush), "bench", "connect", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "usage: meshpush bench connect" in result.stdout
    assert "--concurrency" in result.stdout


def test_stall_bucket_reads_the_histogram_difference() -> None:
    from bench.fanout import stall_bucket

    key = 'meshpush_event_loop_stall_seconds_bucket{le="%s"}'
    before = {key % "0.0025": 1.0, key % "0.01": 1.0, key % "+Inf": 1.0}
    after = {key % "0.0025": 3.0, key % "0.01": 4.0, key % "+Inf": 4.0}
    assert stall_bucket(before, after) == [0.0025, 0.01]
    assert stall_bucket(after, after) is None  # no stall of 1 ms or more in between
    assert stall_bucket({}, {key % "0.0025": 1.0, key % "+Inf": 1.0}) == [0.001, 0.0025]


def fanout(tmp_path: Path, servers: str, *extra: str) -> dict[str, object]:
    out = tmp_path / "fanout.json"
    argv = ["bench", "fanout", "--sessions", "20", "--broadcasts", "3", "--readers", "1"]
    argv += ["--servers", servers, "--timeout", "30", "--json", str(out), *extra]
    assert main(argv) == 0
    data: dict[str, object] = json.loads(out.read_text())
    return data


@pytest.mark.cluster
def test_fanout_smoke_meshpush_and_the_raw_floor(tmp_path: Path) -> None:
    data = fanout(tmp_path, "meshpush,raw", "--stall-sessions", "30", "--quiet-wait", "0")
    results = {r["server"]: r for r in data["results"]}  # type: ignore[attr-defined]
    assert set(results) == {"meshpush", "meshpush-batch", "raw"}
    for r in results.values():
        assert r["sessions"] == 20
        assert r["delivered"] == r["expected"] == 60
        assert r["rate"] > 0 and r["reader_cpu_percent"]
        assert r["vs_node_ws"] is None  # no Node ws in this run: no ratio
    stall = data["stall"]
    assert stall["sessions"] == 30 and stall["delivered"] == 30  # type: ignore[index]
    assert stall["longest_stall_seconds"] >= 0  # type: ignore[index]  # the gauge is exposed
    machine = data["machine"]
    assert machine["nproc"] and len(machine["loadavg"]) == 3  # type: ignore[index]


@pytest.mark.cluster
def test_fanout_smoke_node_ws(tmp_path: Path) -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("Node.js ws reference needs node and npm: apt-get install nodejs npm")
    data = fanout(tmp_path, "node-ws,raw", "--stall-sessions", "0")
    if "node-ws" in data["skipped"]:  # type: ignore[operator]
        pytest.skip(f"Node.js ws reference unavailable: {data['skipped']['node-ws']}")  # type: ignore[index]
    results = {r["server"]: r for r in data["results"]}  # type: ignore[attr-defined]
    assert results["node-ws"]["delivered"] == 60
    assert results["node-ws"]["vs_node_ws"] == 1.0
    assert results["raw"]["vs_node_ws"] > 0


@pytest.mark.cluster
def test_failover_smoke_every_client_of_the_killed_node_receives_again(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    argv = ["bench", "failover", "--clients", "12", "--readers", "1", "--rate", "40"]
    argv += ["--chunk", "4", "--ttl", "2", "--after", "5", "--drain", "1", "--json", str(out)]
    assert main(argv) == 0  # 0: every affected client recovered, nothing lost or duplicated
    data = json.loads(out.read_text())
    assert data["connected"] == 12 and data["affected"] >= 1
    assert data["summary"]["recovered"] == data["affected"] == data["sample"]
    assert data["delivery_sampled"]["missing"] == data["delivery_sampled"]["duplicated"] == 0
    assert data["delivery_baseline"]["missing"] == 0 and data["delivery_baseline"]["users"] == 12
    assert data["others_dropped"] == 0  # the other nodes' clients never noticed
    for line in data["timelines"].values():  # each one saw the close, then a survivor
        assert line["closed"] < line["welcome"] <= line["received"]
        assert line["node"] != data["victim"]
    assert len(data["machine"]["loadavg"]) == 3


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("kind", "receiver"), [("single", "lean"), ("batch", "sdk")], ids=["single-lean", "batch-sdk"]
)
def test_unicast_smoke_with_hops_delivers_each_message_once(
    tmp_path: Path, kind: str, receiver: str
) -> None:
    """A tiny paced phase with ``--hops``: every message delivered exactly once, in chain, and
    every hop from the send to the receiver's handler recorded (nodes included), with either
    receiver."""
    out, hops = tmp_path / "unicast.json", tmp_path / "hops"
    argv = ["bench", "unicast", "--only", kind, "--messages", "120", "--users", "6"]
    argv += ["--single-messages", "120", "--batch", "20", "--half-rate", "60", "--hops"]
    argv += ["--receiver", receiver, "--json", str(out)]
    env = {**os.environ, "MESHPUSH_BENCH_HOPS": str(hops)}
    done = subprocess.run(
        [sys.executable, "-m", "meshpush", *argv], env=env, timeout=300, capture_output=True
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()[-2000:]
    [phase] = json.loads(out.read_text())["phases"]
    assert phase["delivered"] == phase["messages"] == 60
    assert phase["missing"] == phase["duplicates"] == phase["errors"] == 0
    assert phase["chain_breaks"] == 0
    for hop in ("due->send", "send->http", "round->acked", "notify->owner", "read->handler"):
        assert phase["hops"]["hops"][hop]["n"] == 60, hop
    assert {p.name.split("-")[0] for p in hops.glob("*.jsonl")} == {
        "node",
        "generator",
        "receiver",
    }


def test_tracing_overhead_smoke_runs_every_path(capsys: pytest.CaptureFixture[str]) -> None:
    """The micro-bench drives the bus callback, the hub and the store's publish builder as the
    node does (it broke silently once when the callback became the link's synchronous one)."""
    assert main(["bench", "tracing-overhead", "--messages", "200", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for path in ("deliver", "receive", "store"):
        assert f"| {path} |" in out
