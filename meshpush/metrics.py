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

# Label values known in advance: their series are created at zero when a node starts, so a quiet
# or broken node shows 0 instead of "No data", and rate() sees the very first event (an alert on
# "every publish failed since start" needs the success series to exist at 0). Other values (for
# example the code of a refused handshake) still appear on their first event.
KNOWN_LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "meshpush_handshakes_total": {"result": ("accepted", "redirect")},
    "meshpush_redirects_total": {"reason": ("owner", "draining", "unavailable")},
    "meshpush_session_closes_total": {
        "code": ("1000", "1001", "1007", "1008", "1009", "4008", "4302", "4401", "4408", "4429")
    },
    "meshpush_frame_errors_total": {
        "code": ("binary_frame", "bad_json", "bad_frame", "unknown_type", "bad_ack")
    },
    "meshpush_messages_published_total": {"ch": ("user", "broadcast")},
    "meshpush_publish_errors_total": {
        "reason": (
            "store_unavailable",
            "store_timeout",
            "no_ring",
            "bad_json",
            "bad_body",
            "bad_user",
            "bad_id",
            "unknown_field",
            "missing_field",
            "too_large",
            "too_many",
            "bad_messages",
            "bad_users",
            "missing_api_key",
            "invalid_api_key",
        )
    },
    "meshpush_messages_delivered_total": {"ch": ("user", "broadcast")},
    "meshpush_messages_replayed_total": {"ch": ("user", "broadcast")},
    "meshpush_catch_ups_total": {"reason": ("prev", "reconnect")},
    "meshpush_gaps_total": {"ch": ("user", "broadcast")},
    "meshpush_retention_dropped_total": {"ch": ("user", "broadcast")},
    "meshpush_rate_limited_total": {
        "kind": ("handshake", "connections", "user_sessions", "frames")
    },
    "meshpush_blocked_total": {"reason": ("blocked", "not_allowed")},
    "meshpush_backend_errors_total": {
        "backend": (
            "etcd",
            "nats",
            "jetstream",
            "ip_filter",
            "replay",
            "cursor_read",
            "cursor_write",
            "asyncio",
            "bad_notification",
            "notify",
            "bad_presence",
            "webhook",
        )
    },
    "meshpush_presence_lookups_total": {"where": ("local", "remote", "failed", "answered")},
    "meshpush_webhook_requests_total": {"result": ("ok",)},
    "meshpush_webhook_messages_total": {
        "result": ("sent", "reached", "dropped_queue", "dropped_retries")
    },
}


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
        self.ring_changes = Counter(
            "meshpush_ring_changes_total",
            "Ring changes applied (a node joined or left this node's view)",
            registry=r,
        )
        self.backend_errors = Counter(
            "meshpush_backend_errors_total",
            "etcd/NATS errors, by backend",
            ["backend"],
            registry=r,
        )
        self.presence_lookups = Counter(
            "meshpush_presence_lookups_total",
            "Users looked up: local, remote (asked an owner), failed (owner silent), answered"
            " (for another node)",
            ["where"],
            registry=r,
        )
        self.webhook_messages = Counter(
            "meshpush_webhook_messages_total",
            "Offline webhook messages: sent, reached (a live session got it in time, not sent),"
            " dropped_queue (queue full, oldest dropped), dropped_retries (receiver kept failing)",
            ["result"],
            registry=r,
        )
        self.webhook_requests = Counter(
            "meshpush_webhook_requests_total",
            "Offline webhook POSTs, by result (ok, or the status / error class)",
            ["result"],
            registry=r,
        )
        self.webhook_queue = Gauge(
            "meshpush_webhook_queue", "Messages held for the offline webhook", registry=r
        )
        self.loop_stall_max = Gauge(
            "meshpush_event_loop_stall_max_seconds",
            "Longest event-loop stall (late wake-up) over the last 30 s",
            registry=r,
        )
        self.loop_stall = Histogram(
            "meshpush_event_loop_stall_seconds",
            "Event-loop stalls of 1 ms or more (late wake-ups of a 10 ms timer)",
            registry=r,
            buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.ready = Gauge("meshpush_ready", "1 when /readyz answers 200", registry=r)
        self.backend_up = Gauge(
            "meshpush_backend_up",
            "1 while the backend answers round trips in time (nats) / holds our lease (etcd)",
            ["backend"],
            registry=r,
        )
        self.backend_rtt = Gauge(
            "meshpush_backend_rtt_seconds",
            "Last successful round trip: NATS echo (nats), lease keepalive (etcd)",
            ["backend"],
            registry=r,
        )
        self.retention_dropped = Counter(
            "meshpush_retention_dropped_total",
            "Messages deleted by retention before a known device received them (seq span of gaps)",
            ["ch"],
            registry=r,
        )
        self.info = Gauge("meshpush_node_info", "Node identity", ["node"], registry=r)
        self.info.labels(node=node_id).set(1)
        self._create_known_series()

    def _create_known_series(self) -> None:
        for metric in vars(self).values():
            known = KNOWN_LABELS.get(getattr(metric, "_name", "") + "_total", {})
            for label, values in known.items():
                for value in values:
                    metric.labels(**{label: value})

    def render(self) -> bytes:
        return generate_latest(self.registry)
