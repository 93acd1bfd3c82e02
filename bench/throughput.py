"""Durable unicast benchmark: publish -> deliver rate and latency on a 3-node cluster.

Starts a real cluster (etcd, NATS JetStream, 3 node processes), connects USERS SDK clients,
then publishes MESSAGES unicasts through all nodes' HTTP APIs with CONCURRENCY requests in
flight. Latency = time the SDK yields a message - time its publish request was sent (one
machine, one clock). Reference, measured in the same run: the same number of JetStream
publishes straight from nats-py to one stream (no HTTP, no meshpush), the floor of what a
durable store costs here. Prints rates, p50/p99 latency and the ratio to the reference.

    meshpush bench throughput [--messages 5000] [--users 50] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
import nats
import trio

from bench._stats import pct
from meshpush.client import Client
from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reference(nats_url: str, n: int) -> float:
    """Raw JetStream publishes/s from one asyncio client, 32 in flight."""

    async def go() -> float:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await js.add_stream(name="BENCHREF", subjects=["benchref.>"])
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                await js.publish(f"benchref.{i % 50}", b'{"x":1}')

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        await nc.close()
        return n / elapsed

    return asyncio.run(go())


async def run(cluster: LocalCluster, messages: int, users: int, concurrency: int) -> None:
    urls = [n.ws_url for n in cluster.live()]
    names = [f"tp-{i}" for i in range(users)]
    latencies: list[float] = []
    sent_at: dict[str, float] = {}
    done = trio.Event()
    async with trio.open_nursery() as nursery:

        async def consume(client: Client) -> None:
            async for msg in client:
                latencies.append(time.perf_counter() - sent_at[msg.id])
                if len(latencies) >= messages:
                    done.set()

        clients = []
        for user in names:

            async def token(user: str = user) -> str:
                return issue_token(cluster.token_secret, user, 3600)

            client = Client(urls, token=token)
            clients.append(client)
            nursery.start_soon(client.run)
            nursery.start_soon(consume, client)
        with trio.fail_after(30):
            for c in clients:
                await c.wait_online()

        headers = {"authorization": f"Bearer {cluster.api_key}"}
        nodes = [n.http_url for n in cluster.live()]
        limiter = trio.CapacityLimiter(concurrency)
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as http:

            async def publish(i: int) -> None:
                async with limiter:
                    msg_id = f"m{i}"
                    sent_at[msg_id] = time.perf_counter()
                    body = {"user": names[i % users], "data": {"i": i}, "id": msg_id}
                    resp = await http.post(f"{nodes[i % 3]}/v1/publish", json=body, headers=headers)
                    assert resp.status_code == 202, resp.text

            pids = [n.proc.pid for n in cluster.live()]
            cpu_before = sum(cpu_seconds(p) for p in pids)
            start = time.perf_counter()
            async with trio.open_nursery() as pubs:
                for i in range(messages):
                    pubs.start_soon(publish, i)
            published = time.perf_counter() - start
            with trio.move_on_after(60):
                await done.wait()
            delivered = time.perf_counter() - start
            node_cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        nursery.cancel_scope.cancel()

    ref = await trio.to_thread.run_sync(reference, cluster.nats_url, messages)
    rate = len(latencies) / delivered
    print(f"messages {messages}, users {users}, concurrency {concurrency}, nodes 3")
    print(f"publish rate (202s/s)          {messages / published:8.0f}")
    print(f"publish->deliver rate (msg/s)  {rate:8.0f}  delivered {len(latencies)}/{messages}")
    p50, p99, worst = (pct(latencies, 0.5), pct(latencies, 0.99), max(latencies))
    print(f"latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    print(
        f"node CPU per message (3 nodes together): {node_cpu / len(latencies) * 1000:.2f} ms"
        f"  ({os.cpu_count()} cores shared by nodes, NATS, etcd and this load generator)"
    )
    print(f"reference: raw JetStream publishes/s from nats-py = {ref:.0f}")
    print(f"ratio meshpush durable delivery / raw JetStream publish = {rate / ref:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"meshpush bench {Path(__file__).stem}")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(Path(tmp), nodes=3, cluster="bench") as cluster,
    ):
        try:
            trio.run(run, cluster, args.messages, args.users, args.concurrency)
        finally:
            for node in cluster.members:
                if not node.proc.alive():
                    print(f"node {node.id} died:\n{node.proc.log()[-3000:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
