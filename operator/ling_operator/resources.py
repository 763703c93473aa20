"""Pure builders: a LingDeployment spec (+ group, rank) -> Pods and Services as Kubernetes JSON dicts.

No API calls here. The handlers create exactly what these functions return, and the revision label
(`revision_of`) hashes everything that reaches a pod, so a change to any of it is seen as "outdated
group" by reconcile.py and rolled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ling_operator import api, rendezvous

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "serving.ling.dev/deployment"
LABEL_GROUP = "serving.ling.dev/group"
LABEL_RANK = "serving.ling.dev/rank"
LABEL_ROLE = "serving.ling.dev/role"
LABEL_REVISION = "serving.ling.dev/revision"
APP_NAME = "ling-runtime"
MANAGED_BY = "ling-operator"

DEFAULT_RUNTIME_IMAGE = "ghcr.io/ling-serving/ling-runtime:0.1.0"
CONTAINER_NAME = "engine"
DOWNLOAD_CONTAINER_NAME = "model-download"
MODEL_VOLUME = "model"
SHM_VOLUME = "dshm"
PROBE_PERIOD_SECONDS = 10

# The downloader is a constant program; the repo, revision and target arrive as argv, never spliced
# into code. snapshot_download skips files already present, so a shared volume downloads only once.
HF_DOWNLOAD_SCRIPT = (
    "import sys\n"
    "from huggingface_hub import snapshot_download\n"
    "print(f'downloading {sys.argv[1]}@{sys.argv[2]} into {sys.argv[3]}', flush=True)\n"
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])\n"
    "print('download complete', flush=True)\n"
)


@dataclass(frozen=True)
class Owner:
    """The LingDeployment that owns (and garbage-collects) every object built here."""

    name: str
    namespace: str
    uid: str


def with_defaults(raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a stored spec with the API models and return it with every default filled in.

    Raises api.ValidationError (a ValueError) naming the field when the spec is not acceptable.
    """
    return api.LingDeploymentSpec.model_validate(dict(raw_spec)).to_k8s()


def pod_shaping(spec: Mapping[str, Any], default_image: str) -> dict[str, Any]:
    """The parts of a spec that reach a pod; replicas, autoscaling, rollout and failurePolicy do not."""
    engine = dict(spec["engine"])
    engine.setdefault("image", default_image)
    return {
        "model": spec["model"],
        "engine": engine,
        "parallelism": spec["parallelism"],
        "speculative": spec.get("speculative") or {},
        "runtime": spec.get("runtime") or {},
        "template": spec.get("template") or {},
    }


def revision_of(spec: Mapping[str, Any], default_image: str = DEFAULT_RUNTIME_IMAGE) -> str:
    canonical = json.dumps(pod_shaping(spec, default_image), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def deployment_labels(name: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_DEPLOYMENT: name,
    }


def pod_labels(name: str, group: int, rank: int, revision: str) -> dict[str, str]:
    return {
        **deployment_labels(name),
        LABEL_GROUP: str(group),
        LABEL_RANK: str(rank),
        LABEL_ROLE: "head" if rank == 0 else "worker",
        LABEL_REVISION: revision,
    }


def head_selector(name: str) -> dict[str, str]:
    """Rank-0 pods of a deployment: the client Service's and the scale subresource's selector."""
    return {LABEL_DEPLOYMENT: name, LABEL_ROLE: "head"}


def selector_string(selector: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


def _gpu_resources(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    template_resources = (spec.get("template") or {}).get("resources") or {}
    # Quantities are strings on the wire (the API accepts numbers, typed clients do not).
    limits = {k: str(v) for k, v in (template_resources.get("limits") or {}).items()}
    requests = {k: str(v) for k, v in (template_resources.get("requests") or {}).items()}
    if spec["engine"].get("device", "cuda") == "cuda":
        # Extended resources need requests == limits; the operator owns this one.
        gpus = str(int(spec["parallelism"]["gpusPerPod"]))
        limits["nvidia.com/gpu"] = gpus
        requests["nvidia.com/gpu"] = gpus
    resources: dict[str, dict[str, Any]] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _model_volume(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    source = spec["model"]["source"]
    if "pvc" in source:
        return {
            "name": MODEL_VOLUME,
            "persistentVolumeClaim": {"claimName": source["pvc"]["claimName"], "readOnly": True},
        }
    if "hostPath" in source:
        return {"name": MODEL_VOLUME, "hostPath": {"path": source["hostPath"]["path"], "type": "Directory"}}
    if "huggingFace" in source:
        return {"name": MODEL_VOLUME, "emptyDir": {}}
    return None


def _download_container(spec: Mapping[str, Any], image: str, pull_policy: str | None) -> dict[str, Any]:
    hf = spec["model"]["source"]["huggingFace"]
    env: list[dict[str, Any]] = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    token = hf.get("tokenSecretRef")
    if token:
        # By reference only: the operator never reads the Secret itself.
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token["key"]}}}
        )
    container: dict[str, Any] = {
        "name": DOWNLOAD_CONTAINER_NAME,
        "image": image,
        "command": [
            "python3",
            "-c",
            HF_DOWNLOAD_SCRIPT,
            hf["repo"],
            hf.get("revision") or "main",
            rendezvous.HF_DOWNLOAD_DIR,
        ],
        "env": env,
        "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": rendezvous.MODEL_MOUNT_PATH}],
    }
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    return container


def _http_probe(period: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": rendezvous.HTTP_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failure_threshold,
    }


