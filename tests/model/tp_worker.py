"""A fixed serving scenario run on one TP shard (also the TP-1 baseline), and the spawned rank entry."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from ling_runtime.config import LingConfig
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.model.parallel import free_loopback_port, init_process_group

PROMPT_A = [5, 9, 33, 100, 250, 7, 8, 300, 41, 42, 43]
PROMPT_B = [17, 18, 19, 500, 2, 3]


def run_scenario(model: LingForCausalLM) -> dict[str, torch.Tensor]:
    """Chunked prefill of two sequences, mixed prefill+decode, pure decode, and one MTP draft step."""
    cache = model.make_cache(num_slots=3, num_pages=8, page_size=4)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    out: dict[str, torch.Tensor] = {}
    b1 = ForwardBatch.build([PROMPT_A[:7], PROMPT_B], [0, 0], [2, 0], tables)
    h1 = model(b1, cache)
    out["prefill"] = model.compute_logits(h1)
    b2 = ForwardBatch.build([PROMPT_A[7:], [77]], [7, 6], [2, 0], tables)
    out["mixed"] = model.compute_logits(model(b2, cache))
    for step, (a, b) in enumerate([(11, 12), (13, 14)]):
        b3 = ForwardBatch.build([[a], [b]], [11 + step, 7 + step], [2, 0], tables)
        out[f"decode{step}"] = model.compute_logits(model(b3, cache))
    if model.enable_mtp:
        # Draft over sequence B's prompt: token i+1 with the main hidden at position i.
        rows = slice(7, 7 + len(PROMPT_B))
        mb = ForwardBatch.build([[*PROMPT_B[1:], 77]], [0], [0], [tables[1]])
        out["mtp"] = model.compute_logits(model.mtp_forward(mb, cache, h1[rows]))
    return out


def rank_main(rank: int, world: int, port: int, ckpt: str, out_dir: str, variants: list[dict]) -> None:
    """One spawned rank: join the group on loopback, run the scenario once per model variant."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    tp = init_process_group(rank, world, "127.0.0.1", port, backend="gloo")
    cfg = LingConfig.from_hf(ckpt)
    for i, kwargs in enumerate(variants):
        model = LingForCausalLM(
            cfg, tp_rank=tp.rank, tp_size=tp.size, tp_group=tp.group, dtype=torch.float32, **kwargs
        )
        model.load_weights(ckpt)
        torch.save(run_scenario(model), Path(out_dir) / f"rank{rank}-{i}.pt")
    torch.distributed.destroy_process_group()


def run_ranks(world: int, ckpt: str, out_dir: str, variants: list[dict], timeout_s: float = 180.0) -> None:
    """Run ``world`` ranks as forked processes (no torch re-import per rank: seconds, not tens of
    seconds, on a busy machine) and fail rather than hang if a rank does not finish in time."""
    ctx = mp.start_processes(
        rank_main,
        args=(world, free_loopback_port(), ckpt, out_dir, variants),
        nprocs=world,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"TP {world}: ranks did not finish within {timeout_s}s")
