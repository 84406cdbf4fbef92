"""How well the default model's zero-shot topics fit real documents (not a test).

The two corpora of ../shared/data have an obvious topic each: State of the Union addresses are about
politics and government, Python documentation pages about computing and software. Every k-th record
of each (``--every 1``: all of them) is classified zero-shot; the script reports how often an expected
label is first and among the top 3, and the labels that came first instead.

Label sets: ``@topics`` (the default) and ``@iptc`` (presets), or ``--labels A,B,...`` (yours: A is
expected for the addresses, B for the documentation pages). Methods, all scored from the same passage
embeddings (cached under ``--cache``, so trying variants does not re-encode documents):

- ``legacy``: the method before issue 12, one mean-pooled vector per ``--legacy-length``-token window
  (default 4096), the windows' cosines averaged, ``softmax(20 cos)``, no calibration;
- ``VOTE/PROMPTS/CAL``: PASSAGE_TOKENS-token passages scored and aggregated by VOTE
  (soft, mean, centroid), labels embedded from PROMPTS (auto, name, description, multi), with (cal)
  or without (raw) contextual calibration, or auto (calibrated when no label has a description).
  ``longdoc classify``'s default is soft/auto/auto.

``--heldout`` adds a check on text that is neither corpus: licence texts shipped with Debian
(/usr/share/common-licenses and a JDK's legal notices: expected "law and justice") and software
manuals (vim help, Node.js API docs, CMake manuals: expected "computers and software").

    python benchmarks/eval_zero_shot.py [--every 8] [--max-chars 20000] [--dtype fp32]
    python benchmarks/eval_zero_shot.py --every 1 --sets @topics,@iptc --legacy --heldout
    python benchmarks/eval_zero_shot.py --labels "politics and government,computer programming and \
software,sport,health and medicine,business and finance,arts and entertainment"
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.classify import (
    PASSAGE_TOKENS,
    PROMPT_STYLES,
    VOTES,
    Classifier,
    Label,
    load_labels,
)
from longdoc_cli.tasks.runner import load_task_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = ("sotu.jsonl", "pydocs.jsonl")
# The labels that count as right, whatever the label set (a user's --labels: its first two).
EXPECTED = {
    "sotu.jsonl": {"politics and government", "politics"},
    "pydocs.jsonl": {"computers and software", "science and technology"},
    "heldout-law": {"law and justice", "crime, law and justice"},
    "heldout-software": {"computers and software", "science and technology"},
}


def heldout_docs() -> dict[str, list[tuple[str, str]]]:
    """Text on this machine that is neither corpus (Debian packages' docs and licences)."""
    law = sorted({os.path.realpath(p) for p in glob.glob("/usr/share/common-licenses/*")})
    law += sorted(glob.glob("/usr/lib/jvm/*/legal/java.base/*LICENSE*"))[:2]
    software = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))[::12]
    software += sorted(glob.glob("/usr/share/doc/nodejs/api/*.md"))[::8]
    software += sorted(glob.glob("/usr/share/cmake-*/Help/manual/*.rst"))[::3]
    out = {}
    for name, paths in (("heldout-law", law), ("heldout-software", software)):
        out[name] = [(p, Path(p).read_text(encoding="utf-8", errors="replace")) for p in paths]
    return out


def cached_embeddings(clf: Classifier, docs: list[tuple[str, str]], cache: Path):
    """The documents' passage embeddings, each from ``cache`` when it was encoded before (one file per
    text, so that any subset reuses them); and the seconds per document of those encoded now."""
    folder = cache / f"{clf.tm.path.name}-{clf.window}-{clf.stride}-{str(clf.tm.dtype).split('.')[-1]}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt" for _, text in docs]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    seconds = None
    if todo:
        t = time.perf_counter()
        for chunk in range(0, len(todo), 16):  # saved as they come: an interrupted run keeps its work
            ids = todo[chunk : chunk + 16]
            for i, embs in zip(ids, clf.passage_embeddings([docs[i][1] for i in ids]), strict=True):
                torch.save(embs, paths[i])
        seconds = (time.perf_counter() - t) / len(todo)
    return [torch.load(p) for p in paths], seconds


def legacy_classifier(model_dir: Path, dtype: str, length: int, labels: list[Label]) -> Classifier:
    """The method before issue 12 (with IPTC as its default labels): one vector per long window
    (windows sharing 256 tokens), the windows' cosines averaged, softmax(20 cos), each label
    embedded as ``name: description``, no calibration."""
    tm = load_task_model(model_dir, task="classify", device="cpu", dtype=dtype, max_length=length)
    return Classifier(tm, labels, batch_size=8, stride=256, strict_stride=True, passage_tokens=length,
                      prompts="description", calibrate=False, vote="mean")  # fmt: skip


