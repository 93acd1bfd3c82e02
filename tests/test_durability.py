"""Durable delivery on real JetStream: offline storage, resume, dedup, order, gaps, catch-up."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import trio
from conftest import make_cluster
from support import (
    Collector,
    api,
    assert_exact_chain,
    connected,
    owner_of,
    publish,
    token,
    user_owned_by,
    wait_until,
)
from trio_websocket import open_websocket_url

from meshpush.core.encoding import encode_token
from meshpush.core.ring import Ring, slot
from meshpush.local.devcluster import LocalCluster, NodeProc
from meshpush.publisher import Publisher, PublishError

pytestmark = pytest.mark.cluster


@asynccontextmanager
async def collecting(
    cluster: LocalCluster, user: str, **kwargs: object
) -> AsyncIterator[Collector]:
    async with connected(cluster, user, **kwargs) as client, trio.open_nursery() as nursery:
        collector = Collector(client)
        nursery.start_soon(collector.run)
        yield collector
        nursery.cancel_scope.cancel()


async def publish_many(cluster: LocalCluster, user: str, n: int, tag: str) -> list[int]:
    return [
        (await publish(cluster, cluster.live()[i % len(cluster.live())], user, {tag: i}))["seq"]
        for i in range(n)
    ]


# ---------------------------------------------------------------- offline and resume


async def test_offline_messages_arrive_in_order_on_every_device(cluster: LocalCluster) -> None:
    user = "offline-user"
    seqs = await publish_many(cluster, user, 20, "n")
    for device in ("phone", "laptop"):
        async with collecting(cluster, user, device=device) as got:
            await got.wait_for(20)
            assert got.seqs() == seqs
            assert [m.data["n"] for m in got.messages] == list(range(20))
            assert_exact_chain(got.messages)


async def test_reconnect_resumes_after_the_acked_cursor(cluster: LocalCluster) -> None:
    user = "cursor-user"
    seqs = await publish_many(cluster, user, 10, "a")
    async with collecting(cluster, user, device="tab") as got:
        await got.wait_for(10)
        await trio.sleep(0.6)  # acks sent and the cursor flushed (0.2 s in tests)
    more = await publish_many(cluster, user, 5, "b")
    # a brand-new client instance (knows nothing) for the same device resumes from the cursor
    async with collecting(cluster, user, device="tab") as again:
        await again.wait_for(5)
        await trio.sleep(0.3)
        assert again.seqs() == more
        assert again.client.stats.duplicates == 0
    assert seqs[-1] < more[0]


async def test_client_resume_position_beats_an_older_cursor(cluster: LocalCluster) -> None:
    user = "resume-param"
    seqs = await publish_many(cluster, user, 6, "x")
    url = f"{cluster.node(await owner_of(cluster, user)).ws_url}?token={token(cluster, user)}"
    async with open_websocket_url(f"{url}&device=raw&last={seqs[3]}") as ws:
        welcome = json.loads(await ws.get_message())
        assert welcome["resume"]["user"] == seqs[3]
        assert welcome["recovered"] is True
        frames = [json.loads(await ws.get_message()) for _ in range(2)]
    assert [f["seq"] for f in frames] == seqs[4:]
    assert frames[0]["prev"] == seqs[3]


async def test_idempotent_retry_returns_the_same_seq_and_delivers_once(
    cluster: LocalCluster,
) -> None:
    user = "idempotent"
    async with collecting(cluster, user) as got:
        first = await publish(cluster, cluster.live()[0], user, "once", msg_id="order-42")
        retry = await publish(cluster, cluster.live()[1], user, "once", msg_id="order-42")
        marker = await publish(cluster, cluster.live()[2], user, "marker")
        await got.wait_for(2)
    assert retry == {"seq": first["seq"], "duplicate": True, "id": "order-42"}
    assert first["duplicate"] is False
    assert got.seqs() == [first["seq"], marker["seq"]]


async def test_concurrent_publishers_keep_one_exact_chain(cluster: LocalCluster) -> None:
    user = "contended"
    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(
                publish, cluster, cluster.live()[i % len(cluster.live())], user, {"i": i}
            )
    async with collecting(cluster, user) as got:
        await got.wait_for(60)
    assert len(set(got.seqs())) == 60
    assert_exact_chain(got.messages)


@pytest.mark.parametrize("user", ["a.b *>🎉", "x" * 256, "é" * 128])
async def test_encoded_ids_survive_store_cursor_and_replay(
    cluster: LocalCluster, user: str
) -> None:
    device = "dev.*> ü"
    seqs = await publish_many(cluster, user, 3, "k")
    async with collecting(cluster, user, device=device) as got:
        await got.wait_for(3)
        await trio.sleep(0.5)
    later = await publish_many(cluster, user, 2, "m")
    async with collecting(cluster, user, device=device) as again:
        await again.wait_for(2)
    assert got.seqs() == seqs
    assert again.seqs() == later


async def test_ack_of_an_unsent_seq_is_refused(cluster: LocalCluster) -> None:
    user = "bad-acker"
    url = f"{cluster.node(await owner_of(cluster, user)).ws_url}?token={token(cluster, user)}"
    async with open_websocket_url(url) as ws:
        await ws.get_message()  # welcome
        await ws.send_message('{"type":"ack","ch":"user","seq":999999999}')
        err = json.loads(await ws.get_message())
        assert (err["type"], err["code"]) == ("error", "bad_ack")
        await ws.send_message('{"type":"ping"}')
        assert json.loads(await ws.get_message()) == {"type": "pong"}


async def test_large_backlog_is_replayed_in_bounded_batches(cluster: LocalCluster) -> None:
    """1,000 stored messages to a session whose queue holds 64: flow control, no 4008."""
    user = "backlog"
    node = cluster.live()[0]
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
        headers = {"authorization": f"Bearer {cluster.api_key}"}
        for i in range(1000):
            resp = await http.post("/v1/publish", json={"user": user, "data": i}, headers=headers)
            assert resp.status_code == 202
    async with collecting(cluster, user, device="slow") as got:
        await got.wait_for(300)
    # disconnected mid-replay: the next session picks up exactly where this one stopped
    async with collecting(cluster, user, device="slow") as rest:
        await rest.wait_for(1000 - len(got.messages))
    together = got.messages + rest.messages
    assert [m.data for m in together] == list(range(1000))
    assert_exact_chain(together)
    assert got.client.stats.last_close != 4008


# ---------------------------------------------------------------- catch-up and NATS


def _store_directly(cluster: LocalCluster, user: str, data: object, prev: int) -> int:
    """Store a message the way a node would, but send no live notification (a lost hint)."""

    async def go() -> int:
        nc = await nats.connect(cluster.nats_url)
        try:
            subject = f"mp.t.store.u.{slot(user)}.{encode_token(user)}"
            headers = {
                "Nats-Expected-Last-Subject-Sequence": str(prev),
                "Mp-Prev": str(prev),
                "Nats-Msg-Id": f"direct-{random.random()}",
            }
            ack = await nc.jetstream().publish(subject, json.dumps(data).encode(), headers=headers)
            return int(ack.seq)
        finally:
            await nc.close()

    return asyncio.run(go())


async def one_then_hidden(
    cluster: LocalCluster, got: Collector, user: str
) -> tuple[dict[str, Any], int]:
    """Publish one message (received), then store one whose live notification never goes out."""
    first = await publish(cluster, cluster.live()[0], user, "one")
    await got.wait_for(1)
    hidden = await trio.to_thread.run_sync(_store_directly, cluster, user, "hidden", first["seq"])
    return first, hidden


async def test_missed_notification_is_caught_up_through_prev(cluster: LocalCluster) -> None:
    user = "missed-hint"
    async with collecting(cluster, user) as got:
        first, hidden = await one_then_hidden(cluster, got, user)
        third = await publish(cluster, cluster.live()[1], user, "three")
        await got.wait_for(3)
        assert got.seqs() == [first["seq"], hidden, third["seq"]]
        assert got.client.stats.connects == 1  # caught up without a reconnect
    assert_exact_chain(got.messages)


async def nats_down_noticed(cluster: LocalCluster, node: NodeProc) -> bool:
    body = (await api(cluster, node, "GET", "/readyz")).json()
    return body["reason"] == "NATS disconnected"


def sdk_publish(cluster: LocalCluster, user: str) -> tuple[PublishError, float]:
    """The publisher SDK against one node during the outage: its error and how long it took
    (the node's Retry-After read from the real answer, honoured up to 0.3 s)."""
    node = cluster.live()[1].http_url
    with Publisher([node], cluster.api_key, retries=1, max_retry_after=0.3) as pub:
        start = time.monotonic()
        with pytest.raises(PublishError) as err:
            pub.publish(user, "not stored either")
        return err.value, time.monotonic() - start


async def test_nats_outage_answers_503_then_recovers_and_catches_up(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c") as cluster:
        user = "nats-outage"
        async with collecting(cluster, user) as got:
            first, hidden = await one_then_hidden(cluster, got, user)
            assert cluster.nats is not None
            cluster.nats.stop(signal.SIGKILL)
            # once the node knows (a publish just before that may time out: 504, documented)
            await wait_until(lambda: nats_down_noticed(cluster, cluster.live()[1]), timeout=15)
            resp = await api(
                cluster,
                cluster.live()[1],
                "POST",
                "/v1/publish",
                json={"user": user, "data": "lost?"},
            )
            assert resp.status_code == 503
            assert resp.json()["error"] == "store_unavailable"
            assert resp.headers["retry-after"] == "1"
            error, took = await trio.to_thread.run_sync(sdk_publish, cluster, user)
            assert (error.status, error.code, error.retry_after) == (503, "store_unavailable", 1)
            assert took >= 0.3  # its one retry waited out Retry-After (capped at 0.3 s)
            await trio.to_thread.run_sync(cluster.start_nats)
            # the node reconnects and catches its sessions up: the hidden message arrives
            await got.wait_for(2, timeout=30)
            ok = None
            with trio.fail_after(30):
                while ok is None:
                    resp = await api(
                        cluster,
                        cluster.live()[1],
                        "POST",
                        "/v1/publish",
                        json={"user": user, "data": "after"},
                    )
                    ok = resp.json()["seq"] if resp.status_code == 202 else None
                    await trio.sleep(0.2)
            await got.wait_for(3)
            assert got.seqs() == [first["seq"], hidden, ok]
            assert got.client.stats.connects == 1
        assert_exact_chain(got.messages)


# ---------------------------------------------------------------- retention


async def test_retention_cap_is_reported_as_a_gap(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", max_msgs_per_user=5) as cluster:
        user = "capped"
        async with collecting(cluster, user, device="d") as got:
            seqs = await publish_many(cluster, user, 2, "early")
            await got.wait_for(2)
            await trio.sleep(0.5)  # cursor flushed
        later = await publish_many(cluster, user, 10, "late")  # the cap keeps the last 5
        events: list[str] = []
        async with collecting(
            cluster, user, device="d", on_event=lambda e: events.append(e.kind)
        ) as again:
            await again.wait_for(5)
        assert again.seqs() == later[5:]
        assert "gap" in events and "not_recovered" in events
        gap = next(e for e in again.client.events if e.kind == "gap")
        assert gap.detail["first"] == seqs[-1] + 1
        assert gap.detail["last"] == later[4]


async def test_expired_messages_are_reported_as_a_gap(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", max_message_age=1.5, duplicate_window=1.0) as cluster:
        user = "expiring"
        async with collecting(cluster, user, device="d") as got:
            await publish_many(cluster, user, 1, "seen")
            await got.wait_for(1)
            await trio.sleep(0.5)
        await publish_many(cluster, user, 3, "expire")
        await trio.sleep(2.5)  # max_age passes: the three are gone
        fresh = await publish_many(cluster, user, 1, "fresh")
        async with collecting(cluster, user, device="d") as again:
            await again.wait_for(1)
        assert again.seqs() == fresh
        assert [e.kind for e in again.client.events].count("gap") == 1


# ---------------------------------------------------------------- faults under load


async def _load_and_fault(cluster: LocalCluster, fault: str) -> None:
    """1,000 messages to one user while its owner is killed / a node joins / it is drained."""
    user = moving_user() if fault == "join" else await user_owned_by(cluster, "n1", "load")
    published: list[int] = []

    async def publisher() -> None:
        headers = {"authorization": f"Bearer {cluster.api_key}"}
        async with httpx.AsyncClient(timeout=5) as http:
            for i in range(1000):
                body = {"user": user, "data": i, "id": f"{fault}-{i}"}
                published.append(await _publish_retrying(cluster, http, body, headers))

    async with collecting(cluster, user, device="d") as got, trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        await wait_until(lambda: len(published) >= 300, timeout=60)
        await _inject(cluster, fault)
        await wait_until(lambda: len(published) == 1000, timeout=120)
        await got.wait_for(1000, timeout=60)
        await trio.sleep(0.5)
        assert got.seqs() == published  # each seq exactly once, in order
        assert_exact_chain(got.messages)
        assert got.client.stats.duplicates == 0  # the node replayed only what was not received
        assert got.client.stats.connects >= 2


def moving_user() -> str:
    """A user that n1 owns in a 3-node ring and n4 owns once it joins (rings are pure)."""
    before, after = Ring.build(["n1", "n2", "n3"]), Ring.build(["n1", "n2", "n3", "n4"])
    return next(
        u
        for u in (f"mover-{i}" for i in range(10_000))
        if before.owner(u) == "n1" and after.owner(u) == "n4"
    )


async def _publish_retrying(
    cluster: LocalCluster, http: httpx.AsyncClient, body: dict, headers: dict
) -> int:
    for attempt in range(200):
        node = cluster.live()[attempt % len(cluster.live())]
        try:
            resp = await http.post(f"{node.http_url}/v1/publish", json=body, headers=headers)
            if resp.status_code == 202:
                return int(resp.json()["seq"])
        except httpx.TransportError:
            pass
        await trio.sleep(0.05)
    raise AssertionError("publish never accepted")


async def _inject(cluster: LocalCluster, fault: str) -> None:
    if fault == "kill":
        cluster.kill(cluster.node("n1"))
    elif fault == "drain":
        node = cluster.node("n1")
        node.proc.send(signal.SIGTERM)
        assert await trio.to_thread.run_sync(node.proc.popen.wait, 30) == 0
    else:
        await trio.to_thread.run_sync(cluster.start_node)


@pytest.mark.parametrize("fault", ["kill", "join", "drain"])
async def test_thousand_messages_survive_a_fault(tmp_path: Path, fault: str) -> None:
    with make_cluster(tmp_path / "c") as cluster:
        await _load_and_fault(cluster, fault)


async def test_new_device_backlog_settings(tmp_path: Path) -> None:
    """backlog_user=N: a brand-new device gets the last N stored user messages;
    backlog_broadcast=-1: and every retained broadcast."""
    with make_cluster(tmp_path / "c", nodes=1, backlog_user=3, backlog_broadcast=-1) as cluster:
        user, node = "newcomer", cluster.live()[0]
        seqs = await publish_many(cluster, user, 1, "u") + await publish_many(cluster, user, 4, "v")
        casts = []
        for i in range(2):
            resp = await api(cluster, node, "POST", "/v1/broadcast", json={"data": i})
            casts.append(resp.json()["seq"])
        async with collecting(cluster, user, device="brand-new") as got:
            await got.wait_for(3)
            await got.wait_for(2, ch="broadcast")
            await trio.sleep(0.3)
        assert got.seqs() == seqs[-3:]
        assert got.seqs("broadcast") == casts
