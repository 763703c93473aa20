"""LingConfig: parsing, --json-model-override-args merging, layer selection, validation messages."""

from __future__ import annotations

import json

import pytest
from ling_runtime.config import ConfigError, LingConfig, merge_overrides
from ling_runtime.tiny import tiny_config


def test_from_hf_reads_every_field_from_a_checkpoint_dir(tmp_path) -> None:
    cfg_dict = tiny_config(vocab_size=300, q_lora_rank=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    cfg = LingConfig.from_hf(tmp_path)
    assert (cfg.vocab_size, cfg.q_lora_rank, cfg.kv_cache_dim, cfg.qk_head_dim) == (300, None, 40, 24)
    assert cfg.linear_rotary_dim == 8
    assert cfg.shared_expert_intermediate_size == 32
    assert cfg.to_dict()["architectures"] == ["BailingMoeV2_5ForCausalLM"]


def test_override_args_merge_nested_rope_scaling_as_the_seed_recipe_passes_it() -> None:
    base = tiny_config(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})
    text = '{"rope_scaling": {"factor": 4.0}, "max_position_embeddings": 256}'
    cfg = LingConfig.from_hf(base, text)
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert cfg.max_position_embeddings == 256
    assert merge_overrides({"a": {"b": 1}}, {"a": None}) == {"a": None}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ("{not json", "json_model_override_args"),
        ('["a list"]', "json_model_override_args"),
        ({"model_type": "llama"}, "model_type"),
        ({"group_norm_size": 5}, "group_norm_size"),
        ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 3}, "topk_group"),
        ({"score_function": "softmax"}, "score_function"),
        ({"rope_scaling": {"type": "longrope", "factor": 2}}, "rope_scaling.type"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ],
)
def test_bad_config_names_the_field(overrides, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LingConfig.from_hf(tiny_config(), overrides)


def test_missing_required_field_is_named() -> None:
    d = tiny_config()
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        LingConfig.from_hf(d)


def test_layer_types_follow_layer_group_size_with_a_trailing_partial_group() -> None:
    cfg = LingConfig.from_hf(tiny_config(num_hidden_layers=10, layer_group_size=4))
    assert cfg.mla_layer_ids == [3, 7, 8, 9]
    assert cfg.linear_layer_ids == [0, 1, 2, 4, 5, 6]
    real = LingConfig.from_hf(tiny_config(num_hidden_layers=32, layer_group_size=8))
    assert real.mla_layer_ids == [7, 15, 23, 31]  # Ling-2.6-flash
    assert [real.is_moe_layer(i) for i in (0, 1)] == [False, True]


def test_validate_tp_accepts_divisors_of_group_norm_size_and_names_the_constraint() -> None:
    cfg = LingConfig.from_hf(tiny_config())  # 4 heads, group_norm_size 4
    for tp in (1, 2, 4):
        cfg.validate_tp(tp)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        cfg.validate_tp(3)
    six = LingConfig.from_hf(tiny_config(num_attention_heads=6, group_norm_size=3))
    with pytest.raises(ConfigError, match="group_norm_size=3"):
        six.validate_tp(2)
    with pytest.raises(ConfigError, match="tp_size"):
        cfg.validate_tp(0)
    with pytest.raises(ConfigError, match="num_experts=8"):
        LingConfig.from_hf(tiny_config(group_norm_size=16, num_attention_heads=16)).validate_tp(
            16, expert_parallel=True
        )
