"""Zero-shot QA's diversity of the answers after the first (maximal marginal relevance,
tasks.qa.answer_candidates): a sentence that says again what a better answer said gives way to one
that adds to it; the first answer never changes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks.qa import (
    PARAGRAPH_SCORING,
    REREAD_SCORING,
    QuestionAnswerer,
    SentenceIndex,
    SentenceScoring,
    answer_candidates,
    candidate_pool,
    diverse_order,
    reread_candidates,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model
from tests.fixtures_tiny import build_tiny_model

# Two sentences in a row that say the same thing, then one that adds to it, then one off the topic.
TEXT = (
    "The band played the song at the concert. The band played the song at the concert.\n\n"
    "The guitarist wrote it in one night.\n\nThe match ended in a draw."
)


def _index(ahead: bool = True) -> SentenceIndex:
    """TEXT's four sentences with hand-made embeddings: 0 and 1 the same vector (the same claim),
    2 partly along it, 3 orthogonal; their passages (``ahead``) are their own vectors."""
    spans, start = [], 0
    for sentence in ("The band played the song at the concert.",) * 2 + (
        "The guitarist wrote it in one night.",
        "The match ended in a draw.",
    ):
        start = TEXT.index(sentence, start)
        spans.append((start, start + len(sentence)))
        start += len(sentence)
    alone = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    index = SentenceIndex(
        TEXT, spans, torch.ones(4, dtype=torch.bool), alone, alone.unsqueeze(0), alone,
        [frozenset()] * 4, {}, 1.0,
    )  # fmt: skip
    return replace(index, ahead=alone, ahead_tokens=128) if ahead else index


Q = F.normalize(torch.tensor([1.0, 0.5, 0.0]), dim=-1)  # as close to sentence 0 (and 1) as to 2
FIRST = torch.tensor([0.80, 0.79, 0.77, 0.20])  # first-stage scores: the repeat is second


def test_mmr_puts_a_repeat_behind_an_answer_that_adds_to_the_first():
    values = [0.80, 0.785, 0.77, 0.20]
    rows = _index().alone
    assert diverse_order(values, rows, 4, 0.0) == [0, 1, 2, 3]  # no diversity: the scores' order
    # 1 repeats 0 (cosine 1): 0.785 - 0.05 < 0.77 - 0.05 * 0.6
    assert diverse_order(values, rows, 4, 0.05) == [0, 2, 1, 3]
    assert diverse_order(values, rows, 4, 0.01) == [0, 1, 2, 3]  # a small weight: a small change
    # however large the weight, the first stays first (and 3, off the topic, never beats 2)
    assert diverse_order(values, rows, 2, 10.0) == [0, 3]
    assert diverse_order(values, rows, 9, 0.05) == [0, 2, 1, 3]  # k beyond the candidates
    assert diverse_order([], rows[:0], 3, 0.05) == [] and diverse_order(values, rows, 1, 5.0) == [0]
    assert diverse_order([0.5, 0.5], rows[2:], 2, 0.0) == [0, 1]  # a tie: the earlier position


def test_answers_after_the_first_give_way_when_they_repeat_a_better_one():
    index = _index()
    default = SentenceScoring()
    assert default.diversity == 0.05 and replace(default, diversity=0.0) == REREAD_SCORING
    plain_top, plain_values = answer_candidates(None, index, Q, FIRST, REREAD_SCORING, 4, 3)
    assert plain_top == [0, 1, 2]  # the second stage's order: the repeat second
    top, values = answer_candidates(None, index, Q, FIRST, default, 4, 3)
    assert top == [0, 2, 1]  # the sentence that adds to the answer comes before the repeat
    assert values[0] == plain_values[0]  # the first answer and its score never change
    # each answer keeps its own score (not lowered by the diversity term): rank 3 scores above rank 2
    assert dict(zip(top, values, strict=True)) == pytest.approx(
        dict(zip(plain_top, plain_values, strict=True))
    )
    assert values[2] > values[1]
    # one answer asked for: the second stage's best, whatever the diversity
    assert answer_candidates(None, index, Q, FIRST, replace(default, diversity=9.0), 4, 1) == (
        plain_top[:1],
        plain_values[:1],
    )


def test_the_pool_is_the_second_stages_best_then_the_next_candidates_read_the_same_way():
    index = _index()
    scoring = SentenceScoring(reread_k=2, reread_weight=1.0, diversity_pool=3)
    scores = torch.tensor([0.5, 0.9, 0.1, 0.3])
    top, values = candidate_pool(None, index, Q, scores, scoring, 4, 1)
    head, head_values = reread_candidates(None, index, Q, scores, scoring, 4, 1)
    assert top[:2] == head and values[:2] == head_values  # the second stage's 2, in its order
    # the third: the next of the first stage (3, not 2), scored as the second stage scores
    assert top[2] == 3 and values[2] == pytest.approx(float(scores[3] + index.ahead[3] @ Q) / 2)
    # more answers asked than the pool: the pool grows to them; never beyond the candidates
    assert len(candidate_pool(None, index, Q, scores, scoring, 4, 4)[0]) == 4
    assert len(candidate_pool(None, index, Q, scores, replace(scoring, diversity_pool=50), 4, 1)[0]) == 4
    not_prose = torch.tensor([0.5, float("-inf"), 0.1, float("-inf")])
    assert sorted(candidate_pool(None, index, Q, not_prose, scoring, 4, 3)[0]) == [0, 2]
    # with no second stage the pool is the first stage's order and scores
    off = replace(scoring, reread_k=0)
    assert candidate_pool(None, _index(ahead=False), Q, scores, off, 4, 1) == (
        [1, 0, 3],
        pytest.approx([0.9, 0.5, 0.3]),
    )


def test_diversity_settings_are_checked():
    for bad in ({"diversity": -0.1}, {"diversity_pool": 0}):
        with pytest.raises(LongdocError):
            SentenceScoring(**bad)
    assert PARAGRAPH_SCORING.diversity == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # mean pooling, as the default model (the tiny checkpoint pools its first token)
    tm = load_task_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder"), task="qa")
    return replace(tm, pooling="mean")


DOC = (
    "The team scored a goal in the match. The player was the best.\n\n"
    "The band played a song.\n\nThe band played a song.\n\n"
    "The guitar note was the best of the album. The band played it at the concert."
)


@pytest.mark.parametrize("weight", [0.05, 1.0])
def test_the_answerer_keeps_its_first_answer_and_shows_the_diverse_list(tiny, weight):
    question = "Who played the song at the concert?"
    scoring = replace(SentenceScoring(), diversity=weight, reread_k=2)  # a pool beyond the second stage
    answerer = QuestionAnswerer(tiny, top_k=4, batch_size=4, scoring=scoring)
    (result,) = answerer.answer("d", DOC, [question])
    (plain,) = QuestionAnswerer(tiny, top_k=4, batch_size=4, scoring=replace(scoring, diversity=0.0)).answer(
        "d", DOC, [question]
    )
    assert result.answers[0] == plain.answers[0] and result.context == plain.context
    assert len(result.answers) == 4 and len({a.start for a in result.answers}) == 4
    index = answerer._index(DOC)
    q = embed_texts(tiny, [question], 1)[0]
    first = score_sentences(index, q, question, scoring)
    top, values = answer_candidates(tiny, index, q, first, scoring, 16, 4)
    assert [a.start for a in result.answers] == [index.spans[i][0] for i in top]
    assert [a.score for a in result.answers] == pytest.approx(values, abs=1e-5)
    assert all(a.context and a.text in a.context for a in result.answers)
    (one,) = QuestionAnswerer(tiny, top_k=1, batch_size=4, scoring=scoring).answer("d", DOC, [question])
    assert one.answers == [result.answers[0]]
