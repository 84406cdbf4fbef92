"""Why the document-level head loses to scikit-learn on the same feature: outer k-fold CV on the
TRAINING part only, on eval_finetune.py's cached embeddings (no encoder pass).

Reads OUT/CORPUS/train.jsonl and the baselines' cached 256-token chunk embeddings
(emb256-train-TAG.npz) that `eval_finetune.py --out OUT` wrote; the test part is never read. Blocks as
doc_head_cached.py builds them: first256 (the first chunk), mean (the mean of the chunks), words
(TF-IDF, vocabulary from the outer fold's training documents only). Outer folds: stratified, whole
presidents for sotu (the group is the id's name part), as the held-out split is. Inside every outer
fold each variant picks its L2 (and, with several sets, its feature set) by its own inner 5-fold CV,
as `longdoc train` does.

Variants of headfit.fit_doc_head, each on two feature choices (first256 alone; the auto selection
among the sets of first256, mean, words):
  shipped     as the code is (DOC_L2_GRID, fit_logistic's L-BFGS capped at 100 iterations)
  iter1000    the same with up to 1000 L-BFGS iterations (the fit converged at weak penalties)
  iter1000+   iter1000 with the grid extended down to 1e-10
and, on first256, the emb256+lr baseline of eval_finetune.py (StandardScaler + scikit-learn balanced
LR, C in 0.01..100 by 5-fold CV) in the same folds.

    python benchmarks/cv_doc_head.py --out /tmp/ft3/eval-pydocs --corpus pydocs --repeats 2

Prints a Markdown table on stdout (progress on stderr). Needs scikit-learn (the `bench` extra).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_fast_head import cached_training_part, log, outer_folds, print_repeats_table  # noqa: E402
from eval_finetune import fit_lr  # noqa: E402

from longdoc_cli import docfeatures, headfit  # noqa: E402

SHIPPED_GRID = headfit.DOC_L2_GRID
WIDE_GRID = (1e-10, 3e-10, 1e-9, 3e-9, *SHIPPED_GRID)
DECADE_GRID = tuple(v for v in SHIPPED_GRID if f"{v:g}".startswith("1e"))  # 1e-8, 1e-7, ..., 0.1
SKLEARN_C = (0.01, 0.1, 1.0, 10.0, 100.0)  # eval_finetune.fit_lr's grid
_fit_logistic = headfit.fit_logistic


_scale_block = headfit.scale_block


def scale_unclamped(x):
    """headfit.scale_block with every non-constant feature standardised, as scikit-learn's
    StandardScaler does (the shipped one clamps sd at 1e-6, which zeroes near-constant dimensions)."""
    if x.is_sparse:
        return _scale_block(x)
    x = x.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    factor = 1.0 / math.sqrt(x.shape[1])
    return (x - mu) / sd * factor, headfit.BlockScale(mu, sd, factor)


def set_variant(max_iter: int, grid: tuple[float, ...], unclamped: bool = False) -> None:
    """fit_doc_head reads headfit.fit_logistic, headfit.DOC_L2_GRID and headfit.scale_block when
    called: patch them."""
    headfit.scale_block = scale_unclamped if unclamped else _scale_block

    def fit(*args, **kwargs):
        kwargs["max_iter"] = max_iter
        return _fit_logistic(*args, **kwargs)

    headfit.fit_logistic = fit
    headfit.DOC_L2_GRID = grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tag", default="20000-bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--features", default="first256,auto", help="first256 and/or auto")
    ap.add_argument("--variants", default="shipped,iter1000,iter1000+,decade,sk5,smooth3")
    ap.add_argument("--fixed-c", type=float, nargs="*", default=[], help="also both fits at these C")
    args = ap.parse_args()
    from sklearn.metrics import f1_score

    train, first, mean, counts, labels, y = cached_training_part(args.out, args.corpus, args.tag)
    if args.corpus == "sotu":
        for d in train:  # sotu-1790-george-washington -> george-washington
            d["group"] = re.sub(r"^sotu-\d+-", "", d["id"])
    variants = {
        "shipped": (100, SHIPPED_GRID),
        "iter1000": (1000, SHIPPED_GRID),
        "iter1000+": (1000, WIDE_GRID),
        "decade": (100, DECADE_GRID),
        "sk5": (100, None),
        "smooth3": (100, SHIPPED_GRID),
        "unclamped": (100, SHIPPED_GRID),
    }
    keep = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = {k: v for k, v in variants.items() if k in keep}
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    rows: dict[str, list[float]] = {}
    picks: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        parts = outer_folds(train, args.folds, seed=rep)
        preds: dict[str, list[int]] = {}
        for j, te in enumerate(parts):
            held = set(te)
            tr = [i for i in range(len(train)) if i not in held]
            vocab = docfeatures.fit_word_vocab([counts[i] for i in tr])
            words = docfeatures.word_rows(counts, vocab.columns, vocab.idf)
            feats_tr = {
                "first256": first[tr],
                "mean": mean[tr],
                "words": words.index_select(0, torch.tensor(tr)),
            }
            feats_te = {
                "first256": first[te],
                "mean": mean[te],
                "words": words.index_select(0, torch.tensor(te)),
            }
            for feat in features:
                sets = [("first256",)] if feat == "first256" else [
                    s for s in docfeatures.AUTO_SETS if "first512" not in s
                ]  # fmt: skip
                for name, (max_iter, grid) in variants.items():
                    if name == "sk5":  # scikit-learn's C values in the head's units: l2 = 1 / (2 C n d)
                        grid = tuple(sorted(1 / (2 * c * len(tr) * first.shape[1]) for c in SKLEARN_C))
                    set_variant(max_iter, grid, unclamped=name == "unclamped")
                    t0 = time.perf_counter()
                    used = {b: feats_tr[b] for b in {b for s in sets for b in s}}
                    kw = dict(multi=False, class_weight="auto", threshold=0.5, seed=42)
                    fit = headfit.fit_doc_head(
                        used, [y[i] for i in tr], len(labels), sets=sets, l2="auto", **kw
                    )
                    if name == "smooth3":  # each set's CV curve averaged over neighbouring L2 values
                        best_key, best_v = None, -1.0
                        for s_ in sets:
                            curve = [fit.cv_scores[(docfeatures.set_name(s_), v)] for v in grid]
                            for i, v in reversed(list(enumerate(grid))):  # ties: the stronger penalty
                                near = curve[max(0, i - 1) : i + 2]
                                m = sum(near) / len(near)
                                if m > best_v + 1e-12:
                                    best_key, best_v = (s_, v), m
                        fit = headfit.fit_doc_head(
                            {b: used[b] for b in best_key[0]},
                            [y[i] for i in tr],
                            len(labels),
                            sets=[best_key[0]],
                            l2=best_key[1],
                            **kw,
                        )
                    key = f"{feat} {name}"
                    p = fit.logits({b: feats_te[b] for b in fit.blocks}).argmax(-1).tolist()
                    preds.setdefault(key, [0] * len(train))
                    for i, v in zip(te, p, strict=True):
                        preds[key][i] = v
                    picks.setdefault(key, []).append(f"{'+'.join(fit.blocks)}@{fit.l2:g}")
                    log(f"rep {rep} fold {j} {key}: {'+'.join(fit.blocks)} l2={fit.l2:g} "
                        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
            set_variant(100, SHIPPED_GRID)
            x_tr, x_te = first[tr].numpy(), first[te].numpy()
            from sklearn.preprocessing import StandardScaler

            scaler = StandardScaler().fit(x_tr)
            model, c = fit_lr(scaler.transform(x_tr), [y[i] for i in tr], seed=0)
            key = "first256 sklearn"
            preds.setdefault(key, [0] * len(train))
            for i, v in zip(te, model.predict(scaler.transform(x_te)), strict=True):
                preds[key][i] = int(v)
            picks.setdefault(key, []).append(f"C={c:g}")
            for c in args.fixed_c:  # one penalty, no selection: the two fits alone
                from sklearn.linear_model import LogisticRegression

                lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
                lr.fit(scaler.transform(x_tr), [y[i] for i in tr])
                l2 = 1 / (2 * c * len(tr) * first.shape[1])
                ours = headfit.fit_doc_head({"first256": first[tr]}, [y[i] for i in tr], len(labels),
                                            sets=[("first256",)], l2=l2, multi=False, class_weight="balanced",
                                            threshold=0.5, seed=42)  # fmt: skip
                for key, pred in ((f"first256 sklearn C={c:g} fixed", lr.predict(scaler.transform(x_te))),
                                  (f"first256 head l2=1/(2Cnd), C={c:g} fixed",
                                   ours.logits({"first256": first[te]}).argmax(-1).tolist())):  # fmt: skip
                    preds.setdefault(key, [0] * len(train))
                    for i, v in zip(te, pred, strict=True):
                        preds[key][i] = int(v)
                    picks.setdefault(key, []).append("-")
        for key, p in preds.items():
            rows.setdefault(key, []).append(float(f1_score(y, p, average="macro")))
    title = f"{args.corpus} ({len(train)} training documents, {args.repeats} x {args.folds}-fold outer CV)"
    print_repeats_table(title, "variant", "picks (set@l2 or C)", rows, picks, top=3)


if __name__ == "__main__":
    main()
