"""The pod <-> runtime contract: addresses, env, and each engine's argument list."""

from __future__ import annotations

import json
import re

import pytest
from ling_operator import rendezvous
from ling_operator.api import BuiltinSource, EngineSpec, ModelSource, ParallelismSpec
from ling_runtime import cli as runtime_cli
from podstate import base_spec


def kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Expand $(VAR) references the way the kubelet does for command/args."""
    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args
    ]


def env_values(name: str, namespace: str, group: int, rank: int) -> dict[str, str]:
    env = {e["name"]: e.get("value", "") for e in rendezvous.rank_env(name, namespace, group, rank)}
    env[rendezvous.ENV_POD_IP] = "10.1.2.3"
    return env


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_master_address_is_rank0_through_the_headless_service() -> None:
    assert rendezvous.master_address("ling", 2, "prod") == "ling-2-0.ling-ranks.prod.svc"
    assert rendezvous.pod_name("ling", 2, 3) == "ling-2-3"


def test_env_block_names_every_contract_variable() -> None:
    env = rendezvous.rank_env("ling", "prod", 1, 1)
    by_name = {e["name"]: e for e in env}
    assert set(by_name) == {
        "LING_NODE_RANK",
        "LING_MASTER_ADDR",
        "LING_RAY_PORT",
        "LING_POD_IP",
    }
    assert by_name["LING_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert by_name["LING_MASTER_ADDR"]["value"] == "ling-1-0.ling-ranks.prod.svc"
    assert by_name["LING_NODE_RANK"]["value"] == "1"
    assert by_name["LING_RAY_PORT"]["value"] == "6379"


@pytest.mark.parametrize(("tensor", "gpus", "pods"), [(4, 4, 1), (4, 2, 2), (4, 1, 4), (2, 1, 2), (1, 1, 1)])
def test_pods_per_group(tensor: int, gpus: int, pods: int) -> None:
    assert ParallelismSpec.model_validate({"tensor": tensor, "gpusPerPod": gpus}).pods_per_group == pods


def test_pods_per_group_rejects_indivisible_tp() -> None:
    with pytest.raises(ValueError, match=r"spec\.parallelism\.tensor must be divisible by .*gpusPerPod"):
        ParallelismSpec.model_validate({"tensor": 4, "gpusPerPod": 3})


def test_native_command_matches_the_architecture_contract() -> None:
    spec = base_spec(
        model={"name": "ling", "contextLength": 262144, "ropeScaling": {"factor": 2.0}},
        speculative={"enabled": True},
    )
    args = rendezvous.native_command(spec, 1)
    assert args[:2] == ["ling-runtime", "serve"]
    assert flag(args, "--model-path") == "/models"
    assert flag(args, "--served-model-name") == "ling"
    assert (flag(args, "--tp-size"), flag(args, "--nnodes"), flag(args, "--node-rank")) == ("4", "2", "1")
    assert flag(args, "--dist-init-addr") == "$(LING_MASTER_ADDR):2345"
    assert flag(args, "--host") == "$(LING_POD_IP)"
    assert flag(args, "--port") == "30000"
    assert flag(args, "--device") == "cuda"
    assert flag(args, "--speculative-algorithm") == "NEXTN"
    assert flag(args, "--speculative-num-draft-tokens") == "4"
    rope = json.loads(flag(args, "--json-model-override-args"))
    assert rope["rope_scaling"]["rope_type"] == "yarn"
    assert rope["rope_scaling"]["factor"] == 2.0


def test_native_builtin_model_has_no_model_path_and_mtp_off_has_no_spec_flags() -> None:
    spec = base_spec(model={"source": {"builtin": {}}}, engine={"device": "cpu"}, parallelism={"tensor": 2})
    args = rendezvous.native_command(spec, 0)
    assert "--model-path" not in args
    assert not any(a.startswith("--speculative") for a in args)
    assert flag(args, "--device") == "cpu"


def test_native_args_parse_with_the_runtime_cli() -> None:
    """The contract test: what the operator generates, the runtime's own parser accepts."""
    spec = base_spec(
        model={"name": "ling", "contextLength": 4096, "ropeScaling": {"factor": 2.0}},
        speculative={"enabled": True, "numSteps": 3, "topK": 1, "numDraftTokens": 4},
        runtime={"maxRunningRequests": 64, "memFractionStatic": 0.75, "maxMambaCacheSize": 256},
        engine={"extraArgs": ["--page-size", "32"]},
    )
    for rank in (0, 1):
        argv = kubelet_expand(rendezvous.native_command(spec, rank), env_values("ling", "prod", 0, rank))
        parsed = runtime_cli.parse_serve_args(argv[2:])
        assert parsed.tp_size == 4
        assert parsed.nnodes == 2
        assert parsed.node_rank == rank
        assert parsed.host == "10.1.2.3"
        assert parsed.port == 30000
        assert parsed.dist_init_addr == "ling-0-0.ling-ranks.prod.svc:2345"
        assert parsed.model_path == "/models"
        assert parsed.served_model_name == "ling"
        assert parsed.page_size == 32


