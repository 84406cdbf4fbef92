"""Extractive question answering over long documents.

With a QA checkpoint: every (question, context window) pair runs with global attention on the
question tokens; the n-best start/end logits of each window give candidate spans (end >= start,
at most ``max_answer_length`` tokens, inside the context), merged across the overlapping windows by
character span; the no-answer score is the first token's start + end logits.

With a plain encoder (the embedded default, no QA head): the answer is the prose sentence of the
document that best answers the question (headings, adornment lines and code are never answers,
tasks.text.span_kind). The model was trained to embed sentences and short passages, so each
sentence is embedded on its own, and so is each paragraph (the sentences between blank lines, cut
into pieces of at most 128 tokens, the length the model was trained on). A sentence's dense score
is a weighted mean of cosines with the question: of the sentence alone; of the mean embedding of it
and its next 1, 2, ..., 5 sentences (a good answer is followed by more of the same answer, at
whichever length); and of its paragraph's embedding. Then a second stage reads the 7 best
candidates again, each as the passage of 128 tokens that starts at it (the mean of the token states
the two passes already computed, in the paragraph's context: no extra pass), and ranks them by their
score mixed with the passage's cosine (reread_candidates). With ``--top-k`` above 1, the answers
after the first are picked for diversity (answer_candidates: maximal marginal relevance over the 20
best candidates, weight 0.05 on the highest cosine with an answer already shown), so a sentence that
repeats a better answer gives way; the first answer never changes. On a document of more than 48
candidate sentences, paragraphs are read only where they can matter (focus): each question ranks
every sentence with each paragraph's embedding guessed as the mean of its sentences' (no pass),
embeds the paragraphs of its 48 best candidates and those its second stage reads ahead into (each
once per document), and ranks those 48 with the scores an index with every paragraph would give
them; a long document's question thus pays for a fraction of the paragraph pass. A lexical part
(the share of the question's informative words, idf-weighted, that the sentence holds) can be mixed
in (``SentenceScoring.lexical``) but is off: on the dev pages it did not help. So is one
pseudo-relevance-feedback step (``SentenceScoring.feedback_k``, ``feedback_weight``: the question
moved towards its best candidates, every sentence scored again): it lost hit@1 on the dev pages.
The weights were chosen on half of the FAQ pages of ../shared/data/pyfaq_qa.jsonl and are reported
on the other half (benchmarks/eval_qa.py, benchmarks/README.md).
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from ..tokenize import Encoding, Window
from .runner import TaskModel, embed_encodings, embed_texts, run_windows, window_overlap
from .text import context_around, paragraph_blocks, sentence_spans, span_kind

SCHEMA_VERSION = 2  # 2: optional "seconds" and a final {"summary": ...} record (--timings)


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offsets into the (newline-normalised) document
    end: int
    score: float
    context: str = ""  # the answer with its surroundings, one line, cut on word boundaries


@dataclass(frozen=True)
class QAResult:
    id: str
    question: str
    answers: list[Answer]  # best first; empty when the document holds no answer
    context: str  # the best answer's surroundings, one line ("" when there is no answer)
    n_tokens: int
    n_windows: int
    truncated: bool  # the question was cut to max_question_length tokens
    method: str  # "span" (QA head) or "sentence" (zero-shot)
    unknown_share: float = 0.0  # of the document only the unknown token stands for (not in the record)
    seconds: float = (
        0.0  # wall time of this answer, with its share of reading the document (not in the record)
    )

    def to_record(self, key: str = "path") -> dict[str, Any]:
        best = self.answers[0] if self.answers else None
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            key: self.id,
            "question": self.question,
            "answer": best.text if best else None,
            "start": best.start if best else None,
            "end": best.end if best else None,
            "score": best.score if best else None,
            "context": self.context,
            "n_tokens": self.n_tokens,
            "n_windows": self.n_windows,
            "truncated": self.truncated,
            "method": self.method,
        }
        if len(self.answers) > 1:
            record["answers"] = [asdict(a) for a in self.answers]
        return record

    def to_dict(self) -> dict[str, Any]:
        """The record `longdoc qa --format jsonl` writes, keyed by ``id``."""
        return self.to_record("id")


class QuestionAnswerer:
    """Answers questions over one document at a time with ``tm`` (QA head or zero-shot encoder)."""

    def __init__(
        self,
        tm: TaskModel,
        *,
        top_k: int = 1,
        n_best: int = 20,
        max_answer_length: int = 30,
        null_threshold: float | None = None,
        batch_size: int = 4,
        doc_stride: int = 256,
        max_question_length: int = 64,
        strict_stride: bool = False,
        min_score: float | None = None,
        scoring: SentenceScoring | None = None,
    ) -> None:
        # The command's values were checked with the config (inference.*, tokenization.*); this
        # guards library calls.
        if min(top_k, n_best, max_answer_length, max_question_length) < 1 or doc_stride < 0:
            raise ValueError(
                "top_k, n_best, max_answer_length and max_question_length must be >= 1 and doc_stride "
                f">= 0; got {top_k}, {n_best}, {max_answer_length}, {max_question_length}, {doc_stride}"
            )
        self.tm, self.top_k, self.n_best, self.max_answer_length = tm, top_k, n_best, max_answer_length
        self.null_threshold, self.batch_size = null_threshold, batch_size
        self.max_question_length = max_question_length
        self.doc_stride, self.strict_stride = doc_stride, strict_stride  # capped per question
        self.min_score = min_score  # no answer when the best score is below it
        self.scoring = scoring or SentenceScoring()
        if tm.pooling != "mean" and self.scoring.reread_k and self.scoring.reread_weight:
            # a mean of token states is not the embedding of a model that pools its first token
            self.scoring = replace(self.scoring, reread_passes=True)
        self._sentences: SentenceIndex | None = None

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path = "default", **options: Any) -> QuestionAnswerer:
        """The answerer `longdoc qa -m NAME_OR_DIR` runs: the model's ``longdoc.yaml`` (or
        ``config=``), ``overrides=["section.key=value"]`` as ``--set``, then config keys as keywords
        (``top_k=3`` answers per question, ``device="cuda:1"``, ``stride=128``; see
        :func:`longdoc_cli.api.from_pretrained`)."""
        from ..api import from_pretrained

        return from_pretrained("qa", name_or_dir, None, dict(options))

    def __call__(
        self, documents: str | Sequence[str], questions: str | Sequence[str]
    ) -> QAResult | list[QAResult] | list[QAResult | list[QAResult]]:
        """Answer ``questions`` over ``documents``: one document and one question -> a QAResult;
        several questions -> a list, one per question; a list of documents -> a list over them
        (ids "0", "1", ...)."""
        one_doc, one_q = isinstance(documents, str), isinstance(questions, str)
        docs = [documents] if one_doc else list(documents)
        asked = [questions] if one_q else list(questions)
        out: list[Any] = []
        for i, text in enumerate(docs):
            results = self.answer(str(i), text, asked)
            out.append(results[0] if one_q else results)
        return out[0] if one_doc else out

    def answer(self, doc_id: str, text: str, questions: Sequence[str]) -> list[QAResult]:
        """One result per question; each result's ``seconds`` is its own time plus an even share of
        encoding the document."""
        t0 = time.perf_counter()
        enc = self.tm.tokenizer.encode(text)
        unknown = self.tm.tokenizer.unknown_share(text, enc)
        shared = (time.perf_counter() - t0) / max(1, len(questions))
        results = []
        for q in questions:
            t0 = time.perf_counter()
            result = self._answer_one(doc_id, text, enc, q)
            seconds = shared + time.perf_counter() - t0
            results.append(replace(result, unknown_share=unknown, seconds=seconds))
        return results

    def _answer_one(self, doc_id: str, text: str, enc: Encoding, question: str) -> QAResult:
        if not question.strip():
            raise UsageError("a question is empty")
        tok = self.tm.tokenizer
        # Consecutive windows share at most half of the context part of a window (this question's).
        budget = tok.context_budget(question, self.tm.max_length, self.max_question_length)
        stride = window_overlap("--stride", self.doc_stride, max(0, budget // 2), self.strict_stride)
        windows = tok.question_windows(question, enc, self.tm.max_length, stride, self.max_question_length)
        if self.tm.head == "qa":
            answers = self._spans(text, windows)
            method = "span"
        else:
            answers = self._sentences_for(text, enc, question)
            method = "sentence"
        if answers and self.min_score is not None and answers[0].score < self.min_score:
            answers = []  # abstain
        answers = [replace(a, context=context_around(text, a.start, a.end)) for a in answers]
        context = answers[0].context if answers else ""
        truncated = any(w.question_truncated for w in windows)
        return QAResult(doc_id, question, answers, context, len(enc), len(windows), truncated, method)

    # -- with a QA head --------------------------------------------------------------------------

    def _spans(self, text: str, windows: list[Window]) -> list[Answer]:
        outputs = run_windows(self.tm, windows, self.batch_size)
        scored = [(windows[i], start, end) for i, (start, end) in outputs]
        return decode_spans(
            text, scored, n_best=self.n_best, max_answer_length=self.max_answer_length, top_k=self.top_k,
            null_threshold=self.null_threshold,
        )  # fmt: skip

    # -- zero-shot ---------------------------------------------------------------------------------

    def _sentences_for(self, text: str, enc: Encoding, question: str) -> list[Answer]:
        index = self._index(text, enc)
        q = embed_texts(self.tm, [question], 1)[0]
        batch = max(self.batch_size, 16)
        top, values = rank_sentences(self.tm, index, q, question, self.scoring, batch, self.top_k)
        return [
            Answer(text[index.spans[i][0] : index.spans[i][1]], *index.spans[i], round(v, 6))
            for i, v in zip(top, values, strict=True)
        ]

    def _index(self, text: str, enc: Encoding | None = None) -> SentenceIndex:
        """The document's sentences, embedded once for all the questions about it (``enc``: the
        text's encoding when the caller has it)."""
        if self._sentences is None or self._sentences.text != text:
            self._sentences = index_sentences(self.tm, text, max(self.batch_size, 16), self.scoring, enc)
        return self._sentences


