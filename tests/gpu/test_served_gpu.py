"""GPU tier: what the server hands out over HTTP (CUDA graphs, overlap scheduling, sampling in the
graphs) against the eager model, on one CUDA device.

1. The built-in tiny model in float32: served greedy output over `/generate` (4 requests at once, so
   they batch and pad a graph bucket) == the model's own `greedy_generate` on the same GPU, with the
   overlap scheduler on and off, with and without MTP; the decode graphs served the steps.
2. Sampling in the graphs: seeded top-p, top-k and logprob requests give the same tokens (and
   logprobs, closely) with the graphs as with `--disable-cuda-graph`: the noise is hashed from
   (seed, position), so the path does not matter.
3. Ling-2.6-flash's shapes (`--load-format dummy`, 2 layers + MTP layer cut to 64 experts, vocab
   157184, float32) through the real Triton kernels, with prompts that need two block-table widths:
   every served token is the plain-torch eager model's argmax at its position, up to a near-tie of
   `TIE` logits (TF32 dots in the kernels), teacher-forced over the served sequence.
4. The in-kernel hashed sampling noise at the real vocabulary == its torch reference, bit for bit.

    python3 -m pytest -m gpu tests/gpu -q        # on the GPU machine (skipped without CUDA)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.runtime.conftest import RunningServer

pytestmark = pytest.mark.gpu

PROMPTS = [list(range(10, 60)), [5, 6, 7], list(range(100, 400, 3)), [42] * 17]


def generate(url: str, prompts: list[list[int]], sampling: dict, **extra) -> list[dict]:
    """All prompts at once (they share steps), each through `/generate`."""

    def one(ids: list[int]) -> dict:
        body = {"input_ids": ids, "sampling_params": sampling, **extra}
        response = httpx.post(f"{url}/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def runner_of(server: RunningServer):
    return server.engine.executor.runner  # TP 1: the runner is in this process


@pytest.fixture(scope="module")
def builtin_dir() -> Path:
    from ling_runtime.builtin import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="module")
def expected(builtin_dir: Path) -> list[list[int]]:
    from ling_runtime.model import LingForCausalLM, greedy_generate

    oracle = LingForCausalLM.from_pretrained(builtin_dir, device="cuda", dtype=torch.float32)
    out = [greedy_generate(oracle, p, 32) for p in PROMPTS]
    del oracle
    torch.cuda.empty_cache()
    return out


BASE = ["--device", "cuda", "--dtype", "float32", "--max-running-requests", "8"]


# (MTP steps resolve before the next is scheduled, so overlap on/off is one case there.)
@pytest.mark.parametrize(("overlap", "mtp"), [(True, 0), (False, 0), (True, 3)])
def test_served_greedy_equals_the_eager_model(expected: list[list[int]], overlap: bool, mtp: int) -> None:
    flags = [*BASE] + ([] if overlap else ["--disable-overlap-schedule"])
    if mtp:
        flags += ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(mtp)]
    greedy = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    with RunningServer(flags) as server:
        outs = generate(server.url, PROMPTS, greedy)
        runner = runner_of(server)
    assert [o["output_ids"] for o in outs] == expected
    if mtp:
        assert runner.spec_graph_steps > 0
    else:
        assert runner.graph_steps > 10


def test_sampling_in_the_graphs_equals_the_eager_path() -> None:
    requests = [
        ({"max_new_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 1, "ignore_eos": True}, {}),
        ({"max_new_tokens": 24, "temperature": 1.0, "top_k": 8, "seed": 2, "ignore_eos": True}, {}),
        ({"max_new_tokens": 24, "temperature": 0.7, "seed": 3, "ignore_eos": True}, {"return_logprob": True}),
    ]
    outs = {}
    for graphs in (True, False):
        flags = [*BASE] + ([] if graphs else ["--disable-cuda-graph"])
        with RunningServer(flags) as server:
            # Together, so the three share decode steps (and graph replays).
            with ThreadPoolExecutor(3) as pool:
                jobs = [
                    pool.submit(generate, server.url, [PROMPTS[i]], sp, **ex)
                    for i, (sp, ex) in enumerate(requests)
                ]
                outs[graphs] = [job.result()[0] for job in jobs]
            if graphs:
                assert runner_of(server).graph_steps > 20
    assert [o["output_ids"] for o in outs[True]] == [o["output_ids"] for o in outs[False]]
    lp = {g: [t[0] for t in o[2]["meta_info"].get("output_token_logprobs", [])] for g, o in outs.items()}
    assert len(lp[True]) == 24 and lp[True] == pytest.approx(lp[False], abs=1e-3)


TIE = 0.05  # logits: how far below the eager model's best a served token may be (numerics, not bugs)
FLASH_2_LAYERS = {
    "num_hidden_layers": 2,
    "layer_group_size": 2,  # layer 0 Lightning (dense MLP), layer 1 MLA + MoE
    "num_experts": 64,
}


def test_flash_shapes_served_through_the_kernels_follow_the_eager_model(tmp_path: Path) -> None:
    from ling_runtime.builtin.dummy import dummy_model_dir
    from ling_runtime.config import LingConfig
    from ling_runtime.loader import fill_dummy
    from ling_runtime.model import ForwardBatch, LingForCausalLM

    model_dir = dummy_model_dir()
    flags = [
        *BASE, "--model-path", str(model_dir), "--load-format", "dummy", "--context-length", "8192",
        "--json-model-override-args", json.dumps(FLASH_2_LAYERS), "--cuda-graph-max-bs", "8",
    ]  # fmt: skip
    # Prompts of 300 and 5000 tokens: block tables of the 4K and the 8K width buckets (ids within
    # the built-in tokenizer's vocabulary, which the server checks prompts against).
    prompts = [
        [(7 * i + 3) % 1000 + 5 for i in range(300)],
        [(11 * i + 1) % 1000 + 5 for i in range(5000)],
    ]
    greedy = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    with RunningServer(flags) as server:
        outs = [o["output_ids"] for o in generate(server.url, prompts, greedy)]
        runner = runner_of(server)
        assert runner.graph_steps > 5 and len(runner.graphs.widths) >= 2
    torch.cuda.empty_cache()
    config = LingConfig.from_hf(model_dir, FLASH_2_LAYERS)
    model = LingForCausalLM(config, device="cuda", dtype=torch.float32, use_kernels=False)
    fill_dummy(model, 0, 0)  # the server's weights: --seed 0, rank 0
    model.eval()
    for prompt, served in zip(prompts, outs, strict=True):
        ids = prompt + served
        pages = -(-len(ids) // 16)
        cache = model.make_cache(num_slots=1, num_pages=pages, page_size=16)
        with torch.inference_mode():
            batch = ForwardBatch.build([ids], [0], [0], [list(range(pages))], device="cuda")
            hidden = model(batch, cache)
            logits = model.compute_logits(hidden[len(prompt) - 1 : len(ids) - 1]).float()
        chosen = logits.gather(1, torch.tensor(served, device="cuda")[:, None])[:, 0]
        gaps = logits.max(dim=-1).values - chosen
        # The kernels' float32 dots run in TF32: near-ties may go either way, a wrong token (another
        # slot's, a stale page) is several logits below the best.
        assert gaps.max().item() <= TIE, f"a served token is {gaps.max().item():.3f} below the eager best"
        assert (gaps == 0).float().mean().item() >= 0.75


def test_hashed_sampling_at_the_real_vocabulary() -> None:
    from ling_runtime.kernels import sampling

    gen = torch.Generator(device="cuda").manual_seed(7)
    vocab, b = 157184, 32
    logits = torch.randn(b, vocab, generator=gen, device="cuda") * 3
    temp = torch.rand(b, generator=gen, device="cuda") + 0.3
    temp[0] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (b,), generator=gen, device="cuda")
    pos = torch.randint(0, 2**20, (b,), generator=gen, device="cuda")
    got = sampling.sample(logits, temp, seeds=seeds, positions=pos)
    assert torch.equal(got, sampling.sample_ref(logits, temp, None, seeds, pos))
    assert got[0] == logits[0].argmax()
