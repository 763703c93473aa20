"""The chart speaks the operator's real command line: every rendering's args parse with ling-operator's
own parser, and the env the chart sets is the env the parser reads."""

from __future__ import annotations

import json
import re

import pytest
from ling_operator import cli as operator_cli
from ling_runtime import cli as runtime_cli

from .chart_tools import MATRIX, ROOT, one, render


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_operator_args_parse_with_the_operators_parser(case: str) -> None:
    container = one(render(MATRIX[case]), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = operator_cli.build_parser().parse_args(container["args"])
    assert args.metrics_port == 8080 and args.health_port == 8081
    assert args.namespaces == MATRIX[case].get("watchNamespaces", [])
    assert args.verbose is (MATRIX[case].get("logLevel") == "debug")
    assert args.lease_name.endswith("ling-operator") or args.lease_name == MATRIX[case].get(
        "fullnameOverride"
    )


def test_probe_and_ports_match_the_flags() -> None:
    container = one(render({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = operator_cli.build_parser().parse_args(container["args"])
    assert ports == {"metrics": args.metrics_port, "health": args.health_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_env_the_chart_sets_is_read_by_the_operator() -> None:
    container = one(render({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    source = (ROOT / "operator" / "ling_operator" / "cli.py").read_text()
    read = set(re.findall(r"os\.environ\.get\(\s*['\"]([A-Z_]+)['\"]", source))
    for env in container["env"]:
        assert env["name"] in read, f"the chart sets {env['name']}, which ling-operator never reads"


def test_runtime_image_default_command_parses_with_the_runtimes_parser() -> None:
    text = (ROOT / "docker" / "runtime.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    args = runtime_cli.build_parser().parse_args(cmd)
    assert args.command == "serve"
