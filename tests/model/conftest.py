"""Shared fixtures for the model tests: tiny checkpoints written once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ling_runtime.model import LingForCausalLM
from ling_runtime.tiny import tiny_config, write_checkpoint

# Several tiny structures the agreement tests sweep (see tests/model/test_model_mlx_agreement.py).
CONFIGS: dict[str, dict[str, Any]] = {
    # q LoRA on, 2 routing groups (1 kept), one layer group: linear 0-2, MLA 3, dense layer 0.
    "base": {},
    # q LoRA off, one routing group, two layer groups, 6 heads (not a power of two), 3 norm groups.
    "nolora_6heads": {
        "q_lora_rank": None,
        "n_group": 1,
        "topk_group": 1,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "group_norm_size": 3,
        "num_experts_per_tok": 3,
    },
    # 4 routing groups (2 kept), top-4 of 16, a trailing partial layer group (MLA at 3 and 4), YaRN.
    "groups_yarn": {
        "num_hidden_layers": 5,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 1.5,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoint(name, seed=0, **extra)``: the directory of a tiny checkpoint (written once)."""
    made: dict[tuple, Path] = {}

    def make(name: str = "base", seed: int = 0, **extra: Any) -> Path:
        key = (name, seed, tuple(sorted((k, repr(v)) for k, v in extra.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{name}")
            made[key] = write_checkpoint(path, tiny_config(**{**CONFIGS[name], **extra}), seed=seed)
        return made[key]

    return make


def load(path: Path, **kwargs: Any) -> LingForCausalLM:
    return LingForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def flash_config(**overrides: Any) -> dict[str, Any]:
    """Ling-2.6-flash's dimensions (reference/model.md §1), for shape checks on the meta device."""
    return tiny_config(
        **{
            "vocab_size": 157184,
            "hidden_size": 4096,
            "intermediate_size": 9216,
            "moe_intermediate_size": 1024,
            "num_hidden_layers": 32,
            "layer_group_size": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "group_norm_size": 4,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "rope_theta": 6_000_000.0,
            "max_position_embeddings": 131072,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "n_group": 8,
            "topk_group": 4,
            **overrides,
        }
    )