@dataclass(frozen=True)
class SentenceScoring:
    """How zero-shot QA scores a sentence: ``(1 - lexical) * dense + lexical * coverage``, where
    dense is the weighted mean of three cosines with the question: of the sentence (``alone``); of
    its following context (``following``): with ``following_scales``, the mean of the cosines of the
    mean embeddings of it and its next 1, 2, ..., ``following_n`` sentences, else the cosine of the
    mean embedding of it and its ``following_n`` next sentences; and of its paragraph block's
    embedding (``block``: the sentences between blank lines, cut into pieces of at most
    ``block_tokens`` tokens; not embedded when ``block`` is 0). Coverage is the idf-weighted share of
    the question's words the sentence holds (0..1).

    The default weights say: the sentence and each of its five following windows count alike (1 and
    5), the paragraph half as much as those six together (3). They were chosen on the dev pages of
    benchmarks/eval_qa.py (benchmarks/README.md), as was 128 tokens against 200."""

    alone: float = 1.0
    following: float = 5.0
    following_n: int = 5
    following_scales: bool = True
    block: float = 3.0
    block_tokens: int = 128
    lexical: float = 0.0  # off: on the dev pages it did not help (benchmarks/README.md)
    prose_only: bool = True  # headings, adornment lines and code are never answers
    # One pseudo-relevance-feedback (Rocchio) step, off (0) by default: the question embedding
    # becomes normalise(q + feedback_weight * mean of the alone embeddings of the feedback_k best
    # candidates), and every sentence is scored again with it. Off: every k in {3, 5} and weight
    # in {0.3, 0.6} lost 3.4 hit@1 on the dev pages (benchmarks/README.md).
    feedback_k: int = 0
    feedback_weight: float = 0.0
    # The second stage (reread_candidates): the reread_k best candidates of the scoring above (or
    # the answers asked for, when more) are read again as the passage that starts at them, of
    # reread_tokens tokens; a candidate's score becomes (score + reread_weight * the passage's
    # cosine) / (1 + reread_weight), and they are ranked by it. The passage's vector is the mean of
    # the token states the index's passes already computed (in context: the paragraph pass where
    # the sentence's paragraph was embedded, else the sentence's own pass; no extra pass), or with
    # reread_passes, the embedding of the passage's text (whole sentences up to reread_tokens), one
    # more pass per question: measured 1.85x the seconds per question of WINDOW_SCORING, over the
    # 1.5x budget, so not the default. Off when reread_k or reread_weight is 0. k 7, weight 0.15
    # and 128 tokens were chosen on the dev pages (benchmarks/README.md).
    reread_k: int = 7
    reread_weight: float = 0.15
    reread_tokens: int = 128
    reread_passes: bool = False
    # Diversity of the answers after the first (maximal marginal relevance, answer_candidates): of
    # the diversity_pool best candidates, each next answer is the one of the largest score -
    # diversity * (its sentence's highest cosine with an answer already picked), so an answer that
    # says again what a better one said gives way. The first answer never changes. 0.05 was chosen
    # on the dev pages among 0.05 / 0.1 / 0.2 / 0.3 and rules by position (one answer per
    # paragraph, none next to a better one, no overlapping contexts), which lost hit@5 there: an
    # answer runs over several sentences, so the gold is often the neighbour of a better-scored
    # sentence of the same answer (benchmarks/README.md). Off when 0. The pool's candidates beyond
    # the second stage's are scored as it scores them (with reread_passes, their passages embedded).
    diversity: float = 0.05
    diversity_pool: int = 20
    # Paragraphs read only where they can matter (focus): on a document of more than
    # block_candidates candidate sentences, the index embeds no paragraph; each question ranks every
    # sentence with each paragraph's embedding guessed as the mean of its sentences' (no pass), and
    # embeds the paragraphs of its block_candidates best (at least the answers asked for, the
    # second stage's and the diversity pool's) and those the second stage reads ahead into, each
    # once per document; only those candidates are ranked on. A document with fewer candidates
    # embeds every paragraph up front, as when 0. 48 kept the 20 best of the full ranking on every
    # dev question (benchmarks/README.md).
    block_candidates: int = 48

    def __post_init__(self) -> None:
        if self.feedback_k < 0 or self.feedback_weight < 0:
            raise UsageError("feedback_k and feedback_weight must be at least 0")
        if self.reread_k < 0 or self.reread_weight < 0 or self.reread_tokens < 1:
            raise UsageError("reread_k and reread_weight must be at least 0 and reread_tokens at least 1")
        if self.diversity < 0 or self.diversity_pool < 1:
            raise UsageError("diversity must be at least 0 and diversity_pool at least 1")
        if self.block_candidates < 0:
            raise UsageError("block_candidates must be at least 0")
        if min(self.alone, self.following, self.block) < 0 or not self.alone + self.following + self.block:
            raise UsageError("alone, following and block must be at least 0, and one of them above 0")
        if self.following_n < 0 or self.block_tokens < 1:
            raise UsageError("following_n must be at least 0 and block_tokens at least 1")


