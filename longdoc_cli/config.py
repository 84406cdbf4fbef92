"""Typed run configuration, loaded strictly from YAML: one source of truth for train/classify/qa.

YAML keys = dataclass fields = ``--set a.b=value`` paths = the ``longdoc.yaml`` saved with every
model. Loading is strict: an unknown key is an error with a did-you-mean, a wrong type names the
dotted path, and every problem in a file is reported at once (one line each) as a ``ConfigError``
(exit code 2). Keys left out take their defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import LongdocError, UsageError
from .textio import MAX_SIDE_FILE_BYTES, preview, read_text_file

MODEL_CONFIG_NAME = "longdoc.yaml"
TASKS = ("classify", "qa")
METRICS = {"classify": ("macro_f1", "accuracy", "micro_f1"), "qa": ("f1", "exact_match")}


class ConfigError(UsageError):
    """One or more problems in a config; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str] | str, source: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


def _f(default: Any, help: str) -> Any:
    """A field with a default and the one-line comment `config init` writes next to it."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# The schema


@dataclass
class ModelSection:
    name: str = _f("default", "default | a model directory | a hub id (needs allow_download)")
    allow_download: bool = _f(False, "fetch a hub id that is not cached yet")
    max_length: int = _f(4096, "tokens per window, specials included (<= the model's positions)")
    attention_window: int | None = _f(
        None, "two-sided window (tokens) for every layer, or null = the checkpoint's"
    )
    attention_dilation: int | list[int | list[int]] | None = _f(
        None, "dilation: an int, one per layer, or per layer per head; null = the checkpoint's"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, ~30% slower")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "auto (bf16 on a GPU or a CPU with native bf16, else fp32) | fp32 | bf16 | fp16 (inference)"
    )
    quantize: Literal["none", "int8"] = _f("none", "none | int8 (CPU inference only)")


@dataclass
class TokenizationSection:
    stride: int = _f(256, "tokens shared by consecutive windows of a long document")
    max_question_length: int = _f(64, "tokens; longer questions are truncated")


@dataclass
class DataSection:
    train: str | None = _f(None, "training file (JSONL or CSV)")
    dev: str | None = _f(None, "dev file; null = a seeded dev_fraction of train")
    dev_fraction: Union[float, Literal["auto"]] = _f(  # noqa: UP007
        "auto", "share of train held out (seeded by train.seed) when dev is null; auto = 0.1, 0 if frozen"
    )
    format: Literal["auto", "jsonl", "csv"] = _f("auto", "auto (from the extension) | jsonl | csv")
    text_key: str = _f("text", "classification: the document text")
    label_key: str = _f("label", "classification: a string label, or a list of labels (multi-label)")
    id_key: str = _f("id", "record id (optional in the data)")
    group_key: str | None = _f(
        None, "classification: documents with the same value (an author, a source) are never split "
        "across the dev split or the head's CV folds; null = each document alone"
    )  # fmt: skip
    question_key: str = _f("question", "qa: the question")
    context_key: str = _f("context", "qa: the document the answer is in")
    answers_key: str = _f("answers", "qa: {text: [...], answer_start: [...]} (SQuAD)")
    skip_bad_lines: bool = _f(False, "skip malformed records (counted and reported) instead of failing")


@dataclass
class InferenceSection:
    batch_size: int = _f(4, "windows per forward pass (more short ones, up to 4096 tokens)")
    top_k: int = _f(3, "labels reported per document")
    aggregate: Literal["mean", "max", "first"] = _f(
        "mean", "mean | max over a document's windows | first (only the first window: truncation)"
    )
    threshold: float = _f(0.5, "multi-label: sigmoid probability above which a label is predicted")
    labels: list[str] = _f([], "zero-shot labels, or ['@NAME'] (a preset or a labels file); empty = @topics")
    labels_file: str | None = _f(None, "zero-shot labels, one per line")
    explain: int = _f(0, "report this many most influential windows per document (0 = off)")
    n_best: int = _f(20, "qa: start/end candidates per window")
    max_answer_length: int = _f(30, "qa: longest answer, in tokens")
    null_threshold: float | None = _f(None, "qa: answer nothing when null score - best span > this")
    min_score: float | None = _f(None, "qa: answer nothing (answer: null) when the best score is below this")


@dataclass
class TrainSection:
    epochs: int = _f(3, "passes over the training data")
    max_steps: int | None = _f(None, "optimizer steps; overrides epochs when set")
    batch_size: int = _f(2, "windows per micro-batch (per process)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(5.0e-5, "peak AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    warmup_ratio: float = _f(0.1, "share of steps with linear warm-up; then linear decay to 0")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    bf16: Union[bool, Literal["auto"]] = _f("auto", "auto (on for CUDA with bf16) | true | false")  # noqa: UP007
    seed: int = _f(42, "seeds python, torch, the data order and the dev split")
    eval_every: int = _f(100, "optimizer steps between evaluations (and at the end)")
    log_every: int = _f(10, "steps between progress lines when stderr is not a terminal (a log file)")
    early_stopping_patience: int | None = _f(None, "stop after this many evaluations without improvement")
    metric: str | None = _f(
        None, "null = macro_f1 for classify, f1 for qa; also accuracy, micro_f1, exact_match"
    )
    freeze_encoder: Union[bool, Literal["auto"]] = _f(  # noqa: UP007
        "auto", "classify: fit only the head on window embeddings computed once (auto = true for classify)"
    )
    class_weight: Literal["auto", "balanced", "none"] = _f(
        "auto", "classify: weight the loss by 1/class frequency; auto = balanced when labels are skewed"
    )
    windows: Literal["first", "all"] = _f(
        "all", "classify: train on each document's first window, or on all of them (pooled if frozen)"
    )
    max_windows: int | None = _f(None, "classify: windows per training document, evenly spread (null = all)")
    token_features: bool = _f(
        True, "head_features window: the head also sees each window's TF-IDF over the model's tokens"
    )
    head_l2: Union[float, Literal["auto"]] = _f(  # noqa: UP007
        "auto", "frozen encoder: L2 penalty of the linear head; auto = picked by 5-fold CV on train"
    )
    head_features: str = _f(
        "auto",
        "frozen encoder: document feature sets the head picks from by CV (README; window = per window)",
    )
    feature_window: int = _f(256, "frozen encoder: tokens per window of the 'mean' feature block")
    head_select: str = _f(
        "logloss+ens",
        "frozen encoder: how the CV picks the head: logloss+ens | logloss | pooled | folds | setf1 | top3"
        " | sets3 | l2avg",
    )


@dataclass
class LongdocConfig:
    task: Literal["classify", "qa"] = _f("classify", "classify | qa")
    model: ModelSection = field(default_factory=ModelSection)
    tokenization: TokenizationSection = field(default_factory=TokenizationSection)
    data: DataSection = field(default_factory=DataSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def frozen(self) -> bool:
        """Whether `train` fits only the head on frozen window embeddings (``train.freeze_encoder``)."""
        f = self.train.freeze_encoder
        return self.task == "classify" if f == "auto" else bool(f)

    @property
    def dev_fraction(self) -> float:
        """``data.dev_fraction`` resolved: auto = 0 for the frozen-encoder fit (it picks its settings by
        cross-validation on the training documents, so a dev split only takes data from it), else 0.1."""
        f = self.data.dev_fraction
        return (0.0 if self.frozen else 0.1) if f == "auto" else float(f)

    @property
    def metric(self) -> str:
        """The metric that picks `best/` and drives early stopping."""
        return self.train.metric or ("macro_f1" if self.task == "classify" else "f1")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "tokenization": TokenizationSection,
    "data": DataSection,
    "inference": InferenceSection,
    "train": TrainSection,
}
SECTION_HELP = {
    "model": "which encoder, how long its windows are, where it runs",
    "tokenization": "how long documents are cut into overlapping windows",
    "data": "training / evaluation data (JSONL or CSV) and its keys",
    "inference": "classify / qa / evaluate",
    "train": "the fine-tuning loop (AdamW, linear warm-up and decay)",
}


# ----------------------------------------------------------------------------------------------
# Typed conversion of one value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(_yaml_scalar(a)) for a in args)
    if origin is list and typing.get_origin(args[0]) in (Union, types.UnionType):
        return "a list of integers or of lists of integers"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (Union, types.UnionType):
        if bool in args:
            return "true, false or auto"
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    return str(tp)


class _Bad(Exception):
    pass


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` or raise _Bad. Numbers written like ``1e-3`` (a string to PyYAML)
    are accepted for float fields; ints for floats; nothing else is coerced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is None):
            try:
                return _convert(value, a)
            except _Bad:
                continue
        raise _Bad
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise _Bad
    if origin is list:
        if not isinstance(value, list):
            raise _Bad
        return [_convert(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):  # YAML's .inf and .nan are floats too
                return float(value)
            raise _Bad
        if isinstance(value, str):
            try:
                x = float(value.strip())
            except ValueError:
                raise _Bad from None
            if math.isfinite(x):
                return x
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    raise TypeError(f"unsupported config type {tp}")


def convert_value(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` by the rules every config key follows (``1e-3`` is a number, an
    integer is a float, nothing else is coerced); ValueError naming what was expected otherwise."""
    try:
        return _convert(value, tp)
    except _Bad:
        raise ValueError(f"expected {_describe(tp)}") from None


