"""Continuous batching and cache accounting as plain objects."""

from __future__ import annotations

import pytest
from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.engine.scheduler import Scheduler
from ling_runtime.engine.sequence import Sequence, Status


def seq(rid: str, prompt_len: int, max_new: int = 4) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_new_tokens=max_new))


def test_running_set_is_bounded_and_the_rest_waits() -> None:
    sched = Scheduler(CacheManager(num_slots=8, num_pages=100, page_size=4), max_running=2, chunk_tokens=64)
    for i in range(5):
        sched.add(seq(f"r{i}", 3))
    step = sched.schedule()
    assert [c.seq.rid for c in step.prefill] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    sched.finish(sched.running[0], "stop")
    sched.schedule()
    assert [s.rid for s in sched.running] == ["r1", "r2"]


def test_linear_state_slots_bound_admission_and_are_reused() -> None:
    cache = CacheManager(num_slots=1, num_pages=100, page_size=4)
    sched = Scheduler(cache, max_running=8, chunk_tokens=64)
    a, b = seq("a", 3), seq("b", 3)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    slot = a.allocation.slot
    sched.finish(a, "stop")
    assert cache.slots_used == 0 and a.allocation is None
    sched.schedule()
    assert b.status is Status.RUNNING and b.allocation.slot == slot


def test_pages_are_reserved_for_the_whole_budget_and_a_full_cache_waits() -> None:
    cache = CacheManager(num_slots=4, num_pages=5, page_size=4)
    sched = Scheduler(cache, max_running=4, chunk_tokens=64, lookahead_tokens=4)
    big, small = seq("big", 9, max_new=3), seq("small", 1, max_new=3)  # 16 and 8 tokens: 4 + 2 pages
    sched.add(big)
    sched.add(small)
    sched.schedule()
    assert len(big.allocation.pages) == 4 and small.status is Status.WAITING
    assert cache.page_usage == pytest.approx(0.8)
    sched.finish(big, "length")
    sched.schedule()
    assert small.status is Status.RUNNING


def test_a_request_larger_than_the_cache_is_refused() -> None:
    sched = Scheduler(CacheManager(num_slots=4, num_pages=2, page_size=4), max_running=4, chunk_tokens=64)
    with pytest.raises(ValueError, match="needs 20 cache tokens; the cache holds 8"):
        sched.add(seq("huge", 16))


def test_chunked_prefill_splits_prompts_under_a_token_budget_then_decodes() -> None:
    sched = Scheduler(CacheManager(num_slots=4, num_pages=100, page_size=4), max_running=4, chunk_tokens=10)
    a, b = seq("a", 14), seq("b", 5)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert [(c.seq.rid, c.start, c.end, c.last) for c in step.prefill] == [("a", 0, 10, False)]
    a.num_computed = 10
    step = sched.schedule()
    assert [(c.seq.rid, c.start, c.end, c.last) for c in step.prefill] == [
        ("a", 10, 14, True),
        ("b", 0, 5, True),
    ]
    a.num_computed, b.num_computed = 14, 5
    step = sched.schedule()
    assert [(c.seq.rid, c.start, c.end) for c in step.prefill] == [] and [s.rid for s in step.decode] == [
        "a",
        "b",
    ]


def test_cache_manager_rejects_double_free() -> None:
    cache = CacheManager(num_slots=2, num_pages=4, page_size=4)
    alloc = cache.allocate(5)
    cache.free(alloc)
    with pytest.raises(RuntimeError, match="double free"):
        cache.free(alloc)
