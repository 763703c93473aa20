"""One 2-pod serving group per object, the same shape for every controller.

Every pod asks for one `nvidia.com/gpu` (the simulated nodes have them) and the same CPU/memory, so the
scheduler does the same work whichever controller made the pod:
- ours: a LingDeployment with tensor 2, gpusPerPod 1, one replica (rank-0 head + one worker pod);
- KubeRay: a RayCluster with a head and one worker (min = max = 1);
- LWS: a LeaderWorkerSet with one replica of size 2 (a leader and one worker).
"""

from __future__ import annotations

from typing import Any

IMAGE = "registry.invalid/ling-bench:never-pulled"  # kwok never pulls: the pod only has to exist
RESOURCES = {
    "requests": {"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": "1"},
    "limits": {"nvidia.com/gpu": "1"},
}
KINDS = ("ours", "kuberay", "lws")


def lingdeployment(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.ling.dev/v1alpha1",
        "kind": "LingDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "model": {"source": {"hostPath": {"path": "/models/Ling-2.6-flash"}}},
            "engine": {"image": IMAGE},
            "parallelism": {"tensor": 2, "gpusPerPod": 1},
            "template": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}},
        },
    }


def _container(name: str) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "resources": RESOURCES}


def raycluster(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [_container("ray-head")]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [_container("ray-worker")]}},
                }
            ],
        },
    }


def leaderworkerset(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": 2,
                "workerTemplate": {"spec": {"containers": [_container("engine")]}},
            },
        },
    }


# kind -> (builder, API group, version, plural)
OBJECTS = {
    "ours": (lingdeployment, "serving.ling.dev", "v1alpha1", "lingdeployments"),
    "kuberay": (raycluster, "ray.io", "v1", "rayclusters"),
    "lws": (leaderworkerset, "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"),
}


def is_ready(kind: str, obj: dict[str, Any]) -> bool:
    """Whether the controller's own status of `obj` says its group is ready (what a user waits on)."""
    status = obj.get("status") or {}
    if kind == "kuberay":
        return status.get("state") == "ready"
    # LingDeployment and LeaderWorkerSet both count ready groups in status.readyReplicas.
    return int(status.get("readyReplicas") or 0) >= int((obj.get("spec") or {}).get("replicas", 1))
