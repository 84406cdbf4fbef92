"""The Longformer encoder and its task heads, top to bottom, with Hugging Face's parameter names.

config -> embeddings -> self-attention -> layer -> encoder -> heads (classification, QA) -> loading.
Weights load from and save to Hugging Face-format directories (``config.json`` +
``model.safetensors``/``pytorch_model.bin``) that ``transformers.Longformer*`` read unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    FLEX_BLOCK,
    band_mask_dtype,
    choose_kernel,
    dense_band_applies,
    global_indices,
    local_attention,
    longformer_attention,
    longformer_block_mask,
    short_band_mask,
)
from .errors import LongdocError, UsageError
from .runtime import attention_kernel, compiled_flex, flex_options, umask_mode
from .textio import preview, read_text_file

# ----------------------------------------------------------------------------------------------
# Config


_M = TypeVar("_M", bound="_PretrainedMixin")  # from_pretrained returns the class it is called on

# The task head of a checkpoint, from config.json's ``architectures``.
HEADS = {"LongformerForSequenceClassification": "classification", "LongformerForQuestionAnswering": "qa"}

# Config fields that must be positive integers.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "max_position_embeddings", "type_vocab_size")  # fmt: skip


@dataclass
class LongformerConfig:
    """Hugging Face's ``LongformerConfig`` fields (defaults: longformer-base-4096) plus two of ours.

    ``attention_window`` is HF's **two-sided** width, one per layer (one-sided w = width // 2).
    ``attention_dilation`` (ours): an int, one per layer, or one list per layer with one value per
    head. ``position_style`` (ours): "roberta" (positions from padding_idx + 1, as HF Longformer)
    or "bert" (positions from 0).
    """

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    sep_token_id: int | None = 2
    attention_window: int | list[int] = 512
    attention_dilation: int | list[int] | list[list[int]] = 1
    position_style: str = "roberta"
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept on save

    def __post_init__(self) -> None:
        for name in _POSITIVE_SIZES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LongdocError(f"config: {name} must be a positive integer, got {value!r}")
        if isinstance(self.attention_window, str):
            raise LongdocError(
                f"config: attention_window must be an int or a list, got {self.attention_window!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise LongdocError(
                f"config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        windows = self.windows
        for i, width in enumerate(windows):
            if width <= 0 or width % 2:
                raise LongdocError(
                    f"config: attention_window[{i}] = {width}: "
                    "the two-sided window must be a positive even number"
                )
        self.dilations  # noqa: B018 - validates
        if self.position_style not in ("roberta", "bert"):
            raise LongdocError(
                f"config: position_style must be 'roberta' or 'bert', got {self.position_style!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise LongdocError(
                f"config: hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})"
            )
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    def with_attention_window(self, window: int | None) -> LongformerConfig:
        """This config with one two-sided ``window`` for every layer (``model.attention_window``),
        validated; itself when ``window`` is None (the checkpoint's windows)."""
        return self if window is None else dataclasses.replace(self, attention_window=int(window))

    def with_attention_dilation(
        self, dilation: int | list[Any] | None, name: str = "model.attention_dilation"
    ) -> LongformerConfig:
        """This config with ``dilation`` (``model.attention_dilation``: an int, one per layer, or per
        layer per head), checked against the layer and head counts; itself when None."""
        if dilation is None:
            return self
        try:
            return dataclasses.replace(self, attention_dilation=dilation)
        except LongdocError as e:
            raise UsageError(str(e).replace("config: attention_dilation", f"{name}:")) from None

    @property
    def windows(self) -> list[int]:
        """Two-sided window per layer."""
        w = self.attention_window
        windows = [int(w)] * self.num_hidden_layers if isinstance(w, int) else [int(x) for x in w]
        if len(windows) != self.num_hidden_layers:
            raise LongdocError(
                f"config: attention_window has {len(windows)} values for {self.num_hidden_layers} layers"
            )
        return windows

    @property
    def dilations(self) -> list[list[int]]:
        """Dilation per layer, per head."""
        L, H = self.num_hidden_layers, self.num_attention_heads
        d = self.attention_dilation
        per_layer = [d] * L if isinstance(d, int) else list(d)
        if len(per_layer) != L:
            raise LongdocError(f"config: attention_dilation has {len(per_layer)} values for {L} layers")
        out = []
        for i, x in enumerate(per_layer):
            heads = [int(x)] * H if isinstance(x, int) else [int(y) for y in x]
            if len(heads) != H:
                raise LongdocError(f"config: attention_dilation[{i}] has {len(heads)} values for {H} heads")
            if min(heads) < 1:
                raise LongdocError(f"config: attention_dilation[{i}] = {heads}: every dilation must be >= 1")
            out.append(heads)
        return out

    @property
    def head(self) -> str:
        """The task head ``architectures`` names: "classification", "qa", or "encoder" (none)."""
        for arch in self.extra.get("architectures") or []:
            if arch in HEADS:
                return HEADS[arch]
        return "encoder"

    @property
    def pooling(self) -> str:
        """How the encoder was trained to pool token states: "mean" (sentence-transformers, as the
        default model) or "cls"."""
        pooling = (self.extra.get("longdoc") or {}).get("pooling", "cls")
        return pooling if pooling in ("mean", "cls") else "cls"

    @property
    def classifier(self) -> str:
        """The classification head's kind: "mean-linear" for a head fitted on mean-pooled windows of
        a frozen encoder, "doc-linear" for one fitted on whole-document features (headfit.py,
        docfeatures.py), else "cls" (HF's head)."""
        return (self.extra.get("longdoc") or {}).get("classifier", "cls")

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows."""
        if self.position_style == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongformerConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "num_labels"}
        extra.pop("label2id", None)
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise LongdocError(f"config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        data["model_type"] = "longformer"
        data["attention_window"] = self.windows
        if self.id2label is not None:
            data["label2id"] = {v: k for k, v in self.id2label.items()}
        return data


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu,
               "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}  # fmt: skip


def _gelu_tanh_(x: Tensor) -> Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


def _silu_(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


# The same functions in place (inference: the feed-forward's n x f activation is not kept twice).
IN_PLACE_ACTIVATIONS = {
    "gelu": torch.ops.aten.gelu_, "gelu_new": _gelu_tanh_, "gelu_pytorch_tanh": _gelu_tanh_,
    "relu": torch.relu_, "silu": _silu_, "swish": _silu_, "tanh": torch.tanh_,
}  # fmt: skip


# oneDNN's fused linear, torch.ops.mkldnn._linear_pointwise (what inductor calls on the CPU): the bias
# (and an activation) applied inside the matmul, instead of addmm first copying the bias into its
# n x out output and a separate activation pass. For CPU inference in bf16 only: one thread, 16 x 256
# tokens of the default model, the feed-forward's dense + GELU took 11.8 ms against 15.1, a 384 x 384
# projection 2.2 against 2.6 (benchmarks/README.md, "Fewer passes over memory"); in fp32 it was no
# faster and its sums differ from addmm's by ~4e-6, which the fp32 parity with transformers forbids.
FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
                     "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}  # fmt: skip


@functools.cache
def fused_linear_available() -> bool:
    """Whether oneDNN's fused bf16 linear runs here and agrees with ``F.linear`` (checked once on a
    small input): torch built with oneDNN, a CPU that computes bf16 natively."""
    from .runtime import cpu_has_native_bf16

    try:
        if not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()):
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen).to(torch.bfloat16) for s in ((3, 5, 16), (8, 16), (8,)))
        with torch.inference_mode():
            got = op(x, w, b, "gelu", [], "none")
            want = F.gelu(F.linear(x, w, b))
        return got.shape == want.shape and bool(
            torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.05)
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _fusable(x: Tensor, weight: Tensor) -> bool:
    """Inference on the CPU in bf16, where :data:`FUSED_ACTIVATIONS`' kernel is used (unless oneDNN
    is switched off: ``torch.backends.mkldnn.enabled = False``)."""
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.enabled
        and fused_linear_available()
    )


def linear(x: Tensor, module: nn.Module, activation: str | None = None) -> Tensor:
    """``module(x)`` (then ``activation``, a key of :data:`ACTIVATIONS`, in place without autograd),
    through oneDNN's fused kernel where :func:`_fusable` (CPU bf16 inference)."""
    if (
        type(module) is nn.Linear
        and (activation is None or activation in FUSED_ACTIVATIONS)
        and _fusable(x, module.weight)
    ):
        attr, algorithm = FUSED_ACTIVATIONS[activation] if activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, attr, [], algorithm)
    y = module(x)
    if activation is None:
        return y
    in_place = IN_PLACE_ACTIVATIONS.get(activation)
    if not torch.is_grad_enabled() and in_place is not None:  # no second n x f buffer
        return in_place(y)
    return ACTIVATIONS[activation](y)


