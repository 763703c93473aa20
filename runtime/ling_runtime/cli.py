"""`ling-runtime serve ...`: SGLang's flag names, validated up front, parsed into `Settings`.

This module is the runtime side of the operator <-> runtime contract (docs/architecture.md): the
operator's `rendezvous.py` generates argument lists that `parse_serve_args` must accept. Validation
happens before anything heavy is imported, so a bad flag fails in milliseconds with a message that
names the flag, the value and what would be accepted. Defaults live in `Settings` alone: a flag left
out is absent from the parsed namespace (`argparse.SUPPRESS`) and takes the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from ling_runtime.settings import (
    DEVICES,
    DTYPES,
    LIGHTNING_CHUNK,
    LOAD_FORMATS,
    MAMBA_SCHEDULER_STRATEGIES,
    SCHEDULE_POLICIES,
    SPEC_ALGORITHMS,
    TOOL_CALL_PARSERS,
    Settings,
    SettingsError,
    split_host_port,
)

# The API key's environment variable: how the operator passes it (from a Secret), never on a command line.
API_KEY_ENV = "LING_API_KEY"

# Only these speculative flags are checked for being given at all (they need the algorithm).
_SPECULATIVE_NUMBERS = {
    "speculative_num_steps": "--speculative-num-steps",
    "speculative_eagle_topk": "--speculative-eagle-topk",
    "speculative_num_draft_tokens": "--speculative-num-draft-tokens",
}


def _int_at_least(name: str, minimum: int):
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected {expected}") from None
        if value < minimum:
            detail = " (>= 1)" if minimum == 1 else ""
            raise argparse.ArgumentTypeError(f"{name} {value}: expected {expected}{detail}")
        return value

    return parse


def _seconds(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected seconds (a number > 0)") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} {value}: expected seconds > 0")
        return value

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--json-model-override-args: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            "--json-model-override-args: expected a JSON object like '{\"key\": 1}'"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so callers (and the operator's tests) see the message;
    flags left out stay out of the namespace, so `Settings` supplies every default."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(argument_default=argparse.SUPPRESS, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SettingsError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ling-runtime", description="Ling-2.6 serving runtime")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve the model over HTTP")
    add_serve_flags(serve)
    return parser


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Every `serve` flag, grouped as `--help` shows them (SGLang's names where SGLang has the flag)."""
    _model_flags(p.add_argument_group("model"))
    _cache_flags(p.add_argument_group("batching and caches"))
    _group_flags(p.add_argument_group("tensor-parallel group"))
    _robustness_flags(p.add_argument_group("admission, failures, drain, access"))


def _count(flag: str, minimum: int = 1) -> dict[str, Any]:
    return {"type": _int_at_least(flag, minimum)}


def _model_flags(p: argparse._ArgumentGroup) -> None:
    """Flags for the model: where it comes from and how it runs."""
    p.add_argument("--model-path", help="HF checkpoint dir; omitted: the built-in tiny model")
    p.add_argument("--tokenizer-path", help="defaults to --model-path")
    p.add_argument("--served-model-name")
    p.add_argument("--tp-size", "--tensor-parallel-size", **_count("--tp-size"))
    p.add_argument("--pp-size", **_count("--pp-size"))
    p.add_argument("--dp-size", **_count("--dp-size"))
    p.add_argument("--host")
    p.add_argument("--port", **_count("--port"))
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument(
        "--quantization",
        choices=("fp8",),
        help="fp8: block-scaled FP8 weights (128x128), quantized on load from a bf16 checkpoint",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",  # resolved by validate: cuda when torch sees a GPU, else cpu
        help="auto (default): cuda when a GPU is visible, else cpu",
    )
    p.add_argument("--context-length", **_count("--context-length"))
    p.add_argument("--json-model-override-args", type=_json_object)
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for SGLang compatibility; no effect: the runtime implements the architecture "
        "itself and never runs code from the checkpoint",
    )
    # SGLang's name: decode steps replay CUDA graphs on --device cuda unless this is given.
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument(
        "--cuda-graph-max-bs",
        **_count("--cuda-graph-max-bs"),
        help="largest decode batch captured in a CUDA graph (default: --max-running-requests)",
    )
    p.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="resolve each step before scheduling the next (default: the host prepares step n+1 "
        "while the device runs step n)",
    )
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS)
    p.add_argument("--speculative-algorithm", choices=SPEC_ALGORITHMS)
    for dest, flag in _SPECULATIVE_NUMBERS.items():
        p.add_argument(flag, dest=dest, **_count(flag))


