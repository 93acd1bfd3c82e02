"""Retention losses are counted per message and logged (sampled), without servers."""

from __future__ import annotations

import logging

import pytest

from meshpush.metrics import Metrics
from meshpush.retention import RetentionLosses


def dropped(metrics: Metrics, ch: str) -> float:
    return metrics.registry.get_sample_value("meshpush_retention_dropped_total", {"ch": ch}) or 0


async def test_a_gap_counts_every_lost_seq_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("n1")
    losses = RetentionLosses(metrics)
    caplog.set_level(logging.WARNING, logger="meshpush.retention")
    assert losses.report("user", "alice", "phone", 3, 12) == 10
    assert losses.report("broadcast", "alice", "phone", 40, 40) == 1
    assert (dropped(metrics, "user"), dropped(metrics, "broadcast")) == (10, 1)
    assert (losses.gaps, losses.dropped) == (2, 11)
    first = caplog.records[0].getMessage()
    assert first.startswith("retention: 10 user message(s) (seq 3..12)")
    assert "'phone'" in first and "'alice'" in first


async def test_logging_is_sampled_but_counting_is_not(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("n1")
    losses = RetentionLosses(metrics, log_per_second=3)
    caplog.set_level(logging.WARNING, logger="meshpush.retention")
    for i in range(100):
        losses.report("user", f"u{i}", "d", 1, 2)
    assert dropped(metrics, "user") == 200
    assert len(caplog.records) <= 6  # at most 3 a second (the loop may straddle a second)
    assert losses.sampled.suppressed >= 94
