"""CPU benchmark of the serving runtime on the built-in (trained) model: MTP's speed-up, measured.

`python -m bench.runtime.cpu [--concurrency 8] [--requests 32] [--rounds 5] [--steps 3] [--json PATH]`

It starts two `ling-runtime serve` processes with no `--model-path` (the built-in model, TP 1,
float32) on 127.0.0.1, one without MTP and one with `--speculative-algorithm NEXTN
--speculative-num-steps K`, and asks both, in alternating rounds (the median round is kept), the
task's questions through the `openai` client as streamed chat completions (greedy, ending at the
model's end-of-turn; usage from `stream_options.include_usage`):

- `batch1`: the questions one after another: single-stream output tokens/s, TTFT, time per token.
- `batched`: `--requests` questions with `--concurrency` in flight: aggregate output tokens/s.
- MTP: draft / accepted token counters from the server's /metrics (acceptance per drafted token).

Every mode must give the same answers (MTP is lossless); the run fails otherwise. The record goes to
bench/results/runtime-cpu.json with the command, the machine and its load average before and after
(the machine is shared: the load is part of the result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
from ling_runtime.builtin import CARD_QUESTION
from ling_runtime.builtin.data import held_out_sample, task_data

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "runtime-cpu.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def questions(n: int) -> list[str]:
    """The card's question, held-out questions and (past those) training ones: a fixed list."""
    pool = [CARD_QUESTION] + [e.question for e in held_out_sample(len(task_data().held_out))]
    pool += [e.question for e in task_data().train]
    return pool[:n]


async def _one(client: openai.AsyncOpenAI, question: str) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    text, tokens = "", 0
    stream = await client.chat.completions.create(
        model="ling-tiny",
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    return {"ttft": stamps[0] - start if stamps else float("nan"), "end": time.perf_counter() - start,
            "tokens": tokens, "text": text}  # fmt: skip


async def _load(url: str, qs: list[str], concurrency: int) -> tuple[dict, list[str]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def run(q: str) -> dict:
        async with gate:
            return await _one(client, q)

    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(run(q) for q in qs))
    finally:
        await client.close()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    per_token = [(r["end"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    ttfts = [r["ttft"] for r in results]
    summary = {
        "requests": len(qs),
        "concurrency": concurrency,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * _pct(ttfts, 0.5), 2),
        "ttft_p90_ms": round(1000 * _pct(ttfts, 0.9), 2),
        "ms_per_output_token_after_first": round(1000 * statistics.fmean(per_token), 2)
        if per_token
        else None,
    }
    return summary, [r["text"] for r in results]


def _counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


class Server:
    """`ling-runtime serve` (built-in model) in its own process group on a free loopback port."""

    def __init__(self, flags: list[str], args: argparse.Namespace) -> None:
        self.flags = flags
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ling_runtime", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-running-requests", str(args.concurrency), *flags]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server {self.flags} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server {self.flags} did not become healthy in {timeout:.0f} s")
            time.sleep(0.5)

    def spec_counters(self) -> tuple[float, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return (
            _counter(text, "ling_runtime_spec_draft_tokens_total"),
            _counter(text, "ling_runtime_spec_accepted_tokens_total"),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _median_run(runs: list[dict]) -> dict:
    """The round with the median output tokens/s (its other numbers come with it)."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return {
        **ordered[len(ordered) // 2],
        "output_tokens_per_s_all_rounds": [r["output_tokens_per_s"] for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="questions in the batched pass")
    parser.add_argument("--single", type=int, default=32, help="questions in the single-stream pass")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per mode (median kept)")
    parser.add_argument("--steps", type=int, default=3, help="MTP draft steps (--speculative-num-steps)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    mtp_name = f"mtp_nextn_{args.steps}"
    modes = {
        "no_mtp": [],
        mtp_name: ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(args.steps)],
    }
    qs = questions(max(args.requests, args.single))
    load_before = os.getloadavg()
    # Both servers up at once and measured in alternation, so a change in the machine's load
    # (it is shared) falls on both modes alike; an idle server's engine loop only waits.
    servers = {name: Server(flags, args) for name, flags in modes.items()}
    runs: dict[str, dict[str, list[dict]]] = {name: {"batch1": [], "batched": []} for name in modes}
    answers: dict[str, list[str]] = {}
    counters: dict[str, tuple[float, float]] = {}
    try:
        for server in servers.values():
            server.wait_healthy()
            asyncio.run(_load(server.url, qs[:2], 1))  # warm-up
        start = {name: server.spec_counters() for name, server in servers.items()}
        for _ in range(args.rounds):
            for name, server in servers.items():
                single, texts = asyncio.run(_load(server.url, qs[: args.single], 1))
                batched, batched_texts = asyncio.run(_load(server.url, qs[: args.requests], args.concurrency))
                if batched_texts[: len(texts)] != texts[: len(batched_texts)]:
                    raise SystemExit(f"{name}: greedy answers differ between single-stream and batched")
                runs[name]["batch1"].append(single)
                runs[name]["batched"].append(batched)
                answers[name] = batched_texts
        for name, server in servers.items():
            drafted, accepted = server.spec_counters()
            counters[name] = (drafted - start[name][0], accepted - start[name][1])
    finally:
        for server in servers.values():
            server.stop()
    load_after = os.getloadavg()
    results = {}
    for name, flags in modes.items():
        drafted, accepted = counters[name]
        results[name] = {
            "flags": flags,
            "batch1": _median_run(runs[name]["batch1"]),
            "batched": _median_run(runs[name]["batched"]),
            "spec_draft_tokens": drafted,
            "spec_accepted_tokens": accepted,
            "spec_accept_rate": round(accepted / drafted, 4) if drafted else None,
        }
    base, mtp = results["no_mtp"], results[mtp_name]
    same = answers["no_mtp"] == answers[mtp_name]
    speedup = {
        k: round(mtp[k]["output_tokens_per_s"] / base[k]["output_tokens_per_s"], 2)
        for k in ("batch1", "batched")
    }
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.runtime.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "model": "built-in (ling_runtime.builtin: trained tiny Ling-2.6), float32, TP 1, "
        f"server OMP_NUM_THREADS={args.threads}",
        "workload": "chat questions of the built-in task (the card's, then held-out ones), greedy, "
        f"to the end of the answer (max_tokens 32); {args.rounds} alternating rounds, median kept",
        "same_answers_with_and_without_mtp": same,
        "mtp_speedup_output_tokens_per_s": speedup,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        b1, bb = r["batch1"], r["batched"]
        print(
            f"{name:12s} batch1 {b1['output_tokens_per_s']:7.1f} tok/s ttft {b1['ttft_p50_ms']:6.1f} ms "
            f"{b1['ms_per_output_token_after_first']} ms/tok | c={bb['concurrency']} "
            f"{bb['output_tokens_per_s']:7.1f} tok/s | accept {r['spec_accept_rate']}"
        )
    print(f"MTP speed-up: batch1 x{speedup['batch1']}, batched x{speedup['batched']}; same answers: {same}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
