"""values.schema.json rejects bad values, and helm's message names the field and what is accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from .chart_tools import CHART, template

# (values, the words the error must contain: the field's path, then what is accepted or wrong)
BAD_VALUES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "zero-replicas": ({"replicaCount": 0}, ("/replicaCount", "minimum")),
    "replicas-as-text": ({"replicaCount": "two"}, ("/replicaCount", "want integer")),
    "typo-key": ({"replicas": 2}, ("additional properties 'replicas'",)),
    "nested-typo-key": ({"image": {"repository": "x", "tags": "1"}}, ("/image", "'tags'")),
    "log-level": ({"logLevel": "verbose"}, ("/logLevel", "'info', 'debug'")),
    "pull-policy": (
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        ("/image/pullPolicy", "Always"),
    ),
    "empty-repository": ({"image": {"repository": ""}}, ("/image/repository", "minLength")),
    "namespace-name": ({"watchNamespaces": ["Team_A"]}, ("/watchNamespaces/0", "pattern")),
    "namespace-duplicate": ({"watchNamespaces": ["a", "a"]}, ("/watchNamespaces", "are equal")),
    "privileged-port": ({"metrics": {"port": 80}}, ("/metrics/port", "minimum")),
    "args-as-shell-string": ({"extraArgs": "--verbose --debug"}, ("/extraArgs", "want array")),
    "env-without-name": ({"extraEnv": [{"value": "1"}]}, ("/extraEnv/0", "name")),
    "interval": ({"serviceMonitor": {"interval": "30 seconds"}}, ("/serviceMonitor/interval", "pattern")),
    "error-ratio": (
        {"prometheusRule": {"reconcileErrorRatio": 2}},
        ("/prometheusRule/reconcileErrorRatio", "maximum"),
    ),
    "service-type": ({"metrics": {"service": {"type": "Ingress"}}}, ("/metrics/service/type", "ClusterIP")),
    "crds-install-text": ({"crds": {"install": "yes"}}, ("/crds/install", "want boolean")),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected_naming_the_field(case: str) -> None:
    values, words = BAD_VALUES[case]
    proc = template(values, check=False)
    assert proc.returncode != 0, f"{case}: helm accepted {values}"
    for word in words:
        assert word in proc.stderr, f"{case}: {word!r} not in helm's error:\n{proc.stderr}"


def test_disruption_budget_that_would_block_every_drain_is_refused() -> None:
    proc = template({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}}, check=False)
    assert proc.returncode != 0
    assert "podDisruptionBudget.minAvailable (2) must be below replicaCount (2)" in proc.stderr


def _keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        keys.add(prefix + name)
        keys |= _keys(sub, f"{prefix}{name}.")
    return keys


def _value_keys(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    # Descend only where the schema itself describes sub-keys (free-form maps like resources stop here).
    keys = set()
    for name, value in values.items():
        keys.add(prefix + name)
        sub = schema.get("properties", {}).get(name, {})
        if isinstance(value, dict) and "properties" in sub and sub.get("additionalProperties") is False:
            keys |= _value_keys(value, sub, f"{prefix}{name}.")
    return keys


def test_schema_and_values_describe_the_same_keys_and_every_key_is_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema_keys = _keys(schema)
    assert _value_keys(values, schema) <= schema_keys
    documented = {k for k in schema_keys if "description" in _lookup(schema, k)}
    assert documented == schema_keys, f"keys without a description: {sorted(schema_keys - documented)}"


def _lookup(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node
