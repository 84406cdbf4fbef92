"""Zero-shot extractive QA with the embedded default model against its baselines (not a test).

Two parts, one run, one loaded model:

1. The Python FAQ (default ../shared/data/pyfaq_qa.jsonl). Its pages are split in two by a fixed
   rule: sorted by their number of questions, every second page (2nd, 4th, ...) is the DEV part, on
   which the zero-shot scoring (tasks.qa.SentenceScoring) was chosen; the other pages are HELD-OUT.
   Each method ranks the sentences of the page; hit@k = the sentence holding the gold answer's
   start is among the top k; EM/F1 (SQuAD normalisation) of the top sentence against the gold answer.
   Methods: BM25 over sentences; the scoring before issue 12 ("old": every sentence, following
   weight 0.5, no lexical part); the first default of issue 12 ("window": prose only, the sentence
   and one window of 3 sentences); the second default ("paragraphs": the sentence, its following
   windows of 2..6 sentences and its paragraph block); the third ("reread": paragraphs, then its 7
   best candidates read again, each as the 128 tokens that start at it: the mean of the token
   states of the passes already made, tasks.qa.reread_candidates); the fourth ("every paragraph":
   reread, then the answers after the first picked for diversity, maximal marginal relevance over
   the 20 best candidates, tasks.qa.answer_candidates); the current default ("new": the same, but
   on a document of more than 48 candidates each question embeds only the paragraphs of its 48
   best candidates, ranked with each paragraph guessed as the mean of its sentences, and those its
   second stage reads into, tasks.qa.focus); and variants, each changing one thing, scored from
   the every-paragraph index's embeddings (only window, paragraphs, every paragraph, new and BM25
   are timed, each with its own index): focus at 16 to 96 candidates (simulated over the
   every-paragraph index: tasks.qa.prefilter's candidates keep their scores, the others none;
   "changed": questions whose 5 answers differ from every paragraph's), the diversity weight and
   rules by position (one answer per paragraph, none
   next to a better one, no overlapping contexts); over reread, the second stage's k and weight,
   its passages embedded anew; over paragraphs (the first stage alone), the paragraph added to the window
   scoring, max-sim and rank fusion of the granularities, a paragraph-opening prior (see
   PARAGRAPH_START), a grid of one pseudo-relevance-feedback step. "overlaps": of the answers
   ranked 2..5, how many sit within 240 characters of a better one (their contexts, about 120
   characters on each side, overlap), summed over the questions.
2. A planted fact in long State of the Union addresses (default ../shared/data/sotu.jsonl): a
   generated sentence about invented names and numbers is inserted at a sentence boundary at a
   random position in the last half of a long address (seeded), and a question about it is asked;
   hit@1/hit@5 = the planted sentence is the first / among the top 5 answers. The same question is
   also asked of another address's planted copy (where its fact is absent): the top scores of
   these unanswerable questions against the answerable ones say what a --min-score can separate.

    python benchmarks/eval_qa.py [--data FILE] [--sotu FILE] [--planted N] [--limit N]
                                 [--quantize int8] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from longdoc_cli.evaluate import exact_match_score, f1_score
from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.qa import (
    LEGACY_SCORING,
    PARAGRAPH_SCORING,
    REREAD_SCORING,
    WINDOW_SCORING,
    QuestionAnswerer,
    SentenceIndex,
    SentenceScoring,
    answer_candidates,
    candidate_pool,
    following_windows,
    prefilter,
    reread_candidates,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model
from longdoc_cli.tasks.text import paragraph_blocks, sentence_spans

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEW = SentenceScoring()
OLD, WINDOW = "old (before issue 12)", "window (issue 12's first default)"
PARAGRAPHS = "paragraphs (issue 12's second default: reread without the second stage)"
REREAD_NAME = "reread (issue 12's third default: every paragraph without diversity)"
EAGER = replace(NEW, block_candidates=0)
EAGER_NAME = "every paragraph (issue 12's fourth default: new without focus)"
# focus (tasks.qa.focus) at other numbers of candidates, simulated over the every-paragraph index
FOCUS: dict[str, int] = {f"new, paragraphs of the best {m} candidates": m for m in (16, 24, 32, 48, 64, 96)}
P = PARAGRAPH_SCORING
R = REREAD_SCORING
# The second stage (tasks.qa.reread_candidates), one thing of the third default changed at a time.
REREAD: dict[str, SentenceScoring] = {
    "reread, second stage k=10": replace(R, reread_k=10),
    "reread, second stage weight 0.1": replace(R, reread_weight=0.1),
    "reread, second stage weight 0.25": replace(R, reread_weight=0.25),
    "reread, second stage weight 0.5": replace(R, reread_weight=0.5),
    # each passage's text embedded anew (one more pass per question) instead of the token states
    "reread, second stage passages embedded, weight 0.15": replace(R, reread_passes=True),
    "reread, second stage passages embedded, weight 0.25": replace(R, reread_passes=True, reread_weight=0.25),
}
# Diversity of the answers after the first (the first never changes): maximal marginal relevance
# (SentenceScoring.diversity, the default 0.05) at other weights, and rules by position, each
# walking down the same pool of candidates (tasks.qa.candidate_pool) and skipping a candidate
# that breaks the rule against a better answer (filled up from the skipped ones if fewer than 5
# remain): one answer per paragraph (sentences between blank lines), none within 1 sentence of a
# better one, none whose context overlaps a better one's (within 240 characters).
DIVERSITY: dict[str, SentenceScoring] = {
    f"new, diversity {w}": replace(NEW, diversity=w) for w in (0.1, 0.2, 0.3)
}
RULES = [
    "reread + one answer per paragraph",
    "reread + none within 1 sentence of a better answer",
    "reread + no context overlapping a better answer's",
]
CONTEXT_MARGIN = 120  # tasks.text.context_around's margin
# Over paragraphs (the first stage alone).
VARIANTS: dict[str, SentenceScoring] = {
    # the paragraph block beside (or instead of) the first default's one following window
    "window + paragraph 0.5": replace(WINDOW_SCORING, block=0.5),
    "window + paragraph 1": replace(WINDOW_SCORING, block=1.0),
    "window + paragraph 2": replace(WINDOW_SCORING, block=2.0),
    "sentence + paragraph 1 (paragraph instead of the window)": replace(
        WINDOW_SCORING, following=0.0, block=1.0
    ),
    # one thing of paragraphs changed
    "paragraphs without the paragraph (following windows alone)": replace(P, block=0.0),
    "paragraphs, paragraph weight 1.5 (half)": replace(P, block=1.5),
    "paragraphs, paragraph weight 6 (double)": replace(P, block=6.0),
    "paragraphs, windows up to 5 sentences (following_n 4)": replace(
        P, following_n=4, following=4.0, block=2.5
    ),
    "paragraphs, windows up to 7 sentences (following_n 6)": replace(
        P, following_n=6, following=6.0, block=3.5
    ),
    "paragraphs, only the window of 6 sentences (no scales)": replace(
        P, following_scales=False, following=1.0, block=1.0
    ),
    "paragraphs, candidates of every kind (no prose filter)": replace(P, prose_only=False),
    "paragraphs + lexical 0.1 (idf word share)": replace(P, lexical=0.1),
}
# One Rocchio step (SentenceScoring.feedback_k / feedback_weight), a small grid chosen on dev only.
FEEDBACK: dict[str, SentenceScoring] = {
    f"paragraphs + feedback k={k} w={w}": replace(P, feedback_k=k, feedback_weight=w)
    for k in (3, 5)
    for w in (0.3, 0.6)
}
VARIANTS.update(FEEDBACK)
# Rankings that are not a SentenceScoring: the granularities (sentence, window of 3 sentences,
# paragraph) combined by their best cosine or by reciprocal-rank fusion, and a prior for a paragraph's
# first sentence. CAUTION for PARAGRAPH_START: in pyfaq_qa.jsonl every gold answer follows a blank
# line (the FAQ's question heading was stripped before it), so a feature of breaks matches how the data
# was built, not what real documents look like; it is reported apart, never a default. Planted facts
# sit mid-paragraph. A single blank line is the break (not the FAQ's triple one).
PARAGRAPH_START = (0.02, 0.05)
CUSTOM = ["max-sim of sentence, window, paragraph", "RRF of sentence, window, paragraph (k = 60)"]
CUSTOM += [f"paragraphs + paragraph-opening prior {b} (FAQ artefact, see CAUTION)" for b in PARAGRAPH_START]


LISTED = [
    *FOCUS,
    *DIVERSITY,
    *RULES,
    *REREAD,
    *VARIANTS,
    *CUSTOM,
    "RRF(paragraphs, BM25)",
]  # after the defaults


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over one context's sentences."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs, self.k1, self.b = [collections.Counter(d) for d in docs], k1, b
        self.lengths = [len(d) for d in docs]
        self.avg = sum(self.lengths) / max(1, len(docs))
        df = collections.Counter(w for d in docs for w in set(d))
        n = len(docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for tf, length in zip(self.docs, self.lengths, strict=True):
            s = 0.0
            for w in set(query):
                if w in tf:
                    norm = tf[w] + self.k1 * (1 - self.b + self.b * length / self.avg)
                    s += self.idf[w] * tf[w] * (self.k1 + 1) / norm
            out.append(s)
        return out


def rrf(*rankings: list[int], k: int = 60) -> list[int]:
    """Reciprocal-rank fusion of rankings (best first) of the same items."""
    score: dict[int, float] = collections.defaultdict(float)
    for ranking in rankings:
        for r, i in enumerate(ranking):
            score[i] += 1 / (k + r)
    return sorted(score, key=lambda i: -score[i])


def top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(scores, descending=True)[:k].tolist()
    return [i for i in order if scores[i] > -math.inf]


def apart(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Characters between two spans (0 when they touch or overlap)."""
    return max(0, max(a[0], b[0]) - min(a[1], b[1]))


