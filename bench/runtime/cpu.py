"""CPU benchmark of the serving runtime on the built-in tiny model, with and without MTP.

`python -m bench.runtime.cpu [--concurrency 8] [--requests 16] [--max-tokens 64] [--json PATH]`

For each mode it starts the real server in this process (uvicorn on 127.0.0.1, a free port), sends
`--requests` streaming completions with `--concurrency` in flight through the `openai` client, and
reports output tokens/s, TTFT and inter-token latency percentiles, plus the MTP acceptance. A
single-stream pass measures batch-1 decode speed. Results go to bench/results/runtime-cpu.json.
The tiny model's MTP layer has random weights, so acceptance is near zero: MTP numbers here track
the engine's overhead for drafting and verifying, not a real speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import openai
from ling_runtime.cli import parse_serve_args
from ling_runtime.server.app import build_app
from ling_runtime.server.launch import BackgroundServer, build_engine

RESULTS = Path(__file__).resolve().parents[1] / "results" / "runtime-cpu.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    stream = await client.completions.create(
        model="ling-tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else float("nan"), "stamps": stamps, "start": start}


async def _load(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    prompts = [[(13 * i + j) % 250 + 1 for j in range(32 + i % 17)] for i in range(requests)]

    async def run(prompt: list[int]) -> dict:
        async with gate:
            return await _one(client, prompt, max_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(run(p) for p in prompts))
    wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in results]
    itls = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 3),
        # Byte-level tokens: each streamed chunk carries >= 1 token; count tokens from the request size.
        "output_tokens_per_s": round(requests * max_tokens / wall, 1),
        "ttft_p50_ms": round(1000 * _pct(ttfts, 0.5), 2),
        "ttft_p90_ms": round(1000 * _pct(ttfts, 0.9), 2),
        "itl_p50_ms": round(1000 * _pct(itls, 0.5), 2),
        "itl_mean_ms": round(1000 * statistics.fmean(itls), 2) if itls else None,
    }


def bench_mode(extra: list[str], args: argparse.Namespace) -> dict:
    port = _free_port()
    serve = parse_serve_args(
        ["--host", "127.0.0.1", "--port", str(port), "--max-running-requests", str(args.concurrency), *extra]
    )
    engine, ctx = build_engine(serve)
    url = f"http://127.0.0.1:{port}"
    try:
        with BackgroundServer(build_app(ctx), "127.0.0.1", port):
            asyncio.run(_load(url, 2, 1, 8))  # warm-up
            single = asyncio.run(_load(url, 2, 1, args.max_tokens))
            batched = asyncio.run(_load(url, args.requests, args.concurrency, args.max_tokens))
            labels = {"model_name": ctx.metrics.model_name}
            sample = ctx.metrics.registry.get_sample_value
            drafted = sample("ling_runtime_spec_draft_tokens_total", labels) or 0.0
            accepted = sample("ling_runtime_spec_accepted_tokens_total", labels) or 0.0
    finally:
        engine.stop()
    return {
        "flags": extra,
        "batch1": single,
        "batched": batched,
        "spec_draft_tokens": drafted,
        "spec_accepted_tokens": accepted,
        "spec_accept_rate": round(accepted / drafted, 4) if drafted else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    modes = {
        "no_mtp": [],
        "mtp_nextn_3": ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3"],
    }
    results = {name: bench_mode(flags, args) for name, flags in modes.items()}
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.runtime.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": "built-in tiny (ling_runtime.builtin), float32, TP 1",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        b1, bb = r["batch1"], r["batched"]
        print(
            f"{name:12s} batch1 {b1['output_tokens_per_s']:7.1f} tok/s ttft {b1['ttft_p50_ms']:6.1f} ms | "
            f"c={bb['concurrency']} {bb['output_tokens_per_s']:7.1f} tok/s ttft p50 {bb['ttft_p50_ms']:6.1f} ms "
            f"p90 {bb['ttft_p90_ms']:6.1f} ms | accept {r['spec_accept_rate']}"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
