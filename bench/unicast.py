"""Durable unicast benchmark (issue 10): publish -> deliver through a 3-node dev cluster.

Phases, each with fresh users (so no replay of earlier phases):
  raw      raw JetStream publishes from one nats-py process, 256 in flight (the floor);
  single   one message per HTTP request (32 keep-alive connections per generator, each
           request's answer awaited before the connection's next request);
  batch    POST /v1/publish/batch with BATCH messages per request (4 connections);
each of single/batch at the maximum rate, then paced at half the rate it reached.
Load generators (raw keep-alive HTTP/1.1 sockets in a selector loop; ``--generator sdk`` uses
the publisher SDK on httpx instead) and receivers (USERS sessions on raw sockets, one epoll
loop per process, bench/_leanrecv.py: redirect, welcome, chain check, acks; ``--receiver sdk``
uses the trio client SDK instead) run in separate processes; every process's CPU is
reported. Latency = receive time - the send time carried in the message (one machine,
CLOCK_MONOTONIC is system-wide). Node CPU per message = CPU of the 3 node processes during the
phase / messages delivered; ``nats`` = the same for the nats-server process.

    meshpush bench unicast [--messages 20000] [--users 50] [--only single|batch]
                           [--generator lean|sdk] [--receiver lean|sdk] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import queue
import selectors
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from bench import _hops
from bench._leanrecv import lean_receiver
from bench._procs import tune_gc
from bench._stats import pct
from bench._targets import cpu_seconds, machine, write_json
from meshpush.client import ACK_INTERVAL, Client
from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster
from meshpush.publisher import AsyncPublisher, Message, Published

GENERATORS = 2
#: seconds between spawning the generators and their first request (all spawned and
#: connected by then, so their schedules interleave as :func:`schedules` sets them)
START_MARGIN = 1.5
RECEIVERS = 2
# ---------------------------------------------------------------- processes


def raw_jetstream(nats_url: str, n: int, inflight: int, out: Any) -> None:
    """The floor: n JetStream publishes (acked) from one nats-py process."""
    import nats

    async def go() -> float:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await js.add_stream(name="BENCHRAW", subjects=["benchraw.>"])
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with sem:
                await js.publish(f"benchraw.{i % 50}", b'{"t":1.0}')

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
        await nc.close()
        return n / elapsed

    cpu = time.process_time()
    rate = asyncio.run(go())
    out.put({"rate": rate, "cpu": time.process_time() - cpu})


def receiver(
    ws_urls: list[str], secret: str, users: list[str], expected: int, ack_interval: float, out: Any
) -> None:
    """Connect one client per user; report latencies once ``expected`` messages arrived."""

    hops = _hops.start("receiver")

    async def go() -> dict[str, Any]:
        latencies: list[float] = []
        numbers: list[int] = []
        done = trio.Event()
        times: list[float] = []
        async with trio.open_nursery() as nursery:
            if hops:
                nursery.start_soon(_hops.lag_monitor)

            async def consume(client: Client) -> None:
                async for msg in client:
                    now = time.monotonic()
                    latencies.append(now - msg.data["t"])
                    numbers.append(msg.data["n"])
                    times.append(now)
                    if hops:
                        _hops.record("send", msg.data["n"], msg.data["t"])
                        _hops.record("handler", msg.data["n"], now)
                    if len(numbers) >= expected:
                        done.set()

            clients = []
            for user in users:

                async def token(user: str = user) -> str:
                    return issue_token(secret, user, 3600)

                client = Client(ws_urls, token=token, device="bench", ack_interval=ack_interval)
                if hops:
                    _trace_reads(client)
                clients.append(client)
                nursery.start_soon(client.run)
                nursery.start_soon(consume, client)
            with trio.fail_after(60):
                for c in clients:
                    await c.wait_online()
            tune_gc()
            out.put({"ready": os.getpid()})
            cpu = time.process_time()
            with trio.move_on_after(120):
                await done.wait()
            cpu = time.process_time() - cpu
            nursery.cancel_scope.cancel()
        last = max(times) if times else 0.0
        return {
            "latencies": latencies,
            "numbers": numbers,
            "last": last,
            "cpu": cpu,
            "pid": os.getpid(),
        }

    out.put(trio.run(go))


def _trace_reads(client: Client) -> None:
    """Record when the SDK parsed each msg frame (before its channel to the application)."""
    on_message = client._on_message

    async def traced(f: dict[str, Any]) -> None:
        data = f.get("data")
        if isinstance(data, dict):
            _hops.record("read", data.get("n", -1))
        await on_message(f)

    client._on_message = traced  # type: ignore[method-assign]


@dataclass
class Load:
    http_urls: list[str]
    api_key: str
    users: list[str]
    first: int  # message numbers [first, first + count)
    count: int
    rate: float  # messages per second for this generator; 0 = as fast as possible
    batch: int  # 1 = single publishes
    concurrency: int
    #: when the first request is due (``time.monotonic``, system-wide); 0 = once connected.
    #: Paced generators start a fraction of a period apart so their requests interleave
    #: (:func:`schedules`): in phase, every generator's k-th request would arrive together.
    start_at: float = 0.0


def generator(load: Load, out: Any) -> None:
    """Publish ``load.count`` messages over raw keep-alive HTTP/1.1 connections.

    One request per chunk (one message for single publishes), ``load.concurrency``
    connections spread over the nodes, each with one request in flight whose answer is
    awaited (and checked: 202, and no per-item error in a batch) before its next request. A
    selector loop over plain sockets: ~0.1 ms of CPU per request, against ~1.3 ms for httpx
    (docs/performance.md), so the generator is not what limits the rate.

    Single publishes are user-affine: each user's messages go through one node (as a backend
    that shards its publishers by user would), so two nodes never race on one user's chain (a
    race costs a ``wrong last sequence`` retry round; docs/performance.md). Batches all go to
    the first node, as the publisher SDK sends them: a batch then spans every user, so it
    needs the fewest rounds (one per message of its most frequent user)."""
    urls = load.http_urls if load.batch == 1 else load.http_urls[:1]
    hops = _hops.start("generator")
    tune_gc()
    cpu = time.process_time()
    errors, start = _lean_load(load, urls, _affine_chunks(load, len(urls)), hops)
    out.put(
        {
            "errors": errors,
            "start": start,
            "end": time.monotonic(),
            "cpu": time.process_time() - cpu,
            "pid": os.getpid(),
        }
    )


def _affine_chunks(load: Load, nodes: int) -> list[tuple[int, list[int]]]:
    """(node index, message numbers) per request: message i goes to user i % users and
    through node crc32(user) % nodes; chunks of the nodes interleave."""
    per_node: list[list[int]] = [[] for _ in range(nodes)]
    for i in range(load.first, load.first + load.count):
        user = load.users[i % len(load.users)]
        per_node[zlib.crc32(user.encode()) % nodes].append(i)
    split = [
        [(n, ns[j : j + load.batch]) for j in range(0, len(ns), load.batch)]
        for n, ns in enumerate(per_node)
    ]
    longest = max(len(chunks) for chunks in split)
    return [chunks[j] for j in range(longest) for chunks in split if j < len(chunks)]


def _request(load: Load, chunk: list[int], host: str) -> bytes:
    t = time.monotonic()
    if load.batch == 1:
        i = chunk[0]
        path = "/v1/publish"
        body: dict[str, Any] = {"user": load.users[i % len(load.users)], "data": {"t": t, "n": i}}
    else:
        path, body = "/v1/publish/batch", {"messages": [_item(load, i, t) for i in chunk]}
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {load.api_key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def _item(load: Load, i: int, t: float) -> dict[str, Any]:
    """A message: user i % users; its data carries the send time and its number."""
    return {"user": load.users[i % len(load.users)], "data": {"t": t, "n": i}}


def _answer(buf: bytearray) -> tuple[int, bytes] | None:
    """(status, body) of the first complete response in ``buf`` (removed from it), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"content-length:")
    length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    return int(head[9:12]), body


