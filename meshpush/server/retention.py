"""Retention loss, made visible to the operator.

JetStream deletes a user's oldest messages beyond ``max_msgs_per_user`` and every message older
than ``max_message_age``. A device that comes back after that finds its resume point (its
cursor, or the client's ``last``) below the first message still stored: the delivery code
detects it as a break in the ``prev`` chain and sends the client a ``gap`` frame. This module
is what the operator sees of the same event: ``meshpush_retention_dropped_total{ch}`` rises by
the size of the gap and a ``retention:`` line is logged (sampled: at most a few per second).

The size is the gap's span of stream seqs ``last - first + 1``. It is exact for broadcasts (their
stream holds nothing else) and for a user whose messages were not interleaved with other users'
(or with the markers of atomic batches opened ahead) in the shared user stream; otherwise it is
an upper bound — deleted messages cannot be counted
per user afterwards. Either way a rising counter means devices lost messages they never got.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from meshpush.core.limits import SampledLog
from meshpush.core.stats import Tally, snapshot
from meshpush.observe.logs import SessionLike
from meshpush.observe.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RetentionStats:
    retention_dropped: Tally = field(default_factory=Tally)


class RetentionLosses:
    """Counts and logs messages deleted by retention before a known device received them."""

    def __init__(self, metrics: Metrics, log_per_second: int = 5) -> None:
        self.stats = RetentionStats()
        metrics.add_source(self)
        self.sampled = SampledLog(log, per_second=log_per_second)
        self.gaps = 0
        self.dropped = 0

    def statistics(self) -> RetentionStats:
        return snapshot(self.stats)

    def report(self, session: SessionLike, ch: str, first: int, last: int) -> int:
        """``session`` resumes on ``ch`` missing seqs ``first..last``: count, log, return the count.

        The log line names the session as logging shows every session (its id and a hash of the
        user id, never the id itself: meshpush.observe.logs)."""
        dropped = max(0, last - first + 1)
        self.gaps += 1
        self.dropped += dropped
        self.stats.retention_dropped[ch] += dropped
        self.sampled.log(
            trio.current_time(),
            "retention",
            "retention: %d %s message(s) (seq %d..%d) deleted before %r received them; "
            "raise max_msgs_per_user / max_message_age if this recurs",
            dropped,
            ch,
            first,
            last,
            session,
        )
        return dropped
