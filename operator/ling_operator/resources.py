"""Pure builders: a validated LingDeployment spec (+ group, rank) -> Pods and Services as Kubernetes JSON.

No API calls here. The handlers create exactly what these functions return, and the revision label
(`revision_of`) hashes everything that reaches a pod, so a change to any of it is seen as "outdated
group" by reconcile.py and rolled.
"""

from __future__ import annotations

import copy
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
# Rank 0 and the client Service: metrics on the HTTP port.
PROMETHEUS_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(rendezvous.HTTP_PORT),
    "prometheus.io/path": "/metrics",
}

# The downloader is a constant program: the repo, revision and target arrive as argv, never spliced into
# code. A file lock beside the target makes the pods of one node take turns: the first downloads, the
# others wait, then find every file in place (snapshot_download only checks them) - one download per
# node with the Node cache. Progress goes to the log every LING_DOWNLOAD_PROGRESS_SECONDS (10 s).
HF_DOWNLOAD_SCRIPT = """\
import fcntl, os, sys, threading, time
from huggingface_hub import HfApi, snapshot_download

repo, revision, target = sys.argv[1:4]
interval = float(os.environ.get("LING_DOWNLOAD_PROGRESS_SECONDS") or 10)


def log(message):
    print(f"model-download: {message}", flush=True)


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def on_disk():
    size = 0
    for root, _, files in os.walk(target):
        for name in files:
            try:
                size += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # renamed from .incomplete meanwhile
    return size


def expected():
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        return sum(f.size or 0 for f in info.siblings or []) or None
    except Exception as exc:
        log(f"total size unknown ({type(exc).__name__}: {exc}); progress in bytes only")
        return None


os.makedirs(target, exist_ok=True)
with open(target.rstrip("/") + ".lock", "a") as lock:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another pod on this node is downloading {repo}@{revision} into {target}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
        log("the other pod's download ended; checking the files")
    total = expected()
    start, done, before = time.monotonic(), threading.Event(), on_disk()

    def progress():
        while not done.wait(interval):
            have = on_disk()
            rate = (have - before) / (time.monotonic() - start) / 2**20
            share = f" of {gib(total)} ({100 * have / total:.1f}%)" if total else ""
            log(f"{gib(have)}{share} on disk, {rate:.1f} MiB/s")

    log(f"downloading {repo}@{revision} into {target}" + (f" ({gib(total)})" if total else ""))
    threading.Thread(target=progress, daemon=True).start()
    snapshot_download(repo_id=repo, revision=revision, local_dir=target)
    done.set()
    log(f"complete: {gib(on_disk())} in {target} after {time.monotonic() - start:.0f} s")
"""
# Kueue's pod-group labels and annotations (kubernetes-sigs/kueue, pkg/controller/jobs/pod).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
# Weights of the preferred group-affinity terms, in the order of placement.preferredGroupTopologyKeys.
PREFERRED_WEIGHTS = (100, 50, 25, 12, 6, 3, 2, 1)
SPREAD_WEIGHT = 50


@dataclass(frozen=True)
class Owner:
    """The LingDeployment that owns (and garbage-collects) every object built here."""

    name: str
    namespace: str
    uid: str


def validated_spec(raw_spec: Mapping[str, Any]) -> api.LingDeploymentSpec:
    """The stored spec as the API model, every default filled in.

    Raises api.ValidationError (a ValueError) naming the field when the spec is not acceptable.
    """
    return api.LingDeploymentSpec.model_validate(raw_spec)


POD_SHAPING = {"model", "engine", "parallelism", "speculative", "runtime", "placement", "template"}


def pod_shaping(spec: api.LingDeploymentSpec, default_image: str) -> dict[str, Any]:
    """The parts of a spec that reach a pod; replicas, autoscaling, rollout and failurePolicy do not."""
    shaping = spec.model_dump(mode="json", by_alias=True, exclude_none=True, include=POD_SHAPING)
    shaping["engine"].setdefault("image", default_image)
    return shaping


def revision_of(spec: api.LingDeploymentSpec, default_image: str = DEFAULT_RUNTIME_IMAGE) -> str:
    """Hash of everything that reaches a pod (a change rolls the groups); computed once per spec."""
    key = f"revision:{default_image}"
    if key not in spec._derived:
        canonical = json.dumps(pod_shaping(spec, default_image), sort_keys=True, separators=(",", ":"))
        spec._derived[key] = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    return str(spec._derived[key])


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


