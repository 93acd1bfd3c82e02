"""Rate limiters, counters, IP filters and sampled logs: pure, with time passed in."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meshpush.core.limits import (
    Counter,
    FilterError,
    IpFilter,
    KeyedBuckets,
    SampledLog,
    TokenBucket,
    origin_allowed,
)
from meshpush.observe.metrics import Metrics
from meshpush.server.listener import Doorman, Refusal
from meshpush.settings import Settings


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert bucket.take(100.0)  # refills, but never above the burst
    assert bucket.tokens == pytest.approx(2.0)


def test_keyed_buckets_are_per_key_and_bounded() -> None:
    buckets = KeyedBuckets(rate=1.0, burst=1, size=3)
    assert buckets.take("a", 0.0) == (True, 0.0)
    allowed, wait = buckets.take("a", 0.0)
    assert not allowed and wait == pytest.approx(1.0)
    assert buckets.take("b", 0.0)[0]
    for key in "cdef":
        buckets.take(key, 0.0)
    assert len(buckets) == 3  # oldest keys evicted


def test_counter_caps_per_key_and_total() -> None:
    counter = Counter(per_key=2, total=3)
    assert counter.acquire("a") is None and counter.acquire("a") is None
    assert counter.acquire("a") == "per_key"
    assert counter.acquire("b") is None
    assert counter.acquire("c") == "total"
    counter.release("a")
    counter.release("zzz")  # unknown keys are ignored
    assert counter.count("a") == 1 and counter.total == 2


def test_ip_filter_block_wins_and_allow_restricts() -> None:
    f = IpFilter.parse("# comment\nallow 10.0.0.0/8\nallow ::1\nblock 10.6.6.0/24  # bad\n\n")
    assert f.verdict("10.1.2.3") is None
    assert f.verdict("10.6.6.7") == "blocked"
    assert f.verdict("192.168.1.1") == "not_allowed"
    assert f.verdict("::1") is None
    assert f.verdict("::ffff:10.1.2.3") is None  # IPv4-mapped IPv6
    assert f.verdict("not an ip") == "blocked"
    assert IpFilter().verdict("1.2.3.4") is None


@pytest.mark.parametrize("text", ["allow", "permit 1.2.3.4", "block 300.1.1.1", "allow 1.2.3.4/99"])
def test_ip_filter_rejects_bad_lines(text: str) -> None:
    with pytest.raises(FilterError, match="line 1"):
        IpFilter.parse(text)


def test_sampled_log_limits_lines_per_second(caplog: pytest.LogCaptureFixture) -> None:
    sampled = SampledLog(logging.getLogger("t"), per_second=2)
    with caplog.at_level(logging.WARNING):
        results = [sampled.log(10.1, "r", "x") for _ in range(5)] + [sampled.log(11.0, "r", "y")]
    assert results == [True, True, False, False, False, True]
    assert sampled.suppressed == 3
    assert len(caplog.records) == 3


def test_origin_allowlist() -> None:
    assert origin_allowed(None, ["https://a"])
    assert origin_allowed("https://A/", ["https://a"])
    assert not origin_allowed("https://b", ["https://a"])
    assert origin_allowed("https://b", [])


def test_refusal_is_a_complete_http_response() -> None:
    raw = Refusal(429, "rate_limited", "slow down", 3).http()
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests")
    assert b"Retry-After: 3" in head and f"Content-Length: {len(body)}".encode() in head
    assert body == b'{"error": "rate_limited", "detail": "slow down"}'


def test_doorman_refuses_to_start_with_a_broken_filter_file(tmp_path: Path) -> None:
    bad = tmp_path / "filter"
    bad.write_text("allow nonsense\n")
    settings = Settings(node_id="n", ip_filter_file=str(bad))
    with pytest.raises(ValueError, match="cannot be loaded"):
        Doorman(settings, Metrics("n"))
    bad.write_text("block 10.0.0.0/8\n")
    assert Doorman(settings, Metrics("n")).filter.verdict("10.0.0.1") == "blocked"
