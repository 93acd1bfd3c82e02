"""Leaving never raises, whatever etcd does (fake aetcd client, no server).

The real thing (etcd stopped, then SIGTERM/SIGINT of a node) is in tests/test_health.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import trio_asyncio

from meshpush.backends.membership import Membership
from meshpush.core.ring import View
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
