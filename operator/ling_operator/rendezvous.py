"""The pod <-> runtime contract, written once: names, ports, env, and each engine's command line.

Everything a serving pod needs to find its group comes from here: the master address is derived
from deterministic names (never discovered at runtime, so no DNS race decides who is rank 0), and
the runtime's `cli.py` parses exactly the argument lists built below (a test holds them together).
All builders are pure functions of the validated spec (api.LingDeploymentSpec: every default filled).
"""

from __future__ import annotations

import json
from typing import Any

from ling_operator.api import LingDeploymentSpec

HTTP_PORT = 30000
DIST_PORT = 2345
RAY_PORT = 6379
HTTP_PORT_NAME = "http"
DIST_PORT_NAME = "dist"
RAY_PORT_NAME = "ray"

ENV_DEPLOYMENT = "LING_DEPLOYMENT"
ENV_GROUP_INDEX = "LING_GROUP_INDEX"
ENV_NODE_RANK = "LING_NODE_RANK"
ENV_NNODES = "LING_NNODES"
ENV_MASTER_ADDR = "LING_MASTER_ADDR"
ENV_MASTER_PORT = "LING_MASTER_PORT"
ENV_RAY_PORT = "LING_RAY_PORT"
ENV_POD_IP = "LING_POD_IP"

MODEL_MOUNT_PATH = "/models"
HF_DOWNLOAD_DIR = "/models/hf"

# Workers of the vLLM engine join the head's Ray cluster. The script is a constant: every value
# it uses arrives through env (set by the pod spec) or "$@" (an argument list), never by string
# interpolation, so nothing from a LingDeployment is ever parsed by a shell. The bounded wait is
# the "workers wait for the master with a clear failure" half of the rendezvous.
RAY_HEAD_SCRIPT = (
    'ray start --head --port="$LING_RAY_PORT" --node-ip-address="$LING_POD_IP" --disable-usage-stats'
    ' && exec "$@"'
)
RAY_WORKER_SCRIPT = (
    'for i in $(seq 1 60); do ray start --address="$LING_MASTER_ADDR:$LING_RAY_PORT"'
    ' --node-ip-address="$LING_POD_IP" --disable-usage-stats --block && exit 0; sleep 5; done;'
    ' echo "rank $LING_NODE_RANK: Ray head $LING_MASTER_ADDR:$LING_RAY_PORT unreachable after 60 tries" >&2;'
    " exit 1"
)


def pod_name(name: str, group: int, rank: int) -> str:
    return f"{name}-{group}-{rank}"


def ranks_service_name(name: str) -> str:
    return f"{name}-ranks"


def master_address(name: str, group: int, namespace: str) -> str:
    """Rank 0's stable DNS name through the headless Service (resolvable before it is Ready)."""
    return f"{pod_name(name, group, 0)}.{ranks_service_name(name)}.{namespace}.svc"


