"""Reading documents: files, stdin and JSON lines, decoded and normalised the same way everywhere.

Text is UTF-8 (a BOM is stripped; UTF-16 with a BOM is accepted too), line ends become "\\n", invalid
bytes become U+FFFD and are counted so the caller can warn. Binary files (NUL bytes) and empty
documents are refused with one clear line naming the source. The library never prints.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import LongdocError

_REPLACEMENT_UTF8 = "\ufffd".encode()


@dataclass(frozen=True)
class Document:
    """A decoded document.

    ``text`` is the *normalised* text (BOM removed, CRLF/CR -> LF): every character offset that
    longdoc reports (token offsets, answer spans) refers to this string, not to the raw bytes.
    ``n_replaced`` counts invalid byte sequences that were replaced by U+FFFD.
    """

    text: str
    source: str
    n_replaced: int = 0


# Compressed files and archives, by their first bytes (a .docx or .odt is a zip).
_ARCHIVES = tuple(
    (re.compile(magic, re.DOTALL), kind)
    for magic, kind in (
        (rb"\x1f\x8b\x08", "gzip-compressed"),
        (rb"BZh[1-9]1AY&SY", "bzip2-compressed"),
        (rb"\xfd7zXZ\x00", "xz-compressed"),
        (rb"\x28\xb5\x2f\xfd", "zstd-compressed"),
        (rb"PK\x03\x04", "zip (or .docx/.odt)"),
    )
)


def container_kind(head: bytes) -> str | None:
    """'a gzip-compressed file', 'a PDF', ... when the first bytes say the data is not plain text."""
    if head.startswith(b"%PDF-"):
        return "a PDF (e.g. pdftotext gives its text)"
    kind = next((kind for magic, kind in _ARCHIVES if magic.match(head)), None)
    return None if kind is None else f"a {kind} file"


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_text(data: bytes, source: str) -> Document:
    """Decode raw bytes as ``read_document`` does (without the emptiness check)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
        n_replaced = text.count("\ufffd")
    else:
        kind = container_kind(data)
        if kind is not None:
            raise LongdocError(f"{source}: is {kind}; extract the text first")
        if b"\x00" in data:
            raise LongdocError(f"{source}: looks like a binary file (it contains NUL bytes), not text")
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        text = data.decode("utf-8", errors="replace")
        # A genuine U+FFFD in the input is the valid sequence EF BF BD; every other one is ours.
        n_replaced = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
    return Document(normalise_newlines(text), source, n_replaced)


def read_document(path: str) -> Document:
    """Read one document from a file, or from stdin when ``path`` is "-".

    Raises ``LongdocError`` for a missing, unreadable, directory, binary or empty/whitespace-only
    source. Invalid UTF-8 is replaced (see ``Document.n_replaced``), never fatal.
    """
    if path == "-":
        source = "<stdin>"
        data = sys.stdin.buffer.read()
    else:
        source = path
        p = Path(path)
        if p.is_dir():
            raise LongdocError(f"{path}: is a directory, not a text file")
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise LongdocError(f"{path}: no such file") from None
        except PermissionError:
            raise LongdocError(f"{path}: permission denied") from None
        except OSError as e:
            raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None
    doc = decode_text(data, source)
    if not doc.text.strip():
        what = "empty" if not doc.text else "only whitespace"
        raise LongdocError(f"{source}: the document is {what}; nothing to process")
    return doc


def iter_jsonl_documents(
    path: str, text_key: str = "text", id_key: str | None = "id"
) -> Iterator[tuple[str, str, int]]:
    """Yield ``(id, text, line_no)`` for each JSON object of a JSON-lines file ("-" = stdin).

    Blank lines are skipped. The id is ``record[id_key]`` as a string, or the 1-based line number
    when the key is absent (or ``id_key`` is None). Texts are newline-normalised like
    ``read_document``; an empty text is yielded as is (the caller reports it and goes on).
    A malformed line (not UTF-8, not JSON, not an object, no ``text_key``, text not a string)
    raises ``LongdocError`` naming ``file:line``.
    """
    source = "<stdin>" if path == "-" else path
    if path == "-":
        yield from _iter_jsonl(sys.stdin.buffer, source, text_key, id_key)
        return
    p = Path(path)
    if p.is_dir():
        raise LongdocError(f"{path}: is a directory, not a JSON-lines file")
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise LongdocError(f"{path}: no such file") from None
    except OSError as e:
        raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None
    with f:
        yield from _iter_jsonl(f, source, text_key, id_key)


def parse_jsonl_line(raw: bytes, where: str, first: bool = False) -> dict | None:
    """One JSON-lines record: the object, or None for a blank line. ``first``: the file's first line
    (a UTF-8 BOM is dropped). A bad line raises ``LongdocError`` that starts with ``where``."""
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LongdocError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LongdocError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise LongdocError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _iter_jsonl(
    f: BinaryIO, source: str, text_key: str, id_key: str | None
) -> Iterator[tuple[str, str, int]]:
    for line_no, raw in enumerate(f, start=1):
        where = f"{source}:{line_no}"
        record = parse_jsonl_line(raw, where, first=line_no == 1)
        if record is None:
            continue
        if text_key not in record:
            keys = ", ".join(sorted(record)[:8]) or "none"
            raise LongdocError(f"{where}: no {text_key!r} key (keys: {keys}); choose it with --text-key")
        text = record[text_key]
        if not isinstance(text, str):
            raise LongdocError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
        doc_id = record.get(id_key) if id_key is not None else None
        yield (str(line_no) if doc_id is None else str(doc_id)), normalise_newlines(text), line_no
