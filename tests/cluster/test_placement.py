"""Groups placed as a unit, by the real kube-scheduler on the local control plane's labelled kwok nodes
(hack/kwok/nodes.yaml: 2 zones, 3 racks of 2 HGX H200 nodes, each node its own NVLink domain).

- By default (preferences only): a group's pods share one NVLink domain (one node here) and one zone,
  and groups use different nodes.
- A required rack with a hostname spread (the topologySpreadConstraints pass-through) forces a group's
  two pods onto two different nodes of one rack: only the required pod affinity can give that.
- Gang mode labels each group as one Kueue pod group (no Kueue here: the pods schedule as usual).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from ling_operator import resources

from tests.cluster.test_operator import Cluster, deployment
from tests.waiting import wait_for

if TYPE_CHECKING:
    from conftest import Kube

pytestmark = pytest.mark.cluster

RACK = "topology.ling.dev/rack"
NVLINK = "topology.ling.dev/nvlink-domain"
ZONE = "topology.kubernetes.io/zone"


def node_labels(cluster: Cluster) -> dict[str, dict[str, str]]:
    return {n.metadata.name: n.metadata.labels or {} for n in cluster.core.list_node().items}


def placed(cluster: Cluster, name: str, pods: int) -> dict[int, list[str]] | None:
    """group -> the nodes of its pods (by rank), once all `pods` pods are bound; else None."""
    live = cluster.live_pods(name)
    if len(live) != pods or not all(p["spec"].get("nodeName") for p in live.values()):
        return None
    groups: dict[int, list[tuple[int, str]]] = {}
    for pod in live.values():
        labels = pod["metadata"]["labels"]
        groups.setdefault(int(labels[resources.LABEL_GROUP]), []).append(
            (int(labels[resources.LABEL_RANK]), pod["spec"]["nodeName"])
        )
    return {g: [node for _, node in sorted(ranks)] for g, ranks in groups.items()}


def test_by_default_a_groups_pods_share_an_nvlink_domain_and_groups_spread(
    kube: Kube, namespace: str, operators: Any
) -> None:
    operators.start()
    cluster = Cluster(kube, namespace)
    cluster.apply(deployment("ling", replicas=2))  # spec.placement left to its defaults
    groups = wait_for("4 pods bound to nodes", lambda: placed(cluster, "ling", 4), timeout=90)
    labels = node_labels(cluster)
    for nodes in groups.values():
        assert len({labels[n][NVLINK] for n in nodes}) == 1, groups  # one NVLink domain (HGX: the node)
        assert len({labels[n][ZONE] for n in nodes}) == 1, groups
    assert groups[0][0] != groups[1][0], groups  # groups apart
    affinity = cluster.live_pods("ling")["ling-0-1"]["spec"]["affinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity["podAffinity"]


def test_required_rack_with_a_host_spread_puts_the_group_on_two_nodes_of_one_rack(
    kube: Kube, namespace: str, operators: Any
) -> None:
    operators.start()
    cluster = Cluster(kube, namespace)
    spread = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
    }
    doc = deployment(
        "ling",
        placement={
            "groupTopologyKey": RACK,
            "preferredGroupTopologyKeys": [],
            "groupSpreadTopologyKey": "",
            "topologySpreadConstraints": [spread],
            "gang": {"enabled": True, "queueName": "gpu-serving"},
        },
    )
    cluster.apply(doc)
    groups = wait_for("2 pods bound to nodes", lambda: placed(cluster, "ling", 2), timeout=90)
    labels = node_labels(cluster)
    (nodes,) = groups.values()
    assert nodes[0] != nodes[1], nodes  # the spread constraint reached the pods
    assert labels[nodes[0]][RACK] == labels[nodes[1]][RACK], nodes  # and the rack held them together
    for pod in cluster.live_pods("ling").values():
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "ling-0"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-serving"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
        (constraint,) = pod["spec"]["topologySpreadConstraints"]
        assert constraint["labelSelector"] == {"matchLabels": {resources.LABEL_DEPLOYMENT: "ling"}}
