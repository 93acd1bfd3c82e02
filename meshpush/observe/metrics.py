"""Prometheus metrics of one node, pulled from its components at scrape time.

Components count with plain ints and dicts (:mod:`meshpush.core.stats`) and answer ``statistics()``
with a typed snapshot whose field names are the ``attr`` of a family below; they never call
prometheus-client. :class:`Metrics` holds a registry of its own (no process globals) with one
custom collector that, on each scrape, reads every registered component's ``statistics()``,
sums the fields of the same name (components that feed one metric use distinct label values or
add up, e.g. ``backend_errors``), seeds the label values of ``KNOWN_LABELS`` at zero, and
yields the metric families.

Names, types, labels and help texts are stable: the Grafana dashboard and the alert rules in
the Helm chart use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from meshpush import __version__
from meshpush.core.stats import Buckets, HasStatistics

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
    "meshpush_store_atomic_batches_total": {"result": ("stored", "refused", "timeout")},
    "meshpush_store_chain_retries_total": {"kind": ("wrong_last", "hint_refresh")},
    "meshpush_store_batches_opened_ahead_total": {"result": ("used", "gone")},
    "meshpush_backend_errors_total": {
        "backend": (
            "etcd",
            "nats",
            "jetstream",
            "ip_filter",
            "replay",
            "stale_read",
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

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DELIVERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LOOP_STALL_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: the statistics field (``attr``) that feeds it, and how it is exported."""

    attr: str
    name: str
    help: str
    kind: Kind
    label: str | None = None
    buckets: tuple[float, ...] = ()


C: Final = "counter"
G: Final = "gauge"
H: Final = "histogram"

