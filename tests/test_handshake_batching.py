"""Fast handshakes: the verified-token cache and the batched resume-point reads (pure, fakes
and a fake clock; the real JetStream reads are covered by test_durability and test_migration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from meshpush.backends.store import Cursor, Starts, StoredMessage, StoreUnavailable, cursor_key
from meshpush.core.auth import AuthError, Identity, TokenCache, TokenVerifier, issue_token
from meshpush.observe.metrics import Metrics
from meshpush.server.delivery import BadResume, Batcher, Feed, Feeder, Start
from meshpush.settings import Settings

SECRET = "s" * 32


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the token cache


def test_token_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = TokenCache(size=2, clock=FakeClock())
    for name in ("a", "b"):
        cache.put(name, Identity(name, expires_at=2000.0))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", Identity("c", expires_at=2000.0))
    assert len(cache) == 2
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_token_cache_forgets_a_token_once_it_expired() -> None:
    clock = FakeClock(1000.0)
    cache = TokenCache(clock=clock)
    cache.put("t", Identity("u", expires_at=1010.0))
    clock.now = 1009.9
    assert cache.get("t") == Identity("u", expires_at=1010.0)
    clock.now = 1010.0  # exp (+ leeway, already in expires_at) reached: verify again
    assert cache.get("t") is None
    assert len(cache) == 0


def test_token_cache_keeps_no_oversized_token() -> None:
    cache = TokenCache(clock=FakeClock(), max_token=10)
    cache.put("x" * 11, Identity("u", expires_at=2000.0))
    assert len(cache) == 0


def test_verifier_verifies_a_token_once_while_it_is_valid(monkeypatch: Any) -> None:
    verifier = TokenVerifier(SECRET)
    token = issue_token(SECRET, "alice", ttl=600)
    calls = []
    real = verifier._verify
    monkeypatch.setattr(verifier, "_verify", lambda t: calls.append(t) or real(t))
    first = verifier.verify(token)
    assert verifier.verify(token) == first and first.user == "alice"
    assert len(calls) == 1 and verifier.cache.hits == 1


def test_verifier_caches_no_refusal_and_a_forged_token_is_another_key() -> None:
    verifier = TokenVerifier(SECRET)
    good = issue_token(SECRET, "alice", ttl=600)
    verifier.verify(good)
    forged = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(AuthError) as exc:
            verifier.verify(forged)
        assert exc.value.reason == "invalid_token"
    expired = issue_token(SECRET, "bob", ttl=-10)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(expired)
    assert len(verifier.cache) == 1  # only the good one


# ---------------------------------------------------------------- the batcher


class Fetches:
    """A fetch function that records its batches; keys named "bad*" fail their batch,
    "stuck*" never answer."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.batches.append(keys)
        await trio.sleep(0.01)  # a round trip
        if any(k.startswith("stuck") for k in keys):
            await trio.sleep_forever()
        if any(k.startswith("bad") for k in keys):
            raise StoreUnavailable("cannot read the stream")
        return {k: k.upper() for k in keys}


async def _get_all(batcher: Batcher[str, str], keys: list[str], out: dict[str, Any]) -> None:
    async def one(key: str) -> None:
        try:
            out[key] = await batcher.get(key)
        except StoreUnavailable as exc:
            out[key] = exc

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)


async def test_a_batch_of_concurrent_requests_is_one_read(autojump_clock: trio.abc.Clock) -> None:
    fetch = Fetches()
    batcher: Batcher[str, str] = Batcher(fetch)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await _get_all(batcher, [f"k{i}" for i in range(100)], out)
        nursery.cancel_scope.cancel()
    assert len(fetch.batches) == 1 and sorted(fetch.batches[0]) == sorted(out)
    assert all(out[k] == k.upper() for k in out)
    assert (batcher.batches, batcher.requests) == (1, 100)


async def test_requests_made_while_a_read_is_under_way_gather_into_the_next_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    fetch = Fetches()
    batcher: Batcher[str, str] = Batcher(fetch, max_batch=30)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        nursery.start_soon(_get_all, batcher, ["first"], out)
        await trio.sleep(0.001)  # the first read is under way
        await _get_all(batcher, [f"k{i}" for i in range(50)], out)
        nursery.cancel_scope.cancel()
    assert fetch.batches[0] == ["first"]
    assert sorted(len(b) for b in fetch.batches[1:]) == [20, 30]  # bounded by max_batch
    assert len(out) == 51 and all(out[k] == k.upper() for k in out)


