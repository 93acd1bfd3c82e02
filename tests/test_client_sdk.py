"""The trio SDK against tiny local WebSocket servers (no cluster needed)."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from meshpush.client import MAX_ACK_INTERVAL, Client, open_client


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
