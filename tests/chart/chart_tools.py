"""Rendering the ling-operator chart with the real helm binary, shared by the chart tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ling-operator"
RELEASE = "ling"
NAMESPACE = "ling-system"
CACHE = Path(
    os.environ.get("LING_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ling")
)

# The values matrix: each rendering must pass lint, the structural checks and the API server's dry run.
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single-replica": {"replicaCount": 1},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True, "namespaces": ["team-a"]},
        "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml-platform"}},
    },
    "locked-down": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "priorityClassName": "ling-ops-critical",
        "logLevel": "debug",
        "extraEnv": [{"name": "LING_EXTRA", "value": "1"}],
        "extraArgs": ["--resync-seconds=60"],
    },
    "no-crds-no-rbac": {
        "crds": {"install": False},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "grafanaDashboard": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
    },
    "crds-not-kept": {"crds": {"keep": False}, "fullnameOverride": "lingop", "rbac": {"readSecrets": False}},
}


def helm_binary() -> Path:
    """The helm of `make tools` (LING_HELM overrides); a clear error when it is not built yet."""
    candidates = [os.environ.get("LING_HELM"), str(CACHE / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise FileNotFoundError(
        f"helm not found (tried LING_HELM, {CACHE / 'bin' / 'helm'}, PATH): run `make tools`"
    )


def helm_env() -> dict[str, str]:
    home = CACHE / "helm"
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, env=helm_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template(
    values: dict[str, Any],
    *,
    chart: Path = CHART,
    check: bool = True,
    extra: tuple[str, ...] = (),
    namespace: str = NAMESPACE,
    release: str = RELEASE,
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with these values (written to a file: no shell, no --set parsing)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
        values_file = f.name
    try:
        return run_helm(
            "template",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--values",
            values_file,
            *extra,
            check=check,
        )
    finally:
        os.unlink(values_file)


def render(
    values: dict[str, Any], *, chart: Path = CHART, namespace: str = NAMESPACE, release: str = RELEASE
) -> list[dict[str, Any]]:
    """The rendered objects (empty documents dropped)."""
    text = template(values, chart=chart, namespace=namespace, release=release).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def write_values(values: dict[str, Any], directory: Path) -> Path:
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
