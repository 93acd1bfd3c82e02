"""Tracing (meshpush/observe/tracing.py): off by default and absent when off; one trace across
nodes.

The cluster test runs two real nodes *in this process* (real etcd and nats-server -js from the
wheels, started by LocalCluster) so that both export to one SDK ``InMemorySpanExporter``: a
publish through node a to a user owned by node b must give one trace holding a's publish
spans and b's delivery spans, linked parent to child.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from conftest import FAST, make_cluster
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support import (
    connected,
    in_process_nodes,
    online,
    publish_via,
    receive,
    two_nodes,
    user_of,
    user_owned_by,
    wait_until,
)
from support import publish as publish_to
from test_webhook import Receiver, serve_receiver

from meshpush.backends.bus import Notification
from meshpush.backends.store import Outcome, Outgoing, Stored, StoreUnavailable, _publish
from meshpush.client import Client, Message
from meshpush.core.auth import issue_token
from meshpush.core.feed import Verdict
from meshpush.core.machine import Limits
from meshpush.core.ring import slot
from meshpush.local.devcluster import LocalCluster
from meshpush.observe import tracing
from meshpush.observe.logs import user_hash
from meshpush.observe.metrics import Metrics
from meshpush.server.hub import Hub
from meshpush.server.node import Node
from meshpush.server.sessions import Context, Session
from meshpush.server.webhook import Webhook
from meshpush.settings import Settings, env_for

UPSTREAM_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM_SPAN = "00f067aa0ba902b7"


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
    ],
)
def test_wanted_reads_the_standard_variables(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.wanted(env) == exporters


def test_otlp_exporter_follows_the_protocol_variables() -> None:
    assert tracing.exporter_name("otlp", {}) == "otlp_proto_http"
    grpc = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert tracing.exporter_name("otlp", grpc) == "otlp_proto_grpc"
    both = {**grpc, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert tracing.exporter_name("otlp", both) == "otlp_proto_http"
    assert tracing.exporter_name("console", grpc) == "console"
    with pytest.raises(tracing.TracingError, match="http/json"):
        tracing.exporter_name("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_setup_refuses_an_unknown_exporter_clearly() -> None:
    with pytest.raises(tracing.TracingError, match=r"unknown trace exporter 'zipkn'.*console"):
        tracing.setup("n1", {"OTEL_TRACES_EXPORTER": "zipkn"})
    assert not tracing.ON


def test_setup_turns_tracing_on_and_stop_off() -> None:
    assert not tracing.setup("n1", {})
    assert not tracing.ON
    try:
        assert tracing.setup("n1", {"OTEL_TRACES_EXPORTER": "console"})
        assert tracing.ON
        assert tracing._state is not None
        resource = tracing._state.provider.resource.attributes
        assert resource["service.instance.id"] == "n1"
        assert resource["service.name"] in ("meshpush", os.environ.get("OTEL_SERVICE_NAME"))
    finally:
        tracing.stop()
    assert not tracing.ON and tracing._state is None


def test_stop_is_bounded_when_the_collector_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nobody listens
    assert tracing.setup("n1", {"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing._state is not None
    tracing._state.tracer.start_span("lost").end()
    started = time.monotonic()
    tracing.stop(timeout=1.0)  # the exporter alone would retry for 10 s
    assert time.monotonic() - started < 5
    assert not tracing.ON


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def test_off_by_default_imports_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "import meshpush.server.node, meshpush.cli, meshpush.server.api, meshpush.server.sessions\n"
        "from meshpush.observe import tracing\n"
        "print(tracing.setup('n1'), tracing.ON)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = _python(code, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False False", "[]"]
    # the check can fail: with the variables set, setup imports the SDK
    done = _python(code, {"OTEL_TRACES_EXPORTER": "console"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "True True"
    assert "opentelemetry.sdk.trace" in done.stdout


def test_node_with_a_bad_exporter_exits_with_a_clear_error(tmp_path: Path) -> None:
    env = {**env_for(_unreachable()), "OTEL_TRACES_EXPORTER": "nope"}
    done = subprocess.run(
        [sys.executable, "-m", "meshpush", "node"],
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "unknown trace exporter 'nope'" in done.stderr


def _unreachable() -> Any:
    from meshpush.settings import Settings

    return Settings(node_id="n1", etcd="127.0.0.1:9", nats_url="nats://127.0.0.1:9")


# ---------------------------------------------------------------- spans, with fakes


class _ApiError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status, self.code = status, code


class _Api:
    settings = SimpleNamespace(node_id="n1")

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    @tracing.http("/v1/publish")
    async def publish(self, request: Any) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(status_code=202)


def _request(**headers: str) -> Any:
    return SimpleNamespace(method="POST", headers=headers)


async def test_http_span_names_the_status_and_the_api_error(
    exporter: InMemorySpanExporter,
) -> None:
    assert (await _Api().publish(_request())).status_code == 202
    with pytest.raises(_ApiError):
        await _Api(_ApiError(400, "bad_json")).publish(_request())
    with pytest.raises(_ApiError):
        await _Api(_ApiError(503, "store_unavailable")).publish(_request())
    with pytest.raises(RuntimeError):
        await _Api(RuntimeError("a bug")).publish(_request())
    ok, bad, down, bug = exporter.get_finished_spans()
    assert ok.name == "POST /v1/publish" and ok.kind is SpanKind.SERVER
    assert ok.attributes is not None and ok.attributes["http.response.status_code"] == 202
    assert bad.attributes is not None and bad.attributes["error.type"] == "bad_json"
    assert bad.status.status_code is StatusCode.UNSET  # the client's fault, not the server's
    assert down.attributes is not None and down.attributes["http.response.status_code"] == 503
    assert down.status.status_code is StatusCode.ERROR
    assert bug.attributes is not None and bug.attributes["error.type"] == "RuntimeError"
    assert bug.attributes["http.response.status_code"] == 500


async def test_http_span_continues_the_publishers_trace(exporter: InMemorySpanExporter) -> None:
    await _Api().publish(_request(traceparent=f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"))
    [span] = exporter.get_finished_spans()
    assert span.context is not None and span.context.trace_id == int(UPSTREAM_TRACE, 16)
    assert parent_of(span) == int(UPSTREAM_SPAN, 16)


async def test_store_spans_carry_the_outcome_and_the_items_their_context(
    exporter: InMemorySpanExporter,
) -> None:
    items = [Outgoing("user", "alice", "m1", "1"), Outgoing("user", "bob", "m2", "1")]

    async def publish(traced: list[Outgoing]) -> list[Outcome]:
        assert [t.trace is not None for t in traced] == [True, True]
        assert _publish("s", 4, traced[0]).headers["traceparent"].startswith("00-")
        return [Stored(5, 4, False), StoreUnavailable("not stored: test")]

    outcomes = await tracing.store(publish, items, "n1")
    assert isinstance(outcomes[0], Stored)
    stored, failed = exporter.get_finished_spans()
    assert stored.attributes is not None and stored.attributes["meshpush.seq"] == 5
    assert stored.attributes["meshpush.user_hash"] == user_hash("alice")
    assert failed.attributes is not None and failed.attributes["error.type"] == "StoreUnavailable"
    assert failed.status.status_code is StatusCode.ERROR

    async def cancelled(traced: list[Outgoing]) -> list[Outcome]:
        raise trio.TooSlowError

    exporter.clear()
    with pytest.raises(trio.TooSlowError):
        await tracing.store(cancelled, items, "n1")
    spans = exporter.get_finished_spans()
    assert [s.attributes["error.type"] for s in spans if s.attributes] == ["TooSlowError"] * 2


class _StoringApi(_Api):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Outgoing] = []

    async def _store(self, items: list[Outgoing]) -> list[Outcome]:
        self.sent += items
        return [Stored(1, 0, False)]

    @tracing.http("/v1/publish")
    async def publish(self, request: Any) -> Any:
        await tracing.store(self._store, [Outgoing("user", "alice", "m1", "1")], "n1")
        return SimpleNamespace(status_code=202)


async def test_an_unsampled_request_leaves_its_messages_untraced(
    exporter: InMemorySpanExporter,
) -> None:
    api = _StoringApi()
    await api.publish(_request(traceparent=f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-00"))
    assert exporter.get_finished_spans() == ()
    assert api.sent[0].trace is None  # no traceparent for the owner node either
    await api.publish(_request(traceparent=f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"))
    assert [s.name for s in exporter.get_finished_spans()] == ["meshpush.store", "POST /v1/publish"]
    assert api.sent[1].trace is not None


class _Wire:
    def try_send(self, data: bytes) -> int:
        return len(data)


async def test_session_spans_are_capped_per_delivery(exporter: InMemorySpanExporter) -> None:
    hub = Hub()
    ctx = Context(Limits(), None, Metrics("n1"))  # type: ignore[arg-type]
    for i in range(tracing.SESSION_SPANS + 4):
        session = Session(ctx, "alice", f"d{i}", time.time() + 60)
        session.wire = _Wire()  # type: ignore[assignment]
        session.feeds["user"].replaying = False
        hub.add(session)
    note = Notification("user", "alice", 1, 0, "m1", time.time(), "1")
    note = tracing.received(note, {"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"})
    assert await tracing.deliver(hub.deliver, note, "n1") == tracing.SESSION_SPANS + 4
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("meshpush.feed") == names.count("meshpush.write") == tracing.SESSION_SPANS
    assert names.count("meshpush.deliver") == 1
    # a frame written outside a traced delivery (a replay, a welcome) gets no span
    exporter.clear()
    assert session.write(b"x")
    assert exporter.get_finished_spans() == ()


async def test_notifications_delivered_together_get_a_deliver_span_each(
    exporter: InMemorySpanExporter,
) -> None:
    """A fan-out that takes several notifications at once (coalesced): each traced one has
    its own deliver span, and each session span hangs under its own notification's."""
    upstream = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
    notes = [Notification("user", "alice", s, s - 1, f"m{s}", time.time(), "1") for s in (1, 2, 3)]
    for i in (0, 2):  # the second one came without a traceparent
        notes[i] = tracing.received(notes[i], {"traceparent": upstream})
    session = SimpleNamespace(id=7, buffered=0)
    written: list[bytes] = []

    async def fan_out(batch: Sequence[Notification]) -> list[int]:
        for note in batch:
            tracing.fed(session, "user", note, Verdict.DELIVER)
            tracing.write(written.append, session, b"frame")
        return [1, 1, 1]

    assert await tracing.deliver_many(fan_out, notes, "n1") == [1, 1, 1]
    assert written == [b"frame"] * 3
    spans = exporter.get_finished_spans()
    delivers = [s for s in spans if s.name == "meshpush.deliver"]
    assert [d.attributes["meshpush.seq"] for d in delivers if d.attributes] == [1, 3]
    feeds = [s for s in spans if s.name == "meshpush.feed"]
    assert [parent_of(f) for f in feeds] == [span_id(d) for d in delivers]
    writes = [s for s in spans if s.name == "meshpush.write"]
    assert [parent_of(w) for w in writes] == [span_id(f) for f in feeds]


