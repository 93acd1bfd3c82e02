"""OpenTelemetry tracing of a message's path: publish on one node, delivery on its owner.

Off by default, and free when off: the hooks in the hot paths (``api``, ``store``, ``bus``,
``router``, ``hub``, ``sessions``, ``delivery``) test :data:`ON` (or a message's ``trace``
field, None when off) and do nothing else; opentelemetry is not even imported. This is the
only module that imports it.

On when the standard variables ask for it (:func:`wanted`): ``OTEL_TRACES_EXPORTER`` names
exporters (``otlp``, ``console``, any installed ``opentelemetry_traces_exporter`` entry
point; ``none`` = off), or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` wins over both. The SDK
reads everything else itself (sampler, batch processor, exporter endpoint, headers, resource
attributes). ``OTEL_SERVICE_NAME`` defaults to ``meshpush``; ``service.instance.id`` is the
node id. The packages come with the ``tracing`` extra (``pip install 'meshpush[tracing]'``).

Spans (docs/operations.md, "Tracing"): on the publishing node ``POST /v1/publish`` (server)
-> ``meshpush.store`` (one per stored message: the JetStream publish) -> ``meshpush.notify``
(producer: the live notification; none for a unicast JetStream republishes: the owner's
deliver span then hangs under the store span, whose traceparent the stored message
carries). The W3C ``traceparent`` goes into the NATS headers of the notification and of the
stored message. On the owner node ``meshpush.deliver`` (consumer,
from the moment the notification arrived) -> per session (at most :data:`SESSION_SPANS`)
``meshpush.feed`` (the feed's verdict) -> ``meshpush.write`` (the frame handed to the socket).
A batch replayed from the stream is a ``meshpush.replay`` span linked to its messages' stores.
Around them: each WebSocket handshake is a ``meshpush.handshake`` server span (its outcome:
accepted, redirected, refused with its code, gone or failed), and each POST of the offline
webhook a ``meshpush.webhook`` client span linked to its messages' publishing spans (at most
:data:`MAX_LINKS`), whose ``traceparent`` goes with the request. Attributes name the node,
channel, seq, message id and the user's hash (as the logs do); never a token, a user id in
clear or a body.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from meshpush.observe.logs import user_hash

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from meshpush.backends.bus import Notification
    from meshpush.backends.store import Outcome, Outgoing, StoredMessage
    from meshpush.core.feed import Verdict

#: The one flag the hot paths read. True between :func:`start` and :func:`stop`.
ON = False
STOP_TIMEOUT = 3.0  # seconds stop() waits for the last batch of spans to be exported
SESSION_SPANS = 16  # feed/write spans per delivery at most (a broadcast reaches thousands)
MAX_LINKS = 64  # links of a replay or webhook span at most (to its messages' publishes)
EXPORTER_GROUP = "opentelemetry_traces_exporter"
OTLP_PROTOCOLS = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


class TracingError(ValueError):
    """The OTEL_* variables ask for something this installation cannot do."""


class Trace:
    """A trace context travelling with one message inside a node (``Outgoing.trace`` on the
    publishing side, ``Notification.trace`` on the receiving side); None when tracing is off.

    ``parent`` is the OpenTelemetry context the next span hangs under, ``traceparent`` the
    W3C header that carries it to NATS, ``at`` when it arrived (ns since the epoch)."""

    __slots__ = ("at", "parent", "traceparent")

    def __init__(self, parent: Context, traceparent: str, at: int = 0) -> None:
        self.parent, self.traceparent, self.at = parent, traceparent, at


# ---------------------------------------------------------------- configuration


def wanted(env: Mapping[str, str]) -> list[str]:
    """The exporters the standard variables ask for; [] = tracing off (the default)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if names:
        return [n for n in names if n != "none"]
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def exporter_name(name: str, env: Mapping[str, str]) -> str:
    """The entry point of an ``OTEL_TRACES_EXPORTER`` name (``otlp``: by the OTLP protocol)."""
    if name != "otlp":
        return name
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in OTLP_PROTOCOLS:
        raise TracingError(
            f"OTLP protocol {protocol!r} is not supported: use {' or '.join(OTLP_PROTOCOLS)}"
        )
    return OTLP_PROTOCOLS[protocol]


