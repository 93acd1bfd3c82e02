"""Offline webhook: signature, tracker and sender with fakes and a fake clock, then a real
2-node cluster POSTing to a local HTTP receiver (127.0.0.1, port 0)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import make_cluster
from support import api, connected, publish, receive, user_owned_by, wait_until

from meshpush.backends.bus import Notification
from meshpush.local.devcluster import LocalCluster
from meshpush.observe.metrics import Metrics
from meshpush.server.webhook import (
    MAX_BACKOFF,
    OfflineTracker,
    Pending,
    Webhook,
    backoff,
    check_settings,
    encode_batch,
)
from meshpush.settings import Settings
from meshpush.webhook_verify import HEADER, sign, verify

SECRET = "whsec-test"
DELAY = 2.0  # offline_webhook_delay of the test cluster

# ---------------------------------------------------------------- signature


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"messages":[]}'
    header = sign(SECRET, body, t=1_700_000_000)
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert not verify("other", header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_100)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # too old: replay
    for bad in (None, "", "t=1", "v1=ab", "t=x,v1=ab", "garbage"):
        assert not verify(SECRET, bad, body, now=1_700_000_000)
    rotated = header + ",v1=" + "0" * 64
    assert verify(SECRET, rotated, body, now=1_700_000_000)


def test_signature_is_hmac_sha256_of_t_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(SECRET.encode(), b"42." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body, t=42) == f"t=42,v1={expected}"


# ---------------------------------------------------------------- tracker (fake clock)


def msg(user: str, seq: int, at: float) -> Pending:
    return Pending(user, seq, f"id-{seq}", json.dumps({"n": seq}), at)


def test_unreached_message_is_due_after_the_delay() -> None:
    t = OfflineTracker(delay=10, capacity=100)
    t.notified(msg("a", 5, 0.0))
    assert t.due(9.9) == 0 and t.next_due() == 10.0
    assert t.due(10.0) == 1
    assert t.take(10) == [msg("a", 5, 0.0)] and len(t) == 0


def test_reached_before_or_after_the_notification_is_never_sent() -> None:
    t = OfflineTracker(delay=10, capacity=100)
    t.reached("a", 7, now=0.0)  # a replay read it before the notification arrived
    t.notified(msg("a", 7, 0.1))
    t.notified(msg("b", 3, 0.2))
    t.reached("b", 3, now=4.0)
    t.notified(msg("c", 9, 0.3))
    t.reached("c", 8, now=1.0)  # an older seq does not cover 9
    assert t.due(11.0) == 1
    assert [m.user for m in t.take(10)] == ["c"] and t.skipped == 2


def test_queue_is_bounded_and_drops_the_oldest() -> None:
    t = OfflineTracker(delay=1, capacity=3)
    for seq in range(1, 6):
        t.notified(msg("a", seq, float(seq) / 10))
    assert len(t) == 3 and t.dropped == 2
    t.due(5.0)
    t.notified(msg("a", 6, 5.0))  # full again: the oldest due message goes first
    assert [m.seq for m in t.take(10)] == [4, 5] and t.dropped == 3


def test_only_unreached_messages_count_against_the_queue() -> None:
    t = OfflineTracker(delay=10, capacity=3)
    for seq in range(1, 1001):  # an online user: each message reaches a session at once
        t.notified(msg("online", seq, seq / 1000))
        t.reached("online", seq, now=seq / 1000)
    t.notified(msg("off", 5000, 1.0))
    t.notified(msg("off", 5000, 1.0))  # the same notification twice is held once
    assert len(t) == 1 and t.dropped == 0 and t.skipped == 1000
    t.notified(msg("x", 1, 1.1))
    t.notified(msg("x", 2, 1.2))
    t.reached("x", 1, now=1.3)  # removes x/1 only
    assert [m.seq for m in t.waiting.values()] == [5000, 2]
    assert t.due(20.0) == 2 and [m.user for m in t.take(5)] == ["off", "x"]


def test_reached_memory_is_forgotten_once_no_waiting_message_needs_it() -> None:
    t = OfflineTracker(delay=10, capacity=2)
    for i in range(5):
        t.reached(f"u{i}", 1, now=0.0)
    assert len(t.reached_at) == 2  # bounded by capacity
    t.due(100.0)
    assert len(t.reached_at) == 0


def test_batch_body_splices_data_and_escapes_ids() -> None:
    body = encode_batch([Pending('a"é', 3, "i\n", '{"x":[1,2]}', 0.0)])
    assert json.loads(body) == {
        "messages": [{"user": 'a"é', "seq": 3, "id": "i\n", "data": {"x": [1, 2]}}]
    }


def test_backoff_is_capped_full_jitter() -> None:
    assert backoff(1, 0.5, lambda lo, hi: hi) == 0.5
    assert backoff(3, 0.5, lambda lo, hi: hi) == 2.0
    assert backoff(30, 0.5, lambda lo, hi: hi) == MAX_BACKOFF
    assert backoff(3, 0.5, lambda lo, hi: lo) == 0.0


@pytest.mark.parametrize(
    "changes",
    [
        {"offline_webhook_url": "ftp://x"},
        {"offline_webhook_url": "http://"},
        {"offline_webhook_secret": ""},
        {"offline_webhook_queue": 0},
        {"offline_webhook_batch": 0},
        {"offline_webhook_retries": -1},
        {"offline_webhook_delay": -1.0},
    ],
)
def test_bad_webhook_settings_are_refused(changes: dict[str, Any]) -> None:
    base = Settings(offline_webhook_url="http://127.0.0.1:1/h", offline_webhook_secret="s")
    check_settings(base)
    with pytest.raises(ValueError):
        check_settings(base.replace(**changes))


@pytest.mark.parametrize("url", ["http://hook:99999/h", "http://hook:port/h"])
def test_a_webhook_url_with_a_port_that_cannot_be_is_refused_by_name(url: str) -> None:
    settings = Settings(offline_webhook_url=url, offline_webhook_secret="s")
    with pytest.raises(ValueError, match="offline_webhook_url has an invalid port"):
        check_settings(settings)


# ---------------------------------------------------------------- sender (fake transport and clock)


def note(user: str, seq: int) -> Notification:
    return Notification("user", user, seq, seq - 1, f"id-{seq}", 0.0, '"hi"')


async def test_sender_retries_after_500_then_counts_sent(autojump_clock: trio.abc.Clock) -> None:
    seen: list[httpx.Request] = []
    statuses = iter([500, 502, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(statuses))

    settings = Settings(
        offline_webhook_url="http://hook.test/h",
        offline_webhook_secret=SECRET,
        offline_webhook_delay=1.0,
        offline_webhook_retries=3,
    )
    metrics = Metrics("n1")
    hook = Webhook(
        settings, metrics, lambda user: user != "elsewhere", httpx.MockTransport(handler)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        hook.notified(note("a", 1))
        hook.notified(note("elsewhere", 2))  # not owned here: never tracked
        hook.notified(note("b", 3))
        hook.reached("b", 3)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert len(seen) == 3 and len({r.content for r in seen}) == 1
    assert json.loads(seen[0].content)["messages"] == [
        {"user": "a", "seq": 1, "id": "id-1", "data": "hi"}
    ]
    for request in seen:
        assert verify(SECRET, request.headers[HEADER], request.content)
    assert counter(metrics.render().decode(), "sent") == 1
    assert counter(metrics.render().decode(), "reached") == 1


async def test_sender_gives_up_after_the_retries(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("down", request=request)

    settings = Settings(
        offline_webhook_url="http://hook.test/h",
        offline_webhook_secret=SECRET,
        offline_webhook_delay=0.5,
        offline_webhook_retries=2,
        offline_webhook_batch=2,
    )
    metrics = Metrics("n1")
    hook = Webhook(settings, metrics, lambda user: True, httpx.MockTransport(handler))
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        for seq in range(1, 4):
            hook.notified(note("a", seq))
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    assert calls == 2 * 3  # two batches (2 + 1 messages), three tries each
    assert counter(metrics.render().decode(), "dropped_retries") == 3
    assert len(hook.tracker) == 0


def counter(text: str, result: str, name: str = "meshpush_webhook_messages_total") -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------- real cluster, real receiver


@dataclass
class Receiver:
    """A local HTTP receiver: records each request, answers by ``mode``."""

    mode: str = "ok"  # ok | fail_once (500 then ok) | hangup (close without answering)
    port: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def messages(self, user: str) -> list[dict[str, Any]]:
        with self.lock:
            bodies = [json.loads(body) for _, body in self.requests]
        return [m for b in bodies for m in b["messages"] if m["user"] == user]

    def requests_for(self, user: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for h, b in self.requests if f'"user":{json.dumps(user)}' in b.decode()]


def serve_receiver(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with receiver.lock:
                receiver.requests.append((dict(self.headers.items()), body))
                mode = receiver.mode
                if mode == "fail_once":
                    receiver.mode = "ok"
            if mode == "hangup":
                self.close_connection = True
                return
            self.send_response(500 if mode == "fail_once" else 204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = serve_receiver(rec)
    rec.port = server.server_address[1]
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[LocalCluster]:
    with make_cluster(
        tmp_path_factory.mktemp("hooked"),
        nodes=2,
        offline_webhook_url=f"http://127.0.0.1:{receiver.port}/push",
        offline_webhook_secret=SECRET,
        offline_webhook_delay=DELAY,
        offline_webhook_queue=8,
        offline_webhook_batch=4,
        offline_webhook_retries=2,
        offline_webhook_backoff=0.1,
    ) as c:
        yield c


@pytest.fixture(autouse=True)
def reset_receiver(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "receiver" in request.fixturenames:
        request.getfixturevalue("receiver").mode = "ok"


async def metric(cluster: LocalCluster, node: str, result: str) -> float:
    resp = await api(cluster, cluster.node(node), "GET", "/metrics")
    return counter(resp.text, result)


async def queue_gauge(cluster: LocalCluster, node: str) -> float:
    resp = await api(cluster, cluster.node(node), "GET", "/metrics")
    line = next(x for x in resp.text.splitlines() if x.startswith("meshpush_webhook_queue "))
    return float(line.split()[-1])


@pytest.mark.cluster
async def test_offline_user_is_posted_once_signed(hooked: LocalCluster, receiver: Receiver) -> None:
    user = await user_owned_by(hooked, "n1", prefix="offline")
    answer = await publish(hooked, hooked.node("n2"), user, {"title": "hi"}, msg_id="m-1")
    await wait_until(lambda: receiver.messages(user), timeout=15)
    await trio.sleep(DELAY + 1.5)  # no second call comes later
    assert receiver.messages(user) == [
        {"user": user, "seq": answer["seq"], "id": "m-1", "data": {"title": "hi"}}
    ]
    ((headers, body),) = receiver.requests_for(user)
    signature = {k.lower(): v for k, v in headers.items()}[HEADER.lower()]
    assert verify(SECRET, signature, body)
    assert not verify("wrong", signature, body)


@pytest.mark.cluster
async def test_online_user_is_never_posted(hooked: LocalCluster, receiver: Receiver) -> None:
    user = await user_owned_by(hooked, "n2", prefix="online")
    async with connected(hooked, user, via=hooked.node("n1")) as client:
        before = await metric(hooked, "n2", "reached")
        for n in range(3):
            await publish(hooked, hooked.node("n1"), user, {"n": n})
            assert (await receive(client)).data == {"n": n}
        await wait_until(lambda: metric_at_least(hooked, "n2", "reached", before + 3), timeout=5)
        await trio.sleep(DELAY + 1.5)  # longer than the delay
    assert receiver.messages(user) == []


async def metric_at_least(cluster: LocalCluster, node: str, result: str, value: float) -> bool:
    return await metric(cluster, node, result) >= value


@pytest.mark.cluster
async def test_retried_after_a_500(hooked: LocalCluster, receiver: Receiver) -> None:
    receiver.mode = "fail_once"
    user = await user_owned_by(hooked, "n1", prefix="retry")
    answer = await publish(hooked, hooked.node("n1"), user, "ping")
    await wait_until(lambda: len(receiver.requests_for(user)) >= 2, timeout=15)
    first, second = receiver.requests_for(user)
    assert first[1] == second[1]  # the same batch, signed again
    assert [m["seq"] for m in receiver.messages(user)] == [answer["seq"]] * 2


@pytest.mark.cluster
async def test_bounded_when_the_receiver_is_down(hooked: LocalCluster, receiver: Receiver) -> None:
    receiver.mode = "hangup"
    node = "n2"
    user = await user_owned_by(hooked, node, prefix="down")
    dropped = await metric(hooked, node, "dropped_queue") + await metric(
        hooked, node, "dropped_retries"
    )
    for n in range(30):
        await publish(hooked, hooked.node("n1"), user, {"n": n})
    assert await queue_gauge(hooked, node) <= 8

    async def dropped_more() -> bool:
        now = await metric(hooked, node, "dropped_queue") + await metric(
            hooked, node, "dropped_retries"
        )
        return now >= dropped + 30

    await wait_until(dropped_more, timeout=30)
    assert await queue_gauge(hooked, node) <= 8
    assert await metric(hooked, node, "dropped_queue") >= 1
    assert all(hooked.node(n).proc.alive() for n in ("n1", "n2"))


@pytest.mark.cluster
async def test_replayed_to_a_device_connecting_within_the_delay_is_not_posted(
    hooked: LocalCluster, receiver: Receiver
) -> None:
    user = await user_owned_by(hooked, "n1", prefix="late")
    await publish(hooked, hooked.node("n2"), user, {"n": "stored"})
    async with connected(hooked, user, via=hooked.node("n2")) as client:
        assert (await receive(client)).data == {"n": "stored"}  # by the resume replay
        await trio.sleep(DELAY + 1.5)
    assert receiver.messages(user) == []


def test_the_stdlib_snippet_in_the_protocol_doc_verifies_real_signatures() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    snippet = doc.split("Without meshpush installed", 1)[1].split("```python\n", 1)[1]
    scope: dict[str, Any] = {}
    exec(snippet.split("```", 1)[0], scope)
    body = b'{"messages":[]}'
    assert scope["verify"](SECRET, sign(SECRET, body), body)
    assert not scope["verify"]("other", sign(SECRET, body), body)


def test_a_node_with_a_bad_webhook_setting_refuses_to_start() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MESHPUSH_OFFLINE_WEBHOOK_URL": "http://127.0.0.1:9/hook"}
    env.pop("MESHPUSH_OFFLINE_WEBHOOK_SECRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "meshpush", "node", "--etcd", "127.0.0.1:9", "--ws-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "offline_webhook_secret" in done.stderr
