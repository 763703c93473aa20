"""The chart rendered by the real helm: lint, and what each rendering of the values matrix contains."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from .chart_tools import CHART, MATRIX, NAMESPACE, RELEASE, by_kind, one, render, run_helm

MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint_is_clean(case: str, tmp_path: Any) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(MATRIX[case]))
    proc = run_helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, "--values", str(values_file))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_is_labelled_and_namespaced_where_it_must_be(case: str) -> None:
    objects = render(MATRIX[case])
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE, (obj["kind"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", (obj["kind"], meta["name"])
        assert ("namespace" in meta) != (obj["kind"] in cluster_scoped), (obj["kind"], meta["name"])


def test_defaults_two_replicas_hardened_and_spread() -> None:
    objects = render({})
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    pod_sc, (container,) = spec["securityContext"], spec["containers"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == "ghcr.io/ling-serving/ling-operator:0.1.0"
    assert container["resources"]["requests"]["cpu"] == "100m"
    assert "--metrics-port=8080" in container["args"] and "--health-port=8081" in container["args"]
    assert "--lease-name=ling-ling-operator" in container["args"] and "--verbose" not in container["args"]
    assert not [a for a in container["args"] if a.startswith("--namespace")], (
        "default watches every namespace"
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["LING_RUNTIME_IMAGE"]["value"] == "ghcr.io/ling-serving/ling-runtime:0.1.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 8080
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Monitoring CRDs may be absent from the cluster: nothing of theirs is rendered unless asked for.
    assert not [o for o in objects if o["kind"] in MONITORING_KINDS]
    assert not by_kind(objects, "NetworkPolicy")


def test_default_rbac_is_cluster_wide_from_the_one_rules_file() -> None:
    objects = render({})
    rules = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    granted = {
        (group, resource, verb)
        for rule in one(objects, "ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    wanted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == wanted
    assert not by_kind(objects, "Role")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(objects, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]


def test_no_wildcards_in_the_rules() -> None:
    for rule in yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text()):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), rule


def test_watch_namespaces_gives_roles_per_namespace_and_only_cluster_reads_cluster_wide() -> None:
    objects = render(MATRIX["namespaced"])
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objects, "Role")}
    assert set(roles) == {"team-a", "team-b", NAMESPACE}
    bindings = {b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")}
    assert bindings == set(roles)
    namespaced_resources = {res for rule in roles["team-a"]["rules"] for res in rule["resources"]}
    assert {"lingdeployments", "pods", "services"} <= namespaced_resources
    cluster_rules = one(objects, "ClusterRole")["rules"]
    cluster_resources = {res for rule in cluster_rules for res in rule["resources"]}
    assert cluster_resources.isdisjoint({"pods", "services", "lingdeployments", "events", "leases"})
    for rule in cluster_rules:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]


def test_monitoring_objects_when_enabled() -> None:
    objects = render(MATRIX["monitoring"])
    service_monitor = one(objects, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    service = one(objects, "Service")
    for key, value in service_monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"][key] == value
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "ling-runtime",
        "serving.ling.dev/role": "head",  # rank 0 only: workers serve no /metrics
    }
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] == "http" and pod_endpoint["path"] == "/metrics"
    rule = one(objects, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    assert set(alerts) == {
        "LingGroupRendezvousStuck",
        "LingGroupPending",
        "LingGroupRestartLoop",
        "LingAutoscalerPinnedAtMax",
        "LingTimeToFirstTokenHigh",
        "LingKVCacheExhausted",
        "LingMTPAcceptanceLow",
        "LingServingMetricsAbsent",
        "LingOperatorDown",
        "LingReconcileErrors",
    }
    for name, alert in alerts.items():
        assert alert["labels"]["team"] == "ml-platform", name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["runbook_url"].endswith("#" + name.lower()), name
    # The operator-down alert watches this release's metrics Service, not some other operator's.
    assert f'job="{service["metadata"]["name"]}"' in alerts["LingOperatorDown"]["expr"]


def test_runbook_anchors_exist_in_the_observability_doc() -> None:
    doc = (CHART.parents[1] / "docs" / "observability.md").read_text().lower()
    rule = one(render(MATRIX["monitoring"]), "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for alert in (r for r in group["rules"] if "alert" in r):
            assert f"### {alert['alert'].lower()}" in doc, (
                f"docs/observability.md lacks a section on {alert['alert']}"
            )


def test_dashboard_configmap_is_valid_json_for_the_sidecar() -> None:
    configmap = one(render({}), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["ling-serving.json"])
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    for wanted in (
        "Queue depth per group",
        "Desired vs ready groups",
        "Scale decisions",
        "Rendezvous time",
        "Model load time",
        "Time to first token",
        "Inter-token latency",
        "Tokens per second",
        "MTP acceptance",
    ):
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_locked_down_values_reach_the_pods() -> None:
    objects = render(MATRIX["locked-down"])
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert spec["priorityClassName"] == "ling-ops-critical"
    assert "--verbose" in container["args"] and container["args"][-1] == "--resync-seconds=60"
    assert {"name": "LING_EXTRA", "value": "1"} in container["env"]
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    metrics_rule = policy["spec"]["ingress"][0]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == MATRIX["locked-down"]["networkPolicy"]["metricsFrom"]


def test_crds_rbac_and_service_account_can_be_left_to_the_platform() -> None:
    objects = render(MATRIX["no-crds-no-rbac"])
    kinds = {o["kind"] for o in objects}
    assert kinds.isdisjoint(
        {"CustomResourceDefinition", "ClusterRole", "Role", "ServiceAccount", "ConfigMap"}
    )
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    assert not by_kind(objects, "PodDisruptionBudget")


@pytest.mark.parametrize(("case", "kept"), [("defaults", True), ("crds-not-kept", False)])
def test_crd_is_a_template_kept_on_uninstall(case: str, kept: bool) -> None:
    crd = one(render(MATRIX[case]), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "lingdeployments.serving.ling.dev"
    annotations = crd["metadata"].get("annotations") or {}
    assert (annotations.get("helm.sh/resource-policy") == "keep") is kept


def test_single_replica_has_no_disruption_budget_that_blocks_drains() -> None:
    objects = render(MATRIX["single-replica"])
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    assert not by_kind(objects, "PodDisruptionBudget")


def test_notes_tell_how_to_use_the_release() -> None:
    # helm prints NOTES.txt on install only; a client-side dry run renders it without a cluster.
    notes = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client").stdout
    assert "every namespace" in notes and "kubectl get lingd" in notes
    assert "helm upgrade` upgrades it" in notes


def test_secret_access_can_be_dropped() -> None:
    def resources(objects: list[dict]) -> set[str]:
        return {
            r
            for o in objects
            if o["kind"] in ("ClusterRole", "Role")
            for rule in o["rules"]
            for r in rule["resources"]
        }

    assert "secrets" in resources(render({}))
    without = resources(render(MATRIX["crds-not-kept"]))
    assert "secrets" not in without and {"pods", "lingdeployments"} <= without
