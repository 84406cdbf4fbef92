"""Every fast attention path equals the dense reference (values and gradients, float64)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longdoc_cli import attention, runtime
from longdoc_cli.attention import (
    band_predicate,
    global_attention,
    global_attention_from_hidden,
    global_indices,
    local_attention,
    longformer_attention,
    reference_attention,
)
from longdoc_cli.cli import exit_code
from longdoc_cli.model import AttentionMasks

F64 = torch.float64


def make_masks(n: int, pads: list[int], globs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_mask (B, n): the last pads[b] tokens of row b are padding; global_mask (B, n)."""
    B = len(pads)
    am = torch.ones(B, n, dtype=torch.bool)
    gm = torch.zeros(B, n, dtype=torch.bool)
    for b, (p, gs) in enumerate(zip(pads, globs, strict=True)):
        if p:
            am[b, n - p :] = False
        gm[b, gs] = True
    return am, gm


def fast_attention(q, k, v, qg, kg, vg, *, window, dilation, am, gm, block=None):
    """local_attention for every row, global_attention for the global rows (as the model does)."""
    gm = gm & am
    index, valid = global_indices(gm)
    out = local_attention(
        q, k, v, window=window, dilation=dilation, attention_mask=am, global_index=index,
        global_valid=valid, block=block,
    )  # fmt: skip
    B, H, _, Dh = q.shape
    G = index.shape[1]
    if G:
        rows = index[:, None, :, None].expand(B, H, G, Dh)
        out_g = global_attention(qg.gather(2, rows), kg, vg, am)  # (B, H, G, Dh)
        out = out.scatter(2, rows, torch.where(valid[:, None, :, None], out_g, out.gather(2, rows)))
    return out


# (B, H, n, window (one-sided), dilation, pads per row, global positions per row, block)
CASES = {
    "odd-n-no-global": (1, 2, 37, 3, 1, [0], [[]], None),
    "global-first-padded-batch": (2, 4, 37, 3, 1, [0, 5], [[0], [0]], None),
    "global-middle-inside-window": (2, 2, 41, 4, 1, [3, 0], [[20], [17, 19]], None),
    "globals-several-and-at-end": (2, 2, 37, 3, 1, [0, 5], [[0, 10, 36], [2, 31, 35]], None),
    "mostly-padding-row": (3, 2, 37, 3, 1, [0, 30, 36], [[5], [0, 2], [0]], None),
    "all-padding-row": (2, 2, 23, 3, 1, [0, 23], [[4], [0]], None),
    "window-larger-than-n": (2, 2, 9, 12, 1, [0, 4], [[3], []], None),
    "n-equals-window-plus-1": (2, 2, 9, 8, 1, [0, 2], [[8], []], None),
    "window-larger-than-n-no-padding": (2, 2, 9, 12, 1, [0, 0], [[0], [3, 5]], None),
    "n-equals-window-plus-2": (2, 2, 10, 8, 1, [1, 0], [[], [9]], None),
    "dilation-mixed": (2, 4, 53, 4, [1, 2, 3, 1], [0, 7], [[0], [3, 30]], None),
    "dilation-2-all-heads": (2, 2, 47, 3, 2, [0, 6], [[1], []], None),
    "dilation-3-no-global": (1, 3, 50, 2, 3, [4], [[]], None),
    "dilated-window-larger-than-subsequence": (2, 4, 20, 6, [1, 2, 3, 4], [0, 3], [[0], [5, 6]], None),
    "block-1": (2, 2, 29, 3, 1, [0, 4], [[7], []], 1),
    "block-5-dilation": (3, 4, 101, 4, [1, 1, 2, 3], [0, 50, 100], [[0, 1, 2], [3], []], 5),
    "block-7": (2, 2, 64, 5, 1, [0, 9], [[63], [0]], 7),
    "block-larger-than-n": (1, 2, 30, 4, 1, [2], [[0]], 64),
    "n-multiple-of-block": (2, 2, 64, 8, 1, [0, 5], [[0], [3]], 16),
    "n-multiple-of-block-dilated": (1, 2, 64, 8, [1, 2], [0], [[0]], 16),
    "longer-default-block": (1, 2, 300, 16, [1, 3], [11], [[0, 150]], None),
    # more globals than attention._FEW_GLOBALS: the merge runs one matmul instead of multiply-adds
    "many-globals": (2, 2, 61, 4, 1, [0, 7], [[0, 5, 9, 20, 33, 40], [1]], None),
    # w + 1 < n <= 2w + 1: one masked dense call (attention._dense_banded) unless DENSE_BAND_SPAN = 0
    "short-band-n-2w+1-globals-far": (2, 3, 17, 8, 1, [0, 4], [[0, 16], [12]], None),
    "short-band-odd-padding-far-from-real": (3, 2, 23, 11, 1, [0, 19, 22], [[], [0], [0, 1]], None),
}


