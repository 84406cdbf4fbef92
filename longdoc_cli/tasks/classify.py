"""Document classification over windows: a fine-tuned head, or zero-shot by embedding similarity.

Zero-shot (a checkpoint without a classification head, such as the embedded default): the document
is read as consecutive passages of PASSAGE_TOKENS tokens (the length a sentence encoder was trained
on), each embedded with the model's pooling. A label with a description is embedded as
``name: description``, one vector per description when it has several (a labels file's further
tab-separated columns: phrasings of the same topic), and its cosine with a passage is the best of
its vectors' cosines; a bare name as the mean of the name (twice: with no description,
``name: description`` is the name) and "This text is about NAME.", and calibrated (Zhao et al.
2021): its cosine minus its mean cosine with content-free texts, so that a
short name that is close to any text gains nothing from it. A passage's scores are
``softmax(SCALE * cosine)`` over the labels; the document's scores are the token-weighted mean of its
passages' scores (a soft vote), so they are probabilities that sum to 1. SCALE = 20 is the
similarity scale all-MiniLM-L6-v2 was trained with (sentence-transformers'
MultipleNegativesRankingLoss). The numbers behind each choice: benchmarks/eval_zero_shot.py and
benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..textio import read_text_file
from ..tokenize import Window
from .runner import TaskModel, embed_texts, pool, run_windows, window_overlap
from .text import passage_spans, snippet

SCALE = 20.0
SCHEMA_VERSION = 2  # 2: optional "seconds" and a final {"summary": ...} record (--timings)
PASSAGE_TOKENS = 256  # zero-shot passages: all-MiniLM-L6-v2's max_seq_length (trained on <= 128)
# Content-free texts for contextual calibration (Zhao et al. used "N/A", "" and "[MASK]"): no topic.
NEUTRAL_TEXTS = ("", "N/A", "text", "This is a text.", "Here is some text.", "The following.", "...")
PROMPT_STYLES = ("auto", "name", "description", "multi")
VOTES = ("soft", "soft-half", "mean", "centroid")
DEFAULT_PRESET = "topics"
_PRESETS = "resources/labels"  # configs/labels/*.tsv, shipped inside the package


@dataclass(frozen=True)
class Label:
    """A zero-shot label: its name, an optional description and optional ``more`` descriptions
    (other phrasings of the same topic, each embedded on its own; the label's cosine with a passage
    is the best of them)."""

    name: str
    description: str | None = None
    more: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        return f"{self.name}: {self.description}" if self.description else self.name

    def prompt_groups(self, style: str = "auto") -> list[list[str]]:
        """What is embedded for the label: groups of prompts, each group's embeddings averaged into
        one vector. ``name``: the name; ``description``: ``name: description``, one group per
        description; ``multi``: one group of several phrasings (the name, ``name: description``,
        "This text is about NAME."). ``auto``: ``description`` for a label with a description,
        ``multi`` for a bare name."""
        if style == "auto":
            style = "description" if self.description else "multi"
        if style == "name":
            return [[self.name]]
        if style == "description":
            return [[f"{self.name}: {d}"] for d in (self.description, *self.more) if d] or [[self.name]]
        return [[self.name, self.prompt, f"This text is about {self.name}."]]

    def prompts(self, style: str = "auto") -> list[str]:
        """Every prompt embedded for the label (:meth:`prompt_groups`, flattened)."""
        return [p for group in self.prompt_groups(style) for p in group]


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
    seconds: float = 0.0  # wall time spent on this document (classify_iter; not in the record)

    def to_record(self, key: str = "path") -> dict[str, Any]:
        fields = asdict(self)
        del fields["id"], fields["unknown_share"], fields["seconds"]
        if not self.passages:
            del fields["passages"]
        return {"schema_version": SCHEMA_VERSION, key: self.id, **fields}

    def to_dict(self) -> dict[str, Any]:
        """The record `longdoc classify --format jsonl` writes, keyed by ``id``."""
        return self.to_record("id")


def preset_names() -> list[str]:
    """The label presets shipped with longdoc (``--labels @NAME``)."""
    folder = resources.files("longdoc_cli").joinpath(_PRESETS)
    return sorted(f.name.removesuffix(".tsv") for f in folder.iterdir() if f.name.endswith(".tsv"))


def preset_labels(name: str) -> list[Label]:
    """``@NAME``: the shipped preset NAME (configs/labels/NAME.tsv), else the labels file at path NAME."""
    if name in preset_names():
        text = resources.files("longdoc_cli").joinpath(f"{_PRESETS}/{name}.tsv").read_text(encoding="utf-8")
        return parse_labels(text, f"@{name}")
    if not name or not Path(name).is_file():
        raise UsageError(
            f"--labels @{name}: no such label preset or file (presets: {', '.join(preset_names())})",
        )
    return read_labels_file(name)


def default_labels() -> list[Label]:
    """The default zero-shot topics: the ``topics`` preset (configs/labels/topics.tsv)."""
    return preset_labels(DEFAULT_PRESET)


def parse_labels(text: str, source: str) -> list[Label]:
    """One label per line, optionally ``label<TAB>description``, and optionally more descriptions in
    further tab-separated columns (other phrasings; empty columns skipped); blank lines and
    # comments skipped."""
    labels = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, *columns = line.split("\t")
        descriptions = [c.strip() for c in columns if c.strip()]
        labels.append(Label(name.strip(), descriptions[0] if descriptions else None, tuple(descriptions[1:])))
    return _checked(labels, source)


