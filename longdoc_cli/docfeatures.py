"""Document features for the frozen-encoder head (``train.head_features``): blocks a document is
described by, computed the same way when the head is fitted (train.py, headfit.py) and when it
predicts (tasks/classify.py).

Blocks:
  first256, first512  the embedding (mean of the token states, the pooling the default sentence model
                      was trained with) of the document's first window of that many tokens
  mean                the token-weighted mean of the embeddings of the document's consecutive,
                      non-overlapping windows of ``mean_window`` tokens (every token counted once)
  words               word 1-2-gram TF-IDF of the whole text (lower-cased words of 2+ word characters,
                      as scikit-learn's TfidfVectorizer; sublinear tf, smoothed idf, L2-normalised rows),
                      the n-grams hashed (CRC-32) into 2^20 buckets; the columns are the buckets of
                      n-grams in at least :data:`WORDS_MIN_DF` training documents (at most
                      :data:`WORDS_MAX_COLUMNS`, the most frequent)

A feature set is a ``+``-joined list of blocks; ``train.head_features`` is ``auto`` (the head picks
among :data:`AUTO_SETS` by cross-validation on the training documents), ``window`` (the older per-window
head, see headfit.py) or a comma-separated list of sets to pick from.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the functions that compute: parsing a spec (config checks) stays light
    from torch import Tensor

    from .tokenize import DocumentTokenizer, Window

FIRST_BLOCKS = {"first256": 256, "first512": 512}
BLOCKS = (*FIRST_BLOCKS, "mean", "words")
AUTO_SETS = (
    ("first256",), ("first512",), ("mean",), ("words",),
    ("first256", "words"), ("first512", "words"), ("mean", "words"),
    ("first256", "mean"), ("first512", "mean"),
    ("first256", "mean", "words"), ("first512", "mean", "words"),
)  # fmt: skip
# How the document head's inner cross-validation turns its candidates into the head
# (``train.head_select``; headfit.select_doc_candidates):
#   pooled  the one (set, L2) with the best macro-F1 of the pooled out-of-fold predictions
#   folds   the one with the best mean of the per-fold macro-F1 (scikit-learn's GridSearchCV rule)
#   logloss the one with the smallest (class-weighted) out-of-fold cross-entropy
#   setf1   each set's L2 by the smallest out-of-fold cross-entropy (smooth in L2), then the set with
#           the best pooled macro-F1 at its L2 (the target metric, over a handful of candidates)
#   top3    the mean of the logits of the three best by pooled macro-F1 (one linear head)
#   sets3   the best L2 of each set, then the mean of the logits of the three best sets
#   l2avg   the best set, the mean of the logits of its three best L2 values
#   logloss+ens (the default) the least out-of-fold cross-entropy among every single candidate and
#           the logit means of the 2 and 3 sets of least cross-entropy (each at its own best L2) and
#           of the best set at its 2 and 3 best L2 values: an average where it fits better, else one
DOC_SELECT_RULES = ("pooled", "folds", "logloss", "setf1", "top3", "sets3", "l2avg", "logloss+ens")
HASH_BITS = 20
WORDS_MIN_DF = 2
WORDS_MAX_COLUMNS = 200_000
_WORD = re.compile(r"(?u)\b\w\w+\b")


def parse_feature_sets(spec: str) -> list[tuple[str, ...]]:
    """``auto`` -> :data:`AUTO_SETS`; else "a+b,c" -> [("a", "b"), ("c",)] (blocks in :data:`BLOCKS`
    order, duplicates dropped). ValueError with the reason on a bad spec (``window`` is not a set)."""
    if spec == "auto":
        return list(AUTO_SETS)
    out: list[tuple[str, ...]] = []
    for part in spec.split(","):
        names = [n.strip() for n in part.split("+") if n.strip()]
        bad = [n for n in names if n not in BLOCKS]
        if bad or not names:
            raise ValueError(
                f"unknown feature block {bad[0] if bad else part.strip()!r} (blocks: {', '.join(BLOCKS)}, "
                "joined by '+', sets separated by ',', or auto / window)"
            )
        key = tuple(b for b in BLOCKS if b in names)
        if key not in out:
            out.append(key)
    return out


def set_name(blocks: Sequence[str]) -> str:
    return "+".join(blocks)


# ----------------------------------------------------------------------------------------------
# Word n-grams


def word_counts(text: str) -> Counter[int]:
    """Bucket -> count of the text's lower-cased word unigrams and bigrams."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    mask = (1 << HASH_BITS) - 1
    return Counter(zlib.crc32(g.encode("utf-8")) & mask for g in grams)


