"""Publisher SDK: publish to meshpush from ordinary Python backends (sync and asyncio).

    from meshpush.publisher import Publisher
    with Publisher(["http://127.0.0.1:8900", "http://127.0.0.1:8901"], api_key="...") as pub:
        print(pub.publish("alice", {"text": "hi"}).seq)
        pub.publish_many([{"user": "bob", "data": 1}, {"user": "carol", "data": 2}])
        pub.broadcast({"maintenance": "10 min"})

:class:`Publisher` (blocking: Django, Flask, scripts) and :class:`AsyncPublisher` (asyncio:
FastAPI, aiohttp; it also runs under trio) share one sans-IO core: each call is a generator
of steps (``_Post``, ``_Sleep``) that the two drivers perform with an ``httpx`` client kept
alive across calls. Every message gets its ``id`` here, before the first attempt, so a retry
is always the same message: on a timeout, a lost connection, 503 ``store_unavailable`` or 504
``store_timeout`` the call is retried (bounded, with backoff) on the next node URL, and the
node's dedup answers ``duplicate: true`` if the first attempt had been stored. Other errors
(400, 401, 413) are the caller's to fix and raise :class:`PublishError` at once. A node that
answered with ``Retry-After`` is not asked again before that time (at most
``max_retry_after`` seconds): the retry goes to another node, or waits for the soonest one.
Retries are silent; to see them, pass ``on_attempt``: it is called with an :class:`Attempt`
after every request that was answered or failed in transport (connection, timeout); an
error raised by the callback is logged and never fails the publish.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx

from meshpush.core.protocol import retry_after

__all__ = [
    "AsyncPublisher",
    "Attempt",
    "Failed",
    "Message",
    "PublishError",
    "Published",
    "Publisher",
]

#: answers that mean "try again with the same id" (504: may have been stored; 503: was not)
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
RETRYABLE_CODES = frozenset({"store_unavailable", "store_timeout", "unreachable", "no_ring"})
#: the longest ``Retry-After`` honoured by default (a node asking for more is asked sooner)
MAX_RETRY_AFTER = 5.0
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """One unicast for :meth:`Publisher.publish_many` (``id`` is made up if not given)."""

    user: str
    data: Any
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Published:
    """A stored message: its ``seq`` in the user's (or broadcast) stream."""

    seq: int
    duplicate: bool
    id: str
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A message of a batch that was not stored (after the retries, if it was retryable)."""

    code: str
    detail: str
    id: str | None
    user: str | None = None

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class PublishError(Exception):
    """A publish failed. ``status`` is the HTTP status (0: no node answered)."""

    def __init__(self, status: int, code: str, detail: str, retry_after: float = 0.0) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.retry_after = retry_after  # seconds the node asked to wait (Retry-After), or 0

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS or self.code in RETRYABLE_CODES

    @property
    def outcome_unknown(self) -> bool:
        """True when the message may have been stored (retry with the same id to know)."""
        return self.code in ("store_timeout", "unreachable")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request the publisher made (``on_attempt``): to ``url``, answered ``status`` (0:
    no answer, then ``error`` says why, e.g. ``"ConnectTimeout: ..."``); a 2xx batch answer's
    per-item error codes in ``item_errors`` (those items are retried if retryable)."""

    url: str
    status: int
    error: str = ""
    item_errors: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """No answer, an error status, or items not stored."""
        return bool(self.error) or self.status // 100 != 2 or bool(self.item_errors)


OnAttempt = Callable[[Attempt], None]


# ---------------------------------------------------------------- sans-IO core


@dataclass(frozen=True, slots=True)
class _Post:
    url: str
    body: bytes


