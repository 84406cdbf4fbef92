"""bf16 attention with autograd on the CPU (not a test): the stock flash kernel both ways against
``attention._FlashFp32Backward`` (the kernel's bf16 forward, its backward in fp32), one layer of the
default model's shape (12 heads of 32, one-sided window 256, the first token global), one thread,
forward + backward of ``local_attention``: 512 tokens (one masked call, ``_dense_banded``; 1 and 4
rows) and 1024 / 4096 tokens (query blocks, ``_band``; 1 row). Least CPU time of ``--rounds``
interleaved runs; the gradients' relative error against float64 for both.

    OMP_NUM_THREADS=1 python benchmarks/bf16_backward_ab.py
"""

from __future__ import annotations

import argparse
import time

import torch

from longdoc_cli import attention
from longdoc_cli.attention import global_indices, local_attention, short_band_mask


def layer(leaves, window: int, am, gm, band_mask):
    q, k, v = (t.transpose(1, 2) for t in leaves)  # token-major head views, as the model's
    index, valid = global_indices(gm)
    return local_attention(
        q, k, v, window=window, attention_mask=am, global_index=index, global_valid=valid, kernel="band",
        band_mask=band_mask,
    )  # fmt: skip


def compare(batch: int, n: int, rounds: int, heads: int = 12, head_dim: int = 32, window: int = 256) -> None:
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, n, heads, head_dim, generator=g) for _ in range(3)]
    upstream = torch.randn(batch, heads, n, head_dim, generator=g, dtype=torch.float64)
    am = torch.ones(batch, n, dtype=torch.bool)
    gm = torch.zeros(batch, n, dtype=torch.bool)
    gm[:, 0] = True
    fits = attention.dense_band_applies(n, window, 1, torch.device("cpu"))

    def run(dtype, fp32_backward: bool):
        leaves = [t.to(dtype).requires_grad_() for t in data]
        mask_dtype = torch.float32 if fp32_backward else dtype
        band = short_band_mask(am, gm, window, mask_dtype) if fits and dtype != torch.float64 else None
        saved = attention._fp32_backward_applies
        if not fp32_backward:
            attention._fp32_backward_applies = lambda *a: False
        try:
            c = time.process_time()
            out = layer(leaves, window, am, gm, band)
            grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
            return time.process_time() - c, grads
        finally:
            attention._fp32_backward_applies = saved

    _, want = run(torch.float64, False)
    best: dict[str, float] = {}
    errors: dict[str, float] = {}
    for _ in range(rounds):
        for name, on in (("stock bf16", False), ("fp32 backward", True)):
            seconds, grads = run(torch.bfloat16, on)
            best[name] = min(best.get(name, float("inf")), seconds)
            errors[name] = max(
                ((a.double() - b).norm() / b.norm()).item() for a, b in zip(grads, want, strict=True)
            )
    path = "one masked call" if fits else "query blocks"
    print(
        f"{batch} x {n} ({path}): "
        + ", ".join(f"{name} {1000 * best[name]:.1f} ms (gradient error {errors[name]:.1e})" for name in best)
        + f"; ratio {best['fp32 backward'] / best['stock bf16']:.2f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    for batch, n in ((1, 512), (4, 512), (1, 1024), (1, 4096)):
        compare(batch, n, args.rounds)


if __name__ == "__main__":
    main()
