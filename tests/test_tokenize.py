"""Tokenization of long documents: offsets, no truncation, windows, QA pairs, global tokens."""

from __future__ import annotations

import json
import time

import pytest
from hf_checkpoints import make_tiny_roberta, write_bert_tokenizer

from longdoc_cli.errors import LongdocError
from longdoc_cli.tokenize import DocumentTokenizer, Encoding


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory) -> DocumentTokenizer:
    d = tmp_path_factory.mktemp("bert_tok")
    write_bert_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 64}))
    return DocumentTokenizer.from_dir(d)


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory) -> DocumentTokenizer:
    d = tmp_path_factory.mktemp("roberta")
    make_tiny_roberta(d)
    return DocumentTokenizer.from_dir(d, max_tokens=40)


TEXT = "The Quick brown fox, jumps over the lazy dog.\r\nÉtude: foxes jump 42 times!  Done?\n" * 7


def check_offsets(tok: DocumentTokenizer, text: str, enc: Encoding) -> None:
    for i, (a, b) in zip(enc.ids, enc.offsets, strict=True):
        piece = tok.tokenizer.id_to_token(i)
        assert 0 <= a < b <= len(text)
        if tok.family == "bert" and piece != "[UNK]":
            # the lower-cased, accent-stripped source span is the token itself
            assert piece.removeprefix("##") == text[a:b].lower().replace("é", "e")


def test_bert_family_and_specials(bert_tok):
    assert (bert_tok.family, bert_tok.cls_id, bert_tok.sep_id, bert_tok.pad_id) == ("bert", 2, 3, 0)
    assert bert_tok.max_tokens == 64


def test_offsets_map_back_bert(bert_tok):
    enc = bert_tok.encode(TEXT)
    assert len(enc) > 64  # longer than the model: nothing truncated
    check_offsets(bert_tok, TEXT, enc)


def test_offsets_map_back_roberta(roberta_tok):
    enc = roberta_tok.encode(TEXT)
    assert roberta_tok.family == "roberta"
    checked = 0
    for i, (a, b) in zip(enc.ids, enc.offsets, strict=True):
        assert 0 <= a <= b <= len(TEXT)
        piece = roberta_tok.tokenizer.decode([i])  # byte-level: a piece may hold half a character
        if piece.strip() and "\ufffd" not in piece:
            assert piece.strip() == TEXT[a:b].strip()
            checked += 1
    assert checked > len(enc) // 2


@pytest.mark.parametrize("max_tokens,stride", [(64, 16), (20, 0), (17, 14), (64, 61)])
def test_document_windows_cover_every_token(bert_tok, max_tokens, stride):
    enc = bert_tok.encode(TEXT)
    windows = bert_tok.document_windows(enc, max_tokens=max_tokens, stride=stride)
    assert windows[0].doc_start == 0 and windows[-1].doc_end == len(enc)
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert prev.doc_end - nxt.doc_start == stride  # overlap
    for w in windows:
        assert len(w) <= max_tokens
        assert w.input_ids[0] == bert_tok.cls_id and w.input_ids[-1] == bert_tok.sep_id
        assert w.input_ids[1:-1] == enc.ids[w.doc_start : w.doc_end]
        assert w.offsets[1:-1] == enc.offsets[w.doc_start : w.doc_end] and w.offsets[0] is None
        assert w.global_mask == [True] + [False] * (len(w) - 1)
        assert w.token_type_ids == [0] * len(w)


def test_short_and_empty_documents(bert_tok):
    (w,) = bert_tok.document_windows(bert_tok.encode("fox"))
    assert len(w) == 3 and (w.doc_start, w.doc_end) == (0, 1)
    (w,) = bert_tok.document_windows(Encoding([], []))
    assert w.input_ids == [bert_tok.cls_id, bert_tok.sep_id]


def test_bad_stride(bert_tok):
    with pytest.raises(LongdocError, match="stride"):
        bert_tok.document_windows(bert_tok.encode(TEXT), max_tokens=20, stride=18)
    with pytest.raises(LongdocError, match="exceeds the model's limit"):
        bert_tok.document_windows(bert_tok.encode(TEXT), max_tokens=65)


