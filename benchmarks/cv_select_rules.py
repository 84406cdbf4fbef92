"""Selection rules measured for the document head and NOT kept in headfit (issue 13, ft9): cv_select.py
with these rules added, so that their rows in benchmarks/README.md can be reproduced.

    python benchmarks/cv_select_rules.py --out /tmp/me/evalf7 --corpus pydocs --repeats 4 \
        --cache /tmp/ft9-cvcache --rules tlogloss,brier,llse

Rules (each picks one (set, L2) candidate from the inner CV's out-of-fold logits):
  tlogloss       the least out-of-fold cross-entropy at each candidate's best temperature
                 (min over t > 0 of the loss of t * logits): the ordering, not the confidence
  tlogloss+ens   the same score over the pool of headfit's ``logloss+ens``
  brier          the least out-of-fold Brier score (bounded: confident mistakes weigh less)
  llse           the set of least cross-entropy, at its weakest L2 whose cross-entropy is within one
                 standard error (paired, per document) of the least
  llweak5/10     the same within 5% / 10% of the least
  setll_l2pooled / setll_l2folds   the set of least cross-entropy, its L2 by pooled / per-fold macro-F1
Every other rule name goes to headfit.select_doc_candidates. Arguments as cv_select.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cv_select  # noqa: E402

from longdoc_cli import headfit  # noqa: E402
from longdoc_cli.docfeatures import set_name  # noqa: E402

_shipped = headfit.select_doc_candidates
Key = tuple[str, float]


def per_doc_loss(cv: headfit.DocHeadCV, z: torch.Tensor, brier: bool = False) -> torch.Tensor:
    """(m, n) each document's weighted loss times n (its mean is the loss) of stacked logits (m, n, K)."""
    y = cv._targets()
    w = cv.sample_weight / cv.sample_weight.sum() * len(cv.gold)
    if brier:
        if cv.multi:
            loss = (torch.sigmoid(z) - y.to(z.dtype)).pow(2).mean(2)
        else:
            loss = (torch.softmax(z, -1) - F.one_hot(y, cv.n_labels).to(z.dtype)).pow(2).sum(2)
    elif cv.multi:
        loss = F.binary_cross_entropy_with_logits(z, y.to(z.dtype).expand_as(z), reduction="none").mean(2)
    else:
        loss = F.cross_entropy(z.transpose(1, 2), y.expand(z.shape[0], -1), reduction="none")
    return loss * w


def tempered(cv: headfit.DocHeadCV, z: torch.Tensor, lo: float = -7.0, hi: float = 5.0) -> torch.Tensor:
    """(m,) the least loss of t * z over t > 0 (golden-section search on ln t in [lo, hi]: the loss is
    convex in t, so unimodal in ln t; t = 1 is a candidate too)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a = torch.full((z.shape[0],), lo, dtype=torch.float64)
    b = torch.full((z.shape[0],), hi, dtype=torch.float64)

    def f(s: torch.Tensor) -> torch.Tensor:
        return per_doc_loss(cv, z * s.exp()[:, None, None]).mean(1)

    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        left = fc < fd  # the minimum is in [a, d]: d becomes the upper end, c the new d
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = torch.where(left, f(c), fd), torch.where(left, fc, f(d))
    return torch.minimum(torch.minimum(fc, fd), per_doc_loss(cv, z).mean(1))


def experimental(cv: headfit.DocHeadCV, sets, rule: str) -> tuple[list[Key], dict[Key, float]]:
    order = {set_name(s): (len(s), i) for i, s in enumerate(sets)}
    keys = list(cv.logits)
    stacked = torch.stack([cv.logits[k] for k in keys])

    def rank(scores: dict[Key, float]) -> list[Key]:
        return sorted(scores, key=lambda k: (round(scores[k], 12), order[k[0]], -k[1]))

    if rule.startswith("tlogloss"):
        scores = dict(zip(keys, tempered(cv, stacked).tolist(), strict=True))
        ranked = rank(scores)
        if rule == "tlogloss":
            return [ranked[0]], scores
        per_set: dict[str, Key] = {}
        for k in ranked:
            per_set.setdefault(k[0], k)
        sets_, l2s = list(per_set.values()), [k for k in ranked if k[0] == ranked[0][0]]
        pool = [[ranked[0]]] + [p for p in (sets_[:2], sets_[:3], l2s[:2], l2s[:3]) if len(p) > 1]
        loss = [float(tempered(cv, torch.stack([cv.logits[m] for m in p]).mean(0)[None])[0]) for p in pool]
        return pool[min(range(len(pool)), key=lambda i: (round(loss[i], 12), i))], scores
    if rule == "brier":
        scores = dict(zip(keys, per_doc_loss(cv, stacked, brier=True).mean(1).tolist(), strict=True))
        return [rank(scores)[0]], scores
    ll = cv.log_loss()
    best = rank(ll)[0]
    same = [k for k in keys if k[0] == best[0]]
    if rule == "llse" or rule.startswith("llweak"):
        if rule == "llse":
            per = per_doc_loss(cv, stacked)
            pb = per[keys.index(best)]

            def near(k: Key) -> bool:
                t = per[keys.index(k)] - pb
                return float(t.mean()) <= float(t.std()) / math.sqrt(len(t))
        else:
            tol = int(rule[len("llweak") :]) / 100

            def near(k: Key) -> bool:
                return ll[k] <= ll[best] * (1 + tol)

        return [min((k for k in same if near(k)), key=lambda k: k[1])], ll
    if rule in ("setll_l2pooled", "setll_l2folds"):
        f1 = cv.pooled_f1() if rule == "setll_l2pooled" else cv.fold_f1()
        return [max(same, key=lambda k: (round(f1[k], 12), -k[1]))], ll
    return _shipped(cv, sets, rule)


def main() -> None:
    headfit.select_doc_candidates = experimental
    cv_select.main()


if __name__ == "__main__":
    main()
