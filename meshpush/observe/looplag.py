"""Event-loop stall monitor: how long the trio loop failed to run a task that was due.

A task sleeps ``interval`` seconds again and again and measures by how much each wake-up was
late. Any stretch of code that runs without a checkpoint (a fan-out over many sessions, a big
JSON encode) shows up as a late wake-up of about its length. Exposed as
``meshpush_event_loop_stall_max_seconds`` (the longest stall over the last ``window`` seconds,
so a scrape every 15-30 s sees every stall) and the histogram
``meshpush_event_loop_stall_seconds`` of every late wake-up of a millisecond or more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from meshpush.core.stats import Buckets, snapshot
from meshpush.observe.metrics import LOOP_STALL_BUCKETS, Metrics

INTERVAL = 0.01
WINDOW = 30.0
#: wake-ups later than this are observed in the histogram (below: timer jitter)
NOTICE = 0.001


class StallWindow:
    """Sans-IO: the maximum of the samples of the last ``window`` seconds, in 1-second bins."""

    def __init__(self, window: float = WINDOW) -> None:
        self.bins: deque[tuple[int, float]] = deque()
        self.window = window

    def add(self, now: float, lag: float) -> None:
        second = int(now)
        if self.bins and self.bins[-1][0] == second:
            if lag > self.bins[-1][1]:
                self.bins[-1] = (second, lag)
        else:
            self.bins.append((second, lag))
        while self.bins and self.bins[0][0] <= second - self.window:
            self.bins.popleft()

    def max(self) -> float:
        return max((lag for _, lag in self.bins), default=0.0)


@dataclass(slots=True)
class LoopLagStats:
    """Late wake-ups; ``loop_stall_max`` is filled in by ``statistics()``."""

    loop_stall_max: float = 0.0
    loop_stall: Buckets = field(default_factory=lambda: Buckets(LOOP_STALL_BUCKETS))


class LoopLag:
    """The monitor task of one node (a service: ``nursery.start_soon(LoopLag(m).run)``)."""

    def __init__(
        self,
        metrics: Metrics,
        interval: float = INTERVAL,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.stats = LoopLagStats()
        metrics.add_source(self)
        self.interval = interval
        self.clock = clock
        self.window = StallWindow()

    def statistics(self) -> LoopLagStats:
        return snapshot(self.stats, loop_stall_max=self.window.max())

    def record(self, now: float, lag: float) -> None:
        lag = max(0.0, lag)
        self.window.add(now, lag)
        if lag >= NOTICE:
            self.stats.loop_stall.observe(lag)

    async def run(self) -> None:
        while True:
            start = self.clock()
            await trio.sleep(self.interval)
            now = self.clock()
            self.record(now, now - start - self.interval)
