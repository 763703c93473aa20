"""The generated CRD on a real API server: validation messages, defaults, explain, columns, scale."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from ling_operator import api
from ling_operator.api import LingDeploymentSpec, LingDeploymentStatus

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))

pytestmark = pytest.mark.cluster


def _load_cases() -> ModuleType:
    # The bad-manifest table is shared with tests/test_api.py, which pytest imports from tests/.
    if "api_cases" in sys.modules:
        return sys.modules["api_cases"]
    spec = importlib.util.spec_from_file_location("api_cases", ROOT / "tests" / "api_cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["api_cases"] = module
    spec.loader.exec_module(module)
    return module


cases = _load_cases()


@pytest.fixture(scope="module")
def crd_installed(kube: Any) -> Any:
    # Server-side apply with our own field manager: another session (the Helm chart) may own the CRD too.
    kube.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=ling-crd-test", "-f", str(CRD_PATH)
    )
    kube.kubectl("wait", "--for=condition=Established", f"crd/{api.CRD_NAME}", "--timeout=60s")
    return kube


def _apply(kube: Any, namespace: str, manifest: dict[str, Any], *extra: str) -> Any:
    return kube.kubectl(
        "apply",
        "--validate=strict",
        "-n",
        namespace,
        *extra,
        "-f",
        "-",
        input=json.dumps(manifest),
        check=False,
    )


def test_valid_base_manifest_is_accepted(crd_installed: Any, namespace: str) -> None:
    proc = _apply(crd_installed, namespace, cases.valid_manifest(), "--dry-run=server")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", cases.BAD_CASES, ids=[c.id for c in cases.BAD_CASES])
def test_bad_manifest_is_rejected_naming_the_field(crd_installed: Any, namespace: str, case: Any) -> None:
    proc = _apply(crd_installed, namespace, case.manifest())
    assert proc.returncode != 0, f"accepted: {case.id}\n{proc.stdout}"
    for expected in case.expect:
        assert expected in proc.stderr, f"{expected!r} not in: {proc.stderr}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_server_dry_run(crd_installed: Any, namespace: str, path: Path) -> None:
    proc = crd_installed.kubectl(
        "apply", "--validate=strict", "--dry-run=server", "-n", namespace, "-f", str(path), check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "created (server dry run)" in proc.stdout


def test_defaults_are_visible_and_match_the_models(crd_installed: Any, namespace: str) -> None:
    minimal = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "defaults", "labels": {"team": "ml"}, "annotations": {"note": "kept"}},
        "spec": {"model": {"source": {"builtin": {}}}},
    }
    proc = _apply(crd_installed, namespace, minimal)
    assert proc.returncode == 0, proc.stderr
    got = yaml.safe_load(
        crd_installed.kubectl("get", "lingd", "defaults", "-n", namespace, "-o", "yaml").stdout
    )
    # Declaring metadata.name in the schema must not prune the rest of ObjectMeta.
    assert got["metadata"]["labels"] == {"team": "ml"} and got["metadata"]["annotations"]["note"] == "kept"
    spec = got["spec"]
    assert spec["engine"]["type"] == "native" and spec["parallelism"] == {"tensor": 1, "gpusPerPod": 1}
    assert spec["speculative"]["numDraftTokens"] == 4
    assert spec["autoscaling"]["scaleDownStabilizationSeconds"] == 300
    assert spec["runtime"]["toolCallParser"] == "qwen25"
    # The server's defaulting gives exactly what the operator's models assume.
    assert (
        LingDeploymentSpec.model_validate(spec).to_k8s()
        == LingDeploymentSpec.model_validate(minimal["spec"]).to_k8s()
    )


def test_explain_prints_the_field_docs(crd_installed: Any) -> None:
    # The API server republishes its OpenAPI a moment after a CRD changes: wait for our current text.
    out = wait_for(
        "kubectl explain to show the current CRD",
        lambda: (
            (o := crd_installed.kubectl("explain", "lingdeployment.spec.parallelism", check=False).stdout)
            and "Default: 1." in o
            and o
        ),
        timeout=30,
    )
    assert "gpusPerPod" in out and "pods per group = tensor / gpusPerPod" in out
    assert "Default: 1." in out
    deep = crd_installed.kubectl("explain", "lingd.spec.autoscaling.source.prometheus.query").stdout
    assert "PromQL" in deep


def test_printer_columns_scale_and_status(crd_installed: Any, namespace: str) -> None:
    kube = crd_installed
    manifest = cases.valid_manifest("cols")
    assert _apply(kube, namespace, manifest).returncode == 0
    status = LingDeploymentStatus(
        replicas=1,
        ready_replicas=1,
        desired_replicas=1,
        pods_per_group=2,
        queue_depth=7,
        mtp_acceptance_rate=0.73,
        groups=[api.GroupStatus(index=0, phase="Ready", mtp_acceptance_rate=0.73)],
        selector="serving.ling.dev/deployment=cols,serving.ling.dev/rank=0",
        conditions=[
            api.Condition(type=api.ConditionType.READY, status="True", reason=api.Reason.ALL_GROUPS_READY)
        ],
    )
    # A status written from the models must be accepted by the status schema as is.
    kube.kubectl(
        "patch", "lingd", "cols", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status.to_k8s()}),
    )  # fmt: skip
    table = kube.kubectl("get", "ling", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "REPLICAS",
        "READY",
        "TP",
        "PODS/GROUP",
        "MTP",
        "MTP-ACCEPT",
        "QUEUE",
        "ENGINE",
        "AGE",
    ]
    assert table[1].split()[:9] == ["cols", "1", "1", "2", "2", "true", "0.73", "7", "native"]
    kube.kubectl("scale", "lingd", "cols", "-n", namespace, "--replicas=2")
    scale = json.loads(kube.kubectl("get", "--raw", f"/apis/{api.API_VERSION}/namespaces/{namespace}/"
                                    f"{api.PLURAL}/cols/scale").stdout)  # fmt: skip
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["selector"] == status.selector
    # Scaling beyond the autoscaling bounds goes through the same validation.
    over = kube.kubectl("scale", "lingd", "cols", "-n", namespace, "--replicas=9", check=False)
    assert over.returncode != 0 and "spec.replicas" in over.stderr
