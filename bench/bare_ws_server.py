"""Reference for bench/memory.py: a bare trio-websocket server that accepts, greets and holds.

python bench/bare_ws_server.py PORT
"""

from __future__ import annotations

import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        await ws.send_message('{"type":"welcome"}')
        while True:
            await ws.get_message()
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    await serve_websocket(handler, "127.0.0.1", port, ssl_context=None)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
