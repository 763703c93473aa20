"""`python -m bench.serving`: an OpenAI-API load generator for ling-runtime, SGLang and vLLM servers.

Workloads: `random` (input/output lengths uniform in [ratio * L, L]), `fixed` (every prompt exactly
--input-len server tokens: TTFT at 1K/8K), `agent` (sessions that share a system prompt and tool
definitions and append the assistant's reply and a tool result every turn). Arrivals: Poisson at
--request-rate (default inf: all at once) with at most --max-concurrency in flight. Streams every
request (SSE) and reports TTFT, ITL, TPOT, end-to-end latency (mean, p50/p90/p99), throughput,
prompt and cached tokens, the server's /metrics deltas and errors by kind, as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.serving import client, runner
from bench.serving.runner import PATHS, BodyOptions, LoopLag, Progress
from bench.serving.stats import RequestResult, by_turn, metrics_report, summarize
from bench.serving.workload import (
    Calibration,
    agent_trace,
    fit_text,
    poisson_arrivals,
    rng_for,
    single_turn_prompts,
)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with the abuse benchmark: where to send, how to build prompts, where to write."""
    g = p.add_argument_group("server")
    g.add_argument(
        "--base-url", default="http://127.0.0.1:30000", help="server root (a trailing /v1 is fine)"
    )
    g.add_argument("--model", default="auto", help="model name; auto: the first of GET /v1/models")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    g.add_argument(
        "--tokenizer",
        default="auto",
        help="tokenizer.json (file or dir) for exact prompt lengths; auto: the server's /get_model_info "
        "model_path if it is local; none: fit lengths from two probe requests' usage.prompt_tokens",
    )
    g.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    g = p.add_argument_group("requests")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (SGLang/vLLM extension)")
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, default=None, help="JSON path; default bench/results/<auto>.json")
    g.add_argument("--label", default="", help="free text stored in the JSON (machine, flags, load)")
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_server_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=("random", "fixed", "agent"), default="random")
    g.add_argument(
        "--endpoint",
        choices=("auto", "completions", "chat"),
        default="auto",
        help="auto: chat for agent, completions otherwise",
    )
    g.add_argument("--num-prompts", type=int, default=64, help="random/fixed: requests to send")
    g.add_argument("--input-len", type=int, default=1024, help="prompt tokens as the server counts them")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens (random: the upper bound)")
    g.add_argument(
        "--max-tokens", type=int, default=None, help="every request's max_tokens (overrides --output-len)"
    )
    g.add_argument(
        "--range-ratio", type=float, default=0.0, help="random: lengths uniform in [ratio * len, len]"
    )
    g.add_argument("--shared-prefix-len", type=int, default=0, help="random/fixed: tokens all prompts share")
    g.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) before the run")
    g.add_argument("--save-outputs", action="store_true", help="store every output text in the JSON")
    g = p.add_argument_group("agent trace")
    g.add_argument("--sessions", type=int, default=16, help="concurrent agent sessions")
    g.add_argument("--turns", type=int, default=8)
    g.add_argument("--shared-len", type=int, default=1536, help="system prompt + tool definitions, tokens")
    g.add_argument("--tools", type=int, default=8, help="tool definitions in the shared prefix")
    g.add_argument("--task-len", type=int, default=64, help="each session's first user message, tokens")
    g.add_argument("--tool-result-len", type=int, default=128, help="tool results: [len/2, len] tokens")
    g.add_argument("--think-time", type=float, default=0.0, help="seconds between a reply and the next turn")
    g.add_argument(
        "--tool-role",
        choices=("tool", "user"),
        default="tool",
        help="user: for templates without a tool role",
    )
    g = p.add_argument_group("arrival")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate (agent: sessions/s)")
    g.add_argument(
        "--max-concurrency", "--concurrency", dest="max_concurrency", type=int, default=None, help="in flight"
    )
    return p


def make_target(args: argparse.Namespace) -> client.Target:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return client.Target(client.normalize_base_url(args.base_url), headers, args.timeout)


def auto_output(kind: str) -> Path:
    return RESULTS_DIR / f"serving-{kind}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k not in ("api_key", "output", "argv")}
    cfg["api_key_set"] = bool(args.api_key)
    return cfg


