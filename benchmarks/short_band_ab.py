"""The short-sequence attention path against the query blocks (not a test): per layer of the default
model's shape (12 heads of 32, one-sided window 256, one global token, one thread), local_attention
with its query blocks (``DENSE_BAND_SPAN = 0``) against its one masked dense call (the default for
w + 1 < n <= 2w + 1); forward + backward on 1 row, inference on 4 rows with padding; best of 7.

    python benchmarks/short_band_ab.py
"""

import time

import torch

from longdoc_cli import attention
from longdoc_cli.attention import global_indices, local_attention

SPAN = attention.DENSE_BAND_SPAN


def timed(f, reps: int = 7, backward: bool = False) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        if backward:
            out.float().square().mean().backward()
        best = min(best, time.perf_counter() - t)
    return best


def compare(dtype: torch.dtype, n: int, batch: int, train: bool, w: int = 256, heads: int = 12) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, n, 32, generator=g).to(dtype).requires_grad_(train) for _ in range(3)
    )
    am = torch.ones(batch, n, dtype=torch.bool)
    if batch > 1:
        am[1, n - 50 :] = False
    gm = torch.zeros(batch, n, dtype=torch.bool)
    gm[:, 0] = True
    index, valid = global_indices(gm)

    def run(span: int):
        def f():
            attention.DENSE_BAND_SPAN = span
            return local_attention(
                q, k, v, window=w, attention_mask=am, global_index=index, global_valid=valid
            )

        return f

    with torch.inference_mode(not train):
        # the global row's local result is replaced by the caller (global_attention): not compared
        diff = (run(0)() - run(SPAN)())[:, :, 1:].abs().max().item()
        blocks, dense = (timed(run(s), backward=train) for s in (0, SPAN))
    attention.DENSE_BAND_SPAN = SPAN
    mode = "forward + backward" if train else "inference"
    print(
        f"{str(dtype).split('.')[-1]:9s} {batch} x {n:5d} {mode:18s} blocks {1000 * blocks:6.1f} ms  "
        f"one masked call {1000 * dense:6.1f} ms  ({dense / blocks:.2f}x; largest difference {diff:.1e})"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (300, 512, 513):
            compare(dtype, n, 1, train=True)
        for n in (300, 512, 513):
            compare(dtype, n, 4, train=False)
