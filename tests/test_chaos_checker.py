"""The chaos checker, report and schedule on recorded event logs (no cluster).

Two kinds of logs: a small hand-made one (every rule in isolation) and one recorded from a real
``kill`` run (``tests/data/chaos_kill_run.json``), each corrupted on purpose — a lost message,
a duplicate, an out-of-order pair, a broken prev, a session on the wrong node, a misplaced
session, a memory bound exceeded — and each must be caught, with the user, device and seq.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos import report
from chaos.checker import Violation, check, missing
from chaos.events import (
    BROADCAST,
    USER,
    DeviceLog,
    EventLog,
    FaultRecord,
    Incident,
    Instance,
    NodeSnapshot,
    Published,
    Received,
)
from chaos.faults import (
    CLUSTERED_KINDS,
    PARTITIONS,
    SCENARIOS,
    SINGLE_KINDS,
    kinds_for,
    make_schedule,
)
from chaos.harness import make_devices

RECORDED = Path(__file__).parent / "data" / "chaos_kill_run.json"
BOUND_MB = 400.0

# ---------------------------------------------------------------- a hand-made run

# user stream seqs: alice 1, 3, 5 and bob 2, 4 (prev chains per user); broadcasts 1, 2, 3
UNICAST = {"alice": [(1, 0), (3, 1), (5, 3)], "bob": [(2, 0), (4, 2)]}
BROADCASTS = [(1, 0), (2, 1), (3, 2)]
DEVICES = [("alice", "phone", "n1"), ("alice", "laptop", "n1"), ("bob", "phone", "n2")]


def _received(user: str) -> list[Received]:
    """Broadcast k arrives after the user's k-th message (times increase)."""
    out: list[Received] = []
    mine = UNICAST[user]
    for i in range(max(len(mine), len(BROADCASTS))):
        if i < len(mine):
            seq, prev = mine[i]
            out.append(Received(USER, seq, prev, f"u-{seq}", t=10.0 * i + 1, sent=10.0 * i))
        if i < len(BROADCASTS):
            seq, prev = BROADCASTS[i]
            out.append(Received(BROADCAST, seq, prev, f"b-{seq}", t=10.0 * i + 2, sent=10.0 * i))
    return out


def clean_log() -> EventLog:
    log = EventLog(meta={"scenario": "unit", "seed": 0, "duration": 30, "nodes": 2})
    for user, chain in UNICAST.items():
        log.published += [Published(USER, user, s, f"u-{s}", "n1", 1.0) for s, _ in chain]
    log.published += [Published(BROADCAST, None, s, f"b-{s}", "n2", 1.0) for s, _ in BROADCASTS]
    for user, device, node in DEVICES:
        instance = Instance(index=0, received=_received(user), welcomes=1, nodes=[node])
        log.devices.append(DeviceLog(user, device, [instance], online=True, node=node))
    log.routes = {"alice": "n1", "bob": "n2"}
    log.nodes = [
        NodeSnapshot("n1", sessions=2, view=("n1", "n2")),
        NodeSnapshot("n2", sessions=1, view=("n1", "n2")),
    ]
    log.rss_max_mb = {"n1": 90.0, "n2": 95.0}
    return log


def device(log: EventLog, user: str, name: str) -> DeviceLog:
    return next(d for d in log.devices if d.user == user and d.device == name)


def kinds(violations: list[Violation]) -> list[str]:
    return [v.kind for v in violations]


def only(violations: list[Violation], kind: str) -> Violation:
    found = [v for v in violations if v.kind == kind]
    assert len(found) == 1, violations
    return found[0]


def test_a_clean_run_passes() -> None:
    log = clean_log()
    assert check(log, BOUND_MB) == []
    assert set(missing(log).values()) == {0}


def test_a_lost_message_is_caught_with_user_device_and_seq() -> None:
    log = clean_log()
    laptop = device(log, "alice", "laptop")
    received = laptop.instances[0].received
    received[:] = [r for r in received if not (r.ch == USER and r.seq == 3)]
    violations = check(log, BOUND_MB)
    lost = only(violations, "lost")
    assert (lost.user, lost.device, lost.ch, lost.seq) == ("alice", "laptop", USER, 3)
    assert "1 of 1 other device(s) received it" in lost.detail
    assert "seq 1 before and 5 after" in lost.detail
    assert "user=alice device=laptop ch=user seq=3" in str(lost)
    assert missing(log)["alice/laptop"] == 1