FAMILIES: tuple[Family, ...] = (
    Family("sessions", "meshpush_sessions", "Open client sessions on this node", G),
    Family("users", "meshpush_users", "Distinct users with a session here", G),
    Family(
        "handshakes", "meshpush_handshakes_total", "WebSocket handshakes by result", C, "result"
    ),
    Family("connections", "meshpush_connections", "Open WebSocket TCP connections (admitted)", G),
    Family(
        "rate_limited",
        "meshpush_rate_limited_total",
        "Clients refused or cut by a limit (handshake, connections, user_sessions, frames)",
        C,
        "kind",
    ),
    Family(
        "blocked", "meshpush_blocked_total", "Connections refused by the IP filter", C, "reason"
    ),
    Family("redirects", "meshpush_redirects_total", "Sessions redirected, by reason", C, "reason"),
    Family("closes", "meshpush_session_closes_total", "Sessions closed, by close code", C, "code"),
    Family(
        "session_errors",
        "meshpush_session_errors_total",
        "Sessions ended by an unexpected error (bugs)",
        C,
    ),
    Family(
        "frame_errors", "meshpush_frame_errors_total", "Bad client frames, by error code", C, "code"
    ),
    Family(
        "published", "meshpush_messages_published_total", "Messages accepted by the API", C, "ch"
    ),
    Family(
        "publish_errors",
        "meshpush_publish_errors_total",
        "Publishes refused or failed",
        C,
        "reason",
    ),
    Family(
        "api_errors",
        "meshpush_api_errors_total",
        "Unexpected HTTP API errors (bugs), answered with JSON 500",
        C,
        "path",
    ),
    Family("delivered", "meshpush_messages_delivered_total", "Frames queued to sessions", C, "ch"),
    Family(
        "dropped",
        "meshpush_notifications_dropped_total",
        "Live notifications dropped (queue full); recovered from the stream",
        C,
    ),
    Family(
        "replayed", "meshpush_messages_replayed_total", "Stored messages read for resumes", C, "ch"
    ),
    Family(
        "catch_ups",
        "meshpush_catch_ups_total",
        "Live sessions caught up from the stream, by cause",
        C,
        "reason",
    ),
    Family(
        "gaps",
        "meshpush_gaps_total",
        "Gaps (messages lost to retention) reported to clients",
        C,
        "ch",
    ),
    Family(
        "publish_latency",
        "meshpush_publish_seconds",
        "Time to store and notify one publish",
        H,
        buckets=PUBLISH_BUCKETS,
    ),
    Family(
        "delivery_latency",
        "meshpush_delivery_seconds",
        "Publish accepted -> frame queued on the owner",
        H,
        buckets=DELIVERY_BUCKETS,
    ),
    Family("members", "meshpush_cluster_nodes", "Nodes in this node's ring view", G),
    Family("owned_slots", "meshpush_owned_slots", "Slots this node owns", G),
    Family(
        "ring_changes",
        "meshpush_ring_changes_total",
        "Ring changes applied (a node joined or left this node's view)",
        C,
    ),
    Family(
        "backend_errors",
        "meshpush_backend_errors_total",
        "etcd/NATS errors, by backend",
        C,
        "backend",
    ),
    Family(
        "atomic_batches",
        "meshpush_store_atomic_batches_total",
        "Big publish requests sent as one JetStream atomic batch, by result: stored, refused"
        " (then stored in rounds), timeout (outcome unknown)",
        C,
        "result",
    ),
    Family(
        "opened_ahead",
        "meshpush_store_batches_opened_ahead_total",
        "Atomic batches sent into a batch this node opened ahead (used), and those the server"
        " no longer held (gone: sent again in a new one)",
        C,
        "result",
    ),
    Family(
        "chain_retries",
        "meshpush_store_chain_retries_total",
        "Publishes resent because another publisher moved the user's chain (wrong_last), and"
        " batches whose users' newest seqs were read again (hint_refresh)",
        C,
        "kind",
    ),
    Family(
        "presence_lookups",
        "meshpush_presence_lookups_total",
        "Users looked up: local, remote (asked an owner), failed (owner silent), answered"
        " (for another node)",
        C,
        "where",
    ),
    Family(
        "webhook_messages",
        "meshpush_webhook_messages_total",
        "Offline webhook messages: sent, reached (a live session got it in time, not sent),"
        " dropped_queue (queue full, oldest dropped), dropped_retries (receiver kept failing)",
        C,
        "result",
    ),
    Family(
        "webhook_requests",
        "meshpush_webhook_requests_total",
        "Offline webhook POSTs, by result (ok, or the status / error class)",
        C,
        "result",
    ),
    Family("webhook_queue", "meshpush_webhook_queue", "Messages held for the offline webhook", G),
    Family(
        "loop_stall_max",
        "meshpush_event_loop_stall_max_seconds",
        "Longest event-loop stall (late wake-up) over the last 30 s",
        G,
    ),
    Family(
        "loop_stall",
        "meshpush_event_loop_stall_seconds",
        "Event-loop stalls of 1 ms or more (late wake-ups of a 10 ms timer)",
        H,
        buckets=LOOP_STALL_BUCKETS,
    ),
    Family("ready", "meshpush_ready", "1 when /readyz answers 200", G),
    Family(
        "backend_up",
        "meshpush_backend_up",
        "1 while the backend answers round trips in time (nats) / holds our lease (etcd)",
        G,
        "backend",
    ),
    Family(
        "backend_rtt",
        "meshpush_backend_rtt_seconds",
        "Last successful round trip: NATS echo (nats), lease keepalive (etcd)",
        G,
        "backend",
    ),
    Family(
        "retention_dropped",
        "meshpush_retention_dropped_total",
        "Messages deleted by retention before a known device received them (seq span of gaps)",
        C,
        "ch",
    ),
)
BY_ATTR = {f.attr: f for f in FAMILIES}
_le: Callable[[float], str] = floatToGoString  # how prometheus-client writes a bound