# Before issue 12: sentences of every kind, one following window of 3 sentences weighted 0.5, no
# paragraph, no lexical part (for the benchmark).
LEGACY_SCORING = SentenceScoring(
    alone=1.0, following=0.5, following_n=2, following_scales=False, block=0.0, prose_only=False,
    reread_k=0, diversity=0.0,
)  # fmt: skip
# The first default of issue 12: prose only, the sentence and one following window of 3 sentences
# equally weighted, no paragraph (for the benchmark).
WINDOW_SCORING = SentenceScoring(
    alone=1.0, following=1.0, following_n=2, following_scales=False, block=0.0, reread_k=0, diversity=0.0
)
# The second default of issue 12: the sentence, its following windows of 2..6 sentences and its
# paragraph block, with no second stage (for the benchmark).
PARAGRAPH_SCORING = SentenceScoring(reread_k=0, diversity=0.0)
# The third default of issue 12: PARAGRAPH_SCORING and the second stage, answers in its order.
REREAD_SCORING = SentenceScoring(diversity=0.0)


@dataclass(frozen=True)
class SentenceIndex:
    """A document's sentences for zero-shot QA: spans, which are candidates, their embeddings alone,
    with their following context and of their paragraph block (L2-normalised), and their words with
    idf weights."""

    text: str
    spans: list[tuple[int, int]]
    prose: Tensor  # (n,) bool: the span is prose (tasks.text.span_kind)
    alone: Tensor  # (n, d)
    local: Tensor  # (k, n, d): following_windows (k windows per span)
    block: Tensor  # (n, d): the embedding of the span's paragraph block (zeros when not embedded)
    words: list[frozenset[str]]
    idf: dict[str, float]
    unseen_idf: float  # idf of a word that is in no sentence
    # (n, d): for each span, the mean of the contextual token states of the reread_tokens tokens
    # that start at it (L2-normalised; empty when the scoring has no second stage or reads passages)
    ahead: Tensor = field(default_factory=lambda: torch.empty(0, 0))
    ahead_tokens: int = 0  # the reread_tokens ``ahead`` was computed for
    # What reread_passes read, kept for the next question about the same text: token counts of
    # spans ("tokens", i) and passage embeddings (i, max_tokens) (passage_embeddings).
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # The paragraph blocks that embed_blocks embeds (of several sentences, one of them needed), each
    # a list of span indices, and (n, d) each span's block embedding guessed as the L2-normalised
    # mean of its block's ``alone`` rows (``alone``'s row for a span in no such block).
    blocks: list[list[int]] = field(default_factory=list, compare=False, repr=False)
    block_guess: Tensor = field(default_factory=lambda: torch.empty(0, 0), compare=False, repr=False)
    # focus (SentenceScoring.block_candidates): no paragraph embedded yet (``block`` and ``ahead``
    # are empty); ``lazy`` holds what the questions embedded so far: "embedded" (block position ->
    # embedding) and "states" (each span's token states: its own pass's, or its block's once the
    # block is embedded, when the second stage reads ahead; fp16, 768 bytes a token for the default
    # model, kept as long as the index: about 5 MB for a 7,000-word address).
    lazy: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