async def test_a_coalesced_write_gets_feed_spans_and_one_write_span(
    exporter: InMemorySpanExporter,
) -> None:
    """A fan-out that writes a run of notifications to a session at once reports it after the
    write (``wrote_run``): a feed span per traced notification, one write span."""
    upstream = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
    notes = [Notification("user", "alice", s, s - 1, f"m{s}", time.time(), "1") for s in (1, 2, 3)]
    for i in (1, 2):  # the first one came without a traceparent
        notes[i] = tracing.received(notes[i], {"traceparent": upstream})
    session = SimpleNamespace(id=7, buffered=1)

    async def fan_out(batch: Sequence[Notification]) -> list[int]:
        tracing.wrote_run(session, "user", batch, 300)
        return [1, 1, 1]

    await tracing.deliver_many(fan_out, notes, "n1")
    spans = exporter.get_finished_spans()
    feeds = [s for s in spans if s.name == "meshpush.feed"]
    [write] = [s for s in spans if s.name == "meshpush.write"]
    assert len(feeds) == 2
    assert parent_of(write) == span_id(feeds[0])
    assert write.attributes is not None and write.attributes["meshpush.frames"] == 3
    assert write.attributes["meshpush.queued"] is True


# ---------------------------------------------------------------- two nodes, one trace


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """etcd and nats-server -js only: the nodes run in the test's process."""
    workdir = tmp_path_factory.mktemp("tracing")
    with LocalCluster(workdir, nodes=0, cluster="tr", node_settings=FAST) as cluster:
        yield cluster


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.start(provider)
    try:
        yield memory
    finally:
        tracing.stop()
        provider.shutdown()


