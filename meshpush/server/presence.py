"""Presence: which devices of a user are connected right now, answered by the user's owner.

``GET /v1/presence?user=U`` and ``POST /v1/presence {"users": [...]}`` (at most
:data:`MAX_USERS`). The node that receives the request groups the users by owner node (its
ring view): it answers its own users from its registry and asks every other owner once, over
NATS request/reply on that node's subject (``Subjects.presence``), all owners at once in one
bridge crossing. Each owner answers from its own registry, so presence is exact once
membership is stable; while a session migrates it may briefly show on no node or, for a
crashed owner, not at all until the client reconnects (docs/protocol.md).

The pure half (validation, grouping, answers, the wire format between nodes) is tested
without servers in ``tests/test_presence.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import nats.errors
import trio

from meshpush.backends.bridge import BridgeClosed, aio
from meshpush.core.encoding import BadId, check_id
from meshpush.core.stats import Tally, snapshot
from meshpush.server.api import ApiError, check_fields, items_list, read_json
from meshpush.server.http import JSONResponse, Request, Response
from meshpush.settings import Settings

if TYPE_CHECKING:
    from meshpush.backends.bus import Bus
    from meshpush.observe.metrics import Metrics
    from meshpush.server.router import Router

log = logging.getLogger(__name__)
MAX_USERS = 1000
TOO_LARGE = b'{"error":"too_large"}'
Answer = dict[str, Any]


class Connected(Protocol):
    """What presence needs of a session."""

    @property
    def device(self) -> str: ...
    @property
    def since(self) -> float: ...


class Registry(Protocol):
    """What presence needs of the node's session registry."""

    def of_user(self, user: str) -> Iterable[Connected]: ...


# ---------------------------------------------------------------- pure half


def check_users(body: dict[str, Any]) -> list[str]:
    """Validate a ``POST /v1/presence`` body; raise :class:`ApiError` with the documented code."""
    check_fields(body, {"users"}, set())
    users = items_list(body, "users", MAX_USERS)
    for i, user in enumerate(users):
        try:
            check_id(user, f"users[{i}]")
        except BadId as exc:
            raise ApiError(400, "bad_user", str(exc)) from None
    return users


def answer(user: str, node: str, sessions: Iterable[Connected]) -> Answer:
    """One user's presence on ``node``: one entry per device, ``since`` its oldest session."""
    since: dict[str, float] = {}
    for s in sessions:
        since[s.device] = min(since.get(s.device, s.since), s.since)
    devices = [{"device": d, "node": node, "since": round(t, 3)} for d, t in sorted(since.items())]
    return {"user": user, "online": bool(devices), "devices": devices}


def unavailable(user: str, detail: str) -> Answer:
    return {"user": user, "error": "owner_unavailable", "detail": detail}


def group_by_owner(
    users: Iterable[str], owner: Callable[[str], str | None]
) -> dict[str, list[str]]:
    """Distinct users per owner node (raises ApiError 503 when the ring is unknown)."""
    groups: dict[str, list[str]] = {}
    for user in dict.fromkeys(users):
        node = owner(user)
        if node is None:
            raise ApiError(503, "no_ring", "this node does not know the ring yet")
        groups.setdefault(node, []).append(user)
    return groups


def encode_request(users: list[str]) -> bytes:
    return json.dumps({"users": users}, ensure_ascii=False, separators=(",", ":")).encode()


def decode_request(payload: bytes) -> list[str]:
    """The users of a request from another node; ValueError on anything malformed."""
    body = json.loads(payload)
    users = body.get("users") if isinstance(body, dict) else None
    if not isinstance(users, list) or len(users) > MAX_USERS:
        raise ValueError("bad presence request")
    return [check_id(u, "user") for u in users]


def encode_answers(answers: list[Answer]) -> bytes:
    return json.dumps({"results": answers}, ensure_ascii=False, separators=(",", ":")).encode()


def decode_answers(payload: bytes, users: list[str]) -> list[Answer]:
    """Answers from an owner, checked against what was asked; ValueError if they do not match."""
    body = json.loads(payload)
    if not isinstance(body, dict) or body.get("error") == "too_large":
        raise ValueError("the owner's answer is larger than the NATS payload limit")
    results = body.get("results")
    if not isinstance(results, list) or len(results) != len(users):
        raise ValueError("malformed presence answer")
    for user, result in zip(users, results, strict=True):
        if not isinstance(result, dict) or result.get("user") != user:
            raise ValueError("presence answer does not match the request")
    return results


