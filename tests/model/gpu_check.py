"""Manual GPU check (not collected by pytest): PYTHONPATH=runtime python3 tests/model/gpu_check.py

1. tiny model on cuda fp32 == cpu fp32 (greedy tokens, logits); bf16 runs near fp32.
2. TP 2 over NCCL on 2 GPUs == TP 1 (when 2 GPUs exist).
3. real Ling-2.6-flash dims, 2 layers (1 Lightning + 1 MLA, MoE), bf16: prefill 1024 + 16 decode steps.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ling_runtime.config import LingConfig
from ling_runtime.model import ForwardBatch, LingForCausalLM, greedy_generate
from ling_runtime.model.parallel import free_loopback_port, init_process_group
from ling_runtime.tiny import init_random_weights, tiny_config, write_checkpoint

from model.conftest import flash_config
from model.tp_worker import run_scenario


def tp_rank(rank: int, ckpt: str, port: int, out: str) -> None:
    torch.cuda.set_device(rank)
    tp = init_process_group(rank, 2, "127.0.0.1", port, backend="nccl")
    m = LingForCausalLM(
        LingConfig.from_hf(ckpt),
        tp_rank=rank,
        tp_size=2,
        tp_group=tp.group,
        device=f"cuda:{rank}",
        dtype=torch.float32,
        enable_mtp=True,
    )
    m.load_weights(ckpt)
    torch.save({k: v.cpu() for k, v in run_scenario(m).items()}, Path(out) / f"r{rank}.pt")
    torch.distributed.destroy_process_group()


def main() -> None:
    d = write_checkpoint(tempfile.mkdtemp(), tiny_config(), seed=0)
    cpu = LingForCausalLM.from_pretrained(d, dtype=torch.float32, enable_mtp=True)
    gpu = LingForCausalLM.from_pretrained(d, dtype=torch.float32, device="cuda", enable_mtp=True)
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 117))]
    a, b = (
        greedy_generate(cpu, prompts, 16, prefill_chunk=8),
        greedy_generate(gpu, prompts, 16, prefill_chunk=8),
    )
    print("tiny greedy cpu==cuda:", a == b)
    sa, sb = run_scenario(cpu), run_scenario(gpu)
    print("tiny scenario max |cpu-cuda|:", max((sa[k] - sb[k].cpu()).abs().max().item() for k in sa))
    bf = LingForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device="cuda", enable_mtp=True)
    sc = run_scenario(bf)
    print("tiny bf16 max |fp32-bf16|:", max((sa[k] - sc[k].cpu()).abs().max().item() for k in sa))
    if torch.cuda.device_count() >= 2:
        out = tempfile.mkdtemp()
        mp.spawn(tp_rank, args=(str(d), free_loopback_port(), out), nprocs=2)
        for r in range(2):
            got = torch.load(Path(out) / f"r{r}.pt")
            print(f"TP2 nccl rank {r} max |tp2-tp1|:", max((got[k] - sa[k]).abs().max().item() for k in sa))
    cfg = LingConfig.from_hf(flash_config(num_hidden_layers=2, layer_group_size=2))
    t = time.time()
    big = LingForCausalLM(cfg, device="cuda", dtype=torch.bfloat16, enable_mtp=True)
    init_random_weights(big, seed=0)
    print(
        f"flash-dims 2-layer model: {sum(p.numel() for p in big.parameters()) / 1e9:.2f}B params, init {time.time() - t:.0f}s"
    )
    cache = big.make_cache(num_slots=8, num_pages=8 * 66, page_size=16)
    ids = torch.randint(0, cfg.vocab_size, (1024,)).tolist()
    tables = [list(range(b * 66, b * 66 + 66)) for b in range(8)]
    torch.cuda.synchronize()
    t = time.time()
    h = big(ForwardBatch.build([ids[:1024]], [0], [0], tables[:1], device="cuda"), cache)
    logits = big.compute_logits(h[-1:])
    torch.cuda.synchronize()
    print(f"prefill 1024: {time.time() - t:.2f}s, logits finite: {bool(torch.isfinite(logits).all())}")
    for bs in (1, 8):
        for b in range(bs):
            big(ForwardBatch.build([ids[:16]], [0], [b], [tables[b]], device="cuda"), cache)
        torch.cuda.synchronize()
        t = time.time()
        for step in range(16):
            batch = ForwardBatch.build(
                [[7]] * bs, [16 + step] * bs, list(range(bs)), tables[:bs], device="cuda"
            )
            big.compute_logits(big(batch, cache))
        torch.cuda.synchronize()
        print(f"eager reference decode, 2 layers, batch {bs}: {(time.time() - t) / 16 * 1000:.1f} ms/step")
    mb = ForwardBatch.build([ids[1:17]], [0], [0], tables[:1], device="cuda")
    print("mtp finite:", bool(torch.isfinite(big.compute_logits(big.mtp_forward(mb, cache, h[:16]))).all()))


if __name__ == "__main__":
    main()
