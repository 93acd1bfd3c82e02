"""The trio SDK against tiny local WebSocket servers (no cluster needed)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from meshpush.client import MAX_ACK_INTERVAL, MAX_RETRY_AFTER, Client, open_client


async def test_a_session_silent_after_the_upgrade_is_given_up_and_retried(
    nursery: trio.Nursery,
) -> None:
    """A link cut between the upgrade and the welcome must not hang the client forever."""
    upgrades = 0

    async def silent(request: WebSocketRequest) -> None:
        nonlocal upgrades
        upgrades += 1
        ws = await request.accept()
        await trio.sleep_forever()
        await ws.aclose()  # pragma: no cover

    server = await nursery.start(serve_websocket, silent, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/ws"
    with trio.fail_after(20):
        async with open_client(url, token="t", connect_timeout=0.5) as client:
            while upgrades < 2:
                await trio.sleep(0.05)
            assert "no welcome" in client.stats.last_error
            assert client.stats.welcomes == 0


async def test_acks_are_cumulative_and_batched_per_ack_interval(nursery: trio.Nursery) -> None:
    """200 messages consumed at once cost a few ack frames, not one each; the last ack
    names the last message consumed."""
    acks: list[dict[str, object]] = []

    async def node(request: WebSocketRequest) -> None:
        ws = await request.accept()
        json.loads(await ws.get_message())  # the auth frame
        await ws.send_message(json.dumps({"type": "welcome", "node": "n1", "epoch": "e"}))
        for seq in range(1, 201):
            frame = {"type": "msg", "ch": "user", "seq": seq, "prev": seq - 1, "id": str(seq)}
            await ws.send_message(json.dumps({**frame, "data": {}}))
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = json.loads(await ws.get_message())
                if frame["type"] == "ack":
                    acks.append(frame)

    server = await nursery.start(serve_websocket, node, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/ws"
    with trio.fail_after(20):
        async with open_client(url, token="t", ack_interval=0.2) as client:
            async for msg in client:
                if msg.seq == 200:
                    break
            while not acks or acks[-1]["seq"] != 199:  # the 200th counts once the next is asked
                await trio.sleep(0.05)
    assert [a["ch"] for a in acks] == ["user"] * len(acks)
    assert [a["seq"] for a in acks] == sorted({a["seq"] for a in acks})  # cumulative, rising
    assert len(acks) <= 10  # not one per message


def test_ack_interval_must_be_positive_and_bounded() -> None:
    for bad in (0.0, -1.0, MAX_ACK_INTERVAL + 1):
        with pytest.raises(ValueError, match="ack_interval"):
            Client("ws://127.0.0.1:1/ws", token="t", ack_interval=bad)


async def _reconnect_gap(nursery: trio.Nursery, refuse: Callable[[WebSocketRequest], Any]) -> float:
    """Seconds between a refused handshake and the client's next attempt (tiny backoff)."""
    times: list[float] = []

    async def node(request: WebSocketRequest) -> None:
        times.append(trio.current_time())
        await refuse(request)

    server = await nursery.start(serve_websocket, node, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/ws"
    with trio.fail_after(20):
        async with open_client(url, token="t", backoff_base=0.001, backoff_cap=0.01):
            while len(times) < 2:
                await trio.sleep(0.01)
    return times[1] - times[0]


async def test_a_refusal_after_the_upgrade_is_retried_no_sooner_than_its_retry_after(
    nursery: trio.Nursery,
) -> None:
    """docs/protocol.md, "Close codes": 4503/4429 mean reconnect after at least the error
    frame's ``retry_after``; the SDK's own backoff (here ~10 ms) comes on top."""

    async def unavailable(request: WebSocketRequest) -> None:
        ws = await request.accept()
        frame = {"type": "error", "code": "unavailable", "detail": "x", "retry_after": 0.5}
        await ws.send_message(json.dumps(frame))
        await ws.aclose(4503, "unavailable")

    assert await _reconnect_gap(nursery, unavailable) >= 0.5


async def test_an_http_refusal_is_retried_no_sooner_than_its_retry_after_header(
    nursery: trio.Nursery,
) -> None:
    async def unavailable(request: WebSocketRequest) -> None:
        body = json.dumps({"error": "unavailable", "detail": "x"}).encode()
        await request.reject(503, extra_headers=[(b"Retry-After", b"0.5")], body=body)

    assert await _reconnect_gap(nursery, unavailable) >= 0.5


async def test_without_retry_after_a_refusal_is_retried_after_the_backoff_alone(
    nursery: trio.Nursery,
) -> None:
    async def unavailable(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(json.dumps({"type": "error", "code": "unavailable", "detail": "x"}))
        await ws.aclose(4503, "unavailable")

    assert await _reconnect_gap(nursery, unavailable) < 0.5


async def test_a_node_that_asked_to_wait_is_skipped_for_another(nursery: trio.Nursery) -> None:
    """retry_after keeps the client from the node that said it, not from the cluster: the
    next bootstrap URL answers at once (failover stays fast)."""
    seen: list[str] = []

    async def busy(request: WebSocketRequest) -> None:
        seen.append("busy")
        ws = await request.accept()
        frame = {"type": "error", "code": "unavailable", "detail": "x", "retry_after": 30}
        await ws.send_message(json.dumps(frame))
        await ws.aclose(4503, "unavailable")

    async def free(request: WebSocketRequest) -> None:
        seen.append("free")
        ws = await request.accept()
        json.loads(await ws.get_message())  # the auth frame
        await ws.send_message(json.dumps({"type": "welcome", "node": "n2", "epoch": "e"}))
        await trio.sleep_forever()

    a = await nursery.start(serve_websocket, busy, "127.0.0.1", 0, None)
    b = await nursery.start(serve_websocket, free, "127.0.0.1", 0, None)
    urls = [f"ws://127.0.0.1:{a.port}/ws", f"ws://127.0.0.1:{b.port}/ws"]
    with trio.fail_after(5):
        async with open_client(urls, token="t", backoff_base=0.001, backoff_cap=0.01) as client:
            await client.wait_online()
            assert seen == ["busy", "free"]
            assert client._rotate() == urls[1]  # a still asks us to wait


async def test_a_redirect_to_a_node_that_asked_to_wait_waits_first(nursery: trio.Nursery) -> None:
    times: list[float] = []

    async def owner(request: WebSocketRequest) -> None:
        times.append(trio.current_time())
        ws = await request.accept()
        frame = {"type": "error", "code": "unavailable", "detail": "x", "retry_after": 0.5}
        await ws.send_message(json.dumps(frame))
        await ws.aclose(4503, "unavailable")

    target = await nursery.start(serve_websocket, owner, "127.0.0.1", 0, None)
    owner_url = f"ws://127.0.0.1:{target.port}/ws"

    async def redirector(request: WebSocketRequest) -> None:
        ws = await request.accept()
        frame = {"type": "redirect", "node": "n1", "url": owner_url, "reason": "owner"}
        await ws.send_message(json.dumps(frame))
        await ws.aclose(4302, "redirect")

    other = await nursery.start(serve_websocket, redirector, "127.0.0.1", 0, None)
    urls = [f"ws://127.0.0.1:{other.port}/ws"]
    with trio.fail_after(20):
        async with open_client(urls, token="t", backoff_base=0.001, backoff_cap=0.01):
            while len(times) < 2:
                await trio.sleep(0.01)
    assert times[1] - times[0] >= 0.5


@pytest.mark.parametrize(
    ("given", "kept"),
    [(2, 2.0), (0.25, 0.25), ("3", 3.0), (10**9, MAX_RETRY_AFTER), (float("inf"), MAX_RETRY_AFTER)]
    + [(bad, 0.0) for bad in (-1, "soon", "Wed, 21 Oct 2026 07:28:00 GMT", None, True, [1], "nan")],
)
async def test_retry_after_is_kept_only_when_a_bounded_number(given: object, kept: float) -> None:
    """A value from the network: a number of seconds >= 0, capped; anything else ignored.
    It applies to the node (host:port) that said it, whatever the URL's path or query."""
    client = Client("ws://127.0.0.1:1/ws", token="t")
    client._note_retry_after("ws://127.0.0.1:1/ws?device=d", given)
    assert client._wait_for("ws://127.0.0.1:1/other") == pytest.approx(kept, abs=0.01)
    assert client._wait_for("ws://127.0.0.1:2/ws") == 0


async def test_the_wait_is_per_node_whatever_the_url_says_and_the_soonest_is_asked_first() -> None:
    """The node is host and port (the scheme's default when none); when every node asked to
    wait, the one free soonest is next; a URL that does not parse is its own key."""
    urls = ["ws://a.test/ws", "ws://b.test:80/ws", "wss://c.test/ws"]
    client = Client(urls, token="t")
    client._note_retry_after("ws://a.test:80/ws?device=d", 30)
    client._note_retry_after("ws://B.test/other", 10)
    client._note_retry_after("wss://c.test:443/ws", 20)
    assert client._wait_for(urls[0]) == pytest.approx(30, abs=0.1)
    assert client._wait_for(urls[1]) == pytest.approx(10, abs=0.1)
    assert client._wait_for("ws://c.test/ws") == 0  # port 80: another node
    assert client._rotate() == urls[1]  # every one waits: b is free soonest
    client._note_retry_after("ws://[::1/ws", 5)  # no crash on a URL that does not parse
    assert client._wait_for("ws://[::1/ws") == pytest.approx(5, abs=0.1)