def test_a_lost_broadcast_is_caught_on_that_device_only() -> None:
    log = clean_log()
    bob = device(log, "bob", "phone").instances[0]
    bob.received = [r for r in bob.received if not (r.ch == BROADCAST and r.seq == 3)]
    lost = only(check(log, BOUND_MB), "lost")
    assert (lost.user, lost.device, lost.ch, lost.seq) == ("bob", "phone", BROADCAST, 3)


def test_a_duplicate_within_one_client_instance_is_caught() -> None:
    log = clean_log()
    received = device(log, "bob", "phone").instances[0].received
    received.append(Received(USER, 4, 2, "u-4", t=99.0))
    dup = only(check(log, BOUND_MB), "duplicate")
    assert (dup.user, dup.device, dup.seq) == ("bob", "phone", 4)


def test_an_out_of_order_pair_is_caught() -> None:
    log = clean_log()
    received = device(log, "alice", "phone").instances[0].received
    i3 = next(i for i, r in enumerate(received) if r.ch == USER and r.seq == 3)
    i5 = next(i for i, r in enumerate(received) if r.ch == USER and r.seq == 5)
    received[i3], received[i5] = received[i5], received[i3]
    violations = check(log, BOUND_MB)
    bad = only(violations, "out_of_order")
    assert (bad.user, bad.device, bad.seq) == ("alice", "phone", 3)
    assert "lost" not in kinds(violations)  # everything arrived, just not in order


def test_a_broken_prev_chain_is_caught() -> None:
    log = clean_log()
    received = device(log, "alice", "phone").instances[0].received
    i5 = next(i for i, r in enumerate(received) if r.ch == USER and r.seq == 5)
    received[i5] = Received(USER, 5, 2, "u-5", t=received[i5].t)
    bad = only(check(log, BOUND_MB), "broken_chain")
    assert (bad.user, bad.device, bad.seq) == ("alice", "phone", 5)
    assert "prev is 2" in bad.detail


def test_a_session_on_the_wrong_node_is_caught() -> None:
    log = clean_log()
    device(log, "bob", "phone").node = "n1"
    log.nodes = [NodeSnapshot("n1", sessions=3), NodeSnapshot("n2", sessions=0)]
    wrong = only(check(log, BOUND_MB), "wrong_node")
    assert (wrong.user, wrong.device, wrong.node) == ("bob", "phone", "n1")
    assert "the owner is n2" in wrong.detail


def test_misplaced_and_stray_sessions_are_caught() -> None:
    log = clean_log()
    log.nodes = [NodeSnapshot("n1", sessions=3, misplaced_sessions=1), log.nodes[1]]
    violations = check(log, BOUND_MB)
    assert only(violations, "misplaced_sessions").node == "n1"
    stray = only(violations, "stray_sessions")
    assert "holds 3 session(s), 2 client(s)" in stray.detail


def test_memory_over_the_bound_is_caught() -> None:
    log = clean_log()
    log.rss_max_mb["n3"] = 512.0  # a node that was scaled down still counts
    over = only(check(log, BOUND_MB), "memory")
    assert over.node == "n3"
    assert check(log, 600.0) == []


def test_an_offline_device_and_an_unreachable_node_are_caught() -> None:
    log = clean_log()
    device(log, "alice", "laptop").online = False
    log.nodes[0] = NodeSnapshot("n1", reachable=False)
    violations = check(log, BOUND_MB)
    assert only(violations, "offline").device == "laptop"
    assert only(violations, "node_unreachable").node == "n1"


def test_incidents_and_sdk_gaps_are_violations() -> None:
    log = clean_log()
    log.incidents.append(Incident("process_crashed", "n2", "exited with code 1 unasked", 4.0))
    device(log, "bob", "phone").instances[0].gaps = 1
    violations = check(log, BOUND_MB)
    assert only(violations, "process_crashed").node == "n2"
    assert only(violations, "gap").user == "bob"


def test_the_same_publish_id_under_two_seqs_is_caught() -> None:
    log = clean_log()
    for d in log.devices:
        if d.user == "bob":
            d.instances[0].received.append(Received(USER, 6, 4, "u-4", t=50.0))
    dup = only(check(log, BOUND_MB), "duplicate_id")
    assert "arrived as seqs [4, 6]" in dup.detail


def _split(log: EventLog, end: str) -> DeviceLog:
    """Bob's phone ran two instances: the first got everything up to t=15 and ended ``end``;
    the second got everything again from the bob's second message on."""
    bob = device(log, "bob", "phone")
    everything = bob.instances[0].received
    first = Instance(0, end=end, received=[r for r in everything if r.t < 15])
    second = Instance(1, received=[r for r in everything if r.t >= 10])
    bob.instances = [first, second]
    return bob