async def test_a_failing_read_fails_only_its_own_batch(autojump_clock: trio.abc.Clock) -> None:
    fetch = Fetches()
    batcher: Batcher[str, str] = Batcher(fetch)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        nursery.start_soon(_get_all, batcher, ["bad", "a1", "a2"], out)
        await trio.sleep(0.001)
        await _get_all(batcher, ["b1", "b2"], out)
        nursery.cancel_scope.cancel()
    assert len(fetch.batches) == 2
    assert all(isinstance(out[k], StoreUnavailable) for k in ("bad", "a1", "a2"))
    assert (out["b1"], out["b2"]) == ("B1", "B2")


async def test_a_stuck_read_holds_up_neither_later_batches_nor_its_callers_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    fetch = Fetches()
    batcher: Batcher[str, str] = Batcher(fetch, patience=0.05)
    out: dict[str, Any] = {}
    timed_out: list[str] = []

    async def with_deadline(key: str) -> None:
        with trio.move_on_after(5.0):  # the handshake's own deadline (START_TIMEOUT)
            out[key] = await batcher.get(key)
            return
        timed_out.append(key)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        start = trio.current_time()
        nursery.start_soon(with_deadline, "stuck")
        await trio.sleep(0.001)
        await _get_all(batcher, ["later"], out)
        assert trio.current_time() - start < 0.2  # waited for the stuck read's patience only
        await trio.sleep(6)
        assert timed_out == ["stuck"]  # its caller gave up at its own deadline
        nursery.cancel_scope.cancel()
    assert out == {"later": "LATER"}


async def test_without_its_task_a_batcher_reads_alone() -> None:
    fetch = Fetches()
    batcher: Batcher[str, str] = Batcher(fetch)
    assert await batcher.get("x") == "X"
    assert fetch.batches == [["x"]]


async def test_requests_in_flight_or_queued_when_the_batcher_stops_fail() -> None:
    batcher: Batcher[str, str] = Batcher(Fetches(), patience=60)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        outer.start_soon(_get_all, batcher, ["stuck"], out)  # in flight, never answered
        await trio.testing.wait_all_tasks_blocked()
        outer.start_soon(_get_all, batcher, ["queued"], out)  # waits for room
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert isinstance(out["stuck"], StoreUnavailable)
    assert isinstance(out["queued"], StoreUnavailable)


# ---------------------------------------------------------------- resume points from a batch


@dataclass
class FakeStore:
    """The reads a handshake makes: start_reads (batched), read_after and end_seq (its own)."""

    users: dict[str, int] = field(default_factory=dict)  # user -> newest seq
    broadcast: int = 0
    cursors: dict[str, Cursor] = field(default_factory=dict)
    end: int = 0
    epoch: str = "e1"
    start_calls: list[tuple[set[str], list[str]]] = field(default_factory=list)
    reads: list[tuple[str, str | None, int]] = field(default_factory=list)
    fail: bool = False
    stale_reads: int = 0  # reads answered empty first, as by a replica that lags behind

    async def start_reads(self, users: set[str], keys: list[str]) -> Starts:
        self.start_calls.append((set(users), list(keys)))
        await trio.sleep(0.01)
        if self.fail:
            raise StoreUnavailable("store failed: TimeoutError")
        return Starts(
            {u: s for u, s in self.users.items() if u in users},
            {k: c for k, c in self.cursors.items() if k in keys},
            self.broadcast,
        )

    async def read_after(
        self, ch: str, user: str | None, after: int, limit: int
    ) -> list[StoredMessage]:
        self.reads.append((ch, user, after))
        if self.stale_reads > 0:
            self.stale_reads -= 1
            return []
        last = self.users.get(user or "", 0) if ch == "user" else self.broadcast
        return [StoredMessage(last, after, "id", "{}")] if last > after else []

    async def end_seq(self, ch: str) -> int:
        return self.end


class FakeCursors:
    def __init__(self, pending: dict[str, Cursor] | None = None) -> None:
        self._pending = pending or {}

    def pending(self, key: str) -> Cursor | None:
        return self._pending.get(key)


@dataclass(eq=False)
class FakeSession:
    user: str
    device: str = "d"
    id: int = 0
    feeds: dict[str, Feed] = field(default_factory=lambda: {"user": Feed(), "broadcast": Feed()})


def _feeder(store: FakeStore, cursors: FakeCursors | None = None, replicas: int = 1) -> Feeder:
    settings = Settings(stream_replicas=replicas)
    return Feeder(settings, store, cursors or FakeCursors(), Metrics("t"))  # type: ignore[arg-type]


