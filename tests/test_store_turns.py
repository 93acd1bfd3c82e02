"""The store's publish path without a server: per-user turns (no lock convoy), exact chains
and notifications in seq order per user, against a fake JetStream on a fake NATS link."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from meshpush.backends.bridge import Bridge
from meshpush.backends.bus import Notification, Subjects, decode_notification
from meshpush.backends.natslink import NoReply, Reply, Request
from meshpush.backends.natswire import Msg
from meshpush.backends.store import (
    SMALL_REQUEST,
    Outcome,
    Outgoing,
    Store,
    Stored,
    StoreTimeout,
    StoreUnavailable,
    stream_subject,
)
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

SETTINGS = Settings(node_id="t", cluster="t")


def subject_of(user: str) -> str:
    return stream_subject(SETTINGS, "user", user)


class FakeJetStream:
    """Stores a publish when it arrives if its expected last seq is right (else names the
    real one), deduplicates by ``Nats-Msg-Id``; keeps every subject's chain of (seq, prev).
    An atomic batch is stored whole on consecutive seqs or refused whole, as nats-server does
    (expected last seqs are checked on the first message of each subject only)."""

    def __init__(self) -> None:
        self.seq = 0
        self.chains: dict[str, list[tuple[int, int]]] = {}
        self.ids: dict[str, int] = {}
        self.opened: set[str] = set()  # batches opened ahead (their marker came)

    def answer(self, req: Request) -> dict[str, Any]:
        headers = req.headers or {}
        if headers["Nats-Msg-Id"] in self.ids:
            return {"seq": self.ids[headers["Nats-Msg-Id"]], "duplicate": True}
        chain = self.chains.setdefault(req.subject, [])
        last = chain[-1][0] if chain else 0
        if int(headers["Nats-Expected-Last-Subject-Sequence"]) != last:
            description = f"wrong last sequence: {last}"
            return {"error": {"code": 400, "err_code": 10071, "description": description}}
        self._store(req)
        return {"seq": self.seq}

    def _store(self, req: Request) -> None:
        headers = req.headers or {}
        self.seq += 1
        back = headers.get("Mp-Prev-Back")
        prev = self.seq - int(back) if back else int(headers["Mp-Prev"])
        self.chains.setdefault(req.subject, []).append((self.seq, prev))
        self.ids[headers["Nats-Msg-Id"]] = self.seq

    def answer_batch(self, requests: list[Request]) -> dict[str, Any]:
        first = requests[0].headers or {}
        marker = first["Nats-Batch-Id"] in self.opened
        self.opened.discard(first["Nats-Batch-Id"])  # a commit ends it, stored or refused
        if first["Nats-Batch-Sequence"] != ("2" if marker else "1"):
            description = "atomic publish batch is incomplete"  # e.g. one the server dropped
            return {"error": {"code": 400, "err_code": 10176, "description": description}}
        ids = [(r.headers or {})["Nats-Msg-Id"] for r in requests]
        if any(i in self.ids for i in ids) or len(set(ids)) < len(ids):
            description = "atomic publish batch contains duplicate message id"
            return {"error": {"code": 400, "err_code": 10201, "description": description}}
        for r in requests:
            expected = (r.headers or {}).get("Nats-Expected-Last-Subject-Sequence")
            chain = self.chains.get(r.subject, [])
            last = chain[-1][0] if chain else 0
            if expected is not None and int(expected) != last:
                description = f"wrong last sequence: {last}"
                return {"error": {"code": 400, "err_code": 10071, "description": description}}
        self.seq += marker  # the marker is stored with the batch, first
        for r in requests:
            self._store(r)
        return {"seq": self.seq, "batch": "b", "count": len(requests) + marker}


class FakeLink:
    """A request round is answered by the fake JetStream after ``delay()`` seconds, and not
    before the gates of its messages (by id) open; notifications are kept in publish order."""

    def __init__(self, js: FakeJetStream, delay: Any = lambda: 0.0) -> None:
        self.js = js
        self.delay = delay
        self.gates: dict[str, trio.Event] = {}
        self.rounds: list[list[str]] = []
        self.batches: list[list[str]] = []
        self.notes: list[Notification] = []

    async def request_many(self, requests: list[Request], timeout: float) -> list[Reply]:
        self.rounds.append([r.subject for r in requests])
        answers = [self.js.answer(r) for r in requests]
        for r in requests:
            gate = self.gates.get(json.loads(r.payload)["id"])
            if gate is not None:  # a stuck message (no timeout: the test opens the gate)
                await gate.wait()
        with trio.move_on_after(timeout):
            await trio.sleep(self.delay())
            return [Msg("_INBOX.x", 1, None, json.dumps(a).encode()) for a in answers]
        return [NoReply("no answer in time")] * len(requests)

    async def request_batch(self, requests: list[Request], timeout: float) -> Reply:
        self.batches.append([r.subject for r in requests])
        for r in requests:  # a stuck message stalls the whole batch (before it is applied)
            gate = self.gates.get(json.loads(r.payload)["id"])
            if gate is not None:
                await gate.wait()
        answer = self.js.answer_batch(requests)
        with trio.move_on_after(timeout):
            await trio.sleep(self.delay())
            return Msg("_INBOX.x", 1, None, json.dumps(answer).encode())
        return NoReply("no answer in time")

    def publish(self, subject: str, payload: bytes, reply: Any = None, headers: Any = None) -> None:
        if subject.endswith(".store.u.batch"):  # a batch opened ahead, or closed unused
            if (
                headers.get("Nats-Batch-Commit") == "eob"
                and headers["Nats-Batch-Id"] in self.js.opened
            ):
                self.js.opened.discard(headers["Nats-Batch-Id"])
                self.js.seq += 1  # its marker, alone
            elif "Nats-Batch-Commit" not in headers:
                self.js.opened.add(headers["Nats-Batch-Id"])
            return
        self.notes.append(decode_notification("user", payload))

    def notes_of(self, user: str) -> list[tuple[int, int]]:
        return [(n.seq, n.prev) for n in self.notes if n.user == user]


def make_store(link: FakeLink, atomic: bool = False) -> Store:
    bus = SimpleNamespace(
        js=object(),
        connected=True,
        link=link,
        live_subject=lambda ch, user: f"live.{user}",
        peers_read_batches=True,  # every node in the view reads atomic batches
        subjects=Subjects(SETTINGS.cluster),
    )
    store = Store(SETTINGS, bus, Bridge(), Metrics("t"))  # type: ignore[arg-type]
    store.atomic = atomic
    return store


def out(user: str, msg_id: str) -> Outgoing:
    return Outgoing("user", user, msg_id, json.dumps({"id": msg_id}))


async def test_a_request_waiting_on_a_busy_user_does_not_hold_up_its_free_users() -> None:
    """``busy`` is stuck in a first request; a second request for ``free`` and ``busy``
    stores and notifies ``free`` at once and lets go of it, so a third request for ``free``
    and ``other`` completes while the first two still wait (with locks taken in sorted order,
    the second held ``free``, which sorts first, while it waited for ``busy``)."""
    free, busy, other = "u2", "u1", "u3"
    assert subject_of(free) < subject_of(busy)
    link = FakeLink(FakeJetStream())
    link.gates["first-u1"] = trio.Event()
    store = make_store(link)
    done: dict[str, list[Outcome]] = {}

    async def request(name: str, users: list[str]) -> None:
        done[name] = list(await store.publish_many([out(u, f"{name}-{u}") for u in users]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "first", [busy])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "second", [free, busy])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "third", [free, other])
            await trio.testing.wait_all_tasks_blocked()
            assert set(done) == {"third"}  # the first two still wait for busy
            assert link.notes_of(free) == [(2, 0), (3, 2)]  # second's, then third's
            link.gates.pop("first-u1").set()
    assert all(isinstance(o, Stored) for outcomes in done.values() for o in outcomes)
    assert link.notes_of(busy) == [(1, 0), (5, 1)]  # first's, then second's: in seq order
    assert link.js.chains[subject_of(free)] == [(2, 0), (3, 2)]
    assert store._turns.busy() == 0


async def test_a_user_still_busy_at_the_timeout_is_not_stored_and_the_others_are(
    autojump_clock: trio.abc.Clock,
) -> None:
    link = FakeLink(FakeJetStream())
    link.gates["first-u2"] = trio.Event()
    store = make_store(link)
    store.publish_timeout = 1.0
    done: dict[str, list[Outcome]] = {}

    async def request(name: str, users: list[str]) -> None:
        done[name] = list(await store.publish_many([out(u, f"{name}-{u}") for u in users]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first", ["u2"])
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "second", ["u1", "u2"])
        await trio.sleep(2)
        stored, busy = done["second"]
        assert isinstance(stored, Stored) and stored.seq == 2
        assert isinstance(busy, StoreUnavailable) and not isinstance(busy, StoreTimeout)
        assert "earlier publishes are pending" in str(busy)
        link.gates.pop("first-u2").set()
    assert done["first"] == [Stored(1, 0, False)]
    assert [n.id for n in link.notes] == ["second-u1", "first-u2"]
    assert store._turns.busy() == 0


async def test_a_cancelled_request_has_notified_what_it_stored_before_the_user_passes_on() -> None:
    link = FakeLink(FakeJetStream())
    store = make_store(link)
    link.gates["a1"] = trio.Event()  # the second round (u1's second message) is stuck
    with trio.move_on_after(0.05):
        await store.publish_many([out("u1", "a0"), out("u1", "a1"), out("u2", "b0")])
    # a0 and b0 were notified as their answers came (the first round), before a1 got stuck
    assert [n.id for n in link.notes] == ["a0", "b0"]
    link.gates.pop("a1").set()
    later = await store.publish_many([out("u1", "c0"), out("u2", "c1")])
    # a1 arrived (seq 3) without an answer: c0 is refused on the stale hint, then chained
    assert later == [Stored(5, 3, False), Stored(4, 2, False)]
    assert link.notes_of("u1") == [(1, 0), (5, 3)]  # the gap at 3 is the receivers' to read
    assert store._turns.busy() == 0 and store.chain_retries == 1


@pytest.mark.parametrize("atomic", [False, True])
async def test_notifications_of_each_user_follow_its_chain_across_concurrent_requests(
    autojump_clock: trio.abc.Clock, atomic: bool
) -> None:
    """Concurrent single and batch requests over a few users, rounds answered after random
    delays: every message is stored once, each user's chain is exact, and each user's
    notifications go out in that chain's order (a later request's never before an earlier
    one's), every stored message notified once."""
    rng = random.Random(7)
    link = FakeLink(FakeJetStream(), delay=lambda: rng.random() * 0.01)
    store = make_store(link, atomic)
    users = [f"u{k}" for k in range(6)]
    outcomes: list[Outcome] = []

    async def publisher(p: int) -> None:
        for r in range(25):
            size = rng.choice([1, 1, 2, 3, SMALL_REQUEST + 4])
            items = [out(rng.choice(users), f"{p}-{r}-{k}") for k in range(size)]
            outcomes.extend(await store.publish_many(items))
            await trio.sleep(rng.random() * 0.005)

    async with trio.open_nursery() as nursery:
        for p in range(8):
            nursery.start_soon(publisher, p)
    assert all(isinstance(o, Stored) and not o.duplicate for o in outcomes)
    assert len({o.seq for o in outcomes if isinstance(o, Stored)}) == len(outcomes)
    for user in users:
        chain = link.js.chains.get(subject_of(user), [])
        assert [prev for _, prev in chain] == [0] + [seq for seq, _ in chain[:-1]]
        assert link.notes_of(user) == chain
    assert max(len(r) for r in link.rounds) > 1 and store._turns.busy() == 0
    assert bool(link.batches) == atomic and store.atomic_batches == len(link.batches)


