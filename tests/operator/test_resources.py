"""Pure builders: pods and Services from a spec."""

from __future__ import annotations

from typing import Any

import pytest
from ling_operator import api, resources
from podstate import OWNER, base_spec


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def test_pod_names_labels_dns_and_owner() -> None:
    spec = base_spec()
    pod = resources.build_pod(OWNER, spec, 1, 1)
    meta = pod["metadata"]
    assert meta["name"] == "ling-1-1"
    assert pod["spec"]["hostname"] == "ling-1-1"
    assert pod["spec"]["subdomain"] == "ling-ranks"
    labels = meta["labels"]
    assert labels["app.kubernetes.io/name"] == "ling-runtime"
    assert labels["app.kubernetes.io/instance"] == "ling"
    assert labels["app.kubernetes.io/managed-by"] == "ling-operator"
    assert labels["serving.ling.dev/deployment"] == "ling"
    assert (labels["serving.ling.dev/group"], labels["serving.ling.dev/rank"]) == ("1", "1")
    assert labels["serving.ling.dev/role"] == "worker"
    assert labels["serving.ling.dev/revision"] == resources.revision_of(spec)
    (ref,) = meta["ownerReferences"]
    assert ref == {
        "apiVersion": "serving.ling.dev/v1alpha1",
        "kind": "LingDeployment",
        "name": "ling",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize(("device", "gpus"), [("cuda", "2"), ("cpu", None)])
def test_gpu_requests_follow_gpus_per_pod(device: str, gpus: str | None) -> None:
    spec = base_spec(
        engine={"device": device},
        parallelism={"tensor": 4, "gpusPerPod": 2},
        template={"resources": {"requests": {"cpu": "4", "memory": "64Gi"}}},
    )
    res = container(resources.build_pod(OWNER, spec, 0, 0))["resources"]
    assert res["requests"]["cpu"] == "4"
    assert res.get("limits", {}).get("nvidia.com/gpu") == gpus
    assert res["requests"].get("nvidia.com/gpu") == gpus


def test_shm_is_memory_backed() -> None:
    pod = resources.build_pod(OWNER, base_spec(), 0, 0)
    (shm,) = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(pod)["volumeMounts"]


@pytest.mark.parametrize(
    ("source", "volume"),
    [
        (
            {"pvc": {"claimName": "weights", "path": "ling"}},
            {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
        ),
        ({"hostPath": {"path": "/data/ling"}}, {"hostPath": {"path": "/data/ling", "type": "Directory"}}),
        ({"huggingFace": {"repo": "inclusionAI/Ling-2.6-flash"}}, {"emptyDir": {}}),
    ],
)
def test_model_volume_per_source(source: dict[str, Any], volume: dict[str, Any]) -> None:
    spec = base_spec(model={"source": source})
    pod = resources.build_pod(OWNER, spec, 0, 0)
    (model,) = [v for v in pod["spec"]["volumes"] if v["name"] == "model"]
    assert {k: v for k, v in model.items() if k != "name"} == volume
    (mount,) = [m for m in container(pod)["volumeMounts"] if m["name"] == "model"]
    assert mount["mountPath"] == "/models"


def test_builtin_model_has_no_model_volume() -> None:
    spec = base_spec(model={"source": {"builtin": {}}}, engine={"device": "cpu"})
    pod = resources.build_pod(OWNER, spec, 0, 0)
    assert not [v for v in pod["spec"]["volumes"] if v["name"] == "model"]


def test_hugging_face_downloads_in_an_init_container_with_the_token_by_reference() -> None:
    spec = base_spec(
        model={
            "source": {
                "huggingFace": {
                    "repo": "inclusionAI/Ling-2.6-flash",
                    "revision": "v1",
                    "tokenSecretRef": {"name": "hf", "key": "token"},
                }
            }
        }
    )
    pod = resources.build_pod(OWNER, spec, 0, 1)
    (init,) = pod["spec"]["initContainers"]
    assert init["command"][:2] == ["python3", "-c"]
    assert init["command"][3:] == ["inclusionAI/Ling-2.6-flash", "v1", "/models/hf"]
    (token,) = [e for e in init["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "--model-path" in container(pod)["command"]
    assert container(pod)["command"][container(pod)["command"].index("--model-path") + 1] == "/models/hf"


def test_probes_only_on_rank0_and_startup_tolerates_the_load_time() -> None:
    spec = base_spec(runtime={"startupTimeoutSeconds": 3600})
    head = container(resources.build_pod(OWNER, spec, 0, 0))
    startup = head["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert head["readinessProbe"]["httpGet"]["path"] == "/health"
    worker = container(resources.build_pod(OWNER, spec, 0, 1))
    assert "readinessProbe" not in worker and "startupProbe" not in worker


def test_template_passes_through_and_contract_env_wins() -> None:
    spec = base_spec(
        template={
            "nodeSelector": {"pool": "h200"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "priorityClassName": "serving",
            "schedulerName": "volcano",
            "serviceAccountName": "ling",
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "LING_NODE_RANK", "value": "9"}],
            "labels": {"team": "ml", "serving.ling.dev/group": "bogus"},
            "annotations": {"a": "b"},
            "imagePullSecrets": [{"name": "regcred"}],
        }
    )
    pod = resources.build_pod(OWNER, spec, 0, 1)
    ps = pod["spec"]
    assert ps["nodeSelector"] == {"pool": "h200"}
    assert ps["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert (ps["priorityClassName"], ps["schedulerName"], ps["serviceAccountName"]) == (
        "serving",
        "volcano",
        "ling",
    )
    assert ps["imagePullSecrets"] == [{"name": "regcred"}]
    env = container(pod)["env"]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in env
    assert [e["value"] for e in env if e["name"] == "LING_NODE_RANK"] == ["1"]
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["labels"]["serving.ling.dev/group"] == "0"
    assert pod["metadata"]["annotations"]["a"] == "b"


def test_native_image_defaults_to_the_operator_setting() -> None:
    pod = resources.build_pod(OWNER, base_spec(), 0, 0, default_image="registry.local/ling:dev")
    assert container(pod)["image"] == "registry.local/ling:dev"


@pytest.mark.parametrize(
    ("change", "rolls"),
    [
        ({"speculative": {"enabled": True}}, True),
        ({"engine": {"image": "other:1"}}, True),
        ({"engine": {"extraArgs": ["--page-size", "32"]}}, True),
        ({"parallelism": {"tensor": 4, "gpusPerPod": 4}}, True),
        ({"model": {"source": {"hostPath": {"path": "/other"}}}}, True),
        ({"template": {"nodeSelector": {"a": "b"}}}, True),
        ({"replicas": 5}, False),
        ({"rollout": {"maxUnavailable": 2}}, False),
        ({"failurePolicy": {"backoffSeconds": 1}}, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 8}}, False),
    ],
)
def test_revision_hashes_exactly_what_reaches_the_pods(change: dict[str, Any], rolls: bool) -> None:
    before = resources.revision_of(base_spec())
    after = resources.revision_of(base_spec(**change))
    assert (before != after) is rolls


def test_services() -> None:
    ranks = resources.build_ranks_service(OWNER)
    assert ranks["metadata"]["name"] == "ling-ranks"
    assert ranks["spec"]["clusterIP"] == "None"
    assert ranks["spec"]["publishNotReadyAddresses"] is True
    assert ranks["spec"]["selector"] == {"serving.ling.dev/deployment": "ling"}
    assert {p["port"] for p in ranks["spec"]["ports"]} == {30000, 2345, 6379}
    clients = resources.build_client_service(OWNER)
    assert clients["metadata"]["name"] == "ling"
    assert clients["spec"]["selector"] == {
        "serving.ling.dev/deployment": "ling",
        "serving.ling.dev/role": "head",
    }
    assert clients["spec"]["ports"] == [
        {"name": "http", "port": 30000, "targetPort": "http", "protocol": "TCP"}
    ]
    for svc in (ranks, clients):
        assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_validated_spec_names_the_bad_field() -> None:
    with pytest.raises(api.ValidationError, match="gpusPerPod"):
        resources.validated_spec(
            {"model": {"source": {"builtin": {}}}, "parallelism": {"tensor": 4, "gpusPerPod": 3}}
        )
