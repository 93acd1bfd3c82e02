"""Big publish requests as one JetStream atomic batch, against a real ``nats-server -js``:
exact chains (also across batches and single publishes), retries answered ``duplicate`` per
item, stale chain hints and concurrent publishers from several stores (the batch is refused,
the request goes in rounds), and a stream without ``allow_atomic`` (rounds)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats.js.api
import pytest
import trio
import trio_asyncio

from meshpush.backends.bridge import Bridge, aio
from meshpush.backends.bus import Bus
from meshpush.backends.store import (
    MAX_ATOMIC_BATCH,
    OPENED_MAX_AGE,
    SMALL_REQUEST,
    Outcome,
    Outgoing,
    Store,
    Stored,
    atomic_allowed,
    stream_subject,
)
from meshpush.local.devcluster import LocalCluster
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("atomic"), nodes=0) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def stores(
    backends: LocalCluster, name: str, count: int = 1, **settings_: Any
) -> AsyncIterator[list[Store]]:
    """``count`` stores on one cluster's streams, as that many nodes have."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        found = []
        for k in range(count):
            settings = Settings(
                node_id=f"n{k}", cluster=name, nats_url=backends.nats_url, **settings_
            )
            metrics = Metrics(f"n{k}")
            bridge = await nursery.start(Bridge().run)
            bus = await nursery.start(Bus(settings, bridge, metrics).run)
            bus.peers_read_batches = True  # as a router sets it: every node reads batches
            store = Store(settings, bus, bridge, metrics)
            await store.setup()
            found.append(store)
        yield found
        nursery.cancel_scope.cancel()


def batch(tag: str, users: list[str], per_user: int) -> list[Outgoing]:
    """``per_user`` messages of every user, interleaved (u0, u1, .., u0, u1, ..)."""
    return [
        Outgoing("user", u, f"{tag}-{u}-{k}", f'"{tag}-{u}-{k}"')
        for k in range(per_user)
        for u in users
    ]


async def chain_of(store: Store, user: str) -> list[tuple[int, int, str]]:
    """The user's stored (seq, prev, id), read back from the stream."""
    return [(m.seq, m.prev, m.id) for m in await store.read_after("user", user, 0, 1000)]


def assert_exact(chain: list[tuple[int, int, str]]) -> None:
    assert [prev for _, prev, _ in chain] == [0] + [seq for seq, _, _ in chain[:-1]]


def stored(outcomes: Any) -> list[Stored]:
    assert all(isinstance(o, Stored) for o in outcomes), outcomes
    return list(outcomes)


async def test_a_batch_is_stored_with_exact_chains_across_batches_and_single_publishes(
    backends: LocalCluster,
) -> None:
    users = ["a", "b.c", "ü d"]
    async with stores(backends, "at1") as [store]:
        assert store.atomic
        first = stored(await store.publish_many(batch("x", users, 4)))
        one = await store.publish("user", "a", "single", '"single"')
        second = stored(await store.publish_many(batch("y", users, 3)))
        assert store.atomic_batches == 2 and store.atomic_fallbacks == 0
        assert [s.seq for s in first] == list(range(first[0].seq, first[0].seq + 12))
        assert not any(s.duplicate for s in first + second)
        for user in users:
            chain = await chain_of(store, user)
            assert_exact(chain)
            expected = [f"x-{user}-{k}" for k in range(4)] + (["single"] if user == "a" else [])
            assert [i for _, _, i in chain] == expected + [f"y-{user}-{k}" for k in range(3)]
        # the answers are what the stream holds
        answered = {(s.seq, s.prev) for s in first + second + [one]}
        held = {(seq, prev) for u in users for seq, prev, _ in await chain_of(store, u)}
        assert answered == held


