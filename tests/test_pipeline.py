"""The publish pipeline without a server: JetStream answers, group commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from meshpush.pipeline import Ack, GroupCommit, NoAnswer, Refused, WrongLast, parse_ack


def test_an_ack_gives_the_seq_and_the_duplicate_flag() -> None:
    assert parse_ack(b'{"stream":"S","seq":7}', None) == Ack(7, False)
    assert parse_ack(b'{"stream":"S","seq":7,"duplicate":true}', {}) == Ack(7, True)


def test_a_wrong_last_sequence_names_the_real_last_seq() -> None:
    error = b'{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 42"}}'
    assert parse_ack(error, None) == WrongLast(42)


def test_other_jetstream_errors_and_no_responders_are_definitely_not_stored() -> None:
    error = b'{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded"}}'
    assert isinstance(parse_ack(error, None), Refused)
    assert isinstance(parse_ack(b"", {"Status": "503"}), Refused)


def test_an_unreadable_answer_is_an_unknown_outcome() -> None:
    assert isinstance(parse_ack(b"garbage", None), NoAnswer)


def test_group_commit_merges_requests_that_wait_and_answers_each_its_slice() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    async def go() -> list[Sequence[int]]:
        commit: GroupCommit[int, int] = GroupCommit(run, lanes=1)
        first = asyncio.ensure_future(commit.submit([0, 100]))
        await asyncio.sleep(0.001)  # its batch is running
        rest = await asyncio.gather(*(commit.submit([i, i + 100]) for i in range(1, 5)))
        return [await first, *rest]

    results = asyncio.run(go())
    assert results == [[i * 10, (i + 100) * 10] for i in range(5)]
    assert calls[0] == [0, 100]  # the first ran alone; the four that waited ran together
    assert calls[1] == [1, 101, 2, 102, 3, 103, 4, 104]


def test_group_commit_gives_each_waiting_request_the_error() -> None:
    async def run(items: list[int]) -> list[int]:
        raise RuntimeError("boom")

    async def go() -> None:
        commit: GroupCommit[int, int] = GroupCommit(run)
        with pytest.raises(RuntimeError):
            await commit.submit([1])

    asyncio.run(go())
