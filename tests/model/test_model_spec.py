"""Speculative decoding support: verify with per-position linear states + rollback, and the MTP layer."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.model import ForwardBatch

from .conftest import load

PROMPT = [11, 200, 3, 45, 67, 89, 101, 7, 300, 12]


def _full(model, ids: list[int]) -> torch.Tensor:
    cache = model.make_cache(num_slots=1, num_pages=4, page_size=8)
    return model.compute_logits(model(ForwardBatch.build([ids], [0], [0], [[0, 1, 2, 3]]), cache))


@pytest.mark.parametrize("accepted", [1, 2, 4])
def test_verify_then_commit_rolls_linear_state_to_the_accepted_prefix(checkpoint, accepted: int) -> None:
    model = load(checkpoint("base"), chunk_size=4)
    cache = model.make_cache(num_slots=4, num_pages=8, page_size=8, max_spec_tokens=4)
    table = [[3, 1, 6, 0]]
    model(ForwardBatch.build([PROMPT], [0], [2], table), cache)
    draft = [5, 6, 7, 8]
    # A prefill chunk longer than max_spec_tokens may share the verify batch (it keeps no states).
    other = PROMPT[::-1]
    verify = ForwardBatch.build(
        [draft, other], [len(PROMPT), 0], [2, 0], [*table, [4, 5]], keep_linear_states=True
    )
    logits = model.compute_logits(model(verify, cache))
    torch.testing.assert_close(logits[:4], _full(model, PROMPT + draft)[len(PROMPT) :], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[4:], _full(model, other), atol=1e-4, rtol=1e-4)
    cache.commit_linear_state([2], [accepted])
    pos = len(PROMPT) + accepted
    step = model.compute_logits(model(ForwardBatch.build([[9]], [pos], [2], table), cache))
    want = _full(model, [*PROMPT, *draft[:accepted], 9])[-1:]
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)


def test_commit_and_verify_reject_bad_use(checkpoint) -> None:
    model = load(checkpoint("base"))
    plain = model.make_cache(num_slots=2, num_pages=2)
    with pytest.raises(ValueError, match="max_spec_tokens"):
        plain.commit_linear_state([0], [1])
    with pytest.raises(ValueError, match="max_spec_tokens"):
        model(ForwardBatch.build([[1, 2]], [0], [0], [[0]], keep_linear_states=True), plain)
    spec = model.make_cache(num_slots=2, num_pages=2, max_spec_tokens=3)
    with pytest.raises(ValueError, match="accepted_len"):
        spec.commit_linear_state([0, 1], [1, 4])


def test_reset_slots_zeroes_only_those_slots(checkpoint) -> None:
    model = load(checkpoint("base"))
    cache = model.make_cache(num_slots=3, num_pages=3)
    model(ForwardBatch.build([[1, 2, 3], [4, 5]], [0, 0], [0, 2], [[0], [1]]), cache)
    assert cache.linear_state[:, 0].abs().sum() > 0 and cache.linear_state[:, 2].abs().sum() > 0
    cache.reset_slots([2])
    assert cache.linear_state[:, 2].abs().sum() == 0 and cache.linear_state[:, 0].abs().sum() > 0


def test_mtp_draft_steps_over_the_cache_equal_one_full_pass(checkpoint) -> None:
    model = load(checkpoint("base"), enable_mtp=True)
    ids = [*PROMPT, 33, 34]
    cache = model.make_cache(num_slots=1, num_pages=4, page_size=8)
    table = [[0, 1, 2, 3]]
    hidden = model(ForwardBatch.build([ids], [0], [0], table), cache)
    shifted = [*ids[1:], 99]
    full = model.mtp_forward(ForwardBatch.build([shifted], [0], [0], table), cache, hidden)
    cache2 = model.make_cache(num_slots=1, num_pages=4, page_size=8)
    model(ForwardBatch.build([ids], [0], [0], table), cache2)
    parts = [model.mtp_forward(ForwardBatch.build([shifted[:8]], [0], [0], table), cache2, hidden[:8])]
    for i in range(8, len(ids)):
        parts.append(
            model.mtp_forward(ForwardBatch.build([[shifted[i]]], [i], [0], table), cache2, hidden[i : i + 1])
        )
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-4, rtol=1e-4)
    logits = model.compute_logits(full)
    assert logits.shape == (len(ids), 512) and torch.isfinite(logits).all()
    # The MTP layer's own weights matter: perturbing eh_proj changes the draft.
    model.mtp.eh_proj.weight.mul_(0.5)
    cache3 = model.make_cache(num_slots=1, num_pages=4, page_size=8)
    model(ForwardBatch.build([ids], [0], [0], table), cache3)
    changed = model.mtp_forward(ForwardBatch.build([shifted], [0], [0], table), cache3, hidden)
    assert not torch.allclose(changed, full, atol=1e-3)


def test_mtp_layer_matches_the_formula_on_raw_checkpoint_tensors(checkpoint) -> None:
    """One token at position 0 (attention over itself = its value), written from model.md §5."""
    from ling_runtime.model.moe import moe_route_reference
    from safetensors.torch import load_file

    path = checkpoint("base")
    w: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        w.update(load_file(f))
    p = "model.layers.4"

    def rms(x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w[name]

    def swiglu(x: torch.Tensor, pre: str) -> torch.Tensor:
        gate, up = x @ w[f"{pre}.gate_proj.weight"].T, x @ w[f"{pre}.up_proj.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ w[f"{pre}.down_proj.weight"].T

    model = load(path, enable_mtp=True)
    cache = model.make_cache(num_slots=1, num_pages=1)
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    got = model.mtp_forward(ForwardBatch.build([[42]], [0], [0], [[0]]), cache, h)

    e = w["model.word_embeddings.weight"][42:43]
    z = torch.cat([rms(e, f"{p}.enorm.weight"), rms(h, f"{p}.hnorm.weight")], -1) @ w[f"{p}.eh_proj.weight"].T
    x = rms(z, f"{p}.input_layernorm.weight")
    c_kv = rms(
        (x @ w[f"{p}.attention.kv_a_proj_with_mqa.weight"].T)[:, :32], f"{p}.attention.kv_a_layernorm.weight"
    )
    kv_b = w[f"{p}.attention.kv_b_proj.weight"].view(4, 32, 32)  # [heads, nope 16 + v 16, kv_lora]
    values = torch.einsum("hvr,tr->thv", kv_b[:, 16:], c_kv).reshape(1, 64)
    z = z + values @ w[f"{p}.attention.dense.weight"].T
    x = rms(z, f"{p}.post_attention_layernorm.weight")
    weights, ids = moe_route_reference(
        x @ w[f"{p}.mlp.gate.weight"].T, w[f"{p}.mlp.gate.expert_bias"], 2, 2, 1, True, 2.5
    )
    moe = sum(weights[0, j] * swiglu(x, f"{p}.mlp.experts.{int(ids[0, j])}") for j in range(2))
    z = z + moe + swiglu(x, f"{p}.mlp.shared_experts")
    torch.testing.assert_close(got, rms(z, f"{p}.final_layernorm.weight"), atol=1e-4, rtol=1e-4)


def test_too_short_block_table_is_rejected_before_any_write(checkpoint) -> None:
    model = load(checkpoint("base"))
    cache = model.make_cache(num_slots=1, num_pages=4, page_size=4)
    with pytest.raises(
        ValueError, match=r"block_tables: sequence 0 needs 3 pages of 4 for 9 tokens, its row holds 2"
    ):
        model(ForwardBatch.build([list(range(1, 10))], [0], [0], [[0, 1]]), cache)
    assert cache.mla_kv.abs().sum() == 0 and cache.linear_state.abs().sum() == 0
