#!/usr/bin/env bash
# One call on a lent CUDA machine: the attention kernel sweep, the model profile, the bench sweep at
# n = 16384 and the CUDA tests, each stage bounded in time. Logs and JSON under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/longdoc-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
stage() { local t=$1; shift; local t0=$SECONDS; timeout "$t" "$@"; echo "[$* -> rc $? in $((SECONDS - t0)) s]"; }
stage 100 python3 benchmarks/gpu_kernels.py --seq-len 16384 --out "$OUT" 2>&1 | grep -v "^ *$" | tee "$OUT/kernels.txt" | tail -16
if [ -f "$OUT/best_flex.json" ]; then
  export LONGDOC_FLEX_OPTIONS=$(python3 -c "import json; b=json.load(open('$OUT/best_flex.json')); print(json.dumps({'contiguous': b['variant']=='contiguous', **(b['options'] or {})}))")
fi
echo "LONGDOC_FLEX_OPTIONS=${LONGDOC_FLEX_OPTIONS:-}"
stage 160 python3 benchmarks/gpu_profile.py --seq-len 16384 --variants flex,flex-strided,compiled,compiled-ro,hf --out "$OUT" 2>&1 \
  | tee "$OUT/profile.txt" | grep -E "^(NVIDIA|base|flex|compiled|hf|band) " ; grep -E "^ +(triton|nvjet|void|sm80)" "$OUT/profile.txt" | head -8 | cut -c1-60,150-200
export LONGDOC_COMPILE_MODE=$(python3 -c "import json; r=json.load(open('$OUT/gpu_profile_16384.json'))['results']; t=lambda k: r.get(k, {}).get('median_ms', 1e9); print('reduce-overhead' if t('compiled-ro') < t('compiled') else 'default')" 2>/dev/null || echo default)
echo "LONGDOC_COMPILE_MODE=$LONGDOC_COMPILE_MODE"
stage 110 python3 -m longdoc_cli bench --model base --device cuda --dtype bf16 --seq-lens 16384 \
  --impls longdoc,longdoc-compiled,hf,full --warmup 3 --iters 10 --no-check --format json > "$OUT/bench_16384.json" 2> "$OUT/bench_16384.err"
python3 - "$OUT/bench_16384.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no bench json: {e}")
for m in d["measurements"]:
    print(f'{m["impl"]:16s} {m["seq_len"]:6d} {m["status"]:7s} med {1e3*(m.get("median_s") or 0):8.2f} ms '
          f'p95 {1e3*(m.get("p95_s") or 0):8.2f} mem {m.get("peak_mem_mib") or 0:7.0f} MiB share {m.get("peak_share") or 0:.3f} {m.get("note","")[:60]}')
PY
stage 70 python3 -m pytest -q -p no:cacheprovider -x -k "cuda" tests/test_attention.py tests/test_model.py tests/test_bench.py 2>&1 | tail -4
