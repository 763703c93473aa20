"""Autoscaling on the local control plane, with real metric endpoints.

/metrics endpoints are rendered by the runtime's own metrics module (ling_runtime.telemetry.
RuntimeMetrics) served over loopback HTTP (tests/autoscale/exporter.py).

- prometheus source, through the operator: a real Prometheus (Debian's package, hack/prometheus.sh)
  scrapes such an endpoint; the operator (a subprocess, `python -m ling_operator`) queries it with basic
  auth read from a Secret and moves spec.replicas up and down through /scale.
- engine source, through the operator: kwok gives pods loopback addresses (127.244.x.y) where nothing listens,
  so the test re-addresses each rank-0 pod (a pod status patch, as a CNI would report it) to a loopback
  address where a group's /metrics listens on port 30000; the operator scrapes them and scales 1 -> 3 -> 1.
- engine source, through the controller alone against the API server (read, scrape, /scale, status):
  the status it writes survives the CRD's schema (nothing pruned) and a dead source keeps the size.
- with autoscaling.enabled false, an autoscaling/v2 HPA targeting a LingDeployment becomes AbleToScale
  (kube-controller-manager reads the scale subresource) and the operator leaves spec.replicas alone.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ling_operator import api
from ling_operator.autoscale_controller import ObservedGroup, autoscale_tick
from ling_operator.autoscale_sources import EngineSource
from ling_operator.writes import merge_patch

from tests.autoscale.exporter import EngineMetrics, serve_metrics
from tests.autoscale.prometheus import run_prometheus
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml"


@pytest.fixture(scope="module")
def crd(kube: Any) -> Any:
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=ling-autoscale-test",
        "-f",
        str(CRD_PATH),
    )
    kube.kubectl("wait", "--for=condition=Established", f"crd/{api.CRD_NAME}", "--timeout=60s")
    return kube


def manifest(name: str, autoscaling: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "model": {"name": "ling-tiny", "source": {"builtin": {}}},
            "engine": {"type": "native", "device": "cpu"},
            "parallelism": {"tensor": 1, "gpusPerPod": 1},
            "autoscaling": autoscaling,
            "template": {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}},
        },
    }


def get(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "lingd", name, "-n", namespace, "-o", "json").stdout)


def wait_for_replicas(kube: Any, namespace: str, name: str, replicas: int, timeout: float) -> None:
    """Wait for /scale to say `replicas`; on timeout the failure carries what the autoscaler last decided."""
    try:
        wait_for(
            f"scale to {replicas}",
            lambda: replicas_via_scale(kube, namespace, name) == replicas,
            timeout=timeout,
        )
    except AssertionError as exc:
        status = get(kube, namespace, name).get("status") or {}
        seen = {k: status.get(k) for k in ("replicas", "queueDepth", "autoscaler", "conditions")}
        raise AssertionError(f"{exc}; status: {json.dumps(seen)[:3000]}") from None


def replicas_via_scale(kube: Any, namespace: str, name: str) -> int:
    raw = kube.kubectl(
        "get", "--raw", f"/apis/{api.API_VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}/scale"
    )
    return int(json.loads(raw.stdout)["spec"]["replicas"])


@pytest.fixture
def operator(kube: Any, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real operator, watching only this test's namespace (argument list, loopback-only endpoints)."""
    log = (tmp_path / "operator.log").open("wb")
    args = [
        sys.executable,
        "-m",
        "ling_operator",
        "--kubeconfig",
        str(kube.kubeconfig),
        "--namespace",
        namespace,
        "--lease-namespace",
        namespace,
        "--metrics-port",
        "0",
        "--health-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
    ]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        # Always: pytest shows a teardown's stderr only when the test failed, and then it is the evidence.
        sys.stderr.write(f"operator exit {process.returncode}; log tail:\n")
        sys.stderr.write((tmp_path / "operator.log").read_text(errors="replace")[-6000:])


