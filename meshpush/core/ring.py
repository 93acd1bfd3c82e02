"""Slots and owners: which node owns which user. Pure and deterministic.

``slot(user) = crc32(utf8(user)) % 4096``; a uhashring ``HashRing`` over the live node ids maps
each slot to its owner. Every node computes the same :class:`Ring` from the same node set: the
ids of a :data:`View`, each node's :class:`NodeInfo` as it registered it in etcd.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from uhashring import HashRing

SLOTS = 4096


def slot(user: str) -> int:
    """The slot of a user id."""
    return zlib.crc32(user.encode("utf-8")) % SLOTS


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    ws_url: str
    http_url: str
    started_at: float
    #: it takes the live hints of unicasts from JetStream's republish (``rp``: nodes before
    #: it only subscribe the publishing node's notifications)
    republish: bool = True
    #: it reads the prev of a later message of an atomic batch (``Mp-Prev-Back``; ``pb``:
    #: nodes before it read a prev of 0 there, so nobody sends batches while one is a member)
    batches: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "ws_url": self.ws_url,
                "http_url": self.http_url,
                "started_at": self.started_at,
                "rp": self.republish,
                "pb": self.batches,
            }
        )

    @classmethod
    def from_json(cls, node_id: str, raw: bytes) -> NodeInfo:
        obj = json.loads(raw)
        urls = str(obj["ws_url"]), str(obj["http_url"])
        flags = obj.get("rp") is True, obj.get("pb") is True
        return cls(node_id, *urls, float(obj["started_at"]), *flags)


View = dict[str, NodeInfo]


@dataclass(frozen=True)
class Ring:
    """An immutable slot -> node table built from a set of node ids."""

    nodes: frozenset[str]
    owners: tuple[str, ...]  # index = slot; empty when there are no nodes

    @classmethod
    def build(cls, nodes: Iterable[str]) -> Ring:
        members = frozenset(nodes)
        if not members:
            return cls(nodes=members, owners=())
        ring = HashRing(nodes=sorted(members))
        return cls(nodes=members, owners=tuple(ring.get_node(f"slot-{s}") for s in range(SLOTS)))

    def owner_of_slot(self, s: int) -> str | None:
        return self.owners[s] if self.owners else None

    def owner(self, user: str) -> str | None:
        return self.owner_of_slot(slot(user))

    def slots_of(self, node: str) -> frozenset[int]:
        return frozenset(s for s, owner in enumerate(self.owners) if owner == node)

    def without(self, node: str) -> Ring:
        return Ring.build(self.nodes - {node})


EMPTY = Ring.build(())
