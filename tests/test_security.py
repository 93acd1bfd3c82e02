"""Security and protection: every rejection path with its documented code, floods, slowloris,
tokens (HS256 rotation, RS256, ES256, JWKS, aud/iss, devices, alg none), TLS, isolation,
and live fuzzing while a normal client keeps receiving."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import nats
import pytest
import trio
import trustme
from conftest import make_cluster
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Collector, api, publish, receive, refusal
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from meshpush.client import open_client
from meshpush.core.auth import issue_token
from meshpush.core.protocol import Close
from meshpush.core.ring import slot
from meshpush.local.devcluster import LocalCluster

pytestmark = pytest.mark.cluster

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
JWKS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OLD_SECRET = "an-old-secret-that-is-still-accepted-xx"
AUD, ISS = "meshpush-test", "https://issuer.test"


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(user: str = "alice", ttl: float = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "exp": now + int(ttl), "iat": now, "aud": AUD, "iss": ISS, **extra}


# ---------------------------------------------------------------- clusters


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node with every token option on, and an Origin allowlist."""
    workdir = tmp_path_factory.mktemp("strict")
    (workdir / "ec.pem").write_text(pem(EC_KEY))
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(JWKS_KEY.public_key()))
    (workdir / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    (workdir / "rsa.pem").write_text(pem(RSA_KEY))
    with make_cluster(
        workdir / "c",
        nodes=1,
        token_audience=AUD,
        token_issuer=ISS,
        token_leeway=0.0,
        token_old_secrets=(OLD_SECRET,),
        token_jwks_file=str(workdir / "jwks.json"),
        token_public_key_file=str(workdir / "rsa.pem"),
        allowed_origins=("https://app.example",),
        protect_metrics=True,
        handshake_timeout=2.0,  # "missing": no token and no auth frame, refused after it
    ) as cluster:
        yield cluster
        assert all(n.proc.alive() for n in cluster.members)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node with tight limits and an IP filter file."""
    workdir = tmp_path_factory.mktemp("limited")
    (workdir / "ipfilter").write_text("# nothing blocked yet\n")
    with make_cluster(
        workdir / "c",
        nodes=1,
        handshake_rate=2.0,
        handshake_burst=6,
        max_connections_per_ip=6,
        max_connections=8,
        max_sessions_per_user=2,
        frame_rate=5.0,
        frame_burst=10,
        handshake_timeout=1.5,
        ip_filter_file=str(workdir / "ipfilter"),
    ) as cluster:
        yield cluster
        assert all(n.proc.alive() for n in cluster.members)


def tok(cluster: LocalCluster, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, cluster.token_secret, algorithm="HS256")


async def handshake(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    """Open a WebSocket; return the welcome frame or raise ConnectionRejected."""
    with trio.fail_after(10):
        async with open_websocket_url(url, extra_headers=headers) as ws:
            frame: dict[str, Any] = json.loads(await ws.get_message())
            return frame


async def refused(
    url: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, str, dict[Any, Any]]:
    """(close code, error, frame) after the upgrade, or (HTTP status, error, headers)."""
    return await refusal(url, headers)


# ---------------------------------------------------------------- tokens: table-driven


def _token_cases(cluster: LocalCluster) -> dict[str, tuple[str | None, int, str]]:
    hs = cluster.token_secret
    return {
        "missing": (None, 4401, "missing_token"),
        "garbage": ("garbage", 4401, "invalid_token"),
        "forged": (jwt.encode(claims(), "x" * 40, algorithm="HS256"), 4401, "invalid_token"),
        "expired": (jwt.encode(claims(ttl=-60), hs, algorithm="HS256"), 4401, "expired_token"),
        "wrong_audience": (
            jwt.encode(claims(aud="other"), hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "no_audience": (
            jwt.encode({k: v for k, v in claims().items() if k != "aud"}, hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "wrong_issuer": (
            jwt.encode(claims(iss="evil"), hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "alg_none": (jwt.encode(claims(), None, algorithm="none"), 4401, "invalid_token"),
        "hs256_with_public_key": (_hs_with_public_key(), 4401, "invalid_token"),
        "rs256_unknown_key": (
            jwt.encode(claims(), rsa.generate_private_key(65537, 2048), algorithm="RS256"),
            4401,
            "invalid_token",
        ),
        "no_sub": (
            jwt.encode({k: v for k, v in claims().items() if k != "sub"}, hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "sub_too_long": (
            jwt.encode(claims(user="x" * 257), hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "devices_not_a_list": (
            jwt.encode(claims(devices="phone"), hs, algorithm="HS256"),
            4401,
            "invalid_token",
        ),
        "device_not_in_claim": (
            jwt.encode(claims(devices=["tablet"]), hs, algorithm="HS256"),
            4403,
            "device_not_allowed",
        ),
    }


def _hs_with_public_key() -> str:
    """Algorithm confusion: sign HS256 with the RSA public key PEM as the secret."""
    header = {"alg": "HS256", "typ": "JWT"}
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims()).encode())
    sig = hmac.new(pem(RSA_KEY).encode(), signing, hashlib.sha256).digest()
    return (signing + b"." + b64(sig)).decode()


CASES = [
    "missing",
    "garbage",
    "forged",
    "expired",
    "wrong_audience",
    "no_audience",
    "wrong_issuer",
    "alg_none",
    "hs256_with_public_key",
    "rs256_unknown_key",
    "no_sub",
    "sub_too_long",
    "devices_not_a_list",
    "device_not_in_claim",
]


@pytest.mark.parametrize("case", CASES)
async def test_bad_tokens_are_refused_with_their_code(strict: LocalCluster, case: str) -> None:
    token, status, code = _token_cases(strict)[case]
    node = strict.live()[0]
    query = "device=phone" + (f"&token={token}" if token else "")
    assert (await refused(f"{node.ws_url}?{query}"))[:2] == (status, code)


@pytest.mark.parametrize(
    "kind",
    [
        "hs256_current",
        "hs256_old_secret",
        "rs256_pem",
        "es256_pem_rejected_unless_loaded",
        "rs256_jwks_kid",
    ],
)
async def test_accepted_token_kinds(strict: LocalCluster, kind: str) -> None:
    node = strict.live()[0]
    body = claims(user=f"tk-{kind}")
    token = {
        "hs256_current": lambda: jwt.encode(body, strict.token_secret, algorithm="HS256"),
        "hs256_old_secret": lambda: jwt.encode(body, OLD_SECRET, algorithm="HS256"),
        "rs256_pem": lambda: jwt.encode(body, RSA_KEY, algorithm="RS256"),
        "es256_pem_rejected_unless_loaded": lambda: jwt.encode(body, EC_KEY, algorithm="ES256"),
        "rs256_jwks_kid": lambda: jwt.encode(
            body, JWKS_KEY, algorithm="RS256", headers={"kid": "k1"}
        ),
    }[kind]()
    url = f"{node.ws_url}?token={token}&device=d"
    if kind.startswith("es256"):  # this node has an RSA PEM and an RSA JWKS: EC keys fail
        assert (await refused(url))[:2] == (4401, "invalid_token")
        return
    welcome = await handshake(url)
    assert (welcome["type"], welcome["user"]) == ("welcome", f"tk-{kind}")


async def test_es256_with_an_ec_public_key(tmp_path: Path) -> None:
    (tmp_path / "ec.pem").write_text(pem(EC_KEY))
    with make_cluster(
        tmp_path / "c", nodes=1, token_public_key_file=str(tmp_path / "ec.pem"), token_secret=""
    ) as cluster:
        node = cluster.live()[0]
        good = jwt.encode(
            {"sub": "ec-user", "exp": int(time.time()) + 60}, EC_KEY, algorithm="ES256"
        )
        assert (await handshake(f"{node.ws_url}?token={good}"))["user"] == "ec-user"
        hs = issue_token(cluster.token_secret, "x")  # HS256 is off: no secret on the node
        assert (await refused(f"{node.ws_url}?token={hs}"))[:2] == (4401, "invalid_token")


async def test_origin_allowlist(strict: LocalCluster) -> None:
    node = strict.live()[0]
    url = f"{node.ws_url}?token={tok(strict, claims(user='browser'))}"
    assert (await refused(url, [(b"Origin", b"https://evil.example")]))[:2] == (
        4403,
        "origin_not_allowed",
    )
    assert (await handshake(url, [(b"Origin", b"https://app.example")]))["type"] == "welcome"
    assert (await handshake(url))["type"] == "welcome"  # no Origin: not a browser


async def test_token_expiry_mid_session_closes_4401(strict: LocalCluster) -> None:
    node = strict.live()[0]
    token = tok(strict, claims(user="short-lived", ttl=2))
    with trio.fail_after(10):
        async with open_websocket_url(f"{node.ws_url}?token={token}") as ws:
            await ws.get_message()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    assert closed.value.reason.code == Close.TOKEN_EXPIRED


# ---------------------------------------------------------------- handshake-level input


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("device=", 4400, "bad_device"),
        ("device=" + "d" * 257, 4400, "bad_device"),
        ("device=a%0Ab", 4400, "bad_device"),
        ("last=-1", 4400, "bad_resume"),
        ("last=abc", 4400, "bad_resume"),
        ("blast=99999999999999999999", 4400, "bad_resume"),
        ("&".join(f"p{i}=1" for i in range(40)), 4400, "bad_query"),
    ],
)
async def test_bad_handshake_parameters(
    strict: LocalCluster, query: str, status: int, code: str
) -> None:
    node = strict.live()[0]
    token = tok(strict, claims(user="params"))
    assert (await refused(f"{node.ws_url}?token={token}&{query}"))[:2] == (status, code)


async def test_protected_metrics_need_an_api_key(strict: LocalCluster) -> None:
    node = strict.live()[0]
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        bare = await http.get("/metrics")
        assert (bare.status_code, bare.json()["error"]) == (401, "missing_api_key")
        assert (await http.get("/healthz")).status_code == 200  # probes stay open
    assert "meshpush_sessions" in (await api(strict, node, "GET", "/metrics")).text


async def test_wrong_path_is_404(strict: LocalCluster) -> None:
    node = strict.live()[0]
    url = node.ws_url.replace("/ws", "/admin") + f"?token={tok(strict, claims())}"
    assert (await refused(url))[:2] == (404, "not_found")


# ---------------------------------------------------------------- limits and floods


def raw_connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the node from ``source`` (any 127.x address is this machine)."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def ws_port(cluster: LocalCluster) -> int:
    return int(cluster.live()[0].ws_url.rsplit(":", 1)[1].split("/")[0])


def read_status(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    data = b""
    with sock:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body or b"{}")


async def test_handshake_flood_from_one_ip_is_rate_limited(limited: LocalCluster) -> None:
    burst, rate = 6, 2.0  # the fixture's handshake_burst and handshake_rate
    began = time.monotonic()
    socks = [raw_connect(ws_port(limited)) for _ in range(16)]
    # a refusal is answered at once; an admitted connection that sends nothing is dropped
    # silently at the handshake timeout (1.5 s). Which ones are admitted is not the order of
    # connecting: the node takes waiting connections in batches, and trio runs the tasks of
    # a batch in any order.
    answers = [read_status(s) if _answered(s) else None for s in socks]
    elapsed = time.monotonic() - began  # every admission happened within it
    refused = [a for a in answers if a is not None]
    # the bucket admits its burst plus what refills meanwhile (a node just started, on a
    # loaded machine, may take its accepts slowly)
    admitted = len(socks) - len(refused)
    assert burst <= admitted <= burst + rate * elapsed + 1, (admitted, elapsed)
    # a refill that comes while the per-IP cap (6) is full is refused by the cap: 429 too
    errors = {a[2]["error"] for a in refused}
    assert "rate_limited" in errors and errors <= {"rate_limited", "too_many_connections"}
    assert all(a[0] == 429 and int(a[1]["Retry-After"]) >= 1 for a in refused)
    await trio.sleep(3.5)  # refill before the next test
    metrics = (await api(limited, limited.live()[0], "GET", "/metrics")).text
    # the series exists at 0 from start (pre-created): the refusals must have counted
    counted = re.search(r'meshpush_rate_limited_total\{kind="handshake"\} (\S+)', metrics)
    limited_answers = sum(a[2]["error"] == "rate_limited" for a in refused)
    assert counted and float(counted.group(1)) >= limited_answers, metrics


def _answered(sock: socket.socket) -> bool:
    """Whether the node answered anything on ``sock`` before dropping it (a refusal is
    answered at once; an admitted connection that sends nothing is dropped silently)."""
    sock.settimeout(5)
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        sock.close()
    return bool(first)


async def test_connection_cap_per_ip(limited: LocalCluster) -> None:
    node = limited.live()[0]
    port = ws_port(limited)
    async with trio.open_nursery() as nursery:

        async def hold(i: int) -> None:
            token = issue_token(limited.token_secret, f"tab-{i}")
            async with open_websocket_url(f"{node.ws_url}?token={token}") as ws:
                await ws.get_message()
                await trio.sleep_forever()

        for i in range(6):  # max_connections_per_ip = 6
            nursery.start_soon(hold, i)
            await trio.sleep(0.55)  # stay under 2 handshakes/s
        await trio.sleep(0.5)
        status, _, body = read_status(raw_connect(port))
        nursery.cancel_scope.cancel()
    assert (status, body["error"]) in {(429, "too_many_connections")}
    await trio.sleep(3.5)


async def test_node_connection_cap_answers_503_with_retry_after(limited: LocalCluster) -> None:
    port = ws_port(limited)
    held = [raw_connect(port, "127.0.0.1") for _ in range(6)]
    held += [raw_connect(port, "127.0.0.2") for _ in range(2)]  # 8 = max_connections
    await trio.sleep(0.3)  # let the node admit them (its accept tasks run in any order)
    try:
        status, headers, body = read_status(raw_connect(port, "127.0.0.3"))
    finally:
        for s in held:
            s.close()
    assert (status, body["error"], headers["Retry-After"]) == (503, "node_full", "5")
    await trio.sleep(3.5)


async def test_slowloris_is_dropped_after_the_handshake_timeout(limited: LocalCluster) -> None:
    port = ws_port(limited)
    start = time.monotonic()
    with raw_connect(port) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        s.settimeout(10)
        for _ in range(5):
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.2)
        assert s.recv(1024) == b""  # closed by the server
    assert time.monotonic() - start < 8
    await trio.sleep(1)


async def test_per_user_session_cap(limited: LocalCluster) -> None:
    node = limited.live()[0]
    url = f"{node.ws_url}?token={issue_token(limited.token_secret, 'capped-user')}"
    with trio.fail_after(20):
        async with open_websocket_url(url) as a, open_websocket_url(url) as b:
            await a.get_message()
            await b.get_message()
            await trio.sleep(0.6)
            status, code, _ = await refused(url)
            assert (status, code) == (4429, "too_many_sessions")
    await trio.sleep(2)


async def test_frame_flood_closes_the_session_with_4429(limited: LocalCluster) -> None:
    node = limited.live()[0]
    url = f"{node.ws_url}?token={issue_token(limited.token_secret, 'flooder')}"
    with trio.fail_after(20):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(100):
                    await ws.send_message('{"type":"ping"}')
                while True:
                    await ws.get_message()
    assert closed.value.reason.code == Close.RATE_LIMITED
    await trio.sleep(2)


async def test_ip_blocklist_is_reloaded_without_restart(limited: LocalCluster) -> None:
    ipfilter = Path(limited.node_settings["ip_filter_file"])
    node = limited.live()[0]
    url = f"{node.ws_url}?token={issue_token(limited.token_secret, 'blocked-later')}"
    assert (await handshake(url))["type"] == "welcome"
    ipfilter.write_text("block 127.0.0.0/8\n")
    await trio.sleep(2.6)  # polled every 2 s
    try:
        sock = raw_connect(ws_port(limited))
        status, _, body = read_status(sock)
        assert (status, body["error"]) == (403, "ip_blocked")
        ipfilter.write_text("block 10.0.0.0/8   # a broken line follows\nallow nonsense\n")
        await trio.sleep(2.6)  # invalid file: the previous filter stays
        status, _, body = read_status(raw_connect(ws_port(limited)))
        assert status == 403
    finally:
        ipfilter.write_text("block 10.0.0.0/8\n")
        await trio.sleep(2.6)
    assert (await handshake(url))["type"] == "welcome"


# ---------------------------------------------------------------- isolation


async def test_a_token_only_ever_receives_its_own_users_messages(strict: LocalCluster) -> None:
    node = strict.live()[0]
    users = _same_slot_users()
    for u in users:  # stored while nobody listens: replay must not cross users either
        await publish(strict, node, u, {"for": u})
    tokens = {u: tok(strict, claims(user=u)) for u in users}
    # a query token wins over a header token, and the server says who you are
    url = f"{node.ws_url}?token={tokens[users[0]]}&device=x&last=0"
    headers = [(b"Authorization", f"Bearer {tokens[users[1]]}".encode())]
    with trio.fail_after(15):
        async with open_websocket_url(url, extra_headers=headers) as ws:
            welcome = json.loads(await ws.get_message())
            assert welcome["user"] == users[0]
            first = json.loads(await ws.get_message())
            assert first["data"] == {"for": users[0]}
            await publish(strict, node, users[1], {"for": users[1]})
            await ws.send_message(json.dumps({"type": "ping"}))
            assert json.loads(await ws.get_message()) == {"type": "pong"}  # nothing of B's
    assert slot(users[0]) == slot(users[1])


def _same_slot_users() -> list[str]:
    seen: dict[int, str] = {}
    for i in range(100_000):
        user = f"iso-{i}"
        other = seen.setdefault(slot(user), user)
        if other != user:
            return [other, user]
    raise AssertionError("no slot collision found")


async def test_redirect_frames_never_carry_credentials(tmp_path: Path) -> None:
    with make_cluster(tmp_path / "c", nodes=2) as cluster:
        for i in range(50):
            user = f"redir-{i}"
            owner = (
                await api(cluster, cluster.live()[0], "GET", "/v1/route", params={"user": user})
            ).json()["node"]
            if owner != cluster.live()[0].id:
                break
        token = issue_token(cluster.token_secret, user)
        async with open_websocket_url(f"{cluster.live()[0].ws_url}?token={token}") as ws:
            frame = json.loads(await ws.get_message())
        assert frame["type"] == "redirect"
        assert "?" not in frame["url"] and token not in json.dumps(frame)


# ---------------------------------------------------------------- fuzzing


async def test_live_fuzz_does_not_hurt_a_normal_client(strict: LocalCluster) -> None:
    """Thousands of random and malformed frames from several sockets; a bystander loses
    nothing and the node stays up."""
    node = strict.live()[0]
    rng = random.Random(7)
    bystander = "bystander"
    token = tok(strict, claims(user=bystander))

    async def fuzz(worker: int) -> None:
        url = f"{node.ws_url}?token={tok(strict, claims(user=f'fuzzer-{worker}'))}"
        sent = 0
        while sent < 600:
            try:
                async with open_websocket_url(url) as ws:
                    await ws.get_message()
                    while sent < 600:
                        await ws.send_message(_garbage(rng))
                        sent += 1
            except (ConnectionClosed, ConnectionRejected, OSError):
                sent += 1
                await trio.sleep(0.01)

    async def token_fn() -> str:
        return token

    async with open_client(node.ws_url, token=token_fn) as client, trio.open_nursery() as n:
        collector = Collector(client)
        n.start_soon(collector.run)
        with trio.fail_after(15):
            await client.wait_online()
        published = []
        async with trio.open_nursery() as fuzzers:
            for w in range(4):
                fuzzers.start_soon(fuzz, w)
            for i in range(40):
                published.append((await publish(strict, node, bystander, i))["seq"])
                await trio.sleep(0.02)
        await collector.wait_for(len(published))
        n.cancel_scope.cancel()
    assert collector.seqs()[-len(published) :] == published
    assert (await api(strict, node, "GET", "/healthz")).status_code == 200


def _garbage(rng: random.Random) -> str | bytes:
    choices = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        lambda: "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 64))),
        lambda: json.dumps(
            {
                "type": "ack",
                "ch": rng.choice(["user", "broadcast", "x", None]),
                "seq": rng.choice([-1, 0, 1, 2**70, "1", None, 1.5]),
            }
        ),
        lambda: json.dumps(
            {
                "type": rng.choice(["ping", "ack", "msg", "welcome", "", None]),
                "x": "y" * rng.randint(0, 100),
            }
        ),
        lambda: "[" * rng.randint(1, 2000),
        lambda: '{"type":"ping"}',
    ]
    return rng.choice(choices)()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"user": st.one_of(st.text(max_size=300), json_values), "data": json_values},
        optional={"id": st.one_of(st.text(max_size=300), json_values), "extra": json_values},
    ),
)


def post_sync(cluster: LocalCluster, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {cluster.api_key}"}
    return httpx.post(f"{cluster.live()[0].http_url}{path}", timeout=10, headers=headers, **kwargs)


API_ERRORS = {
    "bad_json",
    "bad_body",
    "missing_field",
    "unknown_field",
    "bad_user",
    "bad_id",
    "too_large",
}


def stored_count(cluster: LocalCluster) -> int:
    """Messages in the user stream, read straight from JetStream."""

    async def go() -> int:
        nc = await nats.connect(cluster.nats_url)
        try:
            info = await nc.jetstream().stream_info(f"MP_{cluster.cluster}_USER")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_http_api_fuzz_answers_documented_codes_and_stores_only_what_it_accepts(
    strict: LocalCluster,
) -> None:
    before = stored_count(strict)
    accepted: list[int] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def probe(body: Any) -> None:
        resp = post_sync(strict, "/v1/publish", json=body)
        assert resp.status_code in (202, 400, 413), resp.text
        answer = resp.json()
        if resp.status_code != 202:
            assert answer["error"] in API_ERRORS
        elif not answer["duplicate"]:
            accepted.append(answer["seq"])

    probe()
    assert stored_count(strict) - before == len(accepted)


# ---------------------------------------------------------------- TLS


async def test_tls_round_trip_with_a_generated_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with make_cluster(
        tmp_path / "c",
        nodes=1,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.pem"),
    ) as cluster:
        node = cluster.live()[0]
        assert node.ws_url.startswith("wss://") and node.http_url.startswith("https://")
        body = {"user": "tls-user", "data": "secret"}
        headers = {"authorization": f"Bearer {cluster.api_key}"}
        async with open_client(
            node.ws_url,
            token=issue_token(cluster.token_secret, "tls-user"),
            ca_file=str(tmp_path / "ca.pem"),
        ) as client:
            with trio.fail_after(15):
                await client.wait_online()
            async with httpx.AsyncClient(
                verify=ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            ) as http:
                resp = await http.post(f"{node.http_url}/v1/publish", json=body, headers=headers)
            assert resp.status_code == 202
            assert (await receive(client)).data == "secret"
        # without the CA the SDK refuses the server's certificate
        async with open_client(
            node.ws_url, token=issue_token(cluster.token_secret, "x"), backoff_cap=0.2
        ) as untrusting:
            await trio.sleep(1.5)
            assert untrusting.stats.welcomes == 0
            assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stats.last_error


async def test_tls_handshake_refusals_keep_their_code(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with make_cluster(
        tmp_path / "c",
        nodes=1,
        tls_cert_file=str(tmp_path / "s.pem"),
        tls_key_file=str(tmp_path / "s.pem"),
    ) as cluster:
        async with open_client(
            cluster.live()[0].ws_url,
            token="forged.token.value",
            ca_file=str(tmp_path / "ca.pem"),
            backoff_cap=0.2,
        ) as client:
            await trio.sleep(1.0)
        assert client.stats.welcomes == 0
        assert client.stats.rejections >= 1
        assert "4401 invalid_token" in client.stats.last_error  # read through TLS
        assert client.stats.final_close == Close.TOKEN_EXPIRED  # a fixed bad token: it stops


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=2000))
def test_http_api_fuzz_raw_bytes(strict: LocalCluster, raw: bytes) -> None:
    resp = post_sync(strict, "/v1/broadcast", content=raw)
    if resp.status_code == 202:  # the bytes happened to be a valid broadcast body
        assert set(json.loads(raw)) <= {"data", "id"}
    else:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] in API_ERRORS