def _cache_flags(p: argparse._ArgumentGroup) -> None:
    """Flags for batching, the KV cache and the prefix cache."""
    p.add_argument(
        "--mem-fraction-static",
        type=float,
        help="fraction of the device's memory for weights and caches (SGLang's meaning); sizes the KV "
        "cache when --max-total-tokens is left out. cpu: of the memory the process may use (cgroup "
        "limit or RAM). Capped at --max-running-requests full contexts",
    )
    p.add_argument(
        "--max-running-requests",
        **_count("--max-running-requests"),
        help="running-set bound (default: 64 on cpu, 128 on cuda)",
    )
    p.add_argument("--max-mamba-cache-size", **_count("--max-mamba-cache-size"))
    p.add_argument("--max-total-tokens", **_count("--max-total-tokens"))
    p.add_argument(
        "--chunked-prefill-size",
        **_count("--chunked-prefill-size"),
        help="prefill tokens per step (default: 256 on cpu, 8192 on cuda)",
    )
    p.add_argument("--page-size", **_count("--page-size"))
    p.add_argument(
        "--mamba-scheduler-strategy",
        choices=MAMBA_SCHEDULER_STRATEGIES,
        help="auto/extra_buffer (default): the prefix cache keeps Lightning-state snapshots every "
        "--mamba-track-interval tokens in buffers of their own, so requests resume from a shared "
        "prefix, branching points included (SGLang's extra_buffer); no_buffer: no snapshots, "
        "hence no prefix reuse for this hybrid model",
    )
    p.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="turn the prefix cache off: every prompt is prefilled in full",
    )
    p.add_argument(
        "--mamba-track-interval",
        **_count("--mamba-track-interval"),
        help=f"tokens between prefix-cache snapshots of the Lightning states (default {LIGHTNING_CHUNK}: "
        f"a multiple of {LIGHTNING_CHUNK} and of --page-size); a shared prefix is reused down to a "
        "multiple of it",
    )
    p.add_argument(
        "--max-mamba-snapshots",
        **_count("--max-mamba-snapshots"),
        help="Lightning-state snapshots the prefix cache may hold (default: as many as the state "
        "slots, at least 32; each is one sequence's state, 58.7 MB / TP size on Ling-2.6-flash); "
        "least recently used ones are evicted",
    )
    p.add_argument(
        "--schedule-policy",
        choices=SCHEDULE_POLICIES,
        help="order of waiting requests: fcfs (default) or lpm (longest cached prefix first)",
    )
    p.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        help="dummy: random weights drawn on the device, no checkpoint read (--model-path: a "
        "directory with config.json; left out: Ling-2.6-flash's dimensions)",
    )


def _group_flags(p: argparse._ArgumentGroup) -> None:
    """Flags for the tensor-parallel group across nodes."""
    p.add_argument("--dist-init-addr", help="HOST:PORT of node rank 0 (torch.distributed)")
    p.add_argument("--nnodes", **_count("--nnodes"))
    p.add_argument("--node-rank", **_count("--node-rank", 0))
    p.add_argument("--launcher", choices=("ray", "mp"), help="default: ray if nnodes > 1")
    p.add_argument("--ray-port", **_count("--ray-port"))
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a head")
    p.add_argument("--ray-temp-dir")
    p.add_argument("--rendezvous-timeout", type=float)