async def publish_traced(backends: LocalCluster, node: Node, user: str, client: Client) -> Message:
    """Publish through ``node`` as part of the publisher's (sampled) trace; ``client`` gets it."""
    upstream = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
    result = await publish_via(node, backends.api_key, user, {"n": 1}, traceparent=upstream)
    with trio.fail_after(10):
        msg = await client.receive()
    assert msg.seq == result["seq"]
    return msg


async def stored_headers(node: Node, seq: int) -> dict[str, str]:
    stream = node.store.streams["user"]
    msg = await node.bridge.call(lambda: node.bus.js.get_msg(stream, seq), timeout=5)
    return dict(msg.headers or {})


async def watch_notifications(node: Node, user: str) -> list[dict[str, str] | None]:
    """The NATS headers of every message JetStream republishes to ``user``'s slot from now on
    (the live hint of a stored unicast; the publishing node sends none)."""
    seen: list[dict[str, str] | None] = []

    async def record(msg: Any) -> None:
        seen.append(msg.headers)

    subject = node.bus.subjects.slot_republished(slot(user))
    # on the connection the node publishes on: the server sees this SUB before those PUBs
    await node.bridge.call(lambda: node.bus.nc.subscribe(subject, cb=record), timeout=5)
    return seen


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


@in_process_nodes
async def test_one_trace_from_publish_on_one_node_to_delivery_on_another(
    backends: LocalCluster, exporter: InMemorySpanExporter
) -> None:
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a)
        notified = await watch_notifications(a, user)
        async with online(backends, b, user) as client:
            msg = await publish_traced(backends, a, user, client)
            with trio.fail_after(10):
                while "meshpush.deliver" not in {s.name for s in exporter.get_finished_spans()}:
                    await trio.sleep(0.02)
            headers = await stored_headers(a, msg.seq)
            async with online(backends, b, user, device="d2") as other:  # a new device: replay
                with trio.fail_after(10):
                    assert (await other.receive()).seq == msg.seq

    spans = tuple(s for s in exporter.get_finished_spans() if s.name != "meshpush.handshake")
    traced = [s for s in spans if s.name != "meshpush.replay"]  # a replay starts its own
    assert {s.context.trace_id for s in traced if s.context} == {int(UPSTREAM_TRACE, 16)}
    named = by_name(spans)
    assert set(named) == {  # no meshpush.notify: JetStream republishes the stored message
        "POST /v1/publish",
        "meshpush.store",
        "meshpush.deliver",
        "meshpush.feed",
        "meshpush.write",
        "meshpush.replay",
    }
    server, store = named["POST /v1/publish"], named["meshpush.store"]
    deliver, feed, write = (
        named["meshpush.deliver"],
        named["meshpush.feed"],
        named["meshpush.write"],
    )
    # the chain: upstream -> a's publish spans -> b's delivery spans
    assert parent_of(server) == int(UPSTREAM_SPAN, 16)
    assert parent_of(store) == span_id(server)
    assert parent_of(deliver) == span_id(store)
    assert deliver.parent is not None and deliver.parent.is_remote
    assert parent_of(feed) == span_id(deliver)
    assert parent_of(write) == span_id(feed)
    # which node did what
    for span in (server, store):
        assert span.attributes is not None and span.attributes["meshpush.node"] == "a"
    assert deliver.attributes is not None and deliver.attributes["meshpush.node"] == "b"
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 202
    assert store.attributes is not None and store.attributes["meshpush.seq"] == msg.seq
    assert deliver.attributes["meshpush.seq"] == msg.seq
    assert deliver.attributes["messaging.message.id"] == msg.id
    assert deliver.attributes["meshpush.sessions"] == 1
    assert feed.attributes is not None and feed.attributes["meshpush.verdict"] == "deliver"
    assert write.attributes is not None and write.attributes["meshpush.bytes"] > 0
    # the user is named by its hash only
    for span in spans:
        assert user not in repr(dict(span.attributes or {})), span.name
    assert deliver.attributes["meshpush.user_hash"] == store.attributes["meshpush.user_hash"]
    # the republished message carried the store's context, as the stored message does
    [live] = notified
    assert (
        live is not None and live["traceparent"] == f"00-{UPSTREAM_TRACE}-{span_id(store):016x}-01"
    )
    # and a replay of the stored message links to its store span
    assert headers["traceparent"].split("-")[1] == UPSTREAM_TRACE
    replay = named["meshpush.replay"]
    assert replay.attributes is not None and replay.attributes["meshpush.node"] == "b"
    [link] = replay.links
    assert link.context.span_id == span_id(store)


