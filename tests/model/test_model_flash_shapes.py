"""The real Ling-2.6-flash dimensions, built on the meta device (no memory): parameter count and the
per-rank shard shapes SGLang reports at TP 4 (reference/model.md §1, §6, §7)."""

from __future__ import annotations

import math

import torch
from ling_runtime.config import LingConfig
from ling_runtime.loader import hf_tensor_shapes
from ling_runtime.model import LingForCausalLM

from .conftest import flash_config


def test_flash_parameter_counts_match_the_published_totals() -> None:
    cfg = LingConfig.from_hf(flash_config())
    assert cfg.mla_layer_ids == [7, 15, 23, 31]
    base = sum(math.prod(s) for s in hf_tensor_shapes(cfg, include_mtp=False).values())
    with_mtp = sum(math.prod(s) for s in hf_tensor_shapes(cfg, include_mtp=True).values())
    assert round(base / 1e9, 2) == 104.19
    assert round(with_mtp / 1e9, 2) == 107.49


def test_flash_tp4_shard_shapes() -> None:
    cfg = LingConfig.from_hf(flash_config())
    m = LingForCausalLM(cfg, tp_rank=3, tp_size=4, device="meta", dtype=torch.bfloat16, enable_mtp=True)
    moe = m.model.layers[1].mlp
    assert moe.w13.shape == (256, 512, 4096)  # [E, 2*1024/4, H] as SGLang's fused w13 at TP4
    assert moe.w2.shape == (256, 4096, 256)
    assert m.model.layers[0].mlp.gate_up_proj.weight.shape == (4608, 4096)
    lin = m.model.layers[0].attention
    assert lin.query_key_value.weight.shape == (3 * 8 * 128, 4096)
    assert lin.g_norm.groups == 1 and lin.g_norm.weight.shape == (1024,)
    assert lin.slopes.shape == (8,)
    mla = m.model.layers[7].attention
    assert mla.kv_a_proj_with_mqa.weight.shape == (576, 4096)  # replicated latent projection
    assert mla.kv_b_proj.weight.shape == (8 * 256, 512)
    assert m.lm_head.weight.shape == (157184 // 4, 4096)
    assert m.mtp is not None and m.mtp.eh_proj.weight.shape == (4096, 8192)
    cache = m.make_cache(num_slots=2, num_pages=1, page_size=16)
    assert cache.linear_state.shape == (28, 2, 8, 128, 128)
    assert cache.mla_kv.shape == (5, 1, 16, 576)  # 4 MLA layers + the MTP layer
