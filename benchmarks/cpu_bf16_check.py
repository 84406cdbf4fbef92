"""Every figure of issue 18 in one run (not a test): the CPU, its matmul peaks, the encoder's share of
the matching peak, and `longdoc classify` of a 1 MB document in fp32, bf16, auto and int8.

1. The CPU (``lscpu``'s model name, its bf16/AMX flags), the load average before and after, the
   threads torch uses, and what ``--dtype auto`` picks here (runtime.auto_dtype).
2. Matmul peaks: the best of ``--repeats`` runs of a 4096 x 768 @ 768 x 3072 product (the shape of
   the base model's feed-forward) in fp32 and in bf16, measured between the encoder's runs.
3. The default model's encoder (6 layers, d 384, two-sided window 512, first token global) on
   ``--batch`` x ``--seq-len`` tokens, fp32 and bf16 runs interleaved, the fastest of ``--repeats``;
   its useful FLOPs (longdoc_cli.bench.encoder_flops) over its time, as a share of the peak of the
   same dtype.
4. A 1 MB document (the first State of the Union addresses of ../shared/data/sotu.jsonl joined by
   blank lines, cut to 1,000,000 characters: :func:`build_document`) classified by the command,
   ``python -m longdoc_cli classify FILE`` with ``--dtype fp32``, ``--dtype bf16``, no option (auto)
   and ``--dtype fp32 --quantize int8``, in separate processes, interleaved, the fastest of
   ``--rounds`` (wall time; the CPU time of the same run too, and the peak resident memory); each
   mode's top label and its largest change of any label's score against fp32. ``bf16-one-pass``:
   ``--dtype bf16`` the way inference ran before passes ran side by side (LONGDOC_CPU_WORKERS=1,
   freed memory returned at once), for the ratio in the same run.

The machine may be shared: the figures that matter are ratios measured in the same run; the load
average says how quiet it was. About 4–5 minutes on 2 idle cores with the defaults (estimated from
the issue's times, not yet timed on an idle machine).

    python benchmarks/cpu_bf16_check.py [--rounds 2] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longdoc_cli.bench import encoder_flops
from longdoc_cli.hub import resolve_model
from longdoc_cli.model import LongformerEncoder, load_hf_config
from longdoc_cli.runtime import auto_dtype, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODES = {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"], "auto": [],
         "int8": ["--dtype", "fp32", "--quantize", "int8"],
         "bf16-one-pass": ["--dtype", "bf16"]}  # fmt: skip
# Environment per mode. bf16-one-pass: one pass at a time on all threads, freed memory returned at
# once (the inference loop before passes ran side by side; benchmarks/README.md "Passes side by side").
MODE_ENV = {"bf16-one-pass": {"LONGDOC_CPU_WORKERS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def build_document(size: int = 1_000_000, source: Path = DATA / "sotu.jsonl") -> str:
    """The first addresses of ``source``, in file order, joined by blank lines, cut to ``size``
    characters (1 MB of English prose: 194 K tokens with the default model)."""
    parts, total = [], 0
    with open(source, encoding="utf-8") as f:
        for line in f:
            if total >= size:
                break
            if line.strip():
                parts.append(json.loads(line)["text"])
                total += len(parts[-1]) + 2
    return "\n\n".join(parts)[:size]


def cpu_info() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "model": fields.get("Model name", "?").strip(),
        "cpus": fields.get("CPU(s)", "?").strip(),
        "bf16_flags": [f for f in flags if f in ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16")],
        "native_bf16": cpu_has_native_bf16(),
        "auto_dtype": {t: auto_dtype("cpu", t)[0] for t in ("classify", "qa")},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def matmul_gflops(dtype: torch.dtype, repeats: int, m: int = 4096, k: int = 768, n: int = 3072) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up (AMX state, oneDNN kernels)
    best = min(_timed(lambda: a @ b) for _ in range(max(repeats, 10)))
    return 2 * m * k * n / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def encoder_shares(batch: int, n: int, repeats: int) -> dict:
    """fp32 and bf16 encoder runs interleaved with both peaks: the fastest of each."""
    model_dir = resolve_model("default")
    cfg = load_hf_config(model_dir)
    models = {name: LongformerEncoder.from_pretrained(model_dir).to(dtype=dt).eval()
              for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    ids = torch.randint(1000, cfg.vocab_size, (batch, n))
    glob = torch.zeros(batch, n, dtype=torch.long)
    glob[:, 0] = 1
    flops = encoder_flops(cfg, n, batch, 1)
    best = {k: float("inf") for k in ("fp32", "bf16", "peak fp32", "peak bf16")}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(ids, global_attention_mask=glob)
        for _ in range(repeats):
            for name, model in models.items():
                best[name] = min(best[name], _timed(lambda m=model: m(ids, global_attention_mask=glob)))
                dt = torch.float32 if name == "fp32" else torch.bfloat16
                best[f"peak {name}"] = min(best[f"peak {name}"], 1 / matmul_gflops(dt, 3))
    out = {"tokens": f"{batch} x {n}", "flops": flops}
    for name in ("fp32", "bf16"):
        peak = 1 / best[f"peak {name}"]
        gflops = flops / best[name] / 1e9
        out[name] = {"seconds": best[name], "gflops": gflops, "peak_gflops": peak, "share": gflops / peak}
    return out


# Runs the command and writes its peak resident memory (KiB) to argv[1]. Linux hands a forked and
# exec'd child the parent's resident high-water mark, so this process's own ru_maxrss (and wait4's)
# would be at least this script's (~1 GB after the encoder runs); a small wrapper's child starts
# from the wrapper's few MB instead.
_PEAK_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "open(sys.argv[1], 'w').write(str(peak)); sys.exit(code)"
)


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str, float, float]:
    """Run ``cmd``: its exit code, stdout, stderr, CPU seconds and peak resident memory (MB)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        peak_file = Path(tmp) / "peak"
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *cmd], stdout=out, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the wrapper and its child
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else float("nan")
        return proc.returncode, out.read().decode(), err.read().decode(), cpu, peak