@in_process_nodes
async def test_off_no_spans_and_no_trace_headers(
    backends: LocalCluster, exporter: InMemorySpanExporter
) -> None:
    tracing.stop()  # the nodes run with tracing off
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a)
        notified = await watch_notifications(a, user)
        async with online(backends, b, user) as client:
            msg = await publish_traced(backends, a, user, client)
            headers = await stored_headers(a, msg.seq)
            await wait_until(lambda: notified, timeout=10)
    assert exporter.get_finished_spans() == ()
    assert "traceparent" not in headers
    [live] = notified  # republished: JetStream's headers and ours, no trace context
    assert live is not None and "traceparent" not in live and live["Nats-Sequence"] == str(msg.seq)


# ---------------------------------------------------------------- node processes, OTLP


class Collector:
    """A minimal OTLP/HTTP trace receiver on 127.0.0.1 (what an OpenTelemetry Collector's
    ``otlp`` receiver does with ``POST /v1/traces``), keeping (node, span name, trace id,
    span id, parent span id) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes, bytes, bytes]] = []
        self.services: set[str] = set()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            self.services.add(resource["service.name"])
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    node = resource["service.instance.id"]
                    ids = (span.trace_id, span.span_id, span.parent_span_id)
                    self.spans.append((node, span.name, *ids))


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_node_processes_export_one_trace_over_otlp_set_by_otel_variables(
    tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)  # nothing else
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    with make_cluster(tmp_path / "cluster", nodes=2) as cluster:
        first, second = cluster.live()
        user = await user_owned_by(cluster, second.id)
        async with connected(cluster, user, via=second) as client:
            await publish_to(cluster, first, user, {"n": 3})
            await receive(client)
        wanted = {(first.id, "meshpush.store"), (second.id, "meshpush.write")}
        await wait_until(lambda: wanted <= {(s[0], s[1]) for s in collector.spans}, timeout=15)
    assert collector.services == {"meshpush"}
    [store] = [s for s in collector.spans if s[1] == "meshpush.store"]
    trace = [s for s in collector.spans if s[2] == store[2]]
    # just after start-up the first node may still hold the slot's subscription it lost when
    # the second joined (it lets go once that slot's sessions have moved): the notification
    # (republished) then reaches it too, finds no session there and goes no further
    named = {(node, name) for node, name, *_ in trace} - {(first.id, "meshpush.deliver")}
    assert named == {
        (first.id, "POST /v1/publish"),
        (first.id, "meshpush.store"),
        (second.id, "meshpush.deliver"),
        (second.id, "meshpush.feed"),
        (second.id, "meshpush.write"),
    }
    [deliver] = [s for s in trace if s[1] == "meshpush.deliver" and s[0] == second.id]
    assert deliver[4] == store[3]  # b's delivery hangs under a's store (JetStream republished)


# ---------------------------------------------------------------- handshakes and the webhook


async def raw_handshake(node: Node, query: str, *headers: str, wait: bool = True) -> bytes:
    """A WebSocket upgrade request to ``node`` (``query``, extra header lines); what the node
    sent until it closed (at most 5 s), or nothing if ``wait`` is false (the client leaves)."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.settings.ws_port)
    lines = [f"GET /ws?{query} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket"]
    lines += ["Connection: Upgrade", "Sec-WebSocket-Version: 13"]
    lines += ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", *headers]
    data = b""
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        with trio.move_on_after(5 if wait else 0.3):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


