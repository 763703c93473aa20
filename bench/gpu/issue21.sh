#!/bin/bash
# Issue 21 in one GPU call (one card): part 4's served-path GPU tier, then part 1's ratios measured in
# the same run: `ling-runtime serve --load-format dummy` (Ling-2.6-flash config, FP8, TP 1) over HTTP
# with bench/serving at concurrency 1, 8, 32, 128 and the 1K / 8K TTFT prompts, against
# bench/gpu/full_model.py's graph replay and in-process prefill at the same layers and context.
#
#   LAYERS=16 bash bench/gpu/issue21.sh     # H100 (80 GB): 16 real-size layers; H200: LAYERS=32
#
# Needs fastapi/uvicorn/pydantic on the GPU image (the repo's .whl/, installed to /tmp/site as
# bench/results/gpu.md says). Writes $OUT/: pytest-gpu.log, gpu-full-model.json, serving-c*.json,
# ttft-*.json, server.log, ratios.json (printed at the end). Each part has its own time limit.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/issue21}
LAYERS=${LAYERS:-16}
PORT=${PORT:-30123}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/runtime:$PWD:${PYTHONPATH:-}"
export OUT

echo "=== 1. GPU tier, served path (tests/gpu/test_served_gpu.py)"
timeout 170 python3 -m pytest -m gpu tests/gpu/test_served_gpu.py -q -x -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest-gpu.log" | tail -15

echo "=== 2. graph replay and in-process prefill (full_model.py, $LAYERS layers, FP8)"
(cd bench/gpu && timeout 110 python3 full_model.py --layers "$LAYERS" --batches 1,8,32,128 --ctx 1280 \
  --prefill 1024,8192 --prefill-chunk 8192 --skip-eager --skip-mtp --skip-profile --iters 5 --budget 95 \
  > "$OUT/full-model.log" 2>&1); tail -12 "$OUT/full-model.log"

echo "=== 3. served over HTTP (ling-runtime serve --load-format dummy, FP8, TP 1, defaults for cuda)"
python3 -m ling_runtime serve --device cuda --load-format dummy --quantization fp8 \
  --json-model-override-args "{\"num_hidden_layers\": $LAYERS}" --host 127.0.0.1 --port "$PORT" \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2> /dev/null || break
  sleep 1
done
B="timeout 60 python3 -m bench.serving --base-url http://127.0.0.1:$PORT --seed 1"
for c in 1 8 32 128; do
  n=$((c * 2 > 8 ? c * 2 : 8))
  $B --input-len 1024 --output-len 256 --range-ratio 1 --ignore-eos --max-concurrency $c \
    --num-prompts $n --output "$OUT/serving-c$c.json" 2>/dev/null | tail -1
done
for n in 1024 8192; do
  $B --dataset fixed --input-len $n --max-tokens 1 --max-concurrency 1 --num-prompts 4 \
    --output "$OUT/ttft-$n.json" 2>/dev/null | tail -1
done
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^ling_runtime_engine_" > "$OUT/engine-metrics.txt"
kill -TERM $SERVER; wait $SERVER

echo "=== 4. ratios (same run, same card)"
python3 - << 'EOF'
import json, os
out = os.environ["OUT"]
def load(name):
    try:
        return json.load(open(f"{out}/{name}"))
    except (OSError, ValueError):
        return None
fm = load("gpu-full-model.json") or {}
decode = {r["batch"]: r for r in (fm.get("decode") or {}).get("rows", fm.get("decode_rows_so_far", [])) if "tok_s" in r}
ttft = {(r["chunk"], r["prompt"]): r for r in (fm.get("ttft") or {}).get("rows", fm.get("ttft_rows_so_far", [])) if "ttft_ms" in r}
res = {"card": (fm.get("env") or {}).get("device"), "decode": {}, "ttft": {}}
for c in (1, 8, 32, 128):
    s = load(f"serving-c{c}.json")
    if not s or c not in decode:
        continue
    summ = s["summary"]
    replay = decode[c]["tok_s"]
    tpot = summ["tpot_ms"]["mean"]
    res["decode"][c] = {
        "replay_tok_s": round(replay, 1),
        "served_output_tok_s": round(summ["output_throughput"], 1),
        "ratio_output": round(summ["output_throughput"] / replay, 3),
        # decode-only rate of the streams (prefill excluded): concurrency / TPOT
        "served_decode_tok_s": round(c / (tpot / 1e3), 1) if tpot else None,
        "ratio_decode": round(c / (tpot / 1e3) / replay, 3) if tpot else None,
    }
for n in (1024, 8192):
    s = load(f"ttft-{n}.json")
    ref = ttft.get((8192, n))
    if s and ref:
        served = s["summary"]["ttft_ms"]["mean"]
        res["ttft"][n] = {"in_process_ms": round(ref["ttft_ms"], 1), "served_ms": round(served, 1),
                          "ratio": round(served / ref["ttft_ms"], 3)}
json.dump(res, open(f"{out}/ratios.json", "w"), indent=2)
print(json.dumps(res, indent=2))
EOF
cat "$OUT/engine-metrics.txt"