_WORD = re.compile(r"\w+")


def index_sentences(
    tm: TaskModel, text: str, batch_size: int, scoring: SentenceScoring, enc: Encoding | None = None
) -> SentenceIndex:
    """Embed ``text``'s sentences (and, when ``scoring.block`` is above 0, its paragraph blocks, or
    with ``scoring.block_candidates`` below the number of candidates none yet: see focus; ``enc``:
    the text's encoding, encoded here when not given)."""
    spans = sentence_spans(text)
    n, d = len(spans), tm.config.hidden_size
    if not spans:
        empty = torch.empty(0, d)
        return SentenceIndex(
            text, [], torch.zeros(0, dtype=torch.bool), empty, empty.unsqueeze(0), empty, [], {}, 0.0
        )
    ahead_wanted = bool(scoring.reread_k and scoring.reread_weight and not scoring.reread_passes)
    states: dict[int, Tensor] | None = None
    if ahead_wanted:
        alone, own, _ = embed_keeping_states(tm, [text[s:e] for s, e in spans], batch_size)
        states = dict(enumerate(own))
    else:
        alone = embed_texts(tm, [text[s:e] for s, e in spans], batch_size)  # (n, d)
    local = following_windows(alone, scoring.following_n, scoring.following_scales)
    prose = torch.tensor([span_kind(text, s, e) == "prose" for s, e in spans])
    block = torch.zeros_like(alone)
    groups: list[list[int]] = []
    guess, lazy = torch.empty(0, 0), {}
    if scoring.block:
        needed = prose if scoring.prose_only else torch.ones_like(prose)
        groups = block_groups(tm, text, spans, needed, scoring.block_tokens, enc)
        guess = guessed_blocks(alone, groups)
        if scoring.block_candidates and int(needed.sum()) > scoring.block_candidates:
            owner = [-1] * n
            for g, members in enumerate(groups):
                for i in members:
                    owner[i] = g
            lazy = {
                "embedded": {},
                "owner": owner,
                "states": [states[i] for i in range(n)] if states else None,
            }
            block = torch.empty(0, d)
        else:
            block = blocks_over(alone, groups, embed_groups(tm, text, spans, groups, batch_size, states))
    ahead = None
    if states and not lazy:
        ahead = reading_ahead([states[i] for i in range(n)], alone, scoring.reread_tokens)
    words = [frozenset(words_of(text[s:e])) for s, e in spans]
    df = Counter(w for ws in words for w in ws)
    idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}  # BM25's idf
    unseen = math.log(1 + (n + 0.5) / 0.5)
    index = SentenceIndex(
        text,
        spans,
        prose,
        alone,
        local,
        block,
        words,
        idf,
        unseen,
        blocks=groups,
        block_guess=guess,
        lazy=lazy,
    )
    return index if ahead is None else replace(index, ahead=ahead, ahead_tokens=scoring.reread_tokens)


def embed_keeping_states(
    tm: TaskModel, texts: Sequence[str], batch_size: int
) -> tuple[Tensor, list[Tensor], list[Encoding]]:
    """``embed_texts``'s embeddings (len(texts), d); for each text the token states (T, d) of its
    own tokens (specials left out; fp16 to halve the memory), in text order (a text longer than one
    window takes each token from the first window that holds it); and each text's encoding."""
    encodings = [tm.tokenizer.encode(t) for t in texts]
    d = tm.config.hidden_size
    states = [torch.zeros(len(enc), d, dtype=torch.float16) for enc in encodings]
    filled = [torch.zeros(len(enc), dtype=torch.bool) for enc in encodings]

    def keep(t: int, w: Window, out: Tensor) -> None:
        rows = [k for k, o in enumerate(w.offsets) if o is not None]  # the text's tokens doc_start..
        tokens = torch.arange(w.doc_start, w.doc_start + len(rows))
        new = ~filled[t][tokens]
        states[t][tokens[new]] = out[rows][new].to(torch.float16)
        filled[t][tokens[new]] = True

    return embed_encodings(tm, encodings, batch_size, keep), states, encodings


