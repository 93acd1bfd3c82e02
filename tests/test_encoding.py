"""Ids become safe subject/key tokens and come back unchanged; one id rule (no Cc) everywhere."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from conftest import make_cluster
from hypothesis import given
from hypothesis import strategies as st
from support import api, connected, publish, receive, refusal, token

from meshpush.core.auth import issue_token
from meshpush.core.encoding import (
    CONTROL,
    BadId,
    check_id,
    decode_token,
    encode_token,
    user_of_token,
)
from meshpush.local.devcluster import LocalCluster

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
    assert user_of_token(token) == value  # the kept (cached) decoding: the same answer


def test_the_kept_decoding_refuses_garbage_every_time() -> None:
    for _ in range(2):  # a refusal is not kept as an answer
        with pytest.raises(BadId):
            user_of_token("not*a*token")


@pytest.mark.parametrize("good", ["a", "a.b", "*", ">", "with space", "🎉", "é" * 128, "x" * 256])
def test_valid_ids(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 257, "é" * 129, "a\nb", "nul\x00", 5, None, "\ud800"])
def test_invalid_ids(bad: object) -> None:
    with pytest.raises(BadId):
        check_id(bad)


# every character of Unicode category Cc: C0 controls, DEL and the C1 controls (U+0085 NEL)
CONTROLS = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_character_is_refused_anywhere_in_an_id(char: str) -> None:
    for value in (char, f"a{char}", f"{char}b", f"a{char}b"):
        with pytest.raises(BadId, match="control"):
            check_id(value, "device")


@pytest.mark.parametrize(
    "char", ["\u00a0", "\u00ad", "\u200b", "\u2028", "\u2029", "\ufeff", "\ue000", "\U0001f600"]
)
def test_characters_outside_cc_are_allowed(char: str) -> None:
    """Format, separator and private-use characters are not controls (Cc): ids may have them."""
    assert check_id(f"a{char}b") == f"a{char}b"


@given(st.text(min_size=1, max_size=32))
def test_the_rule_is_exactly_unicode_category_cc(value: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return
    valid = size <= 256 and not any(unicodedata.category(c) == "Cc" for c in value)
    try:
        check_id(value)
    except BadId:
        assert not valid
    else:
        assert valid


def test_the_control_class_is_unicode_category_cc_over_every_code_point() -> None:
    found = {c for c in range(0x110000) if CONTROL.match(chr(c))}
    assert found == {c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc"}


def test_decode_rejects_garbage() -> None:
    with pytest.raises(BadId):
        decode_token("!!!")


# ---------------------------------------------------------------- the rule at every entry point


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with make_cluster(tmp_path_factory.mktemp("ids"), nodes=1) as cluster:
        yield cluster


async def _refused(url: str) -> tuple[int, str]:
    close, code, _ = await refusal(url)
    return close, code


@pytest.mark.cluster
@pytest.mark.parametrize("char", ["\x85", "\x9f", "\x7f", "\x1b"], ids=lambda c: f"U+{ord(c):04X}")
async def test_api_and_handshake_refuse_control_chars(one_node: LocalCluster, char: str) -> None:
    node, bad = one_node.live()[0], f"a{char}b"
    resp = await api(one_node, node, "POST", "/v1/publish", json={"user": bad, "data": 1})
    assert (resp.status_code, resp.json()["error"]) == (400, "bad_user")
    resp = await api(one_node, node, "GET", "/v1/route", params={"user": bad})
    assert (resp.status_code, resp.json()["error"]) == (400, "bad_user")
    good = token(one_node, "id-rule")
    url = f"{node.ws_url}?token={good}&device={quote(bad)}"
    assert await _refused(url) == (4400, "bad_device")
    forged = issue_token(one_node.token_secret, bad, 600)
    assert await _refused(f"{node.ws_url}?token={forged}&device=d") == (4401, "invalid_token")
    # nothing was stored, and the node serves everyone else on; ids outside Cc are fine
    user = "a\u00a0b\u200b\u2028c"
    async with connected(one_node, user, device="d\u00ad") as client:
        await publish(one_node, node, user, "still here")
        assert (await receive(client)).data == "still here"
