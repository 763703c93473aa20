"""``LingForCausalLM``: the Ling-2.6 hybrid model (one TP shard of it) over a ``LingCache``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ling_runtime.config import LingConfig
from ling_runtime.loader import LoadReport, load_weights
from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.cache import LingCache
from ling_runtime.model.lightning import LightningAttention
from ling_runtime.model.linear import ParallelLMHead, VocabParallelEmbedding, fp8_weights
from ling_runtime.model.mla import MLAttention
from ling_runtime.model.mlp import DenseMLP
from ling_runtime.model.moe import SparseMoE, mlp_add_rmsnorm
from ling_runtime.model.mtp import MTPLayer
from ling_runtime.model.norms import RMSNorm
from ling_runtime.model.parallel import TPGroup
from ling_runtime.model.rope import rope_step_memo


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``."""

    def __init__(
        self,
        cfg: LingConfig,
        layer_id: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None,
        expert_parallel: bool,
        chunk_size: int,
    ) -> None:
        super().__init__()
        p = f"model.layers.{layer_id}"
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_id = layer_id
        self.is_mla = cfg.is_mla_layer(layer_id)
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm.weight", h, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm.weight", h, eps, dtype, device)
        self.attention: nn.Module
        if self.is_mla:
            self.attention = MLAttention(
                cfg, cfg.mla_layer_ids.index(layer_id), f"{p}.attention", tp, dtype, device
            )
        else:
            self.attention = LightningAttention(
                cfg,
                layer_id,
                cfg.linear_layer_ids.index(layer_id),
                f"{p}.attention",
                tp,
                dtype,
                device,
                chunk_size,
            )
        self.mlp: nn.Module
        if cfg.is_moe_layer(layer_id):
            self.mlp = SparseMoE(cfg, f"{p}.mlp", tp, dtype, device, expert_parallel)
        else:
            self.mlp = DenseMLP(f"{p}.mlp", h, cfg.intermediate_size, tp, dtype, device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LingCache) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LingModel(nn.Module):
    """Embedding, decoder layers and final norm (``model.*`` in the checkpoint)."""

    def __init__(
        self,
        cfg: LingConfig,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None,
        expert_parallel: bool,
        chunk_size: int,
    ) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            "model.word_embeddings.weight", cfg.vocab_size, cfg.hidden_size, tp, dtype, device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, tp, dtype, device, expert_parallel, chunk_size)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm("model.norm.weight", cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class LingForCausalLM(nn.Module):
    """One tensor-parallel shard of Ling-2.6.

    ``forward(batch, cache)`` returns final-normed hidden states [T, H]; ``compute_logits`` maps rows
    of it to full-vocabulary float32 logits (gathered over TP). With ``enable_mtp`` the NEXTN layer
    is built and loaded, and ``mtp_forward`` runs it (its cache must be built with ``include_mtp``).
    ``chunk_size`` is the Lightning prefill chunk. All ranks must call every method together.
    ``use_kernels`` (default: on for CUDA, off for CPU) swaps the plain-torch hot paths for the Triton
    kernels of ``ling_runtime.kernels`` where the batch's shape allows (see ``set_use_kernels``).

    ``weight_dtype``: ``"fp8"`` keeps the projection and expert weights block-scaled float8_e4m3fn
    (``model.linear``: the config's ``weight_block_size``, else 128x128; a bf16 checkpoint is
    quantized on load); ``"model"`` stores every weight in ``dtype`` (an FP8 checkpoint is
    dequantized on load); None (default): ``"fp8"`` for an FP8 checkpoint run in bf16, else
    ``"model"`` (float32 runs are the numerics oracle).
    """

    def __init__(
        self,
        config: LingConfig,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: torch.distributed.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        enable_mtp: bool = False,
        expert_parallel: bool = False,
        chunk_size: int = 64,
        use_kernels: bool | None = None,
        weight_dtype: str | None = None,
    ) -> None:
        super().__init__()
        config.validate_tp(tp_size, expert_parallel)
        if weight_dtype is None:
            weight_dtype = "fp8" if config.fp8_block_size and dtype == torch.bfloat16 else "model"
        if weight_dtype not in ("fp8", "model"):
            raise ValueError(f"weight_dtype: accepted 'fp8', 'model' or None, got {weight_dtype!r}")
        self.fp8_block = (config.fp8_block_size or (128, 128)) if weight_dtype == "fp8" else None
        if enable_mtp and config.num_nextn_predict_layers < 1:
            raise ValueError("enable_mtp: the config has num_nextn_predict_layers=0 (no MTP layer to load)")
        self.config = config
        self.tp = TPGroup(rank=tp_rank, size=tp_size, group=tp_group)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.enable_mtp = enable_mtp
        # Embedding, lm_head, norms and the router are built in ``dtype`` / fp32 whatever this says.
        # Strict (every rank's slice on whole blocks) when an FP8 checkpoint will be loaded as stored.
        with fp8_weights(self.fp8_block, strict=config.fp8_block_size == self.fp8_block):
            self.model = LingModel(config, self.tp, dtype, device, expert_parallel, chunk_size)
            self.mtp = (
                MTPLayer(config, len(config.mla_layer_ids), self.tp, dtype, device, expert_parallel)
                if enable_mtp
                else None
            )
        self.lm_head = ParallelLMHead(
            "lm_head.weight", config.vocab_size, config.hidden_size, self.tp, dtype, device
        )
        self.use_kernels = False
        self.set_use_kernels(self.device.type == "cuda" if use_kernels is None else use_kernels)

    def set_use_kernels(self, flag: bool) -> None:
        """Route Lightning decode/verify/prefill, MLA absorbed decode, the router + grouped MoE and
        the small fused ops through Triton (True) or the plain-torch references (False). On CPU the
        kernels only run under ``TRITON_INTERPRET=1`` (tests)."""
        self.use_kernels = flag
        for m in self.modules():
            if m is not self and hasattr(m, "use_kernels"):
                m.use_kernels = flag

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: str | Path, overrides: dict | str | None = None, **kwargs: object
    ) -> LingForCausalLM:
        """Build from ``config.json`` (+ ``--json-model-override-args``) and load this rank's weights."""
        model = cls(LingConfig.from_hf(checkpoint_dir, overrides), **kwargs)  # type: ignore[arg-type]
        model.load_weights(checkpoint_dir)
        return model

    def load_weights(self, checkpoint_dir: str | Path) -> LoadReport:
        """Read this rank's slices of the checkpoint (MTP tensors only when ``enable_mtp``)."""
        return load_weights(self, checkpoint_dir, self.config, load_mtp=self.enable_mtp)

    def make_cache(
        self,
        num_slots: int,
        num_pages: int,
        page_size: int = 16,
        max_spec_tokens: int = 0,
        num_snapshots: int = 0,
    ) -> LingCache:
        """A cache shaped for this shard (local heads, model dtype, MTP layer when enabled;
        ``num_snapshots`` prefix-cache Lightning-state snapshot buffers)."""
        return LingCache(
            self.config,
            num_slots,
            num_pages,
            page_size,
            tp_size=self.tp.size,
            device=self.device,
            dtype=self.dtype,
            include_mtp=self.enable_mtp,
            max_spec_tokens=max_spec_tokens,
            num_snapshots=num_snapshots,
        )

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, cache: LingCache) -> torch.Tensor:
        batch = self._on_device(batch, cache)
        h = self.model.word_embeddings(batch.input_ids)
        if self.use_kernels and _pow2(self.config.hidden_size):
            with rope_step_memo():  # one cos/sin per step, not one per layer
                return self._forward_fused_norms(h, batch, cache)
        for layer in self.model.layers:
            h = layer(h, batch, cache)
        return self.model.norm(h)

    def _forward_fused_norms(self, h: torch.Tensor, batch: ForwardBatch, cache: LingCache) -> torch.Tensor:
        """The same pre-norm blocks with every residual add fused into the next RMSNorm (one
        ``add_rmsnorm`` launch each, residual updated in place), vLLM/SGLang style. A MoE layer's
        decode output reaches the next norm as its fp32 per-slot partials, summed in that launch."""
        from ling_runtime.kernels import add_rmsnorm

        layers = self.model.layers
        residual = h.contiguous()
        y = layers[0].input_layernorm(residual)
        for i, layer in enumerate(layers):
            a = layer.attention(y, batch, cache)
            ln2 = layer.post_attention_layernorm
            y, residual = add_rmsnorm(a.contiguous(), residual, ln2.weight, ln2.eps)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            y, residual = mlp_add_rmsnorm(layer.mlp, y, residual, nxt)
        return y

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab_size] float32 over the full vocabulary."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def mtp_forward(self, batch: ForwardBatch, cache: LingCache, prev_hidden: torch.Tensor) -> torch.Tensor:
        """NEXTN draft step: ``batch.input_ids[i]`` is the token after position ``batch.positions[i]``
        and ``prev_hidden[i]`` the hidden (from ``forward`` or the previous draft step) at that position.
        Returns the final-normed MTP hidden [T, H]; feed it to ``compute_logits`` and as the next
        draft step's ``prev_hidden`` (SGLang's NEXTN convention)."""
        if self.mtp is None:
            raise ValueError("enable_mtp: the model was built without the MTP layer")
        if cache.mtp_mla_index is None:
            raise ValueError("include_mtp: the cache has no latent-KV layer for the MTP layer")
        batch = self._on_device(batch, cache)
        embeds = self.model.word_embeddings(batch.input_ids)
        if self.use_kernels and _pow2(self.config.hidden_size):
            return self.mtp.forward_fused_norms(embeds, prev_hidden.to(self.device), batch, cache)
        return self.mtp(embeds, prev_hidden.to(self.device), batch, cache)

    def _on_device(self, batch: ForwardBatch, cache: LingCache) -> ForwardBatch:
        if self.config.mla_layer_ids or self.mtp is not None:
            cache.check_block_tables(batch.seq_lens, batch.prefix_lens, int(batch.block_tables.shape[1]))
        # Accept host-built batches; the engine builds them on the device to skip this copy.
        # "cuda" and "cuda:0" are the same place: a copy here would also break CUDA-graph capture.
        d = batch.input_ids.device
        same = d.type == self.device.type and (self.device.index is None or d.index == self.device.index)
        return batch if same else batch.to(self.device)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
