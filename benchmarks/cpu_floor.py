"""The floor of CPU inference on the machine at hand (issue 18; not a test, not used by longdoc).

In one run: the matmul peaks, then every operator one real pass of the default model runs, timed
again in isolation at the exact shapes, strides and values the pass gave it, and what follows:

1. Peaks: the issue's 4096 x 768 @ 768 x 3072 product in fp32 and bf16 as ``cpu_bf16_check``
   measures it (best of ``--repeats``, at least 10), and the best over a few other shapes (the
   default model's own included), reported apart.
2. Passes: (i) a zero-shot batch of 16 x 256 tokens (what ``longdoc classify`` sends most often:
   passages of the first State of the Union addresses, first token global, as ``cpu_pass_ab``
   builds it; random ids when ../shared/data is absent) and (ii) the encoder benchmark's 4 x 4096
   tokens (``cpu_bf16_check.encoder_shares``: random ids, first token global, the band path), in
   bf16 and fp32, at the thread counts of ``--threads``.
3. Each pass runs once under a dispatch mode (:class:`OpFloor`) that runs every aten / oneDNN
   operator ``--repeats`` more times right after the pass called it (in-place operands cloned
   before each run, outside the timed part) and keeps the best wall time: the operator alone, hot
   in cache, with the pass's own arguments. The pass itself is timed apart, best of ``--repeats``.
   ``--rounds`` rounds of (issue-shape peak, pass, operators), the best of each over the rounds,
   so that the peak, the pass and its operators see the same moments of a shared machine.
4. Per pass: the operators grouped (linear: the oneDNN fused linear and addmm/mm; attention: the
   SDPA call, the global rows' matmul/bmm, multiply-adds and softmax; LayerNorm; element-wise:
   residual adds, GELU; copies and layouts; other), their sum against the pass (the rest is
   Python, dispatch and OpenMP fork/join), and the bounds: the share of the peak the pass would
   reach if everything but the linears were free, and if everything but the linears and the
   attention were free.
5. The 1 MB document (``cpu_bf16_check.build_document``, ``--doc-dtype``): ``longdoc classify``
   run once with ``--timings`` (its wall time; the summary's load and compute seconds; its
   passes), the tokenizer timed in this process, and the floor that follows: what is outside the
   compute (start-up, imports, loading) + tokenizing + its passes at the zero-shot pass's floor,
   divided among the command's side-by-side workers (one thread each); and the same with each pass
   as long as it takes while the workers' passes run at once (measured here, as the command runs them).

    python benchmarks/cpu_floor.py [--threads 1,2] [--encoder-threads 2] [--dtypes bf16,fp32]
        [--repeats 3] [--rounds 3] [--size 1000000] [--json out.json]

About 7 minutes on the 2-core AMX Xeon with the defaults (benchmarks/README.md, "The floor of CPU
inference here").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bf16_check import DATA, ROOT, build_document, cpu_info, matmul_gflops  # noqa: E402

from longdoc_cli.bench.flops import encoder_flops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (m, k, n) products tried for the best peak: the issue's, the default model's four linears at
# 4096 rows, and larger squares.
PEAK_SHAPES = [(4096, 768, 3072), (4096, 384, 1536), (4096, 1536, 384), (4096, 384, 1152),
               (4096, 384, 384), (4096, 1024, 1024), (2048, 2048, 2048), (8192, 1024, 4096)]  # fmt: skip
GROUPS = {
    "linear": ("mkldnn._linear_pointwise", "aten.addmm", "aten.mm", "aten.linear"),
    "attention": ("aten._scaled_dot_product", "aten.scaled_dot_product", "aten.matmul", "aten.bmm",
                  "aten.addcmul", "aten.baddbmm", "aten._softmax",
                  "aten.softmax", "aten._safe_softmax", "aten.masked_fill", "aten.exp"),
    "layernorm": ("aten.native_layer_norm", "aten.layer_norm"),
    "elementwise": ("aten.add", "aten.gelu", "aten.mul", "aten.div", "aten.sub", "aten.where"),
    "copies": ("aten.copy_", "aten.clone", "aten._to_copy", "aten.cat", "aten.gather",
               "aten.index", "aten.embedding", "aten.contiguous", "aten.to", "aten.reshape",
               "aten.fill_", "aten.zero_",
               "aten.constant_pad_nd", "aten.new_zeros", "aten.zeros", "aten.empty", "aten.full"),
}  # fmt: skip


def group_of(op: str) -> str:
    for group, prefixes in GROUPS.items():
        if op.startswith(prefixes):
            return group
    return "other"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        dt = str(x.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "f32")
        contiguous = "" if x.is_contiguous() else f" stride {tuple(x.stride())}"
        return f"{dt}{tuple(x.shape)}{contiguous}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_describe(y) for y in x) + "]"
    return repr(x)


def op_flops(op: str, args: tuple) -> float:
    """The FLOPs of a linear (2 M K N) or of an attention call (4 B H Lq Lk Dh: every score the
    kernel computes, masked or not); 0 for the rest."""
    if op.startswith(("mkldnn._linear_pointwise", "aten.linear")):
        x, w = args[0], args[2] if op.endswith("binary") else args[1]
        return 2.0 * x.numel() * w.shape[0]
    if op.startswith(("aten.addmm", "aten.mm")):
        a, b = args[-2], args[-1]
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if "scaled_dot_product" in op:
        q, k = args[0], args[1]
        return 4.0 * q.numel() * k.shape[-2]
    return 0.0


class OpFloor(TorchDispatchMode):
    """Runs every operator the model calls ``repeats`` more times with the same arguments (written
    operands cloned first, outside the timing) and records the best wall time of each call; over
    several passes (the same calls in the same order), the best of each call over them all."""

    def __init__(self, repeats: int, calls: list[dict] | None = None) -> None:
        super().__init__()
        self.repeats = repeats
        self.calls = calls if calls is not None else []
        self.i = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the pass's own call (also the warm-up)
        written = [
            i
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and i < len(args)
        ]
        best = float("inf")
        for _ in range(self.repeats):
            run_args = list(args)
            for i in written:
                if isinstance(args[i], torch.Tensor):
                    run_args[i] = args[i].clone()
            t = time.perf_counter()
            func(*run_args, **kwargs)
            best = min(best, time.perf_counter() - t)
        name = str(func.overloadpacket).replace("torch.ops.", "").replace("::", ".")
        if not name.startswith(("aten.", "mkldnn.")):
            name = f"{func.namespace}.{name}"
        if func._overloadname not in ("default", ""):
            name = f"{name}.{func._overloadname}"
        if self.i < len(self.calls) and self.calls[self.i]["op"] == name:
            self.calls[self.i]["seconds"] = min(self.calls[self.i]["seconds"], best)
        else:
            del self.calls[self.i :]  # a different sequence of calls: start again from here
            self.calls.append({"op": name, "args": _describe(args), "seconds": best,
                               "flops": op_flops(name, args)})  # fmt: skip
        self.i += 1
        return out


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peaks(repeats: int) -> dict:
    """The issue's shape per dtype (cpu_bf16_check.matmul_gflops) and the best over PEAK_SHAPES."""
    out = {}
    for name, dt in DTYPES.items():
        issue = matmul_gflops(dt, repeats)
        shapes = {f"{m}x{k}@{k}x{n}": matmul_gflops(dt, repeats, m, k, n) for m, k, n in PEAK_SHAPES}
        best = max(shapes, key=shapes.get)
        out[name] = {"issue_shape": issue, "best_shape": best, "best": max(issue, shapes[best]),
                     "shapes": shapes}  # fmt: skip
    return out


