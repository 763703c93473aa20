"""The engine loop on rank 0: requests in, scheduled steps out to the executor, tokens back to clients.

One thread runs the loop; HTTP handlers talk to it through a thread-safe inbox and receive
`TokenEvent`s through their `emit` callbacks, which a second thread (engine/output.py) calls after
turning the loop's token ids into text: detokenizing, stop strings and event building never run on
the step's thread. The executor hides whether the model runs in this process (TP 1) or on a
tensor-parallel group (it broadcasts the plan, then runs rank 0). Requests are checked once, by
`prepare`, before they reach `submit`.

Overlap (SGLang's overlap scheduler; off with --disable-overlap-schedule): a step is *launched*
(`Executor.launch`: on CUDA the kernels and graph replays are queued and the call returns) and
*resolved* later (its sampled tokens read back, in one non-blocking copy). The loop launches step
n+1 before it resolves step n, so scheduling, plan building and result processing of one step run
while the device computes the other. At launch the engine advances every sequence as the step will:
prefill progress, and for a plain decode row (and a prompt's last chunk) a placeholder output token
whose id the next plan sends as `FUTURE_TOKEN` (the runner takes it from the device, where the step
sampled it). At resolve the placeholders get their ids and finishing is decided: a sequence that
finished at step n already has a row in step n+1, whose result is dropped (its pages and slot hold
that row's writes harmlessly: a later step's writes come after it in the stream). A step resolves
before the next one is scheduled when that one needs its tokens on the host: MTP steps (variable
acceptance), and rows the host samples (penalties, logit bias, min-p, min_new_tokens, grammars).
Greedy output is identical with overlap on and off.

Request lifecycle (the loop's thread owns the scheduler and the clients; `_lock` is held by it for
everything but the executor's calls, so another thread can take it only between steps or while one
runs):
- admission: `submit` refuses at once when the engine failed, drains, or already has
  --max-queued-requests waiting; a request still waiting after --queue-timeout is refused then.
- failure: a dead rank (the launcher's liveness), a step running past --watchdog-timeout (watched
  by `_watch`, a second thread), or an exception from a step call `fail`: every request, running,
  waiting or still in the inbox, gets an `EngineFailed` event at once, the gauges drop to 0, and the
  server's `on_failure` callbacks end the process. Messages name the rank, never internal addresses.
- drain: `drain` stops admission, waits for the running requests, and cuts what is left at its
  deadline with an `EngineShuttingDown` event.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ling_runtime.distributed.executor import Executor
from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.errors import (
    EngineError,
    EngineFailed,
    EngineShuttingDown,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    QueueTimeout,
)
from ling_runtime.engine.output import Output, OutputProcessor
from ling_runtime.engine.request import Emit, EngineRequest
from ling_runtime.engine.sampling import RequestSampler, SampledToken, SamplingParams, make_generator
from ling_runtime.engine.scheduler import PrefillChunk, Scheduler, Step
from ling_runtime.engine.sequence import Sequence, Status
from ling_runtime.runner.plan import FUTURE_TOKEN, RowSampling, SeqResult, SeqWork, StepPlan, StepResult
from ling_runtime.settings import LIGHTNING_CHUNK, Settings
from ling_runtime.telemetry import RuntimeMetrics
from ling_runtime.text.tokenizer import TokenizerBundle

log = logging.getLogger("ling_runtime.engine")

# How often the watchdog thread looks at rank liveness and the running step's age.
WATCH_INTERVAL_S = 0.1
# `fail` waits this long for the loop to finish its host work before failing without the lock.
FAIL_LOCK_TIMEOUT_S = 2.0
# The interpreter's thread switch interval while an engine runs: the step loop shares the GIL with
# the output thread and the HTTP loop, and must get it back well within a device step (default 5 ms).
SWITCH_INTERVAL_S = 0.0005
# A sampled token whose id the host does not know yet (the step that samples it is in flight).
PLACEHOLDER = SampledToken(FUTURE_TOKEN)


class _Halted(Exception):
    """Unwinds the loop's step when `fail` ran while the step was with the executor."""


