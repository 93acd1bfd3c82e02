"""Batch publishes stored as JetStream atomic batches, through real nodes: exact chains as
received live (the notifications' prevs) and as replayed from the stream (``Mp-Prev-Back``),
across batches, single publishes from other nodes in between, retries and concurrent batches
from every node."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import nats
import pytest
import trio
from support import Collector, api, assert_exact_chain, connected, publish, replayed

from meshpush.backends.store import SMALL_REQUEST
from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster

PER_USER = 4  # 3 users x 4: more than SMALL_REQUEST, so one atomic batch a request
assert 3 * PER_USER > SMALL_REQUEST


async def post_batch(cluster: LocalCluster, messages: list[Any], node: int = 0) -> list[Any]:
    resp: httpx.Response = await api(
        cluster, cluster.live()[node], "POST", "/v1/publish/batch", json={"messages": messages}
    )
    assert resp.status_code == 202, resp.text
    results: list[Any] = resp.json()["results"]
    assert all("seq" in r for r in results), results
    return results


def batch(tag: str, users: list[str], ids: bool = False) -> list[dict[str, Any]]:
    return [
        {"user": u, "data": f"{tag}-{k}"} | ({"id": f"{tag}-{u}-{k}"} if ids else {})
        for k in range(PER_USER)
        for u in users
    ]


def stored_headers(cluster: LocalCluster, seq: int) -> dict[str, str]:
    """The headers of the user stream's message ``seq``, read straight from JetStream."""

    async def go() -> dict[str, str]:
        nc = await nats.connect(cluster.nats_url)
        try:
            msg = await nc.jetstream().get_msg(f"MP_{cluster.cluster}_USER", seq)
            return dict(msg.headers or {})
        finally:
            await nc.close()

    return asyncio.run(go())


def assert_chain_from_start(messages: list[Any]) -> None:
    assert messages[0].prev == 0
    assert_exact_chain(messages)


async def test_batches_and_single_publishes_between_them_keep_exact_chains(
    cluster: LocalCluster,
) -> None:
    users = ["atom-a", "atom-b", "atom-c"]
    async with connected(cluster, users[0]) as live, trio.open_nursery() as nursery:
        got = Collector(live)
        nursery.start_soon(got.run)
        first = await post_batch(cluster, batch("one", users))
        await publish(cluster, cluster.live()[1], users[0], "between")  # another node
        second = await post_batch(cluster, batch("two", users))
        await got.wait_for(2 * PER_USER + 1)
        nursery.cancel_scope.cancel()
    expected = [f"one-{k}" for k in range(PER_USER)] + ["between"]
    expected += [f"two-{k}" for k in range(PER_USER)]
    assert [m.data for m in got.messages] == expected
    assert_chain_from_start(got.messages)  # live: the notifications' prevs
    for user in users:
        stored = await replayed(cluster, user, len(expected) - (user != users[0]))
        assert_chain_from_start(stored)  # replayed: the stream's Mp-Prev / Mp-Prev-Back
        assert [m.data for m in stored] == [
            d for d in expected if d != "between" or user == users[0]
        ]
    mine = [r["seq"] for r in first + second if not r["duplicate"]]
    assert len(set(mine)) == len(mine) == 2 * len(first)
    # each went as one batch: consecutive seqs, a user's later message relative to its own
    # seq (the second once refused: another node had published to atom-a; sent again on the
    # users' newest seqs)
    for done in (first, second):
        assert [r["seq"] for r in done] == list(range(done[0]["seq"], done[-1]["seq"] + 1))
    headers = await trio.to_thread.run_sync(stored_headers, cluster, first[len(users)]["seq"])
    assert "Nats-Batch-Id" in headers and headers["Mp-Prev-Back"] == str(len(users))


async def test_a_retried_batch_is_duplicate_per_item_and_stores_nothing(
    cluster: LocalCluster,
) -> None:
    users = ["atom-r1", "atom-r2", "atom-r3"]
    first = await post_batch(cluster, batch("r", users, ids=True))
    again = await post_batch(cluster, batch("r", users, ids=True), node=1)
    assert [(r["seq"], r["duplicate"]) for r in again] == [(r["seq"], True) for r in first]
    for user in users:
        stored = await replayed(cluster, user, PER_USER)
        assert len(stored) == PER_USER
        assert_chain_from_start(stored)


async def test_concurrent_batches_from_every_node_on_the_same_users_keep_exact_chains(
    cluster: LocalCluster,
) -> None:
    users = ["atom-c1", "atom-c2", "atom-c3"]
    rounds = 5

    async def from_node(node: int) -> None:
        for r in range(rounds):
            await post_batch(cluster, batch(f"{node}.{r}", users), node=node)

    async with trio.open_nursery() as nursery:
        for node in range(3):
            nursery.start_soon(from_node, node)
    for user in users:
        stored = await replayed(cluster, user, 3 * rounds * PER_USER)
        assert len(stored) == 3 * rounds * PER_USER
        assert_chain_from_start(stored)
        for node in range(3):  # each node's messages of one user keep their order
            mine = [m.data for m in stored if m.data.startswith(f"{node}.")]
            assert mine == [f"{node}.{r}-{k}" for r in range(rounds) for k in range(PER_USER)]
