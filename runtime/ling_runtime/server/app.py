"""HTTP routes: OpenAI `/v1/*`, SGLang-native `/generate`, `/health`, `/health_generate`, `/metrics`.

Routes only translate: request JSON -> prompt ids + SamplingParams -> `Engine.submit`, then engine
events -> JSON or server-sent events. Every error leaves as an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ling_runtime.engine.engine import (
    ContextLengthError,
    Engine,
    EngineUnavailable,
    TokenEvent,
    asyncio_emitter,
)
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.server.metrics import RuntimeMetrics
from ling_runtime.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    openai_sampling,
    sglang_sampling,
    validate_sampling,
)
from ling_runtime.server.tokenizer import ChatTemplateError
from ling_runtime.server.tool_parser import ToolCallStreamer, parse_tool_calls

_OPEN_PATHS = {"/health", "/health_generate", "/metrics"}


@dataclass
class ServerContext:
    engine: Engine
    model_name: str
    context_length: int
    metrics: RuntimeMetrics
    api_key: str | None = None
    tool_call_parser: str | None = None
    created: int = 0
    model_dir: str = ""


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="ling-runtime", docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    engine = ctx.engine
    tok = engine.tokenizer

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if ctx.api_key and request.url.path not in _OPEN_PATHS:
            header = request.headers.get("authorization", "")
            if header != f"Bearer {ctx.api_key}":
                err = APIError(
                    401, "Invalid or missing API key", "invalid_request_error", code="invalid_api_key"
                )
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        err = APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)
        return JSONResponse(err.body(), status_code=400)

    # ---- health, metrics, models --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        ok, reason = engine.health()
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "reason": reason}, status_code=200 if ok else 503
        )

    @app.get("/health_generate")
    async def health_generate() -> Response:
        ok, reason = engine.health()
        if ok:
            params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
            try:
                events = [e async for e in _run(engine, [tok.bos_token_id or 0], params, None)]
                ok = bool(events and events[-1].finished and not events[-1].error)
                reason = "ok" if ok else (events[-1].error if events else "no output")
            except (TimeoutError, EngineUnavailable) as exc:
                ok, reason = False, str(exc) or "timed out"
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "reason": reason}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        m = ctx.metrics
        m.num_queue_reqs.set(engine.num_waiting)
        m.num_running_reqs.set(engine.scheduler.num_running)
        m.ranks_alive.set(engine.executor.ranks_alive()[0])
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "ling-runtime",
            "max_model_len": ctx.context_length,
        }
        return {"object": "list", "data": [card]}

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        alive, total = engine.executor.ranks_alive()
        return {
            "model": ctx.model_name,
            "context_length": ctx.context_length,
            "tp_size": total,
            "ranks_alive": alive,
            "worker_pids": list(getattr(engine.executor, "worker_pids", [])),
            "max_running_requests": engine.scheduler.max_running,
            "speculative_num_steps": engine.config.num_draft_steps,
        }

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {
            "model_path": ctx.model_dir or ctx.model_name,
            "served_model_name": ctx.model_name,
            "is_generation": True,
            "max_context_length": ctx.context_length,
        }

    # ---- OpenAI chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        _check_model(ctx, req.model)
        try:
            prompt = tok.apply_chat_template(req.messages, req.tools, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        prompt_ids = tok.encode(prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = _params(
            ctx, openai_sampling(req, max_tokens, _default_max(ctx, prompt_ids)), prompt_ids, "messages"
        )
        use_tools = bool(req.tools) and ctx.tool_call_parser is not None and req.tool_choice != "none"
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        events = _events(engine, prompt_ids, params, request)
        first = await _first(events)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _chat_stream(ctx, rid, first, events, use_tools, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        collected = await _collect(first, events)
        text = "".join(e.text for e in collected)
        last = collected[-1]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = last.finish_reason
        if use_tools:
            content, calls = parse_tool_calls(text)
            if calls:
                message = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
                finish = "tool_calls"
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _openai_finish(finish)}
        if params.logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(tok, [t for e in collected for t in e.logprobs])}
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": ctx.model_name,
                "choices": [choice],
                "usage": _usage(last),
            }
        )

    # ---- OpenAI completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_model(ctx, req.model)
        prompt_ids = _completion_prompt(tok, req.prompt)
        params = _params(ctx, openai_sampling(req, req.max_tokens, 16), prompt_ids, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        events = _events(engine, prompt_ids, params, request)
        first = await _first(events)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _completion_stream(ctx, rid, first, events, include_usage), media_type="text/event-stream"
            )
        collected = await _collect(first, events)
        last = collected[-1]
        choice: dict[str, Any] = {
            "index": 0,
            "text": "".join(e.text for e in collected),
            "finish_reason": _openai_finish(last.finish_reason),
            "logprobs": None,
        }
        if params.logprobs:
            choice["logprobs"] = _completion_logprobs(tok, [t for e in collected for t in e.logprobs])
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": ctx.model_name,
                "choices": [choice],
                "usage": _usage(last),
            }
        )

    # ---- SGLang-native ----------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> Response:
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "text/input_ids: give exactly one of them", param="text")
        prompt_ids = tok.encode(req.text) if req.text is not None else list(req.input_ids or [])
        params = validate_sampling(sglang_sampling(req), tok.vocab_size, prefix="sampling_params.")
        params = _params(ctx, params, prompt_ids, "input_ids" if req.text is None else "text")
        rid = req.rid or uuid.uuid4().hex
        started = time.monotonic()
        events = _events(engine, prompt_ids, params, request)
        first = await _first(events)
        if req.stream:
            return StreamingResponse(
                _generate_stream(rid, first, events, started), media_type="text/event-stream"
            )
        collected = await _collect(first, events)
        text = "".join(e.text for e in collected)
        ids = [t for e in collected for t in e.token_ids]
        return JSONResponse(_generate_body(rid, text, ids, collected[-1], started, tok, collected))

    return app


# ---- helpers ---------------------------------------------------------------------------------------
def _check_model(ctx: ServerContext, model: str | None) -> None:
    if model and model != ctx.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; served: `{ctx.model_name}`",
            param="model",
            code="model_not_found",
        )


def _default_max(ctx: ServerContext, prompt_ids: list[int]) -> int:
    return max(1, min(1024, ctx.context_length - len(prompt_ids)))


def _params(
    ctx: ServerContext, params: SamplingParams, prompt_ids: list[int], prompt_field: str
) -> SamplingParams:
    validate_sampling(params, ctx.engine.tokenizer.vocab_size)
    try:
        ctx.engine.check_prompt(prompt_ids, params)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param=prompt_field, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param=prompt_field) from exc
    return params


def _completion_prompt(tok, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) == 1:
        return _completion_prompt(tok, prompt[0])  # type: ignore[arg-type]
    raise APIError(
        400, "prompt: batched prompts are not supported; send one prompt per request", param="prompt"
    )


class _Events:
    """The asyncio side of one engine request; aborts it when the client goes away."""

    def __init__(
        self, engine: Engine, queue: asyncio.Queue[TokenEvent], rid: str, request: Request | None
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.rid = rid
        self.request = request
        self.done = False

    async def next(self) -> TokenEvent:
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                if self.request is not None and await self.request.is_disconnected():
                    self.abort()
                    raise asyncio.CancelledError from None
                continue
            if event.finished:
                self.done = True
            return event

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)


def _events(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, request: Request | None
) -> _Events:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    rid = engine.new_request_id()
    try:
        engine.submit(prompt_ids, params, asyncio_emitter(loop, queue), rid)
    except EngineUnavailable as exc:
        code = "shutting_down" if "shutting down" in str(exc) else "overloaded"
        raise APIError(503, str(exc), "service_unavailable_error", code=code) from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    return _Events(engine, queue, rid, request)


async def _first(events: _Events) -> TokenEvent:
    event = await events.next()
    if event.error:
        raise APIError(503, event.error, "service_unavailable_error", code="engine_failed")
    return event


async def _collect(first: TokenEvent, events: _Events) -> list[TokenEvent]:
    collected = [first]
    try:
        while not collected[-1].finished:
            collected.append(await events.next())
    finally:
        events.abort()
    if collected[-1].error:
        raise APIError(503, collected[-1].error, "service_unavailable_error", code="engine_failed")
    return collected


async def _iterate(first: TokenEvent, events: _Events) -> AsyncIterator[TokenEvent]:
    try:
        event = first
        yield event
        while not event.finished:
            event = await events.next()
            yield event
    finally:
        events.abort()  # no-op when finished; cancels generation when the client went away


async def _run(engine: Engine, prompt_ids: list[int], params: SamplingParams, request: Request | None):
    events = _events(engine, prompt_ids, params, None)
    first = await asyncio.wait_for(events.next(), timeout=20)
    async for event in _iterate(first, events):
        yield event


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _openai_finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason or "", reason)


def _usage(event: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _chat_logprobs(tok, tokens) -> list[dict[str, Any]]:
    out = []
    for t in tokens:
        text = tok.decode([t.token_id], skip_special_tokens=False)
        out.append(
            {
                "token": text,
                "logprob": t.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (s := tok.decode([i], skip_special_tokens=False)),
                        "logprob": lp,
                        "bytes": list(s.encode()),
                    }
                    for i, lp in t.top_logprobs
                ],
            }
        )
    return out


def _completion_logprobs(tok, tokens) -> dict[str, Any]:
    return {
        "tokens": [tok.decode([t.token_id], skip_special_tokens=False) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            {tok.decode([i], skip_special_tokens=False): lp for i, lp in t.top_logprobs} for t in tokens
        ],
    }


async def _chat_stream(
    ctx: ServerContext, rid: str, first: TokenEvent, events: _Events, use_tools: bool, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs=None) -> str:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model_name,
            "choices": [choice],
        }
        return _sse(body)

    tok = ctx.engine.tokenizer
    yield chunk({"role": "assistant", "content": ""})
    streamer = ToolCallStreamer() if use_tools else None
    last = first
    async for event in _iterate(first, events):
        last = event
        if event.error:
            yield _sse(APIError(503, event.error, "service_unavailable_error", code="engine_failed").body())
            return
        logprobs = _chat_logprobs(tok, event.logprobs) if event.logprobs else None
        text = streamer.feed(event.text) if streamer else event.text
        if text or logprobs:
            yield chunk({"content": text}, logprobs=logprobs)
    finish = _openai_finish(last.finish_reason)
    if streamer:
        content, calls = streamer.finish()
        if content:
            yield chunk({"content": content})
        if calls:
            yield chunk({"tool_calls": [c.to_openai(index=i) for i, c in enumerate(calls)]})
            finish = "tool_calls"
    yield chunk({}, finish)
    if include_usage:
        yield _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": ctx.model_name,
                "choices": [],
                "usage": _usage(last),
            }
        )
    yield "data: [DONE]\n\n"


async def _completion_stream(
    ctx: ServerContext, rid: str, first: TokenEvent, events: _Events, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    last = first
    async for event in _iterate(first, events):
        last = event
        if event.error:
            yield _sse(APIError(503, event.error, "service_unavailable_error", code="engine_failed").body())
            return
        if event.text or event.finished:
            choice = {
                "index": 0,
                "text": event.text,
                "finish_reason": _openai_finish(event.finish_reason),
                "logprobs": None,
            }
            body = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": ctx.model_name,
                "choices": [choice],
            }
            yield _sse(body)
    if include_usage:
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": ctx.model_name,
                "choices": [],
                "usage": _usage(last),
            }
        )
    yield "data: [DONE]\n\n"


def _generate_body(
    rid: str, text: str, ids: list[int], last: TokenEvent, started: float, tok, events
) -> dict[str, Any]:
    reason = last.finish_reason
    finish: dict[str, Any] = {"type": "abort" if reason == "abort" else reason}
    if reason == "length":
        finish["length"] = last.completion_tokens
    meta: dict[str, Any] = {
        "id": rid,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "finish_reason": finish,
        "e2e_latency": time.monotonic() - started,
        "spec_verify_ct": last.spec_verify_steps,
        "spec_accept_token_num": last.spec_accepted,
    }
    logprobs = [t for e in events for t in e.logprobs]
    if logprobs:
        meta["output_token_logprobs"] = [[t.logprob, t.token_id, None] for t in logprobs]
        meta["output_top_logprobs"] = [[[lp, i, None] for i, lp in t.top_logprobs] for t in logprobs]
    return {"text": text, "output_ids": ids, "meta_info": meta}


async def _generate_stream(
    rid: str, first: TokenEvent, events: _Events, started: float
) -> AsyncIterator[str]:
    text = ""
    ids: list[int] = []
    seen: list[TokenEvent] = []
    async for event in _iterate(first, events):
        if event.error:
            yield _sse(APIError(503, event.error, "service_unavailable_error", code="engine_failed").body())
            return
        seen.append(event)
        text += event.text
        ids += event.token_ids
        # SGLang streams the cumulative text and ids in every chunk.
        yield _sse(_generate_body(rid, text, ids, event, started, None, seen))
    yield "data: [DONE]\n\n"
