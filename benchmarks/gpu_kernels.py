"""The local-attention kernel alone on a CUDA GPU: layouts, masks and FlexAttention options.

    python benchmarks/gpu_kernels.py [--seq-len 16384] [--out DIR]

One base layer's attention (12 heads of 64, one-sided window 256, one global token, bf16) timed
with CUDA events (median of 20 after 5 warm-ups) in several variants, each checked against the
first (max |diff|). Prints ms, TFLOP/s on the exact band FLOPs (bench.attention_flops) and on the
FLOPs the tiles execute; writes the table as JSON and the fastest options to DIR/best_flex.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile import device_time  # noqa: E402  (beside this file)

from longdoc_cli import attention, bench  # noqa: E402


def cuda_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    return statistics.median(device_time(fn, warmup, iters)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, H, Dh, w = args.seq_len, 12, 64, 256
    fa = attention._flex_module()
    torch.manual_seed(0)
    x = torch.randn(1, n, 3, H, Dh, device="cuda", dtype=torch.bfloat16)  # as the projections lay it out
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (1, H, n, Dh) strided views
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    am = torch.ones(1, n, dtype=torch.bool, device="cuda")
    gm = torch.zeros_like(am)
    gm[0, 0] = True
    exact = bench.attention_flops(n, w, 1, H * Dh, 1, 1)
    t0 = time.perf_counter()
    bm = attention.longformer_block_mask(am, gm, window=w)
    torch.cuda.synchronize()
    build_ms = (time.perf_counter() - t0) * 1e3
    build_ms = min(build_ms, cuda_ms(lambda: attention.longformer_block_mask(am, gm, window=w), 1, 5))
    tiles = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    executed = 4 * tiles * 128 * 128 * Dh * H
    bm64 = attention.longformer_block_mask(am, gm, window=w, block=64)
    tiles64 = int(bm64.kv_num_blocks.sum() + bm64.full_kv_num_blocks.sum())

    def band_only(b, h, qi, kv):
        return (kv - qi).abs() <= w

    bm_plain = fa.BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, mask_mod=band_only,
        seq_lengths=bm.seq_lengths,
    )  # fmt: skip
    compiled = torch.compile(fa.flex_attention, dynamic=False)
    print(f"n={n}: block mask build {build_ms:.2f} ms; tiles {tiles} (128) / {tiles64} (64);"
          f" exact band {exact / 1e9:.1f} GFLOP, tiles execute {executed / 1e9:.1f}")  # fmt: skip

    variants = {
        "strided": lambda o: compiled(q, k, v, block_mask=bm, kernel_options=o),
        "contiguous": lambda o: compiled(qc, kc, vc, block_mask=bm, kernel_options=o),
        "contig+copy": lambda o: compiled(
            q.contiguous(), k.contiguous(), v.contiguous(), block_mask=bm, kernel_options=o
        ),  # fmt: skip
        "no-captures": lambda o: compiled(qc, kc, vc, block_mask=bm_plain, kernel_options=o),
        "tiles64": lambda o: compiled(qc, kc, vc, block_mask=bm64, kernel_options=o),
    }
    options = [None, {"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8},
               {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}]  # fmt: skip
    runs = [("strided", None), ("contiguous", None), ("contig+copy", None), ("no-captures", None),
            ("tiles64", None), ("tiles64", {"BLOCK_M": 64, "BLOCK_N": 64})]  # fmt: skip
    runs += [("contiguous", o) for o in options[1:]]
    rows = []
    ref = None
    with torch.inference_mode():
        for name, opts in runs:
            try:
                out = variants[name](opts)
                ref = out if ref is None else ref
                diff = (out.float() - ref.float()).abs().max().item()
                ms = cuda_ms(lambda name=name, opts=opts: variants[name](opts))
            except Exception as e:  # report and go on
                print(
                    f"{name:12s} {json.dumps(opts):60s} failed: {type(e).__name__}: {str(e)[:150]}",
                    flush=True,
                )
                continue
            row = {"variant": name, "options": opts, "ms": ms, "max_diff": diff}
            rows.append({**row, "exact_tflops": exact / ms / 1e9, "executed_tflops": executed / ms / 1e9})
            print(f"{name:12s} {json.dumps(opts):60s} {ms:7.3f} ms  exact {exact / ms / 1e9:6.1f} TFLOP/s"
                  f"  tiles {executed / ms / 1e9:6.1f}  diff {diff:.1e}", flush=True)  # fmt: skip
        sd = cuda_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc))
        dense = 4 * n * n * Dh * H
        print(f"dense SDPA (flash) {sd:.3f} ms = {dense / sd / 1e9:.0f} TFLOP/s on n^2", flush=True)
        fd = cuda_ms(lambda: compiled(qc, kc, vc))
        print(f"dense flex          {fd:.3f} ms = {dense / fd / 1e9:.0f} TFLOP/s on n^2", flush=True)
    if args.out and rows:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gpu_kernels_{n}.json").write_text(
            json.dumps({"n": n, "build_ms": build_ms, "rows": rows}, indent=1)
        )
        best = min((r for r in rows if r["max_diff"] < 0.05 and r["variant"] in ("contiguous", "strided")),
                   key=lambda r: r["ms"])  # fmt: skip
        (out / "best_flex.json").write_text(json.dumps(best))
        print("best:", json.dumps(best))


if __name__ == "__main__":
    main()
