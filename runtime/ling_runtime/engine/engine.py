"""The engine loop on rank 0: requests in, scheduled steps out to the executor, tokens back to clients.

One thread runs the loop (the model is synchronous); HTTP handlers talk to it through thread-safe
queues and receive `TokenEvent`s on their asyncio queues. The executor hides whether the model runs
in this process (TP 1) or on a tensor-parallel group (it broadcasts the plan, then runs rank 0).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.output import TextOutput
from ling_runtime.engine.plan import SeqWork, StepPlan, StepResult
from ling_runtime.engine.sampling import SampledToken, SamplingParams, make_generator, sample_row
from ling_runtime.engine.scheduler import Scheduler, Step
from ling_runtime.engine.sequence import Sequence
from ling_runtime.server.metrics import RuntimeMetrics
from ling_runtime.server.tokenizer import TokenizerBundle

log = logging.getLogger("ling_runtime.engine")


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...
    def ranks_alive(self) -> tuple[int, int]: ...  # (alive, total)
    def shutdown(self) -> None: ...


class EngineUnavailable(RuntimeError):
    """The engine cannot take the request (shutting down, failed, or queue full): HTTP 503."""


@dataclass(frozen=True)
class EngineConfig:
    max_running_requests: int = 64
    num_slots: int = 64
    num_pages: int = 2048
    page_size: int = 16
    chunked_prefill_size: int = 256
    context_length: int = 4096
    num_draft_steps: int = 0  # MTP steps k (0: speculative decoding off)
    max_queued_requests: int = 4096
    seed: int = 0


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    spec_verify_steps: int = 0
    spec_accepted: int = 0


@dataclass
class _Client:
    seq: Sequence
    text: TextOutput
    generator: object
    emit: Callable[[TokenEvent], None]
    sent_tokens: int = 0
    verify_steps: int = 0
    accepted: int = 0
    # Speculative state carried to the next plan.
    commit: int | None = None
    mtp_start: int = 0
    mtp_next: tuple[int, ...] = ()


class Engine:
    def __init__(
        self,
        executor: Executor,
        tokenizer: TokenizerBundle,
        config: EngineConfig,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        cache = CacheManager(config.num_slots, config.num_pages, config.page_size)
        self.scheduler = Scheduler(
            cache,
            max_running=min(config.max_running_requests, config.num_slots),
            chunk_tokens=config.chunked_prefill_size,
            lookahead_tokens=config.num_draft_steps + 1,
        )
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._clients: dict[str, _Client] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False
        self.failed: str | None = None
        self.heartbeat = time.monotonic()
        self.steps = 0
        self._pending = 0  # submitted but not yet picked up by the loop (for queue depth)
        self._pending_lock = threading.Lock()

    # ---- public API (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ling-engine", daemon=True)
        self._thread.start()

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (HTTP 400) when the request can never fit the context or the cache."""
        limit = self.config.context_length
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(
                f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.tokenizer.vocab_size})"
            )
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_new_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_new_tokens} for the completion). Reduce the prompt or max_tokens."
            )

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[TokenEvent], None], rid: str
    ) -> None:
        if self.failed:
            raise EngineUnavailable(f"engine failed: {self.failed}")
        if self.draining or self._stopping:
            raise EngineUnavailable("server is shutting down")
        if self.scheduler.num_waiting + self._pending >= self.config.max_queued_requests:
            raise EngineUnavailable(f"overloaded: {self.config.max_queued_requests} requests already queued")
        self.check_prompt(prompt_ids, params)
        params.validate(self.tokenizer.vocab_size)
        seq = Sequence(rid, list(prompt_ids), params, eos_token_ids=self.tokenizer.eos_token_ids)
        if not self.scheduler.fits(seq):
            cache_tokens = self.config.num_pages * self.config.page_size
            raise ValueError(
                f"max_tokens: prompt + max_tokens + {self.scheduler.lookahead_tokens} lookahead exceed the "
                f"{cache_tokens}-token KV cache (--max-total-tokens)"
            )
        client = _Client(
            seq=seq,
            text=TextOutput(self.tokenizer, params.stop, params.skip_special_tokens),
            generator=make_generator(params, self.config.seed + hash(rid) % (1 << 31)),
            emit=emit,
        )
        with self._pending_lock:
            self._pending += 1
        self._inbox.put(("add", client))
        self._wake.set()

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + self._pending

    @property
    def idle(self) -> bool:
        return not self._clients and self._pending == 0

    def health(self, max_silence_s: float = 30.0) -> tuple[bool, str]:
        if self.failed:
            return False, f"engine failed: {self.failed}"
        alive, total = self.executor.ranks_alive()
        if alive < total:
            return False, f"{total - alive} of {total} ranks are down"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        silence = time.monotonic() - self.heartbeat
        if silence > max_silence_s:
            return False, f"engine loop has not stepped for {silence:.0f}s"
        return True, "ok"

    def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait for the running ones to finish; True if all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline and not self.failed:
            time.sleep(0.05)
        return self.idle

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.executor.shutdown()

    # ---- the loop (engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                self.heartbeat = time.monotonic()
                self._drain_inbox()
                step = self.scheduler.schedule()
                self._update_gauges()
                if step.empty:
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                self._run(step)
                self.steps += 1
        except Exception as exc:  # a dead rank surfaces here as a collective error
            log.exception("engine loop failed")
            self.failed = f"{type(exc).__name__}: {exc}"
            for client in list(self._clients.values()):
                self._finish(client, "abort", error=self.failed)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(item, _Client)
                with self._pending_lock:
                    self._pending -= 1
                self._clients[item.seq.rid] = item
                self.scheduler.add(item.seq)
            elif kind == "abort":
                client = self._clients.get(str(item))
                if client is not None:
                    self._finish(client, "abort")

    def _update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.num_queue_reqs.set(self.num_waiting)
        m.num_running_reqs.set(self.scheduler.num_running)
        m.kv_cache_usage_ratio.set(self.scheduler.cache.page_usage)
        m.linear_state_slots_used.set(self.scheduler.cache.slots_used)
        alive, _ = self.executor.ranks_alive()
        m.ranks_alive.set(alive)

    def _run(self, step: Step) -> None:
        k = self.config.num_draft_steps
        works: list[SeqWork] = []
        for chunk in step.prefill:
            client = self._clients[chunk.seq.rid]
            works.append(
                self._work(
                    client, chunk.start, chunk.seq.prompt_ids[chunk.start : chunk.end], 0, int(chunk.last)
                )
            )
        for seq in step.decode:
            client = self._clients[seq.rid]
            last = len(seq.all_ids) - 1
            works.append(
                self._work(client, last, [seq.all_ids[-1]], k, k + 1, device_temperature(seq.params))
            )
        result = self.executor.execute(StepPlan(seqs=tuple(works)))
        now = time.monotonic()
        for chunk, res in zip(step.prefill, result.seqs[: len(step.prefill)], strict=True):
            client = self._clients[chunk.seq.rid]
            seq = chunk.seq
            seq.num_computed = chunk.end
            if self.metrics:
                self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
            if chunk.last:
                token = sample_row(res.logits[-1], seq.params, client.generator)
                self._append(client, [token], now)
            if k and seq.status.value != "finished":
                client.mtp_start = chunk.start
                client.mtp_next = tuple(seq.all_ids[chunk.start + 1 : chunk.end + 1])
        for seq, res in zip(step.decode, result.seqs[len(step.prefill) :], strict=True):
            client = self._clients[seq.rid]
            position = len(seq.all_ids) - 1
            if k == 0:
                if res.tokens is not None:  # sampled on the device (a graph replay)
                    token = SampledToken(res.tokens[-1])
                else:
                    token = sample_row(res.logits[-1], seq.params, client.generator)
                seq.num_computed = position + 1
                self._append(client, [token], now)
                continue
            if res.tokens is not None:
                self._accept_device(client, position, res.tokens, res.drafts, res.num_accepted or 0, now)
            else:
                self._accept(client, position, res.logits, res.drafts, now)

    def _work(
        self,
        client: _Client,
        start: int,
        tokens: list[int],
        drafts: int,
        logits: int,
        temperature: float | None = None,
    ) -> SeqWork:
        seq = client.seq
        assert seq.allocation is not None
        work = SeqWork(
            slot=seq.allocation.slot,
            pages=tuple(seq.allocation.pages),
            start=start,
            tokens=tuple(tokens),
            reset=start == 0,
            commit=client.commit,
            num_drafts=drafts,
            mtp_start=client.mtp_start,
            mtp_next_tokens=client.mtp_next,
            logits=logits,
            temperature=temperature,
        )
        client.commit = None
        client.mtp_next = ()
        return work

    def _accept(self, client: _Client, position: int, logits, drafts: list[int], now: float) -> None:
        """Verify drafts position by position with the request's own sampler; stop at the first miss.

        Each emitted token is drawn from the target distribution exactly as without speculation, so
        greedy output is identical and seeded sampling draws the same random numbers.
        """
        seq = client.seq
        emitted: list[SampledToken] = []
        for j in range(len(drafts) + 1):
            token = sample_row(logits[j], seq.params, client.generator)
            emitted.append(token)
            if (
                seq.token_finishes(token.token_id)
                or len(seq.output) + len(emitted) >= seq.params.max_new_tokens
            ):
                break
            if j == len(drafts) or token.token_id != drafts[j]:
                break
        self._record_verify(client, position, emitted, len(drafts), now)

    def _accept_device(
        self, client: _Client, position: int, tokens: list[int], drafts: list[int], accepted: int, now: float
    ) -> None:
        """The runner sampled and accepted on the device (a graphed verify, which also committed the
        linear state): emit tokens[: accepted + 1], cut at a finishing token as `_accept` would."""
        seq = client.seq
        emitted: list[SampledToken] = []
        for token_id in tokens[: accepted + 1]:
            emitted.append(SampledToken(token_id))
            if seq.token_finishes(token_id) or len(seq.output) + len(emitted) >= seq.params.max_new_tokens:
                break
        self._record_verify(client, position, emitted, len(drafts), now)

    def _record_verify(
        self, client: _Client, position: int, emitted: list[SampledToken], num_drafts: int, now: float
    ) -> None:
        seq = client.seq
        accepted = len(emitted) - 1
        client.verify_steps += 1
        client.accepted += accepted
        if self.metrics:
            self.metrics.spec_draft_tokens.inc(num_drafts)
            self.metrics.spec_accepted_tokens.inc(accepted)
            self.metrics.spec_accept_length.observe(len(emitted))
        seq.num_computed = position + len(emitted)
        client.commit = len(emitted)
        client.mtp_start = position
        self._append(client, emitted, now)
        client.mtp_next = tuple(seq.all_ids[position + 1 : position + 1 + len(emitted)])

    def _append(self, client: _Client, tokens: list[SampledToken], now: float) -> None:
        seq = client.seq
        reason = None
        kept: list[SampledToken] = []
        for token in tokens:
            seq.output.append(token)
            kept.append(token)
            reason = seq.token_finishes(token.token_id)
            if reason:
                break
        m = self.metrics
        if seq.first_token_time is None:
            seq.first_token_time = now
            if m:
                m.ttft.observe(now - seq.arrival)
        elif m and seq.last_token_time is not None:
            gap = (now - seq.last_token_time) / len(kept)
            for _ in kept:
                m.itl.observe(gap)
        seq.last_token_time = now
        if m:
            m.generation_tokens.inc(len(kept))
        text = client.text.add([t.token_id for t in kept])
        if client.text.stopped:
            reason = "stop"
        if reason:
            self._finish(client, reason, new_tokens=kept, text=text)
        else:
            self._emit(client, kept, text)

    def _emit(self, client: _Client, tokens: list[SampledToken], text: str, **extra) -> None:
        seq = client.seq
        client.emit(
            TokenEvent(
                token_ids=[t.token_id for t in tokens],
                text=text,
                logprobs=tokens if seq.params.logprobs else [],
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output),
                spec_verify_steps=client.verify_steps,
                spec_accepted=client.accepted,
                **extra,
            )
        )

    def _finish(
        self,
        client: _Client,
        reason: str,
        new_tokens: list[SampledToken] | None = None,
        text: str = "",
        error: str | None = None,
    ) -> None:
        seq = client.seq
        self.scheduler.finish(seq, reason)
        self._clients.pop(seq.rid, None)
        text += client.text.finish()
        log.debug(
            "request %s finished: reason=%s prompt_tokens=%d completion_tokens=%d latency=%.3fs spec_accepted=%d",
            seq.rid,
            seq.finish_reason or reason,
            len(seq.prompt_ids),
            len(seq.output),
            time.monotonic() - seq.arrival,
            client.accepted,
        )
        if self.metrics:
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)
            self.metrics.requests_total.labels(self.metrics.model_name, seq.finish_reason or reason).inc()
        self._emit(
            client,
            new_tokens or [],
            text,
            finished=True,
            finish_reason=seq.finish_reason or reason,
            error=error,
        )


def device_temperature(params: SamplingParams) -> float | None:
    """The temperature the runner may sample with on the device (0.0: greedy), or None when the
    request needs the host sampler: a seed (reproducible per request), top-k / top-p filtering,
    or logprobs (which read the logits anyway)."""
    if params.logprobs:
        return None
    if params.greedy:
        return 0.0
    if params.seed is not None or params.top_p < 1.0 or params.top_k != -1:
        return None
    return float(params.temperature)


class ContextLengthError(ValueError):
    """The prompt plus max_tokens exceed the context length (HTTP 400, code context_length_exceeded)."""


def asyncio_emitter(
    loop: asyncio.AbstractEventLoop, q: asyncio.Queue[TokenEvent]
) -> Callable[[TokenEvent], None]:
    """An `emit` callback that hands events from the engine thread to an asyncio queue."""

    def emit(event: TokenEvent) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)

    return emit
