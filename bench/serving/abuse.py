"""`python -m bench.serving.abuse`: normal-request latency while oversized bodies arrive, vs without.

One run, two phases against the same server: `baseline` (the normal load alone) then `abuse` (the
same-shaped normal load, other words, while the abuse load is sent). The abuse load is a list of
`SIZE:COUNT` (e.g. `20MB:1,1MB:10`): COUNT concurrent clients each POST one chat body of SIZE bytes
(valid JSON, a huge user message, max_tokens 1) at the start of the phase, or keep posting until
the normal load ends with --abuse-loop. /health is polled in both phases. The result holds both
phases' latency distributions, abuse/baseline ratios, /health latencies and the status codes the
abuse bodies got (413 once the server bounds its input).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.serving import client, runner
from bench.serving.cli import add_server_args, auto_output, config_of, make_target
from bench.serving.runner import PATHS, BodyOptions, Progress
from bench.serving.stats import distribution, summarize
from bench.serving.workload import Calibration, poisson_arrivals, rng_for, single_turn_prompts, words

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`1MB` = 10^6 bytes, `1MiB` = 2^20, `512` = bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512, 64KB, 1MB, 20MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_abuse(spec: str) -> list[tuple[int, int]]:
    """`20MB:1,1MB:10` -> [(20000000, 1), (1000000, 10)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        size, _, count = part.partition(":")
        n = int(count or 1)
        if n < 1:
            raise ValueError(f"count must be >= 1 in {part!r}")
        out.append((parse_size(size), n))
    if not out:
        raise ValueError("empty --abuse list")
    return out


def abuse_body(model: str, size: int, seed: int = 0) -> bytes:
    """A valid chat request of exactly `size` bytes (when size exceeds its skeleton): one user
    message of random ASCII words, max_tokens 1. Real JSON, so the server parses and tokenizes it."""
    skeleton = {
        "model": model,
        "messages": [{"role": "user", "content": ""}],
        "max_tokens": 1,
        "stream": False,
    }
    base = len(json.dumps(skeleton).encode())
    skeleton["messages"][0]["content"] = words(rng_for(seed, f"abuse-{size}"), max(0, size - base))
    return json.dumps(skeleton).encode()


async def poll_health(
    session: aiohttp.ClientSession, target: client.Target, interval: float, stop: asyncio.Event
) -> list[tuple[float, int | None]]:
    """(seconds, status) of GET /health every `interval` until `stop` (one at a time, as a probe)."""
    out: list[tuple[float, int | None]] = []
    while not stop.is_set():
        t = time.perf_counter()
        status, _ = await client.get_json(session, target, "/health", timeout=target.timeout)
        out.append((time.perf_counter() - t, status))
        with contextlib.suppress(TimeoutError):  # the interval passed: probe again
            await asyncio.wait_for(stop.wait(), timeout=interval)
    return out


async def abuser(
    session: aiohttp.ClientSession,
    target: client.Target,
    path: str,
    body: bytes,
    loop: bool,
    stop: asyncio.Event,
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    while True:
        status, resp, took = await client.post_json(session, target, path, body)
        rec: dict[str, Any] = {"bytes": len(body), "status": status, "seconds": round(took, 4)}
        if status != 200:
            rec["detail"] = (json.dumps(resp) if isinstance(resp, dict) else str(resp))[:200]
        sent.append(rec)
        if not loop or stop.is_set():
            return sent


def health_report(samples: list[tuple[float, int | None]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for _, s in samples:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"latency_ms": distribution([t for t, _ in samples]), "statuses": statuses}


async def phase(
    name: str,
    session: aiohttp.ClientSession,
    target: client.Target,
    args: argparse.Namespace,
    model: str,
    cal: Calibration,
    abuse: list[tuple[int, int]],
) -> dict[str, Any]:
    endpoint = args.endpoint
    opts = BodyOptions(args.temperature, args.ignore_eos, dict(args.extra_body))
    # Each phase has its own words (same lengths), so a prefix cache favours neither.
    specs = single_turn_prompts(
        f"{args.seed}-{name}", args.num_prompts, args.input_len, args.output_len, 1.0, cal
    )
    bodies = [runner.request_body(endpoint, model, s.text, s.output_len, opts) for s in specs]
    arrivals = poisson_arrivals(rng_for(args.seed, "arrivals"), args.num_prompts, args.request_rate)
    stop_health, stop_abuse = asyncio.Event(), asyncio.Event()
    started = time.perf_counter()
    health = asyncio.create_task(poll_health(session, target, args.health_interval, stop_health))
    abusers = []
    if abuse:
        cache: dict[int, bytes] = {}
        for size, count in abuse:
            body = cache.setdefault(size, abuse_body(model, size, args.seed))
            abusers += [
                asyncio.create_task(
                    abuser(session, target, args.abuse_path, body, args.abuse_loop, stop_abuse)
                )
                for _ in range(count)
            ]
    progress = Progress(len(bodies), name, enabled=not args.no_progress)
    results, duration = await runner.run_single_turn(
        session, target, PATHS[endpoint], bodies, arrivals, args.max_concurrency, progress
    )
    stop_abuse.set()  # --abuse-loop clients stop after the body they are sending
    sent = [rec for batch in await asyncio.gather(*abusers) for rec in batch]
    # /health is probed until the abuse is over too: that is when it suffers most.
    stop_health.set()
    out: dict[str, Any] = {
        "normal_window_s": round(duration, 3),
        "phase_window_s": round(time.perf_counter() - started, 3),
        "summary": summarize(results, duration),
        "health": health_report(await health),
        "requests": [runner.request_record(r) for r in results],
    }
    if abuse:
        statuses: dict[str, int] = {}
        for rec in sent:
            statuses[str(rec["status"])] = statuses.get(str(rec["status"]), 0) + 1
        out["abuse"] = {"sent": len(sent), "statuses": statuses, "requests": sent}
    return out


def ratios(baseline: dict[str, Any], abused: dict[str, Any]) -> dict[str, Any]:
    """abuse / baseline for each latency statistic (1.0 = no effect; 1.2 = 20 % slower)."""
    out: dict[str, Any] = {}
    for metric in ("e2e_ms", "ttft_ms", "itl_ms"):
        a, b = abused["summary"][metric], baseline["summary"][metric]
        out[metric] = {
            k: (round(a[k] / b[k], 3) if a.get(k) is not None and b.get(k) else None)
            for k in ("mean", "p50", "p90", "p99")
        }
    ha, hb = abused["health"]["latency_ms"], baseline["health"]["latency_ms"]
    out["health_ms"] = {
        k: (round(ha[k] / hb[k], 3) if ha.get(k) is not None and hb.get(k) else None)
        for k in ("p50", "p99", "max")
    }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving.abuse",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_server_args(p)
    g = p.add_argument_group("load")
    g.add_argument("--abuse", type=parse_abuse, default="20MB:1,1MB:10", help="SIZE:COUNT list")
    g.add_argument(
        "--abuse-loop", action="store_true", help="abusers keep posting until the normal load ends"
    )
    g.add_argument("--abuse-path", default="/v1/chat/completions")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="normal requests")
    g.add_argument("--num-prompts", type=int, default=16, help="normal requests per phase")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=32)
    g.add_argument("--request-rate", type=float, default=math.inf)
    g.add_argument("--max-concurrency", "--concurrency", dest="max_concurrency", type=int, default=2)
    g.add_argument("--health-interval", type=float, default=0.05, help="seconds between /health probes")
    return p


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args)
    async with client.make_session() as session:
        info = await runner.discover(session, target, args.model)
        counter, _ = runner.tokenizer_counter(args.tokenizer, info)
        cal = await runner.calibrate(session, target, args.endpoint, info, counter, args.seed)
        await runner.scrape_metrics(session, target)  # warms the path; the numbers are not used
        baseline = await phase("baseline", session, target, args, info.model, cal, [])
        abused = await phase("abuse", session, target, args, info.model, cal, args.abuse)
    return {
        "benchmark": "bench.serving.abuse",
        "schema": 1,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "command": "python -m bench.serving.abuse "
        + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "machine": runner.machine(),
        "server": {"base_url": target.base_url, **info.to_json()},
        "config": {**config_of(args), "abuse": [{"bytes": s, "count": c} for s, c in args.abuse]},
        "calibration": cal.to_json(),
        "ratios": ratios(baseline, abused),
        "baseline": baseline,
        "abuse": abused,
    }