def setup(node_id: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the OTEL_* variables ask for it; True if on. Raises
    :class:`TracingError` when they ask for what is not installed or does not exist."""
    env = os.environ if env is None else env
    names = wanted(env)
    if not names:
        return False
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingError(
            "tracing was asked for (OTEL_* variables) but OpenTelemetry is not installed: "
            "pip install 'meshpush[tracing]'"
        ) from None
    # no atexit hook of the SDK's own: stop() shuts it down, bounded by STOP_TIMEOUT
    provider = TracerProvider(resource=_resource(node_id), shutdown_on_exit=False)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name(name, env))))
    start(provider, owned=True)
    return True


def _resource(node_id: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.instance.id": node_id, "meshpush.node": node_id})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "meshpush"}))
    return resource


def _exporter(name: str) -> SpanExporter:
    from importlib.metadata import entry_points

    found = entry_points(group=EXPORTER_GROUP, name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=EXPORTER_GROUP))
        raise TracingError(f"unknown trace exporter {name!r}; installed: {', '.join(known)}")
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter


class _State:
    """The OpenTelemetry objects the hooks use (exists only while tracing is on)."""

    def __init__(self, provider: TracerProvider, owned: bool) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from meshpush import __version__

        self.provider, self.owned = provider, owned
        self.tracer = provider.get_tracer("meshpush", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.current_span = trace.get_current_span
        self.link = trace.Link
        self.in_context = trace.set_span_in_context
        self.use_span = trace.use_span
        self.kinds = trace.SpanKind
        self.error = trace.Status(trace.StatusCode.ERROR)

    def unsampled(self) -> bool:
        """The current trace (the request's) is not sampled: its messages go untraced, so
        neither node spends anything on it (the owner sees no traceparent)."""
        span = self.current_span()
        return span.get_span_context().is_valid and not span.is_recording()

    def child(self, span: Span) -> tuple[Context, str]:
        """The context under ``span`` and its W3C traceparent."""
        context = self.in_context(span)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=context)
        return context, carrier.get("traceparent", "")


_state: _State | None = None


def start(provider: TracerProvider, owned: bool = False) -> None:
    """Trace with ``provider`` from now on (tests pass one with an in-memory exporter);
    ``owned``: :func:`stop` shuts it down (flushing what is batched)."""
    global ON, _state
    _state = _State(provider, owned)
    ON = True


def stop(timeout: float = STOP_TIMEOUT) -> None:
    """Tracing off; an owned provider is shut down: what is batched is exported if that takes
    less than ``timeout`` (the SDK would wait 30 s for an unreachable collector)."""
    global ON, _state
    ON = False
    state, _state = _state, None
    if state is not None and state.owned:
        flush = threading.Thread(target=state.provider.shutdown, name="tracing-stop", daemon=True)
        flush.start()
        flush.join(timeout)


# ---------------------------------------------------------------- publishing node

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


def http(route: str) -> Callable[[Handler], Handler]:
    """Decorates an API handler ``(api, request)``: a server span when on, else a plain call."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def traced(api: Any, request: Any) -> Any:
            if not ON:
                return await handler(api, request)
            return await _serve(handler, api, request, route)

        return cast(Handler, traced)

    return decorate


async def _serve(handler: Callable[..., Awaitable[Any]], api: Any, request: Any, route: str) -> Any:
    state = _state
    if state is None:
        return await handler(api, request)
    method = request.method
    span = state.tracer.start_span(
        f"{method} {route}",
        context=state.propagator.extract(request.headers),  # a publisher's trace continues
        kind=state.kinds.SERVER,
        attributes={
            "http.request.method": method,
            "http.route": route,
            "meshpush.node": api.settings.node_id,
        },
    )
    with state.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ):
        try:
            response = await handler(api, request)
        except Exception as exc:  # an ApiError carries its status and code
            code = getattr(exc, "code", type(exc).__name__)
            _http_failed(span, getattr(exc, "status", 500), str(code))
            raise
        span.set_attribute("http.response.status_code", response.status_code)
        return response


def _http_failed(span: Span, status: int, code: str) -> None:
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("error.type", code)
    if status >= 500 and _state is not None:
        span.set_status(_state.error)


def _message_attributes(node: str, ch: str, user: str | None, msg_id: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "meshpush.node": node,
        "meshpush.ch": ch,
        "messaging.system": "nats",
        "messaging.message.id": msg_id,
    }
    if user is not None:
        attributes["meshpush.user_hash"] = user_hash(user)
    return attributes


async def store(
    publish: Callable[[list[Outgoing]], Awaitable[Sequence[Outcome]]],
    items: list[Outgoing],
    node: str,
) -> Sequence[Outcome]:
    """``publish(items)`` with one ``meshpush.store`` span per item, each item carrying its
    span's context (``Outgoing.trace``) to the JetStream headers and the notification."""
    state = _state
    if state is None or state.unsampled():
        return await publish(items)
    spans = [
        state.tracer.start_span(
            "meshpush.store",
            kind=state.kinds.CLIENT,
            attributes=_message_attributes(node, i.ch, i.user, i.id),
        )
        for i in items
    ]
    traced = [
        dataclasses.replace(i, trace=Trace(*state.child(s)))
        for i, s in zip(items, spans, strict=True)
    ]
    try:
        outcomes = await publish(traced)
    except BaseException as exc:  # cancelled (or a bug): no outcome to name
        for span in spans:
            _failed(span, type(exc).__name__)
        raise
    for span, outcome in zip(spans, outcomes, strict=True):
        seq = getattr(outcome, "seq", None)
        if seq is None:  # StoreUnavailable / StoreTimeout
            _failed(span, type(outcome).__name__)
            continue
        span.set_attribute("meshpush.seq", seq)
        span.set_attribute("meshpush.duplicate", bool(getattr(outcome, "duplicate", False)))
        span.end()
    return outcomes


def _failed(span: Span, error: str) -> None:
    span.set_attribute("error.type", error)
    if _state is not None:
        span.set_status(_state.error)
    span.end()


def notify(trace: Trace, subject: str, seq: int) -> dict[str, str] | None:
    """A ``meshpush.notify`` span; the NATS headers that carry it to the owner node."""
    state = _state
    if state is None:
        return None
    span = state.tracer.start_span(
        "meshpush.notify",
        context=trace.parent,
        kind=state.kinds.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,  # a slot subject: no user id in it
            "messaging.operation.type": "publish",
            "meshpush.seq": seq,
        },
    )
    _, traceparent = state.child(span)
    span.end()
    return {"traceparent": traceparent}