async def test_a_retried_batch_answers_duplicate_per_item_and_stores_nothing_new(
    backends: LocalCluster,
) -> None:
    async with stores(backends, "at2") as [store]:
        items = batch("r", ["p", "q"], 5)
        first = stored(await store.publish_many(items))
        end = await store.end_seq("user")
        again = stored(await store.publish_many(items))
        assert [(s.seq, s.duplicate) for s in again] == [(s.seq, True) for s in first]
        assert await store.end_seq("user") == end
        assert store.atomic_fallbacks == 1  # the batch was refused whole, rounds answered
        # some ids stored, some new: the stored ones are duplicates, the new ones chained on
        mixed = items[:4] + batch("n", ["p", "q"], 3)
        outcomes = stored(await store.publish_many(mixed))
        assert [s.duplicate for s in outcomes] == [True] * 4 + [False] * 6
        for user in ["p", "q"]:
            chain = await chain_of(store, user)
            assert_exact(chain)
            assert len(chain) == 8


async def test_a_stale_chain_hint_is_read_again_and_the_batch_sent_once_more(
    backends: LocalCluster,
) -> None:
    async with stores(backends, "at3", count=2) as [a, b]:
        users = ["s1", "s2", "s3"]
        stored(await a.publish_many(batch("a1", users, 3)))
        await b.publish("user", "s2", "from-b", '"b"')  # a's hint for s2 is stale now
        later = stored(await a.publish_many(batch("a2", users, 3)))
        assert a.hint_refreshes == 1 and a.atomic_batches == 2 and a.atomic_fallbacks == 0
        assert a.statistics().chain_retries == {"wrong_last": 0, "hint_refresh": 1}
        assert a.statistics().atomic_batches == {"stored": 2, "refused": 0, "timeout": 0}
        assert [s.seq for s in later] == list(range(later[0].seq, later[0].seq + 9))
        for user in users:
            assert_exact(await chain_of(a, user))


async def test_a_batch_refused_again_after_the_hints_were_read_goes_in_rounds(
    backends: LocalCluster,
) -> None:
    async with stores(backends, "at7", count=2) as [a, b]:
        users = ["t1", "t2"]
        stored(await a.publish_many(batch("a1", users, 5)))
        await b.publish("user", "t1", "from-b", '"b"')
        read = a._last_of_users

        async def read_then_publish(users: list[str]) -> dict[str, int]:
            lasts = await read(users)  # another node publishes between the read and the batch
            await b.bus.js.publish(
                stream_subject(b.settings, "user", "t2"),
                b"1",
                headers={"Mp-Prev": str(lasts["t2"]), "Nats-Msg-Id": "raced"},
            )
            return lasts

        a._last_of_users = read_then_publish  # type: ignore[method-assign]
        later = stored(await a.publish_many(batch("a2", users, 5)))
        assert a.hint_refreshes == 1 and a.atomic_fallbacks == 1 and a.atomic_batches == 1
        assert not any(s.duplicate for s in later)
        for user in users:
            assert_exact(await chain_of(a, user))


async def test_concurrent_batches_from_several_stores_keep_chains_exact(
    backends: LocalCluster,
) -> None:
    users = [f"c{k}" for k in range(5)]
    rounds = 6
    outcomes: list[Outcome] = []
    async with stores(backends, "at4", count=3) as nodes:

        async def publisher(node: int, store: Store) -> None:
            for r in range(rounds):
                outcomes.extend(await store.publish_many(batch(f"{node}-{r}", users, 2)))
                outcomes.append(await store.publish("user", users[r % 5], f"{node}-{r}", "1"))

        async with trio.open_nursery() as nursery:
            for node, store in enumerate(nodes):
                nursery.start_soon(publisher, node, store)
        assert len(stored(outcomes)) == 3 * rounds * 11
        assert sum(s.atomic_batches for s in nodes) > 0
        for user in users:
            chain = await chain_of(nodes[0], user)
            assert_exact(chain)
            for node in range(3):  # each store's messages of one user keep their order
                mine = [i for _, _, i in chain if i.startswith(f"{node}-")]
                order = [(f"{node}-{r}-{user}-{k}") for r in range(rounds) for k in range(2)]
                assert [i for i in mine if i.count("-") == 3] == order


