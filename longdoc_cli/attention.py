"""Longformer attention as pure tensor functions.

Units: ``window`` is always the **one-sided** window w (query i sees keys i + d*k for |k| <= w);
Hugging Face's ``attention_window`` is the two-sided width 2*w. ``dilation`` is d >= 1, per head.

Masks are booleans with one meaning each: ``attention_mask`` True = real token (False = padding),
``global_mask`` True = global token.

Semantics (Hugging Face's, the spec in :func:`reference_attention`):
- a local (non-global) query row takes one softmax over the band keys united with the global keys,
  each key counted once, padded keys excluded;
- a global query row uses the global projections and sees every real token;
- padded query rows are zeros (never NaN).

Kernels: on CUDA the local rows go through compiled FlexAttention with a block-sparse mask built once
per batch (:func:`longformer_block_mask`, :func:`flex_local_attention`); elsewhere, and with attention
dropout, through banded scaled-dot-product attention over query blocks (:func:`_band`, and
:func:`_band_views` for CPU inference). Every fast path here is tested equal to
:func:`reference_attention`, the only O(n^2) function.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# The spec: one predicate and a dense masked attention (tests and short references only).


def band_predicate(i: Tensor, j: Tensor, window: Tensor | int, dilation: Tensor | int) -> Tensor:
    """True where query i may see key j through the (dilated) sliding window."""
    diff = j - i
    return (diff.abs() <= window * dilation) & (diff.remainder(dilation) == 0)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v over ``allowed`` keys in fp32; rows with no key give 0."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor,
    k_global: Tensor,
    v_global: Tensor,
    *,
    window: int,
    dilation: Sequence[int] | int = 1,
    attention_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
) -> Tensor:
    """Dense O(n^2) Longformer attention: the specification every fast path must equal.

    All projections are (B, H, n, Dh); the result is (B, H, n, Dh).
    """
    B, H, n, _ = q.shape
    attention_mask = _default_mask(attention_mask, B, n, True, q.device)
    global_mask = _default_mask(global_mask, B, n, False, q.device) & attention_mask
    dil = torch.as_tensor(_per_head(dilation, H), device=q.device)
    idx = torch.arange(n, device=q.device)
    band = band_predicate(idx[:, None], idx[None, :], window, dil[:, None, None])  # (H, n, n)
    real_key = attention_mask[:, None, None, :]  # (B, 1, 1, n)
    local_ok = (band[None] | global_mask[:, None, None, :]) & real_key  # (B, H, n, n)
    out_local = _masked_attention(q, k, v, local_ok)
    out_global = _masked_attention(q_global, k_global, v_global, real_key.expand(B, H, n, n))
    out = torch.where(global_mask[:, None, :, None], out_global, out_local)
    return out * attention_mask[:, None, :, None]


# ----------------------------------------------------------------------------------------------
# Fast paths: banded local attention (O(n * w)), dilation by interleaving, global rows.


def global_indices(global_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the global tokens, padded to the batch maximum G.

    Returns ``index`` (B, G) long and ``valid`` (B, G) bool. Computed once per forward pass,
    so layers never call ``nonzero``.
    """
    counts = global_mask.sum(dim=1)
    G = int(counts.max()) if global_mask.numel() else 0
    # Stable sort puts global positions first, in order.
    order = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)
    index = order[:, :G]
    valid = torch.arange(G, device=global_mask.device)[None, :] < counts[:, None]
    return index, valid


def _global_mask(attention_mask: Tensor, global_index: Tensor | None, global_valid: Tensor | None) -> Tensor:
    """(B, n) bool: True at the real global rows ``global_index`` (:func:`global_indices`) marks."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    if global_index is not None and global_index.shape[1] > 0:
        mask.scatter_(1, global_index, global_valid)
    return mask


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, n, Dh), index (B, G) -> (B, H, G, Dh)."""
    B, H, _, Dh = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], Dh))


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilation: Sequence[int] | int = 1,
    attention_mask: Tensor | None = None,
    global_index: Tensor | None = None,
    global_valid: Tensor | None = None,
    dropout_p: float = 0.0,
    block: int | None = None,
    kernel: str = "auto",
    block_mask=None,
    flex_attention=None,
    flex_options: dict[str, Any] | None = None,
    band_mask: Tensor | None = None,
) -> Tensor:
    """Banded (and per-head dilated) attention of the local rows, with the global keys joined in.

    q, k, v: (B, H, n, Dh) from the local projections. ``global_index``/``global_valid`` come from
    :func:`global_indices`. Returns (B, H, n, Dh): padded rows are 0; the rows of global tokens hold
    their local result, which the caller replaces with :func:`global_attention`.
    Time and memory O(n * (w + G)); no (n, n) tensor is built.
    ``kernel``: "auto" (:func:`choose_kernel`; "band" without ``flex_attention``), "flex" or "band";
    ``block_mask`` is the flex mask of this batch (:func:`longformer_block_mask`), built here when
    not given; ``flex_attention``/``flex_options``: see :func:`flex_local_attention`. ``band_mask``:
    :func:`short_band_mask` of this batch, used where :func:`dense_band_applies` (built here if None).
    """
    B, H, n, Dh = q.shape
    attention_mask = _default_mask(attention_mask, B, n, True, q.device)
    if kernel == "auto":
        kernel = choose_kernel(q.device, dropout_p, n, window) if flex_attention is not None else "band"
    if kernel not in ("band", "flex"):
        raise ValueError(f"kernel must be auto, band or flex, not {kernel!r}")
    if kernel == "flex":
        if flex_attention is None:
            raise ValueError("kernel='flex' needs flex_attention (runtime.compiled_flex(device_type))")
        if block_mask is None:
            tile = int((flex_options or {}).get("tile", 0)) or None
            block_mask = longformer_block_mask(
                attention_mask, _global_mask(attention_mask, global_index, global_valid), window=window,
                dilation=dilation, block=tile,
            )  # fmt: skip
        return flex_local_attention(
            q, k, v, block_mask, attention_mask, flex_attention=flex_attention, options=flex_options
        )
    dilations = _per_head(dilation, H)
    if n <= window + 1 and max(dilations) == 1:
        return _dense_in_band(q, k, v, attention_mask, dropout_p)
    if dense_band_applies(n, window, dilations, q.device):
        return _dense_banded(
            q, k, v, window, attention_mask, global_index, global_valid, dropout_p, band_mask
        )
    band_key = attention_mask.clone()
    g_keys = g_values = None
    if global_index is not None and global_index.shape[1] > 0:
        # Global keys join every local row's softmax once: out of the band, in front of it.
        band_key.scatter_(1, global_index, ~global_valid & band_key.gather(1, global_index))
        g_keys, g_values = _gather_rows(k, global_index), _gather_rows(v, global_index)
    groups: dict[int, list[int]] = {}
    for head, d in enumerate(dilations):
        groups.setdefault(d, []).append(head)

    def run(heads: list[int] | None, d: int) -> Tensor:
        sel = (lambda t: t) if heads is None else (lambda t: t[:, heads])
        gk = None if g_keys is None else sel(g_keys)
        gv = None if g_values is None else sel(g_values)
        return _dilated_band(
            sel(q), sel(k), sel(v), window, d, attention_mask, band_key, gk, gv, global_valid,
            dropout_p, block,
        )  # fmt: skip

    if len(groups) == 1:
        return run(None, dilations[0])
    out = q.new_empty(B, H, n, Dh)
    for d, heads in groups.items():
        out[:, heads] = run(heads, d)
    return out


