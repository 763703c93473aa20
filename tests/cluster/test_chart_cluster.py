"""The chart on the real local control plane: server-side validation of every rendering, install ->
upgrade (the CRD changes on the server) -> uninstall (the CRD stays), and the RBAC it grants: enough for
the operator to reconcile an example, and nothing more.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import yaml
from kubernetes import client

from tests.waiting import wait_for

if TYPE_CHECKING:
    from conftest import Kube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _load_chart_tools() -> ModuleType:
    # tests/chart is a package and tests/cluster is not: load the shared helper by path.
    spec = importlib.util.spec_from_file_location(
        "chart_tools_for_cluster", ROOT / "tests" / "chart" / "chart_tools.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart_tools = _load_chart_tools()
CHART: Path = chart_tools.CHART
RULES: list[dict[str, Any]] = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
CRD_FILE = ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml"
ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# Keeps the chart's operator pods Pending: this file runs the operator itself, outside the cluster.
NO_NODE = {"nodeSelector": {"serving.ling.dev/test-no-such-node": "true"}}
CLUSTER_SCOPED = {"namespaces", "nodes", "customresourcedefinitions"}


def for_namespace(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The matrix values pointed at namespaces that exist on the test cluster."""
    values = json.loads(json.dumps(values))
    if values.get("watchNamespaces"):
        values["watchNamespaces"] = [namespace]
    if values.get("podMonitor", {}).get("namespaces"):
        values["podMonitor"]["namespaces"] = [namespace]
    return values


@pytest.mark.parametrize("case", sorted(chart_tools.MATRIX))
def test_every_rendering_is_accepted_by_the_api_server(kube: Kube, namespace: str, case: str) -> None:
    objects = chart_tools.render(for_namespace(chart_tools.MATRIX[case], namespace), namespace=namespace)
    # monitoring.coreos.com kinds exist only with the Prometheus operator's CRDs, which this cluster
    # does not have (no network to fetch them): tests/chart checks their structure instead.
    served = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    proc = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(served))
    accepted = [line for line in proc.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(served), proc.stdout


@pytest.mark.parametrize("case", ["defaults", "locked-down"])
def test_operator_pods_pass_pod_security_restricted(kube: Kube, namespace: str, case: str) -> None:
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    deployment = next(
        o
        for o in chart_tools.render(chart_tools.MATRIX[case], namespace=namespace)
        if o["kind"] == "Deployment"
    )
    template = deployment["spec"]["template"]
    # A pod of the template, minus references to objects this dry run does not create.
    spec = {k: v for k, v in template["spec"].items() if k not in ("serviceAccountName", "priorityClassName")}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "psa-probe", "labels": template["metadata"]["labels"]},
        "spec": spec,
    }
    proc = kube.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------
# install -> upgrade -> uninstall


def _chart_with_private_crd_group(dest: Path, group: str) -> Path:
    """A copy of the chart whose CRD lives in its own API group, so this test never touches the
    cluster's real lingdeployments CRD that other tests use."""
    chart = dest / "ling-operator"
    shutil.copytree(CHART, chart)
    for template in (chart / "templates" / "crds").glob("*.yaml"):
        template.write_text(template.read_text().replace("serving.ling.dev", group))
    return chart


def _add_printer_column(chart: Path, name: str) -> None:
    (template,) = (chart / "templates" / "crds").glob("*.yaml")
    text, count = re.subn(
        r"^(\s*)additionalPrinterColumns:\n",
        lambda m: (
            f"{m.group(0)}{m.group(1)}- name: {name}\n{m.group(1)}  type: string\n"
            f"{m.group(1)}  jsonPath: .metadata.uid\n"
        ),
        template.read_text(),
        flags=re.M,
    )
    assert count >= 1, "the CRD template has no additionalPrinterColumns to extend"
    template.write_text(text)


def _crd(kube: Kube, name: str) -> dict[str, Any] | None:
    proc = kube.kubectl("get", "crd", name, "-o", "json", "--ignore-not-found", check=False)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def _columns(crd: dict[str, Any]) -> set[str]:
    return {c["name"] for v in crd["spec"]["versions"] for c in v.get("additionalPrinterColumns", [])}