def build_pod(
    owner: Owner,
    spec: Mapping[str, Any],
    group: int,
    rank: int,
    *,
    default_image: str = DEFAULT_RUNTIME_IMAGE,
) -> dict[str, Any]:
    """Pod `<name>-<group>-<rank>` of a group: one engine container holding gpusPerPod TP shards."""
    revision = revision_of(spec, default_image)
    nnodes = rendezvous.pods_per_group(spec)
    if not 0 <= rank < nnodes:
        raise ValueError(f"rank must be in 0..{nnodes - 1} (tensor / gpusPerPod), got {rank}")
    template = spec.get("template") or {}
    engine = spec["engine"]
    image = engine.get("image") or default_image
    pull_policy = engine.get("imagePullPolicy")
    name = rendezvous.pod_name(owner.name, group, rank)

    ours = rendezvous.rank_env(owner.name, owner.namespace, group, rank, nnodes)
    our_names = {item["name"] for item in ours}
    # The contract's variables win over pass-through env of the same name.
    env = [item for item in template.get("env") or [] if item.get("name") not in our_names] + ours

    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    # A shared shm emptyDir: NCCL and Ray's object store need far more than the default 64 MiB.
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    user_volumes = list(template.get("volumes") or [])
    model_volume = _model_volume(spec)
    if model_volume is not None:
        # A template volume named "model" (e.g. a shared RWX cache) replaces the per-pod one.
        if not any(v.get("name") == MODEL_VOLUME for v in user_volumes):
            volumes.append(model_volume)
        mounts.append(
            {
                "name": MODEL_VOLUME,
                "mountPath": rendezvous.MODEL_MOUNT_PATH,
                "readOnly": "huggingFace" not in spec["model"]["source"],
            }
        )
    volumes += user_volumes
    mounts += list(template.get("volumeMounts") or [])

    ports = [
        {"name": rendezvous.HTTP_PORT_NAME, "containerPort": rendezvous.HTTP_PORT, "protocol": "TCP"},
        {"name": rendezvous.DIST_PORT_NAME, "containerPort": rendezvous.DIST_PORT, "protocol": "TCP"},
        {"name": rendezvous.RAY_PORT_NAME, "containerPort": rendezvous.RAY_PORT, "protocol": "TCP"},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": rendezvous.engine_command(spec, rank),
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
    }
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    resources = _gpu_resources(spec)
    if resources:
        container["resources"] = resources
    if rank == 0:
        # Weight loading can take many minutes: the startup probe allows startupTimeoutSeconds before
        # liveness applies. Readiness is rank 0's /health, which fails while any rank is missing, so
        # the client Service only routes to groups that can generate.
        startup_timeout = int((spec.get("runtime") or {}).get("startupTimeoutSeconds", 1800))
        container["startupProbe"] = _http_probe(
            PROBE_PERIOD_SECONDS, max(1, math.ceil(startup_timeout / PROBE_PERIOD_SECONDS))
        )
        container["readinessProbe"] = _http_probe(5, 2)
        container["livenessProbe"] = _http_probe(PROBE_PERIOD_SECONDS, 6)

    labels = {**(template.get("labels") or {}), **pod_labels(owner.name, group, rank, revision)}
    annotations = dict(template.get("annotations") or {})
    if rank == 0:
        annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(rendezvous.HTTP_PORT),
                "prometheus.io/path": "/metrics",
            }
        )
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": rendezvous.ranks_service_name(owner.name),
        # A rank never restarts alone: a TP group cannot absorb a rejoining rank, so a dead container
        # ends the pod (phase Failed) and the operator restarts the whole group.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if "huggingFace" in spec["model"]["source"]:
        pod_spec["initContainers"] = [_download_container(spec, image, pull_policy)]
    for key in ("nodeSelector", "affinity", "priorityClassName", "schedulerName", "serviceAccountName"):
        if template.get(key):
            pod_spec[key] = template[key]
    for key in ("tolerations", "imagePullSecrets"):
        if template.get(key):
            pod_spec[key] = list(template[key])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": pod_spec,
    }


def build_group(
    owner: Owner, spec: Mapping[str, Any], group: int, *, default_image: str = DEFAULT_RUNTIME_IMAGE
) -> list[dict[str, Any]]:
    return [
        build_pod(owner, spec, group, rank, default_image=default_image)
        for rank in range(rendezvous.pods_per_group(spec))
    ]


def build_ranks_service(owner: Owner) -> dict[str, Any]:
    """Headless Service giving every rank a stable DNS name before it is Ready (the rendezvous)."""
    ports = [
        {"name": rendezvous.HTTP_PORT_NAME, "port": rendezvous.HTTP_PORT, "targetPort": rendezvous.HTTP_PORT},
        {"name": rendezvous.DIST_PORT_NAME, "port": rendezvous.DIST_PORT, "targetPort": rendezvous.DIST_PORT},
        {"name": rendezvous.RAY_PORT_NAME, "port": rendezvous.RAY_PORT, "targetPort": rendezvous.RAY_PORT},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous.ranks_service_name(owner.name),
            "namespace": owner.namespace,
            "labels": deployment_labels(owner.name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_DEPLOYMENT: owner.name},
            "ports": [{**p, "protocol": "TCP"} for p in ports],
        },
    }


def build_client_service(owner: Owner) -> dict[str, Any]:
    """The OpenAI endpoint: rank-0 pods only, and only Ready ones (Service endpoints skip not-ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": deployment_labels(owner.name),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(rendezvous.HTTP_PORT),
                "prometheus.io/path": "/metrics",
            },
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": head_selector(owner.name),
            "ports": [
                {
                    "name": rendezvous.HTTP_PORT_NAME,
                    "port": rendezvous.HTTP_PORT,
                    "targetPort": rendezvous.HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }
