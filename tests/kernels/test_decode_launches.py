"""The decode step's small-op removals: the fused router GEMV, the one-launch RMSNorm, the per-step
rope memo and the complex-multiply interleaved RoPE, each against its torch reference; and the MoE
output's reduce + cast folded into the next residual add + RMSNorm, counted over a whole step."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels.moe import ROUTER_KERNEL_MAX_TOKENS, router_logits, router_logits_ref
from ling_runtime.kernels.rms_norm import rms_norm, rms_norm_ref
from ling_runtime.model.rope import (
    apply_rope_interleaved,
    apply_rope_interleaved_cis,
    rope_cis,
    rope_cos_sin,
    rope_inv_freq,
    rope_step_memo,
    step_cached,
)
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kernels.util import relerr


class _Ops(TorchDispatchMode):
    """Names of the aten ops run inside the block (the Triton interpreter's own ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bsz", [1, 3, ROUTER_KERNEL_MAX_TOKENS, ROUTER_KERNEL_MAX_TOKENS + 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_logits_match_reference(bsz: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    x = torch.randn(bsz, 96, generator=gen).to(dtype)  # K not a power of two: the masked tail
    w = torch.randn(10, 96, generator=gen)  # E = 10: five expert pairs
    got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (bsz, 10)
    torch.testing.assert_close(got, router_logits_ref(x, w), rtol=1e-5, atol=1e-5)


def test_router_logits_kernel_reads_bf16_without_a_cast(gen: torch.Generator) -> None:
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(8, 64, generator=gen)
    with _Ops() as ops:
        router_logits(x, w)
    # The reference would run x.float() (_to_copy) and a cuBLAS mm.
    assert "aten._to_copy" not in ops.names and "aten.mm" not in ops.names, ops.names


@pytest.mark.parametrize("n", [64, 96])
def test_rms_norm_matches_reference_on_strided_rows(n: int, gen: torch.Generator) -> None:
    full = torch.randn(3, n + 16, generator=gen).to(torch.bfloat16)
    x = full[:, :n]  # a column slice, as MLA's kv_a latent
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), rtol=1e-2, atol=1e-2)
    xf, wf = x.float(), w.float()
    torch.testing.assert_close(rms_norm(xf, wf, 1e-6), rms_norm_ref(xf, wf, 1e-6), rtol=1e-5, atol=1e-5)


def test_rope_interleaved_cis_matches_reference(gen: torch.Generator) -> None:
    inv, mscale = rope_inv_freq(16, 10000.0, None, 4096)
    pos = torch.tensor([0, 5, 4000])
    x = torch.randn(3, 4, 16, generator=gen)
    cos, sin = rope_cos_sin(pos, inv, mscale)
    want = apply_rope_interleaved(x, cos, sin)
    torch.testing.assert_close(apply_rope_interleaved_cis(x, rope_cis(pos, inv, mscale)), want)
    # A strided [T, 1, rope] slice of a wider row (MLA's k_pe inside kv).
    wide = torch.randn(3, 1, 48, generator=gen)
    torch.testing.assert_close(
        apply_rope_interleaved_cis(wide[..., 32:], rope_cis(pos, inv, mscale)),
        apply_rope_interleaved(wide[..., 32:], cos, sin),
    )


def test_rope_memo_is_per_step() -> None:
    inv, mscale = rope_inv_freq(16, 10000.0, None, 4096)
    pos = torch.tensor([3])
    assert rope_cos_sin(pos, inv, mscale, "k")[0] is not rope_cos_sin(pos, inv, mscale, "k")[0]
    with rope_step_memo():
        first = rope_cos_sin(pos, inv, mscale, "k")
        assert rope_cos_sin(pos, inv, mscale, "k") is first
        assert rope_cos_sin(pos, inv, mscale, "other") is not first
        assert rope_cos_sin(pos, inv, mscale)[0] is not first[0]  # no key: never shared
        assert step_cached("idx", lambda: pos + 1) is step_cached("idx", lambda: pos + 2)
    pos.fill_(9)  # a graph input rewritten in place: the next step must see the new position
    with rope_step_memo():
        again = rope_cos_sin(pos, inv, mscale, "k")
    torch.testing.assert_close(again[0], rope_cos_sin(torch.tensor([9]), inv, mscale)[0])
    assert not torch.equal(again[0], first[0])


def _decode_ops(moe_partials: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], torch.Tensor, int]:
    """aten ops of one B=2 decode step plus one MTP draft step of the tiny model on the kernels; with
    ``moe_partials=False`` the MoE layers return their reduced output (the path before the fusion)."""
    from ling_runtime.config import LingConfig
    from ling_runtime.model import ForwardBatch, LingForCausalLM
    from ling_runtime.model.moe import SparseMoE
    from ling_runtime.tiny import init_random_weights, tiny_config

    if not moe_partials:
        forward = SparseMoE.forward
        monkeypatch.setattr(SparseMoE, "forward", lambda self, x, partials=False: forward(self, x))
    cfg = LingConfig.from_hf(tiny_config())
    model = LingForCausalLM(cfg, dtype=torch.bfloat16, enable_mtp=True, use_kernels=True)
    init_random_weights(model, seed=3)
    n_moe = sum(isinstance(m, SparseMoE) for m in model.modules())
    cache = model.make_cache(num_slots=2, num_pages=4, page_size=16)
    batch = ForwardBatch.build([[11], [12]], [5, 9], [0, 1], [[0, 1], [2, 3]])
    with _Ops() as ops:
        h = model(batch, cache)
        d = model.mtp_forward(batch, cache, h)
    monkeypatch.undo()
    return ops.names, torch.cat([h, d]), n_moe


def test_moe_partials_fuse_into_the_next_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    new_ops, new_out, n_moe = _decode_ops(True, monkeypatch)
    old_ops, old_out, _ = _decode_ops(False, monkeypatch)
    assert n_moe == 4  # layers 1-3 and the MTP layer
    # Before: each MoE layer ran o.sum(1) (aten.sum) and .to(bf16) (aten._to_copy) between fused_moe
    # and the next add_rmsnorm; now both are inside add_rmsnorm_partials.
    assert new_ops.count("aten.sum") == old_ops.count("aten.sum") - n_moe, (new_ops, old_ops)
    assert new_ops.count("aten._to_copy") == old_ops.count("aten._to_copy") - n_moe
    assert len(new_ops) < len(old_ops)
    # Same math up to the fp32 summation order of the slots.
    assert relerr(new_out, old_out) < 2e-2