# ---------------------------------------------------------------- atomic batches


def big(tag: str, users: list[str], per_user: int = 5) -> list[Outgoing]:
    return [out(u, f"{tag}-{u}-{k}") for k in range(per_user) for u in users]


async def test_a_big_request_is_one_atomic_batch_with_absolute_prevs_in_its_answers() -> None:
    link = FakeLink(FakeJetStream())
    store = make_store(link, atomic=True)
    await store.publish_many([out("u1", "before")])  # seq 1
    outcomes = await store.publish_many(big("a", ["u1", "u2", "u3"]))
    assert len(link.batches) == 1 and len(link.batches[0]) == 15
    assert [(o.seq, o.prev) for o in outcomes if isinstance(o, Stored)][:6] == [
        (2, 1),
        (3, 0),
        (4, 0),
        (5, 2),
        (6, 3),
        (7, 4),
    ]
    for user in ["u1", "u2", "u3"]:
        assert link.notes_of(user) == link.js.chains[subject_of(user)]
    # the hints follow the batch: the next one chains on its last seqs without a refusal
    await store.publish_many(big("b", ["u1", "u2", "u3"]))
    assert store.atomic_batches == 2 and store.atomic_fallbacks == 0
    assert store._turns.busy() == 0


async def test_a_batch_without_an_answer_is_a_timeout_for_every_item(
    autojump_clock: trio.abc.Clock,
) -> None:
    link = FakeLink(FakeJetStream(), delay=lambda: 10.0)
    store = make_store(link, atomic=True)
    outcomes = await store.publish_many(big("t", ["u1", "u2"]))
    assert all(isinstance(o, StoreTimeout) for o in outcomes), outcomes
    assert len(link.rounds) == 0 and store._turns.busy() == 0
    assert store._opened is None  # nothing opened ahead after a batch without an answer
    # it was stored: a retry with the same ids is refused as a batch and answered per item
    link.delay = lambda: 0.0
    again = await store.publish_many(big("t", ["u1", "u2"]))
    assert all(isinstance(o, Stored) and o.duplicate for o in again)
    assert store.atomic_fallbacks == 1 and store._opened is None  # nor after a refusal
    # what /metrics shows (meshpush_store_atomic_batches_total)
    assert store.statistics().atomic_batches == {"stored": 0, "refused": 1, "timeout": 1}


