"""The pod <-> runtime contract, written once: names, ports, env, and each engine's command line.

Everything a serving pod needs to find its group comes from here: the master address is derived
from deterministic names (never discovered at runtime, so no DNS race decides who is rank 0), and
the runtime's `cli.py` parses exactly the argument lists built below (a test holds them together).
All builders are pure functions of the validated spec (api.LingDeploymentSpec: every default filled).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ling_operator.api import LingDeploymentSpec

HTTP_PORT = 30000
DIST_PORT = 2345
RAY_PORT = 6379
HTTP_PORT_NAME = "http"
DIST_PORT_NAME = "dist"
RAY_PORT_NAME = "ray"

ENV_NODE_RANK = "LING_NODE_RANK"
ENV_MASTER_ADDR = "LING_MASTER_ADDR"
ENV_RAY_PORT = "LING_RAY_PORT"
ENV_POD_IP = "LING_POD_IP"

MODEL_MOUNT_PATH = "/models"
# The API key's variable (the runtime's cli.API_KEY_ENV) and vLLM's own; both come from a Secret.
ENV_API_KEY = "LING_API_KEY"
ENV_VLLM_API_KEY = "VLLM_API_KEY"
# The OpenAI `model` value the card's client sends; every engine must answer it (docs/engines.md).
CARD_MODEL_ALIAS = "auto"
# Seconds between the engine's drain deadline and the kubelet's SIGKILL: uvicorn's own shutdown (5 s),
# the group's teardown and the exit, with room to spare.
TERMINATION_MARGIN_SECONDS = 15

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


def rank_env(name: str, namespace: str, group: int, rank: int) -> list[dict[str, Any]]:
    """The LING_* env block of one rank: only what a command reads (the engines' Ray wrappers and
    the native command's $(VAR) references); LING_POD_IP comes from the downward API. Deployment and
    group are on the pod's labels."""
    values = {
        ENV_NODE_RANK: str(rank),
        ENV_MASTER_ADDR: master_address(name, group, namespace),
        ENV_RAY_PORT: str(RAY_PORT),
    }
    env: list[dict[str, Any]] = [
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    env += [{"name": key, "value": value} for key, value in values.items()]
    return env


def hf_checkpoint_dir(repo: str, revision: str) -> str:
    """Where a Hugging Face checkpoint lands under the model mount: one directory per repo and revision,
    so a node cache shared by deployments keeps them apart. Each part is a single, safe path component."""
    org, name = repo.split("/", 1)
    safe_revision = re.sub(r"[^A-Za-z0-9_.-]", "_", revision)
    if set(safe_revision) <= {"."}:
        safe_revision = "_" + safe_revision  # never "." or "..": the cache is a node directory
    return f"{MODEL_MOUNT_PATH}/{org}--{name}/{safe_revision}"


def model_path(spec: LingDeploymentSpec) -> str | None:
    """Where the weights are inside the container; None means the runtime's built-in tiny model."""
    source = spec.model.source
    if source.pvc is not None:
        sub = source.pvc.path.strip("/")
        return f"{MODEL_MOUNT_PATH}/{sub}" if sub else MODEL_MOUNT_PATH
    if source.host_path is not None:
        return MODEL_MOUNT_PATH
    if source.hugging_face is not None:
        return hf_checkpoint_dir(source.hugging_face.repo, source.hugging_face.revision)
    return None  # builtin


def rope_override(spec: LingDeploymentSpec) -> str | None:
    """The card's --json-model-override-args, from spec.model.ropeScaling: the same keys in the same order
    and json.dumps' default separators, so the card's values give the card's exact text."""
    rope = spec.model.rope_scaling
    if rope is None:
        return None
    return json.dumps({"rope_scaling": rope.override()})


def _optional(pairs: tuple[tuple[str, object | None], ...]) -> list[str]:
    args: list[str] = []
    for flag, value in pairs:
        if value is not None:
            args += [flag, str(value)]
    return args


def _speculative_flags(spec: LingDeploymentSpec) -> list[str]:
    spec_dec = spec.speculative
    if not spec_dec.enabled:
        return []
    return [
        "--speculative-algorithm",
        spec_dec.algorithm,
        "--speculative-num-steps",
        str(spec_dec.num_steps),
        "--speculative-eagle-topk",
        str(spec_dec.top_k),
        "--speculative-num-draft-tokens",
        str(spec_dec.num_draft_tokens),
    ]


def _sglang_style_flags(spec: LingDeploymentSpec) -> list[str]:
    """Flags shared by our runtime and SGLang (same names, so the seed recipe carries over), in the
    card's order: context, MTP, memory and batch sizes, tool parser, YaRN."""
    runtime = spec.runtime
    args = _optional((("--context-length", spec.model.context_length),))
    args += _speculative_flags(spec)
    args += _optional(
        (
            ("--mem-fraction-static", runtime.mem_fraction_static),
            ("--max-running-requests", runtime.max_running_requests),
            ("--max-mamba-cache-size", runtime.max_mamba_cache_size),
            ("--tool-call-parser", runtime.tool_call_parser),
            ("--json-model-override-args", rope_override(spec)),
            ("--watchdog-timeout", runtime.watchdog_timeout_seconds),
            ("--max-queued-requests", runtime.max_queued_requests),
        )
    )
    return args


def _weights(spec: LingDeploymentSpec, engine: str) -> str:
    path = model_path(spec)
    if path is None:
        raise ValueError(
            f"spec.model.source: the {engine} engine needs weights (pvc, hostPath or huggingFace)"
        )
    return path


def native_dtype_flags(spec: LingDeploymentSpec) -> list[str]:
    """spec.model.dtype for our runtime. On cuda it computes in the checkpoint's bf16; on cpu its kernels
    compute in float32 whatever the checkpoint holds (the runtime's `--dtype auto`), so bf16 adds nothing
    there. fp8 is FP8 block-scaled weights on either device."""
    args = ["--dtype", "bf16"] if spec.engine.device == "cuda" else []
    if spec.model.dtype == "fp8":
        args += ["--quantization", "fp8"]
    return args


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
        *native_dtype_flags(spec),
        "--drain-timeout",
        str(spec.runtime.drain_timeout_seconds),
    ]
    if nnodes > 1:
        # Workers retry the master for at most this long, then exit with a clear error (-> group restart).
        timeout = spec.failure_policy.rendezvous_timeout_seconds
        args += ["--ray-port", str(RAY_PORT), "--rendezvous-timeout", str(timeout)]
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
        # /metrics: the autoscaler's queue depth and the dashboards read it.
        "--enable-metrics",
    ]
    if spec.model.dtype == "fp8":
        args += ["--quantization", "fp8"]
    if spec.speculative.enabled:
        # The card's MTP recipe: Lightning-state snapshots in buffers of their own, so verify can roll back.
        args += ["--mamba-scheduler-strategy", "extra_buffer"]
    return args + _sglang_style_flags(spec) + list(spec.engine.extra_args)


