"""From a model name and options to a ready Classifier / QuestionAnswerer, as `longdoc classify` and
`longdoc qa` build them: the same config (config.resolve_run: the model directory's longdoc.yaml, a
``config`` file, ``--set`` overrides, options), the same loading, the same task settings. The CLI
and ``Classifier.from_pretrained`` / ``QuestionAnswerer.from_pretrained`` both call these, so the
library scores a document exactly as the command line does."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SECTIONS, LongdocConfig, Run, _suggest, resolve_run
from .errors import UsageError

if TYPE_CHECKING:
    from .tasks.classify import Classifier, Label
    from .tasks.qa import QuestionAnswerer
    from .tasks.runner import TaskModel

# Sections a keyword option is looked up in, in this order (`batch_size` is inference.batch_size).
_KEYWORD_SECTIONS = ("inference", "tokenization", "model", "data")
# Keyword options that are not config keys (the CLI's --max-length: tokens per window, checked
# against the model's limit rather than capped by it).
LOAD_OPTIONS = ("max_length", "allow_download", "config", "overrides")


def keyword_flags(options: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """``top_k=5`` or ``{"inference.top_k": 5}`` -> ``{"inference.top_k": ("top_k", 5)}`` (the flags
    :func:`config.resolve_run` applies last); an unknown name is a UsageError with a suggestion."""
    fields = {s: {f.name for f in dataclasses.fields(SECTIONS[s])} for s in SECTIONS}
    flags: dict[str, tuple[str, Any]] = {}
    for name, value in options.items():
        if "." in name:
            section, _, key = name.partition(".")
            path = name if key in fields.get(section, ()) else None
        else:
            path = next((f"{s}.{name}" for s in _KEYWORD_SECTIONS if name in fields[s]), None)
        if path is None:
            known = [f"{s}.{k}" for s in SECTIONS for k in fields[s]] + [k for s in fields for k in fields[s]]
            hint = _suggest(name, known)
            raise UsageError(f"{name}: not a config key" + (f"; did you mean {hint}?" if hint else ""))
        flags[path] = (name, value)
    return flags


def resolve(
    task: str,
    name_or_dir: str | Path | None,
    *,
    config: str | Path | LongdocConfig | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, tuple[str, Any]] | None = None,
    allow_download: bool = False,
) -> Run:
    """:func:`config.resolve_run` for ``task`` (``name_or_dir`` None: ``$LONGDOC_MODEL``, else the
    config's model.name, else the embedded default model)."""
    from .runtime import return_freed_memory

    return_freed_memory()  # inference only
    model = None if name_or_dir is None else str(name_or_dir)
    return resolve_run(task, config=config, model=model, overrides=overrides, flags=flags or {},
                       allow_download=allow_download)  # fmt: skip


def load_for_run(run: Run, task: str, max_length: int | None = None) -> TaskModel:
    """The task model as the run's model section says; ``max_length`` (the CLI's --max-length)
    is an error above the model's limit, where ``model.max_length`` is only a cap."""
    from .tasks.runner import load_task_model

    mc = run.config.model
    assert run.model_dir is not None
    return load_task_model(
        run.model_dir, task=task, device=mc.device, dtype=mc.dtype, quantize=mc.quantize,
        max_length=max_length, max_length_cap=mc.max_length, attention_window=mc.attention_window,
        attention_dilation=mc.attention_dilation,
    )  # fmt: skip


def labels_for_run(
    run: Run, labels: Sequence[str] | Sequence[Label] | str | None = None, labels_file: str | None = None
) -> list[Label] | None:
    """The zero-shot labels `longdoc classify` uses: ``labels`` (names, ``@PRESET``, ``@FILE``, a
    comma-separated string, or Label objects) else ``labels_file``, else the config's
    ``inference.labels`` / ``labels_file``; None when none is given (the model's own labels, or
    @topics). Read before the model loads, so that a bad label fails at once."""
    from .tasks.classify import Label, load_labels

    inf = run.config.inference
    if isinstance(labels, str):
        if not labels.strip(" ,"):
            raise UsageError("--labels: no labels given (a comma-separated list)")
        labels = labels.split(",")
    if labels and all(isinstance(x, Label) for x in labels):
        return list(labels)  # type: ignore[arg-type]
    names = list(labels) if labels else list(inf.labels) or None
    file = labels_file or inf.labels_file
    return load_labels(names, file) if names or file else None  # type: ignore[arg-type]


def classifier_for_run(
    run: Run,
    labels: list[Label] | None = None,
    *,
    max_length: int | None = None,
    strict_stride: bool = False,
    tm: TaskModel | None = None,
) -> Classifier:
    """The Classifier `longdoc classify` runs over ``labels`` (:func:`labels_for_run`), with ``tm``
    or the model the run names."""
    from .tasks.classify import Classifier

    inf, tk = run.config.inference, run.config.tokenization
    tm = tm or load_for_run(run, "classify", max_length)
    return Classifier(
        tm, labels, aggregate=inf.aggregate, top_k=inf.top_k, threshold=inf.threshold,
        explain=inf.explain, batch_size=inf.batch_size, stride=tk.stride, strict_stride=strict_stride,
    )  # fmt: skip


def answerer_for_run(
    run: Run,
    *,
    top_k: int = 1,
    max_length: int | None = None,
    strict_stride: bool = False,
    tm: TaskModel | None = None,
) -> QuestionAnswerer:
    """The QuestionAnswerer `longdoc qa` runs (``top_k`` answers per question)."""
    from .tasks.qa import QuestionAnswerer

    inf, tk = run.config.inference, run.config.tokenization
    tm = tm or load_for_run(run, "qa", max_length)
    return QuestionAnswerer(
        tm, top_k=top_k, n_best=inf.n_best, max_answer_length=inf.max_answer_length,
        null_threshold=inf.null_threshold, batch_size=inf.batch_size, doc_stride=tk.stride,
        max_question_length=tk.max_question_length, strict_stride=strict_stride,
        min_score=inf.min_score,
    )  # fmt: skip


def from_pretrained(task: str, name_or_dir: str | Path | None, labels: Any, options: dict[str, Any]):
    """``Classifier.from_pretrained`` / ``QuestionAnswerer.from_pretrained``: ``options`` are config
    keys (``top_k=5``, ``device="cuda:1"``, ``stride=128``, ``{"inference.aggregate": "max"}``) plus
    ``max_length``, ``allow_download``, ``config`` (a YAML file or a LongdocConfig) and ``overrides``
    (``["section.key=value", ...]``, as ``--set``)."""
    load = {k: options.pop(k) for k in LOAD_OPTIONS if k in options}
    top_k = options.pop("top_k", None) if task == "qa" else None  # answers per question, as qa --top-k
    flags = keyword_flags(options)
    name = None if name_or_dir in (None, "default") else name_or_dir  # "default": as the CLI without -m
    run = resolve(
        task, name, config=load.get("config"), overrides=list(load.get("overrides") or ()),
        flags=flags, allow_download=bool(load.get("allow_download", False)),
    )  # fmt: skip
    strict = "tokenization.stride" in flags
    if task == "classify":
        chosen = labels_for_run(run, labels)
        return classifier_for_run(run, chosen, max_length=load.get("max_length"), strict_stride=strict)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k {top_k!r}: must be an integer of at least 1")
    return answerer_for_run(run, top_k=top_k or 1, max_length=load.get("max_length"), strict_stride=strict)
