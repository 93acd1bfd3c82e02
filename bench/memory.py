"""Memory per idle session: RSS of one node before and after N idle WebSocket sessions.

Starts a 1-node cluster (etcd, NATS JetStream, one node process), opens N sessions (distinct
users, no traffic) from this process, waits for them to settle and reads the node's RSS from
/proc. Reference, from the same run: the mission's budget of 10 KB per connection; the ratio
(measured / budget) is printed.

    python bench/memory.py [--sessions 2000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from meshpush.auth import issue_token
from meshpush.devcluster import LocalCluster

BUDGET = 10 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def run(cluster: LocalCluster, n: int) -> None:
    node = cluster.live()[0]
    await trio.sleep(1.0)
    before = rss(node.proc.pid)
    opened = 0

    async def hold(i: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal opened
        token = issue_token(cluster.token_secret, f"idle-{i}", 3600)
        async with open_websocket_url(f"{node.ws_url}?token={token}&device=d") as ws:
            await ws.get_message()
            opened += 1
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            await nursery.start(hold, i)
        await trio.sleep(2.0)
        after = rss(node.proc.pid)
        nursery.cancel_scope.cancel()
    per = (after - before) / max(1, opened)
    print(f"sessions {opened}; node RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    print(
        f"per idle session: {per / 1024:.1f} KiB (reference budget 10 KiB: ratio "
        f"{per / BUDGET:.2f})"
    )


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