def overlaps(spans: list[tuple[int, int]]) -> int:
    """Of the answers ranked 2.., how many have a context overlapping a better answer's."""
    return sum(
        any(apart(spans[r], spans[s]) < 2 * CONTEXT_MARGIN for s in range(r)) for r in range(1, len(spans))
    )


def by_rule(pool: list[int], allowed: Callable[[int, int], bool], k: int = 5) -> list[int]:
    """Walk down ``pool`` (best first) and keep a candidate only if ``allowed(it, each kept one)``;
    fewer than ``k`` kept: filled up with the skipped ones, in order."""
    kept: list[int] = []
    for i in pool:
        if len(kept) == k:
            break
        if all(allowed(i, j) for j in kept):
            kept.append(i)
    return kept + [i for i in pool if i not in kept][: k - len(kept)]


def rule_rankings(index: SentenceIndex, pool: list[int]) -> dict[str, list[int]]:
    """The RULES rankings from the reread pool (``pool``: sentence indices, best first)."""
    spans = index.spans
    paragraph = paragraph_blocks(index.text, spans, [0] * len(spans), 1)  # blank lines only
    return {
        RULES[0]: by_rule(pool, lambda i, j: paragraph[i] != paragraph[j]),
        RULES[1]: by_rule(pool, lambda i, j: abs(i - j) > 1),
        RULES[2]: by_rule(pool, lambda i, j: apart(spans[i], spans[j]) >= 2 * CONTEXT_MARGIN),
    }


