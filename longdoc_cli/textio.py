"""Reading documents: files, stdin and JSON lines, decoded and normalised the same way everywhere.

Text is UTF-8 (a BOM is stripped; UTF-16 with a BOM is accepted too), line ends become "\\n", invalid
bytes become U+FFFD and are counted so the caller can warn. Binary files (NUL bytes) and empty
documents are refused with one clear line naming the source. Everything is read in bounded chunks,
checked as it streams: one document (or JSON-lines record) may hold at most ``MAX_DOCUMENT_BYTES``
(``--max-bytes``), so ``/dev/zero`` or an endless pipe fails fast instead of filling the memory.
The library never prints.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import LongdocError, UsageError

_REPLACEMENT_UTF8 = "\ufffd".encode()
MAX_DOCUMENT_BYTES = 64 << 20  # one document or JSON-lines record; --max-bytes raises it
MAX_SIDE_FILE_BYTES = 16 << 20  # a config, labels or questions file
_CHUNK = 1 << 20
_MAX_SKIP = 1 << 30  # read past (not kept) to find the end of a record over the limit
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30,
          "gb": 1 << 30, "t": 1 << 40, "tb": 1 << 40}  # fmt: skip


def parse_size(text: str, option: str = "--max-bytes") -> int:
    """'64M', '1g', '500k', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,6})?)\s*([a-zA-Z]{0,2})\s*", text or "")
    unit = m and _UNITS.get(m[2].lower())
    if not m or unit is None or float(m[1]) * unit < 1:
        shown = text if len(text or "") <= 40 else text[:40] + "..."
        raise UsageError(f"{option} must be a size such as 64M, 1G or 500000, not {shown!r}")
    return int(float(m[1]) * unit)


def format_size(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}iB"
    return f"{n} bytes"


def _too_large(source: str, limit: int, what: str = "one document") -> LongdocError:
    return LongdocError(
        f"{source}: larger than the {format_size(limit)} limit on {what}; "
        "raise it with --max-bytes (e.g. --max-bytes 1G)"
    )


def _binary(source: str) -> LongdocError:
    return LongdocError(f"{source}: looks like a binary file (it contains NUL bytes), not text")


def read_limited(f: BinaryIO, source: str, limit: int, what: str = "one document") -> bytes:
    """All of ``f``, read in chunks of at most 1 MiB; fails as soon as the data is binary (a
    compressed file, an archive, NUL bytes outside UTF-16) or longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    utf16: bool | None = None  # decided from the first 16 bytes
    while True:
        chunk = f.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if utf16 is None and total >= 16:
            utf16 = _check_head(b"".join(chunks), source)
        elif utf16 is False and b"\x00" in chunk:
            raise _binary(source)
        if total > limit:
            raise _too_large(source, limit, what)
    data = b"".join(chunks)
    if utf16 is None:
        _check_head(data, source)
    return data


def _check_head(data: bytes, source: str) -> bool:
    """Whether ``data`` (the first bytes, or all) is UTF-16 with a BOM; raises if it is binary."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    kind = container_kind(data)
    if kind is not None:
        raise LongdocError(f"{source}: is {kind}; extract the text first")
    if b"\x00" in data:
        raise _binary(source)
    return False


