"""Opt-in per-hop timestamps for ``meshpush bench unicast --hops`` (diagnosis only).

Every process of the bench (nodes, generators, receivers) appends ``[hop, n, t]`` records
(``n`` the bench's message number carried in the data, ``t`` = ``time.monotonic()``, which is
system-wide) to ``$MESHPUSH_BENCH_HOPS/<role>-<pid>.jsonl``, flushed by a thread every 0.2 s;
plus ``["gc", generation, t, seconds]`` for every collection and ``["lag", 0, t, seconds]``
for every trio wake-up later than 1 ms (nodes and receivers).

In the nodes it is installed by a ``sitecustomize`` the bench writes (:func:`site_dir`):
it wraps, without changing them, the functions a message passes through — the API's body
parse (``http``), each JetStream round (``round`` sent / ``acked`` answered), the live
notification (``notify``: with JetStream's republish, where the publishing node would have
sent it), its arrival on the owner (``owner``), the hub's fan-out
(``hub`` in / ``written`` out). Nothing here runs unless the bench asks for it.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

ENV = "MESHPUSH_BENCH_HOPS"
_N = re.compile(rb'"n":\s*(\d+)')
_records: list[list[Any]] = []
_lock = threading.Lock()
_path: Path | None = None


def record(hop: str, n: int, t: float | None = None) -> None:
    _records.append([hop, n, time.monotonic() if t is None else t])


def n_of(raw: bytes | str) -> int:
    m = _N.search(raw.encode() if isinstance(raw, str) else raw)
    return int(m.group(1)) if m else -1


def _flush() -> None:
    global _records
    with _lock:
        batch, _records = _records, []
        if batch and _path is not None:
            with _path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in batch))


def _flusher() -> None:
    while True:
        time.sleep(0.2)
        _flush()


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    global _gc_start
    if phase == "start":
        _gc_start = time.perf_counter()
    else:
        _records.append(
            ["gc", info["generation"], time.monotonic(), time.perf_counter() - _gc_start]
        )


_gc_start = 0.0


async def lag_monitor(interval: float = 0.005) -> None:
    """Record every trio wake-up more than 1 ms late (``["lag", 0, t, seconds]``)."""
    import trio

    while True:
        due = time.monotonic() + interval
        await trio.sleep(interval)
        late = time.monotonic() - due
        if late > 0.001:
            _records.append(["lag", 0, time.monotonic(), late])


def start(role: str) -> bool:
    """Start recording in this process if the bench asked for it (``$MESHPUSH_BENCH_HOPS``)."""
    global _path
    folder = os.environ.get(ENV)
    if not folder or _path is not None:
        return _path is not None
    _path = Path(folder) / f"{role}-{os.getpid()}.jsonl"
    gc.callbacks.append(_gc_callback)
    threading.Thread(target=_flusher, daemon=True).start()
    atexit.register(_flush)
    return True


# ---------------------------------------------------------------- the node's hops


def install_node() -> None:
    """Wrap the node's functions on a message's path (called from the sitecustomize)."""
    import trio

    from meshpush.backends import bus, pipeline, store
    from meshpush.server import api, hub, node

    read_json = api.read_json

    async def timed_read_json(*args: Any, **kwargs: Any) -> Any:
        body = await read_json(*args, **kwargs)
        t = time.monotonic()
        items = body.get("messages") if isinstance(body, dict) else None
        for item in items if isinstance(items, list) else [body]:
            data = item.get("data") if isinstance(item, dict) else None
            if isinstance(data, dict) and isinstance(data.get("n"), int):
                record("http", data["n"], t)
        return body

    api.read_json = timed_read_json

    def stamp_items(hop: str, method: Any, items_at: int = 0) -> Any:
        """``method`` wrapped: records ``hop`` for every Outgoing of its argument first."""

        async def stamped(self: Any, *args: Any) -> Any:
            t = time.monotonic()
            for item in args[items_at]:
                record(hop, n_of(item.data_json), t)
            return await method(self, *args)

        return stamped

    # a request's merged batch starts (small requests share a TrioGroupCommit lane), then
    # each user's chain starts when it is the batch's turn on that user (Store._start); no
    # asyncio side since the store publishes on the trio NATS link (meshpush/backends/natslink.py)
    store.Store._publish_all = stamp_items("cross", store.Store._publish_all)  # type: ignore[method-assign]
    store.Store._publish_atomic = stamp_items("cross", store.Store._publish_atomic)  # type: ignore[method-assign]
    start_chain = store.Store._start

    def timed_start(self: Any, subject: str, chain: Any, items: list[Any]) -> None:
        t = time.monotonic()
        for i in chain.indexes:
            record("locked", n_of(items[i].data_json), t)
        start_chain(self, subject, chain, items)

    store.Store._start = timed_start  # type: ignore[method-assign]

    def timed(send: Any) -> Any:
        """A store's JetStream send (a round, or an atomic batch) recording round/acked."""

        async def sent(link: Any, publishes: list[Any], timeout: float, *more: Any) -> Any:
            ns = [n_of(p.payload) for p in publishes]
            t = time.monotonic()
            for n in ns:
                record("round", n, t)
            answers = await send(link, publishes, timeout, *more)
            t = time.monotonic()
            for n in ns:
                record("acked", n, t)
            return answers

        return sent

    # the store calls them by their own names: patched there
    store.publish_round = timed(pipeline.publish_round)  # type: ignore[attr-defined]
    store.publish_batch = timed(pipeline.publish_batch)  # type: ignore[attr-defined]

    notify = store.Store._notify

    def timed_notify(self: Any, item: Any, stored: Any) -> None:
        record("notify", n_of(item.data_json))
        notify(self, item, stored)

    store.Store._notify = timed_notify  # type: ignore[method-assign]

    decode = bus.decode_notification

    def timed_decode(ch: str, payload: bytes) -> Any:
        note = decode(ch, payload)
        record("owner", n_of(note.data_json))
        return note

    bus.decode_notification = timed_decode

    decode_republished = bus.decode_republished  # a unicast JetStream republished

    def timed_decode_republished(subject: str, block: Any, payload: bytes) -> Any:
        note = decode_republished(subject, block, payload)
        record("owner", n_of(note.data_json))
        return note

    bus.decode_republished = timed_decode_republished

    deliver_many = hub.Hub.deliver_many

    async def timed_deliver_many(self: Any, notes: Any, *more: Any) -> Any:
        ns = [n_of(n.data_json) for n in notes]
        t = time.monotonic()
        for n in ns:
            record("hub", n, t)
        sent = await deliver_many(self, notes, *more)
        t = time.monotonic()
        for n in ns:
            record("written", n, t)
        return sent

    hub.Hub.deliver_many = timed_deliver_many  # type: ignore[method-assign,assignment]

    run = node.Node.run

    async def run_with_lag(self: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lag_monitor)
            try:
                await run(self, task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()

    node.Node.run = run_with_lag  # type: ignore[method-assign]


SITECUSTOMIZE = """\
import os, sys
if os.environ.get({env!r}) and sys.orig_argv[-3:] == ["-m", "meshpush", "node"]:
    sys.path.insert(0, {root!r})
    try:
        from bench import _hops
        if True:
            if _hops.start("node"):
                _hops.install_node()
    except Exception as exc:  # diagnosis only: never stop a node
        print("bench hops not installed:", repr(exc), file=sys.stderr)
"""


def site_dir(folder: Path) -> Path:
    """A folder with a ``sitecustomize.py`` that installs the node hooks (put it on
    PYTHONPATH of the nodes, with ``$MESHPUSH_BENCH_HOPS`` set)."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parent.parent)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(env=ENV, root=root))
    return site


# ---------------------------------------------------------------- analysis

#: the hops in the order a message passes them (send = the time carried in the message)
ORDER = [
    "due",
    "send",
    "http",
    "cross",
    "locked",
    "round",
    "acked",
    "notify",
    "owner",
    "hub",
    "written",
    "read",
    "handler",
]


def load(folder: Path, since: float) -> tuple[dict[str, dict[int, float]], list[list[Any]]]:
    """Per hop: message number -> time (the last one recorded); and the gc/lag records (with
    the file's role first), all from ``since`` on."""
    hops: dict[str, dict[int, float]] = {h: {} for h in ORDER}
    other: list[list[Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        role = path.name.split("-")[0]
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r[2] < since:
                continue
            if r[0] in ("gc", "lag"):
                other.append([role, *r])
            elif r[0] in hops:
                hops[r[0]][r[1]] = r[2]
    return hops, other


def breakdown(folder: Path, since: float) -> dict[str, Any]:
    """p50/p99 (ms) of each hop-to-hop interval, of GC pauses and loop lags per role."""
    from bench._stats import pct

    hops, other = load(folder, since)
    out: dict[str, Any] = {"hops": {}, "gc": {}, "lag": {}}
    present = [h for h in ORDER if hops[h]]
    for a, b in itertools.pairwise(present):
        deltas = [hops[b][n] - t for n, t in hops[a].items() if n in hops[b]]
        if deltas:
            out["hops"][f"{a}->{b}"] = _summary(deltas, pct)
    for a, b in (("send", "handler"), ("due", "handler")):  # end to end
        deltas = [hops[b][n] - t for n, t in hops[a].items() if n in hops[b]]
        if deltas:
            out["hops"][f"{a}->{b} (all)"] = _summary(deltas, pct)
    sent = hops["due"] or hops["send"]  # GC pauses and lags while messages were under way
    first = min(sent.values(), default=since)
    other = [r for r in other if r[3] >= first]
    for kind in ("gc", "lag"):
        # GC pauses per role and generation ("node gen2"), loop lags per role
        roles = sorted({(r[0], r[2] if kind == "gc" else -1) for r in other if r[1] == kind})
        for role, gen in roles:
            values = [
                r[4]
                for r in other
                if r[1] == kind and (r[0], r[2] if kind == "gc" else -1) == (role, gen)
            ]
            if gen >= 0:
                role = f"{role} gen{gen}"
            out[kind][role] = {
                **_summary(values, pct),
                "count": len(values),
                "total_ms": round(sum(values) * 1000, 1),
            }
    return out


def _summary(values: list[float], pct: Any) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(pct(values, 0.5) * 1000, 2),
        "p99_ms": round(pct(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


def text(result: dict[str, Any]) -> str:
    lines = [f"  {'hop':<18}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for name, s in result["hops"].items():
        lines.append(
            f"  {name:<18}{s['n']:>7}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}"
        )
    for kind in ("gc", "lag"):
        for role, s in result[kind].items():
            lines.append(
                f"  {kind} {role:<15}{s['count']:>7}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
                f"{s['max_ms']:>9.2f}  total {s['total_ms']} ms"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench._hops FOLDER [SINCE]
    print(text(breakdown(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)))
