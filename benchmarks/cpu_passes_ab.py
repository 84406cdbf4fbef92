"""The zero-shot passes of `longdoc classify` run the way inference ran before (one pass at a time on
all of torch's threads, freed activations returned to the system at once) against how it runs now
(passes side by side, freed activations reused; tasks/runner.run_windows), interleaved in one
process: wall and CPU seconds, minor page faults, and whether the outputs are the same numbers.

    python benchmarks/cpu_passes_ab.py [--windows 128] [--rounds 5] [--dtype bf16]

The windows are the first ``--windows`` 256-token passages of the 1 MB document of
cpu_bf16_check.py (16 to a pass). Memory settings as in the CLI (runtime.tune_memory,
return_freed_memory). Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from longdoc_cli.runtime import return_freed_memory, tune_memory  # noqa: E402

tune_memory()  # before torch is imported, as the CLI does

import torch  # noqa: E402
from cpu_bf16_check import build_document  # noqa: E402

from longdoc_cli import runtime  # noqa: E402
from longdoc_cli.hub import resolve_model  # noqa: E402
from longdoc_cli.tasks import runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    return_freed_memory()
    libc = runtime._libc
    tm = runner.load_task_model(resolve_model("default"), task="classify", dtype=args.dtype)
    tok = tm.tokenizer
    windows = tok.document_windows(tok.encode(build_document()), 256, 0)[: args.windows]
    threads = torch.get_num_threads()

    def one_pass_at_a_time() -> list:
        runtime._libc = None  # the 1 MiB threshold stays: freed blocks go back at once
        runner.cpu_pass_workers = lambda device, passes: 1
        return list(runner.run_windows(tm, windows, 4))

    def side_by_side() -> list:
        runtime._libc = libc
        runner.cpu_pass_workers = runtime.cpu_pass_workers
        return list(runner.run_windows(tm, windows, 4))

    variants = {"one pass at a time": one_pass_at_a_time, "side by side": side_by_side}
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and the outputs compared
    (a, b) = outputs.values()
    same = all(i == j and torch.equal(x, y) for (i, x), (j, y) in zip(a, b, strict=True))
    best: dict[str, list[float]] = {name: [float("inf")] * 3 for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
            cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            row = [wall, cpu, r1.ru_minflt - r0.ru_minflt]
            best[name] = [min(x, y) for x, y in zip(best[name], row, strict=True)]
    passes = -(-len(windows) // (runner.BATCH_TOKENS // 256))
    print(f"{len(windows)} windows of 256 tokens ({passes} passes), {args.dtype}, torch threads {threads}, "
          f"best of {args.rounds}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    for name, (wall, cpu, faults) in best.items():
        print(f"  {name:20s} wall {wall:7.3f} s  CPU {cpu:7.3f} s  minor faults {faults:9.0f}")
    ratio = best["side by side"][0] / best["one pass at a time"][0]
    print(f"  side by side / one pass at a time, wall: {ratio:.2f}; outputs the same numbers: {same}")


if __name__ == "__main__":
    main()
