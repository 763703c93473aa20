"""Proof that the local control plane is a real Kubernetes: API semantics, controllers, scheduler, kwok."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.waiting import wait_for

if TYPE_CHECKING:
    from conftest import Kube

pytestmark = pytest.mark.cluster

VERSIONS = Path(__file__).resolve().parents[2] / "hack" / "versions.env"


def pinned(name: str) -> str:
    for line in VERSIONS.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip()
    raise KeyError(name)


def get_json(kube: Kube, *args: str) -> Any:
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def gpu_pod_manifest(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/ling-runtime:test",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ]
        },
    }


def test_versions_of_server_and_cached_kubectl(kube: Kube) -> None:
    got = json.loads(kube.kubectl("version", "-o", "json").stdout)
    k8s = pinned("K8S_VERSION")
    assert got["serverVersion"]["gitVersion"] == k8s
    assert got["clientVersion"]["gitVersion"] == k8s


def test_simulated_h200_nodes_are_ready_with_gpus(kube: Kube) -> None:
    nodes = get_json(kube, "nodes", "-l", "type=kwok")["items"]
    assert len(nodes) >= 4
    zones, racks = set(), set()
    for node in nodes:
        labels = node["metadata"]["labels"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H200"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["metadata"]["name"]
        zones.add(labels["topology.kubernetes.io/zone"])
        racks.add(labels["topology.ling.dev/rack"])
    assert len(zones) >= 2 and len(racks) >= 2


def test_crd_and_custom_object_round_trip(kube: Kube, namespace: str) -> None:
    group = f"g{secrets.token_hex(3)}.test.ling.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1, "default": 4},
                                        "name": {"type": "string"},
                                    },
                                },
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(crd))
    try:
        kube.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=60s")
        api = client.CustomObjectsApi(kube.api_client())
        created = api.create_namespaced_custom_object(
            group, "v1", namespace, "widgets",
            {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"name": "x"}},
        )  # fmt: skip
        # Defaulting happened on the server, from the schema.
        assert created["spec"] == {"name": "x", "size": 4}
        api.patch_namespaced_custom_object_status(
            group, "v1", namespace, "widgets", "w", {"status": {"phase": "Ready"}}
        )
        got = api.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w")
        assert got["status"] == {"phase": "Ready"} and got["spec"]["size"] == 4
        # Schema validation rejects a bad value with a message naming the field.
        with pytest.raises(ApiException) as bad:
            api.create_namespaced_custom_object(
                group, "v1", namespace, "widgets",
                {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "b"}, "spec": {"size": 0}},
            )  # fmt: skip
        assert bad.value.status == 422 and "spec.size" in bad.value.body
    finally:
        kube.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_deployment_pods_scheduled_on_gpu_nodes_and_running(kube: Kube, namespace: str) -> None:
    # Two pods of 5 GPUs each cannot share an 8-GPU node: the scheduler must spread them.
    pod = gpu_pod_manifest("x", 5)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "gpu"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "gpu"}},
            "template": {"metadata": {"labels": {"app": "gpu"}}, "spec": pod["spec"]},
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))

    def running_pods() -> list[dict[str, Any]] | None:
        pods = get_json(kube, "pods", "-n", namespace, "-l", "app=gpu")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        return running if len(running) == 2 else None

    pods = wait_for("2 Running GPU pods with pod IPs", running_pods, timeout=90)
    rs = get_json(kube, "replicasets", "-n", namespace, "-l", "app=gpu")["items"]
    assert len(rs) == 1 and rs[0]["metadata"]["ownerReferences"][0]["name"] == "gpu"
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2
    for p in pods:
        assert p["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"]
        node = get_json(kube, "node", p["spec"]["nodeName"])
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
        assert any(c["type"] == "PodScheduled" and c["status"] == "True" for c in p["status"]["conditions"])
    wait_for(
        "the Deployment to report 2 ready replicas",
        lambda: get_json(kube, "deployment", "gpu", "-n", namespace)["status"].get("readyReplicas") == 2,
    )


def test_impossible_gpu_request_stays_pending(kube: Kube, namespace: str) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_pod_manifest("huge", 9)))

    def failed_scheduling() -> dict[str, Any] | None:
        events = get_json(
            kube,
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=huge,reason=FailedScheduling",
        )["items"]
        return events[0] if events else None

    event = wait_for("a FailedScheduling event", failed_scheduling, timeout=60)
    assert "nvidia.com/gpu" in event["message"]
    pod = get_json(kube, "pod", "huge", "-n", namespace)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_owner_deletion_garbage_collects_dependents(kube: Kube, namespace: str) -> None:
    owner = json.loads(
        kube.kubectl(
            "create", "configmap", "owner", "-n", namespace, "--from-literal=a=b", "-o", "json"
        ).stdout
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    for i in range(2):
        dependent = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"dep-{i}", "ownerReferences": [ref]},
            "data": {"i": str(i)},
        }
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dependent))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)

    def dependents_gone() -> bool:
        names = [c["metadata"]["name"] for c in get_json(kube, "configmaps", "-n", namespace)["items"]]
        return not any(n.startswith("dep-") for n in names)

    wait_for("the garbage collector to delete the dependents", dependents_gone, timeout=60)


def test_lease_is_taken_and_guarded_by_resource_version(kube: Kube, namespace: str) -> None:
    api = client.CoordinationV1Api(kube.api_client())
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="leader"),
        spec=client.V1LeaseSpec(holder_identity="replica-a", lease_duration_seconds=15),
    )
    taken = api.create_namespaced_lease(namespace, lease)
    assert taken.spec.holder_identity == "replica-a"
    # The holder renews; a second candidate writing with the now stale resourceVersion loses: the
    # optimistic concurrency that leader election rests on.
    taken.spec.renew_time = datetime.now(UTC)
    renewed = api.replace_namespaced_lease("leader", namespace, taken)
    assert renewed.metadata.resource_version != taken.metadata.resource_version
    taken.spec.holder_identity = "replica-b"
    with pytest.raises(ApiException) as conflict:
        api.replace_namespaced_lease("leader", namespace, taken)
    assert conflict.value.status == 409
    assert api.read_namespaced_lease("leader", namespace).spec.holder_identity == renewed.spec.holder_identity


def test_kwok_leaves_nodes_without_the_fake_annotation_alone(kube: Kube, namespace: str) -> None:
    # The end-to-end executor registers nodes of its own; kwok must neither mark them Ready nor run
    # their pods.
    name = f"local-{secrets.token_hex(3)}"
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"ling.dev/test": "1"}}}
    kube.kubectl("create", "-f", "-", input=json.dumps(node))
    try:
        pod = gpu_pod_manifest("pinned", 0)
        pod["spec"]["nodeName"] = name
        pod["spec"]["containers"][0].pop("resources")
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
        # A control pod on a fake node, created after ours: once kwok has run it, kwok has had its chance
        # at ours too, so "still Pending" is kwok leaving it alone, not kwok being slow.
        fake = get_json(kube, "nodes", "-l", "type=kwok")["items"][0]["metadata"]["name"]
        control = gpu_pod_manifest("control", 0)
        control["spec"]["nodeName"] = fake
        control["spec"]["containers"][0].pop("resources")
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(control))
        wait_for(
            "kwok to run the control pod",
            lambda: get_json(kube, "pod", "control", "-n", namespace)["status"].get("phase") == "Running",
        )
        got = get_json(kube, "node", name)
        assert not any(c["type"] == "Ready" for c in got["status"].get("conditions", []))
        assert get_json(kube, "pod", "pinned", "-n", namespace)["status"]["phase"] == "Pending"
    finally:
        kube.kubectl("delete", "node", name, "--wait=false", check=False)


def test_helm_from_the_cache_installs_a_chart(kube: Kube, namespace: str, tmp_path: Path) -> None:
    version = kube.helm("version", "--short").stdout
    assert version.startswith(pinned("HELM_VERSION"))
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
        "  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    kube.helm(
        "install", "demo", str(chart), "-n", namespace, "--set", "greeting=hi", "--wait", "--timeout", "60s"
    )
    cm = get_json(kube, "configmap", "demo-cm", "-n", namespace)
    assert cm["data"]["greeting"] == "hi"
    assert cm["data"]["kube"] == pinned("K8S_VERSION")
    kube.helm("uninstall", "demo", "-n", namespace, "--wait")
    assert kube.kubectl("get", "configmap", "demo-cm", "-n", namespace, check=False).returncode != 0


def test_failure_stage_fails_a_labelled_running_pod(kube: Kube, namespace: str) -> None:
    # kwok's chaos stage from hack/kwok/stages: the failure injection later tests rely on.
    pod = gpu_pod_manifest("doomed", 1)
    pod["metadata"]["annotations"] = {"pod-container-running-failed.stage.kwok.x-k8s.io/exit-code": "137"}
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    wait_for(
        "the pod to run",
        lambda: get_json(kube, "pod", "doomed", "-n", namespace)["status"].get("phase") == "Running",
    )
    kube.kubectl(
        "label", "pod", "doomed", "-n", namespace, "pod-container-running-failed.stage.kwok.x-k8s.io=true"
    )
    status = wait_for(
        "the pod to fail",
        lambda: (s := get_json(kube, "pod", "doomed", "-n", namespace)["status"])["phase"] == "Failed" and s,
    )
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
