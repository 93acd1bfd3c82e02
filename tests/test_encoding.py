"""Ids become safe subject/key tokens and come back unchanged."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpush.encoding import BadId, check_id, decode_token, encode_token

TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


@given(st.text(min_size=1, max_size=64))
def test_encoding_round_trips_into_a_safe_token(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return
    token = encode_token(value)
    assert TOKEN.match(token)
    assert decode_token(token) == value


@pytest.mark.parametrize("good", ["a", "a.b", "*", ">", "with space", "🎉", "é" * 128, "x" * 256])
def test_valid_ids(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 257, "é" * 129, "a\nb", "nul\x00", 5, None, "\ud800"])
def test_invalid_ids(bad: object) -> None:
    with pytest.raises(BadId):
        check_id(bad)


def test_decode_rejects_garbage() -> None:
    with pytest.raises(BadId):
        decode_token("!!!")
