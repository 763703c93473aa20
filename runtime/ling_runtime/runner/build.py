"""From `Settings` to one rank's loaded `ModelRunner`: the same code on every tensor-parallel rank.

Every rank receives the same resolved `Settings`, so all shards allocate identical caches and the
same CUDA graph buckets.
"""

from __future__ import annotations

import time

import torch

from ling_runtime.config import LingConfig
from ling_runtime.loader import fill_dummy
from ling_runtime.model import LingForCausalLM
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.settings import Settings

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


def build_runner(
    settings: Settings, tp_rank: int = 0, tp_size: int = 1, tp_group=None, local_device: int = 0
) -> tuple[ModelRunner, float]:
    """Load this rank's shard and allocate its cache; returns (ModelRunner, seconds it took).
    `settings` must be resolved (`Settings.resolve`): the checkpoint, dtype and context are known."""
    if settings.model_dir is None or settings.context_length is None:
        raise ValueError("build_runner: unresolved settings; call Settings.resolve(model_dir) first")
    started = time.monotonic()
    device = torch.device("cpu") if settings.device == "cpu" else torch.device("cuda", local_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    k = settings.num_draft_steps
    config = LingConfig.from_hf(settings.model_dir, settings.json_model_override_args)
    model = LingForCausalLM(
        config,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
        device=device,
        dtype=TORCH_DTYPES[settings.dtype],
        enable_mtp=k > 0,
        # --quantization fp8: FP8 block-scaled projection/expert weights (None: FP8 only for an FP8
        # checkpoint in bf16, see LingForCausalLM's weight_dtype).
        weight_dtype="fp8" if settings.quantization == "fp8" else None,
    )
    if settings.load_format == "dummy":
        fill_dummy(model, settings.seed, tp_rank)  # random weights on the device, nothing read
    else:
        model.load_weights(settings.model_dir)
    model.eval()
    graphs = settings.cuda_graph and device.type == "cuda" and model.use_kernels
    cache = model.make_cache(
        num_slots=settings.num_slots,
        # One page more than the engine hands out: the graphs' padding rows write there.
        num_pages=settings.num_pages + int(graphs),
        page_size=settings.page_size,
        max_spec_tokens=k + 1 if k else 0,
        num_snapshots=settings.num_snapshots,
    )
    runner = ModelRunner(model, cache, device, return_logits=tp_rank == 0)
    if graphs:
        runner.enable_cuda_graphs(
            # Buckets up to --cuda-graph-max-bs (default: the whole running set).
            max_batch=settings.graph_max_batch,
            max_pages=-(-(settings.context_length + k + 1) // settings.page_size),
            scratch_page=settings.num_pages,
            num_drafts=k,
        )
    return runner, time.monotonic() - started
