"""Session 4's tries at the CPU band kernel and the linear layers, kept so their numbers can be
re-measured (benchmarks/README.md, "Why the band attention stays below 50%"). Not a test, not used
by longdoc. One base layer's attention at n = 16384 (12 heads of 64, one-sided window 256, one
global key), fp32, runs interleaved; minima are printed because the shared 2-core machine's medians
drifted by 40% within minutes.

    python benchmarks/cpu_kernel_tries.py [--reps 15] [--linear]

Rows: ``_band_views`` as shipped; try 1 (interior blocks as unfolded views of K and V themselves
with one broadcast band mask, edge blocks through a small copy with their own mask); the CPU flash
call alone on padded views (per-block mask, broadcast mask) and on direct views; try 2 (batched
GEMMs: ``baddbmm`` with the mask, in-place softmax, ``bmm``, per head and chunk of blocks) and its
two GEMMs alone. Try 2 gives no log-sum-exp, which the merge with the global keys needs (the
global keys would have to join every block's keys instead). ``--linear`` times try 3: a
16384 x 768 -> 3072 layer with GELU as ``addmm`` + ``gelu_``, oneDNN's fused linear + GELU, and
MKL packed weights.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

from longdoc_cli.runtime import return_freed_memory, tune_memory

tune_memory()  # as the bench's children: before torch is imported
return_freed_memory()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from longdoc_cli import attention as A  # noqa: E402

N, H, DH, W, B = 16384, 12, 64, 256, 64
L, NB = B + 2 * W, N // B
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def head_views() -> torch.Tensor:  # the model's layout: head views of a token-major projection
    return torch.randn(1, N, H * DH).view(1, N, H, DH).transpose(1, 2)


def band_mask() -> torch.Tensor:  # (B, L) additive: query r sees keys r .. r + 2w of its block
    r, c = torch.arange(B)[:, None], torch.arange(L)[None, :]
    return torch.where((c >= r) & (c <= r + 2 * W), 0.0, float("-inf"))


def direct_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """Try 1: interior blocks on views of k and v, one broadcast mask; edge blocks copied."""
    qt, kt, vt = q.transpose(1, 2)[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0]  # (N, H, DH)
    band = band_mask()
    interior = F.pad(key_ok[0], (W, W), value=False).unfold(0, L, B).all(-1)  # (NB,)
    out = q.new_empty(N, H, DH)
    flags = interior.tolist()
    s = 0
    while s < NB:  # each run of interior blocks: one flash call on views
        if not flags[s]:
            s += 1
            continue
        e = s
        while e < NB and flags[e]:
            e += 1
        kb = kt[s * B - W : e * B + W].unfold(0, L, B).permute(0, 1, 3, 2)
        vb = vt[s * B - W : e * B + W].unfold(0, L, B).permute(0, 1, 3, 2)
        qb = qt[s * B : e * B].reshape(e - s, B, H, DH).transpose(1, 2)
        o, _ = FLASH(qb, kb, vb, 0.0, False, attn_mask=band[None, None])
        out[s * B : e * B] = o.transpose(1, 2).reshape(-1, H, DH)
        s = e
    edge = (~interior).nonzero().view(-1)
    if len(edge):
        pos = edge[:, None] * B - W + torch.arange(L)[None, :]  # (E, L) key positions, some outside
        inside = (pos >= 0) & (pos < N)
        clamped = pos.clamp(0, N - 1)
        ke = kt[clamped.view(-1)].view(-1, L, H, DH).transpose(1, 2)
        ve = vt[clamped.view(-1)].view(-1, L, H, DH).transpose(1, 2)
        rows = edge[:, None] * B + torch.arange(B)[None, :]
        qe = qt[rows.view(-1)].view(-1, B, H, DH).transpose(1, 2)
        ok = inside & key_ok[0][clamped]
        mask = band + torch.where(ok, 0.0, float("-inf"))[:, None, :]
        mask.view(-1, L)[~key_ok[0][rows.view(-1)]] = 0.0  # global rows: finite, replaced later
        o, _ = FLASH(qe, ke, ve, 0.0, False, attn_mask=mask[:, None])
        out[rows.view(-1)] = o.transpose(1, 2).reshape(-1, H, DH)
    return out


def batched_gemms(
    q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, chunk: int, softmax: bool = True
) -> None:
    """Try 2 on padded views: per head and chunk of blocks, baddbmm(mask) -> softmax_ -> bmm."""
    qb = q.transpose(1, 2)[0].reshape(NB, B, H, DH).transpose(1, 2)
    band, scale = band_mask(), 1 / math.sqrt(DH)
    scores, part = torch.empty(chunk, B, L), torch.empty(chunk, B, DH)
    out = q.new_empty(NB, B, H, DH)  # token-major, as the model needs it
    for h in range(H):
        for s0 in range(0, NB, chunk):
            s1 = min(NB, s0 + chunk)
            sc = scores[: s1 - s0]
            if softmax:
                torch.baddbmm(band, qb[s0:s1, h], kb[s0:s1, h].transpose(1, 2), alpha=scale, out=sc)
                torch.ops.aten._softmax.out(sc, -1, False, out=sc)
            else:
                torch.bmm(qb[s0:s1, h], kb[s0:s1, h].transpose(1, 2), out=sc)
            torch.bmm(sc, vb[s0:s1, h], out=part[: s1 - s0])
            if softmax:
                out[s0:s1, :, h] = part[: s1 - s0]


def attention_rows() -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    q, k, v = head_views(), head_views(), head_views()
    ok = torch.ones(1, N, dtype=torch.bool)
    key_ok = ok.clone()
    key_ok[0, 0] = False  # token 0 is the global one: not a band key
    kf, vf = torch.zeros(W + N + W, H, DH), torch.zeros(W + N + W, H, DH)
    kf[W : W + N], vf[W : W + N] = k.transpose(1, 2)[0], v.transpose(1, 2)[0]
    kp, vp = kf.unfold(0, L, B).permute(0, 1, 3, 2), vf.unfold(0, L, B).permute(0, 1, 3, 2)
    qp = q.transpose(1, 2)[0].reshape(NB, B, H, DH).transpose(1, 2)
    band = band_mask()
    full, shared = band.expand(NB, 1, B, L).contiguous(), band[None, None]
    s0, s1 = W // B, NB - W // B  # the interior blocks of a sequence with no padding
    kd = k.transpose(1, 2)[0, s0 * B - W : s1 * B + W].unfold(0, L, B).permute(0, 1, 3, 2)
    vd = v.transpose(1, 2)[0, s0 * B - W : s1 * B + W].unfold(0, L, B).permute(0, 1, 3, 2)
    qd = q.transpose(1, 2)[0, s0 * B : s1 * B].reshape(s1 - s0, B, H, DH).transpose(1, 2)
    expected = A._band_views(q, k, v, W, ok, key_ok, None, None, None, None).transpose(1, 2)[0]
    got = direct_views(q, k, v, key_ok)
    real = key_ok[0]
    assert torch.allclose(got[real], expected[real], atol=1e-4), "try 1 differs from _band_views"
    return {
        "_band_views (shipped)": lambda: A._band_views(q, k, v, W, ok, key_ok, None, None, None, None),
        "try 1: direct views + broadcast mask": lambda: direct_views(q, k, v, key_ok),
        "flash alone, padded views, per-block mask": lambda: FLASH(qp, kp, vp, 0.0, False, attn_mask=full),
        "flash alone, padded views, broadcast mask": lambda: FLASH(qp, kp, vp, 0.0, False, attn_mask=shared),
        "flash alone, direct views, broadcast mask": lambda: FLASH(qd, kd, vd, 0.0, False, attn_mask=shared),
        "try 2: batched GEMMs, chunks of 4": lambda: batched_gemms(q, kp, vp, 4),
        "try 2: batched GEMMs, chunks of 8": lambda: batched_gemms(q, kp, vp, 8),
        "try 2: batched GEMMs, chunks of 16": lambda: batched_gemms(q, kp, vp, 16),
        "try 2: its two GEMMs alone (chunks of 8)": lambda: batched_gemms(q, kp, vp, 8, softmax=False),
    }  # fmt: skip


def linear_rows() -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x, w, b = torch.randn(N, 768), torch.randn(3072, 768) * 0.03, torch.randn(3072)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, N)
    gelu_, onednn, mkl = torch.ops.aten.gelu_, torch.ops.mkldnn._linear_pointwise, torch.ops.mkl._mkl_linear
    return {
        "try 3: addmm + gelu_ (shipped)": lambda: gelu_(F.linear(x, w, b)),
        "try 3: oneDNN linear with GELU fused": lambda: onednn(x, w, b, "gelu", [], "none"),
        "try 3: MKL packed weights (then gelu_)": lambda: gelu_(mkl(x, packed, w, b, N)),
    }


def peak_gflops() -> float:
    a, c = torch.randn(2048, 2048), torch.empty(2048, 2048)
    torch.mm(a, a, out=c)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        torch.mm(a, a, out=c)
        runs += 1
    return 2 * 2048**3 * runs / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="interleaved runs of every row")
    ap.add_argument("--linear", action="store_true", help="time try 3 (the linear layer) instead")
    args = ap.parse_args()
    rows = linear_rows() if args.linear else attention_rows()
    flops = 2 * N * 768 * 3072 if args.linear else N * H * (2 * W + 1) * DH * 4  # exact band FLOPs
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        print(f"fp32 matmul peak before: {peak_gflops():.0f} GFLOP/s")
        for f in rows.values():
            f()
        for _ in range(args.reps):
            for name, f in rows.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        print(f"fp32 matmul peak after: {peak_gflops():.0f} GFLOP/s")
    for name, t in times.items():
        best, med = min(t), sorted(t)[len(t) // 2]
        rate = flops / best / 1e9
        print(f"{name:46s} min {best * 1e3:7.1f} ms  median {med * 1e3:7.1f} ms  {rate:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
