"""The document-level head's selection (headfit.fit_doc_head) on eval_finetune.py's cached embeddings.

No encoder pass: reads OUT/CORPUS/{train,test}.jsonl and the baselines' cached 256-token chunk
embeddings (emb256-{train,test}-TAG.npz) that `eval_finetune.py --out OUT` wrote, builds the blocks
the recipe would (first256 = the first chunk, mean = the mean of the chunks, unweighted as the
embchunks+lr baseline takes it, where the recipe weights chunks by their tokens; words from the
text), lets fit_doc_head pick among the sets of these three blocks by its own CV on the training part,
and scores the pick on the test part. An estimate of classify.yaml without first512 when the CLI run
is too slow to make; not a substitute for it.

    python benchmarks/doc_head_cached.py --out /tmp/eval-finetune --corpus pydocs --tag 20000-bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from longdoc_cli import docfeatures, headfit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tag", default="20000-bf16")
    ap.add_argument("--seed", type=int, default=42, help="the CV folds' seed (train.seed's default)")
    args = ap.parse_args()
    from sklearn.metrics import f1_score

    cdir = Path(args.out) / args.corpus
    docs = {
        p: [json.loads(x) for x in (cdir / f"{p}.jsonl").read_text().splitlines()] for p in ("train", "test")
    }
    feats = {}
    for part, rows in docs.items():
        z = np.load(cdir / f"emb256-{part}-{args.tag}.npz")
        chunks = [torch.from_numpy(z["feats"][z["owner"] == i]) for i in range(len(rows))]
        feats[part] = {
            "first256": torch.stack([c[0] for c in chunks]),
            "mean": torch.stack([c.mean(0) for c in chunks]),
        }
    counts = {p: [docfeatures.word_counts(d["text"]) for d in rows] for p, rows in docs.items()}
    vocab = docfeatures.fit_word_vocab(counts["train"])
    for p in docs:
        feats[p]["words"] = docfeatures.word_rows(counts[p], vocab.columns, vocab.idf)
    labels = sorted({d["label"] for d in docs["train"]})
    y = [labels.index(d["label"]) for d in docs["train"]]
    sets = [s for s in docfeatures.AUTO_SETS if "first512" not in s]
    fit = headfit.fit_doc_head(feats["train"], y, len(labels), sets=sets, multi=False, class_weight="auto",
                               l2="auto", threshold=0.5, seed=args.seed)  # fmt: skip
    pred = fit.logits({b: feats["test"][b] for b in fit.blocks}).argmax(-1).tolist()
    gold = [labels.index(d["label"]) for d in docs["test"]]
    best: dict[str, float] = {}
    for (name, _), v in fit.cv_scores.items():
        best[name] = max(best.get(name, 0.0), v)
    for name, v in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"  CV {name}: {v:.3f}", file=sys.stderr)
    f1 = f1_score(gold, pred, average="macro")
    print(
        f"{args.corpus}: picked {'+'.join(fit.blocks)} l2={fit.l2:g} ({fit.class_weight}); "
        f"test macro-F1 {f1:.3f}"
    )


if __name__ == "__main__":
    main()
