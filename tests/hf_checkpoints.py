"""Tiny Hugging Face BERT / RoBERTa checkpoints with tokenizers, built offline for the tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

_WORDS = """the quick brown fox jumps over lazy dog long document documents model models transformer
attention window global local position positions question answer context paper text token tokens times
done study how many do foxes jump need"""
WORDS = _WORDS.split()


def write_bert_tokenizer(d: Path) -> int:
    """An uncased WordPiece vocabulary of a few hundred entries; returns its size."""
    from tokenizers.implementations import BertWordPieceTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *WORDS]
    vocab = list(dict.fromkeys(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)
    tok.enable_truncation(16)  # like the shipped MiniLM tokenizer.json: must be switched off by longdoc
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"})
    )
    return len(vocab)


def make_tiny_bert(
    d: Path, *, max_position_embeddings: int = 512, seed: int = 0, prefix_head: bool = False
) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    n_vocab = write_bert_tokenizer(d)
    config = BertConfig(
        vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=max_position_embeddings, type_vocab_size=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if prefix_head else BertModel)(config)
    with torch.no_grad():  # make positions and token types matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d)
    return d


def make_tiny_roberta(d: Path, *, max_position_embeddings: int = 514, seed: int = 0) -> Path:
    import torch
    from tokenizers.implementations import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel

    d.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [string.printable]
    tok.train_from_iterator(
        corpus, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    tok.save(str(d / "tokenizer.json"))
    tok.save_model(str(d))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 512, "tokenizer_class": "RobertaTokenizer"})
    )
    config = RobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_position_embeddings, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = RobertaModel(config)
    model.save_pretrained(d)
    return d