async def _start_all(
    feeder: Feeder, sessions: list[FakeSession], resume: dict[str, int], epoch: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def one(session: FakeSession) -> None:
        try:
            out[session.user] = await feeder.start_points(session, resume, epoch)  # type: ignore[arg-type]
        except (StoreUnavailable, BadResume) as exc:
            out[session.user] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(feeder.starts.run)
        async with trio.open_nursery() as handshakes:
            for session in sessions:
                handshakes.start_soon(one, session)
        nursery.cancel_scope.cancel()
    return out


async def test_a_handshake_storm_of_new_devices_is_one_read_and_no_stream_reads() -> None:
    store = FakeStore(broadcast=40)
    feeder = _feeder(store)
    sessions = [FakeSession(f"u{i}") for i in range(64)]
    out = await _start_all(feeder, sessions, {"user": 0, "broadcast": 0})
    assert len(store.start_calls) == 1 and len(store.start_calls[0][0]) == 64
    assert store.reads == []  # nothing stored after anyone's resume point: nothing to read
    for session in sessions:
        first, recovered = out[session.user]
        assert first == {"user": [], "broadcast": []} and recovered
        assert session.feeds["user"].fresh and session.feeds["broadcast"].sent == 40


async def test_only_channels_with_messages_after_the_resume_point_are_read() -> None:
    store = FakeStore(users={"behind": 9, "current": 7}, broadcast=3)
    cursors = {cursor_key("behind", "d"): Cursor(5, 3, "e1")}
    store.cursors = cursors
    pending = FakeCursors({cursor_key("current", "d"): Cursor(7, 3, "e1")})  # not written yet
    feeder = _feeder(store, pending)
    behind, current = FakeSession("behind"), FakeSession("current")
    out = await _start_all(feeder, [behind, current], {"user": 0, "broadcast": 0})
    assert store.reads == [("user", "behind", 5)]
    assert [m.seq for m in out["behind"][0]["user"]] == [9]
    assert out["current"][0] == {"user": [], "broadcast": []}
    assert current.feeds["user"].sent == 7  # the pending cursor, never asked of the bucket
    assert cursor_key("current", "d") not in store.start_calls[0][1]


async def test_a_client_position_within_the_users_newest_seq_needs_no_end_read() -> None:
    store = FakeStore(users={"u": 50}, end=10)  # end would refuse 50: it must not be read
    out = await _start_all(_feeder(store), [FakeSession("u")], {"user": 50, "broadcast": 0})
    assert out["u"][0]["user"] == [] and store.reads == []


async def test_a_client_position_beyond_every_end_is_refused() -> None:
    store = FakeStore(users={"u": 50}, end=60)
    out = await _start_all(_feeder(store), [FakeSession("u")], {"user": 61, "broadcast": 0})
    assert isinstance(out["u"], BadResume) and out["u"].ch == "user"


async def test_a_failed_batch_read_fails_its_handshakes_as_store_unavailable() -> None:
    store = FakeStore(fail=True)
    sessions = [FakeSession(f"u{i}") for i in range(5)]
    out = await _start_all(_feeder(store), sessions, {"user": 0, "broadcast": 0})
    assert all(isinstance(out[s.user], StoreUnavailable) for s in sessions)


def test_start_knows_the_newest_seq_per_channel() -> None:
    start = Start(Cursor(), user=7, broadcast=3)
    assert (start.last("user"), start.last("broadcast")) == (7, 3)


async def test_a_first_read_a_lagging_replica_answers_empty_is_read_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The newest seq is exact (read from the leader); the direct get of the first batch may
    be answered by a replica that has not applied it yet: going live then would lose it
    (the clustered chaos run's lost message)."""
    store = FakeStore(users={"u": 9}, stale_reads=3)
    feeder = _feeder(store, replicas=3)
    session = FakeSession("u")
    out = await _start_all(feeder, [session], {"user": 5, "broadcast": 0})
    assert [m.seq for m in out["u"][0]["user"]] == [9]
    assert len(store.reads) == 4 and feeder.stats.backend_errors["stale_read"] == 3


async def test_a_first_read_that_stays_empty_sends_the_session_away_to_resume(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FakeStore(users={"u": 9}, stale_reads=10_000)
    feeder = _feeder(store, replicas=3)
    out = await _start_all(feeder, [FakeSession("u")], {"user": 5, "broadcast": 0})
    assert isinstance(out["u"], StoreUnavailable)


async def test_with_one_replica_an_empty_first_read_is_not_read_again() -> None:
    store = FakeStore(users={"u": 9}, stale_reads=1)  # as if retention removed 6..9
    out = await _start_all(_feeder(store), [FakeSession("u")], {"user": 5, "broadcast": 0})
    assert out["u"][0]["user"] == [] and len(store.reads) == 1
