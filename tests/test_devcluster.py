"""`meshpush dev` as a user runs it: up, publish/listen round trip, Ctrl-C, nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def meshpush(*args: str, **kwargs: object) -> list[str]:
    return [sys.executable, "-m", "meshpush", *args]


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "meshpush dev exited early"
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError("dev.json never appeared")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_dev_round_trip_and_clean_exit(tmp_path: Path, stop_signal: int) -> None:
    state = tmp_path / "state"
    dev = subprocess.Popen(
        meshpush("dev", "--nodes", "2", "--dir", str(state)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    listen = None
    try:
        info = wait_for(state / "dev.json", dev)
        assert {"cluster", "etcd", "nats", "api_key", "token_secret", "nodes"} <= set(info)
        assert all({"id", "ws_url", "http_url", "pid"} <= set(n) for n in info["nodes"])
        config = ["--config", str(state / "dev.json")]
        token = subprocess.run(
            meshpush("token", "--user", "zoe", *config),
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        assert token.count(".") == 2
        listen = subprocess.Popen(
            meshpush("listen", "--user", "zoe", "--count", "1", *config),
            stdout=subprocess.PIPE,
            text=True,
        )
        seq = None
        for _ in range(50):  # publish until the listener is connected and prints it
            seq = subprocess.run(
                meshpush("publish", "--user", "zoe", '{"x": 1}', *config),
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            try:
                out, _ = listen.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        line = json.loads(out.splitlines()[0])
        assert line["data"] == {"x": 1}
        assert line["ch"] == "user"
        assert int(seq) >= 1
        pids = [n["pid"] for n in info["nodes"]] + [info["etcd_pid"], info["nats_pid"]]
        assert all(alive(p) for p in pids)
        dev.send_signal(stop_signal)
        assert dev.wait(40) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "meshpush dev left processes behind"
        assert not (state / "dev.json").exists()
    finally:
        for proc in (listen, dev):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("kind", ["nats", "etcd"])
def test_a_backend_port_taken_before_it_is_bound_gets_new_ports(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """free_port() only says a port was free when it was chosen: another process may take it
    before the server binds it. The cluster then starts that backend again on new ports."""
    import socket

    from meshpush.local.devcluster import LocalCluster

    cluster = LocalCluster(tmp_path, nodes=0, backends="clustered")
    member = (cluster.nats_members if kind == "nats" else cluster.etcd_members)[0]
    taken = member.monitor_port or member.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert (member.monitor_port or member.port) != taken
            assert all(m.alive() for m in cluster.backend_members())
            with socket.create_connection(("127.0.0.1", member.port), timeout=5):
                pass
    assert f"{kind}: a port was taken before it was bound" in caplog.text


def test_a_node_port_taken_before_it_is_bound_gets_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for a node: the first port handed to it is taken; it exits ("Address already
    in use") and starts again, same id, on new ports."""
    import socket

    from meshpush.local import devcluster

    real = devcluster.free_port
    with socket.socket() as squatter, devcluster.LocalCluster(tmp_path, nodes=0) as cluster:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed: list[int] = []

        def first_one_taken() -> int:
            handed.append(taken if not handed else real())
            return handed[-1]

        monkeypatch.setattr(devcluster, "free_port", first_one_taken)
        node = cluster.start_node()
        assert node.id == "n1" and node.proc.alive()
        assert taken not in (node.settings.ws_port, node.settings.http_port)
        assert [n.id for n in cluster.live()] == ["n1"]
    assert "n1: a port was taken before it was bound" in caplog.text


def test_a_proxy_port_taken_before_it_is_bound_gets_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for a node's fault proxy (the chaos suite's): the first port handed to the
    proxy of its NATS link is taken, so the proxy exits and starts again on new ports; a
    port that answers is not taken for a proxy that listens (it says so)."""
    import socket

    from meshpush.local import devcluster
    from meshpush.settings import Settings

    real = devcluster.free_port
    armed: list[bool] = []
    with (
        socket.socket() as squatter,
        devcluster.LocalCluster(tmp_path, nodes=0, proxied=True) as cluster,
    ):
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        settings_for = cluster.settings_for

        def settings_then_arm(node_id: str) -> Settings:
            settings = settings_for(node_id)
            armed.append(True)  # the next port handed out is the proxies' first
            return settings

        def taken_when_armed() -> int:
            return taken if armed and armed.pop() else real()

        monkeypatch.setattr(cluster, "settings_for", settings_then_arm)
        monkeypatch.setattr(devcluster, "free_port", taken_when_armed)
        node = cluster.start_node()
        assert node.proc.alive() and all(p.alive() for p in node.proxies.values())
        assert f":{taken}" not in node.settings.nats_url
    assert "n1-proxy-nats: a port was taken before it was bound" in caplog.text
