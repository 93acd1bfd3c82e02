"""The live path of a stored unicast: JetStream republishes it to its owner
(meshpush/backends/bus.py).

Sans-IO: :func:`meshpush.backends.bus.decode_republished` on headers (and on the bytes a real
nats-server sent), and the bus's receive callback. Then two real nodes in this process (real
etcd and nats-server -js from the wheels): a message published through node a reaches owner
b from the republish, a sends no notification; duplicates, garbage on the subject, a node
that still notifies (a rolling upgrade) and a stream made without republish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import nats.js.api
import nats.js.errors
import pytest
import trio
import trio.testing
from conftest import FAST
from support import (
    assert_exact_chain,
    connected,
    in_process_nodes,
    online,
    publish,
    publish_via,
    receive,
    two_nodes,
    user_of,
    user_owned_by,
    wait_until,
)

from meshpush.backends.bridge import Bridge
from meshpush.backends.bus import Bus, Notification, decode_republished, republished_trace
from meshpush.backends.natslink import Link, LinkConfig
from meshpush.backends.natswire import Msg, Parser, ProtocolError, encode_headers
from meshpush.backends.store import Outgoing, Store, Stored
from meshpush.core.encoding import encode_token
from meshpush.core.ring import NodeInfo, slot
from meshpush.local.devcluster import LocalCluster
from meshpush.observe.metrics import Metrics
from meshpush.server.hub import Hub
from meshpush.server.node import Node
from meshpush.server.router import Router
from meshpush.settings import Settings

ALICE = encode_token("alice")
SUBJECT = f"mp.c.rp.12.{ALICE}"


def headers(**extra: str) -> dict[str, str]:
    """What JetStream republishes: our headers, then its own."""
    base = {
        "Nats-Msg-Id": "9f" * 32,
        "Nats-Expected-Last-Subject-Sequence": "4",
        "Mp-Prev": "4",
        "Mp-Id": encode_token("m-7"),
        "Mp-T": "1795000000.25",
        "Nats-Stream": "MP_c_USER",
        "Nats-Subject": f"mp.c.store.u.12.{ALICE}",
        "Nats-Sequence": "7",
        "Nats-Time-Stamp": "2026-11-27T12:11:08.287502271Z",
        "Nats-Last-Sequence": "4",
    }
    return {k: v for k, v in {**base, **extra}.items() if v != "-"}  # "-": left out


def block(**extra: str) -> bytes:
    """The header block as it comes on the wire (the subscription takes it raw)."""
    return encode_headers(headers(**extra))


ALICE_7 = Notification("user", "alice", 7, 4, "m-7", 1795000000.25, '{"x":1}')


# ---------------------------------------------------------------- sans-IO


def test_a_republished_message_decodes_to_the_notification() -> None:
    assert decode_republished(SUBJECT, block(), b'{"x":1}') == ALICE_7


def test_the_relative_prev_of_a_later_message_of_an_atomic_batch() -> None:
    note = decode_republished(SUBJECT, block(**{"Mp-Prev": "-", "Mp-Prev-Back": "2"}), b"1")
    assert (note.seq, note.prev) == (7, 5)


def test_a_message_of_a_node_without_publish_time_is_dated_on_arrival() -> None:
    before = time.time()
    note = decode_republished(SUBJECT, block(**{"Mp-T": "-"}), b"1")
    assert before <= note.published_at <= time.time()


def test_the_first_message_of_a_user_and_one_stored_before_mp_prev_chain_on_0() -> None:
    assert decode_republished(SUBJECT, block(**{"Mp-Prev": "0"}), b"1").prev == 0
    assert decode_republished(SUBJECT, block(**{"Mp-Prev": "-"}), b"1").prev == 0


@pytest.mark.parametrize(
    ("subject", "raw", "payload"),
    [
        (SUBJECT, None, b"1"),  # a plain message (no headers)
        (SUBJECT, encode_headers({}), b"1"),
        (SUBJECT, b"Nats-Sequence: 7\r\nMp-Id: bQ\r\n\r\n", b"1"),  # not a header block
        (SUBJECT, block(**{"Nats-Sequence": "-"}), b"1"),
        (SUBJECT, block(**{"Nats-Sequence": "seven"}), b"1"),
        (SUBJECT, block(**{"Mp-Prev": "x"}), b"1"),
        (SUBJECT, block(**{"Mp-Prev": "7"}), b"1"),  # prev not before seq
        (SUBJECT, block(**{"Mp-Prev": "-1"}), b"1"),
        (SUBJECT, block(**{"Mp-Prev-Back": "0"}), b"1"),
        (SUBJECT, block(**{"Mp-Prev-Back": "8"}), b"1"),
        (SUBJECT, block(**{"Mp-Id": "-"}), b"1"),
        (SUBJECT, block(**{"Mp-Id": "!!"}), b"1"),
        (SUBJECT, block(**{"Mp-T": "noon"}), b"1"),
        ("mp.c.rp.12.!!", block(), b"1"),  # not a user token
        ("norp", block(), b"1"),
        (SUBJECT, block(), b"\xff\xfe"),  # not UTF-8
    ],
)
def test_garbage_raises_what_the_bus_counts(
    subject: str, raw: bytes | None, payload: bytes
) -> None:
    with pytest.raises((ValueError, KeyError, UnicodeDecodeError)):
        decode_republished(subject, raw, payload)


def test_the_bytes_a_real_server_republishes_parse_and_decode() -> None:
    """An HMSG as nats-server 2.15 sent it (recorded), through the link's parser."""
    raw = (
        b"NATS/1.0\r\nNats-Msg-Id: id3\r\nMp-Prev: 2\r\nMp-Id: " + encode_token("m3").encode()
        + b"\r\nMp-T: 1795000000.5\r\nNats-Stream: S\r\nNats-Subject: mp.c.store.u.12."
        + ALICE.encode() + b"\r\nNats-Sequence: 3\r\n"
        b"Nats-Time-Stamp: 2026-11-27T12:11:08.287502271Z\r\nNats-Last-Sequence: 2\r\n\r\n"
    )  # fmt: skip
    payload = b'{"x":3}'
    wire = b"HMSG %s 1 %d %d\r\n%s%s\r\n" % (
        SUBJECT.encode(), len(raw), len(raw) + len(payload), raw, payload
    )  # fmt: skip
    [msg] = Parser(raw_sids={1}).feed(wire)
    assert isinstance(msg, Msg) and msg.headers is None and msg.raw_headers == raw
    assert decode_republished(msg.subject, msg.raw_headers, msg.payload) == Notification(
        "user", "alice", 3, 2, "m3", 1795000000.5, '{"x":3}'
    )


