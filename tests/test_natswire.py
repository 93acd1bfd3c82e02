"""The sans-IO NATS protocol: encoders and the incremental server-op parser (no server)."""

from __future__ import annotations

import json

import pytest

from meshpush.backends import natswire as w

INFO = b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n'
STREAM = (
    INFO
    + b"PING\r\nPONG\r\n+OK\r\n"
    + b"MSG a.b 1 5\r\nhello\r\n"
    + b"MSG a.b 2 _INBOX.x.7 0\r\n\r\n"
    + b"HMSG r.1 3 20 22\r\nNATS/1.0\r\nK: v 1\r\n\r\nhi\r\n"
    + b"HMSG _INBOX.x.8 4 30 30\r\nNATS/1.0 503 No Responders\r\n\r\n\r\n"
    + b"-ERR 'Stale Connection'\r\n"
)
EXPECTED: list[w.Event] = [
    w.Info({"server_id": "x", "max_payload": 1048576, "headers": True}),
    w.Ping(),
    w.Pong(),
    w.Ok(),
    w.Msg("a.b", 1, None, b"hello"),
    w.Msg("a.b", 2, "_INBOX.x.7", b""),
    w.Msg("r.1", 3, None, b"hi", {"K": "v 1"}),
    w.Msg("_INBOX.x.8", 4, None, b"", {"Status": "503", "Description": "No Responders"}),
    w.Err("Stale Connection"),
]


def test_every_server_op_parses() -> None:
    assert w.Parser().feed(STREAM) == EXPECTED


def test_a_stream_split_at_every_byte_gives_the_same_events() -> None:
    for cut in range(1, len(STREAM)):
        parser = w.Parser()
        assert parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:]) == EXPECTED, cut


def test_a_stream_fed_one_byte_at_a_time_gives_the_same_events() -> None:
    parser = w.Parser()
    events = [e for i in range(len(STREAM)) for e in parser.feed(STREAM[i : i + 1])]
    assert events == EXPECTED


def test_a_status_line_without_description() -> None:
    [msg] = w.Parser().feed(b"HMSG in.1 9 16 16\r\nNATS/1.0 404\r\n\r\n\r\n")
    assert isinstance(msg, w.Msg) and msg.headers == {"Status": "404"}


def test_a_status_line_with_headers() -> None:
    block = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Stream: 7\r\n\r\n"
    raw = b"HMSG h 1 %d %d\r\n%s\r\n" % (len(block), len(block), block)
    [msg] = w.Parser().feed(raw)
    assert isinstance(msg, w.Msg)
    assert msg.headers == {
        "Status": "100",
        "Description": "Idle Heartbeat",
        "Nats-Last-Stream": "7",
    }


def test_a_big_payload_in_many_pieces() -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB, binary, with CRLFs inside
    raw = b"MSG big 1 %d\r\n%s\r\nPING\r\n" % (len(payload), payload)
    parser = w.Parser(max_payload=2_000_000)
    events = [e for i in range(0, len(raw), 65536) for e in parser.feed(raw[i : i + 65536])]
    assert events == [w.Msg("big", 1, None, payload), w.Ping()]


def test_info_sets_the_payload_bound() -> None:
    parser = w.Parser()
    parser.feed(b'INFO {"max_payload":10}\r\n')
    assert parser.max_payload == 10
    assert parser.feed(b"MSG a 1 10\r\n0123456789\r\n") == [w.Msg("a", 1, None, b"0123456789")]
    with pytest.raises(w.ProtocolError, match="over the bound"):
        parser.feed(b"MSG a 1 11\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"WHAT\r\n",
        b"MSG a 1\r\n",
        b"MSG a x 1\r\nh\r\n",
        b"MSG a 1 b c 2\r\n",
        b"MSG a 1 -1\r\n",
        b"MSG a 1 2\r\nabc\r\n",  # payload longer than announced
        b"HMSG a 1 9 3\r\n",  # header bigger than the total
        b"HMSG a 1 5 5\r\nXX/1\r\n\r\n",  # not a NATS/1.0 header
        b"HMSG a 1 16 16\r\nNATS/1.0 50x\r\n\r\n\r\n",  # bad status
        b"HMSG a 1 21 21\r\nNATS/1.0\r\nnocolon\r\n\r\n\r\n",
        b"INFO [1]\r\n",
        b"INFO {nope\r\n",
        b'INFO {"max_payload":"x"}\r\n',
        b"PING now\r\n",
    ],
)
def test_malformed_ops_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(w.ProtocolError):
        w.Parser().feed(raw)


def test_an_endless_control_line_is_a_protocol_error() -> None:
    parser = w.Parser()
    parser.feed(b"INFO {" + b"x" * (w.MAX_CONTROL_LINE - 10))
    with pytest.raises(w.ProtocolError, match="too long"):
        parser.feed(b"x" * 100)


def test_encoders() -> None:
    assert w.pub("a.b", b"hi") == b"PUB a.b 2\r\nhi\r\n"
    assert w.pub("a.b", b"", reply="in.1") == b"PUB a.b in.1 0\r\n\r\n"
    assert w.hpub("s", {"K": "v"}, b"xy", reply="r") == (
        b"HPUB s r 18 20\r\nNATS/1.0\r\nK: v\r\n\r\nxy\r\n"
    )
    assert w.publish("s", b"x") == w.pub("s", b"x")
    assert w.publish("s", b"x", headers={"A": "1"}) == w.hpub("s", {"A": "1"}, b"x")
    assert w.sub("a.*", 7) == b"SUB a.* 7\r\n"
    assert w.sub("a", 8, queue="q") == b"SUB a q 8\r\n"
    assert w.unsub(7) == b"UNSUB 7\r\n"
    assert w.unsub(7, 3) == b"UNSUB 7 3\r\n"
    raw = w.connect({"verbose": False, "headers": True})
    assert raw.startswith(b"CONNECT ") and raw.endswith(b"\r\n")
    assert json.loads(raw[8:]) == {"verbose": False, "headers": True}


def test_what_we_encode_the_parser_reads_back() -> None:
    """An HPUB is an HMSG without the sid: the same header block round-trips."""
    headers = {"Nats-Msg-Id": "abc", "Nats-Expected-Last-Subject-Sequence": "12"}
    block = w.encode_headers(headers)
    raw = b"HMSG s 1 %d %d\r\n%sdata\r\n" % (len(block), len(block) + 4, block)
    assert w.Parser().feed(raw) == [w.Msg("s", 1, None, b"data", headers)]


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB x 0", "a\tb"])
def test_subjects_that_would_break_the_protocol_are_refused(subject: str) -> None:
    with pytest.raises(w.EncodeError):
        w.pub(subject, b"x")
    with pytest.raises(w.EncodeError):
        w.sub(subject, 1)


@pytest.mark.parametrize("key,value", [("A:B", "v"), ("A", "v\r\nX: y"), ("", "v"), ("A B", "v")])
def test_headers_that_would_break_the_protocol_are_refused(key: str, value: str) -> None:
    with pytest.raises(w.EncodeError):
        w.hpub("s", {key: value}, b"")


def test_a_message_over_max_payload_is_refused_counting_its_headers() -> None:
    assert w.publish("s", b"x" * 10, max_payload=10) == w.pub("s", b"x" * 10)
    with pytest.raises(w.EncodeError, match="max_payload"):
        w.publish("s", b"x" * 11, max_payload=10)
    with pytest.raises(w.EncodeError, match="max_payload"):
        w.publish("s", b"x" * 5, headers={"K": "v"}, max_payload=10)