def test_sglang_command_is_the_seed_recipe_per_node_rank() -> None:
    spec = base_spec(
        engine={"type": "sglang", "image": "lmsysorg/sglang:v0.5"},
        model={"contextLength": 262144, "ropeScaling": {"factor": 2.0}},
        speculative={"enabled": True},
    )
    args = rendezvous.sglang_command(spec, 1)
    assert args[:3] == ["python3", "-m", "sglang.launch_server"]
    assert (flag(args, "--tp-size"), flag(args, "--nnodes"), flag(args, "--node-rank")) == ("4", "2", "1")
    assert flag(args, "--dist-init-addr") == "$(LING_MASTER_ADDR):2345"
    assert flag(args, "--tool-call-parser") == "qwen25"
    assert flag(args, "--speculative-algorithm") == "NEXTN"
    assert flag(args, "--speculative-num-steps") == "3"
    assert flag(args, "--speculative-eagle-topk") == "1"
    assert flag(args, "--speculative-num-draft-tokens") == "4"
    assert flag(args, "--mamba-scheduler-strategy") == "extra_buffer"
    off = rendezvous.sglang_command(base_spec(engine={"type": "sglang", "image": "x"}), 0)
    assert not any(a.startswith("--speculative") for a in off)


def test_vllm_multi_pod_goes_through_ray() -> None:
    spec = base_spec(engine={"type": "vllm", "image": "vllm/vllm-openai:v0.11"})
    head = rendezvous.vllm_command(spec, 0)
    assert head[:2] == ["bash", "-c"]
    assert head[2] == rendezvous.RAY_HEAD_SCRIPT  # a constant script; spec values only in argv
    serve = head[4:]
    assert serve[:3] == ["vllm", "serve", "/models"]
    assert flag(serve, "--tensor-parallel-size") == "4"
    assert flag(serve, "--distributed-executor-backend") == "ray"
    worker = rendezvous.vllm_command(spec, 1)
    assert worker == ["bash", "-c", rendezvous.RAY_WORKER_SCRIPT]


def test_vllm_single_pod_serves_directly() -> None:
    spec = base_spec(engine={"type": "vllm", "image": "v"}, parallelism={"tensor": 4, "gpusPerPod": 4})
    args = rendezvous.vllm_command(spec, 0)
    assert args[:2] == ["vllm", "serve"]
    assert "--distributed-executor-backend" not in args


def test_engine_args_never_reach_a_shell_string() -> None:
    evil = "; rm -rf / #"
    spec = base_spec(engine={"type": "vllm", "image": "v", "extraArgs": [evil]})
    head = rendezvous.vllm_command(spec, 0)
    assert evil not in head[2]
    assert head[-1] == evil


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_external_engines_refuse_the_builtin_model(engine: str) -> None:
    # The API refuses this combination; the builders refuse it too, should one ever get through.
    spec = base_spec().model_copy(deep=True)
    spec.engine = EngineSpec(type=engine, image="x")  # type: ignore[arg-type]
    spec.model.source = ModelSource(builtin=BuiltinSource())
    with pytest.raises(ValueError, match=r"spec\.model\.source"):
        rendezvous.engine_command(spec, 0)


FULL_RUNTIME = {
    "maxRunningRequests": 48,
    "memFractionStatic": 0.8,
    "maxMambaCacheSize": 96,
    "watchdogTimeoutSeconds": 600,
    "maxQueuedRequests": 512,
    "drainTimeoutSeconds": 60,
}
FULL_MODEL = {"contextLength": 65536, "ropeScaling": {"factor": 2.0}, "dtype": "fp8", "name": "ling"}


@pytest.mark.parametrize(
    ("engine", "expected", "refused"),
    [
        (
            {"type": "native"},
            {
                "--served-model-name": "ling",
                "--max-running-requests": "48",
                "--mem-fraction-static": "0.8",
                "--max-mamba-cache-size": "96",
                "--watchdog-timeout": "600",
                "--max-queued-requests": "512",
                "--drain-timeout": "60",
                "--context-length": "65536",
                "--dtype": "bf16",
                "--quantization": "fp8",
                "--tool-call-parser": "qwen25",
            },
            set(),
        ),
        (
            {"type": "sglang", "image": "lmsysorg/sglang:v0.5.10.post1"},
            {
                "--served-model-name": "ling",
                "--max-running-requests": "48",
                "--mem-fraction-static": "0.8",
                "--max-mamba-cache-size": "96",
                "--watchdog-timeout": "600",
                "--max-queued-requests": "512",
                "--context-length": "65536",
                "--quantization": "fp8",
                "--tool-call-parser": "qwen25",
            },
            set(),
        ),
        (
            {"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"},
            {
                "--max-num-seqs": "48",
                "--gpu-memory-utilization": "0.8",
                "--max-model-len": "65536",
                "--quantization": "fp8",
                "--tool-call-parser": "hermes",
            },
            {"maxMambaCacheSize", "watchdogTimeoutSeconds", "maxQueuedRequests"},
        ),
    ],
    ids=["native", "sglang", "vllm"],
)
def test_every_runtime_field_reaches_each_engine_or_is_refused(
    engine: dict[str, str], expected: dict[str, str], refused: set[str]
) -> None:
    """Each CR field becomes the engine's own flag; a field the engine has no flag for is refused by the
    schema (naming it), never dropped."""
    runtime = {k: v for k, v in FULL_RUNTIME.items() if k not in refused}
    spec = base_spec(
        engine=engine, model=FULL_MODEL, runtime=runtime, parallelism={"tensor": 4, "gpusPerPod": 4}
    )
    args = rendezvous.engine_command(spec, 0)
    for name, value in expected.items():
        assert flag(args, name) == value, name
    override = "--hf-overrides" if engine["type"] == "vllm" else "--json-model-override-args"
    assert json.loads(flag(args, override))["rope_scaling"]["rope_theta"] == 6000000
    for field in refused:
        with pytest.raises(ValueError, match=rf"spec\.runtime\.{field} is not supported by the vllm engine"):
            base_spec(engine=engine, runtime={field: FULL_RUNTIME[field]})
