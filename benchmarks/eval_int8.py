"""What `--quantize int8` (or `--dtype bf16`) costs in accuracy: zero-shot labels vs fp32 (not a test).

Classifies documents of ../shared/data (State of the Union addresses and Python documentation
pages, every k-th record) with the default model over the 17 IPTC topics, once in fp32 and once
with int8 dynamic quantization (or in bf16), and reports how often the top label agrees, the mean absolute
score difference, and the time of each. (The QA side: `benchmarks/eval_qa.py --quantize int8`.)

    python benchmarks/eval_int8.py [--every 12] [--max-chars 20000] [--compare int8|bf16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.classify import Classifier
from longdoc_cli.tasks.runner import load_task_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=12, help="take every k-th record of each file")
    ap.add_argument("--max-chars", type=int, default=20000, help="cut documents to this many characters")
    ap.add_argument("--compare", choices=["int8", "bf16"], default="int8", help="int8 linear layers or bf16")
    args = ap.parse_args()
    docs = []
    for name in ("sotu.jsonl", "pydocs.jsonl"):
        with open(DATA / name, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        docs += [(r["id"], r["text"][: args.max_chars]) for r in records[:: args.every]]
    model_dir = resolve_model("default")
    results, seconds = {}, {}
    for mode in ("none", args.compare):
        kind = {"none": {}, "int8": {"quantize": "int8"}, "bf16": {"dtype": "bf16"}}[mode]
        tm = load_task_model(model_dir, task="classify", device="cpu", **kind)
        clf = Classifier(tm, batch_size=4)
        t = time.perf_counter()
        results[mode] = clf.classify(docs)
        seconds[mode] = time.perf_counter() - t
    fp32 = results["none"]
    pairs = list(zip(fp32, results[args.compare], strict=True))
    agree = sum(a.label == b.label for a, b in pairs)
    diff = sum(abs(a.score - b.scores.get(a.label, 0.0)) for a, b in pairs) / len(docs)
    tokens = sum(r.n_tokens for r in fp32)
    print(f"{len(docs)} documents, {tokens} tokens (every {args.every}th record, <= {args.max_chars} chars)")
    print(f"top-label agreement {args.compare} vs fp32: {agree}/{len(docs)} = {100 * agree / len(docs):.1f}%")
    print(f"mean |score(fp32 label) fp32 - {args.compare}|: {diff:.4f}")
    ratio = seconds[args.compare] / seconds["none"]
    print(f"time fp32 {seconds['none']:.1f} s, {args.compare} {seconds[args.compare]:.1f} s ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
