"""Tracing's cost per message on the node's hot paths, off and on (in-process micro-benchmark).

Times, in one process with fakes (no sockets, no servers), the per-message code that carries
tracing hooks:

  deliver    ``Hub.deliver`` of a unicast notification to SESSIONS live sessions of one user
             (feed verdict, frame encoding, the write to a fake socket that takes everything);
  receive    the bus's NATS callback: decode a live notification, hand it to the router;
  store      build the JetStream publish (headers) of one message, as ``Store._round`` does.

Times are CPU seconds of this process (``time.process_time``: time spent descheduled on a busy
machine is not counted), best of ``--repeats``. ``--tracing off`` (default) is the shipped
default. To compare with a tree without the hooks,
run this file with ``PYTHONPATH=<that tree>`` (it prints which ``meshpush`` it imported).
``--tracing on`` traces every message into an SDK ``TracerProvider`` whose exporter drops
the spans (``meshpush[tracing]``), i.e. the cost of tracing at 100% sampling.

    meshpush bench tracing-overhead [--tracing off|on] [--messages 20000] [--sessions 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

import meshpush
from meshpush.backends import bus as bus_mod
from meshpush.backends import store as store_mod
from meshpush.backends.natswire import Msg
from meshpush.core.machine import Limits
from meshpush.observe.metrics import Metrics
from meshpush.server.hub import Hub
from meshpush.server.sessions import Context, Session
from meshpush.settings import Settings


class _Wire:
    """A socket that takes every frame at once."""

    def try_send(self, data: bytes) -> int:
        return len(data)


class _Feeder:
    def catch_up(self, *args: Any) -> None:
        raise AssertionError("a live feed in order never catches up")


def _note(seq: int, traced: bool) -> Any:
    note = bus_mod.Notification("user", "alice", seq, seq - 1, f"m{seq}", time.time(), '{"n":1}')
    if traced:
        from meshpush.observe import tracing

        note = tracing.received(note, {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"})
    return note


def _best(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


async def _deliver(messages: int, sessions: int, traced: bool) -> float:
    """Seconds per delivered message (one message to ``sessions`` sessions = one message)."""
    hub = Hub(Metrics("bench"))
    ctx = Context(Limits(), _Feeder(), Metrics("bench"))  # type: ignore[arg-type]
    for i in range(sessions):
        session = Session(ctx, "alice", f"d{i}", time.time() + 3600)
        session.wire = _Wire()  # type: ignore[assignment]
        for feed in session.feeds.values():
            feed.replaying = False
        hub.add(session)
    notes = [_note(seq, traced) for seq in range(1, messages + 1)]
    deliver = hub.deliver
    if traced:
        from meshpush.observe import tracing

        async def deliver(note: Any) -> int:
            return await tracing.deliver(hub.deliver, note, "bench")

    started = time.process_time()
    for note in notes:
        await deliver(note)
    return (time.process_time() - started) / messages


def _receive(messages: int, traced: bool) -> float:
    """Seconds per notification through the bus's NATS callback (decode, trace, hand over)."""
    settings = Settings(node_id="bench")
    bus = bus_mod.Bus(settings, None, Metrics("bench"))  # type: ignore[arg-type]
    on_message = bus._callback("user")
    head = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"} if traced else None
    msgs = [
        Msg(
            "mp.c.live.u.1",
            1,
            None,
            bus_mod.encode_notification(
                {"u": "alice", "s": i, "p": i - 1, "i": "m", "t": 1.0}, "1"
            ),
            head,
        )
        for i in range(1, messages + 1)
    ]
    drained = bus.inbound
    started = time.process_time()
    for i, msg in enumerate(msgs):
        on_message(msg)  # the link's reader calls it synchronously
        if i % 1000 == 999:
            _drain(drained)
    return (time.process_time() - started) / messages


def _drain(channel: Any) -> None:
    while True:
        try:
            channel.receive_nowait()
        except trio.WouldBlock:
            return


def _store(messages: int, traced: bool) -> float:
    """Seconds per JetStream publish built (``Outgoing`` -> headers), as a round does."""
    items = [store_mod.Outgoing("user", "alice", f"m{i}", "1") for i in range(messages)]
    if traced:
        from meshpush.observe import tracing

        state = tracing._state
        assert state is not None
        span = state.tracer.start_span("bench")
        items = [dataclasses.replace(i, trace=tracing.Trace(*state.child(span))) for i in items]
    build = store_mod._publish
    started = time.process_time()
    for item in items:
        build("mp.c.store.u.1.YWxpY2U", 7, item)
    return (time.process_time() - started) / messages


def _tracing_on() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from meshpush.observe import tracing

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    tracing.start(provider)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshpush bench tracing-overhead", description=__doc__)
    parser.add_argument("--tracing", choices=("off", "on"), default="off")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    traced = args.tracing == "on"
    if traced:
        _tracing_on()
    n = args.messages
    rows = {
        "deliver": _best(lambda: trio.run(_deliver, n, args.sessions, traced), args.repeats),
        "receive": _best(lambda: _receive(n, traced), args.repeats),
        "store": _best(lambda: _store(n, traced), args.repeats),
    }
    print(f"meshpush from {os.path.dirname(meshpush.__file__)}; tracing {args.tracing}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| path | µs per message (best of {args.repeats} runs of {n}) |")
    print("|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
