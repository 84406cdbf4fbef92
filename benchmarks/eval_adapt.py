"""The default model with and without an adaptation delta, in one run (issue 12; not a test).

For the unadapted default ("base") and each ``--delta NAME=FILE`` (made by adapt_default.py), a model
directory is built the way ``longdoc`` builds the default (conversion, then ``apply_delta``) and
measured on data the adaptation never saw:

- zero-shot QA on the Python FAQ (../shared/data/pyfaq_qa.jsonl; the FAQ pages are not in pydocs):
  the default scoring (tasks.qa.SentenceScoring(): the second stage and the diversity of the
  answers after the first included, tasks.qa.rank_sentences; also the first stage alone), hit@1 /
  hit@5 on eval_qa.py's dev and held-out pages and on all; each page's sentences and paragraphs
  embedded once (the ranking of ``longdoc qa``, but with every paragraph embedded up front,
  ``block_candidates=0``, so that the first stage can rank every sentence: focus, which embeds
  only the paragraphs of a question's best candidates, is left out; eval_qa.py counts the answers
  it changes);
- zero-shot topics with the default labels (@topics): the State of the Union addresses, the
  **evaluation half** of pydocs (adapt_default.pydocs_split; the other half gave the training pairs),
  and eval_zero_shot.py's held-out licences and software manuals; and the README's six plain labels
  on the same addresses and pydocs pages.

    OMP_NUM_THREADS=1 python benchmarks/eval_adapt.py --delta a=/tmp/adapt/a/delta.safetensors \\
        [--sotu-every 1] [--pydocs-every 1] [--max-chars 20000] [--dtype bf16] [--skip-qa]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_default import pydocs_split  # noqa: E402
from eval_qa import planted_cases  # noqa: E402
from eval_zero_shot import EXPECTED, cached_embeddings, heldout_docs  # noqa: E402

from longdoc_cli.convert import convert_checkpoint, sha256_file  # noqa: E402
from longdoc_cli.hub import (  # noqa: E402
    DEFAULT_ATTENTION_WINDOW,
    DEFAULT_MAX_POSITIONS,
    apply_delta,
    default_source_dir,
)
from longdoc_cli.tasks.classify import Classifier, load_labels  # noqa: E402
from longdoc_cli.tasks.qa import (  # noqa: E402
    QuestionAnswerer,
    SentenceScoring,
    rank_sentences,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model  # noqa: E402
from longdoc_cli.tasks.text import sentence_spans  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIX = "politics and government,computer programming and software,sport,health and medicine,business and finance,arts and entertainment"  # noqa: E501


def build(root: Path, name: str, delta: str | None) -> Path:
    """``root/NAME[-SHA]``: the converted default model, plus ``delta`` when given (rebuilt every run;
    the delta's sha256 in the name keeps the embedding cache, keyed by the folder name, apart)."""
    out = root / (f"{name}-{sha256_file(Path(delta))[:12]}" if delta else name)
    if out.exists():
        shutil.rmtree(out)
    convert_checkpoint(default_source_dir(), out, DEFAULT_MAX_POSITIONS, DEFAULT_ATTENTION_WINDOW)
    if delta:
        apply_delta(out, Path(delta))
    return out


def qa(model_dir: Path, data: Path) -> dict[str, tuple[float, float, int]]:
    with open(data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    by_context: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_context[r["context"]].append(r)
    ranked_pages = sorted(by_context, key=lambda c: (-len(by_context[c]), by_context[c][0]["id"]))
    dev = {c for i, c in enumerate(ranked_pages) if i % 2 == 1}  # eval_qa.py's split
    tm = load_task_model(model_dir, task="qa", device="cpu", dtype="fp32")
    scoring = SentenceScoring(block_candidates=0)  # every paragraph: the first stage ranks every sentence
    answerer = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=scoring)
    st: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for context in ranked_pages:
        spans = sentence_spans(context)
        index = answerer._index(context)
        for r in by_context[context]:
            gold_start = r["answers"]["answer_start"][0]
            gold = next((i for i, (s, e) in enumerate(spans) if s <= gold_start < e), None)
            q = embed_texts(tm, [r["question"]], 1)[0]
            scores = score_sentences(index, q, r["question"], scoring)
            first = torch.argsort(scores, descending=True)[:5].tolist()  # the first stage alone
            ranked = rank_sentences(tm, index, q, r["question"], scoring, 16, 5)[0]
            for part in ("dev" if context in dev else "held-out", "all"):
                st[part]["n"] += 1
                st[part]["hit1"] += ranked[:1] == [gold]
                st[part]["hit5"] += gold in ranked
                st[part]["first_hit1"] += first[:1] == [gold]
                st[part]["first_hit5"] += gold in first
    out = {p: (100 * c["hit1"] / c["n"], 100 * c["hit5"] / c["n"], c["n"]) for p, c in st.items()}
    for p, c in list(st.items()):  # the first stage alone (tasks.qa.PARAGRAPH_SCORING)
        out[f"{p}, first stage"] = (100 * c["first_hit1"] / c["n"], 100 * c["first_hit5"] / c["n"], c["n"])
    return out


def planted(model_dir: Path, sotu: Path, n: int) -> tuple[int, int, int, list[float], list[float]]:
    """eval_qa.py's planted facts (same cases): hit@1, hit@5, n, and the top scores of the answerable
    questions and of the unanswerable ones (another address's question)."""
    tm = load_task_model(model_dir, task="qa", device="cpu", dtype="fp32")
    answerer = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=SentenceScoring())
    cases = planted_cases(str(sotu), n)
    hit1 = hit5 = 0
    answerable, unanswerable = [], []
    for i, (doc_id, doc, (a, b), question, _, _) in enumerate(cases):
        other = cases[(i + 1) % len(cases)][3]
        got, away = answerer.answer(doc_id, doc, [question, other])
        overlaps = [x.start < b and a < x.end for x in got.answers]
        hit1 += overlaps[:1] == [True]
        hit5 += any(overlaps[:5])
        answerable.append(got.answers[0].score)
        unanswerable.append(away.answers[0].score)
    return hit1, hit5, len(cases), answerable, unanswerable


