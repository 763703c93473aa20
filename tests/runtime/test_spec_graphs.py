"""CUDA-graph bodies run eagerly on the CPU (``eager=True``: the same static buffers and device-only
code that a capture records) against the runner's eager path: the decode body that samples, the MTP
draft body and the verify body that accepts and commits the linear state on the device.

The engine-level tests drive whole generations through them (bucket padding included: 3 running
sequences in a bucket of 4); the replay itself on the H200 is bench/gpu/mtp_graphs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ling_runtime.distributed.executor import LocalExecutor
from ling_runtime.engine.engine import Engine, device_sampling
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.runner.plan import RowSampling, SeqWork, StepPlan
from ling_runtime.runner.spec_graphs import SpecGraphs
from ling_runtime.settings import Settings
from ling_runtime.tiny import tiny_config, write_checkpoint

from .engine_utils import generate_all, mtp, output_ids

PAGE = 16
PROMPTS = [[1, 2, 3, 4, 5, 0, 1], [3, 3], [0, 1, 2, 3, 4, 5] * 6, [2]]


@pytest.fixture(scope="module")
def vocab6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-token vocabulary: drafts match often, so acceptance and the device commit are exercised."""
    return write_checkpoint(tmp_path_factory.mktemp("vocab6g"), tiny_config(vocab_size=6), seed=3)


def graph_engine(model_dir: Path, tokenizer, k: int, graphs: bool) -> tuple[Engine, ModelRunner]:
    """An engine whose runner has the graph bodies enabled in eager mode (or not at all)."""
    model = LingForCausalLM.from_pretrained(model_dir, dtype=torch.float32, enable_mtp=k > 0)
    num_pages, slots = 64, 4
    cache = model.make_cache(
        num_slots=slots, num_pages=num_pages + 1, page_size=PAGE, max_spec_tokens=k + 1 if k else 0
    )
    runner = ModelRunner(model, cache, torch.device("cpu"))
    if graphs:
        runner.enable_cuda_graphs(
            max_batch=slots, max_pages=8, scratch_page=num_pages, num_drafts=k, eager=True
        )
    settings = Settings(
        max_running_requests=slots,
        max_mamba_cache_size=slots,
        max_total_tokens=num_pages * PAGE,
        page_size=PAGE,
        chunked_prefill_size=16,
        context_length=4096,
        **mtp(k),
    )
    engine = Engine(LocalExecutor(runner), tokenizer, settings)
    engine.start()
    return engine, runner


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_graph_bodies_keep_greedy_output_lossless(vocab6_dir: Path, tokenizer, k: int) -> None:
    """Greedy output with the graph bodies == greedy_generate, and every step's emitted tokens and
    acceptance == the eager MTP path's (so the drafts and the accepted counts were the same)."""
    oracle = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32)
    expected = [greedy_generate(oracle, p, 20) for p in PROMPTS]
    runs = {}
    for graphs in (False, True):
        engine, runner = graph_engine(vocab6_dir, tokenizer, k, graphs=graphs)
        try:
            events = generate_all(engine, PROMPTS, [greedy(20)] * len(PROMPTS))
        finally:
            engine.stop()
        assert [output_ids(e) for e in events] == expected
        runs[graphs] = ([[(e.token_ids, e.spec_accepted) for e in ev] for ev in events], runner)
    assert runs[True][0] == runs[False][0]
    runner = runs[True][1]
    if k == 0:
        assert runner.graph_steps > 10 and runner.spec_graph_steps == 0
    else:
        # Most decode steps went through the draft + verify bodies, and drafts were accepted.
        assert runner.spec_graph_steps > 10
        assert sum(ev[-1][1] for ev in runs[True][0]) > 0


def test_temperature_requests_are_sampled_and_accepted_on_the_device(vocab6_dir: Path, tokenizer) -> None:
    """Temperature sampling takes the graph path (drafts accepted against device-sampled target
    tokens); a top-p request in the same step sends the step to the eager path (the MTP graphs
    sample plain temperature only)."""
    engine, runner = graph_engine(vocab6_dir, tokenizer, 2, graphs=True)
    plain = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    try:
        events = generate_all(engine, PROMPTS, [plain] * len(PROMPTS))
        graphed = runner.spec_graph_steps
        assert graphed > 5 and all(len(output_ids(e)) == 16 for e in events)
        # The top-p request is admitted first and outlives the plain one (40 tokens take at least
        # 14 steps at 3 per step, 8 at most 8), so every later MTP step includes it.
        filtered = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, ignore_eos=True)
        short = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)
        events = generate_all(engine, PROMPTS[:2], [filtered, short])
        assert [len(output_ids(e)) for e in events] == [40, 8]
    finally:
        engine.stop()
    assert runner.spec_graph_steps == graphed


