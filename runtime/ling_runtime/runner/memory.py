"""`--mem-fraction-static`: the KV cache's size from the device's memory, before any rank allocates it.

SGLang's meaning, computed before loading instead of after: weights, caches and everything static may
take `fraction` of the device's total memory; the rest is left for activations, CUDA graphs and
communication buffers. So the MLA page pool gets

    available now - (1 - fraction) x total - this rank's weights - the fixed caches

(the fixed caches: linear-attention state slots, MTP verify states, prefix-cache snapshots), rounded
down to whole pages and capped at `--max-running-requests` full contexts (more pages could only hold
evicted prefixes). The weights and cache shapes are not estimated: the model and its cache are built on
the meta device with this rank's TP shard, which costs no memory and gives exact byte counts. The
result is written into `--max-total-tokens`, so every rank, the engine and the scheduler see one number.

"The device" is rank 0's: GPU 0 of the head process on cuda; on cpu the memory this process may use
(the cgroup's limit when there is one, else the machine's RAM), with MemAvailable as what is free.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ling_runtime.config import LingConfig
from ling_runtime.model import LingForCausalLM
from ling_runtime.runner.build import TORCH_DTYPES
from ling_runtime.settings import Settings, SettingsError

log = logging.getLogger("ling_runtime.memory")

CGROUP = Path("/sys/fs/cgroup")


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    total: int  # bytes the fraction is a fraction of
    available: int  # bytes free now


@dataclasses.dataclass(frozen=True)
class CacheBudget:
    """How a fraction of the device's memory was divided (bytes), for the log and the tests."""

    weights: int
    fixed_cache: int  # state slots, MTP verify states, snapshots, one scratch page
    page: int  # one MLA page (page_size tokens, every MLA layer)
    pool: int  # what the pages get
    tokens: int  # --max-total-tokens


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup v2, None when unlimited or not a cgroup v2."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        usage = int((CGROUP / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else (int(limit), usage)


def device_memory(device: str) -> DeviceMemory:
    """Total and free memory of rank 0's device (see the module docstring)."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info(0)
        return DeviceMemory(total=int(total), available=int(free))
    info = _meminfo()
    total, available = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limit, usage = cgroup
        total, available = min(total, limit), min(available, max(limit - usage, 0))
    return DeviceMemory(total=total, available=available)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_cache_budget(settings: Settings, memory: DeviceMemory) -> CacheBudget:
    """The page pool `settings.mem_fraction_static` leaves on this device (settings must be resolved)."""
    fraction = settings.mem_fraction_static
    if fraction is None or settings.model_dir is None or settings.context_length is None:
        raise ValueError("kv_cache_budget: needs --mem-fraction-static and resolved settings")
    k = settings.num_draft_steps
    config = LingConfig.from_hf(settings.model_dir, settings.json_model_override_args)
    model = LingForCausalLM(
        config,
        tp_rank=0,
        tp_size=settings.tp_size,
        tp_group=None,
        device="meta",
        dtype=TORCH_DTYPES[settings.dtype],
        enable_mtp=k > 0,
        weight_dtype="fp8" if settings.quantization == "fp8" else None,
    )
    weights = _bytes(model.parameters()) + _bytes(model.buffers())

    def cache_bytes(pages: int) -> int:
        cache = model.make_cache(
            num_slots=settings.num_slots,
            num_pages=pages,
            page_size=settings.page_size,
            max_spec_tokens=k + 1 if k else 0,
            num_snapshots=settings.num_snapshots,
        )
        return _bytes(vars(cache).values())

    fixed = cache_bytes(1)
    page = cache_bytes(2) - fixed
    pool = memory.available - int((1.0 - fraction) * memory.total) - weights - fixed
    if pool < page:
        raise SettingsError(
            f"--mem-fraction-static {fraction}: leaves no room for the KV cache: "
            f"{fraction:.2f} x {memory.total / 2**30:.1f} GiB minus {(memory.total - memory.available) / 2**30:.1f} "
            f"GiB in use, {weights / 2**30:.2f} GiB of weights and {fixed / 2**30:.2f} GiB of state slots; "
            "raise the fraction, or lower --max-mamba-cache-size / --max-running-requests"
        )
    pages = pool // page
    cap = -(-settings.max_running_requests * (settings.context_length + k + 1) // settings.page_size)
    pages = min(pages, cap)
    return CacheBudget(weights, fixed, page, pool, pages * settings.page_size)


def size_kv_cache(settings: Settings, memory: DeviceMemory | None = None) -> Settings:
    """Settings with --max-total-tokens from --mem-fraction-static (unchanged when either is not
    applicable: no fraction given, or --max-total-tokens given, which wins as in SGLang)."""
    if settings.mem_fraction_static is None or settings.max_total_tokens is not None:
        return settings
    memory = memory or device_memory(settings.device)
    budget = kv_cache_budget(settings, memory)
    log.info(
        "--mem-fraction-static %.2f of %.1f GiB (%.1f GiB free): weights %.2f GiB, state slots %.2f GiB, "
        "KV cache %d tokens (%.2f GiB)",
        settings.mem_fraction_static,
        memory.total / 2**30,
        memory.available / 2**30,
        budget.weights / 2**30,
        budget.fixed_cache / 2**30,
        budget.tokens,
        budget.tokens // settings.page_size * budget.page / 2**30,
    )
    if settings.context_length and budget.tokens < settings.context_length:
        log.warning(
            "the KV cache holds %d tokens, less than one full context (%d): longer requests get a 400",
            budget.tokens,
            settings.context_length,
        )
    return dataclasses.replace(settings, max_total_tokens=budget.tokens)
