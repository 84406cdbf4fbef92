"""Metrics and evaluation: classification (accuracy, macro-F1, per-label P/R/F1, confusion matrix,
by document length) and extractive QA (SQuAD EM/F1, also for answers beyond the first 512 tokens).

The metric functions are pure; ``predict_*`` run a model over windows (shared with `train`'s dev
evaluation); ``evaluate_model`` loads a model directory and a data file and returns an ``EvalReport``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Flags, LongdocConfig, Run, resolve_run
from .errors import LongdocError
from .timing import RunStats, Stopwatch, dtype_label

if TYPE_CHECKING:
    from .data import LabelledDoc, QAExample
    from .tokenize import DocumentTokenizer

LENGTH_BUCKETS = ((512, "<=512"), (4096, "<=4096"), (None, ">4096"))  # tokens, specials included
FAR_ANSWER_TOKENS = 512  # QA: answers starting at or beyond this context token are "far"


# ----------------------------------------------------------------------------------------------
# Classification metrics


@dataclass(frozen=True)
class LabelScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    n: int
    accuracy: float  # exact set match for multi-label
    macro_f1: float
    micro_f1: float
    per_label: dict[str, LabelScores]
    confusion: list[list[int]] | None  # rows = gold, columns = predicted (single-label only)
    labels: list[str]
    by_length: dict[str, dict[str, float]] = field(default_factory=dict)  # bucket -> {n, accuracy, macro_f1}

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "micro_f1": self.micro_f1}


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def classification_metrics(
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    labels: Sequence[str],
    lengths: Sequence[int] | None = None,
) -> ClassificationMetrics:
    """Metrics over label sets (one label each for single-label data). Macro-F1 averages over the
    labels that occur in gold or predictions."""
    labels = list(labels)
    tp, fp, fn = collections.Counter(), collections.Counter(), collections.Counter()
    exact = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = set(g), set(p)
        exact += gs == ps
        for x in gs & ps:
            tp[x] += 1
        for x in ps - gs:
            fp[x] += 1
        for x in gs - ps:
            fn[x] += 1
    per_label = {}
    for x in labels:
        prec = tp[x] / (tp[x] + fp[x]) if tp[x] + fp[x] else 0.0
        rec = tp[x] / (tp[x] + fn[x]) if tp[x] + fn[x] else 0.0
        per_label[x] = LabelScores(prec, rec, _f1(prec, rec), tp[x] + fn[x])
    seen = [x for x in labels if tp[x] + fp[x] + fn[x]]
    macro = sum(per_label[x].f1 for x in seen) / len(seen) if seen else 0.0
    TP, FP, FN = sum(tp.values()), sum(fp.values()), sum(fn.values())
    micro = _f1(TP / (TP + FP) if TP + FP else 0.0, TP / (TP + FN) if TP + FN else 0.0)
    confusion = None
    if all(len(g) == 1 for g in gold) and all(len(p) == 1 for p in pred):
        index = {x: i for i, x in enumerate(labels)}
        confusion = [[0] * len(labels) for _ in labels]
        for g, p in zip(gold, pred, strict=True):
            confusion[index[g[0]]][index[p[0]]] += 1
    n = len(gold)
    out = ClassificationMetrics(n, exact / n if n else 0.0, macro, micro, per_label, confusion, labels)
    if lengths is not None:
        for name, members in _buckets(lengths).items():
            sub = classification_metrics([gold[i] for i in members], [pred[i] for i in members], labels)
            out.by_length[name] = {"n": len(members), "accuracy": sub.accuracy, "macro_f1": sub.macro_f1}
    return out


def _buckets(lengths: Sequence[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(lengths):
        name = next(b for limit, b in LENGTH_BUCKETS if limit is None or n <= limit)
        out.setdefault(name, []).append(i)
    return {b: out[b] for _, b in LENGTH_BUCKETS if b in out}


# ----------------------------------------------------------------------------------------------
# QA metrics: the official SQuAD v1.1 evaluation script's normalisation


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:  # SQuAD 2.0: both empty = match
        return float(p == t)
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def _best(metric, prediction: str, truths: Sequence[str]) -> float:
    return max(metric(prediction, t) for t in truths) if truths else float(not prediction.strip())


@dataclass
class QAMetrics:
    n: int
    exact_match: float  # percent, as the SQuAD script
    f1: float
    far_n: int = 0  # answers starting beyond the first 512 context tokens
    far_exact_match: float | None = None
    far_f1: float | None = None

    def summary(self) -> dict[str, float]:
        return {"exact_match": self.exact_match, "f1": self.f1}


def qa_metrics(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], far: Sequence[bool] | None = None
) -> QAMetrics:
    """EM and F1 in percent, max over the gold answers of each question."""
    em = [_best(exact_match_score, p, a) for p, a in zip(predictions, answers, strict=True)]
    f1 = [_best(f1_score, p, a) for p, a in zip(predictions, answers, strict=True)]
    n = len(em)
    out = QAMetrics(n, 100 * sum(em) / n if n else 0.0, 100 * sum(f1) / n if n else 0.0)
    if far is not None:
        idx = [i for i, x in enumerate(far) if x]
        out.far_n = len(idx)
        if idx:
            out.far_exact_match = 100 * sum(em[i] for i in idx) / len(idx)
            out.far_f1 = 100 * sum(f1[i] for i in idx) / len(idx)
    return out


# ----------------------------------------------------------------------------------------------
# Running a model


def predict_classification(
    model,
    tokenizer: DocumentTokenizer,
    docs: Sequence[LabelledDoc],
    cfg: LongdocConfig,
    on_progress: Callable[[int, int, Any], None] | None = None,
) -> tuple[list[tuple[str, ...]], list[int]]:
    """Predicted label sets and token counts (specials included) per document, exactly as `longdoc
    classify` predicts them (tasks.classify.Classifier: windows, ``inference.aggregate``, threshold).
    ``on_progress(done, total, result)`` after each document (then documents stream as in
    `classify`: Classifier.classify_iter)."""
    from .tasks.classify import Classifier
    from .tasks.runner import in_memory_task_model

    tm = in_memory_task_model(model, tokenizer, "classification", cfg.model.max_length)
    inf = cfg.inference
    classifier = Classifier(tm, aggregate=inf.aggregate, threshold=inf.threshold, batch_size=inf.batch_size,
                            stride=cfg.tokenization.stride)  # fmt: skip
    model.eval()
    pairs = [(str(i), doc.text) for i, doc in enumerate(docs)]
    if on_progress is None:
        results = classifier.classify(pairs)
    else:
        results = []
        for result in classifier.classify_iter(pairs):
            results.append(result)
            on_progress(len(results), len(pairs), result)
    return [tuple(r.labels) for r in results], [r.n_tokens + 2 for r in results]


def predict_qa(
    model, tokenizer: DocumentTokenizer, examples: Sequence[QAExample], cfg: LongdocConfig
) -> list[str]:
    """The best answer (or "" for none) to each example, exactly as `longdoc qa` answers it
    (tasks.qa.QuestionAnswerer: windows with stride, n-best spans merged, null threshold)."""
    from .tasks.qa import QuestionAnswerer
    from .tasks.runner import in_memory_task_model

    tm = in_memory_task_model(model, tokenizer, "qa", cfg.model.max_length)
    inf, tok = cfg.inference, cfg.tokenization
    answerer = QuestionAnswerer(
        tm, top_k=1, n_best=inf.n_best, max_answer_length=inf.max_answer_length,
        null_threshold=inf.null_threshold, batch_size=inf.batch_size, doc_stride=tok.stride,
        max_question_length=tok.max_question_length, min_score=inf.min_score,
    )  # fmt: skip
    model.eval()
    out = []
    for ex in examples:
        (result,) = answerer.answer(ex.id, ex.context, [ex.question])
        out.append(result.answers[0].text if result.answers else "")
    return out


def answer_token_index(tokenizer: DocumentTokenizer, ex: QAExample, cache: dict | None = None) -> int | None:
    """Index of the context token where the first gold answer starts (None when no answer)."""
    if not ex.answers:
        return None
    enc = (cache or {}).get(ex.context) or tokenizer.encode(ex.context)
    start = ex.starts[0]
    for i, (_, b) in enumerate(enc.offsets):
        if b > start:
            return i
    return len(enc.offsets)


# ----------------------------------------------------------------------------------------------
# Whole evaluation of a model directory


@dataclass
class EvalReport:
    task: str
    model: str
    data: str
    n: int
    metrics: dict[str, Any]  # flat numbers: accuracy/macro_f1 or exact_match/f1 (+ far_*)
    classification: ClassificationMetrics | None = None
    qa: QAMetrics | None = None
    skipped: list[str] = field(default_factory=list)
    not_in_context: list[str] = field(default_factory=list)
    run: RunStats | None = None  # what was processed, load and compute time (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["run"]
        return out


def evaluate_model(
    model_name: str,
    data_path: str,
    cfg: LongdocConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    flags: Flags | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Score ``model_name`` (a directory saved by `train`, or any -m model) on ``data_path``. The
    config is ``cfg`` (a config or a YAML file), else the model's ``longdoc.yaml``, else the
    defaults, plus ``overrides`` and ``flags`` (:func:`config.resolve_run`). QA runs exactly as
    `longdoc qa` does (tasks.qa.QuestionAnswerer), so a plain encoder such as the default model is
    scored zero-shot; classification too, against the data's own label set.
    ``on_progress(done, total)`` after each document; the report's ``run`` has the timings."""
    stats = RunStats("evaluate")
    watch = Stopwatch()
    from .data import iter_rows, load_classification
    from .model import LongformerForSequenceClassification, load_hf_config
    from .runtime import pick_device, pick_dtype
    from .tokenize import DocumentTokenizer

    def guess_task() -> str:  # a plain encoder without a config: the data says which task
        _, row = next(iter(iter_rows(data_path, "auto", skipped=[])), (None, {}))
        return "qa" if "question" in row and "context" in row else "classify"

    run = resolve_run(None, config=cfg, model=model_name, overrides=overrides, flags=flags,
                      guess_task=guess_task)  # fmt: skip
    cfg, model_dir = run.config, run.model_dir
    assert model_dir is not None
    task = cfg.task
    if task == "qa":
        return _evaluate_qa(run, data_path, stats, watch, on_progress)
    config = load_hf_config(model_dir).with_attention_window(cfg.model.attention_window)
    config = config.with_attention_dilation(cfg.model.attention_dilation)
    if config.head == "encoder":  # the default model: zero-shot over the data's own labels
        return _evaluate_zero_shot(run, data_path, stats, watch, on_progress)
    if config.head != "classification":
        raise LongdocError(f"{model_dir}: has no classification head; fine-tune one with `longdoc train`")
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device, "classify")  # as `classify` runs it
    model = LongformerForSequenceClassification.from_pretrained(model_dir, config=config)
    model = model.to(device=device, dtype=dtype)
    cfg.model.max_length = min(cfg.model.max_length, model.config.max_tokens)
    tokenizer = DocumentTokenizer.from_dir(model_dir, max_tokens=cfg.model.max_length)
    data = load_classification(data_path, cfg.data)
    known = set((model.config.id2label or {}).values())
    unknown = sorted({x for d in data.docs for x in d.labels} - known)
    if unknown:
        raise LongdocError(
            f"{data_path}: labels the model does not know: {', '.join(map(repr, unknown[:5]))}"
        )
    stats.load_s, stats.device, stats.dtype = watch.restart(), str(device), dtype_label(dtype)

    def progress(done: int, total: int, result: Any) -> None:
        stats.documents, stats.windows, stats.tokens = (
            done,
            stats.windows + result.n_windows,
            stats.tokens + result.n_tokens,
        )
        if on_progress is not None:
            on_progress(done, total)

    preds, lengths = predict_classification(model, tokenizer, data.docs, cfg, progress)
    stats.compute_s = watch.seconds
    labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
    m = classification_metrics([d.labels for d in data.docs], preds, labels, lengths)
    return EvalReport(
        task, str(model_dir), data_path, m.n, m.summary(), classification=m, skipped=data.skipped, run=stats
    )