async def test_a_batch_opened_ahead_that_the_server_dropped_is_sent_again_while_batches_last() -> (
    None
):
    """Refused as incomplete (the server no longer held the batch opened ahead): sent once
    more in a new batch — unless batches stopped meanwhile (a node that cannot read them
    joined while the answer came): then in rounds."""
    link = FakeLink(FakeJetStream())
    store = make_store(link, atomic=True)
    await store.publish_many(big("a", ["u1", "u2"]))
    link.js.opened.clear()  # the server dropped it (a restart, its timeout)
    stored = await store.publish_many(big("b", ["u1", "u2"]))
    assert all(isinstance(o, Stored) for o in stored) and len(link.batches) == 3
    assert (store.opened_dropped, store.atomic_batches, store.atomic_fallbacks) == (1, 2, 0)
    link.js.opened.clear()

    def older_node_joins() -> float:
        store.bus.peers_read_batches = False
        return 0.0

    link.delay = older_node_joins
    stored = await store.publish_many(big("c", ["u1", "u2"]))
    assert all(isinstance(o, Stored) for o in stored) and len(link.batches) == 4  # no resend
    assert (store.opened_dropped, store.atomic_fallbacks) == (2, 1) and len(link.rounds) > 1
    for user in ["u1", "u2"]:
        chain = link.js.chains[subject_of(user)]
        assert [prev for _, prev in chain] == [0] + [seq for seq, _ in chain[:-1]]
        assert link.notes_of(user) == chain