# vLLM has no parser named qwen25; its hermes parser reads the same `<tool_call>{json}</tool_call>` blocks.
VLLM_TOOL_PARSERS = {"qwen25": "hermes"}


def vllm_served_names(spec: LingDeploymentSpec) -> list[str]:
    """vLLM answers only the names it serves (404 otherwise, unlike SGLang): the card's client sends
    "auto", so it is served as a second name (responses carry the first)."""
    name = spec.model.name
    return [name] if name == CARD_MODEL_ALIAS else [name, CARD_MODEL_ALIAS]


def vllm_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    """vLLM across pods through Ray: the head starts Ray then serves; workers join the head's Ray."""
    if rank > 0:
        return ["bash", "-c", RAY_WORKER_SCRIPT]
    runtime = spec.runtime
    serve = [
        "vllm",
        "serve",
        _weights(spec, "vllm"),
        "--port",
        str(HTTP_PORT),
        "--served-model-name",
        *vllm_served_names(spec),
        "--trust-remote-code",
        "--tensor-parallel-size",
        str(spec.parallelism.tensor),
        "--host",
        f"$({ENV_POD_IP})",
    ]
    serve += _optional((("--gpu-memory-utilization", runtime.mem_fraction_static),))
    if spec.pods_per_group > 1:
        serve += ["--distributed-executor-backend", "ray"]
    serve += _optional(
        (
            ("--max-model-len", spec.model.context_length),
            ("--max-num-seqs", runtime.max_running_requests),
            ("--hf-overrides", rope_override(spec)),
        )
    )
    if spec.model.dtype == "fp8":
        serve += ["--quantization", "fp8"]
    parser = VLLM_TOOL_PARSERS.get(runtime.tool_call_parser, runtime.tool_call_parser)
    serve += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    serve += spec.engine.extra_args
    if spec.pods_per_group == 1:
        return serve
    # "$0" is the script name slot of `bash -c`; the serve argv follows as "$@".
    return ["bash", "-c", RAY_HEAD_SCRIPT, "ray-head", *serve]


def engine_command(spec: LingDeploymentSpec, rank: int) -> list[str]:
    commands = {"native": native_command, "sglang": sglang_command, "vllm": vllm_command}
    return commands[spec.engine.type](spec, rank)


def engine_env(spec: LingDeploymentSpec) -> list[dict[str, Any]]:
    """Env the engine reads besides the rank contract: the API key, by reference to its Secret only."""
    ref = spec.runtime.api_key_secret_ref
    if ref is None:
        return []
    source = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
    names = [ENV_API_KEY] + ([ENV_VLLM_API_KEY] if spec.engine.type == "vllm" else [])
    return [{"name": name, "valueFrom": source} for name in names]
