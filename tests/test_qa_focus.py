"""Zero-shot QA reads paragraphs only where they can matter (tasks.qa.focus): on a document with
more candidates than SentenceScoring.block_candidates, each question embeds the paragraph blocks of
its best candidates (ranked with each block guessed as the mean of its sentences) and of the
passages its second stage reads; a document whose candidates all fit is indexed as before."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks import qa
from longdoc_cli.tasks.qa import (
    QuestionAnswerer,
    SentenceScoring,
    guessed_blocks,
    index_sentences,
    prefilter,
    rank_sentences,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model
from tests.fixtures_tiny import build_tiny_model

EAGER = replace(SentenceScoring(), block_candidates=0)  # every paragraph embedded with the index

DOC = (
    "The team scored a goal in the match. The player was the best.\n\n"
    "The band played a song.\n\n"
    ">>> score = goal + 1\n>>> print(score)\n\n"
    "The guitar note was the best of the album. The band played it at the concert."
)
QUESTION = "Who played the song at the concert?"

_TOPICS = [
    ["the team scored a goal in the match.", "the player was the best of the team.",
     "the score of the football match was a draw.", "the team was at the match with the player."],
    ["the band played a song at the concert.", "the guitar note was the best of the album.",
     "the music of the band is on the album.", "the song was a test of the guitar."],
    ["the function can return a list of data.", "the module is a file of code.",
     "the class has a value and a string.", "the model is a function of the data."],
]  # fmt: skip
FACT = "the grouping of python code is by indentation."
# the sentences after it say more of the same, as an answer's next sentences do
MORE = ["indentation is the grouping of python code.", "python code has indentation for grouping."]


def _long_document(paragraphs: int = 60, at: int = 51) -> str:
    """``paragraphs`` paragraphs of 3-4 sentences about sport, music or code (seeded), paragraph
    ``at`` (deep inside) FACT and MORE."""
    rng = random.Random(7)
    out = []
    for p in range(paragraphs):
        topic = _TOPICS[p % 3]
        sentences = [rng.choice(topic) for _ in range(rng.randint(3, 4))]
        if p == at:
            sentences = [FACT, *MORE]
        out.append(" ".join(s.capitalize() for s in sentences))
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # mean pooling, as the default model (the tiny checkpoint pools its first token)
    tm = load_task_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder"), task="qa")
    return replace(tm, pooling="mean")


def _record_passes(monkeypatch) -> list[list[str]]:
    """The texts of each pass of embed_keeping_states / embed_texts that tasks.qa makes from now on."""
    read: list[list[str]] = []
    keeping, plain = qa.embed_keeping_states, qa.embed_texts

    def keeping_counted(tm, texts, batch_size):
        read.append(list(texts))
        return keeping(tm, texts, batch_size)

    def plain_counted(tm, texts, batch_size):
        read.append(list(texts))
        return plain(tm, texts, batch_size)

    monkeypatch.setattr(qa, "embed_keeping_states", keeping_counted)
    monkeypatch.setattr(qa, "embed_texts", plain_counted)
    return read


def test_a_document_whose_candidates_all_fit_is_indexed_and_answered_as_before(tiny):
    for scoring in (SentenceScoring(), replace(SentenceScoring(), diversity=0.0)):
        index = index_sentences(tiny, DOC, 4, scoring)
        eager = index_sentences(tiny, DOC, 4, replace(scoring, block_candidates=0))
        assert not index.lazy and int(index.prose.sum()) <= scoring.block_candidates
        assert torch.equal(index.block, eager.block) and torch.equal(index.ahead, eager.ahead)
        for k in (1, 3):
            (got,) = QuestionAnswerer(tiny, top_k=k, batch_size=4, scoring=scoring).answer(
                "d", DOC, [QUESTION]
            )
            (want,) = QuestionAnswerer(
                tiny, top_k=k, batch_size=4, scoring=replace(scoring, block_candidates=0)
            ).answer("d", DOC, [QUESTION])
            assert got.answers == want.answers


def test_focus_over_every_candidate_gives_the_eager_answers(tiny, monkeypatch):
    # 1 candidate asked for, but the second stage and the diversity pool read more than DOC has
    scoring = replace(SentenceScoring(), block_candidates=1)
    index = index_sentences(tiny, DOC, 4, scoring)
    assert index.lazy and not index.lazy["embedded"] and index.block.numel() == 0
    with pytest.raises(ValueError, match="per question"):
        score_sentences(index, index.alone[0], "", scoring)  # no paragraph to score with yet
    eager = index_sentences(tiny, DOC, 4, EAGER)
    q = embed_texts(tiny, [QUESTION], 1)[0]
    for k in (1, 3, 5):
        got = rank_sentences(tiny, index, q, QUESTION, scoring, 4, k)
        want = rank_sentences(tiny, eager, q, QUESTION, EAGER, 4, k)
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-5)
    assert sorted(index.lazy["embedded"]) == list(range(len(index.blocks)))  # every block, once
    read = _record_passes(monkeypatch)
    rank_sentences(tiny, index, q, QUESTION, scoring, 4, 5)
    assert read == []  # embedded for an earlier question: not read again


def test_the_pruning_embeds_only_the_best_candidates_paragraphs(tiny, monkeypatch):
    scoring = replace(SentenceScoring(), block_candidates=1, reread_k=0, diversity=0.0)
    index = index_sentences(tiny, DOC, 4, scoring)
    q = embed_texts(tiny, [QUESTION], 1)[0]
    # the best candidate with every block guessed as the mean of its sentences' embeddings
    guessed = score_sentences(replace(index, block=index.block_guess), q, QUESTION, scoring)
    best = int(torch.argmax(guessed))
    assert prefilter(index, q, QUESTION, scoring, 1).tolist() == [best]
    (group,) = [m for m in index.blocks if best in m]  # DOC's first and last paragraphs are blocks
    read = _record_passes(monkeypatch)
    top, values = rank_sentences(tiny, index, q, QUESTION, scoring, 4, 1)
    assert read == [[DOC[index.spans[group[0]][0] : index.spans[group[-1]][1]]]]
    assert top == [best]
    # its score is the one of an index with every paragraph embedded
    eager = index_sentences(tiny, DOC, 4, replace(scoring, block_candidates=0))
    assert values[0] == pytest.approx(float(score_sentences(eager, q, QUESTION, scoring)[best]), abs=1e-5)


def test_the_second_stage_reads_the_passages_an_eager_index_reads(tiny):
    scoring = replace(SentenceScoring(), block_candidates=1, reread_k=1, diversity=0.0)
    index = index_sentences(tiny, DOC, 4, scoring)
    eager = index_sentences(tiny, DOC, 4, replace(scoring, block_candidates=0))
    q = embed_texts(tiny, [QUESTION], 1)[0]
    view, scores = qa.focus(tiny, index, q, QUESTION, scoring, 4, 1)
    (best,) = torch.isfinite(scores).nonzero()[:, 0].tolist()  # 1 candidate
    assert torch.allclose(view.ahead[best], eager.ahead[best], atol=1e-5)
    assert torch.allclose(view.block[best], eager.block[best], atol=1e-5)


def test_guessed_blocks_are_the_mean_direction_of_their_sentences():
    alone = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.6, 0.8]]), dim=-1)
    guess = guessed_blocks(alone, [[0, 1]])
    assert torch.allclose(guess[0], F.normalize(alone[0] + alone[1], dim=-1)) and torch.equal(
        guess[0], guess[1]
    )
    assert torch.equal(guess[2:], alone[2:])


def test_a_fact_deep_inside_a_long_document_is_still_found(tiny):
    text = _long_document()
    question = FACT.replace(".", "?")
    scoring = replace(SentenceScoring(), block_candidates=8)
    answerer = QuestionAnswerer(tiny, top_k=1, batch_size=8, scoring=scoring)
    (result,) = answerer.answer("d", text, [question])
    index = answerer._index(text)
    assert index.lazy and 0 < len(index.lazy["embedded"]) < len(index.blocks) // 2  # most not read
    at = text.index(FACT.capitalize())
    assert (result.answers[0].start, result.answers[0].end) == (at, at + len(FACT))
    (eager,) = QuestionAnswerer(tiny, top_k=1, batch_size=8, scoring=EAGER).answer("d", text, [question])
    assert result.answers[0].start == eager.answers[0].start
    assert result.answers[0].score == pytest.approx(eager.answers[0].score, abs=1e-5)


def test_block_candidates_is_checked():
    with pytest.raises(LongdocError):
        SentenceScoring(block_candidates=-1)


def test_answers_do_not_depend_on_the_questions_asked_before(tiny, monkeypatch):
    text = _long_document()
    scoring = replace(SentenceScoring(), block_candidates=8)
    questions = [
        FACT.replace(".", "?"),
        "who played the song at the concert?",
        "what does the function return?",
    ]
    fresh = [
        QuestionAnswerer(tiny, top_k=3, batch_size=8, scoring=scoring).answer("d", text, [q])[0]
        for q in questions
    ]
    answerer = QuestionAnswerer(tiny, top_k=3, batch_size=8, scoring=scoring)
    asked = answerer.answer("d", text, questions)  # one index, the blocks of earlier questions kept
    index = answerer._index(text)
    # past half of the blocks, the rest were embedded in the same pass
    assert sorted(index.lazy["embedded"]) == list(range(len(index.blocks)))
    for got, want in zip(asked, fresh, strict=True):
        assert [a.start for a in got.answers] == [a.start for a in want.answers]
        assert [a.score for a in got.answers] == pytest.approx([a.score for a in want.answers], abs=1e-4)
    monkeypatch.setattr(qa, "EMBED_ALL_SHARE", 1.0)  # never all at once: only what each question needs
    one = QuestionAnswerer(tiny, top_k=3, batch_size=8, scoring=scoring)
    one.answer("d", text, questions[:1])
    assert len(one._index(text).lazy["embedded"]) < len(index.blocks)


def test_more_answers_asked_than_candidates_are_all_ranked(tiny):
    text = _long_document()
    question = "the band?"
    scoring = replace(SentenceScoring(), block_candidates=8, diversity=0.0)
    answerer = QuestionAnswerer(tiny, top_k=30, batch_size=8, scoring=scoring)
    (got,) = answerer.answer("d", text, [question])
    assert len(got.answers) == 30 and [a.score for a in got.answers] == sorted(
        (a.score for a in got.answers), reverse=True
    )
    # the candidates are the 30 asked for, not 8: the guessed ranking's 30 best
    index = answerer._index(text)
    chosen = prefilter(index, embed_texts(tiny, [question], 1)[0], question, scoring, 30)
    assert sorted(a.start for a in got.answers) == sorted(index.spans[i][0] for i in chosen.tolist())
