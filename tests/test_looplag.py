"""The event-loop stall monitor's pure parts, with a fake clock (no sleeping)."""

from __future__ import annotations

import trio
from prometheus_client import generate_latest

from meshpush.observe.looplag import LoopLag, StallWindow
from meshpush.observe.metrics import Metrics


def test_window_keeps_the_max_of_the_last_window_seconds() -> None:
    w = StallWindow(window=3)
    assert w.max() == 0.0
    w.add(100.2, 0.002)
    w.add(100.7, 0.050)
    w.add(101.5, 0.001)
    assert w.max() == 0.050
    w.add(102.9, 0.003)
    assert w.max() == 0.050
    w.add(103.1, 0.0)  # the bin of second 100 has left the window
    assert w.max() == 0.003
    w.add(200.0, 0.0)  # a long gap empties it
    assert w.max() == 0.0


def test_record_sets_the_gauge_and_observes_stalls_over_a_millisecond() -> None:
    metrics = Metrics("n1")
    lag = LoopLag(metrics, clock=lambda: 0.0)
    lag.record(10.0, 0.0004)  # timer jitter: gauge only
    lag.record(10.5, 0.120)
    lag.record(11.0, -0.001)  # early wake-ups count as no stall
    text = generate_latest(metrics.registry).decode()
    assert "meshpush_event_loop_stall_max_seconds 0.12" in text
    assert "meshpush_event_loop_stall_seconds_count 1.0" in text
    assert 'meshpush_event_loop_stall_seconds_bucket{le="0.1"} 0.0' in text
    assert 'meshpush_event_loop_stall_seconds_bucket{le="0.25"} 1.0' in text


async def test_run_measures_late_wake_ups(autojump_clock: trio.abc.Clock) -> None:
    seen: list[float] = []
    clock_values = iter([0.0, 0.01, 0.02, 0.25, 0.3])  # the 2nd sleep woke 0.22 s late

    with trio.CancelScope() as scope:

        class Probe(LoopLag):
            def record(self, now: float, lag: float) -> None:
                seen.append(round(lag, 6))
                if len(seen) == 2:
                    scope.cancel()  # the monitor runs forever otherwise

        await Probe(Metrics("n1"), interval=0.01, clock=lambda: next(clock_values)).run()
    assert seen == [0.0, 0.22]
