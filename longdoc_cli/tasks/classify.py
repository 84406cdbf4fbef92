"""Document classification over windows: a fine-tuned head, or zero-shot by embedding similarity.

Zero-shot (a checkpoint without a classification head, such as the embedded default): the document
and every label description are embedded with the pooling the model was trained with; cosine
similarity ranks the labels and ``softmax(SCALE * cosine)`` turns it into scores. SCALE = 20 is
the similarity scale all-MiniLM-L6-v2 was trained with (sentence-transformers'
MultipleNegativesRankingLoss), so the scores are that training's own calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LongdocError
from ..textio import read_text_file
from ..tokenize import Window
from .runner import TaskModel, embed_texts, pool, run_windows, window_overlap
from .text import passage_spans, snippet

SCALE = 20.0
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Label:
    name: str
    description: str | None = None

    @property
    def prompt(self) -> str:
        return f"{self.name}: {self.description}" if self.description else self.name


@dataclass(frozen=True)
class Passage:
    """A span of the document (character offsets into the normalised text) and its support score."""

    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class Classification:
    id: str
    label: str
    score: float
    scores: dict[str, float]  # the top-k labels, best first
    labels: list[str]  # multi-label: every label over the threshold; else [label]
    n_tokens: int
    n_windows: int
    truncated: bool
    passages: list[Passage] = field(default_factory=list)
    unknown_share: float = 0.0  # of the text only the unknown token stands for (not in the record)

    def to_record(self, key: str = "path") -> dict[str, Any]:
        fields = asdict(self)
        del fields["id"], fields["unknown_share"]
        if not self.passages:
            del fields["passages"]
        return {"schema_version": SCHEMA_VERSION, key: self.id, **fields}


def default_labels() -> list[Label]:
    """The 17 top-level IPTC media topics shipped in configs/iptc_topics.tsv."""
    text = resources.files("longdoc_cli").joinpath("resources/iptc_topics.tsv").read_text(encoding="utf-8")
    return parse_labels(text, "iptc_topics.tsv")


def parse_labels(text: str, source: str) -> list[Label]:
    """One label per line, optionally ``label<TAB>description``; blank lines and # comments skipped."""
    labels = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, description = line.partition("\t")
        labels.append(Label(name.strip(), description.strip() or None))
    return _checked(labels, source)


def load_labels(labels: Sequence[str] | None, labels_file: str | None) -> list[Label]:
    """Labels from ``--labels``, ``--labels-file`` or, with neither, the shipped topic set."""
    if labels and labels_file:
        raise LongdocError("give either --labels or --labels-file, not both", exit_code=2)
    if labels_file:
        return parse_labels(read_text_file(labels_file, "labels file"), labels_file)
    if labels:
        return _checked([Label(x.strip()) for x in labels if x.strip()], "--labels")
    return default_labels()


def _checked(labels: list[Label], source: str) -> list[Label]:
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LongdocError(f"{source}: label {dup!r} is given twice", exit_code=2)
    if len(labels) < 2:
        raise LongdocError(f"{source}: zero-shot classification needs at least two labels", exit_code=2)
    return labels


