"""`longdoc bench`: correctness-gated latency, throughput, memory and FLOP/s of the encoder.

A sweep is a :class:`BenchSpec` (from flags or a YAML file). :func:`run_bench` returns a
:class:`BenchReport` of frozen dataclasses and never prints; ``cli.py`` renders it.

Implementations (``impls``), all on the same weights:
- ``longdoc``: our encoder (banded local attention, reassociated global attention);
- ``longdoc-int8``: the same with int8 dynamic quantization of the linear layers (CPU, inference);
- ``longdoc-compiled``: the same with every layer through ``torch.compile`` (CUDA; mode from
  ``LONGDOC_COMPILE_MODE``, default "default"): fuses the element-wise work around the matmuls and
  FlexAttention; the first call compiles (untimed);
- ``hf``: ``transformers.LongformerModel`` loaded from the same checkpoint;
- ``full``: our encoder with every window widened over the whole sequence, so ``local_attention``
  takes its dense path: full (padding-only mask) scaled-dot-product attention;
- ``longdoc-attn``: one layer's attention function alone (random q, k, v), to see how close the
  banded kernel comes to the matmul peak on its exact FLOPs.

Before timing, the gate: our attention equals :func:`reference_attention` at a small length, and
our model equals transformers' on the same weights (and int8 stays close to fp32). A failed check
stops the bench.

Each (model, dtype, mode, batch, length, impl) is measured in a fresh child process
(``python -m longdoc_cli.bench --child JOB``): warm-up runs, then timed runs. Memory is the peak
*extra* memory of those runs over what the loaded model and inputs already hold: on CPU the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the model is loaded) minus the
resident set just before the first run; on CUDA ``max_memory_allocated`` minus the allocation
before the first run. A child that runs out of memory or time gives a skipped row with a note.

FLOPs are the useful ones of the math each implementation defines (multiply-add = 2), the same
for ``longdoc``, ``longdoc-int8`` and ``hf``: per layer 8 n d^2 (projections) + 4 n d f
(feed-forward) + 4 d * (exact number of (query, band key) pairs) + the global terms; ``full``
counts 4 n^2 d for its attention. ``train`` (forward + backward) counts 3x. Achieved GFLOP/s are
compared with the peak of a large square matmul in the same dtype, measured by each child right
after its timed runs (shared machines drift: one sweep-wide number made shares above 100%).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .envvars import env
from .errors import LongdocError, is_out_of_memory

IMPLS = ("longdoc", "longdoc-int8", "longdoc-compiled", "hf", "full", "longdoc-attn")
DTYPES = ("auto", "fp32", "bf16", "fp16")
MODES = ("infer", "train")

# Published Longformer sizes (random weights); two-sided window as HF's attention_window.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 attention_window=16, vocab_size=1000),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 attention_window=512, vocab_size=50265),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  attention_window=512, vocab_size=50265),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The sweep, described as data


@dataclass(frozen=True)
class BenchSpec:
    """One sweep. YAML keys = these field names; list fields also accept a single value."""

    models: tuple[str, ...] = ("base",)  # base | large | tiny | a model path or name
    seq_lens: tuple[int, ...] = (4096,)
    batch_sizes: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("auto",)  # auto = bf16 on CUDA and on CPUs with native bf16, else fp32
    modes: tuple[str, ...] = ("infer",)  # train = forward + backward
    impls: tuple[str, ...] = ("longdoc", "hf", "full")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    globals: int = 1  # the first G tokens of every row are global
    layers: int | None = None  # override the depth (time is linear in layers)
    warmup: int = 1
    iters: int = 5
    rounds: int = 1  # the whole grid this many times, round-robin; each row pools its rounds' runs
    check: bool = True  # the correctness gate before timing
    check_len: int = 1024  # length of the model-vs-transformers check (capped by the model)
    isolate: bool = True  # one child process per measurement (peak memory, OOM safety)
    time_budget: float = 300.0  # seconds per measurement; longer baselines are skipped or cut short
    allow_download: bool = False  # for model names that resolve through the hub cache

    def validate(self) -> BenchSpec:
        problems = []
        if not self.models:
            problems.append("models: give at least one model")
        if not self.seq_lens:
            problems.append("seq_lens: give at least one length")
        for n in self.seq_lens:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                problems.append(f"seq_lens: {n!r} is not a positive whole number of tokens")
        for b in self.batch_sizes:
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
                problems.append(f"batch_sizes: {b!r} is not a positive whole number")
        problems += [
            f"dtypes: {d!r} is not one of {', '.join(DTYPES)}" for d in self.dtypes if d not in DTYPES
        ]
        problems += [f"modes: {m!r} is not one of {', '.join(MODES)}" for m in self.modes if m not in MODES]
        problems += [f"impls: {i!r} is not one of {', '.join(IMPLS)}" for i in self.impls if i not in IMPLS]
        if not self.impls:
            problems.append("impls: give at least one implementation")
        if self.globals < 0:
            problems.append(f"globals: {self.globals} is negative")
        if self.layers is not None and self.layers <= 0:
            problems.append(f"layers: {self.layers} is not a positive number of layers")
        if self.warmup < 0 or self.iters < 1:
            problems.append(f"warmup {self.warmup} / iters {self.iters}: need warmup >= 0 and iters >= 1")
        if self.rounds < 1:
            problems.append(f"rounds: {self.rounds} is not a positive number of rounds")
        if self.check_len < 2:
            problems.append(f"check_len: {self.check_len} is too short")
        if self.time_budget <= 0:
            problems.append(f"time_budget: {self.time_budget} is not a positive number of seconds")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if problems:
            raise LongdocError("; ".join(problems), exit_code=2)
        return self


_LIST_FIELDS = {"models": str, "seq_lens": int, "batch_sizes": int, "dtypes": str, "modes": str, "impls": str}
_SCALAR_FIELDS = {"device": str, "globals": int, "layers": int, "warmup": int, "iters": int,
                  "rounds": int, "check": bool, "check_len": int, "isolate": bool, "time_budget": float,
                  "allow_download": bool}  # fmt: skip


_KIND = {int: "a whole number", str: "a string", float: "a number", bool: "true or false"}


def spec_from_dict(data: dict[str, Any], source: str = "config") -> BenchSpec:
    """A validated spec from plain data; every problem is reported at once, naming its key."""
    if not isinstance(data, dict):
        raise LongdocError(
            f"{source}: expected a mapping of bench options, got {type(data).__name__}", exit_code=2
        )
    names = list(_LIST_FIELDS) + list(_SCALAR_FIELDS)
    values: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(names)})"
            problems.append(f"{source}: {key}: unknown key{hint}")
            continue
        want = _LIST_FIELDS.get(key) or _SCALAR_FIELDS[key]
        items = value if isinstance(value, list) else [value]
        if key in _SCALAR_FIELDS and isinstance(value, list):
            problems.append(f"{source}: {key}: expected {_KIND[want]}, got a list")
            continue
        if key == "layers" and value is None:
            values[key] = None
            continue
        converted = []
        for item in items:
            ok = _coerce(item, want)
            if ok is None:
                problems.append(f"{source}: {key}: {item!r} is not {_KIND[want]}")
            else:
                converted.append(ok[0])
        if len(converted) == len(items):
            values[key] = tuple(converted) if key in _LIST_FIELDS else converted[0]
    try:
        spec = BenchSpec(**values).validate()
    except LongdocError as e:
        problems += [f"{source}: {p}" for p in str(e).split("; ")]
    if problems:
        raise LongdocError("; ".join(problems), exit_code=2)
    return spec


def _coerce(value: Any, want: type) -> tuple[Any] | None:
    if want is bool:
        return (value,) if isinstance(value, bool) else None
    if want is int:
        return (value,) if isinstance(value, int) and not isinstance(value, bool) else None
    if want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        with contextlib.suppress(TypeError, ValueError):  # PyYAML reads 1e-3 as a string
            return (float(value),)
        return None
    return (str(value),) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def load_spec(path: str | Path) -> BenchSpec:
    """A spec from a YAML file (e.g. configs/bench.yaml), read as configs are (bounded, strict,
    aliases on a budget)."""
    from .config import read_yaml

    return spec_from_dict(read_yaml(Path(path)) or {}, source=str(path))


def parse_lengths(text: str) -> tuple[int, ...]:
    """'1024,4096' -> (1024, 4096); a bad or non-positive length is a usage error."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:  # '4k' = 4096
            n = int(part[:-1]) * 1024 if part[-1] in "kK" else int(part)
        except ValueError:
            raise LongdocError(f"--seq-lens: {part!r} is not a whole number of tokens", exit_code=2) from None
        if n <= 0:
            raise LongdocError(f"--seq-lens: {n} is not a positive length", exit_code=2)
        out.append(n)
    if not out:
        raise LongdocError("--seq-lens: give at least one length", exit_code=2)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class MatmulPeak:
    device: str
    dtype: str
    size: int  # square matrices of this side
    gflops: float  # best of several runs


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
# FLOPs


