"""Hugging Face ``config.json`` of Ling-2.6 (``bailing_hybrid``) -> a typed, validated :class:`LingConfig`.

The field names are the Hugging Face ones (the same keys ``mlx_lm.models.bailing_hybrid`` reads), so a
config dict round-trips unchanged. ``--json-model-override-args`` is merged over the file with
:func:`merge_overrides` before parsing (the SGLang recipe passes YaRN ``rope_scaling`` that way).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPES = ("bailing_hybrid",)
ARCHITECTURES = ("BailingMoeV2_5ForCausalLM",)


class ConfigError(ValueError):
    """A config value the runtime cannot serve; the message names the field and what is accepted."""


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any] | str | None) -> dict[str, Any]:
    """Merge ``overrides`` (a dict or the JSON text of ``--json-model-override-args``) over ``base``.

    Nested dicts merge key by key (as SGLang does for ``rope_scaling``); ``None`` values replace.
    """
    if overrides is None:
        return dict(base)
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides) if overrides.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"json_model_override_args: not valid JSON ({e})") from e
    if not isinstance(overrides, dict):
        raise ConfigError(f"json_model_override_args: expected a JSON object, got {type(overrides).__name__}")
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def _rotary_dim(head_dim: int, factor: float) -> int:
    return int(head_dim * factor)


@dataclass(frozen=True)
class LingConfig:
    """Every config field the Ling-2.6 architecture uses (Hugging Face names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    layer_group_size: int
    group_norm_size: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 6_000_000.0
    max_position_embeddings: int = 131072
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    partial_rotary_factor: float = 0.5
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    linear_silu: bool = False
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_hf(
        cls, source: dict[str, Any] | str | Path, overrides: dict[str, Any] | str | None = None
    ) -> LingConfig:
        """Parse a config dict, a ``config.json`` path or a checkpoint directory; merge ``overrides``."""
        if isinstance(source, str | Path):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"config: no config.json at {path}")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"config: {path} is not valid JSON ({e})") from e
        elif isinstance(source, dict):
            data = source
        else:
            raise ConfigError(f"config: expected a dict or a path, got {type(source).__name__}")
        data = merge_overrides(data, overrides)
        rope = data.get("rope_scaling")
        if isinstance(rope, dict):
            # The card's override (and Hugging Face's newer rope_parameters layout) puts rope_theta and
            # partial_rotary_factor inside rope_scaling: there they win over the top-level keys.
            data = {**data, **{k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope}}
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: {model_type!r} is not served; accepted: {list(MODEL_TYPES)}")
        if data.get("head_dim") is None and data.get("hidden_size") and data.get("num_attention_heads"):
            data = {**data, "head_dim": data["hidden_size"] // data["num_attention_heads"]}
        known = {f.name for f in fields(cls)} - {"raw"}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [name for name in required if name not in kwargs]
        if absent:
            raise ConfigError(f"config: required field(s) missing: {', '.join(absent)}")
        cfg = cls(**kwargs, raw=dict(data))
        cfg.validate()
        return cfg

    # ---- structure ----------------------------------------------------------------------------------
    def is_mla_layer(self, layer_id: int) -> bool:
        """MLA (full attention) at every ``layer_group_size``-th layer and on a trailing partial group.

        This is the Hugging Face / mlx-lm rule; vLLM and SGLang use ``(i+1) % G == 0`` only, which is
        the same whenever ``num_hidden_layers % layer_group_size == 0`` (true for Ling-2.6-flash).
        """
        g = self.layer_group_size
        return (layer_id + 1) % g == 0 or layer_id >= (self.num_hidden_layers // g) * g

    @property
    def mla_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_mla_layer(i)]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_mla_layer(i)]

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.num_experts > 0 and layer_id >= self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def linear_rotary_dim(self) -> int:
        return _rotary_dim(self.head_dim, self.partial_rotary_factor)

    @property
    def shared_expert_intermediate_size(self) -> int:
        return (
            self.moe_shared_expert_intermediate_size or self.moe_intermediate_size * self.num_shared_experts
        )

    @property
    def kv_cache_dim(self) -> int:
        """Per-token latent width stored by the MLA cache: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        """``weight_block_size`` of a block-scaled FP8 checkpoint (official FP8 / DeepSeek-V3 layout)."""
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        block = q.get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject combinations the architecture cannot run, naming the field and what is accepted."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "layer_group_size",
            "group_norm_size",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "intermediate_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        rot = self.linear_rotary_dim
        if rot <= 0 or rot > self.head_dim or rot % 2:
            raise ConfigError(
                f"partial_rotary_factor: head_dim*partial_rotary_factor must be an even integer in "
                f"(0, head_dim={self.head_dim}], got {rot}"
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim: must be even, got {self.qk_rope_head_dim}")
        width = self.num_attention_heads * self.head_dim
        if width % self.group_norm_size:
            raise ConfigError(
                f"group_norm_size: must divide num_attention_heads*head_dim={width}, got {self.group_norm_size}"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank: must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.score_function != "sigmoid":
            raise ConfigError(f"score_function: only 'sigmoid' is supported, got {self.score_function!r}")
        if self.use_qkv_bias or self.use_bias:
            raise ConfigError("use_qkv_bias/use_bias: Ling-2.6 has no projection biases; accepted: false")
        if self.linear_silu:
            raise ConfigError("linear_silu: Ling-2.6 uses no feature map on q/k/v; accepted: false")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings: Ling-2.6 has a separate lm_head; accepted: false")
        if self.num_experts > 0:
            if self.moe_intermediate_size <= 0:
                raise ConfigError(
                    f"moe_intermediate_size: must be positive, got {self.moe_intermediate_size}"
                )
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok: must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
            if self.n_group <= 0 or self.num_experts % self.n_group:
                raise ConfigError(
                    f"n_group: must be positive and divide num_experts={self.num_experts}, got {self.n_group}"
                )
            if self.num_experts // self.n_group < 2 and self.topk_group < self.n_group:
                raise ConfigError(
                    "n_group: group-limited routing scores the top-2 of each group; need >=2 per group"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(
                    f"topk_group: must be in [1, n_group={self.n_group}], got {self.topk_group}"
                )
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ConfigError(
                    "num_experts_per_tok: larger than the experts in the kept groups "
                    f"(topk_group*num_experts/n_group={self.topk_group * (self.num_experts // self.n_group)})"
                )
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(
                f"num_nextn_predict_layers: accepted 0 or 1, got {self.num_nextn_predict_layers}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type") or self.rope_scaling.get("rope_type", "default")
            if kind not in ("default", "yarn", "deepseek_yarn"):
                raise ConfigError(f"rope_scaling.type: accepted 'yarn' (or none), got {kind!r}")
            if kind != "default" and float(self.rope_scaling.get("factor", 1.0)) <= 0:
                raise ConfigError("rope_scaling.factor: must be positive")

    def validate_tp(self, tp_size: int, expert_parallel: bool = False) -> None:
        """Reject a tensor-parallel size this model cannot be split by (vLLM/SGLang constraints)."""
        if not isinstance(tp_size, int) or tp_size <= 0:
            raise ConfigError(f"tp_size: must be a positive integer, got {tp_size!r}")
        if self.num_attention_heads % tp_size:
            raise ConfigError(
                f"tp_size: {tp_size} does not divide num_attention_heads={self.num_attention_heads}"
            )
        if self.group_norm_size % tp_size:
            raise ConfigError(
                f"tp_size: linear attention needs tp_size to divide group_norm_size={self.group_norm_size} "
                f"(accepted: {[d for d in range(1, self.group_norm_size + 1) if self.group_norm_size % d == 0]})"
            )
        if self.intermediate_size % tp_size:
            raise ConfigError(
                f"tp_size: {tp_size} does not divide intermediate_size={self.intermediate_size}"
            )
        if self.num_experts > 0:
            if self.shared_expert_intermediate_size % tp_size:
                raise ConfigError(
                    f"tp_size: {tp_size} does not divide the shared expert intermediate size "
                    f"{self.shared_expert_intermediate_size}"
                )
            if expert_parallel and self.num_experts % tp_size:
                raise ConfigError(
                    f"tp_size: expert parallel needs it to divide num_experts={self.num_experts}"
                )
            if not expert_parallel and self.moe_intermediate_size % tp_size:
                raise ConfigError(
                    f"tp_size: {tp_size} does not divide moe_intermediate_size={self.moe_intermediate_size}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face dict (the original keys plus the parsed ones)."""
        out = dict(self.raw)
        for f in fields(self):
            if f.name != "raw":
                out[f.name] = getattr(self, f.name)
        return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """DeepSeek/YaRN attention magnitude correction ``0.1*mscale*ln(scale)+1`` (1 when not scaling)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