def _robustness_flags(p: argparse._ArgumentGroup) -> None:
    """Flags for admission, failure, drain and access."""
    p.add_argument("--max-queued-requests", **_count("--max-queued-requests"))
    p.add_argument(
        "--queue-timeout",
        type=_seconds("--queue-timeout"),
        help="seconds a request may wait for admission before a 503 (default: no limit)",
    )
    p.add_argument(
        "--watchdog-timeout",
        type=_seconds("--watchdog-timeout"),
        help="a step running longer fails every request and ends the process (default 300)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_seconds("--drain-timeout"),
        help="SIGTERM: seconds running requests may take to finish (default 30)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        **_count("--max-request-body-bytes"),
        help="larger bodies get 413 (default: enough for the longest prompt the context allows)",
    )
    p.add_argument("--api-key", help=f"prefer --api-key-file or ${API_KEY_ENV}: a flag shows in ps")
    p.add_argument("--api-key-file", help="a file holding the API key (e.g. a mounted Secret)")
    p.add_argument("--random-seed", dest="seed", type=int)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def validate(ns: argparse.Namespace) -> Settings:
    """Turn parsed flags into Settings, rejecting combinations the runtime cannot serve."""
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    s = Settings(**given)
    if s.pp_size != 1:
        raise SettingsError(f"--pp-size {s.pp_size}: only 1 is supported (pipeline parallelism is not)")
    if s.dp_size != 1:
        raise SettingsError(f"--dp-size {s.dp_size}: only 1 is supported; scale groups with replicas")
    if s.node_rank >= s.nnodes:
        raise SettingsError(f"--node-rank {s.node_rank}: must be < --nnodes {s.nnodes}")
    if s.tp_size % s.nnodes:
        raise SettingsError(
            f"--tp-size {s.tp_size}: must be divisible by --nnodes {s.nnodes} (equal shards per node)"
        )
    if s.nnodes > 1 and not s.dist_init_addr:
        raise SettingsError("--dist-init-addr: required when --nnodes > 1 (HOST:PORT of node rank 0)")
    if s.dist_init_addr:
        split_host_port(s.dist_init_addr, "--dist-init-addr")
    launcher = s.launcher or ("ray" if s.nnodes > 1 else "mp")
    if launcher == "mp" and s.nnodes > 1:
        raise SettingsError(f"--launcher mp: runs on one node only; --nnodes {s.nnodes} needs --launcher ray")
    if s.mem_fraction_static is not None and not 0.0 < s.mem_fraction_static <= 1.0:
        raise SettingsError(f"--mem-fraction-static {s.mem_fraction_static}: expected a fraction in (0, 1]")
    if s.rendezvous_timeout <= 0:
        raise SettingsError(f"--rendezvous-timeout {s.rendezvous_timeout}: expected seconds > 0")
    if s.mamba_track_interval % LIGHTNING_CHUNK or s.mamba_track_interval % s.page_size:
        raise SettingsError(
            f"--mamba-track-interval {s.mamba_track_interval}: must be a multiple of {LIGHTNING_CHUNK} "
            f"(the Lightning chunk) and of --page-size {s.page_size}"
        )
    api_key = _api_key(s)
    speculative = _speculative(s, given)
    device = _auto_device() if s.device == "auto" else s.device
    return dataclasses.replace(s, launcher=launcher, api_key=api_key, device=device, **speculative)


def _auto_device() -> str:
    """--device auto: cuda when torch sees a GPU, else cpu."""
    # Imported here, after every other check: a bad flag still fails before anything heavy loads, and
    # the server imports torch right after this anyway.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _api_key(s: Settings) -> str | None:
    """The API key from --api-key, --api-key-file or $LING_API_KEY (in that order; one flag at most)."""
    if s.api_key is not None and s.api_key_file is not None:
        raise SettingsError("--api-key, --api-key-file: give one of them")
    if s.api_key_file is not None:
        try:
            with open(s.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"--api-key-file {s.api_key_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        if not key:
            raise SettingsError(f"--api-key-file {s.api_key_file}: the file is empty")
        return key
    if s.api_key is not None:
        if not s.api_key:
            raise SettingsError("--api-key: must not be empty")
        return s.api_key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def _speculative(s: Settings, given: dict[str, Any]) -> dict[str, int]:
    if s.speculative_algorithm is None:
        stray = [flag for dest, flag in _SPECULATIVE_NUMBERS.items() if dest in given]
        if stray:
            raise SettingsError(f"{', '.join(stray)}: only valid with --speculative-algorithm NEXTN")
        return {}
    # SGLang's defaults for NEXTN when the numbers are left out: 3 steps, a chain (topk 1), 4 drafts.
    steps = given.get("speculative_num_steps", 3)
    topk = given.get("speculative_eagle_topk", 1)
    drafts = given.get("speculative_num_draft_tokens", steps + 1)
    if topk != 1:
        raise SettingsError(
            f"--speculative-eagle-topk {topk}: only 1 is supported (linear-attention state rolls back along a chain)"
        )
    if drafts != steps + 1:
        raise SettingsError(
            f"--speculative-num-draft-tokens {drafts}: with --speculative-eagle-topk 1 it must equal "
            f"--speculative-num-steps + 1 = {steps + 1}"
        )
    return {
        "speculative_num_steps": steps,
        "speculative_eagle_topk": topk,
        "speculative_num_draft_tokens": drafts,
    }


def parse_serve_args(argv: list[str]) -> Settings:
    """Parse the arguments after `serve` (what the operator puts in a pod's args)."""
    parser = _Parser(prog="ling-runtime serve")
    add_serve_flags(parser)
    return validate(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = validate(build_parser().parse_args(argv))
    except SettingsError as exc:
        print(f"ling-runtime: error: {exc}", file=sys.stderr)
        return 2
    # Imported here, not at the top: the server pulls in torch and the model (seconds), and a bad
    # flag must fail in milliseconds with nothing heavy imported.
    from ling_runtime.server.launch import run_serve

    return run_serve(settings)


if __name__ == "__main__":
    sys.exit(main())
