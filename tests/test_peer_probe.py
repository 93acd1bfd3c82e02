"""Fast failure detection: a node whose clients report a dead peer (``avoid=``) probes it and
revokes its lease when it refuses connections, instead of waiting for the lease to expire.

Real etcd, NATS and node processes (``fresh_cluster``-style, lease TTL 10 s so that an
expiry cannot explain a fast ring change)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from meshpush.membership import _refuses
from tests.conftest import make_cluster
from tests.support import connected, token, user_owned_by

LONG_TTL = {"lease_ttl": 10, "handshake_timeout": 3.0}


def test_refuses_only_when_nothing_listens() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not _refuses(f"http://127.0.0.1:{port}")  # listening: alive
    assert _refuses(f"http://127.0.0.1:{port}")  # closed: refused


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
