"""The graph bodies on the Triton path (kernels interpreted on the CPU): bench/gpu/mtp_graphs.py's
check part in a subprocess, since TRITON_INTERPRET=1 must be set before triton is first imported.

It generates greedily through the runner with the decode / MTP draft / verify bodies (eager mode:
everything a capture records, on the kernels) and through the plain-torch eager reference (k = 0,
1, 2; 3 sequences in a bucket of 4: one padding row), and compares the tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_graph_bodies_on_the_kernels_match_the_reference(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "mtp_graphs.py", "--tiny", "--steps", "4"],
        cwd=ROOT / "bench" / "gpu",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiny = json.loads((tmp_path / "gpu-mtp-graphs.json").read_text())["tiny"]
    for k in (0, 1, 2):
        assert tiny[f"k{k}_greedy_equal"], tiny
        assert tiny[f"k{k}_graphs_accepted"] == tiny[f"k{k}_reference_accepted"], tiny
    assert tiny["k0_graph_steps"] > 0
    assert tiny["k1_spec_graph_steps"] > 0 and tiny["k2_spec_graph_steps"] > 0
