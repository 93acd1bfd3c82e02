"""Coalesced delivery through a real node. Many broadcasts in one call (``POST /v1/broadcast
{"messages": [...]}``), plain and over TLS: per-item results in order, idempotency per id,
nothing stored on a bad body, and the coalesced frames they arrive in parsed by an independent
client (Python ``websockets``), in order, exactly chained. A reader that stops while batches
pour in is cut with 4008 and resumes without loss."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

import httpx
import nats
import pytest
import trio
from support import api, verify
from test_fastpath import (
    closes,
    node_cluster,
    open_ws,
    post,
    read_until_close,
    recv_json,
    resume_all,
    slow,
    stalled_reader,
    wait_closed_by_server,
)

from meshpush.local.devcluster import LocalCluster
from meshpush.publisher import AsyncPublisher, Published

__all__ = ["node_cluster", "slow"]  # fixtures shared with test_fastpath

pytestmark = pytest.mark.cluster
Cluster = tuple[LocalCluster, ssl.SSLContext | None]


def stored_broadcasts(cluster: LocalCluster) -> int:
    async def go() -> int:
        nc = await nats.connect(cluster.nats_url)
        try:
            info = await nc.jetstream().stream_info(f"MP_{cluster.cluster}_BCAST")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(go())


async def stored(cluster: LocalCluster) -> int:
    return await trio.to_thread.run_sync(stored_broadcasts, cluster)


async def post_raw(
    cluster: LocalCluster, context: ssl.SSLContext | None, raw: bytes
) -> httpx.Response:
    headers = {"authorization": f"Bearer {cluster.api_key}", "content-type": "application/json"}
    async with httpx.AsyncClient(verify=context or verify(), timeout=10) as http:
        return await http.post(
            f"{cluster.live()[0].http_url}/v1/broadcast", content=raw, headers=headers
        )


async def test_a_batch_of_broadcasts_arrives_in_order_and_parses(node_cluster: Cluster) -> None:
    """120 broadcasts of every WebSocket length encoding in one call, two clients: each gets
    all of them once, in seq order, each ``prev`` the seq before, the data as published.
    (Within twice the node's ``session_queue`` of 64: a TLS session buffers every frame until
    its drain has written it, and a burst beyond that bound is a slow consumer's, 4008.)"""
    cluster, context = node_cluster
    sizes = [3, 130, 70_000, *([100] * 117)]
    messages = [{"data": {"k": k, "p": "b" * n}} for k, n in enumerate(sizes)]
    tag = time.monotonic_ns()
    clients = [
        await trio.to_thread.run_sync(open_ws, cluster, f"bb-{tag}-{i}", context) for i in range(2)
    ]
    try:
        for ws in clients:
            assert (await trio.to_thread.run_sync(recv_json, ws))["type"] == "welcome"
        answer = await post(cluster, context, "/v1/broadcast", {"messages": messages})
        seqs = [r["seq"] for r in answer["results"]]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(sizes)
        for ws in clients:
            got = [await trio.to_thread.run_sync(recv_json, ws) for _ in sizes]
            assert [m["seq"] for m in got] == seqs
            assert [m["prev"] for m in got[1:]] == seqs[:-1]
            assert [m["data"] for m in got] == [m["data"] for m in messages]
            assert all(m["type"] == "msg" and m["ch"] == "broadcast" for m in got)
    finally:
        for ws in clients:
            await trio.to_thread.run_sync(ws.close)


async def test_results_come_in_order_with_item_errors_beside_stored_items(
    node_cluster: Cluster,
) -> None:
    cluster, context = node_cluster
    before = await stored(cluster)
    tag = time.monotonic_ns()
    messages: list[Any] = [
        {"data": 1},
        {"data": 2, "id": f"named-{tag}"},
        5,
        {"data": 3, "extra": True},
        {"id": "no-data"},
        {"data": 4, "id": 7},
        {"data": [None, "x"]},
    ]
    answer = await post(cluster, context, "/v1/broadcast", {"messages": messages})
    results = answer["results"]
    assert [r.get("error") for r in results] == [
        None,
        None,
        "bad_body",
        "unknown_field",
        "missing_field",
        "bad_id",
        None,
    ]
    assert results[1]["id"] == f"named-{tag}" and results[1]["duplicate"] is False
    assert results[0]["seq"] < results[1]["seq"] < results[6]["seq"]
    assert await stored(cluster) == before + 3


async def test_broadcasts_in_a_batch_are_idempotent_by_id(node_cluster: Cluster) -> None:
    cluster, context = node_cluster
    tag = time.monotonic_ns()
    messages = [{"data": i, "id": f"bidem-{tag}-{i}"} for i in range(5)]
    first = (await post(cluster, context, "/v1/broadcast", {"messages": messages}))["results"]
    before = await stored(cluster)
    again = (await post(cluster, context, "/v1/broadcast", {"messages": messages}))["results"]
    assert [r["seq"] for r in again] == [r["seq"] for r in first]
    assert all(r["duplicate"] for r in again) and not any(r["duplicate"] for r in first)
    single = await post(cluster, context, "/v1/broadcast", {"data": 0, "id": f"bidem-{tag}-0"})
    assert single["duplicate"] and single["seq"] == first[0]["seq"]
    assert await stored(cluster) == before


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "bad_json"),
    (b'{"messages": {"data": 1}}', 400, "bad_messages"),
    (b'{"messages": []}', 400, "bad_messages"),
    (b'{"messages": [{"data": 1}], "data": 2}', 400, "unknown_field"),
    (b'{"messages": [{"data": NaN}]}', 400, "bad_json"),
    (b'{"messages": [{"data": "\\ud800"}]}', 400, "bad_json"),
    (b"[]", 400, "bad_body"),
    (json.dumps({"messages": [{"data": i} for i in range(1001)]}).encode(), 413, "too_many"),
    (json.dumps({"messages": [{"data": "y" * 300_000}]}).encode(), 413, "too_large"),
]