def reading_ahead(
    states: list[Tensor], alone: Tensor, max_tokens: int, rows: Sequence[int] | None = None
) -> Tensor:
    """(n, d): for each span, the L2-normalised mean of the ``max_tokens`` token states that start
    at its first token and run on through the next spans (``states``: each span's (T_i, d) token
    states, in text order); a span with no token from it to the end keeps its ``alone`` row. With
    ``rows``, only those spans' rows are computed (the others keep ``alone``'s)."""
    ahead = alone.clone()
    for i in range(len(states)) if rows is None else rows:
        window = torch.cat(_ahead_states(states, i, max_tokens))[:max_tokens]
        if len(window):
            ahead[i] = F.normalize(window.float().mean(0), dim=-1)
    return ahead


def _ahead_states(states: list[Tensor], i: int, max_tokens: int) -> list[Tensor]:
    """The token states of span ``i`` and of the spans after it, up to the one that takes the count
    to ``max_tokens`` (an empty (0, d) piece when there is none)."""
    parts, count, j = [states[i][:0]], 0, i
    while j < len(states) and count < max_tokens:
        parts.append(states[j])
        count += len(states[j])
        j += 1
    return parts


def following_windows(alone: Tensor, following_n: int, scales: bool) -> Tensor:
    """(k, n, d) L2-normalised mean embeddings of each span and its next spans (fewer at the end):
    with ``scales`` the next 1, 2, ..., ``following_n`` (k = following_n; k = 1 and the span alone
    when following_n is 0), else only the next ``following_n`` (k = 1). alone (n, d)."""
    n = len(alone)
    sums = torch.cat([torch.zeros_like(alone[:1]), alone.cumsum(0)])  # (n + 1, d): sums[i] = rows < i
    starts = torch.arange(n)
    lengths = range(1, following_n + 1) if scales and following_n else [following_n]
    windows = []
    for m in lengths:
        ends = (starts + m + 1).clamp(max=n)
        windows.append(F.normalize(sums[ends] - sums[starts], dim=-1))  # (n, d): the mean's direction
    return torch.stack(windows)


def embed_blocks(
    tm: TaskModel,
    text: str,
    spans: list[tuple[int, int]],
    alone: Tensor,
    needed: Tensor,
    max_tokens: int,
    batch_size: int,
    enc: Encoding | None = None,
    *,
    token_states: dict[int, Tensor] | None = None,
) -> Tensor:
    """(n, d): for each span, the embedding of its paragraph block (tasks.text.paragraph_blocks, cut
    at ``max_tokens``); a block of one sentence is that sentence, whose embedding ``alone`` holds.
    Only blocks with a ``needed`` (n,) span are embedded; the others' rows stay ``alone``'s.
    ``enc``: the text's encoding (for the sentences' token counts), encoded here when not given.
    ``token_states`` (span -> its token states): the spans of an embedded block get their tokens'
    states from the block's pass instead (read in the paragraph's context)."""
    groups = block_groups(tm, text, spans, needed, max_tokens, enc)
    return blocks_over(alone, groups, embed_groups(tm, text, spans, groups, batch_size, token_states))


def blocks_over(alone: Tensor, groups: Sequence[list[int]], embedded: Sequence[Tensor] | Tensor) -> Tensor:
    """(n, d): each span's block embedding, ``embedded[g]`` for the spans of ``groups[g]`` and the
    span's own ``alone`` row for a span in none of them."""
    block = alone.clone()
    for m, e in zip(groups, embedded, strict=True):
        block[m] = e
    return block


def block_groups(
    tm: TaskModel,
    text: str,
    spans: list[tuple[int, int]],
    needed: Tensor,
    max_tokens: int,
    enc: Encoding | None = None,
) -> list[list[int]]:
    """The paragraph blocks embed_blocks embeds, in text order, each as its span indices: blocks
    (tasks.text.paragraph_blocks, cut at ``max_tokens`` tokens of ``enc``, the text's encoding) of
    several spans, one of them ``needed``."""
    if enc is None:
        enc = tm.tokenizer.encode(text)
    token_starts = [a for a, _ in enc.offsets]
    sizes = [bisect.bisect_left(token_starts, e) - bisect.bisect_left(token_starts, s) for s, e in spans]
    members: dict[int, list[int]] = {}
    for i, b in enumerate(paragraph_blocks(text, spans, sizes, max_tokens)):
        members.setdefault(b, []).append(i)
    return [m for m in members.values() if len(m) > 1 and bool(needed[m].any())]


def embed_groups(
    tm: TaskModel,
    text: str,
    spans: list[tuple[int, int]],
    groups: list[list[int]],
    batch_size: int,
    token_states: dict[int, Tensor] | list[Tensor] | None = None,
) -> Tensor:
    """(len(groups), d): the embedding of each group of consecutive spans read as one text; with
    ``token_states``, each span's entry becomes its tokens' states from its group's pass."""
    texts = [text[spans[m[0]][0] : spans[m[-1]][1]] for m in groups]
    if not texts:
        return torch.empty(0, tm.config.hidden_size)
    if token_states is None:
        return embed_texts(tm, texts, batch_size)
    embedded, states, encodings = embed_keeping_states(tm, texts, batch_size)
    for m, st, block_enc in zip(groups, states, encodings, strict=True):
        # the block's tokens, split by the span their first character is in
        begins, base = [a for a, _ in block_enc.offsets], spans[m[0]][0]
        for i in m:
            lo = bisect.bisect_left(begins, spans[i][0] - base)
            hi = bisect.bisect_left(begins, spans[i][1] - base)
            token_states[i] = st[lo:hi]
    return embedded