def test_question_windows_bert(bert_tok):
    enc = bert_tok.encode(TEXT)
    q = bert_tok.encode("how many times do foxes jump?").ids
    windows = bert_tok.question_windows("how many times do foxes jump?", enc, max_tokens=40, doc_stride=8)
    assert windows[0].doc_start == 0 and windows[-1].doc_end == len(enc)
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert prev.doc_end - nxt.doc_start == 8
    for w in windows:
        n_ctx = w.doc_end - w.doc_start
        assert len(w) <= 40
        assert w.input_ids == [2, *q, 3, *enc.ids[w.doc_start : w.doc_end], 3]
        assert w.token_type_ids == [0] * (len(q) + 2) + [1] * (n_ctx + 1)
        assert w.global_mask == [True] * (len(q) + 1) + [False] * (n_ctx + 2)  # before the first [SEP]
        assert w.offsets == [None] * (len(q) + 2) + enc.offsets[w.doc_start : w.doc_end] + [None]
        assert not w.question_truncated


def test_question_windows_roberta_and_truncation(roberta_tok):
    enc = roberta_tok.encode(TEXT)
    s, e = roberta_tok.cls_id, roberta_tok.sep_id
    windows = roberta_tok.question_windows(
        "the quick brown fox " * 5, enc, doc_stride=4, max_question_tokens=6
    )
    for w in windows:
        assert w.question_truncated
        assert w.input_ids[:1] == [s] and w.input_ids[7:9] == [e, e] and w.input_ids[-1] == e
        assert w.global_mask[:7] == [True] * 7 and not any(w.global_mask[7:])
        assert w.token_type_ids == [0] * len(w)


def test_collate_pads(bert_tok):
    enc = bert_tok.encode(TEXT)
    windows = bert_tok.document_windows(enc, max_tokens=50, stride=10)
    batch = bert_tok.collate(windows)
    T = max(len(w) for w in windows)
    assert batch["input_ids"].shape == (len(windows), T)
    last = windows[-1]
    assert batch["attention_mask"][-1].sum() == len(last)
    assert batch["input_ids"][-1, len(last) :].eq(bert_tok.pad_id).all()
    assert (
        batch["global_attention_mask"][:, 0].eq(1).all() and batch["global_attention_mask"][:, 1:].eq(0).all()
    )


@pytest.mark.default_model
def test_default_tokenizer_does_not_truncate_and_1mb_is_fast():
    from longdoc_cli.hub import default_source_dir

    tok = DocumentTokenizer.from_dir(default_source_dir(), max_tokens=512)
    text = ("Long documents need long models; the quick brown fox jumps over the lazy dog 1234. " * 13000)[
        :1_000_000
    ]
    t0 = time.perf_counter()
    enc = tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert len(enc) > 200_000  # the shipped tokenizer.json would stop at 128
    assert elapsed < 15, f"tokenizing 1 MB took {elapsed:.1f} s"
    a, b = enc.offsets[-1]
    assert text[a:b].lower() == tok.tokenizer.id_to_token(enc.ids[-1]).removeprefix("##")


def test_special_tokens_written_in_the_text_are_text(tmp_path):
    """A document about BERT may contain "[SEP]" or "[PAD]": those are characters, not control tokens."""
    from longdoc_cli.tokenize import DocumentTokenizer, load_tokenizer
    from tests.fixtures_tiny import build_tiny_model

    tokenizer = load_tokenizer(build_tiny_model(tmp_path / "m"))
    tokenizer.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])  # as real checkpoints declare them
    assert tokenizer.encode("[SEP]", add_special_tokens=False).tokens == ["[SEP]"]
    tok = DocumentTokenizer(tokenizer, "bert", 64)
    enc = tok.encode("the [SEP] code [PAD] [CLS] value")
    assert not {tok.cls_id, tok.sep_id, tok.pad_id} & set(enc.ids)
    windows = tok.question_windows("what [SEP] value", enc, 64, 8, 16)
    assert windows[0].input_ids.count(tok.sep_id) == 2  # only the real separators