def report(name: str, method: str, expected: set[str], names: list[str], probs: list[torch.Tensor]) -> None:
    first = [names[int(p.argmax())] for p in probs]
    top3 = [{names[i] for i in p.topk(min(3, len(names))).indices.tolist()} for p in probs]
    ok = sum(f in expected for f in first)
    ok3 = sum(bool(t & expected) for t in top3)
    instead = collections.Counter(f for f in first if f not in expected).most_common(3)
    print(f"  {name:17s} {method:28s} first {ok:3d}/{len(probs)} ({100 * ok / len(probs):5.1f}%)  "
          f"top-3 {ok3:3d}/{len(probs)}  instead: {', '.join(f'{k} {v}' for k, v in instead)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=8, help="take every k-th record of each file (1 = all)")
    ap.add_argument("--max-chars", type=int, default=20000, help="cut documents to this many characters")
    ap.add_argument(
        "--labels", help="your labels, comma-separated: the first for SOTU, the second for pydocs"
    )
    ap.add_argument("--sets", default="@topics", help="label presets to compare, comma-separated")
    ap.add_argument(
        "--methods",
        default="soft/auto/auto",
        help="VOTE/PROMPTS/cal|raw|auto, comma-separated; all = every one",
    )
    ap.add_argument(
        "--legacy", action="store_true", help="also the method before issue 12 (slow: long windows)"
    )
    ap.add_argument("--legacy-length", type=int, default=4096)
    ap.add_argument("--passage-tokens", type=int, default=PASSAGE_TOKENS)
    ap.add_argument(
        "--speed",
        type=int,
        default=0,
        help="time `classify` on N documents of each corpus, uncached: the legacy method against the default",
    )
    ap.add_argument("--heldout", action="store_true", help="also the held-out licences and manuals")
    ap.add_argument("--dtype", default="fp32", help="fp32 (the default of longdoc classify) or bf16")
    ap.add_argument("--cache", default="/tmp/longdoc-eval-zero-shot", help="passage embedding cache")
    args = ap.parse_args()  # fmt: skip
    cache = Path(args.cache)
    model_dir = resolve_model("default")
    tm = load_task_model(model_dir, task="classify", device="cpu", dtype=args.dtype)
    corpora: dict[str, list[tuple[str, str]]] = {}
    for name in CORPORA:
        with open(DATA / name, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()][:: args.every]
        corpora[name] = [(r["id"], r["text"][: args.max_chars]) for r in records]
    if args.heldout:
        corpora.update({k: [(i, t[: args.max_chars]) for i, t in v] for k, v in heldout_docs().items()})
    label_sets = {x: load_labels([x], None) for x in args.sets.split(",")}
    expected = dict(EXPECTED)
    if args.labels:
        label_sets = {"--labels": load_labels(args.labels.split(","), None)}
        expected = {
            **expected,
            **dict(zip(CORPORA, [{x.name} for x in label_sets["--labels"][:2]], strict=True)),
        }
    methods = args.methods.split(",")
    if methods == ["all"]:
        methods = [f"{v}/{p}/{c}" for v in VOTES for p in PROMPT_STYLES for c in ("cal", "raw", "auto")]
    sizes = ", ".join(f"{k} {len(v)} docs" for k, v in corpora.items())
    print(
        f"every {args.every}, max {args.max_chars} chars, {args.dtype}, {args.passage_tokens}-token passages"
    )
    print(sizes)
    encoder = Classifier(
        tm, label_sets[next(iter(label_sets))], batch_size=8, passage_tokens=args.passage_tokens
    )
    passages = {}
    for name, docs in corpora.items():
        passages[name], sec = cached_embeddings(encoder, docs, cache)
        n = sum(len(w) for _, w in passages[name])
        print(f"{name}: {n} passages" + (f", encoded in {sec:.3f} s/doc" if sec is not None else " (cached)"),
              flush=True)  # fmt: skip
    if args.legacy:
        legacy_labels = label_sets["--labels"] if args.labels else load_labels(["@iptc"], None)
        legacy = legacy_classifier(model_dir, args.dtype, args.legacy_length, legacy_labels)
        for name, docs in corpora.items():
            embs, sec = cached_embeddings(legacy, docs, cache)
            probs = [legacy.scores_from_passages(e, w) for e, w in embs]
            print(
                f"legacy, {args.legacy_length}-token windows"
                + (f", encoded in {sec:.3f} s/doc" if sec else "")
            )
            report(name, "legacy/description/raw", expected[name], legacy.names, probs)  # fmt: skip
    if args.speed:
        legacy = legacy_classifier(model_dir, args.dtype, args.legacy_length, load_labels(["@iptc"], None))
        default = Classifier(tm, None, batch_size=8)
        for name in CORPORA:
            docs = corpora[name][: args.speed]
            t = time.perf_counter()
            legacy.classify(docs)
            t_legacy = (time.perf_counter() - t) / len(docs)
            t = time.perf_counter()
            default.classify(docs)
            t_new = (time.perf_counter() - t) / len(docs)
            print(f"speed {name} ({len(docs)} docs): legacy {t_legacy:.2f} s/doc, default {t_new:.2f} s/doc "
                  f"({t_new / t_legacy:.2f}x)", flush=True)  # fmt: skip
    for set_name, labels in label_sets.items():
        print(f"labels {set_name} ({len(labels)})")
        for method in methods:
            vote, prompts, cal = method.split("/")
            clf = Classifier(tm, labels, batch_size=8, passage_tokens=args.passage_tokens, prompts=prompts,
                             calibrate=None if cal == "auto" else cal == "cal", vote=vote)  # fmt: skip
            for name in corpora:
                probs = [clf.scores_from_passages(e, w) for e, w in passages[name]]
                assert all(abs(float(p.sum()) - 1) < 1e-4 for p in probs)
                report(name, method, expected[name], clf.names, probs)


if __name__ == "__main__":
    main()
