"""The MLA prefill/extend path with the Triton flash kernel (``MLAttention._prefill_kernel``) against
the plain-torch expanded path, on the tiny model: only the MLA layers switch, so any difference in
the logits is theirs. Two prompts of different lengths, then an extend chunk of several tokens per
sequence over a cached prefix (the kernel reads the prefix latents back from the paged cache).

TRITON_INTERPRET=1 must be set before triton is first imported (``triton.jit`` picks the interpreter
at decoration time), so the test runs this file as a script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = 16


def _case() -> dict[str, object]:
    import torch
    from ling_runtime.config import LingConfig
    from ling_runtime.kernels import mla_prefill as prefill_mod
    from ling_runtime.model import ForwardBatch, LingForCausalLM
    from ling_runtime.model.mla import MLAttention
    from ling_runtime.tiny import init_random_weights, tiny_config

    calls = [0]
    real = prefill_mod.mla_prefill

    def counted(*a: object, **kw: object) -> torch.Tensor:
        calls[0] += 1
        return real(*a, **kw)  # type: ignore[arg-type]

    prefill_mod.mla_prefill = counted  # the model looks it up on the module per call
    torch.manual_seed(0)
    # qk_rope_head_dim 16: the kernel's tl.arange/tl.dot widths must be powers of two >= 16.
    cfg = LingConfig.from_hf(tiny_config(qk_rope_head_dim=16))
    model = LingForCausalLM(cfg, dtype=torch.float32, chunk_size=16, use_kernels=False)
    init_random_weights(model, seed=3)
    mla_layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    caches = {flag: model.make_cache(num_slots=4, num_pages=32, page_size=PAGE) for flag in (0, 1)}
    tables = {1: list(range(0, 8)), 3: list(range(8, 16))}
    slots = [1, 3]
    gen = torch.Generator().manual_seed(7)
    steps: list[dict[str, object]] = []

    def step(name: str, lens: list[int], prefix: list[int]) -> None:
        tokens = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
        logits = {}
        for flag in (0, 1):
            model.set_use_kernels(False)
            for m in mla_layers:  # MLA alone on the kernel path
                m.use_kernels = bool(flag)
            before = calls[0]
            batch = ForwardBatch.build(tokens, prefix, slots, [tables[s] for s in slots])
            logits[flag] = model.compute_logits(model(batch, caches[flag])).float()
            if flag:
                steps.append({"step": name, "kernel_calls": calls[0] - before})
        steps[-1]["max_abs_diff"] = float((logits[0] - logits[1]).abs().max())
        steps[-1]["scale"] = float(logits[0].abs().max())

    step("prefill", [11, 40], [0, 0])
    # Extend: 9 and 5 new tokens after cached prefixes of 11 and 40 (a partial page, then page
    # boundaries crossed inside the chunk).
    step("extend", [9, 5], [11, 40])
    return {"steps": steps, "mla_layers": len(mla_layers)}


def test_mla_prefill_kernel_matches_plain_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mla_layers"] > 0
    assert [s["step"] for s in result["steps"]] == ["prefill", "extend"]
    for s in result["steps"]:
        # Every MLA layer of both steps took the kernel (one call per layer per forward).
        assert s["kernel_calls"] == result["mla_layers"], s
        assert s["scale"] > 1e-2, s  # logits that are not all ~0 (the comparison means something)
        # float32 model under the interpreter: kernel and reference differ in summation order only.
        assert s["max_abs_diff"] < 1e-4, s


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
    json.dump(_case(), sys.stdout)
