"""Fixtures: real etcd, real nats-server -js and real meshpush node processes on 127.0.0.1.

``cluster`` is shared by a test module (3 nodes, short heartbeats and TTLs); tests that kill,
drain or add nodes use ``fresh_cluster`` so they cannot disturb each other. Every process a
fixture starts is stopped by the fixture, whatever the test did, and a node that does not stop
cleanly and promptly (SIGINT: exit 0 within its bound) fails the test or module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpush.local.devcluster import LocalCluster

FAST = {
    "lease_ttl": 2,
    "heartbeat_interval": 1.0,
    "heartbeat_timeout": 3.0,
    "drain_window": 0.5,
    "drain_timeout": 8.0,
    "session_queue": 64,
    "cursor_flush_interval": 0.2,
}


def make_cluster(workdir: Path, nodes: int = 3, **overrides: object) -> LocalCluster:
    """A cluster whose ``with`` block fails if a node still running at its end does not stop
    promptly and cleanly (exit 0 on SIGINT within its bound: docs/operations.md)."""
    node_settings = {**FAST, **overrides}
    return LocalCluster(
        workdir, nodes=nodes, cluster="t", node_settings=node_settings, check_stops=True
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with make_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c
        crashed = [n.id for n in c.members if not n.proc.alive()]
        assert not crashed, f"nodes died during the module: {crashed}"


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with make_cluster(tmp_path / "cluster") as c:
        yield c
