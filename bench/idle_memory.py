"""Memory per idle session: RSS of one node before and after N idle WebSocket sessions.

Starts a 1-node cluster (etcd, NATS JetStream, one node process), opens N sessions (distinct
users, no traffic) from this process, waits for them to settle and reads the node's RSS from
/proc. References, from the same run: a bare trio-websocket server holding N connections
(bench/bare_ws_server.py: the floor of the stack meshpush is built on), and the mission's
budget of 10 KB per connection; both ratios are printed.

    python bench/memory.py [--sessions 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from meshpush.auth import issue_token
from meshpush.devcluster import LocalCluster, free_port

BUDGET = 10 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def per_connection(pid: int, url_for: Callable[[int], str], n: int) -> float:
    """Bytes of RSS one more idle connection costs the server process ``pid``."""
    await trio.sleep(1.0)
    before = rss(pid)
    opened = 0

    async def hold(i: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal opened
        async with open_websocket_url(url_for(i)) as ws:
            await ws.get_message()
            opened += 1
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            await nursery.start(hold, i)
        await trio.sleep(2.0)
        after = rss(pid)
        nursery.cancel_scope.cancel()
    print(f"  pid {pid}: {opened} connections, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    return (after - before) / max(1, opened)


async def run(cluster: LocalCluster, n: int) -> None:
    node = cluster.live()[0]

    def session_url(i: int) -> str:
        return f"{node.ws_url}?token={issue_token(cluster.token_secret, f'idle-{i}', 3600)}"

    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_ws_server.py")), str(port)]
    )
    try:
        wait_tcp_port(port)
        reference = await per_connection(bare.pid, lambda i: f"ws://127.0.0.1:{port}/", n)
    finally:
        bare.kill()
        bare.wait(10)
    per = await per_connection(node.proc.pid, session_url, n)
    print(
        f"per idle session: meshpush {per / 1024:.1f} KiB, bare trio-websocket "
        f"{reference / 1024:.1f} KiB (ratio {per / max(reference, 1):.2f}); "
        f"budget 10 KiB (ratio {per / BUDGET:.2f})"
    )


def wait_tcp_port(port: int) -> None:
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("reference server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    settings = {"max_connections_per_ip": 100_000, "heartbeat_interval": 25.0}
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(Path(tmp), nodes=1, cluster="mem", node_settings=settings) as cluster,
    ):
        trio.run(run, cluster, args.sessions)


if __name__ == "__main__":
    main()