# ----------------------------------------------------------------------------------------------
# Embeddings


class LongformerEmbeddings(nn.Module):
    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.padding_idx = config.pad_token_id
        self.position_style = config.position_style

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        if self.position_style == "roberta":  # HF: real tokens count up from padding_idx + 1
            real = input_ids.ne(self.padding_idx).long()
            positions = torch.cumsum(real, dim=1) * real + self.padding_idx
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


# ----------------------------------------------------------------------------------------------
# Self-attention: local band (+ dilation) for every row, global projections for the global rows


@dataclass(frozen=True)
class AttentionMasks:
    """Masks of one batch, computed once and shared by every layer (no per-layer nonzero())."""

    attention: Tensor  # (B, T) bool, True = real token
    global_mask: Tensor  # (B, T) bool, True = global (and real) token
    global_index: Tensor  # (B, G) long
    global_valid: Tensor  # (B, G) bool
    _block_masks: dict = field(default_factory=dict, repr=False)

    def block_mask(self, window: int, dilation: list[int]):
        """The FlexAttention mask for (window, dilation), built on first use; later layers reuse it."""
        key = (window, tuple(dilation))
        if key not in self._block_masks:
            self._block_masks[key] = longformer_block_mask(
                self.attention, self.global_mask, window=window, dilation=dilation,
                block=int(flex_options().get("tile", FLEX_BLOCK)),
            )  # fmt: skip
        return self._block_masks[key]

    def band_mask(self, window: int, dtype: torch.dtype) -> Tensor:
        """The additive (B or 1, 1, T, T) mask of a short sequence's one dense call
        (``attention.short_band_mask``) in ``dtype``, built on first use; later layers reuse it."""
        key = ("short", window, dtype)
        if key not in self._block_masks:
            self._block_masks[key] = short_band_mask(self.attention, self.global_mask, window, dtype)
        return self._block_masks[key]


