"""The publish pipeline without a server: JetStream answers, group commit."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from meshpush.backends.natslink import NoReply, NotSent
from meshpush.backends.natswire import Msg
from meshpush.backends.pipeline import (
    Ack,
    NoAnswer,
    Refused,
    TrioGroupCommit,
    WrongLast,
    answer_of,
    parse_ack,
)


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


def test_a_link_reply_is_an_honest_answer() -> None:
    """Never sent: definitely not stored. Sent without an answer: unknown. A reply: parsed."""
    assert answer_of(NotSent("not sent: gone")) == Refused("not sent: gone")
    assert answer_of(NoReply("NATS connection lost")) == NoAnswer("NATS connection lost")
    assert answer_of(Msg("_INBOX.x.1", 1, None, b'{"seq":3}')) == Ack(3, False)
    no_responders = Msg("_INBOX.x.2", 1, None, b"", {"Status": "503"})
    assert isinstance(answer_of(no_responders), Refused)


async def test_trio_group_commit_merges_requests_that_wait_and_answers_each_its_slice() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int], idle: object) -> list[int]:
        calls.append(items)
        await trio.sleep(0.01)
        return [i * 10 for i in items]

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=1)
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


async def test_trio_group_commit_merges_at_most_max_items_but_always_one_request() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int], idle: object) -> list[int]:
        calls.append(items)
        await trio.sleep(0.01)
        return items

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=1, max_items=5)
    results: dict[int, Sequence[int]] = {}

    async def submit(i: int, size: int) -> None:
        results[i] = await commit.submit([i] * size)

    sizes = {0: 1, 1: 2, 2: 2, 3: 2, 4: 7, 5: 1}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 0, 1)
        await trio.sleep(0.001)  # its batch is running: the others queue, in this order
        for i in range(1, 6):
            nursery.start_soon(submit, i, sizes[i])
            await trio.testing.wait_all_tasks_blocked()
    assert results == {i: [i] * n for i, n in sizes.items()}
    # in arrival order: 1 and 2 fit in 5, 3 does not; 4 alone is over 5 but goes whole
    assert calls == [[0], [1, 1, 2, 2], [3, 3], [4] * 7, [5]]


def cancelled(items: list[int]) -> list[int]:
    return [-1] * len(items)


async def test_trio_group_commit_gives_each_waiting_request_the_error() -> None:
    async def run(items: list[int], idle: object) -> list[int]:
        raise RuntimeError("boom")

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled)
    with pytest.raises(RuntimeError):
        await commit.submit([1])


async def test_a_cancelled_lane_hands_its_queue_to_a_waiting_request() -> None:
    gate = trio.Event()

    async def run(items: list[int], idle: object) -> list[int]:
        if 0 in items:
            await trio.sleep_forever()  # the first lane's task will be cancelled
        await gate.wait()
        return items

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=1)
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


async def test_a_lane_answers_its_own_request_without_waiting_for_later_batches() -> None:
    async def run(items: list[int], idle: object) -> list[int]:
        await trio.sleep(0.05)
        return items

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=1)
    finished: list[int] = []

    async def submit(i: int) -> None:
        await commit.submit([i])
        finished.append(i)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit, 0)
            await trio.sleep(0.01)
            nursery.start_soon(submit, 1)
            nursery.start_soon(submit, 2)
            await trio.sleep(0.06)  # the first batch is done, the second is running
            assert finished == [0]
    assert sorted(finished) == [0, 1, 2] and commit.batches == 2


@pytest.mark.parametrize("seed", range(5))
async def test_trio_group_commit_answers_every_request_its_own_slice_under_churn(seed: int) -> None:
    """Random arrivals, batch durations and cancellations (lanes handed over while new
    requests start lanes of their own): every request that was not cancelled is answered,
    with the results of its own items (never another request's)."""
    rng = random.Random(seed)

    async def run(items: list[int], idle: object) -> list[int]:
        await trio.sleep(rng.random() * 0.01)
        return [i * 2 for i in items]

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=2)
    answered: dict[int, Sequence[int]] = {}

    async def submit(i: int) -> None:
        with trio.move_on_after(rng.random() * 0.03 if i % 4 == 0 else 10):
            answered[i] = await commit.submit([i, i + 1000])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(submit, i)
                await trio.sleep(rng.random() * 0.001)
    # a request merged into the batch of a lane whose task was cancelled gets "unknown"
    # (the API's 504: retry with the same id); every other one gets its own results
    assert all(answered[i] in ([i * 2, (i + 1000) * 2], [-1, -1]) for i in answered)
    assert all(i in answered for i in range(200) if i % 4)
    assert sum(answered[i] == [i * 2, (i + 1000) * 2] for i in answered) > 100


async def test_a_batch_that_only_waits_for_others_hands_its_lane_over() -> None:
    """The store calls ``idle`` when a batch waits for users other requests hold: the next
    request gets the lane at once and is answered while the idle batch still waits."""
    gate = trio.Event()

    async def run(items: list[int], idle: Callable[[], None]) -> list[int]:
        if 0 in items:
            idle()
            await gate.wait()
        return items

    commit: TrioGroupCommit[int, int] = TrioGroupCommit(run, cancelled, lanes=1)
    results: dict[int, Sequence[int]] = {}

    async def submit(i: int) -> None:
        results[i] = await commit.submit([i])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit, 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(submit, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert results == {1: [1]}
            gate.set()
    assert results == {0: [0], 1: [1]} and commit.batches == 2