@dataclass(frozen=True)
class WordVocab:
    columns: Tensor  # (n_cols,) long: sorted hash buckets
    idf: Tensor  # (n_cols,) float32


def fit_word_vocab(counts: Sequence[Counter[int]]) -> WordVocab:
    """The columns (buckets in >= :data:`WORDS_MIN_DF` documents, the :data:`WORDS_MAX_COLUMNS` most
    frequent) and their smoothed idf, ln((1 + n) / (1 + df)) + 1."""
    import torch

    df: Counter[int] = Counter()
    total: Counter[int] = Counter()
    for c in counts:
        df.update(c.keys())
        total.update(c)
    keep = [b for b, n in df.items() if n >= WORDS_MIN_DF]
    if len(keep) > WORDS_MAX_COLUMNS:
        keep = sorted(keep, key=lambda b: (-total[b], b))[:WORDS_MAX_COLUMNS]
    keep.sort()
    n = len(counts)
    idf = [math.log((1 + n) / (1 + df[b])) + 1.0 for b in keep]
    return WordVocab(torch.tensor(keep, dtype=torch.long), torch.tensor(idf, dtype=torch.float32))


def word_rows(counts: Sequence[Counter[int]], columns: Tensor, idf: Tensor) -> Tensor:
    """Sparse (n_docs, n_cols) float32 COO: each document's (1 + ln tf) * idf over ``columns``,
    L2-normalised (a document with none of the columns: a zero row)."""
    import torch

    rows, cols, vals = [], [], []
    col_list = columns.tolist()
    index = {b: i for i, b in enumerate(col_list)}
    idf_list = idf.tolist()
    for r, c in enumerate(counts):
        entries = [(index[b], (1.0 + math.log(n)) * idf_list[index[b]]) for b, n in c.items() if b in index]
        norm = math.sqrt(sum(v * v for _, v in entries)) or 1.0
        for j, v in entries:
            rows.append(r)
            cols.append(j)
            vals.append(v / norm)
    idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(
        idx,
        torch.tensor(vals, dtype=torch.float32),
        (len(counts), len(col_list)),
        check_invariants=False,
    )


# ----------------------------------------------------------------------------------------------
# Embedding blocks


@dataclass(frozen=True)
class FeatureSpec:
    """Which blocks to compute and how (saved in the model's config.json, ``longdoc.doc_features``)."""

    blocks: tuple[str, ...]
    mean_window: int  # tokens per window of the "mean" block, specials included

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "mean_window": self.mean_window}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(tuple(data["blocks"]), int(data["mean_window"]))


def first_length(block: str, limit: int) -> int:
    return min(FIRST_BLOCKS[block], limit)


def embedding_blocks(
    embed: Callable[[list[Window]], Tensor],
    tokenizer: DocumentTokenizer,
    texts: Sequence[str],
    spec: FeatureSpec,
    limit: int,
) -> tuple[dict[str, Tensor], list[int], list[int]]:
    """The embedding blocks of ``spec`` for every text: {block: (n_docs, d)}, and per text its token
    count and how many windows were embedded. ``embed`` maps windows to (n, d) pooled embeddings;
    ``limit`` caps every window (the model's positions). A window needed by two blocks (the first
    256 tokens are also the mean block's first window when it is 256 tokens long) is embedded once."""
    import torch

    wanted = [b for b in spec.blocks if b != "words"]
    unique: dict[tuple[int, int, int, int], int] = {}
    flat: list[Window] = []
    plan: dict[str, list[list[int]]] = {b: [] for b in wanted}
    n_tokens, n_windows = [], []

    def use(d: int, w: Window) -> int:
        key = (d, w.doc_start, w.doc_end, len(w))
        if key not in unique:
            unique[key] = len(flat)
            flat.append(w)
        return unique[key]

    for d, text in enumerate(texts):
        enc = tokenizer.encode(text)
        n_tokens.append(len(enc))
        before = len(flat)
        for b in wanted:
            if b == "mean":
                ws = tokenizer.document_windows(enc, min(spec.mean_window, limit), 0)
            else:
                ws = tokenizer.document_windows(enc, first_length(b, limit), 0)[:1]
            plan[b].append([use(d, w) for w in ws])
        n_windows.append(len(flat) - before)
    feats = embed(flat) if flat else torch.zeros(0, 0)
    out: dict[str, Tensor] = {}
    for b in wanted:
        rows = []
        for idx in plan[b]:
            lengths = torch.tensor([len(flat[i]) for i in idx], dtype=torch.float64)
            e = feats[idx].double()
            rows.append((e * lengths[:, None]).sum(0) / lengths.sum())
        out[b] = torch.stack(rows).float() if rows else torch.zeros(0, feats.shape[-1])
    return out, n_tokens, n_windows
