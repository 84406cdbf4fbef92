"""Fitting a classification head on a frozen encoder (``train.freeze_encoder``).

Two heads. The default (``train.head_features`` auto or a list of feature sets, :func:`fit_doc_head`)
is linear on whole-document feature blocks (docfeatures.py: first-window embeddings at 256 / 512
tokens, the mean of the window embeddings, word 1-2-gram TF-IDF). Each block is scaled to unit mean
squared norm (dense ones standardised first), so a concatenation weighs its blocks alike, and its
Gram matrix is computed once; a candidate set's kernel is the sum of its blocks'. A class-weighted,
L2-regularised logistic regression on a set's features equals one on the kernel's eigen-coordinates
(phi = U sqrt(S), K = phi phi^T; the representer theorem), so every (set, L2) candidate of the
stratified k-fold cross-validation on the training documents is a small n-dimensional fit, however
many TF-IDF columns there are; the winner (by default the least out-of-fold cross-entropy among
the candidates and a few logit averages of them, :data:`DOC_SELECT_RULES`) is refitted on all of
them and folded back onto each block's raw features (exact: tests/test_docfeatures.py). The
candidates contain each practitioner's baseline (TF-IDF + LR, first-window embedding + LR, mean of
chunk embeddings + LR), so the pick can only lose to one of them by the noise of the cross-validation.

The per-window head (``head_features: window``): every window of every training document goes
through the encoder once (no gradients); a window's embedding is the mean of its token states,
the pooling the default sentence model was trained with. A linear head is then fitted on them: a
class-weighted, L2-regularised logistic regression, full-batch L-BFGS in float64 on standardised
features, its L2 strength picked by stratified k-fold cross-validation on the training documents
(macro-F1) when ``train.head_l2`` is ``auto``.

Exactness (window head): `classify` scores a document by the token-weighted mean of its windows' logits
(``inference.aggregate: mean``). For a linear head on mean-pooled windows that equals the head
applied to the token-weighted mean of the window embeddings, which is the feature fitted here, so
the saved model (``longdoc.classifier: mean-linear`` in config.json, see model.py) predicts exactly
what was fitted. The checkpoint is an ordinary `train` output directory: the encoder's weights
unchanged, the head's in ``classifier.out_proj``.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .docfeatures import DOC_SELECT_RULES, set_name
from .tokenize import Window

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)  # candidates for head_l2: auto (penalty per unit of mean loss)
# With token features: (l2, token scale); a scale s penalises the TF-IDF weights s^2 times less.
# Scale 0 = embeddings alone: cross-validation may drop the token features.
TOKEN_GRID = ((1e-3, 0.0), (1e-2, 0.0), (1e-1, 0.0), (1e-2, 1.0), (1e-2, 3.0), (1e-1, 3.0), (1e-1, 10.0))
TOKEN_MIN_DF = 2  # training documents a token must occur in to be a feature (as min_df=2)
CV_FOLDS = 5
SKEW_RATIO = 3.0  # largest / smallest class size from which the labels count as skewed


# ----------------------------------------------------------------------------------------------
# Class balance


def label_counts(targets: Sequence[Any], n_labels: int) -> list[int]:
    """Training documents per label (a label index, or a multi-hot list, per document)."""
    counts = [0] * n_labels
    for t in targets:
        if isinstance(t, int):
            counts[t] += 1
        else:
            for i, v in enumerate(t):
                counts[i] += v > 0
    return counts


def skew_ratio(counts: Sequence[int]) -> float:
    """Largest over smallest non-empty class (1.0 for balanced data)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


def resolve_class_weight(mode: str, counts: Sequence[int]) -> str:
    """``auto`` -> ``balanced`` when the labels are skewed (:data:`SKEW_RATIO`), else ``none``."""
    if mode == "auto":
        return "balanced" if skew_ratio(counts) >= SKEW_RATIO else "none"
    return mode


def class_weights(counts: Sequence[int]) -> list[float]:
    """scikit-learn's "balanced" weights, n / (n_labels * count): every class weighs the same in
    total (labels without documents get weight 0)."""
    n, k = sum(counts), sum(1 for c in counts if c > 0)
    return [n / (k * c) if c else 0.0 for c in counts]


def skew_warning(counts: Sequence[int], labels: Sequence[str], mode: str) -> str | None:
    """A one-line warning when the training labels are skewed, saying what the loss does about it."""
    ratio = skew_ratio(counts)
    if ratio < SKEW_RATIO:
        return None
    big = max(range(len(counts)), key=lambda i: counts[i])
    small = min((i for i in range(len(counts)) if counts[i]), key=lambda i: counts[i])
    what = (
        "the loss is class-weighted (train.class_weight)"
        if resolve_class_weight(mode, counts) == "balanced"
        else "train.class_weight is none, so the small classes may never be predicted"
    )
    return (
        f"skewed labels: {labels[big]!r} has {counts[big]} training documents, {labels[small]!r} "
        f"{counts[small]} ({ratio:.0f}x); {what}"
    )


