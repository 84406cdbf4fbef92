"""Tiny, offline test assets for train/evaluate: a random 2-layer Longformer with a WordPiece
tokenizer built from a small vocabulary, and small labelled / SQuAD-format data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "be",
    "this",
    "python",
    "code",
    "function",
    "class",
    "module",
    "import",
    "return",
    "value",
    "list",
    "dict",
    "string",
    "file",
    "error",
    "test",
    "data",
    "model",
    "window",
    "token",
    "question",
    "answer",
    "sport",
    "football",
    "goal",
    "team",
    "match",
    "player",
    "score",
    "music",
    "song",
    "guitar",
    "band",
    "album",
    "concert",
    "note",
    "why",
    "what",
    "how",
    "does",
    "can",
    "use",
    "when",
    "where",
    "who",
    "grouping",
    "indentation",
]
SPORT = ["sport", "football", "goal", "team", "match", "player", "score"]
MUSIC = ["music", "song", "guitar", "band", "album", "concert", "note"]


def build_tiny_model(path: Path, max_positions: int = 512, window: int = 16) -> Path:
    """A random Longformer encoder (BERT-style positions) + tokenizer.json, saved HF-style."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from longdoc_cli.model import LongformerConfig, LongformerEncoder

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,?!"))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    config = LongformerConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions, attention_window=window, position_style="bert", pad_token_id=0,
        bos_token_id=2, eos_token_id=3, sep_token_id=3, type_vocab_size=2, layer_norm_eps=1e-12,
    )  # fmt: skip
    LongformerEncoder(config).save_pretrained(path)
    return path


def write_classification_data(path: Path, n: int = 24, seed: int = 0, multi: bool = False) -> Path:
    """Documents about sport or music (some longer than one 64-token window)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            topic = "sport" if i % 2 == 0 else "music"
            words = SPORT if topic == "sport" else MUSIC
            length = rng.choice([20, 40, 150])
            text = " ".join(rng.choice(words + WORDS[:10]) for _ in range(length))
            label: object = [topic, "long"] if multi and length > 100 else ([topic] if multi else topic)
            f.write(json.dumps({"id": f"doc{i}", "text": text, "label": label}) + "\n")
    return path


def write_qa_data(path: Path, n_pages: int = 4, per_page: int = 3, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for p in range(n_pages):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(12)]
            for q in range(per_page):
                k = rng.randrange(len(sentences))
                context = " ".join(sentences)
                answer = sentences[k]
                start = context.index(answer)
                question = f"why does {answer.split()[0]} work?"
                answers = {"text": [answer], "answer_start": [start]}
                rec = {"id": f"p{p}-{q}", "title": f"page {p}", "question": question, "context": context,
                       "answers": answers}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def cls_data(tmp_path) -> Path:
    return write_classification_data(tmp_path / "cls.jsonl")


@pytest.fixture()
def qa_data(tmp_path) -> Path:
    return write_qa_data(tmp_path / "qa.jsonl")


def tiny_overrides(model_dir: Path, data: Path, task: str = "classify", **extra) -> list[str]:
    """--set overrides for a seconds-long run on the tiny model."""
    base = {
        "task": task, "model.name": str(model_dir), "model.max_length": 64, "tokenization.stride": 8,
        "tokenization.max_question_length": 16, "data.train": str(data), "data.dev_fraction": 0.25,
        "train.batch_size": 4, "train.epochs": 1, "train.max_steps": 4, "train.eval_every": 2,
        "train.lr": 1e-3, "train.warmup_ratio": 0.25, "inference.batch_size": 8,
        "train.freeze_encoder": "false",  # the whole-model loop (the frozen fit: tests/test_headfit.py)
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture()
def tiny():
    """The helpers of this module, for tests that load it with ``pytest_plugins``."""
    import types

    return types.SimpleNamespace(
        overrides=tiny_overrides, classification_data=write_classification_data, qa_data=write_qa_data
    )
