"""Zero-shot classification: label presets (@NAME, @FILE), the passages' vote, calibration, and
scores that are probabilities over the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from longdoc_cli.cli import app, exit_code
from longdoc_cli.errors import LongdocError
from longdoc_cli.tasks.classify import (
    DEFAULT_PRESET,
    SCALE,
    VOTES,
    Classifier,
    Label,
    label_cosines,
    load_labels,
    parse_labels,
    preset_names,
    zero_shot_probabilities,
)
from longdoc_cli.tasks.runner import load_task_model
from tests.fixtures_tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SPORT = "The team scored a goal in the football match. The player was the best of the match.\n"
MUSIC = "The band played a song at the concert. The guitar note was the best of the album.\n"


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder")


# ------------------------------------------------------------------------------------------------
# presets


def test_shipped_presets_are_the_configs_files():
    """configs/labels/*.tsv is what the package ships (resources), byte for byte."""
    shipped = {p.stem: p.read_text() for p in (ROOT / "longdoc_cli" / "resources" / "labels").glob("*.tsv")}
    configs = {p.stem: p.read_text() for p in (ROOT / "configs" / "labels").glob("*.tsv")}
    assert shipped == configs and {"iptc", DEFAULT_PRESET} <= set(preset_names())


def test_presets_load():
    iptc = load_labels(["@iptc"], None)
    assert len(iptc) == 17 and iptc[0].name == "arts, culture, entertainment and media"
    assert all(label.description for label in iptc)
    topics = load_labels(None, None)
    assert topics == load_labels([f"@{DEFAULT_PRESET}"], None) and 15 <= len(topics) <= 25
    names = {label.name for label in topics}
    assert {
        "computers and software",
        "politics and government",
        "law and justice",
        "health and medicine",
    } <= names


def test_a_labels_file_may_give_several_descriptions():
    """Further tab-separated columns are more descriptions of the label (empty ones skipped); each is
    embedded on its own as ``name: description``."""
    labels = parse_labels("cats\tfelines\tsmall pets that purr\t\ndogs\n\t\nbirds\tfeathers\n", "x")
    assert labels == [
        Label("cats", "felines", ("small pets that purr",)),
        Label("dogs"),
        Label("birds", "feathers"),
    ]
    assert labels[0].prompt_groups() == [["cats: felines"], ["cats: small pets that purr"]]
    assert labels[0].prompts() == ["cats: felines", "cats: small pets that purr"]
    assert labels[2].prompt_groups() == [["birds: feathers"]]  # one description: as before
    assert labels[1].prompt_groups() == [["dogs", "dogs", "This text is about dogs."]]  # a bare name


def test_every_default_topic_has_the_same_number_of_phrasings():
    """A label's cosine is the best of its phrasings', so a label with more of them would gain an
    edge over the others from that alone: the default topics all have the same number (several)."""
    counts = {label.name: 1 + len(label.more) for label in load_labels(None, None)}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 2, counts


def test_preset_from_a_file(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("# my labels\ncats\tfelines\ndogs\n")
    assert load_labels([f"@{path}"], None) == [Label("cats", "felines"), Label("dogs")]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["@nope"], "no such label preset or file (presets: "),
        (["@iptc", "sport"], "stands alone"),
        (["@"], "@"),
    ],
)
def test_bad_presets(labels, message):
    with pytest.raises(LongdocError, match=message.replace("(", r"\(")) as e:
        load_labels(labels, None)
    assert exit_code(e.value) == 2


def test_cli_presets(encoder_dir, tmp_path):
    doc = tmp_path / "sport.txt"
    doc.write_text(SPORT * 10)
    r = run("classify", "-m", str(encoder_dir), "--labels", "@iptc", "--top-k", "17", str(doc))
    assert r.exit_code == 0, r.stderr
    (x,) = jsonl(r.stdout)
    assert len(x["scores"]) == 17 and abs(sum(x["scores"].values()) - 1) < 1e-4
    mine = tmp_path / "labels.tsv"
    mine.write_text("sport\tgames\nmusic\tsongs\n")
    r = run("classify", "-m", str(encoder_dir), "--labels", f"@{mine}", "--top-k", "5", str(doc))
    assert r.exit_code == 0 and set(jsonl(r.stdout)[0]["scores"]) == {"sport", "music"}
    r = run("classify", "-m", str(encoder_dir), "--labels", "@no-such-preset", str(doc))
    assert r.exit_code == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "@no-such-preset" in r.stderr and "iptc" in r.stderr


def test_models_lists_the_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    r = run("models", "--format", "json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["label_presets"] == preset_names() and data["default_labels"] == DEFAULT_PRESET
    r = run("models", "--format", "table")
    assert r.exit_code == 0 and "@iptc" in r.stdout and f"@{DEFAULT_PRESET}" in r.stdout


# ------------------------------------------------------------------------------------------------
# scoring


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


LABELS = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])


@pytest.mark.parametrize("vote", VOTES)
def test_probabilities_sum_to_one(vote):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(7, 3), dim=-1)
    probs = zero_shot_probabilities(emb, torch.arange(1, 8), LABELS, torch.tensor([0.1, -0.2, 0.3]), vote)
    assert probs.shape == (3,) and torch.all(probs > 0) and abs(float(probs.sum()) - 1) < 1e-6


def test_soft_vote_is_the_weighted_mean_of_the_passages_probabilities():
    """Three passages about label 0 outvote one long passage that is about label 1 more strongly; the
    mean cosine follows the single strong passage's margin instead."""
    emb = _unit([1, 0.5, 0], [1, 0.5, 0], [1, 0.5, 0], [0, 1, 0])
    weights = torch.tensor([10, 10, 10, 20])
    zero = torch.zeros(3)
    soft = zero_shot_probabilities(emb, weights, LABELS, zero, "soft")
    per_passage = torch.softmax(SCALE * emb @ LABELS.T, dim=-1)
    assert torch.allclose(soft, (weights[:, None] * per_passage).sum(0) / weights.sum(), atol=1e-6)
    assert int(soft.argmax()) == 0
    assert int(zero_shot_probabilities(emb, weights, LABELS, zero, "mean").argmax()) == 1


def test_calibration_removes_what_a_label_gets_from_any_text():
    """A label close to every text (bias) stops winning when its bias is subtracted."""
    emb = _unit([0.55, 0.5, 0])
    assert int(zero_shot_probabilities(emb, torch.tensor([5]), LABELS, torch.zeros(3)).argmax()) == 0
    bias = torch.tensor([0.2, 0.0, 0.0])
    assert int(zero_shot_probabilities(emb, torch.tensor([5]), LABELS, bias).argmax()) == 1


def test_a_label_with_several_vectors_scores_its_closest_one():
    """Vectors 0 and 1 are label 0's two descriptions, vector 2 label 1's: a passage on either of label
    0's descriptions reads as label 0; the probabilities still sum to 1 over the two labels."""
    vectors = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    owner = torch.tensor([0, 0, 1])
    emb = _unit([0.1, 1, 0.3], [0.2, 0.1, 1])
    cos = label_cosines(emb, vectors, owner)
    each = emb @ vectors.T
    assert torch.allclose(cos, torch.stack([each[:, :2].max(1).values, each[:, 2]], dim=1))
    for vote in VOTES:
        first = zero_shot_probabilities(emb[:1], torch.tensor([5]), vectors, torch.zeros(2), vote, owner)
        assert first.shape == (2,) and int(first.argmax()) == 0 and abs(float(first.sum()) - 1) < 1e-6
        second = zero_shot_probabilities(emb[1:], torch.tensor([5]), vectors, torch.zeros(2), vote, owner)
        assert int(second.argmax()) == 1
    assert torch.equal(label_cosines(emb, vectors), emb @ vectors.T)  # no owner: one vector per label


def test_classifier_takes_the_best_of_a_labels_descriptions(encoder_dir):
    """A label with two descriptions has two vectors; its cosine with any text is the larger of what
    each description alone gives."""
    tm = load_task_model(encoder_dir, task="classify", max_length=64)
    both = Classifier(tm, [Label("sport", "football match", ("tennis player",)), Label("music", "songs")])
    one = Classifier(tm, [Label("sport", "football match"), Label("music", "songs")])
    other = Classifier(tm, [Label("sport", "tennis player"), Label("music", "songs")])
    assert both.label_embeddings.shape[0] == 3 and both.owner.tolist() == [0, 0, 1]
    emb = F.normalize(
        torch.randn(4, both.label_embeddings.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )
    expected = torch.maximum(one._cosines(emb), other._cosines(emb))
    assert torch.allclose(both._cosines(emb), expected, atol=1e-5)
    (result,) = both.classify([("doc", SPORT * 4)])
    assert abs(sum(result.scores.values()) - 1) < 1e-4


def test_unknown_vote_is_an_error():
    with pytest.raises(LongdocError, match="vote"):
        zero_shot_probabilities(LABELS, torch.ones(3), LABELS, torch.zeros(3), "median")


def test_classifier_reads_passages_and_scores_them(encoder_dir):
    """Zero-shot reads consecutive passages of at most ``passage_tokens`` (no overlap); the document's
    scores come from the passages alone, and the cached-embedding path gives the same scores."""
    tm = load_task_model(encoder_dir, task="classify", max_length=128)
    labels = load_labels(["sport", "music", "other"], None)
    clf = Classifier(tm, labels, passage_tokens=32, top_k=3, calibrate=True)
    text = SPORT * 6 + MUSIC * 2
    (result,) = clf.classify([("doc", text)])
    n_body = result.n_tokens
    assert result.n_windows == -(-n_body // 30) and not result.truncated
    assert abs(sum(result.scores.values()) - 1) < 1e-4
    [(emb, weights)] = clf.passage_embeddings([text])
    assert emb.shape[0] == result.n_windows and int(weights.sum()) == n_body + 2 * result.n_windows
    probs = clf.scores_from_passages(emb, weights)
    assert {n: round(float(p), 6) for n, p in zip(clf.names, probs, strict=True)} == result.scores
    raw = Classifier(tm, labels, passage_tokens=32, calibrate=False)
    assert torch.all(raw.bias == 0) and not torch.all(clf.bias == 0)


def test_bare_names_get_a_template_and_calibration_described_labels_do_not(encoder_dir):
    tm = load_task_model(encoder_dir, task="classify", max_length=64)
    assert Label("sport").prompts() == ["sport", "sport", "This text is about sport."]
    assert Label("sport", "games").prompts() == ["sport: games"]
    bare = Classifier(tm, [Label("sport"), Label("music")])
    described = Classifier(tm, [Label("sport", "games"), Label("music", "songs")])
    assert not torch.all(bare.bias == 0) and torch.all(described.bias == 0)
    assert torch.all(Classifier(tm, [Label("sport"), Label("music")], calibrate=False).bias == 0)


def test_soft_half_lets_only_the_most_topical_half_vote():
    """Two passages squarely about label 0 and two long, vaguer ones leaning to label 2: the soft vote
    follows the long ones, soft-half only the clear ones."""
    emb = _unit([1, 0, 0], [1, 0, 0], [0.3, 0.5, 0.8], [0.3, 0.5, 0.8])
    weights = torch.tensor([10, 10, 40, 40])
    zero = torch.zeros(3)
    assert int(zero_shot_probabilities(emb, weights, LABELS, zero, "soft").argmax()) == 2
    half = zero_shot_probabilities(emb, weights, LABELS, zero, "soft-half")
    assert int(half.argmax()) == 0 and abs(float(half.sum()) - 1) < 1e-6
    one = zero_shot_probabilities(emb[2:3], weights[2:3], LABELS, zero, "soft-half")  # one passage votes
    assert torch.allclose(one, zero_shot_probabilities(emb[2:3], weights[2:3], LABELS, zero, "soft"))
