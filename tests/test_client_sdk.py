"""The trio SDK against tiny local WebSocket servers (no cluster needed)."""

from __future__ import annotations

import trio
from trio_websocket import WebSocketRequest, serve_websocket

from meshpush.client import open_client


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