def test_redelivery_after_a_killed_client_instance_is_allowed() -> None:
    log = clean_log()
    _split(log, end="killed")
    assert check(log, BOUND_MB) == []
    built = report.build(log, [], "replay", BOUND_MB)
    assert built["messages"]["redelivered_after_client_kill"] == 2


def test_redelivery_after_a_clean_stop_is_a_duplicate() -> None:
    log = clean_log()
    _split(log, end="stopped")
    violations = check(log, BOUND_MB)
    assert kinds(violations) == ["duplicate", "duplicate"]
    assert {v.seq for v in violations} == {4, 2}
    assert "stopped cleanly" in violations[0].detail


# ---------------------------------------------------------------- a recorded run


@pytest.fixture
def recorded() -> EventLog:
    return EventLog.from_json(json.loads(RECORDED.read_text()))


def _busiest(log: EventLog) -> DeviceLog:
    return max(log.devices, key=lambda d: sum(r.ch == USER for r in d.instances[0].received))


def test_the_recorded_run_passes_and_survives_a_json_round_trip(recorded: EventLog) -> None:
    assert check(recorded, BOUND_MB) == []
    again = EventLog.from_json(json.loads(json.dumps(recorded.to_json())))
    assert again == recorded
    assert recorded.faults and recorded.faults[0].kind == "kill"


def test_the_recorded_run_with_a_message_dropped(recorded: EventLog) -> None:
    victim = _busiest(recorded)
    received = victim.instances[0].received
    user_msgs = [r for r in received if r.ch == USER]
    dropped = user_msgs[len(user_msgs) // 2]
    received.remove(dropped)
    violations = check(recorded, BOUND_MB)
    lost = only(violations, "lost")
    assert (lost.user, lost.device, lost.seq) == (victim.user, victim.device, dropped.seq)
    # the message after it now has a prev that was never received
    assert only(violations, "broken_chain").seq > dropped.seq


def test_the_recorded_run_with_a_duplicate(recorded: EventLog) -> None:
    victim = _busiest(recorded)
    received = victim.instances[0].received
    again = next(r for r in received if r.ch == BROADCAST)
    received.append(Received(again.ch, again.seq, again.prev, again.id, t=received[-1].t + 1))
    dup = only(check(recorded, BOUND_MB), "duplicate")
    assert (dup.device, dup.ch, dup.seq) == (victim.device, BROADCAST, again.seq)


def test_the_recorded_run_with_an_out_of_order_pair(recorded: EventLog) -> None:
    victim = _busiest(recorded)
    received = victim.instances[0].received
    positions = [i for i, r in enumerate(received) if r.ch == USER]
    a, b = positions[2], positions[3]
    received[a], received[b] = received[b], received[a]
    violations = check(recorded, BOUND_MB)
    bad = only(violations, "out_of_order")
    assert (bad.user, bad.device, bad.seq) == (victim.user, victim.device, received[b].seq)


def test_the_recorded_run_with_a_session_on_the_wrong_node(recorded: EventLog) -> None:
    victim = recorded.devices[0]
    others = sorted(n.id for n in recorded.nodes if n.id != victim.node)
    victim.node = others[0]
    violations = check(recorded, BOUND_MB)
    assert only(violations, "wrong_node").user == victim.user
    assert len([v for v in violations if v.kind == "stray_sessions"]) == 2


def test_the_recorded_run_with_a_misplaced_session(recorded: EventLog) -> None:
    first = recorded.nodes[0]
    recorded.nodes[0] = NodeSnapshot(
        first.id, sessions=first.sessions, misplaced_sessions=1, view=first.view
    )
    assert kinds(check(recorded, BOUND_MB)) == ["misplaced_sessions"]


# ---------------------------------------------------------------- report


def test_recovery_counts_only_messages_published_after_the_fault() -> None:
    log = clean_log()
    fault = FaultRecord("kill", "n2", planned=5.0, t=5.0, affected=["bob/phone"])
    log.faults.append(fault)
    # bob's phone got a broadcast at t=12 (published at 10) and his seq 4 at t=11 (sent 10)
    assert report.recovery_of(fault, device(log, "bob", "phone")) == 6.0
    fault.measure = "any"  # a client kill: the first message of the fresh instance counts
    assert report.recovery_of(fault, device(log, "bob", "phone")) == 6.0
    late = FaultRecord("kill", "n2", planned=40.0, t=40.0, affected=["bob/phone"])
    log.faults.append(late)
    built = report.build(log, [], "replay", BOUND_MB)
    assert built["recovery"]["kill"]["never"] == 1
    assert built["recovery"]["kill"]["max"] == 6.0


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 0.5) == 50.0
    assert report.percentile(values, 0.99) == 99.0
    assert report.percentile([3.0], 0.99) == 3.0
    assert report.percentile([], 0.5) is None