def _weights_key(tensors: list[Tensor]) -> tuple | None:
    """Changes whenever one of ``tensors`` is replaced or written to in place (its version counter),
    or moved: what an inference cache derived from them is keyed by. None (never cached) for
    inference tensors (weights created under ``torch.inference_mode``), which keep no version."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)


class LongformerSelfAttention(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.query_global, self.key_global, self.value_global = (nn.Linear(d, d) for _ in range(3))
        self.window = config.windows[layer_id] // 2  # one-sided
        self.dilation = config.dilations[layer_id]
        self.dropout = config.attention_probs_dropout_prob
        # Inference caches, each keyed by the weights' versions (see _weights_key): whether the global
        # projections equal the local ones, and the q, k, v weights and biases side by side.
        self._same_global: tuple[Any, bool] = (None, False)
        self._qkv: tuple[Any, Tensor | None, Tensor | None] = (None, None, None)

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, H, T, Dh)
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, Dh): in CPU bf16 inference one fused matmul with the three weights
        side by side (q, k, v are then strided views of its output, which the CPU flash kernel reads
        as they are), else three linears."""
        parts = (self.query, self.key, self.value)
        if all(type(m) is nn.Linear and m.bias is not None for m in parts) and _fusable(x, self.query.weight):
            key = _weights_key([t for m in parts for t in (m.weight, m.bias)])
            if key is None or self._qkv[0] != key:  # once per version of the weights, not per pass
                self._qkv = (key, torch.cat([m.weight for m in parts]), torch.cat([m.bias for m in parts]))
            qkv = torch.ops.mkldnn._linear_pointwise(x, self._qkv[1], self._qkv[2], "none", [], "")
            return tuple(self._heads(t) for t in qkv.chunk(3, dim=-1))  # type: ignore[return-value]
        return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))

    def _global_rows_are_local(self, T: int) -> bool:
        """Whether the global rows' attention equals their local one, so that it need not be
        computed: every key is in every row's band (T <= w + 1, no dilation), so the global rows see
        the same keys through the local path, and the global projections are the local ones (as in a
        checkpoint converted from BERT/RoBERTa, the default model included). Inference only: with
        autograd the global weights must get their own gradients."""
        if torch.is_grad_enabled() or self.window + 1 < T or max(self.dilation) != 1:
            return False
        pairs = (
            (self.query, self.query_global),
            (self.key, self.key_global),
            (self.value, self.value_global),
        )
        tensors = [t for a, b in pairs for m in (a, b) for t in (m.weight, m.bias)]
        if any(not isinstance(t, Tensor) for t in tensors):  # no bias, or a quantized module
            return False
        key = _weights_key(tensors)  # compared once per version of the weights (0.6 ms per layer)
        if key is None or self._same_global[0] != key:
            same = all(torch.equal(tensors[i], tensors[i + 2]) for i in (0, 1, 4, 5, 8, 9))
            self._same_global = (key, same)
        return self._same_global[1]

    def forward(self, x: Tensor, masks: AttentionMasks) -> Tensor:
        B, T, d = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self._projections(x)
        if p == 0.0 and self._global_rows_are_local(T):
            out = local_attention(
                q, k, v, window=self.window, dilation=self.dilation, attention_mask=masks.attention,
                global_index=masks.global_index, global_valid=masks.global_valid, kernel="band",
            )  # (B, H, T, Dh)  # fmt: skip
            return out.transpose(1, 2).reshape(B, T, d)
        idx = masks.global_index
        G = idx.shape[1]
        x_g = x.gather(1, idx[:, :, None].expand(B, G, d))  # (B, G, d)
        q_g = self._heads(self.query_global(x_g))  # (B, H, G, Dh)
        kernel = choose_kernel(x.device, p, T, self.window, attention_kernel())
        flex = kernel == "flex"
        dense = not flex and dense_band_applies(T, self.window, self.dilation, x.device)
        out = longformer_attention(
            q, k, v, q_g, x, (self.key_global.weight, self.key_global.bias),
            (self.value_global.weight, self.value_global.bias), window=self.window, dilation=self.dilation,
            attention_mask=masks.attention, global_index=idx, global_valid=masks.global_valid, dropout_p=p,
            kernel=kernel, block_mask=masks.block_mask(self.window, self.dilation) if flex else None,
            flex_attention=compiled_flex(x.device.type) if flex else None,
            flex_options=flex_options() if flex else None,
            band_mask=masks.band_mask(self.window, band_mask_dtype(q.dtype)) if dense else None,
        )  # (B, H, T, Dh)  # fmt: skip
        return out.transpose(1, 2).reshape(B, T, d)