def test_verify_body_equals_the_eager_verify_and_commit(vocab6_dir: Path) -> None:
    """One verify of 3 sequences (bucket 4: a padding row) with fixed drafts: the body's logits,
    accepted counts and committed linear state == the eager verify + host acceptance + commit."""
    k = 2
    model = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32, enable_mtp=True)
    prompts = [[1, 2, 3, 4, 5], [3, 3, 1], [0, 1, 2, 3, 4, 5, 0]]
    caches, hidden = [], []
    for _ in range(2):
        cache = model.make_cache(num_slots=4, num_pages=17, page_size=PAGE, max_spec_tokens=k + 1)
        runner = ModelRunner(model, cache, torch.device("cpu"))
        runner.execute(
            StepPlan(
                tuple(
                    SeqWork(slot=b, pages=(b,), start=0, tokens=tuple(p), reset=True)
                    for b, p in enumerate(prompts)
                )
            )
        )
        caches.append(cache)
        hidden.append(runner)
    pending = [2, 4, 0]
    # Row 0: both drafts right (the target's own greedy continuation), row 1: the first right,
    # row 2: the first wrong.
    oracle = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32)
    right = [greedy_generate(oracle, [*p, t], k) for p, t in zip(prompts, pending, strict=True)]
    drafts = [right[0], [right[1][0], (right[1][1] + 1) % 6], [(right[2][0] + 1) % 6, right[2][1]]]
    starts = [len(p) for p in prompts]

    # Eager: the runner's verify pass (slot-indexed per-position states), then host acceptance.
    eager_cache = caches[0]
    works = tuple(
        SeqWork(slot=b, pages=(b,), start=starts[b], tokens=(pending[b],), logits=k + 1) for b in range(3)
    )
    res = hidden[0]._target(works, drafts)
    eager_tokens = [r.logits.argmax(-1).tolist() for r in res.seqs]
    eager_acc = []
    for b in range(3):
        n = 0
        while n < k and eager_tokens[b][n] == drafts[b][n]:
            n += 1
        eager_acc.append(n)
    eager_cache.commit_linear_state([0, 1, 2], [n + 1 for n in eager_acc])

    spec = SpecGraphs(model, caches[1], torch.device("cpu"), 4, 1, 16, k, eager=True)
    spec.capture()
    spec.set_sequences(4, [0, 1, 2], [[0], [1], [2]])
    spec.set_drafts(4, drafts)
    out = spec.verify(4, pending, starts)
    assert out.drafts == drafts
    assert out.tokens == eager_tokens
    assert out.num_accepted == eager_acc
    assert eager_acc == [2, 1, 0]
    logits = spec.logits[4][: 3 * (k + 1)]
    torch.testing.assert_close(logits, torch.cat([r.logits for r in res.seqs]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].linear_state[:, :3], eager_cache.linear_state[:, :3])
    # The padding row touched no slot: slot 3 is still zero in both caches.
    assert float(caches[1].linear_state[:, 3].abs().max()) == 0.0