def test_install_upgrade_changes_the_crd_and_uninstall_keeps_it(
    kube: Kube, namespace: str, tmp_path: Path
) -> None:
    group = f"{namespace}.test.ling.dev"
    crd_name = f"lingdeployments.{group}"
    release = f"chart-{namespace}"
    chart = _chart_with_private_crd_group(tmp_path, group)
    values = chart_tools.write_values(
        {"replicaCount": 1, "podDisruptionBudget": {"enabled": False}, **NO_NODE}, tmp_path
    )
    try:
        kube.helm("install", release, str(chart), "--namespace", namespace, "--values", str(values))
        installed = wait_for("the CRD after install", lambda: _crd(kube, crd_name), timeout=90)
        assert "UpgradeProbe" not in _columns(installed)
        assert installed["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert kube.kubectl("get", "deploy", "-n", namespace, "-o", "name").stdout.strip()

        _add_printer_column(chart, "UpgradeProbe")
        kube.helm("upgrade", release, str(chart), "--namespace", namespace, "--values", str(values))
        upgraded = wait_for(
            "the upgraded CRD",
            lambda: (crd := _crd(kube, crd_name)) and "UpgradeProbe" in _columns(crd) and crd,
            timeout=90,
        )
        assert _columns(installed) < _columns(upgraded)
        status = json.loads(kube.helm("status", release, "--namespace", namespace, "-o", "json").stdout)
        assert status["version"] == 2 and status["info"]["status"] == "deployed"

        kube.helm("uninstall", release, "--namespace", namespace)
        kept = _crd(kube, crd_name)
        assert kept is not None and "UpgradeProbe" in _columns(kept), "helm uninstall deleted the CRD"
        assert not kube.kubectl("get", "deploy", "-n", namespace, "-o", "name").stdout.strip()
        cluster_role = kube.kubectl(
            "get", "clusterrole", f"{release}-ling-operator", "--ignore-not-found", "-o", "name"
        )
        assert not cluster_role.stdout.strip()
    finally:
        kube.helm("uninstall", release, "--namespace", namespace, "--ignore-not-found", check=False)
        kube.kubectl("delete", "crd", crd_name, "--ignore-not-found", "--wait=false", check=False)


def test_install_adopts_a_crd_applied_by_kubectl_with_take_ownership(
    kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """The upgrade path from `kubectl apply -f crds/` (e.g. `make run`) to the chart managing the CRD."""
    group = f"{namespace}.adopt.ling.dev"
    crd_name = f"lingdeployments.{group}"
    release = f"adopt-{namespace}"
    source = yaml.safe_load(CRD_FILE.read_text().replace("serving.ling.dev", group))
    chart = _chart_with_private_crd_group(tmp_path, group)
    values = chart_tools.write_values(
        {"replicaCount": 1, "podDisruptionBudget": {"enabled": False}, **NO_NODE}, tmp_path
    )
    try:
        kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(source))
        refused = kube.helm(
            "install", release, str(chart), "--namespace", namespace, "--values", str(values), check=False
        )
        assert refused.returncode != 0 and crd_name in refused.stderr, refused.stderr
        kube.helm("uninstall", release, "--namespace", namespace, "--ignore-not-found", check=False)
        kube.helm(
            "install",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--values",
            str(values),
            "--take-ownership",
        )
        adopted = _crd(kube, crd_name)
        assert adopted is not None
        assert adopted["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
        assert adopted["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    finally:
        kube.helm("uninstall", release, "--namespace", namespace, "--ignore-not-found", check=False)
        kube.kubectl("delete", "crd", crd_name, "--ignore-not-found", "--wait=false", check=False)


# ---------------------------------------------------------------------------------------------------------
# RBAC: enough, and no more


def _install_rbac(kube: Kube, namespace: str, tmp_path: Path, release: str, watch: list[str]) -> str:
    """Install the chart (no CRD: the real one is shared) and return its ServiceAccount's user name."""
    values = {
        "crds": {"install": False},
        "replicaCount": 1,
        "podDisruptionBudget": {"enabled": False},
        **NO_NODE,
    }
    values["watchNamespaces"] = watch
    kube.helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(chart_tools.write_values(values, tmp_path)),
    )
    return f"system:serviceaccount:{namespace}:{release}-ling-operator"


@pytest.fixture
def release(kube: Kube, namespace: str) -> Iterator[str]:
    name = f"rbac-{namespace}"
    yield name
    kube.helm("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def _allowed(
    authz: client.AuthorizationV1Api, user: str, verb: str, group: str, resource: str, namespace: str | None
) -> bool:
    resource, _, subresource = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{user.split(':')[2]}",
                "system:authenticated",
            ],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource or None,
                namespace=namespace,
            ),
        )
    )
    return bool(authz.create_subject_access_review(review).status.allowed)


