"""benchmarks/cpu_floor.py's measuring functions on a tiny model (a smoke test of the benchmark: its
timings are not checked, only that it records the pass it times and leaves it unchanged)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest_plugins = ["fixtures_tiny"]  # tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
cpu_floor = pytest.importorskip("cpu_floor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_of_a_pass_records_every_operator_and_leaves_the_pass_unchanged(tiny_model_dir, dtype):
    from longdoc_cli.model import LongformerEncoder, load_hf_config

    cfg = load_hf_config(tiny_model_dir)
    model = LongformerEncoder.from_pretrained(tiny_model_dir).to(dtype)
    inputs = cpu_floor.random_batch(cfg.vocab_size, 2, 40)  # window 16 < 40 tokens: the band path
    with torch.inference_mode():
        want = model(*inputs)
        with cpu_floor.OpFloor(repeats=2) as mode:  # in-place operators rerun on clones
            got = model(*inputs)
    assert torch.equal(got, want)
    ops = {c["op"] for c in mode.calls}
    assert "aten.layer_norm" in ops and any(cpu_floor.group_of(op) == "attention" for op in ops)
    assert any(cpu_floor.group_of(op) == "linear" for op in ops)
    assert all(c["seconds"] > 0 for c in mode.calls)

    r = cpu_floor.floor_of_pass(model, inputs, flops=1e6, peak=lambda: 1.0, repeats=1, rounds=2)
    assert sum(o["calls"] for o in r["ops"].values()) == len(mode.calls)  # rounds merged call by call
    assert r["ops_seconds"] == pytest.approx(sum(r["groups"].values()))
    assert r["share_if_only_linears"] >= r["share_if_only_linears_attention"] >= r["share_ops_only"]


def test_op_flops():
    x, w = torch.zeros(2, 5, 8), torch.zeros(3, 8)
    assert cpu_floor.op_flops("aten.linear", (x, w, None)) == 2 * 10 * 8 * 3
    assert (
        cpu_floor.op_flops("mkldnn._linear_pointwise.binary", (x, torch.zeros(2, 5, 3), w)) == 2 * 10 * 8 * 3
    )
    assert cpu_floor.op_flops("aten.addmm", (torch.zeros(3), x.view(10, 8), w.t())) == 2 * 10 * 8 * 3
    q, k = torch.zeros(2, 4, 6, 16), torch.zeros(2, 4, 9, 16)
    assert (
        cpu_floor.op_flops("aten._scaled_dot_product_flash_attention_for_cpu", (q, k, k)) == 4 * q.numel() * 9
    )
    assert cpu_floor.op_flops("aten.add_.Tensor", (x, x)) == 0
    assert cpu_floor.group_of("aten.native_layer_norm") == "layernorm"
    assert cpu_floor.group_of("aten.add_.Tensor") == "elementwise"
    assert cpu_floor.group_of("aten.sort") == "other"
