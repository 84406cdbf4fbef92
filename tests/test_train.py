"""`longdoc train` / `evaluate` end to end on a tiny random model: outputs, resume, bad input, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli.cli import app, exit_code
from longdoc_cli.config import ConfigError, load_config
from longdoc_cli.errors import LongdocError
from longdoc_cli.model import load_state_dict
from longdoc_cli.train import train

pytest_plugins = ["fixtures_tiny"]  # tiny_model_dir, cls_data, qa_data, tiny

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_classification_outputs_are_hf_directories(tiny_model_dir, cls_data, tmp_path):
    cfg = load_config(
        CONFIGS / "tiny-classify.yaml", [f"model.name={tiny_model_dir}", f"data.train={cls_data}"]
    )
    events = []
    result = train(cfg, tmp_path / "out", on_event=events.append)
    assert result.steps == 4 and len(result.history) == 2 and result.best_metric is not None
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    for name in ("best", "last"):
        d = tmp_path / "out" / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "longdoc.yaml", "README.md"} <= {
            p.name for p in d.iterdir()
        }
        conf = json.loads((d / "config.json").read_text())
        assert conf["architectures"] == ["LongformerForSequenceClassification"]
        assert (
            conf["id2label"] == {"0": "music", "1": "sport"}
            and conf["problem_type"] == "single_label_classification"
        )
        assert load_config(d / "longdoc.yaml") == cfg
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert sum("eval_macro_f1" in r for r in log) == 2
    import transformers

    hf = transformers.LongformerForSequenceClassification.from_pretrained(tmp_path / "out" / "best")
    assert hf.config.id2label[1] == "sport"


def test_multi_label_and_evaluate_command(tiny, tiny_model_dir, tmp_path):
    data = tiny.classification_data(tmp_path / "multi.jsonl", multi=True)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["train", str(CONFIGS / "tiny-classify.yaml"), "-o", str(out), "-m", str(tiny_model_dir),
              "--set", f"data.train={data}", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    conf = json.loads((out / "best" / "config.json").read_text())
    assert conf["problem_type"] == "multi_label_classification" and len(conf["id2label"]) == 3
    r = CliRunner().invoke(app, ["evaluate", "-m", str(out / "best"), str(data), "--format", "json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["task"] == "classify" and report["n"] == 24
    assert set(report["metrics"]) == {"accuracy", "macro_f1", "micro_f1"}
    assert set(report["classification"]["per_label"]) == {"long", "music", "sport"}
    r = CliRunner().invoke(app, ["evaluate", "-m", str(out / "best"), str(data), "--format", "table"])
    assert r.exit_code == 0 and "by document length" in r.stdout


def test_qa_train_and_evaluate(tiny_model_dir, qa_data, tmp_path):
    cfg = load_config(CONFIGS / "tiny-qa.yaml", [f"model.name={tiny_model_dir}", f"data.train={qa_data}"])
    result = train(cfg, tmp_path / "qa")
    assert result.n_dev == 3 and result.n_train == 9  # one whole page of 4 held out
    conf = json.loads((tmp_path / "qa" / "best" / "config.json").read_text())
    assert conf["architectures"] == ["LongformerForQuestionAnswering"]
    r = CliRunner().invoke(app, ["evaluate", "-m", str(tmp_path / "qa" / "best"), str(qa_data), "-f", "json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    assert {"exact_match", "f1", "far_n", "far_f1"} <= set(metrics)


def test_resume_is_exact(tiny, tiny_model_dir, cls_data, tmp_path):
    sets = tiny.overrides(tiny_model_dir, cls_data, **{"train.max_steps": 6, "train.eval_every": 3})
    cfg = load_config(None, sets)
    train(cfg, tmp_path / "straight")
    first = train(cfg, tmp_path / "resumed", stop_after_steps=3)
    assert first.steps == 3
    second = train(cfg, tmp_path / "resumed", resume=True)
    assert second.steps == 6
    a = load_state_dict(tmp_path / "straight" / "last")
    b = load_state_dict(tmp_path / "resumed" / "last")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log if "loss" in x] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match=r"config differs .*\(train.lr: [0-9.e-]+ -> 0.5\)"):
        train(load_config(None, [*sets, "train.lr=0.5"]), tmp_path / "resumed", resume=True)


def test_refuses_non_empty_output_and_force_replaces(tiny, tiny_model_dir, cls_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = load_config(None, tiny.overrides(tiny_model_dir, cls_data, **{"train.max_steps": 1}))
    with pytest.raises(LongdocError, match="not empty; pass --resume .* or --force") as e:
        train(cfg, out)
    assert exit_code(e.value) == 2 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    train(cfg, out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "best").is_dir()
    with pytest.raises(LongdocError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True)


def test_bad_input_is_one_clear_line(tiny_model_dir, cls_data, qa_data, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    lines = cls_data.read_text().splitlines()
    bad.write_text("\n".join([*lines[:3], "{not json", json.dumps({"text": "no label"}), *lines[3:]]) + "\n")
    base = ["train", str(CONFIGS / "tiny-classify.yaml"), "-m", str(tiny_model_dir), "-q"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--set", f"data.train={bad}"])
    assert r.exit_code == 1 and f"{bad}:4: not valid JSON" in r.stderr and len(r.stderr.splitlines()) == 1
    r = runner.invoke(
        app, [*base, "-o", str(tmp_path / "b"), "--set", f"data.train={bad}", "--skip-bad-lines"]
    )
    assert r.exit_code == 0, r.output
    assert f"{bad}:4: not valid JSON" in r.stderr and f"{bad}:5: no 'label' key" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "c"), "--set", f"data.train={qa_data}"])
    assert r.exit_code == 2 and "holds QA records" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "d"), "--set", "model.max_lenght=3"])
    assert r.exit_code == 2 and "did you mean model.max_length?" in r.stderr
    # an answer that is not in its context: counted and reported, not trained on
    recs = [json.loads(x) for x in qa_data.read_text().splitlines()]
    recs[0]["answers"] = {"text": ["zebra crossing"], "answer_start": [5]}
    recs[1]["answers"]["answer_start"] = [recs[1]["answers"]["answer_start"][0] + 1]  # off by one: realigned
    moved = tmp_path / "qa_bad.jsonl"
    moved.write_text("".join(json.dumps(x) + "\n" for x in recs))
    cfg = load_config(CONFIGS / "tiny-qa.yaml", [f"model.name={tiny_model_dir}", f"data.train={moved}"])
    result = train(cfg, tmp_path / "qa")
    assert any("'zebra crossing' is not in its context" in n for n in result.notes)
    assert any("1 answer_start offsets" in n for n in result.notes)


def _torchrun_available() -> bool:
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not _torchrun_available(), reason="torchrun test runs on Linux")
def test_ddp_two_processes_on_cpu(tiny, tiny_model_dir, cls_data, tmp_path):
    out = tmp_path / "ddp"
    sets = tiny.overrides(tiny_model_dir, cls_data, **{"train.max_steps": 2, "train.eval_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "longdoc_cli", "train", str(CONFIGS / "tiny-classify.yaml"), "-o", str(out),
           "-q"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # logged once (rank 0), not twice
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / "trainer_state.pt").is_file()


def test_early_stopping_accumulation_and_checkpointing(tiny, tiny_model_dir, cls_data, tmp_path):
    extra = {"train.max_steps": 8, "train.eval_every": 1, "train.early_stopping_patience": 1,
             "train.lr": 1e-12, "train.grad_accum": 2, "train.batch_size": 2,
             "model.gradient_checkpointing": "true"}  # fmt: skip
    result = train(load_config(None, tiny.overrides(tiny_model_dir, cls_data, **extra)), tmp_path / "es")
    assert result.stopped_early and result.steps == 2 and result.best_step == 1


def test_evaluate_zero_shot_qa_and_refusals(tiny_model_dir, qa_data, cls_data):
    r = CliRunner().invoke(app, ["evaluate", "-m", str(tiny_model_dir), str(qa_data), "-f", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 12  # a plain encoder answers zero-shot, as `longdoc qa` does
    r = CliRunner().invoke(app, ["evaluate", "-m", str(tiny_model_dir), str(cls_data), "-f", "json"])
    assert r.exit_code == 0, r.output  # issue 15: zero-shot over the data's labels (the baseline)
    report = json.loads(r.stdout)
    assert report["task"] == "classify" and report["classification"]["labels"] == ["music", "sport"]


def test_csv_data_and_seeded_group_split(tmp_path):
    from longdoc_cli.config import DataSection
    from longdoc_cli.data import load_classification, split_dev

    path = tmp_path / "d.csv"
    path.write_text('id,body,tag\n1,"a, b",x\n2,c,"[""x"", ""y""]"\n3,d,\n', encoding="utf-8")
    data = DataSection(text_key="body", label_key="tag")
    with pytest.raises(LongdocError, match=r"d.csv:4: missing label"):
        load_classification(str(path), data)
    got = load_classification(str(path), DataSection(text_key="body", label_key="tag", skip_bad_lines=True))
    assert got.multi_label and got.labels == ["x", "y"]
    assert [d.labels for d in got.docs] == [("x",), ("x", "y")]
    assert len(got.skipped) == 1
    items = [(g, i) for g in "abcde" for i in range(3)]
    train_a, dev_a = split_dev(items, 0.3, 7, group=lambda x: x[0])
    assert split_dev(items, 0.3, 7, group=lambda x: x[0]) == (train_a, dev_a)  # seeded
    assert not {g for g, _ in train_a} & {g for g, _ in dev_a} and len(dev_a) % 3 == 0


def test_one_run_per_output_directory(tiny, tiny_model_dir, cls_data, tmp_path):
    """A second `longdoc train` into a directory a run is writing is refused; a failed run leaves
    no directory of its own behind, and a finished one no lock file."""
    import fcntl

    from longdoc_cli.checkpoint import LOCK_FILE

    cfg = load_config(None, tiny.overrides(tiny_model_dir, cls_data, **{"train.max_steps": 1}))
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / LOCK_FILE, "a") as held:  # what a running `longdoc train` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LongdocError, match="another `longdoc train` is writing there") as e:
            train(cfg, busy)
        assert exit_code(e.value) == 2 and not (busy / "best").exists()
    train(cfg, tmp_path / "done")
    assert not (tmp_path / "done" / LOCK_FILE).exists() and (tmp_path / "done" / "best").is_dir()
    with pytest.raises(LongdocError):
        train(load_config(None, [*tiny.overrides(tiny_model_dir, cls_data), "data.train=nope.jsonl"]),
              tmp_path / "new" / "out")  # fmt: skip
    assert not (tmp_path / "new").exists()  # nor the parent it created
    with pytest.raises(LongdocError, match="empty path") as e:  # Path("") would be the current directory
        train(cfg, "")
    assert exit_code(e.value) == 2


def test_unreadable_training_data_says_why(tiny, tiny_model_dir, tmp_path):
    import gzip

    packed = tmp_path / "data.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"text": "a", "label": "x"}\n'))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n[1, 2\n")
    for data, says in [
        (packed, "is a gzip-compressed file"),
        (broken, r"no valid records \(the first bad one: .*:1"),
    ]:
        cfg = load_config(None, tiny.overrides(tiny_model_dir, data))
        with pytest.raises(LongdocError, match=says):
            train(cfg, tmp_path / "out")


def test_piped_train_logs_every_n_steps_and_sums_up(tiny, tiny_model_dir, cls_data, tmp_path):
    sets = tiny.overrides(tiny_model_dir, cls_data, **{"train.log_every": 2, "train.eval_every": 4})
    r = CliRunner().invoke(
        app, ["train", str(CONFIGS / "tiny-classify.yaml"), "-o", str(tmp_path / "out"),
              *[x for s in sets for x in ("--set", s)]],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    steps = [line for line in r.stderr.splitlines() if line.startswith("step ") and "loss" in line]
    assert [line.split()[1].rstrip(",") for line in steps] == ["2/4", "4/4"]
    assert all(" lr " in line and " s/step, ETA " in line for line in steps)
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("longdoc: train: 18 documents, ") and "total " in summary and "/step" in summary
    quiet = CliRunner().invoke(
        app, ["train", str(CONFIGS / "tiny-classify.yaml"), "-o", str(tmp_path / "q"), "-q",
              *[x for s in sets for x in ("--set", s)]],
    )  # fmt: skip
    assert quiet.exit_code == 0 and "longdoc: train:" not in quiet.stderr


def test_model_card_and_shared_best_last(tiny, tiny_model_dir, cls_data, tmp_path, monkeypatch):
    import longdoc_cli.train as train_mod
    from longdoc_cli.tasks.runner import load_task_model

    (tiny_model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    try:
        # lr ~0: every evaluation ties, so the best is step 2 and only step 2's last/ shares with it
        sets = tiny.overrides(tiny_model_dir, cls_data, **{"train.max_steps": 2, "train.eval_every": 2})
        result = train(load_config(None, sets), tmp_path / "out")
    finally:
        (tiny_model_dir / "README.md").unlink()
    best, last = tmp_path / "out" / "best", tmp_path / "out" / "last"
    assert result.best_step == result.steps == 2
    card = (best / "README.md").read_text()
    assert "license: apache-2.0" in card and "## Hyperparameters" in card and "| lr | 0.001 |" in card
    assert "18 examples" in card and "## Training time" in card and "2 steps in this run" in card
    assert f"- base model: `{tiny_model_dir}`; licence: apache-2.0" in card
    dev_rows = card.split("| dev metric | value |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert dev_rows and all(re.fullmatch(r"\| \w+ \| -?\d+\.\d{4} \|", x) for x in dev_rows), dev_rows
    assert re.search(r"- dev: `[^`]+`, [1-9]\d* examples", card)
    assert os.stat(best / "model.safetensors").st_ino == os.stat(last / "model.safetensors").st_ino
    assert (last / "trainer_state.pt").is_file() and not (best / "trainer_state.pt").exists()
    assert "# out/last" in (last / "README.md").read_text()
    before = load_state_dict(best)
    for d in (best, last):
        load_task_model(d, task="classify")
    # A kill while last/ is saved (here: an error after its files were linked) leaves best/ whole.
    cfg = load_config(best / "longdoc.yaml")
    info = {"labels": ["music", "sport"], "multi_label": False, "notes": []}
    model = train_mod.build_model(cfg, tiny_model_dir, info)

    def killed(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mod.save_checkpoint(model, cfg, tiny_model_dir, last, {}, extra=killed, same_as=best)
    for d in (best, last):
        after = load_state_dict(d)
        assert all(torch.equal(before[k], after[k]) for k in before)
    # Replacing best/ with other weights leaves last/ as it was.
    train_mod.save_checkpoint(model, cfg, tiny_model_dir, best, {})
    assert all(torch.equal(before[k], v) for k, v in load_state_dict(last).items())
    assert not all(torch.equal(before[k], v) for k, v in load_state_dict(best).items())


def test_link_files_falls_back_when_links_fail(tmp_path, monkeypatch):
    from longdoc_cli import checkpoint

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a.bin").write_bytes(b"1")
    (src / "README.md").write_text("card")
    assert checkpoint.link_files(src, dst, skip=("README.md",)) and [p.name for p in dst.iterdir()] == [
        "a.bin"
    ]

    def no_links(a, b):
        raise OSError(1, "Operation not permitted")

    (dst / "a.bin").unlink()
    monkeypatch.setattr(checkpoint.os, "link", no_links)
    assert not checkpoint.link_files(src, dst) and list(dst.iterdir()) == []


def test_evaluate_prints_a_summary_and_progress(tiny_model_dir, qa_data, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import longdoc_cli.cli as cli

    err = io.StringIO()
    monkeypatch.setattr(cli, "stderr_console", lambda quiet=False: Console(file=err, force_terminal=True))
    r = CliRunner().invoke(app, ["evaluate", "-m", str(tiny_model_dir), str(qa_data), "-f", "json"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("longdoc: evaluate: ") and " questions, " in line and "load " in line
    assert "run" not in json.loads(r.stdout)
    assert "evaluate" in err.getvalue() and "ETA" in err.getvalue()  # the progress bar (a terminal)
    r = CliRunner().invoke(app, ["evaluate", "-m", str(tiny_model_dir), str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "missing.jsonl: no such file or directory" in r.stderr
