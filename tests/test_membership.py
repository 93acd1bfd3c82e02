"""Leaving never raises, whatever etcd does (fake aetcd client, no server).

The real thing (etcd stopped, then SIGTERM/SIGINT of a node) is in tests/test_health.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio_asyncio

from meshpush.backends.bridge import aio
from meshpush.backends.membership import Membership
from meshpush.core.ring import NodeInfo, View
from meshpush.local.devcluster import LocalCluster
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings


@dataclass
class Lease:
    id: int = 7


class FakeEtcd:
    def __init__(self, revoke: str) -> None:
        self.revoke = revoke
        self.revoked = 0

    async def revoke_lease(self, lease_id: int) -> None:
        self.revoked += 1
        if self.revoke == "cancelled":  # grpc, when the channel is closed under the call
            raise asyncio.CancelledError()
        if self.revoke == "error":
            raise ConnectionError("etcd gone")
        if self.revoke == "stalled":
            await asyncio.sleep(3600)


async def ignore_view(view: View, registered: bool) -> None:
    pass


def etcd_errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("meshpush_backend_errors_total", {"backend": "etcd"})
    return value or 0


@pytest.mark.parametrize("revoke", ["ok", "cancelled", "error", "stalled"])
async def test_leave_never_raises_and_is_done_once(revoke: str) -> None:
    metrics = Metrics("n1")
    membership = Membership(Settings(node_id="n1"), ignore_view, metrics)
    fake = FakeEtcd(revoke)
    membership._client, membership._lease, membership.registered = fake, Lease(), True
    async with trio_asyncio.open_loop():
        await membership.leave()
        await membership.leave()  # drain, then stop: the second one does nothing
    assert fake.revoked == 1
    assert not membership.registered
    assert etcd_errors(metrics) == (0 if revoke == "ok" else 1)
    up = metrics.registry.get_sample_value("meshpush_backend_up", {"backend": "etcd"})
    assert up == 0


@pytest.mark.cluster
async def test_a_peer_that_registers_between_our_list_and_our_watch_is_seen_at_once(
    tmp_path: Path,
) -> None:
    """The watch starts right after the revision of the list the view came from: a peer
    whose key is put in between is an event, not a wait for the periodic re-list (every
    ``lease_ttl``, 30 s here; the test allows 10)."""
    with LocalCluster(tmp_path, nodes=0, cluster="w") as cluster:
        views: list[list[str]] = []

        async def on_view(view: View, registered: bool) -> None:
            views.append(sorted(view))

        m = Membership(cluster.settings_for("a").replace(lease_ttl=30), on_view, Metrics("a"))
        listed = m._list
        lists = 0

        async def list_then_a_peer_joins() -> View:
            nonlocal lists
            view = await listed()
            lists += 1
            if lists == 2:  # the list that ends our registration: the watch starts next
                peer = NodeInfo("b", "ws://b", "http://b", 0.0).to_json().encode()
                await aio(m._client.put)(m.prefix + b"b", peer)
            return view

        m._list = list_then_a_peer_joins  # type: ignore[method-assign]
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            nursery.start_soon(m.run)
            with trio.fail_after(10):
                while ["a", "b"] not in views:
                    await trio.sleep(0.05)
            assert lists >= 3  # a list after the event, long before the re-list
            await m.leave()
            nursery.cancel_scope.cancel()