def test_only_the_sids_asked_for_get_raw_headers() -> None:
    raw = encode_headers({"A": "1"})
    wire = b"HMSG s 1 %d %d\r\n%s\r\nHMSG s 2 %d %d\r\n%s\r\n" % ((len(raw), len(raw), raw) * 2)
    first, second = Parser(raw_sids={2}).feed(wire)
    assert first == Msg("s", 1, None, b"", {"A": "1"})
    assert second == Msg("s", 2, None, b"", None, raw)
    with pytest.raises(ProtocolError):  # raw or not, a block must be a header block
        Parser(raw_sids={1}).feed(b"HMSG s 1 3 3\r\nA:1\r\n")


def test_the_trace_context_and_what_else_the_block_may_hold() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert republished_trace(block(traceparent=tp)) == {"traceparent": tp}
    assert republished_trace(block()) is None and republished_trace(None) is None
    raw = b"NATS/1.0\r\nMp-T:2.5\r\nNats-Sequence:  9 \r\nMp-Id: bQ\r\nMp-Prev: 8\r\n"
    raw += b"Mp-Prev: 3\r\nX-Mp-Prev: 1\r\n\r\n"  # repeated: the last one; others: ignored
    note = decode_republished(SUBJECT, raw, b"1")
    assert (note.seq, note.prev, note.id, note.published_at) == (9, 3, "m", 2.5)


async def test_the_bus_hands_republished_messages_over_and_counts_garbage() -> None:
    bus = Bus(Settings(node_id="n1"), Bridge(), Metrics("n1"))
    on_message = bus._republished_callback()
    on_message(Msg(SUBJECT, 2, None, b"1"))
    on_message(Msg(SUBJECT, 2, None, b'{"x":1}', None, block()))
    on_message(Msg(SUBJECT, 2, None, b"1", None, block(**{"Nats-Sequence": "-"})))
    assert bus.inbound.receive_nowait() == ALICE_7
    assert bus.stats.backend_errors["bad_notification"] == 2
    with pytest.raises(trio.WouldBlock):
        bus.inbound.receive_nowait()