def summary_line(record: dict[str, Any], path: Path | None = None) -> str:
    b, a, r = record["baseline"], record["abuse"], record["ratios"]

    def ms(d: dict[str, Any], k: str) -> str:
        return "-" if d.get(k) is None else f"{d[k]:.1f}"

    be, ae = b["summary"]["e2e_ms"], a["summary"]["e2e_ms"]
    bh, ah = b["health"]["latency_ms"], a["health"]["latency_ms"]
    line = (
        f"bench.serving.abuse: normal e2e p50 {ms(be, 'p50')} -> {ms(ae, 'p50')} ms (x{r['e2e_ms']['p50']}), "
        f"mean x{r['e2e_ms']['mean']}, p99 x{r['e2e_ms']['p99']} | /health p99 {ms(bh, 'p99')} -> "
        f"{ms(ah, 'p99')} ms, max {ms(ah, 'max')} ms | abuse statuses {json.dumps(a['abuse']['statuses'])} | "
        f"failed normal {b['summary']['failed']} / {a['summary']['failed']}"
    )
    return line + (f" -> {path}" if path else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    record = asyncio.run(run(args))
    path = runner.write_record(record, args.output or auto_output("abuse"))
    print(summary_line(record, path))
    return 0 if record["baseline"]["summary"]["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
