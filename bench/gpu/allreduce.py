"""All-reduce latency inside CUDA graphs at the sizes a TP decode step reduces (hidden 4096 bf16 x
batch 1..128 = 8 KB..1 MB): NCCL vs torch symmetric-memory one-shot / two-shot (multicast stays off,
as the lent machines require). One process per GPU; needs >= 2 GPUs (records why when it has fewer).

    python3 bench/gpu/allreduce.py        # on nvidia-h200-x2 -> $OUT/gpu-allreduce.json
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import environment, write_results

HIDDEN = 4096
BATCHES = (1, 8, 32, 128)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def graph_time(fn, iters: int = 50, reps: int = 10) -> float:
    """Median seconds per call of fn over `iters` calls captured in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return sorted(times)[len(times) // 2]


def worker(rank: int, world: int, port: int, q) -> None:  # type: ignore[no-untyped-def]
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    group_name = dist.group.WORLD.group_name
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem
    except Exception:
        pass
    for b in BATCHES:
        x = torch.randn(b, HIDDEN, device="cuda", dtype=torch.bfloat16)
        row: dict = {"batch": b, "bytes": x.numel() * 2}
        row["nccl_us"] = graph_time(lambda: dist.all_reduce(x)) * 1e6  # noqa: B023
        if symm is not None:
            for name in ("one_shot_all_reduce", "two_shot_all_reduce_"):
                try:
                    buf = symm.empty(x.shape, dtype=x.dtype, device="cuda")
                    symm.rendezvous(buf, group_name)
                    op = getattr(torch.ops.symm_mem, name)
                    buf.copy_(x)
                    got = op(buf, "sum", group_name)
                    got = buf if got is None else got
                    ok = torch.allclose(got.float(), (x.float() * world), rtol=2e-2, atol=1e-2)
                    row[f"{name}_ok"] = bool(ok)
                    row[f"{name}_us"] = graph_time(lambda: op(buf, "sum", group_name)) * 1e6  # noqa: B023
                except Exception as exc:
                    row[f"{name}_error"] = repr(exc)[:200]
        rows.append(row)
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def main() -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result: dict = {"env": environment(), "gpus": n}
    if n < 2:
        result["skipped_because"] = f"needs >= 2 GPUs, found {n}"
        print(result)
        write_results("gpu-allreduce", result)
        return
    port = 29511
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    try:
        mp.spawn(worker, args=(n, port, q), nprocs=n, join=True)
        result["rows"] = q.get(timeout=10)
    except Exception:
        result["error"] = traceback.format_exc()[-2000:]
    print(result)
    write_results("gpu-allreduce", result)


if __name__ == "__main__":
    sys.exit(main())
