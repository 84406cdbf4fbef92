"""The global rows of one layer with autograd (not a test): ``global_attention_from_hidden`` (scores
and probabilities as matmuls through autograd, fp32 softmax), one fused SDPA call over the hidden
state (the stock kernel; what ``global_rows_fused`` runs in bf16), the same call through
``attention._FlashFp32Backward`` (its backward in fp32; measured in session 9, not kept),
``attention._GlobalRowsWrittenOut`` in the inputs' dtype (one autograd function with the backward
written out; what ``global_rows_fused`` runs in fp32 since session 10) and ``global_rows_fused``
itself. Forward + backward, the default model's shape (12 heads of 32, d = 384), 512 tokens, one
global token, one thread; least CPU time of 30 interleaved runs, and the largest gradient
difference against the matmuls.

    OMP_NUM_THREADS=1 python benchmarks/global_rows_ab.py
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F

from longdoc_cli.attention import (
    _FlashFp32Backward,
    _GlobalRowsWrittenOut,
    _queries_through_keys,
    _through_values,
    global_attention_from_hidden,
    global_rows_fused,
)


def sdpa_call(
    q_global, hidden, key_weight, key_bias, value_weight, value_bias, attention_mask, fp32_backward=False
):
    """``global_rows_fused``'s one SDPA call (no padding), in every dtype (the library runs it for bf16
    only since session 10); ``fp32_backward``: through ``_FlashFp32Backward`` (bf16)."""
    B, H, G, Dh = q_global.shape
    d = hidden.shape[-1]
    qk = _queries_through_keys(q_global, key_weight).reshape(B, 1, H * G, d)
    keys = hidden[:, None]  # (B, 1, n, d)
    if fp32_backward and hidden.dtype == torch.bfloat16:
        ph = _FlashFp32Backward.apply(qk, keys, keys, None, 1 / math.sqrt(Dh))
    else:
        ph = F.scaled_dot_product_attention(qk, keys, keys, scale=1 / math.sqrt(Dh))
    return _through_values(ph.view(B, H * G, d), value_weight, value_bias, H) + key_bias.sum() * 0.0


def written_out(q_global, hidden, key_weight, key_bias, value_weight, value_bias, attention_mask):
    """``attention._GlobalRowsWrittenOut`` in every dtype (the library runs it for fp32 and float64),
    its matmuls in the inputs' dtype."""
    return _GlobalRowsWrittenOut.apply(q_global, hidden, key_weight, key_bias, value_weight, value_bias, None)


def compare(dtype: torch.dtype, batch: int, n: int = 512, heads: int = 12, head_dim: int = 32) -> None:
    d = heads * head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, d, generator=g).to(dtype).requires_grad_()
    qg = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype).requires_grad_()
    wk, wv = (torch.randn(d, d, generator=g).div(20).to(dtype).requires_grad_() for _ in range(2))
    bk, bv = (torch.randn(d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    leaves = (qg, x, wk, bk, wv, bv)
    real = torch.ones(batch, n, dtype=torch.bool)
    variants = {
        "matmuls": global_attention_from_hidden,
        "one SDPA call": sdpa_call,
        "the call, fp32 backward": functools.partial(sdpa_call, fp32_backward=True),
        "written out": written_out,
        "global_rows_fused": global_rows_fused,
    }
    best: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for _ in range(30):
        for name, f in variants.items():
            for t in leaves:
                t.grad = None
            c = time.process_time()
            f(*leaves, real).float().sum().backward()
            best[name] = min(best.get(name, float("inf")), time.process_time() - c)
            grads[name] = [t.grad.float() for t in leaves]
    diff = {
        name: max((a - b).abs().max().item() for a, b in zip(grads[name], grads["matmuls"], strict=True))
        for name in variants
    }
    print(
        f"{str(dtype).split('.')[-1]:9s} {batch} x {n}: "
        + ", ".join(f"{name} {1000 * best[name]:.2f} ms" for name in variants)
        + " (largest gradient difference against the matmuls: "
        + ", ".join(f"{name} {diff[name]:.1e}" for name in list(variants)[1:])
        + ")",
        flush=True,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for dtype, batch in ((torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1), (torch.bfloat16, 4)):
        compare(dtype, batch)
