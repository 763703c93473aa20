"""The Dockerfiles, checked without a container engine: entrypoints, extras, COPY sources, chart images."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .chart_tools import CHART, ROOT

DOCKER = ROOT / "docker"


@dataclass(frozen=True)
class Image:
    dockerfile: str
    extra: str
    values_key: str


IMAGES = {
    "operator": Image("operator.Dockerfile", "operator", "image"),
    "runtime": Image("runtime.Dockerfile", "runtime", "runtimeImage"),
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _entrypoint(path: Path) -> list[str]:
    entries = [json.loads(args) for word, args in _instructions(path) if word == "ENTRYPOINT"]
    assert entries, f"{path.name} has no ENTRYPOINT"
    assert isinstance(entries[-1], list), f"{path.name}: ENTRYPOINT must be the exec (JSON list) form"
    return entries[-1]


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_entrypoint_is_a_console_script_the_package_installs(name: str) -> None:
    image = IMAGES[name]
    command = _entrypoint(DOCKER / image.dockerfile)[0]
    scripts = _scripts()
    assert command in scripts, (
        f"{image.dockerfile}: ENTRYPOINT {command!r} is not in [project.scripts] {sorted(scripts)}"
    )
    module_name, _, attr = scripts[command].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr)), scripts[command]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_installs_the_extra_its_command_needs(name: str) -> None:
    image = IMAGES[name]
    runs = " ".join(args for word, args in _instructions(DOCKER / image.dockerfile) if word == "RUN")
    assert f"[{image.extra}]" in runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert image.extra in extras


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_copied_path_exists_and_is_not_ignored(name: str) -> None:
    dockerfile = DOCKER / IMAGES[name].dockerfile
    ignore = (DOCKER / f"{IMAGES[name].dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    for word, args in _instructions(dockerfile):
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} does not exist"
            assert source in allowed, f"{dockerfile.name}: {source} is excluded by the .dockerignore"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_chart_defaults_name_the_images_these_dockerfiles_build(name: str) -> None:
    image = IMAGES[name]
    header = re.search(r"^# image: (\S+)$", (DOCKER / image.dockerfile).read_text(), re.M)
    assert header, f"{image.dockerfile} lacks its '# image: <repository>' line"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values[image.values_key]["repository"] == header.group(1)


def test_operator_image_user_matches_the_charts_security_context() -> None:
    users = [args for word, args in _instructions(DOCKER / "operator.Dockerfile") if word == "USER"]
    uid, _, gid = users[-1].partition(":")
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])
    assert int(uid) != 0
