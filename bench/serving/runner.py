"""Running a workload against a server: discovery, calibration, arrivals, the agent loop, progress.

Shared by the main benchmark (`python -m bench.serving`) and the abuse benchmark
(`python -m bench.serving.abuse`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.serving import client
from bench.serving.client import Target
from bench.serving.stats import RequestResult, distribution, parse_metrics
from bench.serving.workload import HEURISTIC, AgentTrace, Calibration, fit_from_probes, rng_for, words

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


# ---- the server -----------------------------------------------------------------------------------
@dataclass
class ServerInfo:
    model: str
    max_model_len: int | None = None
    models: list[str] = field(default_factory=list)
    model_info: dict[str, Any] | None = None  # SGLang-style /get_model_info (ours and SGLang's)
    server_info: dict[str, Any] | None = None  # /get_server_info (ours and SGLang's)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "models": self.models,
            "max_model_len": self.max_model_len,
            "model_info": self.model_info,
            "server_info": self.server_info,
        }


async def discover(session: aiohttp.ClientSession, target: Target, model: str | None) -> ServerInfo:
    """The model to ask for: `model` if given, else the first of /v1/models (as SGLang's tool does)."""
    status, body = await client.get_json(session, target, "/v1/models")
    listed: list[dict[str, Any]] = body.get("data", []) if status == 200 and isinstance(body, dict) else []
    if model in (None, "", "auto"):
        if not listed:
            raise SystemExit(f"--model auto: GET {target.url('/v1/models')} gave {status} {str(body)[:200]}")
        model = str(listed[0]["id"])
    card = next((m for m in listed if m.get("id") == model), {})
    info = ServerInfo(model=model, models=[str(m.get("id")) for m in listed])
    info.max_model_len = card.get("max_model_len")
    for path, attr in (("/get_model_info", "model_info"), ("/get_server_info", "server_info")):
        status, body = await client.get_json(session, target, path)
        if status == 200 and isinstance(body, dict):
            setattr(info, attr, body)
    if info.max_model_len is None and info.model_info:
        info.max_model_len = info.model_info.get("max_context_length")
    return info


def tokenizer_counter(spec: str, info: ServerInfo) -> tuple[Callable[[str], int] | None, str | None]:
    """A token counter from a local tokenizer.json: `spec` is a path (file or directory), "none", or
    "auto" (the server's /get_model_info model_path when it is a directory on this machine)."""
    if spec == "none":
        return None, None
    path: Path | None = None
    if spec == "auto":
        for key in ("tokenizer_path", "model_path"):
            value = (info.model_info or {}).get(key)
            if value and Path(value).is_dir():
                path = Path(value)
                break
    else:
        path = Path(spec)
    if path is None:
        return None, None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        if spec != "auto":
            raise SystemExit(f"--tokenizer {spec}: no tokenizer.json there")
        return None, None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        if spec != "auto":
            raise SystemExit("--tokenizer needs the `tokenizers` package") from None
        return None, None
    tok = Tokenizer.from_file(str(file))
    return (lambda text: len(tok.encode(text, add_special_tokens=False).ids)), str(file)


def probe_body(endpoint: str, model: str, text: str) -> dict[str, Any]:
    if endpoint == "chat":
        return {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
            "temperature": 0,
        }
    return {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0}


async def prompt_tokens_of(
    session: aiohttp.ClientSession, target: Target, endpoint: str, body: dict[str, Any]
) -> int | None:
    status, resp, _ = await client.post_json(session, target, PATHS[endpoint], body)
    if status != 200 or not isinstance(resp, dict):
        return None
    usage = resp.get("usage") or {}
    return int(usage["prompt_tokens"]) if usage.get("prompt_tokens") is not None else None


async def calibrate(
    session: aiohttp.ClientSession,
    target: Target,
    endpoint: str,
    info: ServerInfo,
    counter: Callable[[str], int] | None,
    seed: int,
) -> Calibration:
    """Two non-streaming probes (max_tokens 1) of word text; their content never appears in the run,
    so they warm no prefix cache for it. Falls back to 4 characters a token when they fail."""
    rng = rng_for(seed, "probe")
    long_chars = 2000 if info.max_model_len is None else max(200, min(2000, info.max_model_len // 2))
    texts = (words(rng, long_chars // 10), words(rng, long_chars))
    counts = []
    for text in texts:
        n = await prompt_tokens_of(session, target, endpoint, probe_body(endpoint, info.model, text))
        if n is None:
            return HEURISTIC
        counts.append(n)
    cal = fit_from_probes((len(texts[0]), counts[0]), (len(texts[1]), counts[1]), counter, texts)
    cal.detail["endpoint"] = endpoint
    return cal


async def scrape_metrics(session: aiohttp.ClientSession, target: Target) -> dict[str, float] | None:
    """The engine's own samples from /metrics, or None when there is no such endpoint (never fails)."""
    status, body = await client.get_json(session, target, "/metrics")
    if status != 200 or not isinstance(body, str):
        return None
    return parse_metrics(body) or None


# ---- requests -------------------------------------------------------------------------------------
@dataclass
class BodyOptions:
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)


def request_body(
    endpoint: str,
    model: str,
    prompt: str | list[dict[str, Any]],
    max_tokens: int,
    opts: BodyOptions,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A streaming OpenAI body; `ignore_eos` (SGLang/vLLM extension) only when asked for."""
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tools:
            body["tools"] = tools
    else:
        body["prompt"] = prompt
    body.update(
        max_tokens=max_tokens,
        temperature=opts.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return body


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal (at most 10 times a second), a line
    per 10 % otherwise (CI logs)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = self.failed = self.tokens = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += 0 if result.ok else 1
        self.tokens += result.output_tokens if result.ok else 0
        self._draw(final=self.done >= self.total)

    def finish(self) -> None:
        """Draw the last state if `update` did not (an agent session cut short sends fewer)."""
        if self.enabled and self.done < self.total:
            self._draw(final=True)

    def line(self) -> str:
        el = max(time.perf_counter() - self.start, 1e-9)
        width = 30
        fill = int(width * self.done / max(1, self.total))
        return (
            f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total}"
            f" err {self.failed} | {self.done / el:.2f} req/s {self.tokens / el:.1f} out tok/s | {el:.1f}s"
        )

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if final or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + self.line() + ("\n" if final else ""))
                self.stream.flush()
            return
        decile = 10 * self.done // max(1, self.total)
        if decile != self._last_decile or (final and self.done < self.total):
            self._last_decile = decile
            self.stream.write(self.line() + "\n")
            self.stream.flush()


class LoopLag:
    """How late the client's event loop wakes up: if this grows, the client (not the server) is
    the bottleneck and the latencies it measures are inflated."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.samples.append(max(0.0, time.perf_counter() - t - self.period))

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()

    def report(self) -> dict[str, Any]:
        return distribution(self.samples)


async def _sleep_until(start: float, offset: float) -> None:
    delay = start + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_single_turn(
    session: aiohttp.ClientSession,
    target: Target,
    path: str,
    bodies: Sequence[dict[str, Any]],
    arrivals: Sequence[float],
    max_concurrency: int | None,
    progress: Progress,
) -> tuple[list[RequestResult], float]:
    """Send each body at its arrival offset, at most `max_concurrency` in flight; -> (results, wall s)."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(i: int) -> RequestResult:
        await _sleep_until(start, arrivals[i])
        result = RequestResult(index=i)
        if gate is None:
            await client.stream_request(session, target, path, bodies[i], result)
        else:
            async with gate:
                await client.stream_request(session, target, path, bodies[i], result)
        progress.update(result)
        return result

    results = await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return list(results), time.perf_counter() - start


async def run_agent(
    session: aiohttp.ClientSession,
    target: Target,
    trace: AgentTrace,
    make_body: Callable[[list[dict[str, Any]]], dict[str, Any]],
    arrivals: Sequence[float],
    max_concurrency: int | None,
    progress: Progress,
    think_time: float = 0.0,
    tool_role: str = "tool",
) -> tuple[list[RequestResult], float, int]:
    """Each session sends its turns in order, appending the assistant's reply and the next tool
    result after each; a failed turn ends its session. -> (results, wall s, sessions cut short)."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()
    results: list[RequestResult] = []
    cut = 0

    async def one(s: int) -> None:
        nonlocal cut
        await _sleep_until(start, arrivals[s])
        replies: list[str] = []
        for t in range(trace.turns):
            body = make_body(trace.messages(s, replies, tool_role))
            result = RequestResult(index=s * trace.turns + t, meta={"session": s, "turn": t})
            if gate is None:
                await client.stream_request(session, target, PATHS["chat"], body, result)
            else:
                async with gate:
                    await client.stream_request(session, target, PATHS["chat"], body, result)
            results.append(result)
            progress.update(result)
            if not result.ok:
                cut += 1
                return
            replies.append(result.text)
            if think_time and t + 1 < trace.turns:
                await asyncio.sleep(think_time)

    await asyncio.gather(*(one(s) for s in range(len(trace.sessions))))
    progress.finish()
    results.sort(key=lambda r: r.index)
    return results, time.perf_counter() - start, cut


# ---- the record -----------------------------------------------------------------------------------
def request_record(r: RequestResult, save_output: bool = False) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 3)

    rec: dict[str, Any] = {"index": r.index, **r.meta, "ok": r.ok, "status": r.status}
    if r.error:
        rec["error"], rec["error_detail"] = r.error, r.error_detail
    rec.update(
        prompt_tokens=r.prompt_tokens,
        cached_tokens=r.cached_tokens,
        output_tokens=r.output_tokens,
        chunks=len(r.chunk_times),
        ttft_ms=ms(r.ttft),
        tpot_ms=ms(r.tpot),
        e2e_ms=ms(r.e2e),
        finish_reason=r.finish_reason,
        output_sha256=hashlib.sha256(r.text.encode()).hexdigest()[:16],
    )
    if save_output:
        rec["output"] = r.text
    return rec


def outputs_digest(results: Sequence[RequestResult]) -> str:
    """One hash of every output in request order: equal digests = identical outputs (e.g. greedy
    runs with the prefix cache on and off)."""
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r.index):
        h.update(f"{r.index}\x00{r.text}\x01".encode())
    return h.hexdigest()[:32]


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def write_record(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(record), indent=1, allow_nan=False) + "\n")
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe: inf (e.g. request rate) as the string "inf", NaN as null, paths as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
