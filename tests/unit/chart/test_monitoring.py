"""The chart's monitoring: the Grafana dashboard and the alert rules.

- The ConfigMap (Grafana's sidecar label) and the PrometheusRule render only when enabled,
  and carry the files under charts/phoenix/dashboards and charts/phoenix/rules unchanged.
- The rules pass `promtool check rules`, and `promtool test rules` sees each alert fire and
  not fire (tests/unit/chart/phoenix-alerts-test.yaml).
- The dashboard parses into the Grafana Foundation SDK's dashboard model with nothing left
  over (every field is one the schema knows, every query a Prometheus query).
- Every metric the dashboard and the rules name is one the operator exports.

promtool is built with the lab's binaries (lab/build-binaries.sh prometheus); the chaos e2e
runs every query against a real Prometheus scraping the operator."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from test_chart_render import CHART, by_kind, render

pytestmark = pytest.mark.unit

RULES = CHART / "rules" / "phoenix-alerts.yaml"
DASHBOARD = CHART / "dashboards" / "phoenix.json"
RULE_TESTS = CHART.parents[1] / "tests" / "unit" / "chart" / "phoenix-alerts-test.yaml"
ALERTS = {"PhoenixCheckpointTooOld", "PhoenixJobRecoveringTooLong",
          "PhoenixFailureBudgetNearlySpent", "PhoenixStandbyCannotStart",
          "PhoenixOperatorNoLeader"}


def promtool() -> str:
    from phoenix_lab.paths import bin_dir

    path = bin_dir() / "promtool"
    if not path.is_file():
        pytest.skip(f"promtool not built at {path} (bash lab/build-binaries.sh prometheus)")
    return str(path)


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def test_dashboard_and_rules_are_off_by_default():
    docs = render()
    assert not by_kind(docs, "PrometheusRule")
    assert not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_carries_the_sidecar_label_and_the_file_unchanged():
    docs = render("--set", "grafana.dashboard.enabled=true")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "phoenix-system"
    assert json.loads(cm["data"]["phoenix.json"]) == json.loads(DASHBOARD.read_text())
    # Another Grafana's sidecar: its own label and namespace, a folder annotation.
    docs = render("--set", "grafana.dashboard.enabled=true",
                  "--set", "grafana.dashboard.label=team.example/dashboard",
                  "--set-string", "grafana.dashboard.labelValue=ml",
                  "--set", "grafana.dashboard.namespace=monitoring",
                  "--set", "grafana.dashboard.annotations.grafana_folder=Training")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["team.example/dashboard"] == "ml"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Training"}


def test_prometheus_rule_ships_the_rules_file_and_needs_a_lease_for_the_leader_alert():
    docs = render("--set", "prometheusRule.enabled=true",
                  "--set", "prometheusRule.labels.release=kube-prometheus-stack")
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"] == rule_groups()
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == ALERTS
    # A standalone operator holds no Lease: phoenix_operator_leader stays 0 there.
    docs = render("--set", "prometheusRule.enabled=true", "--set", "replicaCount=1",
                  "--set", "leaderElection.enabled=false")
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == ALERTS - {"PhoenixOperatorNoLeader"}


def test_rules_pass_promtool_check():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout, out.stdout


def test_each_alert_fires_and_stays_quiet_under_promtool_test_rules():
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", ())}
    assert tested == ALERTS, "every alert needs its promtool test"
    out = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row"
            for t in p["targets"]]


def test_dashboard_parses_into_the_grafana_foundation_sdk_model_with_nothing_left_over():
    """The Grafana Foundation SDK (Grafana's own generated schema types, Apache-2.0): a field
    the schema does not know is dropped by the round trip, so a typo shows as a difference."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard, prometheus

    register_default_plugins()
    raw = json.loads(DASHBOARD.read_text())
    model = dashboard.Dashboard.from_json(raw)
    again = json.loads(json.dumps(model, cls=JSONEncoder))
    assert _left_over(raw, again) == []
    panels = [p for p in model.panels if isinstance(p, dashboard.Panel)]
    assert {p.type_val for p in panels} <= {"timeseries", "stat", "bargauge", "table"}
    for p in panels:
        assert p.targets and all(isinstance(t, prometheus.Dataquery) for t in p.targets), p.title
        if p.options is not None:  # the panel plugin's own options type, not a bare dict
            assert type(p.options).__module__.endswith(f".{p.type_val}"), p.title
    assert {v.name for v in model.templating.list_val} == {"datasource", "namespace", "phoenixjob"}


def _left_over(raw, parsed, path: str = "") -> list[str]:
    """Where `parsed` (the model's JSON) lost or changed something of `raw`."""
    if isinstance(raw, dict) and isinstance(parsed, dict):
        return [p for k, v in raw.items()
                for p in ([f"{path}/{k} dropped"] if k not in parsed
                          else _left_over(v, parsed[k], f"{path}/{k}"))]
    if isinstance(raw, list) and isinstance(parsed, list) and len(raw) == len(parsed):
        return [p for i, (a, b) in enumerate(zip(raw, parsed))
                for p in _left_over(a, b, f"{path}[{i}]")]
    return [] if raw == parsed else [f"{path}: {raw!r} became {parsed!r}"]


def test_dashboard_and_rules_name_only_metrics_the_operator_exports():
    from prometheus_client import REGISTRY

    import phoenix_operator.prometheus  # noqa: F401 - registers the operator's metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    exported = {m.name + s for m in REGISTRY.collect() for s in suffixes.get(m.type, ())}
    exprs = [e for _, e in dashboard_targets()]
    exprs += [r["expr"] for g in rule_groups() for r in g["rules"]]
    named = {n for e in exprs for n in re.findall(r"\b(phoenix_[a-z_]+)\b", e)}
    assert named and named <= exported, sorted(named - exported)


def test_every_dashboard_query_is_valid_promql_once_grafana_fills_its_variables(tmp_path):
    """promtool has no server-less query checker, but it parses every recording rule's
    expression: the dashboard's queries (as Grafana sends them) become recording rules."""
    from phoenix_lab.prometheus import alert_vectors, dashboard_queries

    queries = dashboard_queries(DASHBOARD)
    assert len(queries) == len(dashboard_targets())
    vectors = alert_vectors(RULES)
    assert {a for a, _ in vectors} == ALERTS  # each expr ends in one threshold, split off
    rules = [{"record": f"dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    rules += [{"record": f"alert:vector{i}", "expr": v} for i, (_, v) in enumerate(vectors)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout
