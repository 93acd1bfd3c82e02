"""JSON logs (``log_format=json``): one object a line, sessions as id + user hash, no secrets.

Unit tests drive meshpush.observe.logs directly; the integration test runs a real node with JSON
logs, publishes a known body with a known API key, receives it with a known token and greps the log.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_cluster
from support import api, connected, receive, token

from meshpush.observe import logs
from meshpush.settings import Settings


class FakeSession:
    def __init__(self, sid: int, user: str) -> None:
        self.id, self.user, self.device = sid, user, "d1"

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} device={self.device!r}>"


@pytest.fixture
def logged() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    settings = Settings(
        node_id="n7",
        log_format="json",
        log_level="debug",
        api_keys=("key-AAAA", "key-BBBB"),
        token_secret="s3cret-hs256",
        token_old_secrets=("old-s3cret",),
    )
    logs.setup(settings, stream=out)
    try:
        yield out, logging.getLogger("meshpush.test")
    finally:
        root.handlers[:], root.level = saved


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_fields(logged: tuple[io.StringIO, logging.Logger]) -> None:
    out, log = logged
    log.info("hello %s", "world")
    [line] = lines(out)
    assert line["event"] == "hello world"
    assert line["level"] == "INFO"
    assert line["node"] == "n7"
    assert line["logger"] == "meshpush.test"
    assert str(line["time"]).endswith("+00:00")
    assert "session" not in line and "user_hash" not in line


def test_session_is_an_id_and_a_user_hash(logged: tuple[io.StringIO, logging.Logger]) -> None:
    out, log = logged
    log.warning("replay for %r failed", FakeSession(42, "alice@example.com"))
    [line] = lines(out)
    assert line["session"] == 42
    assert line["user_hash"] == logs.user_hash("alice@example.com")
    assert "alice" not in out.getvalue()
    assert (
        line["event"]
        == f"replay for <Session 42 user#{logs.user_hash('alice@example.com')}> failed"
    )


def test_secrets_and_tokens_are_redacted(logged: tuple[io.StringIO, logging.Logger]) -> None:
    out, log = logged
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"
    log.info("key %s secret %s old %s token %s", "key-AAAA", "s3cret-hs256", "old-s3cret", jwt)
    try:
        raise RuntimeError(f"boom with key-BBBB and {jwt}")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    for secret in ("key-AAAA", "key-BBBB", "s3cret-hs256", "old-s3cret", jwt):
        assert secret not in text
    first, second = lines(out)
    assert first["event"] == "key [redacted] secret [redacted] old [redacted] token [redacted]"
    assert "RuntimeError: boom with [redacted] and [redacted]" in str(second["exception"])


def test_text_format_is_redacted_too() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    try:
        logs.setup(Settings(node_id="n1", api_keys=("key-CCCC",)), stream=out)
        logging.getLogger("meshpush.x").info("got key-CCCC from %r", FakeSession(3, "bob"))
    finally:
        root.handlers[:], root.level = saved
    text = out.getvalue()
    assert "INFO meshpush.x: got [redacted] from <Session 3 user#" in text
    assert "bob" not in text


@pytest.mark.parametrize("changes", [{"log_format": "xml"}, {"log_level": "chatty"}])
def test_bad_format_or_level_is_refused(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="bad value for log_"):
        logs.setup(Settings(**changes), stream=io.StringIO())


@pytest.mark.cluster
async def test_node_json_logs_hold_no_token_key_or_body(tmp_path: Path) -> None:
    body = {"secret-body": "the-known-body-7f3a9c"}
    with make_cluster(tmp_path / "c", nodes=1, log_format="json", log_level="DEBUG") as cluster:
        node = cluster.live()[0]
        user = "log-user@example.com"
        async with connected(cluster, user) as client:
            resp = await api(
                cluster, node, "POST", "/v1/publish", json={"user": user, "data": body}
            )
            assert resp.status_code == 202, resp.text
            msg = await receive(client)
            assert msg.data == body
        bad = await api(
            cluster,
            node,
            "POST",
            "/v1/publish",
            json={"user": user, "data": body},
            headers={"authorization": f"Bearer {token(cluster, user)}"},
        )
        assert bad.status_code == 401
        text = node.proc.log()
    known = [cluster.api_key, cluster.token_secret, token(cluster, user), "the-known-body-7f3a9c"]
    assert not [k for k in known if k in text]
    assert user not in text
    objects = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(o, dict) for o in objects)
    records = [o for o in objects if "level" in o]
    assert records, text
    assert all(o["node"] == node.id and o["time"] and o["event"] is not None for o in records)