def test_prometheus_source_drives_replicas_through_the_operator(
    crd: Any, namespace: str, operator: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    kube = crd
    metrics = EngineMetrics("native")
    metrics.set(waiting=0, running=0)
    with ExitStack() as stack:
        exporter = stack.enter_context(serve_metrics(metrics))
        prom = stack.enter_context(run_prometheus([f"127.0.0.1:{exporter.server_address[1]}"], password="pw"))
        assert prom.authorization is not None
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "prom-auth"},
            "data": {"authorization": base64.b64encode(prom.authorization.encode()).decode()},
        }
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))
        name = "auto-prom"
        autoscaling = {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 4,
            "targetQueueDepthPerReplica": 8,
            "scaleDownStabilizationSeconds": 3,
            "maxScaleUpStep": 2,
            "maxScaleDownStep": 1,
            "intervalSeconds": 1,
            "source": {
                "type": "prometheus",
                "prometheus": {
                    "url": prom.url,
                    "query": "sum(ling_runtime_num_queue_reqs)",
                    "timeoutSeconds": 3,
                    "authSecretRef": {"name": "prom-auth", "key": "authorization"},
                },
            },
        }
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest(name, autoscaling)))

        def observed(depth: int) -> dict[str, Any] | None:
            doc = get(kube, namespace, name)
            auto = (doc.get("status") or {}).get("autoscaler") or {}
            return doc if auto.get("observedQueueDepth") == depth and not auto.get("sourceError") else None

        wait_for("the operator to read queue depth 0 from Prometheus", lambda: observed(0), timeout=90)

        # 30 waiting -> ceil(30/8) = 4 groups: 1 -> 3 (maxScaleUpStep) -> 4 (finishing the same climb).
        metrics.set(waiting=30, running=8)
        wait_for_replicas(kube, namespace, name, 4, timeout=90)
        doc = get(kube, namespace, name)
        history = doc["status"]["autoscaler"]["history"]
        assert [(h["from"], h["to"]) for h in history][:2] == [(1, 3), (3, 4)]
        assert history[0]["reason"] == "30 waiting > 1 × 8 per group"
        assert doc["status"]["queueDepth"] == 30
        conditions = {c["type"]: c for c in doc["status"]["conditions"]}
        assert conditions[api.ConditionType.SCALING_ACTIVE]["status"] == "True"
        events = json.loads(
            kube.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                f"involvedObject.name={name}",
                "-o",
                "json",
            ).stdout
        )["items"]
        assert any(e["message"] == "scaled 1 → 3: 30 waiting > 1 × 8 per group" for e in events)

        # Demand gone: one group per decision after the 3 s window, down to minReplicas.
        metrics.set(waiting=0, running=0)
        wait_for_replicas(kube, namespace, name, 1, timeout=120)
        history = get(kube, namespace, name)["status"]["autoscaler"]["history"]
        assert [(h["from"], h["to"]) for h in history][-3:] == [(4, 3), (3, 2), (2, 1)]
        wait_for(
            "ScalingLimited AtMinReplicas",
            lambda: (
                {c["type"]: c for c in get(kube, namespace, name)["status"]["conditions"]}[
                    api.ConditionType.SCALING_LIMITED
                ]["reason"]
                == api.Reason.AT_MIN_REPLICAS
            ),
            timeout=30,
        )

    # Prometheus is gone now: the operator keeps the size and says why.
    def source_error() -> dict[str, Any] | None:
        doc = get(kube, namespace, name)
        active = {c["type"]: c for c in doc["status"]["conditions"]}[api.ConditionType.SCALING_ACTIVE]
        return doc if active["reason"] == api.Reason.SOURCE_ERROR else None

    doc = wait_for("ScalingActive=False/SourceError", source_error, timeout=60)
    assert doc["spec"]["replicas"] == 1 and doc["status"]["autoscaler"]["sourceError"]
    assert operator.poll() is None, "the operator exited"


