"""The documents a command was given: files, stdin ("-"), directories (with recursion) and JSON lines.

Yields documents and per-input errors in a stable order, so one bad file (or JSON-lines record)
among many is reported and the rest still processed, and ``--shard K/N`` splits a corpus the same
way on every machine. Under a directory only regular files are read: named pipes (which would
block), sockets, devices and broken links are skipped with a warning.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LongdocError, UsageError
from ..textio import MAX_DOCUMENT_BYTES, RecordError, iter_jsonl_documents, read_document


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
) -> Iterator[InputDoc | InputError]:
    """Every document of ``paths`` in order; with ``shard`` (K, N) only items K, K+N, K+2N, ..."""
    if sum(p == "-" for p in paths) > 1:
        raise UsageError("stdin ('-') can be given only once")
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
            elif _is_jsonl(item):
                yield from _jsonl(item, text_key, id_key, mine, max_bytes)
            elif mine():
                try:
                    doc = read_document(item, max_bytes)
                except LongdocError as e:
                    yield InputError(item, str(e))
                else:
                    yield InputDoc(doc.source if item != "-" else "-", doc.text, "path", doc.n_replaced)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".ndjson"))


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
                    yield InputError(item.where, item.message)
                continue
            doc_id, text, line_no = item
            if not text.strip():
                yield InputError(f"{path}:{line_no}", f"{path}:{line_no}: the document is empty")
            else:
                yield InputDoc(doc_id, text, "id")
    except LongdocError as e:
        yield InputError(path, f"{e} (the rest of this file is skipped)")
    if n_bad > MAX_RECORD_ERRORS:
        more = n_bad - MAX_RECORD_ERRORS
        yield InputError(path, f"{path}: {more} more bad record(s) not shown ({n_bad} in all)")
