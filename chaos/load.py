"""The publishers' load plan and what a batch or multi-user answer means for the checker. Pure.

The unicast load is a seeded sequence of publish *requests*, each taking as many message slots
(of ``--rate`` per second) as it carries messages, so the message rate stays ``--rate``:

* ``single`` — ``POST /v1/publish {"user", "data", "id"}`` by the harness itself (random live
  node per attempt, the same id on every retry);
* ``batch`` — ``POST /v1/publish/batch`` with 2 to ``max_items`` messages to random users (a user
  may appear more than once: its messages must be stored in order), one id per message;
* ``multi`` — ``POST /v1/publish {"users": [...]}`` to 2 to ``max_items`` distinct users, one id
  for all of them (idempotency is per user).

Batch and multi-user requests go through :class:`meshpush.publisher.AsyncPublisher`, which
retries with the same ids on timeouts, connection errors, 503 and 504 (and, per item, on
``store_timeout`` / ``store_unavailable``). :func:`outcome` turns its answer into what the checker
expects: every item answered with a seq is *published* (expected exactly once on every device of
its user); every item answered with an error (after the SDK's retries) is *given up* (not
expected; if it was stored anyway it shows up as delivered without a 202).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshpush.publisher import Failed
from meshpush.publisher import Published as Stored

from .events import USER, FailedPublish, Published

SINGLE, BATCH, MULTI, BROADCAST_VIA = "single", "batch", "multi", "broadcast"
#: share of unicast publish *requests* of each kind (messages: batch and multi carry several)
MIX: dict[str, float] = {SINGLE: 0.7, BATCH: 0.15, MULTI: 0.15}  # ~1/3 of messages each
MAX_ITEMS = 16  # messages in one batch, users in one multi-user publish (a batch of more
# than 8 with a user twice is one JetStream atomic batch: both store paths are exercised)


@dataclass(frozen=True, slots=True)
class Request:
    """One publish request: ``items`` are (user, id) pairs (user None for a broadcast)."""

    ch: str
    via: str  # single | batch | multi | broadcast
    items: tuple[tuple[str | None, str], ...]

    @property
    def slots(self) -> int:
        return len(self.items)


@dataclass
class LoadPlan:
    """Seeded unicast requests: which kind, which users, which ids (``u<slot>``, ``m<slot>``)."""

    users: Sequence[str]
    seed: int
    mix: dict[str, float] = field(default_factory=lambda: dict(MIX))
    max_items: int = MAX_ITEMS

    def __post_init__(self) -> None:
        self._rng = random.Random(f"load-{self.seed}")

    def request(self, slot: int) -> Request:
        """The request that starts at message slot ``slot`` (it takes ``slots`` of them)."""
        rng, users = self._rng, list(self.users)
        via = rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        if via == MULTI and len(users) < 2:
            via = SINGLE
        if via == SINGLE:
            return Request(USER, SINGLE, ((rng.choice(users), f"u{slot}"),))
        size = rng.randint(2, self.max_items)
        if via == BATCH:
            items = tuple((rng.choice(users), f"u{slot + i}") for i in range(size))
            return Request(USER, BATCH, items)
        chosen = rng.sample(users, min(size, len(users)))
        return Request(USER, MULTI, tuple((u, f"m{slot}") for u in chosen))


@dataclass
class Outcome:
    """What one batch or multi-user request left for the event log."""

    published: list[Published] = field(default_factory=list)
    failed: list[FailedPublish] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # items a valid request should not get


def outcome(request: Request, results: Sequence[Stored | Failed], t: float) -> Outcome:
    """Match the SDK's per-item results (same order as ``request.items``) to the items."""
    out = Outcome()
    for (user, msg_id), result in zip(request.items, results, strict=True):
        if isinstance(result, Stored):
            out.published.append(
                Published(request.ch, user, result.seq, msg_id, "", t, 0, request.via)
            )
            continue
        error = f"{result.code}: {result.detail}"[:200]
        out.failed.append(FailedPublish(request.ch, user, msg_id, t, 0, error, request.via))
        if not result.retryable:
            out.rejected.append(f"{user}/{msg_id}: {error}")
    return out


def gave_up(request: Request, t: float, error: str) -> Outcome:
    """The whole request failed (or ran out of budget): no item is expected."""
    out = Outcome()
    for user, msg_id in request.items:
        out.failed.append(FailedPublish(request.ch, user, msg_id, t, 0, error[:200], request.via))
    return out
