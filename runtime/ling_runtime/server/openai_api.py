"""The OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Each completion route only translates, on a worker thread (`offload`): raw body -> typed request ->
prompt ids + SamplingParams (+ grammar) -> `Completion` (with a renderer for its response shape) ->
the one completion path (server/completion.py).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ling_runtime.engine.request import TokenEvent
from ling_runtime.engine.sampling import SampledToken
from ling_runtime.server.completion import (
    Completion,
    check_text_length,
    compile_grammar,
    offload,
    prepare,
    respond,
)
from ling_runtime.server.context import Context, ServerContext
from ling_runtime.server.errors import APIError, not_supported
from ling_runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_sampling,
    completion_sampling,
    parse_body,
    response_format_grammar,
)
from ling_runtime.text.chat_template import ChatTemplateError
from ling_runtime.text.grammar import GrammarSpec
from ling_runtime.text.tokenizer import TokenizerBundle
from ling_runtime.text.tool_parser import ToolCall, ToolCallStreamer, make_tool_call, parse_tool_calls

router = APIRouter()


@router.get("/v1/models")
async def models(ctx: Context) -> dict[str, Any]:
    card = {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "ling-runtime",
        "max_model_len": ctx.context_length,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/chat/completions")
async def chat(http: Request, ctx: Context) -> Response:
    raw = await http.body()
    return await respond(ctx.engine, http, await offload(ctx, chat_completion, ctx, raw))


@router.post("/v1/completions")
async def completions(http: Request, ctx: Context) -> Response:
    raw = await http.body()
    return await respond(ctx.engine, http, await offload(ctx, text_completion, ctx, raw))


def chat_completion(ctx: ServerContext, raw: bytes) -> Completion:
    body = parse_body(raw, ChatCompletionRequest)
    check_model(ctx, body.model)
    tok = ctx.engine.tokenizer
    messages, tools = body.template_messages(), body.template_tools()
    check_text_length(ctx, sum(len(m["content"] or "") for m in messages), "messages")
    try:
        prompt = tok.apply_chat_template(messages, tools, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    check_text_length(ctx, len(prompt), "messages")
    prompt_ids = tok.encode(prompt)
    params = chat_sampling(body, len(prompt_ids), ctx.context_length)
    forced, tool_spec = forced_tool_call(body)
    grammar = response_format_grammar(body.response_format)
    if tool_spec is not None and grammar is not None:
        raise not_supported(
            "response_format", "not supported together with tool_choice required or a named function"
        )
    grammar = grammar or tool_spec
    if grammar is not None:
        params.grammar = compile_grammar(ctx, *grammar)
    request = prepare(ctx.engine, prompt_ids, params, chat_field(body))
    parse = (
        bool(body.tools)
        and ctx.settings.tool_call_parser is not None
        and body.tool_choice != "none"
        and forced is None
    )
    renderer = ChatRenderer(
        ctx.model_name,
        tok,
        body.include_usage,
        params.logprobs,
        parse,
        forced=forced,
        parallel=body.parallel_tool_calls is not False,
    )
    return Completion(request, bool(body.stream), renderer)


def chat_field(body: ChatCompletionRequest):
    """Engine field names -> this body's: the prompt is `messages`, the limits as the client named them."""
    names = {
        "prompt": "messages",
        "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
    }
    return lambda param: names.get(param, param)


def forced_tool_call(body: ChatCompletionRequest) -> tuple[str | None, tuple[GrammarSpec, str] | None]:
    """`tool_choice` "required" or a named function: the output is constrained to tool-call JSON.

    As vLLM does: "required" -> a JSON array of {"name", "parameters"} (one tool's schema each);
    a named function -> that function's arguments object. Returns ("required" or the name, grammar)."""
    choice = body.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None, None
    if not body.tools:
        raise APIError(400, "tool_choice: requires tools", param="tool_choice")
    if choice == "required":
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "parameters": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for t in body.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return "required", (GrammarSpec("json_schema", json.dumps(schema)), "tools")
    assert not isinstance(choice, str)
    name = choice.function.name
    tool = next((t for t in body.tools if t.function.name == name), None)
    if tool is None:
        raise APIError(
            400, f"tool_choice.function.name: no tool named {name!r}", param="tool_choice.function.name"
        )
    params = tool.function.parameters or {"type": "object"}
    return name, (GrammarSpec("json_schema", json.dumps(params)), "tools")


def text_completion(ctx: ServerContext, raw: bytes) -> Completion:
    body = parse_body(raw, CompletionRequest)
    check_model(ctx, body.model)
    tok = ctx.engine.tokenizer
    params = completion_sampling(body)
    grammar = response_format_grammar(body.response_format)
    if grammar is not None:
        params.grammar = compile_grammar(ctx, *grammar)
    request = prepare(ctx.engine, completion_prompt(ctx, tok, body.prompt), params)
    renderer = TextRenderer(ctx.model_name, tok, body.include_usage, request.params.logprobs)
    return Completion(request, bool(body.stream), renderer)


# The `model` the card's client sends. SGLang serves any name it is asked for (the field only picks a
# LoRA adapter there); vLLM answers 404 for a name it does not serve. We answer the served name, "auto"
# and an absent field, and keep the 404 for any other name: a typo must not reach the wrong model.
MODEL_ALIASES = ("auto",)


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model and model != ctx.model_name and model not in MODEL_ALIASES:
        raise APIError(
            404,
            f"The model `{model}` does not exist; served: `{ctx.model_name}`",
            param="model",
            code="model_not_found",
        )