async def behind_a_stuck_request(
    store: Store, link: FakeLink, items: list[Outgoing], meanwhile: Callable[[], None]
) -> list[Outcome]:
    """``items`` published while a request for ``u2`` is stuck; ``meanwhile`` runs once both
    wait (the big one for its turn on ``u2``), then the stuck one goes on."""
    link.gates["first"] = trio.Event()
    done: list[Outcome] = []

    async def request(items: list[Outgoing]) -> None:
        done.extend(await store.publish_many(items))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, [out("u2", "first")])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, items)
            await trio.testing.wait_all_tasks_blocked()
            meanwhile()
            link.gates.pop("first").set()
    return done


async def test_a_big_request_waits_for_all_its_users_then_goes_as_one_batch() -> None:
    link = FakeLink(FakeJetStream())
    store = make_store(link, atomic=True)

    def waiting() -> None:
        assert link.batches == [] and len(link.rounds) == 1  # u1 granted, u2 not yet

    await behind_a_stuck_request(store, link, big("b", ["u1", "u2"]), waiting)
    assert len(link.batches) == 1 and store.atomic_batches == 1
    assert link.js.chains[subject_of("u2")] == [(1, 0), (3, 1), (5, 3), (7, 5), (9, 7), (11, 9)]
    assert store._turns.busy() == 0


async def test_a_big_request_waiting_for_its_turn_goes_in_rounds_if_batches_stop_meanwhile() -> (
    None
):
    """A node that cannot read atomic batches joined the view while the request waited for
    its users (``peers_read_batches`` cleared): it is stored in rounds, not as a batch."""
    link = FakeLink(FakeJetStream())
    store = make_store(link, atomic=True)

    def older_node_joins() -> None:
        store.bus.peers_read_batches = False

    done = await behind_a_stuck_request(store, link, big("c", ["u1", "u2"]), older_node_joins)
    assert link.batches == [] and store.atomic_batches == 0
    assert all(isinstance(o, Stored) for o in done) and len(done) == 11
    chain = link.js.chains[subject_of("u2")]
    assert [prev for _, prev in chain] == [0] + [seq for seq, _ in chain[:-1]]


async def test_a_big_request_still_waiting_at_the_deadline_goes_in_rounds(
    autojump_clock: trio.abc.Clock,
) -> None:
    link = FakeLink(FakeJetStream())
    link.gates["first"] = trio.Event()
    store = make_store(link, atomic=True)
    store.publish_timeout = 1.0
    done: dict[str, list[Outcome]] = {}

    async def request(name: str, items: list[Outgoing]) -> None:
        done[name] = list(await store.publish_many(items))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first", [out("u2", "first")])
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "big", big("b", ["u1", "u2"]))
        await trio.sleep(2)
        assert link.batches == []
        assert [isinstance(o, Stored) for o in done["big"]] == [True, False] * 5
        link.gates.pop("first").set()
    assert link.js.chains[subject_of("u1")] == [(2, 0), (3, 2), (4, 3), (5, 4), (6, 5)]
    assert store._turns.busy() == 0


async def test_a_big_request_with_one_message_a_user_goes_in_one_round() -> None:
    """One round stores it all: a batch would only add the server's staging."""
    link = FakeLink(FakeJetStream())
    store = make_store(link, atomic=True)
    users = [f"u{k}" for k in range(SMALL_REQUEST + 3)]
    outcomes = await store.publish_many([out(u, f"one-{u}") for u in users])
    assert all(isinstance(o, Stored) for o in outcomes)
    assert link.batches == [] and len(link.rounds) == 1


async def test_big_requests_arriving_while_a_batch_is_in_flight_go_together_in_the_next() -> None:
    link = FakeLink(FakeJetStream())
    link.gates["a-u1-0"] = trio.Event()  # the first batch is stuck until the others queued
    store = make_store(link, atomic=True)
    done: dict[str, list[Outcome]] = {}

    async def request(tag: str, users: list[str]) -> None:
        done[tag] = list(await store.publish_many(big(tag, users)))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "a", ["u1", "u2"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "b", ["u1", "u2"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "c", ["u3", "u1"])
            await trio.testing.wait_all_tasks_blocked()
            link.gates.pop("a-u1-0").set()
    assert [len(b) for b in link.batches] == [10, 20] and store.atomic_batches == 2
    assert all(isinstance(o, Stored) for outcomes in done.values() for o in outcomes)
    for user in ["u1", "u2", "u3"]:
        chain = link.js.chains[subject_of(user)]
        assert [prev for _, prev in chain] == [0] + [seq for seq, _ in chain[:-1]]
        assert link.notes_of(user) == chain
    assert [n.id for n in link.notes if n.user == "u1"] == [
        *(f"a-u1-{k}" for k in range(5)),
        *(f"b-u1-{k}" for k in range(5)),
        *(f"c-u1-{k}" for k in range(5)),
    ]
    assert store._turns.busy() == 0