def guessed_blocks(alone: Tensor, groups: list[list[int]]) -> Tensor:
    """(n, d): each span's block embedding guessed without a pass: the L2-normalised mean of the
    ``alone`` rows of its group (``alone``'s own row for a span in no group)."""
    return blocks_over(alone, groups, [F.normalize(alone[m].mean(0), dim=-1) for m in groups])


def lexical_coverage(index: SentenceIndex, question: str) -> Tensor:
    """Per sentence, the idf-weighted share of the question's distinct words it holds (0..1); a
    question word found nowhere in the document counts with the highest idf, so it lowers every
    sentence's share."""
    asked = set(words_of(question))
    weights = {w: index.idf.get(w, index.unseen_idf) for w in asked}
    total = sum(weights.values())
    if not total:
        return torch.zeros(len(index.spans))
    return torch.tensor([sum(weights[w] for w in asked & ws) / total for ws in index.words])


def score_sentences(index: SentenceIndex, q: Tensor, question: str, scoring: SentenceScoring) -> Tensor:
    """(n,) scores of the document's sentences for the question embedding ``q`` (d,), -inf for the
    sentences that are not candidates; with ``scoring.feedback_k`` and ``feedback_weight``, scored a
    second time with the question moved towards its best candidates (``feedback_query``)."""
    if not index.spans:
        return torch.empty(0)
    coverage = lexical_coverage(index, question) if scoring.lexical else None
    scores = _scores(index, q, coverage, scoring)
    if scoring.feedback_k and scoring.feedback_weight:
        q = feedback_query(q, index.alone, scores, scoring.feedback_k, scoring.feedback_weight)
        scores = _scores(index, q, coverage, scoring)
    return scores


def _scores(index: SentenceIndex, q: Tensor, coverage: Tensor | None, scoring: SentenceScoring) -> Tensor:
    dense = scoring.alone * (index.alone @ q) + scoring.following * (index.local @ q).mean(0)
    if scoring.block:
        if len(index.block) != len(index.spans):
            raise ValueError(
                "the index embeds its paragraphs per question (SentenceScoring.block_candidates): "
                "rank with rank_sentences"
            )
        dense = dense + scoring.block * (index.block @ q)
    dense = dense / (scoring.alone + scoring.following + scoring.block)
    scores = dense
    if coverage is not None:
        scores = (1 - scoring.lexical) * dense + scoring.lexical * coverage
    if scoring.prose_only:
        scores = scores.masked_fill(~index.prose, -math.inf)
    return scores


def reread_candidates(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    scores: Tensor,
    scoring: SentenceScoring,
    batch_size: int,
    at_least: int = 1,
) -> tuple[list[int], list[float]]:
    """The second stage: the ``max(scoring.reread_k, at_least)`` best candidates of ``scores`` (n,),
    each read again as the passage that starts at it, best first, with their scores
    ``(score + w * cosine(q, passage)) / (1 + w)`` (w = ``scoring.reread_weight``). The passage's
    vector is ``index.ahead`` (the mean of token states already computed in context), or with
    ``scoring.reread_passes`` its text embedded (``passage_embeddings``, one more pass). A passage
    that starts at a sentence says whether the text from there on answers the question, which the
    first stage, a mean of separate sentence embeddings, only approximates. With ``reread_k`` or
    ``reread_weight`` 0: the ``at_least`` best candidates and their scores."""
    k = max(scoring.reread_k, at_least) if scoring.reread_k and scoring.reread_weight else at_least
    k = min(k, int(torch.isfinite(scores).sum()))
    if k < 1:
        return [], []
    best = torch.topk(scores, k)
    return _reread(tm, index, q, best.indices, best.values, scoring, batch_size)


def _reread(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    top: Tensor,
    values: Tensor,
    scoring: SentenceScoring,
    batch_size: int,
) -> tuple[list[int], list[float]]:
    """The candidates ``top`` with their first-stage ``values``, mixed with their passages' cosines
    (when the scoring has a second stage) and sorted by the result (stable)."""
    if scoring.reread_k and scoring.reread_weight and len(top):
        if scoring.reread_passes:
            passages = passage_embeddings(tm, index, top.tolist(), scoring.reread_tokens, batch_size)
        elif index.ahead_tokens == scoring.reread_tokens and len(index.ahead) == len(index.spans):
            passages = index.ahead[top]
        else:
            raise ValueError(
                f"the index holds no passages of {scoring.reread_tokens} tokens (index_sentences "
                "with this scoring makes them)"
            )
        w = scoring.reread_weight
        values = (values + w * (passages @ q)) / (1 + w)
        order = torch.argsort(values, descending=True, stable=True)
        top, values = top[order], values[order]
    return top.tolist(), [float(v) for v in values]


def candidate_pool(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    scores: Tensor,
    scoring: SentenceScoring,
    batch_size: int,
    k: int,
) -> tuple[list[int], list[float]]:
    """The candidates ``k`` answers are picked from, best first: the second stage's (reread_candidates
    with ``at_least=k``), then, up to ``max(scoring.diversity_pool, k)`` in all, the next candidates
    of the first stage, each scored as the second stage scores (its passage's cosine mixed in) and
    sorted among themselves. The first one is always the second stage's best."""
    top, values = reread_candidates(tm, index, q, scores, scoring, batch_size, k)
    size = min(max(scoring.diversity_pool, k), int(torch.isfinite(scores).sum()))
    if len(top) < size:
        rest = scores.clone()
        rest[top] = -math.inf
        more = torch.topk(rest, size - len(top))
        tail, tail_values = _reread(tm, index, q, more.indices, more.values, scoring, batch_size)
        top, values = top + tail, values + tail_values
    return top, values