async def test_a_stream_without_allow_atomic_is_stored_in_rounds(
    backends: LocalCluster,
) -> None:
    async with stores(backends, "at5") as [store]:
        js = store.bus.js
        info = await aio(js.stream_info)(store.streams["user"])
        info.config.allow_atomic = False
        await aio(js.update_stream)(info.config)
        items = batch("o", ["o1", "o2"], SMALL_REQUEST)
        outcomes = stored(await store.publish_many(items))  # refused as a batch: rounds
        assert not store.atomic and store.atomic_batches == 0
        assert not any(s.duplicate for s in outcomes)
        for user in ["o1", "o2"]:
            assert_exact(await chain_of(store, user))
        stored(await store.publish_many(batch("p", ["o1"], SMALL_REQUEST + 1)))
        assert store.atomic_fallbacks == 1  # atomic batches are off now: no second try


async def test_with_atomic_batches_off_a_big_request_goes_in_rounds(
    backends: LocalCluster,
) -> None:
    async with stores(backends, "at8", atomic_batches=False) as [store]:
        assert not store.atomic  # the server allows them; the setting says no
        outcomes = stored(await store.publish_many(batch("o", ["v1", "v2"], 5)))
        assert store.atomic_batches == store.atomic_fallbacks == 0
        assert not any(s.duplicate for s in outcomes)
        for user in ["v1", "v2"]:
            chain = await chain_of(store, user)
            assert_exact(chain)
            assert [i for _, _, i in chain] == [f"o-{user}-{k}" for k in range(5)]


async def test_while_a_node_cannot_read_atomic_batches_a_big_request_goes_in_rounds(
    backends: LocalCluster,
) -> None:
    """A rolling upgrade from a version before atomic batches: while such a node is in the
    ring view (the router clears ``peers_read_batches``), big requests are stored in rounds,
    every message with its own ``Mp-Prev``; batches again once it is gone."""
    async with stores(backends, "at9") as [store]:
        store.bus.peers_read_batches = False
        stored(await store.publish_many(batch("r", ["w1", "w2"], 5)))
        assert store.atomic and store.atomic_batches == store.atomic_fallbacks == 0
        store.bus.peers_read_batches = True
        stored(await store.publish_many(batch("s", ["w1", "w2"], 5)))
        assert store.atomic_batches == 1
        for user in ["w1", "w2"]:
            chain = await chain_of(store, user)
            assert_exact(chain)
            assert len(chain) == 10
        get = trio_asyncio.aio_as_trio(store.bus.js.get_msg)
        kinds = []
        for seq, _, _ in await chain_of(store, "w1"):
            headers = (await get(store.streams["user"], seq)).headers or {}
            kinds.append("back" if "Mp-Prev-Back" in headers else "prev")
        assert kinds == ["prev"] * 5 + ["prev"] + ["back"] * 4  # rounds, then one batch


def stream_info(**config: Any) -> nats.js.api.StreamInfo:
    """A stream info as the server answers it (nats-py parses the dict in place)."""
    state = {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0, "consumer_count": 0}
    return nats.js.api.StreamInfo.from_response(
        {
            "config": {"name": "MP_t_USER", **config},
            "state": state,
            "created": "2026-11-27T12:00:00Z",
        }
    )


def test_atomic_batches_only_where_the_server_echoed_allow_atomic() -> None:
    """An older server ignores the field: the stream info it answers has none."""
    assert not atomic_allowed(stream_info())
    assert not atomic_allowed(stream_info(allow_atomic=False))
    assert atomic_allowed(stream_info(allow_atomic=True))


async def test_one_id_twice_in_a_request_is_stored_once(backends: LocalCluster) -> None:
    """JetStream refuses a batch with an id twice; the rounds store the first and answer the
    second as its duplicate, as for any request."""
    async with stores(backends, "at6") as [store]:
        items = batch("d", ["d1", "d2"], 5)
        items[6] = items[2]  # d1's second message, again as its fourth
        outcomes = stored(await store.publish_many(items))
        assert store.atomic_batches == 0 and store.atomic_fallbacks == 1
        assert (outcomes[6].seq, outcomes[6].duplicate) == (outcomes[2].seq, True)
        chain = await chain_of(store, "d1")
        assert_exact(chain)
        assert len(chain) == 4


