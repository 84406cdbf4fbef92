"""Issue 18's torch.compile experiment (not a test): does inductor on the CPU pay for `longdoc classify`?

1. ``pass``: the default model on one batch of zero-shot passages (16 x 256 tokens of a State of the
   Union address, the shape of most classify passes), eager and ``torch.compile(dynamic=False)``
   (inductor, ``--freezing``: weights folded in as constants, oneDNN linear with fused bias/GELU) in
   the same process: the compile (first call) time, wall and CPU; the largest difference of the
   token states; eager and compiled passes interleaved, the least CPU time of ``--repeats``. Run it
   twice: the first run fills the cache (``TORCHINDUCTOR_CACHE_DIR``, default
   ``$LONGDOC_HOME/compile-cache``), the second finds it warm.
2. ``classify``: run as ``python benchmarks/cpu_compile_check.py classify FILE [classify options]``,
   the command ``longdoc classify`` with every passage batch of 256 tokens padded to 16 rows (one
   static shape) and run compiled; other shapes (the labels) eager. Prints the compile time and the
   passes each way on stderr; time it against plain ``python -m longdoc_cli classify`` with
   ``/usr/bin/time``, in separate processes.

    python benchmarks/cpu_compile_check.py pass --dtype bf16 --repeats 7 [--no-freezing]
    python benchmarks/cpu_compile_check.py classify doc.txt --dtype bf16 -f jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ROWS, TOKENS = 16, 256  # the static passage batch


def _cache_dir() -> None:
    home = Path(os.environ.get("LONGDOC_HOME", Path.home() / ".cache" / "longdoc"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home / "compile-cache"))


def _compile(model, freezing: bool = True):
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    return torch.compile(model, dynamic=False)


def passage_batch(tokenizer) -> dict:
    with open(DATA / "sotu.jsonl", encoding="utf-8") as f:
        text = "\n\n".join(json.loads(next(f))["text"] for _ in range(3))
    windows = tokenizer.document_windows(tokenizer.encode(text), TOKENS, 0)[:ROWS]
    return tokenizer.collate(windows)


def bench_pass(dtype: str, repeats: int, freezing: bool) -> dict:
    import torch

    from longdoc_cli.hub import resolve_model
    from longdoc_cli.tasks.runner import load_task_model

    tm = load_task_model(resolve_model("default"), task="classify", dtype=dtype)
    b = passage_batch(tm.tokenizer)
    args = (b["input_ids"], b["attention_mask"], b["global_attention_mask"], b["token_type_ids"])
    with torch.inference_mode():
        ref = tm.model(*args)
        compiled = _compile(tm.model, freezing)
        wall, cpu = time.perf_counter(), time.process_time()
        out = compiled(*args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        eager_s, compiled_s = [], []
        for _ in range(repeats):
            t = time.process_time()
            tm.model(*args)
            eager_s.append(time.process_time() - t)
            t = time.process_time()
            compiled(*args)
            compiled_s.append(time.process_time() - t)
    return {
        "dtype": dtype, "freezing": freezing, "threads": torch.get_num_threads(),
        "compile_wall_s": round(wall, 2), "compile_cpu_s": round(cpu, 2),
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "eager_pass_cpu_s": round(min(eager_s), 4), "compiled_pass_cpu_s": round(min(compiled_s), 4),
        "speedup": round(min(eager_s) / min(compiled_s), 3), "load_average": os.getloadavg(),
    }  # fmt: skip


def run_classify(argv: list[str]) -> None:
    """``longdoc classify`` with the 16 x 256 passage batches compiled (see the module's text)."""
    import torch
    from torch import nn

    import longdoc_cli.tasks.runner as runner

    stats: dict = {"compile_wall_s": None, "compiled_passes": 0, "eager_passes": 0}

    class Padded(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.config, self.compiled = model, model.config, None

        def forward(self, ids, attention, glob, types=None):
            B, T = ids.shape
            if T != TOKENS or B > ROWS:
                stats["eager_passes"] += 1
                return self.model(ids, attention, glob, types)
            pad = ROWS - B
            ids, attention, glob = (torch.cat([t, t.new_zeros(pad, T)]) for t in (ids, attention, glob))
            types = None if types is None else torch.cat([types, types.new_zeros(pad, T)])
            if self.compiled is None:
                self.compiled = _compile(self.model)
                t = time.perf_counter()
                out = self.compiled(ids, attention, glob, types)
                stats["compile_wall_s"] = round(time.perf_counter() - t, 2)
            else:
                out = self.compiled(ids, attention, glob, types)
            stats["compiled_passes"] += 1
            return out[:B]

    load = runner.load_task_model

    def load_compiled(*args, **kwargs):
        tm = load(*args, **kwargs)
        tm.model = Padded(tm.model)
        return tm

    runner.load_task_model = load_compiled
    from longdoc_cli.cli import main

    try:
        sys.argv = ["longdoc", "classify", *argv]
        main()
    finally:
        print("compiled classify:", json.dumps(stats), file=sys.stderr)


def main() -> None:
    _cache_dir()
    if len(sys.argv) > 1 and sys.argv[1] == "classify":
        run_classify(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["pass"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-freezing", action="store_true")
    a = p.parse_args()
    print(json.dumps(bench_pass(a.dtype, a.repeats, not a.no_freezing)))


if __name__ == "__main__":
    main()
