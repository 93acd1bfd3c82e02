"""Durable storage on JetStream: chained publishes, ordered reads and device cursors.

* Every unicast is stored on ``mp.<c>.store.u.<slot>.<user>`` in stream ``MP_<c>_USER``; every
  broadcast on ``mp.<c>.store.b`` in ``MP_<c>_BCAST``. The stream sequence is the ``seq``.
* Each stored message carries ``Mp-Prev``: the previous seq on the same subject. The publish
  sends ``Nats-Expected-Last-Subject-Sequence: <prev>`` so JetStream refuses it if another
  publisher got there first; the node then retries with the seq JetStream names (bounded).
  The per-user chain is therefore exact, whoever publishes.
* A request of more than ``SMALL_REQUEST`` user messages goes, once it has the turn on all
  its users, as one JetStream *atomic batch* (nats-server >= 2.12, stream ``allow_atomic``):
  one round trip instead of one per message of a user. The batch is stored whole, on
  consecutive seqs, or not at all; the first message of each subject carries the expected
  last seq and ``Mp-Prev``, a later one ``Mp-Prev-Back: k`` (its prev is its own seq - k,
  unknown when it is sent). Refused on a stale hint, it is sent once more on the users'
  newest seqs (one read); any other refusal falls back to the rounds above. One batch is in
  flight per node: big requests that arrive meanwhile go together in the next one.
* ``Nats-Msg-Id`` is the publish id: a retry inside the duplicate window returns the original
  seq with ``duplicate`` set and is neither stored nor notified again.
* Only once JetStream stored a message is its live notification sent: the stream is the truth,
  notifications are hints. For a unicast JetStream sends it itself (the user stream's
  ``republish`` to ``mp.<c>.rp.>``, :mod:`meshpush.backends.bus`); this node notifies only
  broadcasts, and unicasts on a server that did not echo the republish back.
* Reads use JetStream's batched direct get (``next_by_subj``): one round trip per batch.
* Cursors (last acked seq per device and channel) live in the KV bucket ``MP_<c>_CURSORS``;
  :class:`Cursors` collects acks in memory and writes them in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.api
import nats.js.errors
import trio

from meshpush.backends.bridge import Bridge, aio
from meshpush.backends.bus import Bus, encode_notification
from meshpush.backends.natslink import LinkError, Request
from meshpush.backends.pipeline import (
    Ack,
    Answer,
    BatchAck,
    NoAnswer,
    Refused,
    TrioGroupCommit,
    WrongLast,
    publish_batch,
    publish_round,
)
from meshpush.core.encoding import USER_TOKENS, BadId, decode_token, encode_token
from meshpush.core.ring import slot
from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

log = logging.getLogger(__name__)

MAX_CHAIN_RETRIES = 32
# requests of at most this many messages (single publishes) merge into shared rounds: one
# socket write and one wait for many HTTP requests; big batches merged that way waited on the
# hand-over between lanes (p99 x2-4), so each runs its own rounds at once
SMALL_REQUEST = 8
# the most messages nats-server takes in one atomic batch (its max_batch_size default); a
# bigger request is stored in rounds
MAX_ATOMIC_BATCH = 1000
# nats-server's error code for a batch sent to a stream without allow_atomic
ATOMIC_DISABLED = 10174
# nats-server's error code for a batch it does not hold (all of it): one opened ahead that it
# dropped (a restart, its max_batch_timeout)
INCOMPLETE_BATCH = 10176
# a batch opened ahead is used while at most this old (seconds): nats-server drops an
# uncommitted batch after its max_batch_timeout, 10 s by default
OPENED_MAX_AGE = 5.0
CURSOR_TTL_FACTOR = 4


class StoreUnavailable(Exception):
    """The store did not take an operation: for a publish, it was definitely **not stored**
    (not connected, JetStream refused it, or it was never sent). The API answers 503."""


class StoreTimeout(StoreUnavailable):
    """No answer in time: a publish **may or may not** have been stored (the API answers
    504 ``store_timeout``; retrying with the same id is safe and tells which)."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to store: ``user`` is None for a broadcast."""

    ch: str
    user: str | None
    id: str
    data_json: str
    trace: tracing.Trace | None = None  # set by meshpush.observe.tracing, only when tracing is on


@dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    prev: int
    duplicate: bool


