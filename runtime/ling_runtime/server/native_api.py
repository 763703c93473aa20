"""SGLang's native routes: `/generate` (through the one completion path), `/get_server_info`,
`/get_model_info`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ling_runtime.engine.request import TokenEvent
from ling_runtime.server.completion import (
    Completion,
    check_text_length,
    compile_grammar,
    offload,
    prepare,
    respond,
)
from ling_runtime.server.context import Context, ServerContext
from ling_runtime.server.errors import APIError
from ling_runtime.server.protocol import GenerateRequest, generate_grammar, generate_sampling, parse_body

router = APIRouter()


@router.post("/generate")
async def generate(http: Request, ctx: Context) -> Response:
    raw = await http.body()
    return await respond(ctx.engine, http, await offload(ctx, generate_completion, ctx, raw))


@router.get("/get_server_info")
async def server_info(ctx: Context) -> dict[str, Any]:
    engine = ctx.engine
    alive, total = engine.executor.ranks_alive()
    return {
        "model": ctx.model_name,
        "context_length": ctx.context_length,
        "tp_size": total,
        "ranks_alive": alive,
        "worker_pids": list(engine.executor.worker_pids),
        "max_running_requests": engine.scheduler.max_running,
        "speculative_num_steps": ctx.settings.num_draft_steps,
    }


@router.get("/get_model_info")
async def model_info(ctx: Context) -> dict[str, Any]:
    return {
        "model_path": ctx.settings.model_dir or ctx.model_name,
        "served_model_name": ctx.model_name,
        "is_generation": True,
        "max_context_length": ctx.context_length,
    }


# Engine field names -> /generate's (the rest are sampling_params.<name>).
_GENERATE_FIELDS = {
    "max_tokens": "sampling_params.max_new_tokens",
    "min_tokens": "sampling_params.min_new_tokens",
    "top_logprobs": "top_logprobs_num",
}


def generate_completion(ctx: ServerContext, raw: bytes) -> Completion:
    body = parse_body(raw, GenerateRequest)
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "text/input_ids: give exactly one of them", param="text")
    tok = ctx.engine.tokenizer
    if body.text is not None:
        check_text_length(ctx, len(body.text), "text")
        prompt_ids = tok.encode(body.text)
    else:
        prompt_ids = list(body.input_ids or [])
    prompt_field = "input_ids" if body.text is None else "text"

    def field(param: str) -> str:
        if param == "prompt":
            return prompt_field
        return _GENERATE_FIELDS.get(param, f"sampling_params.{param}")

    params = generate_sampling(body)
    grammar = generate_grammar(body)
    if grammar is not None:
        params.grammar = compile_grammar(ctx, *grammar)
    request = prepare(ctx.engine, prompt_ids, params, field)
    return Completion(request, body.stream, GenerateRenderer(body.rid or uuid.uuid4().hex))


class GenerateRenderer:
    """SGLang's shape: `text`, `output_ids` (the EOS that ended it included) and `meta_info`; a
    stream repeats the whole body so far in every chunk."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.started = time.monotonic()
        # The stream so far (cumulative, as SGLang streams it).
        self.seen: list[TokenEvent] = []
        self.text = ""
        self.ids: list[int] = []

    def body(self, events: list[TokenEvent]) -> dict[str, Any]:
        ids = [t for e in events for t in e.token_ids]
        return self._body("".join(e.text for e in events), ids, events)

    def _body(self, text: str, ids: list[int], events: list[TokenEvent]) -> dict[str, Any]:
        last = events[-1]
        reason = last.finish_reason
        finish: dict[str, Any] = {"type": reason}
        if reason == "length":
            finish["length"] = last.completion_tokens
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "cached_tokens": last.cached_tokens,  # SGLang's meta_info name
            "finish_reason": finish,
            "e2e_latency": time.monotonic() - self.started,
            "spec_verify_ct": last.spec_verify_steps,
            "spec_accept_token_num": last.spec_accepted,
        }
        logprobs = [t for e in events for t in e.logprobs]
        if logprobs:
            meta["output_token_logprobs"] = [[t.logprob, t.token_id, None] for t in logprobs]
            meta["output_top_logprobs"] = [[[lp, i, None] for i, lp in t.top_logprobs] for t in logprobs]
        return {"text": text, "output_ids": ids, "meta_info": meta}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        self.seen.append(event)
        self.text += event.text
        self.ids += event.token_ids
        return [self._body(self.text, self.ids, self.seen)]

    def closing(self, last: TokenEvent) -> list[dict[str, Any]]:
        return []