def handshakes(exporter: InMemorySpanExporter, node: str) -> list[dict[str, Any]]:
    spans = [s for s in exporter.get_finished_spans() if s.name == "meshpush.handshake"]
    return [
        dict(s.attributes or {}) for s in spans if (s.attributes or {}).get("meshpush.node") == node
    ]


@in_process_nodes
async def test_each_handshake_is_a_span_that_names_its_outcome(
    backends: LocalCluster, exporter: InMemorySpanExporter
) -> None:
    async with two_nodes(backends) as (a, b):
        user = user_of(b, via=a)
        async with online(backends, a, user):  # a redirects the client to b, which accepts it
            pass
        upstream = f"traceparent: 00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
        refused = await raw_handshake(a, "token=forged&device=d", upstream)
        assert b"bad_token" in refused or b"invalid" in refused, refused
        await raw_handshake(a, "device=d", wait=False)  # no token, no auth frame: it left
        mine = user_of(a, via=b, prefix="own")
        token = issue_token(backends.token_secret, mine, 600)
        welcomed = await raw_handshake(
            a, f"token={token}&device=d", "traceparent: 00-zz", wait=False
        )
        assert b"welcome" in welcomed  # a malformed traceparent is ignored, never refused

    [accepted] = handshakes(exporter, "b")
    assert accepted["meshpush.outcome"] == "accepted"
    assert accepted["meshpush.user_hash"] == user_hash(user)
    assert isinstance(accepted["meshpush.recovered"], bool)
    on_a = sorted(handshakes(exporter, "a"), key=lambda h: str(h["meshpush.outcome"]))
    assert [h["meshpush.outcome"] for h in on_a] == ["accepted", "gone", "redirected", "refused"]
    assert on_a[0]["meshpush.user_hash"] == user_hash(mine)
    assert on_a[2]["meshpush.redirect.node"] == "b"
    assert on_a[3]["meshpush.refusal.status"] == 401 and on_a[3]["error.type"]
    [refusal] = [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("meshpush.outcome") == "refused"
    ]
    assert refusal.kind is SpanKind.SERVER
    assert parent_of(refusal) == int(UPSTREAM_SPAN, 16)  # the client's trace continues
    assert refusal.status.status_code is not StatusCode.ERROR  # a 4xx is the client's
    [own] = [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("meshpush.user_hash") == user_hash(mine)
    ]
    assert own.parent is None  # the garbled traceparent started no trace of the client's
    for span in exporter.get_finished_spans():
        assert user not in repr(dict(span.attributes or {})), span.name


