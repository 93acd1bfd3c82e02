"""Coalesced fan-out (meshpush/server/hub.py ``deliver_many``) over real socket pairs, no node: the
frames of many messages go to a session in one write and parse with wsproto, plain and over
TLS; feeds advance exactly as one-by-one deliveries would; order holds when coalesced, fast and
buffered writes mix; a reader that stops is still cut with 4008, its buffer counted per
frame."""

from __future__ import annotations

import contextlib
import itertools
import random
import ssl
from typing import Any

import pytest
import trio
import trustme
from test_sessions import LIMITS, context, live, note, running, texts
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from meshpush.backends.bus import Notification
from meshpush.core.feed import Feed, Verdict
from meshpush.core.machine import Limits
from meshpush.core.protocol import Close
from meshpush.server import hub as hub_module
from meshpush.server.hub import Hub, waiting
from meshpush.server.sessions import Session
from meshpush.server.wire import Wire


def chain(first: int, count: int, ch: str = "user", size: int = 10, gap: int = 1) -> list[Any]:
    """``count`` notifications chained after seq ``first - gap`` (seqs ``gap`` apart)."""
    seqs = [first + gap * k for k in range(count)]
    return [note(s, s - gap, size=size, ch=ch) for s in seqs]


class CountingWrites:
    """Counts the nonblocking writes of every Wire (the syscalls of the fast path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = Wire.try_send

        def counted(wire: Wire, data: bytes) -> int:
            self.calls += 1
            return original(wire, data)

        monkeypatch.setattr(Wire, "try_send", counted)


# ---------------------------------------------------------------- the pure parts


def one_by_one(feed: Feed, notes: list[Any]) -> list[Verdict]:
    return [feed.live(n) for n in notes]


@pytest.mark.parametrize(
    ("sent", "replaying", "fresh"),
    [(0, False, False), (4, False, True), (9, False, False), (3, False, False), (9, True, False)],
)
def test_a_run_taken_at_once_leaves_the_feed_as_one_by_one_would(
    sent: int, replaying: bool, fresh: bool
) -> None:
    notes = chain(10, 5, gap=1)  # seqs 10..14, the first one's prev is 9
    at_once, single = Feed(sent, fresh), Feed(sent, fresh)
    at_once.replaying = single.replaying = replaying
    taken = at_once.live_run(notes[0].prev, notes[-1].seq)
    verdicts = one_by_one(single, notes)
    assert taken == (verdicts == [Verdict.DELIVER] * 5)
    if not taken:  # nothing changed: the hub hands them to live() one by one
        assert (at_once.sent, at_once.fresh, at_once.replaying) == (sent, fresh, replaying)
        at_once_verdicts = one_by_one(at_once, notes)
        assert at_once_verdicts == verdicts
    assert (at_once.sent, at_once.fresh, at_once.replaying) == (
        single.sent,
        single.fresh,
        single.replaying,
    )


def test_groups_keep_arrival_order_per_target() -> None:
    def n(ch: str, user: str | None, seq: int) -> Notification:
        return Notification(ch, user, seq, 0, f"m{seq}", 0.0, "1")

    notes = [
        n("user", "a", 1),
        n("user", "b", 2),
        n("user", "a", 3),
        n("broadcast", None, 4),
        n("broadcast", None, 5),
        n("user", "a", 6),
        n("broadcast", None, 7),
    ]
    assert hub_module._groups(notes) == [[0, 2], [1], [3, 4], [5], [6]]


def test_chunks_bound_frames_and_bytes() -> None:
    notes = chain(1, 10)
    assert [len(c) for c in hub_module._chunks(list(range(10)), notes, 4, 10**6)] == [4, 4, 2]
    big = chain(1, 3, size=70_000)
    assert hub_module._chunks([0, 1, 2], big, 256, 65536) == [[0], [1], [2]]
    assert hub_module._chunks([0, 1, 2], notes, 256, 250) == [[0, 1], [2]]


async def test_a_group_is_cut_to_what_a_session_may_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst bigger than the outbound bound (a TLS session buffers every frame) is written in
    chunks of at most ``out_frames``: it never makes the session a slow consumer by itself."""
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=8))
    writes = CountingWrites(monkeypatch)
    hub = Hub()
    session = live(Session(ctx, "u", "d", 0))
    hub.add(session)
    chunks: list[int] = []

    def write_many(session: Session, frames: list[bytes], joined: bytes) -> bool:
        chunks.append(len(frames))
        return True

    monkeypatch.setattr(Session, "write_many", write_many)
    assert await hub.deliver_many(chain(1, 20)) == [1] * 20
    assert chunks == [8, 8, 4] and writes.calls == 0


