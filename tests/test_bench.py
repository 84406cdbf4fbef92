"""`longdoc bench` and int8 quantization: tiny model, tiny lengths, seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli import bench
from longdoc_cli.bench import child
from longdoc_cli.cli import app, exit_code
from longdoc_cli.errors import LongdocError
from longdoc_cli.model import LongformerConfig, LongformerEncoder
from longdoc_cli.quantize import is_quantized, quantize_int8
from longdoc_cli.runtime import dtype_name

ROOT = Path(__file__).resolve().parents[1]
FAST = ["-m", "tiny", "--iters", "1", "--warmup", "0", "--no-isolate"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def tiny_encoder(window: int = 8, max_len: int = 130) -> LongformerEncoder:
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, attention_window=window, max_position_embeddings=max_len + 2,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return LongformerEncoder(cfg).eval()


# ----------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize(
    ("n", "w", "d"), [(1, 3, 1), (5, 3, 1), (37, 4, 1), (37, 4, 3), (10, 20, 2), (64, 8, 8)]
)
def test_band_pairs_counts_the_exact_band(n, w, d):
    i = torch.arange(n)
    diff = i[None, :] - i[:, None]
    brute = ((diff.abs() <= w * d) & (diff.remainder(d) == 0)).sum().item()
    assert bench.band_pairs(n, w, d) == brute


def test_base_flops_match_the_anchor():
    cfg = bench.preset_config("base", 4096, None)
    tflop = bench.encoder_flops(cfg, 4096, 1, 1) / 1e12
    # 24 n d^2 + exact band, 12 layers: 0.77 TFLOP (0.89 with HF's global k/v over all tokens)
    assert 0.75 < tflop < 0.80
    full = bench.encoder_flops(cfg, 4096, 1, 1, full=True) / 1e12
    assert full > tflop * 1.5
    assert bench.encoder_flops(cfg, 4096, 1, 1, train=True) == pytest.approx(3e12 * tflop)


# ----------------------------------------------------------------------------------------------
# The command on a tiny model


def test_bench_json_tiny_all_impls():
    impls = "longdoc,hf,full,longdoc-attn"
    res = invoke(*FAST, "--seq-lens", "32,65", "--impls", impls, "--quantize", "int8", "--format", "json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert [c["passed"] for c in report["checks"]] == [True, True, True]
    rows = report["measurements"]
    assert {(r["impl"], r["seq_len"]) for r in rows} == {
        (i, n) for i in ("longdoc", "longdoc-int8", "hf", "full", "longdoc-attn") for n in (32, 65)
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["p95_s"] >= r["median_s"]
        assert r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["median_s"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        # each row's share is against the peak its own child measured right after the runs
        assert r["matmul_peak_gflops"] > 0
        assert r["peak_share"] == pytest.approx(r["gflops"] / r["matmul_peak_gflops"])
    assert report["peaks"][0]["gflops"] > 0
    assert report["spec"]["impls"] == ["longdoc", "longdoc-int8", "hf", "full", "longdoc-attn"]


def test_bench_jsonl_and_child_process_memory():
    res = invoke("-m", "tiny", "--seq-len", "40", "--impls", "longdoc", "--iters", "2", "--no-check",
                 "--format", "jsonl")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    # auto: fp32, or bf16 on a CPU with native bf16 (then the fp32 peak is measured too)
    peaks = 1 if dtype_name("auto", "cpu") == "fp32" else 2
    assert [r["type"] for r in records] == ["environment", *["matmul_peak"] * peaks, "measurement"]
    m = records[-1]
    assert m["status"] == "ok" and m["iters"] == 2
    if Path("/proc/self/clear_refs").exists():
        assert m["peak_mem_mib"] is not None and m["peak_mem_mib"] >= 0


def test_bench_table_and_train_mode():
    res = invoke(*FAST, "--seq-len", "33", "--impls", "longdoc,hf", "--mode", "train", "--format", "table")
    assert res.exit_code == 0, res.stderr
    assert "longdoc bench" in res.stdout and "matmul peak" in res.stdout and "check model" in res.stdout


def test_config_file_loads_and_flags_override_it():
    spec = bench.load_spec(ROOT / "configs" / "bench.yaml")
    assert spec.models == ("base",) and 4096 in spec.seq_lens and "hf" in spec.impls
    res = invoke("--config", str(ROOT / "configs" / "bench.yaml"), *FAST, "--seq-len", "24", "--layers", "1",
                 "--impls", "longdoc,full", "--format", "json",
                 "--set", "check_len=20", "--set", "seq_lens=[32, 64]")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["spec"]["seq_lens"] == [24] and report["spec"]["models"] == ["tiny"]  # flags win over --set
    assert report["spec"]["check_len"] == 20  # --set reaches a key no flag sets
    assert report["spec"]["layers"] == 1 and report["spec"]["time_budget"] == 120
    assert len(report["measurements"]) == 2


def test_set_overrides_the_sweep_and_names_bad_keys():
    from longdoc_cli.bench.spec import apply_overrides

    data = apply_overrides({"iters": 5}, ["iters=2", "seq_lens=[128, 256]", "dilation=null", "device=cuda:1"])
    spec = bench.spec_from_dict(data)
    assert (
        spec.iters == 2 and spec.seq_lens == (128, 256) and spec.dilation is None and spec.device == "cuda:1"
    )
    for args, needle in ((["--set", "iters"], "expected KEY=VALUE"), (["--set", "chek_len=4"], "check_len"),
                         (["--set", "globals=many"], "globals")):  # fmt: skip
        res = invoke(*FAST, "--seq-len", "16", *args)
        assert res.exit_code == 2 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("seq_len: [1024]\niters: many\ndtypes: [fp8]\n")
    with pytest.raises(LongdocError) as e:
        bench.load_spec(bad)
    text = str(e.value)
    assert "did you mean seq_lens?" in text and "iters: 'many'" in text and "fp8" in text
    assert exit_code(e.value) == 2


def test_a_failing_baseline_is_skipped_with_a_note(monkeypatch):
    real = child.forward

    def forward(impl, model, *args):
        if impl == "full":
            raise RuntimeError("CPU out of memory: tried to allocate 40 GiB")
        return real(impl, model, *args)

    monkeypatch.setattr(child, "forward", forward)
    report = bench.run_bench(bench.BenchSpec(models=("tiny",), seq_lens=(32,), impls=("longdoc", "full"),
                                             iters=1, warmup=0, isolate=False, check=False))  # fmt: skip
    by_impl = {m.impl: m for m in report.measurements}
    assert by_impl["longdoc"].status == "ok"
    assert by_impl["full"].status == "skipped" and "out of memory" in by_impl["full"].note


def test_too_slow_baseline_is_skipped_by_estimate():
    res = invoke(*FAST, "--seq-len", "64", "--impls", "longdoc", "--time-budget", "1e-9", "--no-check",
                 "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    (m,) = json.loads(res.stdout)["measurements"]
    assert m["status"] == "skipped" and "--time-budget" in m["note"]


def test_path_model(tmp_path):
    pytest.importorskip("longdoc_cli.hub")
    tiny_encoder().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "vocab.txt").write_text(
        "[PAD]\n[UNK]\n"
    )  # the bench needs no tokenizer, the resolver does
    res = invoke("-m", str(tmp_path / "m"), "--iters", "1", "--warmup", "0", "--no-isolate", "--seq-lens",
                 "20,500", "--impls", "longdoc,hf", "--format", "json")  # fmt: skip
    if res.exit_code and "tokenizer" in res.stderr:
        pytest.skip("resolve_model wants tokenizer files next to the weights")
    assert res.exit_code == 0, res.stderr
    rows = {(m["impl"], m["seq_len"]): m for m in json.loads(res.stdout)["measurements"]}
    assert rows[("longdoc", 20)]["status"] == "ok"
    assert rows[("longdoc", 500)]["status"] == "skipped" and "positions" in rows[("longdoc", 500)]["note"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-lens", "128,-3"], "--seq-lens"),
        (["--seq-lens", "12x"], "--seq-lens"),
        (["--dtype", "fp8"], "--dtype"),
        (["--impls", "longdoc,flash"], "impls"),
        (["--mode", "fit"], "--mode"),
        (["--quantize", "int4"], "--quantize"),
        (["--format", "tsv"], "--format"),
        (["--config", "/nonexistent/bench.yaml"], "bench.yaml"),
        (["--model", "/nonexistent/model-dir"], "nonexistent"),
        (["--rounds", "0"], "rounds"),
    ],
)
def test_bad_input_is_one_line_on_stderr(args, needle):
    res = invoke("-m", "tiny", "--seq-len", "16", "--no-isolate", *args)
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longdoc: error:") and needle in lines[0], res.stderr
    assert res.stdout == ""


def test_bf16_rows_get_a_bf16_check():
    res = invoke(*FAST, "--seq-len", "40", "--impls", "longdoc", "--dtype", "bf16", "--format", "json")
    assert res.exit_code == 0, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    bf16 = checks["bf16 vs fp32 (relative L2)"]
    assert bf16["passed"] and 0 < bf16["max_abs_diff"] <= 0.05


def test_rounds_pool_the_runs_of_every_round(monkeypatch):
    """--rounds 3 runs the grid three times, round-robin (longdoc, hf, longdoc, hf, ...), and each row
    holds all its timed runs."""
    order = []
    measure = child.measure
    monkeypatch.setattr(
        child, "measure", lambda job, model=None: order.append(job.impl) or measure(job, model)
    )
    res = invoke(*FAST, "--seq-len", "24", "--impls", "longdoc,hf", "--iters", "2", "--rounds", "3",
                 "--no-check", "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert order == ["longdoc", "hf"] * 3
    for m in json.loads(res.stdout)["measurements"]:
        assert m["status"] == "ok" and m["iters"] == 6


def test_pool_of_rounds():
    from longdoc_cli.bench.run import _pool

    ok = {"status": "ok", "note": "", "times": [1.0, 2.0], "peak_mem_mib": 10.0, "iters": 2,
          "matmul_peak_gflops": 100.0}  # fmt: skip
    pooled = _pool([ok, {**ok, "times": [3.0], "iters": 1, "peak_mem_mib": 30.0, "matmul_peak_gflops": 90.0}])
    assert pooled["times"] == [1.0, 2.0, 3.0] and pooled["iters"] == 3
    assert pooled["peak_mem_mib"] == 20.0 and pooled["matmul_peak_gflops"] == 100.0
    oom = {"status": "skipped", "note": "out of memory at 64 tokens"}
    assert _pool([ok, oom]) == oom


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error():
    res = invoke(*FAST, "--seq-len", "16", "--device", "cuda")
    assert res.exit_code == 2 and "CUDA" in res.stderr


def test_device_names_are_those_of_every_command():
    """The sweep accepts every device the other commands take (cuda:N and mps too) and refuses the
    rest naming them; a device this machine lacks is a usage error, not a traceback."""
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert bench.spec_from_dict({"device": name}).device == name
    with pytest.raises(LongdocError, match="cuda:N or mps"):
        bench.spec_from_dict({"device": "tpu"})
    res = invoke(*FAST, "--seq-len", "16", "--device", "tpu")
    assert res.exit_code == 2 and "cuda:N or mps" in res.stderr
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        res = invoke(*FAST, "--seq-len", "16", "--device", "mps")
        assert res.exit_code == 2 and "MPS" in res.stderr and "Traceback" not in res.stderr


def test_timers_wait_for_an_mps_device(monkeypatch):
    """MPS runs asynchronously like CUDA: a measurement waits for it before reading the clock."""
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    child._sync("mps")
    child._sync("cpu")
    assert waited == ["mps"]


def test_help_shows_choices_and_defaults():
    res = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for shown in (
        "<auto|fp32|bf16|fp16>",
        "<infer|train>",
        "<none|int8>",
        "cuda:N or mps",
        "[default: base]",
    ):
        assert shown in res.stdout, shown


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_bench_bf16():
    args = ["--device", "cuda", "--dtype", "bf16", "--impls", "longdoc,hf,full", "--format", "json"]
    res = invoke(*FAST, "--seq-len", "256", *args)
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["measurements"]
    assert all(r["status"] == "ok" and r["peak_mem_mib"] > 0 for r in rows)


# ----------------------------------------------------------------------------------------------
# The full-attention baseline and int8


def test_full_attention_is_the_same_model_with_a_whole_sequence_window():
    model = tiny_encoder(window=8)
    wide = tiny_encoder(window=260)
    wide.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (2, 50))
    glob = torch.zeros(2, 50, dtype=torch.bool)
    glob[:, 0] = True
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 40:] = 0
    full_model = LongformerEncoder(bench.full_attention_config(model.config, 50)).eval()
    full_model.load_state_dict(model.state_dict())  # the full baseline: a config override, no patching
    with torch.inference_mode():
        banded = model(ids, mask, glob)
        full = full_model(ids, mask, glob)
        again = model(ids, mask, glob)
        assert torch.allclose(full, wide(ids, mask, glob), atol=1e-5)
    assert not torch.allclose(full, banded, atol=1e-3)  # the window really changed
    assert torch.equal(again, banded)  # and the banded model is as it was
    assert model.config.windows == [8, 8] and full_model.config.windows == [100, 100]


def test_int8_outputs_close_to_fp32():
    model = tiny_encoder()
    q = quantize_int8(model)
    assert is_quantized(q) and not is_quantized(model)
    attn = q.encoder.layer[0].attention.self
    assert isinstance(attn.key_global, torch.nn.Linear) and not isinstance(attn.query, torch.nn.Linear)
    ids = torch.randint(3, 100, (2, 70))
    glob = torch.zeros(2, 70, dtype=torch.bool)
    glob[:, :2] = True
    with torch.inference_mode():
        ref, out = model(ids, None, glob), q(ids, None, glob)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_int8_refuses_non_fp32():
    with pytest.raises(LongdocError, match="fp32"):
        quantize_int8(tiny_encoder().to(torch.bfloat16))


def test_tune_memory_defaults_and_respects_the_user(monkeypatch):
    from longdoc_cli import runtime

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    runtime.tune_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    runtime.tune_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_cli_sets_memory_settings_before_torch():
    """The console script tunes the process before torch is imported (torch reads THP once)."""
    probe = (
        "import os, sys\n"
        "from longdoc_cli import cli\n"
        "assert 'torch' not in sys.modules\n"
        "sys.argv = ['longdoc', '--version']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "1 False"


def test_globals_beyond_the_length_are_counted_as_marked():
    """make_inputs marks min(G, n) global tokens: the FLOPs must count no more."""
    cfg = bench.preset_config("tiny", 64, None)
    for impl in ("longdoc", "full", "longdoc-attn"):
        assert bench.flops_of(impl, cfg, 16, 1, 1000, "infer") == bench.flops_of(
            impl, cfg, 16, 1, 16, "infer"
        )


def test_ratios_compare_models_with_models():
    from types import SimpleNamespace

    def row(impl: str, t: float) -> SimpleNamespace:
        return SimpleNamespace(model="base", seq_len=64, batch_size=1, dtype="fp32", mode="infer", impl=impl,
                               median_s=t)  # fmt: skip

    report = SimpleNamespace(measurements=[row("hf", 2.0), row("longdoc", 1.0), row("longdoc-attn", 0.2)])
    assert bench.ratios(report) == {
        ("base", 64, 1, "fp32", "infer", "hf"): 1.0,
        ("base", 64, 1, "fp32", "infer", "longdoc"): 0.5,
    }


def test_out_of_memory_is_recognised_in_every_wording():
    """The CLI's message and the bench's skipped rows share one test of a failed allocation."""
    from longdoc_cli.errors import is_out_of_memory

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"
    )
    assert is_out_of_memory(cpu) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------------------------------------
# The bert row: transformers' BertModel on the same weights


def test_bert_row_times_train_steps_beside_longdoc_and_gives_the_ratio():
    """--impls longdoc,bert in train mode: the gate checks BERT against our model on the same weights
    (a length the window covers, padding, no global token), both rows are timed in the same run, the
    ratio to bert is reported, and lengths past BERT's 512 positions are skipped rows with a note."""
    res = invoke(*FAST, "--seq-lens", "33,600", "--impls", "longdoc,bert", "--mode", "train", "--dtype",
                 "fp32", "--format", "jsonl")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    check = next(r for r in records if r["type"] == "check" and r["name"] == "bert vs longdoc")
    assert check["passed"] and check["length"] == 9 and check["max_abs_diff"] < 1e-4  # tiny: window 8 a side
    rows = {(r["impl"], r["seq_len"]): r for r in records if r["type"] == "measurement"}
    assert rows["bert", 33]["status"] == "ok" and rows["longdoc", 33]["status"] == "ok"
    assert rows["bert", 33]["mode"] == "train" and rows["bert", 33]["time_vs_bert"] == 1.0
    ratio = rows["longdoc", 33]["median_s"] / rows["bert", 33]["median_s"]
    assert rows["longdoc", 33]["time_vs_bert"] == pytest.approx(ratio)
    assert rows["bert", 600]["status"] == "skipped" and "512 positions" in rows["bert", 600]["note"]
    assert rows["longdoc", 600]["status"] == "ok"
    cfg = bench.preset_config("tiny", 600, None)  # full attention's FLOPs, as the `full` row counts them
    assert rows["bert", 33]["flops"] == bench.flops_of("full", cfg, 33, 1, 1, "train")


