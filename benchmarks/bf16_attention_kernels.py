"""The CPU flash kernel with bf16 inputs, forward only and forward + backward (not a test): one
layer's attention of the default model's shape (12 heads of 32, 512 tokens, token-major head views,
the short path's band mask: |i - j| <= 256 or key 0), one thread, least CPU time of ``--rounds``
interleaved runs. Forward only: the bf16 kernel against the inputs converted to fp32. Forward +
backward: the bf16 kernel both ways, the inputs converted to fp32 both ways, and the bf16 forward
with the fp32 backward (``attention._FlashFp32Backward``); the largest error of q, k, v's gradients
against float64. Session 9's reason for running the backward alone in fp32.

    OMP_NUM_THREADS=1 python benchmarks/bf16_attention_kernels.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longdoc_cli.attention import _FlashFp32Backward


def bf16_kernel(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def in_fp32(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float()).to(q.dtype)


def fp32_backward(q, k, v, mask):
    return _FlashFp32Backward.apply(q, k, v, mask.float(), None)


def inputs(batch: int, n: int = 512, heads: int = 12, head_dim: int = 32, window: int = 256):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, n, heads, head_dim, generator=g).bfloat16().transpose(1, 2) for _ in range(3)
    )
    pos = torch.arange(n)
    allowed = ((pos[:, None] - pos[None, :]).abs() <= window) | (pos[None, :] == 0)
    mask = torch.zeros(1, 1, n, n, dtype=torch.bfloat16).masked_fill_(~allowed, float("-inf"))
    return q, k, v, mask


def forward_only(batch: int, rounds: int) -> None:
    q, k, v, mask = inputs(batch)
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, f in (("bf16 kernel", bf16_kernel), ("inputs in fp32", in_fp32)):
                c = time.process_time()
                f(q, k, v, mask)
                best[name] = min(best.get(name, float("inf")), time.process_time() - c)
    print(f"forward only, {batch} x 512: " + ", ".join(f"{k} {1000 * t:.1f} ms" for k, t in best.items()))


def forward_backward(batch: int, rounds: int) -> None:
    q, k, v, mask = inputs(batch)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    variants = {"bf16 both ways": bf16_kernel, "fp32 both ways": in_fp32, "fp32 backward": fp32_backward}
    best: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for _ in range(rounds):
        for name, f in variants.items():
            for t in leaves:
                t.grad = None
            c = time.process_time()
            f(*leaves, mask).float().square().sum().backward()
            best[name] = min(best.get(name, float("inf")), time.process_time() - c)
            grads[name] = [t.grad for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    F.scaled_dot_product_attention(*ref, attn_mask=mask.double()).square().sum().backward()
    errors = {
        name: " / ".join(
            f"{(a.double() - r.grad).abs().max().item():.1e}" for a, r in zip(gs, ref, strict=True)
        )
        for name, gs in grads.items()
    }
    print(
        f"forward + backward, {batch} x 512: "
        + ", ".join(
            f"{name} {1000 * best[name]:.1f} ms (q/k/v gradient error {errors[name]})" for name in variants
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    for batch in (1, 4, 16):
        forward_only(batch, args.rounds)
    for batch in (1, 4):
        forward_backward(batch, args.rounds)


if __name__ == "__main__":
    main()