# ---------------------------------------------------------------- owner node


def received(note: Notification, headers: Mapping[str, str]) -> Notification:
    """A notification that came with a traceparent carries it on (called on arrival)."""
    traceparent = headers.get("traceparent")
    state = _state
    if traceparent is None or state is None:
        return note
    parent = state.propagator.extract({"traceparent": traceparent})
    return dataclasses.replace(note, trace=Trace(parent, traceparent, time.time_ns()))


@dataclass(slots=True)
class _Delivery:
    """The deliveries being traced in this task: the parents of their session spans."""

    parents: dict[int, Context]  # id(notification) -> its meshpush.deliver span's context
    budget: int = SESSION_SPANS
    feed: Context | None = None  # the last feed span that let a frame through
    open: bool = True


_delivery: contextvars.ContextVar[_Delivery | None] = contextvars.ContextVar(
    "meshpush_delivery", default=None
)


async def deliver(
    fan_out: Callable[[Notification], Awaitable[int]], note: Notification, node: str
) -> int:
    """``fan_out(note)`` inside a ``meshpush.deliver`` span continuing the publisher's trace."""

    async def one(notes: Sequence[Notification]) -> list[int]:
        return [await fan_out(notes[0])]

    [sent] = await deliver_many(one, [note], node)
    return sent


async def deliver_many(
    fan_out: Callable[[Sequence[Notification]], Awaitable[list[int]]],
    notes: Sequence[Notification],
    node: str,
) -> list[int]:
    """``fan_out(notes)`` (notifications delivered together; it returns how many sessions got
    each) with a ``meshpush.deliver`` span for each traced one, from its arrival."""
    state = _state
    traced = [(i, n) for i, n in enumerate(notes) if n.trace is not None]
    if state is None or not traced:
        return await fan_out(notes)
    spans = [(i, n, _deliver_span(state, n, node)) for i, n in traced]
    delivery = _Delivery({id(n): state.in_context(span) for _, n, span in spans})
    token = _delivery.set(delivery)
    try:
        sent = await fan_out(notes)
    except BaseException as exc:
        for _, _, span in spans:
            _failed(span, type(exc).__name__)
        raise
    finally:
        delivery.open = False
        _delivery.reset(token)
    for i, _, span in spans:
        span.set_attribute("meshpush.sessions", sent[i])
        span.end()
    return sent