def completion_prompt(
    ctx: ServerContext, tok: TokenizerBundle, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[int]:
    if isinstance(prompt, str):
        check_text_length(ctx, len(prompt), "prompt")
        return tok.encode(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) == 1:
        return completion_prompt(ctx, tok, prompt[0])  # type: ignore[arg-type]
    if not prompt:
        return []  # Engine.prepare: "prompt: must contain at least one token"
    raise APIError(
        400, "prompt: batched prompts are not supported; send one prompt per request", param="prompt"
    )


# ---- renderers --------------------------------------------------------------------------------------
class _OpenAIRenderer:
    """What chat and text completions share: the envelope, usage, finish reasons, the usage chunk."""

    id_prefix = ""  # the response id's prefix
    chunk_object = ""  # each streamed chunk's `object`

    def __init__(self, model: str, tok: TokenizerBundle, include_usage: bool, logprobs: bool) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tok = tok
        self.include_usage = include_usage
        self.logprobs = logprobs

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def opening(self) -> list[dict[str, Any]]:
        return []

    def closing(self, last: TokenEvent) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.envelope(self.chunk_object, [], usage=usage(last))]

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)


class ChatRenderer(_OpenAIRenderer):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        model: str,
        tok: TokenizerBundle,
        include_usage: bool,
        logprobs: bool,
        tools: bool,
        forced: str | None = None,
        parallel: bool = True,
    ) -> None:
        super().__init__(model, tok, include_usage, logprobs)
        self.tools = tools  # parse <tool_call> blocks out of free text (tool_choice auto)
        # tool_choice "required" (a JSON array of calls) or a function's name (its arguments):
        # the whole output is tool-call JSON, held back while streaming and sent as tool_calls.
        self.forced = forced
        self.parallel = parallel
        self.held = ""
        self.streamer = ToolCallStreamer() if tools else None

    def tool_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a reply: parsed from free text, or from forced tool-call JSON."""
        if self.forced is not None:
            calls = forced_calls(text, self.forced)
            return ("" if calls else text), calls
        content, calls = parse_tool_calls(text)
        if calls and not self.parallel:
            calls = calls[:1]  # parallel_tool_calls: false
        return content, calls

    def body(self, events: list[TokenEvent]) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        last = events[-1]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = openai_finish(last.finish_reason)
        if self.tools or self.forced is not None:
            content, calls = self.tool_calls(text)
            if calls:
                message = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
                finish = "tool_calls"
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if self.logprobs:
            choice["logprobs"] = {"content": self.chat_logprobs([t for e in events for t in e.logprobs])}
        return self.envelope("chat.completion", [choice], usage=usage(last))

    def chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return self.envelope(self.chunk_object, [choice])

    def opening(self) -> list[dict[str, Any]]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        logprobs = self.chat_logprobs(event.logprobs) if event.logprobs else None
        if self.forced is not None:
            self.held += event.text
            text = ""
        else:
            text = self.streamer.feed(event.text) if self.streamer else event.text
        return [self.chunk({"content": text}, logprobs=logprobs)] if text or logprobs else []

    def closing(self, last: TokenEvent) -> list[dict[str, Any]]:
        out = []
        finish = openai_finish(last.finish_reason)
        if self.streamer or self.forced is not None:
            if self.forced is not None:
                content, calls = self.tool_calls(self.held)
            else:
                assert self.streamer is not None
                content, calls = self.streamer.finish()
                if calls and not self.parallel:
                    calls = calls[:1]
            if content:
                out.append(self.chunk({"content": content}))
            if calls:
                out.append(self.chunk({"tool_calls": [c.to_openai(index=i) for i, c in enumerate(calls)]}))
                finish = "tool_calls"
        return [*out, self.chunk({}, finish), *super().closing(last)]

    def chat_logprobs(self, tokens: list[SampledToken]) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
            for t in tokens
        ]


class TextRenderer(_OpenAIRenderer):
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def body(self, events: list[TokenEvent]) -> dict[str, Any]:
        last = events[-1]
        choice = self.choice("".join(e.text for e in events), last.finish_reason)
        if self.logprobs:
            choice["logprobs"] = self.text_logprobs([t for e in events for t in e.logprobs])
        return self.envelope("text_completion", [choice], usage=usage(last))

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": openai_finish(finish_reason), "logprobs": None}

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        if not (event.text or event.finished):
            return []
        return [self.envelope(self.chunk_object, [self.choice(event.text, event.finish_reason)])]

    def text_logprobs(self, tokens: list[SampledToken]) -> dict[str, Any]:
        return {
            "tokens": [self.token_text(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_text(i): lp for i, lp in t.top_logprobs} for t in tokens],
        }


def forced_calls(text: str, forced: str) -> list[ToolCall]:
    """Tool calls from output constrained to tool-call JSON; [] when it is not complete JSON (the
    output ran into max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if forced != "required":
        return [make_tool_call(forced, value)] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    return [
        make_tool_call(item["name"], item.get("parameters", {}))
        for item in value
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def openai_finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason or "", reason)


def usage(event: TokenEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        # OpenAI's field for prompt-cache hits: tokens served from the prefix cache.
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }
