"""The documents a command was given: files, stdin ("-"), directories (with recursion), JSON lines
and one-document-per-line files (``--input-format``).

Yields documents and per-input errors in a stable order, so one bad file (or JSON-lines record)
among many is reported and the rest still processed, and ``--shard K/N`` splits a corpus the same
way on every machine. Under a directory only regular files are read: named pipes (which would
block), sockets, devices and broken links are skipped with a warning.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LongdocError, UsageError
from ..textio import (
    MAX_DOCUMENT_BYTES,
    RecordError,
    decode_text,
    iter_jsonl_documents,
    iter_lines,
    open_input,
    read_document,
)

# auto: .jsonl/.ndjson files are JSON lines, stdin is when it starts with "{" (or a text key is
# given), the rest one document per file; text: one document per file; lines: one per line.
INPUT_FORMATS = ("auto", "text", "lines", "jsonl")


@dataclass(frozen=True)
class InputDoc:
    id: str
    text: str
    key: str  # "path" for files and stdin, "id" for JSON-lines records
    n_replaced: int = 0  # invalid UTF-8 bytes replaced with U+FFFD


@dataclass(frozen=True)
class InputError:
    source: str
    message: str
    warning: bool = False  # skipped but not a failure (a special file under a directory)
    record: bool = False  # a bad record (line) of a JSON-lines or lines file: --skip-bad-lines skips it
    count: int = 1  # the bad records this error stands for ("N more bad records not shown")


# Bad records of one JSON-lines file reported one by one; the rest are counted in one line.
MAX_RECORD_ERRORS = 20


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N) with 0 <= K < N."""
    if not value:
        return None
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like K/N (e.g. 0/4), not {value!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {value}: need 0 <= K < N")
    return k, n


def iter_inputs(
    paths: Sequence[str],
    *,
    recursive: bool = False,
    text_key: str = "text",
    id_key: str | None = "id",
    shard: tuple[int, int] | None = None,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    input_format: str = "auto",
    stdin_jsonl: bool = False,
) -> Iterator[InputDoc | InputError]:
    """Every document of ``paths`` in order; with ``shard`` (K, N) only items K, K+N, K+2N, ...
    ``input_format`` is one of :data:`INPUT_FORMATS`; ``stdin_jsonl``: with ``auto``, stdin is JSON
    lines (a text key was given) whatever its first byte."""
    if sum(p == "-" for p in paths) > 1:
        raise UsageError("stdin ('-') can be given only once")
    if input_format not in INPUT_FORMATS:
        raise UsageError(
            f"--input-format must be {', '.join(INPUT_FORMATS[:-1])} or jsonl, not {input_format!r}"
        )
    counter = 0

    def mine() -> bool:
        nonlocal counter
        counter += 1
        return shard is None or (counter - 1) % shard[1] == shard[0]

    for path in paths:
        for item in _expand(path, recursive):
            if isinstance(item, InputError):
                if mine():
                    yield item
            elif (kind := format_of(item, input_format, stdin_jsonl)) == "jsonl":
                yield from _jsonl(item, text_key, id_key, mine, max_bytes)
            elif kind == "lines":
                yield from _lines(item, mine, max_bytes)
            elif mine():
                try:
                    doc = read_document(item, max_bytes)
                except LongdocError as e:
                    yield InputError(item, str(e))
                else:
                    yield InputDoc(doc.source if item != "-" else "-", doc.text, "path", doc.n_replaced)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".ndjson"))


def format_of(path: str, input_format: str = "auto", stdin_jsonl: bool = False) -> str:
    """How ``path`` is read: "text", "lines" or "jsonl" (see :data:`INPUT_FORMATS`)."""
    if input_format != "auto":
        return input_format
    if path == "-":
        return (
            "jsonl" if stdin_jsonl or stdin_head().lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "text"
        )
    return "jsonl" if _is_jsonl(path) else "text"


def stdin_head(n: int = 64) -> bytes:
    """Up to ``n`` first bytes of stdin, left unread (waits for the first bytes of a pipe)."""
    buf = sys.stdin.buffer
    if hasattr(buf, "peek"):
        return buf.peek(n)[:n]
    if buf.seekable():  # an in-memory stream (tests)
        at = buf.tell()
        head = buf.read(n)
        buf.seek(at)
        return head
    return b""


def check_paths(paths: Sequence[str]) -> None:
    """Fail at once (before a model loads) when a path given does not exist or cannot be read."""
    for path in paths:
        if path == "-":
            continue
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory")
        if not os.path.exists(path):
            raise UsageError(f"{path}: a broken symbolic link (its target does not exist)")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{path}: permission denied")