class RecordingLink:
    def __init__(self) -> None:
        self.subs: dict[int, str] = {}
        self.raw: set[str] = set()
        self._sids = iter(range(1, 1000))

    def subscribe(self, subject: str, callback: Any, raw_headers: bool = False) -> int:
        sid = next(self._sids)
        self.subs[sid] = subject
        if raw_headers:
            self.raw.add(subject)
        return sid

    def unsubscribe(self, sid: int) -> None:
        del self.subs[sid]


async def test_an_owned_slot_is_subscribed_on_both_live_subjects_and_dropped_from_both() -> None:
    bus = Bus(Settings(node_id="n1", cluster="c"), Bridge(), Metrics("n1"))
    link = RecordingLink()
    bus.link = link  # type: ignore[assignment]

    async def confirmed(timeout: float) -> bool:
        return True

    bus.check = confirmed  # type: ignore[method-assign]
    await bus.subscribe_slots({3, 4})
    assert sorted(link.subs.values()) == [
        "mp.c.live.u.3",
        "mp.c.live.u.4",
        "mp.c.rp.3.*",
        "mp.c.rp.4.*",
    ]
    assert link.raw == {"mp.c.rp.3.*", "mp.c.rp.4.*"}  # read by decode_republished
    await bus.unsubscribe_slots({3})
    assert sorted(link.subs.values()) == ["mp.c.live.u.4", "mp.c.rp.4.*"]
    assert bus.subscribed() == {4}


# ---------------------------------------------------------------- two real nodes


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """etcd and nats-server -js only: the nodes run in the test's process."""
    workdir = tmp_path_factory.mktemp("republish")
    with LocalCluster(workdir, nodes=0, cluster="rp", node_settings=FAST) as cluster:
        yield cluster


def notifications_of(node: Node) -> list[str]:
    """From now on, the subjects of the live notifications ``node`` publishes."""
    sent: list[str] = []
    publish = node.bus.link.publish
    prefix = f"mp.{node.settings.cluster}.live."

    def recording(subject: str, *args: Any) -> None:
        if subject.startswith(prefix):
            sent.append(subject)
        publish(subject, *args)

    node.bus.link.publish = recording  # type: ignore[method-assign]
    return sent


def bad(node: Node) -> int:
    return node.bus.stats.backend_errors["bad_notification"]


@in_process_nodes
async def test_a_unicast_through_a_reaches_owner_b_from_the_republish_alone(
    backends: LocalCluster,
) -> None:
    async with two_nodes(backends) as (a, b):
        assert a.store.republished and b.store.republished
        user = user_of(b, via=a, prefix="exact")
        sent = notifications_of(a)
        async with online(backends, b, user) as client:
            first = await publish_via(a, backends.api_key, user, {"n": 1}, msg_id="e-1")
            second = await publish_via(a, backends.api_key, user, [2, "two"], msg_id="e-2")
            got = [await receive(client), await receive(client)]
        assert [(m.ch, m.seq, m.prev, m.id, m.data) for m in got] == [
            ("user", first["seq"], 0, "e-1", {"n": 1}),
            ("user", second["seq"], first["seq"], "e-2", [2, "two"]),
        ]
        assert sent == []  # a sent no notification: JetStream did
        assert bad(a) == bad(b) == 0


@in_process_nodes
async def test_a_duplicate_publish_delivers_nothing_new(backends: LocalCluster) -> None:
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a, prefix="dup")
        async with online(backends, b, user) as client:
            stored = await publish_via(a, backends.api_key, user, 1, msg_id="d-1")
            assert (await receive(client)).id == "d-1"
            again = await publish_via(b, backends.api_key, user, 1, msg_id="d-1")
            assert (again["seq"], again["duplicate"]) == (stored["seq"], True)
            after = await publish_via(a, backends.api_key, user, 2, msg_id="d-2")
            msg = await receive(client)  # the next one is d-2: d-1 was not republished again
            assert (msg.id, msg.seq, msg.prev) == ("d-2", after["seq"], stored["seq"])