async def test_a_bad_batch_stores_nothing(node_cluster: Cluster) -> None:
    cluster, context = node_cluster
    before = await stored(cluster)
    for raw, status, code in BAD_BODIES:
        if context is not None and code == "too_large":
            continue  # the 413 comes before the body is read: over TLS the client sees a reset
        resp = await post_raw(cluster, context, raw)
        assert resp.status_code == status, (raw[:80], resp.text)
        assert resp.json()["error"] == code, (raw[:80], resp.text)
    assert await stored(cluster) == before


async def test_a_reader_that_stops_under_batches_is_cut_4008_and_resumes(
    slow: LocalCluster,
) -> None:
    """Batch publishes to one user arrive together and are coalesced; the stalled reader's
    buffer is still counted per frame: 4008 within the grace time, then a lossless resume."""
    user = f"slow-batch-{time.monotonic_ns()}"
    count, per_call = 120, 30
    before = await closes(slow, "4008")
    sock = await trio.to_thread.run_sync(stalled_reader, slow, user)
    try:
        for start in range(0, count, per_call):
            batch = [
                {"user": user, "data": f"{i}" + "p" * 4000} for i in range(start, start + per_call)
            ]
            resp = await api(
                slow, slow.live()[0], "POST", "/v1/publish/batch", json={"messages": batch}
            )
            assert resp.status_code == 202, resp.text
        took = await wait_closed_by_server(slow, "4008", before)
        frames, code = await trio.to_thread.run_sync(read_until_close, sock)
    finally:
        sock.close()
    assert code == 4008 and took < 15
    seqs = [f["seq"] for f in frames if f["type"] == "msg"]
    assert seqs == sorted(seqs) and len(seqs) < count
    await resume_all(slow, user, count)


@pytest.mark.parametrize("node_cluster", ["plain"], indirect=True)  # the SDK trusts system CAs
async def test_the_publisher_sdk_sends_broadcasts_in_volume(node_cluster: Cluster) -> None:
    cluster, context = node_cluster
    ws = await trio.to_thread.run_sync(open_ws, cluster, f"sdk-{time.monotonic_ns()}", context)
    try:
        assert (await trio.to_thread.run_sync(recv_json, ws))["type"] == "welcome"
        async with AsyncPublisher(cluster.live()[0].http_url, cluster.api_key, max_batch=40) as pub:
            results = await pub.broadcast_many([{"n": n} for n in range(100)])
        assert all(isinstance(r, Published) for r in results)
        got = [await trio.to_thread.run_sync(recv_json, ws) for _ in results]
    finally:
        await trio.to_thread.run_sync(ws.close)
    assert [m["seq"] for m in got] == [r.seq for r in results]
    assert [m["data"]["n"] for m in got] == list(range(100))
