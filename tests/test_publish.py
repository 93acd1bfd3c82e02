"""The publish API through real nodes: batch, multi-user, strict JSON, stored counts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import nats
import pytest
import trio
from support import (
    Collector,
    api,
    assert_exact_chain,
    connected,
    publish,
    replayed,
    sample,
)

from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster


def stored_count(cluster: LocalCluster, stream: str = "USER") -> int:
    """Messages in a stream, read straight from JetStream."""

    async def go() -> int:
        nc = await nats.connect(cluster.nats_url)
        try:
            info = await nc.jetstream().stream_info(f"MP_{cluster.cluster}_{stream}")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(go())


async def count(cluster: LocalCluster, stream: str = "USER") -> int:
    return await trio.to_thread.run_sync(stored_count, cluster, stream)


async def post(cluster: LocalCluster, path: str, body: Any, node: int = 0) -> httpx.Response:
    return await api(cluster, cluster.live()[node], "POST", path, json=body)


async def post_raw(cluster: LocalCluster, path: str, raw: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return await api(cluster, cluster.live()[0], "POST", path, content=raw, headers=headers)


# ---------------------------------------------------------------- batch


async def test_batch_answers_in_order_with_item_errors_beside_stored_items(
    cluster: LocalCluster,
) -> None:
    async with connected(cluster, "batch-a") as a, trio.open_nursery() as nursery:
        got = Collector(a)
        nursery.start_soon(got.run)
        messages = [
            {"user": "batch-a", "data": 1},
            {"user": "", "data": 2},
            {"user": "batch-b", "data": 3, "id": "b-3"},
            5,
            {"user": "batch-a", "data": {"x": 4}, "extra": True},
            {"user": "batch-a", "data": 5},
            {"user": "batch-a", "data": 6, "id": 7},
        ]
        resp = await post(cluster, "/v1/publish/batch", {"messages": messages})
        assert resp.status_code == 202, resp.text
        results = resp.json()["results"]
        assert [r.get("error") for r in results] == [
            None,
            "bad_user",
            None,
            "bad_body",
            "unknown_field",
            None,
            "bad_id",
        ]
        assert results[2]["id"] == "b-3" and results[2]["duplicate"] is False
        assert results[5]["seq"] > results[0]["seq"]
        await got.wait_for(2)
        nursery.cancel_scope.cancel()
    assert [m.data for m in got.messages] == [1, 5]
    assert got.seqs() == [results[0]["seq"], results[5]["seq"]]
    assert_exact_chain(got.messages)


async def test_batch_items_are_idempotent_by_id(cluster: LocalCluster) -> None:
    messages = [{"user": f"idem-{i % 3}", "data": i, "id": f"idem-{i}"} for i in range(9)]
    first = (await post(cluster, "/v1/publish/batch", {"messages": messages})).json()["results"]
    before = await count(cluster)
    again = await post(cluster, "/v1/publish/batch", {"messages": messages}, node=1)
    assert again.status_code == 202
    retry = again.json()["results"]
    assert [r["seq"] for r in retry] == [r["seq"] for r in first]
    assert all(r["duplicate"] for r in retry) and not any(r["duplicate"] for r in first)
    assert await count(cluster) == before
    single = await publish(cluster, cluster.live()[2], "idem-0", 0, msg_id="idem-0")
    assert single["duplicate"] and single["seq"] == first[0]["seq"]


async def test_a_big_request_through_a_node_is_one_atomic_batch(cluster: LocalCluster) -> None:
    """Every node of the cluster announces that it reads atomic batches (``pb`` in its etcd
    record), so the router lets the store use them: a request with several messages per
    user is one batch (the node's counter), and its chains are exact."""
    node = cluster.live()[0]
    name = "meshpush_store_atomic_batches_total"
    before = await sample(cluster, node, name, result="stored")
    users = [f"ab-{k}" for k in range(3)]
    messages = [{"user": users[k % 3], "data": k} for k in range(12)]
    resp = await post(cluster, "/v1/publish/batch", {"messages": messages})
    assert resp.status_code == 202 and all("seq" in r for r in resp.json()["results"])
    assert await sample(cluster, node, name, result="stored") == before + 1
    for user in users:
        msgs = await replayed(cluster, user, 4)
        assert_exact_chain(msgs)


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "bad_json"),
    (b'{"messages": {"user": "x", "data": 1}}', 400, "bad_messages"),
    (b'{"messages": []}', 400, "bad_messages"),
    (b'{"messages": [{"user": "x", "data": 1}], "more": 1}', 400, "unknown_field"),
    (b'{"messages": [{"user": "x", "data": NaN}]}', 400, "bad_json"),
    (b'{"messages": [{"user": "x", "data": [1e999]}]}', 400, "bad_json"),
    (b'{"messages": [{"user": "x", "data": "\\ud800"}]}', 400, "bad_json"),
    (b'{"messages": [{"user": "x", "data": 1, "id": "\\udfff"}]}', 400, "bad_json"),
    (b"[]", 400, "bad_body"),
]


async def test_malformed_batches_store_nothing(cluster: LocalCluster) -> None:
    before = await count(cluster)
    too_many = {"messages": [{"user": "x", "data": i} for i in range(1001)]}
    huge = {"messages": [{"user": "x", "data": "y" * 300_000}]}
    cases = [*BAD_BODIES, (json.dumps(too_many).encode(), 413, "too_many")]
    cases.append((json.dumps(huge).encode(), 413, "too_large"))
    for raw, status, code in cases:
        resp = await post_raw(cluster, "/v1/publish/batch", raw)
        assert resp.status_code == status, (raw[:80], resp.text)
        assert resp.json()["error"] == code, (raw[:80], resp.text)
    assert await count(cluster) == before


