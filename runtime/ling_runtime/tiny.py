"""Tiny Ling-2.6 checkpoints for the architecture tests: real structure, tiny dims, seeded random weights.

``tiny_config`` gives a Hugging Face ``config.json`` dict (``bailing_hybrid``) with both layer types,
q LoRA, group-limited routing, a shared expert, a dense first layer and one MTP layer.
``write_checkpoint`` writes it with seeded random weights as sharded safetensors + index in the
Hugging Face key layout, so the runtime, mlx-lm and the tests all load the same files;
``save_checkpoint`` writes given tensors the same way (the trained built-in model, ``builtin/``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ling_runtime.config import LingConfig
from ling_runtime.loader import hf_tensor_shapes

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A tiny ``BailingMoeV2_5ForCausalLM`` config dict; keyword ``overrides`` replace any key.

    ``vocab_size`` defaults to 512 (pass the tokenizer's size). ``q_lora_rank=None`` turns q LoRA off.
    """
    cfg: dict[str, Any] = {
        "architectures": ["BailingMoeV2_5ForCausalLM"],
        "model_type": "bailing_hybrid",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": None,
        "num_hidden_layers": 4,
        "layer_group_size": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "group_norm_size": 4,
        "partial_rotary_factor": 0.5,
        "use_qk_norm": True,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_interleave": True,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_qkv_bias": False,
        "use_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(overrides)
    LingConfig.from_hf(cfg)  # fail here, naming the field, rather than at load time
    return cfg


def _is_norm(key: str) -> bool:
    leaf = key.rsplit(".", 2)[-2]
    return leaf.endswith(("layernorm", "norm")) or leaf in ("enorm", "hnorm")


def _key_generator(seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    # One stream per tensor key, so any subset (one rank's shard, one file) is reproducible alone.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if _is_norm(key):
        # Non-trivial norm weights so a transposed or misplaced norm changes the output.
        return torch.empty(shape).uniform_(0.6, 1.4, generator=gen)
    if key.endswith("expert_bias"):
        return torch.randn(shape, generator=gen) * 0.05
    if key.endswith("word_embeddings.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def _fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 quantisation: ``w ≈ w_fp8 * weight_scale_inv`` per ``block`` tile."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(nr, nc, dtype=torch.float32)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    finfo_max = torch.finfo(torch.float8_e4m3fn).max
    for i in range(nr):
        for j in range(nc):
            tile = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].float()
            s = tile.abs().max().clamp(min=1e-12) / finfo_max
            scale[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_target(key: str, shape: tuple[int, ...]) -> bool:
    # The official FP8 release keeps embeddings, lm_head, the router and norms in high precision.
    keep = ("word_embeddings.weight", "lm_head.weight", "mlp.gate.weight")
    return len(shape) == 2 and not key.endswith(keep)


def write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    seed: int,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float32,
    fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Write ``config.json`` + ``num_shards`` safetensors + ``model.safetensors.index.json`` under ``path``.

    Keys follow the Hugging Face layout (``model.word_embeddings.weight``, ``model.layers.N...``,
    ``lm_head.weight``; the MTP layer as ``model.layers.<num_hidden_layers>.*`` when
    ``num_nextn_predict_layers`` is 1). The same ``seed`` always gives the same bytes. The router
    weight and ``expert_bias`` are stored in float32 as in the real checkpoint. With ``fp8_block``
    the projection weights are stored as float8_e4m3fn plus ``weight_scale_inv`` blocks (the
    official FP8 / DeepSeek-V3 layout) and ``quantization_config`` is added to config.json.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: accepted {list(_DTYPE_NAMES.values())}, got {dtype}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype=_DTYPE_NAMES[dtype])
    if fp8_block is not None:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(fp8_block),
        }
    cfg = LingConfig.from_hf(config)
    shapes = hf_tensor_shapes(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = _init_tensor(key, shape, _key_generator(seed, key))
        if key.endswith(("mlp.gate.weight", "expert_bias")):
            tensors[key] = t.float().contiguous()
        elif fp8_block is not None and _fp8_target(key, shape):
            q, scale = _fp8_quantize(t, fp8_block)
            tensors[key] = q.contiguous()
            tensors[key.removesuffix("weight") + "weight_scale_inv"] = scale.contiguous()
        else:
            tensors[key] = t.to(dtype).contiguous()

    return save_checkpoint(out, config, tensors, num_shards)


def save_checkpoint(
    path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], num_shards: int = 2
) -> Path:
    """Write ``tensors`` (checkpoint key -> tensor, in file order) as ``num_shards`` safetensors files
    + ``model.safetensors.index.json`` + ``config.json`` under ``path`` (the Hugging Face layout)."""
    if num_shards < 1:
        raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    shard_names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    per_shard = -(-len(keys) // num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, name in enumerate(shard_names):
        chunk = {k: tensors[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(chunk, str(out / name), metadata={"format": "pt"})
        for k, t in chunk.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill a (possibly TP-sharded) model in place with the weights ``write_checkpoint(seed)`` would
    write, without any files: each rank draws every checkpoint tensor it needs and keeps its slices.

    For benchmarks of the full-size model, where writing a 200 GB checkpoint is not an option.
    Tensors are drawn on the CPU one checkpoint key at a time (peak extra memory: the largest tensor).
    """
    drawn: dict[str, torch.Tensor] = {}
    for param in model.parameters():
        for piece in getattr(param, "ckpt_pieces", []):
            if piece.key not in drawn:
                drawn.clear()  # keep one tensor alive; a key needed again is redrawn identically
                drawn[piece.key] = _init_tensor(piece.key, piece.shape, _key_generator(seed, piece.key))
            param[piece.dst].copy_(drawn[piece.key][piece.src].to(param.dtype))