@dataclass
class _Client:
    seq: Sequence
    sampler: RequestSampler
    sampling: RowSampling | None  # how the runner samples it on the device (None: the host samples)
    verify_steps: int = 0
    accepted: int = 0
    # Speculative state carried to the next plan.
    commit: int | None = None
    mtp_start: int = 0
    mtp_next: tuple[int, ...] = ()


@dataclass
class _Row:
    """One sequence's part of a launched step."""

    client: _Client
    chunk: PrefillChunk | None  # None: a decode row
    index: int | None = None  # output index of the placeholder this row fills (plain decode / last chunk)


@dataclass
class _InFlight:
    """A launched step, not yet resolved."""

    step: Step
    works: list[SeqWork]
    rows: list[_Row]
    pending: object  # the executor's PendingStep
    overlappable: bool  # the next step may be launched before this one resolves
    launched: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(
        self,
        executor: Executor,
        tokenizer: TokenizerBundle,
        settings: Settings,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        if settings.context_length is None:
            raise ValueError("Engine: unresolved settings; call Settings.resolve(model_dir) first")
        self.executor = executor
        self.tokenizer = tokenizer
        # Asked once: a tokenizer with a large added-token table takes milliseconds per call.
        self.vocab_size = tokenizer.vocab_size
        self.settings = settings
        self.context_length: int = settings.context_length
        self.metrics = metrics
        self.overlap = not settings.disable_overlap_schedule
        # The prefix cache's blocks are the snapshot interval (engine/radix_cache.py); its snapshot
        # pool is what the ranks' caches really hold (a runner built by hand may have none).
        held = getattr(getattr(getattr(executor, "runner", None), "cache", None), "num_snapshots", None)
        num_snapshots = settings.num_snapshots if held is None else min(held, settings.num_snapshots)
        cache = CacheManager(
            settings.num_slots,
            settings.num_pages,
            settings.page_size,
            block_tokens=settings.mamba_track_interval if num_snapshots else 0,
            num_snapshots=num_snapshots,
        )
        self.scheduler = Scheduler(
            cache,
            max_running=min(settings.running_limit, settings.num_slots),
            chunk_tokens=settings.prefill_chunk,
            lookahead_tokens=settings.num_draft_steps + 1,
            policy=settings.schedule_policy,
            # Chunks on the Lightning chunk grid (the snapshot grid when caching): see scheduler.py.
            align=settings.mamba_track_interval if num_snapshots else LIGHTNING_CHUNK,
            speculative=settings.num_draft_steps > 0,
        )
        self.output = OutputProcessor(tokenizer, self._stopped_by_text)
        self._admitted_prompt_tokens = 0  # for the prefix cache's hit rate
        self._cached_prompt_tokens = 0
        self._evicted = (0, 0)  # pages, snapshots already counted
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
        # Step-loop time (seconds), for the metrics and benchmarks: all of it while stepping, and the
        # part spent in the executor's calls (launching, and waiting for results).
        self.loop_seconds = 0.0
        self.executor_seconds = 0.0
        self._counted = (0.0, 0.0, 0)  # (loop, executor, steps) already in the metrics
        self._pending = 0  # submitted but not yet picked up by the loop (for queue depth)
        # Held by the loop except while the executor runs a step (see the module docstring).
        self._lock = threading.Lock()
        # Admission state (failed, draining, _pending, inbox adds) changes under this one.
        self._admit = threading.Lock()
        self._step_started: float | None = None  # monotonic launch of the oldest unresolved step
        self._watchdog: threading.Thread | None = None
        self._failure_callbacks: list[Callable[[str], None]] = []

    # ---- public API (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.output.start()
        self._thread = threading.Thread(target=self._loop, name="ling-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="ling-watchdog", daemon=True)
        self._watchdog.start()

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (on the failing thread) once the engine has failed."""
        self._failure_callbacks.append(callback)

    def prepare(self, prompt_ids: list[int], params: SamplingParams) -> EngineRequest:
        """Check a request against the model and this engine's limits, once, at the boundary.

        Raises `InvalidRequest` (or `PromptTooLong`) naming the field when the request can never be
        served as asked: sampling parameters out of range, an empty prompt, ids outside the
        vocabulary, prompt + max_tokens beyond the context or the whole KV cache."""
        vocab = self.vocab_size
        params.validate(vocab)
        if not prompt_ids:
            raise InvalidRequest("prompt", "must contain at least one token")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            raise InvalidRequest("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.context_length
        total = len(prompt_ids) + params.max_new_tokens
        if total > limit:
            raise PromptTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_new_tokens} for the completion). Reduce the prompt or max_tokens."
            )
        if not self.scheduler.can_ever_fit(total):
            cache_tokens = self.settings.num_pages * self.settings.page_size
            raise InvalidRequest(
                "max_tokens",
                f"prompt + max_tokens + {self.scheduler.lookahead_tokens} lookahead exceed the "
                f"{cache_tokens}-token KV cache (--max-total-tokens)",
            )
        return EngineRequest(f"req-{next(self._ids)}", tuple(prompt_ids), params)

    def submit(self, request: EngineRequest, emit: Emit) -> None:
        """Queue a prepared request; its events go to `emit` (on the output thread). Raises an
        `EngineUnavailable` when the engine cannot take it now: failed, draining, or
        --max-queued-requests already waiting."""
        params = request.params
        seed = self.settings.seed + hash(request.rid) % (1 << 31)
        generator = make_generator(params, seed)
        client = _Client(
            seq=Sequence(
                request.rid, list(request.prompt_ids), params, eos_token_ids=self.tokenizer.eos_token_ids
            ),
            sampler=RequestSampler(params, generator, request.prompt_ids, self.tokenizer.eos_token_ids),
            sampling=device_sampling(params, seed),
        )
        with self._admit:
            if self.failed:
                self._rejected("engine_failed")
                raise EngineFailed(f"engine failed: {self.failed}")
            if self.draining or self._stopping:
                self._rejected("shutting_down")
                raise EngineShuttingDown("the server is shutting down; retry on another replica")
            limit = self.settings.max_queued_requests
            if self.scheduler.num_waiting + self._pending >= limit:
                self._rejected("queue_full")
                raise Overloaded(f"overloaded: {limit} requests already waiting (--max-queued-requests)")
            self._pending += 1
            # Opened before the request can produce anything (the output queue keeps the order).
            self.output.open(request.rid, params, len(request.prompt_ids), emit)
            self._inbox.put(("add", client))
        self._wake.set()

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))
        self._wake.set()

    def _stopped_by_text(self, rid: str) -> None:
        """(Output thread.) A stop string ended this request's stream: release its sequence."""
        self._inbox.put(("stopped", rid))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        """Requests waiting for admission (the autoscaling signal); 0 once the engine has failed,
        which answered every one of them."""
        return 0 if self.failed else self.scheduler.num_waiting + self._pending

    @property
    def num_running(self) -> int:
        return 0 if self.failed else self.scheduler.num_running

    @property
    def idle(self) -> bool:
        """No request is running or waiting, and every event was handed to its receiver."""
        return not self._clients and self._pending == 0 and self.output.idle

    def health(self, max_silence_s: float = 30.0) -> tuple[bool, str]:
        if self.failed:
            return False, f"engine failed: {self.failed}"
        if self.draining:
            return False, "draining: the server is shutting down"
        alive, total = self.executor.ranks_alive()
        if alive < total:
            return False, f"{total - alive} of {total} ranks are down"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        # A long step (a big prefill) is not silence: the watchdog judges steps.
        silence = time.monotonic() - self.heartbeat
        if self._step_started is None and silence > max_silence_s:
            return False, f"engine loop has not stepped for {silence:.0f}s"
        return True, "ok"

    def drain(self, timeout_s: float) -> bool:
        """Stop taking requests (503 from now on), wait up to `timeout_s` for the running and waiting
        ones to finish, then cut what is left (an `EngineShuttingDown` event each: a JSON 503, or a
        stream's last event). True when nothing had to be cut."""
        with self._admit:
            self.draining = True
        deadline = time.monotonic() + timeout_s
        while not self.idle and not self.failed and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.idle or self.failed:
            return not self.failed
        cut = EngineShuttingDown(
            f"the server shut down before this request finished (--drain-timeout {timeout_s:g}s); retry it"
        )
        self._inbox.put(("cut", cut))
        self._wake.set()
        # One step at most: the loop cuts between steps.
        end = time.monotonic() + max(5.0, self.settings.watchdog_timeout)
        while not self.idle and not self.failed and time.monotonic() < end:
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """End the loop and the group. A failed engine's group is not asked to stop (a rank may hang
        in a collective): its processes are killed."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0 if self.failed else 10.0)
        stuck = self._thread is not None and self._thread.is_alive()
        self.output.stop(timeout=1.0 if self.failed else 5.0)
        self.executor.shutdown(graceful=not (self.failed or stuck))

    def fail(self, reason: str) -> None:
        """The group cannot step any more: answer every request with `EngineFailed(reason)` now,
        refuse new ones, and tell the server (`on_failure`). Any thread; once."""
        if self._stopping and not self.failed:
            return  # ranks going away during a deliberate stop are not a failure
        locked = self._lock.acquire(timeout=FAIL_LOCK_TIMEOUT_S)
        try:
            with self._admit:
                if self.failed:
                    return
                self.failed = reason
                waiting = self._take_inbox()
                self._pending = 0
            log.error("engine failed: %s", reason)
            error = EngineFailed(f"engine failed: {reason}")
            outputs = []
            for client in [*waiting, *list(self._clients.values())]:
                outputs.append(self._final(client, "abort", error=error))
                if self.metrics:
                    self.metrics.requests_total.labels(self.metrics.model_name, "abort").inc()
            self.output.publish(outputs)
            self._clients.clear()
            self._update_gauges()
        finally:
            if locked:
                self._lock.release()
        self._wake.set()
        for callback in self._failure_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("an engine failure callback failed")

    def _take_inbox(self) -> list[_Client]:
        """Requests submitted but not yet picked up by the loop (the inbox emptied)."""
        out = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return out
            if kind == "add":
                assert isinstance(item, _Client)
                out.append(item)

    # ---- the loop (engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        inflight: _InFlight | None = None
        try:
            while True:
                with self._lock:
                    if self._stopping or self.failed:
                        return
                    began = time.monotonic()
                    self.heartbeat = began
                    self._drain_inbox()
                    self._expire_waiting()
                    if inflight is not None and not inflight.overlappable:
                        self._resolve(inflight)
                        inflight = None
                    step = self.scheduler.schedule()
                    self._update_gauges()
                    launched = self._launch(step) if not step.empty else None
                    progressed = launched is not None or inflight is not None
                    if inflight is not None:
                        self._resolve(inflight)  # step n's results, while step n+1 runs
                    inflight = launched
                    if inflight is not None and not self.overlap:
                        self._resolve(inflight)
                        inflight = None
                    if launched is not None:
                        self.steps += 1
                    self._step_started = inflight.launched if inflight is not None else None
                    if progressed:
                        self.loop_seconds += time.monotonic() - began
                        self._count_loop()
                        continue
                self._wake.wait(0.25)
                self._wake.clear()
        except _Halted:
            return  # `fail` answered everyone while the step was out
        except Exception as exc:  # a dead rank surfaces here as a collective error
            # The exception's text can hold internal paths and peer addresses (gloo's): it goes to
            # the log; clients get the ranks the launcher sees down, or the exception's type.
            log.exception("engine loop failed")
            self.fail(
                self.executor.diagnose() or f"a model step failed ({type(exc).__name__}); see the server log"
            )

    def _count_loop(self) -> None:
        m = self.metrics
        if m is None:
            return
        loop, ex = self.loop_seconds, self.executor_seconds
        last = self._counted
        m.engine_loop_seconds.inc(loop - last[0])
        m.engine_host_seconds.inc(max(0.0, (loop - ex) - (last[0] - last[1])))
        m.engine_steps.inc(self.steps - last[2])
        self._counted = (loop, ex, self.steps)

    def _unlocked(self, call: Callable[[], object]) -> object:
        """An executor call, without the lock (the watchdog may `fail` meanwhile)."""
        began = time.monotonic()
        if self._step_started is None:
            self._step_started = began
        self._lock.release()
        try:
            return call()
        finally:
            self._lock.acquire()
            self.executor_seconds += time.monotonic() - began
            if self.failed:
                raise _Halted

    def _watch(self) -> None:
        """The watchdog thread: a rank the launcher sees down, or a step older than
        --watchdog-timeout, fails the engine (the loop itself may be stuck in that step)."""
        limit = self.settings.watchdog_timeout
        while not (self._stopping or self.failed):
            time.sleep(WATCH_INTERVAL_S)
            if self._stopping or self.failed:
                return
            alive, total = self.executor.ranks_alive()
            if alive < total:
                self.fail(self.executor.diagnose() or f"{total - alive} of {total} ranks are down")
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > limit:
                detail = self.executor.diagnose()
                self.fail(
                    f"a step did not finish within --watchdog-timeout {limit:g}s"
                    + (f": {detail}" if detail else "")
                )
                return

    def _expire_waiting(self) -> None:
        """Refuse requests that waited for admission longer than --queue-timeout."""
        limit = self.settings.queue_timeout
        if limit is None:
            return
        now = time.monotonic()
        for seq in [s for s in self.scheduler.waiting if now - s.arrival > limit]:
            client = self._clients.get(seq.rid)
            if client is not None:
                self._rejected("queue_timeout")
                error = QueueTimeout(
                    f"overloaded: waited {limit:g}s without being scheduled (--queue-timeout)"
                )
                self._finish(client, "abort", error=error)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(item, _Client)
                with self._admit:
                    self._pending -= 1
                self._clients[item.seq.rid] = item
                self.scheduler.add(item.seq)
            elif kind in ("abort", "stopped"):
                client = self._clients.get(str(item))
                if client is not None:
                    # "stopped": the output thread already ended the stream (a stop string).
                    self._finish(client, "abort" if kind == "abort" else "stop", publish=kind == "abort")
            elif kind == "cut":
                assert isinstance(item, EngineError)
                for client in list(self._clients.values()):
                    self._finish(client, "abort", error=item)

    def _update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.num_queue_reqs.set(self.num_waiting)
        m.num_running_reqs.set(self.num_running)
        m.kv_cache_usage_ratio.set(self.scheduler.cache.page_usage)
        m.linear_state_slots_used.set(self.scheduler.cache.slots_used)
        radix = self.scheduler.cache.radix
        if radix is not None:
            m.prefix_cache_pages.set(radix.cached_pages)
            m.prefix_cache_snapshots.set(radix.cached_snapshots)
            pages, snaps = self._evicted
            m.prefix_cache_evicted_pages.inc(radix.evicted_pages - pages)
            m.prefix_cache_evicted_snapshots.inc(radix.evicted_snapshots - snaps)
            self._evicted = (radix.evicted_pages, radix.evicted_snapshots)
        alive, _ = self.executor.ranks_alive()
        m.ranks_alive.set(alive)

    def _count_admitted(self, step: Step) -> None:
        """Prompt tokens of newly admitted requests that the prefix cache serves (metrics)."""
        for seq in step.admitted:
            self._admitted_prompt_tokens += len(seq.prompt_ids)
            self._cached_prompt_tokens += seq.cached_tokens
            if self.metrics and seq.cached_tokens:
                self.metrics.prompt_tokens.inc(seq.cached_tokens)
                self.metrics.cached_prompt_tokens.inc(seq.cached_tokens)
        if self.metrics and step.admitted and self.scheduler.cache.radix is not None:
            rate = self._cached_prompt_tokens / max(1, self._admitted_prompt_tokens)
            self.metrics.prefix_cache_hit_rate.set(rate)

    # ---- launch: plans out, sequences advanced as the step will ------------------------------------
    def _launch(self, step: Step) -> _InFlight:
        k = self.settings.num_draft_steps
        self._count_admitted(step)
        works: list[SeqWork] = []
        rows: list[_Row] = []
        overlappable = k == 0
        for chunk in step.prefill:
            client = self._clients[chunk.seq.rid]
            seq = chunk.seq
            works.append(
                self._work(
                    client,
                    chunk.start,
                    seq.prompt_ids[chunk.start : chunk.end],
                    0,
                    int(chunk.last),
                    restore=chunk.restore,
                    snapshots=tuple((b - chunk.start, sid) for b, sid in chunk.snapshots),
                )
            )
            row = _Row(client, chunk)
            if k == 0:
                seq.num_computed = chunk.end
                if chunk.last:
                    row.index = len(seq.output)
                    seq.output.append(PLACEHOLDER)
                    overlappable = overlappable and client.sampling is not None
            rows.append(row)
        for seq, snaps in zip(step.decode, step.decode_snapshots, strict=True):
            client = self._clients[seq.rid]
            last = seq.num_tokens - 1
            # Snapshots of a plain decode: after this step's token; under MTP: after positions of
            # the previous verify (copied out before its commit).
            start = seq.verify_start if k and seq.verify_start is not None else last
            cuts = tuple((b - start, sid) for b, sid in snaps)
            works.append(
                self._work(
                    client,
                    last,
                    [seq.last_token_id],  # FUTURE_TOKEN while the step that samples it is in flight
                    k,
                    k + 1,
                    snapshots=() if k else cuts,
                    commit_snapshots=cuts if k else (),
                )
            )
            row = _Row(client, None)
            if k == 0:
                seq.num_computed = last + 1
                row.index = len(seq.output)
                seq.output.append(PLACEHOLDER)
                overlappable = overlappable and client.sampling is not None
            rows.append(row)
        plan = StepPlan(seqs=tuple(works))
        pending = self._unlocked(lambda: self.executor.launch(plan))
        return _InFlight(step, works, rows, pending, overlappable)

    def _work(
        self,
        client: _Client,
        start: int,
        tokens: list[int],
        drafts: int,
        logits: int,
        restore: int | None = None,
        snapshots: tuple[tuple[int, int], ...] = (),
        commit_snapshots: tuple[tuple[int, int], ...] = (),
    ) -> SeqWork:
        seq = client.seq
        assert seq.allocation is not None
        # The pages this step reaches, not the whole reservation: the block table (and the MLA
        # splits) follow the sequence's real context, and the plan stays small.
        reach = -(-(start + len(tokens) + drafts) // self.settings.page_size)
        work = SeqWork(
            slot=seq.allocation.slot,
            pages=tuple(seq.allocation.pages[:reach]),
            start=start,
            tokens=tuple(tokens),
            reset=start == 0,
            commit=client.commit,
            num_drafts=drafts,
            mtp_start=client.mtp_start,
            mtp_next_tokens=client.mtp_next,
            logits=logits,
            sampling=client.sampling,
            restore=restore,
            snapshots=snapshots,
            commit_snapshots=commit_snapshots,
        )
        client.commit = None
        client.mtp_next = ()
        return work

    # ---- resolve: results in, tokens out ------------------------------------------------------------
    def _resolve(self, inflight: _InFlight) -> None:
        pending = inflight.pending
        result: StepResult = self._unlocked(pending.result)  # type: ignore[attr-defined,assignment]
        k = self.settings.num_draft_steps
        step = inflight.step
        # The prefix cache's bookkeeping before any result can finish a sequence: what the MTP
        # layer has now written, the snapshots now taken, the blocks now complete.
        for w, row in zip(inflight.works, inflight.rows, strict=True):
            if w.mtp_next_tokens:
                seq = row.client.seq
                seq.mtp_done = max(seq.mtp_done, w.mtp_start + len(w.mtp_next_tokens))
        self.scheduler.step_done(step)
        now = time.monotonic()
        outputs: list[Output] = []
        for row, res in zip(inflight.rows, result.seqs, strict=True):
            client, seq = row.client, row.client.seq
            if seq.status is Status.FINISHED:
                continue  # finished after this step was launched: its row's result is dropped
            chunk = row.chunk
            if chunk is not None:
                if self.metrics:
                    self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
                if k:
                    seq.num_computed = chunk.end
                if chunk.last:
                    token = self._sampled(client, res)
                    if row.index is not None:
                        self._deliver(client, row.index, token, now, outputs)
                    else:
                        self._append(client, [token], now, outputs)
                if k and seq.status is not Status.FINISHED:
                    client.mtp_start = chunk.start
                    client.mtp_next = tuple(seq.token_ids(chunk.start + 1, chunk.end + 1))
                continue
            if k == 0:
                assert row.index is not None
                self._deliver(client, row.index, self._sampled(client, res), now, outputs)
                continue
            position = seq.num_tokens - 1
            if res.tokens is not None:
                self._accept_device(client, position, res, now, outputs)
            else:
                self._accept(client, position, res.logits, res.drafts, now, outputs)
        self.output.publish(outputs)

    def _sampled(self, client: _Client, res: SeqResult) -> SampledToken:
        """The token of a row's last returned position: the device's, or drawn here."""
        if res.tokens is not None:
            return _token(res, len(res.tokens) - 1)
        return client.sampler.sample(res.logits[-1])  # type: ignore[index]

    def _deliver(
        self, client: _Client, index: int, token: SampledToken, now: float, outputs: list[Output]
    ) -> None:
        """Fill the placeholder at output `index` (one token of a plain step) and act on it."""
        seq = client.seq
        seq.output[index] = token
        reason = seq.finishes_at(index)
        if reason:
            del seq.output[index + 1 :]  # placeholders of steps launched meanwhile
        self._observe(seq, 1, now)
        self._publish(client, [token], index + 1, reason, outputs)

    def _accept(
        self, client: _Client, position: int, logits, drafts: list[int], now: float, outputs: list[Output]
    ) -> None:
        """Verify drafts position by position with the request's own sampler; stop at the first miss.

        Each emitted token is drawn from the target distribution exactly as without speculation, so
        greedy output is identical and seeded sampling draws the same random numbers.
        """
        seq = client.seq
        emitted: list[SampledToken] = []
        for j in range(len(drafts) + 1):
            token = client.sampler.sample(logits[j])
            emitted.append(token)
            if (
                seq.token_finishes(token.token_id)
                or len(seq.output) + len(emitted) >= seq.params.max_new_tokens
            ):
                break
            if j == len(drafts) or token.token_id != drafts[j]:
                break
        self._record_verify(client, position, emitted, len(drafts), now, outputs)

    def _accept_device(
        self, client: _Client, position: int, res: SeqResult, now: float, outputs: list[Output]
    ) -> None:
        """The runner sampled on the device: emit tokens[: accepted + 1] (accepted counted there by a
        graphed verify, which also committed the linear state, or here), cut at a finishing token as
        `_accept` would."""
        seq = client.seq
        tokens, drafts = res.tokens or [], res.drafts
        accepted = res.num_accepted
        if accepted is None:
            accepted = 0
            while accepted < len(drafts) and tokens[accepted] == drafts[accepted]:
                accepted += 1
        emitted: list[SampledToken] = []
        for j in range(accepted + 1):
            emitted.append(_token(res, j))
            token_id = tokens[j]
            if seq.token_finishes(token_id) or len(seq.output) + len(emitted) >= seq.params.max_new_tokens:
                break
        self._record_verify(client, position, emitted, len(drafts), now, outputs)

    def _record_verify(
        self,
        client: _Client,
        position: int,
        emitted: list[SampledToken],
        num_drafts: int,
        now: float,
        outputs: list[Output],
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
        seq.verify_start = position  # the prefix cache snapshots its boundaries at the next step
        client.commit = len(emitted)
        client.mtp_start = position
        self._append(client, emitted, now, outputs)
        client.mtp_next = tuple(seq.token_ids(position + 1, position + 1 + len(emitted)))

    def _append(self, client: _Client, tokens: list[SampledToken], now: float, outputs: list[Output]) -> None:
        """Append tokens the host now knows (MTP steps, resolved before the next launch)."""
        seq = client.seq
        reason = None
        kept: list[SampledToken] = []
        for token in tokens:
            seq.output.append(token)
            kept.append(token)
            reason = seq.token_finishes(token.token_id)
            if reason:
                break
        self._observe(seq, len(kept), now)
        self._publish(client, kept, len(seq.output), reason, outputs)

    def _observe(self, seq: Sequence, n: int, now: float) -> None:
        m = self.metrics
        if seq.first_token_time is None:
            seq.first_token_time = now
            if m:
                m.ttft.observe(now - seq.arrival)
        elif m and seq.last_token_time is not None:
            gap = (now - seq.last_token_time) / n
            for _ in range(n):
                m.itl.observe(gap)
        seq.last_token_time = now
        if m:
            m.generation_tokens.inc(n)

    def _publish(
        self,
        client: _Client,
        tokens: list[SampledToken],
        completion_tokens: int,
        reason: str | None,
        outputs: list[Output],
    ) -> None:
        """Queue the step's tokens for the output thread; finish the sequence when `reason`."""
        seq = client.seq
        if reason:
            self._finish(client, reason, publish=False)
        outputs.append(
            Output(
                seq.rid,
                [t.token_id for t in tokens],
                completion_tokens,
                logprobs=tokens if seq.params.logprobs else [],
                cached_tokens=seq.cached_tokens,
                finished=bool(reason),
                finish_reason=(seq.finish_reason or reason) if reason else None,
                spec_verify_steps=client.verify_steps,
                spec_accepted=client.accepted,
            )
        )

    def _final(self, client: _Client, reason: str, error: EngineError | None = None) -> Output:
        seq = client.seq
        return Output(
            seq.rid,
            [],
            sum(1 for t in seq.output if t is not PLACEHOLDER),
            cached_tokens=seq.cached_tokens,
            finished=True,
            finish_reason=seq.finish_reason or reason,
            error=error,
            spec_verify_steps=client.verify_steps,
            spec_accepted=client.accepted,
        )

    def _finish(
        self, client: _Client, reason: str, error: EngineError | None = None, publish: bool = True
    ) -> None:
        """Release a sequence (its slot, pages, snapshots); with `publish`, send its final event
        (abort, cut, queue timeout: no tokens)."""
        seq = client.seq
        self.scheduler.finish(seq, reason)
        self._clients.pop(seq.rid, None)
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
        if publish:
            self.output.publish([self._final(client, reason, error)])


def _token(res: SeqResult, j: int) -> SampledToken:
    """Position j of a device-sampled result, with its logprobs when the runner computed them."""
    assert res.tokens is not None
    token_id = res.tokens[j]
    if res.logprobs is None:
        return SampledToken(token_id)
    chosen, top = res.logprobs[j]
    return SampledToken(token_id, chosen, top)


def device_sampling(params: SamplingParams, seed: int) -> RowSampling | None:
    """How the runner samples this request on the device, or None when the host must: logits
    adjusted per request (penalties, logit bias, min-p, min_new_tokens, a grammar). Greedy is
    temperature 0; the noise of every other draw is hashed from the request's seed (its own, or
    `seed`) and the position, so a seeded request gives the same tokens on any path."""
    if params.needs_host_sampling:
        return None
    logprobs = params.top_logprobs if params.logprobs else -1
    if params.greedy:
        return RowSampling(temperature=0.0, logprobs=logprobs)
    return RowSampling(
        temperature=float(params.temperature),
        top_k=params.top_k if params.top_k > 0 else -1,
        top_p=float(params.top_p),
        # Any integer a client sends, folded into int64 (the runner's seed column).
        seed=(params.seed if params.seed is not None else seed) % (1 << 63),
        logprobs=logprobs,
    )