def test_engine_source_drives_replicas_through_the_api_server(crd: Any, namespace: str) -> None:
    kube = crd
    name = "auto-engine"
    autoscaling = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetQueueDepthPerReplica": 4,
        "scaleDownStabilizationSeconds": 30,
        "maxScaleDownStep": 1,
        "intervalSeconds": 15,
        "source": {"type": "engine", "engine": {"timeoutSeconds": 2}},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest(name, autoscaling)))
    from kubernetes import client

    api_client = kube.api_client()
    custom = client.CustomObjectsApi(api_client)
    groups_metrics = [EngineMetrics("native") for _ in range(3)]
    clock = datetime.now(UTC)

    def tick(source: EngineSource) -> None:
        nonlocal clock
        clock += timedelta(seconds=15)
        body = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        size = body["spec"]["replicas"]
        # Rank-0 of group i is 127.0.0.(i+1): every group ready, each its own /metrics.
        groups = [ObservedGroup(i, f"127.0.0.{i + 1}", ready=True) for i in range(size)]
        # As the operator does it: the object validated once into the API models, then the difference
        # between the status as stored and the status the look built, as one merge patch.
        spec = api.LingDeploymentSpec.model_validate(body["spec"])
        stored = body.get("status") or {}
        status = api.LingDeploymentStatus.model_validate(stored)
        result = autoscale_tick(spec, status, body["metadata"]["generation"], groups, source, clock)
        assert result is not None
        patch = merge_patch(stored, result.status.to_k8s())
        if patch:
            custom.patch_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                {"status": patch},
                _content_type="application/merge-patch+json",
            )
        if result.replicas is not None:
            custom.patch_namespaced_custom_object_scale(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                {"spec": {"replicas": result.replicas}},
                _content_type="application/merge-patch+json",
            )

    try:
        with ExitStack() as stack:
            port = stack.enter_context(serve_metrics(groups_metrics[0], "127.0.0.1")).server_address[1]
            for i in (1, 2):
                stack.enter_context(serve_metrics(groups_metrics[i], f"127.0.0.{i + 1}", port))
            source = EngineSource(port=port, timeout_seconds=2)
            groups_metrics[0].set(waiting=11, running=4)
            tick(source)
            assert replicas_via_scale(kube, namespace, name) == 3  # ceil(11/4) = 3
            out = kube.kubectl(
                "get", "lingd", name, "-n", namespace, "-o", "jsonpath={.spec.replicas}"
            ).stdout
            assert out == "3"
            for m in groups_metrics:
                m.set(waiting=0, running=0)
            sizes = []
            for _ in range(5):
                tick(source)
                sizes.append(replicas_via_scale(kube, namespace, name))
            # Nothing before the 30 s window has passed, then one group per decision.
            assert sizes == [3, 3, 2, 1, 1]
            doc = get(kube, namespace, name)
            # The API server kept every field the autoscaler wrote (none pruned by the schema).
            AutoscalerStatus = api.AutoscalerStatus
            stored = AutoscalerStatus.model_validate(doc["status"]["autoscaler"])
            assert [(h.from_, h.to) for h in stored.history] == [(1, 3), (3, 2), (2, 1)]
            assert stored.recommendations and stored.recommendations[-1].replicas == 1
            # Demand again: 20 waiting on group 0 -> ceil(20/4) = 5, bounded by maxReplicas 3 and the step.
            groups_metrics[0].set(waiting=20)
            tick(source)
            assert replicas_via_scale(kube, namespace, name) == 3
        dead = EngineSource(port=port, timeout_seconds=0.5)  # every server is closed now
        tick(dead)
        doc = get(kube, namespace, name)
        assert doc["spec"]["replicas"] == 3 and doc["status"]["autoscaler"]["sourceError"]
        active = {c["type"]: c for c in doc["status"]["conditions"]}[api.ConditionType.SCALING_ACTIVE]
        assert (active["status"], active["reason"]) == ("False", api.Reason.SOURCE_ERROR)
    finally:
        api_client.close()


