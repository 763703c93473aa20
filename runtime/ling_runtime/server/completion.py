"""The one completion path behind `/v1/chat/completions`, `/v1/completions` and `/generate`.

A route reads the raw body and turns it into a `Completion` on a worker thread (`offload`: JSON
parsing, validation, chat templating, tokenizing and grammar compiling never run on the event
loop): the typed internal request (an `EngineRequest`, checked once by `Engine.prepare`) and a
`Renderer` that answers in the route's shape. `respond` submits it, waits for the first event (so
an engine that cannot serve it answers with a status, not a broken stream), then streams the
renderer's chunks as server-sent events or collects the events into one body. From submission on,
a task watches the connection: a client that goes away aborts its request at once (queued or
running), which frees its KV pages and state slot. Engine errors propagate as their types;
server/errors.py turns them into HTTP answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ling_runtime.engine.engine import Engine
from ling_runtime.engine.errors import InvalidRequest, PromptTooLong
from ling_runtime.engine.request import Emit, EngineRequest, LoopEmit, TokenEvent
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.server.context import ServerContext
from ling_runtime.server.errors import APIError, api_error, not_supported, same_name
from ling_runtime.text.grammar import CompiledGrammar, GrammarError, GrammarSpec, GrammarUnavailable

R = TypeVar("R")


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was complete; nobody reads the rest."""


class Renderer(Protocol):
    """The route's response shape: one body from all events, or stream chunks event by event."""

    def body(self, events: list[TokenEvent]) -> dict[str, Any]: ...
    def opening(self) -> list[dict[str, Any]]: ...  # stream chunks before the first event
    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]: ...
    def closing(self, last: TokenEvent) -> list[dict[str, Any]]: ...  # after the finishing event


@dataclass(frozen=True)
class Completion:
    request: EngineRequest
    stream: bool
    renderer: Renderer


async def offload(ctx: ServerContext, fn: Callable[..., R], *args: Any) -> R:
    """Run CPU work of a request (parsing, templating, tokenizing) on the server's text threads."""
    return await asyncio.get_running_loop().run_in_executor(ctx.text_pool, fn, *args)


def prepare(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, field: Callable[[str], str] = same_name
) -> EngineRequest:
    """`Engine.prepare`, with a rejection named in the route's own field names (`field`)."""
    try:
        return engine.prepare(prompt_ids, params)
    except InvalidRequest as exc:
        raise api_error(exc, field) from exc


def check_text_length(ctx: ServerContext, chars: int, field: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it: a token stands for at most
    `max_token_bytes` bytes and a character is at least one byte, so `chars` characters are at least
    chars / max_token_bytes tokens."""
    per_token = ctx.engine.tokenizer.max_token_bytes
    if chars > ctx.context_length * per_token:
        exc = PromptTooLong(
            f"This model's maximum context length is {ctx.context_length} tokens. However, your "
            f"{field} holds {chars} characters, at least {chars // per_token} tokens. Reduce the prompt."
        )
        raise api_error(exc, lambda _: field) from None


def compile_grammar(ctx: ServerContext, spec: GrammarSpec, param: str) -> CompiledGrammar:
    """The route's grammar compiled for this tokenizer; a 400 naming `param` when it cannot be."""
    try:
        return ctx.grammars.compile(spec)
    except GrammarUnavailable as exc:
        raise not_supported(param, f"not supported on this server ({exc})") from None
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[TokenEvent | None]) -> Emit:
    """An `emit` that hands events from the engine's output thread to an asyncio queue; the thread
    delivers a whole step's events for this loop with one wake-up (`LoopEmit`)."""
    return LoopEmit(loop, q)


class EngineStream:
    """The asyncio side of one submitted request: its events in order. A task watches the client's
    connection (`http`, when given) and aborts the request the moment it closes; so does a handler
    that stops reading."""

    def __init__(self, engine: Engine, request: EngineRequest, http: Request | None) -> None:
        self.engine = engine
        self.rid = request.rid
        self.http = http
        # None in the queue: the client went away.
        self.queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self.done = False
        self.disconnected = False
        engine.submit(request, asyncio_emitter(asyncio.get_running_loop(), self.queue))
        self._watch = asyncio.create_task(self._watch_client()) if http is not None else None

    async def _watch_client(self) -> None:
        """Wait for `http.disconnect`: the body is read, so the next receive is the connection's end
        (or the end of the response, when `close` has not cancelled this task yet)."""
        assert self.http is not None
        while True:
            message = await self.http.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.done:
            self.disconnected = True
            self.abort()
            self.queue.put_nowait(None)

    def close(self) -> None:
        self.abort()
        if self._watch is not None:
            self._watch.cancel()

    async def next(self) -> TokenEvent:
        event = await self.queue.get()
        if event is None:
            raise ClientDisconnected
        if event.finished:
            self.done = True
        return event

    async def first(self) -> TokenEvent:
        """The first event; an engine error in it is raised (the response has not started)."""
        event = await self.next()
        if event.error:
            raise event.error
        return event

    async def collect(self, first: TokenEvent) -> list[TokenEvent]:
        events = [first]
        try:
            while not events[-1].finished:
                events.append(await self.next())
        finally:
            self.close()
        if events[-1].error:
            raise events[-1].error
        return events

    async def iterate(self, first: TokenEvent) -> AsyncIterator[TokenEvent]:
        try:
            event = first
            yield event
            while not event.finished:
                event = await self.next()
                yield event
        finally:
            self.close()  # no-op when finished; cancels generation when the client went away

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)


async def respond(engine: Engine, http: Request, completion: Completion) -> Response:
    stream = EngineStream(engine, completion.request, http)
    try:
        first = await stream.first()
    except BaseException:
        stream.close()
        raise
    if completion.stream:
        return StreamingResponse(
            _server_sent_events(completion.renderer, first, stream), media_type="text/event-stream"
        )
    return JSONResponse(completion.renderer.body(await stream.collect(first)))


async def _server_sent_events(
    renderer: Renderer, first: TokenEvent, stream: EngineStream
) -> AsyncIterator[str]:
    for chunk in renderer.opening():
        yield sse(chunk)
    last = first
    try:
        async for event in stream.iterate(first):
            if event.error:
                # The stream has started (200): the error is its last event, then it ends.
                yield sse(api_error(event.error).body())
                return
            last = event
            for chunk in renderer.chunks(event):
                yield sse(chunk)
    except ClientDisconnected:
        return  # nobody reads the rest
    for chunk in renderer.closing(last):
        yield sse(chunk)
    yield "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
