"""Retention losses are counted per message and logged (sampled), without servers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from meshpush.observe.logs import Redactor
from meshpush.observe.metrics import Metrics
from meshpush.server.retention import RetentionLosses


@dataclass
class Session:
    id: int
    user: str


def dropped(metrics: Metrics, ch: str) -> float:
    return metrics.registry.get_sample_value("meshpush_retention_dropped_total", {"ch": ch}) or 0


async def test_a_gap_counts_every_lost_seq_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("n1")
    losses = RetentionLosses(metrics)
    caplog.set_level(logging.WARNING, logger="meshpush.server.retention")
    caplog.handler.addFilter(Redactor(()))  # as the node's log handler does
    alice = Session(7, "alice@example.com")
    assert losses.report(alice, "user", 3, 12) == 10
    assert losses.report(alice, "broadcast", 40, 40) == 1
    assert (dropped(metrics, "user"), dropped(metrics, "broadcast")) == (10, 1)
    assert (losses.gaps, losses.dropped) == (2, 11)
    first = caplog.records[0].msg
    assert first.startswith(
        "retention: 10 user message(s) (seq 3..12) deleted before <Session 7 user#"
    )
    assert "alice" not in first  # sessions are logged by id and user hash only


async def test_logging_is_sampled_but_counting_is_not(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("n1")
    losses = RetentionLosses(metrics, log_per_second=3)
    caplog.set_level(logging.WARNING, logger="meshpush.server.retention")
    for i in range(100):
        losses.report(Session(i, f"u{i}"), "user", 1, 2)
    assert dropped(metrics, "user") == 200
    assert len(caplog.records) <= 6  # at most 3 a second (the loop may straddle a second)
    assert losses.sampled.suppressed >= 94