def test_draft_body_equals_the_eager_draft_chain(vocab6_dir: Path) -> None:
    """Draft extend over 1..T known positions (padded to T) + k-1 chained steps, against the eager
    `_draft` of the runner on the same target hidden."""
    k = 3
    model = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32, enable_mtp=True)
    prompts = [[1, 2, 3, 4, 5, 0, 1, 2], [3, 3, 1, 4], [0, 1, 2, 3, 4, 5, 0]]
    known = [3, 1, 4]  # newly known positions per sequence (1..k+1)
    runners = []
    for _ in range(2):
        cache = model.make_cache(num_slots=4, num_pages=17, page_size=PAGE, max_spec_tokens=k + 1)
        runner = ModelRunner(model, cache, torch.device("cpu"))
        # Prefill all but the last `known` tokens' MTP rows: target pass over the prompt, MTP
        # extend over the older positions, so the chain starts mid-sequence as in decode.
        runner.execute(
            StepPlan(
                tuple(
                    SeqWork(slot=b, pages=(b,), start=0, tokens=tuple(p), reset=True)
                    for b, p in enumerate(prompts)
                )
            )
        )
        runners.append(runner)
    works = []
    for b, p in enumerate(prompts):
        n = known[b]
        mtp_start = len(p) - 1 - n
        works.append(
            SeqWork(
                slot=b, pages=(b,), start=len(p) - 1, tokens=(p[-1],), num_drafts=k, mtp_start=mtp_start,
                mtp_next_tokens=tuple(p[mtp_start + 1 : mtp_start + 1 + n]),
            )
        )  # fmt: skip
    eager = runners[0]._draft(tuple(works))

    r = runners[1]
    spec = SpecGraphs(r.model, r.cache, torch.device("cpu"), 4, 1, 16, k, eager=True)
    spec.capture()
    for w in works:
        spec.load_hidden(w.slot, r._stored_rows(w.slot, w.mtp_start, len(w.mtp_next_tokens)))
    spec.set_sequences(4, [w.slot for w in works], [[w.slot] for w in works])
    spec.draft(4, [list(w.mtp_next_tokens) for w in works], [w.mtp_start for w in works])
    assert spec.drafts[:, :3].T.tolist() == eager
    # The MTP layer's latent cache got the same rows at every real position it wrote.
    mi = r.cache.mtp_mla_index
    for b, w in enumerate(works):
        upto = w.start + k - 1  # positions the chain wrote: mtp_start .. start + k - 2
        torch.testing.assert_close(
            r.cache.mla_kv[mi, b, w.mtp_start : upto], runners[0].cache.mla_kv[mi, b, w.mtp_start : upto]
        )


def test_decode_body_samples_greedy_and_temperature_rows() -> None:
    """The decode body's in-graph sampling: greedy rows are the argmax of the same logits, a row
    with temperature draws from the softmax (a near-uniform tiny row gives several distinct ids;
    the draw's noise is hashed from the seed and the position, so the position varies)."""
    from ling_runtime.config import LingConfig
    from ling_runtime.runner.cuda_graphs import DecodeGraphs
    from ling_runtime.tiny import init_random_weights

    model = LingForCausalLM(LingConfig.from_hf(tiny_config(vocab_size=6)), dtype=torch.float32)
    init_random_weights(model, seed=1)
    cache = model.make_cache(num_slots=2, num_pages=3, page_size=PAGE)
    graphs = DecodeGraphs(model, cache, torch.device("cpu"), 2, 1, 2, eager=True)
    graphs.capture()
    seen = set()
    for i in range(30):
        _, logits, tokens = graphs.replay([1, 2], [3 + i % 5, 4 + i % 12], [0, 1], [[0], [1]], 2, [0.0, 50.0])
        assert int(tokens[0]) == int(logits[0].argmax())
        seen.add(int(tokens[1]))
    assert len(seen) >= 3


def test_device_sampling_for_all_but_adjusted_logits() -> None:
    def rows(**kw) -> RowSampling | None:
        return device_sampling(SamplingParams(max_new_tokens=1, **kw), seed=77)

    assert rows(temperature=0.0) == RowSampling(0.0)
    assert rows(temperature=0.7) == RowSampling(0.7, seed=77)
    assert rows(temperature=0.7, top_k=1) == RowSampling(0.0)  # greedy
    assert rows(temperature=0.7, seed=3) == RowSampling(0.7, seed=3)
    assert rows(temperature=0.7, top_p=0.9).filtered and rows(temperature=0.7, top_k=5).filtered
    assert rows(temperature=0.0, logprobs=True, top_logprobs=2) == RowSampling(0.0, logprobs=2)
    # Logits adjusted per request are sampled on the host.
    assert rows(temperature=0.7, presence_penalty=0.5) is None and rows(min_p=0.1) is None


def test_spec_graphs_refuse_a_cache_without_room_for_the_drafts(vocab6_dir: Path) -> None:
    model = LingForCausalLM.from_pretrained(vocab6_dir, dtype=torch.float32, enable_mtp=True)
    cache = model.make_cache(num_slots=2, num_pages=3, page_size=PAGE, max_spec_tokens=2)
    with pytest.raises(ValueError, match="max_spec_tokens"):
        SpecGraphs(model, cache, torch.device("cpu"), 2, 1, 2, 2, eager=True)
    with pytest.raises(ValueError, match="cuda device"):
        SpecGraphs(model, cache, torch.device("cpu"), 2, 1, 2, 1)
