"""The prefix cache for the hybrid model (engine/radix_cache.py) and mixed prefill + decode steps.

Bookkeeping first (plain objects: blocks, locks, LRU eviction of pages and snapshots), then the
scheduler's decisions, then the engine on the built-in model: greedy output with the cache on equals
the cache off and the model's own greedy decode, for multi-turn and branching conversations and
prompts that share part of a snapshot interval, with and without MTP, under eviction pressure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.engine.scheduler import Scheduler, Step
from ling_runtime.engine.sequence import Sequence
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.tiny import tiny_config, write_checkpoint

from .engine_utils import generate_all, make_engine, mtp, output_ids


def seq(rid: str, ids: list[int], max_new: int = 4) -> Sequence:
    return Sequence(rid, list(ids), SamplingParams(max_new_tokens=max_new, temperature=0.0))


def cached_seq(cache: CacheManager, ids: list[int], snap_at: list[int]) -> Sequence:
    """A sequence admitted into ``cache`` whose blocks ending at ``snap_at`` were snapshotted and
    handed to the tree (what the engine does step by step)."""
    s = seq("s", ids)
    m = cache.match(ids)
    s.allocation = cache.allocate(len(ids) + 4, m)
    resumed = m.tokens if m is not None else 0
    snaps = {b: sid for b in snap_at if b > resumed and (sid := cache.alloc_snapshot()) is not None}
    cache.insert(s.allocation, ids, max(snaps), snaps)
    return s


# ---- the tree -----------------------------------------------------------------------------------
def test_a_prompt_resumes_at_its_deepest_snapshot_and_shares_those_pages() -> None:
    cache = CacheManager(num_slots=4, num_pages=64, page_size=4, block_tokens=8, num_snapshots=8)
    a = cached_seq(cache, list(range(100, 130)), [8, 16, 24])
    assert cache.cached_pages == 6  # three blocks of two pages
    # Shares 20 tokens: blocks [0, 8) and [8, 16) match, [16, 24) does not.
    m = cache.match(list(range(100, 120)) + [7] * 10)
    assert m is not None and m.tokens == 16 and list(m.pages) == a.allocation.pages[:4]
    # The whole cached path but never the last prompt token (its logits give the first token).
    assert cache.match(list(range(100, 124))).tokens == 16
    assert cache.match(list(range(100, 125))).tokens == 24
    b = seq("b", list(range(100, 120)) + [7] * 10)
    b.allocation = cache.allocate(34, cache.match(b.prompt_ids))
    assert b.allocation.pages[:4] == a.allocation.pages[:4]
    assert not set(b.allocation.pages[4:]) & set(a.allocation.pages)
    assert b.allocation.restore is not None and b.allocation.restore.depth == 16


def test_held_pages_survive_and_released_ones_are_evicted_least_recently_used_first() -> None:
    cache = CacheManager(num_slots=4, num_pages=16, page_size=4, block_tokens=8, num_snapshots=8)
    a = cached_seq(cache, [1] * 16 + [9], [8, 16])  # 5 pages: 4 cached, 1 own
    b = cached_seq(cache, [2] * 16 + [9], [8, 16])
    assert cache.pages_used == 12 and cache.cached_pages == 8  # 6 pages each, 2 blocks cached
    cache.release(a.allocation)
    cache.release(b.allocation)
    # Nobody holds the cached pages: they count as free (evicted on demand), as SGLang counts.
    assert cache.pages_used == 0 and cache.cached_pages == 8 and cache.radix.evictable_pages == 8
    # a was released first but b was touched after it: a's blocks go first.
    big = seq("big", [3] * 40)
    assert cache.can_allocate(44, cache.match(big.prompt_ids))
    big.allocation = cache.allocate(44, cache.match(big.prompt_ids))  # 11 pages: 8 free + 3 evicted
    # Whole blocks go: a's leaf, then a's first block (a leaf by then, and older than b's leaf).
    assert cache.radix.evicted_pages == 4
    assert cache.match([1] * 16 + [9]).tokens == 0
    assert cache.match([2] * 16 + [9]).tokens == 16
    # Held pages are never evicted: with big holding 11 pages nothing else fits 6 more.
    assert not cache.can_allocate(24)


def test_snapshots_are_evicted_from_chains_before_leaves_and_branching_points() -> None:
    cache = CacheManager(num_slots=4, num_pages=64, page_size=4, block_tokens=8, num_snapshots=4)
    trunk = list(range(10, 34))  # three blocks
    a = cached_seq(cache, trunk + [1] * 9, [8, 16, 24, 32])
    cache.release(a.allocation)
    b = cached_seq(cache, trunk[:16] + [2] * 17, [8, 16, 24, 32])  # branches after 16: no snapshot
    cache.release(b.allocation)
    radix = cache.radix
    # Four buffers: a's four, then b needed two (24, 32) and got them by evicting the two chain
    # nodes' snapshots (8 and 24 of a), never a's leaf or the branching point (16).
    assert radix.evicted_snapshots == 2
    assert cache.match(trunk + [1] * 9).tokens == 32  # a's leaf
    assert cache.match(trunk[:16] + [2] * 17).tokens == 32  # b's leaf
    assert cache.match(trunk[:16] + [5] * 9).tokens == 16  # the branching point
    assert cache.match(trunk[:8] + [5] * 9).tokens == 0  # block 8 lost its snapshot
    # A snapshot-less leaf is useless: evicting the last snapshot of a leaf prunes the leaf.
    for _ in range(4):
        radix.alloc_snapshot()
    assert radix.alloc_snapshot() is None  # every buffer taken, nothing evictable
    assert radix.cached_pages == 0  # the last snapshots went with their (then useless) blocks


def test_a_block_cached_twice_keeps_the_first_copy() -> None:
    cache = CacheManager(num_slots=4, num_pages=64, page_size=4, block_tokens=8, num_snapshots=8)
    ids = list(range(50, 67))
    a, b = seq("a", ids), seq("b", ids)
    a.allocation = cache.allocate(21, cache.match(ids))
    b.allocation = cache.allocate(21, cache.match(ids))  # both computing the same prefix
    cache.insert(a.allocation, ids, 16, {8: cache.alloc_snapshot(), 16: cache.alloc_snapshot()})
    snaps = {8: cache.alloc_snapshot(), 16: cache.alloc_snapshot()}
    cache.insert(b.allocation, ids, 16, snaps)
    assert cache.cached_pages == 4 and cache.radix.cached_snapshots == 2  # b's copies went back
    assert len(b.allocation.own) == 6  # b keeps reading its own pages
    cache.release(a.allocation)
    cache.release(b.allocation)
    assert cache.pages_used == 0 and cache.slots_used == 0


def test_a_request_never_fails_because_the_cache_is_full() -> None:
    cache = CacheManager(num_slots=2, num_pages=12, page_size=4, block_tokens=8, num_snapshots=2)
    sched = Scheduler(cache, max_running=2, chunk_tokens=64, align=8)
    for i in range(6):  # each leaves a block cached
        s = cached_seq(cache, [i] * 16 + [99], [8, 16])
        cache.release(s.allocation)
    big = seq("big", list(range(200, 244)))  # 44 + 4 tokens = all 12 pages
    sched.add(big)
    step = sched.schedule()
    assert [c.seq.rid for c in step.prefill] == ["big"] and cache.cached_pages == 0


# ---- the scheduler --------------------------------------------------------------------------------
def test_decodes_run_in_every_step_while_a_long_prompt_prefills() -> None:
    cache = CacheManager(num_slots=8, num_pages=400, page_size=4)
    sched = Scheduler(cache, max_running=8, chunk_tokens=32, align=16)
    short = [seq(f"s{i}", [i] * 5, max_new=50) for i in range(3)]
    for s in short:
        sched.add(s)
    step = sched.schedule()  # the three short prompts fit one budget
    for c in step.prefill:
        c.seq.num_computed = c.end
    long = seq("long", list(range(100)))
    sched.add(long)
    ends = []
    while long.prefilling:
        step = sched.schedule()
        assert [s.rid for s in step.decode] == ["s0", "s1", "s2"]  # nobody waits for the prompt
        (chunk,) = step.prefill
        assert chunk.end % 16 == 0 or chunk.last  # on the Lightning grid unless it ends the prompt
        long.num_computed = chunk.end
        ends.append(chunk.end)
        for s in step.decode:
            s.num_computed += 1
    assert ends == [32, 64, 96, 100]


def test_lpm_admits_the_longest_cached_prefix_first() -> None:
    cache = CacheManager(num_slots=1, num_pages=64, page_size=4, block_tokens=8, num_snapshots=8)
    warm = cached_seq(cache, [7] * 24 + [1], [8, 16, 24])
    cache.release(warm.allocation)
    for policy, first in (("fcfs", "cold"), ("lpm", "warm")):
        sched = Scheduler(cache, max_running=1, chunk_tokens=64, policy=policy, align=8)
        sched.add(seq("cold", [3] * 20))
        sched.add(seq("warm", [7] * 24 + [2, 2]))
        step = sched.schedule()
        assert [c.seq.rid for c in step.prefill] == [first]
        assert step.prefill[0].start == (24 if first == "warm" else 0)
        sched.finish(step.prefill[0].seq, "abort")


def test_a_resumed_prompt_restores_a_snapshot_and_snapshots_its_boundaries() -> None:
    cache = CacheManager(num_slots=2, num_pages=64, page_size=4, block_tokens=8, num_snapshots=8)
    warm = cached_seq(cache, list(range(30)), [8, 16, 24])
    cache.release(warm.allocation)
    sched = Scheduler(cache, max_running=2, chunk_tokens=64, align=8)
    s = seq("s", list(range(20)) + [5] * 30)
    sched.add(s)
    (chunk,) = sched.schedule().prefill
    node = s.allocation.restore
    assert (chunk.start, chunk.end) == (16, 50) and chunk.restore == node.snapshot and node.pins == 1
    assert [b for b, _ in chunk.snapshots] == [24, 32, 40, 48]
    sched.step_done(Step(prefill=(chunk,)))
    assert node.pins == 0 and s.allocation.restore is None
    assert cache.match(list(range(20)) + [5] * 30).tokens == 48  # its blocks are cached now
    sched.finish(s, "abort")  # the abort path: release() frees slot, own pages, holds
    assert cache.slots_used == 0 and cache.pages_used == 0


# ---- the engine on the built-in model -------------------------------------------------------------
def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def words(seed: int, n: int, lo: int = 3, hi: int = 250) -> list[int]:
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def oracle(builtin_dir: Path) -> LingForCausalLM:
    return LingForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)


def conversation(engine, system: list[int], turns: int, n: int = 12) -> tuple[list[list[int]], list]:
    """Turns of one conversation: each prompt is the previous prompt + its reply + a new message."""
    prompts, events, prompt = [], [], system
    for t in range(turns):
        prompt = prompt + words(100 + t, 21 + 7 * t)
        (ev,) = generate_all(engine, [prompt], [greedy(n)])
        prompts.append(prompt)
        events.append(ev)
        prompt = prompt + output_ids(ev)
    return prompts, events


@pytest.mark.parametrize("steps", [0, 2])
def test_multi_turn_and_branches_equal_cache_off_and_greedy_decode(
    builtin_dir, tokenizer, oracle, steps: int
) -> None:
    system = words(1, 150)
    outputs, cached = {}, {}
    for on in (True, False):
        engine = make_engine(builtin_dir, tokenizer, disable_radix_cache=not on, **mtp(steps))
        try:
            prompts, events = conversation(engine, system, 3)
            # Branches: the second turn's prompt with two other endings (one diverging inside a
            # snapshot interval), all at once, next to an unrelated prompt.
            branch = prompts[1][:170] + words(7, 30)
            batch = [prompts[1][:-5] + words(8, 9), branch, words(9, 80)]
            events += generate_all(engine, batch, [greedy(12)] * 3)
            prompts += batch
        finally:
            engine.stop()
        outputs[on] = [output_ids(e) for e in events]
        cached[on] = [e[-1].cached_tokens for e in events]
        assert engine.scheduler.cache.slots_used == 0 and engine.scheduler.cache.pages_used == 0
    assert outputs[True] == outputs[False] == [greedy_generate(oracle, p, 12) for p in prompts]
    assert cached[False] == [0] * 6
    # Turn 2 and 3 resume from the previous turn's cache; the branches from what they share.
    assert cached[True][0] == 0 and all(c >= 128 for c in cached[True][1:3])
    assert cached[True][3] >= len(prompts[3]) - 64 - 14 and cached[True][4] == 128 and cached[True][5] == 0


def test_a_200_token_shared_prefix_hits(builtin_dir, tokenizer, oracle) -> None:
    shared = words(2, 200)
    prompts = [shared + words(s, 40) for s in (3, 4, 5)]
    engine = make_engine(builtin_dir, tokenizer)
    try:
        first = generate_all(engine, prompts[:1], [greedy(8)])
        rest = generate_all(engine, prompts[1:], [greedy(8)] * 2)
    finally:
        engine.stop()
    assert [e[-1].cached_tokens for e in first + rest] == [0, 192, 192]
    assert [output_ids(e) for e in first + rest] == [greedy_generate(oracle, p, 8) for p in prompts]


def test_eviction_pressure_changes_nothing_but_the_hits(builtin_dir, tokenizer, oracle) -> None:
    # 40 pages of 16 tokens and 3 snapshots: every new conversation evicts the older ones.
    engine = make_engine(
        builtin_dir, tokenizer, max_total_tokens=640, max_mamba_snapshots=3, max_running_requests=2
    )
    prompts = [words(20 + i, 150) + words(30 + j, 30) for i in range(3) for j in range(2)]
    try:
        events = generate_all(engine, prompts, [greedy(10)] * len(prompts))
        radix = engine.scheduler.cache.radix
        assert radix.evicted_snapshots > 0 and radix.cached_snapshots <= 3
    finally:
        engine.stop()
    assert [output_ids(e) for e in events] == [greedy_generate(oracle, p, 10) for p in prompts]


def test_mtp_drafts_resume_from_the_cache(tmp_path_factory) -> None:
    # A 6-token vocabulary: drafts are accepted often, so the verify-time snapshots
    # (commit_snapshots) and the MTP layer's cached latent KV are exercised.
    from ling_runtime.builtin import builtin_model_dir
    from ling_runtime.text.tokenizer import TokenizerBundle

    path = write_checkpoint(tmp_path_factory.mktemp("vocab6pc"), tiny_config(vocab_size=6), seed=3)
    tok = TokenizerBundle.from_dir(builtin_model_dir())
    model = LingForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = words(11, 130, 0, 6)
    outs, cached, accepted = {}, {}, 0
    for on in (True, False):
        engine = make_engine(path, tok, disable_radix_cache=not on, **mtp(3), max_mamba_cache_size=4)
        try:
            (first,) = generate_all(engine, [base], [greedy(80)])
            follow = [base + output_ids(first) + [1, 2, 3], base[:100] + [0] * 20]
            events = [first, *generate_all(engine, follow, [greedy(30)] * 2)]
        finally:
            engine.stop()
        outs[on] = [output_ids(e) for e in events]
        cached[on] = [e[-1].cached_tokens for e in events]
        accepted += sum(e[-1].spec_accepted for e in events)
    prompts = [base, *follow]
    assert (
        outs[True]
        == outs[False]
        == [greedy_generate(model, p, n) for p, n in zip(prompts, (80, 30, 30), strict=True)]
    )
    assert cached[True] == [0, 192, 64] and accepted > 0


def test_graphed_mtp_verify_snapshots_come_from_its_batch_rows(tmp_path_factory, tokenizer) -> None:
    # The decode graphs' bodies run eagerly on the CPU (what a capture records): a graphed verify
    # keeps its per-position states by batch row, so a boundary crossed there is copied from the row.
    from ling_runtime.distributed.executor import LocalExecutor
    from ling_runtime.engine.engine import Engine
    from ling_runtime.runner.model_runner import ModelRunner
    from ling_runtime.settings import Settings

    path = write_checkpoint(tmp_path_factory.mktemp("vocab6rows"), tiny_config(vocab_size=6), seed=3)
    k, slots, pages, page = 2, 4, 64, 16
    model = LingForCausalLM.from_pretrained(path, dtype=torch.float32, enable_mtp=True)
    cache = model.make_cache(
        num_slots=slots, num_pages=pages + 1, page_size=page, max_spec_tokens=k + 1, num_snapshots=8
    )
    runner = ModelRunner(model, cache, torch.device("cpu"))
    runner.enable_cuda_graphs(max_batch=slots, max_pages=16, scratch_page=pages, num_drafts=k, eager=True)
    settings = Settings(
        max_running_requests=slots,
        max_mamba_cache_size=slots,
        max_total_tokens=pages * page,
        page_size=page,
        context_length=4096,
        max_mamba_snapshots=8,
        **mtp(k),
    )
    engine = Engine(LocalExecutor(runner), tokenizer, settings)
    engine.start()
    base = words(12, 40, 0, 6)
    rows = []
    save = cache.save_verify_snapshots

    def spy(r, counts, snaps):  # which batch rows the verify snapshots are read from
        rows.extend(r)
        save(r, counts, snaps)

    cache.save_verify_snapshots = spy  # type: ignore[method-assign]
    try:
        # a finishes early, so c takes slot 0 while decoding in batch row 1 (behind b).
        a, b = submit(engine, [3, 4, 5], 2), submit(engine, words(13, 30, 0, 6), 70)
        assert a.wait()
        c = submit(engine, base, 60)
        assert c.wait() and b.wait()
        follow = base + output_ids(c.events) + [1, 2]
        (d,) = generate_all(engine, [follow], [greedy(20)])
    finally:
        engine.stop()
    assert runner.spec_graph_steps > 0 and 1 in rows
    assert d[-1].cached_tokens == 64  # c crossed 64 inside a graphed verify
    assert output_ids(c.events) == greedy_generate(model, base, 60)
    assert output_ids(d) == greedy_generate(model, follow, 20)


class submit:
    """One request submitted now; `wait()` blocks until it finished."""

    def __init__(self, engine, prompt: list[int], n: int) -> None:
        import threading

        self.events: list = []
        self.done = threading.Event()

        def emit(event) -> None:
            self.events.append(event)
            if event.finished:
                self.done.set()

        engine.submit(engine.prepare(prompt, greedy(n)), emit)

    def wait(self) -> bool:
        return self.done.wait(120)