def _failed(status: int, body: bytes, batch: int) -> int:
    if status != 202:
        return batch
    if batch == 1:
        return 0
    return sum("error" in r for r in json.loads(body)["results"])


#: paced phases are open-loop: a request due while every connection to its node is busy
#: gets a new connection (up to this many per generator) instead of waiting for one, so no
#: request is sent late and no backlog leaves in a burst (closed-loop pacing did both: sends
#: up to 0.3 s late, then a burst of them, at 990 msg/s; docs/performance.md)
OPEN_LOOP_CONNECTIONS = 256


def _started(load: Load) -> float:
    """Sleep until ``load.start_at`` (if still ahead); the start of the generator's schedule.
    A generator ready too late keeps its phase (its first requests are then due at once)."""
    ahead = load.start_at - time.monotonic()
    if load.start_at and ahead < -0.05:
        print(
            f"generator ready {-ahead:.2f} s after its start: raise START_MARGIN", file=sys.stderr
        )
    time.sleep(max(0.0, ahead))
    return load.start_at or time.monotonic()


def schedules(generators: int, batch: int, rate: float, margin: float) -> list[float]:
    """Each generator's ``start_at``: ``margin`` s from now (every process spawned and
    connected by then), generator g a ``g / generators`` of its period later (its period is
    ``generators * batch / rate``), so together they send one request every ``batch / rate``
    s rather than ``generators`` requests at once."""
    t0 = time.monotonic() + margin
    return [t0 + (g * batch / rate if rate else 0.0) for g in range(generators)]


