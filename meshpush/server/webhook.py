"""The offline webhook: stored user messages that no live session got in time go to a URL.

Fed by two hooks on the owner node: :meth:`Webhook.notified` (a live notification for a user
this node owns arrived) and :meth:`Webhook.reached` (seq S was queued to a session of user U,
live or by a replay). A message still unreached ``offline_webhook_delay`` seconds after its
notification is POSTed, in batches, to ``offline_webhook_url`` with the body
``{"messages": [{"user", "seq", "id", "data"}]}`` and ``X-Meshpush-Signature`` (see
:mod:`meshpush.webhook_verify`). A failed POST is retried with capped exponential backoff
(full jitter) at most ``offline_webhook_retries`` times, then dropped. Everything held is
bounded by ``offline_webhook_queue`` messages: when full, the oldest is dropped and counted.

:class:`OfflineTracker` is the pure half (fake clock in ``tests/test_webhook.py``). It is a
best-effort fallback held in memory: a restart loses what waits, a lost live notification
means no webhook call, and a message can be sent although it reached a session during a
migration (the receiver can deduplicate by ``(user, seq)``). docs/protocol.md says more.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import trio

from meshpush.core.stats import Tally, snapshot
from meshpush.observe import tracing
from meshpush.settings import Settings
from meshpush.webhook_verify import HEADER, sign

if TYPE_CHECKING:
    from meshpush.backends.bus import Notification
    from meshpush.observe.metrics import Metrics

log = logging.getLogger(__name__)
REACHED_SLACK = 2.0  # seconds a delivery may precede its own notification (replay read first)
MAX_BACKOFF = 30.0
TICK = 0.25  # longest sleep of the timer loop


@dataclass(frozen=True, slots=True)
class Pending:
    user: str
    seq: int
    id: str
    data_json: str
    arrived: float  # monotonic
    traceparent: str | None = None  # its publish's span, when traced (the webhook span links it)


def check_settings(settings: Settings) -> None:
    """Refuse a webhook configuration that cannot work (the node does not start)."""
    url = urllib.parse.urlsplit(settings.offline_webhook_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("offline_webhook_url must be an http:// or https:// URL")
    try:
        url.port  # noqa: B018 - raises for a port that is not a number in 0..65535
    except ValueError:
        raise ValueError("offline_webhook_url has an invalid port") from None
    if not settings.offline_webhook_secret:
        raise ValueError("offline_webhook_url needs offline_webhook_secret (requests are signed)")
    if settings.offline_webhook_delay < 0 or settings.offline_webhook_timeout <= 0:
        raise ValueError("offline_webhook_delay must be >= 0 and offline_webhook_timeout > 0")
    if min(settings.offline_webhook_queue, settings.offline_webhook_batch) < 1:
        raise ValueError("offline_webhook_queue and offline_webhook_batch must be >= 1")
    if settings.offline_webhook_retries < 0 or settings.offline_webhook_backoff < 0:
        raise ValueError("offline_webhook_retries and offline_webhook_backoff must be >= 0")


class OfflineTracker:
    """Which notified messages have not reached a session yet (pure; the clock is given).

    ``waiting`` holds unreached messages in arrival order, which is also due order (the delay
    is constant); a delivery to a session removes its user's waiting messages at once, so only
    messages of users who are really offline stay and count against ``capacity``. ``outbox``
    holds due messages until they are taken in batches. ``waiting`` and ``outbox`` together
    hold at most ``capacity`` messages (the oldest is dropped). ``reached_at`` remembers the
    highest seq queued to a session per user for ``REACHED_SLACK`` seconds, for a replay that
    sends a message before its own notification arrives."""

    def __init__(self, delay: float, capacity: int) -> None:
        self.delay = delay
        self.capacity = capacity
        self.waiting: OrderedDict[tuple[str, int], Pending] = OrderedDict()
        self.seqs_of: dict[str, list[int]] = {}  # user -> seqs in waiting
        self.outbox: deque[Pending] = deque()
        self.reached_at: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.dropped = 0  # oldest messages dropped because the queue was full
        self.skipped = 0  # messages that reached a session in time

    def __len__(self) -> int:
        return len(self.waiting) + len(self.outbox)

    def notified(self, msg: Pending) -> None:
        if (msg.user, msg.seq) in self.waiting:
            return
        if self.reached_at.get(msg.user, (0, 0.0))[0] >= msg.seq:
            self.skipped += 1  # already sent to a session (a replay read it first)
            return
        if len(self) >= self.capacity:
            if self.outbox:
                self.outbox.popleft()
            else:
                self._pop_waiting()
            self.dropped += 1
        self.waiting[(msg.user, msg.seq)] = msg
        self.seqs_of.setdefault(msg.user, []).append(msg.seq)

    def reached(self, user: str, seq: int, now: float) -> None:
        """``seq`` (and every earlier seq) of ``user`` was queued to one of its sessions."""
        best = self.reached_at.pop(user, (0, 0.0))[0]
        self.reached_at[user] = (max(best, seq), now)
        if len(self.reached_at) > self.capacity:
            self.reached_at.popitem(last=False)
        seqs = self.seqs_of.get(user)
        if not seqs:
            return
        keep = [s for s in seqs if s > seq]
        for s in seqs:
            if s <= seq:
                del self.waiting[(user, s)]
                self.skipped += 1
        if keep:
            self.seqs_of[user] = keep
        else:
            del self.seqs_of[user]

    def _pop_waiting(self) -> Pending:
        (user, seq), msg = self.waiting.popitem(last=False)
        seqs = self.seqs_of[user]
        seqs.remove(seq)
        if not seqs:
            del self.seqs_of[user]
        return msg

    def due(self, now: float) -> int:
        """Move messages whose delay has passed to the outbox; return how many."""
        moved = 0
        while self.waiting and next(iter(self.waiting.values())).arrived + self.delay <= now:
            self.outbox.append(self._pop_waiting())
            moved += 1
        while self.reached_at:
            user, (_, at) = next(iter(self.reached_at.items()))
            if at >= now - REACHED_SLACK:
                break
            del self.reached_at[user]
        return moved

    def next_due(self) -> float | None:
        if not self.waiting:
            return None
        return next(iter(self.waiting.values())).arrived + self.delay

    def take(self, limit: int) -> list[Pending]:
        return [self.outbox.popleft() for _ in range(min(limit, len(self.outbox)))]


def encode_batch(batch: list[Pending]) -> bytes:
    """``{"messages":[{"user","seq","id","data"}]}``; the stored data JSON is spliced as is."""
    items = [
        f'{{"user":{json.dumps(m.user, ensure_ascii=False)},"seq":{m.seq},'
        f'"id":{json.dumps(m.id, ensure_ascii=False)},"data":{m.data_json}}}'
        for m in batch
    ]
    return ('{"messages":[' + ",".join(items) + "]}").encode()


def backoff(attempt: int, base: float, rng: Callable[[float, float], float]) -> float:
    """Full-jitter exponential backoff before retry ``attempt`` (1, 2, ...)."""
    return rng(0.0, min(MAX_BACKOFF, base * 2 ** (attempt - 1)))


@dataclass(slots=True)
class WebhookStats:
    """Counted by the sender; the tracker's counts and the queue are read by ``statistics()``."""

    webhook_queue: int = 0
    webhook_messages: Tally = field(default_factory=Tally)
    webhook_requests: Tally = field(default_factory=Tally)
    backend_errors: Tally = field(default_factory=Tally)