def test_bert_checkpoint_holds_the_longformers_weights(tmp_path):
    """bert_checkpoint drops the global projections and keeps the position rows that number tokens
    0, 1, ...: BERT then equals our model wherever the window covers the input; a wrong-weight BERT
    (a position row off by one) fails the gate's check."""
    from longdoc_cli.bench.run import check_bert

    enc = tiny_encoder(window=64, max_len=40)
    enc.save_pretrained(tmp_path / "lf")
    bert_dir = child.bert_checkpoint("mine", tmp_path / "lf", tmp_path)
    cfg = enc.config
    spec = bench.BenchSpec(models=("mine",), seq_lens=(40,), check_len=40)
    ok = check_bert(tmp_path / "lf", bert_dir, cfg, spec, "cpu")
    assert ok.passed and ok.length == 33 and ok.max_abs_diff < 1e-4
    import transformers

    bert = transformers.BertModel.from_pretrained(bert_dir)
    assert bert.config.max_position_embeddings == 40 and bert.config.num_hidden_layers == 2
    with torch.no_grad():
        table = bert.embeddings.position_embeddings.weight
        table.copy_(torch.roll(table, 1, dims=0))
    bert.save_pretrained(bert_dir)
    assert not check_bert(tmp_path / "lf", bert_dir, cfg, spec, "cpu").passed
