"""How well the default model's zero-shot topics fit real documents (not a test).

The two corpora of ../shared/data have an obvious IPTC topic each: State of the Union addresses are
"politics" and Python documentation pages are "science and technology" (computing, software).
Every k-th record of each is classified zero-shot over the 17 IPTC topics; the script reports how
often the expected topic is first and among the top 3, and the labels that came first instead.
With ``--labels A,B,...`` the labels are yours instead: A is expected for the addresses, B for the
documentation pages.

    python benchmarks/eval_zero_shot.py [--every 8] [--max-chars 20000] [--max-length 4096]
    python benchmarks/eval_zero_shot.py --labels "politics and government,computer programming and \
software,sport,health and medicine,business and finance,arts and entertainment"
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from longdoc_cli.models import resolve_model
from longdoc_cli.tasks.classify import Classifier, load_labels
from longdoc_cli.tasks.runner import load_task_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXPECTED = {"sotu.jsonl": "politics", "pydocs.jsonl": "science and technology"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=8, help="take every k-th record of each file")
    ap.add_argument("--max-chars", type=int, default=20000, help="cut documents to this many characters")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per window (default: the model's)")
    ap.add_argument(
        "--labels", help="your labels, comma-separated: the first for SOTU, the second for pydocs"
    )
    args = ap.parse_args()
    tm = load_task_model(resolve_model("default"), task="classify", device="cpu", max_length=args.max_length)
    expect = EXPECTED
    labels = None
    if args.labels:
        labels = load_labels(args.labels.split(","), None)
        expect = dict(zip(EXPECTED, [label.name for label in labels[:2]], strict=True))
    clf = Classifier(tm, labels, top_k=3, batch_size=8)
    for name, expected in expect.items():
        with open(DATA / name, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()][:: args.every]
        results = clf.classify([(r["id"], r["text"][: args.max_chars]) for r in records])
        first = sum(r.label == expected for r in results)
        top3 = sum(expected in r.scores for r in results)
        instead = collections.Counter(r.label for r in results if r.label != expected).most_common(3)
        print(f"{name}: expected {expected!r}; first {first}/{len(results)}, top-3 {top3}/{len(results)}; "
              f"first instead: {', '.join(f'{k} {v}' for k, v in instead)}")  # fmt: skip


if __name__ == "__main__":
    main()
