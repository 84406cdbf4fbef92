"""Write pydocs.jsonl with the documentation sections of fewer than 10 documents merged into "other"
(8 classes), the data of the classification runs in the README (`configs/pydocs-*.yaml`).

    python benchmarks/make_pydocs8.py [SRC] [OUT]

Defaults: ../shared/data/pydocs.jsonl and /tmp/longdoc-runs/pydocs8.jsonl.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pydocs.jsonl"
OUT = Path("/tmp/longdoc-runs/pydocs8.jsonl")


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
    with src.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    counts = collections.Counter(r["label"] for r in records)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            label = r["label"] if counts[r["label"]] >= 10 else "other"
            f.write(json.dumps({**r, "label": label}, ensure_ascii=False) + "\n")
    merged = collections.Counter(r["label"] if counts[r["label"]] >= 10 else "other" for r in records)
    print(f"{out}: {len(records)} documents, {dict(merged.most_common())}", file=sys.stderr)


if __name__ == "__main__":
    main()
