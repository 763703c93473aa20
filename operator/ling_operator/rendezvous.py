"""The pod <-> runtime contract, written once: names, ports, env, and each engine's command line.

Everything a serving pod needs to find its group comes from here: the master address is derived
from deterministic names (never discovered at runtime, so no DNS race decides who is rank 0), and
the runtime's `cli.py` parses exactly the argument lists built below (a test holds them together).
All builders are pure functions of a spec dict in Kubernetes JSON shape (camelCase keys, defaults
applied by `resources.with_defaults`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
ENGINES = ("native", "sglang", "vllm")

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


def pods_per_group(spec: Mapping[str, Any]) -> int:
    parallelism = spec["parallelism"]
    tensor, gpus_per_pod = int(parallelism["tensor"]), int(parallelism["gpusPerPod"])
    if gpus_per_pod < 1 or tensor < 1 or tensor % gpus_per_pod:
        raise ValueError(
            f"spec.parallelism: tensor ({tensor}) must be a positive multiple of gpusPerPod ({gpus_per_pod})"
        )
    return tensor // gpus_per_pod


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


def model_path(spec: Mapping[str, Any]) -> str | None:
    """Where the weights are inside the container; None means the runtime's built-in tiny model."""
    source = spec["model"]["source"]
    if "pvc" in source:
        sub = str(source["pvc"].get("path") or "").strip("/")
        return f"{MODEL_MOUNT_PATH}/{sub}" if sub else MODEL_MOUNT_PATH
    if "hostPath" in source:
        return MODEL_MOUNT_PATH
    if "huggingFace" in source:
        return HF_DOWNLOAD_DIR
    if "builtin" in source:
        return None
    raise ValueError(
        f"spec.model.source: expected one of pvc, hostPath, huggingFace, builtin; got {sorted(source)}"
    )


def _rope_override(spec: Mapping[str, Any]) -> str | None:
    """The seed's --json-model-override-args for YaRN, from spec.model.ropeScaling."""
    rope = spec["model"].get("ropeScaling")
    if not rope:
        return None
    scaling: dict[str, Any] = {"rope_type": rope.get("type", "yarn"), "factor": float(rope["factor"])}
    if rope.get("originalMaxPositionEmbeddings"):
        scaling["original_max_position_embeddings"] = int(rope["originalMaxPositionEmbeddings"])
    return json.dumps({"rope_scaling": scaling}, separators=(",", ":"), sort_keys=True)


def _sglang_style_flags(spec: Mapping[str, Any]) -> list[str]:
    """Flags shared by our runtime and SGLang (same names, so the seed recipe carries over)."""
    model, runtime, spec_dec = spec["model"], spec.get("runtime") or {}, spec.get("speculative") or {}
    args: list[str] = []
    if model.get("contextLength"):
        args += ["--context-length", str(model["contextLength"])]
    override = _rope_override(spec)
    if override:
        args += ["--json-model-override-args", override]
    if runtime.get("toolCallParser"):
        args += ["--tool-call-parser", str(runtime["toolCallParser"])]
    if runtime.get("maxRunningRequests"):
        args += ["--max-running-requests", str(runtime["maxRunningRequests"])]
    if runtime.get("memFractionStatic"):
        args += ["--mem-fraction-static", str(runtime["memFractionStatic"])]
    if runtime.get("maxMambaCacheSize"):
        args += ["--max-mamba-cache-size", str(runtime["maxMambaCacheSize"])]
    if spec_dec.get("enabled"):
        args += [
            "--speculative-algorithm",
            str(spec_dec.get("algorithm", "NEXTN")),
            "--speculative-num-steps",
            str(spec_dec.get("numSteps", 3)),
            "--speculative-eagle-topk",
            str(spec_dec.get("topK", 1)),
            "--speculative-num-draft-tokens",
            str(spec_dec.get("numDraftTokens", 4)),
        ]
    return args


