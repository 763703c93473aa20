"""The engine keeps the device busy (issue 21 part 2), checked on the CPU.

- Overlap scheduling: step n+1 is launched before step n is resolved (its decode rows carry
  FUTURE_TOKEN, taken on the device), with output identical to --disable-overlap-schedule and to
  the model's own greedy decode: plain, mixed sampling, the prefix cache, MTP, the graph bodies, a
  request finishing while its next step is in flight, and a TP 2 group (`slow`).
- Sampling on the device with per-row parameters: seeded, top-k / top-p and logprob requests stay
  in the decode graph bodies and draw the same tokens as the eager path.
- Block tables follow the real context (plans carry the pages a step reaches; graph widths).
- Text and events are made on the output thread, not the step loop's.
- `prepare` asks the tokenizer for its vocabulary size once per engine, not per token.
- Device defaults (chunked prefill, running limit, graph buckets).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from ling_runtime.distributed.executor import LocalExecutor
from ling_runtime.engine.engine import Engine
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.runner.cuda_graphs import graph_buckets, graph_widths
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.runner.plan import FUTURE_TOKEN, StepPlan
from ling_runtime.settings import Settings
from ling_runtime.tiny import tiny_config, write_checkpoint

from .engine_utils import generate_all, make_engine, mtp, output_ids

PROMPTS = [list(range(10, 60)), [5, 6, 7], list(range(100, 400, 3)), [42] * 17]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


MIXED = [
    greedy(12),
    SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
    SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=2, logprobs=True, top_logprobs=3),
    # Sampled on the host (a penalty): its steps resolve before the next is scheduled.
    SamplingParams(max_new_tokens=8, temperature=0.0, presence_penalty=1.5, ignore_eos=True),
]


class PlanSpy:
    """Wraps the real runner's `launch` and records what each plan asked (no behaviour changed)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.plans: list[StepPlan] = []
        self._launch = runner.launch
        runner.launch = self  # type: ignore[method-assign]

    def __call__(self, plan: StepPlan):
        self.plans.append(plan)
        return self._launch(plan)

    @property
    def futures(self) -> int:
        return sum(1 for p in self.plans for w in p.seqs if FUTURE_TOKEN in w.tokens)


def run(model_dir: Path, tokenizer, prompts, params, **fields) -> tuple[list, PlanSpy]:
    engine = make_engine(model_dir, tokenizer, **fields)
    spy = PlanSpy(engine.executor.runner)  # type: ignore[attr-defined]
    try:
        events = generate_all(engine, prompts, params)
    finally:
        engine.stop()
    assert engine.scheduler.cache.slots_used == 0 and engine.scheduler.cache.pages_used == 0
    return events, spy


