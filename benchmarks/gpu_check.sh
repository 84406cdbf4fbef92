#!/usr/bin/env bash
# One call on a lent CUDA machine, most important first, each stage bounded in time (a lease is short):
# the CUDA tests, the model profile (defaults, 64-token tiles, transformers, in one process), the
# bench sweep, the attention kernel sweep, the compiled-layer variants. Logs and JSON under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/longdoc-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
stage() { local t=$1; shift; local t0=$SECONDS; timeout "$t" "$@"; echo "[$* -> rc $? in $((SECONDS - t0)) s]"; }
stage 80 python3 -m pytest -q -p no:cacheprovider -x -k "cuda" tests/test_attention.py tests/test_model.py tests/test_bench.py 2>&1 | tail -4
stage 120 python3 benchmarks/gpu_profile.py --seq-len 16384 --variants flex,flex-tile64,hf --out "$OUT" 2>&1 \
  | tee "$OUT/profile.txt" | grep -E "^(NVIDIA|base|flex|compiled|hf|band)"
stage 150 python3 -m longdoc_cli bench --model base --device cuda --dtype bf16 --seq-lens 4096,16384 \
  --impls longdoc,hf,full --warmup 3 --iters 10 --format json > "$OUT/bench.json" 2> "$OUT/bench.err"
python3 - "$OUT/bench.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no bench json: {e}")
for m in d["measurements"]:
    print(f'{m["impl"]:16s} {m["seq_len"]:6d} {m["status"]:7s} med {1e3*(m.get("median_s") or 0):8.2f} ms '
          f'p95 {1e3*(m.get("p95_s") or 0):8.2f} mem {m.get("peak_mem_mib") or 0:7.0f} MiB share {m.get("peak_share") or 0:.3f} {m.get("note","")[:60]}')
PY
stage 60 python3 benchmarks/gpu_kernels.py --seq-len 16384 --out "$OUT" 2>&1 | grep -v "^ *$\|^W1" | tee "$OUT/kernels.txt" | tail -14
stage 150 python3 benchmarks/gpu_profile.py --seq-len 16384 --variants compiled,compiled-ro --out "$OUT/compiled" 2>&1 \
  | tee "$OUT/profile_compiled.txt" | grep -E "^(compiled)"
