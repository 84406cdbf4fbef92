"""Metrics against hand-computed values and the official SQuAD normalisation; span decoding."""

from __future__ import annotations

import pytest
import torch

from longdoc_cli.evaluate import (
    classification_metrics,
    exact_match_score,
    f1_score,
    normalize_answer,
    qa_metrics,
)
from longdoc_cli.tasks.qa import decode_spans


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert f1_score("big red dog", "red dog") == pytest.approx(0.8)
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    m = qa_metrics(
        ["Paris", "in 1990", "no"], [["paris", "Paris, France"], ["1990"], ["yes"]], [False, True, True]
    )
    assert m.exact_match == pytest.approx(100 / 3)
    assert m.f1 == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert m.far_n == 2 and m.far_exact_match == 0.0 and m.far_f1 == pytest.approx(100 * (2 / 3) / 2)


def test_classification_metrics_by_hand():
    gold = [("a",), ("a",), ("b",), ("c",)]
    pred = [("a",), ("b",), ("b",), ("a",)]
    m = classification_metrics(gold, pred, ["a", "b", "c"], lengths=[100, 600, 5000, 512])
    assert m.accuracy == 0.5
    # a: P 1/2 R 1/2 F 1/2; b: P 1/2 R 1 F 2/3; c: 0
    assert m.per_label["a"].f1 == pytest.approx(0.5) and m.per_label["b"].f1 == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m.confusion == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert list(m.by_length) == ["<=512", "<=4096", ">4096"]
    assert m.by_length["<=512"]["n"] == 2 and m.by_length[">4096"]["accuracy"] == 1.0


def test_multi_label_metrics_have_no_confusion_matrix():
    m = classification_metrics([("a", "b"), ("b",)], [("a",), ("b",)], ["a", "b"])
    assert m.confusion is None and m.accuracy == 0.5
    assert m.per_label["b"].recall == 0.5 and m.micro_f1 == pytest.approx(0.8)


class _Window:  # what decode_spans reads of a tokenize.Window
    def __init__(self, offsets):
        self.offsets = offsets


def test_decode_spans_respects_context_length_and_null():
    text = "abc def ghi"
    offsets = [None, None, None, (0, 3), (4, 7), (8, 11), None]  # [CLS] q [SEP] c c c [SEP]
    start = torch.tensor([1.0, 8, 0, 1, 5, 2, 9])
    end = torch.tensor([1.0, 0, 8, 0, 1, 6, 9])
    args = dict(n_best=3, max_answer_length=2, top_k=5, null_threshold=None)
    answers = decode_spans(text, [(_Window(offsets), start, end)], **args)
    assert answers[0].text == "def ghi"  # never a special/question token; at most 2 tokens
    assert all(len(a.text.split()) <= 2 and a.start < a.end for a in answers)
    assert decode_spans(text, [(_Window([None] * 7), start, end)], **args) == []
    # null: the lowest null logit over windows (2.0 here) against the best span's (5 + 6)
    other = (_Window(offsets), torch.tensor([20.0, 0, 0, 0, 0, 0, 0]), torch.tensor([20.0, 0, 0, 0, 0, 0, 0]))
    scored = [(_Window(offsets), start, end), other]
    assert decode_spans(text, scored, **{**args, "null_threshold": -10.0}) == []  # 2 - 11 > -10
    assert decode_spans(text, scored, **{**args, "null_threshold": 0.0})  # 2 - 11 < 0: answered


def test_the_evaluate_table_names_the_model_and_right_aligns_numbers(tmp_path, monkeypatch, capsys):
    """The table shows the model's name, not its cache key, and numbers right-aligned (as in the
    classify/qa table)."""
    from types import SimpleNamespace

    from longdoc_cli import hub
    from longdoc_cli.cli import _render_eval

    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    stat = SimpleNamespace(precision=1.0, recall=0.5, f1=0.6667, support=12)
    report = SimpleNamespace(
        task="classify", model=str(hub.cache_dir() / hub._default_key()), data="d.jsonl", n=13,
        metrics={"accuracy": 0.5, "macro_f1": 0.25},
        classification=SimpleNamespace(
            per_label={"sport": stat, "music": stat}, labels=["sport", "music"], confusion=[[1, 11], [0, 1]],
            by_length={"<=512": {"n": 13, "accuracy": 0.5, "macro_f1": 0.25}},
        ),
    )  # fmt: skip
    _render_eval(report)
    out = capsys.readouterr().out
    assert (
        out.splitlines()[0]
        == "classify · default (sentence-transformers/all-MiniLM-L6-v2) · d.jsonl · n = 13"
    )
    assert "default-" not in out
    assert "│ sport │     1.000 │  0.500 │ 0.667 │      12 │" in out  # per label
    assert "│ sport            │     1 │    11 │" in out  # confusion matrix
    assert "│ <=512  │ 13 │    0.500 │    0.250 │" in out  # by length
