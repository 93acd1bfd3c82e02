"""The chaos load's batch and multi-user publishes, without a cluster: the seeded plan, how the
publisher SDK's per-item answers become expectations, and what the checker and report make of
them (every 202'd item expected exactly once; an item answered with an error not expected)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx

from chaos import report
from chaos.checker import check
from chaos.events import USER, DeviceLog, EventLog, Instance, NodeSnapshot, Published, Received
from chaos.harness import counting_publisher
from chaos.load import BATCH, MAX_ITEMS, MULTI, SINGLE, LoadPlan, Request, gave_up, outcome
from meshpush.publisher import Failed
from meshpush.publisher import Published as Stored

USERS = [f"user-{i:03d}" for i in range(6)]


def plan_requests(seed: int, slots: int = 3000) -> list[tuple[int, Request]]:
    plan, out, n = LoadPlan(USERS, seed), [], 0
    while n < slots:
        request = plan.request(n)
        out.append((n, request))
        n += request.slots
    return out


def test_the_plan_is_seeded_and_mixes_all_three_kinds() -> None:
    assert plan_requests(1) == plan_requests(1)
    assert plan_requests(1) != plan_requests(2)
    kinds = Counter(r.via for _, r in plan_requests(1))
    assert set(kinds) == {SINGLE, BATCH, MULTI}
    assert kinds[SINGLE] > kinds[BATCH] > 0 and kinds[MULTI] > 0


def test_every_unicast_id_is_unique_per_user_and_multi_user_targets_are_distinct() -> None:
    seen: set[tuple[str | None, str]] = set()
    for slot, r in plan_requests(3):
        assert 1 <= r.slots <= MAX_ITEMS and r.ch == USER
        if r.via == MULTI:
            users = [u for u, _ in r.items]
            assert len(set(users)) == len(users) >= 2
            assert {i for _, i in r.items} == {f"m{slot}"}  # one id, idempotent per user
        else:
            assert [i for _, i in r.items] == [f"u{slot + k}" for k in range(r.slots)]
        for item in r.items:
            assert item not in seen
            seen.add(item)


def test_a_single_user_cluster_gets_no_multi_user_publish() -> None:
    plan = LoadPlan(["only"], 5)
    assert all(plan.request(n).via != MULTI for n in range(200))


BATCH_REQ = Request(USER, BATCH, (("alice", "u1"), ("bob", "u2"), ("alice", "u3")))
MULTI_REQ = Request(USER, MULTI, (("alice", "m4"), ("bob", "m4")))


def test_stored_items_are_expected_and_errored_items_are_not() -> None:
    results = [
        Stored(10, False, "u1", "alice"),
        Failed("store_timeout", "no ack", "u2", "bob"),  # retryable: given up, not expected
        Stored(12, True, "u3", "alice"),  # a retry answered duplicate: its original seq
    ]
    out = outcome(BATCH_REQ, results, 1.5)
    assert [(p.user, p.seq, p.id, p.via) for p in out.published] == [
        ("alice", 10, "u1", BATCH),
        ("alice", 12, "u3", BATCH),
    ]
    assert [(f.user, f.id, f.via) for f in out.failed] == [("bob", "u2", BATCH)]
    assert out.rejected == []


def test_a_non_retryable_item_error_is_reported_as_a_rejection() -> None:
    out = outcome(MULTI_REQ, [Stored(5, False, "m4", "alice"), Failed("bad_user", "x", "m4")], 0)
    assert len(out.published) == 1 and len(out.failed) == 1
    assert out.rejected and "bob/m4" in out.rejected[0]


def test_a_request_given_up_expects_none_of_its_items() -> None:
    out = gave_up(BATCH_REQ, 2.0, "no answer within 20s")
    assert out.published == [] and len(out.failed) == 3


def _log(received: dict[str, list[Received]], published: list[Published]) -> EventLog:
    log = EventLog(meta={"scenario": "unit", "seed": 0, "counters": {"requests_batch": 1}})
    log.published = published
    for user, got in received.items():
        log.devices.append(
            DeviceLog(user, "phone", [Instance(0, received=got, nodes=["n1"])], True, "n1")
        )
    log.routes = {user: "n1" for user in received}
    log.nodes = [NodeSnapshot("n1", sessions=len(received), view=("n1",))]
    return log


def _batch_run() -> EventLog:
    """alice gets u1 (10) and u3 (12) by batch and m4 (13) by multi-user; bob only m4 (14):
    his batch item u2 was answered store_timeout (given up) and never arrived."""
    out = outcome(
        BATCH_REQ,
        [Stored(10, False, "u1"), Failed("store_timeout", "", "u2"), Stored(12, False, "u3")],
        1.0,
    )
    multi = outcome(MULTI_REQ, [Stored(13, False, "m4"), Stored(14, False, "m4")], 2.0)
    log = _log(
        {
            "alice": [
                Received(USER, 10, None, "u1", 1.1, 1.0),
                Received(USER, 12, 10, "u3", 1.2, 1.0),
                Received(USER, 13, 12, "m4", 2.1, 2.0),
            ],
            "bob": [Received(USER, 14, None, "m4", 2.1, 2.0)],
        },
        out.published + multi.published,
    )
    log.failed = out.failed
    return log


def test_a_clean_batch_and_multi_user_run_passes() -> None:
    """The same id for two users (multi-user) is two messages, not a stored-twice retry."""
    assert check(_batch_run(), 400.0) == []


def test_a_lost_batch_item_names_the_batch_publish() -> None:
    log = _batch_run()
    log.devices[0].instances[0].received.pop(1)  # alice never got u3 (12)
    [v] = [v for v in check(log, 400.0) if v.kind == "lost"]
    assert (v.user, v.seq) == ("alice", 12)
    assert "by batch publish through the publisher SDK" in v.detail


def test_two_items_answered_with_one_seq_are_caught() -> None:
    log = _batch_run()
    log.published.append(Published(USER, "bob", 12, "u9", "", 1.0, 0, BATCH))
    assert "seq_claimed_twice" in {v.kind for v in check(log, 400.0)}


def test_the_report_counts_unicasts_by_kind_and_an_unconfirmed_item() -> None:
    log = _batch_run()
    log.devices[1].instances[0].received.insert(0, Received(USER, 11, None, "u2", 1.1, 1.0))
    log.devices[1].instances[0].received[1] = Received(USER, 14, 11, "m4", 2.1, 2.0)
    result = report.build(log, check(log, 400.0), "replay", 400.0)
    m = result["messages"]
    assert m["unicast_by"][BATCH] == {"requests": 1, "published": 2, "gave_up": 1}
    assert m["unicast_by"][MULTI]["published"] == 2
    assert m["delivered_without_202"] == 1  # bob's u2: stored although answered store_timeout
    assert result["ok"]
    text = report.render(result)
    assert "batch 2 in 1 requests (gave up 1), multi-user 2 (gave up 0)" in text
    assert "requests_batch" not in text


def test_the_via_field_survives_a_json_round_trip_and_old_logs_still_load() -> None:
    log = _batch_run()
    again = EventLog.from_json(log.to_json())
    assert [p.via for p in again.published] == [BATCH, BATCH, MULTI, MULTI]
    old = log.to_json()
    for p in old["published"]:
        del p["via"]
    assert {p.via for p in EventLog.from_json(old).published} == {SINGLE}


async def test_the_counting_publisher_retries_with_the_same_ids_and_counts_why() -> None:
    """Under trio, as in the harness: a 504 (outcome unknown) is retried with the same ids, an
    item answered store_unavailable is retried alone, and each reason is counted."""
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if len(bodies) == 1:
            return httpx.Response(504, json={"error": "store_timeout", "detail": "no ack"})
        results: list[dict[str, Any]] = [
            {"seq": 10 * len(bodies) + k, "duplicate": False, "id": m["id"]}
            for k, m in enumerate(body["messages"])
        ]
        if len(bodies) == 2:
            results[1] = {"error": "store_unavailable", "detail": "nats down"}
        return httpx.Response(202, json={"results": results})

    counters: dict[str, int] = {}
    publisher = counting_publisher(["http://127.0.0.1:9"], "key", counters, retries=3)
    publisher._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with publisher:
        results = await publisher.publish_many(
            [{"user": u, "data": {}, "id": i} for u, i in BATCH_REQ.items]
        )
    out = outcome(BATCH_REQ, results, 0.0)
    assert [[m["id"] for m in b["messages"]] for b in bodies] == [
        ["u1", "u2", "u3"],
        ["u1", "u2", "u3"],  # the same ids after the 504
        ["u2"],  # only the item that was not stored
    ]
    assert [(p.id, p.seq) for p in out.published] == [("u1", 20), ("u2", 30), ("u3", 22)]
    assert out.failed == [] and counters == {"sdk_http_504": 1, "sdk_item_store_unavailable": 1}
