"""The global rows of one layer with autograd (not a test): ``global_attention_from_hidden`` (scores
and probabilities as matmuls through autograd, fp32 softmax), ``global_rows_fused`` (one fused SDPA
call over the hidden state, the stock kernel), the same call through ``attention._FlashFp32Backward``
(its backward in fp32), and one autograd function with the backward written out (``WrittenOut``
below); the last two were measured in session 9 and not kept. Forward + backward, the default
model's shape (12 heads of 32, d = 384), 512 tokens, one global token, one thread; least CPU time of
30 interleaved runs, and the largest gradient difference against the matmuls.

    OMP_NUM_THREADS=1 python benchmarks/global_rows_ab.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from longdoc_cli.attention import (
    _FlashFp32Backward,
    _queries_through_keys,
    _through_values,
    global_attention_from_hidden,
    global_rows_fused,
)


def fp32_backward_call(q_global, hidden, key_weight, key_bias, value_weight, value_bias, attention_mask):
    """``global_rows_fused`` (no padding) with its SDPA call through ``_FlashFp32Backward``."""
    B, H, G, Dh = q_global.shape
    d = hidden.shape[-1]
    qk = _queries_through_keys(q_global, key_weight).reshape(B, 1, H * G, d)
    keys = hidden[:, None]  # (B, 1, n, d)
    if hidden.dtype == torch.bfloat16:
        ph = _FlashFp32Backward.apply(qk, keys, keys, None, 1 / math.sqrt(Dh))
    else:
        ph = F.scaled_dot_product_attention(qk, keys, keys, scale=1 / math.sqrt(Dh))
    return _through_values(ph.view(B, H * G, d), value_weight, value_bias, H) + key_bias.sum() * 0.0


class WrittenOut(torch.autograd.Function):
    """The global rows as one autograd function with its backward written out (measured in session 9,
    not kept): small matmuls over the H*G rows in fp32 (float64 stays float64), the softmax and its
    backward by hand. The key bias is an input only for its gradient, exactly 0."""

    @staticmethod
    def forward(ctx, q_global, hidden, key_weight, key_bias, value_weight, value_bias, real):
        B, H, G, Dh = q_global.shape
        d = hidden.shape[-1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(acc)  # (B, n, d)
        qh = q_global.to(acc).transpose(0, 1).reshape(H, B * G, Dh)
        wk, wv = key_weight.to(acc).view(H, Dh, d), value_weight.to(acc).view(H, Dh, d)
        qk = torch.bmm(qh, wk).view(H, B, G, d).transpose(0, 1).reshape(B, H * G, d)  # q W_k per head
        scores = torch.bmm(qk, x.transpose(1, 2)).mul_(1 / math.sqrt(Dh))  # (B, H*G, n)
        if real is not None:
            scores.masked_fill_(~real[:, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        ph = torch.bmm(p, x).view(B, H, G, d).transpose(0, 1).reshape(H, B * G, d)  # P hidden
        out = torch.bmm(ph, wv.transpose(1, 2)).view(H, B, G, Dh).transpose(0, 1)  # (B, H, G, Dh)
        if value_bias is not None:
            out = out + value_bias.to(acc).view(1, H, 1, Dh)
        ctx.save_for_backward(hidden, qh, key_weight, key_bias, value_weight, value_bias, qk, p, ph)
        return out.to(q_global.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, qh, key_weight, key_bias, value_weight, value_bias, qk, p, ph = ctx.saved_tensors
        B, H, G, Dh = grad.shape
        d = hidden.shape[-1]
        acc = qh.dtype
        x = hidden.to(acc)
        wk, wv = key_weight.to(acc).view(H, Dh, d), value_weight.to(acc).view(H, Dh, d)
        go = grad.to(acc).transpose(0, 1).reshape(H, B * G, Dh)
        d_wv = torch.bmm(go.transpose(1, 2), ph).view(H * Dh, d)
        d_ph = torch.bmm(go, wv).view(H, B, G, d).transpose(0, 1).reshape(B, H * G, d)
        d_p = torch.bmm(d_ph, x.transpose(1, 2))  # (B, H*G, n)
        d_s = p * (d_p - (d_p * p).sum(-1, keepdim=True)) * (1 / math.sqrt(Dh))
        d_x = torch.baddbmm(torch.bmm(p.transpose(1, 2), d_ph), d_s.transpose(1, 2), qk)  # (B, n, d)
        d_qk = torch.bmm(d_s, x).view(B, H, G, d).transpose(0, 1).reshape(H, B * G, d)
        d_wk = torch.bmm(qh.transpose(1, 2), d_qk).view(H * Dh, d)
        d_q = torch.bmm(d_qk, wk.transpose(1, 2)).view(H, B, G, Dh).transpose(0, 1)  # (B, H, G, Dh)
        d_bk = None if key_bias is None else torch.zeros_like(key_bias)
        d_bv = None if value_bias is None else grad.to(acc).sum((0, 2)).reshape(-1).to(value_bias.dtype)
        return (d_q.to(grad.dtype), d_x.to(hidden.dtype), d_wk.to(key_weight.dtype), d_bk,
                d_wv.to(value_weight.dtype), d_bv, None)  # fmt: skip


def written_out(q_global, hidden, key_weight, key_bias, value_weight, value_bias, attention_mask):
    real = attention_mask | ~attention_mask.any(dim=1, keepdim=True)  # no empty row
    mask = None if bool(attention_mask.all()) else real
    return WrittenOut.apply(q_global, hidden, key_weight, key_bias, value_weight, value_bias, mask)


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
        "one SDPA call": global_rows_fused,
        "the call, fp32 backward": fp32_backward_call,
        "written out": written_out,
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
