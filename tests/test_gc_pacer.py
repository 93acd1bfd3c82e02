"""The node's paced young collections (meshpush.server.node.GcPacer), with fake gc functions."""

from __future__ import annotations

import trio
import trio.testing

from meshpush.server.node import GcPacer, paced_generation

THRESHOLDS = (10_000, 20, 10)


def test_young_collection_until_the_middle_threshold_is_passed() -> None:
    assert paced_generation((5, 0, 0), THRESHOLDS) == 0
    assert paced_generation((9_999, 20, 3), THRESHOLDS) == 0
    assert paced_generation((0, 21, 3), THRESHOLDS) == 1


def test_never_the_oldest_generation() -> None:
    assert paced_generation((50_000, 500, 500), THRESHOLDS) == 1


def test_step_collects_the_chosen_generation() -> None:
    collected: list[int] = []
    counts = [(3, 0, 0), (3, 21, 0)]
    pacer = GcPacer(
        collect=collected.append, counts=lambda: counts.pop(0), thresholds=lambda: THRESHOLDS
    )
    pacer.step()
    pacer.step()
    assert collected == [0, 1]


def test_run_collects_once_per_interval() -> None:
    collected: list[int] = []
    pacer = GcPacer(
        interval=1.0,
        collect=collected.append,
        counts=lambda: (0, 0, 0),
        thresholds=lambda: THRESHOLDS,
    )

    async def main() -> None:
        with trio.move_on_after(3.5):
            await pacer.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert collected == [0, 0, 0]
