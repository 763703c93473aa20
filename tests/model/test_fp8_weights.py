"""FP8 weights kept in the model (``weight_dtype="fp8"``): block-scaled float8_e4m3fn projections and
experts, loaded from FP8 checkpoints as they are, or quantized on load; vs the dequantized model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ling_runtime.config import LingConfig
from ling_runtime.loader import CheckpointError, quantize_blocks
from ling_runtime.model import LingForCausalLM
from ling_runtime.model.linear import FP8, dequantize, scale_pieces
from ling_runtime.tiny import tiny_config, write_checkpoint

from .conftest import flash_config
from .test_model_loader import _all_tensors
from .tp_worker import run_ranks, run_scenario


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16x16 blocks: every per-rank slice of the tiny model at TP 2 falls on block boundaries.
    return write_checkpoint(tmp_path_factory.mktemp("fp8"), tiny_config(), seed=11, fp8_block=(16, 16))


def _load(path: Path, **kwargs: object) -> LingForCausalLM:
    return LingForCausalLM.from_pretrained(path, enable_mtp=True, **kwargs)  # type: ignore[arg-type]


def test_fp8_kept_model_gives_the_dequantized_models_outputs(fp8_ckpt: Path) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        ref = _load(fp8_ckpt, dtype=dtype, weight_dtype="model")
        fp8 = _load(fp8_ckpt, dtype=dtype, weight_dtype="fp8")
        assert fp8.model.layers[1].mlp.w13.dtype == FP8 and ref.model.layers[1].mlp.w13.dtype == dtype
        want, got = run_scenario(ref), run_scenario(fp8)
        assert got.keys() == want.keys() and "mtp" in got
        for name in want:
            # Same weights either way (dequantized at load vs at the matmul): only summation order.
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol, msg=f"{dtype} {name}")


def test_which_weights_are_fp8(fp8_ckpt: Path) -> None:
    # bf16 + an FP8 config: FP8 by default; float32 (the oracle) dequantizes by default.
    model = _load(fp8_ckpt, dtype=torch.bfloat16)
    assert _load(fp8_ckpt, dtype=torch.float32).model.layers[1].attention.dense.weight.dtype == torch.float32
    params = dict(model.named_parameters())
    fp8 = {n for n, p in params.items() if p.dtype == FP8}
    for name in (
        "model.layers.0.mlp.gate_up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.attention.g_proj.weight",
        "model.layers.1.attention.query_key_value.weight",  # the fused QKV, a PiecesLinear
        "model.layers.1.attention.dense.weight",
        "model.layers.1.mlp.w13",
        "model.layers.1.mlp.w2",
        "model.layers.1.mlp.shared_experts.gate_up_proj.weight",
        "model.layers.3.attention.q_a_proj.weight",
        "model.layers.3.attention.q_b_proj.weight",
        "model.layers.3.attention.kv_a_proj_with_mqa.weight",
        "model.layers.3.attention.dense.weight",
        "mtp.eh_proj.weight",
        "mtp.mlp.w13",
    ):
        assert name in fp8, name
        assert params[name + "_scale_inv"].dtype == torch.float32
    for name in (
        "model.word_embeddings.weight",
        "lm_head.weight",
        "model.layers.3.attention.kv_b_proj.weight",  # MLA reads it as W_UK / W_UV matrices
        "model.layers.1.input_layernorm.weight",
    ):
        assert params[name].dtype == torch.bfloat16, name
    assert params["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the fp32 router
    # Kept bytes and scales are the checkpoint's own: nothing was requantized on load.
    raw = _all_tensors(fp8_ckpt)
    key = "model.layers.1.attention.dense.weight"
    assert torch.equal(params[key].view(torch.uint8), raw[key].view(torch.uint8))
    assert torch.equal(params[key + "_scale_inv"], raw[key.replace("weight", "weight_scale_inv")])
    # kv_b_proj dequantized exactly as the loader's bf16 path does.
    kvb = "model.layers.3.attention.kv_b_proj.weight"
    want = dequantize(raw[kvb], raw[kvb.replace("weight", "weight_scale_inv")], (16, 16), torch.bfloat16)
    torch.testing.assert_close(params[kvb], want, atol=0, rtol=0)
    # The MoE kernel's stacked [E+1] layout holds the shared expert as the last expert.
    moe = model.model.layers[1].mlp
    w13, _, s13, s2 = moe.stacked_weights()
    assert w13.shape[0] == s13.shape[0] == moe.w13.shape[0] + 1
    assert w13[-1].data_ptr() == moe.shared_experts.gate_up_proj.weight.data_ptr()
    assert torch.equal(s2[-1], moe.shared_experts.down_proj.weight_scale_inv)


def test_a_float_checkpoint_is_quantized_on_load(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "f32", tiny_config(), seed=4)
    cfg = LingConfig.from_hf(path)
    assert cfg.fp8_block_size is None
    ref = _load(path, dtype=torch.float32)
    fp8 = _load(path, dtype=torch.float32, weight_dtype="fp8")
    for name in ("model.layers.1.attention.g_proj.weight", "model.layers.2.mlp.w2"):
        w = dict(fp8.named_parameters())[name]
        s = dict(fp8.named_parameters())[name + "_scale_inv"]
        assert w.dtype == FP8 and s.shape[-2:] == (1, 1)  # 128x128 blocks over 64-wide weights
        want = dict(ref.named_parameters())[name]
        back = dequantize(w, s, (128, 128), torch.float32)
        assert ((back - want).norm() / want.norm()) < 0.05  # e4m3 rounding, nothing misplaced
    # Quantization flips routing choices in a random tiny model, so compare with the float model
    # holding the dequantized weights: the FP8 forward must match it.
    params = dict(fp8.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if params[name].dtype == FP8:
                p.copy_(dequantize(params[name], params[name + "_scale_inv"], (128, 128), torch.float32))
    want, got = run_scenario(ref), run_scenario(fp8)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_tp2_fp8_shards_reproduce_tp1(fp8_ckpt: Path, tmp_path: Path) -> None:
    variants = [{"weight_dtype": "fp8", "enable_mtp": True}]
    run_ranks(2, str(fp8_ckpt), str(tmp_path), variants)
    baseline = run_scenario(_load(fp8_ckpt, dtype=torch.float32, weight_dtype="fp8"))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}-0.pt")
        for name, want in baseline.items():
            torch.testing.assert_close(got[name], want, atol=1e-4, rtol=1e-4, msg=f"rank {rank}: {name}")


def test_tp_shards_off_the_fp8_blocks_are_refused() -> None:
    # An FP8 checkpoint with 128-blocks whose projections are 128-aligned at TP 1 but whose TP-2
    # shards (intermediate 384/2 = 192 rows, ...) split a block: refused when the model is built.
    dims = {"hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 128, "head_dim": 32,
            "qk_nope_head_dim": 32, "v_head_dim": 32, "kv_lora_rank": 64, "q_lora_rank": 128}  # fmt: skip
    cfg = LingConfig.from_hf(tiny_config(**dims, quantization_config={"quant_method": "fp8"}))
    assert cfg.fp8_block_size == (128, 128)
    LingForCausalLM(cfg, device="meta", dtype=torch.bfloat16)  # TP 1 fits
    with pytest.raises(CheckpointError, match="multiple of 128"):
        LingForCausalLM(cfg, tp_rank=0, tp_size=2, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight_dtype"):
        LingForCausalLM(cfg, device="meta", weight_dtype="int4")


def test_quantize_blocks_and_scale_pieces() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 300, generator=g)  # partial last blocks in both dims
    q, s = quantize_blocks(w, (128, 128))
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (3, 2, 3)
    back = dequantize(q, s, (128, 128), torch.float32)
    assert float((back - w).norm() / w.norm()) < 0.04
    from ling_runtime.loader import shard

    piece = shard("x.weight", (512, 256), 0, 1, 2, dst_offset=256)
    (sp,) = scale_pieces([piece], (128, 128))
    assert sp.key == "x.weight_scale_inv" and sp.shape == (4, 2)
    assert sp.src == (slice(2, 4), slice(0, 2)) and sp.dst == (slice(2, 4), slice(0, 2))
    with pytest.raises(CheckpointError, match=r"x\.weight"):
        scale_pieces([shard("x.weight", (384, 256), 0, 1, 2)], (128, 128))


def test_flash_fp8_model_holds_no_bf16_copy_of_its_weights() -> None:
    cfg = LingConfig.from_hf(flash_config(num_nextn_predict_layers=1))
    m = LingForCausalLM(cfg, device="meta", dtype=torch.bfloat16, enable_mtp=True, weight_dtype="fp8")
    by: dict[torch.dtype, int] = {}
    for p in m.parameters():
        by[p.dtype] = by.get(p.dtype, 0) + p.numel() * p.element_size()
    # 107.5B parameters with MTP; ~106B of them fp8 at one byte each.
    assert 100e9 < by[FP8] < 107e9
    # bf16: embedding + lm_head (2 x 1.29 GB), norms and kv_b_proj only (the Lightning fused QKV,
    # 28 x 100 MB in bf16, is fp8 too).
    assert by[torch.bfloat16] < 2.7e9
    assert m.model.layers[1].mlp.w13.shape == (256, 2048, 4096)
    assert m.model.layers[1].mlp.w13_scale_inv.shape == (256, 16, 32)