def _deliver_span(state: _State, note: Notification, node: str) -> Span:
    assert note.trace is not None
    attributes = _message_attributes(node, note.ch, note.user, note.id)
    attributes["meshpush.seq"] = note.seq
    return state.tracer.start_span(
        "meshpush.deliver",
        context=note.trace.parent,
        kind=state.kinds.CONSUMER,
        attributes=attributes,
        start_time=note.trace.at or None,
    )


def fed(session: Any, ch: str, note: object, verdict: Verdict) -> None:
    """A ``meshpush.feed`` span: what the session's feed did with a live notification."""
    delivery, state = _delivery.get(), _state
    if delivery is None or not delivery.open or state is None:
        return
    delivery.feed = _feed_span(state, delivery, session, ch, note, verdict.value)
    if verdict.value != "deliver":
        delivery.feed = None


def _feed_span(
    state: _State, delivery: _Delivery, session: Any, ch: str, note: object, verdict: str
) -> Context | None:
    parent = delivery.parents.get(id(note))
    if parent is None or delivery.budget <= 0:  # untraced, or enough session spans already
        return None
    delivery.budget -= 1
    span = state.tracer.start_span(
        "meshpush.feed",
        context=parent,
        attributes={"meshpush.session": session.id, "meshpush.ch": ch, "meshpush.verdict": verdict},
    )
    span.end()
    return state.in_context(span)


def wrote_run(session: Any, ch: str, run: Sequence[object], size: int) -> None:
    """After a coalesced write (a run of notifications the session's feed took at once, their
    frames written together): a ``deliver`` feed span for each traced one and one
    ``meshpush.write`` span (``meshpush.frames``) under the first."""
    delivery, state = _delivery.get(), _state
    if delivery is None or not delivery.open or state is None:
        return
    feeds = [_feed_span(state, delivery, session, ch, note, "deliver") for note in run]
    parent = next((f for f in feeds if f is not None), None)
    if parent is None:
        return
    attributes = {"meshpush.session": session.id, "meshpush.bytes": size}
    attributes["meshpush.frames"] = len(run)
    span = state.tracer.start_span("meshpush.write", context=parent, attributes=attributes)
    span.set_attribute("meshpush.queued", session.buffered > 0)
    span.end()


def write(push: Callable[[bytes], None], session: Any, frame: bytes) -> None:
    """``push(frame)``; inside a traced delivery, as a ``meshpush.write`` span under the feed
    span that let the frame through (``meshpush.queued``: the socket did not take it all)."""
    delivery, state = _delivery.get(), _state
    parent = delivery.feed if delivery is not None and delivery.open else None
    if parent is None or state is None:
        push(frame)
        return
    assert delivery is not None
    delivery.feed = None
    span = state.tracer.start_span(
        "meshpush.write",
        context=parent,
        attributes={"meshpush.session": session.id, "meshpush.bytes": len(frame)},
    )
    try:
        push(frame)
        span.set_attribute("meshpush.queued", session.buffered > 0)
    finally:  # no context attach: children name their parent explicitly
        span.end()


def replayed(session: Any, ch: str, batch: Sequence[StoredMessage], node: str) -> None:
    """A ``meshpush.replay`` span for a batch read from the stream and sent to a session,
    linked to the publishes of its messages (those stored with a traceparent)."""
    state = _state
    if state is None or not batch:
        return
    links = _links(state, [m.traceparent for m in batch])
    if not links:  # nothing in it was traced (stored untraced, or not sampled)
        return
    attributes: dict[str, Any] = {
        "meshpush.node": node,
        "meshpush.session": session.id,
        "meshpush.ch": ch,
        "meshpush.messages": len(batch),
        "meshpush.seq": batch[0].seq,
        "meshpush.last_seq": batch[-1].seq,
    }
    if ch == "user":
        attributes["meshpush.user_hash"] = user_hash(session.user)
    state.tracer.start_span("meshpush.replay", links=links, attributes=attributes).end()


def _links(state: _State, traceparents: Sequence[str | None]) -> list[Any]:
    """Links to the spans these traceparents name (the empty ones skipped; at most
    :data:`MAX_LINKS`)."""
    extract, current = state.propagator.extract, state.current_span
    return [
        state.link(current(extract({"traceparent": tp})).get_span_context())
        for tp in traceparents
        if tp
    ][:MAX_LINKS]


# ---------------------------------------------------------------- handshakes


