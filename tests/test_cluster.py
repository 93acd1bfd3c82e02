"""Core cluster, end to end on a shared 3-node cluster: redirect, delivery, auth, heartbeats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from conftest import make_cluster
from support import (
    api,
    connected,
    owner_of,
    publish,
    receive,
    refusal,
    token,
    user_owned_by,
    wait_until,
)
from trio_websocket import ConnectionClosed, open_websocket_url

from meshpush.core.auth import issue_token
from meshpush.core.protocol import Close
from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster


def others(cluster: LocalCluster, node_id: str) -> list:
    return [n for n in cluster.live() if n.id != node_id]


async def test_non_owner_redirects_then_owner_welcomes(cluster: LocalCluster) -> None:
    user = "redirect-me"
    owner = await owner_of(cluster, user)
    stranger = others(cluster, owner)[0]
    url = f"{stranger.ws_url}?token={token(cluster, user)}&device=d1"
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            frame = json.loads(await ws.get_message())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert frame["type"] == "redirect"
    assert frame["node"] == owner
    assert frame["url"] == cluster.node(owner).ws_url
    assert closed.value.reason.code == Close.REDIRECT

    async with connected(cluster, user, via=stranger) as client:
        assert client.node == owner
        assert client.stats.redirects == 1


async def test_publish_through_third_node_reaches_user(cluster: LocalCluster) -> None:
    user = await user_owned_by(cluster, "n1")
    async with connected(cluster, user, via=cluster.node("n2")) as client:
        answer = await publish(cluster, cluster.node("n3"), user, {"n": 1}, msg_id="m-1")
        msg = await receive(client)
    assert (msg.ch, msg.seq, msg.id, msg.data) == ("user", answer["seq"], "m-1", {"n": 1})
    assert answer["duplicate"] is False


async def test_every_device_and_session_of_a_user_receives(cluster: LocalCluster) -> None:
    user = "multi-device"
    async with (
        connected(cluster, user, device="phone") as phone,
        connected(cluster, user, device="tablet") as tablet,
        connected(cluster, user, device="tablet") as tablet2,
    ):
        answer = await publish(cluster, cluster.live()[1], user, "hi")
        got = [await receive(c) for c in (phone, tablet, tablet2)]
    assert {m.seq for m in got} == {answer["seq"]}
    assert phone.node == tablet.node == tablet2.node == await owner_of(cluster, user)


async def test_broadcast_reaches_users_on_every_node(cluster: LocalCluster) -> None:
    users = [await user_owned_by(cluster, n.id, "bc") for n in cluster.live()]
    async with (
        connected(cluster, users[0]) as a,
        connected(cluster, users[1]) as b,
        connected(cluster, users[2]) as c,
    ):
        assert {a.node, b.node, c.node} == {"n1", "n2", "n3"}
        resp = await api(
            cluster, cluster.live()[0], "POST", "/v1/broadcast", json={"data": {"all": True}}
        )
        assert resp.status_code == 202, resp.text
        got = [await receive(x) for x in (a, b, c)]
    assert all(m.ch == "broadcast" and m.data == {"all": True} for m in got)
    assert {m.seq for m in got} == {resp.json()["seq"]}


@pytest.mark.parametrize(
    "user",
    ["a.b.c", "*", ">", "with space", "emoji-🎉-ü", "é" * 128, "x" * 256, "a\\b/c%2e"],
    ids=["dots", "star", "gt", "space", "emoji", "256-bytes-utf8", "256-bytes", "slashes"],
)
async def test_odd_user_ids_work_end_to_end(cluster: LocalCluster, user: str) -> None:
    async with connected(cluster, user, device=user) as client:
        answer = await publish(cluster, cluster.live()[2], user, {"for": user})
        msg = await receive(client)
    assert msg.seq == answer["seq"]
    assert msg.data == {"for": user}


def _forged(user: str) -> str:
    return issue_token("not-the-secret", user, 600)


BAD_TOKENS = {
    "missing": None,
    "garbage": "not.a.jwt",
    "forged": _forged("mallory"),
    "expired": "EXPIRED",
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_is_refused_with_an_error_frame_and_4401(
    cluster: LocalCluster, kind: str
) -> None:
    raw = BAD_TOKENS[kind]
    if raw == "EXPIRED":
        raw = issue_token(cluster.token_secret, "late", ttl=-60)
    query = "device=d1" + (f"&token={raw}" if raw else "")
    node = cluster.live()[0]
    if raw:
        close, code, _ = await refusal(f"{node.ws_url}?{query}")
    else:  # no token anywhere: the node waits for an auth frame; a non-auth frame is refused
        close, code, _ = await refusal(f"{node.ws_url}?{query}", first='{"type":"ping"}')
    assert close == Close.TOKEN_EXPIRED
    assert code in {"invalid_token", "expired_token", "auth_expected"}
    # the node serves everyone else on
    async with connected(cluster, "after-bad-token", via=node) as client:
        await publish(cluster, node, "after-bad-token", 1)
        assert (await receive(client)).data == 1


async def test_silent_session_is_closed_with_4408(cluster: LocalCluster) -> None:
    """A client that never answers pings (raw socket, no WebSocket library) is cut off."""
    import wsproto
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    user = "silent"
    node = cluster.node(await owner_of(cluster, user))
    port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    target = f"/ws?token={token(cluster, user)}&device=quiet"
    await stream.send_all(conn.send(Request(host="127.0.0.1", target=target)))
    events: list[object] = []
    with trio.fail_after(15):
        while not any(isinstance(e, CloseConnection) for e in events):
            data = await stream.receive_some(65536)
            if not data:
                break
            conn.receive_data(data)
            events.extend(conn.events())  # never answer the pings: stay silent
    await stream.aclose()
    assert isinstance(events[0], AcceptConnection)
    assert any(isinstance(e, TextMessage) and '"welcome"' in e.data for e in events)
    close = next(e for e in events if isinstance(e, CloseConnection))
    assert close.code == Close.HEARTBEAT_TIMEOUT


async def test_app_level_ping_and_bad_frames(cluster: LocalCluster) -> None:
    user = "framer"
    node = cluster.node(await owner_of(cluster, user))
    url = f"{node.ws_url}?token={token(cluster, user)}"
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            assert json.loads(await ws.get_message())["type"] == "welcome"
            await ws.send_message('{"type":"ping"}')
            assert json.loads(await ws.get_message()) == {"type": "pong"}
            await ws.send_message('{"type":"subscribe","to":"everyone"}')
            err = json.loads(await ws.get_message())
            assert (err["type"], err["code"]) == ("error", "unknown_type")
            await ws.send_message("{not json")
            err = json.loads(await ws.get_message())
            assert err["code"] == "bad_json"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == Close.INVALID_DATA


async def test_binary_and_oversized_frames_close_the_session(cluster: LocalCluster) -> None:
    user = "big-sender"
    node = cluster.node(await owner_of(cluster, user))
    url = f"{node.ws_url}?token={token(cluster, user)}"
    for payload, code in ((b"\x00\x01", Close.POLICY), ("x" * 70000, Close.TOO_BIG)):
        with trio.fail_after(10):
            async with open_websocket_url(url) as ws:
                await ws.get_message()  # welcome
                await ws.send_message(payload)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
        assert closed.value.reason.code == code


async def test_http_api_answers(cluster: LocalCluster) -> None:
    node = cluster.live()[0]
    for path in ("/healthz", "/readyz"):
        assert (await api(cluster, node, "GET", path)).status_code == 200
    nodes = (await api(cluster, node, "GET", "/v1/nodes")).json()
    assert [n["id"] for n in nodes["nodes"]] == ["n1", "n2", "n3"]
    assert sum(n["slots"] for n in nodes["nodes"]) == 4096
    route = (await api(cluster, node, "GET", "/v1/route", params={"user": "x"})).json()
    assert route["node"] in {"n1", "n2", "n3"}
    assert route["ws_url"] == cluster.node(route["node"]).ws_url
    metrics = (await api(cluster, node, "GET", "/metrics")).text
    for name in ("meshpush_sessions", "meshpush_handshakes_total", "meshpush_cluster_nodes 3.0"):
        assert name in metrics


API_ERRORS = [
    ({"authorization": ""}, {"user": "u", "data": 1}, 401, "missing_api_key"),
    ({"authorization": "Bearer nope"}, {"user": "u", "data": 1}, 401, "invalid_api_key"),
    ({}, b"{nope", 400, "bad_json"),
    ({}, b"[" * 100_000, 400, "bad_json"),
    ({}, [1, 2], 400, "bad_body"),
    ({}, {"user": "u"}, 400, "missing_field"),
    ({}, {"user": "u", "data": 1, "extra": 2}, 400, "unknown_field"),
    ({}, {"user": "", "data": 1}, 400, "bad_user"),
    ({}, {"user": "x" * 257, "data": 1}, 400, "bad_user"),
    ({}, {"user": 5, "data": 1}, 400, "bad_user"),
    ({}, {"user": "u", "data": 1, "id": 7}, 400, "bad_id"),
    ({}, {"user": "u", "data": "x" * 300_000}, 413, "too_large"),
]


@pytest.mark.parametrize(("headers", "body", "status", "code"), API_ERRORS)
async def test_publish_rejects_bad_requests(
    cluster: LocalCluster, headers: dict, body: object, status: int, code: str
) -> None:
    node = cluster.live()[1]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = await api(cluster, node, "POST", "/v1/publish", headers=headers, **kwargs)
    assert (resp.status_code, resp.json()["error"]) == (status, code)
    assert (await api(cluster, node, "GET", "/healthz")).status_code == 200


async def test_route_rejects_bad_user(cluster: LocalCluster) -> None:
    resp = await api(cluster, cluster.live()[0], "GET", "/v1/route")
    assert (resp.status_code, resp.json()["error"]) == (400, "bad_user")


async def test_sdk_reports_state_changes(cluster: LocalCluster) -> None:
    seen: list[str] = []
    async with connected(cluster, "stateful", on_state=lambda s: seen.append(s.value)) as client:
        await wait_until(lambda: client.state.value == "online")
    assert "online" in seen
    assert seen[-1] == "closed"


async def test_a_ping_after_the_nodes_close_does_not_hurt_the_node(cluster: LocalCluster) -> None:
    """Regression (found by the chaos suite): a client Ping arriving after the node sent its
    Close made trio-websocket answer with a Pong wsproto refuses (trio-websocket #184), and the
    error took the whole node down."""
    import wsproto
    from wsproto.events import CloseConnection, Request

    user = "late-pinger"
    owner = await owner_of(cluster, user)
    stranger = others(cluster, owner)[0]  # sends a redirect, then closes
    port = int(stranger.ws_url.rsplit(":", 1)[1].split("/")[0])
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    target = f"/ws?token={token(cluster, user)}&device=d"
    await stream.send_all(conn.send(Request(host="127.0.0.1", target=target)))
    with trio.fail_after(10):
        closed = False
        while not closed:
            conn.receive_data(await stream.receive_some(65536))
            closed = any(isinstance(e, CloseConnection) for e in conn.events())
    payload, mask = b"late", b"\x01\x02\x03\x04"  # a masked Ping, by hand, instead of the Close
    body = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
    await stream.send_all(bytes([0x89, 0x80 | len(payload)]) + mask + body)
    await trio.sleep(0.5)
    await stream.aclose()
    assert stranger.proc.alive()
    async with connected(cluster, "after-late-ping", via=stranger) as client:
        await publish(cluster, stranger, "after-late-ping", "still here")
        assert (await receive(client)).data == "still here"


async def test_heartbeats_never_cut_or_drop_a_frame(tmp_path: Path) -> None:
    """Regression (found by the chaos suite): a heartbeat deadline firing during a send cancelled
    it, dropping the frame (or cutting it in half). Pings every 20 ms while 600 frames of 2 kB
    go out to a reader that pauses: every frame arrives, the prev chain is exact."""
    settings = {"heartbeat_interval": 0.02, "session_queue": 100_000}
    with make_cluster(tmp_path / "c", nodes=1, **settings) as small:
        node, user, n = small.live()[0], "heavy-reader", 600
        url = f"{node.ws_url}?token={token(small, user)}&device=d"
        frames: list[dict[str, object]] = []
        async with open_websocket_url(url, message_queue_size=1) as ws, trio.open_nursery() as ns:
            await ws.get_message()  # welcome

            async def publish_all() -> None:
                for _ in range(n):
                    await publish(small, node, user, "x" * 2000)

            ns.start_soon(publish_all)
            with trio.fail_after(90):
                while len(frames) < n:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "msg":
                        frames.append(frame)
                        if len(frames) % 50 == 0:
                            await trio.sleep(0.2)  # let the node's sends block on TCP
        seqs = [f["seq"] for f in frames]
        assert all(f["prev"] == s for f, s in zip(frames[1:], seqs, strict=False))
