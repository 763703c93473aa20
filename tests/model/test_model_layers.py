"""The plain-torch layer references, each against an independent formulation of the same math."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from ling_runtime.kernels.slopes import alibi_base_slopes, lightning_slopes
from ling_runtime.model.lightning import (
    lightning_attention_reference,
    lightning_decode_reference,
    lightning_recurrent_reference,
)
from ling_runtime.model.mla import (
    mla_attention_absorbed_reference,
    mla_attention_reference,
    mla_decode_batched_reference,
)
from ling_runtime.model.mlp import swiglu_reference
from ling_runtime.model.moe import experts_reference, moe_route_reference
from ling_runtime.model.norms import group_rms_norm_reference
from ling_runtime.model.rope import apply_rope_interleaved, apply_rope_neox, rope_cos_sin, rope_inv_freq
from mlx_lm.models.rope_utils import YarnRoPE

g = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def test_alibi_slopes_power_of_two_and_interleaved_non_power_of_two() -> None:
    assert alibi_base_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    assert alibi_base_slopes(32)[:2] == [2**-0.25, 2**-0.5]  # Ling-2.6-flash: 2^(-(h+1)/4)
    assert alibi_base_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_layer_factor_is_one_at_the_first_layer_and_tiny_at_the_last() -> None:
    first, last = lightning_slopes(8, 0, 32), lightning_slopes(8, 31, 32)
    torch.testing.assert_close(first, torch.tensor([2.0 ** -(h + 1) for h in range(8)]) * (1 + 1e-5))
    torch.testing.assert_close(last, torch.tensor([2.0 ** -(h + 1) for h in range(8)]) * 1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_lightning_equals_the_unrolled_sum_with_a_carried_state(chunk: int) -> None:
    t, h, d, dv = 13, 3, 4, 5
    q, k, v, s0 = _rand(t, h, d), _rand(t, h, d), _rand(t, h, dv), _rand(h, d, dv)
    slopes = torch.tensor([0.5, 0.1, 0.01])
    o, s = lightning_attention_reference(q, k, v, slopes, s0, chunk_size=chunk)
    lam = torch.exp(-slopes)[:, None, None]
    # o_t = q_t (λ^(t+1) S0 + Σ_{j<=t} λ^(t-j) k_j^T v_j), written out directly.
    expect, state_t = [], None
    for i in range(t):
        state_t = lam ** (i + 1) * s0 + sum(
            lam ** (i - j) * k[j][:, :, None] * v[j][:, None, :] for j in range(i + 1)
        )
        expect.append((q[i][:, None, :] @ state_t)[:, 0])
    torch.testing.assert_close(o, torch.stack(expect), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, state_t, atol=1e-4, rtol=1e-4)
    o_rec, states = lightning_recurrent_reference(q, k, v, slopes, s0)
    torch.testing.assert_close(o_rec, o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states[-1], s, atol=1e-4, rtol=1e-4)


def test_absorbed_mla_equals_expanded_mla_with_a_cached_prefix() -> None:
    heads, nope, rope, vdim, r, prefix, tq = 3, 8, 4, 6, 10, 5, 4
    w_uk, w_uv = _rand(heads, nope, r), _rand(heads, vdim, r)
    c_kv, k_pe = _rand(prefix + tq, r), _rand(prefix + tq, rope)
    q_nope, q_pe = _rand(tq, heads, nope), _rand(tq, heads, rope)
    pos = torch.arange(prefix, prefix + tq)
    a = mla_attention_reference(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, 0.3, pos)
    b = mla_attention_absorbed_reference(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, 0.3, pos)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Causality: the first query (position 5) must ignore keys 6..8.
    c2 = c_kv.clone()
    c2[prefix + 1 :] += 100
    torch.testing.assert_close(mla_attention_reference(q_nope, q_pe, c2, k_pe, w_uk, w_uv, 0.3, pos)[0], a[0])


def test_router_bias_steers_selection_but_not_weights() -> None:
    logits = torch.zeros(1, 4)
    w, ids = moe_route_reference(logits, torch.tensor([0.0, 0.0, 0.1, 0.2]), 2, 2, 1, True, 2.5)
    assert sorted(ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(w, torch.tensor([[1.25, 1.25]]))


def test_router_group_limit_renormalises_and_scales() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0, 1.0]])
    w, ids = moe_route_reference(logits, None, 2, 2, 1, True, 2.5)
    p = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0, 0.0, 1.0)]
    # Group {0,1} sums to .881+.269 = 1.150 < group {2,3} .5+.731 = 1.231, so expert 0 is dropped.
    assert ids[0].tolist() == [3, 2]
    torch.testing.assert_close(w[0], torch.tensor([p[3], p[2]]) / (p[3] + p[2]) * 2.5)
    # Without the group limit the best two experts overall win; without renorm only scaling applies.
    w2, ids2 = moe_route_reference(logits, None, 2, 1, 1, False, 2.5)
    assert ids2[0].tolist() == [0, 3]
    torch.testing.assert_close(w2[0], torch.tensor([p[0], p[3]]) * 2.5)


def test_router_masks_dropped_groups_with_minus_inf_not_zero() -> None:
    # The kept group's biased scores are negative; masking with 0 would pick the dropped group.
    _w, ids = moe_route_reference(
        torch.zeros(1, 4), torch.tensor([-3.0, -3.0, -2.0, -2.0]), 2, 2, 1, True, 1.0
    )
    assert sorted(ids[0].tolist()) == [2, 3]


def test_experts_reference_is_the_weighted_sum_of_swiglu_experts() -> None:
    t, h, inter, e = 5, 6, 4, 3
    x, w13, w2 = _rand(t, h), _rand(e, 2 * inter, h), _rand(e, h, inter)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    weights = torch.rand(t, 2, generator=g)
    got = experts_reference(x, weights, ids, w13, w2)
    for i in range(t):
        want = torch.zeros(h)
        for slot in range(2):
            ex = int(ids[i, slot])
            gate, up = w13[ex, :inter] @ x[i], w13[ex, inter:] @ x[i]
            want += weights[i, slot] * (w2[ex] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
    # One expert at weight 1 is the plain SwiGLU MLP.
    one = experts_reference(x, torch.ones(t, 1), torch.ones(t, 1, dtype=torch.int64), w13, w2)
    torch.testing.assert_close(one, swiglu_reference(x, w13[1], w2[1]), atol=1e-5, rtol=1e-5)
    # Expert parallel: a rank holding experts 1..2 computes exactly their share.
    part = experts_reference(x, weights, ids, w13[1:], w2[1:], first_expert=1)
    zero_only = experts_reference(x, weights, ids, w13[:1], w2[:1], first_expert=0)
    torch.testing.assert_close(part + zero_only, got, atol=1e-5, rtol=1e-5)


def test_group_norm_shards_are_slices_of_the_full_norm() -> None:
    x, w = _rand(3, 16), torch.rand(16, generator=g) + 0.5
    full = group_rms_norm_reference(x, w, 4, 1e-6)
    for rank in range(2):
        sl = slice(rank * 8, (rank + 1) * 8)
        torch.testing.assert_close(group_rms_norm_reference(x[:, sl], w[sl], 2, 1e-6), full[:, sl])


def test_interleaved_rope_is_neox_rope_on_deinterleaved_dims() -> None:
    x = _rand(7, 2, 8)
    inv, m = rope_inv_freq(8, 10000.0, None, 4096)
    cos, sin = rope_cos_sin(torch.arange(7) + 3, inv, m)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    torch.testing.assert_close(
        apply_rope_interleaved(x, cos, sin)[..., perm], apply_rope_neox(x[..., perm], cos, sin)
    )
    # Partial NeoX leaves the tail untouched; position 0 is the identity.
    y = _rand(1, 2, 12)
    c0, s0 = rope_cos_sin(torch.tensor([0]), inv, m)
    torch.testing.assert_close(apply_rope_neox(y, c0, s0), y)
    torch.testing.assert_close(
        apply_rope_neox(x.repeat(1, 1, 2)[..., :12], cos, sin)[..., 8:], x.repeat(1, 1, 2)[..., 8:12]
    )


def test_yarn_frequencies_and_mscale_match_mlx_lm() -> None:
    scaling = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    }
    inv, m = rope_inv_freq(16, 10000.0, scaling, 4096)
    ref = YarnRoPE(
        16,
        base=10000.0,
        scaling_factor=4.0,
        original_max_position_embeddings=64,
        mscale=1.0,
        mscale_all_dim=0.5,
    )
    np.testing.assert_allclose(1.0 / inv.numpy(), np.array(ref._freqs.astype(mx.float32)), rtol=1e-5)
    assert m == pytest.approx(ref.mscale)
    assert m != 1.0


def test_batched_decode_references_equal_the_per_sequence_ones() -> None:
    heads, nope, rope, vdim, r = 2, 4, 4, 3, 6
    w_uk, w_uv = _rand(heads, nope, r), _rand(heads, vdim, r)
    lens = [3, 7, 1]
    lat = _rand(3, 7, r + rope)
    q_nope, q_pe = _rand(3, heads, nope), _rand(3, heads, rope)
    got = mla_decode_batched_reference(q_nope, q_pe, lat, torch.tensor(lens), w_uk, w_uv, 0.5)
    for b, n in enumerate(lens):
        want = mla_attention_absorbed_reference(
            q_nope[b : b + 1],
            q_pe[b : b + 1],
            lat[b, :n, :r],
            lat[b, :n, r:],
            w_uk,
            w_uv,
            0.5,
            torch.tensor([n - 1]),
        )
        torch.testing.assert_close(got[b], want[0], atol=1e-5, rtol=1e-5)
    q, k, v, s = _rand(3, heads, 4), _rand(3, heads, 4), _rand(3, heads, 5), _rand(3, heads, 4, 5)
    slopes = torch.tensor([0.3, 0.02])
    o, new = lightning_decode_reference(q, k, v, slopes, s)
    for b in range(3):
        o1, st = lightning_recurrent_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], slopes, s[b])
        torch.testing.assert_close(o[b], o1[0])
        torch.testing.assert_close(new[b], st[-1])
