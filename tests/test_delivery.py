"""The per-session feed: replay then live, exact prev chains, gaps, no unbounded buffers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshpush.observe.metrics import Metrics
from meshpush.server.delivery import MAX_PENDING, BadResume, Feed, Feeder, Gap, Verdict
from meshpush.settings import Settings


@dataclass(frozen=True)
class N:
    seq: int
    prev: int


def live_feed(sent: int) -> Feed:
    feed = Feed(sent)
    assert feed.finish() == ([], True)
    return feed


def test_live_in_order_and_duplicates_dropped() -> None:
    feed = live_feed(10)
    assert feed.live(N(12, 10)) is Verdict.DELIVER
    assert feed.live(N(12, 10)) is Verdict.DROP
    assert feed.live(N(5, 3)) is Verdict.DROP
    assert feed.live(N(15, 12)) is Verdict.DELIVER
    assert feed.sent == 15


def test_a_missed_notification_triggers_a_catch_up() -> None:
    feed = live_feed(10)
    assert feed.live(N(20, 15)) is Verdict.CATCH_UP  # 15 never arrived
    assert feed.replaying
    assert not feed.catch_up()  # already replaying
    assert feed.replayed(N(15, 10)) == (True, None)
    assert feed.replayed(N(20, 15)) == (True, None)
    assert feed.finish() == ([], True)


def test_replay_reports_retention_gaps_exactly() -> None:
    feed = Feed(10)
    assert feed.replayed(N(30, 25)) == (True, Gap(11, 25))  # 11..25 expired
    assert feed.replayed(N(31, 30)) == (True, None)
    chain_restarted = Feed(40)
    assert chain_restarted.replayed(N(50, 0)) == (True, Gap(41, 49))  # everything had expired


def test_a_fresh_device_accepts_any_first_prev_without_a_gap() -> None:
    feed = Feed(0, fresh=True)
    assert feed.replayed(N(7, 3)) == (True, None)
    assert not feed.fresh
    assert feed.replayed(N(9, 7)) == (True, None)


def test_backlog_skip_passes_over_the_oldest() -> None:
    feed = Feed(0, fresh=True, skip=2)
    assert [feed.replayed(N(s, p))[0] for s, p in [(1, 0), (2, 1), (3, 2), (4, 3)]] == [
        False,
        False,
        True,
        True,
    ]


def test_notifications_during_replay_are_released_in_order() -> None:
    feed = Feed(10)
    assert feed.live(N(14, 12)) is Verdict.BUFFER
    assert feed.live(N(12, 10)) is Verdict.BUFFER
    assert feed.live(N(9, 8)) is Verdict.BUFFER  # older than the resume point
    released, live = feed.finish()
    assert [n.seq for n in released] == [12, 14] and live
    assert feed.sent == 14


def test_an_out_of_chain_buffered_notification_forces_a_re_read() -> None:
    feed = Feed(10)
    feed.live(N(12, 10))
    feed.live(N(16, 14))  # 14 is stored but its hint has not arrived
    released, live = feed.finish()
    assert [n.seq for n in released] == [12] and not live
    assert feed.replayed(N(14, 12)) == (True, None)
    assert feed.replayed(N(16, 14)) == (True, None)
    assert feed.finish() == ([], True)


def test_the_replay_buffer_is_bounded() -> None:
    feed = Feed(0)
    for i in range(1, MAX_PENDING + 50):
        assert feed.live(N(i, i - 1)) is Verdict.BUFFER
    assert feed.pending is not None and len(feed.pending) == MAX_PENDING
    assert feed.finish() == ([], False)  # dropped hints: read the stream again
    assert feed.pending is None and not feed.overflow


def test_start_keeps_what_was_buffered() -> None:
    feed = Feed()
    feed.live(N(5, 0))
    feed.start(0, fresh=True)
    released, live = feed.finish()
    assert [n.seq for n in released] == [5] and live


class _StoreWithEnd:
    """Just enough of a Store for the resume-position check: the stream's end, right now."""

    def __init__(self, end: int) -> None:
        self.end = end
        self.reads = 0

    async def end_seq(self, ch: str) -> int:
        self.reads += 1
        return self.end


def _feeder(store: _StoreWithEnd) -> Feeder:
    return Feeder(Settings(), store, None, Metrics("t"))  # type: ignore[arg-type]


async def test_a_position_beyond_a_stale_shared_end_is_checked_again() -> None:
    """A handshake that joined an earlier handshake's read of the stream's end may see an end
    from before the client's last message was stored: that is no reason to refuse it."""
    store = _StoreWithEnd(5524)
    await _feeder(store)._check_position("user", 5524, known_end=5523)
    assert store.reads == 1
    await _feeder(store)._check_position("user", 5000, known_end=5523)
    assert store.reads == 1  # within the shared end: no second read


async def test_a_position_beyond_the_real_end_is_refused() -> None:
    store = _StoreWithEnd(5523)
    with pytest.raises(BadResume, match="beyond the end"):
        await _feeder(store)._check_position("user", 5600, known_end=5523)
