"""Time longdoc's LongformerEncoder against transformers.LongformerModel on the same weights.

Base-size config (d 768, 12 heads, ffn 3072, two-sided window 512, one global token; a small
vocabulary to save memory), CPU, fp32, batch 1, inference mode. In one process, after a check that
both give the same hidden states and a warm-up, runs alternate (ours, HF, ours, HF, ...) so that
machine noise hits both alike. Peak memory is measured per implementation and length in a fresh
child process: the peak resident set (VmHWM, reset through /proc/self/clear_refs after loading)
minus the resident set before the forward pass.

    python benchmarks/bench_encoder.py --layers 2 --seq-lens 1024 4096 16384 --iters 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WINDOW = 512  # two-sided, as HF's attention_window


def hf_config(layers: int, vocab: int, max_len: int):
    import transformers

    return transformers.LongformerConfig(
        vocab_size=vocab, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
        intermediate_size=3072, attention_window=WINDOW, max_position_embeddings=max_len + 2,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, sep_token_id=2, type_vocab_size=1,
        layer_norm_eps=1e-5,
    )  # fmt: skip


def make_models(checkpoint: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from longdoc_cli.model import LongformerEncoder

    hf = transformers.LongformerModel.from_pretrained(checkpoint, add_pooling_layer=False).eval()
    ours = LongformerEncoder.from_pretrained(checkpoint).eval()
    return ours, hf


def inputs(n: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, n), generator=g)
    ids[0, 0] = 0
    mask = torch.ones(1, n, dtype=torch.long)
    glob = torch.zeros(1, n, dtype=torch.long)
    glob[0, 0] = 1  # one global token, as for classification
    return ids, mask, glob


def run_one(impl: str, model, ids, mask, glob) -> torch.Tensor:
    with torch.inference_mode():
        if impl == "ours":
            return model(ids, mask, glob)
        return model(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child_memory(impl: str, checkpoint: Path, n: int, vocab: int) -> float:
    """Peak extra resident memory (MiB) of one forward pass, in this (fresh) process."""
    ours, hf = make_models(checkpoint)
    model = ours if impl == "ours" else hf
    del ours, hf
    ids, mask, glob = inputs(n, vocab)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = run_one(impl, model, ids, mask, glob)
    peak = _status_kb("VmHWM")
    del out
    return (peak - base) / 1024


def measure_memory(impl: str, checkpoint: Path, n: int, vocab: int) -> float:
    cmd = [sys.executable, __file__, "--child", impl, str(checkpoint), str(n), str(vocab)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, checkpoint, n, vocab = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps({"peak_mib": child_memory(impl, checkpoint, n, vocab)}))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--iters", type=int, default=3, help="timed runs per implementation and length")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--check-len", type=int, default=1024, help="length of the correctness check")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for n in args.seq_lens:
        if n % WINDOW:
            p.error(f"--seq-lens: {n} is not a multiple of the two-sided window {WINDOW} (HF would pad)")

    import transformers

    from longdoc_cli.model import LongformerEncoder

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    max_len = max([*args.seq_lens, args.check_len])
    print(f"load average (1 min) at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}; "
        f"layers {args.layers}, d 768, heads 12, ffn 3072, two-sided window {WINDOW}, 1 global token, "
        f"batch 1, fp32, inference_mode",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        transformers.LongformerModel(hf_config(args.layers, args.vocab, max_len)).save_pretrained(checkpoint)
        ours, hf = make_models(checkpoint)
        assert isinstance(ours, LongformerEncoder)

        ids, mask, glob = inputs(args.check_len, args.vocab, seed=1)
        diff = (
            (run_one("ours", ours, ids, mask, glob) - run_one("hf", hf, ids, mask, glob)).abs().max().item()
        )
        print(f"check at n={args.check_len}: max |ours - HF| = {diff:.2e}", flush=True)
        if diff > 1e-3:
            sys.exit(f"ours and HF disagree ({diff:.2e}); not timing")

        rows = []
        for n in args.seq_lens:
            ids, mask, glob = inputs(n, args.vocab)
            wall: dict[str, list[float]] = {"ours": [], "hf": []}
            cpu: dict[str, list[float]] = {"ours": [], "hf": []}
            for it in range(args.iters + 1):  # iteration 0 is the warm-up
                for impl, model in (("ours", ours), ("hf", hf)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    run_one(impl, model, ids, mask, glob)
                    if it:
                        wall[impl].append(time.perf_counter() - t0)
                        cpu[impl].append(time.process_time() - c0)
            row = {"n": n}
            for impl in ("ours", "hf"):
                row[f"{impl}_s"] = statistics.median(wall[impl])
                row[f"{impl}_min_s"] = min(wall[impl])
                row[f"{impl}_cpu_s"] = statistics.median(cpu[impl])
            print(f"n={n}: wall s ours {_fmt(wall['ours'])}, hf {_fmt(wall['hf'])}", flush=True)
            rows.append(row)
        del ours, hf
        gc.collect()
        if not args.no_memory:
            for row in rows:
                for impl in ("ours", "hf"):
                    row[f"{impl}_mib"] = measure_memory(impl, checkpoint, row["n"], args.vocab)

    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(
        "wall-clock seconds: median (min); CPU seconds (all threads): median; "
        "peak MiB above the loaded model\n"
    )
    print(
        "| n | ours s | HF s | ours/HF time | ours/HF CPU time | ours MiB | HF MiB | ours/HF memory |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        mem = (
            f"{r['ours_mib']:.0f} | {r['hf_mib']:.0f} | {r['ours_mib'] / r['hf_mib']:.2f}"
            if "ours_mib" in r
            else "- | - | -"
        )
        print(
            f"| {r['n']} | {r['ours_s']:.3f} ({r['ours_min_s']:.3f}) | {r['hf_s']:.3f} ({r['hf_min_s']:.3f}) "
            f"| {r['ours_s'] / r['hf_s']:.2f} ({r['ours_min_s'] / r['hf_min_s']:.2f}) "
            f"| {r['ours_cpu_s'] / r['hf_cpu_s']:.2f} | {mem} |"
        )
    by_n = {r["n"]: r for r in rows}
    if 4096 in by_n and 16384 in by_n:
        a, b = by_n[16384], by_n[4096]
        print(
            f"\nours: time(16384) / time(4096) = {a['ours_s'] / b['ours_s']:.2f} (median), "
            f"{a['ours_min_s'] / b['ours_min_s']:.2f} (min), "
            f"{a['ours_cpu_s'] / b['ours_cpu_s']:.2f} (CPU time)"
        )


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