def _suggest(key: str, names: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    for name in names:  # `windw` -> attention_window: match against the parts of a name
        if difflib.get_close_matches(key, name.split("_"), n=1, cutoff=0.75):
            return name
    return None


def _all_paths() -> list[str]:
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]


def _unknown(path: str, key: str, names: Sequence[str]) -> str:
    prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = _suggest(key, names)
    if hint is None:  # maybe it belongs to another section (model.stride -> tokenization.stride)
        elsewhere = [p for p in _all_paths() if p.endswith("." + key)]
        if elsewhere:
            return f"{path}: unknown key; did you mean {elsewhere[0]}?"
        return f"{path}: unknown key (allowed: {', '.join(names)})"
    return f"{path}: unknown key; did you mean {prefix}{hint}?"


# ----------------------------------------------------------------------------------------------
# dict <-> config


def _build_section(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of keys, got {_show(data)}")
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in hints:
            problems.append(_unknown(f"{path}.{key}", key, names))
            continue
        try:
            kwargs[key] = _convert(value, hints[key])
        except _Bad:
            problems.append(f"{path}.{key}: expected {_describe(hints[key])}, got {_show(value)}")
    return cls(**kwargs)


def _show(value: Any, limit: int = 60) -> str:
    """A bounded preview of a bad value: at most ``limit`` characters, built without expanding the
    whole value (a YAML alias bomb is a small graph of shared lists that prints as gigabytes)."""
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} {_preview_json(value, limit)}"
    if isinstance(value, str):
        return preview(value, limit)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return preview(json.dumps(value, default=str), limit).strip("'\"")


