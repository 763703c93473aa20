"""Render the recorded GPU runs (bench/results/gpu-*.json) as markdown tables.

python3 bench/gpu/report.py > /tmp/tables.md     # pasted under "All measurements" in gpu.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    env, ceil = data["env"], data["ceilings"]
    out = [f"### {path.name}", ""]
    out.append(
        f"{env['date_utc']}, {env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"`python3 bench/gpu/{env['command']}`. Ceilings: copy {ceil['copy_Bps'] / 1e12:.2f} TB/s, "
        f"read {ceil['read_Bps'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s, "
        f"fp8 {ceil.get('fp8_flops', 0) / 1e12:.0f} TFLOP/s."
    )
    out.append("")
    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        return "\n".join(out)
    if "op" in rows[0]:
        cols = ["op", "shape", "variant", "us", "GBps", "x_read", "relerr"]
    else:
        cols = [c for c in rows[0] if c not in ("error",)]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    for r in data["rows"]:
        if "error" in r:
            out.append(
                f"\nERROR in {r.get('op', r.get('layer', r.get('B')))}: `{r['error'].splitlines()[-1]}`"
            )
    out.append("")
    return "\n".join(out)


def main() -> None:
    names = sys.argv[1:] or sorted(p.name for p in RESULTS.glob("gpu-*-run*.json"))
    print("\n".join(render(RESULTS / n) for n in names))


if __name__ == "__main__":
    main()
