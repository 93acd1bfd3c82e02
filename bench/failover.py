"""Failover benchmark: SIGKILL a node, time until each of its clients receives again.

Starts a real 3-node cluster (etcd, NATS JetStream, nodes as processes, default lease TTL),
connects CLIENTS SDK clients, kills one node and publishes to every user every PERIOD
seconds through the survivors. Recovery of a client = first message received after the kill
minus the kill time. The reference, measured in the same run, is the budget of invariant 3
(lease TTL + 1 s); the ratio p99 / budget must stay below 1. Also printed: a cold
connect-to-first-message time as a second in-run reference.

    meshpush bench failover [--clients 90] [--ttl 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import trio

from bench._stats import pct
from meshpush.auth import issue_token
from meshpush.client import Client
from meshpush.devcluster import LocalCluster

PERIOD = 0.05


async def run(cluster: LocalCluster, n_clients: int, ttl: float) -> None:
    urls = [n.ws_url for n in cluster.live()]
    users = [f"bench-{i}" for i in range(n_clients)]
    received: dict[str, list[float]] = {u: [] for u in users}
    clients: dict[str, Client] = {}
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:

        async def consume(user: str, client: Client) -> None:
            async for _msg in client:
                received[user].append(time.monotonic())

        async def start(user: str) -> None:
            async def token() -> str:
                return issue_token(cluster.token_secret, user, 3600)

            client = Client(urls, token=token, backoff_cap=1.0)
            clients[user] = client
            nursery.start_soon(client.run)
            nursery.start_soon(consume, user, client)

        cold_start = time.monotonic()
        for user in users:
            await start(user)
        with trio.fail_after(30):
            for c in clients.values():
                await c.wait_online()
        cold = time.monotonic() - cold_start

        async def publish(user: str) -> None:
            for node in cluster.live():
                try:
                    await http.post(
                        f"{node.http_url}/v1/publish",
                        json={"user": user, "data": 1},
                        headers={"authorization": f"Bearer {cluster.api_key}"},
                    )
                    return
                except httpx.TransportError:
                    continue

        async def publisher() -> None:
            while True:
                async with trio.open_nursery() as n:
                    for user in users:
                        n.start_soon(publish, user)
                await trio.sleep(PERIOD)

        nursery.start_soon(publisher)
        await trio.sleep(1.0)
        victim = cluster.node("n2")
        affected = [u for u, c in clients.items() if c.node == "n2"]
        t_kill = time.monotonic()
        victim.proc.send(signal.SIGKILL)
        victim.proc.popen.wait(10)
        recovery: dict[str, float] = {}
        with trio.move_on_after(30):
            while len(recovery) < len(affected):
                for u in affected:
                    after = [t for t in received[u] if t > t_kill + 0.001]
                    if u not in recovery and after:
                        recovery[u] = after[0] - t_kill
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    times = list(recovery.values())
    budget = ttl + 1.0
    print(f"clients {n_clients}, on killed node {len(affected)}, recovered {len(times)}")
    print(
        f"reference: invariant-3 budget (lease TTL + 1 s) = {budget:.2f} s; "
        f"cold connect of {n_clients} clients = {cold:.2f} s"
    )
    if times:
        p50, p99, mx = pct(times, 0.5), pct(times, 0.99), max(times)
        print(
            f"SIGKILL -> receiving again: p50 {p50:.2f} s, p99 {p99:.2f} s, max {mx:.2f} s, "
            f"mean {statistics.mean(times):.2f} s"
        )
        print(f"ratio p99 / budget = {p99 / budget:.2f}  (must be < 1)")
        print(f"ratio p50 / lease TTL = {p50 / ttl:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"meshpush bench {Path(__file__).stem}")
    parser.add_argument("--clients", type=int, default=90)
    parser.add_argument("--ttl", type=int, default=3)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(
            Path(tmp), nodes=3, cluster="bench", node_settings={"lease_ttl": args.ttl}
        ) as cluster,
    ):
        trio.run(run, cluster, args.clients, float(args.ttl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