def zero_shot_batch(tok, vocab: int, batch: int = 16, tokens: int = 256) -> tuple[torch.Tensor, ...]:
    """``cpu_pass_ab``'s batch: 16 passages of 256 tokens of sotu text (random ids without the data)."""
    if (DATA / "sotu.jsonl").exists():
        windows = tok.document_windows(tok.encode(build_document(200_000)), tokens, 64)
        b = tok.collate(windows[:batch])
        return b["input_ids"], b["attention_mask"], b["global_attention_mask"]
    return random_batch(vocab, batch, tokens)


def random_batch(vocab: int, batch: int, n: int) -> tuple[torch.Tensor, ...]:
    """``cpu_bf16_check.encoder_shares``' input: random ids, every token real, the first global."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, n), generator=gen)
    glob = torch.zeros(batch, n, dtype=torch.long)
    glob[:, 0] = 1
    return ids, torch.ones_like(ids), glob


def floor_of_pass(
    model,
    inputs: tuple[torch.Tensor, ...],
    flops: float,
    peak: Callable[[], float],
    repeats: int,
    rounds: int,
) -> dict:
    """One pass timed whole (best of ``repeats``) and operator by operator (:class:`OpFloor`), in
    ``rounds`` rounds, each after a measure of the matmul ``peak`` (GFLOP/s): the best of each."""
    calls: list[dict] = []
    pass_s, peak_gflops = float("inf"), 0.0
    with torch.inference_mode():
        model(*inputs)  # warm-up (oneDNN primitives, caches of the weights)
        for _ in range(rounds):
            peak_gflops = max(peak_gflops, peak())
            pass_s = min(pass_s, _best(lambda: model(*inputs), repeats))
            with OpFloor(repeats, calls):
                model(*inputs)
    by_op: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "calls": 0, "flops": 0.0, "shapes": set()})
    by_group: dict[str, float] = defaultdict(float)
    group_flops: dict[str, float] = defaultdict(float)
    for c in calls:
        rec = by_op[c["op"]]
        rec["seconds"] += c["seconds"]
        rec["calls"] += 1
        rec["flops"] += c["flops"]
        rec["shapes"].add(c["args"])
        by_group[group_of(c["op"])] += c["seconds"]
        group_flops[group_of(c["op"])] += c["flops"]
    ops_s = sum(by_group.values())
    lin, att = by_group.get("linear", 0.0), by_group.get("attention", 0.0)
    ops = {
        op: {"group": group_of(op), "seconds": r["seconds"], "calls": r["calls"], "flops": r["flops"],
             "shapes": sorted(r["shapes"])}
        for op, r in sorted(by_op.items(), key=lambda kv: -kv[1]["seconds"])
    }  # fmt: skip
    peak = peak_gflops
    return {
        "pass_seconds": pass_s,
        "ops_seconds": ops_s,
        "overhead_seconds": pass_s - ops_s,
        "groups": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
        "group_gflops": {g: group_flops[g] / by_group[g] / 1e9 for g in group_flops if group_flops[g]},
        "ops": ops,
        "flops": flops,
        "peak_gflops": peak,
        "share": flops / pass_s / 1e9 / peak,
        "share_ops_only": flops / ops_s / 1e9 / peak,
        "share_if_only_linears": flops / lin / 1e9 / peak if lin else None,
        "share_if_only_linears_attention": flops / (lin + att) / 1e9 / peak if lin + att else None,
        "seconds_at_40_percent": flops / (0.4 * peak * 1e9),
        "seconds_at_75_percent": flops / (0.75 * peak * 1e9),
    }


def classify_document(size: int, dtype: str) -> dict:
    """``longdoc classify`` of the 1 MB document once, with ``--timings``: wall time and summary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.txt"
        text = build_document(size)
        path.write_text(text, encoding="utf-8")
        cmd = [sys.executable, "-m", "longdoc_cli", "classify", "--quiet", "--timings", "-f", "jsonl",
               "--dtype", dtype, str(path)]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    summary = next(json.loads(line)["summary"] for line in proc.stdout.splitlines() if '"summary"' in line)
    return {"wall_seconds": wall, "summary": summary, "text": text}