def open_input(path: str, what: str = "text file") -> BinaryIO:
    """``path`` opened for reading, or a one-line LongdocError: missing, a broken link, a directory,
    a socket, no permission. Named pipes and devices are opened (the reads are bounded)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise LongdocError(f"{path}: a broken symbolic link (its target does not exist)") from None
        raise LongdocError(f"{path}: no such file") from None
    except OSError as e:
        raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise LongdocError(f"{path}: is a directory, not a {what}")
    if stat.S_ISSOCK(st.st_mode):
        raise LongdocError(f"{path}: is a socket, not a {what}")
    try:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except PermissionError:
        raise LongdocError(f"{path}: permission denied") from None
    except OSError as e:
        raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_text_file(path: str, what: str, limit: int = MAX_SIDE_FILE_BYTES) -> str:
    """A small UTF-8 text file (config, labels, questions; "-" = stdin), read bounded and checked."""
    source = "<stdin>" if path == "-" else path
    if path == "-":
        data = read_limited(sys.stdin.buffer, source, limit, what)
    else:
        with open_input(path, what) as f:
            data = read_limited(f, source, limit, what)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LongdocError(f"{source}: not valid UTF-8 (byte {e.start})") from None


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
    if _check_head(data, source):  # UTF-16 with a BOM
        text = data.decode("utf-16", errors="replace")
        n_replaced = text.count("\ufffd")
    else:
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        text = data.decode("utf-8", errors="replace")
        # A genuine U+FFFD in the input is the valid sequence EF BF BD; every other one is ours.
        n_replaced = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
    return Document(normalise_newlines(text), source, n_replaced)


def read_document(path: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    """Read one document from a file, or from stdin when ``path`` is "-", at most ``max_bytes``.

    Raises ``LongdocError`` for a missing, unreadable, directory, socket, binary, too large or
    empty/whitespace-only source. Invalid UTF-8 is replaced (see ``Document.n_replaced``), never fatal.
    """
    if path == "-":
        source = "<stdin>"
        data = read_limited(sys.stdin.buffer, source, max_bytes)
    else:
        source = path
        with open_input(path) as f:
            try:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                    raise _too_large(source, max_bytes)
                data = read_limited(f, source, max_bytes)
            except OSError as e:
                raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None
    doc = decode_text(data, source)
    if not doc.text.strip():
        what = "empty" if not doc.text else "only whitespace"
        raise LongdocError(f"{source}: the document is {what}; nothing to process")
    return doc


@dataclass(frozen=True)
class RecordError:
    """One bad JSON-lines record: ``where`` is ``file:line``, ``message`` starts with it."""

    where: str
    message: str


def iter_jsonl_documents(
    path: str,
    text_key: str = "text",
    id_key: str | None = "id",
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> Iterator[tuple[str, str, int] | RecordError]:
    """Yield ``(id, text, line_no)`` for each JSON object of a JSON-lines file ("-" = stdin), and a
    ``RecordError`` naming ``file:line`` for each bad record (not UTF-8, not JSON, not an object, no
    ``text_key``, text not a string, an id that is not a string or number, longer than ``max_bytes``):
    the records after it are still read.

    Blank lines are skipped. The id is ``record[id_key]`` as a string, or the 1-based line number
    when the key is absent (or ``id_key`` is None). Texts are newline-normalised like
    ``read_document``; an empty text is yielded as is (the caller reports it and goes on).
    A file that cannot be read, or is binary, raises ``LongdocError``.
    """
    if path == "-":
        yield from _iter_jsonl(sys.stdin.buffer, "<stdin>", text_key, id_key, max_bytes)
        return
    with open_input(path, "JSON-lines file") as f:
        try:
            yield from _iter_jsonl(f, path, text_key, id_key, max_bytes)
        except OSError as e:
            raise LongdocError(f"{path}: cannot read it ({e.strerror or e})") from None


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
    except ValueError:  # an integer past Python's 4300-digit limit
        raise LongdocError(f"{where}: holds a number too long to read (over 4300 digits)") from None
    except RecursionError:
        raise LongdocError(f"{where}: nested too deeply to read") from None
    if not isinstance(record, dict):
        raise LongdocError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_lines(f: BinaryIO, source: str, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line_no, raw line)`` of a binary stream, each line read with at most ``limit`` bytes in
    memory: a longer line is skipped (read in chunks, not kept, up to 1 GiB or 4 ``limit`` more,
    to find its end) and given as None. NUL bytes, never in JSON lines or CSV, mean a binary file
    (LongdocError)."""
    line_no = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        line_no += 1
        if line_no == 1:
            kind = container_kind(raw)
            if kind is not None:
                raise LongdocError(f"{source}: is {kind}; extract it first")
        if b"\x00" in raw:
            raise LongdocError(f"{source}:{line_no}: holds NUL bytes: a binary file, not JSON lines")
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line_no, raw
            continue
        skipped = 0
        while not raw.endswith(b"\n"):
            raw = f.readline(_CHUNK)
            skipped += len(raw)
            if not raw:
                break
            if b"\x00" in raw or skipped > max(4 * limit, _MAX_SKIP):
                raise LongdocError(
                    f"{source}:{line_no}: a record larger than the {format_size(limit)} limit on one "
                    "document and no end in sight; the rest of this file is skipped (--max-bytes raises it)"
                )
        yield line_no, None


def _iter_jsonl(
    f: BinaryIO, source: str, text_key: str, id_key: str | None, limit: int
) -> Iterator[tuple[str, str, int] | RecordError]:
    for line_no, raw in iter_lines(f, source, limit):
        where = f"{source}:{line_no}"
        if raw is None:
            yield RecordError(where, str(_too_large(where, limit)))
            continue
        try:
            record = parse_jsonl_line(raw, where, first=line_no == 1)
            if record is None:
                continue
            yield _record_document(record, where, line_no, text_key, id_key)
        except LongdocError as e:
            yield RecordError(where, str(e))


def _record_document(
    record: dict, where: str, line_no: int, text_key: str, id_key: str | None
) -> tuple[str, str, int]:
    if text_key not in record:
        keys = ", ".join(preview(k, 30) for k in sorted(record)[:8]) or "none"
        raise LongdocError(
            f"{where}: no {preview(text_key, 40)} key (keys: {keys}); choose it with --text-key"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise LongdocError(f"{where}: {preview(text_key, 40)} must be a string, got {type(text).__name__}")
    doc_id = record.get(id_key) if id_key is not None else None
    if doc_id is not None and not isinstance(doc_id, (str, int, float)):
        raise LongdocError(
            f"{where}: the id ({preview(id_key, 40)}) must be a string or a number, "
            f"got {type(doc_id).__name__}"
        )
    return (str(line_no) if doc_id is None else str(doc_id)), normalise_newlines(text), line_no


def preview(value: object, limit: int = 60) -> str:
    """``repr`` of a string, cut to ``limit`` characters with its length when longer: error messages
    show a bounded preview of a bad value."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