@dataclass(frozen=True, slots=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int = 0
    content: bytes = b""
    error: str = ""
    retry_after: float = 0.0  # the answer's Retry-After (delta seconds), 0 if none


_Step = _Post | _Sleep
_Plan = Generator[_Step, _Reply | None, T]


def encode(body: Mapping[str, Any]) -> bytes:
    """Strict JSON (NaN/Infinity raise ValueError here, not a 400 later)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def new_id() -> str:
    return uuid.uuid4().hex


class _Core:
    """Node order, failover, backoff and answers: everything but the I/O."""

    def __init__(
        self,
        urls: str | Sequence[str],
        retries: int,
        backoff: float,
        max_batch: int,
        max_retry_after: float = MAX_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("give at least one node URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.retries, self.backoff, self.max_batch = retries, backoff, max_batch
        self.max_retry_after, self.clock = max_retry_after, clock
        self._next = 0
        self._not_before: dict[str, float] = {}  # url -> when its Retry-After ends

    def call(self, path: str, body: Mapping[str, Any]) -> _Plan[dict[str, Any]]:
        """One API call: on a retryable failure, the next node after a backoff (and not
        before the node's ``Retry-After``), bounded."""
        raw, error = encode(body), PublishError(0, "unreachable", "no attempt")
        for attempt in range(self.retries + 1):
            url, wait = self._pick()
            delay = max(self._delay(attempt) if attempt else 0.0, wait)
            if delay > 0:
                yield _Sleep(delay)
            reply = yield _Post(url + path, raw)
            assert reply is not None
            try:
                return _answer(reply)
            except PublishError as exc:
                if not exc.retryable:
                    raise
                error = exc
                if exc.retry_after:
                    wait = min(exc.retry_after, self.max_retry_after)
                    self._not_before[url] = self.clock() + wait
                self._next += 1  # fail over: the next call starts at the next node too
        raise error

    def _pick(self) -> tuple[str, float]:
        """The next node not waiting out a ``Retry-After`` (seconds to wait: 0); if every
        node is, the one free soonest and how long until then."""
        now, count = self.clock(), len(self.urls)
        order = [(self._next + k) % count for k in range(count)]
        for k, i in enumerate(order):
            if self._not_before.get(self.urls[i], 0.0) <= now:
                self._next += k
                return self.urls[i], 0.0
        i = min(order, key=lambda i: self._not_before[self.urls[i]])
        self._next = i
        return self.urls[i], self._not_before[self.urls[i]] - now

    def _delay(self, attempt: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.backoff * 2.0 ** (attempt - 1), 2.0)

    def publish(self, path: str, body: dict[str, Any]) -> _Plan[Published]:
        body = {**body, "id": body.get("id") or new_id()}
        answer = yield from self.call(path, body)
        return Published(answer["seq"], answer["duplicate"], answer["id"], body.get("user"))

    def publish_many(self, messages: Iterable[Message | Mapping[str, Any]]) -> _Plan[list[Any]]:
        return self._batches("/v1/publish/batch", [_item(m) for m in messages])

    def broadcast_many(self, data: Sequence[Any], ids: Sequence[str] | None) -> _Plan[list[Any]]:
        if ids is not None and len(ids) != len(data):
            raise ValueError("give one id per message")
        ids = list(ids) if ids is not None else [new_id() for _ in data]
        items = [{"data": d, "id": i} for d, i in zip(data, ids, strict=True)]
        return self._batches("/v1/broadcast", items)

    def _batches(self, path: str, items: list[dict[str, Any]]) -> _Plan[list[Any]]:
        """``{"messages": items}`` in calls of ``max_batch``; retryable failures again (the
        ids make it safe); one result per item, in order."""
        results: list[Published | Failed] = [
            Failed("not_sent", "", m["id"], m.get("user")) for m in items
        ]
        pending = list(range(len(items)))
        for attempt in range(self.retries + 1):
            if attempt:
                yield _Sleep(self._delay(attempt))
            for start in range(0, len(pending), self.max_batch):
                chunk = pending[start : start + self.max_batch]
                body = {"messages": [items[i] for i in chunk]}
                answer = yield from self.call(path, body)
                for i, r in zip(chunk, answer["results"], strict=True):
                    results[i] = _result(r, items[i]["id"], items[i].get("user"))
            pending = [i for i in pending if _retry(results[i])]
            if not pending:
                break
        return results

    def publish_users(
        self, users: Sequence[str], data: Any, msg_id: str | None
    ) -> _Plan[list[Any]]:
        users = list(users)
        msg_id = msg_id or new_id()
        results: dict[str, Published | Failed] = {}
        pending = users
        for attempt in range(self.retries + 1):
            if attempt:
                yield _Sleep(self._delay(attempt))
            for start in range(0, len(pending), self.max_batch):
                body = {"users": pending[start : start + self.max_batch], "data": data}
                answer = yield from self.call("/v1/publish", {**body, "id": msg_id})
                for r in answer["results"]:
                    results[r["user"]] = _result(r, msg_id, r["user"])
            pending = [u for u in pending if _retry(results[u])]
            if not pending:
                break
        return [results[u] for u in users]


def _item(m: Message | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(m, Message):
        return {"user": m.user, "data": m.data, "id": m.id or new_id()}
    return {**m, "id": m.get("id") or new_id()}


def _retry(result: Published | Failed) -> bool:
    return isinstance(result, Failed) and result.retryable


def _result(r: dict[str, Any], msg_id: str, user: str | None) -> Published | Failed:
    if "error" in r:
        return Failed(r["error"], r.get("detail", ""), msg_id, user)
    return Published(r["seq"], r["duplicate"], msg_id, user)


def _answer(reply: _Reply) -> dict[str, Any]:
    """The JSON of a 2xx answer, or :class:`PublishError`."""
    if reply.error:
        raise PublishError(0, "unreachable", reply.error)
    try:
        body = json.loads(reply.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PublishError(reply.status, "bad_answer", reply.content[:200].decode(errors="replace"))
    if reply.status // 100 != 2:
        code, detail = str(body.get("error")), str(body.get("detail"))
        raise PublishError(reply.status, code, detail, reply.retry_after)
    return body


def _reply(resp: httpx.Response) -> _Reply:
    return _Reply(resp.status_code, resp.content, "", retry_after(resp.headers.get("retry-after")))


def _observe(on_attempt: OnAttempt | None, step: _Post, reply: _Reply) -> None:
    """Tell ``on_attempt`` about a request; its errors are logged, never the caller's."""
    if on_attempt is None:
        return
    try:
        on_attempt(_attempt(step, reply))
    except Exception:
        log.exception("publisher: the on_attempt callback failed")


def _attempt(step: _Post, reply: _Reply) -> Attempt:
    return Attempt(step.url, reply.status, reply.error, _item_errors(reply))


def _item_errors(reply: _Reply) -> tuple[str, ...]:
    """The per-item error codes of a 2xx batch answer (a plain answer has none)."""
    if reply.status // 100 != 2 or b'"error"' not in reply.content:
        return ()
    try:
        results = json.loads(reply.content).get("results")
    except (ValueError, AttributeError):
        return ()
    if not isinstance(results, list):
        return ()
    return tuple(str(r["error"]) for r in results if isinstance(r, dict) and "error" in r)


def _headers(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}", "content-type": "application/json"}


# ---------------------------------------------------------------- drivers


class Publisher:
    """Blocking publisher with a keep-alive connection pool. Use as a context manager."""

    def __init__(
        self,
        urls: str | Sequence[str],
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.1,
        max_batch: int = 1000,
        max_retry_after: float = MAX_RETRY_AFTER,
        on_attempt: OnAttempt | None = None,
    ) -> None:
        self._core = _Core(urls, retries, backoff, max_batch, max_retry_after)
        self._http = httpx.Client(timeout=timeout, headers=_headers(api_key))
        self._on_attempt = on_attempt

    def publish(self, user: str, data: Any, *, id: str | None = None) -> Published:
        return self._run(self._core.publish("/v1/publish", {"user": user, "data": data, "id": id}))

    def publish_many(self, messages: Iterable[Message | Mapping[str, Any]]) -> list[Any]:
        """Store many unicasts (batches of ``max_batch``); one result per message, in order."""
        return self._run(self._core.publish_many(messages))

    def publish_users(
        self, users: Sequence[str], data: Any, *, id: str | None = None
    ) -> list[Published | Failed]:
        """The same message to each user (its own seq per user), in the order given."""
        return self._run(self._core.publish_users(users, data, id))

    def broadcast(self, data: Any, *, id: str | None = None) -> Published:
        return self._run(self._core.publish("/v1/broadcast", {"data": data, "id": id}))

    def broadcast_many(
        self, data: Sequence[Any], *, ids: Sequence[str] | None = None
    ) -> list[Published | Failed]:
        """Many broadcasts in few calls (``max_batch`` each); one result per message, in
        order. Each gets an id (``ids``, or a new one) so a retry never stores it twice."""
        return self._run(self._core.broadcast_many(data, ids))

    def _run(self, plan: _Plan[T]) -> T:
        reply: _Reply | None = None
        try:
            while True:
                step = plan.send(reply)
                reply = self._perform(step)
        except StopIteration as done:
            result: T = done.value
            return result

    def _perform(self, step: _Step) -> _Reply | None:
        if isinstance(step, _Sleep):
            time.sleep(step.seconds)
            return None
        try:
            reply = _reply(self._http.post(step.url, content=step.body))
        except httpx.TransportError as exc:
            reply = _Reply(error=f"{type(exc).__name__}: {exc}")
        _observe(self._on_attempt, step, reply)
        return reply

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """The same as :class:`Publisher` for asyncio (or trio). Use ``async with``."""

    def __init__(
        self,
        urls: str | Sequence[str],
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.1,
        max_batch: int = 1000,
        max_connections: int = 100,
        max_retry_after: float = MAX_RETRY_AFTER,
        on_attempt: OnAttempt | None = None,
    ) -> None:
        self._core = _Core(urls, retries, backoff, max_batch, max_retry_after)
        limits = httpx.Limits(max_connections=max_connections)
        self._http = httpx.AsyncClient(timeout=timeout, headers=_headers(api_key), limits=limits)
        self._on_attempt = on_attempt

    async def publish(self, user: str, data: Any, *, id: str | None = None) -> Published:
        body = {"user": user, "data": data, "id": id}
        return await self._run(self._core.publish("/v1/publish", body))

    async def publish_many(self, messages: Iterable[Message | Mapping[str, Any]]) -> list[Any]:
        return await self._run(self._core.publish_many(messages))

    async def publish_users(
        self, users: Sequence[str], data: Any, *, id: str | None = None
    ) -> list[Published | Failed]:
        return await self._run(self._core.publish_users(users, data, id))

    async def broadcast(self, data: Any, *, id: str | None = None) -> Published:
        return await self._run(self._core.publish("/v1/broadcast", {"data": data, "id": id}))

    async def broadcast_many(
        self, data: Sequence[Any], *, ids: Sequence[str] | None = None
    ) -> list[Published | Failed]:
        return await self._run(self._core.broadcast_many(data, ids))

    async def _run(self, plan: _Plan[T]) -> T:
        reply: _Reply | None = None
        try:
            while True:
                step = plan.send(reply)
                reply = await self._perform(step)
        except StopIteration as done:
            result: T = done.value
            return result

    async def _perform(self, step: _Step) -> _Reply | None:
        if isinstance(step, _Sleep):
            await anyio.sleep(step.seconds)
            return None
        try:
            reply = _reply(await self._http.post(step.url, content=step.body))
        except httpx.TransportError as exc:
            reply = _Reply(error=f"{type(exc).__name__}: {exc}")
        _observe(self._on_attempt, step, reply)
        return reply

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