def _threads(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def main() -> None:
    from longdoc_cli.hub import resolve_model
    from longdoc_cli.runtime import CPU_PASS_WORKERS
    from longdoc_cli.tasks.runner import BATCH_TOKENS, load_task_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="torch threads for the zero-shot pass")
    ap.add_argument("--encoder-threads", default="2", help="torch threads for the 4 x 4096 pass")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each operator and pass per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of peak, pass and operators (best)")
    ap.add_argument("--batch", type=int, default=4, help="rows of the encoder pass")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--size", type=int, default=1_000_000, help="the document's characters (0: none)")
    ap.add_argument("--doc-dtype", default="bf16")
    ap.add_argument("--top-ops", type=int, default=8, help="operators printed per pass")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    report: dict = {"load_before": os.getloadavg(), "cpu": cpu_info()}
    c = report["cpu"]
    print(f"CPU: {c['model']} ({c['cpus']} CPUs, torch {c['torch']}); flags {' '.join(c['bf16_flags'])}; "
          f"load average {' '.join(f'{x:.2f}' for x in report['load_before'])}")  # fmt: skip
    thread_counts = sorted(set(_threads(args.threads) + _threads(args.encoder_threads)))
    report["peaks"] = {}
    for th in thread_counts:
        torch.set_num_threads(th)
        p = report["peaks"][th] = peaks(args.repeats)
        for name, r in p.items():
            print(f"peak {name}, {th} thread(s): {r['issue_shape']:.0f} GFLOP/s at 4096x768@768x3072; "
                  f"best {r['best']:.0f} ({r['best_shape']})")  # fmt: skip
    tms = {name: load_task_model(resolve_model("default"), task="classify", dtype=name)
           for name in args.dtypes.split(",")}  # fmt: skip
    cfg = next(iter(tms.values())).config
    tok = next(iter(tms.values())).tokenizer
    zs_inputs = zero_shot_batch(tok, cfg.vocab_size)
    enc_inputs = random_batch(cfg.vocab_size, args.batch, args.seq_len)
    passes = []
    for label, inputs, counts in (("zero-shot", zs_inputs, _threads(args.threads)),
                                  ("encoder", enc_inputs, _threads(args.encoder_threads))):  # fmt: skip
        B, n = inputs[0].shape
        flops = encoder_flops(cfg, n, B, 1)
        for th in counts:
            torch.set_num_threads(th)
            for name, tm in tms.items():
                dt = DTYPES[name]
                r = floor_of_pass(getattr(tm.model, "longformer", tm.model), inputs, flops,
                                  lambda dt=dt: matmul_gflops(dt, 3), args.repeats, args.rounds)  # fmt: skip
                r.update(pass_name=label, tokens=f"{B} x {n}", dtype=name, threads=th)
                passes.append(r)
                _print_pass(r, args.top_ops)
    report["passes"] = passes
    for th in thread_counts:  # the peaks again after the passes: the best of both
        torch.set_num_threads(th)
        for name, r in peaks(args.repeats).items():
            before = report["peaks"][th][name]
            before["issue_shape"] = max(before["issue_shape"], r["issue_shape"])
            if r["best"] > before["best"]:
                before.update(best=r["best"], best_shape=r["best_shape"])
    print()
    for th, p in report["peaks"].items():
        for name, r in p.items():
            print(f"peak {name}, {th} thread(s), best of the start and end: {r['issue_shape']:.0f} GFLOP/s "
                  f"at 4096x768@768x3072; best {r['best']:.0f} ({r['best_shape']})")  # fmt: skip
    for r in passes:  # against the best issue-shape peak of the whole run too
        same = [p["peak_gflops"] for p in passes if (p["threads"], p["dtype"]) == (r["threads"], r["dtype"])]
        best = max(*same, report["peaks"][r["threads"]][r["dtype"]]["issue_shape"])
        r["run_best_peak_gflops"] = best
        r["share_of_run_best_peak"] = r["flops"] / r["pass_seconds"] / 1e9 / best
    _print_summary(passes)
    torch.set_num_threads(default_threads)
    if args.size:
        report["document"] = _document(
            args, tms, passes, zs_inputs, default_threads, CPU_PASS_WORKERS, BATCH_TOKENS
        )
    report["load_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in report['load_after'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


def _print_pass(r: dict, top: int) -> None:
    pct = lambda s: 100 * s / r["pass_seconds"]  # noqa: E731
    print(f"\n{r['pass_name']} pass {r['tokens']}, {r['dtype']}, {r['threads']} thread(s): "
          f"{r['pass_seconds'] * 1e3:.1f} ms ({100 * r['share']:.0f}% of the {r['peak_gflops']:.0f} "
          f"GFLOP/s peak); operators alone {r['ops_seconds'] * 1e3:.1f} ms, the rest "
          f"{r['overhead_seconds'] * 1e3:.1f} ms")  # fmt: skip
    print("  | group | ms | % of the pass |")
    for g, s in r["groups"].items():
        print(f"  | {g} | {s * 1e3:.1f} | {pct(s):.0f}% |")
    for op, o in list(r["ops"].items())[:top]:
        shapes = "; ".join(o["shapes"][:3]) + (" ..." if len(o["shapes"]) > 3 else "")
        print(f"    {op}: {o['seconds'] * 1e3:.1f} ms, {o['calls']} calls  [{shapes[:160]}]")
    rates = ", ".join(f"{g} {v:.0f}" for g, v in r["group_gflops"].items())
    print(f"  GFLOP/s of the groups' own FLOPs: {rates}; the pass at 40% of the peak would take "
          f"{r['seconds_at_40_percent'] * 1e3:.1f} ms, at 75% "
          f"{r['seconds_at_75_percent'] * 1e3:.1f} ms")  # fmt: skip
    lin, la = r["share_if_only_linears"], r["share_if_only_linears_attention"]
    print(f"  share of the peak: now {100 * r['share']:.0f}%, operators alone "
          f"{100 * r['share_ops_only']:.0f}%, linears + attention only {100 * (la or 0):.0f}%, "
          f"linears only {100 * (lin or 0):.0f}%")  # fmt: skip


def _print_summary(passes: list[dict]) -> None:
    print("\n| pass | dtype | threads | ms | peak (rounds / run best) | share now | operators alone "
          "| linears + attention only | linears only |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in passes:
        la, lin = r["share_if_only_linears_attention"] or 0, r["share_if_only_linears"] or 0
        cells = [f"{r['pass_name']} {r['tokens']}", r["dtype"], r["threads"],
                 f"{r['pass_seconds'] * 1e3:.1f}",
                 f"{r['peak_gflops']:.0f} / {r['run_best_peak_gflops']:.0f}",
                 f"{100 * r['share']:.0f}% ({100 * r['share_of_run_best_peak']:.0f}%)",
                 f"{100 * r['share_ops_only']:.0f}%", f"{100 * la:.0f}%", f"{100 * lin:.0f}%"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")


def side_by_side_pass_seconds(
    model, inputs: tuple[torch.Tensor, ...], workers: int, rounds: int = 2
) -> float:
    """A pass's share of the wall time when ``workers`` threads (one torch thread each, as
    ``tasks.runner._side_by_side`` runs them) each run two passes at once: the best of ``rounds``."""
    threads = torch.get_num_threads()

    def run() -> None:
        with torch.inference_mode():
            model(*inputs)

    best = float("inf")
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(lambda _: run(), range(workers)))  # warm-up of every worker
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(lambda _: run(), range(2 * workers)))
            best = min(best, (time.perf_counter() - t) / 2)
    torch.set_num_threads(threads)
    return best


def _document(args, tms, passes, inputs, threads: int, max_workers: int, batch_tokens: int) -> dict:
    doc = classify_document(args.size, args.doc_dtype)
    s = doc.pop("summary")
    text = doc.pop("text")
    tok = next(iter(tms.values())).tokenizer
    tok_s = _best(lambda: tok.encode(text), 2)
    windows = int(s.get("windows") or 0)
    n_passes = -(-windows // (batch_tokens // 256))
    workers = max(1, min(max_workers, threads))
    outside = doc["wall_seconds"] - s["compute_s"]
    zs = {p["threads"]: p for p in passes if p["pass_name"] == "zero-shot" and p["dtype"] == args.doc_dtype}
    one = zs.get(max(1, threads // workers))
    out = {"wall_seconds": doc["wall_seconds"], "summary": s, "tokenize_seconds": tok_s,
           "passes": n_passes, "workers": workers, "outside_compute_seconds": outside}  # fmt: skip
    print(f"\n`longdoc classify --dtype {args.doc_dtype}` of {args.size:,} characters: "
          f"{doc['wall_seconds']:.1f} s wall; summary: load {s['load_s']:.2f} s, "
          f"compute {s['compute_s']:.2f} s, {windows} windows "
          f"(~{n_passes} passes of 16 x 256, {workers} side by side); "
          f"tokenizing alone {tok_s:.2f} s")  # fmt: skip
    if one is None:
        print("  (no zero-shot floor at the workers' thread count: pass it in --threads)")
        return out
    tm = tms[args.doc_dtype]
    side = side_by_side_pass_seconds(getattr(tm.model, "longformer", tm.model), inputs, workers)
    out["side_by_side_pass_seconds"] = side
    per = {
        f"pass with {workers} side by side": side,
        "pass alone": one["pass_seconds"],
        "operators alone": one["ops_seconds"],
        "linears + attention only": one["groups"].get("linear", 0) + one["groups"].get("attention", 0),
        "linears only": one["groups"].get("linear", 0),
    }
    out["projections"] = {}
    print("  | each pass at | passes' time | whole command |")
    for name, sec in per.items():
        compute = n_passes * sec / workers
        total = outside + tok_s + compute
        out["projections"][name] = {"pass_seconds": sec, "passes_seconds": compute, "total_seconds": total}
        print(f"  | {name} ({sec * 1e3:.0f} ms) | {compute:.1f} s | {total:.1f} s |")
    return out


if __name__ == "__main__":
    main()