def _granted() -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _can_i(kube: Kube, user: str, *args: str) -> bool:
    proc = kube.kubectl("auth", "can-i", *args, "--as", user, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rbac_grants_exactly_the_rules_file(
    kube: Kube, namespace: str, tmp_path: Path, release: str, mode: str
) -> None:
    user = _install_rbac(kube, namespace, tmp_path, release, [] if mode == "cluster-wide" else [namespace])
    granted = _granted()
    elsewhere = "default"
    with kube.api_client() as api:
        authz = client.AuthorizationV1Api(api)
        # RBAC is eventually consistent in the authorizer's cache: wait for the first grant to show.
        group, resource, verb = sorted(granted)[0]
        scope = None if resource in CLUSTER_SCOPED else namespace
        wait_for(
            "the chart's grants", lambda: _allowed(authz, user, verb, group, resource, scope), timeout=30
        )
        for group, resource in sorted({(g, r) for g, r, _ in granted}):
            cluster_scoped = resource.split("/")[0] in CLUSTER_SCOPED
            for verb in ALL_VERBS:
                want = (group, resource, verb) in granted
                where = None if cluster_scoped else namespace
                assert _allowed(authz, user, verb, group, resource, where) is want, (
                    verb,
                    group,
                    resource,
                    where,
                )
                if not cluster_scoped:
                    # Outside the watched namespaces nothing namespaced is granted.
                    want_elsewhere = want and mode == "cluster-wide"
                    got = _allowed(authz, user, verb, group, resource, elsewhere)
                    assert got is want_elsewhere, (verb, group, resource, elsewhere)
    # The headline refusals, as an administrator would check them.
    assert not _can_i(kube, user, "delete", "nodes")
    assert not _can_i(kube, user, "create", "clusterrolebindings.rbac.authorization.k8s.io")
    assert not _can_i(kube, user, "list", "secrets", "--all-namespaces")
    # Secrets: read-only and by name (for a Prometheus auth Secret), only in the watched namespaces.
    assert _can_i(kube, user, "get", "secrets", "-n", "kube-system") is (mode == "cluster-wide")
    assert not _can_i(kube, user, "create", "secrets", "-n", namespace)
    assert not _can_i(kube, user, "create", "pods", "--subresource=exec", "-n", namespace)
    assert not _can_i(kube, user, "update", "lingdeployments.serving.ling.dev", "-n", namespace)
    assert _can_i(kube, user, "create", "pods", "-n", namespace)
    assert _can_i(
        kube, user, "patch", "lingdeployments.serving.ling.dev", "--subresource=status", "-n", namespace
    )


def _token_kubeconfig(kube: Kube, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token), not as the admin."""
    token = kube.kubectl("create", "token", service_account, "-n", namespace, "--duration=30m").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "operator-sa", "user": {"token": token}}],
        "contexts": [{"name": "operator-sa", "context": {"cluster": cluster["name"], "user": "operator-sa"}}],
        "current-context": "operator-sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_running_as_the_charts_service_account_reconciles_an_example(
    kube: Kube, namespace: str, tmp_path: Path, release: str
) -> None:
    # The real CRD is shared with the operator's tests; apply it the way their fixture does.
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kube.kubectl(
        "wait",
        "--for=condition=Established",
        f"crd/{yaml.safe_load(CRD_FILE.read_text())['metadata']['name']}",
    )
    user = _install_rbac(kube, namespace, tmp_path, release, [namespace])
    service_account = user.rsplit(":", 1)[1]
    kubeconfig = _token_kubeconfig(kube, namespace, service_account, tmp_path / "sa.kubeconfig")
    assert (
        kube.kubectl(
            "--kubeconfig", str(kubeconfig), "get", "pods", "-n", "kube-system", check=False
        ).returncode
        != 0
    ), "the token kubeconfig must not be an administrator"
    log_path = tmp_path / "operator.log"
    command = [
        sys.executable, "-m", "ling_operator",
        "--kubeconfig", str(kubeconfig),
        "--namespace", namespace,
        "--metrics-port", "0", "--health-port", "0",
        "--lease-namespace", namespace, "--lease-name", f"{release}-ling-operator", "--lease-duration", "5",
    ]  # fmt: skip
    example = yaml.safe_load((ROOT / "crds" / "examples" / "tiny-cpu.yaml").read_text())
    name = example["metadata"]["name"]
    with log_path.open("w") as log:
        operator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(example))
            pods_per_group = (
                example["spec"]["parallelism"]["tensor"] // example["spec"]["parallelism"]["gpusPerPod"]
            )

            def pods() -> list[dict[str, Any]]:
                out = kube.kubectl(
                    "get", "pods", "-n", namespace, "-l", f"serving.ling.dev/deployment={name}", "-o", "json"
                )
                return json.loads(out.stdout)["items"]

            def status() -> dict[str, Any]:
                obj = json.loads(kube.kubectl("get", "lingd", name, "-n", namespace, "-o", "json").stdout)
                return obj.get("status") or {}

            wait_for(f"{pods_per_group} pods of {name}", lambda: len(pods()) >= pods_per_group, timeout=120)
            wait_for("the status written by the operator", lambda: status().get("conditions"), timeout=60)
            services = kube.kubectl("get", "services", "-n", namespace, "-o", "name").stdout
            assert f"service/{name}-ranks" in services
            lease = json.loads(
                kube.kubectl("get", "lease", f"{release}-ling-operator", "-n", namespace, "-o", "json").stdout
            )
            assert lease["spec"]["holderIdentity"], "the operator never took the leader Lease"
            assert operator.poll() is None, "the operator exited"
        finally:
            operator.terminate()
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
    output = log_path.read_text()
    assert not re.search(r"forbidden|\b403\b", output, re.I), (
        f"the operator hit RBAC limits:\n{output[-4000:]}"
    )
