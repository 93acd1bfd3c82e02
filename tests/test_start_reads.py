"""``Store.start_reads`` against a real ``nats-server -js``: the batched multi-last reads of
the users' newest seqs, the cursors (also from a bucket made before it allowed direct gets)
and the newest broadcast."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import pytest
import trio
import trio_asyncio

from meshpush.backends.bridge import Bridge, aio
from meshpush.backends.bus import Bus
from meshpush.backends.store import Cursor, Cursors, Store, cursor_key, stream_subject
from meshpush.local.devcluster import LocalCluster
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("start-reads"), nodes=0) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def _store(backends: LocalCluster, name: str, old_bucket: bool) -> AsyncIterator[Store]:
    settings = Settings(node_id="t", cluster=name, nats_url=backends.nats_url)
    metrics = Metrics("t")
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        bridge = await nursery.start(Bridge().run)
        bus = await nursery.start(Bus(settings, bridge, metrics).run)
        if old_bucket:  # as an older meshpush made it: no direct gets
            await aio(bus.js.create_key_value)(bucket=f"MP_{name}_CURSORS", history=1)
        store = Store(settings, bus, bridge, metrics)
        await store.setup()
        yield store
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("old_bucket", [False, True])
async def test_one_batch_reads_newest_seqs_cursors_and_the_broadcast_end(
    backends: LocalCluster, old_bucket: bool
) -> None:
    name = f"sr{int(old_bucket)}"
    async with _store(backends, name, old_bucket) as store:
        users = ["alice", "bob.x*>", "carol ü"]  # encoded into subjects
        seqs = {}
        for user in users[:2]:
            for i in range(3):
                seqs[user] = (await store.publish("user", user, f"{user}-{i}", "{}")).seq
        bcast = (await store.publish("broadcast", None, "b1", "{}")).seq
        cursors = Cursors(store, Metrics("c"))
        cursors.save("alice", "phone", Cursor(2, 1, store.epoch))
        cursors.save("bob.x*>", "tab let", Cursor(5, 0, store.epoch))
        cursors.save("carol ü", "gone", Cursor(9, 9, store.epoch))
        await cursors.flush()
        await aio(store.kv.delete)(cursor_key("carol ü", "gone"))
        keys = [
            cursor_key(u, d)
            for u, d in [("alice", "phone"), ("bob.x*>", "tab let"), ("carol ü", "gone")]
        ]
        keys.append(cursor_key("dave", "new"))
        found = await store.start_reads(users, keys)
        assert found.users == seqs  # carol has no message: absent
        assert found.broadcast == bcast
        assert found.cursors == {
            keys[0]: Cursor(2, 1, store.epoch),
            keys[1]: Cursor(5, 0, store.epoch),
        }  # deleted and missing cursors: absent
        info = await aio(store.bus.js.stream_info)(f"KV_MP_{name}_CURSORS")
        assert info.config.allow_direct  # an old bucket was switched in place


class _FakeJS:
    """get_msg as nats-py has it: last_by_subj from the leader, or a direct get (any replica)."""

    def __init__(self, leader: dict[str, int], replica: dict[str, int]) -> None:
        self.leader, self.replica = leader, replica
        self.calls: list[tuple[str, bool]] = []

    async def get_msg(self, stream: str, subject: str, direct: bool = False) -> Any:
        self.calls.append((subject, direct))
        seq = (self.replica if direct else self.leader).get(subject)
        if seq is None:
            raise nats.js.errors.NotFoundError
        return SimpleNamespace(seq=seq)


def test_with_replicas_the_newest_seqs_that_decide_nothing_to_read_come_from_the_leader() -> None:
    """A lagging replica answered the multi-last direct get with an older seq: the handshake
    read nothing, went live and lost the message the leader had already acknowledged."""
    settings = Settings(node_id="t", cluster="c", stream_replicas=3)
    store = Store(settings, SimpleNamespace(), None, Metrics("t"))  # type: ignore[arg-type]
    subject = stream_subject(settings, "user", "u5")
    bcast = stream_subject(settings, "broadcast", None)
    store.bus.js = _FakeJS({subject: 1389, bcast: 47}, {subject: 1363, bcast: 46})

    async def reads() -> tuple[dict[str, int], int]:
        return await store._last_of_users(["u5", "new"]), await store._last_broadcast()

    assert asyncio.run(reads()) == ({"u5": 1389}, 47)
    assert not any(direct for _, direct in store.bus.js.calls)