def _dilated_band(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    dilation: int,
    query_ok: Tensor,
    key_ok: Tensor,
    g_keys: Tensor | None,
    g_values: Tensor | None,
    g_valid: Tensor | None,
    dropout_p: float,
    block: int | None,
) -> Tensor:
    """Dilation d as d interleaved sequences: keys i + d*k all share i mod d."""
    if dilation == 1:
        if _no_grad_cpu(q, k, v, dropout_p) and q.shape[2] > window + 1:
            return _band_views(q, k, v, window, query_ok, key_ok, g_keys, g_values, g_valid, block)
        return _band(q, k, v, window, query_ok, key_ok, g_keys, g_values, g_valid, dropout_p, block)
    B, H, n, Dh = q.shape
    d = dilation
    m = -(-n // d)
    pad = m * d - n

    def split(t: Tensor) -> Tensor:  # (B, H, n, Dh) -> (B*d, H, m, Dh)
        t = F.pad(t, (0, 0, 0, pad)).view(B, H, m, d, Dh)
        return t.permute(0, 3, 1, 2, 4).reshape(B * d, H, m, Dh)

    def split_mask(t: Tensor) -> Tensor:  # (B, n) -> (B*d, m)
        return F.pad(t, (0, pad), value=False).view(B, m, d).transpose(1, 2).reshape(B * d, m)

    def repeat(t: Tensor | None) -> Tensor | None:  # (B, ...) -> (B*d, ...)
        return None if t is None else t.repeat_interleave(d, dim=0)

    out = _band(
        split(q), split(k), split(v), window, split_mask(query_ok), split_mask(key_ok),
        repeat(g_keys), repeat(g_values), repeat(g_valid), dropout_p, block,
    )  # fmt: skip
    # (B*d, H, m, Dh) -> (B, H, m, d, Dh) -> (B, H, n, Dh)
    out = out.view(B, d, H, m, Dh).permute(0, 2, 3, 1, 4).reshape(B, H, m * d, Dh)
    return out[:, :, :n]


def _band(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    query_ok: Tensor,
    key_ok: Tensor,
    g_keys: Tensor | None,
    g_values: Tensor | None,
    g_valid: Tensor | None,
    dropout_p: float,
    block: int | None,
) -> Tensor:
    """Undilated sliding window: query i sees band keys j (|i-j| <= w, ``key_ok``) and the globals.

    Queries are cut into blocks of b; block s sees the b + 2w keys [s*b - w, s*b + b + w) of the
    padded keys (an unfolded view) plus the G global keys. Chunks of blocks are copied into one
    (blocks, H, G + b + 2w, Dh) tensor each and run through one fused scaled-dot-product call with a
    boolean mask; chunks keep that copy within ``_CHUNK_ELEMENTS`` (memory O(n d) in all, not
    O(n d (b + 2w) / b)). Rows of ``~query_ok`` are unmasked (no NaN) and zeroed.
    """
    B, H, n, Dh = q.shape
    w = window
    G = 0 if g_keys is None else g_keys.shape[2]
    if n <= w + 1:
        return _dense_short(q, k, v, query_ok, key_ok, g_keys, g_values, g_valid, dropout_p)
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    b = block or _block_size(w, n, backward)
    nb = -(-n // b)
    L = b + 2 * w  # band keys per block
    right = nb * b - n + w
    k_pad, v_pad = F.pad(k, (0, 0, w, right)), F.pad(v, (0, 0, w, right))  # (B, H, w + nb*b + w, Dh)
    q_pad = F.pad(q, (0, 0, 0, nb * b - n)) if nb * b > n else q  # (B, H, nb*b, Dh)

    r = torch.arange(b, device=q.device)[:, None]
    c = torch.arange(L, device=q.device)[None, :]
    in_band = (c >= r) & (c <= r + 2 * w)  # (b, L): key s*b - w + c within w of query s*b + r
    band_ok = F.pad(key_ok, (w, right), value=False).unfold(1, L, b)  # (B, nb, L)
    mask = torch.empty(B, nb, b, G + L, dtype=torch.bool, device=q.device)  # globals first, then band
    mask[..., G:] = in_band & band_ok[:, :, None, :]
    if G:
        mask[..., :G] = g_valid[:, None, None, :]
    q_ok = F.pad(query_ok, (0, nb * b - n), value=False).view(B, nb, b, 1)
    mask |= ~q_ok  # padded rows see everything: finite, and zeroed below

    def keys(t: Tensor, g: Tensor | None, s0: int, s1: int) -> Tensor:  # -> (B*cb, H, G + L, Dh)
        # One copy: the globals and the unfolded band of blocks s0..s1-1 written in place (no cat).
        out = t.new_empty(B, s1 - s0, H, G + L, Dh)
        out[:, :, :, G:] = t[:, :, s0 * b : s1 * b + 2 * w].unfold(2, L, b).permute(0, 2, 1, 4, 3)
        if g is not None:
            out[:, :, :, :G] = g[:, None]
        return out.view(-1, H, G + L, Dh)

    chunk = max(1, _CHUNK_ELEMENTS // (B * H * (G + L) * Dh))  # blocks per call
    out = q.new_empty(B, H, nb * b, Dh)  # each chunk's result is copied straight into place
    for s0 in range(0, nb, chunk):
        s1 = min(nb, s0 + chunk)
        qb = q_pad[:, :, s0 * b : s1 * b].view(B, H, s1 - s0, b, Dh).transpose(1, 2)
        qb = qb.reshape(-1, H, b, Dh)  # (B*cb, H, b, Dh)
        part = _sdpa(
            qb, keys(k_pad, g_keys, s0, s1), keys(v_pad, g_values, s0, s1),
            mask[:, s0:s1].reshape(-1, 1, b, G + L), dropout_p,
        )  # (B*cb, H, b, Dh)  # fmt: skip
        out.view(B, H, nb, b, Dh)[:, :, s0:s1] = part.view(B, s1 - s0, H, b, Dh).transpose(1, 2)
    return out[:, :, :n] * query_ok[:, None, :, None]


def _no_grad_cpu(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not needs_grad and dropout_p == 0.0 and q.device.type == "cpu"


def _band_views(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    query_ok: Tensor,
    key_ok: Tensor,
    g_keys: Tensor | None,
    g_values: Tensor | None,
    g_valid: Tensor | None,
    block: int | None,
) -> Tensor:
    """:func:`_band` for inference on the CPU, with no copy of the band keys.

    The CPU flash kernel reads strided inputs, so every block's b + 2w band keys are an unfolded
    *view* of the (token-major) keys, and all blocks go through one call. The global keys, which
    cannot join such a view, get their own small softmax, merged with the band's through the
    log-sum-exp both return: softmax over (band U globals) = weighted sum of the two. The kernel's
    log-sum-exp has no gradient, hence inference only. Sequences of a batch are laid end to end so
    that (batch, block) is one strided dimension; keys across a boundary are masked out.
    """
    B, H, n, Dh = q.shape
    w = window
    b = block or _block_size(w, n, dtype=q.dtype)
    nb = -(-n // b)
    N = nb * b  # per-sequence length padded to whole blocks
    L = b + 2 * w

    def flat(t: Tensor) -> Tensor:  # (B, H, n, Dh) view of token-major data -> (B*N, H, Dh)
        t = t.transpose(1, 2)  # (B, n, H, Dh), contiguous when it comes from a projection
        if n != N:
            t = F.pad(t, (0, 0, 0, 0, 0, N - n))
        return t.reshape(B * N, H, Dh)

    def padded(t: Tensor) -> Tensor:  # (B, H, n, Dh) -> (w + B*N + w, H, Dh), zeros around the tokens
        # One write per element (F.pad of flat() would zero-fill the whole buffer, then copy into it).
        out = t.new_empty(w + B * N + w, H, Dh)
        out[:w].zero_()
        out[w + B * N :].zero_()
        body = out[w : w + B * N].view(B, N, H, Dh)
        body[:, :n].copy_(t.transpose(1, 2))
        body[:, n:].zero_()
        return out

    kf, vf = padded(k), padded(v)
    kb = kf.unfold(0, L, b).permute(0, 1, 3, 2)  # (B*nb, H, L, Dh): a view, overlapping blocks
    vb = vf.unfold(0, L, b).permute(0, 1, 3, 2)
    qb = flat(q).view(B * nb, b, H, Dh).transpose(1, 2)  # (B*nb, H, b, Dh) view

    key_flat = F.pad(F.pad(key_ok, (0, N - n), value=False).reshape(-1), (w, w), value=False)
    batch_flat = F.pad(torch.arange(B, device=q.device).repeat_interleave(N), (w, w), value=-1)
    block_batch = torch.arange(B * nb, device=q.device) // nb  # (B*nb,)
    band_ok = key_flat.unfold(0, L, b) & (batch_flat.unfold(0, L, b) == block_batch[:, None])  # (B*nb, L)
    r = torch.arange(b, device=q.device)[:, None]
    c = torch.arange(L, device=q.device)[None, :]
    in_band = (c >= r) & (c <= r + 2 * w)  # (b, L)
    zero, minus_inf = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
    # Additive float mask (B*nb, b, L) written in one pass: the band's shape plus each block's keys.
    mask = torch.add(torch.where(in_band, zero, minus_inf), torch.where(band_ok, zero, minus_inf)[:, None, :])
    # Rows that are padding or global see everything (finite; discarded or replaced by the caller).
    row_ok = F.pad(query_ok & key_ok, (0, N - n), value=False).view(-1)
    mask.view(-1, L).index_fill_(0, (~row_ok).nonzero().view(-1), 0.0)  # only those few rows
    out, lse = _flash_cpu(qb, kb, vb, mask[:, None])  # (B*nb, H, b, Dh), (B*nb, H, b)
    # A fresh token-major copy (the caller's final reshape is then free); updated in place below.
    out = out.view(B, nb, H, b, Dh).transpose(2, 3).reshape(B, N, H, Dh)[:, :n].transpose(1, 2)
    if g_keys is not None and g_keys.shape[2] > 0:
        lse = lse.view(B, nb, H, b).transpose(1, 2).reshape(B, H, N)[:, :, :n, None]  # (B, H, n, 1)
        scores = _token_major_scores(q, g_keys) / math.sqrt(Dh)  # (B, H, n, G)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = scores.to(acc).masked_fill(~g_valid[:, None, None, :], float("-inf"))
        total = torch.logaddexp(lse.to(acc), torch.logsumexp(scores, dim=-1, keepdim=True))
        probs = torch.exp(scores - total).to(v.dtype)  # (B, H, n, G)
        out.mul_(torch.exp(lse - total).to(out.dtype))
        if g_keys.shape[2] <= _FEW_GLOBALS:  # broadcast multiply-adds: a (n, 1) x (1, Dh) bmm is slow
            for j in range(g_keys.shape[2]):
                out.addcmul_(probs[..., j : j + 1], g_values[:, :, j : j + 1])
        else:
            out.add_(torch.matmul(probs, g_values))  # (B, H, n, Dh)
    return out if bool(query_ok.all()) else out.mul_(query_ok[:, None, :, None])


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The CPU flash kernel over blocks (dim 0): output (blocks, H, b, Dh), log-sum-exp (blocks, H, b).

    In bf16/fp16 the kernel packs K and V for its AMX GEMMs into buffers the size of the *unfolded*
    band keys, (b + 2w) / b times K and V (two 126 MB buffers per layer at n = 16384, b = 128); calls
    of at most ``_PACK_BYTES`` of band keys bound them, at the cost of one copy of the output."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    blocks, H, L, Dh = k.shape
    step = max(1, _PACK_BYTES // (H * L * Dh * k.element_size()))
    if q.dtype not in (torch.bfloat16, torch.float16) or step >= blocks:
        return flash(q, k, v, 0.0, False, attn_mask=mask)
    b = q.shape[2]
    out = q.new_empty(blocks, b, H, Dh)  # the layout of the kernel's own output
    lse = []
    for s in range(0, blocks, step):
        part, part_lse = flash(q[s : s + step], k[s : s + step], v[s : s + step], 0.0, False,
                               attn_mask=mask[s : s + step])  # fmt: skip
        out[s : s + step].copy_(part.transpose(1, 2))
        lse.append(part_lse)
    return out.transpose(1, 2), torch.cat(lse)


def _token_major_scores(q: Tensor, g_keys: Tensor) -> Tensor:
    """q (B, H, n, Dh) . g_keys (B, H, G, Dh) -> (B, H, n, G) as one GEMM on the token-major rows of
    q: (B, n, H*Dh) @ a block-diagonal (H*Dh, H*G) of the global keys. Batched per head instead, the
    matmul of the strided head views is a GEMV per head and, in bf16, first copies q (7 ms per layer
    at n = 16384); the H-fold zeros cost O(n H G d) FLOPs, small beside the band's O(n w d)."""
    B, H, n, Dh = q.shape
    G = g_keys.shape[2]
    diag = g_keys.new_zeros(B, H, Dh, H, G)
    diag.diagonal(dim1=1, dim2=3).copy_(g_keys.permute(0, 3, 2, 1))  # (B, Dh, G, H) view of the blocks
    rows = q.transpose(1, 2).reshape(B, n, H * Dh)  # a view when q is a head view of a projection
    return torch.matmul(rows, diag.view(B, H * Dh, H * G)).view(B, n, H, G).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Fused path (CUDA): FlexAttention with a block-sparse mask built once per batch


FLEX_BLOCK = 128  # FlexAttention's block: the mask is stored per (128 queries, 128 keys) tile
# Kernel tiles of 64 x 64 inside the 128-tiles of the mask. Measured on an H200 (torch 2.11, base
# layer, n = 16384, bf16; benchmarks/gpu_kernels.py): 0.30 ms against 2.08 ms with the default
# choice, whose large tiles spend their time evaluating the mask's loads; head-major copies of q, k, v
# cut the whole base model from 19.6 to 16.1 ms. LONGDOC_FLEX_OPTIONS overrides both.
CUDA_FLEX_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}


def choose_kernel(device: torch.device, dropout_p: float, n: int, window: int, prefer: str = "auto") -> str:
    """Which local-attention kernel runs: ``"flex"`` (compiled FlexAttention, CUDA, no attention
    dropout) or ``"band"`` (:func:`local_attention`'s own kernels). ``prefer="band"`` forces the
    latter; ``"flex"`` also allows FlexAttention on the CPU (compiled, inference)."""
    if prefer not in ("auto", "band", "flex"):
        raise ValueError(f"prefer must be auto, band or flex, not {prefer!r}")
    choice = prefer
    if choice == "band" or dropout_p > 0 or n <= window + 1 or _flex_module() is None:
        return "band"
    return "flex" if choice == "flex" or device.type == "cuda" else "band"


def longformer_block_mask(
    attention_mask: Tensor,
    global_mask: Tensor,
    *,
    window: int,
    dilation: Sequence[int] | int = 1,
    block: int | None = None,
):
    """FlexAttention ``BlockMask`` of the local rows: (band | global key) & real key.

    attention_mask, global_mask: (B, n) bool. The sequence is padded to N = whole blocks. A tile is
    *full* when every (query, key) in it is allowed (band interior, all keys real, dilation 1) and
    runs without calling the mask; *partial* tiles call :func:`band_predicate` per element. The tile
    lists are computed from block-level bounds, O((n / block)^2) booleans (64 K at n = 32768), never
    an (n, n) tensor. Build it once per batch: every layer with the same window and dilation reuses it.
    """
    fa = _flex_module()
    block = block or FLEX_BLOCK
    B, n = attention_mask.shape
    device = attention_mask.device
    N = -(-n // block) * block
    nb = N // block
    key_ok = F.pad(attention_mask.bool(), (0, N - n), value=False)  # (B, N)
    is_global = F.pad(global_mask.bool() & attention_mask.bool(), (0, N - n), value=False)
    values = _per_head(dilation, 1 if isinstance(dilation, int) else len(dilation))
    per_head = len(set(values)) > 1  # else one mask serves every head
    dil = torch.tensor(values if per_head else values[:1], device=device)  # (Hm,): Hm = H or 1
    # Window and dilation enter the mask as tensors, not Python ints: the compiled kernel takes them
    # as inputs, so layers with other windows reuse it instead of compiling (and recompiling) anew.
    win, d0 = torch.tensor(window, device=device), dil[0]

    if per_head:

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (band_predicate(q, kv, win, dil[h]) | is_global[b, kv]) & key_ok[b, kv]

    elif values[0] == 1:

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (((kv - q).abs() <= win) | is_global[b, kv]) & key_ok[b, kv]

    else:

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (band_predicate(q, kv, win, d0) | is_global[b, kv]) & key_ok[b, kv]

    # Tile (i, j): |kv - q| spans [|j - i| * block - (block - 1), |j - i| * block + (block - 1)].
    blocks = torch.arange(nb, device=device)
    off = (blocks[None, :] - blocks[:, None]).abs()  # (nb, nb)
    reach = (window * dil)[:, None, None]  # (Hm, 1, 1): farthest band key
    band_any = (off * block - (block - 1)).clamp(min=0) <= reach  # (Hm, nb, nb), conservative for d > 1
    band_full = (off * block + (block - 1) <= reach) & (dil == 1)[:, None, None]
    tiles = key_ok.view(B, nb, block)
    any_real, all_real = tiles.any(-1), tiles.all(-1)  # (B, nb)
    has_global = is_global.view(B, nb, block).any(-1)
    allowed = (band_any[None] | has_global[:, None, None, :]) & any_real[:, None, None, :]  # (B, Hm, nb, nb)
    full = band_full[None] & all_real[:, None, None, :]
    partial = allowed & ~full

    def lists(sel: Tensor) -> tuple[Tensor, Tensor]:  # -> counts (B, Hm, nb), indices (B, Hm, nb, nb)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        return sel.sum(-1).to(torch.int32), order.to(torch.int32)

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return fa.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(N, N),
        compute_q_blocks=torch.is_grad_enabled(),  # the transposed lists serve the backward pass only
    )  # fmt: skip


def flex_local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask,
    attention_mask: Tensor,
    *,
    flex_attention,
    options: dict[str, Any] | None = None,
) -> Tensor:
    """:func:`local_attention` through FlexAttention with a mask from :func:`longformer_block_mask`.

    q, k, v: (B, H, n, Dh) -> (B, H, n, Dh); padded rows are 0, global rows hold their local result.
    ``flex_attention``: torch's function, compiled (fused, block-sparse; runtime.compiled_flex) or
    eager; ``options``: kernel options over :data:`CUDA_FLEX_OPTIONS` (also ``contiguous``).
    """
    B, H, n, Dh = q.shape
    N = block_mask.seq_lengths[0]
    options = {**(CUDA_FLEX_OPTIONS if q.device.type == "cuda" else {}), **(options or {})}
    contiguous = options.pop("contiguous", True)
    options.pop("tile", None)
    if n != N:  # (B, H, N, Dh), head-major
        q, k, v = (F.pad(t, (0, 0, 0, N - n)) for t in (q, k, v))
    elif contiguous:  # head-major copies of the strided head views
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = flex_attention(q, k, v, block_mask=block_mask, kernel_options=options or None)
    return out[:, :, :n] * attention_mask[:, None, :, None].to(out.dtype)


@functools.cache
def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch without FlexAttention
        return None
    return flex_attention


# Band keys (bytes) per call of the CPU flash kernel in bf16/fp16: bounds its packing buffers.
_PACK_BYTES = 16 << 20

# Tokens of a bf16/fp16 hidden state converted to fp32 at a time for the global rows' scores.
_GLOBAL_CHUNK = 2048

# Up to this many global keys, :func:`_band_views` adds their values one broadcast multiply-add
# each: at n = 16384 with one global the (n, 1) x (1, Dh) bmm took 20 ms of a 65 ms overhead.
_FEW_GLOBALS = 4

# Elements of one chunk's band keys (and as many for the values): 4 M fp32 = 16 MiB each.
_CHUNK_ELEMENTS = 1 << 22


def _dense_short(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_ok: Tensor,
    key_ok: Tensor,
    g_keys: Tensor | None,
    g_values: Tensor | None,
    g_valid: Tensor | None,
    dropout_p: float,
) -> Tensor:
    """The whole sequence fits in one window: every key is in band, so attention is dense."""
    if g_keys is not None:
        k, v = torch.cat([g_keys, k], dim=2), torch.cat([g_values, v], dim=2)
        key_ok = torch.cat([g_valid, key_ok], dim=1)
    key_ok = key_ok | ~key_ok.any(dim=1, keepdim=True)  # an all-padding row stays finite
    out = _sdpa(q, k, v, key_ok[:, None, None, :], dropout_p)
    return out * query_ok[:, None, :, None]


def _dense_in_band(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor, dropout_p: float) -> Tensor:
    """Every key is in every query's band (n <= w + 1, no dilation), the global keys included: one
    dense attention over the real keys, without joining the global keys in front (a copy of k and v
    per layer). On the CPU, a batch without padding runs SDPA unmasked: zero-shot passages (16 x 256
    tokens, bf16, one thread) took 13.0 ms per layer against 19.2 with the joined keys and the mask
    (benchmarks/README.md, "Compiled CPU inference")."""
    if dropout_p == 0.0 and q.device.type == "cpu" and bool(key_ok.all()):
        return F.scaled_dot_product_attention(q, k, v)
    return _dense_short(q, k, v, key_ok, key_ok, None, None, None, dropout_p)


# A short sequence that the band covers for the most part (w + 1 < n <= DENSE_BAND_SPAN * w + 1) runs
# one dense SDPA call with a band mask instead of query blocks, on the CPU: per layer of the default
# model's shape (12 heads of 32, w = 256, one thread), forward + backward of 1 x 512 took 0.52x the
# blocks' time in fp32 and 0.50x in bf16, inference of 4 x 512 0.74x and 0.55x; at n = 4w + 1 the
# blocks won again (benchmarks/short_band_ab.py; benchmarks/README.md, "Short sequences").
DENSE_BAND_SPAN = 2


def dense_band_applies(n: int, window: int, dilation: Sequence[int] | int, device: torch.device) -> bool:
    """Whether :func:`local_attention` runs the local rows of an n-token sequence as one masked dense
    call (:func:`_dense_banded`): on the CPU, w + 1 < n <= DENSE_BAND_SPAN * w + 1, no dilation."""
    dilations = [dilation] if isinstance(dilation, int) else dilation
    return window + 1 < n <= DENSE_BAND_SPAN * window + 1 and max(dilations) == 1 and device.type == "cpu"


def short_band_mask(
    key_ok: Tensor, is_global: Tensor, window: int, dtype: torch.dtype = torch.bool
) -> Tensor:
    """The local rows' mask of a short sequence for one dense call, (B, 1, n, n): query i may see
    key j when |i - j| <= w or j is global, and j is real. A row with no such key (padding) sees
    every key, so it stays finite (the caller zeroes it). ``dtype`` bool: True = allowed; a float
    dtype: the additive form, 0 where allowed and -inf elsewhere, which SDPA takes as it is (a boolean
    mask it converts to that, once per call). key_ok, is_global: (B, n) bool. When every row has the
    same padding and globals (a classification batch without padding) the mask is (1, 1, n, n),
    broadcast over the batch: one n x n mask read by every row, not B copies; on the CPU that mask
    is cached (:func:`_one_band_mask`): shared, never to be written to."""
    if key_ok.shape[0] > 1 and bool((key_ok == key_ok[:1]).all() & (is_global == is_global[:1]).all()):
        key_ok, is_global = key_ok[:1], is_global[:1]
    if key_ok.shape[0] == 1 and key_ok.device.type == "cpu":
        rows = (key_ok.to(torch.bool).numpy().tobytes(), is_global.to(torch.bool).numpy().tobytes())
        return _one_band_mask(*rows, window, dtype)
    return _band_mask(key_ok, is_global, window, dtype)


@functools.lru_cache(maxsize=4)
def _one_band_mask(key_ok: bytes, is_global: bytes, window: int, dtype: torch.dtype) -> Tensor:
    """:func:`short_band_mask` of one CPU row (its key_ok and is_global as bytes), built once: a
    training run or a corpus of n-token windows with the same globals and no padding (every step
    of a 512-token fine-tune) reuses it instead of building the n x n mask in every forward pass
    (six n x n passes, and a fresh 1 MB of pages at n = 512 in fp32). Built outside inference mode,
    so that autograd may save it for a backward pass."""
    with torch.inference_mode(False):
        ok = torch.frombuffer(bytearray(key_ok), dtype=torch.bool)[None]
        glob = torch.frombuffer(bytearray(is_global), dtype=torch.bool)[None]
        return _band_mask(ok, glob, window, dtype)


def _band_mask(key_ok: Tensor, is_global: Tensor, window: int, dtype: torch.dtype) -> Tensor:
    """:func:`short_band_mask`, built: (B, 1, n, n)."""
    n = key_ok.shape[1]
    pos = torch.arange(n, device=key_ok.device)
    allowed = ((pos[:, None] - pos[None, :]).abs() <= window)[None] | is_global[:, None, :]  # (B, n, n)
    allowed = allowed & key_ok[:, None, :]
    allowed = (allowed | ~allowed.any(dim=-1, keepdim=True))[:, None]  # (B, 1, n, n)
    return allowed if dtype == torch.bool else _additive(allowed, dtype)


def _dense_banded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    key_ok: Tensor,
    global_index: Tensor | None,
    global_valid: Tensor | None,
    dropout_p: float,
    band_mask: Tensor | None = None,
) -> Tensor:
    """Local rows of a short sequence (n <= DENSE_BAND_SPAN * w + 1, no dilation) in one masked
    dense call: a row sees the keys of its band and the global keys, padded keys excluded. The mask
    is (B, n, n) with n <= 2w + 1, no larger than the band's own (n, 2w + 1) footprint;
    ``band_mask`` is :func:`short_band_mask` of this batch when the caller built it once for every
    layer (additive, in q's dtype), else it is built here."""
    if band_mask is None:
        band_mask = short_band_mask(key_ok, _global_mask(key_ok, global_index, global_valid), window)
    out = _sdpa(q, k, v, band_mask, dropout_p)
    if bool(key_ok.all()):  # nothing to zero: no multiply (and none in the backward pass)
        return out
    return out * key_ok[:, None, :, None]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout_p: float) -> Tensor:
    """Scaled-dot-product attention over the ``allowed`` keys (boolean, or additive 0 / -inf;
    broadcast; None: every key). With attention dropout on the CPU it runs
    :func:`attention_with_dropout`, since SDPA then takes its unfused path and F.dropout's
    ``bernoulli_`` took 34% of a training step of the default model (2 x 4096 tokens). With autograd
    on bf16 CPU tensors it runs :class:`_FlashFp32Backward` (its backward pass in fp32)."""
    if dropout_p > 0 and q.device.type == "cpu":
        return attention_with_dropout(q, k, v, allowed, dropout_p)
    if _fp32_backward_applies(q, k, v, dropout_p):
        # A boolean mask additive in q's dtype, as the stock call converts it (the backward's fp32
        # copy is made there and then, not kept): no more memory saved for the backward than stock.
        mask = _additive(allowed, q.dtype) if allowed is not None and allowed.dtype == torch.bool else allowed
        return _FlashFp32Backward.apply(q, k, v, mask, None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def band_mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`short_band_mask`'s additive mask is built in for attention over ``dtype``
    inputs: fp32 for bf16 with autograd (what :class:`_FlashFp32Backward` reads both ways), else
    ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 and torch.is_grad_enabled() else dtype


def _fp32_backward_applies(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """bf16 CPU attention with autograd and no dropout, inputs the CPU flash kernel takes as they
    are (last dimension contiguous): where :class:`_FlashFp32Backward` runs."""
    return (
        dropout_p == 0.0
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.dim() == 4
        and all(t.stride(-1) == 1 for t in (q, k, v))
    )


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = allowed) as the additive 0 / -inf one SDPA reads, in ``dtype``."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


class _FlashFp32Backward(torch.autograd.Function):
    """The CPU flash kernel with bf16 inputs: the forward pass in bf16 (its fp32 log-sum-exp kept),
    the backward pass in fp32 (the saved bf16 inputs, output and incoming gradient converted, the
    gradients converted back to bf16). The kernel's bf16 backward is its slow half, while its bf16
    forward is about twice as fast as the fp32 one: one layer's local attention of the default
    model's shape (12 heads of 32, w = 256, one global token), forward + backward, one thread, took
    0.87x the stock time at 1 x 512 tokens, 0.71x at 4 x 512, 0.72x / 0.78x at 1024 / 4096 tokens,
    with gradients closer to float64 (benchmarks/bf16_backward_ab.py; benchmarks/README.md, "bf16
    attention's backward in fp32").
    ``mask``: additive (fp32, or q's dtype: converted to fp32 for the backward) or None; ``scale``:
    SDPA's (None: 1 / sqrt(Dh))."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse, mask = ctx.saved_tensors
        fp32 = (t.float() for t in (grad, q, k, v, out))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *fp32, lse, 0.0, False, attn_mask=None if mask is None else mask.float(), scale=ctx.scale
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, p: float) -> Tensor:
    """softmax(q k^T / sqrt(Dh) over ``allowed`` (boolean, or additive 0 / -inf)) with attention
    dropout p, then @ v: SDPA's math path, with a cheaper mask (:func:`dropout_keep_mask`) applied by
    one ``where``, and the 1/(1-p) scale on the (b x Dh) output instead of the (b x keys)
    probabilities."""
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))  # scale the smaller factor
    scores = scores.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else scores + allowed
    probs = torch.softmax(scores, dim=-1)
    keep, scale = dropout_keep_mask(probs.shape, p, probs.device)
    return torch.matmul(torch.where(keep, probs, 0.0).to(v.dtype), v) * scale


def dropout_keep_mask(shape: Sequence[int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """A boolean keep mask (each element dropped with probability p, rounded to a multiple of
    1/32768) and the scale 1/(1 - p) that keeps expectations. Two draws per 31-bit random integer
    (its low 16 bits and the next 15), from torch's generator (``torch.manual_seed`` applies): on
    the 2-core CPU 324 ms against 658 ms for a boolean ``bernoulli_`` of 75 M elements."""
    k = min(32768, max(0, round(p * 32768)))
    numel = math.prod(shape)
    if k == 0:
        return torch.ones(shape, dtype=torch.bool, device=device), 1.0
    if k == 32768:
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    half = (numel + 1) // 2
    r = torch.empty(half, dtype=torch.int32, device=device).random_()  # uniform on [0, 2^31)
    # Each int32 read as two int16: its low half uniform on [-2^15, 2^15), its high half on [0, 2^15)
    # (the sign bit is 0). One compare against alternating thresholds drops 2k / 65536 and k / 32768.
    low, high = -32768 + 2 * k, k
    pair = (low, high) if sys.byteorder == "little" else (high, low)
    keep = r.view(torch.int16).view(half, 2) >= torch.tensor(pair, dtype=torch.int16, device=device)
    return keep.view(-1)[:numel].view(tuple(shape)), 32768 / (32768 - k)


def _block_size(window: int, n: int, backward: bool = False, dtype: torch.dtype = torch.float32) -> int:
    """Query block b: the band costs (b + 2w) / (2w + 1) of the exact FLOPs; small b adds calls.
    Inference: b = 64, measured fastest at w = 256 on the 2-core CPU (benchmarks/README.md); in bf16
    b = 128 (the CPU flash kernel's bf16 path: one layer's attention at n = 16384 took 142 ms against
    191 ms at b = 64, 5 interleaved runs). With a backward pass (:func:`_band` copies every key into
    (b + 2w) / b blocks, and the backward adds the copies up again) b = w: forward + backward of base
    at n = 4096 took 2.45 s median against 3.07 s at b = 64 (5 interleaved runs each; 2.67 s at
    b = 128)."""
    if backward:
        return max(1, min(max(16, window), n))
    return max(1, min(128 if dtype == torch.bfloat16 else 64, max(16, window), n))


def global_attention(
    q_global: Tensor, k_global: Tensor, v_global: Tensor, attention_mask: Tensor, dropout_p: float = 0.0
) -> Tensor:
    """Global rows: q_global (B, H, G, Dh) against all real keys (B, H, n, Dh) -> (B, H, G, Dh)."""
    acc = torch.promote_types(q_global.dtype, torch.float32)
    scores = torch.matmul(q_global.to(acc), k_global.to(acc).transpose(-1, -2))
    scores = scores / math.sqrt(q_global.shape[-1])
    probs = _global_probs(scores, attention_mask, dropout_p)
    return torch.matmul(probs.to(v_global.dtype), v_global)


def global_attention_from_hidden(
    q_global: Tensor,
    hidden: Tensor,
    key_weight: Tensor,
    key_bias: Tensor | None,
    value_weight: Tensor,
    value_bias: Tensor | None,
    attention_mask: Tensor,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`global_attention` with k_global = hidden W_k^T + b_k (same for v), reassociated.

    (q W_k_h) hidden^T and (P hidden) W_v_h^T cost O(G n d + G d^2) per head instead of the
    O(n d^2) of projecting every token with the global key and value weights.
    q_global: (B, H, G, Dh); hidden: (B, n, d); weights (H*Dh, d). Returns (B, H, G, Dh).
    """
    B, H, G, Dh = q_global.shape
    d = hidden.shape[-1]
    acc = torch.promote_types(q_global.dtype, torch.float32)
    qk = _queries_through_keys(q_global, key_weight).to(acc).reshape(B, H * G, d)  # (B, H*G, d)
    if hidden.dtype == acc:
        scores = torch.matmul(qk, hidden.transpose(1, 2))
    else:  # hidden in acc precision a chunk at a time: no (B, n, d) fp32 copy of a bf16 hidden state
        chunks = hidden.split(_GLOBAL_CHUNK, dim=1)
        scores = torch.cat([torch.matmul(qk, c.to(acc).transpose(1, 2)) for c in chunks], dim=-1)
    scores = scores.view(B, H, G, -1)  # (B, H, G, n)
    if key_bias is not None:  # q . b_k is constant over keys: softmax ignores it, kept for parity
        scores = scores + (q_global.to(acc) * key_bias.to(acc).view(1, H, 1, Dh)).sum(-1, keepdim=True)
    probs = _global_probs(scores / math.sqrt(Dh), attention_mask, dropout_p)
    ph = torch.matmul(probs.to(hidden.dtype).view(B, H * G, -1), hidden)  # (B, H*G, d)
    return _through_values(ph, value_weight, value_bias, H)


def _queries_through_keys(q_global: Tensor, key_weight: Tensor) -> Tensor:
    """(B, H, G, d): each head's global queries times its rows of the key weight (q W_k_h), so that
    their scores against the hidden state are the scores against the global keys (bias aside). One
    bmm per head over the batch's rows: matmul's broadcast over the batch would copy the weight B
    times (and sum its gradient B ways)."""
    B, H, G, Dh = q_global.shape
    d = key_weight.shape[-1]
    qk = torch.bmm(q_global.transpose(0, 1).reshape(H, B * G, Dh), key_weight.view(H, Dh, d))  # (H, B*G, d)
    return qk.view(H, B, G, d).transpose(0, 1)


def _through_values(ph: Tensor, value_weight: Tensor, value_bias: Tensor | None, H: int) -> Tensor:
    """(B, H, G, Dh): the attention-weighted hidden states ``ph`` (B, H*G, d), head h's rows through
    head h's rows of the value weight (P hidden W_v_h^T), plus the bias (rows of P sum to 1, so it
    passes through unchanged)."""
    B, HG, d = ph.shape
    G, Dh = HG // H, value_weight.shape[0] // H
    out = torch.bmm(_heads_first(ph, H), value_weight.view(H, Dh, d).transpose(1, 2)).view(H, B, G, Dh)
    out = out.transpose(0, 1)
    return out if value_bias is None else out + value_bias.view(1, H, 1, Dh)


def _heads_first(t: Tensor, H: int) -> Tensor:
    """(B, H*G, x) rows grouped by head within each batch row -> (H, B*G, x): each head's rows of the
    whole batch together, for one ``bmm`` per head."""
    B, HG, x = t.shape
    return t.view(B, H, HG // H, x).transpose(0, 1).reshape(H, B * (HG // H), x)


class _GlobalRowsWrittenOut(torch.autograd.Function):
    """:func:`global_rows_fused`'s attention of the global rows over the hidden state in fp32 (or
    float64), forward and backward written out: the H*G rows are few, so their scores, softmax and
    weighted sum are a handful of small matmuls, and the backward reuses the saved probabilities (no
    recomputed scores, no zero-filled (B, n, d) gradients of the keys and the values summed, as the
    flash kernel's backward makes them; the hidden state's gradient is one ``baddbmm``). The key
    bias is an input only for its gradient, exactly 0 (the shift q . b_k of a row's scores cancels
    in the softmax). ``real``: (B, n) bool keys a row may see, or None for all."""

    @staticmethod
    def forward(ctx, q_global, hidden, key_weight, key_bias, value_weight, value_bias, real):
        B, H, G, Dh = q_global.shape
        d = hidden.shape[-1]
        qk = _queries_through_keys(q_global, key_weight).reshape(B, H * G, d)  # q W_k per head
        scores = torch.bmm(qk, hidden.transpose(1, 2)).mul_(1 / math.sqrt(Dh))  # (B, H*G, n)
        if real is not None:
            scores.masked_fill_(~real[:, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        ph = torch.bmm(p, hidden)  # P hidden (B, H*G, d)
        out = _through_values(ph, value_weight, value_bias, H)  # (B, H, G, Dh)
        ctx.save_for_backward(hidden, q_global, key_weight, value_weight, qk, p, ph)
        ctx.key_bias = key_bias is not None
        ctx.value_bias = value_bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, q_global, key_weight, value_weight, qk, p, ph = ctx.saved_tensors
        B, H, G, Dh = grad.shape
        d = hidden.shape[-1]
        need = ctx.needs_input_grad
        wk, wv = key_weight.view(H, Dh, d), value_weight.view(H, Dh, d)
        go = grad.transpose(0, 1).reshape(H, B * G, Dh)
        d_wv = _outer_sum(go, _heads_first(ph, H)).view(H * Dh, d) if need[4] else None
        d_bv = grad.sum((0, 2)).reshape(H * Dh) if ctx.value_bias and need[5] else None
        d_ph = torch.bmm(go, wv).view(H, B, G, d).transpose(0, 1).reshape(B, H * G, d)
        d_p = torch.bmm(d_ph, hidden.transpose(1, 2))  # (B, H*G, n)
        d_s = torch._softmax_backward_data(d_p, p, -1, p.dtype).mul_(1 / math.sqrt(Dh))
        d_x = torch.baddbmm(torch.bmm(p.transpose(1, 2), d_ph), d_s.transpose(1, 2), qk) if need[1] else None
        d_q = d_wk = None
        if need[0] or need[2]:
            d_qk = _heads_first(torch.bmm(d_s, hidden), H)  # (H, B*G, d)
            if need[2]:
                d_wk = _outer_sum(q_global.transpose(0, 1).reshape(H, B * G, Dh), d_qk).view(H * Dh, d)
            if need[0]:
                d_q = torch.bmm(d_qk, wk.transpose(1, 2)).view(H, B, G, Dh).transpose(0, 1)
        d_bk = hidden.new_zeros(H * Dh) if ctx.key_bias and need[3] else None
        return d_q, d_x, d_wk, d_bk, d_wv, d_bv, None


def _outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """a^T b per head: a (H, r, Dh), b (H, r, d) -> (H, Dh, d). One row (one document with one
    global token) as a broadcast product, not a ``bmm`` with an inner dimension of 1 (one layer's
    global rows, forward + backward, 1 x 512 tokens: 1.21 against 1.26 ms, least of 40)."""
    if a.shape[1] == 1:
        return a.transpose(1, 2) * b
    return torch.bmm(a.transpose(1, 2), b)


def global_rows_fused(
    q_global: Tensor,
    hidden: Tensor,
    key_weight: Tensor,
    key_bias: Tensor | None,
    value_weight: Tensor,
    value_bias: Tensor | None,
    attention_mask: Tensor,
) -> Tensor:
    """:func:`global_attention_from_hidden` (no dropout) with its softmax(q W_k hidden^T / sqrt(Dh))
    hidden fused, for short sequences with autograd (``longformer_attention``), where the global
    rows were a tenth of a bf16 training step of the default model at 512 tokens. In bf16 one fused
    scaled-dot-product call: the H*G rows q W_k (width d) are the queries, the hidden state (B, n,
    d) both keys and values; the CPU flash kernel's forward and backward replace the scores' and
    probabilities' matmuls, the softmax and their backward passes (rounding as the unfused path:
    bf16 inputs, fp32 scores and softmax). Forward + backward of one layer's global rows, one
    global token, 1 x 512 tokens, bf16: 2.2 ms against 3.0 for the matmuls; 4 x 512: 4.7 against
    7.2 (benchmarks/global_rows_ab.py). In fp32 (and float64) :class:`_GlobalRowsWrittenOut`, the
    same attention with its backward written out: 1 x 512 tokens fp32: 1.4 ms against 1.7 for the
    fused call, 4 x 512: 4.1 against 5.5. The key bias's gradient is exactly 0 either way.
    q_global: (B, H, G, Dh); hidden: (B, n, d); weights (H*Dh, d). Returns (B, H, G, Dh)."""
    B, H, G, Dh = q_global.shape
    d = hidden.shape[-1]
    everything = bool(attention_mask.all())
    real = None if everything else attention_mask | ~attention_mask.any(dim=1, keepdim=True)  # no empty row
    if (
        hidden.dtype in (torch.float32, torch.float64)
        and q_global.dtype == hidden.dtype
        and not torch.is_autocast_enabled(hidden.device.type)
    ):
        return _GlobalRowsWrittenOut.apply(
            q_global, hidden, key_weight, key_bias, value_weight, value_bias, real
        )
    qk = _queries_through_keys(q_global, key_weight).reshape(B, 1, H * G, d)
    keys = hidden[:, None]  # (B, 1, n, d)
    # The stock kernel, also in bf16: its bf16 backward at this shape (H*G queries of width d) was
    # faster than _FlashFp32Backward's fp32 one (2.2 against 3.0 ms per layer at 1 x 512 tokens, 5.0
    # against 7.4 at 4 x 512; benchmarks/global_rows_ab.py).
    ph = F.scaled_dot_product_attention(
        qk, keys, keys, attn_mask=None if real is None else real[:, None, None, :], scale=1 / math.sqrt(Dh)
    )  # (B, 1, H*G, d)
    out = _through_values(ph.view(B, H * G, d), value_weight, value_bias, H)
    if key_bias is not None and key_bias.requires_grad:
        out = out + key_bias.sum() * 0.0
    return out


def longformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor,
    hidden: Tensor,
    key_global: tuple[Tensor, Tensor | None],
    value_global: tuple[Tensor, Tensor | None],
    *,
    window: int,
    dilation: Sequence[int] | int = 1,
    attention_mask: Tensor | None,
    global_index: Tensor,
    global_valid: Tensor,
    dropout_p: float = 0.0,
    block: int | None = None,
    kernel: str = "auto",
    block_mask=None,
    flex_attention=None,
    flex_options: dict[str, Any] | None = None,
    band_mask: Tensor | None = None,
) -> Tensor:
    """One layer's whole Longformer self-attention, before the output projection: every row's
    :func:`local_attention` (band, dilation, the global keys joined in once), then the global rows
    replaced by their attention over every real key (:func:`global_attention_from_hidden`). Equals
    :func:`reference_attention` with ``k_global = hidden W_k^T + b_k`` (``v_global`` likewise).

    q, k, v: (B, H, n, Dh) local projections; q_global: (B, H, G, Dh) the global query projection
    of the rows ``global_index`` (B, G), of which ``global_valid`` (B, G) marks the real ones
    (:func:`global_indices`); hidden: (B, n, d) the layer's input; key_global, value_global:
    (weight (H*Dh, d), bias or None) of the global key and value projections. Returns (B, H, n, Dh),
    padded rows 0. ``kernel``, ``block_mask``, ``flex_*``, ``band_mask``: as :func:`local_attention`.
    """
    B, H, n, Dh = q.shape
    attention_mask = _default_mask(attention_mask, B, n, True, q.device)
    out = local_attention(
        q, k, v, window=window, dilation=dilation, attention_mask=attention_mask, global_index=global_index,
        global_valid=global_valid, dropout_p=dropout_p, block=block, kernel=kernel, block_mask=block_mask,
        flex_attention=flex_attention, flex_options=flex_options, band_mask=band_mask,
    )  # (B, H, n, Dh)  # fmt: skip
    G = global_index.shape[1]
    if not G:
        return out
    if dropout_p == 0.0 and torch.is_grad_enabled() and dense_band_applies(n, window, dilation, q.device):
        out_g = global_rows_fused(q_global, hidden, *key_global, *value_global, attention_mask)
    else:
        out_g = global_attention_from_hidden(
            q_global, hidden, *key_global, *value_global, attention_mask, dropout_p=dropout_p
        )  # (B, H, G, Dh)
    rows = global_index[:, None, :, None].expand(B, H, G, Dh)
    out_g = out_g.to(out.dtype)
    all_valid = global_valid.device.type == "cpu" and bool(global_valid.all())  # no sync on CUDA
    if not all_valid:  # the slots past a row's globals keep that row's local result
        out_g = torch.where(global_valid[:, None, :, None], out_g, out.gather(2, rows))
    if torch.is_grad_enabled():  # the attention kernel's backward needs ``out`` unchanged
        # Scattered over the token-major rows, so the result and its gradient keep the layout of the
        # kernel's output (the caller's reshape to (B, n, d) is a view; SDPA's backward gets the
        # token-major gradient BERT's gets).
        tokens = global_index[:, :, None, None].expand(B, G, H, Dh)
        return out.transpose(1, 2).scatter(1, tokens, out_g.transpose(1, 2)).transpose(1, 2)
    # G rows written in place: a scatter copies all n rows (twice in place: 12 + 3 ms per layer at
    # n = 16384 in bf16), as ``out`` is a head view of token-major rows
    batch = torch.arange(B, device=global_index.device)[:, None]
    out.transpose(1, 2)[batch, global_index] = out_g.transpose(1, 2)  # indices are distinct
    return out


def _global_probs(scores: Tensor, attention_mask: Tensor, dropout_p: float) -> Tensor:
    """fp32 softmax over real keys; (B, H, G, n) scores."""
    scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs


# ----------------------------------------------------------------------------------------------
# Small helpers


def _per_head(value: Sequence[int] | int, heads: int) -> list[int]:
    values = [int(value)] * heads if isinstance(value, int) else [int(x) for x in value]
    if len(values) != heads:
        raise ValueError(f"dilation: {len(values)} values given for {heads} heads")
    if min(values) < 1:
        raise ValueError(f"dilation: every value must be >= 1, got {values}")
    return values


def _default_mask(mask: Tensor | None, B: int, n: int, fill: bool, device: torch.device) -> Tensor:
    if mask is None:
        return torch.full((B, n), fill, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)