@in_process_nodes
async def test_garbage_on_the_republish_subject_is_counted_and_others_keep_flowing(
    backends: LocalCluster,
) -> None:
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a, prefix="garbage")
        subject = f"mp.rp.rp.{slot(user)}.{encode_token(user)}"
        before = bad(b)

        async def foreign() -> None:
            nc = b.bus.nc
            await nc.publish(subject, b"no headers")
            await nc.publish(subject, b"1", headers={"Nats-Sequence": "x", "Mp-Id": "!"})
            await nc.publish(f"mp.rp.rp.{slot(user)}.!!", b"1", headers={"Nats-Sequence": "9"})
            await nc.flush()

        async with online(backends, b, user) as client:
            await b.bridge.call(foreign, timeout=5)
            await wait_until(lambda: bad(b) == before + 3, timeout=10)
            stored = await publish_via(a, backends.api_key, user, {"ok": True}, msg_id="g-1")
            msg = await receive(client)
            assert (msg.seq, msg.id, msg.data) == (stored["seq"], "g-1", {"ok": True})
        assert b.router.ready


@in_process_nodes
async def test_a_node_that_still_notifies_gives_the_owner_both_hints_and_one_delivery(
    backends: LocalCluster,
) -> None:
    """A rolling upgrade: an old node notifies, the stream republishes too; the owner gets
    each message twice and delivers it once (the second hint is dropped by seq)."""
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a, prefix="both")
        sent = notifications_of(a)
        a.store.republished = False  # as a node before the republish
        async with online(backends, b, user) as client:
            seqs = [
                (await publish_via(a, backends.api_key, user, i, msg_id=f"b-{i}"))["seq"]
                for i in range(3)
            ]
            got = [await receive(client) for _ in range(3)]
            a.store.republished = True
            last = await publish_via(a, backends.api_key, user, 3, msg_id="b-3")
            after = await receive(client)
        assert [(m.seq, m.prev) for m in got] == [
            (seqs[0], 0),
            (seqs[1], seqs[0]),
            (seqs[2], seqs[1]),
        ]
        assert (after.seq, after.prev, after.id) == (last["seq"], seqs[2], "b-3")
        assert sent == [b.bus.subjects.slot_live(slot(user))] * 3


async def _strip_republish(servers: list[str], stream: str) -> Any:
    """As a node before the republish left the user stream (created, or updated in place)."""
    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream()
        try:
            config = (await js.stream_info(stream)).config
            config.republish = None
            return (await js.update_stream(config)).config.republish
        except nats.js.errors.NotFoundError:
            config = nats.js.api.StreamConfig(name=stream, subjects=["mp.rp.store.u.>"])
            return (await js.add_stream(config)).config.republish
    finally:
        await nc.close()


@in_process_nodes
async def test_a_stream_made_without_republish_gets_it_when_a_node_starts(
    backends: LocalCluster,
) -> None:
    settings = backends.settings_for("solo")
    stripped = await trio.to_thread.run_sync(
        asyncio.run, _strip_republish(list(settings.nats_servers), "MP_rp_USER")
    )
    assert stripped is None
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(Node(settings).run)
        try:
            assert node.store.republished

            async def republish() -> Any:
                return (await node.bus.js.stream_info("MP_rp_USER")).config.republish

            echoed = await node.bridge.call(republish, timeout=5)
            assert (echoed.src, echoed.dest) == ("mp.rp.store.u.>", "mp.rp.rp.>")
        finally:
            with trio.move_on_after(10):
                await node.stop()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- who notifies (rolling upgrade)


class PublishedLink:
    def __init__(self) -> None:
        self.subjects: list[str] = []

    def publish(self, subject: str, payload: bytes, *rest: Any) -> None:
        self.subjects.append(subject)


@pytest.mark.parametrize(
    ("republished", "everyone", "notified"),
    [(True, True, False), (True, False, True), (False, True, True), (False, False, True)],
)
def test_the_publisher_notifies_a_unicast_unless_the_stream_and_every_owner_republish(
    republished: bool, everyone: bool, notified: bool
) -> None:
    settings = Settings(node_id="n1", cluster="c")
    bus = Bus(settings, Bridge(), Metrics("n1"))
    link = PublishedLink()
    bus.link = link  # type: ignore[assignment]
    store = Store(settings, bus, Bridge(), Metrics("n1"))
    store.republished, bus.owners_take_republish = republished, everyone
    store._notify(Outgoing("user", "alice", "m", "1"), Stored(7, 4, False))
    store._notify(Outgoing("broadcast", None, "b", "1"), Stored(3, 2, False))
    expected = [f"mp.c.live.u.{slot('alice')}"] if notified else []
    assert link.subjects == [*expected, "mp.c.live.b"]  # broadcasts: always from the node


