"""Token ids to text and events, off the step loop's thread.

The engine thread hands each step's new token ids to `OutputProcessor.publish` (a queue put) and goes
on with the next step; the processor's own thread detokenizes them (text/detokenizer.py: incremental,
never half a character, stop strings held back), builds the `TokenEvent`s and hands them to the
requests' receivers. Receivers that are asyncio queues (`LoopEmit`) get a whole step's events in one
`call_soon_threadsafe` per event loop, so the HTTP side wakes once per step, not once per request.

A stop string is found here, after the engine has moved on: the processor ends the request's stream
at once (its final event carries the tokens up to that step, as before) and tells the engine
(`on_stop`), which then releases the sequence; tokens the engine made for it meanwhile are dropped.

Every event of a request, the engine's errors included (`fail`, drain cuts), goes through this one
queue, so a client sees its events in order and exactly one final event.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ling_runtime.engine.errors import EngineError
from ling_runtime.engine.request import Emit, LoopEmit, TokenEvent
from ling_runtime.engine.sampling import SampledToken, SamplingParams
from ling_runtime.text.detokenizer import TextOutput
from ling_runtime.text.tokenizer import TokenizerBundle

log = logging.getLogger("ling_runtime.engine")


@dataclass
class Output:
    """One request's part of a step, as the engine thread knows it (ids, not text)."""

    rid: str
    token_ids: list[int]
    completion_tokens: int
    logprobs: list[SampledToken] = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: EngineError | None = None
    spec_verify_steps: int = 0
    spec_accepted: int = 0


@dataclass
class _Stream:
    rid: str
    emit: Emit
    params: SamplingParams
    prompt_tokens: int
    text: TextOutput
    done: bool = False


class OutputProcessor:
    """The detokenizer thread (see the module docstring). `on_stop(rid)` is called on this thread
    when a stop string ended a request the engine still runs."""

    def __init__(self, tokenizer: TokenizerBundle, on_stop: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_stop = on_stop
        self._queue: queue.Queue[tuple[str, object] | None] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ling-detokenizer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Process what is queued, then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- any thread ----------------------------------------------------------------------------
    def open(self, rid: str, params: SamplingParams, prompt_tokens: int, emit: Emit) -> None:
        """A new request's stream (before any of its outputs)."""
        text = TextOutput(self.tokenizer, params.stop, params.skip_special_tokens)
        self._queue.put(("open", _Stream(rid, emit, params, prompt_tokens, text)))

    def publish(self, outputs: list[Output]) -> None:
        """One step's outputs (in order; a request at most once per call)."""
        if outputs:
            self._queue.put(("step", outputs))

    @property
    def idle(self) -> bool:
        """Nothing queued or being processed (every published event was handed out)."""
        return self._queue.unfinished_tasks == 0

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if kind == "open":
                    assert isinstance(payload, _Stream)
                    self._streams[payload.rid] = payload
                elif kind == "step":
                    self._step(payload)  # type: ignore[arg-type]
            except Exception:  # never let one request's text take every stream down
                log.exception("output processing failed")
            finally:
                self._queue.task_done()

    def _step(self, outputs: list[Output]) -> None:
        batches: dict[int, tuple[LoopEmit, list[tuple[object, TokenEvent]]]] = {}
        for out in outputs:
            stream = self._streams.get(out.rid)
            if stream is None or stream.done:
                continue  # ended by a stop string (or never opened): what the engine made since is dropped
            try:
                event, stopped = self._event(stream, out)
            except Exception:
                log.exception("request %s: detokenizing failed", out.rid)
                continue
            if event.finished:
                stream.done = True
                del self._streams[out.rid]
                if stopped and not out.finished:
                    self.on_stop(out.rid)
            emit = stream.emit
            if isinstance(emit, LoopEmit):
                key = id(emit.loop)
                if key not in batches:
                    batches[key] = (emit, [])
                batches[key][1].append((emit.queue, event))
            else:
                try:
                    emit(event)
                except Exception:  # a receiver's failure must not take the others down
                    log.warning("request %s: its receiver failed; event dropped", out.rid, exc_info=True)
        for emit, items in batches.values():
            emit.deliver(items)

    def _event(self, stream: _Stream, out: Output) -> tuple[TokenEvent, bool]:
        """The event of one output: its text, and whether a stop string ended the request here."""
        text = stream.text.add(out.token_ids) if out.token_ids and out.error is None else ""
        stopped = stream.text.stopped
        finished = out.finished or stopped
        if finished:
            text += stream.text.finish()
        reason = "stop" if stopped else out.finish_reason
        event = TokenEvent(
            token_ids=out.token_ids,
            text=text,
            logprobs=out.logprobs if stream.params.logprobs else [],
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            spec_verify_steps=out.spec_verify_steps,
            spec_accepted=out.spec_accepted,
            finished=finished,
            finish_reason=reason if finished else None,
            error=out.error,
        )
        return event, stopped