def diverse_order(values: Sequence[float], embeddings: Tensor, k: int, weight: float) -> list[int]:
    """Maximal marginal relevance: ``k`` positions of ``values`` (best first), the first one first,
    each next one the position of the largest ``value - weight * (the highest cosine of its row of
    embeddings (L2-normalised, one row per value) with the rows already picked)`` (the earlier
    position on a tie). With weight 0: the first k positions."""
    n = min(k, len(values))
    if n < 1:
        return []
    scores = torch.tensor([float(v) for v in values], dtype=torch.float64)
    similar = (embeddings.float() @ embeddings.float().T).double()  # (m, m)
    picked = [0]
    closest = similar[0].clone()  # each row's highest cosine with an answer picked
    while len(picked) < n:
        gain = scores - weight * closest
        gain[picked] = -math.inf
        best = int(torch.argmax(gain))  # the first of equal maxima
        picked.append(best)
        closest = torch.maximum(closest, similar[best])
    return picked


def answer_candidates(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    scores: Tensor,
    scoring: SentenceScoring,
    batch_size: int,
    k: int,
) -> tuple[list[int], list[float]]:
    """The ``k`` answers (sentence indices) and their scores, in the order they are shown: the
    second stage's best first (reread_candidates); with ``scoring.diversity``, the next ones picked
    from ``candidate_pool`` by maximal marginal relevance over the sentences' own embeddings
    (``diverse_order``), so a sentence that repeats a better answer gives way to one that adds to
    it. A score is the candidate's own (not lowered by the diversity term), so the scores of ranks
    2.. need not decrease."""
    if not scoring.diversity or k < 2:
        top, values = reread_candidates(tm, index, q, scores, scoring, batch_size, k)
        return top[:k], values[:k]
    top, values = candidate_pool(tm, index, q, scores, scoring, batch_size, k)
    order = diverse_order(values, index.alone[top], k, scoring.diversity)
    return [top[i] for i in order], [values[i] for i in order]


def rank_sentences(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    question: str,
    scoring: SentenceScoring,
    batch_size: int,
    k: int,
) -> tuple[list[int], list[float]]:
    """The ``k`` answers (sentence indices) and their scores, in the order they are shown, for the
    question ``question`` embedded as ``q`` (d,): score_sentences, then answer_candidates; over an
    index that embeds its paragraphs per question, through focus first."""
    if index.lazy:
        index, scores = focus(tm, index, q, question, scoring, batch_size, k)
    else:
        scores = score_sentences(index, q, question, scoring)
    return answer_candidates(tm, index, q, scores, scoring, batch_size, k)


def _answers_read(scoring: SentenceScoring, k: int) -> int:
    """How many of the best candidates answer_candidates reads for ``k`` answers."""
    size = max(k, scoring.reread_k) if scoring.reread_k and scoring.reread_weight else k
    return max(size, scoring.diversity_pool) if scoring.diversity and k >= 2 else size


def prefilter(index: SentenceIndex, q: Tensor, question: str, scoring: SentenceScoring, k: int) -> Tensor:
    """The sentences focus embeds the paragraphs of, best first: the ``max(scoring.block_candidates,
    the candidates answer_candidates reads for k answers)`` best of score_sentences with every block
    embedding guessed (``index.block_guess``, no pass)."""
    guessed = score_sentences(replace(index, block=index.block_guess), q, question, scoring)
    m = min(max(scoring.block_candidates, _answers_read(scoring, k)), int(torch.isfinite(guessed).sum()))
    return torch.topk(guessed, m).indices if m > 0 else torch.empty(0, dtype=torch.long)


def focus(
    tm: TaskModel,
    index: SentenceIndex,
    q: Tensor,
    question: str,
    scoring: SentenceScoring,
    batch_size: int,
    k: int,
) -> tuple[SentenceIndex, Tensor]:
    """Paragraphs read only where they can matter, for an index built without them (``index.lazy``):
    the candidates of prefilter get their paragraph blocks embedded (those not embedded for an
    earlier question) and are scored by score_sentences; every other sentence gets -inf. Then the
    blocks the second stage's passages read ahead into are embedded too, for the candidates
    answer_candidates reads. Returns the index with those blocks and passages (the rows of other
    spans are their ``alone`` rows) and the scores. A candidate's score and passage are the ones an
    index with every paragraph embedded gives it (up to the last digits a batch of other texts can
    move), so the answers are the same as long as prefilter keeps the candidates they come from."""
    n = len(index.spans)
    chosen = prefilter(index, q, question, scoring, k)
    owner, lazy = index.lazy["owner"], index.lazy
    _embed_lazily(tm, index, {owner[i] for i in chosen.tolist()}, batch_size)
    view = replace(index, block=_lazy_block(index))
    scores = torch.full((n,), -math.inf)
    scores[chosen] = score_sentences(view, q, question, scoring)[chosen]
    states = lazy["states"]
    if states is None or not len(chosen):
        return view, scores
    read = torch.topk(scores, min(_answers_read(scoring, k), len(chosen))).indices.tolist()
    while True:  # a block's tokens can run the passage on into one more block
        touched = set()
        for i in read:
            ahead = _ahead_states(states, i, scoring.reread_tokens)
            touched.update(owner[j] for j in range(i, i + len(ahead) - 1))
        if touched <= lazy["embedded"].keys() | {-1}:
            break
        _embed_lazily(tm, index, touched, batch_size)
    ahead = reading_ahead(states, index.alone, scoring.reread_tokens, read)
    return replace(view, block=_lazy_block(index), ahead=ahead, ahead_tokens=scoring.reread_tokens), scores


