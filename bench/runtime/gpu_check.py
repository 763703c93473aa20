"""GPU check of the engine on the built-in tiny model: TP 1 and TP 2 (mp launcher, NCCL), MTP on/off.

`python -m bench.runtime.gpu_check [--json PATH]` (needs CUDA; TP 2 needs two GPUs). For each setting
it starts the group, runs 4 greedy requests together and compares them with the model's own
`greedy_generate` on one GPU (float32, so TP 2 must agree exactly), then times one 64-token request.
Writes bench/results/runtime-gpu-check.json with the date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "runtime-gpu-check.json"
PROMPTS = [list(range(10, 60)), [5, 6, 7], list(range(100, 400, 3)), [42] * 17]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_setting(model_dir: str, tokenizer, tp: int, steps: int, expected: list[list[int]]) -> dict:
    from ling_runtime.distributed.mp_launcher import launch_mp
    from ling_runtime.engine.engine import Engine
    from ling_runtime.engine.sampling import SamplingParams
    from ling_runtime.settings import Settings

    from tests.runtime.engine_utils import generate_all, mtp, output_ids

    settings = Settings(
        device="cuda", dtype="float32", max_mamba_cache_size=8, tp_size=tp, **mtp(steps)
    ).resolve(model_dir)
    executor, load_s = launch_mp(settings, tp, "127.0.0.1", _free_port(), 120)
    engine = Engine(executor, tokenizer, settings)
    engine.start()
    try:
        greedy = [SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
        events = generate_all(engine, PROMPTS, greedy)
        same = [output_ids(e) for e in events] == expected
        accepted = sum(e[-1].spec_accepted for e in events)
        generate_all(
            engine, [PROMPTS[0]], [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)]
        )
        started = time.perf_counter()
        [timed] = generate_all(
            engine, [PROMPTS[0]], [SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)]
        )
        wall = time.perf_counter() - started
    finally:
        engine.stop()
    return {
        "tp": tp,
        "mtp_steps": steps,
        "load_s": round(load_s, 2),
        "greedy_equals_oracle": same,
        "spec_accepted_tokens": accepted,
        "batch1_64_tokens_s": round(wall, 3),
        "batch1_tokens_per_s": round(64 / wall, 1),
        "completion_tokens": timed[-1].completion_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from ling_runtime.builtin import builtin_model_dir
    from ling_runtime.model import LingForCausalLM, greedy_generate
    from ling_runtime.text.tokenizer import TokenizerBundle

    model_dir = str(builtin_model_dir())
    tokenizer = TokenizerBundle.from_dir(model_dir)
    oracle = LingForCausalLM.from_pretrained(model_dir, device="cuda", dtype=torch.float32)
    expected = [greedy_generate(oracle, p, 32) for p in PROMPTS]
    del oracle
    settings = [(1, 0), (1, 3)] + ([(2, 0), (2, 3)] if torch.cuda.device_count() >= 2 else [])
    results = []
    for tp, steps in settings:
        results.append(run_setting(model_dir, tokenizer, tp, steps, expected))
        print(json.dumps(results[-1]), flush=True)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.runtime.gpu_check",
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "model": "built-in tiny, float32 (exact comparison with greedy_generate on one GPU)",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["greedy_equals_oracle"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