@pytest.fixture(scope="module")
def oracle(builtin_dir: Path) -> LingForCausalLM:
    return LingForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def vocab6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-token vocabulary: MTP drafts match often (acceptance and rollback are exercised)."""
    return write_checkpoint(tmp_path_factory.mktemp("vocab6ov"), tiny_config(vocab_size=6), seed=3)


def test_overlap_launches_ahead_and_changes_no_token(builtin_dir, tokenizer, oracle) -> None:
    outs = {}
    for overlap in (True, False):
        events, spy = run(
            builtin_dir,
            tokenizer,
            PROMPTS,
            MIXED,
            disable_overlap_schedule=not overlap,
            chunked_prefill_size=16,
        )
        outs[overlap] = [
            [(e.token_ids, e.finish_reason, e.completion_tokens, [t.logprob for t in e.logprobs]) for e in ev]
            for ev in events
        ]
        # With overlap the decode rows of a step ride on tokens still on the device; without, never.
        assert (spy.futures > 10) is overlap and (spy.futures == 0) is not overlap
        assert output_ids(events[0]) == greedy_generate(oracle, PROMPTS[0], 12)
        assert len(events[2][-1].logprobs) <= 1 and events[2][0].logprobs[0].top_logprobs
    assert outs[True] == outs[False]


def test_overlap_with_the_prefix_cache_and_multiple_turns(builtin_dir, tokenizer, oracle) -> None:
    system = list(range(3, 203))
    first = [*system, 7, 8, 9]
    results = {}
    for overlap in (True, False):
        engine = make_engine(
            builtin_dir, tokenizer, disable_overlap_schedule=not overlap, chunked_prefill_size=64
        )
        try:
            (ev,) = generate_all(engine, [first], [greedy(20)])
            later = [first + output_ids(ev) + [11, 12], [*system, 13]]
            rest = generate_all(engine, later, [greedy(16)] * 2)
        finally:
            engine.stop()
        results[overlap] = [output_ids(e) for e in [ev, *rest]], [e[-1].cached_tokens for e in [ev, *rest]]
        prompts = [first, *later]
        assert results[overlap][0] == [
            greedy_generate(oracle, p, n) for p, n in zip(prompts, (20, 16, 16), strict=True)
        ]
    assert results[True] == results[False]
    assert results[True][1][1] >= 192  # the second turn resumed from the cache


def test_overlap_with_mtp(vocab6_dir, tokenizer) -> None:
    prompts = [[1, 2, 3, 4, 5, 0, 1], [3, 3], [0, 1, 2, 3, 4, 5] * 6, [2]]
    model = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32)
    expected = [greedy_generate(model, p, 20) for p in prompts]
    for overlap in (True, False):
        events, spy = run(
            vocab6_dir, tokenizer, prompts, [greedy(20)] * 4, disable_overlap_schedule=not overlap,
            max_mamba_cache_size=4, chunked_prefill_size=16, **mtp(2),
        )  # fmt: skip
        assert [output_ids(e) for e in events] == expected
        assert sum(e[-1].spec_accepted for e in events) > 0
        assert spy.futures == 0  # MTP steps resolve before the next is scheduled


def test_a_request_finishing_while_its_next_step_runs(builtin_dir, tokenizer, oracle) -> None:
    """A stop token is known only when its step resolves, after the next step was launched: that
    row's result is dropped; the output ends at the stop token and the slot and pages come back."""
    reference = greedy_generate(oracle, PROMPTS[0], 10)
    stop_at = reference[2]
    assert stop_at not in reference[:2]
    params = [greedy(10, stop_token_ids=[stop_at]), greedy(30)]
    events, spy = run(builtin_dir, tokenizer, [PROMPTS[0], PROMPTS[1]], params)
    ids = output_ids(events[0])
    assert ids == reference[: reference.index(stop_at) + 1]
    assert events[0][-1].finish_reason == "stop" and events[0][-1].completion_tokens == len(ids)
    assert output_ids(events[1]) == greedy_generate(oracle, PROMPTS[1], 30)
    # The stopped request had a row in the step launched after its last token.
    rows = [sum(1 for w in p.seqs if w.slot == 0) for p in spy.plans]
    assert spy.futures > 0 and sum(rows) > len(ids)


def test_text_is_made_off_the_step_thread(builtin_dir, tokenizer) -> None:
    """Events are built (detokenized, stop strings applied) on the output thread; a stop string
    found there ends the stream and releases the sequence in the engine."""
    engine = make_engine(builtin_dir, tokenizer)
    threads: set[str] = set()
    events = []
    done = threading.Event()

    def emit(event) -> None:
        threads.add(threading.current_thread().name)
        events.append(event)
        if event.finished:
            done.set()

    try:
        (probe,) = generate_all(engine, [PROMPTS[2]], [greedy(24)])
        text = "".join(e.text for e in probe)
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        assert stop.strip(), text
        params = greedy(24, stop=[stop])
        engine.submit(engine.prepare(PROMPTS[2], params), emit)
        assert done.wait(60)
        # Released (the engine learns of the stop from the output thread): nothing runs any more.
        from tests.waiting import wait_for

        wait_for("the stopped sequence to be released", lambda: engine.scheduler.num_running == 0, timeout=30)
    finally:
        engine.stop()
    assert threads == {"ling-detokenizer"}
    final = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop" and stop not in final and text.startswith(final)
    assert engine.scheduler.cache.slots_used == 0


def test_in_graph_sampling_equals_the_eager_path(tmp_path_factory, tokenizer) -> None:
    """The decode graph bodies (eager mode, as captured) serve seeded, top-k / top-p and logprob
    requests: same tokens and logprobs as the eager path, and the graphs served their decode steps."""
    path = write_checkpoint(tmp_path_factory.mktemp("ingraph"), tiny_config(), seed=11)
    prompts = [[5, 6, 7, 8], list(range(30, 70)), [9] * 20]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=1, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=1.2, top_k=5, logprobs=True, top_logprobs=2, seed=3),
        SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True),
    ]
    outs = {}
    for graphs in (False, True):
        model = LingForCausalLM.from_pretrained(path, dtype=torch.float32)
        cache = model.make_cache(num_slots=4, num_pages=65, page_size=16)
        runner = ModelRunner(model, cache, torch.device("cpu"))
        if graphs:
            runner.enable_cuda_graphs(max_batch=4, max_pages=16, scratch_page=64, eager=True)
        settings = Settings(
            max_running_requests=4, max_total_tokens=64 * 16, page_size=16, context_length=256,
            chunked_prefill_size=64,
        )  # fmt: skip
        engine = Engine(LocalExecutor(runner), tokenizer, settings)
        engine.start()
        try:
            events = generate_all(engine, prompts, params)
        finally:
            engine.stop()
        outs[graphs] = [
            [
                (
                    e.token_ids,
                    [(t.token_id, round(t.logprob or 0.0, 4), t.top_logprobs[:1]) for t in e.logprobs],
                )
                for e in ev
            ]
            for ev in events
        ]
        if graphs:
            assert runner.graph_steps >= 8
    tokens = {g: [[t for ids, _ in ev for t in ids] for ev in o] for g, o in outs.items()}
    assert tokens[True] == tokens[False]
    logprobs = {g: [[lp[0][:2] for _, lp in ev if lp] for ev in o] for g, o in outs.items()}
    assert logprobs[True] == logprobs[False]