def test_a_node_announces_that_it_takes_republished_hints_and_older_ones_read_as_not() -> None:
    info = NodeInfo("n1", "ws://a/ws", "http://a", 1.5)
    assert NodeInfo.from_json("n1", info.to_json().encode()) == info
    assert info.republish and info.batches
    older = b'{"ws_url": "ws://a/ws", "http_url": "http://a", "started_at": 1.5}'
    oldest = NodeInfo("n1", "ws://a/ws", "http://a", 1.5, republish=False, batches=False)
    assert NodeInfo.from_json("n1", older) == oldest
    before_batches = (
        b'{"ws_url": "ws://a/ws", "http_url": "http://a", "started_at": 1.5, "rp": true}'
    )
    assert NodeInfo.from_json("n1", before_batches) == NodeInfo(
        "n1", "ws://a/ws", "http://a", 1.5, republish=True, batches=False
    )
    odd = b'{"ws_url": "ws://a/ws", "http_url": "http://a", "started_at": 1.5, "pb": "yes"}'
    assert not NodeInfo.from_json("n1", odd).batches  # only true is true: no batches


class CheckedStore:
    def __init__(self) -> None:
        self.republished = True
        self.setups = 0
        self.gate: trio.Event | None = None  # set: a setup waits for it
        self.fail = False

    async def setup(self) -> None:
        self.setups += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("NATS went away")
        self.republished = True


def checked_router() -> tuple[Router, Any, CheckedStore]:
    """A router over a fake bus (its flags as a node starts) and a store counting setups."""
    bus = SimpleNamespace(
        owners_take_republish=False,
        peers_read_batches=False,
        subscribe_slots=_nothing,
        unsubscribe_slots=_nothing,
        subscribe_broadcast=_nothing,
    )
    store = CheckedStore()
    feeder = SimpleNamespace(store=store)
    r = Router(Settings(node_id="n1"), Hub(), bus, feeder, Metrics("n1"))  # type: ignore[arg-type]
    return r, bus, store


async def test_publishers_notify_while_an_older_node_is_a_member_then_check_the_stream() -> None:
    r, bus, store = checked_router()
    new = {i: NodeInfo(i, f"ws://{i}/ws", f"http://{i}", 0.0) for i in ("n1", "n2")}
    mixed = {**new, "old": NodeInfo("old", "ws://o/ws", "http://o", 0.0, republish=False)}
    async with trio.open_nursery() as nursery:
        r._nursery = nursery
        await r.apply(new, registered=True)
        assert bus.owners_take_republish and store.setups == 0  # set up at start already
        await r.apply(mixed, registered=True)
        assert not bus.owners_take_republish
        await r.apply(new, registered=True)  # the older node left (or was replaced)
        assert bus.owners_take_republish and not store.republished  # until checked again
        await wait_until(lambda: store.setups == 1, timeout=5)
        assert store.republished
        await r.apply(new, registered=True)
        await trio.sleep(0.01)
        assert store.setups == 1  # once per older node gone, not per view
        nursery.cancel_scope.cancel()


async def test_big_requests_go_in_rounds_while_a_node_cannot_read_atomic_batches() -> None:
    """The router clears ``Bus.peers_read_batches`` while its view holds a node that does not
    announce ``pb`` (a version before atomic batches would read their chained messages with a
    prev of 0) or is empty; once that node is gone the streams are set up again (it may have
    set the user stream up without ``allow_atomic``) and only then do batches resume; a
    failed setup leaves them off until a later view tries again."""
    r, bus, store = checked_router()
    new = {i: NodeInfo(i, f"ws://{i}/ws", f"http://{i}", 0.0) for i in ("n1", "n2")}
    mixed = {**new, "old": NodeInfo("old", "ws://o/ws", "http://o", 0.0, batches=False)}
    async with trio.open_nursery() as nursery:
        r._nursery = nursery
        await r.apply({}, registered=False)  # no membership yet (or lost)
        assert not bus.peers_read_batches
        await r.apply(new, registered=True)
        assert bus.peers_read_batches and store.setups == 0
        await r.apply(mixed, registered=True)
        assert not bus.peers_read_batches and bus.owners_take_republish  # it takes republish
        store.gate, store.fail = trio.Event(), True
        await r.apply(new, registered=True)
        await wait_until(lambda: store.setups == 1, timeout=5)
        await r.apply(new, registered=True)  # while the setup runs: still rounds
        assert not bus.peers_read_batches and store.setups == 1
        store.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not bus.peers_read_batches  # the setup failed
        store.gate, store.fail = None, False
        await r.apply(new, registered=True)  # the next view tries again
        await wait_until(lambda: bus.peers_read_batches, timeout=5)
        assert store.setups == 2
        await r.apply(new, registered=True)
        await trio.testing.wait_all_tasks_blocked()
        assert store.setups == 2 and bus.peers_read_batches  # once per older node gone
        nursery.cancel_scope.cancel()


