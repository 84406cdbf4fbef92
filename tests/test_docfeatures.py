"""The document-level frozen head (train.head_features): feature blocks, the kernel fit and its
selection by cross-validation, and a run on the tiny model whose saved model records the pick and
predicts exactly what was fitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli import docfeatures, headfit
from longdoc_cli.cli import app
from longdoc_cli.config import ConfigError, load_config
from longdoc_cli.errors import LongdocError

pytest_plugins = ["fixtures_tiny"]  # tiny_model_dir, tiny

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_feature_sets_parse_and_bad_ones_are_config_errors():
    assert docfeatures.parse_feature_sets("auto") == list(docfeatures.AUTO_SETS)
    assert docfeatures.parse_feature_sets("words+first256, mean,first256+words") == [
        ("first256", "words"),
        ("mean",),
    ]
    with pytest.raises(ValueError, match="unknown feature block 'bert'"):
        docfeatures.parse_feature_sets("first256+bert")
    with pytest.raises(ConfigError, match="train.head_features: unknown feature block"):
        load_config(None, ["train.head_features=first9"])
    with pytest.raises(ConfigError, match="train.feature_window: must be >= 8"):
        load_config(None, ["train.feature_window=4"])
    assert load_config(None, ["train.head_features=window"]).train.head_features == "window"


def test_word_rows_are_scikit_learns_tfidf():
    sklearn = pytest.importorskip("sklearn.feature_extraction.text")
    texts = [
        "The cat sat on the mat. The cat purred.",
        "A dog sat on the log; the dog barked at the cat.",
        "Cats and dogs: the cat, the dog, the mat and the log.",
        "Nothing in common here at all, x y z.",
    ]
    counts = [docfeatures.word_counts(t) for t in texts]
    vocab = docfeatures.fit_word_vocab(counts)
    ours = docfeatures.word_rows(counts, vocab.columns, vocab.idf).to_dense()
    vec = sklearn.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    ref = torch.tensor(vec.fit_transform(texts).toarray(), dtype=torch.float32)
    assert ours.shape == ref.shape  # no hash collisions among these n-grams
    for a, b in zip(ours, ref, strict=True):  # columns in another order: compare each row's values
        assert torch.allclose(a.sort().values, b.sort().values, atol=1e-6)
    assert torch.allclose(ours @ ours.T, ref @ ref.T, atol=1e-6)


def _toy(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    signal = torch.nn.functional.one_hot(y, 16).float() * 3 + torch.randn(n, 16, generator=g) + 7
    noise = torch.randn(n, 16, generator=g) * 5
    return y, {"first256": noise, "first512": signal}


def test_doc_head_fit_is_the_primal_logistic_regression_on_the_scaled_blocks():
    y, feats = _toy()
    fit = headfit.fit_doc_head(feats, y.tolist(), 3, sets=[("first256", "first512")], multi=False,
                               class_weight="none", l2=1e-2, threshold=0.5, seed=0)  # fmt: skip
    z = torch.cat([headfit.scale_block(feats[b])[0] for b in fit.blocks], dim=1)
    primal = headfit.fit_logistic(z, y, 3, l2=1e-2, standardize=False, max_iter=500)
    assert torch.allclose(fit.logits(feats), primal.logits(z.float()), atol=1e-3)


def test_inner_cv_picks_the_informative_block_and_reports_every_candidate():
    y, feats = _toy()
    sets = [("first256",), ("first512",), ("first256", "first512")]
    fit = headfit.fit_doc_head(feats, y.tolist(), 3, sets=sets, multi=False, class_weight="auto", l2="auto",
                               threshold=0.5, seed=0)  # fmt: skip
    assert fit.blocks == ("first512",)  # the noise block alone loses; with it, no better than without
    assert len(fit.cv_scores) == len(sets) * len(headfit.DOC_L2_GRID)
    assert len(fit.cv_log_loss) == len(fit.cv_scores)
    assert fit.cv_log_loss[("first512", fit.l2)] == min(fit.cv_log_loss.values())  # the default rule
    assert fit.cv_scores[("first512", fit.l2)] > 0.9
    assert max(v for (s, _), v in fit.cv_scores.items() if s == "first256") < 0.7


def _known_cv() -> headfit.DocHeadCV:
    """Out-of-fold logits of four candidates on 8 documents (labels 0 0 0 0 1 1 1 1, folds of 4)."""
    gold = [0, 0, 0, 0, 1, 1, 1, 1]
    sign = torch.tensor([-1.0 if g == 0 else 1.0 for g in gold], dtype=torch.float64)

    def logits(margin: torch.Tensor) -> torch.Tensor:  # margin > 0: the gold label wins
        return torch.stack([-margin * sign / 2, margin * sign / 2], dim=1)

    timid = torch.full((8,), 0.2, dtype=torch.float64)  # every document right, barely
    bold = torch.full((8,), 8.0, dtype=torch.float64)
    bold[0] = -0.2  # every document right and sure of it, but one wrong (barely)
    cand = {("a", 1e-3): logits(timid), ("a", 1e-2): logits(timid), ("a+b", 1e-1): logits(timid),
            ("b", 1e-4): logits(bold)}  # fmt: skip
    parts = [[0, 1, 4, 5], [2, 3, 6, 7]]
    return headfit.DocHeadCV(
        cand, parts, [(g,) for g in gold], 2, False, 0.5, torch.ones(8, dtype=torch.float64)
    )


def test_selection_rules_on_known_out_of_fold_logits():
    cv, sets = _known_cv(), [("a",), ("b",), ("a", "b")]
    members, scores = headfit.select_doc_candidates(cv, sets, "pooled")
    assert members == [("a", 1e-2)]  # ties: fewer blocks, then the stronger penalty
    assert scores[("a", 1e-3)] == 1.0 and scores[("b", 1e-4)] < 1.0
    folds = cv.fold_f1()  # the mean of each fold's own macro-F1
    per = [headfit.macro_f1([cv.gold[i] for i in p], cv.predictions(("b", 1e-4), p), 2) for p in cv.parts]
    assert folds[("b", 1e-4)] == pytest.approx(sum(per) / 2) and per[0] < per[1] == 1.0
    assert headfit.select_doc_candidates(cv, sets, "folds")[0] == [("a", 1e-2)]
    loss, ll = headfit.select_doc_candidates(cv, sets, "logloss")
    assert loss == [("b", 1e-4)] and ll[("b", 1e-4)] < ll[("a", 1e-2)]  # sure and nearly always right
    # setf1: each set's L2 by log-loss (b: the sure one at 1e-4), then the set by macro-F1 at it
    assert headfit.select_doc_candidates(cv, sets, "setf1")[0] == [("a", 1e-2)]
    cv.logits[("b", 1e-5)] = cv.logits[("a", 1e-3)]  # b at 1e-5: every document right, barely
    b_first = [("b",), ("a",), ("a", "b")]
    assert headfit.select_doc_candidates(cv, b_first, "pooled")[0] == [("b", 1e-5)]
    assert headfit.select_doc_candidates(cv, b_first, "setf1")[0] == [("a", 1e-2)]
    del cv.logits[("b", 1e-5)]
    assert headfit.select_doc_candidates(cv, sets, "top3")[0] == [("a", 1e-2), ("a", 1e-3), ("a+b", 1e-1)]
    assert headfit.select_doc_candidates(cv, sets, "l2avg")[0] == [("a", 1e-2), ("a", 1e-3)]
    assert headfit.select_doc_candidates(cv, sets, "sets3")[0] == [("a", 1e-2), ("a+b", 1e-1), ("b", 1e-4)]
    with pytest.raises(ValueError, match="unknown head selection rule 'best'"):
        headfit.select_doc_candidates(cv, sets, "best")


def test_an_ensemble_head_is_one_linear_head_equal_to_the_mean_of_its_members_logits():
    y, feats = _toy()
    sets = [("first256",), ("first512",), ("first256", "first512")]
    kw = dict(multi=False, class_weight="none", threshold=0.5, seed=0)
    fit = headfit.fit_doc_head(feats, y.tolist(), 3, sets=sets, l2="auto", select="sets3", **kw)
    assert len(fit.members) == 3 and len({m[0] for m in fit.members}) == 3
    assert fit.blocks == ("first256", "first512")  # the union of the members' blocks
    alone = [
        headfit.fit_doc_head({b: feats[b] for b in name.split("+")}, y.tolist(), 3,
                             sets=[tuple(name.split("+"))], l2=v, **kw).logits(feats)
        for name, v in fit.members
    ]  # fmt: skip
    assert torch.allclose(fit.logits(feats), torch.stack(alone).mean(0), atol=1e-4)


def _skewed(path: Path, tiny) -> Path:
    rows = [
        json.loads(x)
        for x in tiny.classification_data(path.with_suffix(".src"), n=40).read_text().splitlines()
    ]
    keep = [r for r in rows if r["label"] == "sport"] + [r for r in rows if r["label"] == "music"][:5]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def test_document_head_run_records_its_pick_and_classify_reproduces_it(tiny, tiny_model_dir, tmp_path):
    from longdoc_cli.docfeatures import FeatureSpec, embedding_blocks, word_counts, word_rows
    from longdoc_cli.model import LongformerForSequenceClassification
    from longdoc_cli.tokenize import DocumentTokenizer

    data = _skewed(tmp_path / "skewed.jsonl", tiny)
    out = tmp_path / "out"
    extra = {"data.dev_fraction": 0.2, "train.feature_window": 64, "train.freeze_encoder": "true",
             "train.head_features": "auto"}  # fmt: skip
    sets = tiny.overrides(tiny_model_dir, data, **extra)
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify.yaml"), "-o", str(out),
                                 *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: skewed labels" in r.stderr and "fitting a head on the frozen encoder" in r.stderr
    fit = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    conf = json.loads((out / "best" / "config.json").read_text())["longdoc"]
    assert conf["classifier"] == "doc-linear" and fit["class_weight"] == "balanced"
    assert "+".join(conf["doc_features"]["blocks"]) == fit["head_features"]
    assert len(fit["cv_macro_f1"]) == len(docfeatures.AUTO_SETS) * len(headfit.DOC_L2_GRID)
    # the default rule (logloss+ens): the candidate with the smallest out-of-fold cross-entropy, or a
    # logit average led by it; the model's blocks are the union of its members'
    pick = fit["head_members"][0]
    assert fit["head_select"] == "logloss+ens" and pick.endswith(f",l2={fit['head_l2']:g}")
    assert len(fit["cv_log_loss"]) == len(fit["cv_macro_f1"])
    assert fit["cv_log_loss"][pick] == min(fit["cv_log_loss"].values())
    members = {b for m in fit["head_members"] for b in m.split(",")[0].split("+")}
    assert set(fit["head_features"].split("+")) == members

    # classify = the saved head on the document features computed independently
    model = LongformerForSequenceClassification.from_pretrained(out / "best").eval()
    tok = DocumentTokenizer.from_dir(out / "best")
    spec = FeatureSpec.from_dict(conf["doc_features"])
    texts = [json.loads(x)["text"] for x in data.read_text().splitlines()]

    def embed(ws):
        return headfit.embed_windows(model.longformer, tok, ws, 3)

    feats, _, _ = embedding_blocks(embed, tok, texts, spec, 512)
    if "words" in spec.blocks:
        feats["words"] = word_rows([word_counts(t) for t in texts], model.classifier.word_columns,
                                   model.classifier.word_idf)  # fmt: skip
    probs = torch.softmax(model.classifier.doc_logits(feats), dim=-1)
    names = [model.config.id2label[i] for i in range(2)]
    # fp32 as the features above (auto is bf16 on a CPU with native bf16)
    r = CliRunner().invoke(app, ["classify", "-m", str(out / "best"), str(data), "--format", "jsonl",
                                 "--top-k", "2", "--dtype", "fp32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 25
    for rec, p in zip(recs, probs, strict=True):
        for i, name in enumerate(names):
            assert rec["scores"][name] == pytest.approx(float(p[i].detach()), abs=1e-5)
    assert "music" in [rec["label"] for rec in recs]  # the 5-document class is predicted
    r = CliRunner().invoke(app, ["evaluate", str(data), "-m", str(out / "best"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classification"]["per_label"]["music"]["recall"] > 0
    # the fitted model is a starting point for whole-model fine-tuning (a fresh window head)
    whole = tiny.overrides(tiny_model_dir, data)
    args = ["-o", str(tmp_path / "whole"), "-m", str(out / "best"), *[x for s in whole for x in ("--set", s)]]
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify.yaml"), *args])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "whole" / "best" / "config.json").read_text())
    assert "classifier" not in saved.get("longdoc", {})


def _train_fast_first256(tiny, tiny_model_dir, data: Path, out: Path) -> Path:
    """`longdoc train configs/classify-fast.yaml` on ``data`` with the head fixed to first256, L2 0.01."""
    extra = {"data.dev_fraction": 0.0, "train.head_features": "first256", "train.freeze_encoder": "true",
             "train.head_l2": 0.01}  # fmt: skip
    over = tiny.overrides(tiny_model_dir, data, **extra)
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify-fast.yaml"), "-o", str(out),
                                 *[x for s in over for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


def test_head_select_reaches_the_fit_and_is_recorded(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """train.head_select=pooled goes to fit_doc_head as its rule; the pick is a best pooled
    out-of-fold macro-F1, and the log says which rule made it."""
    seen = []
    real = headfit.fit_doc_head

    def spy(*args, **kwargs):
        seen.append(kwargs.get("select"))
        return real(*args, **kwargs)

    monkeypatch.setattr(headfit, "fit_doc_head", spy)  # train.py imports it from headfit when it runs
    data = _skewed(tmp_path / "skewed.jsonl", tiny)
    out = tmp_path / "out"
    extra = {"data.dev_fraction": 0.0, "train.freeze_encoder": "true",
             "train.head_features": "first256,words", "train.head_select": "pooled"}  # fmt: skip
    sets = tiny.overrides(tiny_model_dir, data, **extra)
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify-fast.yaml"), "-o", str(out),
                                 *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert seen == ["pooled"]
    logs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    (fit,) = [x for x in logs if "head_members" in x]
    pick = f"{fit['head_features']},l2={fit['head_l2']:g}"
    assert fit["head_select"] == "pooled" and fit["head_members"] == [pick]
    assert fit["cv_macro_f1"][pick] == max(fit["cv_macro_f1"].values())


def test_fast_recipe_reads_first_windows_only(tiny, tiny_model_dir, tmp_path):
    fast = load_config(CONFIGS / "classify-fast.yaml")
    sets = docfeatures.parse_feature_sets(fast.train.head_features)
    assert fast.frozen and sets and all("mean" not in s for s in sets)
    data = tiny.classification_data(tmp_path / "c.jsonl", n=16)
    words = {"sport": "goal match team", "music": "guitar song band"}
    long = [{"id": f"long-{k}", "text": " ".join([w] * 200), "label": k} for k, w in words.items()]
    data.write_text(data.read_text() + "".join(json.dumps(r) + "\n" for r in long))
    out = _train_fast_first256(tiny, tiny_model_dir, data, tmp_path / "out")
    fit = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert fit["head_features"] == "first256" and fit["head_l2"] == 0.01 and fit["n_windows"] == 18
    r = CliRunner().invoke(app, ["classify", "-m", str(out / "best"), str(data), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(rec["n_windows"] == 1 for rec in recs)
    assert [rec["truncated"] for rec in recs] == [False] * 16 + [True] * 2  # read: the first 256 tokens


# ----------------------------------------------------------------------------------------------
# data.group_key: grouped inner CV folds


def test_group_folds_keep_groups_whole_and_stratified():
    y = [0] * 30 + [1] * 12
    groups = [f"a{i // 3}" for i in range(30)] + [f"b{i // 4}" for i in range(12)]  # 10 + 3 groups
    parts = headfit.folds(y, 5, seed=3, groups=groups)
    assert sorted(i for p in parts for i in p) == list(range(42))
    where = {g: {j for j, p in enumerate(parts) for i in p if groups[i] == g} for g in set(groups)}
    assert all(len(f) == 1 for f in where.values())  # no group on two folds
    assert [sum(y[i] == 0 for i in p) for p in parts] == [6] * 5  # 10 groups of 3 spread evenly
    assert sorted(sum(y[i] == 1 for i in p) for p in parts) == [0, 0, 4, 4, 4]
    assert headfit.folds(y, 5, seed=3, groups=groups) == parts  # seeded
    assert len(headfit.folds([0, 1, 0, 1], 5, seed=0, groups=["x", "x", "y", "y"])) == 2  # 2 groups: 2 folds
    with pytest.raises(ValueError, match="3 group keys for 4 documents"):
        headfit.folds([0, 1, 0, 1], 2, seed=0, groups=["x", "y", "z"])


def _leaky(seed: int = 0):
    """24 groups of 5 documents, 2 labels (12 groups each). Block first256 identifies the group
    (a random direction per group, no label signal across groups); block mean carries a weak label
    signal in every document. Ungrouped CV rewards memorising groups; grouped CV cannot."""
    g = torch.Generator().manual_seed(seed)
    n_groups, per = 24, 5
    group_label = torch.tensor([i % 2 for i in range(n_groups)])
    centres = torch.randn(n_groups, 64, generator=g) * 3  # 24 points in 64 dimensions: separable
    groups = [f"g{i}" for i in range(n_groups) for _ in range(per)]
    y = group_label.repeat_interleave(per)
    ident = centres.repeat_interleave(per, 0) + 0.1 * torch.randn(n_groups * per, 64, generator=g)
    signal = torch.randn(n_groups * per, 16, generator=g)
    signal[:, 0] += 0.8 * (2 * y - 1)
    return y.tolist(), groups, {"first256": ident, "mean": signal}


def test_grouped_cv_does_not_pick_a_block_that_only_memorises_groups():
    y, groups, feats = _leaky()
    sets = [("first256",), ("mean",)]
    kw = dict(sets=sets, multi=False, class_weight="none", l2="auto", threshold=0.5, seed=0)
    plain = headfit.fit_doc_head(feats, y, 2, **kw)
    grouped = headfit.fit_doc_head(feats, y, 2, groups=groups, **kw)
    best = {fit: {s: max(v for (n, _), v in f.cv_scores.items() if n == s) for s in ("first256", "mean")}
            for fit, f in (("plain", plain), ("grouped", grouped))}  # fmt: skip
    assert plain.blocks == ("first256",) and best["plain"]["first256"] > 0.95  # optimistic
    assert grouped.blocks == ("mean",) and best["grouped"]["mean"] > 0.75
    assert best["plain"]["first256"] - best["grouped"]["first256"] > 0.25  # memorising no longer pays


def test_group_key_reaches_the_dev_split_and_the_heads_folds(tiny, tiny_model_dir, tmp_path, monkeypatch):
    from longdoc_cli.config import DataSection
    from longdoc_cli.data import load_classification
    from longdoc_cli.train import load_datasets

    rows = [
        json.loads(x) for x in tiny.classification_data(tmp_path / "src.jsonl", n=24).read_text().splitlines()
    ]
    for i, r in enumerate(rows):
        if i != 5:  # document 5 has no group: a group of its own
            r["author"] = f"author{i // 4}" if i % 3 else i // 4  # strings and numbers alike
    data = tmp_path / "grouped.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_classification(str(data), DataSection(group_key="author"))
    assert got.docs[0].group == "0" and got.docs[1].group == "author0" and got.docs[5].group.endswith(":6")
    assert load_classification(str(data), DataSection()).docs[1].group is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a b", "label": "x", "author": ["p", "q"]}) + "\n")
    with pytest.raises(LongdocError, match="'author' \\(data.group_key\\) must be a string or a number"):
        load_classification(str(bad), DataSection(group_key="author"))

    n_groups = len({d.group for d in got.docs})
    cfg = load_config(None, tiny.overrides(tiny_model_dir, data, **{"data.group_key": "author"}))
    train_items, dev_items, _ = load_datasets(cfg)  # dev_fraction 0.25: whole groups on one side
    assert dev_items and not {d.group for d in train_items} & {d.group for d in dev_items}

    seen = []
    folds = headfit.folds
    monkeypatch.setattr(
        headfit, "folds", lambda *a, **k: seen.append(a[3] if len(a) > 3 else None) or folds(*a, **k)
    )
    out = tmp_path / "out"
    extra = {"data.dev_fraction": 0.0, "train.freeze_encoder": "true", "train.head_features": "first256",
             "data.group_key": "author"}  # fmt: skip
    sets = tiny.overrides(tiny_model_dir, data, **extra)
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify-fast.yaml"), "-o", str(out),
                                 *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    fit = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert fit["cv_groups"] == n_groups and seen == [[d.group for d in got.docs]]

    # the per-window head's L2 cross-validation keeps the groups whole too
    seen.clear()
    sets = tiny.overrides(tiny_model_dir, data, **{**extra, "train.head_features": "window"})
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify-fast.yaml"), "-o", str(tmp_path / "win"),
                                 *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    logs = [json.loads(x) for x in (tmp_path / "win" / "train_log.jsonl").read_text().splitlines()]
    (fit,) = [x for x in logs if "token_scale" in x]
    assert fit["cv_groups"] == n_groups and seen == [[d.group for d in got.docs]]


def test_tiny_but_informative_dimensions_are_standardised_like_scikit_learn():
    """A dimension whose spread is 1e-30 (the default model's pooled embeddings have a few at 1e-33
    to 1e-7, stable across batchings) is scaled to unit variance as StandardScaler does, not
    zeroed; a constant one is left at zero; the saved head (raw-feature weights, float32) predicts
    from the tiny dimension alone."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.randn(60, 8, generator=g)  # noise
    x[:, 0] = (y * 2 - 1 + 0.3 * torch.randn(60, generator=g)) * 1e-30  # the label, at size 1e-30
    x[:, 1] = 0.25  # constant
    z, sc = headfit.scale_block(x)
    assert z[:, 0].std(unbiased=False).item() == pytest.approx(1 / 8**0.5, rel=1e-6)
    assert z[:, 1].abs().max().item() == 0 and sc.sd[1] == 1
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    ref = preprocessing.StandardScaler().fit_transform(x.double().numpy()) / 8**0.5
    assert torch.allclose(z, torch.from_numpy(ref), atol=1e-9)
    fit = headfit.fit_doc_head({"first256": x}, y.tolist(), 2, sets=[("first256",)], multi=False,
                               class_weight="none", l2=1e-4, threshold=0.5, seed=0)  # fmt: skip
    assert torch.isfinite(fit.weights["first256"]).all()
    pred = fit.logits({"first256": x}).argmax(-1)
    assert (pred == y).float().mean().item() > 0.95


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16-cpu", "no-native-bf16"])
def test_frozen_embedding_follows_auto_dtype_on_the_cpu(tiny, tiny_model_dir, tmp_path, monkeypatch, native):
    """train.bf16: auto embeds a frozen encoder's windows in bf16 on a CPU that computes it natively
    (through a bf16 copy: the saved model keeps fp32 weights), in fp32 elsewhere."""
    from longdoc_cli import headfit, runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    # the fused-kernel probe is cached per process: keep it out of this mocked CPU
    monkeypatch.setattr("longdoc_cli.model.fused_linear_available", lambda: False)
    seen = []
    embed = headfit.embed_windows

    def spy(encoder, *args, **kwargs):
        out = embed(encoder, *args, **kwargs)
        seen.append((kwargs.get("bf16"), next(encoder.parameters()).dtype))
        return out

    monkeypatch.setattr(headfit, "embed_windows", spy)
    data = tiny.classification_data(tmp_path / "c.jsonl", n=12)
    out = _train_fast_first256(tiny, tiny_model_dir, data, tmp_path / "out")
    assert seen and all(bf16 is native and dtype == torch.float32 for bf16, dtype in seen)
    from safetensors.torch import load_file

    saved = load_file(str(out / "best" / "model.safetensors"))
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}


