"""The alert rules and the dashboard, checked without a cluster.

- deploy/prometheus/meshpush-rules.yaml is exactly the chart's PrometheusRule (rendered);
- `promtool check rules` accepts it and `promtool test rules` runs the threshold unit tests of
  deploy/prometheus/meshpush-rules.test.yaml;
- every labelled counter exists at zero from the start, for every known label value;
- every metric is on a dashboard panel or in an alert, or docs/operations.md says why not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_files import DASHBOARD, OPERATIONS, ROOT, dashboard_queries

from meshpush.observe.metrics import KNOWN_LABELS, Metrics

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "meshpush-rules.yaml"
RULE_TESTS = RULES_DIR / "meshpush-rules.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's prometheus package (apt-get install prometheus)",
)


def render_rules_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_rules", RULES_DIR / "render_rules.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_plain_rules_file_is_the_chart_prometheusrule() -> None:
    expected = render_rules_module().render()
    assert RULES.read_text() == expected, (
        "deploy/prometheus/meshpush-rules.yaml differs from the chart's PrometheusRule: run "
        ".venv/bin/python deploy/prometheus/render_rules.py"
    )


def test_every_alert_has_a_runbook_section_and_url() -> None:
    doc = OPERATIONS.read_text()
    for rule in rules():
        name = rule["alert"]
        assert f"\n### {name}\n" in doc, f"docs/operations.md has no section for {name}"
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://") and url.endswith("#" + name.lower()), url
        assert rule["labels"]["severity"] in ("critical", "warning"), name


@needs_promtool
def test_promtool_check_rules() -> None:
    assert PROMTOOL
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    """Thresholds and `for:` durations; annotations are stripped (promtool compares them whole,
    and `promtool check rules` already checks their templates)."""
    assert PROMTOOL
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a unit test"


def scrape_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_known_label_values_exist_at_zero_from_start() -> None:
    samples = scrape_samples(Metrics("n1").render().decode())
    for metric, labels in KNOWN_LABELS.items():
        assert metric in samples, f"{metric} is not a metric"
        for label, values in labels.items():
            seen = {s[0][label]: s[1] for s in samples[metric]}
            assert seen == dict.fromkeys(values, 0.0), metric
    labelled = {
        name
        for name, rows in samples.items()
        if name.endswith("_total") and any(row[0] for row in rows)
    }
    assert labelled == set(KNOWN_LABELS), "every labelled counter has its known values"


def metric_names() -> set[str]:
    return {
        m.name + ("_total" if m.type == "counter" else "")
        for m in Metrics("n1").registry.collect()
        if m.name.startswith("meshpush_")
    }


def not_shown_section() -> str:
    doc = OPERATIONS.read_text()
    match = re.search(r"Metrics on no panel and in no alert:(.*?)\n\n", doc, re.S)
    return match.group(1) if match else ""


def test_every_metric_is_on_a_panel_or_in_an_alert_or_explained() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    shown = " ".join(dashboard_queries(dashboard["panels"]))
    alerted = " ".join(rule["expr"] for rule in rules())
    explained = not_shown_section()
    for name in metric_names():
        base = name.removesuffix("_total")
        used = re.search(rf"\b{base}(_total|_bucket|_sum|_count)?\b", shown + " " + alerted)
        assert used or f"`{name}`" in explained, f"{name}: on no panel, in no alert, not explained"


def test_dashboard_has_job_and_namespace_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "job", "namespace", "node"]
    for query in dashboard_queries(dashboard["panels"]):
        assert 'job=~"$job"' in query and 'namespace=~"$namespace"' in query, query
