"""Fine-tuning: one loop for document classification and extractive QA, driven by a LongdocConfig.

AdamW (no decay on biases and LayerNorms), linear warm-up then linear decay, gradient clipping and
accumulation, optional gradient checkpointing, bf16 autocast on CUDA, seeded data order; dev
evaluation every ``train.eval_every`` optimizer steps with early stopping on ``cfg.metric``.
Outputs (Hugging Face-format directories that ``classify``/``qa`` and transformers load):

    OUT/best/   the best dev checkpoint: config.json, model.safetensors, tokenizer files,
                longdoc.yaml (the resolved config), README.md (model card)
    OUT/last/   the latest checkpoint, plus trainer_state.pt (optimizer, scheduler, RNG, step) for --resume
    OUT/train_log.jsonl   one JSON object per optimizer step and per evaluation

Windows. Classification trains on the *first* window of each document (``model.max_length`` tokens,
the part that carries titles and introductions) and evaluates on every window, aggregated as
``inference.aggregate`` says, exactly as `classify` predicts. QA trains on every (question, context
window) feature, labelled with the answer's token span, or with the [CLS] (position 0) no-answer
target when the answer is not wholly inside the window (as Hugging Face does).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); each rank takes every WORLD_SIZE-th example of the shared seeded order,
rank 0 evaluates, logs and saves. The library never prints: progress goes to ``on_event``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (
    LOG_FILE,
    STATE_FILE,
    claimed_output_dir,
    refuse_inputs_in_outputs,
    save_checkpoint,
)
from .config import ConfigError, LongdocConfig, config_to_yaml
from .envvars import check_environment, env
from .errors import LongdocError, UsageError
from .modelcard import licence_of

Event = dict[str, Any]


@dataclass
class TrainResult:
    output_dir: Path
    task: str
    metric: str
    best_metric: float | None
    best_step: int | None
    steps: int
    total_steps: int
    stopped_early: bool
    n_train: int
    n_dev: int
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations
    notes: list[str] = field(default_factory=list)  # skipped records, answers not in context, ...


# ----------------------------------------------------------------------------------------------
# Features: what one training example becomes


@dataclass(frozen=True)
class Feature:
    window: Any  # tokenize.Window
    target: Any  # classification: label index or multi-hot list; QA: (start, end) token indices


def classification_target(doc, label_index: dict[str, int], multi: bool) -> Any:
    """A label index, or a multi-hot list with ``multi``."""
    if not multi:
        return label_index[doc.labels[0]]
    target = [0.0] * len(label_index)
    for x in doc.labels:
        target[label_index[x]] = 1.0
    return target


def training_windows(doc, tokenizer, cfg: LongdocConfig) -> list:
    """The windows of one document that training uses (``train.windows``, ``train.max_windows``)."""
    from .headfit import pick_windows

    windows = tokenizer.document_windows(
        tokenizer.encode(doc.text), cfg.model.max_length, cfg.tokenization.stride
    )
    return pick_windows(windows, cfg.train.windows, cfg.train.max_windows)


def classification_features(docs, tokenizer, cfg: LongdocConfig, label_index: dict[str, int], multi: bool):
    """One feature per training window, each with its document's label(s)."""
    feats = []
    for doc in docs:
        target = classification_target(doc, label_index, multi)
        feats.extend(Feature(w, target) for w in training_windows(doc, tokenizer, cfg))
    return feats


def answer_span(window, start_char: int, end_char: int) -> tuple[int, int]:
    """Token span of [start_char, end_char) inside a window, or (0, 0) when not wholly inside it."""
    ctx = [i for i, o in enumerate(window.offsets) if o is not None]
    if not ctx or start_char < window.offsets[ctx[0]][0] or end_char > window.offsets[ctx[-1]][1]:
        return 0, 0
    start = next((i for i in ctx if window.offsets[i][1] > start_char), None)
    end = next((i for i in reversed(ctx) if window.offsets[i][0] < end_char), None)
    if start is None or end is None or end < start:
        return 0, 0
    return start, end


def qa_features(examples, tokenizer, cfg: LongdocConfig) -> list[Feature]:
    from .data import question_windows

    feats = []
    for ex, windows in question_windows(examples, tokenizer, cfg):
        for w in windows:
            if ex.answers:
                s = ex.starts[0]
                feats.append(Feature(w, answer_span(w, s, s + len(ex.answers[0]))))
            else:
                feats.append(Feature(w, (0, 0)))
    return feats


