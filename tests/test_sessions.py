"""The session registry and the slow-consumer rule, without sockets."""

from __future__ import annotations

import trio

from meshpush.protocol import Close
from meshpush.ring import slot
from meshpush.sessions import Registry, Session


async def test_registry_indexes_by_user_device_and_slot() -> None:
    reg = Registry()
    a1, a2, b = Session("a", "phone", 4, 0), Session("a", "web", 4, 0), Session("b", "x", 4, 0)
    for s in (a1, a2, b):
        reg.add(s)
    assert len(reg) == 3
    assert set(reg.of_user("a")) == {a1, a2}
    assert set(reg.in_slots([slot("a")])) >= {a1, a2}
    assert reg.statistics().users == 2
    assert sum(s.offer("f") for s in reg.of_user("a")) == 2
    assert sum(s.offer("g") for s in reg.all()) == 3
    reg.remove(a1)
    reg.remove(a1)  # idempotent
    assert set(reg.of_user("a")) == {a2}
    reg.remove(a2)
    reg.remove(b)
    assert len(reg) == 0
    assert reg.occupied_slots() == frozenset()


async def test_full_queue_cuts_the_session_with_4008() -> None:
    s = Session("u", "d", 2, 0)
    assert s.offer("1") and s.offer("2")
    assert not s.offer("3")
    assert s.close_request is not None
    assert s.close_request.code == Close.SLOW_CONSUMER
    assert not s.offer("4")  # nothing more is queued for a closing session


async def test_close_cancels_the_session_scope() -> None:
    s = Session("u", "d", 2, 0)
    with trio.CancelScope() as scope:
        s.cancel_scope = scope
        s.close(Close.REDIRECT, "owner", "frame")
        await trio.sleep(1)
    assert scope.cancelled_caught
    assert s.close_request is not None
    assert s.close_request.frame == "frame"