class Metrics:
    """The node's registry: a process collector and the collector of its components."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.version = __version__
        self.sources: list[HasStatistics] = []
        self.registry = CollectorRegistry()
        LeanProcessCollector(registry=self.registry)  # process_resident_memory_bytes, ...
        self.registry.register(self)

    def add_source(self, component: HasStatistics) -> None:
        """Read ``component.statistics()`` on every scrape (its fields must name families).

        Components call this in their constructor; it does not call ``statistics()`` yet."""
        self.sources.append(component)

    def collect(self) -> Iterator[Metric]:
        """Called by the registry on each scrape: read every source now."""
        totals: dict[str, list[object]] = {}
        for source in self.sources:
            stats = source.statistics()
            for field in dataclasses.fields(stats):
                if field.name not in BY_ATTR:  # a typo; tests/test_metrics.py checks them all
                    raise ValueError(f"{type(source).__name__}: no metric for {field.name}")
                totals.setdefault(field.name, []).append(getattr(stats, field.name))
        for family in FAMILIES:
            yield export(family, totals.get(family.attr, []))
        info = GaugeMetricFamily("meshpush_node_info", "Node identity", labels=["node", "version"])
        info.add_metric([self.node_id, self.version], 1)
        yield info

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LeanProcessCollector(Collector):
    """prometheus-client's ``process_*`` metrics (same names and help), except that
    ``process_open_fds`` comes from one ``stat`` of ``/proc/self/fd`` (Linux >= 6.2 gives the
    count as the directory's size; older kernels: listed) instead of listing the directory:
    the listing stalled the event loop 8-15 ms per scrape at 10,000 sessions
    (docs/performance.md, "Event-loop stalls"). Without ``/proc``: no process metrics."""

    def __init__(self, registry: CollectorRegistry, proc: str = "/proc") -> None:
        self._proc = proc
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._boot = 0.0
        with contextlib.suppress(OSError, ValueError), open(f"{proc}/stat", "rb") as stat:
            self._boot = next(float(ln.split()[1]) for ln in stat if ln.startswith(b"btime "))
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        if not self._boot:
            return
        me = f"{self._proc}/self"
        with contextlib.suppress(OSError), open(f"{me}/stat", "rb") as stat:
            parts = stat.read().split(b")")[-1].split()
            for name, help_, value in (
                ("virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])),
                (
                    "resident_memory_bytes",
                    "Resident memory size in bytes.",
                    float(parts[21]) * self._page,
                ),
                (
                    "start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    float(parts[19]) / self._ticks + self._boot,
                ),
            ):
                yield GaugeMetricFamily(f"process_{name}", help_, value=value)
            yield CounterMetricFamily(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                value=(float(parts[11]) + float(parts[12])) / self._ticks,
            )
        with contextlib.suppress(OSError), open(f"{me}/limits", "rb") as limits:
            line = next((ln for ln in limits if ln.startswith(b"Max open file")), None)
            if line is not None:
                yield GaugeMetricFamily(
                    "process_max_fds",
                    "Maximum number of open file descriptors.",
                    value=float(line.split()[3]),
                )
        with contextlib.suppress(OSError):
            count = os.stat(f"{me}/fd").st_size or len(os.listdir(f"{me}/fd"))
            yield GaugeMetricFamily(
                "process_open_fds", "Number of open file descriptors.", value=float(count)
            )


def export(family: Family, values: list[object]) -> Metric:
    """One family from the values its sources gave (summed), known label values at zero."""
    if family.kind == "histogram":
        return _histogram(family, values)
    cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    if family.label is None:
        return cls(family.name, family.help, value=sum(_number(v) for v in values))
    metric = cls(family.name, family.help, labels=[family.label])
    known = KNOWN_LABELS.get(family.name, {}).get(family.label, ())
    by_value: dict[str, float] = dict.fromkeys(known, 0)
    for value in values:
        if not isinstance(value, Mapping):
            raise TypeError(f"{family.attr}: a mapping of {family.label} expected, got {value!r}")
        for label, count in value.items():
            by_value[label] = by_value.get(label, 0) + count
    for label, count in by_value.items():
        metric.add_metric([label], count)
    return metric


def _histogram(family: Family, values: list[object]) -> Metric:
    total = Buckets(family.buckets)
    for value in values:
        if not isinstance(value, Buckets):
            raise TypeError(f"{family.attr}: Buckets expected, got {value!r}")
        total.add(value)
    cumulative, running = [], 0
    for bound, count in zip((*family.buckets, float("inf")), total.counts, strict=True):
        running += count
        cumulative.append((_le(bound), float(running)))
    metric = HistogramMetricFamily(family.name, family.help)
    metric.add_metric([], cumulative, sum_value=total.sum)
    return metric


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a number expected, got {value!r}")
    return value
