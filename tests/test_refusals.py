"""Handshake refusals a browser can read, and tokens out of URLs (docs/protocol.md §1).

With ``refuse_after_upgrade`` (default) every refusal decided after TCP admission is an
``error`` frame and a 44xx close; with it off, today's HTTP statuses. A client may send its
token in a first ``{"type":"auth","token":...}`` frame; the Python SDK does by default.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import make_cluster
from support import (
    api,
    connected,
    publish,
    receive,
    refusal,
    token,
    user_owned_by,
)
from trio_websocket import ConnectionClosed, open_websocket_url

from meshpush.client import Client, ClientEvent, State, open_client
from meshpush.core.auth import issue_token
from meshpush.core.protocol import Close
from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster

LIMITS = {
    "allowed_origins": ("https://app.example",),
    "max_sessions_per_user": 1,
    "handshake_timeout": 1.5,
}


@pytest.fixture(scope="module")
def after(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node answering refusals after the upgrade (the default)."""
    with make_cluster(tmp_path_factory.mktemp("after"), nodes=1, **LIMITS) as cluster:
        yield cluster
        assert all(n.proc.alive() for n in cluster.members)


@pytest.fixture(scope="module")
def before(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node with ``refuse_after_upgrade`` off: HTTP statuses, no auth frame."""
    workdir = tmp_path_factory.mktemp("before")
    with make_cluster(workdir, nodes=1, refuse_after_upgrade=False, **LIMITS) as cluster:
        yield cluster
        assert all(n.proc.alive() for n in cluster.members)


def _url(cluster: LocalCluster, query: str = "") -> str:
    return f"{cluster.live()[0].ws_url}?{query}"


async def _welcome(url: str, first: str | None = None) -> dict[str, object]:
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            if first is not None:
                await ws.send_message(first)
            frame: dict[str, object] = json.loads(await ws.get_message())
            return frame


EVIL = [(b"Origin", b"https://evil.example")]


async def _refusal_cases(cluster: LocalCluster) -> list[tuple[str, list[tuple[bytes, bytes]]]]:
    good = token(cluster, "r-user")
    expired = issue_token(cluster.token_secret, "r-late", ttl=-60)
    phone_only = issue_token(cluster.token_secret, "r-dev", 600, devices=["phone"])
    return [
        (f"token={expired}", []),
        (f"token={good}", EVIL),
        (f"token={phone_only}&device=tablet", []),
        (f"token={good}&device=", []),
    ]


async def test_refusals_after_the_upgrade_say_why(after: LocalCluster) -> None:
    cases = await _refusal_cases(after)
    expected = [
        (Close.TOKEN_EXPIRED, "expired_token"),
        (Close.FORBIDDEN, "origin_not_allowed"),
        (Close.FORBIDDEN, "device_not_allowed"),
        (Close.BAD_REQUEST, "bad_device"),
    ]
    for (query, headers), want in zip(cases, expected, strict=True):
        assert (await refusal(_url(after, query), headers))[:2] == want, query
    # the wrong path is no WebSocket endpoint: plain HTTP 404 still
    wrong = _url(after).replace("/ws", "/admin")
    assert (await refusal(wrong))[:2] == (404, "not_found")
    # and the node serves on
    assert (await _welcome(_url(after, f"token={token(after, 'r-ok')}")))["type"] == "welcome"


async def test_setting_off_keeps_http_statuses(before: LocalCluster) -> None:
    cases = await _refusal_cases(before)
    expected = [
        (401, "expired_token"),
        (403, "origin_not_allowed"),
        (403, "device_not_allowed"),
        (400, "bad_device"),
    ]
    for (query, headers), want in zip(cases, expected, strict=True):
        assert (await refusal(_url(before, query), headers))[:2] == want, query
    # no token and no way to send one later: 401 at once (no auth frame without the setting)
    assert (await refusal(_url(before, "device=d")))[:2] == (401, "missing_token")
    user = "r-cap-off"
    url = _url(before, f"token={token(before, user)}")
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            status, code, headers = await refusal(url)
    assert (status, code, headers.get(b"retry-after")) == (429, "too_many_sessions", b"5")


async def test_session_cap_is_4429_with_retry_after(after: LocalCluster) -> None:
    url = _url(after, f"token={token(after, 'r-cap')}")
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            close, code, frame = await refusal(url)
    assert (close, code, frame["retry_after"]) == (Close.RATE_LIMITED, "too_many_sessions", 5)


@pytest.mark.parametrize("fixture", ["after", "before"])
async def test_sdk_refused_by_the_session_cap_waits_its_retry_after(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """A second device of a user at its cap is refused 4429 (or HTTP 429) with retry_after 5:
    the SDK asks that node again no sooner (not every backoff step), then gets in once the
    first session has gone."""
    cluster: LocalCluster = request.getfixturevalue(fixture)
    user, auth = f"r-cap-sdk-{fixture}", "frame" if fixture == "after" else "query"
    url = cluster.live()[0].ws_url
    second = Client(url, token=token(cluster, user), device="two", auth=auth)
    second.backoff_base, second.backoff_cap = 0.01, 0.05  # would retry ~every 50 ms
    async with trio.open_nursery() as nursery:
        async with connected(cluster, user, auth=auth):
            nursery.start_soon(second.run)
            await trio.sleep(2.5)
            assert (second.stats.connects, second.stats.rejections) == (1, 1)
            assert second.state is State.BACKING_OFF
            assert 2.0 < second._wait_for(url) <= 2.6  # what is left of the 5 s
        with trio.fail_after(10):  # the first session has gone
            await second.wait_online()
        assert second.stats.connects == 2
        nursery.cancel_scope.cancel()


async def test_bad_resume_beyond_the_end_is_4400_naming_the_channel(after: LocalCluster) -> None:
    url = _url(after, f"token={token(after, 'r-future')}&last=999999999")
    close, code, frame = await refusal(url)
    assert (close, code, frame["ch"]) == (Close.BAD_REQUEST, "bad_resume", "user")


# ---------------------------------------------------------------- the auth frame


def _auth(tok: str) -> str:
    return json.dumps({"type": "auth", "token": tok})


async def test_auth_frame_opens_a_session_that_receives(after: LocalCluster) -> None:
    node, user = after.live()[0], "r-frame"
    url = _url(after, "device=phone")
    with trio.fail_after(15):
        async with open_websocket_url(url) as ws:
            await ws.send_message(_auth(token(after, user)))
            welcome = json.loads(await ws.get_message())
            assert (welcome["type"], welcome["user"], welcome["device"]) == (
                "welcome",
                user,
                "phone",
            )
            seq = (await publish(after, node, user, "hello"))["seq"]
            msg = json.loads(await ws.get_message())
            assert (msg["type"], msg["seq"], msg["data"]) == ("msg", seq, "hello")


@pytest.mark.parametrize(
    ("first", "close", "code"),
    [
        (None, Close.TOKEN_EXPIRED, "missing_token"),  # nothing within handshake_timeout
        ('{"type":"ping"}', Close.TOKEN_EXPIRED, "auth_expected"),
        ("not json", Close.TOKEN_EXPIRED, "auth_expected"),
        ('{"type":"auth","token":5}', Close.TOKEN_EXPIRED, "bad_auth"),
        ('{"type":"auth","token":"t","user":"bob"}', Close.TOKEN_EXPIRED, "bad_auth"),
        ('{"type":"auth","token":"garbage"}', Close.TOKEN_EXPIRED, "invalid_token"),
    ],
)
async def test_bad_late_or_missing_auth_frames(
    after: LocalCluster, first: str | None, close: int, code: str
) -> None:
    assert (await refusal(_url(after, "device=d"), first=first))[:2] == (close, code)
    assert (await _welcome(_url(after, "device=d"), _auth(token(after, "r-next"))))[
        "type"
    ] == "welcome"


async def test_binary_first_frame_is_1008(after: LocalCluster) -> None:
    with trio.fail_after(10):
        async with open_websocket_url(_url(after, "device=d")) as ws:
            await ws.send_message(b"\x00\x01")
            frame = json.loads(await ws.get_message())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert frame["code"] == "binary_frame"
    assert closed.value.reason.code == Close.POLICY


async def test_auth_frame_is_redirected_to_the_owner(cluster: LocalCluster) -> None:
    first, other = cluster.live()[0], cluster.live()[1]
    user = await user_owned_by(cluster, other.id, prefix="r-redir")
    with trio.fail_after(15):
        async with open_websocket_url(f"{first.ws_url}?device=d") as ws:
            await ws.send_message(_auth(token(cluster, user)))
            redirect = json.loads(await ws.get_message())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert (redirect["type"], redirect["node"]) == ("redirect", other.id)
    assert closed.value.reason.code == Close.REDIRECT
    assert "token" not in redirect["url"]
    welcome = await _welcome(f"{redirect['url']}?device=d", _auth(token(cluster, user)))
    assert (welcome["type"], welcome["node"]) == ("welcome", other.id)


# ---------------------------------------------------------------- the Python SDK


async def test_sdk_sends_its_token_in_the_auth_frame(after: LocalCluster) -> None:
    node, user = after.live()[0], "r-sdk"
    async with connected(after, user) as client:
        assert client.auth == "frame"
        assert "token" not in client._target(node.ws_url, "secret-token")  # not in the URL
        seq = (await publish(after, node, user, 1))["seq"]
        assert (await receive(client)).seq == seq
    # and the query option still works
    async with connected(after, "r-sdk-q", auth="query") as client:
        assert client.state is State.ONLINE


async def test_sdk_stops_on_a_final_refusal(after: LocalCluster) -> None:
    events: list[ClientEvent] = []
    phone_only = issue_token(after.token_secret, "r-final", 600, devices=["phone"])
    url = after.live()[0].ws_url
    with trio.fail_after(15):
        async with open_client(url, token=phone_only, device="tablet", on_event=events.append) as c:
            async for _ in c:
                raise AssertionError("no message expected")
            assert c.state is State.CLOSED and c.stats.final_close == Close.FORBIDDEN
    assert [e.kind for e in events][-1] == "final"


async def test_sdk_resets_a_refused_resume_position_and_carries_on(after: LocalCluster) -> None:
    node, user = after.live()[0], "r-reset"
    seq = (await publish(after, node, user, "stored"))["seq"]
    events: list[ClientEvent] = []
    client = Client(node.ws_url, token=token(after, user), device="fresh", on_event=events.append)
    client.last["user"] = seq + 10**9  # a position from the future (another store, say)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        msg = await receive(client, timeout=15)
        nursery.cancel_scope.cancel()
    assert (msg.seq, msg.data) == (seq, "stored")
    resets = [e for e in events if e.kind == "resume_reset"]
    assert [(e.ch, e.detail["refused"]) for e in resets] == [("user", seq + 10**9)]
    assert client.stats.connects == 2  # one refusal, then on


async def test_sdk_resets_on_an_http_bad_resume_too(before: LocalCluster) -> None:
    node, user = before.live()[0], "r-reset-off"
    seq = (await publish(before, node, user, "stored"))["seq"]
    client = Client(node.ws_url, token=token(before, user), device="fresh", auth="query")
    client.last["user"] = seq + 10**9
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        msg = await receive(client, timeout=15)
        nursery.cancel_scope.cancel()
    assert msg.seq == seq
    assert [e.kind for e in client.events].count("resume_reset") == 2  # both channels


# ---------------------------------------------------------------- store unavailable


async def test_store_unavailable_is_4503(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", nodes=1) as cluster:
        node = cluster.live()[0]
        assert cluster.nats is not None
        cluster.nats.stop(signal.SIGKILL)
        close, code, frame = await refusal(f"{node.ws_url}?token={token(cluster, 'r-503')}")
        assert close == Close.UNAVAILABLE and code in ("store_unavailable", "unavailable")
        assert frame["retry_after"] == 1
        await trio.to_thread.run_sync(cluster.start_nats)
        resp = await api(cluster, node, "GET", "/healthz")
        assert resp.status_code == 200
