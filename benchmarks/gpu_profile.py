"""Where a base-size forward pass spends its time on a CUDA GPU, and what the fused path reaches.

    python benchmarks/gpu_profile.py --seq-len 16384 [--variants flex,band,compiled,hf] [--out DIR]

Times (CUDA events, median of --iters after --warmup) each variant of the same weights in bf16:
``flex`` (the default: compiled FlexAttention, eager projections), ``flex-strided`` (the same on
the strided head views, no copies), ``flex-tile64`` (64-token mask tiles), ``band``
(LONGDOC_ATTENTION=band: the SDPA band kernel that training with attention dropout uses),
``compiled`` / ``compiled-ro`` (every layer through torch.compile, FlexAttention inside; mode
default / reduce-overhead = CUDA graphs), ``hf`` (transformers').
Reports ms, TFLOP/s on the useful FLOPs (bench.encoder_flops: projections, FFN, exact band,
global rows) and the share of a bf16 matmul peak measured here; writes a torch.profiler kernel
table of the default variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longdoc_cli import bench  # noqa: E402
from longdoc_cli.model import LongformerEncoder  # noqa: E402


def device_time(fn, warmup: int, iters: int) -> list[float]:
    """Seconds per call: CUDA events on a GPU, the wall clock on the CPU (smoke runs)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int = 8192) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / statistics.median(device_time(lambda: a @ b, 3, 20)) / 1e12


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--variants", default="flex,band,compiled,hf")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, B = args.seq_len, args.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a smoke run
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = bench.preset_config("base", n, args.layers)
    ours = LongformerEncoder(cfg)
    ours.pooler = None
    ours = ours.to(device=device, dtype=dtype).eval()
    ids, mask, glob = bench.child.make_inputs(n, B, 1, cfg.vocab_size, device)
    flops = bench.encoder_flops(cfg, n, B, 1)
    peak = matmul_peak_tflops(device, dtype, 8192 if device == "cuda" else 1024)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}  torch {torch.__version__}  {dtype} matmul peak {peak:.1f} TFLOP/s")
    print(
        f"base, {cfg.num_hidden_layers} layers, n={n}, batch {B}: {flops / 1e12:.2f} TFLOP useful per forward"
    )
    results: dict[str, dict] = {}

    def record(name: str, fn) -> None:
        try:
            with torch.inference_mode():
                times = device_time(fn, args.warmup, args.iters)
        except Exception as e:  # a variant that fails is reported, the others still run
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name:10s} failed: {results[name]['error']}", flush=True)
            return
        med = statistics.median(times)
        results[name] = {
            "median_ms": med * 1e3,
            "tflops": flops / med / 1e12,
            "peak_share": flops / med / 1e12 / peak,
        }
        tflops = flops / med / 1e12
        print(f"{name:10s} {med * 1e3:9.2f} ms  {tflops:6.1f} TFLOP/s  {tflops / peak:6.1%}", flush=True)

    variants = args.variants.split(",")
    if "flex" in variants:
        record("flex", lambda: ours(ids, mask, glob))
    if "band" in variants:
        with env("LONGDOC_ATTENTION", "band"):
            record("band", lambda: ours(ids, mask, glob))
    from longdoc_cli import runtime

    for name, change in (("flex-strided", {"contiguous": False}), ("flex-tile64", {"tile": 64})):
        if name in variants:
            with env("LONGDOC_FLEX_OPTIONS", json.dumps({**runtime.flex_options(), **change})):
                runtime.flex_options.cache_clear()
                record(name, lambda: ours(ids, mask, glob))
            runtime.flex_options.cache_clear()
    for name, mode in (("compiled", "default"), ("compiled-ro", "reduce-overhead")):
        if name not in variants:
            continue
        layers = ours.encoder.layer
        saved = list(layers)
        for i, layer in enumerate(saved):
            layers[i] = torch.compile(layer, mode=mode)
        record(name, lambda: ours(ids, mask, glob))
        for i, layer in enumerate(saved):
            layers[i] = layer
    if "hf" in variants:
        import transformers

        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as tmp:
            ours.float().save_pretrained(tmp)
            ours.to(dtype)
            hf = transformers.LongformerModel.from_pretrained(tmp, add_pooling_layer=False)
        hf = hf.to(device=device, dtype=dtype).eval()
        record("hf", lambda: hf(input_ids=ids, attention_mask=mask, global_attention_mask=glob))
        del hf
    if (
        "flex" in results
        and "hf" in results
        and "median_ms" in results["hf"]
        and "median_ms" in results["flex"]
    ):
        ratio = results["flex"]["median_ms"] / results["hf"]["median_ms"]
        print(f"flex / hf = {ratio:.3f}  (hf / flex = {1 / ratio:.1f}x)")

    from torch.profiler import ProfilerActivity, profile

    activity, key = (
        (ProfilerActivity.CUDA, "cuda_time_total")
        if device == "cuda"
        else (ProfilerActivity.CPU, "cpu_time_total")
    )
    with torch.inference_mode(), profile(activities=[activity]) as prof:
        ours(ids, mask, glob)
        if device == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    print(table[:6000])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gpu_profile_{n}.txt").write_text(table)
        (out / f"gpu_profile_{n}.json").write_text(
            json.dumps(
                {"n": n, "batch": B, "peak_tflops": peak, "flops": flops, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
