"""A trained model's card (README.md): its front matter, the dev metrics, the base model and its
licence, the data sizes, the hyperparameters and the training time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .config import MODEL_CONFIG_NAME, LongdocConfig
from .timing import seconds

# The README front matter's licence line (Hugging Face model cards: `license: apache-2.0`).
_LICENCE = re.compile(r"^licen[cs]e:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", re.MULTILINE)


def licence_of(model_dir: Path) -> str | None:
    """The licence a model directory's card declares; for the default model (converted into the
    cache without its card), the packaged original's. None when no card says."""
    candidates = [Path(model_dir) / "README.md"]
    try:
        from .hub import _default_key, default_source_dir

        if Path(model_dir).name == _default_key():
            candidates.append(default_source_dir() / "README.md")
    except Exception:  # the default package missing: nothing to read
        pass
    for card in candidates:
        try:
            text = card.read_text(encoding="utf-8", errors="replace")[:20_000]
        except OSError:
            continue
        front = text.split("\n---", 1)[0] if text.startswith("---") else ""
        m = _LICENCE.search(front)
        if m:
            return m[1].strip()
    return None


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The settings that decide the result, as the card's table shows them."""
    t, m = cfg.train, cfg.model
    return {
        "max_length": m.max_length, "stride": cfg.tokenization.stride, "epochs": t.epochs,
        "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": t.lr,
        "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio, "max_grad_norm": t.max_grad_norm,
        "bf16": t.bf16, "seed": t.seed, "freeze_encoder": t.freeze_encoder, "class_weight": t.class_weight,
        "windows": t.windows,
    }  # fmt: skip


def card_details(cfg: Any, card: dict[str, Any]) -> str:
    """Markdown sections: base model and licence, data, hyperparameters, training time."""
    licence = card.get("licence") or "not stated by the base model's card (check it before use)"
    lines = [
        "## Base model and licence",
        "",
        f"- base model: `{card.get('base')}`; licence: {licence}",
        "",
        "## Data",
        "",
        f"- train: `{cfg.data.train}`, {card.get('n_train')} examples"
        + (f" ({card['n_features']} windows)" if card.get("n_features") is not None else ""),
        f"- dev: `{cfg.data.dev or 'seeded split'}`, {card.get('n_dev')} examples",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in hyperparameters(cfg).items()),
    ]
    if card.get("train_s") is not None:
        steps = card.get("steps_run") or 0
        per_step = f", {seconds(card['train_s'] / steps)} per step" if steps else ""
        lines += [
            "",
            "## Training time",
            "",
            f"- {seconds(card['train_s'])} to this checkpoint ({steps} steps in this run{per_step}), "
            f"on {card.get('device', '?')}",
        ]
    return "\n".join(lines) + "\n"


def model_card(cfg: LongdocConfig, card: dict[str, Any]) -> str:
    task = "document classification" if cfg.task == "classify" else "extractive question answering"
    metrics = card.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    labels = card.get("labels")
    command = "longdoc classify -m DIR FILE" if cfg.task == "classify" else 'longdoc qa -m DIR -Q "..." FILE'
    licence = f"license: {card['licence']}\n" if card.get("licence") else ""
    return f"""---
library_name: transformers
pipeline_tag: {"text-classification" if cfg.task == "classify" else "question-answering"}
tags: [longformer, longdoc]
{licence}---
# {card.get("name", "longdoc model")}

A Longformer fine-tuned by `longdoc train` for {task}, from `{card.get("base")}`.
Windows of {cfg.model.max_length} tokens (specials included), overlapping by {cfg.tokenization.stride}.

- step {card.get("step")} of {card.get("total_steps")}; dev metric `{cfg.metric}`
{f"- labels: {', '.join(labels)}" if labels else ""}

| dev metric | value |
|---|---:|
{rows}

{card_details(cfg, card)}
Use it with `{command}`, or with transformers' `Longformer{
        "ForSequenceClassification" if cfg.task == "classify" else "ForQuestionAnswering"
    }.from_pretrained(DIR)`.
The full training config is `{MODEL_CONFIG_NAME}` in this directory.
"""