def _connect(url: str) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock, parts.netloc


def _lean_load(
    load: Load, urls: list[str], chunks: list[tuple[int, list[int]]], hops: bool = False
) -> tuple[int, float]:
    """The selector loop: (errors, start time). Chunk k is due at ``k * batch / rate``."""
    sel = selectors.DefaultSelector()
    nodes = len(urls)
    socks = [
        _connect(urls[i % nodes]) for i in range(max(nodes, min(load.concurrency, len(chunks))))
    ]
    node_of = [i % nodes for i in range(len(socks))]
    # FIFO per node: every connection stays warm (the node closes idle ones)
    idle = [collections.deque(range(n, len(socks), nodes)) for n in range(nodes)]
    queues: list[collections.deque[tuple[int, list[int]]]] = [collections.deque() for _ in idle]
    for k, (node, numbers) in enumerate(chunks):
        queues[node].append((k, numbers))
    bufs = [bytearray() for _ in socks]
    sizes = [0] * len(socks)
    errors, pending, deadline = 0, 0, time.monotonic() + 600

    def free(node: int) -> int | None:
        """An idle connection to ``node``; a new one when pacing and every one is busy."""
        if idle[node]:
            return idle[node].popleft()
        if not load.rate or len(socks) >= OPEN_LOOP_CONNECTIONS:
            return None
        socks.append(_connect(urls[node]))
        node_of.append(node)
        bufs.append(bytearray())
        sizes.append(0)
        return len(socks) - 1

    start = _started(load)
    while (any(queues) or pending) and time.monotonic() < deadline:
        now = time.monotonic()
        for node in range(nodes):
            while queues[node]:
                k, numbers = queues[node][0]
                if load.rate and start + k * load.batch / load.rate > now:
                    break
                c = free(node)
                if c is None:
                    break
                queues[node].popleft()
                if hops and load.rate:  # when it was due
                    for n in numbers:
                        _hops.record("due", n, start + k * load.batch / load.rate)
                sock, host = socks[c]
                sock.setblocking(True)
                sock.sendall(_request(load, numbers, host))
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, c)
                sizes[c], pending = len(numbers), pending + 1
        due = [start + q[0][0] * load.batch / load.rate for q in queues if q] if load.rate else []
        wait = max(0.0005, min(due) - time.monotonic()) if due else 1.0
        for key, _ in sel.select(min(wait, 1.0)):
            c = key.data
            data = socks[c][0].recv(262144)
            if not data:
                raise RuntimeError("the node closed a keep-alive connection")
            bufs[c] += data
            answer = _answer(bufs[c])
            if answer is not None:
                errors += _failed(*answer, sizes[c])
                sel.unregister(socks[c][0])
                idle[node_of[c]].append(c)
                pending -= 1
    errors += sum(len(numbers) for queue in queues for _, numbers in queue)
    for sock, _ in socks:
        sock.close()
    return errors, start