def test_engine_source_drives_replicas_through_the_operator(
    crd: Any, namespace: str, operator: subprocess.Popen[bytes]
) -> None:
    """The operator scrapes rank-0 /metrics on port 30000 at the pods' IPs. kwok gives pods loopback
    addresses (127.244.x.y) where nothing listens, so the test re-addresses each rank-0 pod (a status patch, as a CNI would
    report it) to a loopback address where a /metrics server of the runtime's metrics module listens."""
    kube = crd
    name = "auto-engine-op"
    autoscaling = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetQueueDepthPerReplica": 4,
        "scaleDownStabilizationSeconds": 3,
        "maxScaleDownStep": 1,
        "intervalSeconds": 1,
        "source": {"type": "engine", "engine": {"timeoutSeconds": 2}},
    }
    group_metrics = [EngineMetrics("native") for _ in range(3)]
    address = [f"127.77.0.{g + 1}" for g in range(3)]  # away from 127.0.0.x that other tests use

    def pin_rank0_ips() -> None:
        pods = json.loads(
            kube.kubectl(
                "get",
                "pods",
                "-n",
                namespace,
                "-l",
                f"serving.ling.dev/deployment={name},serving.ling.dev/rank=0",
                "-o",
                "json",
            ).stdout
        )["items"]
        for pod in pods:
            group = int(pod["metadata"]["labels"]["serving.ling.dev/group"])
            ip = (pod.get("status") or {}).get("podIP")
            if ip and group < len(address) and ip != address[group]:
                patch = {"status": {"podIP": address[group], "podIPs": [{"ip": address[group]}]}}
                kube.kubectl(
                    "patch",
                    "pod",
                    pod["metadata"]["name"],
                    "-n",
                    namespace,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    json.dumps(patch),
                    check=False,
                )

    def scaled_to(n: int) -> Callable[[], bool]:
        def probe() -> bool:
            pin_rank0_ips()
            return replicas_via_scale(kube, namespace, name) == n

        return probe

    with ExitStack() as stack:
        for g in range(3):
            stack.enter_context(serve_metrics(group_metrics[g], address[g], 30000))
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest(name, autoscaling)))

        def reads_zero() -> bool:
            pin_rank0_ips()
            auto = (get(kube, namespace, name).get("status") or {}).get("autoscaler") or {}
            return auto.get("observedQueueDepth") == 0 and not auto.get("sourceError")

        wait_for("the operator to scrape group 0", reads_zero, timeout=90)
        group_metrics[0].set(waiting=11, running=2)
        wait_for("scale up to 3", scaled_to(3), timeout=90)
        history = get(kube, namespace, name)["status"]["autoscaler"]["history"]
        assert (history[0]["from"], history[0]["to"], history[0]["reason"]) == (
            1,
            3,
            "11 waiting > 1 × 4 per group",
        )
        # The new groups are scraped too once they are ready: their queue counts (11 + 3). Group 0 keeps
        # its queue meanwhile: with it gone before group 2 is ready and re-addressed, the operator would
        # rightly see no demand and scale down after the 3 s window, taking group 2 with it.
        group_metrics[2].set(waiting=3, running=1)

        def sees_group_2() -> bool:
            pin_rank0_ips()
            auto = (get(kube, namespace, name).get("status") or {}).get("autoscaler") or {}
            return auto.get("observedQueueDepth") == 14

        wait_for("the queue of group 2 to be observed", sees_group_2, timeout=90)
        group_metrics[0].set(waiting=0, running=0)
        group_metrics[2].set(waiting=0, running=0)
        wait_for("scale down to 1", scaled_to(1), timeout=120)
        history = get(kube, namespace, name)["status"]["autoscaler"]["history"]
        assert [(h["from"], h["to"]) for h in history][-2:] == [(3, 2), (2, 1)]
    assert operator.poll() is None, "the operator exited"


def test_hpa_can_drive_a_lingdeployment_when_autoscaling_is_off(
    crd: Any, namespace: str, operator: subprocess.Popen[bytes]
) -> None:
    kube = crd
    name = "hpa-driven"
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest(name, {"enabled": False})))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": name},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))

    def able_to_scale() -> dict[str, Any] | None:
        doc = json.loads(kube.kubectl("get", "hpa", name, "-n", namespace, "-o", "json").stdout)
        conditions = {c["type"]: c for c in (doc.get("status") or {}).get("conditions") or []}
        able = conditions.get("AbleToScale")
        return able if able and able["status"] == "True" else None

    able = wait_for("the HPA to report AbleToScale=True", able_to_scale, timeout=120, every=1)
    assert able["reason"] in ("SucceededGetScale", "ReadyForNewScale", "SucceededRescale")
    # The scale subresource is writable by anyone driving it, and the operator leaves it alone.
    kube.kubectl("scale", "lingd", name, "-n", namespace, "--replicas", "2")
    wait_for(
        "the operator to reconcile the scaled object",
        lambda: (
            (obj := get(kube, namespace, name)).get("status", {}).get("observedGeneration")
            == obj["metadata"]["generation"]
        ),
    )
    assert replicas_via_scale(kube, namespace, name) == 2
    wait_for(
        "ScalingActive=False/AutoscalingDisabled from the operator",
        lambda: any(
            c["type"] == api.ConditionType.SCALING_ACTIVE and c["reason"] == api.Reason.AUTOSCALING_DISABLED
            for c in (get(kube, namespace, name).get("status") or {}).get("conditions") or []
        ),
        timeout=60,
    )
    assert replicas_via_scale(kube, namespace, name) == 2
    assert operator.poll() is None
