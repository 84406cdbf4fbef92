"""Zero-shot QA's context terms: paragraph blocks (blank lines, cut at a token budget), the
following windows at several lengths, and the paragraph's weight in a sentence's score."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks.qa import (
    WINDOW_SCORING,
    SentenceIndex,
    SentenceScoring,
    embed_blocks,
    following_windows,
    index_sentences,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model
from longdoc_cli.tasks.text import paragraph_blocks, sentence_spans
from tests.fixtures_tiny import build_tiny_model


def test_paragraph_blocks_break_at_blank_lines_and_at_the_size_budget():
    text = "One a. One b.\n\nTwo a.\nTwo b. Two c.\n \t\nThree a. Three b. Three c."
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans][:3] == ["One a.", "One b.", "Two a.\nTwo b."]
    sizes = [2] * len(spans)
    # a single line break is no paragraph break; a line of spaces between two breaks is a blank line
    assert paragraph_blocks(text, spans, sizes, 100) == [0, 0, 1, 1, 2, 2, 2]
    # a budget of 4: a third sentence of 2 would pass it, so a new block starts
    assert paragraph_blocks(text, spans, sizes, 4) == [0, 0, 1, 1, 2, 2, 3]
    # a sentence larger than the budget is a block of its own, and the next one starts another
    assert paragraph_blocks(text, spans, [2, 9, 2, 2, 2, 2, 2], 4) == [0, 1, 2, 2, 3, 3, 4]
    assert paragraph_blocks("", [], [], 4) == []


def test_following_windows_at_every_length_and_at_the_end():
    alone = F.normalize(
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), dim=-1
    )
    scales = following_windows(alone, 2, True)  # windows of 2 and 3 sentences
    assert scales.shape == (2, 4, 3)
    for k in (1, 2):
        for i in range(4):
            expected = F.normalize(alone[i : i + k + 1].mean(0), dim=-1)  # fewer at the end
            assert scales[k - 1, i].tolist() == pytest.approx(expected.tolist())
    one = following_windows(alone, 2, False)
    assert one.shape == (1, 4, 3) and torch.allclose(one[0], scales[1])
    assert torch.allclose(following_windows(alone, 0, True)[0], alone)  # no following: the sentence


def _index(alone, block, prose=None) -> SentenceIndex:
    alone, block = torch.tensor(alone), torch.tensor(block)
    n = len(alone)
    prose = torch.ones(n, dtype=torch.bool) if prose is None else torch.tensor(prose)
    words = [frozenset()] * n
    local = following_windows(alone, 1, True)
    return SentenceIndex("", [(i, i + 1) for i in range(n)], prose, alone, local, block, words, {}, 1.0)


def test_the_paragraph_weighs_in_a_sentences_score():
    q = torch.tensor([1.0, 0.0])
    # sentence 0 matches the question a little less than sentence 2, but sits in a paragraph about it
    index = _index(
        alone=[[0.8, 0.6], [0.0, 1.0], [0.9, 0.436], [0.0, 1.0]],
        block=[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
    )
    no_block = SentenceScoring(alone=1.0, following=0.0, block=0.0)
    assert int(torch.argmax(score_sentences(index, q, "", no_block))) == 2
    with_block = replace(no_block, block=1.0)
    scores = score_sentences(index, q, "", with_block)
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.45, 0.0])
    # weights: (alone * cos + following * mean of the windows' cosines + block * cos) / their sum
    mixed = score_sentences(index, q, "", SentenceScoring(alone=1.0, following=2.0, block=3.0))
    window = float(index.local[0, 0] @ q)
    assert float(mixed[0]) == pytest.approx((0.8 + 2 * window + 3 * 1.0) / 6)
    assert score_sentences(index, q, "", replace(with_block, prose_only=True)).shape == (4,)


def test_scoring_weights_are_checked():
    for bad in (
        {"block": -1.0},
        {"alone": 0.0, "following": 0.0, "block": 0.0},
        {"following_n": -1},
        {"block_tokens": 0},
    ):
        with pytest.raises(LongdocError):
            SentenceScoring(**bad)
    assert WINDOW_SCORING.block == 0.0 and not WINDOW_SCORING.following_scales


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_task_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder"), task="qa")


DOC = (
    "The team scored a goal in the match. The player was the best.\n\n"
    "The band played a song.\n\n"
    ">>> score = goal + 1\n>>> print(score)\n\n"
    "The guitar note was the best of the album. The band played it at the concert."
)


def test_blocks_are_embedded_once_and_only_when_a_candidate_needs_them(tiny):
    index = index_sentences(tiny, DOC, 4, SentenceScoring())
    texts = [DOC[s:e] for s, e in index.spans]
    assert len(texts) == 6 and not index.prose[3] and index.prose.sum() == 5
    whole = embed_texts(tiny, [DOC[index.spans[0][0] : index.spans[1][1]], DOC[index.spans[4][0] :]], 4)
    assert torch.allclose(index.block[0], whole[0], atol=1e-5) and torch.equal(index.block[0], index.block[1])
    assert torch.allclose(index.block[4], whole[1], atol=1e-5) and torch.equal(index.block[4], index.block[5])
    assert torch.equal(index.block[2], index.alone[2])  # a one-sentence paragraph is its sentence
    assert torch.equal(index.block[3], index.alone[3])  # code: never a candidate, not embedded
    assert index.local.shape == (5, 6, index.alone.shape[1])
    # a budget smaller than any sentence: every sentence is its own block
    spans = index.spans
    alone_blocks = embed_blocks(tiny, DOC, spans, index.alone, index.prose, 1, 4)
    assert torch.equal(alone_blocks, index.alone)
    # without the paragraph term nothing more is embedded
    plain = index_sentences(tiny, DOC, 4, WINDOW_SCORING)
    assert not plain.block.any() and plain.local.shape[0] == 1
    assert torch.allclose(plain.alone, index.alone)
    assert index_sentences(tiny, "", 4, SentenceScoring()).local.shape[0] == 1
    assert math.isfinite(float(score_sentences(index, index.alone[0], "", SentenceScoring()).max()))