def sdk_generator(load: Load, out: Any) -> None:
    """Publish ``load.count`` messages with the publisher SDK (asyncio)."""

    async def go() -> dict[str, Any]:
        errors = 0
        sem = asyncio.Semaphore(load.concurrency)
        # several small pools: httpcore's pool scans all its connections per request, so one
        # pool of 64 costs the generator far more CPU than 8 pools of 8
        pubs = [
            AsyncPublisher(load.http_urls, load.api_key, max_connections=8)
            for _ in range(max(1, load.concurrency // 8))
        ]
        numbers = range(load.first, load.first + load.count)
        chunks = [numbers[i : i + load.batch] for i in range(0, len(numbers), load.batch)]

        async def send(chunk: range, pub: AsyncPublisher) -> None:
            nonlocal errors
            try:
                items = [_item(load, i, time.monotonic()) for i in chunk]
                if load.batch == 1:
                    await pub.publish(items[0]["user"], items[0]["data"])
                else:
                    results = await pub.publish_many([Message(m["user"], m["data"]) for m in items])
                    errors += sum(not isinstance(r, Published) for r in results)
            except Exception:
                errors += len(chunk)
            finally:
                sem.release()

        start = _started(load)
        tasks = []
        for k, chunk in enumerate(chunks):
            if load.rate:
                await asyncio.sleep(max(0.0, start + k * load.batch / load.rate - time.monotonic()))
            await sem.acquire()
            tasks.append(asyncio.create_task(send(chunk, pubs[k % len(pubs)])))
        await asyncio.gather(*tasks)
        for pub in pubs:
            await pub.aclose()
        return {"errors": errors, "start": start, "end": time.monotonic()}

    cpu = time.process_time()
    result = asyncio.run(go())
    out.put({**result, "cpu": time.process_time() - cpu, "pid": os.getpid()})


# ---------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    messages: int
    delivered: int = 0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    node_cpu_ms_per_msg: float = 0.0
    nats_cpu_ms_per_msg: float = 0.0  # the nats-server process(es)
    generator_cpu_s: list[float] = field(default_factory=list)
    receiver_cpu_s: list[float] = field(default_factory=list)
    errors: int = 0
    missing: int = 0  # message numbers never received
    duplicates: int = 0  # message numbers received more than once
    chain_breaks: int = 0  # msgs whose prev was not the seq before (lean receivers count them)
    #: batch phases: each request's first and last message delivered (ms; p50/p99 of each)
    per_request: dict[str, float] = field(default_factory=dict)
    load_average: float = 0.0
    hops: dict[str, Any] = field(default_factory=dict)  # --hops: the per-hop breakdown


def spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out), daemon=True)
    proc.start()
    return proc, out


def collect(out: Any, timeout: float) -> dict[str, Any]:
    try:
        result: dict[str, Any] = out.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError("a benchmark process did not report in time") from None
    if "error" in result:  # the process failed and said why
        raise RuntimeError(result["error"])
    return result


def _pct_ms(values: list[float], q: float) -> float:
    return pct(values, q) * 1000 if values else float("nan")


@dataclass(frozen=True)
class Apparatus:
    """How a phase loads and reads: the generators (lean raw sockets, or the publisher SDK),
    the receivers (lean raw sockets, ``bench._leanrecv``, or the trio client SDK), their ack
    interval, and where per-hop records go (``--hops``)."""

    sdk_generator: bool = False
    sdk_receiver: bool = False
    ack_interval: float = ACK_INTERVAL
    hops: Path | None = None