def test_the_report_prints_every_violation_and_the_replay_command() -> None:
    log = clean_log()
    device(log, "alice", "laptop").instances[0].received.pop(0)
    violations = check(log, BOUND_MB)
    text = report.render(report.build(log, violations, "meshpush chaos --seed 9", BOUND_MB))
    assert "lost: user=alice device=laptop ch=user seq=1" in text
    assert "replay with: meshpush chaos --seed 9" in text
    assert "invariants: 1 VIOLATION(S): lost 1" in text
    clean = report.render(report.build(clean_log(), [], "x", BOUND_MB))
    assert "invariants: OK" in clean
    assert "replay with" not in clean


# ---------------------------------------------------------------- schedule


def _keys(users: int = 12, seed: int = 1) -> list[str]:
    return [f"{u}/{d}" for u, d in make_devices(users, seed)]


def test_the_same_seed_gives_the_same_schedule() -> None:
    mixed = SCENARIOS["mixed"]
    first = make_schedule(mixed, 120, 1, 3, _keys())
    assert first == make_schedule(mixed, 120, 1, 3, _keys())
    assert first != make_schedule(mixed, 120, 2, 3, _keys())
    assert make_devices(12, 1) == make_devices(12, 1)


def test_mixed_draws_every_fault_and_keeps_at_least_two_nodes() -> None:
    schedule = make_schedule(SCENARIOS["mixed"], 120, 1, 3, _keys())
    assert {spec.kind for spec in schedule} == set(SINGLE_KINDS)
    assert all(0 < spec.at < 120 for spec in schedule)
    assert [s.at for s in schedule] == sorted(s.at for s in schedule)
    live = {"n1", "n2", "n3"}
    for spec in schedule:
        if spec.kind == "scale-up":
            assert spec.target not in live
            live.add(spec.target)
        elif spec.kind == "scale-down":
            live.discard(spec.target)
        elif spec.kind in ("kill", "drain", "zombie"):
            assert spec.target in live
        assert len(live) >= 2


def test_clustered_mixed_draws_member_leader_partition_and_upgrade_faults() -> None:
    """On clustered backends ``mixed`` swaps whole-backend restarts for member and leader
    kills, the four partitions and a rolling upgrade; the same seed, the same schedule."""
    mixed = SCENARIOS["mixed"]
    assert kinds_for(mixed, clustered=True) == CLUSTERED_KINDS
    assert not {"etcd-restart", "nats-restart"} & set(CLUSTERED_KINDS)
    schedule = make_schedule(mixed, 400, 1, 3, _keys(), clustered=True)
    assert schedule == make_schedule(mixed, 400, 1, 3, _keys(), clustered=True)
    assert {spec.kind for spec in schedule} == set(CLUSTERED_KINDS)
    for spec in schedule:
        if spec.kind in PARTITIONS:
            assert spec.hold > 2.0  # longer than the lease TTL: the cut-off lease expires
        if spec.kind in ("nats-member", "etcd-member"):
            assert spec.target[-1] in "123" and spec.target[:4] == spec.kind[:4]
    seed_one = [spec.kind for spec in make_schedule(mixed, 180, 1, 3, _keys(24), 2.0, True)]
    assert set(seed_one) & set(PARTITIONS) and "rolling-upgrade" in seed_one


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_plans_at_least_one_of_its_faults_in_a_short_run(name: str) -> None:
    schedule = make_schedule(SCENARIOS[name], 8, 5, 3, _keys(6, 5))
    assert schedule
    assert schedule[0].kind in SCENARIOS[name].kinds
    if name == "zombie":
        assert schedule[0].hold == 4.0  # lease TTL 2 + 2


def test_the_report_compares_sigkill_recovery_with_the_lease_budget() -> None:
    log = clean_log()
    log.meta["node_settings"] = {"lease_ttl": 2}
    log.faults.append(FaultRecord("kill", "n2", planned=5.0, t=5.0, affected=["bob/phone"]))
    built = report.build(log, [], "replay", BOUND_MB)
    assert built["sigkill_budget"] == {"p99": 6.0, "budget": 3.0, "within": False}
    assert "SIGKILL recovery p99 6.00s: OVER the budget" in report.render(built)
    log.meta["node_settings"] = {"lease_ttl": 5}
    assert report.build(log, [], "replay", BOUND_MB)["sigkill_budget"]["within"] is True
