"""Sharded safetensors (+ index) -> this rank's parameter slices.

Every model parameter carries ``ckpt_pieces``: the checkpoint tensors (and the regions of them) that
fill it on this rank. The loader opens each file lazily and reads only those regions through
``safe_open(...).get_slice`` so a rank's peak memory is about its shard, never the whole model.
Block-scaled FP8 weights (``<name>.weight`` float8_e4m3fn + ``<name>.weight_scale_inv``, the official
FP8 release / DeepSeek-V3 layout) are dequantized on load into parameters of a high-precision dtype,
and copied as they are (weight and its block scales, this rank's 128-block-aligned slices) into FP8
parameters (``model.linear.make_weight``); a high-precision checkpoint tensor loaded into an FP8
parameter is quantized block-wise after its pieces are assembled. A missing, unexpected or mis-shaped tensor
stops the load with the key and both shapes named.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ling_runtime.config import LingConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# Ling-2.6-flash's config.json (docs: /work/shared/reference/model.md §1): what `--load-format dummy`
# builds when no --model-path gives a config.
LING_2_6_FLASH_CONFIG: dict = {
    "architectures": ["BailingMoeV2_5ForCausalLM"],
    "model_type": "bailing_hybrid",
    "vocab_size": 157184,
    "hidden_size": 4096,
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "moe_shared_expert_intermediate_size": None,
    "num_hidden_layers": 32,
    "layer_group_size": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "group_norm_size": 4,
    "partial_rotary_factor": 0.5,
    "use_qk_norm": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_interleave": True,
    "rope_theta": 6_000_000.0,
    "rope_scaling": None,
    "max_position_embeddings": 131072,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
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
    "torch_dtype": "bfloat16",
    "bos_token_id": 156891,
    "eos_token_id": [156892, 156895],
    "pad_token_id": 156892,
}


class CheckpointError(ValueError):
    """The checkpoint does not match the model; the message names the tensor key and the shapes."""


@dataclass(frozen=True)
class Piece:
    """Fill ``param[dst]`` with ``checkpoint[key][src]``; ``shape`` is the full checkpoint shape expected."""

    key: str
    shape: tuple[int, ...]
    src: tuple[slice, ...]
    dst: tuple[slice, ...]


def whole(key: str, shape: Iterable[int]) -> list[Piece]:
    """A replicated parameter: the whole tensor."""
    shape = tuple(shape)
    full = tuple(slice(0, n) for n in shape)
    return [Piece(key, shape, full, full)]


def shard(key: str, shape: Iterable[int], dim: int, rank: int, size: int, dst_offset: int = 0) -> Piece:
    """Rank ``rank`` of ``size`` equal parts of ``key`` along ``dim``, placed at ``dst_offset`` on ``dim``."""
    shape = tuple(shape)
    if shape[dim] % size:
        raise CheckpointError(f"{key}: dim {dim} of shape {list(shape)} does not split into {size} parts")
    part = shape[dim] // size
    src = [slice(0, n) for n in shape]
    dst = [slice(0, n) for n in shape]
    src[dim] = slice(rank * part, (rank + 1) * part)
    dst[dim] = slice(dst_offset, dst_offset + part)
    return Piece(key, shape, tuple(src), tuple(dst))


def hf_tensor_shapes(cfg: LingConfig, include_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Ling-2.6 checkpoint with its shape (the canonical key layout)."""
    h, nh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (cfg.vocab_size, h)}

    def mla(p: str) -> None:
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            out[f"{p}.attention.q_proj.weight"] = (nh * qk, h)
        else:
            out[f"{p}.attention.q_a_proj.weight"] = (cfg.q_lora_rank, h)
            out[f"{p}.attention.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            out[f"{p}.attention.q_b_proj.weight"] = (nh * qk, cfg.q_lora_rank)
        out[f"{p}.attention.kv_a_proj_with_mqa.weight"] = (cfg.kv_cache_dim, h)
        out[f"{p}.attention.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        out[f"{p}.attention.kv_b_proj.weight"] = (
            nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        )
        out[f"{p}.attention.dense.weight"] = (h, nh * cfg.v_head_dim)

    def linear_attn(p: str) -> None:
        out[f"{p}.attention.query_key_value.weight"] = (3 * nh * d, h)
        if cfg.use_qk_norm:
            out[f"{p}.attention.query_layernorm.weight"] = (d,)
            out[f"{p}.attention.key_layernorm.weight"] = (d,)
        out[f"{p}.attention.g_proj.weight"] = (nh * d, h)
        out[f"{p}.attention.g_norm.weight"] = (nh * d,)
        out[f"{p}.attention.dense.weight"] = (h, nh * d)

    def mlp(p: str, inter: int) -> None:
        out[f"{p}.gate_proj.weight"] = (inter, h)
        out[f"{p}.up_proj.weight"] = (inter, h)
        out[f"{p}.down_proj.weight"] = (h, inter)

    def moe(p: str) -> None:
        out[f"{p}.mlp.gate.weight"] = (cfg.num_experts, h)
        if cfg.moe_router_enable_expert_bias:
            out[f"{p}.mlp.gate.expert_bias"] = (cfg.num_experts,)
        for e in range(cfg.num_experts):
            mlp(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
        if cfg.num_shared_experts > 0:
            mlp(f"{p}.mlp.shared_experts", cfg.shared_expert_intermediate_size)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        (mla if cfg.is_mla_layer(i) else linear_attn)(p)
        if cfg.is_moe_layer(i):
            moe(p)
        else:
            mlp(f"{p}.mlp", cfg.intermediate_size)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (cfg.vocab_size, h)
    if include_mtp and cfg.num_nextn_predict_layers > 0:
        p = f"model.layers.{cfg.num_hidden_layers}"
        for name in ("enorm", "hnorm", "input_layernorm", "post_attention_layernorm", "final_layernorm"):
            out[f"{p}.{name}.weight"] = (h,)
        out[f"{p}.eh_proj.weight"] = (h, 2 * h)
        mla(p)
        moe(p)
    return out


def checkpoint_weight_map(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor key -> file, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        if "weight_map" not in data:
            raise CheckpointError(f"{index}: no 'weight_map'")
        return {k: root / v for k, v in data["weight_map"].items()}
    single = root / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint: no {INDEX_FILE} and no *.safetensors under {root}")
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({k: path for k in f.keys()})  # noqa: SIM118
    return out


# Names some exports use for a tensor, mapped to ours (DeepSeek-style router bias naming).
_ALIASES = {".mlp.gate.e_score_correction_bias": ".mlp.gate.expert_bias"}


def _canonical(key: str) -> str:
    for alias, name in _ALIASES.items():
        if key.endswith(alias):
            return key.removesuffix(alias) + name
    return key


def _ignored(key: str) -> bool:
    # Decay slopes are recomputed from the config (SGLang skips them too); rotary caches are derived.
    return "slope" in key or key.endswith("rotary_emb.inv_freq")


class _Reader:
    """Lazily opened safetensors files; reads slices, dequantizing block-scaled FP8."""

    def __init__(self, weight_map: dict[str, Path], fp8_block: tuple[int, int] | None) -> None:
        self.weight_map = weight_map
        self.fp8_block = fp8_block
        self._open: dict[Path, object] = {}

    def _file(self, key: str):
        path = self.weight_map[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def read(self, key: str, src: tuple[slice, ...], raw: bool = False) -> torch.Tensor:
        """The ``src`` window of ``key``; FP8 tensors dequantized unless ``raw``."""
        t = self._file(key).get_slice(key)[src]
        if not raw and self.scale_key(key) in self.weight_map:
            t = self._dequant(t, self.scale_key(key), src)
        return t

    @staticmethod
    def scale_key(key: str) -> str:
        return key.removesuffix("weight") + "weight_scale_inv" if key.endswith(".weight") else key + "#"

    def _dequant(self, t: torch.Tensor, scale_key: str, src: tuple[slice, ...]) -> torch.Tensor:
        br, bc = self.fp8_block or (128, 128)
        (r0, r1), (c0, c1) = ((s.start, s.stop) for s in src)
        scale = self._file(scale_key).get_slice(scale_key)[r0 // br : -(-r1 // br), c0 // bc : -(-c1 // bc)]
        # Expand the block scales to element resolution, then crop to the requested window.
        scale = scale.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
        scale = scale[r0 - (r0 // br) * br :, c0 - (c0 // bc) * bc :][: r1 - r0, : c1 - c0]
        return t.float() * scale

    def close(self) -> None:
        self._open.clear()


@dataclass(frozen=True)
class LoadReport:
    """What one rank read: checkpoint tensors touched and the elements of them actually read."""

    tensors: int
    elements: int


def load_weights(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    cfg: LingConfig,
    load_mtp: bool,
) -> LoadReport:
    """Fill every parameter of ``model`` from ``checkpoint_dir`` (only this rank's slices).

    Raises :class:`CheckpointError` naming the key for a missing tensor, a tensor whose shape differs
    from the model's expectation (both shapes named) or a checkpoint tensor the model has no place for.
    MTP tensors (layer index ``num_hidden_layers``) are required only when ``load_mtp``; otherwise
    they are skipped.
    """
    weight_map = checkpoint_weight_map(checkpoint_dir)
    stored = {_canonical(k): k for k in weight_map}  # our name -> the checkpoint's name
    # Judge "unexpected" against the canonical layout, not this rank's pieces: with expert
    # parallelism a rank legitimately leaves other ranks' experts unread.
    expected = hf_tensor_shapes(cfg, include_mtp=True)
    extra = [
        k for k in stored if k not in expected and not k.endswith("weight_scale_inv") and not _ignored(k)
    ]
    if extra:
        shown = ", ".join(sorted(extra)[:5])
        raise CheckpointError(
            f"unexpected tensor(s) in the checkpoint: {shown}" + (" ..." if len(extra) > 5 else "")
        )
    reader = _Reader(weight_map, cfg.fp8_block_size)
    used: set[str] = set()
    elements = 0

    def source(piece: Piece, name: str) -> str:
        """The checkpoint's name for ``piece.key``, after checking it exists with the expected shape."""
        if piece.key not in stored:
            raise CheckpointError(
                f"{piece.key}: missing from the checkpoint (needed by parameter {name}, "
                f"expected shape {list(piece.shape)})"
            )
        key = stored[piece.key]
        found = reader.shape(key)
        if found != piece.shape:
            raise CheckpointError(
                f"{piece.key}: checkpoint shape {list(found)} != model shape {list(piece.shape)}"
            )
        used.add(piece.key)
        return key

    try:
        with torch.no_grad():
            for name, param in list(model.named_parameters()) + list(model.named_buffers()):
                pieces: list[Piece] | None = getattr(param, "ckpt_pieces", None)
                if pieces is None or hasattr(param, "ckpt_scale_of"):
                    continue  # an FP8 scale is filled together with its weight
                scale = getattr(param, "ckpt_scale", None)
                if scale is not None:
                    elements += _load_fp8(param, scale, pieces, name, reader, source, cfg.fp8_block_size)
                    continue
                for piece in pieces:
                    data = reader.read(source(piece, name), piece.src)
                    param[piece.dst].copy_(data.to(param.dtype))
                    elements += data.numel()
    finally:
        reader.close()
    return LoadReport(tensors=len(used), elements=elements)


def _load_fp8(
    param: torch.Tensor,
    scale: torch.Tensor,
    pieces: list[Piece],
    name: str,
    reader: _Reader,
    source: Callable[[Piece, str], str],
    ckpt_block: tuple[int, int] | None,
) -> int:
    """Fill an FP8 weight and its block scales; returns the elements read.

    Stored FP8 with the model's block: weight bytes and scale slices are copied as they are. Anything
    else (a bf16 checkpoint, or another block size): read high precision, quantize per block."""
    block: tuple[int, int] = param.fp8_block  # type: ignore[attr-defined]
    keys = [source(p, name) for p in pieces]
    raw = ckpt_block == block and all(reader.scale_key(k) in reader.weight_map for k in keys)
    elements = 0
    if raw and hasattr(param, "ckpt_scale_error"):
        raise CheckpointError(param.ckpt_scale_error)  # type: ignore[attr-defined]
    if raw:
        for piece, spiece, key in zip(pieces, scale.ckpt_pieces, keys, strict=True):  # type: ignore[attr-defined]
            data = reader.read(key, piece.src, raw=True)
            param[piece.dst].copy_(data.to(param.dtype))
            skey = reader.scale_key(key)
            found = reader.shape(skey)
            if found != spiece.shape:
                raise CheckpointError(
                    f"{skey}: checkpoint shape {list(found)} != {list(spiece.shape)} "
                    f"(weight {list(piece.shape)} in {list(block)} blocks)"
                )
            scale[spiece.dst].copy_(reader.read(skey, spiece.src).float())
            elements += data.numel()
        return elements
    # Quantize per leading index (one expert at a time for the stacked experts) to bound memory.
    groups: dict[int | None, list[tuple[Piece, str]]] = {}
    for piece, key in zip(pieces, keys, strict=True):
        lead = piece.dst[0].start if param.dim() == 3 else None
        groups.setdefault(lead, []).append((piece, key))
    for lead, members in groups.items():
        shape = param.shape[1:] if lead is not None else param.shape
        buf = torch.zeros(shape, dtype=torch.float32)
        for piece, key in members:
            data = reader.read(key, piece.src)
            buf[piece.dst[1:] if lead is not None else piece.dst].copy_(data.float())
            elements += data.numel()
        q, s = quantize_blocks(buf, block)
        (param[lead] if lead is not None else param).copy_(q)
        (scale[lead] if lead is not None else scale).copy_(s)
    return elements


@torch.no_grad()
def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> (fp8 e4m3 ``[..., N, K]``, fp32 scales ``[..., ceil(N/bn), ceil(K/bk)]``)
    with ``w ~= q * scale`` per block (amax / 448), on w's device; partial last blocks are padded."""
    *lead, n, k = w.shape
    br, bc = block
    nr, nc = -(-n // br), -(-k // bc)
    x = w.float()
    if n % br or k % bc:
        x = F.pad(x, (0, nc * bc - k, 0, nr * br - n))
    x = x.reshape(*lead, nr, br, nc, bc)
    scale = x.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (x / scale[..., :, None, :, None]).to(torch.float8_e4m3fn).reshape(*lead, nr * br, nc * bc)
    return q[..., :n, :k].contiguous(), scale


@torch.no_grad()
def fill_dummy(model: torch.nn.Module, seed: int = 0, tp_rank: int = 0) -> int:
    """``--load-format dummy``: fill every parameter with random values drawn on its own device, no
    checkpoint read. Norm weights 1, expert biases ~N(0, 0.01), matrices ~N(0, 1/fan_in); FP8 weights
    are drawn a slab at a time in fp32, quantized block-wise with their scales on the device.
    Replicated parameters get the same values on every TP rank (one stream per name), sharded ones a
    stream per (name, rank). Returns the elements written."""
    elements = 0
    for name, param in model.named_parameters():
        if hasattr(param, "ckpt_scale_of"):
            continue  # an FP8 scale is filled together with its weight
        pieces: list[Piece] = getattr(param, "ckpt_pieces", None) or []
        replicated = all(tuple(sl.stop - sl.start for sl in p.src) == p.shape for p in pieces)
        salt = zlib.crc32(name.encode()) + (0 if replicated else 7919 * (tp_rank + 1))
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + salt)
        std = param.shape[-1] ** -0.5 if param.dim() > 1 else 0.0
        elements += param.numel()
        if param.dim() == 1:
            if "bias" in name:
                param.normal_(0.0, 0.01, generator=gen)
            else:
                param.fill_(1.0)
        elif param.dtype == torch.float8_e4m3fn:
            scale: torch.Tensor = param.ckpt_scale  # type: ignore[attr-defined]
            block: tuple[int, int] = param.fp8_block  # type: ignore[attr-defined]
            if param.dim() == 3:  # stacked experts, a few at a time
                for i in range(0, param.shape[0], 8):
                    w = torch.randn(param[i : i + 8].shape, device=param.device, generator=gen) * std
                    q, sc = quantize_blocks(w, block)
                    param[i : i + 8].copy_(q)
                    scale[i : i + 8].copy_(sc)
            else:  # ~64M values per slab, whole row blocks
                rows = max(block[0], (1 << 26) // param.shape[1] // block[0] * block[0])
                for r in range(0, param.shape[0], rows):
                    w = torch.randn(param[r : r + rows].shape, device=param.device, generator=gen) * std
                    q, sc = quantize_blocks(w, block)
                    param[r : r + rows].copy_(q)
                    scale[r // block[0] : r // block[0] + sc.shape[0]].copy_(sc)
        else:
            param.normal_(0.0, std, generator=gen)
    return elements