def run_phase(
    cluster: LocalCluster,
    name: str,
    messages: int,
    users: int,
    batch: int,
    rate: float,
    apparatus: Apparatus = Apparatus(),
) -> Phase:
    since = time.monotonic()
    names = [f"{name}-{i}" for i in range(users)]
    ws = [n.ws_url for n in cluster.live()]
    receivers = []
    read = receiver if apparatus.sdk_receiver else lean_receiver
    for r in range(RECEIVERS):
        mine = names[r::RECEIVERS]
        expected = sum(1 for i in range(messages) if i % users % RECEIVERS == r)
        receivers.append(
            spawn(read, ws, cluster.token_secret, mine, expected, apparatus.ack_interval)
        )
    for _, out in receivers:
        collect(out, 90)  # online
    http = [n.http_url for n in cluster.live()]
    per_gen = messages // GENERATORS
    pids = [n.proc.pid for n in cluster.live()]
    nats = [m.proc.pid for m in cluster.nats_members if m.proc is not None]
    cpu_before = sum(cpu_seconds(p) for p in pids)
    nats_before = sum(cpu_seconds(p) for p in nats)
    gens = []
    starts = schedules(GENERATORS, batch, rate, START_MARGIN)
    for g in range(GENERATORS):
        count = per_gen if g < GENERATORS - 1 else messages - per_gen * g
        concurrency = 32 if batch == 1 else 4
        load = Load(
            http,
            cluster.api_key,
            names,
            g * per_gen,
            count,
            rate / GENERATORS,
            batch,
            concurrency,
            starts[g],
        )
        gens.append(spawn(sdk_generator if apparatus.sdk_generator else generator, load))
    gen_results = [collect(out, 600) for _, out in gens]
    rec_results = [collect(out, 180) for _, out in receivers]
    node_cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
    nats_cpu = sum(cpu_seconds(p) for p in nats) - nats_before
    for proc, _ in gens + receivers:
        proc.join(10)
    latencies = [x for r in rec_results for x in r["latencies"]]
    delivered = [
        (n, x) for r in rec_results for n, x in zip(r["numbers"], r["latencies"], strict=True)
    ]
    received = collections.Counter(n for r in rec_results for n in r["numbers"])
    if apparatus.hops is not None:
        time.sleep(0.5)  # the processes' last records flushed
    start = min(g["start"] for g in gen_results)
    last = max(r["last"] for r in rec_results)
    return Phase(
        name=name,
        messages=messages,
        delivered=len(latencies),
        rate=len(latencies) / max(last - start, 1e-9),
        p50_ms=_pct_ms(latencies, 0.5),
        p99_ms=_pct_ms(latencies, 0.99),
        p999_ms=_pct_ms(latencies, 0.999),
        node_cpu_ms_per_msg=node_cpu / max(len(latencies), 1) * 1000,
        nats_cpu_ms_per_msg=nats_cpu / max(len(latencies), 1) * 1000,
        generator_cpu_s=[round(g["cpu"], 2) for g in gen_results],
        receiver_cpu_s=[round(r["cpu"], 2) for r in rec_results],
        errors=sum(g["errors"] for g in gen_results),
        missing=sum(1 for i in range(messages) if i not in received),
        duplicates=sum(c - 1 for c in received.values() if c > 1),
        chain_breaks=sum(r.get("chain_breaks", 0) for r in rec_results),
        per_request=request_spread(delivered, per_gen, batch) if batch > 1 else {},
        load_average=os.getloadavg()[0],
        hops=_hops.breakdown(apparatus.hops, since) if apparatus.hops is not None else {},
    )