def _preview_json(value: Any, limit: int) -> str:
    """JSON-like text of ``value``, cut after ``limit`` characters (each part is cut before it is
    joined, so the cost is bounded by ``limit``, not by the value's size)."""
    out: list[str] = []
    size = 0

    def put(text: str) -> bool:
        nonlocal size
        out.append(text[: limit - size + 1])
        size += len(out[-1])
        return size <= limit

    def walk(v: Any, depth: int) -> bool:
        if depth > 20:
            return put("...")
        if isinstance(v, dict):
            if not put("{"):
                return False
            for i, (k, x) in enumerate(v.items()):
                if (i and not put(", ")) or not put(_show(k, limit) + ": ") or not walk(x, depth + 1):
                    return False
            return put("}")
        if isinstance(v, list):
            if not put("["):
                return False
            for i, x in enumerate(v):
                if (i and not put(", ")) or not walk(x, depth + 1):
                    return False
            return put("]")
        return put(_show(v, limit))

    if walk(value, 0):
        return "".join(out)
    return "".join(out)[:limit] + "..."


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def dilation_problems(value: int | list[int | list[int]] | None, path: str) -> list[str]:
    """Every dilation below 1, named by its dotted path and index (``model.attention_dilation[1][0]``).
    How many layers and heads there are is checked against the model when it loads."""
    if value is None:
        return []
    if isinstance(value, int):
        return [] if value >= 1 else [f"{path}: must be >= 1, got {value}"]
    if not value:
        return [f"{path}: an empty list; give an int, one value per layer, or a list per layer"]
    problems = []
    for i, x in enumerate(value):
        if isinstance(x, list):
            if not x:
                problems.append(f"{path}[{i}]: an empty list; give one dilation per head")
            problems += [f"{path}[{i}][{h}]: must be >= 1, got {y}" for h, y in enumerate(x) if y < 1]
        elif x < 1:
            problems.append(f"{path}[{i}]: must be >= 1, got {x}")
    return problems


