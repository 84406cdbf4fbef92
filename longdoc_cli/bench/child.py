"""One measurement: the model and inputs it runs, the timed loop, the memory meters, the matmul
peak, and the fresh child process it runs in (``python -m longdoc_cli.bench --child JOB``).

Memory is the peak *extra* memory of the timed runs over what the loaded model and inputs already
hold: on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs once the model is
loaded) minus the resident set just before the first run; on CUDA ``max_memory_allocated`` minus
the allocation before the first run. A child that runs out of memory or time gives a skipped result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..envvars import env
from ..errors import LongdocError, UsageError, is_out_of_memory
from ..runtime import torch_dtype

# Published Longformer sizes (random weights); two-sided window as HF's attention_window.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 attention_window=16, vocab_size=1000),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 attention_window=512, vocab_size=50265),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  attention_window=512, vocab_size=50265),
}  # fmt: skip


@dataclass(frozen=True)
class MatmulPeak:
    device: str
    dtype: str
    size: int  # square matrices of this side
    gflops: float  # best of several runs


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
    """Wait for the device's queued work (CUDA and MPS run asynchronously), so a timer sees it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    elif device == "mps":
        import torch

        torch.mps.synchronize()


# ----------------------------------------------------------------------------------------------
# Models and checkpoints


def preset_config(name: str, max_len: int, layers: int | None):
    from ..model import LongformerConfig

    sizes = dict(PRESETS[name])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return LongformerConfig(**sizes, max_position_embeddings=max_len + 2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip


def prepare_checkpoint(model: str, max_len: int, layers: int | None, tmp: Path, allow_download: bool) -> Path:
    """A Hugging Face-format LongformerModel directory for ``model`` (writes into ``tmp`` if needed)."""
    import torch

    from ..model import LongformerConfig, LongformerEncoder, load_hf_config

    if model in PRESETS:
        torch.manual_seed(0)
        LongformerEncoder(preset_config(model, max_len, layers)).save_pretrained(tmp)
        return tmp
    try:
        from ..hub import resolve_model
    except ImportError as e:
        raise LongdocError(f"--model {model}: model paths need longdoc_cli.hub ({e})") from e
    path = Path(resolve_model(model, allow_download=allow_download))
    if layers is None:
        return path
    cfg = load_hf_config(path)
    if layers > cfg.num_hidden_layers:
        raise UsageError(f"--layers {layers}: {model} has only {cfg.num_hidden_layers} layers")
    data = cfg.to_dict()
    data["num_hidden_layers"] = layers
    for key in ("attention_window", "attention_dilation"):
        if isinstance(data[key], list):
            data[key] = data[key][:layers]
    LongformerEncoder.from_pretrained(path, config=LongformerConfig.from_dict(data)).save_pretrained(tmp)
    return tmp


def with_dilation(checkpoint: Path, dilation: int | None, tmp: Path) -> Path:
    """``checkpoint`` with every layer's and head's dilation set to ``dilation`` (written to
    ``tmp/dilated``, never over the weights it reads); itself when None."""
    if dilation is None:
        return checkpoint
    from ..model import LongformerEncoder, load_hf_config

    config = load_hf_config(checkpoint).with_attention_dilation(dilation, "--dilation")
    out = tmp / "dilated"
    LongformerEncoder.from_pretrained(checkpoint, config=config).save_pretrained(out)
    return out


def hf_incompatible(cfg) -> str:
    """Why transformers' LongformerModel would not compute the same function ('' if it would)."""
    if any(x != 1 for heads in cfg.dilations for x in heads):
        return "transformers' Longformer has no dilation"
    if cfg.position_style != "roberta":
        return "transformers' Longformer uses RoBERTa positions"
    return ""


def _quiet_transformers():
    """The transformers module, with its warnings and progress bars off (the bench's own output)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


BERT_POSITIONS = 512  # BERT's position table: the ``bert`` row runs at most this many tokens


def bert_checkpoint(model: str, checkpoint: Path, tmp: Path) -> Path:
    """A ``transformers.BertModel`` directory with the weights of the Longformer ``checkpoint``, for
    the ``bert`` row (written to ``tmp/bert``): for the default model, its original all-MiniLM-L6-v2
    config and weights (cut to the checkpoint's depth; unless a weight delta was applied to it); for
    any other model, the Longformer's own
    weights without the global projections, and the position rows that number tokens 0, 1, ... (at
    most 512, BERT's limit). Full attention at every length: the same function as the Longformer
    where its window covers the input and no token is global (checked before timing)."""
    from ..model import load_hf_config, load_state_dict

    transformers = _quiet_transformers()
    cfg = load_hf_config(checkpoint)
    out = tmp / "bert"
    if model == "default" and "adapted" not in (cfg.extra.get("longdoc") or {}):  # no shipped delta on top
        from ..hub import default_source_dir

        bert = transformers.BertModel.from_pretrained(
            default_source_dir(), num_hidden_layers=cfg.num_hidden_layers, add_pooling_layer=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        bert.save_pretrained(out)
        return out
    state = load_state_dict(checkpoint)
    prefix = next((p for p in ("", "longformer.") if p + "embeddings.word_embeddings.weight" in state), "")
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {
        k: v for k, v in state.items() if "_global." not in k and k.startswith(("embeddings.", "encoder."))
    }
    first = cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0
    table = state["embeddings.position_embeddings.weight"]
    positions = min(BERT_POSITIONS, table.shape[0] - first)
    state["embeddings.position_embeddings.weight"] = table[first : first + positions].clone()
    bert_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=positions, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
    )  # fmt: skip
    bert = transformers.BertModel(bert_cfg, add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise LongdocError(
            f"{checkpoint}: the weights do not fit a BERT encoder ({(missing + unexpected)[:3]})"
        )
    bert.save_pretrained(out)
    return out


def full_attention_config(config, n: int):
    """``config`` with every layer's window over the whole n-token sequence and dilation 1, so that
    ``local_attention`` takes its dense path: the ``full`` baseline (full, padding-only mask,
    scaled-dot-product attention) on the same weights."""
    return dataclasses.replace(config, attention_window=2 * max(n, 1), attention_dilation=1)


def load_impl(impl: str, checkpoint: Path, device: str, dtype: str, n: int | None = None):
    """The model object that runs ``impl`` (not used for longdoc-attn); ``full`` needs the length
    ``n`` its windows cover; ``bert`` reads the directory :func:`bert_checkpoint` wrote."""
    from ..model import LongformerEncoder, load_hf_config

    if impl in ("hf", "bert"):
        transformers = _quiet_transformers()
        if impl == "hf":
            model = transformers.LongformerModel.from_pretrained(checkpoint, add_pooling_layer=False)
        else:  # ``checkpoint``: the directory bert_checkpoint wrote
            model = transformers.BertModel.from_pretrained(checkpoint, add_pooling_layer=False)
    else:
        config = load_hf_config(checkpoint)
        if impl == "full":
            if n is None:
                raise ValueError("the full baseline needs the sequence length n")
            config = full_attention_config(config, n)
        model = LongformerEncoder.from_pretrained(checkpoint, config=config)
        model.pooler = None
    model = model.eval().to(device=device, dtype=torch_dtype(dtype))
    if impl == "longdoc-int8":
        from ..quantize import quantize_int8

        model = quantize_int8(model, inplace=True)
    if impl == "longdoc-compiled":
        for layer in model.encoder.layer:
            layer.compile(mode=env("LONGDOC_COMPILE_MODE", "default"))
    return model


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
    if impl == "bert":  # full attention: no global tokens to mark
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model(ids, mask, glob)


def kernel_arguments(device: str, dropout_p: float, n: int, window: int) -> dict[str, Any]:
    """The attention kernel the model picks here (runtime's settings), as longformer_attention's
    keyword arguments."""
    import torch

    from ..attention import choose_kernel
    from ..runtime import attention_kernel, compiled_flex, flex_options

    dev = torch.device(device)
    kernel = choose_kernel(dev, dropout_p, n, window, attention_kernel())
    if kernel != "flex":
        return {"kernel": kernel}
    return {"kernel": kernel, "flex_attention": compiled_flex(dev.type), "flex_options": flex_options()}


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
    bert: str = ""  # bert_checkpoint's directory, for the bert row


def measure(job: Job, model=None) -> dict[str, Any]:
    """Time one job; ``model`` is loaded from the checkpoint when not given. Returns plain data:
    {status, note, times, peak_mem_mib, iters}."""
    import torch

    from ..model import load_hf_config

    cfg = load_hf_config(Path(job.checkpoint))
    device, n, B = job.device, job.seq_len, job.batch_size
    train = job.mode == "train"
    if job.impl == "longdoc-attn":
        step = _attention_step(cfg, job)
    else:
        if n > cfg.max_tokens:
            return {"status": "skipped", "note": f"{n} tokens exceed the model's {cfg.max_tokens} positions"}
        if model is None:
            path = Path(job.bert if job.impl == "bert" else job.checkpoint)
            model = load_impl(job.impl, path, device, job.dtype, n)
        ids, mask, glob = make_inputs(n, B, job.globals, cfg.vocab_size, device)
        impl = job.impl

        def step() -> None:
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

    from ..attention import global_indices, longformer_attention

    B, n, H = job.batch_size, job.seq_len, cfg.num_attention_heads
    Dh = cfg.hidden_size // H
    d = H * Dh
    dt = torch_dtype(job.dtype)
    # The layout the model passes: head views (B, H, n, Dh) of token-major (B, n, H, Dh) projections.
    q, k, v = (torch.randn(B, n, H, Dh, device=job.device, dtype=dt).transpose(1, 2) for _ in range(3))
    x = torch.randn(B, n, d, device=job.device, dtype=dt)  # the hidden state: global keys and values
    wk, wv = (torch.randn(d, d, device=job.device, dtype=dt) / math.sqrt(d) for _ in range(2))
    real = torch.ones(B, n, dtype=torch.bool, device=job.device)
    glob = torch.zeros_like(real)
    glob[:, : min(job.globals, n)] = True
    index, valid = global_indices(glob)
    qg = torch.randn(B, H, index.shape[1], Dh, device=job.device, dtype=dt)
    w, dil = cfg.windows[0] // 2, cfg.dilations[0]
    if job.mode == "train":
        for t in (q, k, v, qg, x):
            t.requires_grad_(True)
    kernel = kernel_arguments(job.device, 0.0, n, w)

    def step() -> None:
        with torch.inference_mode(job.mode == "infer"):
            out = longformer_attention(
                q, k, v, qg, x, (wk, None), (wv, None), window=w, dilation=dil, attention_mask=real,
                global_index=index, global_valid=valid, **kernel,
            )  # fmt: skip
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


def child_main(arg: str) -> None:
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


def _in_process(job: Job) -> dict[str, Any]:
    try:
        return measure(job)
    except MemoryError:
        return {"status": "skipped", "note": "out of memory"}
    finally:
        gc.collect()