def request_spread(
    delivered: list[tuple[int, float]], per_gen: int, batch: int
) -> dict[str, float]:
    """p50/p99 (ms) of each request's first and of its last message delivered: how long a
    request's fixed path takes, and how far its burst spreads. Message ``n`` was sent by
    generator ``n // per_gen`` (the last one takes the rest), in requests of ``batch``
    consecutive numbers from its first."""
    requests: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    for n, latency in delivered:
        g = min(n // per_gen, GENERATORS - 1)
        requests[(g, (n - g * per_gen) // batch)].append(latency)
    firsts = [min(v) for v in requests.values()]
    lasts = [max(v) for v in requests.values()]
    return {
        "requests": len(requests),
        "first_p50_ms": _pct_ms(firsts, 0.5),
        "first_p99_ms": _pct_ms(firsts, 0.99),
        "last_p50_ms": _pct_ms(lasts, 0.5),
        "last_p99_ms": _pct_ms(lasts, 0.99),
    }


def run(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    proc, out = spawn(raw_jetstream, cluster.nats_url, args.messages, 256)
    raw = collect(out, 300)
    proc.join(10)
    phases: list[Phase] = []
    kinds = [k for k in (("single", 1), ("batch", args.batch)) if args.only in (None, k[0])]
    apparatus = Apparatus(
        sdk_generator=args.generator == "sdk",
        sdk_receiver=args.receiver == "sdk",
        ack_interval=args.ack_interval,
        hops=_hops_folder() if args.hops else None,
    )
    for kind, batch in kinds:
        n = args.messages if batch > 1 else args.single_messages
        if args.half_rate:  # the half phase only, at a given rate (before/after comparisons)
            rate = args.half_rate
        else:
            top = run_phase(cluster, f"{kind}-max", n, args.users, batch, 0.0, apparatus)
            phases.append(top)
            rate = top.rate / 2
        phases.append(
            run_phase(cluster, f"{kind}-half", n // 2, args.users, batch, rate, apparatus)
        )
    return {
        "raw_jetstream_rate": raw["rate"],
        "raw_jetstream_cpu_s": raw["cpu"],
        "phases": [asdict(p) for p in phases],
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "parameters": vars(args) | {"json": str(args.json)},
        "machine": machine(),
    }


def _hops_folder() -> Path:
    """Where every process records its hops (``bench/_hops.py``); set before the cluster."""
    folder = Path(os.environ[_hops.ENV])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _with_hops(folder: Path) -> None:
    """Ask every process started from now on (nodes included) to record its hops."""
    os.environ.setdefault(_hops.ENV, str(folder))  # set by hand: kept after the run
    site = str(_hops.site_dir(Path(os.environ[_hops.ENV])))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (site, os.environ.get("PYTHONPATH", "")) if p
    )


def table(report: dict[str, Any]) -> str:
    raw = report["raw_jetstream_rate"]
    lines = [
        f"raw JetStream publishes/s from one nats-py process (floor): {raw:,.0f}"
        f"  (cpu {report['raw_jetstream_cpu_s']:.1f} s)",
        f"{'phase':<12}{'msgs':>7}{'msg/s':>9}{'x raw':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'p999 ms':>9}{'node ms/msg':>12}{'nats':>6}{'errors':>7}  gen cpu s / recv cpu s"
        "   load",
    ]
    for p in report["phases"]:
        lines.append(
            f"{p['name']:<12}{p['delivered']:>7}{p['rate']:>9,.0f}{p['rate'] / raw:>7.2f}"
            f"{p['p50_ms']:>8.1f}{p['p99_ms']:>8.1f}{p['p999_ms']:>9.1f}"
            f"{p['node_cpu_ms_per_msg']:>12.3f}{p['nats_cpu_ms_per_msg']:>6.3f}{p['errors']:>7}"
            f"  {p['generator_cpu_s']} / "
            f"{p['receiver_cpu_s']}  {p['load_average']:.1f}"
        )
        if p["missing"] or p["duplicates"] or p["chain_breaks"]:
            lines.append(
                f"  !! {p['missing']} missing, {p['duplicates']} duplicated,"
                f" {p['chain_breaks']} chain breaks"
            )
        if p["per_request"]:
            r = p["per_request"]
            lines.append(
                f"  {r['requests']:.0f} requests: first message p50 {r['first_p50_ms']:.1f} /"
                f" p99 {r['first_p99_ms']:.1f} ms, last p50 {r['last_p50_ms']:.1f} /"
                f" p99 {r['last_p99_ms']:.1f} ms"
            )
        if p["hops"]:
            lines.append(_hops.text(p["hops"]))
    lines.append(
        f"{report['cores']} cores shared by 3 nodes, NATS, etcd, {GENERATORS} generators and "
        f"{RECEIVERS} receivers; load average at the end {report['load_average'][0]:.1f}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshpush bench unicast", description=__doc__)
    parser.add_argument("--messages", type=int, default=20000, help="per batch phase and raw")
    parser.add_argument("--single-messages", type=int, default=6000, help="per single phase")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--batch", type=int, default=200, help="messages per batch request")
    parser.add_argument("--only", choices=["single", "batch"], help="run one kind of phase")
    parser.add_argument(
        "--generator",
        choices=["lean", "sdk"],
        default="lean",
        help="load generator: raw keep-alive sockets (lean) or the publisher SDK (httpx)",
    )
    parser.add_argument(
        "--receiver",
        choices=["lean", "sdk"],
        default="lean",
        help="receivers: raw sockets on epoll (lean: bench/_leanrecv.py) or the trio client SDK",
    )
    parser.add_argument(
        "--hops",
        action="store_true",
        help="record per-hop timestamps, GC pauses and loop lags in every process (diagnosis)",
    )
    parser.add_argument(
        "--half-rate", type=float, default=0.0, help="run only the paced phase, at this rate"
    )
    parser.add_argument(
        "--ack-interval",
        type=float,
        default=ACK_INTERVAL,
        help="the receivers' seconds between ack frames (the client SDK's ack_interval)",
    )
    parser.add_argument("--json", type=Path, default=Path(".meshpush/bench/unicast.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hops:
            _with_hops(Path(tmp) / "hops")
        return _run_and_print(args, Path(tmp))


def _run_and_print(args: argparse.Namespace, tmp: Path) -> int:
    (tmp / "cluster").mkdir()
    with (
        LocalCluster(tmp / "cluster", nodes=3, cluster="bench") as cluster,
    ):
        report = run(cluster, args)
    print(table(report))
    write_json(args.json, report)
    complete = all(
        p["delivered"] == p["messages"]
        and not (p["errors"] or p["missing"] or p["duplicates"] or p["chain_breaks"])
        for p in report["phases"]
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