async def handshake(run: Callable[[], Awaitable[T]], traceparent: str | None, node: str) -> T:
    """``run()``, one WebSocket handshake, inside a ``meshpush.handshake`` server span (it
    continues the client's trace if the upgrade request carried a ``traceparent``). The
    gateway says how it ended (:func:`handshake_accepted`, :func:`handshake_redirected`,
    :func:`handshake_refused`); a client that left first leaves ``meshpush.outcome`` "gone",
    an exception (the transport broke, the node stops) makes it "failed".
    The span ends when the handshake does, before the session runs."""
    state = _state
    if state is None:
        return await run()
    span = state.tracer.start_span(
        "meshpush.handshake",
        context=state.propagator.extract({"traceparent": traceparent} if traceparent else {}),
        kind=state.kinds.SERVER,
        attributes={"meshpush.node": node, "meshpush.outcome": "gone"},
    )
    with state.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ):
        try:
            return await run()
        except BaseException as exc:  # the transport broke, the node stops, or a bug
            span.set_attribute("meshpush.outcome", "failed")
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(state.error)
            raise


def _handshake_ended(outcome: str, attributes: dict[str, Any]) -> Span | None:
    state = _state
    span = state.current_span() if state is not None else None
    if span is None or not span.is_recording():
        return None
    span.set_attribute("meshpush.outcome", outcome)
    span.set_attributes(attributes)
    return span


def handshake_accepted(user: str, session_id: int, recovered: bool, redirected: bool) -> None:
    """The handshake opened a session (``redirected``: the ring moved meanwhile, so it is
    redirected at once instead of welcomed)."""
    if ON:
        attributes = {
            "meshpush.user_hash": user_hash(user),
            "meshpush.session": session_id,
            "meshpush.recovered": recovered,
        }
        _handshake_ended("redirected" if redirected else "accepted", attributes)


def handshake_redirected(node: str, reason: str) -> None:
    """The handshake sent the client to the user's owner ``node``."""
    if ON:
        attributes = {"meshpush.redirect.node": node, "meshpush.redirect.reason": reason}
        _handshake_ended("redirected", attributes)


def handshake_refused(code: str, status: int) -> None:
    """The handshake was refused (``code``: the documented error code, ``status`` the HTTP
    status it maps to: answered as such, or as the 4000 + status close after the upgrade);
    a 5xx is an error."""
    if ON:
        attributes = {"error.type": code, "meshpush.refusal.status": status}
        span = _handshake_ended("refused", attributes)
        if span is not None and status >= 500 and _state is not None:
            span.set_status(_state.error)


# ---------------------------------------------------------------- offline webhook


@functools.lru_cache(maxsize=8)
def _server(url: str) -> dict[str, Any]:
    """``server.address`` and ``server.port`` of a URL (the port: the scheme's if none, or
    none at all if it cannot be read: a span never fails the request it describes)."""
    parts = urllib.parse.urlsplit(url)
    server: dict[str, Any] = {"server.address": parts.hostname or ""}
    with contextlib.suppress(ValueError):
        server["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return server


WebhookAnswer = int | str  # the HTTP status, or the name of the error that left none


async def webhook(
    send: Callable[[dict[str, str]], Awaitable[WebhookAnswer]],
    headers: dict[str, str],
    url: str,
    traceparents: Sequence[str | None],
    attempt: int,
    node: str,
) -> WebhookAnswer:
    """``send(headers)``, one POST of the offline webhook, inside a ``meshpush.webhook``
    client span linked to the publishes of its messages (those traced); the span's
    ``traceparent`` goes with the request, so the receiving backend can continue the trace."""
    state = _state
    if state is None:
        return await send(headers)
    attributes: dict[str, Any] = {
        "meshpush.node": node,
        "meshpush.messages": len(traceparents),
        "http.request.method": "POST",
        **_server(url),
    }
    if attempt:
        attributes["http.request.resend_count"] = attempt
    span = state.tracer.start_span(
        "meshpush.webhook",
        kind=state.kinds.CLIENT,
        links=_links(state, traceparents),
        attributes=attributes,
    )
    _, traceparent = state.child(span)
    try:
        answer = await send({**headers, "traceparent": traceparent})
    except BaseException as exc:
        _failed(span, type(exc).__name__)
        raise
    if isinstance(answer, int):
        span.set_attribute("http.response.status_code", answer)
    if isinstance(answer, int) and 200 <= answer < 300:
        span.end()
    else:  # for a client span any other answer is an error (the batch is sent again)
        _failed(span, str(answer))
    return answer
