"""The CLI guards mistakes: option help names defaults and MESHPUSH_* variables, `dev` takes
node settings from the environment and --set, `status` prints the cluster, and `listen` says
on stderr what its connection is doing (clearly so when no node answers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from meshpush import cli
from meshpush.client import State
from meshpush.core.auth import issue_token
from meshpush.local.devcluster import free_port
from meshpush.settings import env_name


def meshpush(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshpush", *args]


def subparser(name: str) -> Any:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


# ---------------------------------------------------------------- help


def test_every_node_option_names_its_default_and_variable() -> None:
    options = [a for a in subparser("node")._actions if a.dest != "help"]
    assert len(options) > 40
    for action in options:
        assert "default: " in action.help, action.dest
        assert f"env {env_name(action.dest)})" in action.help, action.dest
    text = subparser("node").format_help()  # argparse %-formats helps: none may break it
    assert "MESHPUSH_HEARTBEAT_INTERVAL" in text


@pytest.mark.parametrize("command", ["dev", "status", "token", "listen"])
def test_options_of_my_commands_name_their_defaults(command: str) -> None:
    for action in subparser(command)._actions:
        if action.dest == "help" or action.required or action.default in (None, False, []):
            continue
        assert "default" in (action.help or ""), (command, action.dest)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "--user", ""], "user must be 1..256 bytes"),
        (["token", "--user", "a\nb"], "user must not contain control characters"),
        (["token", "--user", "a", "--ttl", "-5"], "positive number of seconds"),
        (["token", "--user", "a", "--ttl", "nan"], "positive number of seconds"),
        (["listen", "--user", "a", "--device", "x" * 257], "device must be 1..256 bytes"),
        (["listen", "--user", "a", "--count", "-1"], "must be >= 0"),
        (["dev", "--nodes", "0"], "must be 1..32"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- dev settings


def test_dev_takes_settings_from_env_then_set() -> None:
    env = {
        "MESHPUSH_HEARTBEAT_INTERVAL": "5",
        "MESHPUSH_MAX_FRAME_BYTES": "1234",
        "MESHPUSH_ALLOWED_ORIGINS": "http://a, http://b",
        "MESHPUSH_WS_PORT": "9999",  # chosen by dev itself: ignored
        "PATH": "/bin",
    }
    got = cli.dev_overrides(env, ["heartbeat-interval=7", "backlog_user=0"])
    assert got == {
        "heartbeat_interval": 7.0,
        "max_frame_bytes": 1234,
        "allowed_origins": ("http://a", "http://b"),
        "backlog_user": 0,
    }


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("heartbeat_intreval=5", "did you mean heartbeat_interval"),
        ("heartbeat_interval", "expected NAME=VALUE"),
        ("ws_port=1", "meshpush dev sets ws_port itself"),
        ("heartbeat_interval=soon", "bad value for heartbeat_interval"),
    ],
)
def test_dev_refuses_bad_settings_before_starting_anything(
    assignment: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dev", "--dir", str(tmp_path), "--set", assignment]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dev_secrets_and_cluster_name_go_to_the_cluster() -> None:
    args = cli._dev_cluster_args({"token_secret": "s", "api_keys": ("k1", "k2"), "cluster": "c"})
    assert args["token_secret"] == "s" and args["api_key"] == "k1" and args["cluster"] == "c"
    assert args["node_settings"]["api_keys"] == ("k1", "k2")


# ---------------------------------------------------------------- status and listen, no cluster


def test_status_formats_each_node() -> None:
    view = {"self": "n1", "nodes": []}
    members = [
        {"id": "n1", "slots": 2000, "ws_url": "ws://127.0.0.1:1/ws"},
        {"id": "n2", "slots": 2096, "ws_url": "ws://127.0.0.1:2/ws"},
    ]
    own = [{"ready": True, "sessions": 3, "users": 2}, {"error": "connection refused"}]
    text = cli.format_status(view, list(zip(members, own, strict=True)))
    lines = text.splitlines()
    assert lines[0] == "2 nodes (view of n1)"
    assert lines[2].split()[:5] == ["n1", "ready", "2000", "3", "2"]
    assert lines[3].split()[:5] == ["n2", "unreachable", "2096", "-", "-"]
    assert lines[4].split() == ["total", "4096", "3", "2"]


def test_status_says_when_it_cannot_reach_the_cluster(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the cluster" in err and url in err


def test_listen_reports_each_change_once(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = cli.ListenReporter(["ws://a/ws", "ws://b/ws"], Path("dev.json"))
    client = SimpleNamespace(node="n1", device="cli", stats=SimpleNamespace(last_error=""))
    reporter.client = client  # type: ignore[assignment]
    client.stats.last_error = "OSError(111)"
    for state in [State.BACKING_OFF, State.CONNECTING, State.BACKING_OFF, State.CONNECTING]:
        reporter.on_state(state)
    reporter.on_state(State.ONLINE)
    client.stats.last_error = "ConnectionClosed(1006)"
    reporter.on_state(State.CONNECTING)  # the node died: straight to another node
    client.node = "n2"
    reporter.on_state(State.ONLINE)
    reporter.on_state(State.REDIRECTING)  # migrated
    reporter.on_state(State.ONLINE)
    reporter.on_state(State.CLOSED)
    lines = [
        line.removeprefix("meshpush listen: ") for line in capsys.readouterr().err.splitlines()
    ]
    assert lines == [
        "connection failed (OSError(111)); retrying",
        "cannot reach the cluster: none of the 2 node(s) in dev.json answers (last error: "
        "OSError(111)). Is `meshpush dev` running? Still retrying; Ctrl-C stops.",
        "connected to node n1 (device cli)",
        "left node n1 (ConnectionClosed(1006)); reconnecting",
        "connected to node n2 (device cli)",
        "left node n2 (redirected); reconnecting",
        "connected to node n2 (device cli)",
    ]


def dead_dev_json(path: Path, nodes: int = 2) -> Path:
    ports = [free_port() for _ in range(nodes)]
    info = {
        "cluster": "dead",
        "api_key": "k",
        "token_secret": "s",
        "nodes": [
            {"id": f"n{i}", "ws_url": f"ws://127.0.0.1:{p}/ws", "http_url": f"http://127.0.0.1:{p}"}
            for i, p in enumerate(ports)
        ],
    }
    path.write_text(json.dumps(info))
    return path


def stderr_until(proc: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    """stderr lines of ``proc`` up to the first containing ``text`` (bounded)."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stderr.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line:
            lines.append(line)
            if text in line:
                return lines
        else:
            time.sleep(0.05)
    raise AssertionError(f"{text!r} not in stderr after {timeout}s: {lines}")


