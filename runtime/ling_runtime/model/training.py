"""A differentiable forward of ``LingForCausalLM`` for training (one process, TP 1).

The serving ``forward`` runs over a paged cache (in-place writes, ``no_grad``). Training needs whole
padded sequences with gradients, so this walks the same modules with the same weights and the same
math references (``lightning_attention_reference``, ``mla_attention_reference``, the MoE/MLP modules'
own ``forward``), batched over ``[B, T]`` sequences that all start at position 0. Sequences are
right-padded: every layer is causal, so padding never reaches a real position.
``tests/runtime/test_builtin.py`` checks these logits against the serving path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vmap

from ling_runtime.model.lightning import LightningAttention, lightning_attention_reference
from ling_runtime.model.ling import LingForCausalLM
from ling_runtime.model.mla import MLAttention, mla_attention_reference
from ling_runtime.model.moe import SparseMoE
from ling_runtime.model.rope import apply_rope_interleaved, rope_cos_sin


@dataclass
class TrainingOutput:
    hidden: torch.Tensor  # [B, T, H] final-normed hidden of the main model
    mtp_hidden: list[torch.Tensor]  # per MTP pass: [B, T, H] final-normed MTP output
    moe_inputs: list[torch.Tensor]  # per MoE layer (main, then MTP): its normed input [B*T, H], detached


def _lightning(attn: LightningAttention, x: torch.Tensor) -> torch.Tensor:
    """``LightningAttention.forward`` for fresh sequences: x [B, T, H] -> [B, T, H]."""
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    positions = torch.arange(t, device=x.device).repeat(b)
    q, k, v = attn.qkv(flat, positions)  # [B*T, heads, D] float32, q scaled
    heads, d = attn.local_heads, attn.head_dim

    # Sequences become extra heads of one call: [T, B*heads, D], each with its head's slope.
    def fold(z: torch.Tensor) -> torch.Tensor:
        return z.view(b, t, heads, -1).permute(1, 0, 2, 3).reshape(t, b * heads, -1)

    slopes = attn.slopes.repeat(b)
    state = torch.zeros(b * heads, d, v.shape[-1], device=x.device)
    o, _ = lightning_attention_reference(fold(q), fold(k), fold(v), slopes, state, attn.chunk_size)
    o = o.view(t, b, heads, -1).permute(1, 0, 2, 3).reshape(b * t, -1)
    gate = torch.sigmoid(attn.g_proj(flat).float())
    o = (attn.g_norm(o).float() * gate).to(x.dtype)
    return attn.dense(o).view(b, t, h)


def _mla(attn: MLAttention, x: torch.Tensor) -> torch.Tensor:
    """``MLAttention.forward`` (expanded prefill) for fresh sequences: x [B, T, H] -> [B, T, H]."""
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(flat)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(flat)))
    q = q.view(b * t, attn.local_heads, attn.nope + attn.rope)
    q_nope, q_pe = q[..., : attn.nope], q[..., attn.nope :]
    kv = attn.kv_a_proj_with_mqa(flat)
    c_kv = attn.kv_a_layernorm(kv[:, : attn.rank])
    positions = torch.arange(t, device=x.device).repeat(b)
    cos, sin = rope_cos_sin(positions, attn.inv_freq, attn.rope_mscale)
    q_pe = apply_rope_interleaved(q_pe, cos, sin)
    k_pe = apply_rope_interleaved(kv[:, None, attn.rank :], cos, sin)[:, 0]
    w_uk, w_uv = attn.absorbed_weights()
    per_seq = vmap(mla_attention_reference, in_dims=(0, 0, 0, 0, None, None, None, None))
    out = per_seq(
        q_nope.reshape(b, t, *q_nope.shape[1:]),
        q_pe.reshape(b, t, *q_pe.shape[1:]),
        c_kv.reshape(b, t, -1),
        k_pe.reshape(b, t, -1),
        w_uk,
        w_uv,
        attn.scale,
        torch.arange(t, device=x.device),
    )  # [B, T, heads, v]
    return attn.dense(out.reshape(b * t, -1).to(x.dtype)).view(b, t, h)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor, moe_inputs: list[torch.Tensor]) -> torch.Tensor:
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    if isinstance(mlp, SparseMoE):
        moe_inputs.append(flat.detach())
    return mlp(flat).view(b, t, h)


def training_forward(
    model: LingForCausalLM,
    input_ids: torch.Tensor,
    mtp_passes: int = 0,
    detach_mtp_input: bool = True,
) -> TrainingOutput:
    """Hidden states of ``input_ids`` [B, T] (each row a sequence from position 0, right-padded).

    ``mtp_passes`` > 0 (needs ``enable_mtp``) also runs the NEXTN layer: pass 1 at position p sees
    ``embed(input_ids[p+1])`` and the main hidden at p, so its logits predict token p+2; pass j > 1
    replaces that hidden with pass j-1's output at p-1, which is what the j-th draft step of
    speculative decoding feeds it (its own previous output) - training it on that input as well.
    With ``detach_mtp_input`` the MTP losses do not reach the main model's layers.
    """
    if model.tp.size != 1:
        raise ValueError("training_forward: runs one process (tp_size 1)")
    if model.use_kernels:
        raise ValueError("training_forward: needs the plain-torch path (set_use_kernels(False))")
    if mtp_passes and model.mtp is None:
        raise ValueError("mtp_passes: the model was built without the MTP layer (enable_mtp)")
    b, t = input_ids.shape
    moe_inputs: list[torch.Tensor] = []
    h = model.model.word_embeddings(input_ids.reshape(-1)).view(b, t, -1)
    for layer in model.model.layers:
        x = layer.input_layernorm(h)
        attn = layer.attention
        h = h + (_mla(attn, x) if isinstance(attn, MLAttention) else _lightning(attn, x))
        h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h), moe_inputs)
    hidden = model.model.norm(h)

    mtp_hidden: list[torch.Tensor] = []
    if mtp_passes:
        mtp = model.mtp
        assert mtp is not None
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last row has no next token
        embeds = model.model.word_embeddings(nxt.reshape(-1)).view(b, t, -1)
        prev = hidden.detach() if detach_mtp_input else hidden
        for _ in range(mtp_passes):
            z = mtp.eh_proj(torch.cat([mtp.enorm(embeds), mtp.hnorm(prev)], dim=-1))
            z = z + _mla(mtp.attention, mtp.input_layernorm(z))
            z = z + _mlp(mtp.mlp, mtp.post_attention_layernorm(z), moe_inputs)
            out = mtp.final_layernorm(z)
            mtp_hidden.append(out)
            # The next pass's "previous hidden" at p is this pass's output at p-1 (position 0 keeps
            # the main hidden: no draft ever starts before the first token).
            prev = torch.cat([hidden.detach()[:, :1], out[:, :-1]], dim=1)
    return TrainingOutput(hidden, mtp_hidden, moe_inputs)


def training_logits(model: LingForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 logits of final-normed ``hidden`` [..., H] (TP 1, differentiable)."""
    return model.lm_head(hidden)
