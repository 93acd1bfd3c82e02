"""The dashboard and the alerts against a real Prometheus scraping a real 3-node cluster.

Debian's ``prometheus`` server scrapes every node each second and evaluates the plain rules
file (deploy/prometheus/meshpush-rules.yaml, identical to the chart's PrometheusRule) each
second, with every ``for:`` shortened so the test stays short. Then, in order:

1. healthy and quiet: every alert expression evaluates, none fires;
2. NATS killed before any publish succeeded: every publish fails (503), and
   MeshpushPublishErrorRateHigh and MeshpushNatsDisconnected fire;
3. NATS back, traffic (sessions, unicast, broadcast): every dashboard panel query and every
   template variable query evaluates and returns data;
4. one node SIGKILLed: MeshpushNodeDown (for that node) and MeshpushNodesMissing fire.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from conftest import make_cluster
from support import api, connected, publish, receive
from test_deploy_files import DASHBOARD, dashboard_queries
from test_prometheus_rules import RULES

from meshpush.local.devcluster import LocalCluster, Proc, free_port, spawn, wait_http

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not found: install Debian's prometheus package "
        "(apt-get install prometheus)",
    ),
]

FOR = "2s"  # every rule's `for:`, shortened
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval for the panel queries
NAMESPACE = "meshpush-test"  # a target label, as the Prometheus Operator would add


def write_config(workdir: Path, cluster: LocalCluster) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = FOR
    (workdir / "rules.yaml").write_text(yaml.safe_dump(doc))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": "meshpush",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{n.settings.http_port}" for n in cluster.members],
                        "labels": {"namespace": NAMESPACE},
                    }
                ],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[LocalCluster, str]]:
    """A 3-node cluster and a Prometheus scraping it; both stopped whatever the test did."""
    assert PROMETHEUS
    with make_cluster(tmp_path / "cluster") as cluster:
        port = free_port()
        config = write_config(tmp_path, cluster)
        prom: Proc = spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            tmp_path,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", 30, prom)
            yield cluster, f"http://127.0.0.1:{port}"
        finally:
            prom.stop(signal.SIGTERM, timeout=10)


class Prom:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def query(self, expr: str) -> list[dict[str, Any]]:
        resp = await self.http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def firing(self) -> list[dict[str, str]]:
        resp = await self.http.get("/api/v1/alerts")
        alerts = resp.json()["data"]["alerts"]
        return [a["labels"] for a in alerts if a["state"] == "firing"]

    async def wait_firing(self, alert: str, timeout: float = 45, **labels: str) -> None:
        with trio.move_on_after(timeout):
            while True:
                for fired in await self.firing():
                    if fired["alertname"] == alert and labels.items() <= fired.items():
                        return
                await trio.sleep(0.5)
        raise AssertionError(f"{alert} {labels} did not fire; firing: {await self.firing()}")


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    assert len(out) == len(list(dashboard_queries(dashboard["panels"])))
    return out


def variable_queries() -> list[tuple[str, str]]:
    """Grafana's label_values(<selector>, <label>) as the PromQL it runs: the label's values."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        inner = var["definition"].removeprefix("label_values(").removesuffix(")")
        selector, _, label = inner.rpartition(",")
        out.append((var["name"], f"count by ({label.strip()}) ({selector.strip()})"))
    return out


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$job", "meshpush")
        .replace("$namespace", NAMESPACE)
        .replace("$node", ".*")
    )


async def publish_status(cluster: LocalCluster, user: str) -> int:
    node = cluster.live()[len(user) % len(cluster.live())]
    body = {"user": user, "data": {"n": 1}}
    return (await api(cluster, node, "POST", "/v1/publish", json=body)).status_code


@pytest.mark.timeout(150)
async def test_dashboard_and_alerts_against_prometheus(stack: tuple[LocalCluster, str]) -> None:
    cluster, url = stack
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        prom = Prom(http)
        with trio.fail_after(30):
            while len(await _ready_targets(http)) < 3:
                await trio.sleep(0.3)

        # 1. healthy and quiet: every alert evaluates, none fires
        await trio.sleep(4)
        for name, expr in rule_exprs().items():
            await prom.query(expr)  # parses and evaluates
            assert name not in [a["alertname"] for a in await prom.firing()]

        # 2. NATS down before any publish succeeded: every publish fails
        assert cluster.nats
        cluster.nats.stop(signal.SIGKILL, timeout=10)
        async with trio.open_nursery() as nursery:

            async def keep_failing() -> None:
                for i in range(400):
                    # 504 until a node notices NATS is gone (its publish timed out), then 503
                    assert await publish_status(cluster, f"fail-{i}") in (503, 504)
                    await trio.sleep(0.2)

            nursery.start_soon(keep_failing)
            await prom.wait_firing("MeshpushPublishErrorRateHigh")
            await prom.wait_firing("MeshpushNatsDisconnected")
            nursery.cancel_scope.cancel()

        # 3. NATS back, traffic: every panel and variable returns data
        cluster.restart_nats()
        with trio.fail_after(30):  # every node reconnects on its own backoff: wait for each
            for node in cluster.live():
                body = {"user": "back", "data": {"n": 1}}
                while (
                    await api(cluster, node, "POST", "/v1/publish", json=body)
                ).status_code != 202:
                    await trio.sleep(0.3)
        await traffic(cluster)
        await trio.sleep(3)  # a few scrapes
        for title, expr in panel_queries():
            assert await prom.query(substitute(expr)), f"panel {title!r} has no data: {expr}"
        for name, expr in variable_queries():
            assert await prom.query(substitute(expr)), f"variable {name!r} has no values"

        # 4. one node killed: node down, nodes missing
        victim = cluster.live()[-1]
        cluster.kill(victim)
        instance = f"127.0.0.1:{victim.settings.http_port}"
        await prom.wait_firing("MeshpushNodeDown", instance=instance)
        await prom.wait_firing("MeshpushNodesMissing")


async def _ready_targets(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await http.get("/api/v1/query", params={"query": 'up{job="meshpush"} == 1'})
    if resp.status_code != 200:
        return []
    result: list[dict[str, Any]] = resp.json()["data"]["result"]
    return result


async def traffic(cluster: LocalCluster) -> None:
    """Sessions on every node, unicast and broadcast publishes, deliveries."""
    users = [f"traffic-{i}" for i in range(6)]
    async with connected(cluster, users[0]) as first, connected(cluster, users[1]) as second:
        for i, user in enumerate(users * 3):
            await publish(cluster, cluster.live()[i % 3], user, {"i": i})
        await api(cluster, cluster.live()[0], "POST", "/v1/broadcast", json={"data": "hi"})
        for client in (first, second):
            for _ in range(3):
                await receive(client)