async def test_a_webhook_post_is_a_client_span_linked_to_its_messages(
    exporter: InMemorySpanExporter, autojump_clock: trio.abc.Clock
) -> None:
    """Each attempt is a ``meshpush.webhook`` span (a new trace: a batch holds many messages'
    traces, so it links to them); its traceparent goes with the POST."""
    seen: list[httpx.Request] = []
    statuses = iter([500, 204])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(statuses))

    settings = Settings(
        node_id="n1",
        offline_webhook_url="http://hook.test:8080/h",
        offline_webhook_secret="whsec-test",
        offline_webhook_delay=1.0,
        offline_webhook_retries=3,
    )
    hook = Webhook(settings, Metrics("n1"), lambda user: True, httpx.MockTransport(handler))
    upstream = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
    parent = TraceContextTextMapPropagator().extract({"traceparent": upstream})
    traced = Notification("user", "a", 1, 0, "id-1", 0.0, '"hi"', tracing.Trace(parent, upstream))
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        hook.notified(traced)
        hook.notified(Notification("user", "b", 2, 0, "id-2", 0.0, '"x"'))  # untraced
        await trio.sleep(60)
        nursery.cancel_scope.cancel()

    failed, taken = [s for s in exporter.get_finished_spans() if s.name == "meshpush.webhook"]
    for span in (failed, taken):
        assert span.kind is SpanKind.CLIENT and span.parent is None
        assert span.attributes is not None and span.attributes["meshpush.messages"] == 2
        assert span.attributes["server.address"] == "hook.test"
        assert span.attributes["server.port"] == 8080
        assert [link.context.span_id for link in span.links] == [int(UPSTREAM_SPAN, 16)]
    assert failed.attributes is not None and failed.attributes["http.response.status_code"] == 500
    assert failed.status.status_code is StatusCode.ERROR
    assert taken.attributes is not None and taken.attributes["http.request.resend_count"] == 1
    assert taken.status.status_code is not StatusCode.ERROR
    for request, span in zip(seen, (failed, taken), strict=True):
        assert span.context is not None
        ids = f"{span.context.trace_id:032x}-{span.context.span_id:016x}"
        assert request.headers["traceparent"] == f"00-{ids}-{span.context.trace_flags:02x}"


