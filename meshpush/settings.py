"""One typed settings object for a node, filled from defaults, ``MESHPUSH_*`` env vars and flags.

Every field is documented in ``docs/operations.md``; the precedence is flag > env > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from meshpush.core.limits import CidrSet

ENV_PREFIX = "MESHPUSH_"


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to know, with the documented defaults."""

    node_id: str = field(default_factory=_default_node_id, metadata={"help": "unique node id"})
    cluster: str = field(default="meshpush", metadata={"help": "cluster name (etcd prefix)"})
    ws_host: str = field(default="127.0.0.1", metadata={"help": "WebSocket listen address"})
    ws_port: int = field(default=8800, metadata={"help": "WebSocket listen port (0 = any)"})
    http_host: str = field(default="127.0.0.1", metadata={"help": "HTTP API listen address"})
    http_port: int = field(default=8900, metadata={"help": "HTTP API listen port (0 = any)"})
    public_ws_url: str = field(
        default="", metadata={"help": "ws URL clients are redirected to (default: from listen)"}
    )
    public_http_url: str = field(
        default="", metadata={"help": "HTTP URL shown in /v1/nodes (default: from listen)"}
    )
    etcd: str = field(
        default="127.0.0.1:2379",
        metadata={"help": "etcd endpoint host:port, or several comma separated (failover)"},
    )
    nats_url: str = field(
        default="nats://127.0.0.1:4222",
        metadata={"help": "NATS server URL, or several comma separated (one cluster)"},
    )
    token_secret: str = field(default="", metadata={"help": "HS256 secret for client tokens"})
    api_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "publisher API keys, comma separated"}
    )
    lease_ttl: int = field(default=3, metadata={"help": "etcd lease TTL in seconds"})
    peer_probe: bool = field(
        default=True,
        metadata={
            "help": "when clients report a node unreachable (avoid=), probe its HTTP port and "
            "revoke its lease if it refuses connections twice (a dead process)"
        },
    )
    nats_check_interval: float = field(
        default=1.0, metadata={"help": "seconds between NATS round-trip checks (readiness)"}
    )
    nats_check_timeout: float = field(
        default=2.0, metadata={"help": "a NATS round trip slower than this makes the node unready"}
    )
    heartbeat_interval: float = field(
        default=25.0, metadata={"help": "seconds between server WebSocket pings"}
    )
    heartbeat_timeout: float = field(
        default=60.0, metadata={"help": "close a session silent this long (4408)"}
    )
    drain_window: float = field(
        default=2.0, metadata={"help": "seconds over which redirects are spread on migration"}
    )
    drain_timeout: float = field(
        default=15.0, metadata={"help": "longest a SIGTERM drain waits for sessions to leave"}
    )
    max_frame_bytes: int = field(
        default=65536, metadata={"help": "largest inbound WebSocket frame (1009 above)"}
    )
    max_body_bytes: int = field(
        default=262144, metadata={"help": "largest HTTP API body (413 above)"}
    )
    max_batch: int = field(
        default=1000,
        metadata={"help": "most messages in a batch publish / users in a multi-user publish"},
    )
    session_queue: int = field(
        default=1024,
        metadata={"help": "outbound frames buffered for one session before it is slow (4008)"},
    )
    session_buffer_bytes: int = field(
        default=4 << 20,
        metadata={"help": "outbound bytes buffered for one session before it is slow (4008)"},
    )
    slow_consumer_grace: float = field(
        default=5.0,
        metadata={"help": "seconds a session may stay over its outbound bound before 4008"},
    )
    handshake_timeout: float = field(
        default=10.0, metadata={"help": "seconds a client has to finish the WebSocket handshake"}
    )
    max_message_age: float = field(
        default=7 * 24 * 3600.0, metadata={"help": "stored message retention in seconds"}
    )
    max_msgs_per_user: int = field(
        default=1000, metadata={"help": "stored messages kept per user (oldest dropped)"}
    )
    duplicate_window: float = field(
        default=120.0, metadata={"help": "seconds a publish id deduplicates retries"}
    )
    stream_replicas: int = field(default=1, metadata={"help": "JetStream stream replicas"})
    live_republish: bool = field(
        default=True,
        metadata={
            "help": "JetStream republishes each stored unicast to its owner (off: the"
            " publishing node notifies it); the same on every node"
        },
    )
    atomic_batches: bool = field(
        default=True,
        metadata={
            "help": "a big publish request with several messages per user goes as one JetStream"
            " atomic batch where the server allows it (off: in rounds)"
        },
    )
    backlog_user: int = field(
        default=-1,
        metadata={"help": "stored user messages a brand-new device gets: -1 all, 0 none, N last N"},
    )
    backlog_broadcast: int = field(
        default=0,
        metadata={"help": "stored broadcasts a brand-new device gets: -1 all, 0 none, N last N"},
    )
    cursor_flush_interval: float = field(
        default=1.0, metadata={"help": "seconds between batched cursor (ack) writes"}
    )
    token_old_secrets: tuple[str, ...] = field(
        default=(),
        metadata={"help": "previous HS256 secrets still accepted (rotation), comma separated"},
    )
    token_public_key_file: str = field(
        default="", metadata={"help": "PEM public key for RS256/ES256 client tokens"}
    )
    token_jwks_file: str = field(
        default="", metadata={"help": "JWKS file (keys chosen by kid) for RS256/ES256 tokens"}
    )
    token_audience: str = field(default="", metadata={"help": "required token aud (empty: none)"})
    token_issuer: str = field(default="", metadata={"help": "required token iss (empty: none)"})
    token_leeway: float = field(
        default=10.0, metadata={"help": "seconds of clock skew allowed on exp/nbf/iat"}
    )
    tls_cert_file: str = field(
        default="", metadata={"help": "PEM certificate chain: serve wss:// and https://"}
    )
    tls_key_file: str = field(default="", metadata={"help": "PEM private key for tls_cert_file"})
    protect_metrics: bool = field(
        default=False, metadata={"help": "require an API key on GET /metrics"}
    )
    handshake_rate: float = field(
        default=20.0, metadata={"help": "WebSocket handshakes per second per client IP"}
    )
    handshake_burst: int = field(
        default=40, metadata={"help": "handshakes a client IP may make in a burst"}
    )
    max_connections_per_ip: int = field(
        default=1000, metadata={"help": "open WebSocket connections per client IP"}
    )
    max_connections: int = field(
        default=100_000, metadata={"help": "open WebSocket connections per node (503 above)"}
    )
    max_http_connections: int = field(
        default=1024, metadata={"help": "open HTTP API connections per node (503 above)"}
    )
    max_sessions_per_user: int = field(
        default=32, metadata={"help": "concurrent sessions per user on its owner (429 above)"}
    )
    frame_rate: float = field(
        default=20.0, metadata={"help": "inbound frames per second per session (4429 above)"}
    )
    frame_burst: int = field(default=60, metadata={"help": "inbound frames in a burst"})
    ip_filter_file: str = field(
        default="", metadata={"help": "file of 'allow <cidr>'/'block <cidr>' lines (reloaded)"}
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "CIDRs of proxies believed about the client address (PROXY header, "
            "X-Forwarded-For), comma separated (empty: trust nobody)"
        },
    )
    proxy_protocol: bool = field(
        default=False,
        metadata={
            "help": "a connection from trusted_proxies must start with a PROXY protocol v1/v2 "
            "header (others are served as they are)"
        },
    )
    refuse_after_upgrade: bool = field(
        default=True,
        metadata={
            "help": "answer handshake refusals (token, origin, limits) after the upgrade with an "
            "error frame and a 44xx close a browser can read; off: HTTP statuses, no auth frame"
        },
    )
    allowed_origins: tuple[str, ...] = field(
        default=(), metadata={"help": "browser Origins allowed, comma separated (empty: any)"}
    )
    presence_timeout: float = field(
        default=2.0, metadata={"help": "seconds to wait for another owner's presence answer"}
    )
    offline_webhook_url: str = field(
        default="", metadata={"help": "POST undelivered user messages here (empty: off)"}
    )
    offline_webhook_secret: str = field(
        default="", metadata={"help": "HMAC-SHA256 key of X-Meshpush-Signature"}
    )
    offline_webhook_delay: float = field(
        default=10.0, metadata={"help": "seconds a message may wait for a live session"}
    )
    offline_webhook_queue: int = field(
        default=10000, metadata={"help": "messages held for the webhook (oldest dropped)"}
    )
    offline_webhook_batch: int = field(
        default=100, metadata={"help": "messages per webhook request"}
    )
    offline_webhook_retries: int = field(
        default=5, metadata={"help": "retries of a failed webhook request, then dropped"}
    )
    offline_webhook_backoff: float = field(
        default=0.5, metadata={"help": "first retry delay in seconds (doubles, capped at 30)"}
    )
    offline_webhook_timeout: float = field(
        default=5.0, metadata={"help": "seconds one webhook request may take"}
    )
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    log_format: str = field(
        default="text", metadata={"help": "log lines: text, or json (one object per line)"}
    )

    def __post_init__(self) -> None:
        CidrSet.parse(self.trusted_proxies)  # a bad CIDR: ValueError naming the value
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "bad value for proxy_protocol: it needs trusted_proxies (the peers that send "
                "the PROXY header)"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        return self.public_ws_url or f"{scheme}://{_urlhost(self.ws_host)}:{self.ws_port}/ws"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return self.public_http_url or f"{scheme}://{_urlhost(self.http_host)}:{self.http_port}"

    @property
    def etcd_endpoints(self) -> list[tuple[str, int]]:
        """Every configured etcd endpoint as (host, port), in the order given."""
        return [_host_port(part) for part in _split(self.etcd)]

    @property
    def etcd_host_port(self) -> tuple[str, int]:
        return self.etcd_endpoints[0]

    @property
    def nats_servers(self) -> list[str]:
        """Every configured NATS server URL (members of one cluster), in the order given."""
        return _split(self.nats_url)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _urlhost(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
    "": False,
}


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        if raw.strip().lower() not in _BOOLS:
            raise ValueError(raw)
        return _BOOLS[raw.strip().lower()]
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per settings field (default None: env and defaults fill the rest).

    Each help names the field's default and its ``MESHPUSH_*`` variable."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        about = f.metadata.get("help", f.name)
        if about.endswith(")") and "(default: " in about:  # the help explains its default
            text = f"{about[:-1]}; env {env_name(f.name)})"
        else:
            text = f"{about} (default: {_shown_default(f)}; env {env_name(f.name)})"
        parser.add_argument(flag, dest=f.name, default=None, help=text.replace("%", "%%"))


def env_name(name: str) -> str:
    """The environment variable of a settings field: ``MESHPUSH_<FIELD>``."""
    return ENV_PREFIX + name.upper()


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default is dataclasses.MISSING:
        return "<hostname>-<random>" if f.name == "node_id" else "computed"
    value = f.default
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value == "" else str(value)


def from_sources(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build settings: flag > ``MESHPUSH_<FIELD>`` env > default; bad values raise ValueError."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is not None:
            try:
                values[f.name] = _convert(f, str(raw))
            except ValueError:
                raise ValueError(f"bad value for {f.name}: {raw!r}") from None
    return Settings(**values)


def env_for(settings: Settings, names: Sequence[str] | None = None) -> dict[str, str]:
    """The ``MESHPUSH_*`` env vars that reproduce ``settings`` (used to start node processes)."""
    out: dict[str, str] = {}
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        value = getattr(settings, f.name)
        out[env_name(f.name)] = ",".join(value) if isinstance(value, tuple) else str(value)
    return out