def random_inputs(B, H, n, Dh=8, seed=0):
    """Six (B, H, n, Dh) projections laid out as the model makes them: head views of (B, n, H, Dh)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, n, H, Dh, dtype=F64, generator=g, requires_grad=True) for _ in range(6)]
    return leaves, [t.transpose(1, 2) for t in leaves]


@pytest.mark.parametrize("span", [0, attention.DENSE_BAND_SPAN], ids=["blocks", "short-dense"])
@pytest.mark.parametrize("chunk_elements", [None, 2000], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fast_paths_equal_reference(case, chunk_elements, span, monkeypatch):
    B, H, n, window, dilation, pads, globs, block = case
    monkeypatch.setattr(attention, "DENSE_BAND_SPAN", span)
    if chunk_elements:  # a few query blocks per fused call
        monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", chunk_elements)
    am, gm = make_masks(n, pads, globs)
    leaves, tensors = random_inputs(B, H, n)
    ref = reference_attention(*tensors, window=window, dilation=dilation, attention_mask=am, global_mask=gm)
    out = fast_attention(*tensors, window=window, dilation=dilation, am=am, gm=gm, block=block)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)

    # padded query rows are exactly zero, never NaN
    assert torch.isfinite(out).all()
    assert (out.transpose(1, 2)[~am] == 0).all()

    upstream = torch.randn_like(out)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), leaves)
    grads = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    names = ["q", "k", "v", "q_global", "k_global", "v_global"]
    for name, g, gr in zip(names, grads, grads_ref, strict=True):
        assert torch.isfinite(g).all(), name
        # A batch row with no real token has no allowed key; the reference's gradient there is NaN
        # (softmax of all -inf), the true gradient 0.
        torch.testing.assert_close(g, gr.nan_to_num(0.0), atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("span", [0, attention.DENSE_BAND_SPAN], ids=["blocks", "short-dense"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_inference_path_equals_reference(case, span, monkeypatch):
    """Without gradients on the CPU, undilated heads take `_band_views` (band keys as strided views,
    globals merged by log-sum-exp), or for a short sequence (n <= span * w + 1, every head undilated)
    one masked dense call: the same values."""
    B, H, n, window, dilation, pads, globs, block = case
    monkeypatch.setattr(attention, "DENSE_BAND_SPAN", span)
    calls = []
    views = attention._band_views
    monkeypatch.setattr(attention, "_band_views", lambda *a, **k: calls.append(1) or views(*a, **k))
    am, gm = make_masks(n, pads, globs)
    _, tensors = random_inputs(B, H, n)
    with torch.no_grad():
        ref = reference_attention(
            *tensors, window=window, dilation=dilation, attention_mask=am, global_mask=gm
        )
        out = fast_attention(*tensors, window=window, dilation=dilation, am=am, gm=gm, block=block)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.isfinite(out).all() and (out.transpose(1, 2)[~am] == 0).all()
    dilations = [dilation] if isinstance(dilation, int) else dilation
    short_dense = max(dilations) == 1 and n <= span * window + 1
    assert bool(calls) == (1 in dilations and n > window + 1 and not short_dense)


@pytest.mark.parametrize("pads", [[0, 0], [0, 3]], ids=["no-padding", "padding"])
def test_short_batch_runs_unmasked_without_padding(pads, monkeypatch):
    """When every key is in band (n <= w + 1), CPU inference without padding runs one unmasked SDPA
    (no joined global keys); with padding the masked dense path: both equal the reference."""
    masked = []
    dense = attention._dense_short
    monkeypatch.setattr(attention, "_dense_short", lambda *a, **k: masked.append(1) or dense(*a, **k))
    n, window = 16, 20
    am, gm = make_masks(n, pads, [[0], [0, 7]])
    _, tensors = random_inputs(2, 3, n)
    with torch.no_grad():
        ref = reference_attention(*tensors, window=window, attention_mask=am, global_mask=gm)
        out = fast_attention(*tensors, window=window, dilation=1, am=am, gm=gm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert bool(masked) == any(pads)


@pytest.mark.parametrize("pack_bytes", [None, 1], ids=["one-call", "call-per-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_in_low_precision(dtype, pack_bytes, monkeypatch):
    """The CPU inference kernel in the model's dtypes, with its default block (128 queries in bf16):
    close to the float64 reference at the dtype's precision; an odd length, padding, globals. In bf16
    the flash kernel may be called on a few blocks at a time (``_PACK_BYTES``): the same result."""
    if pack_bytes is not None:
        monkeypatch.setattr(attention, "_PACK_BYTES", pack_bytes)
    calls = []
    views = attention._band_views
    monkeypatch.setattr(attention, "_band_views", lambda *a, **k: calls.append(1) or views(*a, **k))
    n, window = 701, 128
    am, gm = make_masks(n, [0, 37], [[0], [3, 400]])
    _, tensors = random_inputs(2, 3, n, Dh=16)
    with torch.no_grad():
        ref = reference_attention(*tensors, window=window, attention_mask=am, global_mask=gm)
        out = fast_attention(*(t.to(dtype) for t in tensors), window=window, dilation=1, am=am, gm=gm)
    assert calls and out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_mask_rate_and_scale(p):
    """Both draws of a random integer (even and odd positions: its low 16 bits, its next 15) drop at
    the rate p (to 1/32768), independently; the scale keeps the expectation; the mask follows torch's
    seed; p = 0 and p = 1 are exact."""
    torch.manual_seed(0)
    keep, scale = attention.dropout_keep_mask((1000, 1001), p, torch.device("cpu"))
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    p_eff = round(p * 32768) / 32768
    flat = keep.flatten()
    even, odd = ~flat[0::2][: flat.numel() // 2], ~flat[1::2]
    for part in (even, odd):
        assert abs(part.float().mean().item() - p_eff) < 0.005
    both = (even & odd).float().mean().item()  # independent halves: P(both dropped) = p^2
    assert abs(both - p_eff**2) < 0.005
    assert scale == pytest.approx(1 / (1 - p_eff))
    torch.manual_seed(0)
    assert torch.equal(attention.dropout_keep_mask((1000, 1001), p, torch.device("cpu"))[0], keep)
    assert attention.dropout_keep_mask((3, 4), 0.0, torch.device("cpu"))[0].all()
    none, zero = attention.dropout_keep_mask((3, 4), 1.0, torch.device("cpu"))
    assert not none.any() and zero == 0.0


def test_attention_with_dropout_equals_the_formula(monkeypatch):
    """With a given keep mask: softmax over the allowed keys, dropped entries zeroed, scaled by
    1/(1-p), times v; values and gradients in float64."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=F64, generator=g, requires_grad=True) for _ in range(3))
    allowed = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    allowed[..., 0] = True  # every row has a key
    keep = torch.rand(2, 3, 5, 5, generator=g) > 0.25
    monkeypatch.setattr(attention, "dropout_keep_mask", lambda shape, p, device: (keep, 1 / 0.75))
    out = attention.attention_with_dropout(q, k, v, allowed, 0.25)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~allowed, float("-inf"))
    ref = (torch.softmax(scores, -1) * keep / 0.75) @ v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    up = torch.randn_like(out)
    for g_out, g_ref in zip(torch.autograd.grad((out * up).sum(), [q, k, v]),
                            torch.autograd.grad((ref * up).sum(), [q, k, v]), strict=True):  # fmt: skip
        torch.testing.assert_close(g_out, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["global-first-padded-batch", "window-larger-than-n", "dilation-mixed", "short-band-n-2w+1-globals-far"],
)
def test_training_dropout_path_is_wired(case, monkeypatch):
    """Attention dropout on the CPU goes through attention_with_dropout (banded, short masked dense
    and dense-short paths); with a keep-everything mask it equals the reference."""
    calls = []

    def keep_all(shape, p, device):
        calls.append(p)
        return torch.ones(shape, dtype=torch.bool), 1.0

    monkeypatch.setattr(attention, "dropout_keep_mask", keep_all)
    B, H, n, window, dilation, pads, globs, block = CASES[case]
    am, gm = make_masks(n, pads, globs)
    _, (q, k, v, *_rest) = random_inputs(B, H, n)
    index, valid = global_indices(gm & am)
    out = local_attention(q, k, v, window=window, dilation=dilation, attention_mask=am, global_index=index,
                          global_valid=valid, dropout_p=0.1)  # fmt: skip
    ref = reference_attention(q, k, v, q, k, v, window=window, dilation=dilation, attention_mask=am,
                              global_mask=gm)  # fmt: skip
    local = (~(gm & am))[:, None, :, None]  # rows of global tokens are replaced by the caller
    torch.testing.assert_close(out * local, ref * local, atol=1e-12, rtol=0)
    assert calls and set(calls) == {0.1}