async def test_waiting_takes_what_is_there_and_splits_at_a_catch_up() -> None:
    send, receive = trio.open_memory_channel[Any](100)
    a, b, c, d = chain(1, 4)
    for item in (b, None, c, d):
        send.send_nowait(item)
    assert waiting(a, receive) == [[a, b], None, [c, d]]
    send.send_nowait(a)
    assert waiting(b, receive, limit=1) == [[b]]  # bounded: the rest waits for the next look


# ---------------------------------------------------------------- over sockets


async def test_many_messages_reach_a_session_in_one_write_and_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100 broadcasts arriving together: one write per session, every frame (7-bit, 16-bit and
    64-bit lengths mixed) parsed by wsproto's client, in order, once."""
    sizes = [0, 100, 126, 5000, 65536, *([100] * 95)]
    notes = [note(k + 1, k, size=size, ch="broadcast") for k, size in enumerate(sizes)]
    hub = Hub()
    with trio.fail_after(20):
        ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=1024))
        async with running(ctx) as (s1, p1), running(ctx, user="v") as (s2, p2):
            hub.add(s1)
            hub.add(s2)
            writes = CountingWrites(monkeypatch)
            sent = await hub.deliver_many(notes)
            assert sent == [2] * len(notes)
            # about 64 KiB per write: the 64 KiB message is a write of its own
            assert writes.calls == 2 * 3
            got = [texts(await p.frames(1 + len(notes))) for p in (p1, p2)]
    for frames in got:
        assert frames[0] == {"type": "welcome"}
        assert [m["seq"] for m in frames[1:]] == list(range(1, len(notes) + 1))
        assert [len(m["data"]) for m in frames[1:]] == sizes
        assert all(m["ch"] == "broadcast" and m["prev"] == m["seq"] - 1 for m in frames[1:])
    assert s1.feeds["broadcast"].sent == s2.feeds["broadcast"].sent == len(notes)


async def test_a_session_behind_gets_each_message_through_its_feed_rules() -> None:
    """Coalescing never skips the feed's rules: a duplicate is dropped, a replaying feed
    buffers, a missed notification starts a catch-up — the others get the group at once."""
    ctx = context()
    hub = Hub()
    fresh, ahead, replaying = (live(Session(ctx, f"u{i}", "d", 0)) for i in range(3))
    ahead.feeds["broadcast"].start(2)
    replaying.feeds["broadcast"].replaying = True
    for s in (fresh, ahead, replaying):
        hub.add(s)
    notes = chain(1, 4, ch="broadcast")
    sent = await hub.deliver_many(notes)
    assert sent == [0, 0, 0, 0]  # no wire: nothing written (the sessions never ran)
    assert fresh.feeds["broadcast"].sent == 4
    assert ahead.feeds["broadcast"].sent == 4  # 1 and 2 dropped, 3 and 4 delivered
    assert replaying.feeds["broadcast"].pending == notes
    assert replaying.feeds["broadcast"].sent == 0


async def test_order_holds_when_coalesced_fast_and_buffered_writes_mix() -> None:
    """Tiny socket buffers and a reader that pauses: groups of 1..40 frames, written whole,
    in part, or behind what waits; every frame arrives once, in order, unicast and broadcast
    interleaved as they arrived."""
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=10_000))
    hub = Hub()
    rng = random.Random(9)
    user_seq, bcast_seq = itertools.count(1), itertools.count(1)
    expected: list[tuple[str, int]] = []
    with trio.fail_after(30):
        async with running(ctx, buffers=4096) as (session, peer):
            hub.add(session)
            received: list[dict[str, Any]] = []
            buffered_seen = False
            for _ in range(40):
                batch = []
                for _ in range(rng.randint(1, 40)):
                    ch = rng.choice(["user", "broadcast"])
                    seq = next(user_seq if ch == "user" else bcast_seq)
                    batch.append(note(seq, seq - 1, size=rng.choice([10, 300, 900]), ch=ch))
                    expected.append((ch, seq))
                await hub.deliver_many(batch)
                buffered_seen |= session.buffered > 0
                if rng.random() < 0.3:  # the reader catches up a little now and then
                    received += texts(await peer.frames(5, read_bytes=4096))
                    await trio.sleep(0.005)
            assert buffered_seen  # the buffered path was taken
            while len(received) < len(expected) + 1:
                received += texts(await peer.frames(1))
    assert [(m["ch"], m["seq"]) for m in received[1:]] == expected
    assert session.out is None or not session.out


