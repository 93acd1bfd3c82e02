"""Helpers shared by the integration tests (not fixtures: plain functions and classes)."""

from __future__ import annotations

import functools
import itertools
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from meshpush.client import Client, Message, open_client
from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster, NodeProc
from meshpush.server.node import Node

T = TypeVar("T")

_users = itertools.count()


def token(cluster: LocalCluster, user: str, ttl: float = 600) -> str:
    return issue_token(cluster.token_secret, user, ttl)


@functools.cache
def verify() -> ssl.SSLContext:
    """httpx's default verification (the certifi bundle), built once: a client built with
    ``verify=True`` loads the bundle again, ~45 ms of CPU per client (tests make thousands)."""
    return httpx.create_ssl_context()


async def api(
    cluster: LocalCluster, node: NodeProc, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    headers = {"authorization": f"Bearer {cluster.api_key}", **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10, verify=verify()) as http:
        return await http.request(method, path, headers=headers, **kwargs)


async def sample(cluster: LocalCluster, node: NodeProc, name: str, **labels: str) -> float:
    """One sample of ``name`` (with ``labels``) from the node's /metrics; 0 if absent."""
    text = (await api(cluster, node, "GET", "/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def refusal(
    url: str, headers: list[tuple[bytes, bytes]] | None = None, first: str | None = None
) -> tuple[int, str, dict[Any, Any]]:
    """How a node refuses a handshake: ``(close code, error code, error frame)`` when it
    answers after the upgrade (the frame's code is also the close reason), or ``(HTTP status,
    error, headers)`` when it answers before. ``first``: a frame to send once upgraded."""
    with trio.fail_after(15):
        try:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                if first is not None:
                    await ws.send_message(first)
                frame: dict[str, Any] = json.loads(await ws.get_message())
                try:
                    extra = await ws.get_message()
                except ConnectionClosed as exc:
                    closed = exc
                else:
                    raise AssertionError(f"a frame after the error: {extra!r}")
        except ConnectionRejected as exc:
            body = json.loads(exc.body or b"{}")
            return exc.status_code, body.get("error", ""), dict(exc.headers or ())
    assert frame["type"] == "error", frame
    assert closed.reason is not None
    assert closed.reason.reason == frame["code"], (closed.reason, frame)
    return closed.reason.code, frame["code"], frame


async def publish(
    cluster: LocalCluster, node: NodeProc, user: str, data: Any, msg_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"user": user, "data": data}
    if msg_id is not None:
        body["id"] = msg_id
    resp = await api(cluster, node, "POST", "/v1/publish", json=body)
    assert resp.status_code == 202, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def owner_of(cluster: LocalCluster, user: str, via: NodeProc | None = None) -> str:
    resp = await api(cluster, via or cluster.live()[0], "GET", "/v1/route", params={"user": user})
    assert resp.status_code == 200, resp.text
    owner: str = resp.json()["node"]
    return owner


async def user_owned_by(cluster: LocalCluster, node_id: str, prefix: str = "u") -> str:
    for _ in range(500):
        user = f"{prefix}-{next(_users)}"
        if await owner_of(cluster, user) == node_id:
            return user
    raise AssertionError(f"no user found for {node_id}")


@asynccontextmanager
async def connected(
    cluster: LocalCluster, user: str, via: NodeProc | None = None, device: str = "d1", **kwargs: Any
) -> AsyncIterator[Client]:
    """An SDK client for ``user`` that is online (welcomed) when the block starts."""
    first = via or cluster.live()[0]
    urls = [first.ws_url] + [n.ws_url for n in cluster.live() if n is not first]
    secret = cluster.token_secret

    async def fresh_token() -> str:
        return issue_token(secret, user, 600)

    async with open_client(urls, token=fresh_token, device=device, **kwargs) as client:
        with trio.fail_after(15):
            await client.wait_online()
        yield client


async def receive(client: Client, timeout: float = 10) -> Message:
    with trio.fail_after(timeout):
        return await client.receive()


async def wait_until(predicate: Any, timeout: float = 15, step: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not await _call(predicate):
            await trio.sleep(step)


async def _call(predicate: Any) -> bool:
    result = predicate()
    if hasattr(result, "__await__"):
        result = await result
    return bool(result)


class Collector:
    """Consumes an SDK client's messages in the background (auto-acking them)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: list[Message] = []

    async def run(self) -> None:
        async for msg in self.client:
            self.messages.append(msg)

    def seqs(self, ch: str = "user") -> list[int]:
        return [m.seq for m in self.messages if m.ch == ch]

    async def wait_for(self, count: int, ch: str = "user", timeout: float = 30) -> None:
        await wait_until(lambda: len(self.seqs(ch)) >= count, timeout=timeout)


async def replayed(cluster: LocalCluster, user: str, count: int) -> list[Message]:
    """Every stored message of ``user`` (``count`` of them), read back by a new device: a
    replay from the stream."""
    async with connected(cluster, user, device="late") as client:
        got = Collector(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(got.run)
            await got.wait_for(count)
            nursery.cancel_scope.cancel()
    return got.messages


def assert_exact_chain(messages: list[Message]) -> None:
    """Strictly increasing seqs, each prev equal to the seq before it (after the first)."""
    for before, after in itertools.pairwise(messages):
        assert after.seq > before.seq, (before, after)
        assert after.prev == before.seq, (before, after)


# ---------------------------------------------------------------- nodes in this process

# a node stopped inside a running trio (not at process exit) leaves trio-asyncio deferred calls
IN_PROCESS_STOP = "ignore:coroutine '_call_defer' was never awaited:RuntimeWarning"


def in_process_nodes(test: T) -> T:
    """The marks of a test that runs nodes in this process (``two_nodes``): a cluster test,
    120 s at most, and the warning their stop inside trio leaves."""
    for mark in (
        pytest.mark.filterwarnings(IN_PROCESS_STOP),
        pytest.mark.timeout(120),
        pytest.mark.cluster,
    ):
        test = mark(test)
    return test


@asynccontextmanager
async def two_nodes(backends: LocalCluster) -> AsyncIterator[tuple[Node, Node]]:
    """Nodes ``a`` and ``b`` in this process on ``backends`` (etcd and NATS only), both ready,
    in each other's view and subscribed to their own slots only (the first node lets go of
    the slots it lost to the second once their sessions have moved: until then a message to
    one of them reaches both nodes)."""
    async with trio.open_nursery() as nursery:
        a = await nursery.start(Node(backends.settings_for("a")).run)
        b = await nursery.start(Node(backends.settings_for("b")).run)
        try:
            with trio.fail_after(30):
                while not all(_settled(n) for n in (a, b)):
                    await trio.sleep(0.05)
            yield a, b
        finally:
            with trio.move_on_after(10):
                await a.stop()
                await b.stop()
            nursery.cancel_scope.cancel()


def _settled(node: Node) -> bool:
    router = node.router
    ready = router.ready and set(router.view) == {"a", "b"}
    return ready and node.bus.subscribed() == router.owned


def user_of(node: Node, via: Node, prefix: str = "user") -> str:
    """A user ``node`` owns, as ``via`` routes it."""
    for i in range(1000):
        route = via.router.route(f"{prefix}-{i}")
        if route.node is not None and route.node.id == node.settings.node_id:
            return f"{prefix}-{i}"
    raise AssertionError("no user owned by the node")


@asynccontextmanager
async def online(
    backends: LocalCluster, node: Node, user: str, device: str = "d1"
) -> AsyncIterator[Client]:
    """An SDK client of ``user`` connected to ``node`` only, online when the block starts."""

    async def token() -> str:
        return issue_token(backends.token_secret, user, 600)

    async with open_client([node.settings.ws_url], token=token, device=device) as client:
        with trio.fail_after(15):
            await client.wait_online()
        yield client


async def publish_via(
    node: Node, key: str, user: str, data: Any, msg_id: str | None = None, **headers: str
) -> dict[str, Any]:
    """POST /v1/publish to an in-process node (202 asserted); its answer."""
    body: dict[str, Any] = {"user": user, "data": data}
    if msg_id is not None:
        body["id"] = msg_id
    async with httpx.AsyncClient(base_url=node.settings.http_url, timeout=10) as http:
        resp = await http.post(
            "/v1/publish", json=body, headers={"authorization": f"Bearer {key}", **headers}
        )
    assert resp.status_code == 202, resp.text
    result: dict[str, Any] = resp.json()
    return result
