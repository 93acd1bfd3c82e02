"""The recorded event log of a chaos run: pure data, saved as JSON, read back by the checker.

Times are seconds since the load started (the harness's monotonic clock). Nothing here does
I/O except :meth:`EventLog.save` / :meth:`EventLog.load`; the checker and the report only read
these records, so a run can be checked again (or a hand-made log checked in a test) without a
cluster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

USER, BROADCAST = "user", "broadcast"


@dataclass(frozen=True, slots=True)
class Published:
    """A publish that returned 202: the message is stored with ``seq``."""

    ch: str  # "user" | "broadcast"
    user: str | None  # None for broadcasts
    seq: int
    id: str  # the idempotency id (the same on every retry)
    node: str = ""  # the node whose 202 counted ("" when the publisher SDK chose it)
    t: float = 0.0  # first attempt
    attempts: int = 1  # 0: unknown (the publisher SDK retried on its own)
    via: str = "single"  # single | batch | multi (chaos.load) | broadcast


@dataclass(frozen=True, slots=True)
class FailedPublish:
    """A publish the harness gave up on (no 202 within its retry budget): not expected anywhere."""

    ch: str
    user: str | None
    id: str
    t: float
    attempts: int
    error: str
    via: str = "single"


@dataclass(frozen=True, slots=True)
class Received:
    """A message as the application got it from the SDK (after the SDK's own dedup)."""

    ch: str
    seq: int
    prev: int | None
    id: str
    t: float  # when the application received it
    sent: float | None = None  # the first publish attempt (carried in the payload)


@dataclass
class Instance:
    """One ``Client`` object of a device, from start to end. A device normally has one; the
    client-kill fault ends one (``killed``: like a crash, acks may be lost) and starts another."""

    index: int
    started: float = 0.0
    ended: float | None = None
    end: str = "running"  # "running" | "stopped" (clean, every consumed message acked) | "killed"
    received: list[Received] = field(default_factory=list)
    duplicates: int = 0  # duplicates the SDK suppressed (client.stats.duplicates)
    connects: int = 0
    welcomes: int = 0
    redirects: int = 0
    chain_breaks: int = 0
    gaps: int = 0
    unexpected_errors: int = 0
    nodes: list[str] = field(default_factory=list)  # nodes that welcomed it, in order (last 50)
    events: list[dict[str, Any]] = field(default_factory=list)  # SDK events (gap, chain_break...)


@dataclass
class DeviceLog:
    user: str
    device: str
    instances: list[Instance] = field(default_factory=list)
    online: bool = False  # online (welcomed) when the run was checked
    node: str | None = None  # the node of its session then

    @property
    def key(self) -> str:
        return f"{self.user}/{self.device}"


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """A node as seen after the run settled (``GET /v1/nodes``)."""

    id: str
    reachable: bool = True
    sessions: int = 0
    misplaced_sessions: int = 0
    view: tuple[str, ...] = ()


@dataclass
class FaultRecord:
    kind: str
    target: str
    planned: float  # when the schedule wanted it
    t: float = 0.0  # when it was injected
    end: float = 0.0  # when the fault was over (node back, process resumed...)
    hold: float = 0.0
    affected: list[str] = field(default_factory=list)  # device keys "user/device"
    measure: str = "new"  # recovery: first message "new"ly published after t, or "any" message
    outcome: str = ""
    placed: float | None = None  # seconds from the heal until every session was on its owner


@dataclass(frozen=True, slots=True)
class Incident:
    """Something the harness saw go wrong outside the message flow (a node crashed, a drain
    did not finish, views did not converge). Every incident is a violation."""

    kind: str
    node: str | None
    detail: str
    t: float = 0.0


@dataclass
class EventLog:
    meta: dict[str, Any] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    failed: list[FailedPublish] = field(default_factory=list)
    devices: list[DeviceLog] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # user -> owner node (GET /v1/route)
    nodes: list[NodeSnapshot] = field(default_factory=list)
    rss_max_mb: dict[str, float] = field(default_factory=dict)  # every node that ran, sampled 1/s
    faults: list[FaultRecord] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EventLog:
        return cls(
            meta=dict(obj.get("meta", {})),
            published=[Published(**p) for p in obj.get("published", [])],
            failed=[FailedPublish(**f) for f in obj.get("failed", [])],
            devices=[_device(d) for d in obj.get("devices", [])],
            routes=dict(obj.get("routes", {})),
            nodes=[_node(n) for n in obj.get("nodes", [])],
            rss_max_mb={k: float(v) for k, v in obj.get("rss_max_mb", {}).items()},
            faults=[FaultRecord(**f) for f in obj.get("faults", [])],
            incidents=[Incident(**i) for i in obj.get("incidents", [])],
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> EventLog:
        return cls.from_json(json.loads(path.read_text()))


def _device(obj: dict[str, Any]) -> DeviceLog:
    instances = []
    for raw in obj.get("instances", []):
        fields = {k: v for k, v in raw.items() if k != "received"}
        received = [Received(**r) for r in raw.get("received", [])]
        instances.append(Instance(**fields, received=received))
    return DeviceLog(
        user=obj["user"],
        device=obj["device"],
        instances=instances,
        online=bool(obj.get("online", False)),
        node=obj.get("node"),
    )


def _node(obj: dict[str, Any]) -> NodeSnapshot:
    return NodeSnapshot(**{**obj, "view": tuple(obj.get("view", ()))})
