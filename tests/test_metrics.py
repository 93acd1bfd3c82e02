"""The metrics collector with fake components: pulled at scrape time, known labels at zero,
summed across components, histograms from own bucket counts, and the node's version."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshpush
from meshpush.backends.bus import BusStats
from meshpush.backends.membership import MembershipStats
from meshpush.backends.store import StoreStats
from meshpush.core.stats import Buckets, Tally, snapshot
from meshpush.observe.looplag import LoopLagStats
from meshpush.observe.metrics import BY_ATTR, DELIVERY_BUCKETS, KNOWN_LABELS, Metrics
from meshpush.server.api import ApiStats
from meshpush.server.delivery import FeederStats
from meshpush.server.gateway import GatewayStats
from meshpush.server.hub import HubStats
from meshpush.server.listener import DoormanStats
from meshpush.server.node import NodeStats
from meshpush.server.presence import PresenceStats
from meshpush.server.retention import RetentionStats
from meshpush.server.router import RouterStats
from meshpush.server.sessions import SessionStats
from meshpush.server.webhook import WebhookStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@dataclass(slots=True)
class FakeStats:
    sessions: int = 0
    handshakes: Tally = field(default_factory=Tally)
    backend_errors: Tally = field(default_factory=Tally)
    session_errors: int = 0
    delivery_latency: Buckets = field(default_factory=lambda: Buckets(DELIVERY_BUCKETS))
    backend_up: dict[str, float] = field(default_factory=dict)


class FakeComponent:
    def __init__(self, metrics: Metrics) -> None:
        self.stats = FakeStats()
        self.open = 0  # a gauge read when scraped
        self.reads = 0
        metrics.add_source(self)

    def statistics(self) -> FakeStats:
        self.reads += 1
        return snapshot(self.stats, sessions=self.open)


def test_values_are_read_at_scrape_time_not_when_counted() -> None:
    metrics = Metrics("n1")
    component = FakeComponent(metrics)
    assert component.reads == 0, "registering does not read"
    component.stats.handshakes["accepted"] += 2
    component.stats.session_errors += 1
    component.open = 7
    first = scrape(metrics)
    assert component.reads == 1
    assert value(first, "meshpush_handshakes_total", result="accepted") == 2
    assert value(first, "meshpush_session_errors_total") == 1
    assert value(first, "meshpush_sessions") == 7
    component.stats.handshakes["accepted"] += 1
    component.open = 3
    second = scrape(metrics)
    assert value(second, "meshpush_handshakes_total", result="accepted") == 3
    assert value(second, "meshpush_sessions") == 3


def test_components_feeding_one_metric_are_summed() -> None:
    metrics = Metrics("n1")
    one, two = FakeComponent(metrics), FakeComponent(metrics)
    one.stats.backend_errors["nats"] += 2
    two.stats.backend_errors["nats"] += 3
    two.stats.backend_errors["etcd"] += 1
    one.stats.backend_up["nats"] = 1.0
    two.stats.backend_up["etcd"] = 0.0
    samples = scrape(metrics)
    assert value(samples, "meshpush_backend_errors_total", backend="nats") == 5
    assert value(samples, "meshpush_backend_errors_total", backend="etcd") == 1
    assert value(samples, "meshpush_backend_up", backend="nats") == 1.0
    assert value(samples, "meshpush_backend_up", backend="etcd") == 0.0


def test_known_label_values_are_at_zero_and_new_values_appear_on_first_count() -> None:
    metrics = Metrics("n1")
    component = FakeComponent(metrics)
    samples = scrape(metrics)
    for name, labels in KNOWN_LABELS.items():
        for label, values in labels.items():
            for v in values:
                assert value(samples, name, **{label: v}) == 0, (name, v)
    assert value(samples, "meshpush_handshakes_total", result="bad_token") is None
    component.stats.handshakes["bad_token"] += 1
    assert value(scrape(metrics), "meshpush_handshakes_total", result="bad_token") == 1


def test_histogram_from_own_buckets_is_cumulative_and_le_is_inclusive() -> None:
    metrics = Metrics("n1")
    one, two = FakeComponent(metrics), FakeComponent(metrics)
    for latency in (0.0004, 0.001, 0.003):
        one.stats.delivery_latency.observe(latency)
    two.stats.delivery_latency.observe(5.0)  # beyond the last bound: +Inf only
    samples = scrape(metrics)
    bucket = "meshpush_delivery_seconds_bucket"
    assert value(samples, bucket, le="0.0005") == 1
    assert value(samples, bucket, le="0.001") == 2  # 0.001 <= le="0.001"
    assert value(samples, bucket, le="0.0025") == 2
    assert value(samples, bucket, le="0.005") == 3
    assert value(samples, bucket, le="1.0") == 3
    assert value(samples, bucket, le="+Inf") == 4
    assert value(samples, "meshpush_delivery_seconds_count") == 4
    assert value(samples, "meshpush_delivery_seconds_sum") == pytest.approx(5.0044)


def test_node_info_carries_the_node_and_the_version() -> None:
    samples = scrape(Metrics("n7"))
    assert value(samples, "meshpush_node_info", node="n7", version=meshpush.__version__) == 1


def test_process_metrics_count_open_file_descriptors_exactly() -> None:
    metrics = Metrics("n1")
    names = ("virtual_memory_bytes", "resident_memory_bytes", "start_time_seconds", "max_fds")
    before = scrape(metrics)
    for name in names:
        assert (value(before, f"process_{name}") or 0) > 0
    assert value(before, "process_cpu_seconds_total") is not None
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(25)]
    try:
        after = scrape(metrics)
    finally:
        for fd in opened:
            os.close(fd)
    fds = value(before, "process_open_fds")
    assert fds is not None and value(after, "process_open_fds") == fds + 25


def test_snapshot_is_a_copy() -> None:
    stats = FakeStats()
    stats.handshakes["accepted"] = 1
    copy = snapshot(stats, sessions=4)
    stats.handshakes["accepted"] += 1
    stats.delivery_latency.observe(0.1)
    assert copy.handshakes["accepted"] == 1 and copy.delivery_latency.count == 0
    assert copy.sessions == 4 and stats.sessions == 0


@pytest.mark.parametrize(
    "stats",
    [
        ApiStats,
        BusStats,
        DoormanStats,
        FeederStats,
        GatewayStats,
        HubStats,
        LoopLagStats,
        MembershipStats,
        NodeStats,
        PresenceStats,
        RetentionStats,
        RouterStats,
        SessionStats,
        StoreStats,
        WebhookStats,
    ],
)
def test_every_field_of_every_component_names_a_metric_of_its_kind(stats: type) -> None:
    for f in dataclasses.fields(stats):
        family = BY_ATTR.get(f.name)
        assert family is not None, f"{stats.__name__}.{f.name}: no metric of that attr"
        default = getattr(stats(), f.name)
        if family.kind == "histogram":
            assert isinstance(default, Buckets) and default.bounds == family.buckets
        elif family.label is not None:
            assert isinstance(default, dict), f"{stats.__name__}.{f.name}: label {family.label}"
        else:
            assert isinstance(default, int | float), f"{stats.__name__}.{f.name}"


def test_a_field_naming_no_metric_fails_the_scrape_loudly() -> None:
    @dataclass
    class Typo:
        handshake: int = 0

    class Bad:
        def statistics(self) -> Typo:
            return Typo()

    metrics = Metrics("n1")
    metrics.add_source(Bad())
    with pytest.raises(ValueError, match="handshake"):
        metrics.render()


def test_buckets_of_different_bounds_do_not_add() -> None:
    with pytest.raises(ValueError):
        Buckets((1.0,)).add(Buckets((2.0,)))
