#!/bin/bash
# GPU re-validation after a kernel change, in one device call (run from the repository root):
# tests/gpu in five parallel shards and compile warm-ups, then bench/gpu/defaults.py timed on the
# same card, and the same for a baseline tree if one is given (e.g. the parent commit unpacked
# with `git archive BASE runtime bench/gpu | tar -x -C .base`, carried as `.base`). Logs and
# JSON under $OUT (run.tgz holds every log: $OUT returns at most 8 files).
#
#     bash bench/gpu/revalidate.sh [BASELINE_TREE]
set -u
BASE=${1:-}
R=/tmp/revalidate; mkdir -p $R
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/runtime:$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import sys,torch,triton;print(sys.version.split()[0],torch.__version__,triton.__version__)"; } > $R/env.txt 2>&1
t0=$(date +%s)
for k in moe mla fp8_linear lightning small_or_sample; do  # shards compile in parallel
  timeout 300 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfE --durations=5 -k "${k//_or_/ or }" > $R/test_$k.log 2>&1 &
done
ORDER=lightning,small,mla,mla_prefill,fp8,moe
timeout 300 python3 bench/gpu/defaults.py --warm --only $ORDER > $R/warm.log 2>&1 &
if [ -n "$BASE" ]; then
  cp bench/gpu/defaults.py "$BASE/bench/gpu/"
  (cd "$BASE/bench/gpu" && PYTHONPATH= timeout 300 python3 defaults.py --warm --only $ORDER > $R/warm_base.log 2>&1) &
fi
wait
echo "tests and warm-up: $(( $(date +%s) - t0 )) s" >> $R/env.txt
OUT=$R timeout 120 python3 bench/gpu/defaults.py --label new > $R/bench_new.log 2>&1
if [ -n "$BASE" ]; then
  (cd "$BASE/bench/gpu" && OUT=$R PYTHONPATH= timeout 120 python3 defaults.py --label base > $R/bench_base.log 2>&1)
fi
echo "total: $(( $(date +%s) - t0 )) s" >> $R/env.txt
tar czf "${OUT:-/tmp}/run.tgz" -C $R . && cp $R/*.json "${OUT:-/tmp}/" 2>/dev/null
cat $R/env.txt
for f in $R/test_*.log; do echo "== $f"; grep -E "passed|failed|FAILED|ERROR|rror" $f | tail -5; done
for f in $R/bench_*.log; do echo "== $f"; tail -20 $f; done
