"""The publish pipeline without a server: JetStream answers, group commit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

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


async def test_group_commit_merges_requests_that_wait_and_answers_each_its_slice() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await trio.sleep(0.01)
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(run, cancelled, lanes=1)
    results: dict[int, Sequence[int]] = {}

    async def submit(i: int) -> None:
        results[i] = await commit.submit([i, i + 100])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 0)
        await trio.sleep(0.001)  # its batch is running
        for i in range(1, 5):
            nursery.start_soon(submit, i)
    assert results == {i: [i * 10, (i + 100) * 10] for i in range(5)}
    assert calls[0] == [0, 100]  # the first ran alone; the four that waited ran together
    assert sorted(calls[1]) == sorted([1, 101, 2, 102, 3, 103, 4, 104])


def cancelled(items: list[int]) -> list[int]:
    return [-1] * len(items)


async def test_group_commit_gives_each_waiting_request_the_error() -> None:
    async def run(items: list[int]) -> list[int]:
        raise RuntimeError("boom")

    commit: GroupCommit[int, int] = GroupCommit(run, cancelled)
    with pytest.raises(RuntimeError):
        await commit.submit([1])


async def test_a_cancelled_lane_hands_its_queue_to_a_waiting_request() -> None:
    gate = trio.Event()

    async def run(items: list[int]) -> list[int]:
        if 0 in items:
            await trio.sleep_forever()  # the first lane's task will be cancelled
        await gate.wait()
        return items

    commit: GroupCommit[int, int] = GroupCommit(run, cancelled, lanes=1)
    results: dict[int, Sequence[int]] = {}
    first_scope = trio.CancelScope()

    async def first() -> None:
        with first_scope:
            results[0] = await commit.submit([0])

    async def submit(i: int) -> None:
        results[i] = await commit.submit([i])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.01)
            nursery.start_soon(submit, 1)
            nursery.start_soon(submit, 2)
            await trio.sleep(0.01)
            first_scope.cancel()
            await trio.sleep(0.01)
            gate.set()
    assert results == {1: [1], 2: [2]}  # served by the waiter that took the lane over