async def test_a_stopped_reader_is_cut_4008_with_its_buffer_counted_per_frame() -> None:
    ctx = context()
    hub = Hub()
    with trio.fail_after(20):
        async with running(ctx, buffers=4096) as (session, peer):
            hub.add(session)
            peak = 0
            seq = 0
            while session.close_request is None:
                await hub.deliver_many(chain(seq + 1, 16, size=1000))
                seq += 16
                peak = max(peak, session.buffered)
                await trio.sleep(0.001)
            assert session.close_request.code == Close.SLOW_CONSUMER
            # counted per frame, not per write: the bound (2 x out_frames) holds to a group
            assert 2 * LIMITS.out_frames < peak <= 2 * LIMITS.out_frames + 16
            events: list[Any] = []
            while not any(isinstance(e, CloseConnection) for e in events):
                events += await peer.frames(1)
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes[0].code == Close.SLOW_CONSUMER
    seqs = [m["seq"] for m in texts(events)[1:]]
    assert seqs == list(range(1, len(seqs) + 1))  # a prefix, in order, nothing skipped


async def test_coalesced_frames_parse_over_tls() -> None:
    """Over TLS every frame goes through the session's buffer and ``SSLStream``: a coalesced
    group (every length encoding) still reaches wsproto's client whole, in order."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = _socket_streams()
    server = trio.SSLStream(a, server_ctx, server_side=True)
    client = trio.SSLStream(b, client_ctx, server_hostname="127.0.0.1")
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=1024))
    session = live(Session(ctx, "u", "d", expires_at=2e9))
    wire = Wire(server)
    assert not wire.fast
    sizes = [0, 125, 126, 65535, 65536, *([100] * 60)]
    notes = [note(k + 1, k, size=size, ch="broadcast") for k, size in enumerate(sizes)]
    hub = Hub()
    proto = Connection(ConnectionType.CLIENT)
    got: list[str] = []
    parts: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server.do_handshake()
            session.open(wire, '{"type":"welcome"}', {})
            await nursery.start(session.run)
            hub.add(session)
            assert await hub.deliver_many(notes) == [1] * len(notes)
            while len(got) < 1 + len(notes):
                proto.receive_data(bytes(await client.receive_some(65536)))
                for event in proto.events():
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            got.append("".join(parts))
                            parts.clear()
            session.close(Close.GOING_AWAY, "test over")
    frames = texts([TextMessage(g) for g in got])
    assert frames[0] == {"type": "welcome"}
    assert [m["seq"] for m in frames[1:]] == list(range(1, len(notes) + 1))
    assert [len(m["data"]) for m in frames[1:]] == sizes


def _socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


# ---------------------------------------------------------------- a pass that grows


def arriving(notes: list[Any], every: int = 2) -> Any:
    """A ``more`` for ``Hub.deliver_many``: hands out ``notes`` one at a time, on every
    ``every``-th call (as if they arrived while the pass ran), only if ``accept`` takes it."""
    calls = itertools.count(1)

    def more(accept: Any) -> Any:
        if notes and next(calls) % every == 0 and accept(notes[0]):
            return notes.pop(0)
        return None

    return more


async def test_broadcasts_arriving_during_a_pass_join_it_and_keep_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Group commit: broadcasts that arrive while a pass runs join it; the sessions not yet
    visited get them in the same write, the others in one more round; every session gets
    every frame once, in order, in fewer writes than one per message."""
    monkeypatch.setattr(hub_module, "YIELD_EVERY", 2)
    ctx = context(Limits(heartbeat_interval=100, heartbeat_timeout=300, out_frames=1024))
    hub = Hub()
    later = chain(2, 6, ch="broadcast")  # seqs 2..7, arriving during the pass of seq 1
    notes = chain(1, 1, ch="broadcast")
    with trio.fail_after(20):
        async with contextlib.AsyncExitStack() as stack:
            pairs = [await stack.enter_async_context(running(ctx, f"u{i}")) for i in range(12)]
            for session, _ in pairs:
                hub.add(session)
            writes = CountingWrites(monkeypatch)
            sent = await hub.deliver_many(notes, arriving(later))
            assert [n.seq for n in notes] == list(range(1, 8)) and not later
            assert sent == [12] * 7
            assert writes.calls < 12 * 7  # coalesced
            got = [texts(await peer.frames(8)) for _, peer in pairs]
    for frames in got:
        assert [m["seq"] for m in frames[1:]] == list(range(1, 8))
    assert all(s.feeds["broadcast"].sent == 7 for s, _ in pairs)


