"""Plot a `longdoc bench --format json` report: time and peak memory against sequence length.

    longdoc bench --config configs/bench.yaml --format json > sweep.json
    python benchmarks/plot_bench.py sweep.json -o benchmarks/bench_cpu.png

Needs matplotlib (not a longdoc dependency: `pip install matplotlib`). One line per implementation
(inference rows of the report's first model, dtype (or --dtype) and batch size), log-log axes;
skipped rows are left out and listed under the figure.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", help="JSON written by `longdoc bench --format json`")
    ap.add_argument("-o", "--output", default="bench.png")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dtype", default=None, help="which dtype's rows (default: the report's first)")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_bench.py needs matplotlib: pip install matplotlib") from None

    report = json.loads(Path(args.report).read_text())
    rows = [m for m in report["measurements"] if m["mode"] == "infer"]
    if not rows:
        raise SystemExit(f"{args.report}: no inference rows")
    if args.dtype:
        rows = [m for m in rows if m["dtype"] == args.dtype]
        if not rows:
            raise SystemExit(f"{args.report}: no inference rows in {args.dtype}")
    first = rows[0]
    key = ("model", "dtype", "batch_size")
    rows = [m for m in rows if all(m[k] == first[k] for k in key)]
    time_by, mem_by, skipped = defaultdict(list), defaultdict(list), []
    for m in rows:
        if m["status"] != "ok":
            skipped.append(f"{m['impl']} n={m['seq_len']}: {m['note']}")
            continue
        time_by[m["impl"]].append((m["seq_len"], m["median_s"]))
        if m.get("peak_mem_mib") is not None and m["impl"] != "longdoc-attn":
            mem_by[m["impl"]].append((m["seq_len"], m["peak_mem_mib"]))

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, points in sorted(time_by.items()):
        x, y = zip(*sorted(points), strict=True)
        ax_t.plot(x, y, marker="o", label=impl)
    for impl, points in sorted(mem_by.items()):
        x, y = zip(*sorted(points), strict=True)
        ax_m.plot(x, y, marker="o", label=impl)
    env = report.get("environment", {})
    layers = report.get("spec", {}).get("layers")
    for ax, label in ((ax_t, "median time per forward pass (s)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    depth = f", {layers} layers" if layers else ""
    fig.suptitle(
        args.title
        or f"longdoc bench: {first['model']}{depth}, {first['dtype']}, batch {first['batch_size']}, "
        f"{env.get('device_name', env.get('device', ''))}",
        fontsize=10,
    )
    if skipped:
        fig.text(0.01, 0.01, "skipped: " + "; ".join(skipped)[:300], fontsize=7)
    fig.tight_layout(rect=(0, 0.05 if skipped else 0, 1, 1))
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