def _gpu_resources(spec: api.LingDeploymentSpec) -> dict[str, dict[str, Any]]:
    template_resources = spec.template.resources
    # Quantities are strings on the wire (the API accepts numbers, typed clients do not).
    limits = {k: str(v) for k, v in (template_resources.limits if template_resources else {}).items()}
    requests = {k: str(v) for k, v in (template_resources.requests if template_resources else {}).items()}
    if spec.engine.device == "cuda":
        # Extended resources need requests == limits; the operator owns this one.
        gpus = str(spec.parallelism.gpus_per_pod)
        limits["nvidia.com/gpu"] = gpus
        requests["nvidia.com/gpu"] = gpus
    resources: dict[str, dict[str, Any]] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _model_volume(spec: api.LingDeploymentSpec) -> dict[str, Any] | None:
    source = spec.model.source
    if source.pvc is not None:
        return {
            "name": MODEL_VOLUME,
            "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
        }
    if source.host_path is not None:
        return {"name": MODEL_VOLUME, "hostPath": {"path": source.host_path.path, "type": "Directory"}}
    hf = source.hugging_face
    if hf is not None:
        if hf.cache == "Node":
            # One directory per node, shared by every pod there (the download takes turns on a lock).
            return {
                "name": MODEL_VOLUME,
                "hostPath": {"path": hf.node_cache_path, "type": "DirectoryOrCreate"},
            }
        return {"name": MODEL_VOLUME, "emptyDir": {}}
    return None


