"""The pure session state machine: heartbeat, token expiry, ack rules, frame budget, close
decisions and the slow-consumer rule, with a fake clock and no sockets."""

from __future__ import annotations

import json

import pytest

from meshpush.core.machine import CloseDecision, Limits, Outbound, SessionMachine
from meshpush.core.protocol import PONG, Close

LIMITS = Limits(
    heartbeat_interval=10.0,
    heartbeat_timeout=30.0,
    frame_rate=20.0,
    frame_burst=60,
    out_frames=4,
    out_bytes=1000,
    slow_grace=5.0,
)


def machine(token_deadline: float = 1_000.0, sent: int = 0) -> SessionMachine:
    m = SessionMachine(LIMITS, now=0.0, token_deadline=token_deadline)
    for feed in m.feeds.values():
        feed.start(sent)
    return m


def ack(seq: int, ch: str = "user") -> str:
    return json.dumps({"type": "ack", "ch": ch, "seq": seq})


def test_a_ping_is_due_every_interval_while_the_client_talks() -> None:
    m = machine()
    assert m.next_deadline() == 10.0
    assert not m.tick(9.9)
    assert m.tick(10.0)
    assert m.next_deadline() == 20.0
    m.heard(15.0)  # e.g. the pong
    assert m.tick(20.0)
    assert m.closing is None


def test_silence_past_the_heartbeat_timeout_closes_4408() -> None:
    m = machine()
    m.heard(5.0)
    m.tick(34.9)
    assert m.closing is None
    m.tick(35.0)
    assert m.closing == CloseDecision(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")
    assert m.closing.reconnect
    assert not m.tick(100.0)  # no pings for a closing session


def test_token_expiry_closes_4401_and_says_reconnect() -> None:
    m = machine(token_deadline=12.5)
    assert m.next_deadline() == 10.0
    m.tick(10.0)
    assert m.next_deadline() == 12.5
    m.tick(12.5)
    assert m.closing is not None and m.closing.code == Close.TOKEN_EXPIRED
    assert m.closing.reconnect


def test_client_ping_frame_is_answered_with_pong() -> None:
    m = machine()
    reply = m.receive('{"type":"ping"}', 1.0)
    assert reply.frames == (PONG,) and reply.close is None
    assert m.last_seen == 1.0


def test_acks_advance_the_cursor_and_are_free() -> None:
    m = machine(sent=0)
    m.feeds["user"].sent = 100_000
    now = 0.0
    for seq in range(1, 10_001):  # 1,000 acks a second for 10 s
        now = seq / 1000
        reply = m.receive(ack(seq), now)
        assert reply.acked and reply.close is None
    assert m.feeds["user"].acked == 10_000
    assert m.closing is None


def test_an_ack_beyond_what_was_sent_is_an_error_frame_not_a_close() -> None:
    m = machine(sent=5)
    reply = m.receive(ack(6), 1.0)
    assert reply.close is None and reply.error == "bad_ack"
    assert json.loads(reply.frames[0])["code"] == "bad_ack"
    assert m.feeds["user"].acked == 5


def test_repeated_acks_cost_like_any_frame() -> None:
    m = machine(sent=5)
    replies = [m.receive(ack(5, "broadcast"), 0.0) for _ in range(61)]
    assert all(not r.acked for r in replies)
    assert replies[-1].close == CloseDecision(Close.RATE_LIMITED, "too many frames")


def test_a_frame_flood_is_cut_with_4429() -> None:
    m = machine()
    closes = [m.receive('{"type":"ping"}', i / 1000).close for i in range(200)]
    assert any(c is not None and c.code == Close.RATE_LIMITED for c in closes)
    assert m.closing is not None and m.closing.reconnect


def test_bad_frames_cost_more_and_big_frames_cost_by_size() -> None:
    m = machine()
    for _ in range(15):
        assert m.receive('{"type":"nope"}', 0.0).error == "unknown_type"
    assert m.closing is None
    m.receive('{"type":"nope"}', 0.0)
    assert m.closing is not None and m.closing.code == Close.RATE_LIMITED
    big = machine()
    padding = " " * (16384 * 30)
    assert big.receive('{"type":"ping"}' + padding, 0.0).close is None  # costs 31
    assert big.receive('{"type":"ping"}' + padding, 0.0).close is not None  # 62 > 60


@pytest.mark.parametrize(
    ("frame", "code", "error", "reconnect"),
    [
        ("not json", Close.INVALID_DATA, "bad_json", True),
        (b"\x00binary", Close.POLICY, "binary_frame", False),
    ],
)
def test_malformed_frames_close_with_an_error_frame(
    frame: str | bytes, code: Close, error: str, reconnect: bool
) -> None:
    m = machine()
    reply = m.receive(frame, 0.0)
    assert reply.close is not None and reply.close.code == code
    assert reply.close.reconnect is reconnect
    assert reply.close.frame is not None and json.loads(reply.close.frame)["code"] == error


def test_the_first_close_decision_wins() -> None:
    m = machine()
    first = m.close(Close.REDIRECT, "owner", "redirect-frame")
    assert first is not None
    assert m.close(Close.SLOW_CONSUMER, "slow consumer") is None
    assert m.slow_consumer() is None
    assert m.closing == first


def test_outbound_over_the_bound_past_the_grace_is_a_slow_consumer() -> None:
    m = machine()
    for _ in range(5):  # one over the 4-frame bound: the grace clock starts
        assert m.queued(10, 1.0) is None
    assert m.outbound.over_since == 1.0
    assert m.next_deadline() == 6.0
    m.tick(6.0)
    assert m.closing is not None and m.closing.code == Close.SLOW_CONSUMER


def test_draining_below_the_bound_stops_the_grace_clock() -> None:
    m = machine()
    for _ in range(5):
        m.queued(10, 1.0)
    m.written(2, 20, 3.0)
    assert m.outbound.over_since is None
    m.tick(6.0)
    assert m.closing is None


def test_twice_the_bound_is_cut_at_once_in_frames_or_bytes() -> None:
    frames = Outbound()
    assert all(frames.queued(1, 0.0, LIMITS) for _ in range(8))
    assert not frames.queued(1, 0.0, LIMITS)  # 9 > 2 * 4
    sized = Outbound()
    assert sized.queued(1500, 0.0, LIMITS)  # over 1000 bytes: grace
    assert not sized.queued(600, 0.0, LIMITS)  # 2100 > 2 * 1000


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(slow_grace=0)
    with pytest.raises(ValueError):
        Limits(out_frames=0)
