"""Render meshpush-rules.yaml: the Helm chart's PrometheusRule as a plain Prometheus rules file.

For a Prometheus without the Prometheus Operator that scrapes every node's /metrics in a job
named "meshpush" (see prometheus.example.yml). The chart stays the one source:
tests/test_prometheus_rules.py fails when this file and the chart differ. After changing the
rules in deploy/helm/meshpush/templates/prometheusrule.yaml run

    .venv/bin/python deploy/prometheus/render_rules.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "helm" / "meshpush"
RULES = HERE / "meshpush-rules.yaml"
# the chart's defaults, with a plain scrape job as the selector
VALUES: dict[str, Any] = {
    "prometheusRule": {"enabled": True, "selector": 'job="meshpush"'},
    "auth": {"tokenSecret": "unused", "apiKeys": ["unused"]},
}
HEADER = """\
# meshpush alerts for a Prometheus without the Prometheus Operator (rule_files: in
# prometheus.yml). Generated from the Helm chart's PrometheusRule by render_rules.py; do not edit
# by hand. Selects the scrape job "meshpush"; runbook: docs/operations.md, "Alerts".
"""


def chart_rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rendered = helm.Chart.load(CHART).render(
        values or VALUES, name="meshpush", namespace="meshpush"
    )
    manifest = yaml.safe_load(rendered["meshpush/templates/prometheusrule.yaml"])
    groups: list[dict[str, Any]] = manifest["spec"]["groups"]
    return groups


def render() -> str:
    return HEADER + yaml.safe_dump({"groups": chart_rule_groups()}, sort_keys=False, width=1000)


if __name__ == "__main__":
    RULES.write_text(render())
    print(f"wrote {RULES}")
