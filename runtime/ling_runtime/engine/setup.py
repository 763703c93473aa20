"""From serve flags to sizes every rank agrees on, and from those to one rank's loaded `ModelRunner`.

`RuntimeSpec` is plain picklable data: rank 0 computes it once and hands the same object to every
worker (mp or Ray), so all shards allocate identical caches and run identical steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ling_runtime.cli import ServeArgs
from ling_runtime.config import LingConfig
from ling_runtime.engine.engine import EngineConfig

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


@dataclass(frozen=True)
class RuntimeSpec:
    model_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"
    num_slots: int = 64
    num_pages: int = 2048
    page_size: int = 16
    num_draft_steps: int = 0
    context_length: int = 4096
    max_running_requests: int = 64
    chunked_prefill_size: int = 256
    seed: int = 0
    cuda_graph: bool = True  # decode CUDA graphs on cuda (off: --disable-cuda-graph)
    # --quantization fp8: FP8 block-scaled projection/expert weights (None: FP8 only for an FP8
    # checkpoint in bf16, see LingForCausalLM's weight_dtype).
    quantization: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_running_requests=self.max_running_requests,
            num_slots=self.num_slots,
            num_pages=self.num_pages,
            page_size=self.page_size,
            chunked_prefill_size=self.chunked_prefill_size,
            context_length=self.context_length,
            num_draft_steps=self.num_draft_steps,
            seed=self.seed,
        )


def runtime_spec(args: ServeArgs, model_dir: str) -> RuntimeSpec:
    """Sizes from the flags and the checkpoint's config (validated here, before any rank starts)."""
    config = LingConfig.from_hf(model_dir, args.json_model_override_args)
    config.validate_tp(args.tp_size)
    if args.speculative and config.num_nextn_predict_layers < 1:
        raise ValueError(
            "--speculative-algorithm NEXTN: the checkpoint has no MTP layer (num_nextn_predict_layers=0)"
        )
    dtype = args.dtype
    if dtype == "auto":
        # CPU kernels want float32; on GPU follow the checkpoint (bf16 for Ling).
        dtype = (
            "float32"
            if args.device == "cpu"
            else ("bfloat16" if config.torch_dtype == "float32" else config.torch_dtype)
        )
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype}: accepted {sorted(_DTYPES)}")
    context = args.context_length or config.max_position_embeddings
    slots = args.max_mamba_cache_size or args.max_running_requests
    total_tokens = args.max_total_tokens or max(context, 32768)
    return RuntimeSpec(
        model_dir=model_dir,
        overrides=dict(args.json_model_override_args),
        dtype=dtype,
        device=args.device,
        num_slots=slots,
        num_pages=-(-total_tokens // args.page_size),
        page_size=args.page_size,
        num_draft_steps=args.speculative_num_steps if args.speculative else 0,
        context_length=context,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        seed=args.seed,
        cuda_graph=not args.disable_cuda_graph,
        quantization=args.quantization,
    )


def build_runner(spec: RuntimeSpec, tp_rank: int = 0, tp_size: int = 1, tp_group=None, local_device: int = 0):
    """Load this rank's shard and allocate its cache; returns (ModelRunner, seconds it took)."""
    from ling_runtime.engine.runner import ModelRunner
    from ling_runtime.model import LingForCausalLM

    started = time.monotonic()
    device = torch.device("cpu") if spec.device == "cpu" else torch.device("cuda", local_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = LingForCausalLM.from_pretrained(
        spec.model_dir,
        spec.overrides,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
        device=device,
        dtype=spec.torch_dtype,
        enable_mtp=spec.num_draft_steps > 0,
        weight_dtype="fp8" if spec.quantization == "fp8" else None,
    )
    model.eval()
    graphs = spec.cuda_graph and device.type == "cuda" and model.use_kernels
    cache = model.make_cache(
        num_slots=spec.num_slots,
        # One page more than the engine hands out: the graphs' padding rows write there.
        num_pages=spec.num_pages + int(graphs),
        page_size=spec.page_size,
        max_spec_tokens=spec.num_draft_steps + 1 if spec.num_draft_steps else 0,
    )
    runner = ModelRunner(model, cache, device, return_logits=tp_rank == 0)
    if graphs:
        lookahead = spec.num_draft_steps + 1
        runner.enable_cuda_graphs(
            max_batch=min(spec.max_running_requests, spec.num_slots),
            max_pages=-(-(spec.context_length + lookahead) // spec.page_size),
            scratch_page=spec.num_pages,
            num_drafts=spec.num_draft_steps,
        )
    return runner, time.monotonic() - started