# Once the blocks embedded for a document's questions would pass this share of its blocks, the rest
# are embedded in the same pass: many questions about one document end up needing most blocks, and
# one pass over them all costs less than a small pass per question (on three FAQ pages of 223-722
# sentences and 25-52 questions, a pass per question took 0.94-1.28x the seconds of embedding every
# block up front, with this rule 0.87-1.12x; benchmarks/README.md). The answers do not change:
# focus ranks prefilter's candidates either way.
EMBED_ALL_SHARE = 0.5


def _embed_lazily(tm: TaskModel, index: SentenceIndex, groups: set[int], batch_size: int) -> None:
    """Embed the blocks ``index.blocks[g]`` for ``g`` in ``groups`` not yet embedded (-1: none), or
    every block not yet embedded when that would take the embedded ones past EMBED_ALL_SHARE."""
    lazy = index.lazy
    todo = sorted(g for g in groups if g >= 0 and g not in lazy["embedded"])
    if not todo:
        return
    if len(lazy["embedded"]) + len(todo) > EMBED_ALL_SHARE * len(index.blocks):
        todo = [g for g in range(len(index.blocks)) if g not in lazy["embedded"]]
    members = [index.blocks[g] for g in todo]
    embedded = embed_groups(tm, index.text, index.spans, members, batch_size, lazy["states"])
    for g, e in zip(todo, embedded, strict=True):
        lazy["embedded"][g] = e


def _lazy_block(index: SentenceIndex) -> Tensor:
    """(n, d): the block embeddings of the blocks embedded so far, ``alone``'s rows elsewhere."""
    embedded = index.lazy["embedded"]
    return blocks_over(index.alone, [index.blocks[g] for g in embedded], list(embedded.values()))


def passage_embeddings(
    tm: TaskModel, index: SentenceIndex, spans: list[int], max_tokens: int, batch_size: int
) -> Tensor:
    """(len(spans), d): for each span index, the embedding of the passage that starts at it: the
    span and the spans after it while the passage holds at most ``max_tokens`` tokens (the span
    alone when it is longer). Kept in ``index.memo`` for the next question about the text."""
    text, memo = index.text, index.memo

    def tokens(i: int) -> int:
        if ("tokens", i) not in memo:
            a, b = index.spans[i]
            memo["tokens", i] = len(tm.tokenizer.encode(text[a:b]))
        return memo["tokens", i]

    todo = [i for i in dict.fromkeys(spans) if (i, max_tokens) not in memo]
    texts = []
    for i in todo:
        end, size = i + 1, tokens(i)
        while end < len(index.spans) and size + tokens(end) <= max_tokens:
            size += tokens(end)
            end += 1
        texts.append(text[index.spans[i][0] : index.spans[end - 1][1]])
    for i, e in zip(todo, embed_texts(tm, texts, batch_size) if texts else [], strict=True):
        memo[i, max_tokens] = e
    return torch.stack([memo[i, max_tokens] for i in spans])


def feedback_query(q: Tensor, embeddings: Tensor, scores: Tensor, k: int, weight: float) -> Tensor:
    """One Rocchio step: ``normalise(q + weight * mean(embeddings of the k best-scored rows))``,
    among the rows whose score is finite (the candidates); ``q`` itself when there is none.
    q (d,), embeddings (n, d), scores (n,)."""
    k = min(k, int(torch.isfinite(scores).sum()))
    if k < 1:
        return q
    best = torch.topk(scores, k).indices  # (k,)
    return F.normalize(q + weight * embeddings[best].mean(0), dim=-1)


def decode_spans(
    text: str,
    scored: Sequence[tuple[Window, Tensor, Tensor]],
    *,
    n_best: int,
    max_answer_length: int,
    top_k: int,
    null_threshold: float | None,
) -> list[Answer]:
    """The ``top_k`` best answer spans of ``text`` from its windows' (window, start logits, end logits).

    Per window, the ``n_best`` starts and ends over context tokens (offset not None), end >= start and
    at most ``max_answer_length`` tokens; a span's score is its log-probability within its window (as
    HF's pipeline scores spans); a character span found in several windows keeps its best score.
    SQuAD 2.0 null answer (HF's convention): the lowest null logit (start[0] + end[0]) over the windows
    against the best span logit; no answer when the null beats it by more than ``null_threshold``.
    """
    best: dict[tuple[int, int], float] = {}  # character span -> best log-probability
    null_logit, best_logit = float("inf"), float("-inf")
    for w, start, end in scored:
        ctx = torch.tensor([o is not None for o in w.offsets])
        k = min(n_best, int(ctx.sum()))
        null_logit = min(null_logit, float(start[0] + end[0]))
        if k == 0:
            continue
        ls, le = torch.log_softmax(start, -1), torch.log_softmax(end, -1)
        starts = torch.topk(ls.masked_fill(~ctx, float("-inf")), k).indices.tolist()
        ends = torch.topk(le.masked_fill(~ctx, float("-inf")), k).indices.tolist()
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                span = (w.offsets[s][0], w.offsets[e][1])
                best[span] = max(best.get(span, float("-inf")), float(ls[s] + le[e]))
                best_logit = max(best_logit, float(start[s] + end[e]))
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
    answers = [Answer(text[s:e], s, e, round(math.exp(score), 6)) for (s, e), score in ranked]
    if answers and null_threshold is not None and null_logit - best_logit > null_threshold:
        return []
    return answers