# ---------------------------------------------------------------- I/O half


@dataclass(slots=True)
class PresenceStats:
    presence_lookups: Tally = field(default_factory=Tally)
    backend_errors: Tally = field(default_factory=Tally)


class Presence:
    """Answers presence for this node's users (HTTP and NATS) and asks the other owners."""

    def __init__(
        self, settings: Settings, registry: Registry, router: Router, bus: Bus, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.bus = bus
        self.stats = PresenceStats()
        metrics.add_source(self)
        self.me = settings.node_id

    def statistics(self) -> PresenceStats:
        return snapshot(self.stats)

    async def run(
        self, *, task_status: trio.TaskStatus[Presence] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer other nodes' requests on this node's subject until cancelled."""
        subject = self.bus.subjects.presence(self.me)
        sub = await aio(self.bus.nc.subscribe)(subject, cb=self._on_request)
        task_status.started(self)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await aio(sub.unsubscribe)()
                except (nats.errors.Error, RuntimeError) as exc:  # connection already closed
                    log.debug("presence unsubscribe: %r", exc)

    def local(self, users: Iterable[str]) -> list[Answer]:
        return [answer(u, self.me, self.registry.of_user(u)) for u in users]

    async def _on_request(self, msg: Any) -> None:
        """NATS callback (asyncio side): answer from the registry, synchronously, then respond."""
        try:
            payload = encode_answers(self.local(decode_request(msg.data)))
            if len(payload) > self.bus.nc.max_payload:
                payload = TOO_LARGE
            self.stats.presence_lookups["answered"] += 1
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.stats.backend_errors["bad_presence"] += 1
            payload = b'{"error":"bad_request"}'
        try:
            await msg.respond(payload)
        except nats.errors.Error as exc:
            log.warning("presence answer failed: %r", exc)

    async def lookup(self, users: list[str]) -> list[Answer]:
        """One answer per user, in order: local users from the registry, others from owners."""
        groups = group_by_owner(users, self.router.ring.owner)
        found: dict[str, Answer] = {}
        for user_answer in self.local(groups.pop(self.me, [])):
            found[user_answer["user"]] = user_answer
        self.stats.presence_lookups["local"] += len(found)
        if groups:
            found.update(await self._ask(groups))
        return [found[u] for u in users]

    async def _ask(self, groups: dict[str, list[str]]) -> dict[str, Answer]:
        """Ask every other owner at once (one request per node, one bridge crossing)."""
        timeout = self.settings.presence_timeout
        nc, subjects = self.bus.nc, self.bus.subjects

        async def one(node: str, users: list[str]) -> list[Answer]:
            try:
                reply = await nc.request(subjects.presence(node), encode_request(users), timeout)
                return decode_answers(reply.data, users)
            except (TimeoutError, nats.errors.Error, ValueError) as exc:
                self.stats.presence_lookups["failed"] += len(users)
                detail = f"owner {node} did not answer: {exc!r}"
                return [unavailable(u, detail) for u in users]

        async def all_owners() -> list[list[Answer]]:
            return list(await asyncio.gather(*(one(n, us) for n, us in groups.items())))

        try:
            replies = await self.bus.bridge.call(all_owners, timeout=timeout + 1)
        except (BridgeClosed, TimeoutError) as exc:
            replies = [[unavailable(u, repr(exc)) for u in us] for us in groups.values()]
        self.stats.presence_lookups["remote"] += sum(map(len, replies))
        return {a["user"]: a for batch in replies for a in batch}

    # ------------------------------------------------------------ HTTP

    async def http(self, request: Request) -> Response:
        """``GET /v1/presence?user=U`` or ``POST /v1/presence {"users": [...]}``."""
        if request.method == "GET":
            try:
                user = check_id(request.query_params.get("user"), "user")
            except BadId as exc:
                raise ApiError(400, "bad_user", str(exc)) from None
            (result,) = await self.lookup([user])
            if "error" in result:
                raise ApiError(503, result["error"], result["detail"])
            return JSONResponse(result)
        body = await read_json(request, self.settings.max_body_bytes)
        return JSONResponse({"results": await self.lookup(check_users(body))})