def parse_dilation(text: str, option: str = "--dilation") -> int | list[int | list[int]]:
    """A dilation written on the command line: ``2``, ``[1,2]`` (per layer) or ``[[1,2],[1,1]]``
    (per layer per head), read as YAML and checked as ``model.attention_dilation`` is."""
    try:
        value = _convert(_parse_scalar(text), _hints(ModelSection)["attention_dilation"])
    except _Bad:
        value = None
    if value is None:
        raise UsageError(
            f"{option} {preview(text, 60)}: expected an integer, a list per layer, or a list of lists"
        )
    problems = dilation_problems(value, option)
    if problems:
        raise UsageError("; ".join(problems))
    return value


def _check(cfg: LongdocConfig, problems: list[str]) -> None:
    """Ranges and relations between fields, each problem naming its dotted path."""
    m, t, d, i, tr = cfg.model, cfg.tokenization, cfg.data, cfg.inference, cfg.train

    def need(ok: bool, path: str, msg: str) -> None:
        if not ok:
            problems.append(f"{path}: {msg}")

    need(m.max_length >= 16, "model.max_length", f"must be at least 16 tokens, got {m.max_length}")
    if m.attention_window is not None:
        need(
            m.attention_window > 0 and m.attention_window % 2 == 0,
            "model.attention_window",
            f"the two-sided window must be a positive even number, got {m.attention_window}",
        )
    problems.extend(dilation_problems(m.attention_dilation, "model.attention_dilation"))
    need(
        DEVICE_PATTERN.fullmatch(m.device) is not None,
        "model.device",
        f"expected auto, cpu, cuda, cuda:N or mps, got {_show(m.device)}",
    )
    need(t.stride >= 0, "tokenization.stride", f"must be >= 0, got {t.stride}")
    need(
        t.stride < m.max_length // 2,
        "tokenization.stride",
        f"must be less than half of model.max_length ({m.max_length}), got {t.stride}",
    )
    need(t.max_question_length >= 1, "tokenization.max_question_length", "must be >= 1")
    if cfg.task == "qa":
        need(
            t.max_question_length + 16 <= m.max_length,
            "tokenization.max_question_length",
            f"leaves no room for the context in model.max_length {m.max_length}",
        )
    if d.dev_fraction != "auto":
        bad = f"must be in [0, 1) or auto, got {d.dev_fraction}"
        need(0.0 <= d.dev_fraction < 1.0, "data.dev_fraction", bad)
    for name in ("batch_size", "top_k", "n_best", "max_answer_length"):
        need(getattr(i, name) >= 1, f"inference.{name}", f"must be >= 1, got {getattr(i, name)}")
    need(i.explain >= 0, "inference.explain", f"must be >= 0, got {i.explain}")
    need(0.0 < i.threshold < 1.0, "inference.threshold", f"must be in (0, 1), got {i.threshold}")
    for name in ("epochs", "batch_size", "grad_accum", "eval_every", "log_every", "seed"):
        low = 0 if name == "seed" else 1
        need(getattr(tr, name) >= low, f"train.{name}", f"must be >= {low}, got {getattr(tr, name)}")
    if tr.max_steps is not None:
        need(tr.max_steps >= 1, "train.max_steps", f"must be >= 1 or null, got {tr.max_steps}")
    if tr.early_stopping_patience is not None:
        need(tr.early_stopping_patience >= 1, "train.early_stopping_patience", "must be >= 1 or null")
    need(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    need(tr.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    need(0.0 <= tr.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {tr.warmup_ratio}")
    need(tr.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {tr.max_grad_norm}")
    if tr.max_windows is not None:
        need(tr.max_windows >= 1, "train.max_windows", f"must be >= 1 or null, got {tr.max_windows}")
    if tr.head_l2 != "auto":
        need(tr.head_l2 >= 0, "train.head_l2", f"must be >= 0 or auto, got {tr.head_l2}")
    if tr.head_features != "window":
        from .docfeatures import parse_feature_sets

        try:
            parse_feature_sets(tr.head_features)
        except ValueError as e:
            need(False, "train.head_features", str(e))
    need(tr.feature_window >= 8, "train.feature_window", f"must be >= 8, got {tr.feature_window}")
    from .docfeatures import DOC_SELECT_RULES

    need(tr.head_select in DOC_SELECT_RULES, "train.head_select",
         f"expected one of {', '.join(DOC_SELECT_RULES)}, got {tr.head_select}")  # fmt: skip
    if cfg.task == "qa":
        need(tr.freeze_encoder is not True, "train.freeze_encoder",
             "a frozen encoder is for classification only (QA trains the whole model)")  # fmt: skip
    if tr.metric is not None and cfg.task in METRICS:
        need(
            tr.metric in METRICS[cfg.task],
            "train.metric",
            f"{tr.metric!r} is not a {cfg.task} metric (allowed: {', '.join(METRICS[cfg.task])}, or null)",
        )


def config_from_dict(data: Any, source: str = "<dict>") -> LongdocConfig:
    """A validated config from a plain mapping (missing keys take defaults); raises ConfigError
    listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {_show(data)}", source)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    top = ["task", *SECTIONS]
    for key, value in data.items():
        key = str(key)
        if key == "task":
            try:
                kwargs["task"] = _convert(value, Literal["classify", "qa"])
            except _Bad:
                problems.append(f"task: expected one of classify, qa, got {_show(value)}")
        elif key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, problems)
        else:
            hint = _suggest(key, top)
            where = [s for s, c in SECTIONS.items() if key in {f.name for f in dataclasses.fields(c)}]
            if hint:
                problems.append(f"{key}: unknown key; did you mean {hint}?")
            elif where:
                problems.append(f"{key}: unknown top-level key; did you mean {where[0]}.{key}?")
            else:
                problems.append(f"{key}: unknown key (allowed: {', '.join(top)})")
    cfg = LongdocConfig(**kwargs)  # a field with a type problem holds its default here
    checked: list[str] = []
    _check(cfg, checked)  # also with type problems: every problem at once, not one round each
    typed = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in checked if p.split(":", 1)[0] not in typed]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_to_dict(cfg: LongdocConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Files and overrides


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader) if text.strip() else ""
    except yaml.composer.ComposerError as e:  # an alias bomb
        raise ConfigError(f"--set {preview(text, 40)}: {e.problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError):  # read as the text it is
        return text


def apply_overrides(cfg: LongdocConfig, overrides: Sequence[str], source: str = "--set") -> LongdocConfig:
    """A new config with ``a.b=value`` overrides applied (values read as YAML scalars, then
    converted to the field's type); every problem reported at once."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"{item!r}: expected KEY=VALUE, for example train.lr=3e-5")
            continue
        path, text = item.split("=", 1)
        path = path.strip().removeprefix("--")
        value = _parse_scalar(text)
        parts = path.split(".")
        if parts == ["task"]:
            data["task"] = value
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            section = parts[0] if parts[0] in SECTIONS else None
            if section and len(parts) == 1:
                problems.append(f"{path}: is a section; set one of its keys, for example {path}.<key>=value")
            else:
                names = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
                hint = _suggest(path, names) or _suggest(parts[-1], names)
                leaf = [n for n in names if n.endswith("." + parts[-1])]
                hint = hint or (leaf[0] if leaf else None)
                problems.append(f"{path}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
            continue
        data[parts[0]][parts[1]] = value
    try:
        cfg = config_from_dict(data, source=source)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> LongdocConfig:
    """Read a YAML config (None = the defaults), apply ``--set`` overrides, validate strictly."""
    if path is None:
        cfg = LongdocConfig()
    else:
        data = read_yaml(Path(path))
        cfg = config_from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides)


def read_yaml(path: Path) -> Any:
    """A YAML file ("-" = stdin), read bounded, strictly, with aliases on a budget; ConfigError if bad."""
    if str(path) != "-" and not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = read_text_file(str(path), "YAML config", MAX_SIDE_FILE_BYTES)
    except LongdocError as e:
        raise ConfigError(str(e)) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        problem = problem if len(problem) <= 200 else problem[:200] + "..."
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except ValueError:  # an integer past Python's 4300-digit limit
        raise ConfigError(f"{path}: holds a number too long to read (over 4300 digits)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None


# Values a config's aliases (*name) may add when expanded: a real config adds a few at most; a
# "billion laughs" document of nested aliases adds billions.
MAX_ALIAS_EXPANSION = 10_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the
    last silently, so a second ``lr:`` further down a file would win unnoticed), and a document
    whose aliases add more than MAX_ALIAS_EXPANSION values when expanded (an alias bomb) is
    refused before it is built."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        sizes: dict[int, int] = {}  # node -> its expanded size; shared nodes are computed once

        def size(n: yaml.Node, open_: set[int]) -> int:
            if id(n) in sizes:
                return sizes[id(n)]
            if id(n) in open_:
                raise yaml.composer.ComposerError(None, None, "an alias refers to itself", n.start_mark)
            total = 1
            if isinstance(n, (yaml.SequenceNode, yaml.MappingNode)):
                open_.add(id(n))
                children = n.value if isinstance(n, yaml.SequenceNode) else [x for kv in n.value for x in kv]
                total += sum(size(child, open_) for child in children)
                open_.discard(id(n))
            sizes[id(n)] = total
            return total

        if node is not None and size(node, set()) - len(sizes) > MAX_ALIAS_EXPANSION:
            raise yaml.composer.ComposerError(
                None, None,
                f"its aliases expand to more than {MAX_ALIAS_EXPANSION} extra values (an alias bomb?)",
                node.start_mark,
            )  # fmt: skip
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML's own construct_mapping refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {preview(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def save_config(cfg: LongdocConfig, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg, commented=True), encoding="utf-8")


def load_model_dir_config(model_dir: str | Path) -> LongdocConfig | None:
    """The config a model directory was trained with (``longdoc.yaml``), or None if it has none."""
    file = Path(model_dir) / MODEL_CONFIG_NAME
    return load_config(file) if file.is_file() else None


def check_task(cfg: LongdocConfig, expected: str, source: str = "config") -> None:
    """Refuse a config (or model) made for the other task."""
    if cfg.task != expected:
        raise ConfigError(f"task is {cfg.task!r} but this command needs a {expected!r} config", source)


# ----------------------------------------------------------------------------------------------
# Which setting wins: decided here, once, for every command and the library


# A command-line option given as an override: dotted path -> (option name, value); None = not given.
Flags = Mapping[str, tuple[str, Any]]


def apply_flags(cfg: LongdocConfig, flags: Flags) -> LongdocConfig:
    """A new config with the command-line options that were given applied (already typed by the
    CLI, converted and validated like any key). A problem with one names the option, not the key:
    ``--top-k 0: must be at least 1``."""
    given = {path: (flag, value) for path, (flag, value) in flags.items() if value is not None}
    if not given:
        return cfg
    data = config_to_dict(cfg)
    for path, (_, value) in given.items():
        section, key = path.split(".")
        data[section][key] = value
    try:
        return config_from_dict(data, source="")
    except ConfigError as e:
        raise ConfigError([_flag_problem(p, given) for p in e.problems]) from None


def _flag_problem(problem: str, given: Mapping[str, tuple[str, Any]]) -> str:
    path, _, reason = problem.partition(": ")
    if path not in given:
        return problem
    flag, value = given[path]
    section, key = path.split(".")
    tp = _hints(SECTIONS[section])[key]
    if reason.startswith("expected ") and typing.get_origin(tp) is Literal:
        *first, last = (str(_yaml_scalar(a)) for a in typing.get_args(tp))
        return f"{flag} must be {', '.join(first)} or {last}, not {value!r}"
    reason = re.sub(r", got .*$", "", reason)
    reason = re.sub(r"must be >= ", "must be at least ", reason)
    reason = reason.replace("must be in (0, 1)", "must be between 0 and 1")
    return f"{flag} {value}: {reason}"


@dataclass(frozen=True)
class Run:
    """What a command runs with: the merged config and the model directory (None: not looked up)."""

    config: LongdocConfig
    model_dir: Path | None


def resolve_run(
    task: str | None = None,
    *,
    config: str | Path | LongdocConfig | None = None,
    model: str | None = None,
    overrides: Sequence[str] = (),
    flags: Flags | None = None,
    allow_download: bool = False,
    find_model: bool = True,
    guess_task: Callable[[], str] | None = None,
) -> Run:
    """The config and model a command runs with. Later wins: the defaults < the model directory's
    ``longdoc.yaml`` (read only when no ``config`` is given) < ``config`` (a YAML file or a config)
    < ``overrides`` (``--set a.b=value``) < ``flags`` (command-line options, see :func:`apply_flags`).

    The model is ``model`` (``-m``), else ``$LONGDOC_MODEL``, else ``config``'s ``model.name``;
    it is resolved to a directory unless ``find_model`` is false. ``task`` is the command's task
    (a ``config`` for the other one is refused); None (`evaluate`): the checkpoint's head decides,
    else the config, else ``guess_task()`` (what the data looks like), else classify."""
    source = str(config) if isinstance(config, (str, Path)) else "config"
    given = load_config(config) if isinstance(config, (str, Path)) else config
    if given is not None and task is not None:
        check_task(given, task, source)
    model_dir = _find_model(model, given, allow_download) if find_model else None
    head_task = _head_task(model_dir) if model_dir is not None and task is None else None
    cfg = given or (load_model_dir_config(model_dir) if model_dir is not None else None)
    if cfg is None:
        guessed = head_task or task or (guess_task() if guess_task else "classify")
        cfg = default_config(guessed)
    cfg = apply_flags(apply_overrides(cfg, overrides), flags or {})
    if head_task is not None and cfg.task != head_task:
        raise ConfigError(f"{model_dir}: is a {head_task} model but the config's task is {cfg.task!r}")
    return Run(cfg, model_dir)


def _find_model(model: str | None, cfg: LongdocConfig | None, allow_download: bool) -> Path:
    from .envvars import env
    from .hub import resolve_model

    from_env = model is None and env("LONGDOC_MODEL") is not None
    named = cfg.model.name if cfg is not None and cfg.model.name != "default" else None
    name = model or env("LONGDOC_MODEL") or named
    allow = allow_download or (cfg is not None and cfg.model.allow_download)
    try:
        return resolve_model(name, allow_download=allow)
    except LongdocError as e:
        if not from_env:
            raise
        raise UsageError(f"LONGDOC_MODEL={name!r}: {e}") from None


def _head_task(model_dir: Path) -> str | None:
    """ "classify" or "qa" from the checkpoint's task head; None for a plain encoder."""
    from .model import load_hf_config

    return {"classification": "classify", "qa": "qa"}.get(load_hf_config(model_dir).head)


# ----------------------------------------------------------------------------------------------
# Writing YAML


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 (PyYAML) needs 5.0e-05
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    text = str(value)
    plain = text and text == text.strip() and not any(c in text for c in ":#{}[],&*!|>'\"%@`")
    if plain and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)


def config_to_yaml(cfg: LongdocConfig, commented: bool = True) -> str:
    """The whole config as YAML; with ``commented``, each key carries its one-line help."""
    if not commented:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    task_help = next(f for f in dataclasses.fields(LongdocConfig) if f.name == "task").metadata["help"]
    lines = [
        "# longdoc config: `longdoc train CONFIG`, `longdoc evaluate`, `--set section.key=value` overrides.",
        "# Token counts include special tokens; `attention_window` is two-sided (HF convention).",
        f"task: {cfg.task}  # {task_help}",
    ]
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"{name}:  # {SECTION_HELP[name]}")
        rows = [(f"  {f.name}: {_yaml_scalar(getattr(section, f.name))}", f.metadata.get("help", ""))
                for f in dataclasses.fields(section)]  # fmt: skip
        width = max(len(r[0]) for r in rows) + 2
        lines.extend(f"{r.ljust(width)}# {h}" if h else r for r, h in rows)
    return "\n".join(lines) + "\n"


def default_config(task: str = "classify") -> LongdocConfig:
    """The defaults for a task (what `longdoc config init --task` writes)."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    return LongdocConfig(task=task)  # type: ignore[arg-type]


__all__ = [
    "MODEL_CONFIG_NAME",
    "ConfigError",
    "Run",
    "DataSection",
    "InferenceSection",
    "LongdocConfig",
    "ModelSection",
    "TokenizationSection",
    "TrainSection",
    "apply_flags",
    "apply_overrides",
    "check_task",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "convert_value",
    "default_config",
    "load_config",
    "load_model_dir_config",
    "resolve_run",
    "save_config",
]
