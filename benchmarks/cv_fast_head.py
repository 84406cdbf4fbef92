"""Why the frozen fast recipe loses to first-256 embeddings + LR: k-fold CV on the TRAINING part only.

Builds the same corpora and seeded split as benchmarks/eval_finetune.py, keeps only the train part
(the test part is never read), and scores variants of the fast recipe (the head of longdoc_cli/headfit,
each document's first window) by an outer k-fold cross-validation on it, grouped by president for
sotu as the held-out split is. Inside every outer fold the recipe picks its (L2, token scale) by its
own inner 5-fold CV, as `longdoc train` does, so each row is an honest estimate of the whole recipe.

Variants (every combination):
  window   the first window's length in tokens, specials included: 256 | 512
  tokens   the head's token TF-IDF features: off | on (scale picked by the inner CV)
  norm     the window embedding as pooled (raw) | L2-normalised (as sentence-transformers outputs)
  grid     the inner CV's L2 candidates: shipped (headfit.L2_GRID / TOKEN_GRID) | wide (down to 1e-5)
and, as a reference in the same folds, the emb256+lr baseline of eval_finetune.py (StandardScaler +
scikit-learn balanced LR, C by 5-fold CV).

    python benchmarks/cv_fast_head.py --out /tmp/cv-fast-head --max-chars 20000 --bf16

Embeddings of the first windows are cached per corpus and length in OUT. Prints a Markdown table on
stdout (progress on stderr) and writes OUT/cv.json. Needs scikit-learn (the `bench` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_finetune import build_corpus, fit_lr  # noqa: E402

from longdoc_cli import headfit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIDE_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
WIDE_TOKEN_GRID = tuple((l2, s) for l2 in (1e-4, 1e-3, 1e-2, 1e-1) for s in (0.0, 3.0, 10.0))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def print_repeats_table(
    title: str, first_column: str, picks_column: str, rows: dict, picks: dict, top: int
) -> None:
    """A repeated outer CV as a markdown table: each row's mean macro-F1, its repeats, its common picks."""
    print(f"\n{title}\n")
    print(f"| {first_column} | macro-F1 (mean) | per repeat | {picks_column} |")
    print("|---|---:|---|---|")
    for key, v in rows.items():
        common = sorted(set(picks[key]), key=picks[key].count, reverse=True)[:top]
        print(f"| {key} | {sum(v) / len(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} | {'; '.join(common)} |")


def cached_training_part(
    out: str, corpus: str, tag: str
) -> tuple[list[dict], torch.Tensor, torch.Tensor, list, list[str], list[int]]:
    """eval_finetune.py's cached training part of ``corpus`` under ``out``: its documents, their
    first-chunk and mean-of-chunks embeddings, word counts, the sorted labels and each one's index."""
    import numpy as np

    from longdoc_cli import docfeatures

    cdir = Path(out) / corpus
    train = [json.loads(x) for x in (cdir / "train.jsonl").read_text().splitlines()]
    z = np.load(cdir / f"emb256-train-{tag}.npz")
    chunks = [torch.from_numpy(z["feats"][z["owner"] == i]) for i in range(len(train))]
    first = torch.stack([c[0] for c in chunks])
    mean = torch.stack([c.mean(0) for c in chunks])
    counts = [docfeatures.word_counts(d["text"]) for d in train]
    labels = sorted({d["label"] for d in train})
    return train, first, mean, counts, labels, [labels.index(d["label"]) for d in train]


def first_windows(docs: list[dict], length: int, bf16: bool, cache: Path):
    """(embeddings (n, d), first windows): the first ``length``-token window of every document, as
    `longdoc train` with ``train.windows: first`` sees it, embedded by the default model."""
    from longdoc_cli.hub import resolve_model
    from longdoc_cli.model import LongformerEncoder
    from longdoc_cli.tokenize import DocumentTokenizer

    source = resolve_model("default")
    tok = DocumentTokenizer.from_dir(source)
    windows = [tok.document_windows(tok.encode(d["text"]), length, 32)[0] for d in docs]
    specials = [tok.cls_id, tok.sep_id, tok.pad_id]
    vocab = tok.tokenizer.get_vocab_size()
    if cache.is_file():
        return torch.load(cache), windows, specials, vocab
    encoder = LongformerEncoder.from_pretrained(source).eval()
    t0 = time.perf_counter()
    x = headfit.embed_windows(encoder, tok, windows, 8, bf16=bf16)
    log(f"  embedded {len(windows)} first windows of <= {length} tokens in {time.perf_counter() - t0:.0f} s")
    torch.save(x, cache)
    return x, windows, specials, vocab


def outer_folds(train: list[dict], k: int, seed: int) -> list[list[int]]:
    """Stratified folds of the training part; whole groups (sotu: presidents) when documents have one."""
    if "group" not in train[0]:
        labels = sorted({d["label"] for d in train})
        return headfit.folds([labels.index(d["label"]) for d in train], k, seed)
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(train):
        groups.setdefault(d["group"], []).append(i)
    by_label: dict[str, list[str]] = {}
    for g, idx in groups.items():
        by_label.setdefault(train[idx[0]]["label"], []).append(g)
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    pos = 0
    for label in sorted(by_label):
        gs = sorted(by_label[label])
        rng.shuffle(gs)
        for g in gs:
            out[pos % k] += groups[g]
            pos += 1
    return [sorted(f) for f in out if f]