async def test_the_next_batch_goes_into_the_one_opened_ahead(backends: LocalCluster) -> None:
    """After a batch the store opens the next one with a marker message (nats-server creates
    a batch's staging store on its first message): the next big request is stored into it,
    right after the marker, with exact chains; the marker is no user's message."""
    users = ["m1", "m2"]
    async with stores(backends, "at10") as [store]:
        first = stored(await store.publish_many(batch("f", users, 5)))
        assert store.opened_ahead == 0 and store._opened is not None
        second = stored(await store.publish_many(batch("g", users, 5)))
        assert store.opened_ahead == 1 and store.atomic_batches == 2
        assert store.statistics().opened_ahead == {"used": 1, "gone": 0}
        marker_seq = first[-1].seq + 1
        assert [s.seq for s in second] == list(range(marker_seq + 1, marker_seq + 11))
        for user in users:
            chain = await chain_of(store, user)
            assert_exact(chain)
            assert [i for _, _, i in chain] == [f"{t}-{user}-{k}" for t in "fg" for k in range(5)]
        get = trio_asyncio.aio_as_trio(store.bus.js.get_msg)
        marker = await get(store.streams["user"], marker_seq)
        assert (marker.subject, marker.data or b"") == (store.bus.subjects.batch_marker, b"")


async def test_a_batch_opened_ahead_that_is_gone_or_too_old_is_not_used(
    backends: LocalCluster,
) -> None:
    """One the server no longer holds (a restart, its max_batch_timeout) is refused whole
    (incomplete): the request is sent once more, in a new batch; one too old, or a request
    with no room beside the marker, starts a new batch at once."""
    users = ["d1", "d2"]
    async with stores(backends, "at11") as [store]:
        stored(await store.publish_many(batch("f", users, 5)))
        store._opened = ("a-batch-the-server-does-not-hold", trio.current_time())
        stored(await store.publish_many(batch("g", users, 5)))
        # sent again into the batch opened right after the refusal
        assert (store.opened_ahead, store.opened_dropped) == (2, 1)
        assert (store.atomic_batches, store.atomic_fallbacks) == (2, 0)
        assert store._opened is not None
        store._opened = (store._opened[0], trio.current_time() - OPENED_MAX_AGE)
        stored(await store.publish_many(batch("h", users, 5)))
        assert (store.opened_ahead, store.opened_dropped, store.atomic_batches) == (2, 1, 3)
        assert store.statistics().opened_ahead == {"used": 2, "gone": 1}
        store._opened = ("x", trio.current_time())
        assert store._batch_id(MAX_ATOMIC_BATCH)[1] == 0  # no room for the marker
        for user in users:
            chain = await chain_of(store, user)
            assert_exact(chain)
            assert len(chain) == 15


async def test_a_batch_opened_ahead_that_cannot_be_used_is_committed_with_its_marker_alone(
    backends: LocalCluster,
) -> None:
    """No room beside the marker (a request of the server's whole batch limit), or too old:
    the store starts a new batch and commits the opened one (``eob``: its marker alone), so
    the server does not hold it until its timeout (it counts against its batches in flight)."""
    async with stores(backends, "at12") as [store]:
        stored(await store.publish_many(batch("f", ["e1", "e2"], 5)))
        end = await store.end_seq("user")
        assert store._opened is not None
        assert store._batch_id(MAX_ATOMIC_BATCH)[1] == 0 and store._opened is None
        with trio.fail_after(5):
            while await store.end_seq("user") != end + 1:
                await trio.sleep(0.02)
        get = trio_asyncio.aio_as_trio(store.bus.js.get_msg)
        marker = await get(store.streams["user"], end + 1)
        assert marker.subject == store.bus.subjects.batch_marker
