"""The sweep: the correctness gate, every measurement (round-robin over ``rounds``, each in a
child process unless ``isolate`` is off), and the :class:`BenchReport` of frozen dataclasses that
``cli.py`` renders."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LongdocError
from ..runtime import dtype_name, pick_device
from .child import (
    BERT_POSITIONS,
    Job,
    MatmulPeak,
    _in_process,
    bert_checkpoint,
    forward,
    hf_incompatible,
    kernel_arguments,
    load_impl,
    make_inputs,
    matmul_peak,
    prepare_checkpoint,
    run_child,
    with_dilation,
)
from .flops import flops_of
from .spec import BenchSpec


@dataclass(frozen=True)
class Check:
    name: str
    length: int
    max_abs_diff: float | None
    tolerance: float
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    model: str
    impl: str
    seq_len: int
    batch_size: int
    dtype: str
    mode: str
    status: str  # "ok" or "skipped"
    note: str = ""
    median_s: float | None = None
    p95_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mib: float | None = None  # extra memory of the runs (see module docstring)
    flops: float | None = None  # per timed run (the whole batch)
    gflops: float | None = None  # flops / median
    peak_share: float | None = None  # gflops / matmul_peak_gflops
    matmul_peak_gflops: float | None = None  # this dtype's matmul peak, measured right after the runs
    iters: int = 0


@dataclass(frozen=True)
class BenchReport:
    spec: dict[str, Any]
    environment: dict[str, Any]
    peaks: tuple[MatmulPeak, ...]
    checks: tuple[Check, ...]
    measurements: tuple[Measurement, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# The correctness gate


def check_attention(cfg, device: str, seed: int = 0) -> Check:
    """The layer's attention (attention.longformer_attention, with the kernel the model would pick)
    vs the dense reference: odd length, padding, globals in a window."""
    import torch

    from ..attention import global_indices, longformer_attention, reference_attention

    torch.manual_seed(seed)
    w = cfg.windows[0] // 2
    dil = cfg.dilations[0]
    H, Dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    n = min(3 * w * max(dil) + 37, 2048)
    B, d = 2, H * Dh
    x = torch.randn(B, n, d, device=device)
    weights = [torch.randn(d, d, device=device) / math.sqrt(d) for _ in range(6)]  # q k v, global q k v
    biases = [torch.randn(d, device=device) for _ in range(6)]
    q, k, v, qg, kg, vg = (
        (x @ wt.T + b).view(B, n, H, Dh).transpose(1, 2) for wt, b in zip(weights, biases, strict=True)
    )  # (B, H, n, Dh) each
    real = torch.ones(B, n, dtype=torch.bool, device=device)
    real[1, n - n // 7 :] = False  # padding
    glob = torch.zeros(B, n, dtype=torch.bool, device=device)
    glob[:, 0] = True
    glob[0, n // 2] = True  # a global token inside other rows' windows: counted once
    glob &= real
    index, valid = global_indices(glob)
    rows = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
    with torch.no_grad():
        out = longformer_attention(
            q, k, v, qg.gather(2, rows), x, (weights[4], biases[4]), (weights[5], biases[5]), window=w,
            dilation=dil, attention_mask=real, global_index=index, global_valid=valid,
            **kernel_arguments(device, 0.0, n, w),
        )  # fmt: skip
        ref = reference_attention(
            q, k, v, qg, kg, vg, window=w, dilation=dil, attention_mask=real, global_mask=glob
        )
    diff = (out - ref).abs().max().item()
    tol = 1e-4
    return Check("attention vs dense reference", n, diff, tol, diff <= tol and math.isfinite(diff),
                 f"window {w} one-sided, dilation {sorted(set(dil))}, padding + 3 global tokens")  # fmt: skip


def check_models(
    checkpoint: Path, cfg, spec: BenchSpec, device: str, impls: set[str], dtypes: Sequence[str] = ()
) -> list[Check]:
    """Our model vs transformers' on the same weights; int8 vs fp32 when int8 is benchmarked (fp32),
    and each other benchmarked dtype (bf16, fp16) vs fp32."""
    import torch

    n = max(2, min(spec.check_len, cfg.max_tokens, max(spec.seq_lens)))
    ids, mask, glob = make_inputs(n, 1, spec.globals, cfg.vocab_size, device, seed=1)
    checks = []
    ours = load_impl("longdoc", checkpoint, device, "fp32")
    with torch.inference_mode():
        ref = forward("longdoc", ours, ids, mask, glob)
        why = hf_incompatible(cfg)
        if why:
            checks.append(Check("model vs transformers", n, None, 1e-3, True, f"not run: {why}"))
        else:
            hf = load_impl("hf", checkpoint, device, "fp32")
            diff = (ref - forward("hf", hf, ids, mask, glob)).abs().max().item()
            checks.append(Check("model vs transformers", n, diff, 1e-3, diff <= 1e-3 and math.isfinite(diff),
                                "same weights, fp32, hidden states"))  # fmt: skip
            del hf
        if "longdoc-int8" in impls and device == "cpu":
            from ..quantize import quantize_int8

            q = quantize_int8(ours)
            rel = ((forward("longdoc", q, ids, mask, glob) - ref).norm() / ref.norm()).item()
            checks.append(Check("int8 vs fp32 (relative L2)", n, rel, 0.1, rel <= 0.1 and math.isfinite(rel),
                                "relative error of the hidden states"))  # fmt: skip
        for dt in (d for d in dtypes if d != "fp32"):  # ``dtypes`` comes deduplicated
            low = load_impl("longdoc", checkpoint, device, dt)
            out = forward("longdoc", low, ids, mask, glob).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            ok = rel <= 0.05 and math.isfinite(rel)
            checks.append(
                Check(f"{dt} vs fp32 (relative L2)", n, rel, 0.05, ok, "relative error of the hidden states")
            )
            del low
    del ours
    gc.collect()
    return checks


def check_bert(checkpoint: Path, bert: Path, cfg, spec: BenchSpec, device: str) -> Check:
    """transformers' BertModel (the ``bert`` row) vs our model on the same weights, fp32, at a length
    every layer's window covers and with no global token, where both compute full attention."""
    import torch

    widths = [w // 2 for w in cfg.windows]
    n = max(2, min(spec.check_len, min(widths) + 1, BERT_POSITIONS, cfg.max_tokens, max(spec.seq_lens)))
    if any(x != 1 for heads in cfg.dilations for x in heads):
        return Check("bert vs longdoc", n, None, 1e-3, True, "not run: the model's attention is dilated")
    ids, mask, glob = make_inputs(n, 2, 0, cfg.vocab_size, device, seed=2)
    # The first token: the model's own start token (make_inputs' 0 is BERT's padding id, which the
    # Longformer's RoBERTa-style numbering would skip when counting positions).
    ids[:, 0] = next(t for t in (cfg.bos_token_id, 2, 3) if t is not None and t != cfg.pad_token_id)
    mask[1, n - n // 3 :] = 0  # padding in the second row
    ours = load_impl("longdoc", checkpoint, device, "fp32")
    theirs = load_impl("bert", bert, device, "fp32")
    with torch.inference_mode():
        real = mask.bool()
        a = forward("longdoc", ours, ids, mask, glob)[real]
        b = forward("bert", theirs, ids, mask, glob)[real]
    diff = (a - b).abs().max().item()
    del ours, theirs
    gc.collect()
    return Check("bert vs longdoc", n, diff, 1e-3, diff <= 1e-3 and math.isfinite(diff),
                 "same weights, fp32, no global token, the window covers the input")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The sweep


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def run_bench(spec: BenchSpec, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run the whole sweep: matmul peaks, the correctness gate, then every measurement."""
    import torch

    spec.validate()
    say = progress or (lambda _msg: None)
    device = str(pick_device(spec.device))
    notes: list[str] = []
    impls = list(dict.fromkeys(spec.impls))
    int8 = "int8" if "longdoc-int8" in impls else "none"  # auto: fp32 then, as the commands run int8
    dtypes = list(dict.fromkeys(dtype_name(d, device, quantize=int8) for d in spec.dtypes))
    if "longdoc-int8" in impls and (device != "cpu" or dtypes != ["fp32"] or "train" in spec.modes):
        bad = device if device != "cpu" else ("train mode" if "train" in spec.modes else "non-fp32 dtypes")
        notes.append(f"longdoc-int8 runs fp32 inference on the CPU only: its rows are skipped for {bad}")
    kernel = kernel_arguments(device, 0.0, 1 << 20, 0)["kernel"]

    say(f"measuring the {', '.join(dtypes)} matmul peak on {device}")
    peaks = {dt: matmul_peak(device, dt) for dt in dict.fromkeys(["fp32", *dtypes])}
    for dt in dtypes:
        if device == "cpu" and dt != "fp32" and peaks[dt].gflops < peaks["fp32"].gflops:
            notes.append(f"{dt} on this CPU is slow: its matmul peak is {peaks[dt].gflops:.0f} GFLOP/s "
                         f"against {peaks['fp32'].gflops:.0f} in fp32")  # fmt: skip
    env = {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "attention_kernel": (
            "flex: compiled FlexAttention, one block-sparse mask per batch shared by the layers (the first "
            "call compiles, untimed)"
            if kernel == "flex"
            else "band: banded SDPA kernels (attention.py)"
        ),
    }
    checks: list[Check] = []
    rows: list[Measurement] = []
    max_len = max(spec.seq_lens)
    for model_name in spec.models:
        with tempfile.TemporaryDirectory(prefix="longdoc-bench-") as tmp:
            say(f"{model_name}: preparing the checkpoint")
            checkpoint = prepare_checkpoint(
                model_name, max(max_len, 2), spec.layers, Path(tmp), spec.allow_download
            )
            checkpoint = with_dilation(checkpoint, spec.dilation, Path(tmp))
            from ..model import load_hf_config

            cfg = load_hf_config(checkpoint)
            why_not_hf = hf_incompatible(cfg)
            bert, why_not_bert = None, ""
            if "bert" in impls:
                try:
                    bert = bert_checkpoint(model_name, checkpoint, Path(tmp))
                except LongdocError as e:
                    why_not_bert = str(e)
            if spec.check:
                say(f"{model_name}: correctness checks")
                new = [check_attention(cfg, device),
                       *check_models(checkpoint, cfg, spec, device, set(impls), dtypes)]  # fmt: skip
                if bert is not None:
                    new.append(check_bert(checkpoint, bert, cfg, spec, device))
                checks += new
                failed = [c for c in new if not c.passed]
                if failed:
                    text = "; ".join(
                        f"{c.name} at n={c.length}: max diff {c.max_abs_diff:.2e} > {c.tolerance:g}"
                        for c in failed
                    )
                    raise LongdocError(f"{model_name}: correctness check failed, not timing ({text})")
            cells: list[tuple[dict[str, Any], float, Job | None, str]] = []  # key, flops, job, skip
            for dtype, mode, batch, n, impl in _grid(spec, dtypes, impls):
                key = dict(model=model_name, impl=impl, seq_len=n, batch_size=batch, dtype=dtype, mode=mode)
                skip = _skip_reason(impl, device, dtype, mode, n, cfg, why_not_hf, why_not_bert)
                flops = flops_of(impl, cfg, n, batch, spec.globals, mode)
                est = flops / (peaks[dtype].gflops * 1e9)
                if not skip and est > spec.time_budget:
                    skip = (f"one run would take >= {est:.0f} s even at the matmul peak "
                            f"(--time-budget {spec.time_budget:g} s)")  # fmt: skip
                job = Job(str(checkpoint), impl, n, batch, dtype, mode, device, spec.globals, spec.warmup,
                          spec.iters, spec.time_budget, str(bert or ""))  # fmt: skip
                cells.append((key, flops, None if skip else job, skip))
            # Round-robin: every implementation sees the machine's slow and fast spells alike.
            results: list[list[dict[str, Any]]] = [[] for _ in cells]
            for r in range(spec.rounds):
                for (_key, _cost, job, _skip), got in zip(cells, results, strict=True):
                    if job is None or (got and got[-1].get("status") != "ok"):
                        continue  # skipped, or failed in an earlier round
                    tag = f" (round {r + 1}/{spec.rounds})" if spec.rounds > 1 else ""
                    what = f"{job.impl} n={job.seq_len} batch={job.batch_size} {job.dtype} {job.mode}"
                    say(f"{model_name} {what}{tag}")
                    timeout = spec.time_budget * 2 + 300
                    got.append(run_child(job, timeout) if spec.isolate else _in_process(job))
            for (key, flops, job, skip), got in zip(cells, results, strict=True):
                if job is None:
                    rows.append(Measurement(**key, status="skipped", note=skip, flops=flops))
                    say(f"{key['impl']} n={key['seq_len']}: skipped ({skip})")
                else:
                    rows.append(_measurement(key, _pool(got), flops, peaks[key["dtype"]]))
    return BenchReport(
        spec=dataclasses.asdict(spec), environment=env, peaks=tuple(peaks.values()), checks=tuple(checks),
        measurements=tuple(rows), notes=tuple(notes),
    )  # fmt: skip


def _grid(spec: BenchSpec, dtypes: list[str], impls: list[str]) -> Iterator[tuple[str, str, int, int, str]]:
    for dtype in dtypes:
        for mode in spec.modes:
            for batch in spec.batch_sizes:
                for n in spec.seq_lens:
                    for impl in impls:
                        yield dtype, mode, batch, n, impl


def _skip_reason(
    impl: str, device: str, dtype: str, mode: str, n: int, cfg, why_not_hf: str, why_not_bert: str = ""
) -> str:
    if impl == "longdoc-int8" and (device != "cpu" or dtype != "fp32" or mode != "infer"):
        return "int8 is fp32 CPU inference only"
    if impl == "longdoc-compiled" and not device.startswith("cuda"):
        return "compiled layers are measured on CUDA only"
    if impl == "hf" and why_not_hf:
        return why_not_hf
    if impl == "bert" and why_not_bert:
        return why_not_bert
    if impl == "bert" and n > BERT_POSITIONS:
        return f"BERT has {BERT_POSITIONS} positions"
    if impl != "longdoc-attn" and n > cfg.max_tokens:
        return f"{n} tokens exceed the model's {cfg.max_tokens} positions"
    return ""


def _pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's rounds as one result: every timed run, the median peak memory, the best matmul peak;
    a round that failed (out of memory, ...) makes the cell a skipped row with its note."""
    failed = [r for r in results if r.get("status") != "ok"]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    mems = [r["peak_mem_mib"] for r in results if r.get("peak_mem_mib") is not None]
    notes = list(dict.fromkeys(r["note"] for r in results if r.get("note")))
    return {
        "status": "ok", "note": "; ".join(notes), "times": [t for r in results for t in r["times"]],
        "peak_mem_mib": statistics.median(mems) if mems else None, "iters": sum(r["iters"] for r in results),
        "matmul_peak_gflops": max((r.get("matmul_peak_gflops") or 0.0) for r in results) or None,
    }  # fmt: skip


def _measurement(key: dict[str, Any], result: dict[str, Any], flops: float, peak: MatmulPeak) -> Measurement:
    if result.get("status") != "ok":
        return Measurement(**key, status="skipped", note=result.get("note", ""), flops=flops)
    times = result["times"]
    med = statistics.median(times)
    gflops = flops / med / 1e9
    peak_gflops = result.get("matmul_peak_gflops") or peak.gflops
    return Measurement(
        **key, status="ok", note=result.get("note", ""), median_s=med, p95_s=percentile(times, 95),
        tokens_per_s=key["seq_len"] * key["batch_size"] / med, peak_mem_mib=result.get("peak_mem_mib"),
        flops=flops, gflops=gflops, peak_share=gflops / peak_gflops, matmul_peak_gflops=peak_gflops,
        iters=result.get("iters", len(times)),
    )  # fmt: skip


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "cpu"


def ratios(report: BenchReport, base: str = "hf") -> dict[tuple[str, int, int, str, str, str], float]:
    """Median time of every measured model row divided by ``base``'s at the same point of the sweep
    (not longdoc-attn's: one attention call against a whole model would mean nothing)."""
    ref = {(m.model, m.seq_len, m.batch_size, m.dtype, m.mode): m.median_s for m in report.measurements
           if m.impl == base and m.median_s}  # fmt: skip
    out = {}
    for m in report.measurements:
        r = ref.get((m.model, m.seq_len, m.batch_size, m.dtype, m.mode))
        if m.median_s and r and m.impl != "longdoc-attn":
            out[(m.model, m.seq_len, m.batch_size, m.dtype, m.mode, m.impl)] = m.median_s / r
    return out