Outcome = Stored | StoreUnavailable


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from a stream."""

    seq: int
    prev: int
    id: str
    data_json: str
    traceparent: str | None = None  # read only when tracing is on (replays link to it)


class _Turns:
    """Whose turn it is on each key (a stream subject: one user's chain): a FIFO queue of
    claims per key. The first claim in a key's queue holds the key until it lets go; the next
    one is granted it then, at once. A claim queues for all its keys at once and never waits
    for one while it holds another (no convoy: :meth:`Store._publish_all` works on the keys
    it has while the others are busy), and order per key is the order of the claims."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[_Claim]] = {}

    def claim(self, keys: Iterable[str]) -> _Claim:
        """Queue a claim on every key (keys unique); those free now are granted at once."""
        claim = _Claim(self)
        for key in keys:
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = deque([claim])
                claim.ready.append(key)
            else:
                queue.append(claim)
                claim.waiting.add(key)
        return claim

    def busy(self) -> int:
        """How many keys are held now (for tests and diagnosis)."""
        return len(self._queues)

    def _leave(self, key: str, claim: _Claim) -> None:
        queue = self._queues[key]
        if queue[0] is claim:
            queue.popleft()
            if queue:
                queue[0]._grant(key)
        else:
            queue.remove(claim)
        if not queue:
            del self._queues[key]


class _Claim:
    """One request's turns: keys granted but not taken yet (``ready``), taken (``held``) and
    still queued behind other claims (``waiting``)."""

    __slots__ = ("_turns", "_wake", "held", "ready", "waiting")

    def __init__(self, turns: _Turns) -> None:
        self._turns = turns
        self._wake = trio.Event()
        self.ready: list[str] = []
        self.waiting: set[str] = set()
        self.held: set[str] = set()

    def _grant(self, key: str) -> None:
        self.waiting.discard(key)
        self.ready.append(key)
        self._wake.set()

    def take(self) -> list[str]:
        """The keys granted since the last take (held from now on)."""
        ready, self.ready = self.ready, []
        self.held.update(ready)
        return ready

    async def granted(self, deadline: float) -> None:
        """Wait until a key is granted, at most until ``deadline``."""
        if not self.ready:
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()

    async def all_granted(self, deadline: float) -> bool:
        """Wait until every key is granted (true), at most until ``deadline`` (false)."""
        while self.waiting:
            self._wake = trio.Event()
            with trio.move_on_at(deadline) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                return not self.waiting
        return True

    def give_up(self) -> list[str]:
        """Leave the queues of the keys not granted; returns them."""
        keys = list(self.waiting)
        self.waiting.clear()
        for key in keys:
            self._turns._leave(key, self)
        return keys

    def release(self, key: str) -> None:
        """Let go of a held key: the next claim queued on it has it now."""
        self.held.discard(key)
        self._turns._leave(key, self)

    def close(self) -> None:
        """Let go of every key, waiting, granted or held."""
        self.give_up()
        keys, self.ready, self.held = [*self.ready, *self.held], [], set()
        for key in keys:
            self._turns._leave(key, self)


@dataclass(slots=True)
class _Chain:
    """One subject's messages of a request (indexes into its items), stored one after the
    other: ``head`` is the next to send, ``prev`` the seq it chains on."""

    indexes: list[int]
    head: int = 0
    prev: int = 0
    tries: int = 0

    def done(self) -> bool:
        return self.head == len(self.indexes)


@dataclass(slots=True)
class _Pending:
    """One request while it has its turns: its messages, their chains by subject, the
    outcomes settled so far (None: not yet), its claim on the subjects and when it stops
    waiting for them."""

    items: list[Outgoing]
    chains: dict[str, _Chain]
    outcomes: list[Outcome | None]
    claim: _Claim
    deadline: float
    opened: int = 0  # the batch it was last sent in had been opened ahead (its marker: 1)


class _LastSeqs:
    """A bounded LRU of the last known seq per subject (a hint; JetStream corrects it)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._data: OrderedDict[str, int] = OrderedDict()

    def get(self, subject: str) -> int:
        seq = self._data.get(subject, 0)
        if subject in self._data:
            self._data.move_to_end(subject)
        return seq

    def put(self, subject: str, seq: int) -> None:
        self._data[subject] = seq
        self._data.move_to_end(subject)
        while len(self._data) > self.size:
            self._data.popitem(last=False)


def _publish(
    subject: str,
    prev: int,
    item: Outgoing,
    headers: dict[str, str] | None = None,
    sent: str | None = None,
) -> Request:
    """One message's publish: chained on ``prev`` (``prev`` < 0: ``-prev`` messages back in
    the same atomic batch, whose ``headers`` are given), sent at ``sent`` (``time.time()``'s
    repr, once for a round or a batch; default: now)."""
    headers = headers or {}
    headers["Nats-Msg-Id"] = dedup_id(item)
    if prev >= 0:
        headers["Nats-Expected-Last-Subject-Sequence"] = headers["Mp-Prev"] = str(prev)
    else:  # the server refuses an expectation there; the batch keeps it behind its prev
        headers["Mp-Prev-Back"] = str(-prev)
    headers["Mp-Id"] = encode_token(item.id)
    headers["Mp-T"] = sent or repr(time.time())  # publish time: the owner's latency metric
    if item.trace is not None:
        headers["traceparent"] = item.trace.traceparent
    return Request(subject, item.data_json.encode(), headers)


def atomic_allowed(info: Any) -> bool:
    """Whether a stream info (as the server answered it) says atomic batches are on: an
    older server ignores ``allow_atomic`` and does not echo it."""
    return getattr(info.config, "allow_atomic", None) is True


def _incomplete(answer: object) -> bool:
    """A batch the server does not hold (all of it): one opened ahead that it dropped."""
    return isinstance(answer, Refused) and answer.code == INCOMPLETE_BATCH


def _batchable(items: list[Outgoing]) -> bool:
    """Whether a big request is worth one atomic batch: at most the server's limit, all on
    one stream (the user stream), and some user with more than one message — else one round
    stores it all, and a batch would only add the server's staging (it stages every batch in
    a temporary store: on a file stream ~2x the CPU per message and a few fsyncs a batch)."""
    if len(items) > MAX_ATOMIC_BATCH or any(item.ch != "user" for item in items):
        return False
    return len({item.user for item in items}) < len(items)


def _prevs_in_batch(chains: dict[str, _Chain]) -> list[int]:
    """Each item's prev in a batch: the first of a subject chains on ``chain.prev`` (>= 0);
    a later one on the subject's previous item, ``-k`` positions back (its seq is unknown
    when the batch is sent; the batch's seqs are consecutive, so it is own seq - k)."""
    prevs = [0] * sum(len(c.indexes) for c in chains.values())
    for chain in chains.values():
        prevs[chain.indexes[0]] = chain.prev
        for before, i in zip(chain.indexes, chain.indexes[1:], strict=False):
            prevs[i] = before - i
    return prevs