# ----------------------------------------------------------------------------------------------
# Setup helpers


def _dist_info() -> tuple[int, int, int]:
    check_environment(torchrun=True)
    return env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0)


def _changed_keys(old_yaml: str, new_yaml: str) -> str:
    """The dotted keys whose values differ between two saved configs, e.g. "train.lr: 0.0001 -> 0.5"."""
    import yaml

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix: data}
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    old, new = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k.rstrip('.')}: {old.get(k)} -> {new.get(k)}" for k in keys[:5]) or "formatting"


def _looks_like_wrong_task(path: str, cfg: LongdocConfig) -> None:
    from .data import iter_rows

    skipped: list[str] = []
    try:
        _, row = next(iter(iter_rows(path, cfg.data.format, skipped=skipped)))
    except StopIteration:
        why = f" (the first bad one: {skipped[0]})" if skipped else ""
        raise LongdocError(f"{path}: no valid records{why}") from None
    d = cfg.data
    is_qa = d.question_key in row and d.context_key in row
    is_cls = d.text_key in row and d.label_key in row
    if cfg.task == "classify" and is_qa and not is_cls:
        raise ConfigError(
            f"task is 'classify' but {path} holds QA records (question/context); use --set task=qa"
        )
    if cfg.task == "qa" and is_cls and not is_qa:
        raise ConfigError(f"task is 'qa' but {path} holds labelled documents; use --set task=classify")


def load_datasets(cfg: LongdocConfig):
    """(train items, dev items, info) for the task, with the dev split and bad-record notes."""
    from .data import load_classification, load_qa, split_dev

    d = cfg.data
    if not d.train:
        raise ConfigError("data.train: no training file; set it in the config or with --set data.train=PATH")
    _looks_like_wrong_task(d.train, cfg)
    notes: list[str] = []
    if cfg.task == "classify":
        tr = load_classification(d.train, d)
        dev = load_classification(d.dev, d) if d.dev else None
        notes += [f"skipped {s}" for s in tr.skipped + (dev.skipped if dev else [])]
        if dev is None:
            grouped = (lambda doc: doc.group) if d.group_key else None
            train_items, dev_items = split_dev(tr.docs, cfg.dev_fraction, cfg.train.seed, group=grouped)
        else:
            train_items, dev_items = tr.docs, dev.docs
        labels = sorted(set(tr.labels) | set(dev.labels if dev else []))
        multi = tr.multi_label or bool(dev and dev.multi_label)
        if len(labels) < 2:
            raise LongdocError(f"{d.train}: needs at least two distinct labels, found {labels}")
        return train_items, dev_items, {"labels": labels, "multi_label": multi, "notes": notes}
    tr = load_qa(d.train, d)
    dev = load_qa(d.dev, d) if d.dev else None
    notes += [f"skipped {s}" for s in tr.skipped + (dev.skipped if dev else [])]
    for q in (tr, dev):
        if q is None:
            continue
        notes += [f"{s} (not trained on; scored against it in evaluation)" for s in q.not_in_context]
        if q.realigned:
            notes.append(f"{q.realigned} answer_start offsets did not match their text and were realigned")
    if dev is None:
        train_items, dev_items = split_dev(
            tr.examples, cfg.dev_fraction, cfg.train.seed, group=lambda e: e.group
        )
    else:
        train_items, dev_items = tr.examples, dev.examples
    train_items = [e for e in train_items if e.in_context]
    return train_items, dev_items, {"notes": notes}


