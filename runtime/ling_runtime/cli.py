"""`ling-runtime serve ...`: SGLang's flag names, validated up front.

This module is the runtime side of the operator <-> runtime contract (docs/architecture.md): the
operator's `rendezvous.py` generates argument lists that `parse_serve_args` must accept. Validation
happens before anything heavy is imported, so a bad flag fails in milliseconds with a message that
names the flag, the value and what would be accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 30000
DEFAULT_DIST_PORT = 2345
DEFAULT_RAY_PORT = 6379
DTYPES = ("auto", "bfloat16", "bf16", "float16", "half", "float32", "float")
TOOL_CALL_PARSERS = ("qwen25",)
SPEC_ALGORITHMS = ("NEXTN",)
MAMBA_SCHEDULER_STRATEGIES = ("auto", "no_buffer", "extra_buffer")


class ServeArgsError(ValueError):
    """A flag value or combination the runtime cannot honour."""


@dataclass(frozen=True)
class ServeArgs:
    model_path: str | None = None
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    context_length: int | None = None
    json_model_override_args: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    tool_call_parser: str | None = None
    speculative_algorithm: str | None = None
    speculative_num_steps: int = 0
    speculative_eagle_topk: int = 0
    speculative_num_draft_tokens: int = 0
    mem_fraction_static: float | None = None
    max_running_requests: int = 64
    max_mamba_cache_size: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int = 256
    page_size: int = 16
    mamba_scheduler_strategy: str = "auto"
    dist_init_addr: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    launcher: str = "mp"
    ray_port: int = DEFAULT_RAY_PORT
    ray_address: str | None = None
    ray_temp_dir: str | None = None
    rendezvous_timeout: float = 300.0
    api_key: str | None = None
    seed: int = 0
    log_level: str = "info"
    disable_cuda_graph: bool = False

    @property
    def speculative(self) -> bool:
        return self.speculative_algorithm is not None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model_path.rstrip("/") if self.model_path else "ling-tiny"

    @property
    def dist_host_port(self) -> tuple[str, int]:
        return split_host_port(self.dist_init_addr or f"127.0.0.1:{DEFAULT_DIST_PORT}", "--dist-init-addr")

    @property
    def shards_per_node(self) -> int:
        return self.tp_size // self.nnodes


def split_host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeArgsError(f"{flag} {value!r}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected a positive integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} {value}: expected a positive integer (>= 1)")
        return value

    return parse


def _non_negative_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected an integer >= 0") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} {value}: expected an integer >= 0")
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
    """argparse that raises instead of exiting, so callers (and the operator's tests) see the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ServeArgsError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ling-runtime", description="Ling-2.6 serving runtime", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve the model over HTTP", allow_abbrev=False)
    add_serve_flags(serve)
    return parser


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF checkpoint dir; omitted: the built-in tiny model")
    p.add_argument("--tokenizer-path", default=None, help="defaults to --model-path")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tp-size", "--tensor-parallel-size", type=_positive_int("--tp-size"), default=1)
    p.add_argument("--pp-size", type=_positive_int("--pp-size"), default=1)
    p.add_argument("--dp-size", type=_positive_int("--dp-size"), default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int("--port"), default=DEFAULT_PORT)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument(
        "--quantization",
        choices=("fp8",),
        default=None,
        help="fp8: block-scaled FP8 weights (128x128), quantized on load from a bf16 checkpoint",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--context-length", type=_positive_int("--context-length"), default=None)
    p.add_argument("--json-model-override-args", type=_json_object, default={})
    p.add_argument("--trust-remote-code", action="store_true")
    # SGLang's name: decode steps replay CUDA graphs on --device cuda unless this is given.
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None)
    p.add_argument("--speculative-algorithm", choices=SPEC_ALGORITHMS, default=None)
    p.add_argument("--speculative-num-steps", type=_positive_int("--speculative-num-steps"), default=None)
    p.add_argument("--speculative-eagle-topk", type=_positive_int("--speculative-eagle-topk"), default=None)
    p.add_argument(
        "--speculative-num-draft-tokens", type=_positive_int("--speculative-num-draft-tokens"), default=None
    )
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--max-running-requests", type=_positive_int("--max-running-requests"), default=64)
    p.add_argument("--max-mamba-cache-size", type=_positive_int("--max-mamba-cache-size"), default=None)
    p.add_argument("--max-total-tokens", type=_positive_int("--max-total-tokens"), default=None)
    p.add_argument("--chunked-prefill-size", type=_positive_int("--chunked-prefill-size"), default=256)
    p.add_argument("--page-size", type=_positive_int("--page-size"), default=16)
    p.add_argument("--mamba-scheduler-strategy", choices=MAMBA_SCHEDULER_STRATEGIES, default="auto")
    p.add_argument("--dist-init-addr", default=None, help="HOST:PORT of node rank 0 (torch.distributed)")
    p.add_argument("--nnodes", type=_positive_int("--nnodes"), default=1)
    p.add_argument("--node-rank", type=_non_negative_int("--node-rank"), default=0)
    p.add_argument("--launcher", choices=("ray", "mp"), default=None, help="default: ray if nnodes > 1")
    p.add_argument("--ray-port", type=_positive_int("--ray-port"), default=DEFAULT_RAY_PORT)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a head")
    p.add_argument("--ray-temp-dir", default=None)
    p.add_argument("--rendezvous-timeout", type=float, default=300.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--random-seed", dest="seed", type=int, default=0)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def validate(ns: argparse.Namespace) -> ServeArgs:
    """Turn parsed flags into ServeArgs, rejecting combinations the runtime cannot serve."""
    if ns.pp_size != 1:
        raise ServeArgsError(f"--pp-size {ns.pp_size}: only 1 is supported (pipeline parallelism is not)")
    if ns.dp_size != 1:
        raise ServeArgsError(f"--dp-size {ns.dp_size}: only 1 is supported; scale groups with replicas")
    if ns.node_rank >= ns.nnodes:
        raise ServeArgsError(f"--node-rank {ns.node_rank}: must be < --nnodes {ns.nnodes}")
    if ns.tp_size % ns.nnodes:
        raise ServeArgsError(
            f"--tp-size {ns.tp_size}: must be divisible by --nnodes {ns.nnodes} (equal shards per node)"
        )
    if ns.nnodes > 1 and not ns.dist_init_addr:
        raise ServeArgsError("--dist-init-addr: required when --nnodes > 1 (HOST:PORT of node rank 0)")
    if ns.dist_init_addr:
        split_host_port(ns.dist_init_addr, "--dist-init-addr")
    launcher = ns.launcher or ("ray" if ns.nnodes > 1 else "mp")
    if launcher == "mp" and ns.nnodes > 1:
        raise ServeArgsError(
            f"--launcher mp: runs on one node only; --nnodes {ns.nnodes} needs --launcher ray"
        )
    if ns.mem_fraction_static is not None and not 0.0 < ns.mem_fraction_static <= 1.0:
        raise ServeArgsError(f"--mem-fraction-static {ns.mem_fraction_static}: expected a fraction in (0, 1]")
    if ns.rendezvous_timeout <= 0:
        raise ServeArgsError(f"--rendezvous-timeout {ns.rendezvous_timeout}: expected seconds > 0")
    steps, topk, drafts = _speculative(ns)
    if ns.api_key is not None and not ns.api_key:
        raise ServeArgsError("--api-key: must not be empty")
    fields = {k: v for k, v in vars(ns).items() if k not in {"command", "launcher"}}
    fields.update(
        launcher=launcher,
        speculative_num_steps=steps,
        speculative_eagle_topk=topk,
        speculative_num_draft_tokens=drafts,
    )
    return ServeArgs(**fields)


def _speculative(ns: argparse.Namespace) -> tuple[int, int, int]:
    given = {
        "--speculative-num-steps": ns.speculative_num_steps,
        "--speculative-eagle-topk": ns.speculative_eagle_topk,
        "--speculative-num-draft-tokens": ns.speculative_num_draft_tokens,
    }
    if ns.speculative_algorithm is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise ServeArgsError(f"{', '.join(stray)}: only valid with --speculative-algorithm NEXTN")
        return 0, 0, 0
    # SGLang's defaults for NEXTN when the numbers are left out: 3 steps, a chain (topk 1), 4 drafts.
    steps = ns.speculative_num_steps or 3
    topk = ns.speculative_eagle_topk or 1
    drafts = ns.speculative_num_draft_tokens or steps + 1
    if topk != 1:
        raise ServeArgsError(
            f"--speculative-eagle-topk {topk}: only 1 is supported (linear-attention state rolls back along a chain)"
        )
    if drafts != steps + 1:
        raise ServeArgsError(
            f"--speculative-num-draft-tokens {drafts}: with --speculative-eagle-topk 1 it must equal "
            f"--speculative-num-steps + 1 = {steps + 1}"
        )
    return steps, topk, drafts


def parse_serve_args(argv: list[str]) -> ServeArgs:
    """Parse the arguments after `serve` (what the operator puts in a pod's args)."""
    parser = _Parser(prog="ling-runtime serve", allow_abbrev=False)
    add_serve_flags(parser)
    return validate(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)
        args = validate(ns)
    except ServeArgsError as exc:
        print(f"ling-runtime: error: {exc}", file=sys.stderr)
        return 2
    from ling_runtime.server.launch import run_serve

    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
