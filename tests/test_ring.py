"""Slots and owners are deterministic and move little when membership changes."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from meshpush.core.ring import EMPTY, SLOTS, Ring, slot


@given(st.text(min_size=1, max_size=64))
def test_slot_is_crc32_mod_4096(user: str) -> None:
    assert slot(user) == zlib.crc32(user.encode()) % 4096
    assert 0 <= slot(user) < SLOTS


def test_ring_is_independent_of_order_and_covers_every_slot() -> None:
    a = Ring.build(["n1", "n2", "n3"])
    b = Ring.build(["n3", "n1", "n2"])
    assert a.owners == b.owners
    assert len(a.owners) == SLOTS
    assert sum(len(a.slots_of(n)) for n in ("n1", "n2", "n3")) == SLOTS
    assert all(len(a.slots_of(n)) > SLOTS // 6 for n in ("n1", "n2", "n3"))


def test_adding_a_node_only_moves_slots_to_it() -> None:
    before = Ring.build(["n1", "n2", "n3"])
    after = Ring.build(["n1", "n2", "n3", "n4"])
    moved = [s for s in range(SLOTS) if before.owners[s] != after.owners[s]]
    assert moved
    assert all(after.owners[s] == "n4" for s in moved)
    assert len(moved) < SLOTS // 2


def test_removing_a_node_only_moves_its_slots() -> None:
    before = Ring.build(["n1", "n2", "n3"])
    after = before.without("n2")
    for s in range(SLOTS):
        if before.owners[s] != "n2":
            assert after.owners[s] == before.owners[s]


def test_empty_ring_has_no_owner() -> None:
    assert EMPTY.owner("anyone") is None
    assert Ring.build(["solo"]).owner("anyone") == "solo"