@in_process_nodes
async def test_a_traced_message_nobody_got_reaches_the_webhook_with_its_span(
    backends: LocalCluster, exporter: InMemorySpanExporter
) -> None:
    """Through a real node (etcd, NATS, JetStream's republish) to a real receiver: the POST
    carries the ``meshpush.webhook`` span's traceparent, and that span links the message's
    store span."""
    receiver = Receiver()
    server = serve_receiver(receiver)
    receiver.port = server.server_address[1]
    settings = backends.settings_for("w").replace(
        cluster="trw",  # alone: the other tests' nodes may still be registered for a lease
        offline_webhook_url=f"http://127.0.0.1:{receiver.port}/push",
        offline_webhook_secret="whsec-test",
        offline_webhook_delay=0.2,
    )
    try:
        async with trio.open_nursery() as nursery:
            node = await nursery.start(Node(settings).run)
            try:
                await wait_until(lambda: node.router.ready, timeout=30)
                upstream = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
                key = backends.api_key
                await publish_via(node, key, "offline-1", {"n": 1}, traceparent=upstream)
                await wait_until(lambda: receiver.messages("offline-1"), timeout=15)
            finally:
                with trio.move_on_after(10):
                    await node.stop()
                nursery.cancel_scope.cancel()
    finally:
        server.shutdown()
        server.server_close()

    [(headers, _)] = receiver.requests_for("offline-1")
    spans = exporter.get_finished_spans()
    [store] = [s for s in spans if s.name == "meshpush.store"]
    [post] = [s for s in spans if s.name == "meshpush.webhook"]
    assert post.context is not None and post.parent is None
    sent = {k.lower(): v for k, v in headers.items()}["traceparent"]
    assert sent.split("-")[1:3] == [f"{post.context.trace_id:032x}", f"{span_id(post):016x}"]
    assert [link.context.span_id for link in post.links] == [span_id(store)]
    assert post.attributes is not None and post.attributes["http.response.status_code"] == 204
    assert post.attributes["meshpush.node"] == "w"
