"""`--dtype auto` (issue 18): bf16 on a CPU that computes it natively, for tasks that passed the quality
gate, fp32 elsewhere; `--quantize int8` offered only where it is the faster mode. The CPU's
capability is mocked both ways, so every branch runs on any machine."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli import runtime
from longdoc_cli.cli import app
from longdoc_cli.runtime import pick_dtype
from longdoc_cli.tasks.runner import load_task_model
from tests.fixtures_tiny import build_tiny_model

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    """Set whether the (mocked) CPU computes bf16 natively."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: value)

    return set_native


@pytest.mark.parametrize("has_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_auto_follows_the_cpu(native, has_bf16):
    native(has_bf16)
    want = torch.bfloat16 if has_bf16 else torch.float32
    for task in ("classify", "qa", None):
        name, reason = runtime.auto_dtype("cpu", task)
        assert name == ("bf16" if has_bf16 else "fp32") and reason
        assert pick_dtype("auto", CPU, task) == want
    assert ("no native bf16" in runtime.auto_dtype("cpu", "qa")[1]) is not has_bf16
    # an explicit choice is never second-guessed
    assert pick_dtype("fp32", CPU, "classify") == torch.float32
    assert pick_dtype("bf16", CPU, "classify") == torch.bfloat16


def test_auto_keeps_fp32_for_a_task_that_failed_the_gate(native, monkeypatch):
    native(True)
    monkeypatch.setitem(runtime.BF16_GATE_PASSED, "qa", False)
    assert pick_dtype("auto", CPU, "qa") == torch.float32
    assert "quality gate" in runtime.auto_dtype("cpu", "qa")[1]
    assert pick_dtype("auto", CPU, "classify") == torch.bfloat16
    assert runtime.auto_dtype("cpu", "unknown-task")[0] == "fp32"  # not gated: not bf16


def test_auto_is_fp32_under_int8(native):
    native(True)
    assert pick_dtype("auto", CPU, "classify", quantize="int8") == torch.float32


def test_int8_offered_only_without_native_bf16(native):
    native(True)
    assert runtime.int8_offered("cpu")[0] is False
    native(False)
    assert runtime.int8_offered("cpu")[0] is True
    assert runtime.int8_offered("cuda")[0] is False


def test_cpuinfo_fallback(monkeypatch, tmp_path):
    """A torch without its bf16 probes: the kernel's CPU flags decide; no such file: emulated."""
    for name in runtime.BF16_PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.setattr(runtime, "_cpuinfo_flags", lambda: runtime._read_flags(info))
    assert runtime.cpu_has_native_bf16() is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert runtime.cpu_has_native_bf16() is False
    info.unlink()
    assert runtime.cpu_has_native_bf16() is False


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.mark.parametrize("has_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_load_task_model_auto(encoder_dir, native, has_bf16):
    native(has_bf16)
    tm = load_task_model(encoder_dir, task="classify", device="cpu")
    assert tm.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert next(tm.model.parameters()).dtype == tm.dtype
    # int8 quantizes an fp32 model: auto gives it one (it used to refuse a bf16 one)
    assert load_task_model(encoder_dir, task="classify", device="cpu", quantize="int8").dtype == torch.float32


@pytest.mark.parametrize("has_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_models_command_says_what_auto_picks(native, has_bf16, monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native(has_bf16)
    r = CliRunner().invoke(app, ["models", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    want = "bf16" if has_bf16 else "fp32"
    assert {t: a["dtype"] for t, a in data["auto_dtype"].items()} == {"classify": want, "qa": want}
    assert data["int8_offered"]["offered"] is not has_bf16 and data["int8_offered"]["reason"]
    r = CliRunner().invoke(app, ["models", "--format", "table"])
    assert r.exit_code == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("--dtype auto"))
    assert f"{want} (classify, qa)" in line and ("natively" in line) is has_bf16
    line = next(x for x in r.stdout.splitlines() if x.startswith("--quantize int8"))
    assert ("not offered" in line) is has_bf16


def test_models_command_per_task_when_the_gate_differs(native, monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDOC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native(True)
    monkeypatch.setitem(runtime.BF16_GATE_PASSED, "qa", False)
    r = CliRunner().invoke(app, ["models", "--format", "table"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(x.startswith("--dtype auto (classify)") and "bf16" in x for x in lines)
    assert any(x.startswith("--dtype auto (qa)") and "fp32" in x and "quality gate" in x for x in lines)


@pytest.mark.parametrize("has_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_classify_int8_warns_where_bf16_is_faster(encoder_dir, native, has_bf16, tmp_path):
    native(has_bf16)
    doc = tmp_path / "d.txt"
    doc.write_text("The team scored a goal in the football match.\n")
    args = ["classify", "-m", str(encoder_dir), "--labels", "sport,music", "--device", "cpu",
            "--quantize", "int8", str(doc)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert ("slower than bf16" in r.stderr) is has_bf16
    assert "slower than bf16" not in CliRunner().invoke(app, [*args, "--quiet"]).stderr


@pytest.mark.parametrize("has_bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_bench_auto_is_what_the_commands_run(native, has_bf16):
    from longdoc_cli.runtime import dtype_name as resolve_dtype

    native(has_bf16)
    assert resolve_dtype("auto", "cpu") == ("bf16" if has_bf16 else "fp32")
    assert resolve_dtype("auto", "cpu", quantize="int8") == "fp32"  # int8 rows quantize an fp32 model
    assert resolve_dtype("fp32", "cpu") == "fp32" and resolve_dtype("bf16", "cpu") == "bf16"