def test_plans_carry_the_pages_a_step_reaches(builtin_dir, tokenizer) -> None:
    events, spy = run(builtin_dir, tokenizer, [PROMPTS[2]], [greedy(40)], chunked_prefill_size=64)
    assert len(output_ids(events[0])) == 40
    page = 16
    for plan in spy.plans:
        for w in plan.seqs:
            assert len(w.pages) == -(-(w.start + len(w.tokens) + w.num_drafts) // page)
    # The reservation (prompt + max_tokens + 1) is 10 pages; the first chunk reached 4.
    assert len(spy.plans[0].seqs[0].pages) == 4


def test_graph_buckets_and_widths() -> None:
    assert graph_widths(8193, 16) == [256, 1024, 4096, 8193]  # 131072 tokens: 33 MLA splits only there
    assert graph_widths(257, 16) == [257]
    assert graph_widths(600, 64) == [64, 256, 600]  # page 64: 4K tokens are 64 pages
    assert graph_buckets(128)[-1] == 128


def test_device_defaults_and_graph_batch(builtin_dir) -> None:
    cpu = Settings().resolve(str(builtin_dir))
    cuda = Settings(device="cuda").resolve(str(builtin_dir))
    assert (cpu.max_running_requests, cpu.chunked_prefill_size) == (64, 256)
    assert (cuda.max_running_requests, cuda.chunked_prefill_size) == (128, 8192)
    assert cuda.graph_max_batch == 128  # graph buckets cover the running limit
    given = Settings(device="cuda", max_running_requests=32, chunked_prefill_size=512, cuda_graph_max_bs=16)
    assert (given.running_limit, given.prefill_chunk, given.graph_max_batch) == (32, 512, 16)
    from ling_runtime.cli import parse_serve_args

    args = parse_serve_args(["--cuda-graph-max-bs", "48", "--disable-overlap-schedule"])
    assert args.cuda_graph_max_bs == 48 and args.disable_overlap_schedule


def test_prepare_asks_for_the_vocabulary_size_once(builtin_dir, tokenizer) -> None:
    class Counting(type(tokenizer)):  # the real tokenizer, counting one property's reads
        reads = 0

        @property
        def vocab_size(self) -> int:
            Counting.reads += 1
            return super().vocab_size

    counted = Counting(
        tokenizer.tokenizer, tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_ids,
        tokenizer.max_token_bytes,
    )  # fmt: skip
    engine = make_engine(builtin_dir, counted)
    try:
        before = Counting.reads
        for _ in range(5):
            engine.prepare([t % 1000 + 3 for t in range(2000)], greedy(4))
        assert Counting.reads == before
        with pytest.raises(Exception, match="outside the vocabulary"):
            engine.prepare([1, 2, 10**6], greedy(4))
    finally:
        engine.stop()


# ---- TP 2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tp2_overlap_matches_sync(builtin_dir, tokenizer) -> None:
    """TP 2 (mp launcher, gloo): rank 1 resolves FUTURE_TOKEN from its own device-sampled tokens,
    which must equal rank 0's (same logits, same hashed noise), or the outputs would differ."""
    from ling_runtime.distributed.mp_launcher import launch_mp

    from .conftest import free_port

    params = [MIXED[0], MIXED[1], MIXED[2]]
    outs = {}
    for overlap in (True, False):
        settings = Settings(
            tp_size=2, launcher="mp", disable_overlap_schedule=not overlap, chunked_prefill_size=32
        ).resolve(str(builtin_dir))
        executor, _ = launch_mp(settings, 2, "127.0.0.1", free_port(), 120.0)
        engine = Engine(executor, tokenizer, settings)
        engine.start()
        try:
            events = generate_all(engine, PROMPTS[:3], params, timeout=300)
        finally:
            engine.stop()
        outs[overlap] = [output_ids(e) for e in events]
    assert outs[True] == outs[False]
    assert all(len(o) > 1 for o in outs[True])
