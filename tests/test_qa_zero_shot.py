"""Zero-shot QA (a plain encoder, no QA head): prose candidates only, a context on word boundaries
for every answer, abstaining with --min-score / inference.min_score, the lexical + dense fusion,
and the one-step pseudo-relevance feedback."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli.cli import app
from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks.qa import (
    WINDOW_SCORING,
    SentenceIndex,
    SentenceScoring,
    feedback_query,
    lexical_coverage,
    score_sentences,
    words_of,
)
from longdoc_cli.tasks.text import context_around, sentence_spans, span_kind
from tests.fixtures_tiny import build_tiny_model

# A reST-like document: titles over adornments, a Markdown heading, a question heading, code.
DOC = """Team Play
=========

The team scored a goal in the football match. The player was the best of the match.

>>> score = goal + 1
>>> print(score)
2

Music Notes
-----------

The band played a song at the concert. The guitar note was the best of the album.

## The Album

if (x <= y) {
    y--;
}

Who played the song?

The band played it with the guitar at the concert.
"""
PROSE = {
    "The team scored a goal in the football match.",
    "The player was the best of the match.",
    "The band played a song at the concert.",
    "The guitar note was the best of the album.",
    "The band played it with the guitar at the concert.",
}


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.fixture()
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.rst"
    path.write_text(DOC)
    return path


def test_span_kinds():
    kinds = {DOC[s:e]: span_kind(DOC, s, e) for s, e in sentence_spans(DOC)}
    assert {t for t, k in kinds.items() if k == "prose"} == PROSE
    assert kinds["Team Play\n========="] == "heading"
    assert kinds["## The Album"] == "heading"
    assert kinds["Who played the song?"] == "heading"
    assert kinds[">>> score = goal + 1\n>>> print(score)\n2"] == "code"
    assert kinds["if (x <= y) {\n    y--;\n}"] == "code"
    lone = "Intro\n\n-----\n\nSome text here."
    assert [span_kind(lone, s, e) for s, e in sentence_spans(lone)] == ["heading", "adornment", "prose"]


@pytest.mark.parametrize(
    "text",
    [
        "Use int('144') == 144 to convert a string.",  # a sentence that names code is prose
        "Think of seq[-n] as the same as seq[len(seq)-n].",
        "Yes.",
        "* Nuitka (Cross-platform)",  # a list item
        "He asked why. Nobody knew",  # inside a line, not a line of its own
    ],
)
def test_prose_that_looks_odd_stays_prose(text):
    s, e = sentence_spans(text)[0]
    assert span_kind(text, s, e) == "prose"


def test_context_is_cut_on_word_boundaries():
    text = "alpha beta gamma delta epsilon zeta eta theta"
    at = text.index("delta")
    assert context_around(text, at, at + 5, margin=8) == "\u2026 gamma delta epsilon \u2026"
    assert context_around(text, at, at + 5, margin=100) == text
    assert context_around(text, 0, 5, margin=3) == "alpha \u2026"
    assert context_around("one\n\ntwo  three", 5, 8, margin=50) == "one two three"


def _context_words_are_whole(context: str, text: str) -> bool:
    words = set(text.split())
    return all(w in words for w in context.split() if w != "\u2026")


def test_every_answer_is_prose_with_its_own_context(encoder_dir, doc):
    text = doc.read_text()
    r = run("qa", "-m", str(encoder_dir), "-Q", "Who played the song?", "-Q", "What is the score?",
            "--top-k", "20", "--max-length", "64", str(doc))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    for record in map(json.loads, r.stdout.splitlines()):
        answers = record["answers"]
        assert {a["text"] for a in answers} == PROSE  # every candidate, and only prose
        assert record["context"] == answers[0]["context"]
        for a in answers:
            assert text[a["start"] : a["end"]] == a["text"]
            assert " ".join(a["text"].split()) in a["context"]
            assert _context_words_are_whole(a["context"], text)


@pytest.mark.parametrize("fmt", ["tsv", "table"])
def test_table_and_tsv_show_each_answer_with_its_context(encoder_dir, doc, fmt):
    r = run("qa", "-m", str(encoder_dir), "-Q", "Who played the song?", "--top-k", "3",
            "--max-length", "64", "-f", fmt, str(doc))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    if fmt == "tsv":
        header, *rows = [line.split("\t") for line in r.stdout.splitlines()]
        assert header == ["path", "question", "rank", "answer", "score", "start", "end", "context"]
        assert [row[2] for row in rows] == ["1", "2", "3"]
        for row in rows:
            assert row[3] in PROSE and row[3] in row[7]
    else:
        assert "context" in r.stdout and r.stdout.count("\u2026") >= 1


def test_min_score_abstains(encoder_dir, doc, tmp_path):
    base = ("qa", "-m", str(encoder_dir), "-Q", "Who played the song?", "--max-length", "64", str(doc))
    (answered,) = map(json.loads, run(*base, "--min-score", "-1.5").stdout.splitlines())
    assert answered["answer"] in PROSE
    r = run(*base, "--min-score", "1.5", "--top-k", "3")  # above any score: no answer
    assert r.exit_code == 0, r.stderr
    (record,) = map(json.loads, r.stdout.splitlines())
    assert record["answer"] is None and record["score"] is None and record["context"] == ""
    assert "answers" not in record
    tsv = run(*base, "--min-score", "1.5", "-f", "tsv").stdout.splitlines()
    assert len(tsv) == 2 and tsv[1].split("\t")[3] == ""  # one row, empty answer
    config = tmp_path / "qa.yaml"
    config.write_text(
        "task: qa\nmodel:\n  max_length: 64\ntokenization:\n  stride: 8\n  max_question_length: 16\n"
        "inference:\n  min_score: 1.5\n"
    )
    (from_config,) = map(json.loads, run(*base, "--config", str(config)).stdout.splitlines())
    assert from_config["answer"] is None
    (overridden,) = map(
        json.loads, run(*base, "--config", str(config), "--min-score", "-1.5").stdout.splitlines()
    )
    assert overridden["answer"] in PROSE


def _index(
    texts: list[str],
    alone: list[list[float]],
    local: list[list[float]],
    prose: list[bool],
    block: list[list[float]] | None = None,
):
    """An index of one following window per sentence (``local``) and the sentences as their own
    blocks unless ``block`` is given."""
    from collections import Counter

    words = [frozenset(words_of(t)) for t in texts]
    n = len(texts)
    df = Counter(w for ws in words for w in ws)
    idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
    return SentenceIndex(
        "", [(i, i + 1) for i in range(n)], torch.tensor(prose), torch.tensor(alone),
        torch.tensor(local).unsqueeze(0), torch.tensor(block or alone), words, idf,
        math.log(1 + (n + 0.5) / 0.5),
    )  # fmt: skip


def test_lexical_coverage_weights_rare_words():
    index = _index(["the cat sat", "the dog ran", "a cat and a dog"], [[1.0]] * 3, [[1.0]] * 3, [True] * 3)
    cov = lexical_coverage(index, "Where did the cat sit?")
    # "where", "did", "sit" are in no sentence: they count with the highest idf and lower every share
    idf = index.idf
    total = idf["the"] + idf["cat"] + 3 * index.unseen_idf
    assert cov.tolist() == pytest.approx(
        [(idf["the"] + idf["cat"]) / total, idf["the"] / total, idf["cat"] / total]
    )
    assert lexical_coverage(index, "?").tolist() == [0.0, 0.0, 0.0]


def test_fusion_mixes_dense_and_lexical_and_masks_non_prose():
    q = torch.tensor([1.0, 0.0])
    index = _index(
        ["red apples grow", "green pears", "red apples", "code"],
        alone=[[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
        local=[[0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]],
        prose=[True, True, True, False],
    )
    dense_only = score_sentences(index, q, "red apples", WINDOW_SCORING)
    assert dense_only[:3].tolist() == pytest.approx([0.6, 0.9, 0.0])
    assert dense_only[3] == -math.inf  # code is never an answer
    assert score_sentences(index, q, "red apples", replace(WINDOW_SCORING, prose_only=False))[3] == 1.0
    fused = score_sentences(index, q, "red apples", replace(WINDOW_SCORING, lexical=0.5))
    cov = lexical_coverage(index, "red apples")
    assert cov[0] == cov[2] == 1.0 and cov[1] == 0.0
    assert fused[:3].tolist() == pytest.approx([0.8, 0.45, 0.5])
    assert int(torch.argmax(fused)) == 0  # the lexical match wins once the words count
    weighted = score_sentences(index, q, "x", SentenceScoring(alone=1.0, following=0.0, block=0.0))
    assert weighted[:3].tolist() == pytest.approx([0.6, 1.0, 0.0])


def test_feedback_query_moves_towards_the_best_candidates():
    q = torch.tensor([1.0, 0.0])
    rows = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]])
    scores = torch.tensor([0.2, 0.9, -math.inf, 0.5])  # row 2 is no candidate
    # k = 2: rows 1 and 3; mean (-0.2, 0.4); q + 0.5 * mean = (0.9, 0.2), normalised
    moved = feedback_query(q, rows, scores, 2, 0.5)
    assert moved.tolist() == pytest.approx([0.9 / math.hypot(0.9, 0.2), 0.2 / math.hypot(0.9, 0.2)])
    assert float(moved.norm()) == pytest.approx(1.0)
    # k beyond the candidates takes them all (never the -inf row): mean (-0.4 / 3, 1.8 / 3)
    everything = feedback_query(q, rows, scores, 10, 1.0)
    expected = torch.tensor([1.0 - 0.4 / 3, 1.8 / 3])
    assert everything.tolist() == pytest.approx((expected / expected.norm()).tolist())
    assert torch.equal(feedback_query(q, rows, torch.full((4,), -math.inf), 3, 0.6), q)  # no candidate


def test_feedback_rescores_every_sentence_with_the_moved_question():
    q = torch.tensor([1.0, 0.0, 0.0])
    rows = [[0.6, 0.8, 0.0], [0.7, 0.0, 0.714], [0.5, 0.866, 0.0], [0.9, 0.0, 0.436]]
    index = _index(["a", "b", "c", "code"], alone=rows, local=rows, prose=[True, True, True, False])
    plain = score_sentences(index, q, "a", SentenceScoring())
    assert int(torch.argmax(plain)) == 1 and plain[3] == -math.inf
    scoring = SentenceScoring(feedback_k=3, feedback_weight=1.0)
    fed = score_sentences(index, q, "a", scoring)
    moved = torch.nn.functional.normalize(q + torch.tensor(rows[:3]).mean(0), dim=-1)
    assert fed[:3].tolist() == pytest.approx((torch.tensor(rows[:3]) @ moved).tolist())
    assert fed[3] == -math.inf  # the non-prose row neither counts in the feedback nor becomes a candidate
    assert int(torch.argmax(fed)) == 0  # the two sentences about the second topic pull the question over
    assert score_sentences(index, q, "a", replace(scoring, feedback_k=5)).tolist() == fed.tolist()
    for off in (SentenceScoring(feedback_k=3), SentenceScoring(feedback_weight=0.6)):
        assert score_sentences(index, q, "a", off).tolist() == plain.tolist()
    with pytest.raises(LongdocError):
        SentenceScoring(feedback_k=-1)