def test_listen_says_it_cannot_reach_the_cluster(tmp_path: Path) -> None:
    config = dead_dev_json(tmp_path / "dev.json")
    proc = subprocess.Popen(
        meshpush("listen", "--user", "a", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = stderr_until(proc, "cannot reach the cluster", timeout=30)
        assert "connecting to 2 node(s)" in lines[0]
        assert any("retrying" in line for line in lines[1:])
        assert "Is `meshpush dev` running?" in lines[-1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- against `meshpush dev`


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`meshpush dev --nodes 2` configured by one MESHPUSH_* variable and one --set."""
    state = tmp_path_factory.mktemp("dev")
    env = {**os.environ, "MESHPUSH_HEARTBEAT_TIMEOUT": "9", "MESHPUSH_LEASE_TTL": "2"}
    out = state / "dev.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            meshpush("dev", "--nodes", "2", "--dir", str(state), "--set", "heartbeat_interval=7"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 90
        while not (state / "dev.json").exists():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "dev.json never appeared"
            time.sleep(0.1)
        info = json.loads((state / "dev.json").read_text())
        yield info | {"path": state / "dev.json", "out": out}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.cluster
async def test_dev_nodes_use_env_and_set(dev: dict[str, Any]) -> None:
    """The welcome shows the node's heartbeat settings: --set 7 and MESHPUSH_ 9."""
    deadline = time.monotonic() + 10  # printed just after dev.json is written
    while "  set " not in dev["out"].read_text() and time.monotonic() < deadline:
        await trio.sleep(0.05)
    summary = next(line for line in dev["out"].read_text().splitlines() if "  set " in line)
    for shown in ("heartbeat_interval=7.0", "heartbeat_timeout=9.0", "lease_ttl=2"):
        assert shown in summary
    url = dev["nodes"][0]["ws_url"]
    for _ in range(2):  # the first node may redirect to the owner
        token = issue_token(dev["token_secret"], "setting-check", 60)
        with trio.fail_after(15):
            async with open_websocket_url(f"{url}?token={token}&device=d") as ws:
                frame = json.loads(await ws.get_message())
        if frame["type"] == "welcome":
            assert frame["heartbeat"] == {"interval": 7.0, "timeout": 9.0}
            return
        url = frame["url"]
    raise AssertionError(f"no welcome: {frame}")


@pytest.mark.cluster
def test_status_prints_the_cluster(dev: dict[str, Any]) -> None:
    done = subprocess.run(
        meshpush("status", "--config", str(dev["path"])), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 nodes")
    ids = [line.split()[0] for line in lines[2:]]
    assert ids == [n["id"] for n in dev["nodes"]] + ["total"]
    assert lines[-1].split()[1] == "4096"  # every slot has an owner
    as_json = subprocess.run(
        meshpush("status", "--json", "--url", dev["nodes"][1]["http_url"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert [n["self"] for n in json.loads(as_json.stdout)] == [n["id"] for n in dev["nodes"]]


@pytest.mark.cluster
def test_listen_reports_connected_and_prints_messages(dev: dict[str, Any]) -> None:
    proc = subprocess.Popen(
        meshpush("listen", "--user", "lis", "--count", "1", "--config", str(dev["path"])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = stderr_until(proc, "connected to node", timeout=30)
        assert "connecting to 2 node(s)" in lines[0]
        resp = httpx.post(
            dev["nodes"][0]["http_url"] + "/v1/publish",
            json={"user": "lis", "data": {"hi": 1}},
            headers={"authorization": f"Bearer {dev['api_key']}"},
            timeout=10,
        )
        assert resp.status_code == 202, resp.text
        out, _ = proc.communicate(timeout=30)
        assert json.loads(out)["data"] == {"hi": 1}
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