async def test_only_chained_broadcasts_join_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "YIELD_EVERY", 1)
    ctx = context()
    hub = Hub()
    sessions = [live(Session(ctx, f"u{i}", "d", 0)) for i in range(3)]
    for s in sessions:
        hub.add(s)
    offered: list[Any] = []
    unchained = note(5, 3, ch="broadcast")
    unicast = note(1, 0)

    def more(accept: Any) -> Any:
        offered.extend(n for n in (unchained, unicast) if accept(n))
        return None

    notes = chain(1, 1, ch="broadcast")
    await hub.deliver_many(notes, more)
    assert offered == [] and len(notes) == 1


async def test_sessions_registered_during_a_pass_get_what_joined_it_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session registered while the pass runs is not among its targets: the broadcasts that
    join the pass after that are offered to it too (its replaying feed buffers them)."""
    monkeypatch.setattr(hub_module, "YIELD_EVERY", 1)
    ctx = context()
    hub = Hub()
    for i in range(4):
        hub.add(live(Session(ctx, f"u{i}", "d", 0)))
    newcomer = Session(ctx, "late", "d", 0)  # replaying: a new session reads the stream first
    later = chain(2, 2, ch="broadcast")
    deliver = arriving(later)

    def more(accept: Any) -> Any:
        if newcomer not in hub.all():
            hub.add(newcomer)
        return deliver(accept)

    notes = chain(1, 1, ch="broadcast")
    await hub.deliver_many(notes, more)
    assert len(notes) == 3
    assert [n.seq for n in newcomer.feeds["broadcast"].pending or ()] == [2, 3]


@pytest.mark.parametrize("seed", range(6))
async def test_a_growing_pass_gives_every_session_every_frame_once_in_order(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Broadcasts join the pass at random turns, in every round: each session ends with every
    frame once, in order, its feed live at the last seq (no catch-up), each counted once."""
    rng = random.Random(seed)
    monkeypatch.setattr(hub_module, "YIELD_EVERY", rng.randint(1, 4))
    written: dict[int, list[bytes]] = {}

    def write_many(session: Session, frames: list[bytes], joined: bytes) -> bool:
        assert joined == b"".join(frames)
        written.setdefault(session.id, []).extend(frames)
        return True

    monkeypatch.setattr(Session, "write_many", write_many)
    ctx = context()
    hub = Hub()
    sessions = [live(Session(ctx, f"u{i}", "d", 0)) for i in range(rng.randint(5, 40))]
    for s in sessions:
        hub.add(s)
    later = chain(2, rng.randint(1, 30), ch="broadcast")
    total = 1 + len(later)

    def more(accept: Any) -> Any:
        if later and rng.random() < 0.4 and accept(later[0]):
            return later.pop(0)
        return None

    notes = chain(1, 1, ch="broadcast")
    sent = await hub.deliver_many(notes, more)
    assert len(notes) + len(later) == total
    assert sent == [len(sessions)] * len(notes)
    frames = [hub_module.encode_text(hub_module._frame_text("broadcast", n)) for n in notes]
    for s in sessions:
        assert written[s.id] == frames
        feed = s.feeds["broadcast"]
        assert not feed.replaying and feed.sent == notes[-1].seq
