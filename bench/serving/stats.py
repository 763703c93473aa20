"""Pure statistics: percentiles, per-request results -> the benchmark summary, /metrics parsing.

Definitions follow SGLang's bench_serving and vLLM's benchmark_serving so numbers compare:
TTFT = request sent -> first chunk carrying output; ITL = gaps between output-carrying chunks (a
chunk may hold several tokens, e.g. with MTP); TPOT = (e2e - TTFT) / (output tokens - 1);
throughput = tokens of successful requests / wall time of the whole run.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """mean, p50/p90/p99, min, max of `values` (seconds) in ms (`scale`); None when empty."""
    if not values:
        return {"n": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "min": None, "max": None}
    out: dict[str, float | int | None] = {
        "n": len(values),
        "mean": round(scale * sum(values) / len(values), 3),
    }
    for q in PERCENTILES:
        out[f"p{q}"] = round(scale * percentile(values, q), 3)
    out["min"] = round(scale * min(values), 3)
    out["max"] = round(scale * max(values), 3)
    return out


@dataclass
class RequestResult:
    """What one request gave. Times are seconds; `chunk_times` are offsets from `start` of the
    chunks that carried output (the first one is the TTFT)."""

    index: int
    start: float = 0.0
    ok: bool = False
    status: int | None = None
    error: str | None = None  # kind: http_<code>, stream_error, timeout, connection, ...
    error_detail: str | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def output_tokens(self) -> int:
        """usage.completion_tokens; without usage, the number of output chunks (a lower bound)."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.chunk_times)

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if self.ttft is None or self.e2e is None or n < 2:
            return None
        return (self.e2e - self.ttft) / (n - 1)


def error_kind_counts(results: Iterable[RequestResult]) -> dict[str, int]:
    return dict(sorted(Counter(r.error or "unknown" for r in results if not r.ok).items()))


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """The run's headline numbers from its per-request results and wall time (seconds)."""
    ok = [r for r in results if r.ok]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    cached = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(prompt)
    duration = max(duration, 1e-9)
    e2es = [r.e2e for r in ok if r.e2e is not None]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": error_kind_counts(results),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(out_tokens / duration, 2),
        "input_throughput": round(in_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        # Mean requests in flight (Little's law), as SGLang reports it: how loaded the server was.
        "concurrency_achieved": round(sum(e2es) / duration, 3),
        "prompt_tokens": in_tokens,
        "prompt_tokens_reported_by": f"{len(prompt)}/{len(ok)} requests",
        "output_tokens": out_tokens,
        "output_tokens_from_usage": all(r.completion_tokens is not None for r in ok),
        "cached_tokens": sum(r.cached_tokens or 0 for r in cached) if cached else None,
        "cache_hit_rate": (
            round(
                sum(r.cached_tokens or 0 for r in cached) / max(1, sum(r.prompt_tokens or 0 for r in cached)),
                4,
            )
            if cached
            else None
        ),
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution([x for r in ok for x in r.itls]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "e2e_ms": distribution(e2es),
    }


def by_turn(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """Agent runs: TTFT, prompt and cached tokens per turn index (turn 0 has no history)."""
    turns = sorted({r.meta["turn"] for r in results if "turn" in r.meta})
    out = []
    for t in turns:
        rs = [r for r in results if r.meta.get("turn") == t and r.ok]
        cached = [r.cached_tokens for r in rs if r.cached_tokens is not None]
        out.append(
            {
                "turn": t,
                "completed": len(rs),
                "prompt_tokens_mean": round(sum(r.prompt_tokens or 0 for r in rs) / max(1, len(rs)), 1),
                "cached_tokens_mean": round(sum(cached) / len(cached), 1) if cached else None,
                "ttft_ms": distribution([r.ttft for r in rs if r.ttft is not None]),
            }
        )
    return out


# ---- /metrics (Prometheus text format) -----------------------------------------------------------
SERVER_PREFIXES = ("ling_runtime_", "sglang:", "vllm:")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str, prefixes: tuple[str, ...] = SERVER_PREFIXES) -> dict[str, float]:
    """`name{labels}` -> value for the serving engines' own samples; histogram buckets and
    `_created` timestamps are left out (their _sum and _count are kept)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        if not name.startswith(prefixes) or name.endswith(("_bucket", "_created")):
            continue
        try:
            out[name + labels] = float(value)
        except ValueError:
            continue
    return out


def _is_counter_like(key: str) -> bool:
    name = key.split("{", 1)[0]
    return name.endswith(("_total", "_sum", "_count"))


def metrics_report(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """Counter deltas over the run, gauges at the end, the engine family found and any cache hit
    rate the server exports (ours: cached/prompt tokens; vLLM: prefix cache hits/queries; SGLang:
    its cache_hit_rate gauge)."""
    if after is None:
        return {"available": False}
    before = before or {}
    deltas = {k: round(v - before.get(k, 0.0), 6) for k, v in after.items() if _is_counter_like(k)}
    gauges = {k: v for k, v in after.items() if not _is_counter_like(k)}
    families = sorted({p.rstrip("_:") for k in after for p in SERVER_PREFIXES if k.startswith(p)})

    def total(match) -> float | None:
        keys = [k for k in deltas if match(k.split("{", 1)[0])]
        return sum(deltas[k] for k in keys) if keys else None

    cache: dict[str, Any] = {}
    # Cached prompt tokens (ours will be named like ling_runtime_cached_prompt_tokens_total).
    cached = total(lambda n: "cached" in n and "token" in n and n.endswith("_total"))
    prompt = total(lambda n: n.endswith("prompt_tokens_total") and "cached" not in n)
    if cached is not None:
        cache["cached_prompt_tokens"] = cached
        if prompt:
            cache["hit_rate"] = round(cached / prompt, 4)
    hits = total(lambda n: "prefix_cache_hits" in n)
    queries = total(lambda n: "prefix_cache_queries" in n)
    if hits is not None and queries:
        cache["prefix_cache_hits"], cache["prefix_cache_queries"] = hits, queries
        cache["hit_rate"] = round(hits / queries, 4)
    gauge_rate = [v for k, v in gauges.items() if "cache_hit_rate" in k]
    if gauge_rate:
        cache["hit_rate_gauge"] = gauge_rate[0]
    return {"available": True, "families": families, "deltas": deltas, "gauges": gauges, "cache": cache}
