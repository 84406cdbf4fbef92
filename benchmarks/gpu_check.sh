#!/usr/bin/env bash
# One call on a lent CUDA machine: CUDA tests, the bench sweep, the kernel profile. Logs under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/longdoc-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
t0=$SECONDS
python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/test_attention.py tests/test_model.py tests/test_bench.py 2>&1 \
  | tail -25 | tee "$OUT/tests.txt"
echo "tests: $((SECONDS - t0)) s"
t0=$SECONDS
python3 benchmarks/gpu_profile.py --seq-len 16384 --out "$OUT" 2>&1 | tee "$OUT/profile.txt" | grep -v "^-\|^ " | head -20
echo "profile: $((SECONDS - t0)) s"
t0=$SECONDS
python3 -m longdoc_cli bench --model base --device cuda --dtype bf16 --seq-lens 4096,16384 \
  --impls longdoc,longdoc-attn,hf,full --warmup 3 --iters 10 --format json > "$OUT/bench_infer.json" 2> "$OUT/bench_infer.err"
echo "bench infer rc=$? $((SECONDS - t0)) s"; tail -3 "$OUT/bench_infer.err"
python3 - "$OUT/bench_infer.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for c in d["checks"]: print("check", c["name"], c["length"], c["max_abs_diff"], c["passed"])
for m in d["measurements"]:
    print(f'{m["impl"]:13s} {m["seq_len"]:6d} {m["mode"]:5s} {m["status"]:7s} med {1e3*(m.get("median_s") or 0):8.2f} ms '
          f'p95 {1e3*(m.get("p95_s") or 0):8.2f} mem {m.get("peak_mem_mib") or 0:8.0f} MiB share {m.get("peak_share") or 0:.3f} {m.get("note","")[:80]}')
PY
