"""``bench/unicast.py``'s load generator and ``bench/_hops.py``'s breakdown (no cluster).

Behaviour only: the paced generator is open-loop (a due request never waits for a busy
connection), every message is sent once, and the per-hop breakdown joins hops by message
number. Speed is what the benchmark reports, never asserted here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import _hops, _leanrecv
from bench._wsload import take_frames
from bench.unicast import Load, _affine_chunks, _lean_load, _started, request_spread, schedules


class SlowApi:
    """An HTTP/1.1 stub on 127.0.0.1 answering every request 202 after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self.numbers: list[int] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = json.loads(buf[:length]), buf[length:]
                self.numbers.append(body["data"]["n"])
                time.sleep(self.delay)
                conn.sendall(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}")


@pytest.fixture
def api() -> Iterator[SlowApi]:
    server = SlowApi(delay=0.2)
    yield server
    server.sock.close()


def _load(url: str, rate: float) -> Load:
    return Load([url], "key", ["u0", "u1"], first=0, count=20, rate=rate, batch=1, concurrency=2)


def test_paced_load_opens_connections_instead_of_sending_late(api: SlowApi) -> None:
    """Answers take 0.2 s and 2 connections are open; at 100 msg/s each due request gets a
    new connection rather than waiting for a busy one to answer."""
    load = _load(api.url, rate=100.0)
    errors, _ = _lean_load(load, [api.url], _affine_chunks(load, 1))
    assert errors == 0
    assert sorted(api.numbers) == list(range(20))  # each message sent exactly once
    assert api.connections > 2


def test_unpaced_load_keeps_its_connections(api: SlowApi) -> None:
    load = _load(api.url, rate=0.0)
    errors, _ = _lean_load(load, [api.url], _affine_chunks(load, 1))
    assert errors == 0
    assert sorted(api.numbers) == list(range(20))
    assert api.connections == 2


def test_paced_generators_interleave_instead_of_sending_together() -> None:
    """Two generators at 25 requests/s each start 20 ms apart: together one request every
    20 ms (in phase, both k-th requests would be due at once)."""
    first, second = schedules(2, batch=200, rate=10_000.0, margin=1.0)
    assert second - first == pytest.approx(0.02)
    assert first == pytest.approx(time.monotonic() + 1.0, abs=0.1)
    unpaced = schedules(2, batch=200, rate=0.0, margin=1.0)
    assert unpaced[0] == unpaced[1]


def test_a_generator_waits_for_its_start_and_keeps_its_phase_when_late(
    capsys: pytest.CaptureFixture[str],
) -> None:
    soon = time.monotonic() + 0.05
    load = Load(["http://127.0.0.1:9"], "key", ["u0"], 0, 1, 10.0, 1, 1, start_at=soon)
    assert _started(load) == soon and time.monotonic() >= soon
    late = Load(["http://127.0.0.1:9"], "key", ["u0"], 0, 1, 10.0, 1, 1, start_at=soon - 1.0)
    assert _started(late) == soon - 1.0  # its schedule is not shifted
    assert "START_MARGIN" in capsys.readouterr().err


def test_a_batch_phase_reports_each_requests_first_and_last_message() -> None:
    """Two generators of 400 messages each, requests of 200: four requests; message n's
    latency is n ms in the first request of each generator, 2 * n ms in the second."""
    delivered = []
    for g in range(2):
        for n in range(g * 400, g * 400 + 400):
            k = (n - g * 400) // 200
            delivered.append((n, (n % 200 + 1) * (k + 1) / 1000))
    spread = request_spread(delivered, per_gen=400, batch=200)
    assert spread["requests"] == 4
    assert spread["first_p50_ms"] == pytest.approx(2.0, abs=1.0)  # 1 or 2 ms
    assert spread["last_p99_ms"] == pytest.approx(400.0)