class Webhook:
    """The owner node's sender: a timer task moves due messages, a sender task POSTs them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        owns: Callable[[str], bool],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        self.stats = WebhookStats()
        metrics.add_source(self)
        self.owns = owns
        self.transport = transport
        self.tracker = OfflineTracker(
            settings.offline_webhook_delay, settings.offline_webhook_queue
        )
        self._ready = trio.Event()  # set when the outbox has something

    def statistics(self) -> WebhookStats:
        messages = Tally(self.stats.webhook_messages)
        messages["reached"] += self.tracker.skipped  # counted by the tracker on the hot path
        messages["dropped_queue"] += self.tracker.dropped
        return snapshot(self.stats, webhook_messages=messages, webhook_queue=len(self.tracker))

    # ------------------------------------------------------------ hooks (tiny, synchronous)

    def notified(self, note: Notification) -> None:
        """A live notification arrived at this node (hook in the router)."""
        if note.ch != "user" or note.user is None or not self.owns(note.user):
            return
        now = trio.current_time()
        traceparent = note.trace.traceparent if note.trace is not None else None
        pending = Pending(note.user, note.seq, note.id, note.data_json, now, traceparent)
        self.tracker.notified(pending)

    def reached(self, user: str, seq: int) -> None:
        """Seq ``seq`` of ``user`` was queued to one of its sessions (hooks in delivery)."""
        self.tracker.reached(user, seq, trio.current_time())

    # ------------------------------------------------------------ service

    async def run(
        self, *, task_status: trio.TaskStatus[Webhook] = trio.TASK_STATUS_IGNORED
    ) -> None:
        timeout = httpx.Timeout(self.settings.offline_webhook_timeout)
        async with (
            httpx.AsyncClient(
                timeout=timeout, transport=self.transport, follow_redirects=False
            ) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._timer)
            task_status.started(self)
            await self._sender(http)

    async def _timer(self) -> None:
        while True:
            now = trio.current_time()
            if self.tracker.due(now):
                self._ready.set()
            wake = self.tracker.next_due()
            await trio.sleep_until(min(wake, now + TICK) if wake is not None else now + TICK)

    async def _sender(self, http: httpx.AsyncClient) -> None:
        while True:
            await self._ready.wait()
            batch = self.tracker.take(self.settings.offline_webhook_batch)
            if not batch:
                self._ready = trio.Event()
                continue
            await self._deliver(http, batch)

    async def _deliver(self, http: httpx.AsyncClient, batch: list[Pending]) -> None:
        """POST one batch, retrying with backoff; count it sent or dropped."""
        s = self.settings
        body = encode_batch(batch)
        for attempt in range(s.offline_webhook_retries + 1):
            if attempt:
                await trio.sleep(backoff(attempt, s.offline_webhook_backoff, random.uniform))
            if await self._post(http, body, batch, attempt):
                self.stats.webhook_messages["sent"] += len(batch)
                return
        log.warning("offline webhook: dropping %d messages after %d tries", len(batch), attempt + 1)
        self.stats.webhook_messages["dropped_retries"] += len(batch)

    async def _post(
        self, http: httpx.AsyncClient, body: bytes, batch: list[Pending], attempt: int
    ) -> bool:
        """One attempt: True if the receiver took the batch (2xx)."""
        s = self.settings
        headers = {"content-type": "application/json", HEADER: sign(s.offline_webhook_secret, body)}
        send = functools.partial(self._send, http, body)
        if tracing.ON:
            traceparents = [m.traceparent for m in batch]
            url, node = s.offline_webhook_url, s.node_id
            answer = await tracing.webhook(send, headers, url, traceparents, attempt, node)
        else:
            answer = await send(headers)
        return isinstance(answer, int) and 200 <= answer < 300

    async def _send(
        self, http: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> int | str:
        """POST ``body``: the answer's status, or the name of the error that left none."""
        url = self.settings.offline_webhook_url
        try:  # streamed and never read: a receiver's answer body cannot take memory
            async with http.stream("POST", url, content=body, headers=headers) as resp:
                status = resp.status_code
        except httpx.HTTPError as exc:
            self.stats.webhook_requests[type(exc).__name__] += 1
            self.stats.backend_errors["webhook"] += 1
            log.info("offline webhook request failed: %r", exc)
            return type(exc).__name__
        self.stats.webhook_requests["ok" if 200 <= status < 300 else str(status)] += 1
        return status