def band_pairs(n: int, window: int, dilation: int = 1) -> int:
    """Exact number of (query, key) pairs of an n-token band, one-sided ``window``, ``dilation``."""
    total = 0
    d = dilation
    for r in range(min(d, n)):  # interleaved subsequences of length m
        m = len(range(r, n, d))
        w = min(window, m - 1)
        # sum over i of (min(m-1, i+w) - max(0, i-w) + 1)
        total += m * (2 * w + 1) - w * (w + 1)
    return total


def encoder_flops(cfg, n: int, batch: int, globals_: int, full: bool = False, train: bool = False) -> float:
    """Useful FLOPs of one pass of the encoder layers over a batch of n-token rows (see module doc)."""
    d, f, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    G = min(globals_, n)
    total = 0.0
    for width, dil in zip(cfg.windows, cfg.dilations, strict=True):
        dense = 8 * n * d * d + 4 * n * d * f
        if full:
            attn = 4 * n * n * d
        else:
            w = width // 2
            pairs = sum(band_pairs(n, w, x) for x in dil) / H  # mean over heads
            # band + local rows' global keys + global rows (q_global, reassociated k/v, scores, PV)
            attn = 4 * pairs * d + 4 * n * G * d + 2 * G * d * d + 4 * G * d * d + 4 * G * n * d
        total += dense + attn
    return total * batch * (3 if train else 1)


