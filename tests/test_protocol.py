"""The frame protocol is pure: parse and encode without sockets."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpush.core import protocol
from meshpush.core.protocol import Ack, Close, Ping, ProtocolError, parse_client_frame


def test_ack_and_ping_parse() -> None:
    assert parse_client_frame('{"type":"ack","ch":"user","seq":7}') == Ack("user", 7)
    assert parse_client_frame('{"type":"ack","ch":"broadcast","seq":0}') == Ack("broadcast", 0)
    assert parse_client_frame('{"type":"ping"}') == Ping()


@pytest.mark.parametrize(
    ("frame", "code", "close"),
    [
        (b"\x00", "binary_frame", Close.POLICY),
        ("{nope", "bad_json", Close.INVALID_DATA),
        ("[" * 100_000, "bad_json", Close.INVALID_DATA),  # nested too deep for the parser
        ("[1,2]", "bad_frame", None),
        ('"ack"', "bad_frame", None),
        ('{"type":"nope"}', "unknown_type", None),
        ('{"type":5}', "unknown_type", None),
        ("{}", "unknown_type", None),
        ('{"type":"ack","ch":"user"}', "bad_ack", None),
        ('{"type":"ack","ch":"user","seq":-1}', "bad_ack", None),
        ('{"type":"ack","ch":"user","seq":true}', "bad_ack", None),
        ('{"type":"ack","ch":"user","seq":1.5}', "bad_ack", None),
        ('{"type":"ack","ch":"other","seq":1}', "bad_ack", None),
        ('{"type":"ack","ch":"user","seq":1,"extra":1}', "bad_ack", None),
        ('{"type":"ack","ch":"user","seq":99999999999999999999}', "bad_ack", None),
    ],
)
def test_bad_frames_become_protocol_errors(frame: str | bytes, code: str, close: Close) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_client_frame(frame)
    assert (err.value.code, err.value.close) == (code, close)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parser_never_raises_anything_but_protocol_error(raw: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_client_frame(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["type", "ch", "seq", "x"]), json_values, max_size=4))
def test_parser_handles_any_json_object(obj: dict[str, object]) -> None:
    with contextlib.suppress(ProtocolError):
        parse_client_frame(json.dumps(obj))


@given(data=json_values, seq=st.integers(0, 2**53), msg_id=st.text(max_size=40))
def test_message_frame_is_valid_json_with_data_spliced(data: object, seq: int, msg_id: str) -> None:
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    frame = json.loads(protocol.message(ch="user", seq=seq, id=msg_id, data_json=raw, prev=3))
    assert frame == {"type": "msg", "ch": "user", "seq": seq, "prev": 3, "id": msg_id, "data": data}


def test_server_frames_round_trip() -> None:
    w = protocol.parse_server_frame(
        protocol.welcome(node="n1", user="u", device="d", epoch="1", interval=25, timeout=60)
    )
    assert w.type == "welcome"
    assert w.fields["heartbeat"] == {"interval": 25, "timeout": 60}
    r = json.loads(protocol.redirect(node="n2", url="ws://x/ws", reason="owner"))
    assert r == {"type": "redirect", "node": "n2", "url": "ws://x/ws", "reason": "owner"}
    assert json.loads(protocol.error("c", "d")) == {"type": "error", "code": "c", "detail": "d"}
    with pytest.raises(ProtocolError):
        protocol.parse_server_frame("[]")
