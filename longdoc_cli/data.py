"""Labelled data for `train` and `evaluate`: classification documents and SQuAD-format QA pairs.

JSON lines or CSV, keys chosen by the config's ``data`` section. Every bad record is reported as
``file:line: problem``; with ``skip_bad_lines`` it is skipped and counted instead. QA answers that do
not lie in their context are counted and reported (``QAData.not_in_context``), never silently dropped.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataSection
from .errors import LongdocError
from .textio import (
    MAX_DOCUMENT_BYTES,
    container_kind,
    format_size,
    iter_lines,
    normalise_newlines,
    parse_jsonl_line,
)

# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class LabelledDoc:
    id: str
    text: str
    labels: tuple[str, ...]  # one label for single-label data
    where: str  # file:line
    group: str | None = None  # data.group_key's value: documents of a group are never split apart


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # empty = no answer in the context (SQuAD 2.0 style)
    starts: tuple[int, ...]  # character offsets into context, one per answer
    where: str
    group: str  # the page: the `title` if any, else the context itself (for page-wise splits)
    in_context: bool = True  # False: an answer text is not in the context (not trainable)


@dataclass
class ClassificationData:
    docs: list[LabelledDoc]
    labels: list[str]  # sorted
    multi_label: bool
    skipped: list[str] = field(default_factory=list)  # "file:line: problem" of skipped records


@dataclass
class QAData:
    examples: list[QAExample]
    skipped: list[str] = field(default_factory=list)
    realigned: int = 0  # answer_start was wrong but the text occurs in the context: moved
    not_in_context: list[str] = field(default_factory=list)  # "file:line: ..." (kept, but untrainable)


class _BadRecord(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Raw rows


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if Path(path).suffix.lower() in (".csv", ".tsv") else "jsonl"


def check_data_file(path: str) -> Path:
    """``path`` as a Path when it is a regular file, else the one-line error naming it."""
    p = Path(path)
    if p.is_dir():
        raise LongdocError(f"{path}: is a directory, not a data file")
    if not p.is_file():
        raise LongdocError(f"{path}: no such file" if not p.exists() else f"{path}: not a regular file")
    return p


def iter_rows(path: str, fmt: str = "auto", skipped: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` per record; a malformed line raises LongdocError naming ``file:line``,
    or is appended to ``skipped`` when that list is given."""
    p = check_data_file(path)
    with p.open("rb") as f:
        kind = container_kind(f.read(16))
    if kind is not None:
        raise LongdocError(f"{path}: is {kind}, not JSON lines or CSV; extract it first")
    if _format(path, fmt) == "csv":
        yield from _iter_csv(p)
        return
    with p.open("rb") as f:
        for line_no, raw in iter_lines(f, path, MAX_DOCUMENT_BYTES):
            where = f"{path}:{line_no}"
            try:
                if raw is None:
                    raise LongdocError(
                        f"{where}: larger than the {format_size(MAX_DOCUMENT_BYTES)} limit on a record"
                    )
                row = parse_jsonl_line(raw, where, first=line_no == 1)
            except LongdocError as e:
                _bad(skipped, str(e))
                continue
            if row is not None:
                yield where, row


def _iter_csv(p: Path) -> Iterator[tuple[str, Any]]:
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = None
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                yield f"{p}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise LongdocError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    except csv.Error as e:  # e.g. a field over csv's size limit: name the line
        where = f"{p}:{reader.line_num}" if reader is not None else str(p)
        raise LongdocError(f"{where}: not valid CSV ({e})") from None


def _bad(skipped: list[str] | None, message: str) -> None:
    if skipped is None:
        raise LongdocError(message + " (use --skip-bad-lines to skip such records)")
    skipped.append(message)


def _key(row: dict, key: str, setting: str) -> Any:
    if key not in row:
        keys = ", ".join(sorted(map(str, row))[:8]) or "none"
        raise _BadRecord(f"no {key!r} key (keys: {keys}); choose it with --set data.{setting}=...")
    return row[key]


