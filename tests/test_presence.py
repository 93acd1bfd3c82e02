"""Presence: the pure half with fakes, then GET/POST /v1/presence against a real 3-node cluster."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_cluster
from support import api, connected, owner_of, user_owned_by, wait_until

from meshpush.local.devcluster import LocalCluster
from meshpush.server.api import ApiError
from meshpush.server.presence import (
    MAX_USERS,
    answer,
    check_users,
    decode_answers,
    decode_request,
    encode_answers,
    encode_request,
    group_by_owner,
)

# ---------------------------------------------------------------- pure half


@dataclass
class FakeSession:
    device: str
    since: float


def test_answer_groups_sessions_by_device_oldest_first() -> None:
    sessions = [FakeSession("phone", 20.0), FakeSession("web", 5.0), FakeSession("phone", 10.0)]
    assert answer("alice", "n1", sessions) == {
        "user": "alice",
        "online": True,
        "devices": [
            {"device": "phone", "node": "n1", "since": 10.0},
            {"device": "web", "node": "n1", "since": 5.0},
        ],
    }
    assert answer("bob", "n1", []) == {"user": "bob", "online": False, "devices": []}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "missing_field"),
        ({"users": ["a"], "x": 1}, 400, "unknown_field"),
        ({"users": "alice"}, 400, "bad_users"),
        ({"users": []}, 400, "bad_users"),
        ({"users": ["ok", ""]}, 400, "bad_user"),
        ({"users": ["ok", 7]}, 400, "bad_user"),
        ({"users": ["x" * 257]}, 400, "bad_user"),
        ({"users": ["a\x00b"]}, 400, "bad_user"),
        ({"users": ["u"] * (MAX_USERS + 1)}, 413, "too_many"),
    ],
)
def test_check_users_refuses(body: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(ApiError) as err:
        check_users(body)
    assert (err.value.status, err.value.code) == (status, code)


def test_check_users_accepts_up_to_the_limit() -> None:
    users = [f"u{i}" for i in range(MAX_USERS)]
    assert check_users({"users": users}) == users
    assert check_users({"users": ["a", "a"]}) == ["a", "a"]  # repeats are answered again


def test_group_by_owner_dedupes_and_needs_a_ring() -> None:
    owners = {"a": "n1", "b": "n2", "c": "n1"}
    assert group_by_owner(["a", "b", "a", "c"], owners.get) == {"n1": ["a", "c"], "n2": ["b"]}
    with pytest.raises(ApiError) as err:
        group_by_owner(["zz"], owners.get)
    assert (err.value.status, err.value.code) == (503, "no_ring")


def test_wire_format_round_trips_and_checks_answers() -> None:
    users = ["a.b", "é >*"]
    assert decode_request(encode_request(users)) == users
    answers = [answer(u, "n2", []) for u in users]
    assert decode_answers(encode_answers(answers), users) == answers
    for bad in (b"[]", b'{"error":"too_large"}', encode_answers(answers[:1])):
        with pytest.raises(ValueError):
            decode_answers(bad, users)
    with pytest.raises(ValueError):
        decode_answers(encode_answers(list(reversed(answers))), users)
    for garbage in (b"{}", b'{"users":"a"}', b'{"users":[""]}', b"\xff"):
        with pytest.raises((ValueError, UnicodeDecodeError)):
            decode_request(garbage)


# ---------------------------------------------------------------- real cluster


async def presence(cluster: LocalCluster, node_id: str, user: str) -> httpx.Response:
    return await api(cluster, cluster.node(node_id), "GET", "/v1/presence", params={"user": user})


def counter(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{where="{label}"}}'):
            return float(line.split()[-1])
    return 0.0


async def metric(cluster: LocalCluster, node_id: str, label: str) -> float:
    resp = await api(cluster, cluster.node(node_id), "GET", "/metrics")
    return counter(resp.text, "meshpush_presence_lookups_total", label)


@pytest.mark.cluster
async def test_offline_then_online_with_two_devices_then_offline(cluster: LocalCluster) -> None:
    user = await user_owned_by(cluster, "n1", prefix="pres")
    for node in ("n1", "n2", "n3"):
        resp = await presence(cluster, node, user)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"user": user, "online": False, "devices": []}
    before = time.time()
    async with (
        connected(cluster, user, device="phone"),
        connected(cluster, user, via=cluster.node("n3"), device="web"),
    ):
        for node in ("n1", "n2"):
            body = (await presence(cluster, node, user)).json()
            assert body["online"] is True
            assert [(d["device"], d["node"]) for d in body["devices"]] == [
                ("phone", "n1"),
                ("web", "n1"),
            ]
            assert all(before - 1 <= d["since"] <= time.time() + 1 for d in body["devices"])

    async def offline() -> bool:
        return (await presence(cluster, "n2", user)).json()["online"] is False

    await wait_until(offline, timeout=10)


@pytest.mark.cluster
async def test_user_of_another_node_is_asked_over_nats(cluster: LocalCluster) -> None:
    user = await user_owned_by(cluster, "n2", prefix="remote")
    asked, answered = await metric(cluster, "n3", "remote"), await metric(cluster, "n2", "answered")
    async with connected(cluster, user, device="tab"):
        body = (await presence(cluster, "n3", user)).json()
    assert body["devices"][0]["node"] == "n2" and body["online"] is True
    assert await metric(cluster, "n3", "remote") == asked + 1
    assert await metric(cluster, "n2", "answered") == answered + 1


@pytest.mark.cluster
async def test_batch_answers_every_user_in_order_one_request_per_owner(
    cluster: LocalCluster,
) -> None:
    users = [await user_owned_by(cluster, n, prefix="batch") for n in ("n1", "n2", "n3", "n2")]
    asked = {n: await metric(cluster, n, "answered") for n in ("n2", "n3")}
    async with connected(cluster, users[1], device="d"), connected(cluster, users[2], device="e"):
        resp = await api(
            cluster, cluster.node("n1"), "POST", "/v1/presence", json={"users": users + users[:1]}
        )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["user"] for r in results] == users + users[:1]
    assert [r["online"] for r in results] == [False, True, True, False, False]
    assert results[1]["devices"][0]["node"] == "n2" and results[2]["devices"][0]["node"] == "n3"
    # one request per owner node: two users of n2, one of n3 -> n2 answered 2 users in one go
    assert await metric(cluster, "n2", "answered") == asked["n2"] + 1
    assert await metric(cluster, "n3", "answered") == asked["n3"] + 1
    assert await owner_of(cluster, users[3]) == "n2"


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("method", "kwargs", "status", "code"),
    [
        ("GET", {}, 400, "bad_user"),
        ("GET", {"params": {"user": ""}}, 400, "bad_user"),
        ("GET", {"params": {"user": "x" * 300}}, 400, "bad_user"),
        ("POST", {"content": b"{nope"}, 400, "bad_json"),
        ("POST", {"json": ["a"]}, 400, "bad_body"),
        ("POST", {"json": {}}, 400, "missing_field"),
        ("POST", {"json": {"users": ["a"], "more": 1}}, 400, "unknown_field"),
        ("POST", {"json": {"users": {"a": 1}}}, 400, "bad_users"),
        ("POST", {"json": {"users": ["a", None]}}, 400, "bad_user"),
        ("POST", {"json": {"users": ["u"] * 1001}}, 413, "too_many"),
        ("POST", {"content": json.dumps({"users": ["\u00e9" * 128] * 1000})}, 413, "too_large"),
        ("PUT", {"json": {"users": []}}, 405, "method_not_allowed"),
    ],
)
async def test_bad_requests_get_documented_codes(
    cluster: LocalCluster, method: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    resp = await api(cluster, cluster.node("n1"), method, "/v1/presence", **kwargs)
    assert resp.status_code == status, resp.text[:300]
    assert resp.json()["error"] == code
    ok = await api(cluster, cluster.node("n1"), "POST", "/v1/presence", json={"users": ["x"]})
    assert ok.status_code == 200


@pytest.mark.cluster
@pytest.mark.parametrize("key", [None, "wrong"])
async def test_presence_needs_the_api_key(cluster: LocalCluster, key: str | None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=cluster.node("n1").http_url, timeout=10) as http:
        got = await http.get("/v1/presence", params={"user": "a"}, headers=headers)
        posted = await http.post("/v1/presence", json={"users": ["a"]}, headers=headers)
    expected = "invalid_api_key" if key else "missing_api_key"
    for resp in (got, posted):
        assert resp.status_code == 401
        assert resp.json()["error"] == expected


@pytest.mark.cluster
async def test_a_silent_owner_makes_only_its_users_unavailable(tmp_path: Path) -> None:
    """A paused owner (its lease still valid) does not answer: GET 503, POST answers the rest."""
    with make_cluster(tmp_path / "c", nodes=2, lease_ttl=6, presence_timeout=0.5) as c:
        here = await user_owned_by(c, "n1", prefix="here")
        there = await user_owned_by(c, "n2", prefix="there")
        c.pause(c.node("n2"))
        try:
            resp = await presence(c, "n1", there)
            batch = await api(
                c, c.node("n1"), "POST", "/v1/presence", json={"users": [there, here]}
            )
        finally:
            c.resume(c.node("n2"))
    assert resp.status_code == 503 and resp.json()["error"] == "owner_unavailable"
    assert batch.status_code == 200
    unavailable, answered = batch.json()["results"]
    assert unavailable["user"] == there and unavailable["error"] == "owner_unavailable"
    assert answered == {"user": here, "online": False, "devices": []}
