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


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraph_blocks(text: str, spans: list[tuple[int, int]], sizes: list[int], max_size: int) -> list[int]:
    """The block (0, 1, ...) of each of ``text``'s sentence ``spans``: consecutive sentences with no
    blank line between them (a paragraph), cut before a sentence that would take the block's summed
    ``sizes`` (e.g. tokens) beyond ``max_size``; a sentence larger than that is a block of its own."""
    blocks: list[int] = []
    size = 0
    for i, (s, _) in enumerate(spans):
        if not i or _BLANK_LINE.search(text, spans[i - 1][1], s) or size + sizes[i] > max_size:
            blocks.append(blocks[-1] + 1 if blocks else 0)
            size = 0
        else:
            blocks.append(blocks[-1])
        size += sizes[i]
    return blocks


def snippet(text: str, start: int, end: int, max_chars: int = 200) -> str:
    """The span as one line, shortened with an ellipsis."""
    s = " ".join(text[start:end].split())
    return s if len(s) <= max_chars else s[: max_chars - 1].rstrip() + "\u2026"


# -- which spans are prose -------------------------------------------------------------------------
# A span is a candidate answer only if it is prose: not a heading (a short line of its own without
# end punctuation, a question standing as its own line, a line over an adornment), not an adornment
# ("-----", "=====", reST/Markdown rules) and not code (interpreter prompts, indented blocks, lines
# dense in symbols, lines without letters such as printed numbers).
_ADORNMENT = re.compile(r"^[ \t]*([-=~^*#+_:'\"`<>])\1{2,}[ \t]*$")  # not "...": a prompt
_BULLET = re.compile(r"^[ \t]*(?:[-*+\u2022]|\d+[.)]|[a-z][.)])[ \t]+\S")
_MARKDOWN_HEADING = re.compile(r"^#{1,6}[ \t]+\S")
_PROMPT = re.compile(r"^[ \t]*(?:>>>|\.\.\.(?:[ \t]|$)|\$[ \t]|%[ \t]|In \[\d+\]:)")
_CODE_END = re.compile(r"[;{}]$|^[ \t]*[})\]]")
_SYMBOLS = set("=(){}[]<>;*/+\\|_#@$%&^~`")
_SENTENCE_END = ".!:;,\u2026\"'\u201d\u2019)\u3002\uff01\uff61\u0964"
HEADING_WORDS = 12  # a line of its own without end punctuation and at most this many words: a heading


def _is_code_line(line: str) -> bool:
    stripped = line.strip()
    if not stripped:
        return False
    if _PROMPT.match(line) or _CODE_END.search(stripped) or not any(c.isalpha() for c in stripped):
        return True
    if _BULLET.match(line):
        return False  # a list item
    if line[:1] in " \t" and len(line) - len(line.lstrip()) >= 4:
        return True
    if stripped.endswith((".", "!", "?")):
        return False  # a sentence, even one that names code such as int('144') or seq[-n]
    symbols = sum(c in _SYMBOLS for c in stripped)
    return symbols >= 2 and symbols / len(stripped.replace(" ", "")) >= 0.08


def span_kind(text: str, start: int, end: int) -> str:
    """What a sentence span of ``text`` is: "prose", "heading", "adornment" or "code"."""
    lines = [line for line in text[start:end].split("\n") if line.strip()]
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    next_line_at = len(text) if line_end < 0 else line_end + 1
    after_end = text.find("\n", next_line_at)
    after = text[next_line_at : len(text) if after_end < 0 else after_end]  # the next line
    if all(_ADORNMENT.match(line) for line in lines):
        return "adornment"
    if any(_ADORNMENT.match(line) for line in lines) or _ADORNMENT.match(after):
        return "heading"  # a title over or under its adornment
    own_line = (
        not text[line_start:start].strip() and not text[end : len(text) if line_end < 0 else line_end].strip()
    )
    body = text[start:end].strip()
    if _MARKDOWN_HEADING.match(body) and own_line:
        return "heading"
    if _PROMPT.match(lines[0]) or sum(_is_code_line(line) for line in lines) * 2 > len(lines):
        return "code"
    if own_line and len(lines) == 1 and not _BULLET.match(body):
        if body.endswith(("?", "\uff1f", "\u061f")):
            return "heading"  # a question on its own line asks; it does not answer
        if not body.endswith(tuple(_SENTENCE_END)) and len(body.split()) <= HEADING_WORDS:
            return "heading"
    return "prose"


def context_around(text: str, start: int, end: int, margin: int = 120) -> str:
    """``text[start:end]`` with about ``margin`` characters of its surroundings on each side, as one
    line; the surroundings are cut at whitespace (never inside a word), a cut marked with an ellipsis.
    The span itself is always whole."""
    left = max(0, start - margin)
    if left > 0 and not text[left - 1].isspace():
        space = next((i for i in range(left, start) if text[i].isspace()), start)
        left = space  # the first whole word after the cut (or the span itself)
    right = min(len(text), end + margin)
    if right < len(text) and not text[right].isspace():
        space = next((i for i in range(right, end, -1) if text[i - 1].isspace()), end)
        right = space
    body = " ".join(text[left:right].split())
    return ("\u2026 " if left > 0 else "") + body + (" \u2026" if right < len(text) else "")
