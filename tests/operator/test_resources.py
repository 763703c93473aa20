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
        (
            {"huggingFace": {"repo": "inclusionAI/Ling-2.6-flash"}},
            {"hostPath": {"path": "/var/cache/ling/huggingface", "type": "DirectoryOrCreate"}},
        ),
        ({"huggingFace": {"repo": "inclusionAI/Ling-2.6-flash", "cache": "Pod"}}, {"emptyDir": {}}),
    ],
)
def test_model_volume_per_source(source: dict[str, Any], volume: dict[str, Any]) -> None:
    spec = base_spec(model={"source": source})
    pod = resources.build_pod(OWNER, spec, 0, 0)
    (model,) = [v for v in pod["spec"]["volumes"] if v["name"] == "model"]
    assert {k: v for k, v in model.items() if k != "name"} == volume
    (mount,) = [m for m in container(pod)["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}


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
                    "endpoint": "http://hf-mirror.internal:8080",
                }
            }
        }
    )
    pod = resources.build_pod(OWNER, spec, 0, 1)
    (init,) = pod["spec"]["initContainers"]
    target = "/models/inclusionAI--Ling-2.6-flash/v1"
    assert init["command"][:3] == ["python3", "-c", resources.HF_DOWNLOAD_SCRIPT]
    assert init["command"][3:] == ["inclusionAI/Ling-2.6-flash", "v1", target]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_ENDPOINT"]["value"] == "http://hf-mirror.internal:8080"
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    command = container(pod)["command"]
    assert command[command.index("--model-path") + 1] == target


@pytest.mark.parametrize(
    ("revision", "directory"),
    [("main", "main"), ("refs/pr/1", "refs_pr_1"), ("..", "_.."), ("v1.0", "v1.0")],
)
def test_hugging_face_revision_is_one_safe_directory(revision: str, directory: str) -> None:
    # The node cache is a host directory: a revision must never climb out of it.
    assert resources.rendezvous.hf_checkpoint_dir("org/name", revision) == f"/models/org--name/{directory}"


def test_api_key_comes_from_the_secret_as_env_never_a_flag() -> None:
    ref = {"name": "ling-api", "key": "key"}
    for engine, names in (
        ({"type": "native"}, {"LING_API_KEY"}),
        ({"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"}, {"LING_API_KEY", "VLLM_API_KEY"}),
    ):
        spec = base_spec(engine=engine, runtime={"apiKeySecretRef": ref})
        engine_container = container(resources.build_pod(OWNER, spec, 0, 0))
        secret_env = {e["name"]: e["valueFrom"] for e in engine_container["env"] if "valueFrom" in e}
        for name in names:
            assert secret_env[name] == {"secretKeyRef": ref}
        assert not any("api-key" in arg for arg in engine_container["command"])
        assert "ling-api" not in " ".join(engine_container["command"])


@pytest.mark.parametrize("drain", [30, 120])
def test_grace_period_covers_the_drain(drain: int) -> None:
    spec = base_spec(runtime={"drainTimeoutSeconds": drain})
    pod = resources.build_pod(OWNER, spec, 0, 0)
    assert pod["spec"]["terminationGracePeriodSeconds"] == drain + 15
    command = container(pod)["command"]
    assert command[command.index("--drain-timeout") + 1] == str(drain)
    # Liveness stays on /health: the kubelet stops liveness probes once a pod is being deleted, the
    # only time the drain (and its 503) happens (docs/engines.md).
    assert container(pod)["livenessProbe"]["httpGet"]["path"] == "/health"