def rank_env(name: str, namespace: str, group: int, rank: int, nnodes: int) -> list[dict[str, Any]]:
    """The LING_* env block of one rank; LING_POD_IP comes from the downward API."""
    values = {
        ENV_DEPLOYMENT: name,
        ENV_GROUP_INDEX: str(group),
        ENV_NODE_RANK: str(rank),
        ENV_NNODES: str(nnodes),
        ENV_MASTER_ADDR: master_address(name, group, namespace),
        ENV_MASTER_PORT: str(DIST_PORT),
        ENV_RAY_PORT: str(RAY_PORT),
    }
    env: list[dict[str, Any]] = [
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    env += [{"name": key, "value": value} for key, value in values.items()]
    return env


def model_path(spec: LingDeploymentSpec) -> str | None:
    """Where the weights are inside the container; None means the runtime's built-in tiny model."""
    source = spec.model.source
    if source.pvc is not None:
        sub = source.pvc.path.strip("/")
        return f"{MODEL_MOUNT_PATH}/{sub}" if sub else MODEL_MOUNT_PATH
    if source.host_path is not None:
        return MODEL_MOUNT_PATH
    if source.hugging_face is not None:
        return HF_DOWNLOAD_DIR
    return None  # builtin


def _rope_override(spec: LingDeploymentSpec) -> str | None:
    """The seed's --json-model-override-args for YaRN, from spec.model.ropeScaling."""
    rope = spec.model.rope_scaling
    if rope is None:
        return None
    scaling: dict[str, Any] = {"rope_type": rope.type, "factor": float(rope.factor)}
    if rope.original_max_position_embeddings:
        scaling["original_max_position_embeddings"] = int(rope.original_max_position_embeddings)
    return json.dumps({"rope_scaling": scaling}, separators=(",", ":"), sort_keys=True)


def _sglang_style_flags(spec: LingDeploymentSpec) -> list[str]:
    """Flags shared by our runtime and SGLang (same names, so the seed recipe carries over)."""
    runtime, spec_dec = spec.runtime, spec.speculative
    args: list[str] = []
    if spec.model.context_length:
        args += ["--context-length", str(spec.model.context_length)]
    override = _rope_override(spec)
    if override:
        args += ["--json-model-override-args", override]
    optional = (
        ("--tool-call-parser", runtime.tool_call_parser),
        ("--max-running-requests", runtime.max_running_requests),
        ("--mem-fraction-static", runtime.mem_fraction_static),
        ("--max-mamba-cache-size", runtime.max_mamba_cache_size),
    )
    for flag, value in optional:
        if value:
            args += [flag, str(value)]
    if spec_dec.enabled:
        args += [
            "--speculative-algorithm",
            spec_dec.algorithm,
            "--speculative-num-steps",
            str(spec_dec.num_steps),
            "--speculative-eagle-topk",
            str(spec_dec.top_k),
            "--speculative-num-draft-tokens",
            str(spec_dec.num_draft_tokens),
        ]
    return args


def _weights(spec: LingDeploymentSpec, engine: str) -> str:
    path = model_path(spec)
    if path is None:
        raise ValueError(
            f"spec.model.source: the {engine} engine needs weights (pvc, hostPath or huggingFace)"
        )
    return path


def native_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    """`ling-runtime serve ...` exactly as docs/architecture.md writes it."""
    nnodes = spec.pods_per_group
    args = ["ling-runtime", "serve"]
    path = model_path(spec)
    if path is not None:
        args += ["--model-path", path]
    args += [
        "--served-model-name",
        spec.model.name,
        "--tp-size",
        str(spec.parallelism.tensor),
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(rank),
        "--dist-init-addr",
        f"$({ENV_MASTER_ADDR}):{DIST_PORT}",
        "--host",
        f"$({ENV_POD_IP})",
        "--port",
        str(HTTP_PORT),
        "--device",
        spec.engine.device,
    ]
    if nnodes > 1:
        # Workers retry the master for at most this long, then exit with a clear error (-> group restart).
        timeout = spec.failure_policy.rendezvous_timeout_seconds
        args += ["--ray-port", str(RAY_PORT), "--rendezvous-timeout", str(timeout)]
    # No --dtype: like SGLang, the runtime takes the dtype of the checkpoint it loads (bf16 or fp8).
    return args + _sglang_style_flags(spec) + list(spec.engine.extra_args)


def sglang_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    """The seed's `python -m sglang.launch_server` recipe, one process per pod (node rank)."""
    args = [
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        _weights(spec, "sglang"),
        "--served-model-name",
        spec.model.name,
        "--tp-size",
        str(spec.parallelism.tensor),
        "--pp-size",
        "1",
        "--dp-size",
        "1",
        "--trust-remote-code",
        "--dist-init-addr",
        f"$({ENV_MASTER_ADDR}):{DIST_PORT}",
        "--nnodes",
        str(spec.pods_per_group),
        "--node-rank",
        str(rank),
        "--host",
        f"$({ENV_POD_IP})",
        "--port",
        str(HTTP_PORT),
        "--enable-metrics",
    ]
    if spec.model.dtype == "fp8":
        args += ["--quantization", "fp8"]
    if spec.speculative.enabled:
        args += ["--mamba-scheduler-strategy", "extra_buffer"]
    return args + _sglang_style_flags(spec) + list(spec.engine.extra_args)


def vllm_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    """vLLM across pods through Ray: the head starts Ray then serves; workers join the head's Ray."""
    if rank > 0:
        return ["bash", "-c", RAY_WORKER_SCRIPT]
    serve = [
        "vllm",
        "serve",
        _weights(spec, "vllm"),
        "--served-model-name",
        spec.model.name,
        "--trust-remote-code",
        "--tensor-parallel-size",
        str(spec.parallelism.tensor),
        "--host",
        f"$({ENV_POD_IP})",
        "--port",
        str(HTTP_PORT),
    ]
    if spec.pods_per_group > 1:
        serve += ["--distributed-executor-backend", "ray"]
    if spec.model.context_length:
        serve += ["--max-model-len", str(spec.model.context_length)]
    rope = _rope_override(spec)
    if rope:
        serve += ["--hf-overrides", rope]
    if spec.model.dtype == "fp8":
        serve += ["--quantization", "fp8"]
    if spec.speculative.enabled:
        config = {"method": "mtp", "num_speculative_tokens": spec.speculative.num_steps}
        serve += ["--speculative-config", json.dumps(config, separators=(",", ":"), sort_keys=True)]
    serve += spec.engine.extra_args
    if spec.pods_per_group == 1:
        return serve
    # "$0" is the script name slot of `bash -c`; the serve argv follows as "$@".
    return ["bash", "-c", RAY_HEAD_SCRIPT, "ray-head", *serve]


def engine_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    commands = {"native": native_command, "sglang": sglang_command, "vllm": vllm_command}
    return commands[spec.engine.type](spec, rank)
