"""Opt-in int8 dynamic quantization of a model's linear layers, for CPU inference.

Weights are stored as int8 with one scale per output channel; activations are quantized on the fly
per call, the matmul runs in int8 with int32 accumulation (fbgemm / onednn kernels), and the result
is fp32. Per-channel, not per-tensor, weight scales: on the default model (all-MiniLM-L6-v2) the
embeddings of 13 documentation pages kept a mean cosine of 0.981 with fp32 per-channel against
0.912 per-tensor, at the same speed (a 3072 -> 768 layer at n = 4096: 0.17 s vs 0.20 s; fp32 0.41 s).
Measured on the 2-core dev CPU: a base layer's feed-forward (n = 4096) runs 2.5x faster than fp32
with ~3% relative output error on random weights (benchmarks/README.md, "longdoc bench").

Why ``torch.ao.quantization.quantize_dynamic``: it is deprecated in favour of torchao but still ships
with torch 2.13 and its fused fbgemm kernels are the fastest int8 path here; a torch-only
replacement (per-row int8 through ``torch._int_mm``) measured 2.2x slower than it, because
quantizing the activations in eager mode costs extra passes over memory.

The global key/value projections are left in fp32: the encoder reads their weight matrices
directly (reassociated global attention), and they cost O(G n d), a small share of the layer.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from .errors import LongdocError, UsageError

# Linear layers whose ``.weight`` the model reads as a tensor: they must stay nn.Linear.
KEEP_FP32 = ("key_global", "value_global")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear submodules that :func:`quantize_int8` converts."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FP32
    ]


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (fp32, CPU, inference only) with its linear layers int8-quantized.

    Raises LongdocError when the model is not fp32 on the CPU or torch has no quantized engine.
    """
    try:
        param = next(model.parameters())
    except StopIteration:
        raise LongdocError("--quantize int8: the model has no parameters") from None
    if param.device.type != "cpu":
        raise UsageError(f"--quantize int8 runs on the CPU only, the model is on {param.device}")
    if param.dtype.is_floating_point and param.dtype.itemsize != 4:
        raise UsageError(f"--quantize int8 needs an fp32 model, not {param.dtype}")
    try:
        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # a future torch without torch.ao.quantization
        raise LongdocError(f"--quantize int8 is not available with this torch ({e})") from e
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        raise LongdocError("--quantize int8: this torch build has no quantized CPU engine")
    names = quantizable_linears(model)
    if not names:
        return model if inplace else copy.deepcopy(model)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(
            target, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True
        )


def is_quantized(model: nn.Module) -> bool:
    """True when some submodule is a dynamically quantized linear layer."""
    return any(
        type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao.nn.quantized")
        for m in model.modules()
    )
