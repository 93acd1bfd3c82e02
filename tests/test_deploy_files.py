"""Static checks of the Helm chart, the Grafana dashboard and docs/operations.md (no servers).

Metric names used by the dashboard and the alert rules must exist in meshpush/observe/metrics.py,
and the operations guide must name every setting and metric.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpush.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "meshpush"
DASHBOARD = ROOT / "grafana" / "meshpush-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_PY = ROOT / "meshpush" / "observe" / "metrics.py"

METRIC_REF = re.compile(r"\bmeshpush_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def defined_metrics() -> set[str]:
    names = set(re.findall(r"[\"'](meshpush_[a-z0-9_]+)[\"']", METRICS_PY.read_text()))
    assert names, "no metric names found in meshpush/observe/metrics.py"
    return names


def known(name: str, defined: set[str]) -> bool:
    if name in defined:
        return True
    return any(name.endswith(sfx) and name[: -len(sfx)] in defined for sfx in SUFFIXES)


def chart_yaml_files() -> list[Path]:
    templates = CHART / "templates"
    return sorted(
        p for p in CHART.rglob("*") if p.suffix in (".yaml", ".yml") and templates not in p.parents
    )


def test_chart_yaml_files_load() -> None:
    yaml = pytest.importorskip("yaml")
    files = chart_yaml_files()
    assert {p.name for p in files} >= {"Chart.yaml", "values.yaml"}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "meshpush"
    assert chart["version"]
    assert not chart.get("dependencies"), "the chart has no external dependencies"


def test_values_config_keys_are_settings() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert set(config) <= fields, set(config) - fields
    assert all(isinstance(v, str) for v in config.values()), "quote every config value"


def values_config_block() -> list[str]:
    """The lines of the top-level `config:` mapping of values.yaml, comments included."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index("config:") + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith((" ", "#")):
            break
        block.append(line)
    return block


def test_values_commented_config_examples_are_settings() -> None:
    examples = {}
    for line in values_config_block():
        match = re.fullmatch(r"  # ([a-z][a-z0-9_]*): (.*)", line)
        if match:
            examples[match.group(1)] = match.group(2)
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert examples, "no commented config examples found"
    assert set(examples) <= fields, set(examples) - fields
    unquoted = {k for k, v in examples.items() if not re.fullmatch(r'"[^"]*"', v)}
    assert not unquoted, f"quote every config example: {unquoted}"


def test_chart_managed_settings_are_settings() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    match = re.search(r'range \$key := list ((?:"[a-z_]+" ?)+)', helpers)
    assert match, "the list of chart-managed settings was not found in _helpers.tpl"
    managed = set(re.findall(r'"([a-z_]+)"', match.group(1)))
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert managed <= fields, managed - fields
    config = set(values_config_keys())
    assert not managed & config, managed & config


def values_config_keys() -> list[str]:
    yaml = pytest.importorskip("yaml")
    return list(yaml.safe_load((CHART / "values.yaml").read_text())["config"])


def dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def test_dashboard_uses_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "node" in variables
    queries = list(dashboard_queries(dashboard["panels"])) + list(
        dashboard_queries(dashboard["templating"])
    )
    used = {m for q in queries for m in METRIC_REF.findall(q)}
    assert len(used) >= 10
    defined = defined_metrics()
    assert {m for m in used if not known(m, defined)} == set()


def test_alert_rules_use_only_defined_metrics() -> None:
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    used = set(METRIC_REF.findall(text))
    assert used
    defined = defined_metrics()
    assert {m for m in used if not known(m, defined)} == set()


def test_operations_guide_names_every_setting_and_metric() -> None:
    doc = OPERATIONS.read_text()
    for f in dataclasses.fields(Settings):
        env, flag = "MESHPUSH_" + f.name.upper(), "--" + f.name.replace("_", "-")
        assert f"`{env}`" in doc and f"`{flag}`" in doc, f.name
    for name in defined_metrics():
        assert f"`{name}`" in doc, name


# --------------------------------------------------------------------------- rendered chart
# Rendered with the pinned helm-python-sdk wheel (Helm's own Go code: no helm binary), linted
# strict, and every object validated strict against Kubernetes 1.29 and the newest schema
# kubernetes-validate ships.

AUTH = {"auth": {"tokenSecret": "test-secret", "apiKeys": ["key-1", "key-2"]}}
# kinds of CustomResourceDefinitions: kubernetes-validate has no schema for them
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}
KUBE_VERSIONS = ("1.29.0", "latest")

