"""The servers a benchmark run measures: one meshpush node and the references, one interface.

A target listens on 127.0.0.1, greets every WebSocket connection with one text frame, and
broadcasts on request. meshpush is a real 1-node cluster (etcd + NATS JetStream from the venv's
wheels, via :class:`meshpush.local.devcluster.LocalCluster`) reached only through its public
contract: ``/ws`` with a token per session, ``POST /v1/broadcast`` and ``GET /metrics``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench._servers import Reference, Unavailable
from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster, free_port

ALL = ("meshpush", *Reference.KINDS)
#: a benchmark opens thousands of sessions from 127.0.0.1: lift the per-IP limits
NODE_SETTINGS: dict[str, Any] = {
    "max_connections_per_ip": 1_000_000,
    "max_connections": 1_000_000,
    "handshake_rate": 1_000_000.0,
    "handshake_burst": 1_000_000,
}


class Target(Protocol):
    name: str
    host: str

    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int: ...

    def paths(self, n: int, prefix: str) -> list[str]: ...
    def broadcast(self, count: int, size: int) -> None: ...
    def wait_done(self) -> None: ...


@dataclass
class MeshpushTarget:
    cluster: LocalCluster
    name: str = "meshpush"
    host: str = "127.0.0.1"
    port: int = 0
    pid: int = 0
    http: http.client.HTTPConnection | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        node = self.cluster.live()[0]
        ws = urlsplit(node.ws_url)
        self.port, self.pid = int(ws.port or 80), node.proc.pid
        self.ws_path = ws.path or "/ws"
        api = urlsplit(node.http_url)
        self.http = http.client.HTTPConnection(api.hostname or "127.0.0.1", api.port, timeout=30)

    def paths(self, n: int, prefix: str) -> list[str]:
        """One session per path: a distinct user each, with its own token."""
        secret = self.cluster.token_secret
        return [
            f"{self.ws_path}?token={issue_token(secret, f'{prefix}{i}', 3600)}&device=bench"
            for i in range(n)
        ]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        assert self.http is not None
        headers = {"authorization": f"Bearer {self.cluster.api_key}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        for attempt in (1, 2):  # one retry on a dropped keep-alive connection
            try:
                self.http.request(method, path, data, headers)
                resp = self.http.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, OSError):
                self.http.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def broadcast(self, count: int, size: int) -> None:
        """``count`` sequential ``POST /v1/broadcast`` calls on one keep-alive connection."""
        for seq in range(count):
            status, body = self.request("POST", "/v1/broadcast", {"data": "x" * size})
            if status != 202:
                raise RuntimeError(f"broadcast {seq}: {status} {body[:200]!r}")

    def wait_done(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}``."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode())


@dataclass
class ReferenceTarget:
    ref: Reference
    name: str
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ref.port

    @property
    def pid(self) -> int:
        return self.ref.pid

    def paths(self, n: int, prefix: str) -> list[str]:
        return [f"/{prefix}{i}" for i in range(n)]

    def broadcast(self, count: int, size: int) -> None:
        self.ref.broadcast(count, size)

    def wait_done(self) -> None:
        self.ref.wait_done()


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


@contextlib.contextmanager
def open_target(name: str, settings: dict[str, Any] | None = None) -> Iterator[Target]:
    """Start one target (raises :class:`Unavailable` if a reference cannot run here)."""
    if name == "meshpush":
        with (
            tempfile.TemporaryDirectory(prefix="meshpush-bench-") as tmp,
            LocalCluster(
                Path(tmp),
                nodes=1,
                cluster="bench",
                node_settings={**NODE_SETTINGS, **(settings or {})},
            ) as cluster,
        ):
            target = MeshpushTarget(cluster)
            try:
                yield target
            finally:
                if target.http is not None:
                    target.http.close()
        return
    if name not in Reference.KINDS:
        raise Unavailable(f"unknown server {name!r} (choose from {', '.join(ALL)})")
    ref = Reference(name, free_port())
    try:
        yield ReferenceTarget(ref, name)
    finally:
        ref.stop()


def each_server(
    bench: str, names: list[str], measure: Callable[[Target], dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Start each server in turn, measure it, stop it; a reference that cannot run here is
    skipped with the reason (results, skipped)."""
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in names:
        print(f"{bench}: {name} ...", file=sys.stderr, flush=True)
        try:
            with open_target(name) as target:
                results.append({"server": name, **measure(target)})
        except Unavailable as exc:
            print(f"{bench}: skipping {name}: {exc}", file=sys.stderr)
            skipped[name] = str(exc)
    return results, skipped


def add_ratios(
    results: list[dict[str, Any]], key: str, out: str = "vs_node_ws", base: str = "node-ws"
) -> None:
    """result[out] = result[key] / the base server's result[key] (None without the base, or
    where a value is 0: not measured, e.g. under one CPU clock tick)."""
    ref = next((r[key] for r in results if r["server"] == base), None)
    for r in results:
        r[out] = r[key] / ref if ref and r[key] else None


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def per_cpu(count: float, cpu: float) -> float:
    """``count`` per CPU second of the server (robust to a busy machine; 0 CPU: not measured)."""
    return count / cpu if cpu > 0 else 0.0


def parse_servers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return names


# ---------------------------------------------------------------- process and machine facts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_mib": mem,
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pastes straight into docs/performance.md)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)