async def test_when_a_node_older_than_both_leaves_the_streams_are_set_up_once() -> None:
    """A node before republish and batches (neither ``rp`` nor ``pb``) leaves: one setup
    puts both back (republish, allow_atomic), then hints go to JetStream and batches resume."""
    r, bus, store = checked_router()
    new = {i: NodeInfo(i, f"ws://{i}/ws", f"http://{i}", 0.0) for i in ("n1", "n2")}
    oldest = NodeInfo("old", "ws://o/ws", "http://o", 0.0, republish=False, batches=False)
    async with trio.open_nursery() as nursery:
        r._nursery = nursery
        await r.apply({**new, "old": oldest}, registered=True)
        assert not bus.owners_take_republish and not bus.peers_read_batches
        await r.apply(new, registered=True)
        await wait_until(lambda: bus.peers_read_batches, timeout=5)
        await trio.testing.wait_all_tasks_blocked()
        assert store.setups == 1 and store.republished and bus.owners_take_republish
        nursery.cancel_scope.cancel()


async def _nothing(*args: Any) -> None:
    pass


@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backends", ["single", "clustered"])
async def test_node_processes_deliver_from_the_republish_and_publish_no_notification(
    tmp_path: Path, backends: str
) -> None:
    """Three node processes (as the bench runs them): what crosses NATS per unicast is the
    stored message and JetStream's republish, no notification from the publishing node. On
    three NATS servers with a replicated stream (R3) it is republished once (by the leader)."""
    seen: Counter[str] = Counter()
    workdir = tmp_path / "cluster"
    cluster = LocalCluster(
        workdir, nodes=3, cluster="t", backends=backends, node_settings=FAST, check_stops=True
    )
    with cluster:
        first, second, _ = cluster.live()
        user = await user_owned_by(cluster, second.id, prefix="procs")
        link = Link(cluster.settings_for("watch").nats_servers, LinkConfig(name="watch"))
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            for kind, subject in (("live", "mp.t.live.u.>"), ("republished", "mp.t.rp.>")):
                link.subscribe(subject, lambda msg, kind=kind: seen.update([kind]))
            await link.ping(5)  # the server has the subscriptions
            async with connected(cluster, user, via=second) as client:
                stored = [
                    (await publish(cluster, first, user, {"i": i}, msg_id=f"p-{i}"))["seq"]
                    for i in range(20)
                ]
                got = [await receive(client) for _ in stored]
            nursery.cancel_scope.cancel()
    assert [m.seq for m in got] == stored
    assert_exact_chain(got)
    assert seen == {"republished": 20}


@in_process_nodes
async def test_with_live_republish_off_the_stream_loses_it_and_the_publisher_notifies(
    backends: LocalCluster,
) -> None:
    settings = dataclasses.replace(backends.settings_for("off"), live_republish=False)
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(Node(settings).run)
        try:
            assert not node.store.republished

            async def republish() -> Any:
                return (await node.bus.js.stream_info("MP_rp_USER")).config.republish

            assert await node.bridge.call(republish, timeout=5) is None
            sent = notifications_of(node)
            await wait_until(lambda: node.router.ready, timeout=15)
            user = "off-1"  # the only node owns every user
            async with online(backends, node, user) as client:
                stored = await publish_via(node, backends.api_key, user, 1, msg_id="o-1")
                msg = await receive(client)
            assert (msg.seq, msg.id) == (stored["seq"], "o-1")
            assert sent == [node.bus.subjects.slot_live(slot(user))]
        finally:
            with trio.move_on_after(10):
                await node.stop()
            nursery.cancel_scope.cancel()