async def warm_up(
    session: aiohttp.ClientSession,
    target: client.Target,
    endpoint: str,
    model: str,
    n: int,
    cal: Calibration,
    seed: int,
    opts: BodyOptions,
) -> int:
    """`n` short streaming requests whose text is not in the run (no prefix is warmed for it)."""
    ok = 0
    rng = rng_for(seed, "warmup")
    for i in range(n):
        body = runner.request_body(endpoint, model, fit_text(rng, 32, cal), 4, opts)
        r = await client.stream_request(session, target, PATHS[endpoint], body, RequestResult(index=-1 - i))
        ok += r.ok
    return ok


async def fit_shared_prefix(
    session: aiohttp.ClientSession,
    target: client.Target,
    model: str,
    args: argparse.Namespace,
    cal: Calibration,
) -> tuple[int, int | None]:
    """The agent trace's system-prompt size so that system + tools + a one-word user turn is
    --shared-len server tokens. The chat template adds text around tool definitions that the
    calibration does not see, so one probe measures it and one correction follows. Probes use a
    same-sized trace of other words (they warm no cache for the run). -> (length to build, measured)."""

    async def measure(length: int) -> int | None:
        probe = agent_trace(args.seed + 1_000_003, 1, 1, length, 1, 1, cal, n_tools=args.tools)
        body = {
            "model": model,
            "messages": [{"role": "system", "content": probe.system}, {"role": "user", "content": "ok"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        if probe.tools:
            body["tools"] = probe.tools
        return await runner.prompt_tokens_of(session, target, "chat", body)

    first = await measure(args.shared_len)
    if first is None:
        return args.shared_len, None
    corrected = max(1, args.shared_len - (first - args.shared_len))
    return corrected, (await measure(corrected) if corrected != args.shared_len else first)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args)
    endpoint = (
        args.endpoint if args.endpoint != "auto" else ("chat" if args.dataset == "agent" else "completions")
    )
    if args.dataset == "agent" and endpoint != "chat":
        raise SystemExit("--dataset agent needs --endpoint chat")
    opts = BodyOptions(args.temperature, args.ignore_eos, dict(args.extra_body))
    warnings: list[str] = []
    async with client.make_session() as session:
        info = await runner.discover(session, target, args.model)
        counter, tokenizer_file = runner.tokenizer_counter(args.tokenizer, info)
        cal = await runner.calibrate(session, target, endpoint, info, counter, args.seed)
        calibration = {**cal.to_json(), "tokenizer_file": tokenizer_file}
        if cal.method == "heuristic":
            warnings.append("the probes got no usage.prompt_tokens: prompt lengths are estimates")
        out_len = args.max_tokens or args.output_len
        out_ratio = 1.0 if args.max_tokens else (1.0 if args.dataset == "fixed" else args.range_ratio)

        if args.dataset == "agent":
            shared_len, measured = await fit_shared_prefix(session, target, info.model, args, cal)
            calibration["shared_prefix"] = {
                "target": args.shared_len,
                "built_for": shared_len,
                "measured": measured,
            }
            trace = agent_trace(
                args.seed, args.sessions, args.turns, shared_len, args.task_len, args.tool_result_len,
                cal, n_tools=args.tools,
            )  # fmt: skip
            calibration["tools_in_trace"] = len(trace.tools)
            if measured is not None and abs(measured - args.shared_len) > 0.05 * args.shared_len:
                warnings.append(
                    f"shared prefix is {measured} tokens, not {args.shared_len}: the tool definitions' JSON "
                    "and the template alone exceed it (fewer --tools or a larger --shared-len)"
                )
            est = args.shared_len + args.task_len + args.turns * (out_len + args.tool_result_len + 32)
            if info.max_model_len and est > info.max_model_len:
                warnings.append(
                    f"the last turns may exceed the context ({est} > {info.max_model_len} tokens)"
                )
            arrivals = poisson_arrivals(rng_for(args.seed, "arrivals"), args.sessions, args.request_rate)
            total = args.sessions * args.turns

            def make_body(messages: list[dict[str, Any]]) -> dict[str, Any]:
                return runner.request_body("chat", info.model, messages, out_len, opts, trace.tools)

        else:
            ratio = 1.0 if args.dataset == "fixed" else args.range_ratio
            specs = single_turn_prompts(
                args.seed, args.num_prompts, args.input_len, out_len, ratio, cal, args.shared_prefix_len
            )
            if out_ratio == 1.0:
                for s in specs:
                    s.output_len = out_len
            bodies = [runner.request_body(endpoint, info.model, s.text, s.output_len, opts) for s in specs]
            if info.max_model_len and args.input_len + out_len > info.max_model_len:
                warnings.append(f"input + output ({args.input_len + out_len}) > context {info.max_model_len}")
            arrivals = poisson_arrivals(rng_for(args.seed, "arrivals"), args.num_prompts, args.request_rate)
            total = args.num_prompts

        warm_ok = await warm_up(session, target, endpoint, info.model, args.warmup, cal, args.seed, opts)
        if args.warmup and not warm_ok:
            warnings.append("every warm-up request failed")
        before = await runner.scrape_metrics(session, target)
        progress = Progress(total, args.dataset, enabled=not args.no_progress)
        cut = 0
        with LoopLag() as lag:
            if args.dataset == "agent":
                results, duration, cut = await runner.run_agent(
                    session, target, trace, make_body, arrivals, args.max_concurrency, progress,
                    args.think_time, args.tool_role,
                )  # fmt: skip
            else:
                results, duration = await runner.run_single_turn(
                    session, target, PATHS[endpoint], bodies, arrivals, args.max_concurrency, progress
                )
        after = await runner.scrape_metrics(session, target)

    summary = summarize(results, duration)
    record: dict[str, Any] = {
        "benchmark": "bench.serving",
        "schema": 1,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "command": "python -m bench.serving " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "machine": runner.machine(),
        "server": {"base_url": target.base_url, **info.to_json()},
        "config": {**config_of(args), "endpoint": endpoint},
        "calibration": calibration,
        "summary": summary,
        "server_metrics": metrics_report(before, after),
        "client": {"event_loop_lag_ms": lag.report(), "warmup_ok": warm_ok},
        "outputs_digest": runner.outputs_digest(results),
        "warnings": warnings,
    }
    if args.dataset == "agent":
        record["agent"] = {"sessions_cut_short": cut, "by_turn": by_turn(results)}
    record["requests"] = [runner.request_record(r, args.save_outputs) for r in results]
    return record


def summary_line(record: dict[str, Any], path: Path | None = None) -> str:
    s = record["summary"]

    def f(d: dict[str, Any], k: str) -> str:
        return "-" if d.get(k) is None else f"{d[k]:.1f}"

    hit = s["cache_hit_rate"]
    server_hit = record.get("server_metrics", {}).get("cache", {}).get("hit_rate")
    hit_txt = (
        f"{hit:.3f}"
        if hit is not None
        else (f"{server_hit:.3f} (metrics)" if server_hit is not None else "n/a")
    )
    line = (
        f"bench.serving {record['config']['dataset']}: {s['completed']}/{s['requests']} ok"
        f"{' ' + json.dumps(s['errors']) if s['errors'] else ''} in {s['duration_s']:.1f}s | "
        f"{s['request_throughput']:.2f} req/s {s['output_throughput']:.1f} out tok/s | "
        f"TTFT ms p50 {f(s['ttft_ms'], 'p50')} p99 {f(s['ttft_ms'], 'p99')} | "
        f"ITL ms p50 {f(s['itl_ms'], 'p50')} p99 {f(s['itl_ms'], 'p99')} | "
        f"E2E ms p50 {f(s['e2e_ms'], 'p50')} p99 {f(s['e2e_ms'], 'p99')} | "
        f"prompt tok {s['prompt_tokens']} cache hit {hit_txt}"
    )
    return line + (f" -> {path}" if path else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("num_prompts", "input_len", "output_len", "sessions", "turns"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    t0 = time.perf_counter()
    record = asyncio.run(run(args))
    record["client"]["wall_s_including_setup"] = round(time.perf_counter() - t0, 3)
    path = runner.write_record(record, args.output or auto_output(args.dataset))
    print(summary_line(record, path))
    for w in record["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0 if record["summary"]["completed"] else 1
