"""The FLOP model: the useful FLOPs of the math each implementation defines (multiply-add = 2),
the same for ``longdoc``, ``longdoc-int8`` and ``hf``: per layer 8 n d^2 (projections) + 4 n d f
(feed-forward) + 4 d * (exact number of (query, band key) pairs) + the global terms; ``full``
and ``bert`` (transformers' BertModel) count 4 n^2 d for their attention. ``train`` (forward +
backward) counts 3x."""

from __future__ import annotations


def band_pairs(n: int, window: int, dilation: int = 1) -> int:
    """Exact number of (query, key) pairs of an n-token band, one-sided ``window``, ``dilation``."""
    total = 0
    d = dilation
    for r in range(min(d, n)):  # interleaved subsequences of length m
        m = len(range(r, n, d))
        w = min(window, m - 1)
        # sum over i of (min(m-1, i+w) - max(0, i-w) + 1)
        total += m * (2 * w + 1) - w * (w + 1)
    return total


def encoder_flops(cfg, n: int, batch: int, globals_: int, full: bool = False, train: bool = False) -> float:
    """Useful FLOPs of one pass of the encoder layers over a batch of n-token rows (see module doc)."""
    d, f, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    G = min(globals_, n)
    total = 0.0
    for width, dil in zip(cfg.windows, cfg.dilations, strict=True):
        dense = 8 * n * d * d + 4 * n * d * f
        if full:
            attn = 4 * n * n * d
        else:
            w = width // 2
            pairs = sum(band_pairs(n, w, x) for x in dil) / H  # mean over heads
            # band + local rows' global keys + global rows (q_global, reassociated k/v, scores, PV)
            attn = 4 * pairs * d + 4 * n * G * d + 2 * G * d * d + 4 * G * d * d + 4 * G * n * d
        total += dense + attn
    return total * batch * (3 if train else 1)


def attention_flops(n: int, window: int, dilation: int, d: int, batch: int, globals_: int) -> float:
    """FLOPs of one layer's local + global attention function alone (no projections)."""
    G = min(globals_, n)
    return batch * (4 * band_pairs(n, window, dilation) * d + 4 * n * G * d + 4 * G * n * d)


def flops_of(impl: str, cfg, n: int, batch: int, globals_: int, mode: str) -> float:
    train = mode == "train"
    globals_ = min(globals_, n)  # as make_inputs marks them
    if impl == "longdoc-attn":
        d = cfg.hidden_size
        w, dil = cfg.windows[0] // 2, cfg.dilations[0]
        per_head = [attention_flops(n, w, x, d // cfg.num_attention_heads, batch, globals_) for x in dil]
        return sum(per_head) * (3 if train else 1)
    return encoder_flops(cfg, n, batch, globals_, full=impl in ("full", "bert"), train=train)