def recipe_fold(x, y, tokens, tr, te, n_labels, grid, seed):
    """The fast recipe's fit on ``tr`` (inner CV over ``grid``), predictions for ``te``."""
    counts = headfit.label_counts([y[i] for i in tr], n_labels)
    balanced = headfit.resolve_class_weight("auto", counts) == "balanced"
    tok_tr = None if tokens is None else tokens[tr]
    (l2, scale), _ = headfit.choose_l2(x[tr], [y[i] for i in tr], n_labels, balanced=balanced, multi=False,
                                       threshold=0.5, seed=seed, grid=grid, tokens=tok_tr)  # fmt: skip
    lw = headfit._label_weights(counts, balanced, False, len(tr))
    head = headfit.fit_logistic(x[tr], torch.tensor([y[i] for i in tr]), n_labels, l2=l2, label_weights=lw,
                                tokens=tok_tr, token_scale=scale)  # fmt: skip
    pred = headfit.predict(head, x[te], False, 0.5, None if tokens is None else tokens[te])
    return [p[0] for p in pred], (l2, scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/longdoc-cv-fast-head")
    ap.add_argument("--corpora", default="pydocs,sotu")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (as eval_finetune.py)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="outer CV repeated with this many fold seeds")
    ap.add_argument("--windows", default="256,512")
    ap.add_argument("--only", default=None, help="run only the rows whose name matches this regex")
    args = ap.parse_args()
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "corpora": {}}
    rows = []
    for corpus in args.corpora.split(","):
        train, _ = build_corpus(corpus, Path(args.data_dir), args.seed, args.test_fraction, args.max_chars)
        labels = sorted({d["label"] for d in train})
        y = [labels.index(d["label"]) for d in train]
        sizes = dict(sorted(Counter(d["label"] for d in train).items()))
        log(f"{corpus}: {len(train)} training documents {sizes}")
        res: dict = {}
        for length in map(int, args.windows.split(",")):
            tag = f"{args.max_chars or 'all'}{'-bf16' if args.bf16 else ''}"
            x_raw, windows, specials, vocab = first_windows(
                train, length, args.bf16, out / f"{corpus}-first{length}-{tag}.pt"
            )
            x_norm = torch.nn.functional.normalize(x_raw, dim=-1)
            # Token features fitted on the whole training part (idf from all training documents: the
            # df of the held-out fold leaks slightly, alike for every variant).
            idf = headfit.token_idf([[w] for w in windows], vocab, specials)
            cols = torch.nonzero(idf > 0).flatten()
            toks = headfit.document_token_features([[w] for w in windows], idf, cols)
            variants = {}
            for tokens_on, norm, grid in itertools.product((False, True), ("raw", "l2"), ("shipped", "wide")):
                if grid == "shipped":
                    g = headfit.TOKEN_GRID if tokens_on else tuple((v, 1.0) for v in headfit.L2_GRID)
                else:
                    g = WIDE_TOKEN_GRID if tokens_on else tuple((v, 1.0) for v in WIDE_L2)
                name = f"{length} tokens={'on' if tokens_on else 'off'} norm={norm} grid={grid}"
                variants[name] = (x_norm if norm == "l2" else x_raw, toks if tokens_on else None, g)
            for name, (x, t, g) in variants.items():
                if args.only and not re.search(args.only, name):
                    continue
                t0 = time.perf_counter()
                f1s, picks = [], Counter()
                for rep in range(args.repeats):
                    pred = [0] * len(y)
                    for part in outer_folds(train, args.folds, 100 + rep):
                        held = set(part)
                        tr = [i for i in range(len(y)) if i not in held]
                        p, pick = recipe_fold(x, y, t, tr, part, len(labels), g, args.seed)
                        picks[f"{pick[0]:g}/{pick[1]:g}"] += 1
                        for i, v in zip(part, p, strict=True):
                            pred[i] = v
                    f1s.append(f1_score(y, pred, average="macro"))
                res[name] = {"cv_macro_f1": sum(f1s) / len(f1s), "per_repeat": f1s, "picks": dict(picks)}
                log(f"  {name}: CV macro-F1 {res[name]['cv_macro_f1']:.3f} {f1s} picks {dict(picks)} "
                    f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
            if length == 256 and (
                not args.only or re.search(args.only, "baseline emb256+lr")
            ):  # the emb256+lr baseline in the same outer folds
                f1s = []
                for rep in range(args.repeats):
                    pred = [0] * len(y)
                    for part in outer_folds(train, args.folds, 100 + rep):
                        held = set(part)
                        tr = [i for i in range(len(y)) if i not in held]
                        sc = StandardScaler().fit(x_raw[tr].numpy())
                        model, _ = fit_lr(sc.transform(x_raw[tr].numpy()), [y[i] for i in tr], args.seed)
                        for i, v in zip(part, model.predict(sc.transform(x_raw[part].numpy())), strict=True):
                            pred[i] = int(v)
                    f1s.append(f1_score(y, pred, average="macro"))
                res["baseline emb256+lr (sklearn)"] = {"cv_macro_f1": sum(f1s) / len(f1s), "per_repeat": f1s}
                log(f"  baseline emb256+lr: CV macro-F1 {sum(f1s) / len(f1s):.3f} {f1s}")
            results["corpora"][corpus] = res
            (out / "cv.json").write_text(json.dumps(results, indent=2))
        rows += [(corpus, k, v) for k, v in res.items()]
    what = f"mean of {args.repeats} x {args.folds}-fold"
    print(f"| corpus | variant (first window) | train-part CV macro-F1 ({what}) |")
    print("|---|---|---:|")
    for corpus, k, v in rows:
        print(f"| {corpus} | {k} | {v['cv_macro_f1']:.3f} |")


if __name__ == "__main__":
    main()
