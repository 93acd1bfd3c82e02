"""Static checks of the Helm chart, the Grafana dashboard and docs/operations.md (no servers).

Metric names used by the dashboard and the alert rules must exist in meshpush/metrics.py, and
the operations guide must name every setting and metric.
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
METRICS_PY = ROOT / "meshpush" / "metrics.py"

METRIC_REF = re.compile(r"\bmeshpush_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def defined_metrics() -> set[str]:
    names = set(re.findall(r"[\"'](meshpush_[a-z0-9_]+)[\"']", METRICS_PY.read_text()))
    assert names, "no metric names found in meshpush/metrics.py"
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