def _batch_publishes(
    items: list[Outgoing],
    chains: dict[str, _Chain],
    prevs: list[int],
    batch_id: str,
    opened: int = 0,
) -> list[Request]:
    """The atomic batch's publishes: the first of each subject expects its last seq (so the
    whole batch is refused if another publisher got there first) and carries ``Mp-Prev``; a
    later one carries ``Mp-Prev-Back`` and no expectation (the server refuses one there; the
    batch's atomicity keeps it right behind the first). ``opened``: the batch's messages
    already sent (a batch opened ahead)."""
    subjects = [""] * len(items)
    for subject, chain in chains.items():
        for i in chain.indexes:
            subjects[i] = subject
    requests, sent = [], repr(time.time())
    for i, item in enumerate(items):
        batch = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(opened + i + 1)}
        if i == len(items) - 1:
            batch["Nats-Batch-Commit"] = "1"
        requests.append(_publish(subjects[i], prevs[i], item, batch, sent))
    return requests


def _filled(outcomes: list[Outcome | None]) -> list[Outcome]:
    return [o if o is not None else StoreUnavailable("not attempted") for o in outcomes]


def _skip_rest(indexes: list[int], outcomes: list[Outcome | None]) -> None:
    skipped = StoreUnavailable("not stored: an earlier message of this user failed")
    for i in indexes:
        outcomes[i] = skipped


def _cancelled(items: list[Outgoing]) -> list[Outcome]:
    return [StoreTimeout("outcome unknown: the publishing task was cancelled")] * len(items)


def dedup_id(item: Outgoing) -> str:
    """``Nats-Msg-Id``: idempotency is per user (and per broadcast), whatever the id's bytes."""
    key = f"{item.ch}\0{item.user or ''}\0{item.id}".encode()
    return hashlib.sha256(key).hexdigest()


def stream_subject(settings: Settings, ch: str, user: str | None) -> str:
    if ch == "broadcast":
        return f"mp.{settings.cluster}.store.b"
    assert user is not None
    return _user_subject(settings.cluster, user)


@functools.lru_cache(maxsize=USER_TOKENS)
def _user_subject(cluster: str, user: str) -> str:
    """A user's subject in the user stream (kept: every message of a user names it)."""
    return f"mp.{cluster}.store.u.{slot(user)}.{encode_token(user)}"


@dataclass(slots=True)
class StoreStats:
    """What the store and the cursors count."""

    backend_errors: Tally = field(default_factory=Tally)
    #: big requests sent as one atomic batch, by result: stored, refused (then rounds), timeout
    atomic_batches: Tally = field(default_factory=Tally)
    #: resends because another publisher moved a chain: wrong_last (a publish, on the seq
    #: JetStream named), hint_refresh (a batch's users' newest seqs read again)
    chain_retries: Tally = field(default_factory=Tally)
    #: atomic batches sent into one opened ahead: used, gone (the server no longer held it)
    opened_ahead: Tally = field(default_factory=Tally)


