"""The document head at every fixed L2 of headfit.DOC_L2_GRID, and scikit-learn's balanced LR at every
C of the emb256+lr baseline's grid, in the same outer folds of the TRAINING part (no selection: the
curve the selection rules choose from, issue 13, ft9). The test part is never read.

Reads eval_finetune.py's cache under OUT as cv_select.py does (blocks first256, mean, words).
``--tol``: scikit-learn's stopping tolerance (1e-4, its default, is what the baseline runs with).

    python benchmarks/cv_fixed_l2.py --out /tmp/me/evalf7 --corpus pydocs --set first256 --repeats 4
    python benchmarks/cv_fixed_l2.py --out /tmp/me/evalf7 --corpus pydocs --set first256 --repeats 4 \
        --tol 1e-8 --no-head

Prints a Markdown table on stdout (progress on stderr). Needs scikit-learn (the `bench` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_fast_head import cached_training_part, log, outer_folds  # noqa: E402

from longdoc_cli import docfeatures, headfit  # noqa: E402

SK_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # eval_finetune.fit_lr's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tag", default="20000-bf16")
    ap.add_argument("--set", default="first256", help="the head's feature set, blocks joined by '+'")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-4, help="scikit-learn LogisticRegression tol")
    ap.add_argument("--no-head", action="store_true", help="scikit-learn rows only")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    train, first, mean, counts, labels, y = cached_training_part(args.out, args.corpus, args.tag)
    blocks = tuple(args.set.split("+"))
    grid = () if args.no_head else headfit.DOC_L2_GRID
    rows: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        preds: dict[str, list[int]] = {}
        for te in outer_folds(train, args.folds, seed=rep):
            held = set(te)
            tr = [i for i in range(len(train)) if i not in held]
            f_tr = {"first256": first[tr], "mean": mean[tr]}
            f_te = {"first256": first[te], "mean": mean[te]}
            if "words" in blocks:
                vocab = docfeatures.fit_word_vocab([counts[i] for i in tr])
                words = docfeatures.word_rows(counts, vocab.columns, vocab.idf)
                f_tr["words"] = words.index_select(0, torch.tensor(tr))
                f_te["words"] = words.index_select(0, torch.tensor(te))
            for v in grid:
                fit = headfit.fit_doc_head({b: f_tr[b] for b in blocks}, [y[i] for i in tr], len(labels),
                                           sets=[blocks], multi=False, class_weight="auto", l2=v,
                                           threshold=0.5, seed=42)  # fmt: skip
                p = fit.logits({b: f_te[b] for b in blocks}).argmax(-1).tolist()
                key = f"head {args.set}, l2 {v:g}"
                preds.setdefault(key, [0] * len(train))
                for i, c in zip(te, p, strict=True):
                    preds[key][i] = c
            if blocks == ("first256",):
                scaler = StandardScaler().fit(first[tr].numpy())
                for c in SK_GRID:
                    lr = LogisticRegression(class_weight="balanced", C=c, max_iter=20000, tol=args.tol)
                    lr.fit(scaler.transform(first[tr].numpy()), [y[i] for i in tr])
                    key = f"scikit-learn first256, C {c:g} (tol {args.tol:g})"
                    preds.setdefault(key, [0] * len(train))
                    for i, p in zip(te, lr.predict(scaler.transform(first[te].numpy())), strict=True):
                        preds[key][i] = int(p)
        for key, p in preds.items():
            rows.setdefault(key, []).append(float(f1_score(y, p, average="macro")))
        log(f"rep {rep} done")
    print(f"\n{args.corpus} ({len(train)} training documents, {args.repeats} x {args.folds}-fold outer CV)\n")
    print("| fit | macro-F1 (mean) | per repeat |")
    print("|---|---:|---|")
    for key, v in rows.items():
        print(f"| {key} | {sum(v) / len(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |")


if __name__ == "__main__":
    main()