COMBOS: dict[str, dict[str, Any]] = {
    "defaults": AUTH,
    "tls-ingress-netpol-monitoring": {
        **AUTH,
        "replicaCount": 4,
        "tls": {"secretName": "push-tls"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "$(POD_NAME).push.example.com",
            "entryHost": "push.example.com",
            "tls": {"secretName": "push-ingress-tls"},
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"},
        },
        "networkPolicy": {
            "enabled": True,
            "wsFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "nats"}}}]}],
        },
        "config": {"max_connections": 1000000, "protect_metrics": True, "log_format": "json"},
        "serviceMonitor": {"enabled": True, "bearerTokenSecret": {"name": "m", "key": "k"}},
        "prometheusRule": {"enabled": True},
    },
    "hpa-httproute-jwks-existing-secret": {
        "auth": {
            "existingSecret": "push-auth",
            "jwks": {"configMap": "push-keys", "publicKeyKey": "key.pem"},
        },
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5},
        "httpRoute": {
            "enabled": True,
            "host": "$(POD_NAME).push.example.com",
            "entryHost": "push.example.com",
            "parentRefs": [{"name": "gw", "namespace": "gateways"}],
        },
        "perPodService": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "ipfilter-loadbalancer-minimal": {
        **AUTH,
        "replicaCount": 1,
        "ipFilter": {"rules": "allow 10.0.0.0/8\nblock 10.1.0.0/16\n"},
        "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
        "podDisruptionBudget": {"enabled": False},
        "serviceAccount": {"create": False},
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "failureThreshold": 5},
    },
    "strings-lists-overrides": {
        **AUTH,
        "fullnameOverride": "push",
        "publicWsUrl": "wss://$(POD_NAME).ws.example.com/ws",
        "config": {
            "allowed_origins": ["https://a.example.com", "https://b.example.com"],
            "trusted_proxies": ["10.244.0.0/16", "fd00:10:244::/56"],
            "proxy_protocol": "true",
            "max_message_age": "1209600",
            "handshake_rate": 0.5,
            "log_level": "debug",
        },
        "terminationGracePeriodSeconds": 60,
    },
}


