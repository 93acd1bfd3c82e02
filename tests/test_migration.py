"""Membership changes on a live cluster: join, SIGTERM drain, SIGKILL, etcd outage."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from support import connected, owner_of, publish, receive, wait_until

from meshpush.client import Client
from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster
USERS = [f"mig-{i}" for i in range(24)]


@asynccontextmanager
async def many_clients(cluster: LocalCluster, users: list[str]) -> AsyncIterator[dict[str, Client]]:
    async with AsyncExitStack() as stack:
        clients = {u: await stack.enter_async_context(connected(cluster, u)) for u in users}
        yield clients


async def assert_all_receive(cluster: LocalCluster, clients: dict[str, Client], tag: str) -> None:
    """Publish one message per user through a live node; every client must get its own."""
    node = cluster.live()[0]
    for user in clients:
        await publish(cluster, node, user, {"tag": tag, "user": user})
    for user, client in clients.items():
        while True:
            msg = await receive(client, timeout=20)
            if msg.data.get("tag") == tag:
                assert msg.data["user"] == user
                break


def users_on(clients: dict[str, Client], node: str) -> list[str]:
    return [u for u, c in clients.items() if c.node == node]


async def on_owners(cluster: LocalCluster, clients: dict[str, Client]) -> bool:
    for user, client in clients.items():
        if client.state.value != "online" or client.node != await owner_of(cluster, user):
            return False
    return True


async def test_new_node_takes_over_its_users(fresh_cluster: LocalCluster) -> None:
    async with many_clients(fresh_cluster, USERS) as clients:
        await trio.to_thread.run_sync(fresh_cluster.start_node)
        await wait_until(lambda: on_owners(fresh_cluster, clients), timeout=20)
        moved = users_on(clients, "n4")
        assert moved, "the ring gave the new node none of 24 users"
        assert all(clients[u].stats.redirects >= 1 for u in moved)
        await assert_all_receive(fresh_cluster, clients, "after-join")


async def test_sigterm_drains_sessions_before_exit(fresh_cluster: LocalCluster) -> None:
    async with many_clients(fresh_cluster, USERS) as clients:
        victim = fresh_cluster.node("n2")
        on_victim = users_on(clients, "n2")
        assert on_victim
        victim.proc.send(signal.SIGTERM)
        code = await trio.to_thread.run_sync(victim.proc.popen.wait, 20)
        assert code == 0
        # every session of the drained node was told where to go (redirect), not just dropped
        assert all(clients[u].stats.redirects >= 1 for u in on_victim)
        await wait_until(lambda: on_owners(fresh_cluster, clients), timeout=20)
        assert all(c.node != "n2" for c in clients.values())
        await assert_all_receive(fresh_cluster, clients, "after-drain")


async def test_sigkill_users_come_back_after_lease_expiry(fresh_cluster: LocalCluster) -> None:
    async with many_clients(fresh_cluster, USERS) as clients:
        victim = fresh_cluster.node("n3")
        on_victim = users_on(clients, "n3")
        assert on_victim
        fresh_cluster.kill(victim)
        # generous bound: lease TTL (2 s) + reconnect backoff; the real time is a benchmark
        await wait_until(lambda: on_owners(fresh_cluster, clients), timeout=30)
        assert all(c.node != "n3" for c in clients.values())
        await assert_all_receive(fresh_cluster, clients, "after-kill")


async def test_etcd_outage_keeps_sessions_and_reregisters(fresh_cluster: LocalCluster) -> None:
    user = "through-the-outage"
    async with connected(fresh_cluster, user) as client:
        etcd = fresh_cluster.etcd
        assert etcd is not None
        etcd.stop(signal.SIGKILL)
        await trio.sleep(1.0)
        # sessions and delivery do not need etcd
        await publish(fresh_cluster, fresh_cluster.live()[0], user, "during")
        assert (await receive(client)).data == "during"
        await trio.to_thread.run_sync(fresh_cluster.start_etcd)
        await trio.to_thread.run_sync(fresh_cluster.wait_converged)
        for node in fresh_cluster.live():
            await trio.to_thread.run_sync(fresh_cluster.wait_ready, node)
        await publish(fresh_cluster, fresh_cluster.live()[1], user, "after")
        assert (await receive(client)).data == "after"
