"""Zero-shot topic variants rescored from eval_zero_shot.py's cached passage embeddings (not a test).

What benchmarks/README.md's "Several descriptions per label" subsection measured besides the default,
every k-th document of ../shared/data (``--every 8``: the dev documents the choices were made on):

- how a label's several descriptions are combined: ``max`` (the default: a passage's cosine with the
  label is its best description's), ``centroid`` (the descriptions' embeddings averaged into one
  vector), ``mean`` (their cosines averaged), ``lse`` (a soft maximum, logsumexp at the scale);
- which passages vote: ``prose>=T`` lets only passages whose share of prose characters
  (tasks/text.py's span_kind over their sentences) is at least T vote, all of them when those
  carry less than a quarter of the tokens;
- centring: passages and label vectors minus a background vector (the mean of the label vectors, or
  of the content-free texts' embeddings), renormalised, before the cosine.

Documents are encoded once into the same cache as eval_zero_shot.py (``--cache``, ``--dtype``).

    python benchmarks/zero_shot_variants.py --every 8 --dtype bf16 --sets @topics,@path/to/other.tsv
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_zero_shot import CORPORA, DATA, EXPECTED, cached_embeddings

from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.classify import NEUTRAL_TEXTS, SCALE, Classifier, label_cosines, load_labels
from longdoc_cli.tasks.runner import embed_texts, load_task_model
from longdoc_cli.tasks.text import sentence_spans, span_kind


def prose_share(text: str) -> float:
    """The share of the text's non-space characters that are in prose sentences."""
    total = prose = 0
    for s, e in sentence_spans(text):
        n = len(text[s:e].replace(" ", ""))
        total += n
        prose += n if span_kind(text, s, e) == "prose" else 0
    return prose / total if total else 0.0


def passage_prose(clf: Classifier, text: str) -> torch.Tensor:
    """Each passage's prose share, the passages being the classifier's windows over ``text``."""
    _, windows = clf._prepare(text)
    shares = []
    for w in windows:
        offsets = [o for o in w.offsets if o is not None]
        shares.append(prose_share(text[offsets[0][0] : offsets[-1][1]]) if offsets else 0.0)
    return torch.tensor(shares)


def cosines(e: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor, how: str) -> torch.Tensor:
    """(n, L): passages' cosines with the labels, each label's descriptions combined by ``how``."""
    if how == "max":
        return label_cosines(e, vectors, owner)
    n_labels = int(owner.max()) + 1
    if how == "centroid":
        groups = [vectors[owner == i].mean(0) for i in range(n_labels)]
        return e @ F.normalize(torch.stack(groups), dim=-1).T
    each = e @ vectors.T
    if how == "mean":
        return torch.stack([each[:, owner == i].mean(1) for i in range(n_labels)], 1)
    return torch.stack([torch.logsumexp(SCALE * each[:, owner == i], 1) / SCALE for i in range(n_labels)], 1)


def score(
    e: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor,
    vectors: torch.Tensor,
    owner: torch.Tensor,
    how: str = "max",
    prose: float | None = None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """A document's soft vote (the default's) under one variant."""
    if prose is not None:
        kept = w * (p >= prose).float()
        w = kept if kept.sum() >= 0.25 * w.sum() else w
    if centre is not None:
        e = F.normalize(e - centre, dim=-1)
        cos = label_cosines(e, F.normalize(vectors - centre, dim=-1), owner)
    else:
        cos = cosines(e, vectors, owner, how)
    return (w / w.sum()) @ torch.softmax(SCALE * cos, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=20000)
    ap.add_argument("--sets", default="@topics", help="label presets or @files, comma-separated")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--cache", default="/tmp/longdoc-eval-zero-shot")
    args = ap.parse_args()

    tm = load_task_model(resolve_model("default"), task="classify", device="cpu", dtype=args.dtype)
    encoder = Classifier(tm, None, batch_size=8)
    corpora = {}
    for name in CORPORA:
        with open(DATA / name, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()][:: args.every]
        docs = [(r["id"], r["text"][: args.max_chars]) for r in records]
        embs, _ = cached_embeddings(encoder, docs, Path(args.cache))
        prose = [passage_prose(encoder, text) for _, text in docs]
        corpora[name] = [(e.float(), w.float(), p) for (e, w), p in zip(embs, prose, strict=True)]
    print(f"every {args.every}, max {args.max_chars} chars, {args.dtype}: "
          + ", ".join(f"{k} {len(v)} docs" for k, v in corpora.items()))  # fmt: skip
    neutral = embed_texts(tm, NEUTRAL_TEXTS, 8).float().mean(0)
    for set_name in args.sets.split(","):
        labels = load_labels([set_name], None)
        clf = Classifier(tm, labels, batch_size=8)
        vectors, owner = clf.label_embeddings.float(), clf.owner

        variants = {
            "max (default)": {},
            "centroid": {"how": "centroid"},
            "mean": {"how": "mean"},
            "lse": {"how": "lse"},
            **{f"max, prose>={t}": {"prose": t} for t in (0.3, 0.5, 0.7, 0.9)},
            "max, centred on the labels' mean": {"centre": vectors.mean(0)},
            "max, centred on the neutral texts' mean": {"centre": neutral},
        }
        print(f"labels {set_name} ({len(labels)}, {len(vectors)} vectors)")
        for tag, kw in variants.items():
            cells = []
            for name, docs in corpora.items():
                probs = [score(e, w, p, vectors, owner, **kw) for e, w, p in docs]
                assert all(abs(float(x.sum()) - 1) < 1e-4 for x in probs)
                first = [clf.names[int(x.argmax())] for x in probs]
                ok = sum(f in EXPECTED[name] for f in first)
                instead = collections.Counter(f for f in first if f not in EXPECTED[name]).most_common(2)
                cells.append(f"{name} {ok}/{len(docs)} ({', '.join(f'{k} {v}' for k, v in instead)})")
            print(f"  {tag:42s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