def test_multi_pod_group_stays_in_one_domain_and_groups_spread() -> None:
    spec = base_spec(parallelism={"tensor": 4, "gpusPerPod": 2})
    affinity = resources.build_pod(OWNER, spec, 3, 1)["spec"]["affinity"]
    same_group = {"matchLabels": {"serving.ling.dev/deployment": "ling", "serving.ling.dev/group": "3"}}
    # By default only preferences: a required key some nodes lack would strand groups there.
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity["podAffinity"]
    preferred = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [(t["weight"], t["podAffinityTerm"]["topologyKey"]) for t in preferred] == [
        (100, "nvidia.com/gpu.clique"),
        (50, "kubernetes.io/hostname"),
        (25, "topology.kubernetes.io/zone"),
    ]
    assert all(t["podAffinityTerm"]["labelSelector"] == same_group for t in preferred)
    required = base_spec(
        parallelism={"tensor": 4, "gpusPerPod": 2},
        placement={"groupTopologyKey": "topology.kubernetes.io/zone"},
    )
    assert resources.build_pod(OWNER, required, 3, 1)["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ] == [{"labelSelector": same_group, "topologyKey": "topology.kubernetes.io/zone"}]
    (spread,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread["podAffinityTerm"] == {
        "labelSelector": {
            "matchLabels": {"serving.ling.dev/deployment": "ling"},
            "matchExpressions": [{"key": "serving.ling.dev/group", "operator": "NotIn", "values": ["3"]}],
        },
        "topologyKey": "kubernetes.io/hostname",
    }


def test_placement_keys_are_configurable_and_merge_with_template_affinity() -> None:
    node_affinity = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}]
        }
    }
    spec = base_spec(
        placement={
            "groupTopologyKey": "topology.ling.dev/rack",
            "preferredGroupTopologyKeys": ["topology.ling.dev/nvlink-domain"],
            "groupSpreadTopologyKey": "",
        },
        template={"affinity": {"nodeAffinity": node_affinity}},
    )
    affinity = resources.build_pod(OWNER, spec, 0, 0)["spec"]["affinity"]
    assert affinity["nodeAffinity"] == node_affinity
    (required,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "topology.ling.dev/rack"
    (preferred,) = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "topology.ling.dev/nvlink-domain"
    assert "podAntiAffinity" not in affinity


def test_single_pod_groups_get_no_group_affinity() -> None:
    spec = base_spec(parallelism={"tensor": 4, "gpusPerPod": 4}, placement={"groupSpreadTopologyKey": ""})
    assert "affinity" not in resources.build_pod(OWNER, spec, 0, 0)["spec"]


def test_topology_spread_constraints_pass_through_with_a_default_selector() -> None:
    mine = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    theirs = {**mine, "labelSelector": {"matchLabels": {"team": "x"}}, "matchLabelKeys": ["a"]}
    spec = base_spec(placement={"topologySpreadConstraints": [mine, theirs]})
    tsc = resources.build_pod(OWNER, spec, 0, 0)["spec"]["topologySpreadConstraints"]
    assert tsc == [
        {**mine, "labelSelector": {"matchLabels": {"serving.ling.dev/deployment": "ling"}}},
        theirs,
    ]


def test_gang_mode_makes_each_group_one_kueue_pod_group() -> None:
    spec = base_spec(placement={"gang": {"enabled": True, "queueName": "gpu-serving"}})
    pods = resources.build_group(OWNER, spec, 2)
    assert len(pods) == 2
    for pod in pods:
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-serving"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "ling-2"
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert annotations["kueue.x-k8s.io/retriable-in-group"] == "false"
    plain = resources.build_pod(OWNER, base_spec(), 2, 0)
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


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
        ({"model": {"dtype": "fp8"}}, True),
        ({"placement": {"groupTopologyKey": "topology.ling.dev/rack"}}, True),
        ({"runtime": {"drainTimeoutSeconds": 60}}, True),
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
    # A change that rolls the groups must change the pods themselves, or the rollout does nothing
    # (the issue: spec.model.dtype changed the revision but never reached the runtime).
    pods = []
    for spec in (base_spec(), base_spec(**change)):
        group = resources.build_group(OWNER, spec, 0)
        for pod in group:
            del pod["metadata"]["labels"][resources.LABEL_REVISION]
        pods.append(group)
    assert (pods[0] != pods[1]) is rolls


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