def classify_times(path: Path, rounds: int, modes: list[str]) -> dict:
    """``longdoc classify`` per mode in its own process, interleaved; the fastest of ``rounds``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    cpu_runs: dict[str, list[float]] = {m: [] for m in modes}  # CPU seconds: steadier on a busy machine
    peak_mb: dict[str, float] = {m: 0.0 for m in modes}
    records: dict[str, dict] = {}
    for _ in range(rounds):
        for mode in modes:
            cmd = [sys.executable, "-m", "longdoc_cli", "classify", "--quiet", "--top-k", "1000"]
            cmd += [*MODES[mode], str(path)]
            t = time.perf_counter()
            code, stdout, stderr, cpu, peak = _run_child(cmd, {**env, **MODE_ENV.get(mode, {})})
            runs[mode].append(time.perf_counter() - t)
            cpu_runs[mode].append(cpu)
            peak_mb[mode] = max(peak_mb[mode], peak)
            if code != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {stderr.strip()}")
            records[mode] = json.loads(stdout.splitlines()[0])
    ref = records.get("fp32")
    out = {}
    for mode in modes:
        rec = records[mode]
        change = None
        if ref is not None:
            change = max(abs(ref["scores"][k] - rec["scores"][k]) for k in ref["scores"])
        out[mode] = {"seconds": min(runs[mode]), "runs": runs[mode], "cpu_seconds": min(cpu_runs[mode]),
                     "peak_mb": peak_mb[mode], "label": rec["label"],
                     "n_tokens": rec.get("n_tokens"), "max_score_change_vs_fp32": change}  # fmt: skip
    return out


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each 1 MB classification (fastest)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each encoder pass (fastest)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--modes", default="fp32,bf16,auto,int8,bf16-one-pass", help="1 MB document modes")
    ap.add_argument("--skip-document", action="store_true", help="peaks and encoder only")
    ap.add_argument("--size", type=int, default=1_000_000, help="the document's characters")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    report = {"load_before": os.getloadavg(), "cpu": cpu_info()}
    c = report["cpu"]
    print(f"CPU: {c['model']} ({c['cpus']} CPUs, torch {c['torch']}, {c['threads']} threads); flags "
          f"{' '.join(c['bf16_flags']) or 'none'}; native bf16: {c['native_bf16']}; --dtype auto: "
          f"{c['auto_dtype']}; load average {_load(report['load_before'])}")  # fmt: skip
    enc = report["encoder"] = encoder_shares(args.batch, args.seq_len, args.repeats)
    print(f"encoder, default model, {enc['tokens']} tokens ({enc['flops'] / 1e9:.0f} GFLOP):")
    for name in ("fp32", "bf16"):
        e = enc[name]
        print(f"  {name}: {e['seconds']:.3f} s, {e['gflops']:.0f} GFLOP/s; matmul peak "
              f"{e['peak_gflops']:.0f} GFLOP/s ({name}, 4096x768 @ 768x3072): "
              f"{100 * e['share']:.0f}% of the peak")  # fmt: skip
    print(f"  bf16 / fp32 encoder time: {enc['bf16']['seconds'] / enc['fp32']['seconds']:.2f}")
    if not args.skip_document:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "doc-1mb.txt"
            path.write_text(build_document(args.size), encoding="utf-8")
            docs = report["document"] = classify_times(path, args.rounds, args.modes.split(","))
        n_tok = next(iter(docs.values()))["n_tokens"]
        print(
            f"`longdoc classify` of a {args.size:,}-character document ({n_tok} tokens), "
            f"fastest of {args.rounds}:"
        )
        for mode, d in docs.items():
            change = d["max_score_change_vs_fp32"]
            print(
                f"  {mode:13s} {d['seconds']:6.1f} s  (runs {', '.join(f'{x:.1f}' for x in d['runs'])}; "
                f"CPU {d['cpu_seconds']:.1f} s, peak {d['peak_mb']:.0f} MB)  label {d['label']!r}"
                + ("" if change is None else f", max score change vs fp32 {change:.4f}")
            )
    report["load_after"] = os.getloadavg()
    print(f"load average after: {_load(report['load_after'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
