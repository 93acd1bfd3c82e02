"""Failover: a node whose clients report a dead peer (``avoid=``) probes it and revokes its
lease when it refuses connections, instead of waiting for the lease to expire; held handshakes
go ahead to their next owner; a starved node whose lease still lives does not step out.

Cluster tests use real etcd, NATS and node processes (lease TTL 10 s, so that an expiry cannot
explain a fast ring change); the router and the lease watchdog are tested with fakes."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from meshpush.backends.membership import _refuses
from meshpush.server.router import Route, Router
from tests.conftest import make_cluster
from tests.support import connected, token, user_owned_by
from tests.test_chaos_backends import _membership, _Views
from tests.test_router import router, view

LONG_TTL = {"lease_ttl": 10, "handshake_timeout": 3.0}


def test_refuses_only_when_nothing_listens() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not _refuses(f"http://127.0.0.1:{port}")  # listening: alive
    assert _refuses(f"http://127.0.0.1:{port}")  # closed: refused
    assert not _refuses(f"http://0.0.0.0:{port}")  # names this host, not the peer
    assert not _refuses(f"http://[::]:{port}")


@pytest.mark.cluster
def test_killed_node_leaves_the_ring_long_before_its_lease_expires(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", **LONG_TTL) as cluster:

        async def main() -> None:
            user = await user_owned_by(cluster, "n2")
            async with connected(cluster, user, via=cluster.node("n2")) as client:
                assert client.node == "n2"
                killed = time.monotonic()
                cluster.kill(cluster.node("n2"))
                with trio.fail_after(6):  # well before the 10 s lease could expire
                    while client.node in (None, "n2") or client.state.value != "online":
                        await trio.sleep(0.05)
                assert time.monotonic() - killed < 6
            for node in cluster.live():
                assert cluster.view_of(node) == ["n1", "n3"]

        trio.run(main)


@pytest.mark.cluster
def test_a_clients_avoid_claim_alone_removes_no_live_node(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", **LONG_TTL) as cluster:

        async def main() -> None:
            user = await user_owned_by(cluster, "n2")
            n1 = cluster.node("n1")
            url = f"{n1.ws_url}?token={token(cluster, user)}&avoid=n2"
            started = time.monotonic()
            async with open_websocket_url(url) as ws:  # held, then redirected to n2 anyway
                with trio.fail_after(10):
                    frame = await ws.get_message()
            assert '"redirect"' in frame and '"n2"' in frame
            assert time.monotonic() - started >= 2.5  # held for the patience (handshake_timeout)
            for node in cluster.live():
                assert cluster.view_of(node) == ["n1", "n2", "n3"]

        trio.run(main)


def _users_by_next_owner(r: Router, dead: str) -> dict[str, str]:
    """One user per next owner among the users ``dead`` owns now."""
    after = r.ring.without(dead)
    found: dict[str, str] = {}
    for i in range(2000):
        user = f"u{i}"
        if r.ring.owner(user) == dead:
            found.setdefault(str(after.owner(user)), user)
    return found


async def test_held_handshakes_go_to_the_next_owner_once_the_peer_is_probed_dead() -> None:
    r, _ = router()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await r.apply(view("n1", "n2", "n3"), registered=True)
        users = _users_by_next_owner(r, "n2")
        to_n3, to_me = users["n3"], users["n1"]
        # a bare claim (no probe result): held for the patience, then the ring's answer
        route = await r.route_avoiding(to_n3, "n2", patience=0.2)
        assert route.kind == "redirect" and route.node is not None and route.node.id == "n2"
        results: dict[str, Route] = {}

        async def held(user: str) -> None:
            results[user] = await r.route_avoiding(user, "n2", patience=5)

        nursery.start_soon(held, to_n3)
        nursery.start_soon(held, to_me)
        await trio.sleep(0.1)
        assert not results  # both held
        r.peer_dead("n2")  # the probe found n2 refusing connections
        await trio.sleep(0.1)
        assert set(results) == {to_n3}  # sent ahead to n3 before the ring changes
        assert results[to_n3].node is not None and results[to_n3].node.id == "n3"
        await r.apply(view("n1", "n3"), registered=True)  # the lease is gone: the ring moves
        await trio.sleep(0.1)
        assert results[to_me].kind == "local"
        # a node that came back (new registration) under the same id is not "dead" any more
        await r.apply(view("n1", "n2", "n3"), registered=True)
        route = await r.route_avoiding(to_n3, "n2", patience=0.2)
        assert route.node is not None and route.node.id == "n2"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("lives", [True, False])
async def test_a_late_keepalive_does_not_step_out_while_etcd_holds_the_lease(
    autojump_clock: Any, lives: bool
) -> None:
    """A node starved during a failover surge missed its keepalive deadline while its lease
    was still alive: it stepped out and bounced its clients. It now asks etcd first."""
    views = _Views()
    m = _membership(views)
    m._lease_at = trio.current_time()

    async def others_reach_etcd() -> bool:
        return True

    async def lease_lives() -> bool:
        return lives

    m._others_reach_etcd = others_reach_etcd  # type: ignore[method-assign]
    m._lease_lives = lease_lives  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m._watch_lease)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert m.stepped_out is not lives
