"""The HTTP side: one streaming OpenAI request with per-chunk timing, and small GET/POST helpers.

aiohttp (as SGLang's and vLLM's benchmarks use) reads the SSE stream line by line; each line is
stamped with `time.perf_counter()` as it is read, before JSON parsing, so the client's own parsing
never delays a timestamp it has not taken yet. Only the OpenAI API is used, so the same code runs
against ling-runtime, SGLang and vLLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.serving.stats import RequestResult


@dataclass
class Target:
    """Where and how to send: base URL (no /v1), headers (auth), per-request timeout (s)."""

    base_url: str
    headers: dict[str, str]
    timeout: float

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


def normalize_base_url(url: str) -> str:
    """Accept `http://h:p`, `http://h:p/` or `http://h:p/v1`: the OpenAI paths are added later."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    # limit 0: no connection cap (the benchmark's own semaphore is the concurrency limit);
    # read_bufsize 1 MiB: one SSE line (logprobs, tool calls) may exceed aiohttp's 64 KiB default.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False), read_bufsize=1 << 20
    )


def parse_sse_line(line: bytes) -> tuple[str, Any]:
    """One SSE line -> ("data", obj) | ("done", None) | ("skip", None) | ("bad", text)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return "skip", None  # blank separators, `: keep-alive` comments, `event:` lines
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return "done", None
    try:
        return "data", json.loads(payload)
    except ValueError:
        return "bad", payload[:200].decode(errors="replace")


def chunk_output(obj: dict[str, Any]) -> str | None:
    """The output a chunk carries: chat delta content / reasoning / tool-call text, or completion
    text. None when it carries none (role-only first chunk, finish chunk, usage chunk)."""
    choices = obj.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:
        parts = [delta.get("content") or "", delta.get("reasoning_content") or ""]
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            parts.append((fn.get("name") or "") + (fn.get("arguments") or ""))
        text = "".join(parts)
    else:
        text = choice.get("text") or ""
    return text or None


def apply_usage(result: RequestResult, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    if usage.get("prompt_tokens") is not None:
        result.prompt_tokens = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        result.cached_tokens = int(details["cached_tokens"])


async def stream_request(
    session: aiohttp.ClientSession, target: Target, path: str, body: dict[str, Any], result: RequestResult
) -> RequestResult:
    """POST a streaming request and fill `result` (times relative to when the request is sent)."""
    pieces: list[str] = []
    result.start = time.perf_counter()
    try:
        async with session.post(
            target.url(path),
            json=body,
            headers=target.headers,
            timeout=aiohttp.ClientTimeout(total=target.timeout),
        ) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"http_{resp.status}"
                result.error_detail = (await resp.text())[:300]
                return result
            done = False
            async for raw in resp.content:
                now = time.perf_counter()
                kind, obj = parse_sse_line(raw)
                if kind == "done":
                    done = True
                    break
                if kind == "bad":
                    result.error, result.error_detail = "bad_chunk", obj
                    return result
                if kind != "data":
                    continue
                if "error" in obj and not obj.get("choices"):
                    err = obj["error"]
                    result.error = "stream_error"
                    result.error_detail = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                    return result
                text = chunk_output(obj)
                finish = next(
                    (c["finish_reason"] for c in obj.get("choices") or [] if c.get("finish_reason")), None
                )
                if text is not None:
                    pieces.append(text)
                    result.chunk_times.append(now - result.start)
                elif finish and not result.chunk_times:
                    # Tokens were generated but decode to no text yet (a partial UTF-8 character,
                    # a special token): the finish chunk is then the first sign of output (TTFT).
                    result.chunk_times.append(now - result.start)
                if finish:
                    result.finish_reason = finish
                apply_usage(result, obj.get("usage"))
            result.e2e = time.perf_counter() - result.start
            if not done:
                result.error = "stream_truncated"  # the connection ended without [DONE]
                return result
            result.ok = True
            return result
    except TimeoutError:
        result.error = "timeout"
    except aiohttp.ClientError as exc:
        result.error, result.error_detail = "connection", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.text = "".join(pieces)
        if result.e2e is None:
            result.e2e = time.perf_counter() - result.start
    return result


async def get_json(
    session: aiohttp.ClientSession, target: Target, path: str, timeout: float = 10.0
) -> tuple[int | None, Any]:
    """GET -> (status, parsed JSON or text); (None, error text) when the server cannot be reached."""
    try:
        async with session.get(
            target.url(path), headers=target.headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


async def post_json(
    session: aiohttp.ClientSession, target: Target, path: str, body: dict[str, Any] | bytes
) -> tuple[int | None, Any, float]:
    """POST (non-streaming) -> (status, parsed JSON or text, seconds); status None: no answer."""
    start = time.perf_counter()
    kwargs: dict[str, Any] = (
        {"data": body, "headers": {**target.headers, "Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body, "headers": target.headers}
    )
    try:
        async with session.post(
            target.url(path), timeout=aiohttp.ClientTimeout(total=target.timeout), **kwargs
        ) as resp:
            text = await resp.text()
            took = time.perf_counter() - start
            try:
                return resp.status, json.loads(text), took
            except ValueError:
                return resp.status, text[:300], took
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start
