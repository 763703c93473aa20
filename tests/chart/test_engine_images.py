"""Engine images are pinned: no example and no default names an untagged or `latest` image, and every
engine image an example uses is in docs/engines.md's compatibility table."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .chart_tools import CHART, ROOT, by_kind, render

EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
ENGINES_DOC = ROOT / "docs" / "engines.md"


def image_tag(reference: str) -> str | None:
    """The tag of an image reference (None when it has none); a registry port is not a tag."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def assert_pinned(reference: str, where: str) -> None:
    tag = image_tag(reference)
    assert tag, f"{where}: image {reference!r} has no tag"
    assert tag != "latest", f"{where}: image {reference!r} uses latest"


def images_in(node: Any) -> Iterator[str]:
    """Every `image` string anywhere in a manifest (engine, init containers, pod template)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from images_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from images_in(item)


def test_the_tag_reader() -> None:
    assert image_tag("lmsysorg/sglang:v0.5.10.post1") == "v0.5.10.post1"
    assert image_tag("registry:5000/team/sglang") is None
    assert image_tag("registry:5000/team/sglang:ling_2_6-abc") == "ling_2_6-abc"
    assert image_tag("vllm/vllm-openai") is None
    assert image_tag("vllm/vllm-openai:latest@sha256:0123") == "latest"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pin_their_images(path: Path) -> None:
    for image in images_in(yaml.safe_load(path.read_text())):
        assert_pinned(image, f"crds/examples/{path.name}")


def test_engine_images_of_the_examples_are_in_the_compatibility_table() -> None:
    table = ENGINES_DOC.read_text()
    engines = set()
    for path in EXAMPLES:
        engine = yaml.safe_load(path.read_text())["spec"].get("engine", {})
        if engine.get("image"):
            engines.add(engine["type"])
            assert f"`{engine['image']}`" in table, (
                f"{path.name}: {engine['image']} is not in docs/engines.md"
            )
    assert engines == {"sglang", "vllm"}, f"examples name images for {sorted(engines)}"


def test_images_in_the_compatibility_table_are_pinned() -> None:
    rows = [line for line in ENGINES_DOC.read_text().splitlines() if line.startswith("| `")]
    assert len(rows) >= 3, "docs/engines.md has no compatibility table"
    for row in rows:
        image_cell = row.split("|")[2]
        for image in re.findall(r"`([\w./-]+(?::[\w.-]+)?)`", image_cell):
            if "/" in image:
                assert_pinned(image, f"docs/engines.md row {row.split('|')[1].strip()}")


def test_operator_default_images_are_pinned_to_the_charts_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    found = {}
    # Any module-level *_IMAGE constant of the operator is a default some pod may get.
    for module_name in ("ling_operator.api", "ling_operator.resources"):
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if name.endswith("_IMAGE") and isinstance(value, str):
                assert_pinned(value, f"{module_name}.{name}")
                found[name] = value
    default = found["DEFAULT_RUNTIME_IMAGE"]
    assert image_tag(default) == app_version, "the operator's fallback must equal the chart's default"
    assert f"`{default}`" in ENGINES_DOC.read_text(), "docs/engines.md must name the native default image"


def test_chart_defaults_render_pinned_images() -> None:
    (deployment,) = by_kind(render({}), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    for container in containers:
        assert_pinned(container["image"], f"chart container {container['name']}")
    # The native engine's default image, handed to the operator.
    runtime = [e["value"] for c in containers for e in c.get("env", []) if e["name"] == "LING_RUNTIME_IMAGE"]
    assert runtime, "the chart hands the operator no LING_RUNTIME_IMAGE"
    for image in runtime:
        assert_pinned(image, "chart LING_RUNTIME_IMAGE")