def _maybe_json(value: Any) -> Any:
    """CSV cells holding a JSON list or object (labels, answers) are decoded."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ----------------------------------------------------------------------------------------------
# Classification


def load_classification(path: str, data: DataSection) -> ClassificationData:
    """Documents with a string label (single-label) or a list of labels (multi-label) each."""
    skipped: list[str] | None = [] if data.skip_bad_lines else None
    docs: list[LabelledDoc] = []
    any_list = False
    for where, row in iter_rows(path, data.format, skipped):
        try:
            text = _key(row, data.text_key, "text_key")
            if not isinstance(text, str):
                raise _BadRecord(f"{data.text_key!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise _BadRecord(f"{data.text_key!r} is empty")
            label = _maybe_json(_key(row, data.label_key, "label_key"))
            if isinstance(label, list):
                any_list = True
                if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in label):
                    raise _BadRecord(f"{data.label_key!r} must be a string or a list of strings")
                labels = tuple(dict.fromkeys(str(x) for x in label))
            elif isinstance(label, (str, int)) and not isinstance(label, bool) and str(label).strip():
                labels = (str(label).strip(),)
            else:
                raise _BadRecord(f"missing label: {data.label_key!r} is {json.dumps(label)}")
            group = _group(row, data.group_key)
        except _BadRecord as e:
            _bad(skipped, f"{where}: {e}")
            continue
        doc_id = row.get(data.id_key)
        doc_id = str(doc_id) if doc_id is not None else where
        docs.append(LabelledDoc(doc_id, normalise_newlines(text), labels, where,
                                None if not data.group_key else group or f"\0{where}"))  # fmt: skip
    if not docs:
        raise LongdocError(f"{path}: no usable records")
    labels = sorted({x for d in docs for x in d.labels})
    return ClassificationData(docs, labels, any_list, skipped or [])


def _group(row: dict[str, Any], key: str | None) -> str | None:
    """``data.group_key``'s value as a string; None when the key is unset, or the record has no
    value (the document is then a group of its own)."""
    if not key:
        return None
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRecord(f"{key!r} (data.group_key) must be a string or a number, got {type(value).__name__}")
    return str(value).strip()


# ----------------------------------------------------------------------------------------------
# Question answering


def load_qa(path: str, data: DataSection) -> QAData:
    """SQuAD-format records: question, context, answers {text: [...], answer_start: [...]}.

    An answer whose ``answer_start`` is off but whose text occurs in the context is moved to the
    nearest occurrence (counted in ``realigned``); one whose text is not in the context at all is
    kept for evaluation and listed in ``not_in_context`` (training skips it)."""
    skipped: list[str] | None = [] if data.skip_bad_lines else None
    out = QAData([], skipped=[])
    for where, row in iter_rows(path, data.format, skipped):
        try:
            question = _key(row, data.question_key, "question_key")
            context = _key(row, data.context_key, "context_key")
            for name, value in ((data.question_key, question), (data.context_key, context)):
                if not isinstance(value, str) or not value.strip():
                    raise _BadRecord(f"{name!r} must be a non-empty string")
            answers = _maybe_json(_key(row, data.answers_key, "answers_key"))
            texts, starts = _parse_answers(answers, data.answers_key)
        except _BadRecord as e:
            _bad(skipped, f"{where}: {e}")
            continue
        fixed_starts, in_context = [], True
        for text, start in zip(texts, starts, strict=True):
            if context[start : start + len(text)] == text:
                fixed_starts.append(start)
                continue
            found = _nearest(context, text, start)
            if found is None:
                out.not_in_context.append(f"{where}: answer {text[:40]!r} is not in its context")
                in_context = False
                fixed_starts.append(start)
            else:
                out.realigned += 1
                fixed_starts.append(found)
        qid = row.get(data.id_key)
        group = row.get("title") if isinstance(row.get("title"), str) else context
        qid = str(qid) if qid is not None else where
        example = QAExample(qid, question, context, texts, tuple(fixed_starts), where, group, in_context)
        out.examples.append(example)
    out.skipped = skipped or []
    if not out.examples:
        raise LongdocError(f"{path}: no usable records")
    return out


def _parse_answers(answers: Any, key: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
        raise _BadRecord(f"{key!r} must be an object {{text: [...], answer_start: [...]}}")
    texts, starts = answers["text"], answers["answer_start"]
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(starts, int):
        starts = [starts]
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise _BadRecord(f"{key!r}: text and answer_start must be lists of the same length")
    if not all(isinstance(t, str) and t for t in texts):
        raise _BadRecord(f"{key!r}: every answer text must be a non-empty string")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in starts):
        raise _BadRecord(f"{key!r}: every answer_start must be a non-negative integer")
    return tuple(texts), tuple(starts)


def _nearest(context: str, text: str, start: int) -> int | None:
    best, i = None, context.find(text)
    while i != -1:
        if best is None or abs(i - start) < abs(best - start):
            best = i
        i = context.find(text, i + 1)
    return best


# ----------------------------------------------------------------------------------------------
# Splits


def split_dev(items: Sequence[Any], fraction: float, seed: int, group=None) -> tuple[list[Any], list[Any]]:
    """A seeded (train, dev) split; with ``group`` (item -> key) whole groups go to one side
    (QA: every question of a page), so no context is seen in both."""
    if fraction <= 0:
        return list(items), []
    rng = random.Random(seed)
    if group is None:
        order = list(range(len(items)))
        rng.shuffle(order)
        n_dev = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        dev_idx = set(order[:n_dev])
    else:
        keys = list(dict.fromkeys(group(x) for x in items))
        rng.shuffle(keys)
        dev_keys, n = set(), 0
        for k in keys:  # whole groups until the dev share is reached (at least one, not all)
            if n >= len(items) * fraction or len(dev_keys) == len(keys) - 1:
                break
            dev_keys.add(k)
            n += sum(1 for x in items if group(x) == k)
        dev_idx = {i for i, x in enumerate(items) if group(x) in dev_keys}
    train = [x for i, x in enumerate(items) if i not in dev_idx]
    dev = [x for i, x in enumerate(items) if i in dev_idx]
    return train, dev


def question_windows(examples: Sequence[QAExample], tokenizer, cfg) -> Iterator[tuple[QAExample, list]]:
    """Each QA example with its (question, context) windows (``cfg``: a LongdocConfig); a context
    shared by several questions is tokenized once."""
    cache: dict[str, Any] = {}
    for ex in examples:
        enc = cache.get(ex.context)
        if enc is None:
            enc = cache[ex.context] = tokenizer.encode(ex.context)
        tk = cfg.tokenization
        yield (
            ex,
            tokenizer.question_windows(
                ex.question, enc, cfg.model.max_length, tk.stride, tk.max_question_length
            ),
        )
