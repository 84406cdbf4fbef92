"""A/B of the CPU inference changes of issue 18 (cpu7) on one forward pass of the default model, the
configurations interleaved in one process (not a test, not used by longdoc).

The batch is what `longdoc classify` sends most often: 16 zero-shot passages of 256 tokens from the
first State of the Union addresses (:func:`cpu_bf16_check.build_document`). Configurations, each
switched on and off in the same loaded model:

- ``before``: three q/k/v linears, addmm + in-place GELU, the global rows' own attention;
- ``global skip``: the global rows' attention not computed where it equals their local one
  (every key in band, global projections equal to the local ones: model.LongformerSelfAttention.
  _global_rows_are_local);
- ``fused linear``: oneDNN's fused linear (bias and GELU inside the matmul) and q/k/v in one
  matmul (model.linear, CPU bf16 inference only; in fp32 this row runs the plain path);
- ``both``: what longdoc runs now.

Times are CPU seconds of this process (steadier than wall time on a shared machine), the least of
``--rounds``; the largest difference of the token states against ``before`` is printed too.

    OMP_NUM_THREADS=1 python benchmarks/cpu_pass_ab.py [--dtype bf16] [--rounds 9] [--batch 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import longdoc_cli.model as M
from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.runner import load_task_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bf16_check import build_document  # noqa: E402

CONFIGS = {"before": (False, False), "global skip": (False, True), "fused linear": (True, False),
           "both": (True, True)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=16, help="passages per pass")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per passage")
    args = ap.parse_args()
    tm = load_task_model(resolve_model("default"), task="classify", dtype=args.dtype)
    tok = tm.tokenizer
    windows = tok.document_windows(tok.encode(build_document(200_000)), args.tokens, 64)
    batch = tok.collate(windows[: args.batch])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["global_attention_mask"])
    fused, skip = M.fused_linear_available, M.LongformerSelfAttention._global_rows_are_local

    def use(config: str) -> None:
        on_fused, on_skip = CONFIGS[config]
        M.fused_linear_available = fused if on_fused else (lambda: False)
        M.LongformerSelfAttention._global_rows_are_local = skip if on_skip else (lambda self, T: False)

    states, times = {}, {c: [] for c in CONFIGS}
    with torch.inference_mode():
        for config in CONFIGS:  # warm-up, and each configuration's states
            use(config)
            states[config] = tm.model(*inputs).float()
        for _ in range(args.rounds):
            for config in CONFIGS:
                use(config)
                t = time.process_time()
                tm.model(*inputs)
                times[config].append(time.process_time() - t)
    use("both")
    print(f"{args.dtype}, {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} thread(s), "
          f"fused linear available: {fused()}")  # fmt: skip
    base = min(times["before"])
    for config in CONFIGS:
        diff = (states[config] - states["before"]).abs().max().item()
        best, median = min(times[config]), sorted(times[config])[args.rounds // 2]
        print(f"  {config:13s} {best:.4f} s CPU (median {median:.4f})  {best / base:.3f}x  "
              f"max state difference {diff:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