def test_unknown_share(tmp_path):
    from longdoc_cli.tokenize import DocumentTokenizer
    from tests.fixtures_tiny import build_tiny_model

    tok = DocumentTokenizer.from_dir(build_tiny_model(tmp_path / "m"))
    for text, low, high in [
        ("the code is a value", 0.0, 0.0),
        ("\u2603\u2603 \u2603 the", 0.5, 0.5),  # 3 of the 6 visible characters
        ("x" * 500, 1.0, 1.0),  # one 'word' longer than WordPiece reads
        ("", 0.0, 0.0),
    ]:
        assert low <= tok.unknown_share(text, tok.encode(text)) <= high, text


def test_context_budget_is_what_a_question_window_holds(tmp_path):
    from longdoc_cli.tokenize import DocumentTokenizer
    from tests.fixtures_tiny import build_tiny_model

    tok = DocumentTokenizer.from_dir(build_tiny_model(tmp_path / "m"))
    enc = tok.encode("the code of a class is a value " * 40)
    for question in ("what", "what is the value of the code in a class", "code " * 30):
        first = tok.question_windows(question, enc, 64, 8, 16)[0]
        assert len(first) == 64 and first.doc_end - first.doc_start == tok.context_budget(question, 64, 16)


# ----------------------------------------------------------------------------------------------
# A long text encoded in pieces (encode_in_pieces): the very same ids and offsets as one call


def _awkward_texts() -> dict[str, str]:
    import random

    rng = random.Random(0)
    parts = ["the quick ", "brown fox\n", "\n\n", "jumps.  ", "Étude: ", "naïve café ", "\t", "   ",
             "\U0001f600\U0001f44d\U0001f3fd", "中文テキスト", "x" * 40, "[SEP] ", "\r\n",
             "42, 7; ", "—“q”— "]  # fmt: skip
    return {
        "prose": TEXT * 40,
        "no line breaks": (TEXT * 40).replace("\n", " ").replace("\r", " "),
        "unicode and emoji": "".join(rng.choice(parts) for _ in range(900)),
        "runs of spaces": "word   \t  " * 400,
        "one very long word": "y" * 4000,
        "long lines": ("abc" * 300 + " ") * 12,
        "no spaces at all": "".join(rng.choice("abcdefg,.;") for _ in range(4000)),
    }


@pytest.fixture()
def small_pieces(monkeypatch):
    """Pieces of a few hundred characters, so that short texts cross many seams."""
    from longdoc_cli import tokenize

    monkeypatch.setattr(tokenize, "PARALLEL_MIN_CHARS", 300)
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 300)
    monkeypatch.setattr(tokenize, "OVERLAP_CHARS", 150)
    monkeypatch.setattr(tokenize, "_MARGIN_CHARS", 40)


@pytest.fixture(scope="module")
def prefix_space_tok(tmp_path_factory) -> DocumentTokenizer:
    """Byte-level BPE that adds a space in front of every text: a piece's first word differs."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    from tests.hf_checkpoints import WORDS

    tok = ByteLevelBPETokenizer(add_prefix_space=True, trim_offsets=True)
    tok.train_from_iterator([" ".join(WORDS)] * 3, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"])
    return DocumentTokenizer(tok._tokenizer, "roberta", 64)


@pytest.mark.parametrize("name", list(_awkward_texts()))
def test_encoding_in_pieces_is_one_calls_encoding(
    bert_tok, roberta_tok, prefix_space_tok, small_pieces, name
):
    from longdoc_cli.tokenize import encode_in_pieces

    text = _awkward_texts()[name]
    for tok in (bert_tok, roberta_tok, prefix_space_tok):
        one = tok.tokenizer.encode(text, add_special_tokens=False)
        want = Encoding(list(one.ids), [tuple(o) for o in one.offsets])
        assert tok.encode(text) == want, (name, tok.family)
        joined = encode_in_pieces(tok.tokenizer, text)
        assert joined is None or joined == want
        if name == "prose":  # ordinary text is joined, not left to the one call
            assert joined is not None, tok.family


def test_encoding_in_pieces_gives_up_where_it_cannot_be_sure(bert_tok, small_pieces):
    """One 'word' across every seam: no token starts in the overlap to join at, so the caller's
    single call is used (encode_in_pieces says None)."""
    from longdoc_cli.tokenize import encode_in_pieces

    assert encode_in_pieces(bert_tok.tokenizer, "z" * 2000) is None
    assert bert_tok.encode("z" * 2000) == Encoding([bert_tok.unk_id], [(0, 2000)])
