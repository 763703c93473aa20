"""The alerts and the dashboard's queries, checked by Prometheus' own promtool: every expression parses,
and each alert fires on the series that should fire it, and only then (`promtool test rules`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .chart_tools import MATRIX, NAMESPACE, RELEASE, ROOT, one, render

JOB = f"{RELEASE}-ling-operator-metrics"
DEPLOYMENT = {"namespace": "team-a", "deployment": "chat"}


def promtool() -> str:
    """Debian's prometheus package ships promtool; hack/prometheus.sh installs it when it is missing."""
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if found is None:
        subprocess.run(
            ["bash", str(ROOT / "hack" / "prometheus.sh"), "install"], check=True, capture_output=True
        )
        found = shutil.which("promtool") or "/usr/bin/promtool"
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rule_groups() -> list[dict[str, Any]]:
    return one(render(MATRIX["monitoring"]), "PrometheusRule")["spec"]["groups"]


def test_alert_rules_and_their_annotation_templates_are_valid(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(one(render({}), "ConfigMap")["data"]["ling-serving.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Grafana substitutes its variables before Prometheus sees the query.
    substituted = [
        e.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$deployment", ".*")
        for e in exprs
    ]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(substituted)]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = run_promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """An alert_rule_test entry: `labels` None means the alert must not be firing at `at`."""
    expected = [] if labels is None else [{"exp_labels": {"team": "ml-platform", **labels}}]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


# name -> (input series, expectations). Samples are one a minute; "AxN" holds A for N minutes and
# "A+BxN" grows by B a minute.
SCENARIOS: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "group-stuck": (
        [
            _series("ling_operator_groups_desired", DEPLOYMENT, "2x40"),
            _series("ling_operator_groups_ready", DEPLOYMENT, "1x40"),
        ],
        [
            _alert("LingGroupRendezvousStuck", "10m", None),  # not for 15m yet
            _alert("LingGroupRendezvousStuck", "20m", {"severity": "warning", **DEPLOYMENT}),
        ],
    ),
    "groups-ready": (
        [
            _series("ling_operator_groups_desired", DEPLOYMENT, "2x40"),
            _series("ling_operator_groups_ready", DEPLOYMENT, "2x40"),
        ],
        [_alert("LingGroupRendezvousStuck", "30m", None)],
    ),
    "restart-loop": (
        [_series("ling_operator_group_restarts_total", DEPLOYMENT, "0+0.2x60")],  # 6 restarts per 30 min
        [_alert("LingGroupRestartLoop", "40m", {"severity": "critical", **DEPLOYMENT})],
    ),
    "one-restart": (
        [_series("ling_operator_group_restarts_total", DEPLOYMENT, "0x10 1x50")],
        [_alert("LingGroupRestartLoop", "40m", None)],
    ),
    "pinned-at-max": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "10+2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", {"severity": "warning", **DEPLOYMENT})],
    ),
    "room-to-scale": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "2x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "10+2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", None)],
    ),
    "at-max-but-draining": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "200-2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", None)],
    ),
    "no-leader": (
        [
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "a"}, "0x20"),
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "b"}, "0x20"),
        ],
        [_alert("LingOperatorDown", "10m", {"severity": "critical", "job": JOB, "namespace": NAMESPACE})],
    ),
    "operator-not-scraped": (
        # Only another release's operator is scraped: this release's is absent.
        [_series("ling_operator_leader", {"job": "other-metrics", "namespace": "other", "pod": "x"}, "1x20")],
        [_alert("LingOperatorDown", "10m", {"severity": "critical", "job": JOB, "namespace": NAMESPACE})],
    ),
    "one-leader": (
        [
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "a"}, "1x20"),
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "b"}, "0x20"),
        ],
        [_alert("LingOperatorDown", "10m", None)],
    ),
    "reconcile-errors": (
        [
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "error"}, "0+1x60"),
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "ok"}, "0+2x60"),
        ],
        [_alert("LingReconcileErrors", "40m", {"severity": "warning", "namespace": NAMESPACE})],
    ),
    "rare-errors": (
        [
            _series(
                "ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "error"}, "0+0.01x60"
            ),
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "ok"}, "0+2x60"),
        ],
        [_alert("LingReconcileErrors", "40m", None)],
    ),
}


def test_every_alert_has_a_firing_and_a_quiet_scenario() -> None:
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"]}
    fired = {e["alertname"] for _, exps in SCENARIOS.values() for e in exps if e["exp_alerts"]}
    quiet = {e["alertname"] for _, exps in SCENARIOS.values() for e in exps if not e["exp_alerts"]}
    assert fired == alerts and quiet == alerts


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_alert_fires_exactly_when_it_should(scenario: str, tmp_path: Path) -> None:
    # Annotations are templates checked above; the unit test compares labels, so it drops them.
    groups = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in rule_groups()
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    series, expectations = SCENARIOS[scenario]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": expectations}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