def _complementary_cv() -> headfit.DocHeadCV:
    """Two candidates each sure and right on one label and a little wrong on the other: their mean
    is right on every document."""
    gold = [0, 0, 0, 0, 1, 1, 1, 1]
    sign = torch.tensor([-1.0 if g == 0 else 1.0 for g in gold], dtype=torch.float64)
    a = torch.tensor([6.0] * 4 + [-1.0] * 4, dtype=torch.float64)  # margins of the gold label

    def logits(margin: torch.Tensor) -> torch.Tensor:
        return torch.stack([-margin * sign / 2, margin * sign / 2], dim=1)

    cand = {("a", 1e-3): logits(a), ("a", 1e-2): logits(a * 0.5), ("b", 1e-3): logits(a.flip(0))}
    parts = [[0, 1, 4, 5], [2, 3, 6, 7]]
    return headfit.DocHeadCV(
        cand, parts, [(g,) for g in gold], 2, False, 0.5, torch.ones(8, dtype=torch.float64)
    )


def test_ensemble_rule_averages_candidates_only_where_that_lowers_the_out_of_fold_loss():
    # an average's out-of-fold logits are its members' mean: one member is the candidate itself
    cv = _known_cv()
    ll = cv.log_loss()
    assert all(cv.ensemble_log_loss([k]) == pytest.approx(v) for k, v in ll.items())
    # the single candidate with the least cross-entropy beats every average of the pool
    sets = [("a",), ("b",), ("a", "b")]
    members, scores = headfit.select_doc_candidates(cv, sets, "logloss+ens")
    assert members == [("b", 1e-4)] and scores == ll
    pool = [[("b", 1e-4), ("a", 1e-2)], [("b", 1e-4), ("a", 1e-2), ("a+b", 1e-1)]]
    assert all(cv.ensemble_log_loss(p) > ll[("b", 1e-4)] for p in pool)
    # two complementary sets: their mean is right everywhere and is picked over either alone
    cv = _complementary_cv()
    members, _ = headfit.select_doc_candidates(cv, [("a",), ("b",)], "logloss+ens")
    assert members == [("a", 1e-2), ("b", 1e-3)]  # each set at its own L2 of least cross-entropy
    assert cv.ensemble_log_loss(members) < min(cv.log_loss().values())
    assert headfit.select_doc_candidates(cv, [("a",), ("b",)], "logloss")[0] == [("a", 1e-2)]
