"""How the document-level head turns its inner CV into a head (``headfit.DOC_SELECT_RULES``): outer
k-fold CV on the TRAINING part only, on eval_finetune.py's cached embeddings (no encoder pass).

Reads OUT/CORPUS/train.jsonl and the baselines' cached 256-token chunk embeddings
(emb256-train-TAG.npz) that `eval_finetune.py --out OUT` wrote; the test part is never read. Blocks as
doc_head_cached.py builds them: first256 (the first chunk), mean (the unweighted mean of the chunks),
words (TF-IDF, vocabulary from the outer fold's training documents only). Outer folds: stratified,
whole groups (sotu: presidents) when the documents have a ``group`` field, as the held-out split is.

Two candidate families: ``fast`` (the sets of first256 and words: classify-fast.yaml without its
first512 block, which the cache does not hold) and ``full`` (the sets of first256, mean and words:
classify.yaml without first512). Inside every outer fold the inner CV (fit_doc_head's: 5 folds,
seed 42, every set x DOC_L2_GRID) runs once per family and every rule of ``--rules`` is applied to
its out-of-fold logits, then refitted on the outer fold's training documents and scored on its
held-out documents. Reference in the same folds: emb256+lr (StandardScaler + scikit-learn balanced
LR, C in 0.01..100 by 5-fold CV), and with ``--tfidf`` TF-IDF + the same LR.

    python benchmarks/cv_select.py --out /tmp/me/evalf7 --corpus pydocs --repeats 3

Prints a Markdown table on stdout (progress on stderr). Needs scikit-learn (the `bench` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_fast_head import cached_training_part, log, outer_folds, print_repeats_table  # noqa: E402
from eval_finetune import fit_lr  # noqa: E402

from longdoc_cli import docfeatures, headfit  # noqa: E402

FAMILIES = {
    "fast": [("first256",), ("words",), ("first256", "words")],
    "full": [s for s in docfeatures.AUTO_SETS if "first512" not in s],
}
_doc_head_cv = headfit.doc_head_cv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tag", default="20000-bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--first-repeat", type=int, default=0, help="fold seed of the first repeat")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--families", default="fast,full")
    ap.add_argument("--rules", default=",".join(headfit.DOC_SELECT_RULES))
    ap.add_argument("--tfidf", action="store_true", help="also TF-IDF + LR in the same folds (slow)")
    ap.add_argument("--cache", help="folder keeping each outer fold's inner-CV logits (reused when present)")
    args = ap.parse_args()
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    train, first, mean, counts, labels, y = cached_training_part(args.out, args.corpus, args.tag)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    memo: dict[str, headfit.DocHeadCV] = {}

    where: list[str] = [""]  # "rep-fold-family" of the fit in progress

    def cached_cv(*a, **k):  # one inner CV per outer fold and family, shared by the rules
        key = where[0]
        if key not in memo:
            path = Path(args.cache) / f"{args.corpus}-{key}.pt" if args.cache else None
            if path is not None and path.exists():
                memo[key] = headfit.DocHeadCV(**torch.load(path))
            else:
                memo[key] = _doc_head_cv(*a, **k)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(vars(memo[key]), path)
        return memo[key]

    headfit.doc_head_cv = cached_cv
    rows: dict[str, list[float]] = {}
    picks: dict[str, list[str]] = {}
    for rep in range(args.first_repeat, args.first_repeat + args.repeats):
        parts = outer_folds(train, args.folds, seed=rep)
        preds: dict[str, list[int]] = {}

        def put(key: str, te: list[int], p, pick: str, preds: dict[str, list[int]] = preds) -> None:
            preds.setdefault(key, [0] * len(train))
            for i, v in zip(te, p, strict=True):
                preds[key][i] = int(v)
            picks.setdefault(key, []).append(pick)

        for j, te in enumerate(parts):
            held = set(te)
            tr = [i for i in range(len(train)) if i not in held]
            vocab = docfeatures.fit_word_vocab([counts[i] for i in tr])
            words = docfeatures.word_rows(counts, vocab.columns, vocab.idf)
            rows_tr, rows_te = torch.tensor(tr), torch.tensor(te)
            f_tr = {"first256": first[tr], "mean": mean[tr], "words": words.index_select(0, rows_tr)}
            f_te = {"first256": first[te], "mean": mean[te], "words": words.index_select(0, rows_te)}
            for fam in families:
                sets = FAMILIES[fam]
                used = sorted({b for s in sets for b in s})
                where[0] = f"{rep}-{j}-{fam}"
                for rule in rules:
                    t0 = time.perf_counter()
                    fit = headfit.fit_doc_head({b: f_tr[b] for b in used}, [y[i] for i in tr], len(labels),
                                               sets=sets, multi=False, class_weight="auto", l2="auto",
                                               threshold=0.5, seed=42, select=rule)  # fmt: skip
                    p = fit.logits({b: f_te[b] for b in fit.blocks}).argmax(-1).tolist()
                    pick = " & ".join(f"{n}@{v:g}" for n, v in fit.members)
                    put(f"{fam} {rule}", te, p, pick)
                    log(f"rep {rep} fold {j} {fam} {rule}: {pick} ({time.perf_counter() - t0:.1f} s)")
            scaler = StandardScaler().fit(first[tr].numpy())
            model, c = fit_lr(scaler.transform(first[tr].numpy()), [y[i] for i in tr], seed=0)
            put("baseline emb256+lr", te, model.predict(scaler.transform(first[te].numpy())), f"C={c:g}")
            if args.tfidf:
                from sklearn.feature_extraction.text import TfidfVectorizer

                vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
                x_tr = vec.fit_transform([train[i]["text"] for i in tr])
                model, c = fit_lr(x_tr, [y[i] for i in tr], seed=0)
                put("baseline tfidf+lr", te, model.predict(vec.transform([train[i]["text"] for i in te])),
                    f"C={c:g}")  # fmt: skip
        for key, p in preds.items():
            rows.setdefault(key, []).append(float(f1_score(y, p, average="macro")))
        log(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()))
    title = f"{args.corpus} ({len(train)} training documents, {args.repeats} x {args.folds}-fold outer CV)"
    print_repeats_table(title, "family rule", "most common picks", rows, picks, top=2)


if __name__ == "__main__":
    main()
