"""The monitoring files checked as they are: Prometheus's own checker on the config and the rules,
Grafana's provisioning against the dashboard, and every metric a query names is one Pendra
documents (and so, by tests/topology/test_metrics_table.py, exposes) or a recording rule."""

from __future__ import annotations

import subprocess

import yaml

from tests.support.metrics_table import documented_metrics
from tests.support.prometheus import CONFIG, ROOT, RULES, binary, dashboard, metric_names, panel_queries

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def recording_rules() -> dict[str, str]:
    rules = {}
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules[rule["record"]] = rule["expr"]
    return rules


def known_series() -> set[str]:
    names = set()
    for name, row in documented_metrics().items():
        if row.type == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = binary("promtool")
    checked = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout + checked.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES.glob("*.yml"))], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_rules_read_only_documented_metrics() -> None:
    rules, known = recording_rules(), known_series()
    assert len(rules) >= 10
    for record, expr in rules.items():
        assert record.count(":") == 2, f"{record}: level:metric:operations"
        unknown = metric_names(expr) - known
        assert not unknown, f"{record} reads {unknown}, which Pendra does not expose"


def test_the_dashboard_is_well_formed_and_names_only_real_series() -> None:
    board = dashboard()
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    (uid,) = [d["uid"] for d in datasources if d["type"] == "prometheus"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pendra.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"  # where compose mounts it

    assert board["uid"] == "pendra" and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Every panel reads the `datasource` variable, which defaults to the provisioned datasource
    # (compose) and lets Grafana elsewhere (a cluster's, whatever its datasource uid) pick its own.
    source, model = board["templating"]["list"]
    assert (source["name"], source["type"], source["query"]) == ("datasource", "datasource", "prometheus")
    assert source["current"]["value"] == uid
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels:
        assert panel["title"] and {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["datasource"] == chosen, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == chosen, panel["title"]
    assert model["name"] == "model_name" and model["datasource"] == chosen

    known = known_series() | set(recording_rules())
    for title, expr in panel_queries(board):
        unknown = metric_names(expr) - known
        assert not unknown, f"panel {title!r} reads {unknown}, which is neither exposed nor recorded"

    # What the issue asks the dashboard to show, each in some panel.
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "output tokens/s",
        "input tokens/s",
        "requests/s by status",
        "time to first token",
        "inter-token latency",
        "end-to-end latency",
        "running and waiting",
        "kv-cache",
        "decode speed",
        "loaded models",
        "installs in progress",
        "download throughput",
        "install failures by error code",
        "5xx ratio",
    ):
        assert wanted in titles, wanted