def _evaluate_zero_shot(
    resolved: Run,
    data_path: str,
    run: RunStats,
    watch: Stopwatch,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """A plain encoder scored as `longdoc classify --labels ...` runs it (api.classifier_for_run),
    the labels being the data's own label set (sorted): the zero-shot baseline to measure before
    training."""
    from .api import classifier_for_run
    from .data import load_classification
    from .tasks.classify import Label

    cfg, model_dir = resolved.config, resolved.model_dir
    data = load_classification(data_path, cfg.data)
    names = sorted({x for d in data.docs for x in d.labels})
    if len(names) < 2:
        raise LongdocError(f"{data_path}: zero-shot evaluation needs at least two labels in the data")
    classifier = classifier_for_run(resolved, [Label(x) for x in names])
    tm = classifier.tm
    run.load_s, run.device, run.dtype = watch.restart(), str(tm.device), dtype_label(tm.dtype)
    results = []
    for result in classifier.classify_iter((str(i), doc.text) for i, doc in enumerate(data.docs)):
        results.append(result)
        run.documents, run.windows, run.tokens = (
            len(results),
            run.windows + result.n_windows,
            run.tokens + result.n_tokens,
        )
        if on_progress is not None:
            on_progress(len(results), len(data.docs))
    run.compute_s = watch.seconds
    preds, lengths = [tuple(r.labels) for r in results], [r.n_tokens + 2 for r in results]
    m = classification_metrics([d.labels for d in data.docs], preds, names, lengths)
    return EvalReport(
        "classify", str(model_dir), data_path, m.n, m.summary(), classification=m, skipped=data.skipped,
        run=run,
    )  # fmt: skip


def _evaluate_qa(
    resolved: Run,
    data_path: str,
    run: RunStats,
    watch: Stopwatch,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """QA scored as `longdoc qa` runs it (api.answerer_for_run: the best answer per question)."""
    from .api import answerer_for_run
    from .data import load_qa

    cfg, model_dir = resolved.config, resolved.model_dir
    answerer = answerer_for_run(resolved)
    tm = answerer.tm
    qa = load_qa(data_path, cfg.data)
    by_context: dict[str, list[int]] = {}  # one pass per document: encoded once, all its questions
    for i, ex in enumerate(qa.examples):
        by_context.setdefault(ex.context, []).append(i)
    predictions, cache = [""] * len(qa.examples), {}
    run.load_s, run.device, run.dtype = watch.restart(), str(tm.device), dtype_label(tm.dtype)
    for context, idx in by_context.items():
        results = answerer.answer(qa.examples[idx[0]].id, context, [qa.examples[i].question for i in idx])
        for i, result in zip(idx, results, strict=True):
            predictions[i] = result.answers[0].text if result.answers else ""
            run.questions, run.windows = run.questions + 1, run.windows + result.n_windows
        cache[context] = tm.tokenizer.encode(context)
        run.documents, run.tokens = run.documents + 1, run.tokens + len(cache[context])
        if on_progress is not None:
            on_progress(run.documents, len(by_context))
    run.compute_s = watch.seconds
    far = [(answer_token_index(tm.tokenizer, ex, cache) or 0) >= FAR_ANSWER_TOKENS for ex in qa.examples]
    m = qa_metrics(predictions, [ex.answers for ex in qa.examples], far)
    flat = {**m.summary(), "far_n": m.far_n, "far_exact_match": m.far_exact_match, "far_f1": m.far_f1}
    return EvalReport(
        "qa", str(model_dir), data_path, m.n, flat, qa=m, skipped=qa.skipped,
        not_in_context=qa.not_in_context, run=run,
    )  # fmt: skip