class LongformerOutput(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm: HF's ``attention.output`` (from the attention's
    width) and ``output`` (from the feed-forward's), hence ``in_features``."""

    def __init__(self, config: LongformerConfig, in_features: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features or config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        y = self.dropout(linear(x, self.dense))
        # Without autograd, add into the fresh dense output instead of allocating n x d more.
        return self.LayerNorm(y + residual if torch.is_grad_enabled() else y.add_(residual))


class LongformerAttention(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int) -> None:
        super().__init__()
        self.self = LongformerSelfAttention(config, layer_id)
        self.output = LongformerOutput(config, in_features=config.hidden_size)

    def forward(self, x: Tensor, masks: AttentionMasks) -> Tensor:
        return self.output(self.self(x, masks), x)


class LongformerIntermediate(nn.Module):
    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = config.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.dense, self.activation)


class LongformerLayer(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = LongformerAttention(config, layer_id)
        self.intermediate = LongformerIntermediate(config)
        self.output = LongformerOutput(config)

    def forward(self, x: Tensor, masks: AttentionMasks) -> Tensor:
        x = self.attention(x, masks)
        return self.output(self.intermediate(x), x)


class LongformerLayers(nn.Module):
    """HF's ``encoder`` submodule: the stack of layers."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, masks: AttentionMasks) -> Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, masks, use_reentrant=False)
            else:
                x = layer(x, masks)
        return x


class LongformerPooler(nn.Module):
    """Kept so checkpoints round-trip with ``LongformerModel``; the encoder returns hidden states."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


# ----------------------------------------------------------------------------------------------
# Models: shared loading/saving, the encoder, the two task heads


class _PretrainedMixin(nn.Module):
    """from_pretrained / save_pretrained for Hugging Face-format directories."""

    hf_architecture: ClassVar[str]
    prefix: ClassVar[str]  # where the encoder's keys live in a checkpoint of this class
    head_keys: ClassVar[tuple[str, ...]] = ()

    config: LongformerConfig

    def _init_weights(self) -> None:
        for m in self.modules():
            self._init_module(m)

    def _init_module(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        encoder = self if isinstance(self, LongformerEncoder) else self.longformer
        encoder.encoder.gradient_checkpointing = enabled

    @classmethod
    def from_pretrained(
        cls: type[_M],
        path: str | Path,
        *,
        init_missing_head: bool = False,
        config: LongformerConfig | None = None,
    ) -> _M:
        """Load a Hugging Face-format Longformer directory (keys with prefix '', 'longformer.' or
        'roberta.'). A task head missing from the checkpoint is an error unless
        ``init_missing_head`` (then it starts from random weights, as for fine-tuning)."""
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise LongdocError(f"from_pretrained: expected a model directory path, got {path!r}")
        path = Path(path)
        config = config or load_hf_config(path)
        state = load_state_dict(path)
        with torch.device("meta"), _no_random_init():  # weights about to be overwritten: no init at all
            model = cls(config)
        model._load_checked(state, path, init_missing_head)
        return model.eval()

    def _load_checked(self, state: dict[str, Tensor], path: Path, init_missing_head: bool) -> None:
        encoder_state = _strip_prefix(state, path)
        ours = self.state_dict()
        new_state: dict[str, Tensor] = {}
        missing = []
        for key, param in ours.items():
            src = key[len(self.prefix) :] if key.startswith(self.prefix) else None
            value = encoder_state.get(src) if src is not None else state.get(key)
            if value is None:
                missing.append(key)
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise LongdocError(
                    f"{path}: weight {key} has shape {tuple(value.shape)} but config.json implies "
                    f"{tuple(param.shape)}"
                )
            new_state[key] = value.to(param.dtype)
        head_missing = [k for k in missing if k.startswith(self.head_keys)] if self.head_keys else []
        body_missing = [k for k in missing if k not in head_missing and not k.startswith("pooler.")]
        if body_missing:
            shown = ", ".join(body_missing[:3]) + (" ..." if len(body_missing) > 3 else "")
            raise LongdocError(f"{path}: checkpoint lacks {len(body_missing)} encoder weights ({shown})")
        if head_missing and not init_missing_head:
            raise LongdocError(f"{path}: checkpoint has no {self.head_name} head ({head_missing[0]} missing)")
        self.load_state_dict(new_state, strict=False, assign=True)
        # What the checkpoint lacks (a new head, the pooler) starts from fresh random weights.
        fresh = {k.rsplit(".", 1)[0] for k in missing}
        for name, module in self.named_modules():
            if name in fresh:
                module.to_empty(device="cpu", recurse=False)
                self._init_module(module)

    head_name: ClassVar[str] = ""

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors, loadable by transformers' matching class."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict()
        data["architectures"] = [self.hf_architecture]
        (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        umask_mode(path / "model.safetensors")  # safetensors writes it 0600


class LongformerEncoder(_PretrainedMixin):
    """Embeddings + layers; ``forward`` returns the last hidden state (B, T, d)."""

    hf_architecture = "LongformerModel"
    prefix = ""

    def __init__(self, config: LongformerConfig, add_pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = LongformerEmbeddings(config)
        self.encoder = LongformerLayers(config)
        self.pooler = LongformerPooler(config) if add_pooler else None
        self._init_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        global_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_tokens:
            raise LongdocError(
                f"input has {length} tokens but the model's positions allow {self.config.max_tokens}; "
                "split it into windows"
            )
        real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        glob = (
            torch.zeros_like(real) if global_attention_mask is None else global_attention_mask.bool() & real
        )
        index, valid = global_indices(glob)
        masks = AttentionMasks(real, glob, index, valid)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, d)
        return self.encoder(x, masks)


MEAN_LINEAR = "mean-linear"  # config.json longdoc.classifier of a head fitted on a frozen encoder
DOC_LINEAR = "doc-linear"  # ... of one fitted on whole-document features (docfeatures.py)


class LongformerClassificationHead(nn.Module):
    """HF's head: x[:, 0] -> dropout -> dense -> tanh -> dropout -> out_proj.

    With ``longdoc.classifier = "mean-linear"`` in config.json (a head fitted on a frozen
    sentence encoder, see headfit.py) it is linear on the mean of the window's real token states
    instead: mean -> out_proj (``dense`` is kept, unused, so the weights keep HF's layout; transformers'
    own class would pool the first token and so predict differently). With ``longdoc.token_features``
    it adds a linear term on the window's bag of tokens, :func:`token_tfidf` (weights ``token_proj``,
    idf ``token_idf``): embeddings and word statistics in one linear model."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.mean_linear = config.classifier == MEAN_LINEAR
        self.token_proj: nn.Linear | None = None
        if self.mean_linear and (config.extra.get("longdoc") or {}).get("token_features"):
            self.token_proj = nn.Linear(config.vocab_size, config.num_labels, bias=False)
            self.token_idf = nn.Parameter(torch.zeros(config.vocab_size), requires_grad=False)
        self.doc_linear = config.classifier == DOC_LINEAR
        if self.doc_linear:
            # Linear on whole-document feature blocks (docfeatures.py): one weight matrix per block,
            # the bias in out_proj.bias; words: the hashed n-gram columns, their idf and weights.
            spec = (config.extra.get("longdoc") or {}).get("doc_features") or {}
            blocks = [b for b in spec.get("blocks", []) if b != "words"]
            self.doc_blocks = nn.ModuleDict(
                {b: nn.Linear(config.hidden_size, config.num_labels, bias=False) for b in blocks}
            )
            n_cols = int(spec.get("word_columns", 0))
            self.word_proj = nn.Linear(n_cols, config.num_labels, bias=False) if n_cols else None
            if n_cols:
                self.register_buffer("word_columns", torch.zeros(n_cols, dtype=torch.long))
                self.register_buffer("word_idf", torch.zeros(n_cols))

    def doc_logits(self, feats: dict[str, Tensor]) -> Tensor:
        """Doc-linear head: (n_docs, num_labels) from the document blocks (docfeatures.py; ``words``
        as sparse rows over ``word_columns``)."""
        out = self.out_proj.bias.float().expand(next(iter(feats.values())).shape[0], -1).clone()
        for name, proj in self.doc_blocks.items():
            out = out + feats[name].float() @ proj.weight.float().T
        if self.word_proj is not None:
            out = out + torch.sparse.mm(feats["words"].float(), self.word_proj.weight.float().T)
        return out

    def forward(
        self, hidden: Tensor, attention_mask: Tensor | None = None, input_ids: Tensor | None = None
    ) -> Tensor:
        if self.doc_linear:
            raise LongdocError("this classifier's head scores whole documents (doc_logits), not windows")
        if self.mean_linear:
            logits = self.out_proj(self.dropout(masked_mean(hidden, attention_mask)))
            if self.token_proj is not None:
                if input_ids is None:
                    raise LongdocError("this classifier's head needs the input ids (token features)")
                tfidf = token_tfidf(input_ids, attention_mask, self.token_idf)  # (B, V)
                logits = logits + self.token_proj(tfidf.to(logits.dtype))
            return logits
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))
        return self.out_proj(self.dropout(x))


def token_tfidf(input_ids: Tensor, attention_mask: Tensor | None, idf: Tensor) -> Tensor:
    """(B, T) token ids -> (B, V): each row's sublinear TF-IDF, log(1 + count) * idf, L2-normalised
    (scikit-learn's TfidfVectorizer(sublinear_tf=True) over the model's own tokens). Tokens with idf 0
    (specials, tokens unseen in training) do not count."""
    real = (
        torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
    )
    counts = torch.zeros(input_ids.shape[0], idf.shape[0], device=input_ids.device)
    counts.scatter_add_(1, input_ids, real)  # (B, V)
    x = torch.log1p(counts) * idf.float()
    return F.normalize(x, dim=-1)


# torch.nn.init's functions that module constructors call.
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_",
                   "ones_", "constant_")  # fmt: skip


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Module constructors skip their random init. On the meta device the init functions go through
    torch._refs, whose first use imports torch._dynamo: 1.5 s of every command's start-up, for
    weights that are overwritten by the checkpoint's anyway."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _unchanged)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _unchanged(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return tensor


def masked_mean(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T, d) -> (B, d): the mean over real tokens (specials included), as sentence-transformers pools."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    real = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


class LongformerForSequenceClassification(_PretrainedMixin):
    """Returns logits (B, num_labels). With no global mask, the first token is global (as HF)."""

    hf_architecture = "LongformerForSequenceClassification"
    prefix = "longformer."
    head_keys = ("classifier.",)
    head_name = "sequence-classification"

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.longformer = LongformerEncoder(config, add_pooler=False)
        self.classifier = LongformerClassificationHead(config)
        self._init_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        global_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if global_attention_mask is None:
            global_attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            global_attention_mask[:, 0] = True
        hidden = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids)
        return self.classifier(hidden, attention_mask, input_ids)


class LongformerForQuestionAnswering(_PretrainedMixin):
    """Returns (start_logits, end_logits), each (B, T). With no global mask, the tokens before the
    first separator (the question) are global (as HF)."""

    hf_architecture = "LongformerForQuestionAnswering"
    prefix = "longformer."
    head_keys = ("qa_outputs.",)
    head_name = "question-answering"

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.config = config
        self.longformer = LongformerEncoder(config, add_pooler=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        global_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if global_attention_mask is None:
            global_attention_mask = question_global_mask(input_ids, self.config.sep_token_id)
        hidden = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids)
        logits = self.qa_outputs(hidden)  # (B, T, 2)
        return logits[..., 0], logits[..., 1]


def question_global_mask(input_ids: Tensor, sep_token_id: int | None) -> Tensor:
    """True on every token before the first separator of each row (the question)."""
    if sep_token_id is None:
        raise LongdocError("config: sep_token_id is not set, so the question tokens cannot be found")
    is_sep = input_ids.eq(sep_token_id)
    if not bool(is_sep.any(dim=1).all()):
        raise LongdocError("every QA input row needs a separator token after the question")
    first = is_sep.int().argmax(dim=1)  # (B,)
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < first[:, None]


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def read_config_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """The ``config.json`` of the model directory ``path`` as a dict (any model type), read
    bounded; the one place it is parsed. Not there: an error, or ``{}`` unless ``required``."""
    file = path / "config.json"
    if not file.is_file():
        if not required:
            return {}
        if not path.is_dir():
            raise LongdocError(f"{path}: not a directory (expected a model directory with config.json)")
        raise LongdocError(f"{path}: no config.json, so this is not a Hugging Face-format model directory")
    try:
        data = json.loads(read_text_file(str(file), "config.json"))
    except (OSError, ValueError, RecursionError) as e:
        raise LongdocError(f"{file}: cannot read it as JSON ({preview(str(e), 100)})") from e
    if not isinstance(data, dict):
        raise LongdocError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_config(path: Path) -> LongformerConfig:
    """The :class:`LongformerConfig` of a Longformer directory (its ``config.json``)."""
    data = read_config_json(path)
    file = path / "config.json"
    model_type = data.get("model_type")
    if model_type != "longformer":
        hint = " (run `longdoc convert` first)" if model_type in ("bert", "roberta") else ""
        raise LongdocError(f"{file}: model_type is {model_type!r}, not 'longformer'{hint}")
    return LongformerConfig.from_dict(data)


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from model.safetensors, else pytorch_model.bin (``weights_only=True``)."""
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weight file at all
        bad = st if st.is_file() else pt
        raise LongdocError(f"{bad}: cannot read the weights ({str(e).splitlines()[0][:200]})") from e
    raise LongdocError(f"{path}: no model.safetensors or pytorch_model.bin")


def _strip_prefix(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The encoder's weights with their checkpoint prefix ('', 'longformer.' or 'roberta.') removed."""
    for prefix in ("", "longformer.", "roberta."):
        if prefix + "embeddings.word_embeddings.weight" in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    raise LongdocError(
        f"{path}: the weights hold no Longformer encoder (no embeddings.word_embeddings.weight)"
    )


__all__ = [
    "LongformerConfig",
    "LongformerEncoder",
    "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification",
]
