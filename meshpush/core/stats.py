"""Plain counters that components keep on their hot paths, read by the metrics collector.

A component counts with ints and dicts (a few tens of nanoseconds an event) and answers
``statistics()`` with a typed snapshot, trio-style; :mod:`meshpush.observe.metrics` reads every
component's snapshot only when Prometheus scrapes. The field names of a snapshot are the
names of the metrics they feed (see ``meshpush.observe.metrics.FAMILIES``):

* ``int`` / ``float`` — an unlabelled counter or gauge;
* ``Tally`` (a ``collections.Counter`` of label value -> count) — a counter with one label,
  or a gauge with one label (``dict[str, float]``);
* ``Buckets`` — a histogram's own bucket counts.

Nothing here is shared across threads: the event loop counts and the same loop renders
``/metrics``.
"""

from __future__ import annotations

import collections
import dataclasses
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Tally: TypeAlias = collections.Counter[str]
"""Counts by label value: ``tally[value] += n`` (a missing value counts from 0)."""


class Buckets:
    """A histogram's counts by upper bound (``le``, inclusive) plus ``+Inf``, and their sum.

    ``observe`` is one bisect and two additions; the collector makes them cumulative at scrape
    time. The bounds are the metric's (``meshpush.observe.metrics``), so the histogram reads the
    same.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> Buckets:
        twin = Buckets(self.bounds)
        twin.counts = list(self.counts)
        twin.sum = self.sum
        return twin

    def add(self, other: Buckets) -> None:
        if other.bounds != self.bounds:
            raise ValueError(f"bucket bounds differ: {other.bounds} != {self.bounds}")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)


class HasStatistics(Protocol):
    """A component the metrics collector reads: ``statistics()`` returns a dataclass."""

    def statistics(self) -> DataclassInstance: ...


S = TypeVar("S", bound="DataclassInstance")


def snapshot(stats: S, **gauges: object) -> S:
    """A copy of a component's counters (a dataclass) with ``gauges`` read now filled in."""
    fields = dataclasses.fields(stats)
    copied: dict[str, Any] = {f.name: _copy(getattr(stats, f.name)) for f in fields}
    copied.update(gauges)
    return dataclasses.replace(stats, **copied)


def _copy(value: object) -> object:
    if isinstance(value, Buckets):
        return value.copy()
    if isinstance(value, dict):
        return type(value)(value)
    return value