def native_command(spec: Mapping[str, Any], rank: int) -> list[str]:
    """`ling-runtime serve ...` exactly as docs/architecture.md writes it."""
    nnodes = pods_per_group(spec)
    args = ["ling-runtime", "serve"]
    path = model_path(spec)
    if path is not None:
        args += ["--model-path", path]
    args += [
        "--served-model-name",
        str(spec["model"]["name"]),
        "--tp-size",
        str(spec["parallelism"]["tensor"]),
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
        str(spec["engine"].get("device", "cuda")),
    ]
    if nnodes > 1:
        # Workers retry the master for at most this long, then exit with a clear error (-> group restart).
        timeout = int((spec.get("failurePolicy") or {}).get("rendezvousTimeoutSeconds", 900))
        args += ["--ray-port", str(RAY_PORT), "--rendezvous-timeout", str(timeout)]
    # No --dtype: like SGLang, the runtime takes the dtype of the checkpoint it loads (bf16 or fp8).
    return args + _sglang_style_flags(spec) + [str(a) for a in spec["engine"].get("extraArgs") or []]


def sglang_command(spec: Mapping[str, Any], rank: int) -> list[str]:
    """The seed's `python -m sglang.launch_server` recipe, one process per pod (node rank)."""
    path = model_path(spec)
    if path is None:
        raise ValueError("spec.model.source: the sglang engine needs weights (pvc, hostPath or huggingFace)")
    args = [
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        path,
        "--served-model-name",
        str(spec["model"]["name"]),
        "--tp-size",
        str(spec["parallelism"]["tensor"]),
        "--pp-size",
        "1",
        "--dp-size",
        "1",
        "--trust-remote-code",
        "--dist-init-addr",
        f"$({ENV_MASTER_ADDR}):{DIST_PORT}",
        "--nnodes",
        str(pods_per_group(spec)),
        "--node-rank",
        str(rank),
        "--host",
        f"$({ENV_POD_IP})",
        "--port",
        str(HTTP_PORT),
        "--enable-metrics",
    ]
    if spec["model"].get("dtype") == "fp8":
        args += ["--quantization", "fp8"]
    if (spec.get("speculative") or {}).get("enabled"):
        args += ["--mamba-scheduler-strategy", "extra_buffer"]
    return args + _sglang_style_flags(spec) + [str(a) for a in spec["engine"].get("extraArgs") or []]


def vllm_command(spec: Mapping[str, Any], rank: int) -> list[str]:
    """vLLM across pods through Ray: the head starts Ray then serves; workers join the head's Ray."""
    if rank > 0:
        return ["bash", "-c", RAY_WORKER_SCRIPT]
    path = model_path(spec)
    if path is None:
        raise ValueError("spec.model.source: the vllm engine needs weights (pvc, hostPath or huggingFace)")
    serve = [
        "vllm",
        "serve",
        path,
        "--served-model-name",
        str(spec["model"]["name"]),
        "--trust-remote-code",
        "--tensor-parallel-size",
        str(spec["parallelism"]["tensor"]),
        "--host",
        f"$({ENV_POD_IP})",
        "--port",
        str(HTTP_PORT),
    ]
    if pods_per_group(spec) > 1:
        serve += ["--distributed-executor-backend", "ray"]
    if spec["model"].get("contextLength"):
        serve += ["--max-model-len", str(spec["model"]["contextLength"])]
    rope = _rope_override(spec)
    if rope:
        serve += ["--hf-overrides", rope]
    if spec["model"].get("dtype") == "fp8":
        serve += ["--quantization", "fp8"]
    spec_dec = spec.get("speculative") or {}
    if spec_dec.get("enabled"):
        config = {"method": "mtp", "num_speculative_tokens": int(spec_dec.get("numSteps", 3))}
        serve += ["--speculative-config", json.dumps(config, separators=(",", ":"), sort_keys=True)]
    serve += [str(a) for a in spec["engine"].get("extraArgs") or []]
    if pods_per_group(spec) == 1:
        return serve
    # "$0" is the script name slot of `bash -c`; the serve argv follows as "$@".
    return ["bash", "-c", RAY_HEAD_SCRIPT, "ray-head", *serve]


def engine_command(spec: Mapping[str, Any], rank: int) -> list[str]:
    engine = spec["engine"].get("type", "native")
    if engine == "native":
        return native_command(spec, rank)
    if engine == "sglang":
        return sglang_command(spec, rank)
    if engine == "vllm":
        return vllm_command(spec, rank)
    raise ValueError(f"spec.engine.type: expected one of {', '.join(ENGINES)}; got {engine!r}")
