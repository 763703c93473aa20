"""The model's Triton path (``use_kernels=True``) against its plain-torch path on the tiny model:
prefill (multi-chunk, stale slots), decode, spec verify + commit rollback, and a one-token prompt,
with every kernel the model wires in actually called. Runs model_kernels_case.py in a subprocess
because TRITON_INTERPRET=1 must be set before triton is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_model_kernels_match_reference() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("model_kernels_case.py"))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    names = [s["step"] for s in result["steps"]]
    assert names[0] == "prefill" and "verify" in names and names[-1] == "one_token_prompt"
    for s in result["steps"]:
        assert s["greedy_equal"], s
        # float32 model: the kernels and references differ only in summation order.
        assert s["max_abs_diff"] < 1e-4, s
    for name, n in result["calls"].items():
        assert n > 0, f"{name} was never called: the model did not take the kernel path"
