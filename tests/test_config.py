"""The typed config: strict loading, every problem at once, overrides, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from longdoc_cli.cli import app, exit_code
from longdoc_cli.config import (
    MODEL_CONFIG_NAME,
    ConfigError,
    LongdocConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    load_model_dir_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OURS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("bench"))  # bench*.yaml: bench's own


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.task in ("classify", "qa")
    assert cfg.tokenization.stride < cfg.model.max_length


def test_defaults_round_trip_through_commented_yaml(tmp_path):
    cfg = load_config(None)
    assert cfg.model.max_length == 4096 and cfg.train.lr == 5e-5 and cfg.metric == "macro_f1"
    for commented in (True, False):
        assert config_from_dict(yaml.safe_load(config_to_yaml(cfg, commented))) == cfg
    text = config_to_yaml(cfg)
    assert "lr: 5.0e-05" in text and "# two-sided window" in text
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_to_dict(cfg)["model"]["name"] == "default"


def test_unknown_keys_types_and_enums_reported_all_at_once():
    data = {
        "modle": {},
        "model": {"max_lenght": 3, "windw": 4, "max_length": "abc", "device": "gpu", "stride": 3},
        "train": {"lr": "1e-3", "epochs": 2.5},
        "task": "summarize",
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, source="x.yaml")
    lines = str(e.value).splitlines()
    assert exit_code(e.value) == 2
    assert "x.yaml: modle: unknown key; did you mean model?" in lines
    assert "x.yaml: model.max_lenght: unknown key; did you mean model.max_length?" in lines
    assert "x.yaml: model.windw: unknown key; did you mean model.attention_window?" in lines
    assert "x.yaml: model.max_length: expected an integer, got 'abc'" in lines
    assert "x.yaml: model.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'" in lines
    assert "x.yaml: model.stride: unknown key; did you mean tokenization.stride?" in lines
    assert "x.yaml: train.epochs: expected an integer, got 2.5" in lines
    assert any(line.startswith("x.yaml: task: expected one of classify, qa") for line in lines)
    assert len(lines) == 8  # train.lr "1e-3" (a string to PyYAML) is a number, not a problem


def test_range_checks_name_the_path():
    with pytest.raises(ConfigError, match=r"tokenization.stride: must be less than half"):
        config_from_dict({"model": {"max_length": 64}, "tokenization": {"stride": 40}})
    with pytest.raises(ConfigError, match=r"train.metric: 'f1' is not a classify metric"):
        config_from_dict({"train": {"metric": "f1"}})
    with pytest.raises(ConfigError, match=r"model.attention_window: the two-sided window"):
        config_from_dict({"model": {"attention_window": 7}})


def test_overrides_are_typed_yaml_scalars():
    cfg = apply_overrides(
        LongdocConfig(),
        ["train.lr=1e-3", "model.attention_window=256", "inference.labels=[a, b]", "train.bf16=true",
         "task=qa", "train.max_steps=null", "data.train=x.csv"],
    )  # fmt: skip
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.attention_window == 256 and cfg.inference.labels == ["a", "b"]
    assert cfg.train.bf16 is True and cfg.task == "qa" and cfg.metric == "f1"
    with pytest.raises(ConfigError) as e:
        apply_overrides(LongdocConfig(), ["model.device=gpu", "nonsense", "model=1", "train.lr=fast"])
    text = str(e.value)
    assert "model.device: expected auto, cpu, cuda, cuda:N or mps" in text
    assert "'nonsense': expected KEY=VALUE" in text
    assert "model: is a section" in text and "train.lr: expected a number, got 'fast'" in text


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_model_dir_config(tmp_path):
    assert load_model_dir_config(tmp_path) is None
    save_config(LongdocConfig(task="qa"), tmp_path / MODEL_CONFIG_NAME)
    assert load_model_dir_config(tmp_path).task == "qa"


def test_cli_config_init_and_validate(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["config", "init", "--task", "qa", "-"])
    assert r.exit_code == 0 and "task: qa" in r.stdout
    path = tmp_path / "qa.yaml"
    assert runner.invoke(app, ["config", "init", "--task", "qa", str(path)]).exit_code == 0
    assert runner.invoke(app, ["config", "init", str(path)]).exit_code == 2  # exists, no --force
    for target, says in [(tmp_path / "no" / "x.yaml", "does not exist"), (tmp_path, "is a directory")]:
        r = runner.invoke(app, ["config", "init", "--force", str(target)])
        assert r.exit_code == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = runner.invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == 0 and "ok (qa)" in r.stderr
    path.write_text("model:\n  windw: 3\n  max_length: abc\n")
    r = runner.invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == 2
    assert "model.windw: unknown key; did you mean model.attention_window?" in r.stderr
    assert "model.max_length: expected an integer, got 'abc'" in r.stderr


def test_every_problem_at_once_duplicates_and_infinities(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text('train:\n  epochs: "three"\n  lr: -1\n  batch_size: 0\n  weight_decay: .inf\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    for says in [
        "train.epochs: expected an integer",
        "train.lr: must be > 0",
        "train.batch_size: must be >= 1",
        "train.weight_decay: expected a number, got Infinity",
    ]:
        assert says in text, text
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: .*the key 'lr' is given twice"):
        load_config(path)


# ----------------------------------------------------------------------------------------------
# resolve_run: which setting wins


def test_resolve_run_precedence(tmp_path):
    from longdoc_cli.config import resolve_run
    from tests.fixtures_tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m")
    # no config: the defaults, then the model directory's longdoc.yaml replaces them
    assert resolve_run("qa", model=str(model_dir)).config == LongdocConfig(task="qa")
    save_config(apply_overrides(LongdocConfig(), ["inference.top_k=5", "inference.batch_size=3"]),
                model_dir / MODEL_CONFIG_NAME)  # fmt: skip
    run = resolve_run("classify", model=str(model_dir))
    assert run.model_dir == model_dir and (run.config.inference.top_k, run.config.inference.batch_size) == (
        5,
        3,
    )
    # --config replaces the model's own; --set overrides it; a command-line option overrides --set
    file = tmp_path / "c.yaml"
    file.write_text("inference:\n  top_k: 7\n  explain: 1\n")
    run = resolve_run(
        "classify", config=file, model=str(model_dir), overrides=["inference.explain=2", "inference.top_k=8"],
        flags={"inference.top_k": ("--top-k", 9), "inference.threshold": ("--threshold", None)},
    )  # fmt: skip
    i = run.config.inference
    assert (i.top_k, i.explain, i.batch_size, i.threshold) == (
        9,
        2,
        LongdocConfig().inference.batch_size,
        0.5,
    )
    with pytest.raises(ConfigError, match="task is 'classify' but this command needs a 'qa' config"):
        resolve_run("qa", config=file, model=str(model_dir))
    # find_model=False: the config alone (train, config validate)
    assert resolve_run(config=file, find_model=False).model_dir is None


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"inference.top_k": ("--top-k", 0)}, "--top-k 0: must be at least 1"),
        ({"inference.threshold": ("--threshold", 2.0)}, "--threshold 2.0: must be between 0 and 1"),
        ({"inference.aggregate": ("--aggregate", "x")}, "--aggregate must be mean, max or first, not 'x'"),
        ({"model.dtype": ("--dtype", "fp8")}, "--dtype must be auto, fp32, bf16 or fp16, not 'fp8'"),
        ({"tokenization.stride": ("--doc-stride", -3)}, "--doc-stride -3: must be at least 0"),
    ],
)  # fmt: skip
def test_command_line_options_are_validated_by_their_own_names(flags, message):
    from longdoc_cli.config import apply_flags

    with pytest.raises(ConfigError) as e:
        apply_flags(LongdocConfig(), flags)
    assert str(e.value) == message and exit_code(e.value) == 2