def build_model(cfg: LongdocConfig, source_dir: Path, info: dict[str, Any]):
    """The task model for the source directory: its encoder (and its head when it is the same task
    with the same labels), a fresh head otherwise; ``cfg.model.attention_window`` applied."""
    from .model import (
        DOC_LINEAR,
        MEAN_LINEAR,
        LongformerEncoder,
        LongformerForQuestionAnswering,
        LongformerForSequenceClassification,
        load_hf_config,
    )

    hf = load_hf_config(source_dir)
    source_arch = (hf.extra.get("architectures") or [""])[0]
    source_kind = hf.classifier
    extra = {k: v for k, v in hf.extra.items() if k != "architectures"}
    if cfg.task == "classify":
        labels = dict(enumerate(info["labels"]))
        same_head = source_arch == "LongformerForSequenceClassification" and hf.id2label == labels
        problem = "multi_label_classification" if info["multi_label"] else "single_label_classification"
        head = {"id2label": labels, "num_labels": len(labels), "problem_type": problem}
        cls = LongformerForSequenceClassification
    else:
        same_head = source_arch == "LongformerForQuestionAnswering"
        head = {"id2label": None, "num_labels": 2, "problem_type": None}
        cls = LongformerForQuestionAnswering
    if cfg.task == "classify":  # the head kind is this run's, whatever the source's (model.py)
        ours = {k: v for k, v in (extra.get("longdoc") or {}).items()
                if k not in ("classifier", "token_features", "doc_features")}  # fmt: skip
        if cfg.frozen:  # a linear head on mean-pooled windows (headfit.py; doc features: replaced later)
            ours.update(classifier=MEAN_LINEAR, token_features=cfg.train.token_features)
        if ours:
            extra["longdoc"] = ours
        else:
            extra.pop("longdoc", None)
    hf = dataclasses.replace(hf, **head, extra=extra).with_attention_window(cfg.model.attention_window)
    hf = hf.with_attention_dilation(cfg.model.attention_dilation)
    if cfg.task == "classify":
        same_head = same_head and hf.classifier == source_kind and source_kind != DOC_LINEAR
    if cfg.model.max_length > hf.max_tokens:
        raise ConfigError(
            f"model.max_length: {cfg.model.max_length} exceeds the {hf.max_tokens} tokens the model's "
            f"positions allow ({source_dir})"
        )
    if same_head:
        return cls.from_pretrained(source_dir, config=hf).train()
    model = cls(hf)
    encoder = LongformerEncoder.from_pretrained(source_dir, config=hf)
    model.longformer.load_state_dict(encoder.state_dict(), strict=False)
    return model.train()


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _use_bf16(cfg: LongdocConfig, device) -> bool:
    import torch

    if cfg.train.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(cfg.train.bf16)


def _cv_groups(cfg: LongdocConfig, items) -> list[str] | None:
    """The frozen heads' cross-validation groups: each training document's ``data.group_key`` value
    (None without the key: every document alone)."""
    return [d.group for d in items] if cfg.data.group_key else None


def _groups_record(groups: list[str] | None) -> dict[str, int]:
    """The train log's ``cv_groups`` (how many groups the folds kept whole), when there are groups."""
    return {} if groups is None else {"cv_groups": len(set(groups))}


def _embed_bf16(cfg: LongdocConfig, device) -> bool:
    """Whether a frozen encoder's embedding pass (the fast recipes) runs in bf16. ``train.bf16: auto``
    follows ``--dtype auto`` for classification: besides a GPU with bf16, a CPU that computes bf16
    natively (AMX or AVX512-BF16), where the fitted head then meets the bf16 embeddings it will be
    applied to (runtime.auto_dtype; its quality gate passed for classify)."""
    if cfg.train.bf16 == "auto" and device.type == "cpu":
        from .runtime import auto_dtype

        return auto_dtype("cpu", "classify")[0] == "bf16"
    return _use_bf16(cfg, device)


def _loss(model, batch, targets, task: str, multi: bool, label_weights=None):
    """The batch's loss; ``label_weights`` (classification): per-label weights of the cross-entropy
    (single-label), or of the positive terms (multi-label)."""
    import torch
    import torch.nn.functional as F

    if task == "classify":
        logits = model(**batch).float()
        lw = None if label_weights is None else torch.tensor(label_weights, device=logits.device)
        if multi:
            y = torch.tensor(targets, device=logits.device)
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=lw)
        y = torch.tensor(targets, device=logits.device)
        if lw is None:
            return F.cross_entropy(logits, y)
        # Not renormalised per batch (that would cancel the weights of a one-class batch): the
        # balanced weights average 1 over the training windows, so the loss keeps its scale.
        return (F.cross_entropy(logits, y, reduction="none") * lw[y]).mean()
    start, end = model(**batch)
    s = torch.tensor([t[0] for t in targets], device=start.device)
    e = torch.tensor([t[1] for t in targets], device=start.device)
    return (F.cross_entropy(start.float(), s) + F.cross_entropy(end.float(), e)) / 2