def read_labels_file(path: str) -> list[Label]:
    return parse_labels(read_text_file(path, "labels file"), path)


def load_labels(labels: Sequence[str] | None, labels_file: str | None) -> list[Label]:
    """Labels from ``--labels`` (names, or one ``@PRESET`` / ``@FILE``), ``--labels-file`` or, with
    neither, the default topics."""
    if labels and labels_file:
        raise UsageError("give either --labels or --labels-file, not both")
    if labels_file:
        return read_labels_file(labels_file)
    names = [x.strip() for x in labels or [] if x.strip()]
    if any(x.startswith("@") for x in names):
        if len(names) > 1:
            raise UsageError("--labels: a @preset stands alone, not in a list of labels")
        return preset_labels(names[0][1:])
    if names:
        return _checked([Label(x) for x in names], "--labels")
    return default_labels()


def _checked(labels: list[Label], source: str) -> list[Label]:
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{source}: label {dup!r} is given twice")
    if len(labels) < 2:
        raise UsageError(f"{source}: zero-shot classification needs at least two labels")
    return labels


def label_cosines(
    embeddings: torch.Tensor, label_embeddings: torch.Tensor, owner: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, L): each text's cosine with each label, the best of the label's vectors. ``embeddings``
    (n, d) and ``label_embeddings`` (P, d) are normalised; ``owner`` (P,) says whose each vector is
    (None: one vector per label, in order)."""
    cos = embeddings @ label_embeddings.T  # (n, P)
    if owner is None:
        return cos
    n_labels = int(owner.max()) + 1
    out = torch.full((cos.shape[0], n_labels), float("-inf"), dtype=cos.dtype)
    return out.scatter_reduce(1, owner.expand(cos.shape[0], -1), cos, "amax")


def zero_shot_probabilities(
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    label_embeddings: torch.Tensor,
    bias: torch.Tensor,
    vote: str = "soft",
    owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Passages -> one probability per label, summing to 1.

    ``embeddings`` (n, d) are the L2-normalised passages, ``weights`` (n,) their token counts,
    ``label_embeddings`` (P, d) normalised, ``owner`` (P,) the label of each (None: one per label;
    see :func:`label_cosines`), ``bias`` (L,) the labels' calibration cosines. ``soft``:
    the weighted mean of the passages' softmax(SCALE * (cos - bias)); ``soft-half``: the same over
    the half of the passages (at least one) whose best label is closest, so that passages with no
    clear topic (code, tables, boilerplate) do not vote (measured: not better over all documents);
    ``mean``: softmax of the weighted mean (cos - bias); ``centroid``: softmax of
    (cos(mean passage, label) - bias)."""
    w = weights.float()  # (n,)
    if vote == "soft-half":
        best = (label_cosines(embeddings, label_embeddings, owner) - bias).max(dim=-1).values  # (n,)
        keep = torch.zeros_like(w)
        keep[best.topk(max(1, len(best) // 2)).indices] = 1.0
        w, vote = w * keep, "soft"
    w = w / w.sum()
    if vote == "centroid":
        centre = F.normalize((embeddings * w[:, None]).sum(0), dim=-1)  # (d,)
        return torch.softmax(SCALE * (label_cosines(centre[None], label_embeddings, owner)[0] - bias), dim=-1)
    cos = label_cosines(embeddings, label_embeddings, owner) - bias  # (n, L)
    if vote == "mean":
        return torch.softmax(SCALE * (w @ cos), dim=-1)
    if vote == "soft":
        return w @ torch.softmax(SCALE * cos, dim=-1)
    raise UsageError(f"vote must be one of {', '.join(VOTES)}, not {vote!r}")


class Classifier:
    """Classifies documents with ``tm``: its head when it has one, else zero-shot over ``labels``.

    Zero-shot only: ``passage_tokens`` (the passage length, capped by the model's window),
    ``prompts`` (a :data:`PROMPT_STYLES` entry, see :meth:`Label.prompts`), ``calibrate`` (subtract
    each label's mean cosine with :data:`NEUTRAL_TEXTS`; None = when no label has a description) and
    ``vote`` (:func:`zero_shot_probabilities`; ``aggregate="max"`` takes each label's best passage)."""

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
        passage_tokens: int = PASSAGE_TOKENS,
        prompts: str = "auto",
        calibrate: bool | None = None,
        vote: str = "soft",
    ) -> None:
        # The command's values were checked with the config (inference.*); this guards library calls.
        if aggregate not in ("mean", "max", "first") or top_k < 1 or explain < 0 or not 0 < threshold < 1:
            raise ValueError(
                "aggregate must be mean, max or first, top_k >= 1, explain >= 0 and 0 < threshold < 1; "
                f"got {aggregate!r}, {top_k}, {explain}, {threshold}"
            )
        if prompts not in PROMPT_STYLES or vote not in VOTES:
            raise UsageError(f"prompts {prompts!r} / vote {vote!r}: unknown")
        self.tm, self.aggregate, self.top_k, self.threshold = tm, aggregate, top_k, threshold
        self.explain, self.batch_size, self.vote = explain, batch_size, vote
        self.multi_label = False
        if tm.head == "classification":
            if labels is not None:
                raise UsageError(
                    f"{tm.path} is a fine-tuned classifier with its own labels; --labels/--labels-file "
                    "apply only to zero-shot models",
                )
            id2label = tm.config.id2label or {i: f"LABEL_{i}" for i in range(tm.config.num_labels)}
            self.names = [id2label[i] for i in range(len(id2label))]
            self.multi_label = tm.config.problem_type == "multi_label_classification"
            self.label_embeddings = self.owner = None
            self.window = tm.max_length
            extra = tm.config.extra.get("longdoc") or {}
            self.doc_spec = extra.get("doc_features") if extra.get("classifier") == "doc-linear" else None
        else:
            self.doc_spec = None
            labels = labels or default_labels()
            self.names = [label.name for label in labels]
            # (P, d): one vector per prompt group; owner (P,): each vector's label
            self.label_embeddings, self.owner = label_embeddings(tm, labels, prompts, batch_size)
            self.bias = torch.zeros(len(labels))  # (L,)
            if calibrate is None:  # measured: it helps bare names, hurts described labels
                calibrate = not any(label.description for label in labels)
            if calibrate:
                self.bias = self._cosines(embed_texts(tm, NEUTRAL_TEXTS, batch_size)).mean(0)
            self.window = max(8, min(tm.max_length, passage_tokens))
        self.stride = window_overlap("--stride", stride, (self.window - 2) // 2, strict_stride)
        if self.zero_shot and not strict_stride:  # passages are read one after the other
            self.stride = 0

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str | Path = "default", labels: Sequence[str] | str | None = None, **options: Any
    ) -> Classifier:
        """The classifier `longdoc classify -m NAME_OR_DIR` runs: the model's ``longdoc.yaml`` (or
        ``config=``), ``overrides=["section.key=value"]`` as ``--set``, then config keys as keywords
        (``top_k=5``, ``aggregate="max"``, ``device="cuda:1"``; see
        :func:`longdoc_cli.api.from_pretrained`). ``labels``: zero-shot labels, as ``--labels``."""
        from ..api import from_pretrained

        return from_pretrained("classify", name_or_dir, labels, dict(options))

    def __call__(self, documents: str | Sequence[str]) -> Classification | list[Classification]:
        """Classify one document (a Classification) or a list of them (ids "0", "1", ...)."""
        if isinstance(documents, str):
            return self.classify([("0", documents)])[0]
        return self.classify([(str(i), text) for i, text in enumerate(documents)])

    @property
    def zero_shot(self) -> bool:
        return self.label_embeddings is not None

    def _cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Zero-shot: (n, L) normalised embeddings' cosines with the labels (uncalibrated)."""
        return label_cosines(embeddings, self.label_embeddings, self.owner)

    def classify(self, docs: Sequence[tuple[str, str]]) -> list[Classification]:
        """Classify (id, text) documents; all their windows are batched together by length."""
        if self.doc_spec is not None:
            return self._classify_documents(docs)
        return [self._run_result(d, t, run) for (d, t), run in zip(docs, self._run(docs), strict=True)]

    def classify_iter(self, docs: Iterable[tuple[str, str]]) -> Iterator[Classification]:
        """Classify (id, text) documents, yielding each result as soon as the forward passes that
        finish it are done: consecutive documents share passes up to one batch of windows (short
        documents are still batched together), a longer document runs alone and is not held back
        behind the next ones. Each result's ``seconds`` is its tokenization plus its share (by
        tokens) of the passes it took part in."""
        if self.doc_spec is not None:  # a doc-linear head: whole-document features, a document at a time
            for doc in docs:
                t0 = time.perf_counter()
                (result,) = self._classify_documents([doc])
                yield dataclasses.replace(result, seconds=time.perf_counter() - t0)
            return
        pending: list[tuple[str, str, _Run, list[Window], float]] = []
        n_pending = 0
        for doc_id, text in docs:
            t0 = time.perf_counter()
            run, windows = self._prepare(text)
            prepared = (doc_id, text, run, windows, time.perf_counter() - t0)
            if pending and n_pending + len(windows) > self.batch_size:
                yield from self._finish(pending)
                pending, n_pending = [], 0
            pending.append(prepared)
            n_pending += len(windows)
        if pending:
            yield from self._finish(pending)

    def _finish(self, pending: list[tuple[str, str, _Run, list[Window], float]]) -> Iterator[Classification]:
        t0 = time.perf_counter()
        self._fill([run for _, _, run, _, _ in pending], [ws for *_, ws, _ in pending])
        results = [self._run_result(doc_id, text, run) for doc_id, text, run, _, _ in pending]
        shared = time.perf_counter() - t0
        total_tokens = sum(sum(len(w) for w in ws) for *_, ws, _ in pending) or 1
        for result, (*_, ws, prep_s) in zip(results, pending, strict=True):
            yield dataclasses.replace(
                result, seconds=prep_s + shared * sum(len(w) for w in ws) / total_tokens
            )

    def passage_embeddings(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero-shot: per text, its passages' normalised embeddings (n, d) and token counts (n,),
        what :meth:`scores_from_passages` scores (benchmarks cache them)."""
        if not self.zero_shot:
            raise UsageError("passage embeddings are for zero-shot models only")
        out = []
        for run in self._run([("", t) for t in texts]):
            out.append((torch.stack([e for _, e in run.outputs]), torch.tensor([n for n, _ in run.outputs])))
        return out

    def scores_from_passages(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Zero-shot: a document's probabilities from :meth:`passage_embeddings`' output."""
        return self._aggregate(list(zip(weights.tolist(), embeddings, strict=True)))

    # -- scoring ---------------------------------------------------------------------------------

    def _document_probabilities(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        """A doc-linear head (docfeatures.py): per text its probabilities, token count and windows read."""
        from ..docfeatures import FeatureSpec, embedding_blocks, word_counts, word_rows
        from ..headfit import embed_windows

        spec = FeatureSpec.from_dict(self.doc_spec)
        tm, head = self.tm, self.tm.model.classifier
        limit = min(tm.tokenizer.max_tokens, tm.config.max_tokens)

        def embed(windows: list[Window]) -> torch.Tensor:
            return embed_windows(tm.model.longformer, tm.tokenizer, windows, self.batch_size)

        feats, n_tokens, n_windows = embedding_blocks(embed, tm.tokenizer, texts, spec, limit)
        if "words" in spec.blocks:
            feats["words"] = word_rows([word_counts(t) for t in texts], head.word_columns, head.word_idf)
        with torch.inference_mode():
            logits = head.doc_logits(feats)
        return self._probabilities(logits), n_tokens, n_windows

    def _classify_documents(self, docs: Sequence[tuple[str, str]]) -> list[Classification]:
        probs, n_tokens, n_windows = self._document_probabilities([t for _, t in docs])
        blocks = self.doc_spec["blocks"]
        whole = "mean" in blocks or "words" in blocks  # else only the first window(s) are read
        read = max((int(b[5:]) for b in blocks if b.startswith("first")), default=0)
        read = min(read, self.tm.tokenizer.max_tokens, self.tm.config.max_tokens) - 2
        tok = self.tm.tokenizer
        return [
            self._result(doc_id, text, p, n, w, not whole and n > read, tok.unknown_share(text, enc))
            for (doc_id, text), p, n, w in zip(docs, probs, n_tokens, n_windows, strict=True)
            for enc in [tok.encode(text)]
        ]

    def _prepare(self, text: str) -> tuple[_Run, list[Window]]:
        """A document's windows, and its run to be filled with their outputs."""
        tok = self.tm.tokenizer
        enc = tok.encode(text)
        doc_windows = tok.document_windows(enc, self.window, self.stride)
        if self.aggregate == "first":  # truncation, reported as such
            doc_windows = doc_windows[:1]
        spans = [(w.doc_start, w.doc_end) for w in doc_windows]
        return _Run(len(enc), tok.unknown_share(text, enc), not covers(spans, len(enc)), []), doc_windows

    def _run(self, docs: Sequence[tuple[str, str]]) -> list[_Run]:
        """Every document's run, its windows all batched together by length."""
        prepared = [self._prepare(text) for _, text in docs]
        runs = [run for run, _ in prepared]
        self._fill(runs, [windows for _, windows in prepared])
        return runs

    def _fill(self, runs: Sequence[_Run], doc_windows: Sequence[Sequence[Window]]) -> None:
        """Run the documents' windows (one stream, batched by length) into their runs' outputs."""
        windows = [w for ws in doc_windows for w in ws]
        owner = [d for d, ws in enumerate(doc_windows) for _ in ws]
        for i, out in run_windows(self.tm, windows, self.batch_size):
            runs[owner[i]].outputs.append((len(windows[i]), self._window_output(out)))

    def _run_result(self, doc_id: str, text: str, run: _Run) -> Classification:
        """A document's result from its filled run: the windows' outputs aggregated."""
        probs = self._aggregate(run.outputs)
        return self._result(doc_id, text, probs, run.n_tokens, len(run.outputs), run.truncated, run.unknown)

    def _window_output(self, out: torch.Tensor) -> torch.Tensor:
        """Zero-shot: the window's normalised embedding (d,); head: its logits."""
        if self.zero_shot:
            return F.normalize(pool(out, self.tm.pooling), dim=-1)
        return out

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Head logits -> probabilities: sigmoid (multi-label) or softmax."""
        return torch.sigmoid(scores) if self.multi_label else torch.softmax(scores, dim=-1)

    def _aggregate(self, scored: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Windows -> one probability per label. Zero-shot: the passages' vote (or, with max, each
        label's best passage); head: the windows' logits (token-weighted mean, or max), normalised,
        as `longdoc evaluate` and training's dev evaluation do."""
        weights = torch.tensor([n for n, _ in scored], dtype=torch.float32)
        stack = torch.stack([s for _, s in scored])  # (n_windows, d) zero-shot, else (n_windows, L)
        if self.zero_shot:
            if self.aggregate == "max":
                cos = self._cosines(stack) - self.bias  # (n, L)
                return torch.softmax(SCALE * cos.max(dim=0).values, dim=-1)
            return zero_shot_probabilities(
                stack, weights, self.label_embeddings, self.bias, self.vote, self.owner
            )
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
        """The passages that most support ``label``: each passage scored on its own (its probability of
        the label: zero-shot among the labels, else the head's)."""
        spans = passage_spans(text)
        if not spans:
            return []
        texts = [text[s:e] for s, e in spans]
        if self.zero_shot:
            cos = self._cosines(embed_texts(self.tm, texts, self.batch_size)) - self.bias
            scores = torch.softmax(SCALE * cos, dim=-1)[:, label]
        elif self.doc_spec is not None:  # each passage scored as a document of its own
            scores = self._document_probabilities(texts)[0][:, label]
        else:
            tok = self.tm.tokenizer
            windows = [tok.document_windows(tok.encode(t), self.tm.max_length, self.stride)[0] for t in texts]
            scores = torch.zeros(len(texts))
            for i, out in run_windows(self.tm, windows, self.batch_size):
                scores[i] = self._probabilities(out)[label]
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


@dataclass
class _Run:
    """One document's pass: token count, unknown-token share, truncation, (tokens, output) per window."""

    n_tokens: int
    unknown: float
    truncated: bool
    outputs: list[tuple[int, torch.Tensor]]


def label_embeddings(
    tm: TaskModel, labels: Sequence[Label], style: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, d) normalised, one vector per prompt group of each label (:meth:`Label.prompt_groups`:
    the mean of the group's prompt embeddings), and (P,) the index of each vector's label."""
    groups = [(i, group) for i, label in enumerate(labels) for group in label.prompt_groups(style)]
    flat = embed_texts(tm, [p for _, group in groups for p in group], batch_size)
    chunks = flat.split([len(group) for _, group in groups])
    vectors = F.normalize(torch.stack([chunk.mean(0) for chunk in chunks]), dim=-1)
    return vectors, torch.tensor([i for i, _ in groups])