def count_documents(
    paths: Sequence[str],
    *,
    recursive: bool = False,
    shard: tuple[int, int] | None = None,
    input_format: str = "auto",
    stdin_jsonl: bool = False,
    max_scan_bytes: int = 1 << 30,
) -> int | None:
    """How many documents ``paths`` hold (non-blank lines of JSON-lines and lines files), for a
    progress total; None when it cannot be known cheaply (stdin, a pipe, files over
    ``max_scan_bytes`` in all)."""
    total, scanned = 0, 0
    for path in paths:
        if path == "-":
            return None
        for item in _expand(path, recursive):
            if isinstance(item, InputError):
                total += 1
                continue
            if format_of(item, input_format, stdin_jsonl) == "text":
                total += 1
                continue
            try:
                st = os.stat(item)
            except OSError:
                total += 1
                continue
            scanned += st.st_size
            if not stat.S_ISREG(st.st_mode) or scanned > max_scan_bytes:
                return None
            try:
                with open(item, "rb") as f:
                    total += sum(1 for line in f if line.strip())
            except OSError:
                total += 1
    if shard is not None:
        total = len(range(shard[0], total, shard[1]))
    return total


def _expand(path: str, recursive: bool) -> Iterator[str | InputError]:
    if path == "-" or not Path(path).is_dir():
        yield path
        return
    if not recursive:
        yield InputError(path, f"{path}: is a directory (use -r to read the files under it)")
        return
    found = False
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(path, onerror=unreadable.append):
        while unreadable:  # a directory under it that cannot be listed
            e = unreadable.pop(0)
            yield InputError(str(e.filename), f"{e.filename}: cannot read the directory ({e.strerror or e})")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                found = True
                file = os.path.join(root, name)
                special = _special(file)
                yield file if special is None else InputError(file, f"{file}: {special}; skipped", True)
    for e in unreadable:
        yield InputError(str(e.filename), f"{e.filename}: cannot read the directory ({e.strerror or e})")
    if not found and not unreadable:
        yield InputError(path, f"{path}: the directory holds no files")


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip


def _special(path: str) -> str | None:
    """What ``path`` is when it is not a regular file (or a link to one), else None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "vanished while reading"
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _jsonl(
    path: str, text_key: str, id_key: str | None, mine, max_bytes: int
) -> Iterator[InputDoc | InputError]:
    n_bad = 0
    try:
        for item in iter_jsonl_documents(path, text_key, id_key, max_bytes):
            if not mine():
                continue
            if isinstance(item, RecordError):
                n_bad += 1
                if n_bad <= MAX_RECORD_ERRORS:
                    yield InputError(item.where, item.message, record=True)
                continue
            doc_id, text, line_no = item
            if not text.strip():
                n_bad += 1
                if n_bad <= MAX_RECORD_ERRORS:
                    where = f"{_source(path)}:{line_no}"
                    yield InputError(where, f"{where}: the document is empty", record=True)
            else:
                yield InputDoc(doc_id, text, "id")
    except LongdocError as e:
        yield InputError(path, f"{e} (the rest of this file is skipped)")
    yield from _more_bad(path, n_bad)


def _source(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _more_bad(path: str, n_bad: int) -> Iterator[InputError]:
    if n_bad > MAX_RECORD_ERRORS:
        more = n_bad - MAX_RECORD_ERRORS
        message = f"{_source(path)}: {more} more bad record(s) not shown ({n_bad} in all)"
        yield InputError(path, message, record=True, count=more)


def _lines(path: str, mine, max_bytes: int) -> Iterator[InputDoc | InputError]:
    """One document per non-blank line (fastText style); its id is ``FILE:LINE``."""
    source = _source(path)
    n_bad = 0
    try:
        with open_input(path) if path != "-" else _stdin() as f:
            for line_no, raw in iter_lines(f, source, max_bytes):
                where = f"{source}:{line_no}"
                if raw is not None and not raw.strip():
                    continue
                if not mine():
                    continue
                if raw is None:
                    n_bad += 1
                    if n_bad <= MAX_RECORD_ERRORS:
                        message = f"{where}: a line longer than the limit on one document (--max-bytes)"
                        yield InputError(where, message, record=True)
                    continue
                try:
                    doc = decode_text(raw.rstrip(b"\r\n"), where)
                except LongdocError as e:
                    n_bad += 1
                    if n_bad <= MAX_RECORD_ERRORS:
                        yield InputError(where, str(e), record=True)
                    continue
                yield InputDoc(where, doc.text, "id", doc.n_replaced)
    except LongdocError as e:
        yield InputError(path, f"{e} (the rest of this file is skipped)")
    except OSError as e:
        yield InputError(
            path, f"{source}: cannot read it ({e.strerror or e}) (the rest of this file is skipped)"
        )
    yield from _more_bad(path, n_bad)


def _stdin():
    import contextlib

    return contextlib.nullcontext(sys.stdin.buffer)