def test_all_padding_row_is_zero_and_finite():
    am, gm = make_masks(17, [17, 17], [[0], []])
    _, (q, k, v, qg, kg, vg) = random_inputs(2, 2, 17)
    for window in (3, 20):  # banded and dense short path
        out = fast_attention(q, k, v, qg, kg, vg, window=window, dilation=1, am=am, gm=gm)
        assert (out == 0).all()
        (gq,) = torch.autograd.grad(out.sum(), [q])
        assert (gq == 0).all()


def test_local_attention_without_masks_equals_reference():
    _, (q, k, v, qg, kg, vg) = random_inputs(2, 3, 45)
    ref = reference_attention(q, k, v, qg, kg, vg, window=5, dilation=[1, 2, 1])
    out = local_attention(q, k, v, window=5, dilation=[1, 2, 1])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_global_attention_from_hidden_equals_projected_keys():
    B, H, G, Dh, n = 2, 4, 3, 5, 19
    d = H * Dh
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, dtype=F64, generator=g, requires_grad=True)

    qg, x = rnd(B, H, G, Dh), rnd(B, n, d)
    wk, bk, wv, bv = rnd(d, d), rnd(d), rnd(d, d), rnd(d)
    am, _ = make_masks(n, [0, 6], [[], []])

    def heads(t):  # (B, n, d) -> (B, H, n, Dh)
        return t.view(B, n, H, Dh).transpose(1, 2)

    ref = global_attention(qg, heads(x @ wk.T + bk), heads(x @ wv.T + bv), am)
    out = global_attention_from_hidden(qg, x, wk, bk, wv, bv, am)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    inputs = [qg, x, wk, bk, wv, bv]
    upstream = torch.randn_like(out)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), inputs)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    for g_out, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g_out, g_ref, atol=1e-10, rtol=0)
    # no biases
    ref = global_attention(qg, heads(x @ wk.T), heads(x @ wv.T), am)
    out = global_attention_from_hidden(qg, x, wk, None, wv, None, am)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pads", [[0, 0], [0, 6], [0, 19]], ids=["no-padding", "padding", "all-padding-row"])
def test_global_rows_fused_equal_projected_keys(pads):
    """The global rows as one fused SDPA call over the hidden state: values and every input's
    gradient equal the projected-keys reference (float64); the key bias gets its exact gradient, 0;
    a row of padding only is finite. In bf16, close to the reference at bf16's precision."""
    B, H, G, Dh, n = 2, 4, 3, 5, 19
    d = H * Dh
    g = torch.Generator().manual_seed(3)
    qg, x, wk, bk, wv, bv = (torch.randn(*s, dtype=F64, generator=g, requires_grad=True) for s in
                             [(B, H, G, Dh), (B, n, d), (d, d), (d,), (d, d), (d,)])  # fmt: skip
    am, _ = make_masks(n, pads, [[], []])

    def heads(t):  # (B, n, d) -> (B, H, n, Dh)
        return t.view(B, n, H, Dh).transpose(1, 2)

    ref = global_attention(qg, heads(x @ wk.T + bk), heads(x @ wv.T + bv), am)
    out = attention.global_rows_fused(qg, x, wk, bk, wv, bv, am)
    real = am.any(dim=1)[:, None, None, None]  # batch rows with a real token (the caller zeroes the rest)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out * real, ref * real, atol=1e-12, rtol=0)
    inputs = [qg, x, wk, bk, wv, bv]
    upstream = torch.randn_like(out) * real
    grads_ref = torch.autograd.grad((ref.nan_to_num(0.0) * upstream).sum(), inputs)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    for g_out, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g_out, g_ref, atol=1e-10, rtol=0)
    assert torch.equal(grads[3], torch.zeros_like(bk))
    low = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in inputs]
    out = attention.global_rows_fused(*low, am)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double() * real, ref.detach() * real, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("pads", [[0, 0], [0, 4], [0, 7]], ids=["no-padding", "padding", "all-padding-row"])
def test_global_rows_fused_gradcheck(pads):
    """The fused global rows' gradients against finite differences (float64): every input, two rows,
    two global slots, padding, a row of padding only."""
    B, H, G, Dh, n = 2, 2, 2, 3, 7
    d = H * Dh
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(*s, dtype=F64, generator=g, requires_grad=True) for s in
              [(B, H, G, Dh), (B, n, d), (d, d), (d,), (d, d), (d,)]]  # fmt: skip
    am, _ = make_masks(n, pads, [[], []])
    assert torch.autograd.gradcheck(lambda *t: attention.global_rows_fused(*t, am), inputs)


@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_global_rows_written_out_in_fp32(biases, monkeypatch):
    """In fp32 (and float64) ``global_rows_fused`` runs ``_GlobalRowsWrittenOut`` (its backward
    written out), not the SDPA call; bf16 and CPU autocast keep the call. Its fp32 values and
    gradients are as close to float64 as the SDPA call's; without biases it equals the
    projected-keys reference (float64); gradcheck with padding, a row of padding only, and a batch
    of one row with one global token (the weights' gradients as outer products)."""
    B, H, G, Dh, n = 2, 4, 2, 8, 40
    d = H * Dh
    g = torch.Generator().manual_seed(7)
    shapes = [(B, H, G, Dh), (B, n, d), (d, d), (d,), (d, d), (d,)]
    leaves = [torch.randn(*s, dtype=F64, generator=g).div(d**0.5 if len(s) == 2 and s[0] == d else 1)
              .requires_grad_() for s in shapes]  # fmt: skip
    if not biases:
        leaves[3] = leaves[5] = None
    am, _ = make_masks(n, [0, 9], [[], []])
    applied = []
    real_apply = attention._GlobalRowsWrittenOut.apply
    monkeypatch.setattr(
        attention._GlobalRowsWrittenOut, "apply", lambda *a: applied.append(1) or real_apply(*a)
    )

    def run(tensors, fn=attention.global_rows_fused):
        out = fn(*tensors, am)
        ups = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        wrt = [t for t in tensors if t is not None]
        return out, torch.autograd.grad((out * ups).sum(), wrt)

    want, want_grads = run(leaves)
    assert len(applied) == 1  # float64: written out
    if not biases:  # the projected-keys reference

        def heads(t):
            return t.view(B, n, H, Dh).transpose(1, 2)

        ref = global_attention(leaves[0], heads(leaves[1] @ leaves[2].T), heads(leaves[1] @ leaves[4].T), am)
        torch.testing.assert_close(want, ref, atol=1e-12, rtol=0)
    low = [None if t is None else t.detach().float().requires_grad_() for t in leaves]
    got, got_grads = run(low)
    assert len(applied) == 2 and got.dtype == torch.float32

    def sdpa_call(qg, x, wk, bk, wv, bv, mask):  # the SDPA call of bf16, run in fp32
        qk = attention._queries_through_keys(qg, wk).reshape(B, 1, H * G, d)
        real = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        ph = F.scaled_dot_product_attention(qk, x[:, None], x[:, None], attn_mask=real, scale=Dh**-0.5)
        out = attention._through_values(ph.view(B, H * G, d), wv, bv, H)
        return out if bk is None else out + bk.sum() * 0.0

    stock, stock_grads = run(low, sdpa_call)
    monkeypatch.undo()
    assert not applied[2:]  # the SDPA call above ran

    def error(a, w):  # relative to the float64 value's largest element
        return ((a.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()

    assert error(got, want) < 1e-6 and error(got, want) <= 4 * error(stock, want) + 1e-7
    for a, s, w in zip(got_grads, stock_grads, want_grads, strict=True):
        assert error(a, w) < 1e-5 and error(a, w) <= 4 * error(s, w) + 1e-7
    applied.clear()
    monkeypatch.setattr(
        attention._GlobalRowsWrittenOut, "apply", lambda *a: applied.append(1) or real_apply(*a)
    )
    bf16 = [None if t is None else t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
    attention.global_rows_fused(*bf16, am)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.global_rows_fused(*low, am)
    assert not applied  # bf16 and autocast: the SDPA call
    for rows, globs, pads in ((2, 2, [0, 7]), (1, 1, [2])):  # a row of padding only; one global row
        am_small, _ = make_masks(7, pads, [[]] * rows)
        small = [torch.randn(*s, dtype=F64, generator=g, requires_grad=True) for s in
                 [(rows, 2, globs, 3), (rows, 7, 6), (6, 6), (6,), (6, 6), (6,)]]  # fmt: skip
        real = am_small | ~am_small.any(dim=1, keepdim=True)
        assert torch.autograd.gradcheck(functools.partial(apply_with_mask, real), small)


def apply_with_mask(real, *tensors):
    return attention._GlobalRowsWrittenOut.apply(*tensors, real)


def test_global_attention_from_hidden_in_bf16(monkeypatch):
    """A bf16 hidden state goes to fp32 a chunk of tokens at a time: values close to the float64
    projected-keys reference, gradients flow through the chunks."""
    monkeypatch.setattr(attention, "_GLOBAL_CHUNK", 7)  # 19 tokens: three chunks
    B, H, G, Dh, n = 2, 4, 2, 8, 19
    d = H * Dh
    g = torch.Generator().manual_seed(2)
    qg, x, wk, bk, wv, bv = (torch.randn(*s, dtype=F64, generator=g) for s in
                             [(B, H, G, Dh), (B, n, d), (d, d), (d,), (d, d), (d,)])  # fmt: skip
    am, _ = make_masks(n, [0, 6], [[], []])

    def heads(t):
        return t.view(B, n, H, Dh).transpose(1, 2)

    ref = global_attention(qg, heads(x @ wk.T + bk), heads(x @ wv.T + bv), am)
    low = [t.to(torch.bfloat16).requires_grad_(True) for t in (qg, x, wk, bk, wv, bv)]
    out = global_attention_from_hidden(*low, am)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in low)


def test_global_indices_order_and_padding():
    gm = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = global_indices(gm)
    assert index.shape == (3, 3)
    assert index[0].tolist() == [1, 3, 4]
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert index[2, 0] == 0
    index, valid = global_indices(torch.zeros(2, 7, dtype=torch.bool))
    assert index.shape == valid.shape == (2, 0)


def test_band_predicate():
    i = torch.arange(12)[:, None]
    j = torch.arange(12)[None, :]
    assert band_predicate(i, j, 2, 1).sum(1).tolist() == [3, 4, 5, 5, 5, 5, 5, 5, 5, 5, 4, 3]
    dil = band_predicate(i, j, 2, 3)
    assert dil[6].nonzero().flatten().tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize("dilation", [0, [1, 0]])
def test_bad_dilation(dilation):
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="dilation"):
        local_attention(q, q, q, window=2, dilation=dilation)


def test_dilation_count_must_match_heads():
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="3 values given for 2 heads"):
        local_attention(q, q, q, window=2, dilation=[1, 2, 3])


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dilation", [1, [1, 2]])
def test_band_never_builds_n_by_n(dilation):
    n, w = 16384, 64
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    gm = torch.zeros(1, n, dtype=torch.bool)
    gm[0, [0, 5000]] = True
    index, valid = global_indices(gm)
    with torch.no_grad(), _LargestOutput() as mode:
        out = local_attention(q, k, v, window=w, dilation=dilation, global_index=index, global_valid=valid)
    assert out.shape == (1, 2, n, 16)
    # Every intermediate is O(n * w): the biggest is (blocks, H, b + 2w + G, Dh) ~ 3.3 M elements.
    assert 0 < mode.largest < n * n // 32, mode.largest

    # the detector does see an n x n tensor when one is built
    small = 512
    with torch.no_grad(), _LargestOutput() as mode:
        reference_attention(*(x[:, :, :small] for x in (q, k, v, q, k, v)), window=w)
    assert mode.largest >= small * small


# ----------------------------------------------------------------------------------------------
# The fused path: FlexAttention with a block-sparse mask (eager on the CPU; compiled on CUDA)

needs_flex = pytest.mark.skipif(attention._flex_module() is None, reason="torch without FlexAttention")


def allowed_local(am, gm, n, window, dilation, H):
    """The reference's (B, H, n, n) 'may attend' of the local rows."""
    idx = torch.arange(n)
    dil = torch.as_tensor(attention._per_head(dilation, H))
    band = band_predicate(idx[:, None], idx[None, :], window, dil[:, None, None])
    return (band[None] | (gm & am)[:, None, None, :]) & am[:, None, None, :]


@needs_flex
@pytest.mark.parametrize("tile", [4, 8, 16])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_block_mask_tiles_cover_exactly_the_allowed_pairs(case, tile):
    """Every allowed (query, key) lies in a listed tile; 'full' tiles are allowed throughout."""
    B, H, n, window, dilation, pads, globs, _ = case
    am, gm = make_masks(n, pads, globs)
    bm = attention.longformer_block_mask(am, gm, window=window, dilation=dilation, block=tile)
    N = bm.seq_lengths[0]
    assert N % tile == 0 and N - tile < n <= N
    # Positions n..N-1 are padding: never keys; as queries (sliced off later) anything goes.
    am_pad, gm_pad = F.pad(am, (0, N - n), value=False), F.pad(gm, (0, N - n), value=False)
    allowed = allowed_local(am_pad, gm_pad, N, window, dilation, H)  # (B, H, N, N)
    tiles = allowed.view(B, H, N // tile, tile, N // tile, tile)
    any_pair, all_pairs = tiles.any(5).any(3), tiles.all(5).all(3)  # (B, H, nb, nb)

    def dense(num, idx):  # tile lists -> (B, Hm, nb, nb) bool
        out = torch.zeros(*idx.shape, dtype=torch.bool)
        cols = torch.arange(idx.shape[-1]) < num[..., None].long()
        return out.scatter_(-1, idx.long(), cols)

    partial = dense(bm.kv_num_blocks, bm.kv_indices).expand(B, H, -1, -1)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices).expand(B, H, -1, -1)
    assert not (partial & full).any()
    assert ((partial | full) | ~any_pair).all(), "an allowed pair outside every listed tile"
    assert (all_pairs | ~full).all(), "a 'full' tile with a disallowed pair"
    undilated = all(d == 1 for d in attention._per_head(dilation, H))
    if undilated:  # tight: a listed tile without an allowed pair only where padding cuts the band
        extra = (partial | full) & ~any_pair
        key_tile_padded = ~am_pad.view(B, 1, 1, N // tile, tile).all(-1)
        assert (~extra | key_tile_padded).all()


@needs_flex
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flex_path_equals_reference(case):
    """Eager FlexAttention (the same mask as the compiled kernel) with 8-token tiles, float64."""
    eager = attention._flex_module().flex_attention
    B, H, n, window, dilation, pads, globs, _ = case
    am, gm = make_masks(n, pads, globs)
    _, tensors = random_inputs(B, H, n)
    tensors = [t.detach() for t in tensors]  # FlexAttention has no CPU backward
    ref = reference_attention(*tensors, window=window, dilation=dilation, attention_mask=am, global_mask=gm)
    bm = attention.longformer_block_mask(am, gm, window=window, dilation=dilation, block=8)
    index, valid = global_indices(gm & am)
    q, k, v = tensors[:3]
    out = local_attention(q, k, v, window=window, dilation=dilation, attention_mask=am, global_index=index,
                          global_valid=valid, kernel="flex", block_mask=bm, flex_attention=eager)  # fmt: skip
    local_rows = (am & ~gm)[:, None, :, None]
    torch.testing.assert_close(out * local_rows, ref * local_rows, atol=1e-12, rtol=0)
    assert torch.isfinite(out).all() and (out.transpose(1, 2)[~am] == 0).all()


def test_choose_kernel(monkeypatch):
    """The choice is pure; LONGDOC_ATTENTION reaches it through runtime.attention_kernel()."""
    monkeypatch.delenv("LONGDOC_ATTENTION", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.attention_kernel() == "auto"
    assert attention.choose_kernel(cpu, 0.0, 4096, 256) == "band"
    if attention._flex_module() is not None:
        assert attention.choose_kernel(cuda, 0.0, 4096, 256) == "flex"
    assert attention.choose_kernel(cuda, 0.1, 4096, 256) == "band"  # attention dropout: SDPA's
    assert attention.choose_kernel(cuda, 0.0, 200, 256) == "band"  # one window: the dense path
    monkeypatch.setenv("LONGDOC_ATTENTION", "band")
    assert attention.choose_kernel(cuda, 0.0, 4096, 256, runtime.attention_kernel()) == "band"
    monkeypatch.setenv("LONGDOC_ATTENTION", "flex")
    if attention._flex_module() is not None:
        assert attention.choose_kernel(cpu, 0.0, 4096, 256, runtime.attention_kernel()) == "flex"
    with pytest.raises(ValueError, match="prefer"):
        attention.choose_kernel(cpu, 0.0, 4096, 256, "fast")


@needs_flex
@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_reference():
    """The compiled (block-sparse) kernel honours the tile lists (fp32, 128-token tiles, n = 700),
    and other windows reuse the compiled kernel: one graph per kind of mask, not per window."""
    from torch._dynamo.utils import counters

    B, H, n = 2, 4, 700
    am, gm = make_masks(n, [0, 90], [[0, 350], [5]])
    index, valid = global_indices(gm & am)
    local_rows = (am & ~gm)[:, None, :, None]
    graphs = []
    for window, dilation in [(40, [1, 1, 2, 3]), (56, [1, 2, 2, 3]), (40, 1), (64, 1)]:
        g = torch.Generator().manual_seed(window)
        tensors = [torch.randn(B, H, n, 16, generator=g) for _ in range(6)]
        ref = reference_attention(
            *tensors, window=window, dilation=dilation, attention_mask=am, global_mask=gm
        )
        with torch.no_grad():
            out = local_attention(*tensors[:3], window=window, dilation=dilation, attention_mask=am,
                                  global_index=index, global_valid=valid, kernel="flex",
                                  flex_attention=runtime.compiled_flex("cpu"))  # fmt: skip
        torch.testing.assert_close(out * local_rows, ref * local_rows, atol=2e-5, rtol=0)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] and graphs[3] == graphs[2], graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize(("dtype", "dilation"), [(torch.float32, [1, 1, 2, 3]), (torch.bfloat16, 1)])
def test_flex_on_cuda_equals_reference(dtype, dilation):
    """Compiled FlexAttention on the GPU, values and gradients, vs the float64 reference."""
    B, H, n, Dh, window = 2, 4, 1531, 64, 128
    am, gm = make_masks(n, [0, 200], [[0, 700, 701], [3]])
    am, gm = am.cuda(), gm.cuda()
    g = torch.Generator(device="cuda").manual_seed(4)
    leaves = [torch.randn(B, n, H, Dh, device="cuda", generator=g).to(dtype) for _ in range(3)]
    leaves = [t.requires_grad_() for t in leaves]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    ref = reference_attention(*(t.double() for t in (q, k, v, q, k, v)), window=window, dilation=dilation,
                              attention_mask=am, global_mask=gm)  # fmt: skip
    index, valid = global_indices(gm & am)
    out = local_attention(q, k, v, window=window, dilation=dilation, attention_mask=am, global_index=index,
                          global_valid=valid, kernel="flex",
                          flex_attention=runtime.compiled_flex("cuda"))  # fmt: skip
    local_rows = (am & ~gm)[:, None, :, None]
    out, ref = out * local_rows, ref * local_rows
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-3), rel
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64 = (t.transpose(1, 2) for t in leaves64)
    ref = reference_attention(q64, k64, v64, q64, k64, v64, window=window, dilation=dilation,
                              attention_mask=am, global_mask=gm) * local_rows  # fmt: skip
    grads_ref = torch.autograd.grad((ref * upstream).sum(), leaves64)
    for name, gr, gf in zip("qkv", grads, grads_ref, strict=True):
        rel = ((gr.double() - gf).norm() / gf.norm()).item()
        assert rel < (2e-2 if dtype == torch.bfloat16 else 2e-3), (name, rel)


@pytest.mark.parametrize("text", ["{bad", "[1, 2]"])
def test_bad_flex_options_are_a_usage_error(text, monkeypatch):
    from longdoc_cli.errors import LongdocError

    monkeypatch.setenv("LONGDOC_FLEX_OPTIONS", text)
    runtime.flex_options.cache_clear()
    try:
        with pytest.raises(LongdocError, match="LONGDOC_FLEX_OPTIONS") as e:
            runtime.flex_options()
        assert exit_code(e.value) == 2
    finally:
        monkeypatch.delenv("LONGDOC_FLEX_OPTIONS")
        runtime.flex_options.cache_clear()


@needs_flex
def test_flex_tile_from_options(monkeypatch):
    am = torch.ones(1, 300, dtype=torch.bool)
    gm = torch.zeros_like(am)
    masks = AttentionMasks(am, gm, *global_indices(gm))  # the model's masks take the tile from runtime
    monkeypatch.setenv("LONGDOC_FLEX_OPTIONS", '{"tile": 64}')
    runtime.flex_options.cache_clear()
    try:
        assert masks.block_mask(16, [1]).BLOCK_SIZE == (64, 64)
    finally:
        monkeypatch.delenv("LONGDOC_FLEX_OPTIONS")
        runtime.flex_options.cache_clear()
    assert AttentionMasks(am, gm, *global_indices(gm)).block_mask(16, [1]).BLOCK_SIZE == (128, 128)
    assert attention.longformer_block_mask(am, gm, window=16).BLOCK_SIZE == (128, 128)
    assert attention.longformer_block_mask(am, gm, window=16, block=64).BLOCK_SIZE == (64, 64)


@needs_flex
def test_compiling_flex_raises_the_recompile_limit():
    import torch._dynamo.config as dynamo_config

    runtime.compiled_flex("cpu")
    assert dynamo_config.recompile_limit >= 64


# ----------------------------------------------------------------------------------------------
# The whole layer: longformer_attention (what the model and the bench run) vs the dense spec


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_longformer_attention_equals_reference(case, grad):
    """Local rows and global rows (their keys and values projected from the hidden state,
    reassociated) against reference_attention with every projection computed densely: padding,
    globals inside windows, dilation, odd lengths; values and the hidden state's gradient."""
    B, H, n, window, dilation, pads, globs, block = case
    Dh = 4
    d = H * Dh
    am, gm = make_masks(n, pads, globs)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(B, n, d, dtype=F64, generator=g, requires_grad=grad)
    weights = [torch.randn(d, d, dtype=F64, generator=g) / d**0.5 for _ in range(6)]  # q k v q_g k_g v_g
    biases = [torch.randn(d, dtype=F64, generator=g) for _ in range(6)]

    def heads(t):  # (B, n, d) -> (B, H, n, Dh)
        return t.view(B, n, H, Dh).transpose(1, 2)

    q, k, v, qg, kg, vg = (heads(x @ w.T + b) for w, b in zip(weights, biases, strict=True))
    ref = reference_attention(q, k, v, qg, kg, vg, window=window, dilation=dilation, attention_mask=am,
                              global_mask=gm)  # fmt: skip
    index, valid = global_indices(gm & am)
    rows = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
    with torch.set_grad_enabled(grad):
        out = longformer_attention(
            q, k, v, qg.gather(2, rows), x, (weights[4], biases[4]), (weights[5], biases[5]), window=window,
            dilation=dilation, attention_mask=am, global_index=index, global_valid=valid, block=block,
        )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    if grad:
        upstream = torch.randn(ref.shape, dtype=F64, generator=g)
        (g_out,) = torch.autograd.grad((out * upstream).sum(), x, retain_graph=True)
        (g_ref,) = torch.autograd.grad((ref * upstream).sum(), x)
        torch.testing.assert_close(g_out, g_ref, atol=1e-9, rtol=0)


def test_longformer_attention_refuses_bad_arguments():
    q = torch.zeros(1, 2, 8, 4)
    x, w = torch.zeros(1, 8, 8), torch.zeros(8, 8)
    index, valid = global_indices(torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel"):
        longformer_attention(q, q, q, q[:, :, :0], x, (w, None), (w, None), window=2, attention_mask=None,
                             global_index=index, global_valid=valid, kernel="dense")  # fmt: skip
    with pytest.raises(ValueError, match="flex_attention"):
        longformer_attention(q, q, q, q[:, :, :0], x, (w, None), (w, None), window=2, attention_mask=None,
                             global_index=index, global_valid=valid, kernel="flex")  # fmt: skip


def test_short_dense_path_is_taken_only_where_it_fits(monkeypatch):
    """w + 1 < n <= 2w + 1 and no dilation: one masked dense call; longer or dilated: the blocks."""
    calls = []
    dense = attention._dense_banded
    monkeypatch.setattr(
        attention, "_dense_banded", lambda *a, **k: calls.append(a[0].shape[2]) or dense(*a, **k)
    )
    for n, dilation in ((17, 1), (18, 1), (17, [1, 2])):
        q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
        local_attention(q, k, v, window=8, dilation=dilation)
    assert calls == [17]


# ----------------------------------------------------------------------------------------------
# Short sequences in training: the band mask built once per batch (AttentionMasks.band_mask)

# (B, H, n, window (one-sided), pads per row, global positions per row): w + 1 < n <= 2w + 1
SHORT_CASES = {
    "odd-n-padding-several-globals": (3, 2, 23, 11, [0, 5, 0], [[0, 9, 22], [1, 3], [0]]),
    "rows-alike-one-global-first": (3, 2, 19, 9, [0, 0, 0], [[0], [0], [0]]),
    "n-2w+1-globals-far": (2, 3, 17, 8, [0, 4], [[0, 16], [12]]),
    "row-mostly-padding-no-global": (2, 2, 21, 10, [19, 0], [[], []]),
    "same-global-count-padding": (2, 2, 15, 7, [0, 3], [[0, 14], [2, 5]]),
    "all-padding-row": (2, 2, 13, 6, [0, 13], [[0, 12], [0]]),
    "no-padding-globals-differ": (2, 2, 20, 10, [0, 0], [[0, 7], [3, 19]]),
}


@pytest.mark.parametrize("case", SHORT_CASES.values(), ids=SHORT_CASES.keys())
def test_short_band_mask_is_the_predicate(case):
    """Bool and additive forms say the same thing: band or global key, real key; a row with no key
    sees every key; one (1, 1, n, n) mask when every row has the same padding and globals."""
    B, _, n, window, pads, globs = case
    am, gm = make_masks(n, pads, globs)
    gm = gm & am
    allowed = attention.short_band_mask(am, gm, window)
    additive = attention.short_band_mask(am, gm, window, F64)
    alike = all(p == pads[0] for p in pads) and all(g == globs[0] for g in globs)
    assert allowed.shape == additive.shape == ((1 if alike else B), 1, n, n)
    assert torch.equal(additive == 0, allowed) and torch.isneginf(additive[~allowed]).all()
    idx = torch.arange(n)
    want = (band_predicate(idx[:, None], idx[None, :], window, 1)[None] | gm[:, None, :]) & am[:, None, :]
    want = want | ~want.any(-1, keepdim=True)  # (B, n, n)
    assert torch.equal(allowed[:, 0].expand(B, n, n), want)


def test_short_band_mask_cached_for_one_row():
    """A mask of one row (or of a batch whose rows agree) is built once and shared: the same tensor
    for the same row, window and dtype, equal to one built anew; a different row or dtype gets its
    own. Built under inference mode, it can still be saved for a backward pass."""
    n, window = 23, 8
    am, gm = make_masks(n, [0, 0], [[0, 5], [0, 5]])
    attention._one_band_mask.cache_clear()
    with torch.inference_mode():
        first = attention.short_band_mask(am, gm, window, torch.float32)
    assert not first.is_inference() and first.shape == (1, 1, n, n)
    assert attention.short_band_mask(am[:1], gm[:1], window, torch.float32) is first
    assert torch.equal(first, attention._band_mask(am[:1], gm[:1], window, torch.float32))
    assert attention.short_band_mask(am, gm, window, F64) is not first
    other = gm.clone()
    other[:, 7] = True
    assert not torch.equal(attention.short_band_mask(am, other, window, torch.float32), first)
    q = torch.randn(1, 2, n, 4, requires_grad=True)
    F.scaled_dot_product_attention(q, q, q, attn_mask=first).sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dropout", [False, True], ids=["sdpa", "dropout-path"])
@pytest.mark.parametrize("case", SHORT_CASES.values(), ids=SHORT_CASES.keys())
def test_longformer_attention_with_the_batch_band_mask(case, dropout, monkeypatch):
    """The whole layer with the band mask of the batch given (additive, as the model passes it)
    equals the dense reference: values, padded rows 0, and the gradients of the hidden state and of
    all six projections' weights (the global rows merged over token-major rows, with and without
    global slots past a row's globals; the global rows through ``global_rows_fused``). The local
    rows' dropout path (attention_with_dropout), its keep mask made to keep everything, takes the
    same additive mask: same local rows."""
    B, H, n, window, pads, globs = case
    Dh = 4
    d = H * Dh
    am, gm = make_masks(n, pads, globs)
    gm = gm & am
    g = torch.Generator().manual_seed(n)
    x = torch.randn(B, n, d, dtype=F64, generator=g, requires_grad=True)
    weights = [(torch.randn(d, d, dtype=F64, generator=g) / d**0.5).requires_grad_() for _ in range(6)]
    biases = [torch.randn(d, dtype=F64, generator=g).requires_grad_() for _ in range(6)]

    def heads(t):  # (B, n, d) -> (B, H, n, Dh), head views of token-major rows as in the model
        return t.view(B, n, H, Dh).transpose(1, 2)

    q, k, v, qg, kg, vg = (heads(x @ w.T + b) for w, b in zip(weights, biases, strict=True))
    ref = reference_attention(q, k, v, qg, kg, vg, window=window, attention_mask=am, global_mask=gm)
    index, valid = global_indices(gm)
    rows = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
    calls = []
    dense = attention._dense_banded
    monkeypatch.setattr(attention, "_dense_banded", lambda *a: calls.append(a[-1]) or dense(*a))
    fused = []
    rows_fused = attention.global_rows_fused
    monkeypatch.setattr(attention, "global_rows_fused", lambda *a: fused.append(1) or rows_fused(*a))
    if dropout:  # attention_with_dropout with a keep-everything mask: the same numbers
        keep = attention.dropout_keep_mask
        monkeypatch.setattr(attention, "dropout_keep_mask", lambda shape, p, dev: keep(shape, 0.0, dev))
    out = longformer_attention(
        q, k, v, qg.gather(2, rows), x, (weights[4], biases[4]), (weights[5], biases[5]), window=window,
        attention_mask=am, global_index=index, global_valid=valid, dropout_p=0.25 if dropout else 0.0,
        band_mask=attention.short_band_mask(am, gm, window, F64),
    )  # fmt: skip
    assert len(calls) == 1 and calls[0] is not None and calls[0].dtype == F64  # the given mask was used
    assert bool(fused) == (not dropout and bool(gm.any()))  # the global rows' fused call, with autograd
    # with dropout the global rows' probabilities are dropped at random: compare the local rows only
    compared = (~gm if dropout else torch.ones_like(gm))[:, None, :, None]  # (B, 1, n, 1)
    torch.testing.assert_close(out * compared, ref * compared, atol=1e-12, rtol=0)
    assert (out.transpose(1, 2)[~am] == 0).all()
    upstream = torch.randn(ref.shape, dtype=F64, generator=g) * compared
    leaves = [x, *weights, *biases]
    got = torch.autograd.grad((out * upstream).sum(), leaves, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad((ref * upstream).sum(), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b.nan_to_num(0.0)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"leaf {i}")


@pytest.mark.parametrize(
    ("mask_kind", "scale", "same_kv"),
    [("none", None, False), ("bool", None, False), ("bf16", 0.3, False), ("fp32-rows", None, True)],
)
def test_bf16_attention_backward_in_fp32(mask_kind, scale, same_kv):
    """bf16 CPU attention with autograd (_FlashFp32Backward): the forward is the stock
    kernel's, bit for bit; the gradients, computed in fp32, are close to a float64 reference and no
    further from it than the stock bf16 backward's. Awkward sizes, a broadcast or per-row mask (a
    row that masks most keys), a custom scale, keys that are the values."""
    B, H, n, Dh = 2, 3, 37, 8
    g = torch.Generator().manual_seed(11)
    leaves = [torch.randn(B, n, H, Dh, generator=g).to(torch.bfloat16) for _ in range(3)]
    if same_kv:
        leaves[2] = leaves[1]
    allowed = torch.rand(1, 1, n, n, generator=g) > 0.4
    allowed |= torch.eye(n, dtype=torch.bool)
    if mask_kind == "fp32-rows":
        allowed = allowed.repeat(B, 1, 1, 1)
        allowed[1, :, :, 5:] = False
    masks = {
        "none": None,
        "bool": allowed,
        "bf16": torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, float("-inf")),
        "fp32-rows": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")),
    }
    mask = masks[mask_kind]
    upstream = torch.randn(B, H, n, Dh, generator=g, dtype=F64)

    def run(dtype, fn):
        params = [t.detach().to(dtype).requires_grad_() for t in leaves[: 2 if same_kv else 3]]
        q, k, v = (t.transpose(1, 2) for t in (params + params[1:] if same_kv else params))
        m = (
            mask
            if mask is None or mask.dtype == torch.bool
            else mask.to(dtype if dtype == F64 else mask.dtype)
        )
        out = fn(q, k, v, m)
        return out, torch.autograd.grad((out.double() * upstream).sum(), params)

    def ours(q, k, v, m):
        additive = attention._additive(m, torch.bfloat16) if m is not None and m.dtype == torch.bool else m
        return attention._FlashFp32Backward.apply(q, k, v, additive, scale)

    out, grads = run(torch.bfloat16, ours)
    assert type(out.grad_fn).__name__ == "_FlashFp32BackwardBackward"
    assert out.dtype == torch.bfloat16 and out.stride() == (n * H * Dh, Dh, H * Dh, 1)  # token-major

    def stock(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    stock_out, stock_grads = run(torch.bfloat16, stock)
    assert torch.equal(out, stock_out)
    ref_out, ref_grads = run(F64, stock)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    for name, got, bf16, want in zip("qkv", grads, stock_grads, ref_grads, strict=False):
        err = ((got.double() - want).norm() / want.norm()).item()
        stock_err = ((bf16.double() - want).norm() / want.norm()).item()
        assert err < 1e-2 and err <= 1.1 * stock_err, (name, err, stock_err)


def test_fp32_backward_only_for_bf16_with_autograd():
    """fp32, inference, and attention dropout keep their paths (the stock kernel, or
    attention_with_dropout): _FlashFp32Backward runs only for bf16 CPU tensors with autograd."""
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    assert type(attention._sdpa(q, k, v, None, 0.0).grad_fn).__name__.startswith("ScaledDotProduct")
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention._sdpa(*low, torch.ones(9, 9, dtype=torch.bool), 0.0)
    assert type(out.grad_fn).__name__ == "_FlashFp32BackwardBackward"
    with torch.no_grad():
        assert attention._sdpa(*low, None, 0.0).grad_fn is None
    out = attention._sdpa(*low, torch.ones(9, 9, dtype=torch.bool), 0.5)
    assert not type(out.grad_fn).__name__.startswith("_FlashFp32")
    assert attention.band_mask_dtype(torch.bfloat16) == torch.float32
    assert attention.band_mask_dtype(torch.float32) == torch.float32
    with torch.no_grad():
        assert attention.band_mask_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("n", [19, 61], ids=["one-masked-call", "query-blocks"])
def test_bf16_local_attention_gradients_with_fp32_backward(n, monkeypatch):
    """bf16 local attention with autograd on both CPU paths that _FlashFp32Backward serves (the short
    path's one masked call, w + 1 < n <= 2w + 1, and query blocks beyond it; padding, globals, a
    row mostly padding): the local rows' values and the gradients of q, k, v within bf16 precision
    of the float64 reference, and no further from it than with the stock bf16 backward."""
    B, H, Dh, window = 3, 2, 8, 10
    assert attention.dense_band_applies(n, window, 1, torch.device("cpu")) == (n == 19)
    am, gm = make_masks(n, [0, 5, n - 4], [[0, 17], [3], [1]])
    g = torch.Generator().manual_seed(9)
    data = [torch.randn(B, n, H, Dh, generator=g) for _ in range(3)]
    index, valid = global_indices(gm & am)
    local_rows = (am & ~gm)[:, None, :, None]
    upstream = torch.randn(B, H, n, Dh, generator=g, dtype=F64) * local_rows

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in data]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        if dtype == F64:
            out = reference_attention(q, k, v, q, k, v, window=window, attention_mask=am, global_mask=gm)
        else:
            out = local_attention(q, k, v, window=window, attention_mask=am, global_index=index,
                                  global_valid=valid, kernel="band")  # fmt: skip
        out = out.double() * local_rows
        return out, torch.autograd.grad((out * upstream).sum(), leaves)

    ref, want = run(F64)
    calls = []
    apply = attention._FlashFp32Backward.apply
    monkeypatch.setattr(attention._FlashFp32Backward, "apply", lambda *a: calls.append(1) or apply(*a))
    out, got = run(torch.bfloat16)
    assert calls
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=0)
    monkeypatch.setattr(attention, "_fp32_backward_applies", lambda *a: False)
    _, stock = run(torch.bfloat16)
    for name, a, s, w in zip("qkv", got, stock, want, strict=True):
        err = ((a.double() - w).norm() / w.norm()).item()
        stock_err = ((s.double() - w).norm() / w.norm()).item()
        assert err < 2e-2 and err <= 1.1 * stock_err + 1e-3, (name, err, stock_err)
