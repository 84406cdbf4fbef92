"""Zero-shot extractive QA with the embedded default model vs a BM25 baseline (not a test).

On SQuAD-format JSONL (default ../shared/data/pyfaq_qa.jsonl), both methods rank the sentences of
the context (the same sentence splitter); reported: answer-sentence hit@1 and hit@5 (the top
sentences include the one holding the gold answer's start), and SQuAD EM/F1 of the top sentence
against the gold answer (official normalisation), plus time per question.

    python benchmarks/eval_qa.py [--data FILE] [--limit N] [--quantize int8] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
from pathlib import Path

from longdoc_cli.evaluate import exact_match_score, f1_score
from longdoc_cli.models import resolve_model
from longdoc_cli.tasks.qa import QuestionAnswerer
from longdoc_cli.tasks.runner import load_task_model
from longdoc_cli.tasks.text import sentence_spans

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pyfaq_qa.jsonl"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over one context's sentences."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs, self.k1, self.b = [collections.Counter(d) for d in docs], k1, b
        self.lengths = [len(d) for d in docs]
        self.avg = sum(self.lengths) / max(1, len(docs))
        df = collections.Counter(w for d in docs for w in set(d))
        n = len(docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for tf, length in zip(self.docs, self.lengths, strict=True):
            s = 0.0
            for w in set(query):
                if w in tf:
                    norm = tf[w] + self.k1 * (1 - self.b + self.b * length / self.avg)
                    s += self.idf[w] * tf[w] * (self.k1 + 1) / norm
            out.append(s)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on the CPU), fp32 or bf16")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if args.limit:
        records = records[: args.limit]

    tm = load_task_model(resolve_model(args.model), task="qa", quantize=args.quantize, dtype=args.dtype)
    qa = QuestionAnswerer(tm, top_k=5, batch_size=16)
    stats = {m: collections.Counter() for m in ("longdoc", "bm25")}
    elapsed = collections.Counter()
    by_context: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_context[r["context"]].append(r)
    for context, group in by_context.items():
        spans = sentence_spans(context)
        bm25 = BM25([words(context[s:e]) for s, e in spans])
        for r in group:
            gold_start = r["answers"]["answer_start"][0]
            gold_texts = r["answers"]["text"]
            gold = next((i for i, (s, e) in enumerate(spans) if s <= gold_start < e), None)
            t = time.perf_counter()
            result = qa.answer(r["id"], context, [r["question"]])[0]
            elapsed["longdoc"] += time.perf_counter() - t
            starts = {s: i for i, (s, _) in enumerate(spans)}
            ranked_longdoc = [starts[a.start] for a in result.answers]
            t = time.perf_counter()
            scores = bm25.scores(words(r["question"]))
            ranked_bm25 = sorted(range(len(spans)), key=lambda i: -scores[i])[:5]
            elapsed["bm25"] += time.perf_counter() - t
            for name, ranked in (("longdoc", ranked_longdoc), ("bm25", ranked_bm25)):
                top = context[spans[ranked[0]][0] : spans[ranked[0]][1]]
                st = stats[name]
                st["n"] += 1
                st["hit1"] += ranked[0] == gold
                st["hit5"] += gold in ranked[:5]
                st["em"] += max(exact_match_score(top, g) for g in gold_texts)
                st["f1"] += max(f1_score(top, g) for g in gold_texts)
    n_ctx = len(by_context)
    print(f"data: {args.data} ({len(records)} questions, {n_ctx} contexts); "
          f"quantize={args.quantize} dtype={args.dtype}")  # fmt: skip
    print("| method | hit@1 | hit@5 | EM | F1 | s/question |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, st in stats.items():
        n = st["n"]
        row = [st["hit1"] / n, st["hit5"] / n, st["em"] / n, st["f1"] / n]
        label = "longdoc zero-shot (default model)" if name == "longdoc" else "BM25 over sentences"
        cells = " | ".join(f"{100 * v:.1f}" for v in row)
        print(f"| {label} | {cells} | {elapsed[name] / n:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
