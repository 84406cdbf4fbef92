"""Long context in the document head: the `mean` block at 512- vs 4096-token windows (the recipe's
``train.feature_window``), and first window vs all windows: outer k-fold CV on the TRAINING part only.

Reads OUT/CORPUS/train.jsonl written by `eval_finetune.py --out OUT` (the test part is never read),
keeps a seeded stratified subset of at most ``--per-label`` documents per label (the encoder's CPU
time), and embeds, with the default model as `longdoc train` does (headfit.embed_windows, bf16
autocast with --bf16): the first 256 and 512 tokens, and the mean block at each window length in
``--windows`` (docfeatures.embedding_blocks: non-overlapping windows, token-weighted mean). Then each
feature set is scored by an outer stratified k-fold CV (whole presidents for sotu), each fit picking
its L2 by headfit.fit_doc_head's own inner CV, as `longdoc train` does. Embeddings are cached in
OUT/CORPUS/meanwin-*.pt.

    python benchmarks/cv_mean_window.py --out /tmp/ft3/eval-pydocs --corpus pydocs --per-label 20 --bf16
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_fast_head import outer_folds  # noqa: E402

from longdoc_cli import docfeatures, headfit  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--per-label", type=int, default=20)
    ap.add_argument("--windows", default="512,4096")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    from sklearn.metrics import f1_score

    from longdoc_cli.hub import resolve_model
    from longdoc_cli.model import LongformerEncoder
    from longdoc_cli.tokenize import DocumentTokenizer

    cdir = Path(args.out) / args.corpus
    train = [json.loads(x) for x in (cdir / "train.jsonl").read_text().splitlines()]
    if args.corpus == "sotu":
        for d in train:
            d["group"] = d.get("group") or re.sub(r"^sotu-\d+-", "", d["id"])
    rng = random.Random(0)
    keep: list[dict] = []
    for label in sorted({d["label"] for d in train}):
        members = [d for d in train if d["label"] == label]
        rng.shuffle(members)
        keep += members[: args.per_label]
    train = keep
    labels = sorted({d["label"] for d in train})
    y = [labels.index(d["label"]) for d in train]
    windows = [int(w) for w in args.windows.split(",")]
    source = resolve_model("default")
    tok = DocumentTokenizer.from_dir(source)
    encoder = None
    feats: dict[str, torch.Tensor] = {}
    texts = [d["text"] for d in train]
    n_tokens = 0
    for name, spec in [("first", docfeatures.FeatureSpec(("first256", "first512"), 256))] + [
        (f"mean{w}", docfeatures.FeatureSpec(("mean",), w)) for w in windows
    ]:
        cache = cdir / f"meanwin-{name}-{args.per_label}{'-bf16' if args.bf16 else ''}.pt"
        if cache.is_file():
            got = torch.load(cache)
        else:
            if encoder is None:
                encoder = LongformerEncoder.from_pretrained(source).eval()
            t0, cpu0 = time.perf_counter(), time.process_time()

            def embed(ws, enc=encoder):
                return headfit.embed_windows(enc, tok, ws, args.batch_size, bf16=args.bf16)

            got, counts, _ = docfeatures.embedding_blocks(embed, tok, texts, spec, 4096)
            n_tokens = sum(counts)
            log(f"{name}: {len(texts)} documents, {n_tokens} tokens, {time.perf_counter() - t0:.0f} s wall, "
                f"{time.process_time() - cpu0:.0f} CPU s")  # fmt: skip
            torch.save(got, cache)
        for b, x in got.items():
            feats[b if name == "first" else name] = x
    counts = [docfeatures.word_counts(t) for t in texts]
    sets: dict[str, list[tuple[str, ...]]] = {
        "first256": [("first256",)],
        "first512": [("first512",)],
        **{f"mean{w}": [(f"mean{w}",)] for w in windows},
        "words": [("words",)],
        **{
            f"auto (first256, first512, mean{w}, words)": [
                tuple(f"mean{w}" if b == "mean" else b for b in s) for s in docfeatures.AUTO_SETS
            ]
            for w in windows
        },
    }
    rows: dict[str, list[float]] = {}
    picks: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        parts = outer_folds(train, args.folds, seed=rep)
        preds: dict[str, list[int]] = {k: [0] * len(train) for k in sets}
        for te in parts:
            held = set(te)
            tr = [i for i in range(len(train)) if i not in held]
            vocab = docfeatures.fit_word_vocab([counts[i] for i in tr])
            words = docfeatures.word_rows(counts, vocab.columns, vocab.idf)
            allf = {**feats, "words": words}

            def rows_of(idx, allf=allf):
                t = torch.tensor(idx)
                return {b: x.index_select(0, t) for b, x in allf.items()}

            f_tr, f_te = rows_of(tr), rows_of(te)
            for key, cand in sets.items():
                used = {b for s in cand for b in s}
                fit = headfit.fit_doc_head({b: f_tr[b] for b in used}, [y[i] for i in tr], len(labels),
                                           sets=cand, multi=False, class_weight="auto", l2="auto",
                                           threshold=0.5, seed=42)  # fmt: skip
                p = fit.logits({b: f_te[b] for b in fit.blocks}).argmax(-1).tolist()
                for i, v in zip(te, p, strict=True):
                    preds[key][i] = v
                picks.setdefault(key, []).append("+".join(fit.blocks))
            log(f"rep {rep}: fold done")
        for key, p in preds.items():
            rows.setdefault(key, []).append(float(f1_score(y, p, average="macro")))
    print(f"\n{args.corpus}: {len(train)} training documents (at most {args.per_label} per label), "
          f"{args.repeats} x {args.folds}-fold outer CV\n")  # fmt: skip
    print("| feature set(s) | CV macro-F1 (mean) | per repeat | picked (auto) |")
    print("|---|---:|---|---|")
    for key, v in rows.items():
        common = sorted(set(picks[key]), key=picks[key].count, reverse=True)[:2]
        pick = (
            "; ".join(f"{c} ({picks[key].count(c)}/{len(picks[key])})" for c in common)
            if "auto" in key
            else ""
        )
        print(f"| {key} | {np.mean(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} | {pick} |")


if __name__ == "__main__":
    main()
