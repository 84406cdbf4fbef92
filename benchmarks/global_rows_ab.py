"""The global rows of one layer with autograd (not a test): ``global_attention_from_hidden`` (scores
and probabilities as matmuls, fp32 softmax) against ``global_rows_fused`` (one fused SDPA call over
the hidden state), forward + backward, the default model's shape (12 heads of 32, d = 384), 512
tokens, one global token, one thread; least CPU time of 30 interleaved runs.

    OMP_NUM_THREADS=1 python benchmarks/global_rows_ab.py
"""

from __future__ import annotations

import time

import torch

from longdoc_cli.attention import global_attention_from_hidden, global_rows_fused


def compare(dtype: torch.dtype, batch: int, n: int = 512, heads: int = 12, head_dim: int = 32) -> None:
    d = heads * head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, d, generator=g).to(dtype).requires_grad_()
    qg = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype).requires_grad_()
    wk, wv = (torch.randn(d, d, generator=g).div(20).to(dtype).requires_grad_() for _ in range(2))
    bk, bv = (torch.randn(d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    real = torch.ones(batch, n, dtype=torch.bool)
    with torch.no_grad():
        a, b = (
            f(qg, x, wk, bk, wv, bv, real).float() for f in (global_attention_from_hidden, global_rows_fused)
        )
    best = {}
    for _ in range(30):
        for name, f in (("matmuls", global_attention_from_hidden), ("fused", global_rows_fused)):
            c = time.process_time()
            f(qg, x, wk, bk, wv, bv, real).float().sum().backward()
            best[name] = min(best.get(name, float("inf")), time.process_time() - c)
    print(
        f"{str(dtype).split('.')[-1]:9s} {batch} x {n}: matmuls {1000 * best['matmuls']:.2f} ms, "
        f"fused {1000 * best['fused']:.2f} ms (largest difference {(a - b).abs().max().item():.1e})"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for dtype, batch in ((torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1), (torch.bfloat16, 4)):
        compare(dtype, batch)
