"""Extractive question answering over long documents.

With a QA checkpoint: every (question, context window) pair runs with global attention on the
question tokens; the n-best start/end logits of each window give candidate spans (end >= start,
at most ``max_answer_length`` tokens, inside the context), merged across the overlapping windows by
character span; the no-answer score is the first token's start + end logits.

With a plain encoder (the embedded default, no QA head): the answer is the sentence of the document
that best answers the question. The model was trained to embed sentences, so each sentence is
embedded on its own, and again with the FOLLOWING sentences (its local context); its score is the
weighted mean of the two cosine similarities with the question's embedding. Measured on
../shared/data/pyfaq_qa.jsonl (README): better than either part alone, and much better than pooling
sentence states out of one question-global pass over the whole document, which also cost ~20x more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LongdocError
from ..tokenize import Encoding, Window
from .runner import TaskModel, embed_texts, run_windows, window_overlap
from .text import sentence_spans, snippet

SCHEMA_VERSION = 1
FOLLOWING = 2  # sentences after a candidate that count as its local context (zero-shot)
LOCAL_WEIGHT = 0.5  # weight of that local context against the sentence alone


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offsets into the (newline-normalised) document
    end: int
    score: float


@dataclass(frozen=True)
class QAResult:
    id: str
    question: str
    answers: list[Answer]  # best first; empty when the document holds no answer
    context: str  # the best answer's surroundings, one line
    n_tokens: int
    n_windows: int
    truncated: bool  # the question was cut to max_question_length tokens
    method: str  # "span" (QA head) or "sentence" (zero-shot)
    unknown_share: float = 0.0  # of the document only the unknown token stands for (not in the record)

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
    ) -> None:
        if top_k < 1 or n_best < 1 or max_answer_length < 1:
            raise LongdocError("--top-k, --n-best and --max-answer-len must be at least 1", exit_code=2)
        self.tm, self.top_k, self.n_best, self.max_answer_length = tm, top_k, n_best, max_answer_length
        self.null_threshold, self.batch_size = null_threshold, batch_size
        if max_question_length < 1:
            raise LongdocError(f"--max-question-len {max_question_length}: must be at least 1", exit_code=2)
        self.max_question_length = max_question_length
        if doc_stride < 0:
            raise LongdocError(f"--doc-stride {doc_stride}: must be at least 0", exit_code=2)
        self.doc_stride, self.strict_stride = doc_stride, strict_stride  # capped per question
        self._sentences: tuple[str, list[tuple[int, int]], torch.Tensor, torch.Tensor] | None = None

    def answer(self, doc_id: str, text: str, questions: Sequence[str]) -> list[QAResult]:
        enc = self.tm.tokenizer.encode(text)
        unknown = self.tm.tokenizer.unknown_share(text, enc)
        return [replace(self._answer_one(doc_id, text, enc, q), unknown_share=unknown) for q in questions]

    def _answer_one(self, doc_id: str, text: str, enc: Encoding, question: str) -> QAResult:
        if not question.strip():
            raise LongdocError("a question is empty", exit_code=2)
        tok = self.tm.tokenizer
        # Consecutive windows share at most half of the context part of a window (this question's).
        budget = tok.context_budget(question, self.tm.max_length, self.max_question_length)
        stride = window_overlap("--doc-stride", self.doc_stride, max(0, budget // 2), self.strict_stride)
        windows = tok.question_windows(question, enc, self.tm.max_length, stride, self.max_question_length)
        if self.tm.head == "qa":
            answers = self._spans(text, windows)
            method = "span"
        else:
            answers = self._sentences_for(text, question)
            method = "sentence"
        context = _surroundings(text, answers[0]) if answers else ""
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

    def _sentences_for(self, text: str, question: str) -> list[Answer]:
        spans, alone, local = self._sentence_embeddings(text)
        if not spans:
            return []
        q = embed_texts(self.tm, [question], 1)[0]
        scores = (alone @ q + LOCAL_WEIGHT * (local @ q)) / (1 + LOCAL_WEIGHT)  # a weighted mean cosine
        top = torch.argsort(scores, descending=True)[: self.top_k].tolist()
        return [Answer(text[spans[i][0] : spans[i][1]], *spans[i], round(float(scores[i]), 6)) for i in top]

    def _sentence_embeddings(self, text: str) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Every sentence embedded alone, and with its FOLLOWING sentences (cached per document, so
        many questions over one document embed it once)."""
        if self._sentences is not None and self._sentences[0] == text:
            return self._sentences[1:]
        spans = sentence_spans(text)
        if not spans:
            return [], torch.empty(0), torch.empty(0)
        alone = embed_texts(self.tm, [text[s:e] for s, e in spans], max(self.batch_size, 16))
        local = torch.stack([alone[i : i + FOLLOWING + 1].mean(0) for i in range(len(spans))])
        self._sentences = (text, spans, alone, F.normalize(local, dim=-1))
        return self._sentences[1:]


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


def _surroundings(text: str, answer: Answer, margin: int = 120) -> str:
    return snippet(text, max(0, answer.start - margin), min(len(text), answer.end + margin), 2 * margin + 200)