def attention_flops(n: int, window: int, dilation: int, d: int, batch: int, globals_: int) -> float:
    """FLOPs of one layer's local + global attention function alone (no projections)."""
    G = min(globals_, n)
    return batch * (4 * band_pairs(n, window, dilation) * d + 4 * n * G * d + 4 * G * n * d)


# ----------------------------------------------------------------------------------------------
# Devices, dtypes, the matmul peak


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongdocError(f"--device {device}: no CUDA device is available to this torch", exit_code=2)
    return device


def resolve_dtype(dtype: str, device: str, quantize: str = "none") -> str:
    if dtype == "auto":  # what the commands run: bf16 on a GPU and on a CPU with native bf16; int8: fp32
        from .runtime import auto_dtype

        return auto_dtype("cuda" if device.startswith("cuda") else "cpu", quantize=quantize)[0]
    return dtype


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def matmul_peak(
    device: str, dtype: str, size: int | None = None, repeats: int = 5, min_seconds: float = 0.3
) -> MatmulPeak:
    """Best GFLOP/s of a square matmul of ``size`` (default 2048 on CPU, 8192 on CUDA), over at least
    ``repeats`` runs and ``min_seconds`` (a bf16 AMX run takes 7 ms: a handful is not enough)."""
    import torch

    size = size or (8192 if device.startswith("cuda") else 2048)
    dt = torch_dtype(dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    best, runs, start = math.inf, 0, time.perf_counter()
    while runs <= repeats or (time.perf_counter() - start < min_seconds and runs < 200):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if runs:  # the first run warms up (AMX state, oneDNN kernels)
            best = min(best, time.perf_counter() - t0)
        runs += 1
    return MatmulPeak(device, dtype, size, 2 * size**3 / best / 1e9)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Models and checkpoints


def preset_config(name: str, max_len: int, layers: int | None):
    from .model import LongformerConfig

    sizes = dict(PRESETS[name])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return LongformerConfig(**sizes, max_position_embeddings=max_len + 2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip


def prepare_checkpoint(model: str, max_len: int, layers: int | None, tmp: Path, allow_download: bool) -> Path:
    """A Hugging Face-format LongformerModel directory for ``model`` (writes into ``tmp`` if needed)."""
    import torch

    from .model import LongformerConfig, LongformerEncoder, load_config

    if model in PRESETS:
        torch.manual_seed(0)
        LongformerEncoder(preset_config(model, max_len, layers)).save_pretrained(tmp)
        return tmp
    try:
        from .models import resolve_model
    except ImportError as e:
        raise LongdocError(f"--model {model}: model paths need longdoc_cli.models ({e})") from e
    path = Path(resolve_model(model, allow_download=allow_download))
    if layers is None:
        return path
    cfg = load_config(path)
    if layers > cfg.num_hidden_layers:
        raise LongdocError(f"--layers {layers}: {model} has only {cfg.num_hidden_layers} layers", exit_code=2)
    data = cfg.to_dict()
    data["num_hidden_layers"] = layers
    for key in ("attention_window", "attention_dilation"):
        if isinstance(data[key], list):
            data[key] = data[key][:layers]
    LongformerEncoder.from_pretrained(path, config=LongformerConfig.from_dict(data)).save_pretrained(tmp)
    return tmp


def hf_incompatible(cfg) -> str:
    """Why transformers' LongformerModel would not compute the same function ('' if it would)."""
    if any(x != 1 for heads in cfg.dilations for x in heads):
        return "transformers' Longformer has no dilation"
    if cfg.position_style != "roberta":
        return "transformers' Longformer uses RoBERTa positions"
    return ""


def load_impl(impl: str, checkpoint: Path, device: str, dtype: str):
    """The model object that runs ``impl`` (not used for longdoc-attn)."""
    from .model import LongformerEncoder

    if impl == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = transformers.LongformerModel.from_pretrained(checkpoint, add_pooling_layer=False)
    else:
        model = LongformerEncoder.from_pretrained(checkpoint)
        model.pooler = None
    model = model.eval().to(device=device, dtype=torch_dtype(dtype))
    if impl == "longdoc-int8":
        from .quantize import quantize_int8

        model = quantize_int8(model, inplace=True)
    if impl == "longdoc-compiled":
        for layer in model.encoder.layer:
            layer.compile(mode=env("LONGDOC_COMPILE_MODE", "default"))
    return model


@contextlib.contextmanager
def full_attention(model, n: int) -> Iterator[None]:
    """Every layer's window widened over the whole sequence (and dilation 1): dense attention."""
    from .model import LongformerSelfAttention

    layers = [m for m in model.modules() if isinstance(m, LongformerSelfAttention)]
    if not layers or not all(hasattr(m, "window") and hasattr(m, "dilation") for m in layers):
        raise LongdocError("the full-attention baseline needs LongformerSelfAttention.window/.dilation")
    saved = [(m.window, m.dilation) for m in layers]
    try:
        for m in layers:
            m.window, m.dilation = n, [1] * len(m.dilation) if isinstance(m.dilation, list) else 1
        yield
    finally:
        for m, (w, d) in zip(layers, saved, strict=True):
            m.window, m.dilation = w, d


def make_inputs(n: int, batch: int, globals_: int, vocab: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(vocab, 4), (batch, n), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, n, dtype=torch.long)
    glob = torch.zeros(batch, n, dtype=torch.long)
    glob[:, : min(globals_, n)] = 1
    return ids.to(device), mask.to(device), glob.to(device)


def forward(impl: str, model, ids, mask, glob):
    if impl == "hf":
        return model(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    return model(ids, mask, glob)


# ----------------------------------------------------------------------------------------------
# The correctness gate


def check_attention(cfg, device: str, seed: int = 0) -> Check:
    """Banded + global attention vs the dense reference: odd length, padding, globals in a window."""
    import torch

    from .attention import global_attention, global_indices, local_attention, reference_attention

    torch.manual_seed(seed)
    w = cfg.windows[0] // 2
    dil = cfg.dilations[0]
    H, Dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    n = min(3 * w * max(dil) + 37, 2048)
    B = 2
    q, k, v, qg, kg, vg = (torch.randn(B, H, n, Dh, device=device) for _ in range(6))
    real = torch.ones(B, n, dtype=torch.bool, device=device)
    real[1, n - n // 7 :] = False  # padding
    glob = torch.zeros(B, n, dtype=torch.bool, device=device)
    glob[:, 0] = True
    glob[0, n // 2] = True  # a global token inside other rows' windows: counted once
    glob &= real
    index, valid = global_indices(glob)
    out = local_attention(q, k, v, window=w, dilation=dil, attention_mask=real, global_index=index,
                          global_valid=valid)  # fmt: skip
    rows = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
    out_g = global_attention(qg.gather(2, rows), kg, vg, real)
    out = out.scatter(2, rows, torch.where(valid[:, None, :, None], out_g, out.gather(2, rows)))
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
            from .quantize import quantize_int8

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


# ----------------------------------------------------------------------------------------------
# One measurement (in a child process, or in this one with isolate=False)


@dataclass(frozen=True)
class Job:
    checkpoint: str
    impl: str
    seq_len: int
    batch_size: int
    dtype: str
    mode: str
    device: str
    globals: int
    warmup: int
    iters: int
    time_budget: float


def measure(job: Job, model=None) -> dict[str, Any]:
    """Time one job; ``model`` is loaded from the checkpoint when not given. Returns plain data:
    {status, note, times, peak_mem_mib, iters}."""
    import torch

    from .model import load_config

    cfg = load_config(Path(job.checkpoint))
    device, n, B = job.device, job.seq_len, job.batch_size
    train = job.mode == "train"
    if job.impl == "longdoc-attn":
        step = _attention_step(cfg, job)
    else:
        if n > cfg.max_tokens:
            return {"status": "skipped", "note": f"{n} tokens exceed the model's {cfg.max_tokens} positions"}
        if model is None:
            model = load_impl(job.impl, Path(job.checkpoint), device, job.dtype)
        ids, mask, glob = make_inputs(n, B, job.globals, cfg.vocab_size, device)
        impl = job.impl

        def step() -> None:
            ctx = full_attention(model, n) if impl == "full" else contextlib.nullcontext()
            with ctx:
                if train:
                    out = forward(impl, model, ids, mask, glob)
                    out.float().square().mean().backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.inference_mode():
                        forward(impl, model, ids, mask, glob)

    if job.impl.startswith("longdoc") and device.startswith("cuda"):
        step()  # compiles the fused kernels: not part of the timings or the memory peak
    mem = _MemoryMeter(device)
    times: list[float] = []
    warmup, iters, note, runs = job.warmup, job.iters, "", 0
    try:
        while len(times) < iters:
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            dt = time.perf_counter() - t0
            runs += 1
            if runs == 1 and dt * (warmup + iters - 1) > job.time_budget:  # too slow: fewer runs
                fit = max(1, int(job.time_budget // dt))
                warmup = min(warmup, 1)
                if fit < iters:
                    note = f"{fit} timed run(s) instead of {iters}: one run takes {dt:.1f} s (--time-budget)"
                    iters = fit
            if runs > warmup:
                times.append(dt)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        return {"status": "skipped", "note": f"out of memory at {n} tokens ({str(e).splitlines()[0][:100]})"}
    peak_mib = mem.peak_mib()
    # The machine's speed drifts (shared hosts: the fp32 peak read 206 and 340 GFLOP/s minutes apart),
    # so each row's share of the peak uses a peak measured right after its own runs.
    peak = matmul_peak(device, job.dtype).gflops
    return {"status": "ok", "note": note, "times": times, "peak_mem_mib": peak_mib, "iters": len(times),
            "matmul_peak_gflops": peak}  # fmt: skip


def _attention_step(cfg, job: Job) -> Callable[[], None]:
    import torch

    from .attention import global_attention, global_indices, local_attention

    B, n, H = job.batch_size, job.seq_len, cfg.num_attention_heads
    Dh = cfg.hidden_size // H
    dt = torch_dtype(job.dtype)
    # The layout the model passes: head views (B, H, n, Dh) of token-major (B, n, H, Dh) projections.
    q, k, v, qg = (torch.randn(B, n, H, Dh, device=job.device, dtype=dt).transpose(1, 2) for _ in range(4))
    real = torch.ones(B, n, dtype=torch.bool, device=job.device)
    glob = torch.zeros_like(real)
    glob[:, : min(job.globals, n)] = True
    index, valid = global_indices(glob)
    w, dil = cfg.windows[0] // 2, cfg.dilations[0]
    if job.mode == "train":
        for t in (q, k, v, qg):
            t.requires_grad_(True)

    def step() -> None:
        with torch.inference_mode(job.mode == "infer"):
            out = local_attention(q, k, v, window=w, dilation=dil, attention_mask=real, global_index=index,
                                  global_valid=valid)  # fmt: skip
            rows = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
            if index.shape[1]:
                out = out.scatter(2, rows, global_attention(qg.gather(2, rows), k, v, real).to(out.dtype))
            if job.mode == "train":
                out.float().square().mean().backward()

    return step


class _MemoryMeter:
    """Peak extra memory from now on: CUDA max allocated, or the CPU resident-set high-water mark."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        self.reset = _reset_hwm()
        self.base = _status_kib("VmRSS") if self.reset else None

    def peak_mib(self) -> float | None:
        import torch

        if self.device.startswith("cuda"):
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.base is None:
            return None  # no resettable high-water mark (not Linux): better no number than a wrong one
        return max(0, _status_kib("VmHWM") - self.base) / 1024


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return _status_kib("VmHWM") >= 0
    except OSError:
        return False


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {name}")


def run_child(job: Job, timeout: float) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter; a crash, kill or timeout becomes a skipped result."""
    cmd = [sys.executable, "-m", "longdoc_cli.bench", "--child", json.dumps(dataclasses.asdict(job))]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "note": f"did not finish within {timeout:.0f} s"}
    if proc.returncode == 0:
        lines = proc.stdout.strip().splitlines()
        with contextlib.suppress(json.JSONDecodeError, IndexError):
            return json.loads(lines[-1])
    if proc.returncode in (-9, 137):
        return {"status": "skipped", "note": "killed, most likely out of memory"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"status": "skipped", "note": f"failed (exit {proc.returncode}): {tail}"}


def _child_main(arg: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    job = Job(**json.loads(arg))
    try:
        result = measure(job)
    except MemoryError:
        result = {"status": "skipped", "note": "out of memory"}
    except LongdocError as e:
        result = {"status": "skipped", "note": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")


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
    device = resolve_device(spec.device)
    notes: list[str] = []
    impls = list(dict.fromkeys(spec.impls))
    int8 = "int8" if "longdoc-int8" in impls else "none"
    dtypes = list(dict.fromkeys(resolve_dtype(d, device, int8) for d in spec.dtypes))
    if "longdoc-int8" in impls and (device != "cpu" or dtypes != ["fp32"] or "train" in spec.modes):
        bad = device if device != "cpu" else ("train mode" if "train" in spec.modes else "non-fp32 dtypes")
        notes.append(f"longdoc-int8 runs fp32 inference on the CPU only: its rows are skipped for {bad}")
    from .attention import choose_kernel

    kernel = choose_kernel(torch.device(device), 0.0, 1 << 20, 0)

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
            from .model import load_config

            cfg = load_config(checkpoint)
            why_not_hf = hf_incompatible(cfg)
            if spec.check:
                say(f"{model_name}: correctness checks")
                new = [check_attention(cfg, device),
                       *check_models(checkpoint, cfg, spec, device, set(impls), dtypes)]  # fmt: skip
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
                skip = _skip_reason(impl, device, dtype, mode, n, cfg, why_not_hf)
                flops = _flops(impl, cfg, n, batch, spec.globals, mode)
                est = flops / (peaks[dtype].gflops * 1e9)
                if not skip and est > spec.time_budget:
                    skip = (f"one run would take >= {est:.0f} s even at the matmul peak "
                            f"(--time-budget {spec.time_budget:g} s)")  # fmt: skip
                job = Job(str(checkpoint), impl, n, batch, dtype, mode, device, spec.globals, spec.warmup,
                          spec.iters, spec.time_budget)  # fmt: skip
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


def _skip_reason(impl: str, device: str, dtype: str, mode: str, n: int, cfg, why_not_hf: str) -> str:
    if impl == "longdoc-int8" and (device != "cpu" or dtype != "fp32" or mode != "infer"):
        return "int8 is fp32 CPU inference only"
    if impl == "longdoc-compiled" and not device.startswith("cuda"):
        return "compiled layers are measured on CUDA only"
    if impl == "hf" and why_not_hf:
        return why_not_hf
    if impl != "longdoc-attn" and n > cfg.max_tokens:
        return f"{n} tokens exceed the model's {cfg.max_tokens} positions"
    return ""


def _flops(impl: str, cfg, n: int, batch: int, globals_: int, mode: str) -> float:
    train = mode == "train"
    globals_ = min(globals_, n)  # as make_inputs marks them
    if impl == "longdoc-attn":
        d = cfg.hidden_size
        w, dil = cfg.windows[0] // 2, cfg.dilations[0]
        per_head = [attention_flops(n, w, x, d // cfg.num_attention_heads, batch, globals_) for x in dil]
        return sum(per_head) * (3 if train else 1)
    return encoder_flops(cfg, n, batch, globals_, full=impl == "full", train=train)


def _in_process(job: Job) -> dict[str, Any]:
    try:
        return measure(job)
    except MemoryError:
        return {"status": "skipped", "note": "out of memory"}
    finally:
        gc.collect()


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        from .runtime import return_freed_memory, tune_memory

        tune_memory()
        if json.loads(sys.argv[2]).get("mode") == "infer":
            return_freed_memory()
        _child_main(sys.argv[2])
    else:
        sys.exit("usage: python -m longdoc_cli.bench --child JOB_JSON (use `longdoc bench` instead)")