class Classifier:
    """Classifies documents with ``tm``: its head when it has one, else zero-shot over ``labels``."""

    def __init__(
        self,
        tm: TaskModel,
        labels: list[Label] | None = None,
        *,
        aggregate: str = "mean",
        top_k: int = 3,
        threshold: float = 0.5,
        explain: int = 0,
        batch_size: int = 4,
        stride: int = 256,
        strict_stride: bool = False,
    ) -> None:
        if aggregate not in ("mean", "max", "first"):
            raise LongdocError(f"--aggregate must be mean, max or first, not {aggregate!r}", exit_code=2)
        if top_k < 1:
            raise LongdocError(f"--top-k {top_k}: must be at least 1", exit_code=2)
        if explain < 0:
            raise LongdocError(f"--explain {explain}: must be at least 0", exit_code=2)
        if not 0.0 < threshold < 1.0:  # also NaN
            raise LongdocError(f"--threshold {threshold}: must be between 0 and 1", exit_code=2)
        self.tm, self.aggregate, self.top_k, self.threshold = tm, aggregate, top_k, threshold
        self.explain, self.batch_size = explain, batch_size
        self.stride = window_overlap("--stride", stride, (tm.max_length - 2) // 2, strict_stride)
        self.multi_label = False
        if tm.head == "classification":
            if labels is not None:
                raise LongdocError(
                    f"{tm.path} is a fine-tuned classifier with its own labels; --labels/--labels-file "
                    "apply only to zero-shot models",
                    exit_code=2,
                )
            id2label = tm.config.id2label or {i: f"LABEL_{i}" for i in range(tm.config.num_labels)}
            self.names = [id2label[i] for i in range(len(id2label))]
            self.multi_label = tm.config.problem_type == "multi_label_classification"
            self.label_embeddings = None
        else:
            labels = labels or default_labels()
            self.names = [label.name for label in labels]
            self.label_embeddings = embed_texts(tm, [label.prompt for label in labels], batch_size)

    @property
    def zero_shot(self) -> bool:
        return self.label_embeddings is not None

    def classify(self, docs: Sequence[tuple[str, str]]) -> list[Classification]:
        """Classify (id, text) documents; all their windows are batched together by length."""
        tok = self.tm.tokenizer
        windows: list[Window] = []
        owner: list[int] = []
        n_tokens = []
        unknown: list[float] = []
        for d, (_, text) in enumerate(docs):
            enc = tok.encode(text)
            n_tokens.append(len(enc))
            unknown.append(tok.unknown_share(text, enc))
            doc_windows = tok.document_windows(enc, self.tm.max_length, self.stride)
            if self.aggregate == "first":  # truncation, reported as such
                doc_windows = doc_windows[:1]
            for w in doc_windows:
                windows.append(w)
                owner.append(d)
        per_doc: list[list[tuple[int, torch.Tensor]]] = [[] for _ in docs]
        for i, out in run_windows(self.tm, windows, self.batch_size):
            per_doc[owner[i]].append((len(windows[i]), self._window_scores(out)))
        results = []
        for d, (doc_id, text) in enumerate(docs):
            probs = self._aggregate(per_doc[d])
            spans = [(w.doc_start, w.doc_end) for i, w in enumerate(windows) if owner[i] == d]
            truncated = not covers(spans, n_tokens[d])
            results.append(
                self._result(doc_id, text, probs, n_tokens[d], len(per_doc[d]), truncated, unknown[d])
            )
        return results

    # -- scoring ---------------------------------------------------------------------------------

    def _window_scores(self, out: torch.Tensor) -> torch.Tensor:
        """Zero-shot: cosine of the pooled window with every label; head: the logits."""
        if self.zero_shot:
            return self.label_embeddings @ F.normalize(pool(out, self.tm.pooling), dim=-1)
        return out

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores -> probabilities: softmax(SCALE * cosine) zero-shot; softmax or sigmoid of logits."""
        if self.zero_shot:
            return torch.softmax(SCALE * scores, dim=-1)
        return torch.sigmoid(scores) if self.multi_label else torch.softmax(scores, dim=-1)

    def _aggregate(self, scored: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Windows -> one probability per label: the windows' scores (token-weighted mean, or max),
        then normalised, as `longdoc evaluate` and training's dev evaluation do."""
        weights = torch.tensor([n for n, _ in scored], dtype=torch.float32)
        stack = torch.stack([s for _, s in scored])  # (n_windows, n_labels)
        if self.aggregate == "max":
            agg = stack.max(dim=0).values
        else:
            agg = (stack * weights[:, None]).sum(0) / weights.sum()
        return self._probabilities(agg)

    def _result(
        self,
        doc_id: str,
        text: str,
        probs: torch.Tensor,
        n_tok: int,
        n_win: int,
        truncated: bool,
        unknown_share: float,
    ) -> Classification:
        order = torch.argsort(probs, descending=True).tolist()
        best = order[0]
        scores = {self.names[i]: round(float(probs[i]), 6) for i in order[: self.top_k]}
        if self.multi_label:
            chosen = [self.names[i] for i in order if float(probs[i]) >= self.threshold]
        else:
            chosen = [self.names[best]]
        passages = self._explain(text, best) if self.explain else []
        return Classification(
            doc_id, self.names[best], round(float(probs[best]), 6), scores, chosen, n_tok, n_win, truncated,
            passages, unknown_share,
        )  # fmt: skip

    def _explain(self, text: str, label: int) -> list[Passage]:
        """The passages that most support ``label``: each passage scored on its own (cosine with the
        label for zero-shot, the head's probability of the label otherwise)."""
        spans = passage_spans(text)
        if not spans:
            return []
        texts = [text[s:e] for s, e in spans]
        if self.zero_shot:
            scores = embed_texts(self.tm, texts, self.batch_size) @ self.label_embeddings[label]
        else:
            tok = self.tm.tokenizer
            windows = [tok.document_windows(tok.encode(t), self.tm.max_length, self.stride)[0] for t in texts]
            scores = torch.zeros(len(texts))
            for i, out in run_windows(self.tm, windows, self.batch_size):
                scores[i] = self._probabilities(self._window_scores(out))[label]
        top = torch.argsort(scores, descending=True)[: self.explain].tolist()
        return [
            Passage(spans[i][0], spans[i][1], snippet(text, *spans[i]), round(float(scores[i]), 6))
            for i in top
        ]


def covers(spans: list[tuple[int, int]], n: int) -> bool:
    """True when the [start, end) token spans together cover 0..n."""
    reach = 0
    for start, end in sorted(spans):
        if start > reach:
            return False
        reach = max(reach, end)
    return reach >= n