def _class_balance_notes(cfg: LongdocConfig, doc_targets: list[Any], info: dict[str, Any]) -> None:
    """The skew warning (train.class_weight), added to the run's notes, which the CLI shows."""
    from .headfit import label_counts, skew_warning

    counts = label_counts(doc_targets, len(info["labels"]))
    info["label_counts"] = counts
    warning = skew_warning(counts, info["labels"], cfg.train.class_weight)
    if warning:
        info["notes"].append(warning)


def _feature_label_weights(cfg: LongdocConfig, targets: list[Any], n_labels: int, multi: bool):
    """Per-label loss weights for the whole-model loop (from the training windows' labels), or None."""
    from .headfit import _label_weights, label_counts, resolve_class_weight

    counts = label_counts(targets, n_labels)
    balanced = resolve_class_weight(cfg.train.class_weight, counts) == "balanced"
    return _label_weights(counts, balanced, multi, len(targets))


def _train_frozen(cfg, out, model, tokenizer, source_dir, train_items, dev_items, info, doc_targets,
                  device, emit) -> TrainResult:  # fmt: skip
    """``train.freeze_encoder``: the head fitted on window embeddings computed once (headfit.py);
    best/ and last/ hold the same model (there are no steps to resume)."""
    import torch

    from .headfit import fit_head

    if _dist_info()[1] > 1:
        raise ConfigError(
            "train.freeze_encoder: the frozen-encoder fit runs in one process; run it without torchrun"
        )
    if cfg.train.head_features != "window":
        model, record = _fit_document_head(cfg, model, tokenizer, train_items, dev_items, info, doc_targets,
                                           device, emit)  # fmt: skip
        return _finish_frozen(cfg, out, model, tokenizer, source_dir, train_items, dev_items, info, record,
                              emit)  # fmt: skip
    if cfg.train.windows == "first" and cfg.inference.aggregate != "first":
        info["notes"].append(
            f"train.windows is first but inference.aggregate is {cfg.inference.aggregate}: the head is "
            "fitted on first windows and will predict from all of them (inference.aggregate=first matches)"
        )
    docs_windows = [training_windows(d, tokenizer, cfg) for d in train_items]
    n_windows = sum(len(w) for w in docs_windows)
    bs = cfg.inference.batch_size
    total = math.ceil(n_windows / bs)
    emit({"event": "start", "total_steps": total, "step": 0, "n_train": len(train_items),
          "n_dev": len(dev_items), "n_features": n_windows, "device": str(device),
          "bf16": _embed_bf16(cfg, device), "world_size": 1, "notes": info["notes"],
          "frozen": True})  # fmt: skip
    t0 = time.perf_counter()

    def on_batch(done: int, n: int) -> None:
        emit({"event": "embed", "step": done, "total_steps": n, "elapsed_s": time.perf_counter() - t0})

    groups = _cv_groups(cfg, train_items)
    fit = fit_head(
        model.longformer, tokenizer, docs_windows, doc_targets, len(info["labels"]),
        multi=bool(info.get("multi_label")), class_weight=cfg.train.class_weight, l2=cfg.train.head_l2,
        threshold=cfg.inference.threshold, batch_size=bs, seed=cfg.train.seed,
        bf16=_embed_bf16(cfg, device), token_features=cfg.train.token_features,
        specials=[tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id], on_batch=on_batch, groups=groups,
    )  # fmt: skip
    head = model.classifier
    with torch.no_grad():
        head.out_proj.weight.copy_(fit.head.weight)
        head.out_proj.bias.copy_(fit.head.bias)
        if head.token_proj is not None:
            head.token_proj.weight.copy_(fit.token_proj_weight(model.config.vocab_size))
            head.token_idf.copy_(fit.idf)
    model.eval()
    record = {"step": 1, "epoch": 0, "frozen_encoder": True, "n_windows": fit.n_windows,
              "class_weight": fit.class_weight, "head_l2": fit.l2, "token_scale": fit.token_scale,
              **_groups_record(groups),
              "cv_macro_f1": {f"l2={k[0]:g},token_scale={k[1]:g}": v for k, v in fit.cv_scores.items()},
              "embed_s": round(fit.embed_seconds, 3), "fit_s": round(fit.fit_seconds, 3),
              "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return _finish_frozen(cfg, out, model, tokenizer, source_dir, train_items, dev_items, info, record, emit)


def _fit_document_head(cfg, model, tokenizer, train_items, dev_items, info, doc_targets, device, emit):
    """``train.head_features``: the head on whole-document feature blocks (docfeatures.py), the set
    and its L2 picked by cross-validation on the training documents (headfit.fit_doc_head). Returns
    the classification model with that head and the fit's log record."""
    import copy

    import torch

    from .docfeatures import (
        BLOCKS,
        FeatureSpec,
        embedding_blocks,
        fit_word_vocab,
        parse_feature_sets,
        word_rows,
    )
    from .docfeatures import word_counts as count_words
    from .headfit import embed_windows, fit_doc_head, set_name
    from .model import DOC_LINEAR, LongformerForSequenceClassification

    sets = parse_feature_sets(cfg.train.head_features)
    blocks = tuple(b for b in BLOCKS if any(b in s for s in sets))  # in docfeatures.BLOCKS order
    spec = FeatureSpec(blocks, cfg.train.feature_window)
    limit = min(tokenizer.max_tokens, model.config.max_tokens)
    bs, bf16 = cfg.inference.batch_size, _embed_bf16(cfg, device)
    t0 = time.perf_counter()
    started = False

    def start(n_windows: int) -> None:
        nonlocal started
        started = True
        emit({"event": "start", "total_steps": max(1, math.ceil(n_windows / bs)), "step": 0,
              "n_train": len(train_items), "n_dev": len(dev_items), "n_features": n_windows,
              "device": str(device), "bf16": bf16, "world_size": 1, "notes": info["notes"],
              "frozen": True})  # fmt: skip

    def on_batch(done: int, n: int) -> None:
        emit({"event": "embed", "step": done, "total_steps": n, "elapsed_s": time.perf_counter() - t0})

    def embed(windows):
        start(len(windows))
        return embed_windows(model.longformer, tokenizer, windows, bs, bf16=bf16, on_batch=on_batch)

    texts = [d.text for d in train_items]
    feats, _, n_windows = embedding_blocks(embed, tokenizer, texts, spec, limit)
    if not started:
        start(0)
    vocab = None
    if "words" in blocks:
        counts = [count_words(t) for t in texts]
        vocab = fit_word_vocab(counts)
        feats["words"] = word_rows(counts, vocab.columns, vocab.idf)
    groups = _cv_groups(cfg, train_items)
    t1 = time.perf_counter()
    fit = fit_doc_head(
        feats, doc_targets, len(info["labels"]), sets=sets, multi=bool(info.get("multi_label")),
        class_weight=cfg.train.class_weight, l2=cfg.train.head_l2, threshold=cfg.inference.threshold,
        seed=cfg.train.seed, groups=groups, select=cfg.train.head_select,
    )  # fmt: skip
    # The model with exactly the picked blocks (its head's shapes follow config.json's spec).
    chosen = FeatureSpec(fit.blocks, spec.mean_window)
    hf = copy.deepcopy(model.config)
    extra = dict(hf.extra.get("longdoc") or {})
    extra.pop("token_features", None)
    n_cols = len(vocab.columns) if vocab is not None and "words" in fit.blocks else 0
    hf.extra["longdoc"] = {**extra, "classifier": DOC_LINEAR, "doc_features": {**chosen.to_dict(),
                           "word_columns": n_cols}}  # fmt: skip
    fitted = LongformerForSequenceClassification(hf)
    fitted.longformer.load_state_dict(model.longformer.state_dict())
    head = fitted.classifier
    with torch.no_grad():
        head.out_proj.weight.zero_()
        head.out_proj.bias.copy_(fit.bias)
        for b, proj in head.doc_blocks.items():
            proj.weight.copy_(fit.weights[b])
        if n_cols:
            head.word_proj.weight.copy_(fit.weights["words"])
            head.word_columns.copy_(vocab.columns)
            head.word_idf.copy_(vocab.idf)
    fitted.to(device).eval()
    record = {"step": 1, "epoch": 0, "frozen_encoder": True, "n_windows": sum(n_windows),
              "class_weight": fit.class_weight, "head_features": set_name(fit.blocks), "head_l2": fit.l2,
              "head_select": cfg.train.head_select,
              "head_members": [f"{name},l2={v:g}" for name, v in fit.members],
              "feature_window": spec.mean_window,
              **_groups_record(groups),
              "cv_macro_f1": {f"{k[0]},l2={k[1]:g}": v for k, v in fit.cv_scores.items()},
              "cv_log_loss": {f"{k[0]},l2={k[1]:g}": v for k, v in fit.cv_log_loss.items()},
              "embed_s": round(t1 - t0, 3), "fit_s": round(time.perf_counter() - t1, 3),
              "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return fitted, record


def _finish_frozen(cfg, out, model, tokenizer, source_dir, train_items, dev_items, info, record,
                   emit) -> TrainResult:  # fmt: skip
    """The frozen fit's dev evaluation, log and checkpoints (best/ and last/ are the same model)."""
    from .evaluate import classification_metrics, predict_classification

    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    if dev_items:
        preds, lengths = predict_classification(model, tokenizer, dev_items, cfg)
        metrics = classification_metrics(
            [d.labels for d in dev_items], preds, info["labels"], lengths
        ).summary()
        history.append({"step": 1, "epoch": 0, **{f"eval_{k}": v for k, v in metrics.items()}})
    with (out / LOG_FILE).open("a", encoding="utf-8") as log:
        for rec in (record, *history):
            log.write(json.dumps(rec) + "\n")
    value = metrics.get(cfg.metric)
    if history:
        emit({"event": "eval", "metric": cfg.metric, "value": value, "best": value, **history[0]})
    card = {"base": cfg.model.name, "n_train": len(train_items), "n_dev": len(dev_items), "total_steps": 1,
            "labels": info.get("labels"), "step": 1, "metrics": metrics, "licence": licence_of(source_dir),
            "n_features": record.get("n_windows"), "device": str(next(model.parameters()).device),
            "train_s": record.get("elapsed_s"),
            "steps_run": 1}  # fmt: skip
    save_checkpoint(model, cfg, source_dir, out / "best", {**card, "name": f"{out.name}/best"})
    save_checkpoint(
        model, cfg, source_dir, out / "last", {**card, "name": f"{out.name}/last"}, same_as=out / "best"
    )
    emit({"event": "end", "step": 1, "best": value, "best_step": 1 if history else None})
    return TrainResult(out, cfg.task, cfg.metric, value, 1 if history else None, 1, 1, False,
                       len(train_items), len(dev_items), history, info["notes"])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: LongdocConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    on_event: Callable[[Event], None] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Fine-tune per ``cfg`` into ``output_dir``. ``stop_after_steps`` ends the run after that many
    optimizer steps, as an interruption would (last/ is saved), for tests of ``resume``."""
    if not str(output_dir).strip():  # Path("") is the current directory
        raise UsageError("the output directory is an empty path; give a directory")
    out = Path(output_dir)
    if force:
        refuse_inputs_in_outputs(cfg, out)
    if _dist_info()[0] != 0:  # rank 0 claims and prepares the directory for all ranks
        return _train(cfg, out, resume, on_event, stop_after_steps)
    with claimed_output_dir(out, resume, force):
        return _train(cfg, out, resume, on_event, stop_after_steps)


def _train(
    cfg: LongdocConfig,
    out: Path,
    resume: bool,
    on_event: Callable[[Event], None] | None,
    stop_after_steps: int | None,
) -> TrainResult:
    import torch
    import torch.distributed as dist

    from .evaluate import classification_metrics, predict_classification, predict_qa, qa_metrics
    from .hub import resolve_model
    from .runtime import pick_device
    from .tokenize import DocumentTokenizer

    emit = on_event or (lambda e: None)
    rank, world, local_rank = _dist_info()
    distributed = world > 1
    device = pick_device(cfg.model.device)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        own_group = not dist.is_initialized()
        if own_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.barrier()

    _seed_all(cfg.train.seed)
    source_dir = resolve_model(cfg.model.name, allow_download=cfg.model.allow_download)
    train_items, dev_items, info = load_datasets(cfg)
    if not train_items:
        raise LongdocError(f"{cfg.data.train}: no training examples left after the dev split")
    multi = bool(info.get("multi_label"))
    model = build_model(cfg, source_dir, info).to(device)
    model.gradient_checkpointing_enable(cfg.model.gradient_checkpointing)
    tokenizer = DocumentTokenizer.from_dir(source_dir, max_tokens=cfg.model.max_length)
    if cfg.task == "classify":
        label_index = {x: i for i, x in enumerate(info["labels"])}
        doc_targets = [classification_target(d, label_index, multi) for d in train_items]
        _class_balance_notes(cfg, doc_targets, info)
        if cfg.frozen:
            return _train_frozen(cfg, out, model, tokenizer, source_dir, train_items, dev_items, info,
                                 doc_targets, device, emit)  # fmt: skip
        features = classification_features(train_items, tokenizer, cfg, label_index, multi)
        label_weights = _feature_label_weights(cfg, [f.target for f in features], len(label_index), multi)
    else:
        features = qa_features(train_items, tokenizer, cfg)
        label_weights = None

    # Steps: every rank sees ceil(n / world) features per epoch (the order wraps to even them out).
    per_rank = math.ceil(len(features) / world)
    micro_per_epoch = math.ceil(per_rank / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = int(cfg.train.warmup_ratio * total)

    ddp_model = model
    if distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total))
    bf16 = _use_bf16(cfg, device)

    state = {
        "step": 0,
        "epoch": 0,
        "group": 0,
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "history": [],
    }
    if resume:
        ckpt = torch.load(out / "last" / STATE_FILE, map_location="cpu", weights_only=False)
        if ckpt["config"] != config_to_yaml(cfg, commented=False):
            changed = _changed_keys(ckpt["config"], config_to_yaml(cfg, commented=False))
            raise ConfigError(
                f"--resume: the config differs from the one {out} was trained with ({changed}); a resumed "
                "run continues the same schedule exactly, so start a new run to change it"
            )
        from .model import load_state_dict

        model.load_state_dict(load_state_dict(out / "last"))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        random.setstate(ckpt["python_rng"])
        torch.set_rng_state(
            ckpt["torch_rng"][rank] if rank < len(ckpt["torch_rng"]) else ckpt["torch_rng"][0]
        )
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"][min(rank, len(ckpt["cuda_rng"]) - 1)])
        if rank == 0:
            _truncate_log(out / LOG_FILE, state["step"])

    card_base = {"base": cfg.model.name, "n_train": len(train_items), "n_dev": len(dev_items),
                 "total_steps": total, "labels": info.get("labels"), "licence": licence_of(source_dir),
                 "n_features": len(features), "device": str(device)}  # fmt: skip

    def timing() -> dict[str, Any]:  # for the card: training time to this checkpoint
        return {"train_s": time.perf_counter() - t0, "steps_run": state["step"] - start_step}

    log = (out / LOG_FILE).open("a", encoding="utf-8") if rank == 0 else None

    def write_log(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate_dev() -> dict[str, float]:
        if not dev_items:
            return {}
        was_training = model.training
        if cfg.task == "classify":
            preds, lengths = predict_classification(model, tokenizer, dev_items, cfg)
            m = classification_metrics(
                [d.labels for d in dev_items], preds, info["labels"], lengths
            ).summary()
        else:
            answers = predict_qa(model, tokenizer, dev_items, cfg)
            m = qa_metrics(answers, [e.answers for e in dev_items]).summary()
        model.train(was_training)
        return m

    def save_last(same_as: Path | None = None) -> None:
        if rank != 0:
            return
        card = {
            **card_base,
            **timing(),
            "name": f"{out.name}/last",
            "step": state["step"],
            "metrics": state.get("last_eval"),
        }

        def write_state(directory: Path) -> None:
            torch.save(
                {
                    "config": config_to_yaml(cfg, commented=False),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state,
                    "python_rng": random.getstate(),
                    "torch_rng": rng_states,
                    "cuda_rng": [torch.cuda.get_rng_state()] if device.type == "cuda" else None,
                },
                directory / STATE_FILE,
            )

        save_checkpoint(model, cfg, source_dir, out / "last", card, extra=write_state, same_as=same_as)

    rng_states: list[Any] = []
    emit({"event": "start", "total_steps": total, "step": state["step"], "n_train": len(train_items),
          "n_dev": len(dev_items), "n_features": len(features), "device": str(device), "bf16": bf16,
          "world_size": world, "notes": info["notes"]})  # fmt: skip
    t0 = time.perf_counter()
    start_step = state["step"]
    stopped_early = done = False
    model.train()
    while not done and state["step"] < total:
        order = list(range(len(features)))
        random.Random(cfg.train.seed * 100_003 + state["epoch"]).shuffle(order)
        order = (order * (1 + (per_rank * world) // max(1, len(order))))[: per_rank * world]
        mine = order[rank::world]
        micro = [mine[i : i + cfg.train.batch_size] for i in range(0, len(mine), cfg.train.batch_size)]
        groups = [micro[i : i + cfg.train.grad_accum] for i in range(0, len(micro), cfg.train.grad_accum)]
        while not done and state["group"] < len(groups):
            group = groups[state["group"]]
            n_windows = sum(len(b) for b in group)
            loss_sum = 0.0
            for j, idx in enumerate(group):
                batch = {
                    k: v.to(device) for k, v in tokenizer.collate([features[i].window for i in idx]).items()
                }
                targets = [features[i].target for i in idx]
                sync = j == len(group) - 1 or not distributed
                ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = _loss(ddp_model, batch, targets, cfg.task, multi, label_weights) * (
                        len(idx) / n_windows
                    )
                    loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["group"] += 1
            step = state["step"]
            record = {"step": step, "epoch": state["epoch"], "loss": loss_sum, "lr": lr,
                      "grad_norm": grad_norm, "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
            write_log(record)
            emit({"event": "step", "total_steps": total, "start_step": start_step, **record})
            last_step = step >= total
            interrupted = stop_after_steps is not None and step - start_step >= stop_after_steps
            if not (step % cfg.train.eval_every == 0 or last_step or interrupted):
                continue
            metrics = evaluate_dev() if rank == 0 else {}
            improved = False
            if rank == 0 and metrics:
                value = metrics.get(cfg.metric)
                state["last_eval"] = metrics
                if value is not None and (state["best"] is None or value > state["best"]):
                    state["best"], state["best_step"], state["bad_evals"] = value, step, 0
                    improved = True
                else:
                    state["bad_evals"] += 1
                rec = {"step": step, "epoch": state["epoch"], **{f"eval_{k}": v for k, v in metrics.items()}}
                state["history"].append(rec)
                write_log(rec)
                emit({"event": "eval", "metric": cfg.metric, "value": value, "best": state["best"], **rec})
            best_now = rank == 0 and (improved or (not dev_items and (last_step or interrupted)))
            if best_now:
                card = {**card_base, **timing(), "name": f"{out.name}/best", "step": step, "metrics": metrics}
                save_checkpoint(model, cfg, source_dir, out / "best", card)
            patience = cfg.train.early_stopping_patience
            stop = bool(patience and state["bad_evals"] >= patience)
            if distributed:
                flag = [stop]
                dist.broadcast_object_list(flag, src=0)
                stop = flag[0]
                rng_states = [None] * world
                dist.all_gather_object(rng_states, torch.get_rng_state())
            else:
                rng_states = [torch.get_rng_state()]
            save_last(same_as=out / "best" if best_now else None)  # the same weights: shared
            if distributed:
                dist.barrier()
            if stop:
                stopped_early = True
                emit({"event": "early_stop", "step": step})
            done = stop or last_step or interrupted
        if not done:
            state["epoch"] += 1
            state["group"] = 0
    if log is not None:
        log.close()
    if distributed and own_group:
        dist.destroy_process_group()
    if rank == 0 and not (out / "best").exists():
        save_checkpoint(
            model, cfg, source_dir, out / "best", {**card_base, **timing(), "step": state["step"]}
        )
    result = TrainResult(
        out, cfg.task, cfg.metric, state["best"], state["best_step"], state["step"], total, stopped_early,
        len(train_items), len(dev_items), list(state["history"]), info["notes"],
    )  # fmt: skip
    emit({"event": "end", "step": state["step"], "best": state["best"], "best_step": state["best_step"]})
    return result


def _truncate_log(file: Path, step: int) -> None:
    """Drop log records written after the checkpoint being resumed (they will be redone), and a
    line torn by a kill while it was written. The new log replaces the old one in one rename."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-log")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, file)
