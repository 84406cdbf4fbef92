"""Zero-shot QA's second stage: the best candidates read again, each as the passage that starts at
it (tasks.qa.reread_candidates): from the token states the index's passes kept (embed_keeping_states,
reading_ahead), or each passage embedded anew (passage_embeddings)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks import qa
from longdoc_cli.tasks.qa import (
    PARAGRAPH_SCORING,
    REREAD_SCORING,
    QuestionAnswerer,
    SentenceScoring,
    embed_keeping_states,
    index_sentences,
    passage_embeddings,
    reading_ahead,
    reread_candidates,
    score_sentences,
)
from longdoc_cli.tasks.runner import embed_texts, load_task_model, run_windows
from tests.fixtures_tiny import build_tiny_model

DOC = (
    "The team scored a goal in the match. The player was the best.\n\n"
    "The band played a song.\n\n"
    ">>> score = goal + 1\n>>> print(score)\n\n"
    "The guitar note was the best of the album. The band played it at the concert."
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # mean pooling, as the default model (the tiny checkpoint pools its first token)
    tm = load_task_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder"), task="qa")
    return replace(tm, pooling="mean")


def _tokens(tm, text: str) -> int:
    return len(tm.tokenizer.encode(text))


def test_a_passage_starts_at_its_sentence_and_takes_the_next_ones_within_the_budget(tiny):
    index = index_sentences(tiny, DOC, 4, SentenceScoring())
    spans = index.spans
    sizes = [_tokens(tiny, DOC[s:e]) for s, e in spans]
    # a budget of the first two sentences: the passage of sentence 0 is both (across no blank line),
    # the passage of sentence 1 runs on over the blank line to sentence 2 (a passage is not a paragraph)
    budget = sizes[0] + sizes[1]
    assert sizes[1] + sizes[2] <= budget
    got = passage_embeddings(tiny, index, [0, 1], budget, 4)
    want = embed_texts(tiny, [DOC[spans[0][0] : spans[1][1]], DOC[spans[1][0] : spans[2][1]]], 4)
    assert torch.allclose(got, want, atol=2e-3)
    # a budget below a sentence's size: the sentence alone; the last sentence has no next one
    alone = passage_embeddings(tiny, index, [2, len(spans) - 1], 1, 4)
    assert torch.allclose(alone, index.alone[[2, len(spans) - 1]], atol=2e-3)
    # a large budget: everything from the sentence to the end, code lines included
    whole = passage_embeddings(tiny, index, [2], 10_000, 4)
    assert torch.allclose(whole[0], embed_texts(tiny, [DOC[spans[2][0] :]], 4)[0], atol=2e-3)


def test_passages_already_read_are_not_read_again(tiny, monkeypatch):
    index = index_sentences(tiny, DOC, 4, SentenceScoring())
    first = passage_embeddings(tiny, index, [4, 0], 128, 4)
    read: list[list[str]] = []
    real = qa.embed_texts

    def counting(tm, texts, batch_size):
        read.append(list(texts))
        return real(tm, texts, batch_size)

    monkeypatch.setattr(qa, "embed_texts", counting)
    again = passage_embeddings(tiny, index, [0, 4, 0], 128, 4)  # repeats, in another order
    assert read == [] and torch.equal(again, first[[1, 0, 1]])
    passage_embeddings(tiny, index, [0, 5], 128, 4)  # only the new one is read
    assert read == [[DOC[index.spans[5][0] : index.spans[5][1]]]]
    passage_embeddings(tiny, index, [0], 64, 4)  # another budget is another passage
    assert len(read) == 2


@pytest.mark.parametrize("passes", [False, True])
def test_the_second_stage_mixes_the_passage_cosine_and_reorders_the_best_candidates(tiny, passes):
    index = index_sentences(tiny, DOC, 4, SentenceScoring())
    n = len(index.spans)
    # the passages' vectors: the token states already computed, or each passage embedded anew
    vectors = passage_embeddings(tiny, index, list(range(n)), 128, 4) if passes else index.ahead
    q = vectors[4]  # a question whose embedding is exactly the passage of sentence 4
    scoring = SentenceScoring(reread_k=3, reread_weight=1.0, reread_passes=passes)
    # first stage: 0 a little above 4, 2 third, 5 fourth; 3 is code (-inf, never a candidate)
    margin = float(1.0 - vectors[0] @ q) / 2  # less than what the passage gives 4 over 0
    assert margin > 1e-4
    scores = torch.tensor([0.5 + margin, 0.1, 0.4, float("-inf"), 0.5, 0.3])
    top, values = reread_candidates(tiny, index, q, scores, scoring, 4)
    assert set(top) == {0, 4, 2} and top[0] == 4  # only the 3 best are read; 4 overtakes 0
    expected = {i: float(scores[i] + vectors[i] @ q) / 2 for i in (0, 2, 4)}
    assert values == pytest.approx([expected[i] for i in top], abs=1e-5)
    assert values == sorted(values, reverse=True)
    # more answers asked than reread_k: all of them are read, and they stay ranked by one score
    top5, values5 = reread_candidates(tiny, index, q, scores, scoring, 4, at_least=10)
    assert sorted(top5) == [0, 1, 2, 4, 5] and values5 == sorted(values5, reverse=True)  # 3 is not prose
    # off (k or weight 0): the first stage's best, with its scores
    for off in (replace(scoring, reread_k=0), replace(scoring, reread_weight=0.0)):
        assert reread_candidates(tiny, index, q, scores, off, 4, at_least=2) == (
            [0, 4],
            pytest.approx([0.5 + margin, 0.5]),
        )
    assert reread_candidates(tiny, index, q, torch.full((n,), float("-inf")), scoring, 4) == ([], [])


def test_reading_ahead_runs_on_through_the_next_spans():
    alone = torch.eye(4)
    tok = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]
    t = torch.tensor(tok)
    states = [t[0:2], t[2:3], t[3:4], t[4:4]]  # 2, 1, 1 and no token (the last span)
    ahead = reading_ahead(states, alone, 3)
    assert torch.allclose(ahead[0], F.normalize(t[0:3].mean(0), dim=-1))  # its 2 tokens + 1 of the next
    assert torch.allclose(ahead[1], F.normalize(t[2:4].mean(0), dim=-1))  # fewer at the end
    assert torch.allclose(ahead[2], F.normalize(t[3], dim=-1))
    assert torch.equal(ahead[3], alone[3])  # nothing from it on: its own embedding


def test_token_states_come_from_the_same_passes_as_the_embeddings(tiny):
    texts = ["The band played a song.", DOC]
    short = replace(tiny, max_length=16)  # DOC takes several overlapping windows
    for tm in (tiny, short):
        embedded, states, encodings = embed_keeping_states(tm, texts, 4)
        assert torch.allclose(embedded, embed_texts(tm, texts, 4), atol=2e-3)
        assert [len(s) for s in states] == [len(tm.tokenizer.encode(t)) for t in texts]
        assert [len(e) for e in encodings] == [len(s) for s in states]
    # one window: the states are the pass's rows for the text's tokens, specials left out
    (window,) = tiny.tokenizer.document_windows(tiny.tokenizer.encode(texts[0]), tiny.max_length, 64)
    ((_, out),) = run_windows(tiny, [window], 4)
    rows = [k for k, o in enumerate(window.offsets) if o is not None]
    assert torch.allclose(embed_keeping_states(tiny, texts[:1], 4)[1][0].float(), out[rows], atol=1e-2)


def test_the_index_reads_ahead_in_the_paragraphs_context(tiny):
    index = index_sentences(tiny, DOC, 4, SentenceScoring())
    spans = index.spans
    assert index.ahead.shape == index.alone.shape and index.ahead_tokens == 128
    # the last sentence: its tokens as the pass over its paragraph (sentences 4 and 5) read them
    base = spans[4][0]
    _, (states,), (enc,) = embed_keeping_states(tiny, [DOC[base : spans[5][1]]], 4)
    first = next(k for k, (a, _) in enumerate(enc.offsets) if a >= spans[5][0] - base)
    want = F.normalize(states[first:].float().mean(0), dim=-1)
    assert torch.allclose(index.ahead[5], want, atol=1e-3)
    # without the second stage (or with passages embedded) nothing is kept, and asking for it is an error
    for scoring in (PARAGRAPH_SCORING, SentenceScoring(reread_passes=True)):
        plain = index_sentences(tiny, DOC, 4, scoring)
        assert plain.ahead.numel() == 0 and torch.allclose(plain.alone, index.alone, atol=2e-3)
        assert torch.allclose(plain.block, index.block, atol=2e-3)
    q = index.alone[0]
    with pytest.raises(ValueError, match="no passages of 128 tokens"):
        reread_candidates(
            tiny, plain, q, score_sentences(plain, q, "", SentenceScoring()), SentenceScoring(), 4
        )
    with pytest.raises(ValueError, match="no passages of 64 tokens"):
        scores = score_sentences(index, q, "", SentenceScoring())
        reread_candidates(tiny, index, q, scores, SentenceScoring(reread_tokens=64), 4)


def test_the_answerer_returns_the_second_stages_order_and_scores(tiny):
    question = "Who played the song at the concert?"
    # without the diversity of the answers after the first (tests/test_qa_diversity.py)
    answerer = QuestionAnswerer(tiny, top_k=2, batch_size=4, scoring=REREAD_SCORING)
    result = answerer.answer("d", DOC, [question])[0]
    index = answerer._index(DOC)
    q = embed_texts(tiny, [question], 1)[0]
    first = score_sentences(index, q, question, REREAD_SCORING)
    top, values = reread_candidates(tiny, index, q, first, REREAD_SCORING, 16, 2)
    assert [a.start for a in result.answers] == [index.spans[i][0] for i in top[:2]]
    assert [a.score for a in result.answers] == pytest.approx(values[:2], abs=1e-5)
    assert all(a.context for a in result.answers)
    plain = QuestionAnswerer(tiny, top_k=5, batch_size=4, scoring=PARAGRAPH_SCORING)
    plain_scores = [a.score for a in plain.answer("d", DOC, [question])[0].answers]
    assert plain_scores == sorted(plain_scores, reverse=True) and len(plain_scores) == 5


def test_a_model_that_pools_its_first_token_embeds_the_passages(tiny):
    cls = replace(tiny, pooling="cls")  # a mean of token states is not this model's embedding
    assert QuestionAnswerer(cls).scoring.reread_passes
    assert not QuestionAnswerer(tiny).scoring.reread_passes
    assert QuestionAnswerer(cls, scoring=PARAGRAPH_SCORING).scoring == PARAGRAPH_SCORING
    result = QuestionAnswerer(cls, top_k=2).answer("d", DOC, ["Who played the song?"])[0]
    assert len(result.answers) == 2


def test_second_stage_settings_are_checked():
    for bad in ({"reread_k": -1}, {"reread_weight": -0.1}, {"reread_tokens": 0}):
        with pytest.raises(LongdocError):
            SentenceScoring(**bad)
    assert SentenceScoring().reread_k > 0 and PARAGRAPH_SCORING.reread_k == 0
