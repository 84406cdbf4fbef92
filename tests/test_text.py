"""Sentence and passage spans (the zero-shot QA answers and --explain passages)."""

from __future__ import annotations

import pytest

from longdoc_cli.tasks.text import passage_spans, sentence_spans


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Mr. Smith came. He sat down! Did he stay? Yes.",
            ["Mr. Smith came.", "He sat down!", "Did he stay?", "Yes."],
        ),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("A list:\n- one\n- two\n\nNext paragraph.", ["A list:", "- one", "- two", "Next paragraph."]),
        ("version 3.11 is out. it runs", ["version 3.11 is out. it runs"]),  # no capital: one sentence
        (
            "\u653f\u5e9c\u7684\u9996\u8981\u4efb\u52a1\u3002\u6211\u4eec\u5fc5\u987b\u52aa\u529b\uff01"
            "\u4f60\u540c\u610f\u5417\uff1f\u300c\u597d\u7684\u3002\u300d\u4ed6\u8bf4\u3002",
            [
                "\u653f\u5e9c\u7684\u9996\u8981\u4efb\u52a1\u3002",
                "\u6211\u4eec\u5fc5\u987b\u52aa\u529b\uff01",
                "\u4f60\u540c\u610f\u5417\uff1f",
                "\u300c\u597d\u7684\u3002\u300d",
                "\u4ed6\u8bf4\u3002",
            ],
        ),  # fmt: skip
        (
            "\u092f\u0939 \u0939\u0948\u0964 \u0935\u0939 \u0925\u093e\u0964",
            ["\u092f\u0939 \u0939\u0948\u0964", "\u0935\u0939 \u0925\u093e\u0964"],
        ),
        (
            "\u0647\u0644 \u0647\u0630\u0627\u061f \u0646\u0639\u0645.",
            ["\u0647\u0644 \u0647\u0630\u0627\u061f", "\u0646\u0639\u0645."],
        ),
    ],
    ids=["english", "quote", "list", "lowercase", "chinese", "hindi", "arabic"],
)
def test_sentences(text: str, expected: list[str]) -> None:
    assert sentences(text) == expected


def test_long_sentences_are_cut_and_spans_cover_the_text() -> None:
    text = "\u3002".join(["\u5b57" * 700] * 3)  # sentences of 700 characters
    spans = sentence_spans(text, max_chars=300)
    assert all(0 < b - a <= 300 for a, b in spans)
    assert "".join(text[a:b] for a, b in spans) == text  # nothing lost (no spaces to trim)
    unbroken = "x" * 2500
    assert [b - a for a, b in sentence_spans(unbroken, max_chars=1000)] == [1000, 1000, 500]


def test_passages_group_sentences() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    passages = passage_spans(text, target_chars=200)
    assert len(passages) > 3 and all(b - a <= 200 for a, b in passages)
    assert passages[0][0] == 0 and passages[-1][1] == len(text)
