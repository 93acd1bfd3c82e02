"""The publisher SDK (sync and asyncio) and `meshpush publish`, against a real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_publish import stored_count

from meshpush import cli
from meshpush.local.devcluster import LocalCluster, free_port
from meshpush.publisher import AsyncPublisher, Attempt, Failed, Message, Published, Publisher

pytestmark = pytest.mark.cluster


def urls(cluster: LocalCluster) -> list[str]:
    return [n.http_url for n in cluster.live()]


def test_sync_publisher_publishes_batches_users_and_broadcasts(cluster: LocalCluster) -> None:
    with Publisher(urls(cluster), cluster.api_key) as pub:
        one = pub.publish("sdk-a", {"n": 1})
        assert isinstance(one, Published) and not one.duplicate and one.user == "sdk-a"
        again = pub.publish("sdk-a", {"n": 1}, id=one.id)
        assert again.duplicate and again.seq == one.seq
        many = pub.publish_many(
            [Message("sdk-a", 2), {"user": "sdk-b", "data": 3, "id": "sdk-b-3"}, {"user": ""}]
        )
        assert isinstance(many[0], Published) and many[0].seq > one.seq
        assert isinstance(many[1], Published) and many[1].id == "sdk-b-3"
        assert isinstance(many[2], Failed) and many[2].code == "missing_field"
        users = pub.publish_users(["sdk-a", "sdk-b"], "all")
        assert [r.user for r in users] == ["sdk-a", "sdk-b"]
        assert all(isinstance(r, Published) and not r.duplicate for r in users)
        assert pub.broadcast({"b": 1}).seq > 0


def test_asyncio_publisher_publishes(cluster: LocalCluster) -> None:
    attempts: list[Attempt] = []

    async def go() -> None:
        async with AsyncPublisher(
            urls(cluster), cluster.api_key, on_attempt=attempts.append
        ) as pub:
            first = await pub.publish("sdk-aio", 1)
            results = await pub.publish_many([Message("sdk-aio", i) for i in range(2500)])
            assert all(isinstance(r, Published) for r in results)  # 3 batches of <= 1000
            seqs = [r.seq for r in results]
            assert seqs == sorted(seqs) and seqs[0] > first.seq
            again = await pub.publish_users(["sdk-aio"], 1, id=first.id)
            assert again[0].duplicate and again[0].seq == first.seq  # same user, same id
            assert (await pub.broadcast("x")).seq > 0

    asyncio.run(go())
    assert len(attempts) >= 6 and not attempts[-1].failed  # 1 + 3 batches + 1 + 1 (+ retries)


def test_publisher_fails_over_to_a_live_node(cluster: LocalCluster) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a node that is down
    attempts: list[Attempt] = []
    with Publisher(
        [down, *urls(cluster)], cluster.api_key, backoff=0.01, on_attempt=attempts.append
    ) as pub:
        for i in range(3):
            assert not pub.publish("sdk-failover", i).duplicate
    refused = attempts[0]  # the retry is silent, but on_attempt sees it
    assert refused.url.startswith(down) and refused.status == 0 and refused.failed
    assert refused.error.startswith("ConnectError")
    assert len([a for a in attempts if not a.failed]) >= 3  # one per publish (more: retries)


@contextlib.contextmanager
def black_hole(target_port: int) -> Iterator[str]:
    """A proxy that forwards requests to a node but never returns the answers (a timeout
    after the node did the work)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", target_port)) as upstream:
            client.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                upstream.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                threading.Thread(target=pump, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_retry_after_a_timeout_does_not_duplicate(cluster: LocalCluster) -> None:
    node = cluster.live()[0]
    port = int(node.http_url.rsplit(":", 1)[1])
    before = stored_count(cluster)
    attempts: list[Attempt] = []
    with (
        black_hole(port) as hole,
        Publisher(
            [hole, node.http_url],
            cluster.api_key,
            timeout=1.0,
            backoff=0.01,
            on_attempt=attempts.append,
        ) as pub,
    ):
        done = pub.publish("sdk-timeout", {"once": True})
    assert done.duplicate  # the first attempt was stored; the retry (same id) found it
    first, last = attempts[0], attempts[-1]
    assert (first.status, first.error.split(":")[0]) == (0, "ReadTimeout")
    assert (last.status, last.error, last.failed) == (202, "", False)
    assert stored_count(cluster) == before + 1


def test_cli_publish_prints_seq_and_duplicate(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dev.json"
    cluster.write_json(config)
    argv = ["publish", "--config", str(config), "--user", "cli-u", "--id", "cli-1", '"text"']
    assert cli.main(argv) == 0
    seq = capsys.readouterr().out.strip()
    assert seq.isdigit()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{seq} duplicate"


@pytest.mark.parametrize("data", ["hello", "{bad", "[NaN]"])
def test_cli_publish_refuses_invalid_json_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: str
) -> None:
    argv = ["publish", "--config", str(tmp_path / "none.json"), "--user", "u", data]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "to send a string" in err
