"""Class imbalance and the frozen-encoder fit (train.freeze_encoder): weights, the skew warning, the
logistic head, and a frozen run on the tiny model that classify/evaluate load like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longdoc_cli import headfit
from longdoc_cli.cli import app
from longdoc_cli.config import ConfigError, config_to_dict, default_config, load_config
from longdoc_cli.model import load_state_dict
from longdoc_cli.train import _loss

pytest_plugins = ["fixtures_tiny"]  # tiny_model_dir, cls_data, tiny

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_balanced_weights_are_sklearns_and_auto_follows_the_skew():
    assert headfit.class_weights([6, 2]) == [8 / (2 * 6), 8 / (2 * 2)]
    assert headfit.class_weights([5, 0, 5]) == [1.0, 0.0, 1.0]  # an empty label weighs nothing
    assert headfit.resolve_class_weight("auto", [30, 10]) == "balanced"  # 3x
    assert headfit.resolve_class_weight("auto", [30, 11]) == "none"
    assert headfit.resolve_class_weight("none", [300, 1]) == "none"
    assert headfit.skew_warning([30, 11], ["a", "b"], "auto") is None
    warning = headfit.skew_warning([300, 12, 40], ["library", "howto", "c-api"], "auto")
    assert warning == (
        "skewed labels: 'library' has 300 training documents, 'howto' 12 (25x); "
        "the loss is class-weighted (train.class_weight)"
    )
    assert "may never be predicted" in headfit.skew_warning([300, 12], ["a", "b"], "none")


def test_whole_model_loss_weights_each_example_by_its_label():
    class Fixed(torch.nn.Module):
        def forward(self, **batch):
            return batch["logits"]

    logits = torch.tensor([[2.0, 0.0], [0.5, 1.0], [0.0, 3.0]])
    targets = [0, 0, 1]
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="none")
    weighted = _loss(Fixed(), {"logits": logits}, targets, "classify", False, [0.75, 1.5])
    assert torch.allclose(weighted, (ce * torch.tensor([0.75, 0.75, 1.5])).mean())
    # one-class batch: the weight is not normalised away
    single = _loss(Fixed(), {"logits": logits[2:]}, [1], "classify", False, [0.75, 1.5])
    assert torch.allclose(single, 1.5 * ce[2])
    assert torch.allclose(_loss(Fixed(), {"logits": logits}, targets, "classify", False), ce.mean())


def test_balanced_head_predicts_a_minority_class_that_the_unweighted_one_never_does():
    # 1-D: 40 majority documents spread over [-2, 2], 4 minority ones at its upper end.
    x = torch.cat([torch.linspace(-2, 2, 40), torch.tensor([0.5, 1.0, 1.5, 2.0])])[:, None]
    y = torch.tensor([0] * 40 + [1] * 4)
    counts = headfit.label_counts(y.tolist(), 2)
    plain = headfit.fit_logistic(x, y, 2, l2=1e-2)
    balanced = headfit.fit_logistic(x, y, 2, l2=1e-2, label_weights=headfit.class_weights(counts))
    minority = x[40:]
    assert headfit.predict(plain, minority, False, 0.5) == [(0,)] * 4
    assert sum(p == (1,) for p in headfit.predict(balanced, minority, False, 0.5)) >= 3


def test_logistic_head_is_folded_back_onto_raw_features():
    """Features on wildly different scales: the head fitted on them gives the same logits as one fitted
    on the standardised features (it standardises inside and folds the scaling back into W, b)."""
    torch.manual_seed(0)
    x = torch.randn(30, 5) * torch.tensor([1.0, 10.0, 0.1, 5.0, 2.0]) + 3.0
    y = (x[:, 0] + x[:, 1] / 10 > 3.0).long()
    raw = headfit.fit_logistic(x, y, 2, l2=1e-3)
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    std = headfit.fit_logistic(z, y, 2, l2=1e-3)
    assert raw.weight.shape == (2, 5) and raw.bias.shape == (2,)
    assert torch.allclose(raw.logits(x), std.logits(z), atol=1e-3)
    assert (raw.logits(x).argmax(-1) == y).float().mean() > 0.9


def test_window_head_scales_a_tiny_but_informative_column_like_standard_scaler():
    """A column whose spread is 1e-9 but which alone separates the labels: the window head, like the
    document head, standardises it to unit variance (StandardScaler's rule; a clamp of the sd at 1e-6
    shrank it to ~0 and lost it), and the folded weights stay finite."""
    torch.manual_seed(0)
    y = torch.tensor([0, 1] * 15)
    signal = (y.double() * 2 - 1) * 1e-9 + 1e-10 * torch.randn(30, dtype=torch.float64)
    x = torch.cat([torch.randn(30, 3, dtype=torch.float64), signal[:, None]], dim=1)
    head = headfit.fit_logistic(x, y, 2, l2=1e-3)
    assert torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()
    assert (head.logits(x.float()).argmax(-1) == y).float().mean() > 0.95
    mu, sd = headfit.feature_scale(x)
    assert float(sd[3]) == float(x[:, 3].std(unbiased=False))  # scaled, not clamped


def test_windows_and_folds():
    ws = list(range(10))
    assert headfit.pick_windows(ws, "first", None) == [0]
    assert headfit.pick_windows(ws, "all", None) == ws
    assert headfit.pick_windows(ws, "all", 4) == [0, 3, 6, 9]
    assert headfit.pick_windows(ws, "all", 1) == [0]
    parts = headfit.folds([0] * 10 + [1] * 5, 5, seed=1)
    assert len(parts) == 5 and sorted(i for p in parts for i in p) == list(range(15))
    assert all(sum(i >= 10 for i in p) == 1 for p in parts)  # each fold gets one of the 5 small ones


def test_config_keys_are_strict_and_in_the_defaults():
    cfg = default_config("classify")
    assert cfg.frozen and not default_config("qa").frozen
    t = config_to_dict(cfg)["train"]
    keys = (
        "freeze_encoder",
        "class_weight",
        "windows",
        "max_windows",
        "token_features",
        "head_l2",
        "head_select",
    )
    assert [t[k] for k in keys] == ["auto", "auto", "all", None, True, "auto", "logloss+ens"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.class_weight=weighted", "train.windows=every", "train.max_windows=0",
                           "train.head_l2=-1", "train.head_select=best"])  # fmt: skip
    text = str(e.value)
    assert "train.head_select: expected one of pooled, folds, logloss" in text
    assert "train.class_weight: expected one of auto, balanced, none" in text
    assert "train.windows: expected one of first, all" in text
    assert "train.max_windows: must be >= 1" in text and "train.head_l2: must be >= 0 or auto" in text
    with pytest.raises(ConfigError, match="train.freeze_encoder: a frozen encoder is for classification"):
        load_config(None, ["task=qa", "train.freeze_encoder=true"])


def test_shipped_recipes_load():
    recipe = load_config(CONFIGS / "classify.yaml")
    expected = default_config("classify")
    expected.data.train = recipe.data.train
    assert recipe == expected  # the shipped recipe is what `config init --task classify` writes
    fast = load_config(CONFIGS / "classify-fast.yaml")
    assert fast.frozen and fast.model.max_length <= 512


def _skewed_data(path: Path, tiny) -> Path:
    rows = [
        json.loads(line)
        for line in tiny.classification_data(path.with_suffix(".src"), n=40).read_text().splitlines()
    ]
    keep = [r for r in rows if r["label"] == "sport"] + [r for r in rows if r["label"] == "music"][:5]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def test_frozen_fit_saves_a_model_that_classify_and_evaluate_load(tiny, tiny_model_dir, tmp_path):
    data = _skewed_data(tmp_path / "skewed.jsonl", tiny)
    out = tmp_path / "out"
    sets = tiny.overrides(tiny_model_dir, data, **{"train.freeze_encoder": "true", "data.dev_fraction": 0.2,
                                                   "train.head_features": "window", "train.windows": "first",
                                                   "inference.aggregate": "first"})  # fmt: skip
    r = CliRunner().invoke(app, ["train", str(CONFIGS / "classify-fast.yaml"), "-o", str(out),
                                 *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: skewed labels: 'sport' has" in r.stderr and "class-weighted" in r.stderr
    assert "fitting a head on the frozen encoder" in r.stderr
    conf = json.loads((out / "best" / "config.json").read_text())
    assert conf["longdoc"]["classifier"] == "mean-linear" and conf["longdoc"]["token_features"] is True
    fit = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert fit["frozen_encoder"] and fit["class_weight"] == "balanced" and fit["cv_macro_f1"]
    # the encoder is exactly the source's; only the head was fitted
    source, saved = load_state_dict(tiny_model_dir), load_state_dict(out / "best")
    body = [k for k in source if not k.startswith("pooler.")]  # the classifier has no pooler
    assert body and all(torch.equal(saved[f"longformer.{k}"], source[k]) for k in body)
    r = CliRunner().invoke(app, ["classify", "-m", str(out / "best"), str(data), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    labels = [json.loads(line)["label"] for line in r.stdout.splitlines()]
    assert len(labels) == 25 and "music" in labels  # the 5-document class is predicted
    r = CliRunner().invoke(app, ["evaluate", str(data), "-m", str(out / "best"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classification"]["per_label"]["music"]["recall"] > 0


def test_frozen_model_predicts_exactly_the_fitted_head(tiny, tiny_model_dir, tmp_path):
    """classify's token-weighted mean of window logits == the fitted head on the document features."""
    from longdoc_cli.model import LongformerForSequenceClassification
    from longdoc_cli.tasks.runner import in_memory_task_model, run_windows
    from longdoc_cli.tokenize import DocumentTokenizer
    from longdoc_cli.train import train

    data = tiny.classification_data(tmp_path / "c.jsonl", n=16)
    extra = {"train.freeze_encoder": "true", "data.dev_fraction": 0.0, "train.head_l2": 0.01,
             "train.head_features": "window"}  # fmt: skip
    sets = tiny.overrides(tiny_model_dir, data, **extra)
    cfg = load_config(None, sets)
    train(cfg, tmp_path / "out")
    model = LongformerForSequenceClassification.from_pretrained(tmp_path / "out" / "best")
    tok = DocumentTokenizer.from_dir(tmp_path / "out" / "best")
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    windows = [tok.document_windows(tok.encode(t), 64, 8) for t in docs]
    feats = headfit.embed_windows(model.longformer, tok, [w for ws in windows for w in ws], 8)
    owner = [d for d, ws in enumerate(windows) for _ in ws]
    x = headfit.document_features(feats, owner, [len(w) for ws in windows for w in ws], len(docs))
    idf = model.classifier.token_idf.detach()
    cols = torch.nonzero(idf > 0).flatten()
    tokens = headfit.document_token_features(windows, idf, cols)
    head_module = model.classifier
    head = headfit.LinearHead(
        head_module.out_proj.weight.detach(),
        head_module.out_proj.bias.detach(),
        head_module.token_proj.weight.detach()[:, cols],
    )
    expected = head.logits(x, tokens)
    tm = in_memory_task_model(model, tok, "classification", 64)
    flat = [w for ws in windows for w in ws]
    got = torch.zeros_like(expected)
    for i, logits in run_windows(tm, flat, 4):
        got[owner[i]] += logits * len(flat[i])
    got /= torch.tensor([sum(len(w) for w in ws) for ws in windows], dtype=torch.float32)[:, None]
    assert torch.allclose(got, expected, atol=1e-4)