def helm_sdk() -> Any:
    return pytest.importorskip("helm_python", reason="pip install -e '.[test]' (helm-python-sdk)")


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    chart = helm_sdk().Chart.load(CHART)
    rendered = chart.render(values, name="push", namespace="push")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [sts] = by_kind(docs, "StatefulSet")
    [main] = sts["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = main
    return result


@pytest.mark.parametrize("combo", list(COMBOS))
def test_chart_lints_strict(combo: str) -> None:
    report = helm_sdk().lint(
        CHART, COMBOS[combo], strict=True, namespace="push", kube_version="v1.29.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("combo", list(COMBOS))
def test_rendered_objects_are_valid_kubernetes(combo: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = render(COMBOS[combo])
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Service", "ConfigMap"}
    for version in KUBE_VERSIONS:
        target = kv.utils.latest_version() if version == "latest" else version
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                assert doc["apiVersion"].split("/")[0].endswith((".coreos.com", ".k8s.io"))
                continue
            try:
                kv.validate(doc, target, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(
                    f"{doc['kind']}/{doc['metadata']['name']} invalid for {target}: {exc.message}"
                ) from None


def test_numbers_and_lists_render_as_the_node_reads_them() -> None:
    docs = render(COMBOS["tls-ingress-netpol-monitoring"]) + render(
        COMBOS["strings-lists-overrides"]
    )
    data: dict[str, str] = {}
    for cm in by_kind(docs, "ConfigMap"):
        data.update(cm.get("data") or {})
    assert data["MESHPUSH_MAX_CONNECTIONS"] == "1000000"
    assert data["MESHPUSH_PROTECT_METRICS"] == "true"
    assert data["MESHPUSH_MAX_MESSAGE_AGE"] == "1209600"
    assert data["MESHPUSH_HANDSHAKE_RATE"] == "0.5"
    assert data["MESHPUSH_ALLOWED_ORIGINS"] == "https://a.example.com,https://b.example.com"
    assert data["MESHPUSH_TRUSTED_PROXIES"] == "10.244.0.0/16,fd00:10:244::/56"
    env = {k.removeprefix("MESHPUSH_").lower(): v for k, v in data.items()}
    from meshpush.settings import from_sources

    from_sources(env={f"MESHPUSH_{k.upper()}": v for k, v in env.items()})  # the node accepts


def test_probes_and_image() -> None:
    main = container(render(AUTH))
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert main["image"] == "meshpush:0.1.0"
    tls = container(render(COMBOS["tls-ingress-netpol-monitoring"]))
    assert {tls[p]["httpGet"].get("scheme") for p in ("startupProbe", "livenessProbe")} == {"HTTPS"}


def test_ingress_gives_each_pod_its_public_host() -> None:
    docs = render(COMBOS["tls-ingress-netpol-monitoring"])
    [ingress] = by_kind(docs, "Ingress")
    rules = {
        r["host"]: r["http"]["paths"][0]["backend"]["service"]["name"]
        for r in ingress["spec"]["rules"]
    }
    pods = {f"push-meshpush-{i}.push.example.com": f"push-meshpush-{i}" for i in range(4)}
    assert rules == {**pods, "push.example.com": "push-meshpush"}
    assert set(ingress["spec"]["tls"][0]["hosts"]) == set(rules)
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    assert set(pods.values()) <= services
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["MESHPUSH_PUBLIC_WS_URL"] == "wss://$(POD_NAME).push.example.com/ws"


def test_httproute_and_hpa() -> None:
    docs = render(COMBOS["hpa-httproute-jwks-existing-secret"])
    routes = by_kind(docs, "HTTPRoute")
    hosts = sorted(h for r in routes for h in r["spec"]["hostnames"])
    assert hosts == sorted(
        [f"push-meshpush-{i}.push.example.com" for i in range(5)] + ["push.example.com"]
    )
    [hpa] = by_kind(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    [sts] = by_kind(docs, "StatefulSet")
    assert "replicas" not in sts["spec"], "the HPA owns the replica count"
    [rule] = by_kind(docs, "PrometheusRule")
    missing = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert "< 2" in next(r["expr"] for r in missing if r["alert"] == "MeshpushNodesMissing")


def notes(values: dict[str, Any]) -> str:
    rendered = helm_sdk().Chart.load(CHART).render(values, name="push", namespace="push")
    return "".join(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def test_notes_say_where_client_addresses_come_from() -> None:
    trusted = notes(COMBOS["strings-lists-overrides"])
    assert "taken from the proxies in 10.244.0.0/16,fd00:10:244::/56" in trusted
    assert "a PROXY protocol header, required from them" in trusted
    xff = {**AUTH, "config": {"trusted_proxies": "10.244.0.0/16"}}
    assert "(X-Forwarded-For)" in notes(xff)
    assert "config.trusted_proxies is empty" in notes(COMBOS["tls-ingress-netpol-monitoring"])
    assert "Client addresses" not in notes(AUTH)  # no proxy in the chart, nothing to say


def test_network_policy() -> None:
    [policy] = by_kind(render(COMBOS["tls-ingress-netpol-monitoring"]), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert [r["ports"][0]["port"] for r in spec["ingress"]] == ["ws", "http"]
    assert spec["ingress"][1]["from"] == [{"podSelector": {}}]
    assert spec["egress"][0]["ports"][0] == {"port": 53, "protocol": "UDP"}
    assert not by_kind(render(AUTH), "NetworkPolicy")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"nats_ur": "nats://x:4222"}}, "nats_ur"),
        ({"replicas": "five"}, "replicas"),
        ({"replicaCount": "five"}, "replicaCount"),
        ({"replicaCount": 0}, "replicaCount"),
        ({"config": {"max_connections": "lots"}}, "max_connections"),
        ({"config": {"max_connections": 0}}, "max_connections"),
        ({"config": {"stream_replicas": 7}}, "stream_replicas"),
        ({"config": {"log_format": "xml"}}, "log_format"),
        ({"config": {"protect_metrics": "maybe"}}, "protect_metrics"),
        ({"config": {"cluster": "has.dots"}}, "cluster"),
        ({"config": {"trusted_proxies": ["10.0.0.0/8", "ingress-pods"]}}, "trusted_proxies"),
        ({"config": {"trusted_proxies": "10.0.0.0/8,0.0.0.0/0;"}}, "trusted_proxies"),
        ({"config": {"node_id": "n1"}}, "node_id"),
        ({"ports": {"ws": 70000, "http": 8900}}, "ws"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"service": {"type": "Ingress"}}, "type"),
        ({"ingress": {"enabled": True, "host": "push.example.com"}}, "host"),
        ({"publicWsUrl": "push.example.com"}, "publicWsUrl"),
    ],
)
def test_schema_refuses_mistakes(values: dict[str, Any], message: str) -> None:
    helm = helm_sdk()
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema({**AUTH, **values})
    with pytest.raises(helm.HelmValuesError):
        chart.render({**AUTH, **values}, name="push", namespace="push")


def schema_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "values_schema", ROOT / "deploy" / "helm" / "values_schema.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_is_generated_from_settings() -> None:
    module = schema_module()
    schema_file = CHART / "values.schema.json"
    assert schema_file.read_text() == module.render(), (
        "values.schema.json is stale: run .venv/bin/python deploy/helm/values_schema.py"
    )
    allowed = set(json.loads(schema_file.read_text())["properties"]["config"]["properties"])
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert allowed == fields - module.chart_managed()
    # every value the chart ships passes its own schema
    helm_sdk().Chart.load(CHART).validate_schema(AUTH)
