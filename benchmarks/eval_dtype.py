"""The quality gate of `--dtype auto` choosing bf16 on a CPU (issue 18): zero-shot top labels vs fp32.

Every document of ../shared/data/{sotu,pydocs}.jsonl (``--every 1``: all 719; cut to
``--max-chars``, 3,000 by default: about 650 tokens, 3 passages of 256 tokens, so that the fp32 pass fits
a busy shared machine) is read zero-shot by the default model once per precision mode; the passage
embeddings of one pass are scored against two label sets, each embedded in the same mode:

- ``plain``: the six plain labels of README.md ("politics and government,computer programming and
  software,sport,health and medicine,business and finance,arts and entertainment");
- ``default``: the default label set (the ``@topics`` preset).

Modes: ``fp32`` (the reference), ``bf16`` (the model's weights and activations in bf16, what
``--dtype bf16`` runs) and ``autocast`` (fp32 weights, ``torch.autocast("cpu", bfloat16)``: bf16
matmuls, fp32 LayerNorm/softmax/residual stream). For each mode and label set: top-label agreement
with fp32, the mean absolute change of fp32's top score, and the time of the pass. The gate (issue 18):
agreement >= 99% on both label sets. The QA side: ``benchmarks/eval_qa.py --dtype bf16``.

    OMP_NUM_THREADS=1 python benchmarks/eval_dtype.py [--every 1] [--max-chars 3000] [--modes fp32,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.classify import Classifier, default_labels, parse_labels
from longdoc_cli.tasks.runner import load_task_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PLAIN = ("politics and government,computer programming and software,sport,health and medicine,"
         "business and finance,arts and entertainment")  # fmt: skip
GATE = 0.99


def load_docs(every: int, max_chars: int) -> list[tuple[str, str]]:
    docs = []
    for name in ("sotu.jsonl", "pydocs.jsonl"):
        with open(DATA / name, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        docs += [(r["id"], r["text"][:max_chars]) for r in records[::every]]
    return docs


def run_mode(model_dir: Path, mode: str, docs: list[tuple[str, str]], label_sets: dict) -> tuple[dict, float]:
    """Per label set, one probability vector per document; and the seconds of the encoder pass."""
    dtype = {"fp32": "fp32", "bf16": "bf16", "autocast": "fp32"}[mode]
    tm = load_task_model(model_dir, task="classify", device="cpu", dtype=dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with ctx:
        clfs = {name: Classifier(tm, labels, batch_size=8) for name, labels in label_sets.items()}
        first = next(iter(clfs.values()))
        t = time.perf_counter()
        embs = []
        for start in range(0, len(docs), 32):
            embs += first.passage_embeddings([text for _, text in docs[start : start + 32]])
            print(f"  {mode}: {len(embs)}/{len(docs)} documents, {time.perf_counter() - t:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
        seconds = time.perf_counter() - t
        probs = {n: [clf.scores_from_passages(e.float(), w) for e, w in embs] for n, clf in clfs.items()}
    return probs, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=1, help="take every k-th record of each file")
    ap.add_argument("--max-chars", type=int, default=3000, help="cut documents to this many characters")
    ap.add_argument("--modes", default="fp32,bf16,autocast", help="fp32 first, then any of bf16, autocast")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "fp32" or not set(modes) <= {"fp32", "bf16", "autocast"}:
        ap.error("--modes: fp32 first, then bf16 and/or autocast")
    docs = load_docs(args.every, args.max_chars)
    label_sets = {"plain": parse_labels(PLAIN.replace(",", "\n"), "plain"), "default": default_labels()}
    model_dir = resolve_model("default")
    results, seconds = {}, {}
    for mode in modes:
        results[mode], seconds[mode] = run_mode(model_dir, mode, docs, label_sets)
    print(f"{len(docs)} documents (every {args.every}th record of sotu + pydocs, <= {args.max_chars} chars), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"time fp32 {seconds['fp32']:.1f} s")
    for mode in modes[1:]:
        ok = True
        for name in label_sets:
            ref, got = results["fp32"][name], results[mode][name]
            agree = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(ref, got, strict=True))
            diff = sum(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True)) / len(docs)
            ok &= agree >= GATE * len(docs)
            share = 100 * agree / len(docs)
            print(f"{mode:8s} {name:8s} top-label agreement {agree}/{len(docs)} = {share:.2f}%"
                  f"  mean max |score change| {diff:.4f}")  # fmt: skip
        ratio = seconds[mode] / seconds["fp32"]
        print(f"{mode:8s} time {seconds[mode]:.1f} s ({ratio:.2f}x fp32); gate (>= 99% on both): "
              f"{'passed' if ok else 'FAILED'}")  # fmt: skip


if __name__ == "__main__":
    main()
