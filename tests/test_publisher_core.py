"""The publisher SDK's sans-IO core: retries with the same id, failover, batches (no server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meshpush.core.protocol import retry_after
from meshpush.publisher import (
    Attempt,
    Failed,
    Published,
    Publisher,
    PublishError,
    _attempt,
    _Core,
    _Plan,
    _Post,
    _Reply,
    _Sleep,
)

Answer = Callable[[_Post], _Reply]


def drive(plan: _Plan[Any], answer: Answer) -> tuple[Any, list[_Post]]:
    """Run a plan against ``answer``; return its result and the requests it made."""
    posts: list[_Post] = []
    reply: _Reply | None = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, _Sleep):
                assert 0 <= step.seconds <= 2.0
                reply = None
            else:
                posts.append(step)
                reply = answer(step)
    except StopIteration as done:
        return done.value, posts


def reply(status: int, body: dict[str, Any]) -> _Reply:
    return _Reply(status, json.dumps(body).encode())


def stored(post: _Post, seq: int = 7) -> _Reply:
    sent = json.loads(post.body)
    return reply(202, {"seq": seq, "duplicate": False, "id": sent["id"]})


def test_a_timeout_then_a_504_are_retried_with_the_same_id_on_the_next_nodes() -> None:
    answers = iter(
        [
            lambda p: _Reply(error="ReadTimeout"),
            lambda p: reply(504, {"error": "store_timeout", "detail": "unknown"}),
            stored,
        ]
    )
    core = _Core(["http://a", "http://b", "http://c"], retries=4, backoff=0.01, max_batch=10)
    result, posts = drive(
        core.publish("/v1/publish", {"user": "u", "data": 1, "id": None}),
        lambda p: next(answers)(p),
    )
    assert isinstance(result, Published) and result.seq == 7
    assert [p.url for p in posts] == [f"http://{n}/v1/publish" for n in "abc"]
    ids = {json.loads(p.body)["id"] for p in posts}
    assert len(ids) == 1  # one id made up before the first attempt, kept by every retry


def test_a_publisher_mistake_is_not_retried() -> None:
    core = _Core("http://a", retries=4, backoff=0.01, max_batch=10)
    plan = core.publish("/v1/publish", {"user": "", "data": 1, "id": "x"})
    with pytest.raises(PublishError) as err:
        drive(plan, lambda p: reply(400, {"error": "bad_user", "detail": "empty"}))
    assert (err.value.status, err.value.code, err.value.retryable) == (400, "bad_user", False)


def test_retries_are_bounded() -> None:
    core = _Core(["http://a", "http://b"], retries=2, backoff=0.01, max_batch=10)
    plan = core.publish("/v1/broadcast", {"data": 1, "id": "x"})
    with pytest.raises(PublishError) as err:
        drive(plan, lambda p: _Reply(error="ConnectError"))
    assert err.value.code == "unreachable" and err.value.outcome_unknown


def test_publish_many_splits_batches_and_retries_only_retryable_items() -> None:
    rounds: list[list[str]] = []

    def answer(post: _Post) -> _Reply:
        items = json.loads(post.body)["messages"]
        rounds.append([m["id"] for m in items])
        first_round = len(rounds) <= 2
        results = [
            {"error": "store_timeout", "detail": "?"}
            if first_round and m.get("data") == 1
            else {"error": "bad_user", "detail": "empty"}
            if m["user"] == ""
            else {"seq": 10 + m["data"], "duplicate": False, "id": m["id"]}
            for m in items
        ]
        return reply(202, {"results": results})

    core = _Core("http://a", retries=3, backoff=0.01, max_batch=2)
    messages = [{"user": "u", "data": i, "id": f"m{i}"} for i in range(3)] + [{"user": ""}]
    results, _ = drive(core.publish_many(messages), answer)
    assert rounds == [["m0", "m1"], ["m2", results[3].id], ["m1"]]  # 2 per batch; m1 retried
    assert [r.seq for r in results[:3]] == [10, 11, 12]
    assert isinstance(results[3], Failed) and results[3].code == "bad_user"


def test_nan_is_refused_before_anything_is_sent() -> None:
    core = _Core("http://a", retries=1, backoff=0.01, max_batch=10)
    with pytest.raises(ValueError):
        drive(core.publish("/v1/publish", {"user": "u", "data": float("nan")}), stored)


def test_broadcast_many_sends_batches_and_retries_with_the_same_ids() -> None:
    rounds: list[list[str]] = []

    def answer(post: _Post) -> _Reply:
        assert post.url == "http://a/v1/broadcast"
        items = json.loads(post.body)["messages"]
        assert all(set(m) == {"data", "id"} for m in items)
        rounds.append([m["id"] for m in items])
        results = [
            {"error": "store_unavailable", "detail": "?"}
            if len(rounds) == 1 and m["data"] == "b"
            else {"seq": 100 + len(rounds), "duplicate": False, "id": m["id"]}
            for m in items
        ]
        return reply(202, {"results": results})

    core = _Core("http://a", retries=3, backoff=0.01, max_batch=2)
    results, _ = drive(core.broadcast_many(["a", "b", "c"], ["i1", "i2", "i3"]), answer)
    assert rounds == [["i1", "i2"], ["i3"], ["i2"]]  # 2 per call; only the failed one again
    assert [(r.id, r.seq, r.user) for r in results] == [
        ("i1", 101, None),
        ("i2", 103, None),
        ("i3", 102, None),
    ]
    with pytest.raises(ValueError):
        core.broadcast_many(["a"], ["i1", "i2"])
    made, _ = drive(core.broadcast_many([1, 2], None), answer)
    assert len({r.id for r in made}) == 2  # an id made up for each message


# ---------------------------------------------------------------- Retry-After


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drive_timed(
    plan: _Plan[Any], answer: Answer, clock: FakeClock
) -> tuple[Any, list[tuple[float, str]]]:
    """Run a plan whose sleeps advance ``clock``; return its result and (time, url) per post."""
    posts: list[tuple[float, str]] = []
    reply_: _Reply | None = None
    try:
        while True:
            step = plan.send(reply_)
            if isinstance(step, _Sleep):
                assert 0 < step.seconds <= 5.0
                clock.now += step.seconds
                reply_ = None
            else:
                posts.append((clock.now, step.url))
                reply_ = answer(step)
    except StopIteration as done:
        return done.value, posts


def busy(seconds: float) -> _Reply:
    body = json.dumps({"error": "store_unavailable", "detail": "NATS down"}).encode()
    return _Reply(503, body, "", seconds)


def test_a_node_that_asked_to_wait_is_skipped_while_another_node_can_answer() -> None:
    clock = FakeClock()
    core = _Core(["http://a", "http://b"], retries=4, backoff=0.01, max_batch=10, clock=clock)
    answers = iter([lambda p: busy(3.0), stored, stored])
    result, posts = drive_timed(
        core.publish("/v1/publish", {"user": "u", "data": 1, "id": "x"}),
        lambda p: next(answers)(p),
        clock,
    )
    assert isinstance(result, Published)
    assert [url for _, url in posts] == ["http://a/v1/publish", "http://b/v1/publish"]
    assert posts[1][0] - posts[0][0] < 0.1  # b at once (the backoff), not after 3 s
    # the next call does not go back to a before its 3 s are over
    _, later = drive_timed(
        core.publish("/v1/publish", {"user": "u", "data": 2, "id": "y"}),
        lambda p: next(answers)(p),
        clock,
    )
    assert [url for _, url in later] == ["http://b/v1/publish"]


def test_when_every_node_asked_to_wait_the_retry_waits_for_the_soonest() -> None:
    clock = FakeClock()
    core = _Core(["http://a", "http://b"], retries=4, backoff=0.01, max_batch=10, clock=clock)
    answers = iter([lambda p: busy(2.0), lambda p: busy(1.0), stored])
    result, posts = drive_timed(
        core.publish("/v1/publish", {"user": "u", "data": 1, "id": "x"}),
        lambda p: next(answers)(p),
        clock,
    )
    assert isinstance(result, Published)
    _, (t1, _), (t2, url) = posts
    assert url == "http://b/v1/publish"  # free 1 s after its answer, before a (2 s)
    assert t2 - t1 == pytest.approx(1.0, abs=0.05)


def test_retry_after_is_capped() -> None:
    clock = FakeClock()
    core = _Core(
        "http://a", retries=1, backoff=0.01, max_batch=10, max_retry_after=2.5, clock=clock
    )
    answers = iter([lambda p: busy(3600.0), stored])
    _, posts = drive_timed(
        core.publish("/v1/publish", {"user": "u", "data": 1, "id": "x"}),
        lambda p: next(answers)(p),
        clock,
    )
    assert posts[1][0] - posts[0][0] == pytest.approx(2.5, abs=0.01)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        (None, 0.0),
        ("", 0.0),
        ("-3", 0.0),
        ("soon", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_header_values(header: str | None, seconds: float) -> None:
    assert retry_after(header) == seconds


def test_an_attempt_says_what_failed_even_inside_a_202() -> None:
    post = _Post("http://n1/v1/publish/batch", b"{}")
    mixed = reply(202, {"results": [{"seq": 1}, {"error": "store_unavailable", "detail": "x"}]})
    assert _attempt(post, mixed).item_errors == ("store_unavailable",)
    assert _attempt(post, mixed).failed  # the publisher retries that item
    whole = _attempt(post, reply(202, {"seq": 1, "duplicate": False, "id": "a"}))
    assert (whole.url, whole.status, whole.item_errors, whole.failed) == (post.url, 202, (), False)
    assert _attempt(post, reply(503, {"error": "store_unavailable", "detail": ""})).failed
    lost = _attempt(post, _Reply(error="ReadTimeout: timed out"))
    assert (lost.status, lost.error, lost.failed) == (0, "ReadTimeout: timed out", True)
    for garbled in (b'{"error" nope', b'["error"]', b'{"results": {"error": 1}}'):
        assert _attempt(post, _Reply(202, garbled)).item_errors == ()  # no crash, no codes


def test_an_on_attempt_callback_that_raises_does_not_fail_the_publish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(attempt: Attempt) -> None:
        raise RuntimeError("metrics down")

    def stored_here(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        return httpx.Response(202, json={"seq": 3, "duplicate": False, "id": sent["id"]})

    with Publisher(["http://n1"], "key", on_attempt=boom) as pub:
        pub._http = httpx.Client(transport=httpx.MockTransport(stored_here))
        assert pub.publish("alice", 1).seq == 3  # stored: the callback's error is not ours
    assert "on_attempt callback failed" in caplog.text