def topics(model_dir: Path, corpora: dict, dtype: str, cache: Path) -> dict[str, tuple[str, int, int]]:
    tm = load_task_model(model_dir, task="classify", device="cpu", dtype=dtype)
    out = {}
    for set_name, labels in (("@topics", load_labels(["@topics"], None)),
                             ("six labels", load_labels(SIX.split(","), None))):  # fmt: skip
        clf = Classifier(tm, labels, batch_size=8)
        for name, docs in corpora.items():
            if set_name == "six labels" and name.startswith("heldout"):
                continue
            expected = EXPECTED[name]
            if set_name == "six labels":
                expected = {labels[0].name} if name == "sotu" else {labels[1].name}
            passages, _ = cached_embeddings(clf, docs, cache)
            first = [clf.names[int(clf.scores_from_passages(e, w).argmax())] for e, w in passages]
            ok = sum(f in expected for f in first)
            instead = collections.Counter(f for f in first if f not in expected).most_common(2)
            out[f"{set_name} {name}"] = (", ".join(f"{k} {v}" for k, v in instead), ok, len(first))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delta", action="append", default=[], help="NAME=FILE (repeatable)")
    ap.add_argument("--sotu-every", type=int, default=1)
    ap.add_argument("--pydocs-every", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=20000)
    ap.add_argument("--dtype", default="bf16", help="of the classification runs (QA runs fp32)")
    ap.add_argument("--skip-qa", action="store_true")
    ap.add_argument("--skip-topics", action="store_true")
    ap.add_argument("--planted", type=int, default=10, help="eval_qa.py's planted facts (0 = skip)")
    ap.add_argument("--no-base", action="store_true", help="skip the unadapted model")
    ap.add_argument("--work", default="/tmp/longdoc-eval-adapt", help="models and embedding cache")
    args = ap.parse_args()
    work = Path(args.work)
    models = ([] if args.no_base else [("base", None)]) + [tuple(d.split("=", 1)) for d in args.delta]
    corpora: dict[str, list[tuple[str, str]]] = {}
    if not args.skip_topics:
        with open(DATA / "sotu.jsonl", encoding="utf-8") as f:
            sotu = [json.loads(line) for line in f if line.strip()][:: args.sotu_every]
        with open(DATA / "pydocs.jsonl", encoding="utf-8") as f:
            pydocs = [json.loads(line) for line in f if line.strip()]
        _, held = pydocs_split([r["id"] for r in pydocs])
        pydocs = [r for r in pydocs if r["id"] in held][:: args.pydocs_every]
        corpora = {"sotu": [(r["id"], r["text"][: args.max_chars]) for r in sotu],
                   "pydocs-eval-half": [(r["id"], r["text"][: args.max_chars]) for r in pydocs]}  # fmt: skip
        corpora.update({k: [(i, t[: args.max_chars]) for i, t in v] for k, v in heldout_docs().items()})
        EXPECTED["sotu"], EXPECTED["pydocs-eval-half"] = EXPECTED["sotu.jsonl"], EXPECTED["pydocs.jsonl"]
        print("corpora: " + ", ".join(f"{k} {len(v)}" for k, v in corpora.items()), flush=True)
    rows = []
    for name, delta in models:
        t = time.perf_counter()
        model_dir = build(work / "models", name, delta)
        row = {"model": name}
        if not args.skip_qa:
            row["qa"] = qa(model_dir, DATA / "pyfaq_qa.jsonl")
            print(name, "QA", row["qa"], f"{time.perf_counter() - t:.0f} s", flush=True)
        if args.planted:
            h1, h5, n, yes, no = planted(model_dir, DATA / "sotu.jsonl", args.planted)
            row["planted"] = (h1, h5, n)
            print(f"{name} planted hit@1 {h1}/{n} hit@5 {h5}/{n}; top score answerable min {min(yes):.2f} "
                  f"median {sorted(yes)[n // 2]:.2f}; unanswerable max {max(no):.2f} median "
                  f"{sorted(no)[n // 2]:.2f}", flush=True)  # fmt: skip
        if corpora:
            row["topics"] = topics(model_dir, corpora, args.dtype, work / "cache")
            for k, v in row["topics"].items():
                print(f"  {name} {k}: {v[1]}/{v[2]} ({100 * v[1] / v[2]:.1f}%)  instead: {v[0]}", flush=True)
        rows.append(row)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    print("\n| model | " + " | ".join(
        (["FAQ dev hit@1/5", "FAQ held-out hit@1/5", "FAQ all hit@1/5"] if not args.skip_qa else [])
        + (["planted hit@1/5"] if args.planted else [])
        + (list(rows[0]["topics"]) if corpora else [])) + " |")  # fmt: skip
    for row in rows:
        cells = [f"{v[0]:.1f} / {v[1]:.1f}" for v in (row["qa"][p] for p in ("dev", "held-out", "all"))] \
            if "qa" in row else []  # fmt: skip
        cells += [f"{row['planted'][0]}/{row['planted'][2]} / {row['planted'][1]}/{row['planted'][2]}"] \
            if "planted" in row else []  # fmt: skip
        cells += [f"{v[1]}/{v[2]}" for v in row.get("topics", {}).values()]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
