"""Prometheus metrics of one node, on a registry of its own (no process globals).

Names are stable: the Grafana dashboard and the alert rules in the Helm chart use them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class Metrics:
    """All metrics of a node. Code elsewhere calls these attributes; nothing else registers."""

    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total
        self.sessions = Gauge("meshpush_sessions", "Open client sessions on this node", registry=r)
        self.users = Gauge("meshpush_users", "Distinct users with a session here", registry=r)
        self.handshakes = Counter(
            "meshpush_handshakes_total", "WebSocket handshakes by result", ["result"], registry=r
        )
        self.connections = Gauge(
            "meshpush_connections", "Open WebSocket TCP connections (admitted)", registry=r
        )
        self.rate_limited = Counter(
            "meshpush_rate_limited_total",
            "Clients refused or cut by a limit (handshake, connections, user_sessions, frames)",
            ["kind"],
            registry=r,
        )
        self.blocked = Counter(
            "meshpush_blocked_total",
            "Connections refused by the IP filter",
            ["reason"],
            registry=r,
        )
        self.redirects = Counter(
            "meshpush_redirects_total", "Sessions redirected, by reason", ["reason"], registry=r
        )
        self.closes = Counter(
            "meshpush_session_closes_total", "Sessions closed, by close code", ["code"], registry=r
        )
        self.session_errors = Counter(
            "meshpush_session_errors_total",
            "Sessions ended by an unexpected error (bugs)",
            registry=r,
        )
        self.frame_errors = Counter(
            "meshpush_frame_errors_total", "Bad client frames, by error code", ["code"], registry=r
        )
        self.published = Counter(
            "meshpush_messages_published_total", "Messages accepted by the API", ["ch"], registry=r
        )
        self.publish_errors = Counter(
            "meshpush_publish_errors_total", "Publishes refused or failed", ["reason"], registry=r
        )
        self.api_errors = Counter(
            "meshpush_api_errors_total",
            "Unexpected HTTP API errors (bugs), answered with JSON 500",
            ["path"],
            registry=r,
        )
        self.delivered = Counter(
            "meshpush_messages_delivered_total", "Frames queued to sessions", ["ch"], registry=r
        )
        self.dropped = Counter(
            "meshpush_notifications_dropped_total",
            "Live notifications dropped (queue full); recovered from the stream",
            registry=r,
        )
        self.replayed = Counter(
            "meshpush_messages_replayed_total",
            "Stored messages read for resumes",
            ["ch"],
            registry=r,
        )
        self.catch_ups = Counter(
            "meshpush_catch_ups_total",
            "Live sessions caught up from the stream, by cause",
            ["reason"],
            registry=r,
        )
        self.gaps = Counter(
            "meshpush_gaps_total",
            "Gaps (messages lost to retention) reported to clients",
            ["ch"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "meshpush_publish_seconds",
            "Time to store and notify one publish",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.delivery_latency = Histogram(
            "meshpush_delivery_seconds",
            "Publish accepted -> frame queued on the owner",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.members = Gauge("meshpush_cluster_nodes", "Nodes in this node's ring view", registry=r)
        self.owned_slots = Gauge("meshpush_owned_slots", "Slots this node owns", registry=r)
        self.ring_changes = Counter("meshpush_ring_changes_total", "Ring views applied", registry=r)
        self.backend_errors = Counter(
            "meshpush_backend_errors_total",
            "etcd/NATS errors, by backend",
            ["backend"],
            registry=r,
        )
        self.ready = Gauge("meshpush_ready", "1 when /readyz answers 200", registry=r)
        self.info = Gauge("meshpush_node_info", "Node identity", ["node"], registry=r)
        self.info.labels(node=node_id).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
