"""The generated CRD: up to date with the models, structural, documented, defaulted, and self-consistent."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ling_operator import api, crd
from ling_operator.api import LingDeploymentSpec

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "crds" / crd.CRD_FILE


def _committed() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def _version_schema() -> dict[str, Any]:
    return _committed()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for key in json_path.strip(".").split("."):
        node = node["properties"][key]
    return node


def test_committed_files_are_up_to_date() -> None:
    assert crd.stale(ROOT) == [], "run `make crds` and commit crds/ and docs/api.md"
    assert crd.main(["--check"]) == 0


def test_check_fails_when_a_generated_file_is_stale(tmp_path: Path) -> None:
    (tmp_path / "crds").mkdir()
    (tmp_path / "docs").mkdir()
    shutil.copy(CRD_PATH, tmp_path / "crds" / crd.CRD_FILE)
    shutil.copy(ROOT / "docs" / "api.md", tmp_path / "docs" / "api.md")
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0
    target = tmp_path / "crds" / crd.CRD_FILE
    target.write_text(target.read_text().replace("default: qwen25", "default: hermes"))
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1
    assert crd.stale(tmp_path) == [target]
    assert crd.main(["--root", str(tmp_path)]) == 0  # regenerating repairs it
    assert crd.stale(tmp_path) == []


def test_docs_keep_hand_written_text_around_the_generated_section() -> None:
    text = (
        "# API\n\nversion plan\n\n"
        + crd.DOCS_BEGIN
        + "\nSTALE-GENERATED-TEXT\n"
        + crd.DOCS_END
        + "\n\nfooter\n"
    )
    out = crd.render_docs(text)
    assert out.startswith("# API\n\nversion plan\n\n")
    assert out.endswith("\n\nfooter\n")
    assert "STALE-GENERATED-TEXT" not in out and "`spec.parallelism.gpusPerPod`" in out


def test_names_scope_and_subresources() -> None:
    doc = _committed()
    assert doc["metadata"]["name"] == "lingdeployments.serving.ling.dev"
    spec = doc["spec"]
    assert spec["group"] == api.GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "LingDeployment" and spec["names"]["shortNames"] == ["lingd"]
    assert spec["names"]["categories"] == ["ling"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


def test_scale_and_printer_paths_exist_in_the_schema_with_matching_types() -> None:
    schema = _version_schema()
    version = _committed()["spec"]["versions"][0]
    for path in version["subresources"]["scale"].values():
        assert _resolve(schema, path)["type"] in ("integer", "string")
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Replicas", "Ready", "TP", "Pods/Group", "MTP", "MTP-Accept", "Queue", "Engine", "Age"]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        assert _resolve(schema, column["jsonPath"])["type"] == column["type"], column


def test_schema_is_structural() -> None:
    for path, node in _walk(_version_schema()):
        if path == ".metadata":
            continue
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "$ref" not in node and "anyOf" not in node and "nullable" not in node, path


def test_every_field_is_documented() -> None:
    undocumented = [
        path
        for path, node in _walk(_version_schema())
        if path.count(".") >= 1 and not path.endswith(("[]", "{}")) and path != ".metadata"
        if not node.get("description")
    ]
    assert undocumented == []


def test_schema_defaults_equal_the_model_defaults() -> None:
    # What the API server fills in for a minimal spec must be exactly what the operator assumes.
    spec_schema = _version_schema()["properties"]["spec"]
    minimal = {"model": {"source": {"builtin": {}}}}
    applied = _apply_defaults(spec_schema, minimal)
    model = LingDeploymentSpec.model_validate(minimal).to_k8s()
    assert applied == _drop_empty(model)


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: fill absent fields, then recurse."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for key, child in schema["properties"].items():
        if key not in out and "default" in child:
            out[key] = child["default"]
        if key in out:
            out[key] = _apply_defaults(child, out[key])
    return out


def _drop_empty(value: Any) -> Any:
    # The schema leaves empty lists/maps absent; the models materialize them.
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v not in ([], {}) or k == "builtin"}
    return value


def test_status_has_no_defaults() -> None:
    assert all("default" not in node for _, node in _walk(_version_schema()["properties"]["status"]))


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        (".spec.engine.type", "enum", ["native", "sglang", "vllm"]),
        (".spec.engine.device", "enum", ["cuda", "cpu"]),
        (".spec.model.dtype", "enum", ["bf16", "fp8"]),
        (".spec.replicas", "minimum", 0),
        (".spec.parallelism.tensor", "minimum", 1),
        (".spec.runtime.memFractionStatic", "exclusiveMaximum", True),
        (".spec.engine.extraArgs", "type", "array"),
        (".spec.template.tolerations", "type", "array"),
        (".spec.template.resources.limits", "maxProperties", 32),
    ],
)
def test_schema_constraints(path: str, key: str, value: Any) -> None:
    assert _resolve(_version_schema(), path)[key] == value


def test_quantities_are_int_or_string() -> None:
    limits = _resolve(_version_schema(), ".spec.template.resources.limits")
    value = limits["additionalProperties"]
    assert value["x-kubernetes-int-or-string"] is True and "type" not in value
    assert value["pattern"] == api.QUANTITY_PATTERN and value["maxLength"] == 64


def test_cel_rules_come_from_the_models_and_field_paths_resolve() -> None:
    schema = _version_schema()
    rules = [
        (path, rule) for path, node in _walk(schema) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) == sum(len(m.cel_rules) for m in _models())
    for path, rule in rules:
        assert rule["message"] and rule["rule"]
        if "fieldPath" in rule:
            _resolve(_resolve(schema, path) if path else schema, rule["fieldPath"])


def _models() -> set[type[api.ApiModel]]:
    return {
        obj
        for obj in vars(api).values()
        if isinstance(obj, type) and issubclass(obj, api.ApiModel) and obj.cel_rules
    }


def test_unsupported_annotation_is_an_error() -> None:
    with pytest.raises(TypeError, match="no CRD schema"):
        crd.type_schema(complex)


def test_scalar_defaults_are_named_in_descriptions_for_kubectl_explain() -> None:
    for path, node in _walk(_version_schema()):
        if "default" in node and not isinstance(node["default"], dict | list):
            assert node["description"].endswith(f"Default: {json.dumps(node['default'])}."), path
