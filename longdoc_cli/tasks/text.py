"""Plain-text helpers for the tasks: sentence and passage spans with character offsets."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (and a closing quote or bracket, kept in the sentence) followed by space
# and a capital, digit or opening quote; at a CJK full stop, exclamation or question mark, a danda
# or an Arabic question mark (scripts without capitals, often without spaces); at a line break
# before a list item; or at a blank line.
_CLOSE = "\"'\u201d\u2019)\\]\u300d\u300f\uff09"  # closing quotes and brackets
_END = ".!?"
_END_NO_CAPITALS = "\u3002\uff01\uff1f\uff61\u0964\u061f"  # 。！？｡ । ؟


def _after(ends: str) -> str:  # just after an end mark, or after an end mark and one closer
    return f"(?:(?<=[{ends}])|(?<=[{ends}][{_CLOSE}]))(?![{_CLOSE}])"


_BREAK = re.compile(
    _after(_END) + r"[ \t]+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
    "|" + _after(_END_NO_CAPITALS) + r"[ \t]*(?=\S)"
    r"|\n[ \t]*\n\s*"
    r"|\n(?=[ \t]*(?:[-*\u2022]|\d+[.)])[ \t])"
)
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs", "jr", "sr", "prof", "etc", "fig", "e.g", "i.e"}


def sentence_spans(text: str, max_chars: int = 1000) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, whitespace trimmed.

    Sentences longer than ``max_chars`` (code, tables) are cut at line breaks, then hard.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BREAK.finditer(text):
        if m.group(0)[:1] not in "\n" and _ends_with_abbreviation(text, start, m.start()):
            continue
        spans.extend(_trimmed(text, start, m.start(), max_chars))
        start = m.end()
    spans.extend(_trimmed(text, start, len(text), max_chars))
    return spans


def _ends_with_abbreviation(text: str, start: int, end: int) -> bool:
    word = text[max(start, end - 6) : end].rsplit(None, 1)[-1] if end > start else ""
    return word.rstrip(".").lower() in _ABBREVIATIONS and word.endswith(".")


def _trimmed(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start >= end:
        return []
    if end - start <= max_chars:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    while start < end:
        cut = min(end, start + max_chars)
        if cut < end:
            newline = text.rfind("\n", start + 1, cut)
            cut = newline if newline > start else cut
        out.extend(_trimmed(text, start, cut, max_chars) if cut - start <= max_chars else [(start, cut)])
        start = cut
    return out


def passage_spans(text: str, target_chars: int = 400) -> list[tuple[int, int]]:
    """Consecutive sentences grouped into passages of about ``target_chars`` (never across a blank line
    unless a paragraph is tiny)."""
    passages: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for s, e in sentence_spans(text):
        if cur is None:
            cur = (s, e)
        elif e - cur[0] <= target_chars:
            cur = (cur[0], e)
        else:
            passages.append(cur)
            cur = (s, e)
    if cur is not None:
        passages.append(cur)
    return passages


def snippet(text: str, start: int, end: int, max_chars: int = 200) -> str:
    """The span as one line, shortened with an ellipsis."""
    s = " ".join(text[start:end].split())
    return s if len(s) <= max_chars else s[: max_chars - 1].rstrip() + "\u2026"
