"""Generated chart files are current: the CRD template (from crds/) and the README's values table."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from .chart_tools import CHART, ROOT, one, render


def _load(name: str) -> ModuleType:
    # The chart's hack/ scripts are stand-alone files, not a package.
    spec = importlib.util.spec_from_file_location(f"chart_hack_{name}", CHART / "hack" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_crds = _load("sync_crds")
gen_values_doc = _load("gen_values_doc")


def test_chart_crd_templates_match_the_generated_crds() -> None:
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")), "crds/ holds no generated CRD"
    stale = sync_crds.stale_files()
    assert not stale, f"stale chart CRDs {stale}: run python charts/ling-operator/hack/sync_crds.py"


def test_rendered_chart_crd_equals_the_generated_crd_apart_from_chart_metadata() -> None:
    source = yaml.safe_load((ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml").read_text())
    rendered = one(render({}), "CustomResourceDefinition")
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["name"] == source["metadata"]["name"]


def test_a_changed_crd_makes_the_chart_copy_stale(tmp_path: Path) -> None:
    source_dir, chart_dir = tmp_path / "crds", tmp_path / "chart-crds"
    source_dir.mkdir()
    crd = yaml.safe_load((ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml").read_text())
    (source_dir / "x.yaml").write_text(yaml.safe_dump(crd))
    sync_crds.sync(source_dir, chart_dir)
    assert sync_crds.stale_files(source_dir, chart_dir) == []
    crd["spec"]["versions"][0]["additionalPrinterColumns"] = [
        {"name": "New", "type": "string", "jsonPath": ".x"}
    ]
    (source_dir / "x.yaml").write_text(yaml.safe_dump(crd))
    assert sync_crds.stale_files(source_dir, chart_dir) == ["x.yaml"]
    (chart_dir / "orphan.yaml").write_text("kind: Leftover\n")
    assert sync_crds.stale_files(source_dir, chart_dir) == ["orphan.yaml", "x.yaml"]
    sync_crds.sync(source_dir, chart_dir)
    assert sorted(p.name for p in chart_dir.iterdir()) == ["x.yaml"]
    text = (chart_dir / "x.yaml").read_text()
    assert text.startswith("{{- /* GENERATED") and "{{- if .Values.crds.install }}" in text
    assert "helm.sh/resource-policy: keep" in text


def test_sync_refuses_a_file_that_is_not_a_crd(tmp_path: Path) -> None:
    bad = tmp_path / "cm.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="kind is 'ConfigMap'; only CustomResourceDefinition is accepted"):
        sync_crds.render_template(bad)


def test_helm_braces_in_a_crd_description_are_printed_not_evaluated(tmp_path: Path) -> None:
    crd = tmp_path / "c.yaml"
    crd.write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: a.b}\nspec: {description: 'use {{ name }}'}\n"
    )
    text = sync_crds.render_template(crd)
    assert "{{ name }}" not in text and '{{ "{{" }} name }}' in text


def test_values_table_in_the_readme_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    assert gen_values_doc.with_table(readme, gen_values_doc.table()) == readme, (
        "the values table is stale: run python charts/ling-operator/hack/gen_values_doc.py"
    )


def test_values_table_documents_every_schema_key_with_its_default() -> None:
    text = gen_values_doc.table()
    assert "| `replicaCount` | integer | `2` |" in text
    assert '| `prometheusRule.rendezvousStuckFor` | string | `"15m"` |' in text
    with pytest.raises(ValueError, match="must contain the markers"):
        gen_values_doc.with_table("no markers here", text)
