"""The handshake's query split (``gateway._query_pairs``) is ``parse_qsl`` as the gateway
calls it, for every query: the common one (nothing to unquote) is split without it."""

from __future__ import annotations

import itertools
import random
import urllib.parse

import pytest

from meshpush.server.gateway import MAX_QUERY_FIELDS, _query_pairs


def _reference(qs: str) -> list[tuple[str, str]] | str:
    try:
        return urllib.parse.parse_qsl(
            qs, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_QUERY_FIELDS
        )
    except ValueError:
        return "ValueError"


def _ours(qs: str) -> list[tuple[str, str]] | str:
    try:
        return _query_pairs(qs)
    except ValueError:
        return "ValueError"


CASES = [
    "",
    "token=a.b.c&device=phone",
    "token=a.b.c&device=phone&last=7&blast=0&epoch=e1&avoid=n2",
    "a",
    "a=",
    "=a",
    "&&a=1&&",
    "a=1=2",
    "a=1&a=2",
    "a=%41&b=c+d",
    "a=%zz",
    "device=ph%C3%B6ne",
    "x=" + "&x=".join(["1"] * (MAX_QUERY_FIELDS - 1)),  # exactly the limit
    "x=" + "&x=".join(["1"] * MAX_QUERY_FIELDS),  # one over
    "&" * MAX_QUERY_FIELDS,  # empty fields count towards the limit too
    ";a=1",
]


@pytest.mark.parametrize("qs", CASES)
def test_same_pairs_as_parse_qsl(qs: str) -> None:
    assert _ours(qs) == _reference(qs)


def test_same_pairs_as_parse_qsl_for_random_queries() -> None:
    rng = random.Random(9)
    alphabet = "ab=&%+;.-_~41 é"
    for length in itertools.chain(range(12), [40, 80]):
        for _ in range(200):
            qs = "".join(rng.choice(alphabet) for _ in range(length))
            assert _ours(qs) == _reference(qs), qs