def test_breakdown_joins_hops_by_message_number(tmp_path: Path) -> None:
    rows = {
        "receiver-1": [["send", 1, 10.0], ["handler", 1, 10.5], ["send", 2, 11.0]],
        "node-2": [
            ["http", 1, 10.1],
            ["notify", 1, 10.3],
            ["gc", 2, 10.2, 0.03],
            ["lag", 0, 9.0, 1],
        ],
    }
    rows["receiver-1"] += [["handler", 2, 11.2]]
    for name, records in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _hops.breakdown(tmp_path, since=0.0)
    assert list(result["hops"]) == [
        "send->http",
        "http->notify",
        "notify->handler",
        "send->handler (all)",
    ]
    assert result["hops"]["send->http"]["n"] == 1
    assert result["hops"]["send->handler (all)"]["n"] == 2
    assert result["hops"]["send->handler (all)"]["max_ms"] == pytest.approx(500.0)
    assert result["gc"]["node gen2"]["count"] == 1  # while messages were under way
    assert result["lag"] == {}  # before the first send: not counted
    assert "send->http" in _hops.text(result)


# ---------------------------------------------------------------- lean receivers


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame (the lengths the node uses: 7-bit and 16-bit)."""
    if len(payload) < 126:
        return bytes((0x80 | opcode, len(payload))) + payload
    return bytes((0x80 | opcode, 126)) + len(payload).to_bytes(2, "big") + payload


def msg(seq: int, prev: int, n: int) -> bytes:
    data = {"t": time.monotonic(), "n": n, "pad": "x" * 150}
    frame = {"type": "msg", "ch": "user", "seq": seq, "prev": prev, "id": f"m{n}", "data": data}
    return server_frame(1, json.dumps(frame).encode())


def test_lean_frames_are_taken_whole_and_split_ones_wait_for_their_rest() -> None:
    wire = server_frame(1, b'{"type":"welcome"}') + server_frame(9, b"hb") + msg(3, 0, 1)
    buf = bytearray(wire[:-10])
    frames = take_frames(buf)
    assert [op for op, _ in frames] == [1, 9] and frames[1][1] == b"hb"
    buf += wire[-10:]
    [(op, payload)] = take_frames(buf)
    assert op == 1 and json.loads(payload)["seq"] == 3 and not buf


def test_a_lean_receiver_records_messages_checks_the_chain_answers_pings_and_acks() -> None:
    node, client = socket.socketpair()
    with node, client:
        client.setblocking(False)
        receiver = _leanrecv.Receiver([_leanrecv.Session(client)], 0.05, hops=False)
        node.sendall(msg(3, 0, 1) + msg(7, 3, 2) + server_frame(9, b"hb") + msg(9, 8, 3))
        receiver.run(expected=3, timeout=5)
        assert receiver.numbers == [1, 2, 3] and all(0 <= x < 5 for x in receiver.latencies)
        [session] = receiver.sessions.values()
        assert session.last == 9 and session.breaks == 1  # 9's prev 8 is not 7
        node.settimeout(5)
        sent = client_frames(node.recv(65536))
    assert sent[0] == (0xA, b"hb")  # the pong
    assert json.loads(sent[-1][1]) == {"type": "ack", "ch": "user", "seq": 9}
    assert all(op == 1 for op, _ in sent[1:])  # acks only, the last one cumulative


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Masked client frames (short ones), unmasked."""
    frames, pos = [], 0
    while pos < len(data):
        size, key = data[pos + 1] & 0x7F, data[pos + 2 : pos + 6]
        payload = bytes(b ^ key[k % 4] for k, b in enumerate(data[pos + 6 : pos + 6 + size]))
        frames.append((data[pos] & 0x0F, payload))
        pos += 6 + size
    return frames


def test_what_comes_with_the_welcome_stays_for_the_receiver() -> None:
    node, client = socket.socketpair()
    with node, client:
        buf = bytearray(server_frame(1, b'{"type":"welcome"}') + msg(3, 0, 1))
        assert _leanrecv._first_frame(client, buf) == {"type": "welcome"}
        assert [op for op, _ in take_frames(buf)] == [1]  # the msg was not thrown away


def test_a_redelivered_message_is_skipped_not_a_chain_break() -> None:
    node, client = socket.socketpair()
    with node, client:
        client.setblocking(False)
        receiver = _leanrecv.Receiver([_leanrecv.Session(client)], 0.05, hops=False)
        node.sendall(msg(3, 0, 1) + msg(3, 0, 1) + msg(7, 3, 2))
        receiver.run(expected=2, timeout=5)
        [session] = receiver.sessions.values()
        assert receiver.numbers == [1, 2] and session.breaks == 0 and session.last == 7
        receiver.poll.close()