def _download_container(hf: api.HuggingFaceSource, image: str, pull_policy: str | None) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        # The script logs its own progress lines; tqdm's carriage-return bars make unreadable pod logs.
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},
    ]
    if hf.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf.endpoint})
    token = hf.token_secret_ref
    if token is not None:
        # By reference only: the operator never reads the Secret itself.
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}
        )
    target = rendezvous.hf_checkpoint_dir(hf.repo, hf.revision)
    container: dict[str, Any] = {
        "name": DOWNLOAD_CONTAINER_NAME,
        "image": image,
        "command": ["python3", "-c", HF_DOWNLOAD_SCRIPT, hf.repo, hf.revision, target],
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


def _volumes(spec: api.LingDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, engine volume mounts): shm, the model, then the template's."""
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    # A shared shm emptyDir: NCCL and Ray's object store need far more than the default 64 MiB.
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    user_volumes = list(spec.template.volumes)
    model_volume = _model_volume(spec)
    if model_volume is not None:
        # A template volume named "model" (e.g. a shared RWX cache) replaces the per-pod one.
        if not any(v.get("name") == MODEL_VOLUME for v in user_volumes):
            volumes.append(model_volume)
        # The engine only reads the weights (the init container writes them).
        mounts.append({"name": MODEL_VOLUME, "mountPath": rendezvous.MODEL_MOUNT_PATH, "readOnly": True})
    return volumes + user_volumes, mounts + list(spec.template.volume_mounts)


def _engine_container(
    owner: Owner,
    spec: api.LingDeploymentSpec,
    group: int,
    rank: int,
    image: str,
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    ours = rendezvous.rank_env(owner.name, owner.namespace, group, rank)
    ours += rendezvous.engine_env(spec)
    our_names = {item["name"] for item in ours}
    # The contract's variables win over pass-through env of the same name.
    env = [item for item in spec.template.env if item.get("name") not in our_names] + ours
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
    if spec.engine.image_pull_policy:
        container["imagePullPolicy"] = spec.engine.image_pull_policy
    resources = _gpu_resources(spec)
    if resources:
        container["resources"] = resources
    if rank == 0:
        # Weight loading can take many minutes: the startup probe allows startupTimeoutSeconds before
        # liveness applies. Readiness is rank 0's /health, which fails while any rank is missing, so
        # the client Service only routes to groups that can generate.
        startup_timeout = spec.runtime.startup_timeout_seconds
        container["startupProbe"] = _http_probe(
            PROBE_PERIOD_SECONDS, max(1, math.ceil(startup_timeout / PROBE_PERIOD_SECONDS))
        )
        container["readinessProbe"] = _http_probe(5, 2)
        container["livenessProbe"] = _http_probe(PROBE_PERIOD_SECONDS, 6)
    return container


def _affinity(owner: Owner, spec: api.LingDeploymentSpec, group: int) -> dict[str, Any] | None:
    """template.affinity plus the placement rules: a multi-pod group's pods together (required in
    groupTopologyKey, preferred in preferredGroupTopologyKeys), other groups' pods apart (preferred)."""
    placement = spec.placement
    affinity: dict[str, Any] = copy.deepcopy(spec.template.affinity) if spec.template.affinity else {}
    same_group = {"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_GROUP: str(group)}}
    if spec.pods_per_group > 1:
        pod_affinity = affinity.setdefault("podAffinity", {})
        if placement.group_topology_key:
            pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(
                {"labelSelector": same_group, "topologyKey": placement.group_topology_key}
            )
        for weight, key in zip(PREFERRED_WEIGHTS, placement.preferred_group_topology_keys, strict=False):
            if key:
                pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
                    {"weight": weight, "podAffinityTerm": {"labelSelector": same_group, "topologyKey": key}}
                )
        if not pod_affinity:
            del affinity["podAffinity"]
    if placement.group_spread_topology_key:
        other_groups = {
            "matchLabels": {LABEL_DEPLOYMENT: owner.name},
            "matchExpressions": [{"key": LABEL_GROUP, "operator": "NotIn", "values": [str(group)]}],
        }
        term = {"labelSelector": other_groups, "topologyKey": placement.group_spread_topology_key}
        affinity.setdefault("podAntiAffinity", {}).setdefault(
            "preferredDuringSchedulingIgnoredDuringExecution", []
        ).append({"weight": SPREAD_WEIGHT, "podAffinityTerm": term})
    return affinity or None


def _topology_spread(owner: Owner, spec: api.LingDeploymentSpec) -> list[dict[str, Any]]:
    out = []
    for item in spec.placement.topology_spread_constraints:
        constraint = copy.deepcopy(item)
        # Without a selector a constraint counts no pods at all: count this deployment's.
        constraint.setdefault("labelSelector", {"matchLabels": {LABEL_DEPLOYMENT: owner.name}})
        out.append(constraint)
    return out


def termination_grace_seconds(spec: api.LingDeploymentSpec) -> int:
    """The kubelet's SIGKILL comes this long after SIGTERM: the drain plus the margin to exit after it."""
    return spec.runtime.drain_timeout_seconds + rendezvous.TERMINATION_MARGIN_SECONDS


def _pod_spec(
    owner: Owner,
    spec: api.LingDeploymentSpec,
    name: str,
    group: int,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    template = spec.template
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": rendezvous.ranks_service_name(owner.name),
        # A rank never restarts alone: a TP group cannot absorb a rejoining rank, so a dead container
        # ends the pod (phase Failed) and the operator restarts the whole group.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "containers": [container],
        "volumes": volumes,
    }
    hf = spec.model.source.hugging_face
    if hf is not None:
        pod_spec["initContainers"] = [
            _download_container(hf, container["image"], spec.engine.image_pull_policy)
        ]
    passed = {
        "nodeSelector": template.node_selector,
        "affinity": _affinity(owner, spec, group),
        "topologySpreadConstraints": _topology_spread(owner, spec),
        "priorityClassName": template.priority_class_name,
        "schedulerName": template.scheduler_name,
        "serviceAccountName": template.service_account_name,
        "tolerations": list(template.tolerations),
        "imagePullSecrets": list(template.image_pull_secrets),
    }
    pod_spec.update({key: value for key, value in passed.items() if value})
    return pod_spec


def gang_metadata(
    owner: Owner, spec: api.LingDeploymentSpec, group: int
) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) making a group one Kueue pod group: admitted whole or not at all, and
    finished as a whole when one pod fails (the operator then restarts the group)."""
    gang = spec.placement.gang
    if not gang.enabled or gang.queue_name is None:
        return {}, {}
    labels = {KUEUE_QUEUE_LABEL: gang.queue_name, KUEUE_GROUP_LABEL: f"{owner.name}-{group}"}
    annotations = {
        KUEUE_TOTAL_COUNT_ANNOTATION: str(spec.pods_per_group),
        KUEUE_RETRIABLE_ANNOTATION: "false",
    }
    return labels, annotations


def build_pod(
    owner: Owner,
    spec: api.LingDeploymentSpec,
    group: int,
    rank: int,
    *,
    default_image: str = DEFAULT_RUNTIME_IMAGE,
) -> dict[str, Any]:
    """Pod `<name>-<group>-<rank>` of a group: one engine container holding gpusPerPod TP shards."""
    if not 0 <= rank < spec.pods_per_group:
        raise ValueError(f"rank must be in 0..{spec.pods_per_group - 1} (tensor / gpusPerPod), got {rank}")
    name = rendezvous.pod_name(owner.name, group, rank)
    volumes, mounts = _volumes(spec)
    container = _engine_container(owner, spec, group, rank, spec.engine.image or default_image, mounts)
    gang_labels, gang_annotations = gang_metadata(owner, spec, group)
    labels = {
        **spec.template.labels,
        **gang_labels,
        **pod_labels(owner.name, group, rank, revision_of(spec, default_image)),
    }
    annotations = {**spec.template.annotations, **gang_annotations}
    if rank == 0:
        annotations.update(PROMETHEUS_ANNOTATIONS)
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
        "spec": _pod_spec(owner, spec, name, group, container, volumes),
    }


def build_group(
    owner: Owner, spec: api.LingDeploymentSpec, group: int, *, default_image: str = DEFAULT_RUNTIME_IMAGE
) -> list[dict[str, Any]]:
    return [
        build_pod(owner, spec, group, rank, default_image=default_image)
        for rank in range(spec.pods_per_group)
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
            "annotations": dict(PROMETHEUS_ANNOTATIONS),
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