# ----------------------------------------------------------------------------------------------
# Windows and their embeddings


def pick_windows(windows: Sequence[Window], mode: str, max_windows: int | None) -> list[Window]:
    """The windows of one document to train on: the first, or all (at most ``max_windows``, evenly
    spread from the first to the last)."""
    if mode == "first" or len(windows) <= 1:
        return list(windows[:1])
    if max_windows is None or len(windows) <= max_windows:
        return list(windows)
    if max_windows == 1:
        return [windows[0]]
    n = len(windows)
    idx = sorted({round(i * (n - 1) / (max_windows - 1)) for i in range(max_windows)})
    return [windows[i] for i in idx]


def embed_windows(
    encoder: torch.nn.Module,
    tokenizer,
    windows: Sequence[Window],
    batch_size: int,
    *,
    bf16: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> Tensor:
    """(len(windows), d) float32: the mean of each window's token states (first token global, as the
    classification model runs it), in length-sorted batches. ``bf16``: under autocast on a GPU; on
    the CPU through a bf16 copy of the encoder (its fused bf16 kernels need bf16 weights; the copy
    is dropped on return), as ``--dtype bf16`` runs it."""
    from .model import masked_mean

    device = next(encoder.parameters()).device
    if bf16 and device.type == "cpu" and next(encoder.parameters()).dtype != torch.bfloat16:
        encoder = copy.deepcopy(encoder).to(torch.bfloat16).eval()
    autocast = bf16 and next(encoder.parameters()).dtype != torch.bfloat16
    out = torch.zeros(len(windows), encoder.config.hidden_size)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    n_batches = math.ceil(len(order) / batch_size)
    for b, s in enumerate(range(0, len(order), batch_size)):
        chunk = order[s : s + batch_size]
        batch = {k: v.to(device) for k, v in tokenizer.collate([windows[i] for i in chunk]).items()}
        types = batch["token_type_ids"] if encoder.config.type_vocab_size > 1 else None
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = encoder(
                batch["input_ids"], batch["attention_mask"], batch["global_attention_mask"], types
            )
            pooled = masked_mean(hidden.float(), batch["attention_mask"])  # (B, d)
        out[chunk] = pooled.float().cpu()
        if on_batch is not None:
            on_batch(b + 1, n_batches)
    return out


def document_features(feats: Tensor, owner: Sequence[int], lengths: Sequence[int], n_docs: int) -> Tensor:
    """(n_docs, d): the token-weighted mean of each document's window embeddings (what a linear head
    under ``aggregate: mean`` sees)."""
    w = torch.tensor(lengths, dtype=torch.float64)[:, None]
    idx = torch.tensor(owner, dtype=torch.long)
    sums = torch.zeros(n_docs, feats.shape[1], dtype=torch.float64).index_add_(0, idx, feats.double() * w)
    total = torch.zeros(n_docs, 1, dtype=torch.float64).index_add_(0, idx, w)
    return (sums / total.clamp(min=1)).float()


def token_idf(docs_windows: Sequence[Sequence[Window]], vocab_size: int, specials: Sequence[int]) -> Tensor:
    """(vocab_size,) smoothed idf, ln((1 + n) / (1 + df)) + 1, of the tokens in at least
    :data:`TOKEN_MIN_DF` training documents; 0 for the others and for the special tokens."""
    df = torch.zeros(vocab_size, dtype=torch.long)
    for ws in docs_windows:
        ids = torch.tensor(sorted({t for w in ws for t in w.input_ids}), dtype=torch.long)
        df[ids] += 1
    n = len(docs_windows)
    idf = torch.log(torch.tensor(1.0 + n) / (1.0 + df.double())) + 1.0
    idf[df < TOKEN_MIN_DF] = 0.0
    idf[torch.tensor(list(specials), dtype=torch.long)] = 0.0
    return idf.float()


def document_token_features(docs_windows: Sequence[Sequence[Window]], idf: Tensor, columns: Tensor) -> Tensor:
    """(n_docs, len(columns)): the token-weighted mean of each document's window TF-IDF rows
    (model.token_tfidf, the head's token features), restricted to ``columns``."""
    from .model import token_tfidf

    out = torch.zeros(len(docs_windows), len(columns))
    for d, ws in enumerate(docs_windows):
        total = 0
        for w in ws:
            row = token_tfidf(torch.tensor([w.input_ids]), None, idf)[0]  # (V,)
            out[d] += row[columns] * len(w)
            total += len(w)
        out[d] /= max(1, total)
    return out


# ----------------------------------------------------------------------------------------------
# The logistic regression


@dataclass(frozen=True)
class LinearHead:
    weight: Tensor  # (n_labels, d), on the raw (unstandardised) features
    bias: Tensor  # (n_labels,)
    token_weight: Tensor | None = None  # (n_labels, n_token_columns), on the TF-IDF columns fitted

    def logits(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        out = x.to(self.weight.dtype) @ self.weight.T + self.bias
        if self.token_weight is not None and tokens is not None:
            out = out + tokens.to(self.weight.dtype) @ self.token_weight.T
        return out


def fit_logistic(
    x: Tensor,
    y: Tensor,
    n_labels: int,
    *,
    l2: float,
    label_weights: Sequence[float] | None = None,
    multi: bool = False,
    tokens: Tensor | None = None,
    token_scale: float = 1.0,
    max_iter: int = 100,
    standardize: bool = True,
) -> LinearHead:
    """Multinomial (or, ``multi``, one-vs-rest sigmoid) logistic regression minimising
    weighted-mean loss + ``l2`` * ||W||^2 on standardised features (and ``tokens`` TF-IDF columns
    times ``token_scale``, which sets how much less their weights are penalised); returned folded back
    onto the raw features. ``y``: label indices (n,), or multi-hot (n, n_labels) with ``multi``.
    Single-label: ``label_weights`` weight each document by its label; multi-label: they scale the
    positive terms. ``standardize``: each column scaled as :func:`feature_scale` does (scikit-learn's
    StandardScaler); False: the features as given (the penalty is then on their own scale)."""
    x = x.double()
    if standardize:
        mu, sd = feature_scale(x)  # as StandardScaler, like the document head (no sd clamp at 1e-6)
    else:
        mu, sd = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    z = (x - mu) / sd
    if tokens is not None:
        z = torch.cat([z, tokens.double() * token_scale], dim=1)
    d = z.shape[1]
    w = torch.zeros(n_labels, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    lw = torch.tensor(label_weights if label_weights is not None else [1.0] * n_labels, dtype=torch.float64)
    if multi:
        yf = y.double()
        sample = None
    else:
        sample = lw[y]
        sample = sample / sample.sum()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        if multi:
            loss = F.binary_cross_entropy_with_logits(logits, yf, pos_weight=lw, reduction="mean")
        else:
            loss = (F.cross_entropy(logits, y, reduction="none") * sample).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    n_emb = x.shape[1]
    we = w.detach()[:, :n_emb] / sd
    token_weight = None if tokens is None else (w.detach()[:, n_emb:] * token_scale).float()
    return LinearHead(we.float(), (b.detach() - we @ mu).float(), token_weight)


def predict(
    head: LinearHead, x: Tensor, multi: bool, threshold: float, tokens: Tensor | None = None
) -> list[tuple[int, ...]]:
    return _decide(head.logits(x.float(), tokens), multi, threshold)


def _decide(logits: Tensor, multi: bool, threshold: float) -> list[tuple[int, ...]]:
    """Predicted labels from logits: the labels whose sigmoid reaches ``threshold`` (at least the
    best) with ``multi``, else the argmax."""
    if multi:
        probs = torch.sigmoid(logits)
        return [tuple(i for i in range(len(p)) if p[i] >= threshold) or (int(p.argmax()),) for p in probs]
    return [(int(i),) for i in logits.argmax(-1)]


def folds(y: Sequence[Any], k: int, seed: int, groups: Sequence[Any] | None = None) -> list[list[int]]:
    """Stratified folds (by the first label): each label's documents dealt round-robin after a seeded
    shuffle, so every fold gets its share of the small classes. With ``groups`` (one key per
    document, ``data.group_key``) whole groups are dealt instead, so no group is on both sides of a
    fold: each group (filed under its most common first label) goes to the fold with the fewest
    documents of that label so far, then the fewest documents; fewer than k groups give fewer folds."""
    if groups is not None:
        return _group_folds(y, k, seed, groups)
    by_label: dict[Any, list[int]] = {}
    for i, t in enumerate(y):
        by_label.setdefault(_first_label(t), []).append(i)
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    pos = 0
    for key in sorted(by_label, key=str):
        members = by_label[key]
        rng.shuffle(members)
        for i in members:
            out[pos % k].append(i)
            pos += 1
    return [sorted(f) for f in out if f]


def _first_label(t: Any) -> Any:
    return t if isinstance(t, int) else (tuple(j for j, v in enumerate(t) if v > 0)[:1] or (-1,))[0]


def _group_folds(y: Sequence[Any], k: int, seed: int, groups: Sequence[Any]) -> list[list[int]]:
    from collections import Counter

    if len(groups) != len(y):
        raise ValueError(f"{len(groups)} group keys for {len(y)} documents")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    by_label: dict[Any, list[Any]] = {}
    for g, idx in members.items():
        label = Counter(_first_label(y[i]) for i in idx).most_common(1)[0][0]
        by_label.setdefault(label, []).append(g)
    k = max(1, min(k, len(members)))
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    for label in sorted(by_label, key=str):
        keys = sorted(by_label[label], key=str)
        rng.shuffle(keys)
        keys.sort(key=lambda g: -len(members[g]))  # large groups first (stable: seeded among equals)
        per_fold = [0] * k
        for g in keys:
            f = min(range(k), key=lambda j: (per_fold[j], len(out[j]), j))
            out[f] += members[g]
            per_fold[f] += len(members[g])
    return [sorted(f) for f in out if f]


def macro_f1(gold: Sequence[tuple[int, ...]], pred: Sequence[tuple[int, ...]], n_labels: int) -> float:
    from .evaluate import classification_metrics

    names = [str(i) for i in range(n_labels)]
    g = [tuple(str(i) for i in t) for t in gold]
    p = [tuple(str(i) for i in t) for t in pred]
    return classification_metrics(g, p, names).macro_f1


def choose_l2(
    x: Tensor,
    targets: Sequence[Any],
    n_labels: int,
    *,
    balanced: bool,
    multi: bool,
    threshold: float,
    seed: int,
    grid: Sequence[tuple[float, float]] | None = None,
    tokens: Tensor | None = None,
    groups: Sequence[Any] | None = None,
) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """The (L2 strength, token scale) with the best k-fold cross-validated macro-F1 on the training
    documents (ties: the stronger penalty), and every candidate's score. ``groups``: one key per
    document (``data.group_key``); the folds then keep each group whole."""
    grid = list(grid or (TOKEN_GRID if tokens is not None else [(l2, 1.0) for l2 in L2_GRID]))
    parts = folds(targets, min(CV_FOLDS, len(targets)), seed, groups)
    if len(parts) < 2:
        return grid[len(grid) // 2], {}
    y = _as_tensor(targets, multi)
    gold = [_gold(t) for t in targets]
    scores: dict[tuple[float, float], float] = {}
    for l2, scale in grid:
        pred: list[tuple[int, ...]] = [()] * len(targets)
        for part in parts:
            held = set(part)
            tr = [i for i in range(len(targets)) if i not in held]
            counts = label_counts([targets[i] for i in tr], n_labels)
            lw = _label_weights(counts, balanced, multi, len(tr))
            tok_tr = None if tokens is None else tokens[tr]
            head = fit_logistic(x[tr], y[tr], n_labels, l2=l2, label_weights=lw, multi=multi, tokens=tok_tr,
                                token_scale=scale)  # fmt: skip
            tok_part = None if tokens is None else tokens[part]
            for i, p in zip(part, predict(head, x[part], multi, threshold, tok_part), strict=True):
                pred[i] = p
        scores[(l2, scale)] = macro_f1(gold, pred, n_labels)
    best = max(scores.values())
    return max((k for k, s in scores.items() if s >= best - 1e-12), key=lambda k: (k[0], -k[1])), scores


def _gold(t: Any) -> tuple[int, ...]:
    return (t,) if isinstance(t, int) else tuple(i for i, v in enumerate(t) if v > 0)


def _as_tensor(targets: Sequence[Any], multi: bool) -> Tensor:
    return torch.tensor(targets, dtype=torch.float64 if multi else torch.long)


def _label_weights(counts: Sequence[int], balanced: bool, multi: bool, n_docs: int) -> list[float] | None:
    """Single-label: :func:`class_weights`. Multi-label: each label's positives weighted by
    negatives / positives (at least 1), so a rare label is not learnt as "never"."""
    if not balanced:
        return None
    if multi:
        return [max(1.0, (n_docs - c) / c) if c else 1.0 for c in counts]
    return class_weights(counts)


# ----------------------------------------------------------------------------------------------
# The whole fit


@dataclass
class HeadFitResult:
    head: LinearHead
    l2: float
    token_scale: float | None  # None without token features
    cv_scores: dict[tuple[float, float], float]
    class_weight: str  # "balanced" or "none", after auto
    n_windows: int
    embed_seconds: float
    fit_seconds: float
    idf: Tensor | None = None  # (vocab_size,) with token features
    columns: Tensor | None = None  # the vocabulary ids head.token_weight's columns stand for

    def token_proj_weight(self, vocab_size: int) -> Tensor | None:
        """``head.token_weight`` spread over the whole vocabulary (zeros elsewhere)."""
        if self.head.token_weight is None or self.columns is None:
            return None
        full = torch.zeros(self.head.token_weight.shape[0], vocab_size)
        full[:, self.columns] = self.head.token_weight
        return full


def fit_head(
    encoder: torch.nn.Module,
    tokenizer,
    docs_windows: Sequence[Sequence[Window]],
    targets: Sequence[Any],
    n_labels: int,
    *,
    multi: bool,
    class_weight: str,
    l2: float | str,
    threshold: float,
    batch_size: int,
    seed: int,
    bf16: bool = False,
    token_features: bool = False,
    specials: Sequence[int] = (),
    on_batch: Callable[[int, int], None] | None = None,
    groups: Sequence[Any] | None = None,
) -> HeadFitResult:
    """Embed the given windows of every training document once, then fit the head on the
    token-weighted mean of each document's window embeddings (and, with ``token_features``, of its
    windows' TF-IDF rows). ``groups`` (``data.group_key``): the L2's cross-validation folds keep
    each group whole."""
    flat: list[Window] = []
    owner: list[int] = []
    for d, ws in enumerate(docs_windows):
        flat.extend(ws)
        owner.extend([d] * len(ws))
    t0 = time.perf_counter()
    feats = embed_windows(encoder, tokenizer, flat, batch_size, bf16=bf16, on_batch=on_batch)
    x = document_features(feats, owner, [len(w) for w in flat], len(docs_windows))
    t1 = time.perf_counter()
    idf = columns = tokens = None
    if token_features:
        idf = token_idf(docs_windows, encoder.config.vocab_size, specials)
        columns = torch.nonzero(idf > 0).flatten()
        tokens = document_token_features(docs_windows, idf, columns)
    counts = label_counts(targets, n_labels)
    mode = resolve_class_weight(class_weight, counts)
    balanced = mode == "balanced"
    scores: dict[tuple[float, float], float] = {}
    if l2 == "auto":
        (l2, scale), scores = choose_l2(
            x, targets, n_labels, balanced=balanced, multi=multi, threshold=threshold, seed=seed,
            tokens=tokens, groups=groups,
        )  # fmt: skip
    else:
        scale = 10.0
    head = fit_logistic(x, _as_tensor(targets, multi), n_labels, l2=float(l2),
                        label_weights=_label_weights(counts, balanced, multi, len(targets)), multi=multi,
                        tokens=tokens, token_scale=scale)  # fmt: skip
    return HeadFitResult(head, float(l2), scale if token_features else None, scores, mode, len(flat),
                         t1 - t0, time.perf_counter() - t1, idf, columns)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Document-level head: a feature set picked by cross-validation (``train.head_features``)

# L2 candidates of the document-level head (penalty per unit of mean loss on blocks scaled to unit
# mean squared norm). scikit-learn's C (0.01 to 100 in the baselines) is l2 = 1 / (2 C n) on unit-norm
# TF-IDF rows but 1 / (2 C n d) on a d-dimensional standardised embedding scaled by 1 / sqrt(d): at
# n = 300, d = 384 the two ranges are 1.7e-5..0.17 and 4e-8..4e-4, so the grid spans both.
DOC_L2_GRID = (1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class BlockScale:
    """How a block enters the kernel: dense blocks standardised ((x - mu) / sd) and divided by
    sqrt(d), sparse (words) rows as they are (unit norm): every block has mean squared norm ~1, so
    concatenating blocks weighs them alike."""

    mu: Tensor | None
    sd: Tensor | None
    factor: float


MIN_FEATURE_SD = 1e-35  # below this a dense feature is constant (float32's normal range ends at 1.2e-38)


def feature_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, sd) per column of float64 ``x``, as scikit-learn's StandardScaler standardises: every
    column that varies beyond rounding is scaled to unit variance, however small its spread (the
    default model's pooled embedding has dimensions of size 1e-33 to 1e-7 that are as stable across
    batchings as the others and carry signal); a constant one (variance within the rounding
    error of its mean, scikit-learn's rule, or sd < MIN_FEATURE_SD) gets sd 1."""
    n = x.shape[0]
    mu, var = x.mean(0), x.var(0, unbiased=False)
    eps = torch.finfo(torch.float64).eps
    constant = (var <= n * eps * var + (n * mu * eps) ** 2) | (var.sqrt() < MIN_FEATURE_SD)
    return mu, torch.where(constant, torch.ones_like(var), var.sqrt())


def scale_block(x: Tensor) -> tuple[Tensor, BlockScale]:
    """(The scaled block, its :class:`BlockScale`) from the training documents' rows."""
    if x.is_sparse:
        return x.coalesce().double(), BlockScale(None, None, 1.0)
    x = x.double()
    mu, sd = feature_scale(x)
    factor = 1.0 / math.sqrt(x.shape[1])
    return (x - mu) / sd * factor, BlockScale(mu, sd, factor)


def block_kernel(z: Tensor) -> Tensor:
    """(n, n) float64 Gram matrix of a scaled block (dense or sparse rows)."""
    if z.is_sparse:
        with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse.mm(z, z.t()).to_dense().double()
    return z @ z.T


@dataclass
class _Span:
    """The training rows' kernel in eigen-coordinates: phi = U sqrt(S) (n, r) reproduces K = phi phi^T,
    so a logistic regression on phi with penalty l2 * ||w||^2 is the one on the blocks' features."""

    u: Tensor  # (n, r)
    s: Tensor  # (r,)

    @classmethod
    def of(cls, k: Tensor) -> _Span:
        s, u = torch.linalg.eigh(k)
        keep = s > max(float(s.max()), 1e-30) * 1e-10
        return cls(u[:, keep], s[keep])

    @property
    def phi(self) -> Tensor:
        return self.u * self.s.sqrt()

    def project(self, k_other_train: Tensor) -> Tensor:
        """Other documents' phi coordinates from their kernel rows against the training documents."""
        return k_other_train @ self.u / self.s.sqrt()

    def dual(self, w: Tensor) -> Tensor:
        """(n, n_labels): A with logits = K A + b for phi-space weights ``w`` (n_labels, r)."""
        return (self.u / self.s.sqrt()) @ w.T


@dataclass
class DocHeadFit:
    blocks: tuple[str, ...]  # the feature set picked
    l2: float
    weights: dict[str, Tensor]  # block -> (n_labels, d) on the raw block features (words: columns)
    bias: Tensor  # (n_labels,)
    cv_scores: dict[tuple[str, float], float]  # (feature set name, l2) -> pooled out-of-fold macro-F1
    class_weight: str  # "balanced" or "none", after auto
    members: tuple[tuple[str, float], ...] = ()  # the (set name, l2) candidates whose logits are averaged
    cv_log_loss: dict[tuple[str, float], float] = field(default_factory=dict)  # out-of-fold cross-entropy

    def logits(self, feats: dict[str, Tensor]) -> Tensor:
        """(n_docs, n_labels) from the raw blocks (``words``: sparse rows over the fitted columns)."""
        out = self.bias.double().clone()
        for b, w in self.weights.items():
            x, w = feats[b].double(), w.double()
            out = out + (torch.sparse.mm(x, w.T) if x.is_sparse else x @ w.T)
        return out.float()


@dataclass
class DocHeadCV:
    """The inner cross-validation of every (set name, L2) candidate: its out-of-fold logits."""

    logits: dict[
        tuple[str, float], Tensor
    ]  # (n_docs, n_labels) float64, each row from the fold it was held out of
    parts: list[list[int]]
    gold: list[tuple[int, ...]]
    n_labels: int
    multi: bool
    threshold: float
    sample_weight: Tensor  # (n_docs,) the class weights of the loss (ones when not balanced)

    def predictions(self, key: tuple[str, float], rows: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        z = self.logits[key] if rows is None else self.logits[key][list(rows)]
        return _decide(z, self.multi, self.threshold)

    def pooled_f1(self) -> dict[tuple[str, float], float]:
        return {k: macro_f1(self.gold, self.predictions(k), self.n_labels) for k in self.logits}

    def fold_f1(self) -> dict[tuple[str, float], float]:
        """Mean over the folds of each fold's macro-F1."""
        out = {}
        for k in self.logits:
            per = [
                macro_f1([self.gold[i] for i in p], self.predictions(k, p), self.n_labels) for p in self.parts
            ]
            out[k] = sum(per) / len(per)
        return out

    def log_loss(self) -> dict[tuple[str, float], float]:
        """Each candidate's out-of-fold cross-entropy, weighted as the fit's loss is."""
        y = self._targets()  # built once for every candidate
        return {k: float(self._loss(z[None], y)[0]) for k, z in self.logits.items()}

    def ensemble_log_loss(self, members: Sequence[tuple[str, float]]) -> float:
        """The out-of-fold cross-entropy of the mean of ``members``' logits: the out-of-fold logits of
        the averaged head (in each fold its members are fitted on the same documents)."""
        z = torch.stack([self.logits[m] for m in members]).mean(0)
        return float(self._loss(z[None], self._targets())[0])

    def _targets(self) -> Tensor:
        if not self.multi:
            return torch.tensor([g[0] for g in self.gold])
        y = torch.zeros(len(self.gold), self.n_labels, dtype=torch.float64)
        for i, g in enumerate(self.gold):
            y[i, list(g)] = 1.0
        return y

    def _loss(self, z: Tensor, y: Tensor) -> Tensor:
        """(m,) weighted cross-entropy of m stacked logits (m, n_docs, n_labels)."""
        w = self.sample_weight / self.sample_weight.sum()
        if self.multi:
            loss = F.binary_cross_entropy_with_logits(z, y.to(z.dtype).expand_as(z), reduction="none").mean(2)
        else:
            loss = F.cross_entropy(z.transpose(1, 2), y.expand(z.shape[0], -1), reduction="none")
        return (loss * w).sum(1)


def doc_head_cv(
    kernels: dict[str, Tensor],
    sets: Sequence[tuple[str, ...]],
    grid: Sequence[float],
    targets: Sequence[Any],
    n_labels: int,
    parts: list[list[int]],
    *,
    balanced: bool,
    multi: bool,
    threshold: float,
) -> DocHeadCV:
    """Out-of-fold logits of every (set, L2) candidate, each fold's fits on the eigen-coordinates of
    the set's kernel over the other folds' documents."""
    y = _as_tensor(targets, multi)
    n = len(targets)
    out: dict[tuple[str, float], Tensor] = {}
    for s in sets:
        k = sum(kernels[b] for b in s)
        z = {v: torch.zeros(n, n_labels, dtype=torch.float64) for v in grid}
        for part in parts:
            held = set(part)
            tr = [i for i in range(n) if i not in held]
            span = _Span.of(k[tr][:, tr])
            phi, phi_part = span.phi, span.project(k[part][:, tr])
            lw = _label_weights(label_counts([targets[i] for i in tr], n_labels), balanced, multi, len(tr))
            for v in grid:
                head = fit_logistic(
                    phi, y[tr], n_labels, l2=v, label_weights=lw, multi=multi, standardize=False
                )
                z[v][part] = head.logits(phi_part.float()).double()
        for v in grid:
            out[(set_name(s), v)] = z[v]
    counts = label_counts(targets, n_labels)
    lw = _label_weights(counts, balanced, multi, n)
    if lw is None or multi:
        sw = torch.ones(n, dtype=torch.float64)
    else:
        sw = torch.tensor([lw[t] for t in targets], dtype=torch.float64)
    return DocHeadCV(out, parts, [_gold(t) for t in targets], n_labels, multi, threshold, sw)


def select_doc_candidates(
    cv: DocHeadCV, sets: Sequence[tuple[str, ...]], rule: str
) -> tuple[list[tuple[str, float]], dict[tuple[str, float], float]]:
    """The candidates the head is made of (one, or several whose logits are averaged) under ``rule``
    (:data:`DOC_SELECT_RULES`), and the score every candidate got (macro-F1, or log-loss for
    ``logloss`` and ``logloss+ens``). Ties: fewer blocks, then the stronger penalty."""
    if rule not in DOC_SELECT_RULES:
        raise ValueError(f"unknown head selection rule {rule!r} (one of {', '.join(DOC_SELECT_RULES)})")
    order = {set_name(s): (len(s), i) for i, s in enumerate(sets)}
    if rule in ("logloss", "logloss+ens"):
        scores = cv.log_loss()
        sign = -1.0
    else:
        scores = cv.fold_f1() if rule == "folds" else cv.pooled_f1()
        sign = 1.0

    def rank(keys):  # best first; among equal scores fewer blocks, then the stronger penalty
        return sorted(keys, key=lambda k: (-sign * round(scores[k], 12), order[k[0]], -k[1]))

    if rule == "setf1":
        loss = cv.log_loss()
        per_set: dict[str, tuple[str, float]] = {}
        for k in sorted(loss, key=lambda k: (round(loss[k], 12), -k[1])):  # ties: the stronger penalty
            per_set.setdefault(k[0], k)
        return rank(per_set.values())[:1], scores
    ranked = rank(scores)
    if rule in ("pooled", "folds", "logloss"):
        return [ranked[0]], scores
    if rule.endswith("+ens"):
        return _least_loss_pool(cv, ranked), scores
    if rule == "top3":
        return ranked[:3], scores
    if rule == "l2avg":
        name = ranked[0][0]
        return [k for k in ranked if k[0] == name][:3], scores
    best_per_set: dict[str, tuple[str, float]] = {}
    for k in ranked:  # sets3
        best_per_set.setdefault(k[0], k)
    return rank(best_per_set.values())[:3], scores


def _least_loss_pool(cv: DocHeadCV, ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The ``+ens`` rules: among every single candidate and the logit means of the best 2 and 3 sets
    (each at its best L2) and of the best set at its 2 and 3 best L2 values (``ranked``: best first
    by the rule's loss), the one whose out-of-fold logits have the least cross-entropy (an average's
    out-of-fold logits are the average of its members'); a single candidate wins ties."""
    per_set: dict[str, tuple[str, float]] = {}
    for k in ranked:
        per_set.setdefault(k[0], k)
    best_sets = list(per_set.values())
    best_l2s = [k for k in ranked if k[0] == ranked[0][0]]
    pool = [best_sets[:2], best_sets[:3], best_l2s[:2], best_l2s[:3]]
    best, best_loss = [ranked[0]], round(cv.ensemble_log_loss([ranked[0]]), 12)
    for members in pool:
        if len(members) < 2:
            continue
        v = round(cv.ensemble_log_loss(members), 12)
        if v < best_loss:
            best, best_loss = members, v
    return best


def fit_doc_head(
    feats: dict[str, Tensor],
    targets: Sequence[Any],
    n_labels: int,
    *,
    sets: Sequence[tuple[str, ...]],
    multi: bool,
    class_weight: str,
    l2: float | str,
    threshold: float,
    seed: int,
    groups: Sequence[Any] | None = None,
    select: str = "logloss+ens",
) -> DocHeadFit:
    """Pick the feature set (and, ``l2`` auto, the L2 strength from :data:`DOC_L2_GRID`) by k-fold
    cross-validation on the training documents under the ``select`` rule (:data:`DOC_SELECT_RULES`;
    an ensemble rule averages the logits of several candidates, which is again one linear head on
    the union of their blocks), then fit it on all of them. ``feats``: block -> (n_docs, d) dense,
    or sparse rows. ``groups``: one key per document (``data.group_key``); the folds then keep each
    group whole."""
    names = sorted({b for s in sets for b in s})
    scaled, scales, kernels = {}, {}, {}
    for b in names:
        scaled[b], scales[b] = scale_block(feats[b])
        kernels[b] = block_kernel(scaled[b])
    counts = label_counts(targets, n_labels)
    mode = resolve_class_weight(class_weight, counts)
    balanced = mode == "balanced"
    y = _as_tensor(targets, multi)
    grid = list(DOC_L2_GRID) if l2 == "auto" else [float(l2)]
    parts = folds(targets, min(CV_FOLDS, len(targets)), seed, groups)
    scores: dict[tuple[str, float], float] = {}
    losses: dict[tuple[str, float], float] = {}
    by_name = {set_name(s): s for s in sets}
    if len(sets) * len(grid) > 1 and len(parts) >= 2:
        cv = doc_head_cv(kernels, sets, grid, targets, n_labels, parts, balanced=balanced, multi=multi,
                         threshold=threshold)  # fmt: skip
        members, _ = select_doc_candidates(cv, sets, select)
        scores, losses = cv.pooled_f1(), cv.log_loss()
    else:
        members = [(set_name(sets[0]), grid[len(grid) // 2])]
    lw = _label_weights(counts, balanced, multi, len(targets))
    used = [b for b in names if any(b in by_name[m[0]] for m in members)]
    weights = {b: None for b in used}
    bias = torch.zeros(n_labels, dtype=torch.float64)
    for name, v in members:
        chosen = by_name[name]
        span = _Span.of(sum(kernels[b] for b in chosen))
        head = fit_logistic(span.phi, y, n_labels, l2=v, label_weights=lw, multi=multi, standardize=False)
        a = span.dual(head.weight.double()) / len(members)  # (n, n_labels)
        bias = bias + head.bias.double() / len(members)
        for b in chosen:
            z, sc = scaled[b], scales[b]
            if z.is_sparse:
                w = torch.sparse.mm(z.t(), a).T  # (n_labels, n_cols)
            else:
                w = (a.T @ z) * sc.factor / sc.sd  # on the raw features
                bias = bias - w @ sc.mu
            weights[b] = w if weights[b] is None else weights[b] + w
    blocks = _in_block_order(used)
    return DocHeadFit(blocks, float(members[0][1]), {b: weights[b].float() for b in blocks}, bias.float(),
                      scores, mode, tuple(members), losses)  # fmt: skip


def _in_block_order(names: Sequence[str]) -> tuple[str, ...]:
    from .docfeatures import BLOCKS

    return tuple(b for b in BLOCKS if b in names) + tuple(sorted(b for b in names if b not in BLOCKS))
