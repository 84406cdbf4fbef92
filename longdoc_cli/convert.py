"""Turn a short-context BERT or RoBERTa checkpoint into a Longformer (the paper's recipe, §5).

- Learned positions are copied (tiled) over the longer table.
- Global projections (query/key/value_global) start as copies of the local ones.
- The tokenizer files are copied with their maximum length raised (and truncation/padding removed
  from tokenizer.json, so nothing truncates silently).

Positions, and Hugging Face compatibility: ``transformers.LongformerEmbeddings`` numbers real
tokens padding_idx + 1, + 2, ... (RoBERTa style, computed from ``input_ids != pad_token_id``).
RoBERTa's table already follows that convention, so rows 2.. are tiled as in the paper. BERT
numbers positions from 0 with pad id 0, so its table is written *shifted*: row pad_id + 1 + i holds
BERT's position i, and ``max_position_embeddings = max_positions + pad_id + 1``. The converted
model then reproduces the original in both our ``LongformerEncoder`` and
``transformers.LongformerModel``, on inputs no longer than the original limit whose length the
window covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import LongdocError, UsageError
from .runtime import clean_stale, temp_dir

SUPPORTED = ("bert", "roberta")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    max_positions: int = 4096,
    attention_window: int = 512,
    *,
    force: bool = False,
    dilation: int | list[Any] | None = None,
) -> Path:
    """Convert the BERT/RoBERTa directory ``src`` into a Longformer directory ``out`` and return ``out``.

    ``max_positions``: the longest input of the result, special tokens included.
    ``attention_window``: Hugging Face's **two-sided** width (512 -> 256 tokens each side).
    ``dilation``: an int, one per layer, or per layer per head (saved in config.json as
    ``attention_dilation``); None = 1 everywhere.
    ``out`` must not exist or be empty unless ``force`` (then same-named files are replaced and
    nothing else in it is touched). Written to a temporary directory first, so an interrupted
    conversion leaves no half-written model.
    """
    if not str(out).strip() or not str(src).strip():  # Path("") is the current directory
        raise UsageError("convert: SRC and OUT must be non-empty paths")
    src, out = Path(src), Path(out)
    if max_positions < 1:
        raise UsageError(f"--max-positions must be positive, got {max_positions}")
    if attention_window <= 0 or attention_window % 2:
        raise UsageError(
            f"--attention-window (two-sided width) must be a positive even number, got {attention_window}",
        )
    _check_out(src, out, force)
    source_config = read_source_config(src)
    clean_stale(out.parent, out.name)  # what a killed conversion into ``out`` left
    tmp = temp_dir(out.parent, out.name)
    try:
        write_longformer(src, tmp, source_config, max_positions, attention_window, dilation)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and src.is_dir() and out.resolve() == src.resolve():
        raise UsageError(f"{out}: is the source directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: is not empty; choose a new directory or pass --force")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished files into ``out`` (a rename when ``out`` is new or empty)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.is_dir():
            raise
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
        os.replace(item, out / item.name)


def read_source_config(src: Path) -> dict[str, Any]:
    from .model import read_config_json

    data = read_config_json(src)
    model_type = data.get("model_type")
    if model_type == "longformer":
        raise LongdocError(f"{src}: is already a Longformer; use it as it is")
    if model_type not in SUPPORTED:
        arch = ", ".join(data.get("architectures") or []) or "unknown architecture"
        raise LongdocError(
            f"{src}: model_type {model_type!r} ({arch}) cannot be converted; "
            "longdoc converts BERT and RoBERTa checkpoints only"
        )
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise LongdocError(
            f"{src}: position_embedding_type {data['position_embedding_type']!r} is not supported "
            "(only learned absolute positions can be copied)"
        )
    return data


def weights_file(src: Path) -> Path:
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    raise LongdocError(f"{src}: no model.safetensors or pytorch_model.bin")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_pooling(src: Path) -> str:
    """'mean' for a sentence-transformers model pooled by mean, else 'cls'."""
    file = src / "1_Pooling" / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        data = {}
    return "mean" if data.get("pooling_mode_mean_tokens") else "cls"


def write_longformer(
    src: Path,
    out: Path,
    source_config: dict[str, Any],
    max_positions: int,
    attention_window: int,
    dilation: int | list[Any] | None = None,
) -> None:
    """Write the converted model into the existing directory ``out`` (config.json last)."""
    import torch

    from .model import LongformerConfig, LongformerEncoder, load_state_dict
    from .tokenize import DocumentTokenizer

    model_type = source_config["model_type"]
    weights = weights_file(src)
    state = _encoder_state(load_state_dict(src), src)
    tok = DocumentTokenizer.from_dir(src, max_tokens=1 << 30)
    expected = "bert" if model_type == "bert" else "roberta"
    if tok.family != expected:
        raise LongdocError(f"{src}: a {model_type} model with a {tok.family} tokenizer; cannot convert")

    pad = int(source_config.get("pad_token_id", tok.pad_id) or 0)
    old = state["embeddings.position_embeddings.weight"]  # (P, d)
    d = old.shape[1]
    if model_type == "bert":  # positions from 0: shift them to start at pad + 1 (HF Longformer's numbering)
        learned, first = old, pad + 1
    else:  # RoBERTa: rows 0..pad unused, real tokens from pad + 1
        learned, first = old[pad + 1 :], pad + 1
    if learned.shape[0] == 0:
        raise LongdocError(f"{src}: the position table has no learned rows to copy")
    new = torch.zeros(first + max_positions, d, dtype=old.dtype)  # (first + max_positions, d)
    if model_type == "roberta":
        new[:first] = old[:first]
    for k in range(0, max_positions, learned.shape[0]):
        n = min(learned.shape[0], max_positions - k)
        new[first + k : first + k + n] = learned[:n]
    state["embeddings.position_embeddings.weight"] = new
    state.pop("embeddings.position_ids", None)
    state.pop("embeddings.token_type_ids", None)

    n_layers = int(source_config["num_hidden_layers"])
    for i in range(n_layers):
        p = f"encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for t in ("weight", "bias"):
                state[f"{p}{name}_global.{t}"] = state[f"{p}{name}.{t}"].clone()

    config = LongformerConfig(
        vocab_size=int(source_config["vocab_size"]),
        hidden_size=int(source_config["hidden_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(source_config["num_attention_heads"]),
        intermediate_size=int(source_config["intermediate_size"]),
        hidden_act=str(source_config.get("hidden_act", "gelu")),
        hidden_dropout_prob=float(source_config.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(source_config.get("attention_probs_dropout_prob", 0.1)),
        max_position_embeddings=first + max_positions,
        type_vocab_size=int(source_config.get("type_vocab_size", 2)),
        initializer_range=float(source_config.get("initializer_range", 0.02)),
        layer_norm_eps=float(source_config.get("layer_norm_eps", 1e-12)),
        pad_token_id=pad,
        bos_token_id=tok.cls_id,
        eos_token_id=tok.sep_id,
        sep_token_id=tok.sep_id,
        attention_window=attention_window,
        position_style="roberta",
        extra={
            "longdoc": {
                "pooling": source_pooling(src),
                "source": str(source_config.get("_name_or_path") or src),
                "source_model_type": model_type,
                "sha256": sha256_file(weights),
                "max_positions": max_positions,
            }
        },
    )
    config = config.with_attention_dilation(dilation, "--dilation")
    has_pooler = "pooler.dense.weight" in state
    model = LongformerEncoder(config, add_pooler=has_pooler)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = (str(e).strip().splitlines() or [""])[-1].strip()[:200]
        raise LongdocError(f"{src}: the weights do not fit a {model_type} encoder ({detail})") from e

    _copy_tokenizer(src, out, max_positions)
    model.save_pretrained(out)


def _encoder_state(state: dict[str, Any], src: Path) -> dict[str, Any]:
    """The encoder's weights with their prefix ('', 'bert.', 'roberta.') removed; task heads dropped."""
    for prefix in ("", "bert.", "roberta."):
        if prefix + "embeddings.word_embeddings.weight" in state:
            keep = ("embeddings.", "encoder.", "pooler.")
            out = {}
            for k, v in state.items():
                if not k.startswith(prefix):
                    continue
                k = k[len(prefix) :]
                if k.startswith(keep):  # old checkpoints name LayerNorm parameters gamma/beta
                    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                        "LayerNorm.beta", "LayerNorm.bias"
                    )
                    out[k] = v
            return out
    raise LongdocError(f"{src}: the weights hold no BERT/RoBERTa encoder (no embeddings.word_embeddings)")


def _copy_tokenizer(src: Path, out: Path, max_positions: int) -> None:
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        if name == "tokenizer.json":
            data = json.loads((src / name).read_text(encoding="utf-8"))
            data["truncation"] = None  # the shipped MiniLM one truncates at 128
            data["padding"] = None
            (out / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        else:
            shutil.copyfile(src / name, out / name)
    file = src / "tokenizer_config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data["model_max_length"] = max_positions
    data.pop("name_or_path", None)
    (out / "tokenizer_config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