def simulated_focus(tm, index: SentenceIndex, q: torch.Tensor, question: str, m: int) -> list[int]:
    """The 5 answers of focus at ``m`` candidates, over an index with every paragraph embedded: the
    candidates of tasks.qa.prefilter keep their scores, the other sentences get none."""
    scoring = replace(NEW, block_candidates=m)
    scores = score_sentences(index, q, question, scoring)
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[prefilter(index, q, question, scoring, 5)] = True
    return answer_candidates(tm, index, q, scores.masked_fill(~keep, -math.inf), scoring, 16, 5)[0]


def variant_index(index: SentenceIndex, scoring: SentenceScoring, cache: dict) -> SentenceIndex:
    """``index`` with the following windows ``scoring`` asks for (from the same sentence embeddings)."""
    key = (scoring.following_n, scoring.following_scales)
    if key not in cache:
        cache[key] = replace(index, local=following_windows(index.alone, *key))
    return cache[key]


def custom_scores(index: SentenceIndex, q: torch.Tensor, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """The CUSTOM rankings' scores; ``window`` (n, d): each sentence's window of 3 sentences."""
    cosines = torch.stack([index.alone @ q, window @ q, index.block @ q])  # (3, n)
    ranks = torch.argsort(torch.argsort(cosines, dim=1, descending=True), dim=1)  # (3, n): 0 = best
    new = score_sentences(index, q, "", PARAGRAPH_SCORING)
    starts = torch.tensor(
        [not i or re.search(r"\n[ \t]*\n", index.text[index.spans[i - 1][1] : s]) is not None
         for i, (s, _) in enumerate(index.spans)]
    )  # fmt: skip  # a blank line before the sentence
    out = {
        CUSTOM[0]: cosines.max(0).values,
        CUSTOM[1]: (1 / (60 + ranks)).sum(0),
    }
    for b, name in zip(PARAGRAPH_START, CUSTOM[2:], strict=True):
        out[name] = new + b * starts
    return {k: v.masked_fill(~index.prose, -math.inf) for k, v in out.items()}


class Table:
    """hit@1, hit@5, EM, F1 per method and part."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        self.methods: list[str] = []

    def add(self, method: str, parts: tuple[str, ...], ranked: list[int], gold: int | None, top_text: str,
            gold_texts: list[str], overlapping: int = 0) -> None:  # fmt: skip
        if method not in self.methods:
            self.methods.append(method)
        for part in parts:
            st = self.stats[method, part]
            st["n"] += 1
            st["hit1"] += bool(ranked) and ranked[0] == gold
            st["hit5"] += gold in ranked[:5]
            st["em"] += max(exact_match_score(top_text, g) for g in gold_texts)
            st["f1"] += max(f1_score(top_text, g) for g in gold_texts)
            st["overlaps"] += overlapping

    def print(self, parts: list[str], seconds: dict[str, float]) -> None:
        print("| method | part | n | hit@1 | hit@5 | EM | F1 | overlaps | s/question |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for method in self.methods:
            for part in parts:
                st = self.stats[method, part]
                if not st["n"]:
                    continue
                n = st["n"]
                cells = " | ".join(f"{100 * st[k] / n:.1f}" for k in ("hit1", "hit5", "em", "f1"))
                sec = f"{seconds[method]:.3f}" if method in seconds and part == "all" else ""
                print(f"| {method} | {part} | {n} | {cells} | {st['overlaps']} | {sec} |")


def faq(args, tm) -> None:
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if args.limit:
        records = records[: args.limit]
    by_context: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_context[r["context"]].append(r)
    ranked_pages = sorted(by_context, key=lambda c: (-len(by_context[c]), by_context[c][0]["id"]))
    dev = {c for i, c in enumerate(ranked_pages) if i % 2 == 1}
    print(f"## Python FAQ: {args.data} ({len(records)} questions, {len(by_context)} pages); "
          f"quantize={args.quantize} dtype={args.dtype}")  # fmt: skip
    print("dev pages:", ", ".join(sorted(by_context[c][0]["title"] for c in dev)))
    print("held-out pages:", ", ".join(sorted(by_context[c][0]["title"] for c in set(by_context) - dev)))
    window = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=WINDOW_SCORING)
    paragraphs = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=P)
    eager = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=EAGER)
    new = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=NEW)
    table, elapsed = Table(), collections.Counter()
    changed = collections.Counter()  # questions whose 5 answers differ from every paragraph's
    scoring_time = collections.Counter()  # score_sentences alone, from the same embeddings
    reread_time = collections.Counter()  # the REREAD variants' second stage (passages not yet read)
    pick_time = collections.Counter()  # answer_candidates with and without diversity, same index
    right, wrong = [], []  # the new method's top score when its first answer is right / wrong
    for page, context in enumerate(ranked_pages):
        group = by_context[context]
        spans = sentence_spans(context)
        starts = {s: i for i, (s, _) in enumerate(spans)}
        bm25 = BM25([words(context[s:e]) for s, e in spans])
        parts = ("dev" if context in dev else "held-out", "all")
        for r in group:
            gold_start, gold_texts = r["answers"]["answer_start"][0], r["answers"]["text"]
            gold = next((i for i, (s, e) in enumerate(spans) if s <= gold_start < e), None)
            ranked: dict[str, list[int]] = {}
            timed = [(WINDOW, window), (PARAGRAPHS, paragraphs), (EAGER_NAME, eager), ("new (default)", new)]
            for name, answerer in timed[page % 4 :] + timed[: page % 4]:  # who embeds a page first rotates
                t = time.perf_counter()
                result = answerer.answer(r["id"], context, [r["question"]])[0]
                elapsed[name] += time.perf_counter() - t
                ranked[name] = [starts[a.start] for a in result.answers]
                if name == "new (default)":
                    best = result.answers[0]
            (right if ranked["new (default)"][:1] == [gold] else wrong).append(best.score)
            t = time.perf_counter()
            bm_scores = bm25.scores(words(r["question"]))
            ranked["BM25 over sentences"] = sorted(range(len(spans)), key=lambda i: -bm_scores[i])[:5]
            elapsed["BM25 over sentences"] += time.perf_counter() - t
            index, windows = eager._index(context), {}
            q = embed_texts(tm, [r["question"]], 1)[0]
            for name, m in FOCUS.items():
                ranked[name] = simulated_focus(tm, index, q, r["question"], m)
            for name in ("new (default)", *FOCUS):
                for part in parts:
                    changed[name, part] += ranked[name] != ranked[EAGER_NAME]
            ranked[OLD] = top(
                score_sentences(variant_index(index, LEGACY_SCORING, windows), q, "", LEGACY_SCORING), 5
            )
            for name, scoring in {PARAGRAPHS: P, **VARIANTS}.items():
                t = time.perf_counter()
                scores = score_sentences(variant_index(index, scoring, windows), q, r["question"], scoring)
                scoring_time[name] += time.perf_counter() - t
                if name != PARAGRAPHS:  # timed above, with its own index
                    ranked[name] = top(scores, 5)
            first = score_sentences(index, q, r["question"], NEW)
            for name, scoring in REREAD.items():  # passages already read are in the index's memo
                t = time.perf_counter()
                ranked[name] = reread_candidates(tm, index, q, first, scoring, 16, 5)[0][:5]
                reread_time[name] += time.perf_counter() - t
            for name, scoring in ((REREAD_NAME, R), ("new (default)", NEW)):  # the diversity step's cost
                t = time.perf_counter()
                answer_candidates(tm, index, q, first, scoring, 16, 5)
                pick_time[name] += time.perf_counter() - t
            ranked[REREAD_NAME] = answer_candidates(tm, index, q, first, R, 16, 5)[0]
            for name, scoring in DIVERSITY.items():
                ranked[name] = answer_candidates(tm, index, q, first, scoring, 16, 5)[0]
            ranked.update(rule_rankings(index, candidate_pool(tm, index, q, first, NEW, 16, 5)[0]))
            three = variant_index(index, WINDOW_SCORING, windows).local[0]
            for name, scores in custom_scores(index, q, three).items():
                ranked[name] = top(scores, 5)
            dense = top(score_sentences(index, q, r["question"], P), len(spans))
            bm25_all = [i for i in sorted(range(len(spans)), key=lambda i: -bm_scores[i]) if i in set(dense)]
            ranked["RRF(paragraphs, BM25)"] = rrf(dense, bm25_all)[:5]
            for name in (
                "BM25 over sentences",
                OLD,
                WINDOW,
                PARAGRAPHS,
                REREAD_NAME,
                EAGER_NAME,
                "new (default)",
                *LISTED,
            ):
                first = ranked[name][0] if ranked[name] else None
                text = context[spans[first][0] : spans[first][1]] if first is not None else ""
                shown = overlaps([spans[i] for i in ranked[name][:5]])
                table.add(name, parts, ranked[name], gold, text, gold_texts, shown)
    n = len(records)
    table.print(["dev", "held-out", "all"], {k: v / n for k, v in elapsed.items()})
    dev_rank = lambda m: (table.stats[m, "dev"]["hit1"], table.stats[m, "dev"]["hit5"])  # noqa: E731
    contenders = ["new (default)", EAGER_NAME, *FOCUS, REREAD_NAME, *DIVERSITY, *RULES, *REREAD, PARAGRAPHS,
                  WINDOW, *(m for m in VARIANTS if m not in FEEDBACK), CUSTOM[0], CUSTOM[1]]  # fmt: skip
    best = max(contenders, key=dev_rank)  # the default wins ties
    print(f"\nbest on dev (hit@1, then hit@5; the default wins ties; no prior): {best}")
    print("focus: questions (dev / held-out / all) whose 5 answers differ from every paragraph's: "
          + "; ".join(
        f"{name} {changed[name, 'dev']} / {changed[name, 'held-out']} / {changed[name, 'all']}"
        for name in ("new (default)", *FOCUS)))  # fmt: skip
    eager_dev = dev_rank(EAGER_NAME)
    same = [
        m for name, m in FOCUS.items() if all(x >= y for x, y in zip(dev_rank(name), eager_dev, strict=True))
    ]
    print(f"focus: the fewest candidates (of {sorted(FOCUS.values())}) whose dev hit@1 and hit@5 are "
          f"every paragraph's or better: {min(same, default=None)}")  # fmt: skip
    same = [m for name, m in FOCUS.items() if not changed[name, "dev"]]
    print(f"focus: the fewest candidates (of {sorted(FOCUS.values())}) whose 5 answers are every "
          f"paragraph's on every dev question: {min(same, default=None)}")  # fmt: skip
    best = max(["new (default)", REREAD_NAME, *DIVERSITY, *RULES], key=dev_rank)
    print(f"diversity of the answers (the same first answer), best on dev (hit@5; default wins ties): {best}")
    best = max([PARAGRAPHS, *FEEDBACK], key=dev_rank)
    print(f"feedback grid over paragraphs, best on dev (hit@1, then hit@5; paragraphs wins ties): {best}")
    ratio = elapsed["new (default)"] / elapsed[WINDOW]
    print(f"\nspeed: new / window seconds per question = {ratio:.2f} (same run, CPU); every paragraph / "
          f"window = {elapsed[EAGER_NAME] / elapsed[WINDOW]:.2f}; paragraphs / window = "
          f"{elapsed[PARAGRAPHS] / elapsed[WINDOW]:.2f}")  # fmt: skip
    ms = {name: 1000 * pick_time[name] / n for name in (REREAD_NAME, "new (default)")}
    print(f"speed: picking the 5 answers from the first stage's scores (answer_candidates): "
          f"{ms['new (default)']:.2f} ms/question with diversity, {ms[REREAD_NAME]:.2f} without")  # fmt: skip
    for name in REREAD:  # what the variant's own passages (those the default did not read) cost
        total = (elapsed["new (default)"] + reread_time[name]) / elapsed[WINDOW]
        print(f"speed: {name}: second stage beyond the default's {1000 * reread_time[name] / n:.1f} "
              f"ms/question; new's time + that / window = {total:.2f}")  # fmt: skip
    base = scoring_time[PARAGRAPHS] / n
    for name in FEEDBACK:
        extra = scoring_time[name] / n - base
        total = (elapsed["new (default)"] / n + extra) / (elapsed[WINDOW] / n)
        ms = 1000 * scoring_time[name] / n
        print(f"speed: {name}: scoring {ms:.2f} ms/question (paragraphs' {1000 * base:.2f}); "
              f"new's time + the extra / window = {total:.2f}")  # fmt: skip
    print_scores("FAQ, new (default): top score when the first answer is", right, wrong, "right", "wrong")


def print_scores(title: str, a: list[float], b: list[float], name_a: str, name_b: str) -> None:
    def q(xs: list[float]) -> str:
        if not xs:
            return "none"
        xs = sorted(xs)
        at = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
        return (f"n {len(xs)}, min {xs[0]:.2f}, p10 {at(0.1):.2f}, median {statistics.median(xs):.2f}, "
                f"p90 {at(0.9):.2f}, max {xs[-1]:.2f}")  # fmt: skip

    print(f"{title} {name_a}: {q(a)}")
    print(f"{title} {name_b}: {q(b)}")
    for s in (0.3, 0.4, 0.5, 0.6, 0.7):
        keep_a = sum(x >= s for x in a) / max(1, len(a))
        keep_b = sum(x >= s for x in b) / max(1, len(b))
        print(f"  --min-score {s}: answers {100 * keep_a:.0f}% of {name_a}, {100 * keep_b:.0f}% of {name_b}")


# -- planted facts --------------------------------------------------------------------------------

_NAMES = ["Orvalle", "Tessamir", "Quenbrook", "Halvorsen", "Idrisova", "Marchetti", "Okonkwo", "Vantresca"]
_PLACES = ["Lake Ferrin", "Port Ashby", "the Calder Valley", "Mount Ostrava", "Greywater County"]
_THINGS = ["lithium", "copper", "wheat", "timber", "salmon", "cobalt"]
_FACTS: list[Callable[[random.Random], tuple[str, str]]] = [
    lambda r: (lambda name, place, n: (
        f"Last spring the engineer {name} completed the survey of {place}, which found {n} miles of "
        "abandoned canals.",
        f"How many miles of abandoned canals did the survey of {place} find?"))(
        r.choice(_NAMES), r.choice(_PLACES), r.randint(12, 980)),
    lambda r: (lambda name, thing, place: (
        f"The commission chaired by Judge {name} reported that the {thing} reserves near {place} will "
        "last another forty years.",
        f"Who chaired the commission that reported on the {thing} reserves near {place}?"))(
        r.choice(_NAMES), r.choice(_THINGS), r.choice(_PLACES)),
    lambda r: (lambda place, n, month: (
        f"A new bridge across {place} will open in {month}, at a cost of {n} million dollars.",
        f"When will the new bridge across {place} open?"))(
        r.choice(_PLACES), r.randint(40, 900), r.choice(["March", "June", "September", "November"])),
    lambda r: (lambda thing, place, n: (
        f"Farmers in {place} harvested {n} thousand tons of {thing} this year, twice the usual amount.",
        f"How much {thing} did the farmers of {place} harvest?"))(
        r.choice(_THINGS), r.choice(_PLACES), r.randint(11, 99)),
]  # fmt: skip


def planted_cases(sotu: str, n: int) -> list[tuple[str, str, tuple[int, int], str, int, float]]:
    """(id, document, planted span, question, words, depth) for ``n`` long addresses (seed 12)."""
    with open(sotu, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    long_ones = [r for r in records if len(r["text"].split()) >= 5000]
    chosen = long_ones[:: max(1, len(long_ones) // n)][:n]
    rng = random.Random(12)
    cases = []
    for r in chosen:
        text = r["text"]
        spans = sentence_spans(text)
        at = rng.randint(len(spans) // 2, len(spans) - 1)  # a sentence start in the last half
        fact, question = rng.choice(_FACTS)(rng)
        cut = spans[at][0]
        doc = text[:cut] + fact + " " + text[cut:]
        cases.append((r["id"], doc, (cut, cut + len(fact)), question, len(text.split()), at / len(spans)))
    return cases


def planted(args, tm) -> None:
    cases = planted_cases(args.sotu, args.planted)
    depth = statistics.mean(c[5] for c in cases)
    print(f"\n## Planted facts: {len(cases)} long addresses of {args.sotu} (>= 5000 words, median "
          f"{statistics.median(c[4] for c in cases):.0f}), one generated fact each at a random sentence "
          f"boundary in the last half (mean depth {100 * depth:.0f}% of the sentences; seed 12)")  # fmt: skip
    window = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=WINDOW_SCORING)
    paragraphs = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=P)
    eager = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=EAGER)
    new = QuestionAnswerer(tm, top_k=5, batch_size=16, scoring=NEW)
    names = ("BM25 over sentences", OLD, WINDOW, PARAGRAPHS, EAGER_NAME, "new (default)", *FOCUS, CUSTOM[3])
    hits = {m: collections.Counter() for m in names}
    elapsed = collections.Counter()
    changed = collections.Counter()  # addresses whose 5 answers differ from every paragraph's
    embedded = []  # new: the paragraph blocks its question embedded, of the address's
    answerable, unanswerable = [], []
    for i, (doc_id, doc, (a, b), question, _, _) in enumerate(cases):
        other_question = cases[(i + 1) % len(cases)][3]
        spans = sentence_spans(doc)
        bm25 = BM25([words(doc[s:e]) for s, e in spans])
        scores = bm25.scores(words(question))
        bm = sorted(range(len(spans)), key=lambda j: -scores[j])[:5]
        found = {"BM25 over sentences": [spans[j] for j in bm]}
        timed = [(WINDOW, window), (PARAGRAPHS, paragraphs), (EAGER_NAME, eager), ("new (default)", new)]
        for name, answerer in timed[i % 4 :] + timed[: i % 4]:
            t = time.perf_counter()
            result = answerer.answer(doc_id, doc, [question])[0]
            elapsed[name] += time.perf_counter() - t
            found[name] = [(x.start, x.end) for x in result.answers]
            if name == "new (default)":
                lazy = answerer._index(doc).lazy
                if lazy:
                    embedded.append((len(lazy["embedded"]), len(answerer._index(doc).blocks)))
                answerable.append(result.answers[0].score)
                unanswerable.append(answerer.answer(doc_id, doc, [other_question])[0].answers[0].score)
        index, windows = eager._index(doc), {}
        q = embed_texts(tm, [question], 1)[0]
        for name, m in FOCUS.items():
            found[name] = [index.spans[j] for j in simulated_focus(tm, index, q, question, m)]
        for name in ("new (default)", *FOCUS):
            changed[name] += found[name] != found[EAGER_NAME]
        for name, scoring in ((OLD, LEGACY_SCORING),):
            ranks = top(score_sentences(variant_index(index, scoring, windows), q, "", scoring), 5)
            found[name] = [index.spans[j] for j in ranks]
        three = variant_index(index, WINDOW_SCORING, windows).local[0]
        found[CUSTOM[3]] = [index.spans[j] for j in top(custom_scores(index, q, three)[CUSTOM[3]], 5)]
        for name, got in found.items():
            overlaps = [s < b and a < e for s, e in got]
            hits[name]["hit1"] += overlaps[:1] == [True]
            hits[name]["hit5"] += any(overlaps[:5])
    n = len(cases)
    print("| method | n | hit@1 | hit@5 | s/question (embedding included) |")
    print("|---|---:|---:|---:|---:|")
    for name, st in hits.items():
        sec = f"{elapsed[name] / n:.2f}" if name in elapsed else ""
        print(f"| {name} | {n} | {100 * st['hit1'] / n:.1f} | {100 * st['hit5'] / n:.1f} | {sec} |")
    print(f"speed: new / window = {elapsed['new (default)'] / elapsed[WINDOW]:.2f}, every paragraph / "
          f"window = {elapsed[EAGER_NAME] / elapsed[WINDOW]:.2f}, paragraphs / window = "
          f"{elapsed[PARAGRAPHS] / elapsed[WINDOW]:.2f} (seconds per question, same run)")  # fmt: skip
    if embedded:
        got, blocks = sum(e for e, _ in embedded), sum(b for _, b in embedded)
        print(f"new: paragraph blocks embedded for the question {got} of {blocks} "
              f"({100 * got / blocks:.0f}%, {len(embedded)} addresses read with focus)")  # fmt: skip
    print("focus: addresses whose 5 answers differ from every paragraph's: " + "; ".join(
        f"{name} {changed[name]}" for name in ("new (default)", *FOCUS)))  # fmt: skip
    print_scores("planted, new (default): top score of a question", answerable, unanswerable,
                 "answerable (its fact planted)", "unanswerable (another address's fact)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "pyfaq_qa.jsonl"))
    ap.add_argument("--sotu", default=str(DATA / "sotu.jsonl"))
    ap.add_argument("--planted", type=int, default=10, help="long addresses with a planted fact (0 = skip)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N FAQ questions")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on the CPU), fp32 or bf16")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    tm = load_task_model(resolve_model(args.model), task="qa", quantize=args.quantize, dtype=args.dtype)
    embed_texts(tm, ["A first forward pass, so that no timed method pays for warming up."], 1)
    faq(args, tm)
    sys.stdout.flush()
    if args.planted:
        planted(args, tm)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