class Store:
    """JetStream side of a node. Needs a connected :class:`Bus`."""

    def __init__(self, settings: Settings, bus: Bus, bridge: Bridge, metrics: Metrics) -> None:
        self.settings = settings
        self.bus = bus
        self.bridge = bridge
        self.stats = StoreStats()
        metrics.add_source(self)
        c = settings.cluster
        self.streams = {"user": f"MP_{c}_USER", "broadcast": f"MP_{c}_BCAST"}
        self.bucket = f"MP_{c}_CURSORS"
        self.epoch = ""
        self.kv: Any = None
        #: the user stream republishes every stored message to its owner (the server echoed
        #: the republish back): no unicast notification from here
        self.republished = False
        self._turns = _Turns()
        self._last = _LastSeqs()
        self.chain_retries = 0
        self.publish_timeout = 5.0
        # atomic batches for big requests: on once the user stream said allow_atomic (setup),
        # used while every node in the ring view reads them (Bus.peers_read_batches)
        self.atomic = False
        self._atomic_known = False  # the mode was logged
        self.atomic_batches = 0  # stored as one batch
        self.atomic_fallbacks = 0  # refused as a batch, stored in rounds
        self.atomic_timeouts = 0  # no answer to a batch (outcome unknown)
        self.hint_refreshes = 0  # a batch refused on a stale hint: newest seqs read
        self._opened: tuple[str, float] | None = None  # a batch opened ahead: (id, trio time)
        self.opened_ahead = 0  # batches sent into a batch opened ahead
        self.opened_dropped = 0  # ... that the server no longer held (sent again)
        self._small: TrioGroupCommit[Outgoing, Outcome] = TrioGroupCommit(
            self._publish_all, _cancelled
        )
        # big requests that arrive while an atomic batch is in flight go together in the next
        # one (a request waits for its users' turns anyway: requests on the same users would
        # otherwise go one batch at a time)
        self._big: TrioGroupCommit[Outgoing, Outcome] = TrioGroupCommit(
            self._publish_atomic, _cancelled, lanes=1, max_items=MAX_ATOMIC_BATCH
        )

    def statistics(self) -> StoreStats:
        atomic = {"stored": self.atomic_batches, "refused": self.atomic_fallbacks}
        retries = {"wrong_last": self.chain_retries, "hint_refresh": self.hint_refreshes}
        return snapshot(
            self.stats,
            atomic_batches=Tally(atomic | {"timeout": self.atomic_timeouts}),
            chain_retries=Tally(retries),
            opened_ahead=Tally({"used": self.opened_ahead, "gone": self.opened_dropped}),
        )

    # ------------------------------------------------------------ setup

    async def setup(self) -> None:
        """Create or update the streams and the cursor bucket (idempotent)."""
        infos = await aio(self._ensure)()
        echoed = infos[0].config.republish
        wanted = self.bus.subjects.user_republish()
        self.republished = echoed is not None and (echoed.src, echoed.dest) == wanted
        if self.settings.live_republish and not self.republished:
            log.warning("the user stream does not republish (server too old?): nodes notify")
        self.epoch = ".".join(str(int(i.created.timestamp() * 1000)) for i in infos)
        self._use_atomic(self.settings.atomic_batches and atomic_allowed(infos[0]))

    def _use_atomic(self, on: bool) -> None:
        """Atomic batches only where the server echoed ``allow_atomic`` (an older one ignores
        the field and would store a batch's messages one by one, without the guarantee) and
        the ``atomic_batches`` setting is on."""
        if on != self.atomic or not self._atomic_known:
            self._atomic_known = True
            why = (
                "no atomic batch publish on the server"
                if self.settings.atomic_batches
                else "the atomic_batches setting is off"
            )
            log.info(
                "big publish requests: %s",
                "one JetStream atomic batch each" if on else f"rounds ({why})",
            )
        self.atomic = on

    async def _ensure(self) -> list[Any]:
        s, c = self.settings, self.settings.cluster
        src, dest = self.bus.subjects.user_republish()
        common: dict[str, Any] = dict(
            max_age=s.max_message_age,
            duplicate_window=s.duplicate_window,
            num_replicas=s.stream_replicas,
            storage=nats.js.api.StorageType.FILE,
            allow_direct=True,
        )
        configs = [
            nats.js.api.StreamConfig(
                name=self.streams["user"],
                subjects=[f"mp.{c}.store.u.>"],
                max_msgs_per_subject=s.max_msgs_per_user,
                republish=nats.js.api.RePublish(src=src, dest=dest, headers_only=False)
                if s.live_republish
                else None,
                allow_atomic=True,  # big requests: one atomic batch (nats-server >= 2.12)
                **common,
            ),
            nats.js.api.StreamConfig(
                name=self.streams["broadcast"],
                subjects=[f"mp.{c}.store.b"],
                max_msgs=s.max_msgs_per_user,
                **common,
            ),
        ]
        infos = [await self._add_or_update(cfg) for cfg in configs]
        self.kv = await self._cursor_bucket()
        return infos

    async def _cursor_bucket(self) -> Any:
        """The cursor bucket, with direct gets allowed (a batch of cursors is one request). A
        bucket that exists with another configuration (made by an older meshpush) is used as
        it is, switched to direct gets in place (nothing else of it changes)."""
        s = self.settings
        config = nats.js.api.KeyValueConfig(
            bucket=self.bucket,
            history=1,
            ttl=CURSOR_TTL_FACTOR * s.max_message_age,  # outlive messages: gaps stay visible
            replicas=s.stream_replicas,
            direct=True,
        )
        js = self.bus.js
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:  # it exists with another configuration
            info = await js.stream_info(f"KV_{self.bucket}")
            if not info.config.allow_direct:
                info.config.allow_direct = True
                await js.update_stream(info.config)
            return await js.key_value(self.bucket)

    async def _add_or_update(self, cfg: Any) -> Any:
        try:
            return await self.bus.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            return await self.bus.js.update_stream(cfg)

    # ------------------------------------------------------------ publishing

    async def publish(self, ch: str, user: str | None, msg_id: str, data_json: str) -> Stored:
        """Store (chained on prev), then notify. Raises :class:`StoreUnavailable` (not
        stored) or :class:`StoreTimeout` (outcome unknown)."""
        [outcome] = await self.publish_many([Outgoing(ch, user, msg_id, data_json)])
        if isinstance(outcome, StoreUnavailable):
            raise outcome
        return outcome

    @property
    def batching(self) -> bool:
        """Big requests go as atomic batches: the stream allows them (and the setting), and
        every node in the ring view reads them (:attr:`Bus.peers_read_batches`)."""
        return self.atomic and self.bus.peers_read_batches

    async def publish_many(self, items: list[Outgoing]) -> Sequence[Outcome]:
        """Store many messages (on the NATS link, in trio); one outcome per item, in order.

        Messages of different subjects (users) are in flight together and their acks are
        awaited together; messages of one subject are chained one after the other, in the
        order given, so each one's ``prev`` is exact."""
        if tracing.ON:
            return await tracing.store(self._publish_many, items, self.settings.node_id)
        return await self._publish_many(items)

    async def _publish_many(self, items: list[Outgoing]) -> Sequence[Outcome]:
        if self.bus.js is None or not self.bus.connected:
            return [StoreUnavailable("not stored: not connected to NATS")] * len(items)
        if len(items) <= SMALL_REQUEST:  # merged: one round of publishes for many requests
            outcomes = await self._small.submit(items)
        elif self.batching and _batchable(items):
            outcomes = await self._big.submit(items)
        else:
            outcomes = await self._publish_all(items)
        for outcome in outcomes:
            if isinstance(outcome, StoreTimeout):
                self.stats.backend_errors["nats"] += 1
        return outcomes

    async def _publish_all(
        self, items: list[Outgoing], idle: Callable[[], None] = lambda: None
    ) -> Sequence[Outcome]:
        """Store in rounds, each subject in its turn (:class:`_Turns`): a subject's messages
        go out as soon as no earlier request has the subject, whatever this request's other
        subjects wait for; once its last message is answered its notifications go out and
        the subject passes to the next request queued on it. ``idle`` is called when only
        subjects that others hold are left (the group commit's lane goes on meanwhile)."""
        return await self._in_turn(items, idle, atomic=False)

    async def _in_turn(
        self, items: list[Outgoing], idle: Callable[[], None], atomic: bool
    ) -> Sequence[Outcome]:
        """Claim the turn on every subject of ``items``, store them (as one atomic batch
        first if ``atomic``, else or if that did not settle them in rounds) and let the
        subjects go; each stored message was notified as its answer came."""
        chains = self._chains(items)
        req = _Pending(
            items,
            chains,
            [None] * len(items),
            self._turns.claim(chains),
            trio.current_time() + self.publish_timeout,
        )
        try:
            if not (atomic and await self._atomic(req)):
                await self._rounds(req, idle)
        finally:
            req.claim.close()
        return _filled(req.outcomes)

    def _chains(self, items: list[Outgoing]) -> dict[str, _Chain]:
        """Each subject's messages, in the request's order."""
        chains: dict[str, _Chain] = {}
        for i, item in enumerate(items):
            subject = stream_subject(self.settings, item.ch, item.user)
            chain = chains.get(subject)
            if chain is None:
                chains[subject] = chain = _Chain([])
            chain.indexes.append(i)
        return chains

    async def _publish_atomic(
        self, items: list[Outgoing], idle: Callable[[], None] = lambda: None
    ) -> Sequence[Outcome]:
        """Store a big request as one JetStream atomic batch once this request has the turn
        on all its subjects (it waits for them, at most ``publish_timeout``: requests queued
        on the same users then go one whole batch after the other). A batch refused for any
        reason (a stale chain hint, an id already stored, a server limit) stored nothing;
        refused on a stale hint (another node published to one of the users), the users'
        newest seqs are read and the batch is sent once more; refused again, or for another
        reason, the request goes in rounds, which answer per item. Still waiting at the
        deadline: rounds too, for the subjects it has (the others: not stored, as in rounds).
        The lane is not handed on meanwhile (``idle`` unused): one batch at a time."""
        return await self._in_turn(items, lambda: None, atomic=True)

    async def _atomic(self, req: _Pending) -> bool:
        """True when one atomic batch settled the request (stored, or outcome unknown);
        False: nothing stored by it, rounds go on."""
        if not await req.claim.all_granted(req.deadline):
            return False
        if not self.batching:  # a node that cannot read them joined meanwhile
            return False
        refused = await self._batch(req)
        if _incomplete(refused) and req.opened:
            self.opened_dropped += 1  # the batch opened ahead was gone: stored nothing
            if self.batching:  # still (the answer took a round trip)
                refused = await self._batch(req)
        # once more on fresh hints, if batches are still on (the read took a round trip)
        if isinstance(refused, WrongLast) and await self._refresh_hints(req) and self.batching:
            refused = await self._batch(req)
        if refused is None:
            return True
        self.atomic_fallbacks += 1
        return False

    async def _batch(self, req: _Pending) -> WrongLast | Refused | None:
        """Send the request as one atomic batch; the answer if it was refused (nothing
        stored), else None. Stored: every item's seq follows from the batch's last seq and its
        position, its prev from its chain; each is notified. No answer: every item's outcome
        is unknown."""
        items, chains, outcomes = req.items, req.chains, req.outcomes
        for subject, chain in chains.items():
            self._start(subject, chain, items)
        prevs = _prevs_in_batch(chains)
        batch_id, req.opened = self._batch_id(len(items))
        requests = _batch_publishes(items, chains, prevs, batch_id, req.opened)
        answer = await publish_batch(self.bus.link, requests, self.publish_timeout, req.opened)
        if isinstance(answer, BatchAck | WrongLast) or _incomplete(answer):
            self._open_ahead()  # for the next request, or for this one sent again
        if isinstance(answer, NoAnswer):
            self.atomic_timeouts += 1
            timeout = StoreTimeout(f"outcome unknown: {answer.detail}")
            outcomes[:] = [timeout] * len(items)
            return None
        if not isinstance(answer, BatchAck):
            if isinstance(answer, Refused) and answer.code == ATOMIC_DISABLED:
                self._use_atomic(False)
            log.debug("atomic batch refused: %s", answer)
            return answer
        self.atomic_batches += 1
        first = answer.seq - answer.count + 1
        for i, item in enumerate(items):
            prev = prevs[i]
            stored = Stored(first + i, prev if prev >= 0 else first + i + prev, False)
            outcomes[i] = stored
            self._notify(item, stored)
        for subject, chain in chains.items():
            self._last.put(subject, first + chain.indexes[-1])
        return None

    def _batch_id(self, size: int) -> tuple[str, int]:
        """(id, messages already sent) of the batch for ``size`` items: the one opened ahead
        if it is young enough and there is room beside its marker, else a new one."""
        opened, self._opened = self._opened, None
        if opened is not None:
            batch_id, at = opened
            if size < MAX_ATOMIC_BATCH and trio.current_time() - at < OPENED_MAX_AGE:
                self.opened_ahead += 1
                return batch_id, 1
            self._close(batch_id)
        return secrets.token_hex(16), 0

    def _close(self, batch_id: str) -> None:
        """Commit a batch opened ahead that will not be used, with its marker alone (``eob``:
        the commit message itself is not stored), so the server does not hold it until its
        timeout: each held batch counts against its limit of batches in flight per stream."""
        self._marker(batch_id, 2, commit="eob")

    def _open_ahead(self) -> None:
        """Open the next batch now, with a marker message (stored with it, never delivered):
        nats-server creates a batch's staging store on its first message (on a file stream:
        directories and fsyncs, ~2 ms), so the next big request's batch does not wait for
        that (docs/performance.md). Opened after a batch was stored or refused to be sent
        again (a stale hint, or the server dropped the batch), never after other refusals or
        no answer. At most one is open; one that cannot be used is committed with its marker
        alone (:meth:`_close`); one left when the node goes idle is dropped by the server at
        its max_batch_timeout."""
        if not self.batching:
            return
        batch_id = secrets.token_hex(16)
        if self._marker(batch_id, 1):
            self._opened = batch_id, trio.current_time()

    def _marker(self, batch_id: str, seq: int, commit: str | None = None) -> bool:
        """Send message ``seq`` of a batch, empty, on the marker subject (no answer asked);
        whether the link took it."""
        headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(seq)}
        if commit is not None:
            headers["Nats-Batch-Commit"] = commit
        try:
            self.bus.link.publish(self.bus.subjects.batch_marker, b"", None, headers)
        except (LinkError, ValueError):
            return False
        return True

    async def _refresh_hints(self, req: _Pending) -> bool:
        """The chains' hints from the users' newest seqs, read in one request (the refusal
        names one subject's seq, not which); false if the read failed."""
        chains = req.chains
        users = [req.items[chain.indexes[0]].user or "" for chain in chains.values()]
        try:
            lasts: dict[str, int] = await self._call(lambda: self._last_of_users(users))
        except StoreUnavailable:
            return False
        for subject, user in zip(chains, users, strict=True):
            self._last.put(subject, lasts.get(user, 0))
        self.hint_refreshes += 1
        return True

    async def _rounds(self, req: _Pending, idle: Callable[[], None]) -> None:
        """Each round sends the next message of every subject this request holds (all in
        flight together); a subject granted meanwhile joins the next round. A subject not
        granted by the deadline is left out (its messages: not stored)."""
        active: dict[str, _Chain] = {}
        claim, chains = req.claim, req.chains
        while True:
            for subject in claim.take():
                self._start(subject, chains[subject], req.items)
                active[subject] = chains[subject]
            if active:
                await self._round(req, active)
            elif claim.waiting:
                idle()
                await claim.granted(req.deadline)
            else:
                return
            if claim.waiting and trio.current_time() >= req.deadline:
                busy = StoreUnavailable("not stored: this user's earlier publishes are pending")
                for subject in claim.give_up():
                    for i in chains[subject].indexes:
                        req.outcomes[i] = busy

    def _start(self, subject: str, chain: _Chain, items: list[Outgoing]) -> None:
        """A subject's turn came: its chain starts on the last seq known (``items``: for
        bench/_hops.py, which wraps this)."""
        chain.prev = self._last.get(subject)

    async def _round(self, req: _Pending, active: dict[str, _Chain]) -> None:
        """Send the next message of every active chain, settle the answers (a wrong-last
        answer resends on the seq JetStream named, bounded), notify what was stored (all in
        this loop turn: one write; a chain's first messages do not wait for its last) and
        pass the subjects of the chains that are done on."""
        sending = [(s, c, c.indexes[c.head]) for s, c in active.items()]
        sent = repr(time.time())
        publishes = [_publish(s, c.prev, req.items[i], None, sent) for s, c, i in sending]
        answers = await publish_round(self.bus.link, publishes, self.publish_timeout)
        for (subject, chain, i), answer in zip(sending, answers, strict=True):
            self._advance(req, subject, chain, i, answer)
        for subject in [s for s, c in active.items() if c.done()]:
            del active[subject]
            req.claim.release(subject)

    def _advance(self, req: _Pending, subject: str, chain: _Chain, i: int, answer: Answer) -> None:
        outcomes = req.outcomes
        outcome = self._settle(subject, chain, answer)
        if outcome is None and chain.tries < MAX_CHAIN_RETRIES:
            chain.tries += 1
            return
        outcome = outcome or StoreUnavailable("not stored: too many concurrent publishers")
        outcomes[i] = outcome
        chain.head += 1
        if isinstance(outcome, StoreUnavailable):
            _skip_rest(chain.indexes[chain.head :], outcomes)
            chain.head = len(chain.indexes)
        elif not outcome.duplicate:
            self._notify(req.items[i], outcome)

    def _settle(self, subject: str, chain: _Chain, answer: Answer) -> Outcome | None:
        """The outcome of one answer, or None to resend (the chain moved: ``prev`` fixed)."""
        if isinstance(answer, WrongLast):
            self.chain_retries += 1
            chain.prev = answer.last
            return None
        if isinstance(answer, Ack):
            stored = Stored(seq=answer.seq, prev=chain.prev, duplicate=answer.duplicate)
            if not answer.duplicate:
                chain.prev = answer.seq
                self._last.put(subject, answer.seq)
            return stored
        if isinstance(answer, Refused):
            return StoreUnavailable(f"not stored: {answer.detail}")
        return StoreTimeout(f"outcome unknown: {answer.detail}")

    def _notify(self, item: Outgoing, stored: Stored) -> None:
        """The live hint, on the NATS link (buffered; written once per loop turn). A failure
        is logged and counted (the stream has the message). None for a unicast when the
        stream republishes it (:attr:`republished`: JetStream sends the hint) and every node
        takes that hint (``Bus.owners_take_republish``: not during a rolling upgrade)."""
        if item.ch == "user" and self.republished and self.bus.owners_take_republish:
            return
        head = {"u": item.user, "s": stored.seq, "p": stored.prev, "i": item.id, "t": time.time()}
        subject = self.bus.live_subject(item.ch, item.user)
        trace = tracing.notify(item.trace, subject, stored.seq) if item.trace else None
        try:
            self.bus.link.publish(subject, encode_notification(head, item.data_json), None, trace)
        except (LinkError, ValueError) as exc:
            self.stats.backend_errors["notify"] += 1
            log.warning("live notification failed (stored; receivers catch up): %r", exc)

    async def _call(self, factory: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
        try:
            return await self.bridge.call(factory, timeout=timeout)
        except TimeoutError:
            self.stats.backend_errors["nats"] += 1
            raise StoreTimeout("store timed out") from None
        except (nats.errors.Error, OSError) as exc:
            self.stats.backend_errors["nats"] += 1
            raise StoreUnavailable(f"store failed: {type(exc).__name__}") from None

    # ------------------------------------------------------------ reading

    async def read_after(
        self, ch: str, user: str | None, after: int, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` stored messages of the channel with seq > ``after``, in order."""
        subject = stream_subject(self.settings, ch, user)
        stream = self.streams[ch]
        raw = await self._call(lambda: self._direct_batch(stream, subject, after + 1, limit))
        return [_to_stored(m) for m in raw]

    async def last_seq(self, ch: str, user: str | None) -> int:
        """The seq of the newest stored message of the channel (0 if there is none)."""
        subject = stream_subject(self.settings, ch, user)
        result: int = await self._call(lambda: self._last_of(ch, subject))
        return result

    async def end_seq(self, ch: str) -> int:
        """The last seq the channel's stream ever assigned (0 for an empty stream)."""
        stream = self.streams[ch]

        async def get() -> int:
            info = await self.bus.js.stream_info(stream)
            return int(info.state.last_seq or 0)

        result: int = await self._call(get)
        return result

    async def count(self, ch: str, user: str | None) -> int:
        """How many messages of the channel are stored now."""
        subject = stream_subject(self.settings, ch, user)

        async def get() -> int:
            info = await self.bus.js.stream_info(self.streams[ch], subjects_filter=subject)
            return int((info.state.subjects or {}).get(subject, 0))

        result: int = await self._call(get)
        return result

    async def start_reads(self, users: Collection[str], keys: Collection[str]) -> Starts:
        """Where a batch of handshakes resume from, in one crossing and three JetStream
        requests made together: the newest seq of every user in ``users`` (one multi-last
        direct get), the device cursors under ``keys`` (one on the cursor bucket) and the newest
        broadcast. Raises :class:`StoreUnavailable` if the streams cannot be read; a failed
        cursor read is reported in :attr:`Starts.cursors` (the handshakes go on without)."""
        if self.bus.js is None or self.kv is None:
            raise StoreUnavailable("not connected to JetStream yet")
        found: Starts = await self._call(lambda: self._start_reads(list(users), list(keys)))
        return found

    async def _start_reads(self, users: list[str], keys: list[str]) -> Starts:
        lasts, cursors, broadcast = await asyncio.gather(
            self._last_of_users(users),
            self._cursors_of(keys),
            self._last_broadcast(),
            return_exceptions=True,
        )
        for part in (lasts, broadcast):
            if isinstance(part, BaseException):
                raise part
        if isinstance(cursors, BaseException):
            cursors = StoreUnavailable(f"cursor read failed: {cursors!r}")
        return Starts(lasts, cursors, broadcast)  # type: ignore[arg-type]

    async def _last_of_users(self, users: list[str]) -> dict[str, int]:
        subjects = {stream_subject(self.settings, "user", u): u for u in users}
        if self.settings.stream_replicas > 1:  # exact: the leader answers (see _last_of)
            seqs = await asyncio.gather(*(self._last_of("user", s) for s in subjects))
            return {u: seq for u, seq in zip(subjects.values(), seqs, strict=True) if seq}
        found = await self._multi_last(self.streams["user"], list(subjects))
        return {subjects[s]: int(m.headers["Nats-Sequence"]) for s, m in found.items()}

    async def _cursors_of(self, keys: list[str]) -> dict[str, Cursor]:
        kv = self.kv
        if not keys:
            return {}
        if not getattr(kv, "_direct", False):  # a bucket without direct gets: one get a key
            got = await asyncio.gather(*(_kv_value(kv, k) for k in keys))
            return {k: _parse_cursor(v) for k, v in zip(keys, got, strict=True) if v is not None}
        prefix = f"$KV.{self.bucket}."
        found = await self._multi_last(f"KV_{self.bucket}", [prefix + k for k in keys])
        return {
            subject[len(prefix) :]: _parse_cursor(msg.data)
            for subject, msg in found.items()
            if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")
        }

    async def _last_broadcast(self) -> int:
        return await self._last_of("broadcast", stream_subject(self.settings, "broadcast", None))

    async def _last_of(self, ch: str, subject: str) -> int:
        """The seq of the newest message on ``subject`` (0: none). It decides that a handshake
        has nothing to read, so it must not be stale: with replicas a direct get may be
        answered by a replica that has not yet applied a message the leader acknowledged (and
        whose notification went out before the session registered), so it is read from the
        stream leader ($JS.API.STREAM.MSG.GET last_by_subj); with one replica, directly."""
        direct = self.settings.stream_replicas <= 1
        try:
            msg = await self.bus.js.get_msg(self.streams[ch], subject=subject, direct=direct)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def _multi_last(self, stream: str, subjects: list[str]) -> dict[str, Any]:
        """The newest message of each of ``subjects`` that has one, by subject: one request."""
        if not subjects:
            return {}
        msgs = await self._direct_get(stream, {"multi_last": subjects}, len(subjects))
        return {m.headers["Nats-Subject"]: m for m in msgs}

    async def _direct_batch(self, stream: str, subject: str, start: int, limit: int) -> list[Any]:
        request = {"seq": start, "next_by_subj": subject, "batch": limit}
        return await self._direct_get(stream, request, limit)

    async def _direct_get(self, stream: str, request: dict[str, Any], limit: int) -> list[Any]:
        """One batched direct get: up to ``limit`` messages, then the end-of-batch status."""
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=limit + 1)
        try:
            await nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
            )
            out: list[Any] = []
            while len(out) < limit:
                msg = await sub.next_msg(timeout=5)
                status = (msg.headers or {}).get("Status")
                if status is not None:  # 204 end of batch, 404 nothing (more) to read
                    if status not in ("204", "404"):
                        raise nats.errors.Error(f"direct get failed: {status}")
                    break
                out.append(msg)
            return out
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


def _to_stored(msg: Any) -> StoredMessage:
    h = msg.headers or {}
    seq = int(h["Nats-Sequence"])
    back = h.get("Mp-Prev-Back")  # a later message of its user in an atomic batch
    return StoredMessage(
        seq=seq,
        prev=seq - int(back) if back is not None else int(h.get("Mp-Prev", 0)),
        id=_message_id(h),
        data_json=msg.data.decode(),
        traceparent=h.get("traceparent") if tracing.ON else None,
    )


def _message_id(headers: dict[str, str]) -> str:
    """The publisher's id (``Mp-Id``; messages stored before it existed: ``Nats-Msg-Id``)."""
    token = headers.get("Mp-Id")
    if token is not None:
        try:
            return decode_token(token)
        except BadId:
            pass
    return str(headers.get("Nats-Msg-Id", ""))


# ---------------------------------------------------------------- cursors


async def _kv_value(kv: Any, key: str) -> bytes | None:
    """The value under ``key`` (None: no such key, or deleted)."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is one too
        return None
    return bytes(entry.value or b"")


def _parse_cursor(value: bytes) -> Cursor:
    """A stored cursor; an unreadable one counts as none (the client's own position rules)."""
    try:
        obj = json.loads(value or b"{}")
        return Cursor(int(obj.get("u", 0)), int(obj.get("b", 0)), str(obj.get("e", "")))
    except (ValueError, TypeError, AttributeError):
        log.warning("unreadable cursor %r ignored", value[:64])
        return Cursor()


def _cursor_json(c: Cursor) -> bytes:
    return json.dumps({"u": c.user, "b": c.broadcast, "e": c.epoch}).encode()


def cursor_key(user: str, device: str) -> str:
    return f"{encode_token(user)}.{encode_token(device)}"


@dataclass(frozen=True, slots=True)
class Cursor:
    user: int = 0
    broadcast: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Starts:
    """Where the streams of a batch of handshakes stand (:meth:`Store.start_reads`)."""

    users: dict[str, int]  # user -> seq of its newest stored message (absent: none stored)
    cursors: dict[str, Cursor] | StoreUnavailable  # cursor key -> cursor (absent: none)
    broadcast: int  # seq of the newest stored broadcast (0: none)


class Cursors:
    """Per-device acked seqs: written in batches (not once per ack); read at connect in
    batches too (``Store.start_reads``), preferring what is pending here (:meth:`pending`)."""

    def __init__(self, store: Store, metrics: Metrics, interval: float = 1.0) -> None:
        self.store = store
        self.stats = StoreStats()
        metrics.add_source(self)
        self.interval = interval
        self._dirty: dict[str, Cursor] = {}
        self._inflight: dict[str, Cursor] = {}  # being written now: still the freshest we know
        self._wake = trio.Event()
        self.writes = 0
        self.flushes = 0

    def statistics(self) -> StoreStats:
        return snapshot(self.stats)

    def pending(self, key: str) -> Cursor | None:
        """A cursor of ``key`` not written yet (fresher than the bucket's), or None."""
        return self._dirty.get(key) or self._inflight.get(key)

    def save(self, user: str, device: str, cursor: Cursor, urgent: bool = False) -> None:
        self._dirty[cursor_key(user, device)] = cursor
        if urgent or len(self._dirty) >= 1000:
            self._wake.set()

    def flush_soon(self) -> None:
        if self._dirty:
            self._wake.set()

    async def run(self) -> None:
        """Flush every ``interval`` (or sooner when asked); one crossing per flush."""
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        if not self._dirty or self.store.kv is None:
            return
        batch, self._dirty = self._dirty, {}
        self._inflight = batch
        kv = self.store.kv

        async def put_all() -> None:
            await asyncio.gather(*(kv.put(key, _cursor_json(c)) for key, c in batch.items()))

        try:
            await self.store._call(put_all, timeout=10.0)
            self.writes += len(batch)
            self.flushes += 1
        except StoreUnavailable as exc:
            self.stats.backend_errors["cursor_write"] += 1
            log.warning("cursor flush of %d failed (%r); will retry", len(batch), exc)
            for key, c in batch.items():
                self._dirty.setdefault(key, c)
        finally:
            self._inflight = {}
