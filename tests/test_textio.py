"""Reading documents: encodings, newlines, invalid bytes, binary and empty files, JSON lines."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import sys

import pytest

from longdoc_cli.errors import LongdocError
from longdoc_cli.textio import Document, RecordError, iter_jsonl_documents, read_document


def write(tmp_path, data: bytes, name: str = "doc.txt") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_utf8_bom_and_crlf_normalised(tmp_path):
    doc = read_document(write(tmp_path, b"\xef\xbb\xbfcaf\xc3\xa9\r\nline two\rthree\n"))
    assert doc == Document("café\nline two\nthree\n", str(tmp_path / "doc.txt"), 0)


def test_invalid_bytes_replaced_and_counted(tmp_path):
    # two invalid sequences; a genuine U+FFFD in the input is not counted
    doc = read_document(write(tmp_path, b"ok \xff and \xc3( and \xef\xbf\xbd"))
    assert doc.n_replaced == 2
    assert doc.text == "ok \ufffd and \ufffd( and \ufffd"


def test_utf16_with_bom(tmp_path):
    doc = read_document(write(tmp_path, "hello\r\nworld".encode("utf-16")))
    assert doc.text == "hello\nworld" and doc.n_replaced == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b" \n\t\r\n", "only whitespace"),
        (b"\x7fELF\x02\x01\x01\x00\x00binary", "binary"),
        (b"PK\x03\x04\x14\x00\x06\x00", "is a zip"),
        (gzip.compress(b"some text"), "is a gzip-compressed file"),
        (bz2.compress(b"some text"), "is a bzip2-compressed file"),
        (lzma.compress(b"some text"), "is a xz-compressed file"),
        (b"%PDF-1.7\n%\xe2\xe3", "is a PDF"),
    ],
)
def test_refused_documents(tmp_path, data, message):
    with pytest.raises(LongdocError, match=message) as e:
        read_document(write(tmp_path, data))
    assert str(tmp_path / "doc.txt") in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(LongdocError, match="no such file"):
        read_document(str(tmp_path / "nope.txt"))
    with pytest.raises(LongdocError, match="is a directory"):
        read_document(str(tmp_path))


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\r\n")))
    doc = read_document("-")
    assert doc.text == "from stdin\n" and doc.source == "<stdin>"


def test_jsonl(tmp_path):
    path = write(
        tmp_path, b'{"id": 7, "text": "a\\r\\nb"}\n\n{"text": "no id"}\n{"id": "x", "text": ""}\n', "d.jsonl"
    )
    assert list(iter_jsonl_documents(path, "text", "id")) == [
        ("7", "a\nb", 1),
        ("3", "no id", 3),
        ("x", "", 4),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json}", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"body": "x"}', "no 'text' key"),
        (b'{"text": 3}', "must be a string"),
        (b'{"text": "\xff"}', "not valid UTF-8"),
    ],
)
def test_jsonl_malformed_names_file_and_line(tmp_path, line, message):
    # the bad record is its own error; the records after it are still read
    path = write(tmp_path, b'{"text": "fine"}\n' + line + b'\n{"text": "after"}\n', "d.jsonl")
    first, bad, after = iter_jsonl_documents(path, "text", "id")
    assert first == ("1", "fine", 1) and after == ("3", "after", 3)
    assert isinstance(bad, RecordError) and bad.where == f"{path}:2"
    assert bad.message.startswith(f"{path}:2:") and message in bad.message