# ---------------------------------------------------------------- multi-user


async def test_multi_user_publish_stores_one_message_per_user(cluster: LocalCluster) -> None:
    users = ["mu-a", "mu-b", "mu-c"]
    async with (
        connected(cluster, users[0]) as a,
        connected(cluster, users[1]) as b,
        connected(cluster, users[2]) as c,
        trio.open_nursery() as nursery,
    ):
        got = [Collector(x) for x in (a, b, c)]
        for g in got:
            nursery.start_soon(g.run)
        body = {"users": users, "data": {"hi": 1}, "id": "mu-1"}
        resp = await post(cluster, "/v1/publish", body)
        assert resp.status_code == 202, resp.text
        answer = resp.json()
        assert answer["id"] == "mu-1"
        assert [r["user"] for r in answer["results"]] == users
        assert not any(r["duplicate"] for r in answer["results"])
        retry = (await post(cluster, "/v1/publish", body, node=2)).json()["results"]
        assert [r["seq"] for r in retry] == [r["seq"] for r in answer["results"]]
        assert all(r["duplicate"] for r in retry)
        marker = {"users": users, "data": "end"}
        assert (await post(cluster, "/v1/publish", marker)).status_code == 202
        for g in got:
            await g.wait_for(2)
        nursery.cancel_scope.cancel()
    for g, r in zip(got, answer["results"], strict=True):
        assert [m.data for m in g.messages] == [{"hi": 1}, "end"]
        assert g.messages[0].seq == r["seq"] and g.messages[0].id == "mu-1"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"users": [], "data": 1}, 400, "bad_users"),
        ({"users": "mu-a", "data": 1}, 400, "bad_users"),
        ({"users": ["mu-a", "mu-a"], "data": 1}, 400, "bad_users"),
        ({"users": ["mu-a", ""], "data": 1}, 400, "bad_user"),
        ({"users": ["mu-a"], "data": 1, "user": "x"}, 400, "unknown_field"),
        ({"users": ["mu-a"]}, 400, "missing_field"),
        ({"users": [f"u{i}" for i in range(1001)], "data": 1}, 413, "too_many"),
    ],
)
async def test_bad_multi_user_publishes_store_nothing(
    cluster: LocalCluster, body: dict[str, Any], status: int, code: str
) -> None:
    before = await count(cluster)
    resp = await post(cluster, "/v1/publish", body)
    assert (resp.status_code, resp.json()["error"]) == (status, code), resp.text
    assert await count(cluster) == before


async def test_chains_stay_exact_under_concurrent_batches_from_several_nodes(
    cluster: LocalCluster,
) -> None:
    users = ["chain-a", "chain-b"]
    rounds = 8

    async def from_node(node: int) -> None:
        for r in range(rounds):
            batch = [{"user": u, "data": [node, r, k]} for u in users for k in range(3)]
            resp = await post(cluster, "/v1/publish/batch", {"messages": batch}, node=node)
            assert resp.status_code == 202 and all("seq" in x for x in resp.json()["results"])
            multi = {"users": users, "data": [node, r, "all"]}
            assert (await post(cluster, "/v1/publish", multi, node=node)).status_code == 202

    async with trio.open_nursery() as nursery:
        for node in range(3):
            nursery.start_soon(from_node, node)
    expected = 3 * rounds * 4
    for user in users:
        stored = await replayed(cluster, user, expected)
        assert len(stored) == expected
        assert_exact_chain(stored)
        for node in range(3):  # each node's messages of one user keep their order
            mine = [m.data for m in stored if m.data[0] == node]
            assert mine == [[node, r, k] for r in range(rounds) for k in (0, 1, 2, "all")]


# ---------------------------------------------------------------- strict JSON (issue 8)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/publish", b'{"user": "nan", "data": [NaN, 1]}'),
        ("/v1/publish", b'{"user": "nan", "data": {"a": Infinity}}'),
        ("/v1/publish", b'{"user": "nan", "data": -Infinity}'),
        ("/v1/publish", b'{"user": "nan", "data": 1e400}'),
        ("/v1/broadcast", b'{"data": NaN}'),
        ("/v1/publish", b'{"user": "sur", "data": "\\ud800"}'),
        ("/v1/publish", b'{"user": "sur", "data": {"\\udc00": 1}}'),
        ("/v1/publish", b'{"user": "sur", "data": 1, "id": "\\ud800x"}'),
        ("/v1/publish", b'{"user": "\\ud800", "data": 1}'),
        ("/v1/publish", b'{"users": ["\\udbff"], "data": 1}'),
        ("/v1/broadcast", b'{"data": ["\\udfff"]}'),
        ("/v1/publish", b'{"user": "sur", "data": "\xed\xa0\x80"}'),
    ],
)
async def test_non_finite_numbers_and_lone_surrogates_are_json_400(
    cluster: LocalCluster, path: str, raw: bytes
) -> None:
    before = (await count(cluster), await count(cluster, "BCAST"))
    resp = await post_raw(cluster, path, raw)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"] == "bad_json"
    assert (await count(cluster), await count(cluster, "BCAST")) == before


async def test_valid_surrogate_pairs_and_floats_are_accepted(cluster: LocalCluster) -> None:
    raw = b'{"user": "pair", "data": ["\\ud83d\\ude00", 1.5e300, -0.0]}'
    async with connected(cluster, "pair") as client, trio.open_nursery() as nursery:
        got = Collector(client)
        nursery.start_soon(got.run)
        assert (await post_raw(cluster, "/v1/publish", raw)).status_code == 202
        await got.wait_for(1)
        nursery.cancel_scope.cancel()
    assert got.messages[0].data == ["\U0001f600", 1.5e300, -0.0]
