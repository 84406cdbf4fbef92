"""Fine-tuning vs the baselines a practitioner tries first, in one run, on held-out documents.

Corpora (built from ../shared/data, a fixed seeded split, nothing tuned on the test part):
  pydocs  pydocs.jsonl, label = documentation section, sections with >= 15 documents; a stratified
          70/30 split.
  sotu    sotu.jsonl, label = era of the president's first address (to 1860, 1861-1932, 1933-1980,
          from 1981); split by president (no president's addresses on both sides), about 30% of
          each era's addresses in test.

Methods, every one trained on the train part only and scored on the test part:
  tfidf+lr      TF-IDF word 1-2 grams (sublinear tf) + logistic regression (class_weight balanced),
                C picked by 5-fold CV on train (macro-F1)
  emb256+lr     frozen default-model embeddings of the first 256 tokens + the same LR
  embchunks+lr  the mean of the embeddings of the document's 256-token chunks + the same LR
  longdoc ...   `longdoc train CONFIG` then `longdoc evaluate` through the CLI (subprocesses), for
                each --recipe NAME=CONFIG[;key=value;...]

Embeddings: the mean of the last hidden states over the chunk's tokens (the pooling the default
sentence model was trained with), the first token global, as `longdoc` runs the model.

    python benchmarks/eval_finetune.py --out /tmp/eval-finetune \
        --recipe recipe=configs/classify.yaml --recipe fast=configs/classify-fast.yaml

Needs scikit-learn (pip install 'longdoc[bench]'). Prints a Markdown table on stdout (progress on
stderr) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ERAS = ((1860, "to-1860"), (1932, "1861-1932"), (1980, "1933-1980"), (9999, "from-1981"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Corpora and splits


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def era(year: int) -> str:
    return next(name for last, name in ERAS if year <= last)


def build_corpus(name: str, data_dir: Path, seed: int, test_fraction: float, max_chars: int | None):
    """(train docs, test docs), each doc {"id", "text", "label"}."""
    cut = (lambda t: t[:max_chars]) if max_chars else (lambda t: t)
    rng = random.Random(seed)
    if name == "pydocs":
        rows = read_jsonl(data_dir / "pydocs.jsonl")
        counts = Counter(r["label"] for r in rows)
        docs = [
            {"id": r["id"], "text": cut(r["text"]), "label": r["label"]}
            for r in rows
            if counts[r["label"]] >= 15
        ]
        test_ids: set[str] = set()
        for label in sorted({d["label"] for d in docs}):  # stratified
            members = sorted(d["id"] for d in docs if d["label"] == label)
            rng.shuffle(members)
            test_ids |= set(members[: round(len(members) * test_fraction)])
    elif name == "sotu":
        rows = read_jsonl(data_dir / "sotu.jsonl")
        first = {}  # a president's era is the era of his first address (Carter's last one is in 1981)
        for r in sorted(rows, key=lambda r: r["year"]):
            first.setdefault(r["president"], r["year"])
        docs = [{"id": r["id"], "text": cut(r["text"]), "label": era(first[r["president"]]),
                 "group": r["president"]} for r in rows]  # fmt: skip
        test_ids = set()
        for label in sorted({d["label"] for d in docs}):  # whole presidents, ~test_fraction of each era
            members = [d for d in docs if d["label"] == label]
            presidents = sorted({d["group"] for d in members})
            rng.shuffle(presidents)
            taken = 0
            for p in presidents:
                if taken >= len(members) * test_fraction:
                    break
                ids = [d["id"] for d in members if d["group"] == p]
                test_ids |= set(ids)
                taken += len(ids)
        train_groups = {d["group"] for d in docs if d["id"] not in test_ids}
        assert not train_groups & {d["group"] for d in docs if d["id"] in test_ids}
    else:
        raise SystemExit(f"unknown corpus {name!r} (pydocs, sotu)")
    train = [d for d in docs if d["id"] not in test_ids]
    test = [d for d in docs if d["id"] in test_ids]
    return train, test


def write_jsonl(docs: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            rec = {"id": d["id"], "text": d["text"], "label": d["label"]}
            if "group" in d:  # sotu: the president (for data.group_key=group)
                rec["group"] = d["group"]
            f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------------
# Scores


def scores(gold: list[str], pred: list[str], train_labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    labels = sorted(set(gold) | set(train_labels))
    recalls = recall_score(gold, pred, labels=labels, average=None, zero_division=0)
    big = Counter(train_labels)
    zero = [x for x, r in zip(labels, recalls, strict=True) if r == 0 and big[x] >= 10 and x in set(gold)]
    return {
        "macro_f1": float(f1_score(gold, pred, labels=sorted(set(gold) | set(pred)), average="macro")),
        "accuracy": float(accuracy_score(gold, pred)),
        "min_recall": float(min(r for x, r in zip(labels, recalls, strict=True) if x in set(gold))),
        "recall0_classes": zero,  # classes with >= 10 training documents never predicted right
    }


def fit_lr(x_train, y_train, seed: int, grid=(0.01, 0.1, 1.0, 10.0, 100.0)):
    """Balanced logistic regression, C by 5-fold stratified CV on the training part (macro-F1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    k = min(5, min(Counter(y_train).values()))
    lr = LogisticRegression(class_weight="balanced", max_iter=5000)
    search = GridSearchCV(lr, {"C": list(grid)}, scoring="f1_macro",
                          cv=StratifiedKFold(max(2, k), shuffle=True, random_state=seed))  # fmt: skip
    search.fit(x_train, y_train)
    return search.best_estimator_, search.best_params_["C"]


def tfidf_lr(train, test, seed: int) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
    x_train = vec.fit_transform([d["text"] for d in train])
    model, c = fit_lr(x_train, [d["label"] for d in train], seed)
    pred = list(model.predict(vec.transform([d["text"] for d in test])))
    return {"C": c, "seconds": time.perf_counter() - t0, "pred": pred}


# ----------------------------------------------------------------------------------------------
# Frozen default-model embeddings of 256-token chunks


def chunk_embeddings(docs: list[dict], chunk: int, bf16: bool, cache: Path) -> list:
    """Per document, a (n_chunks, d) array: the mean-pooled states of each ``chunk``-token window
    (specials included) of the whole document, cached in ``cache``."""
    import numpy as np
    import torch

    from longdoc_cli.headfit import embed_windows
    from longdoc_cli.hub import resolve_model
    from longdoc_cli.model import LongformerEncoder
    from longdoc_cli.tokenize import DocumentTokenizer

    if cache.is_file():
        z = np.load(cache)
        owner = z["owner"]
        return [z["feats"][owner == i] for i in range(len(docs))]
    source = resolve_model("default")
    encoder = LongformerEncoder.from_pretrained(source).eval()
    tok = DocumentTokenizer.from_dir(source)
    windows, owner = [], []
    for i, d in enumerate(docs):
        ws = tok.document_windows(tok.encode(d["text"]), chunk, 0)
        windows += ws
        owner += [i] * len(ws)
    log(f"  embedding {len(windows)} chunks of <= {chunk} tokens ({sum(map(len, windows))} tokens)")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            el = time.perf_counter() - t0
            log(f"    batch {done}/{total}, ETA {el / done * (total - done):.0f} s")

    with torch.no_grad():
        feats = embed_windows(encoder, tok, windows, 16, bf16=bf16, on_batch=progress).numpy()
    owner_arr = np.array(owner)
    np.savez(cache, feats=feats, owner=owner_arr, seconds=time.perf_counter() - t0)
    return [feats[owner_arr == i] for i in range(len(docs))]


def embedding_lr(train_emb, test_emb, train, test, seed: int, first_only: bool) -> dict:
    import numpy as np

    def doc(e):
        return e[0] if first_only else e.mean(0)

    t0 = time.perf_counter()
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.stack([doc(e) for e in train_emb])
    x_test = np.stack([doc(e) for e in test_emb])
    scaler = StandardScaler().fit(x_train)
    model, c = fit_lr(scaler.transform(x_train), [d["label"] for d in train], seed)
    pred = list(make_pipeline(scaler, model).predict(x_test))
    return {"C": c, "seconds": time.perf_counter() - t0, "pred": pred}


# ----------------------------------------------------------------------------------------------
# longdoc train / evaluate through the CLI


def run_recipe(name: str, spec: str, corpus_dir: Path, extra_sets: list[str], reuse: bool = False) -> dict:
    config, *sets = spec.split(";")
    out = corpus_dir / f"run-{name}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "longdoc_cli"]
    train_cmd = [*cli, "train", config, "-o", str(out), "--force",
                 "--set", f"data.train={corpus_dir / 'train.jsonl'}"]  # fmt: skip
    for s in [*sets, *extra_sets]:
        train_cmd += ["--set", s]
    log(f"  {name}: {' '.join(train_cmd[2:])}")
    train_cpu: dict = {}  # CPU seconds and load average of a run made here (not of a reused one)
    if reuse and (out / "best").is_dir() and not (out / ".longdoc-train.lock").exists():
        # A finished run of the same command (an earlier invocation): its own fit time, from its log.
        train_s = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["elapsed_s"]
        log(f"  {name}: reusing {out} (fit {train_s:.0f} s)")
    else:
        t0, cpu0, load0 = time.perf_counter(), _children_cpu(), os.getloadavg()[0]
        with (corpus_dir / f"run-{name}.log").open("w") as f:
            r = subprocess.run(train_cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        train_s = time.perf_counter() - t0
        train_cpu = {"cpu_s": _children_cpu() - cpu0, "load_before": load0, "load_after": os.getloadavg()[0]}
        if r.returncode != 0:
            raise SystemExit(f"{name}: longdoc train failed (see {corpus_dir / f'run-{name}.log'})")
    eval_cmd = [*cli, "evaluate", str(corpus_dir / "test.jsonl"), "-m", str(out / "best"), "--format", "json"]
    for s in [*sets, *extra_sets]:  # what evaluate reads from the model's config, overridden alike
        if s.startswith(("model.dtype", "model.device", "inference.")):
            eval_cmd += ["--set", s]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    r = subprocess.run(eval_cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    eval_s, eval_cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        raise SystemExit(f"{name}: longdoc evaluate failed: {r.stderr[-2000:]}")
    report = json.loads(r.stdout)
    fit = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"report": report, "train_s": train_s, "eval_s": eval_s, "train_cmd": train_cmd[2:],
            "eval_cmd": eval_cmd[2:], "fit": fit[0] if fit else {}, "eval_cpu_s": eval_cpu,
            **({"train_cpu_s": train_cpu["cpu_s"], "load_before": train_cpu["load_before"],
                "load_after": train_cpu["load_after"]} if train_cpu else {})}  # fmt: skip


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def recipe_scores(result: dict, test: list[dict], train_labels: list[str]) -> dict:
    per = result["report"]["classification"]["per_label"]
    conf = result["report"]["classification"]["confusion"]
    labels = result["report"]["classification"]["labels"]
    gold, pred = [], []  # rebuilt from the confusion matrix (rows gold, columns predicted)
    for i, row in enumerate(conf):
        for j, n in enumerate(row):
            gold += [labels[i]] * n
            pred += [labels[j]] * n
    s = scores(gold, pred, train_labels)
    assert abs(s["macro_f1"] - result["report"]["metrics"]["macro_f1"]) < 1e-9, (s, per)
    return s


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/longdoc-eval-finetune")
    ap.add_argument("--corpora", default="pydocs,sotu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--max-chars", type=int, default=None, help="cut every document to this many characters")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=CONFIG[;key=value...] (repeatable)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="--set for every recipe run")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the baseline embeddings")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse a finished OUT/CORPUS/run-NAME (its fit time)"
    )
    ap.add_argument("--smoke", type=int, default=None, help="keep N train, N/2 test documents per label")
    ap.add_argument("--table", nargs="+", metavar="RESULTS_JSON", help="only print the table of saved runs")
    args = ap.parse_args()
    if args.table:
        rows = []
        for file in args.table:
            for corpus, c in json.loads(Path(file).read_text())["corpora"].items():
                rows += [(corpus, method, m) for method, m in c["methods"].items()]
        print_table(rows)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "corpora": {}}
    rows = []
    for corpus in args.corpora.split(","):
        cdir = out / corpus
        cdir.mkdir(exist_ok=True)
        train, test = build_corpus(corpus, Path(args.data_dir), args.seed, args.test_fraction, args.max_chars)
        if args.smoke:

            def few(docs, n):
                return [d for d in docs if sum(e["label"] == d["label"] for e in docs[: docs.index(d)]) < n]

            train, test = few(train, args.smoke), few(test, max(1, args.smoke // 2))
        write_jsonl(train, cdir / "train.jsonl")
        write_jsonl(test, cdir / "test.jsonl")
        y_train, gold = [d["label"] for d in train], [d["label"] for d in test]
        info = {"train": dict(sorted(Counter(y_train).items())), "test": dict(sorted(Counter(gold).items()))}
        log(f"{corpus}: train {info['train']}, test {info['test']}")
        results["corpora"][corpus] = {"split": info, "methods": {}}
        methods = results["corpora"][corpus]["methods"]
        if not args.no_baselines:
            r = tfidf_lr(train, test, args.seed)
            methods["tfidf+lr"] = {**scores(gold, r["pred"], y_train), "C": r["C"], "seconds": r["seconds"]}
            log(f"  tfidf+lr {methods['tfidf+lr']['macro_f1']:.3f}")
            tag = f"{args.max_chars or 'all'}{'-bf16' if args.bf16 else ''}"
            tag += f"-smoke{args.smoke}" if args.smoke else ""
            emb_train = chunk_embeddings(train, 256, args.bf16, cdir / f"emb256-train-{tag}.npz")
            emb_test = chunk_embeddings(test, 256, args.bf16, cdir / f"emb256-test-{tag}.npz")
            for key, first in (("emb256+lr", True), ("embchunks+lr", False)):
                r = embedding_lr(emb_train, emb_test, train, test, args.seed, first)
                methods[key] = {**scores(gold, r["pred"], y_train), "C": r["C"], "seconds": r["seconds"]}
                log(f"  {key} {methods[key]['macro_f1']:.3f}")
        for spec in args.recipe:
            name, _, rest = spec.partition("=")
            only, _, short = name.rpartition("/")  # "pydocs/NAME": that corpus only
            if only and only != corpus:
                continue
            name = short
            r = run_recipe(name, rest, cdir, args.sets, args.reuse)
            methods[f"longdoc {name}"] = {**recipe_scores(r, test, y_train),
                                          **{k: v for k, v in r.items() if k != "report"}}  # fmt: skip
            log(f"  longdoc {name} {methods[f'longdoc {name}']['macro_f1']:.3f} (train {r['train_s']:.0f} s)")
            (out / "results.json").write_text(json.dumps(results, indent=2))
        for method, m in methods.items():
            rows.append((corpus, method, m))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(rows)


def print_table(rows: list) -> None:
    print(
        "| corpus | method | macro-F1 | accuracy | min recall | recall 0 (>= 10 train) | train s | test s |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for corpus, method, m in rows:
        if "train_cpu_s" in m:  # wall (CPU seconds, load average before-after)
            secs = (f"{m['train_s']:.0f} ({m['train_cpu_s']:.0f} CPU s, load {m['load_before']:.1f}-"
                    f"{m['load_after']:.1f}) | {m['eval_s']:.0f} ({m['eval_cpu_s']:.0f} CPU s)")  # fmt: skip
        elif "train_s" in m:
            secs = f"{m['train_s']:.0f} | {m['eval_s']:.0f}"
        else:
            secs = f"{m['seconds']:.0f} (LR fit) | -"
        print(f"| {corpus} | {method} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | {m['min_recall']:.2f} | "
              f"{', '.join(m['recall0_classes']) or '-'} | {secs} |")  # fmt: skip


if __name__ == "__main__":
    main()
