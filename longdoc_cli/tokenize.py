"""Text -> token windows with character offsets, using the model's own tokenizer (``tokenizers``).

A document is tokenized once, whole, with no special tokens, no truncation and no padding (the
shipped all-MiniLM tokenizer.json truncates at 128 tokens; we switch that off). It is then cut into
windows of at most ``max_tokens`` (the model's longest input, specials included) that overlap by
``stride`` tokens and carry the family's special tokens:

    BERT     [CLS] doc [SEP]                 [CLS] question [SEP] context [SEP]   (types 0.. / 1..)
    RoBERTa  <s> doc </s>                    <s> question </s></s> context </s>   (types all 0)

Global attention, per task: the first token for classification; every token before the first
separator (the question, with [CLS]/<s>) for QA, as Hugging Face does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LongdocError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

_SPECIALS = {"bert": ("[CLS]", "[SEP]", "[PAD]"), "roberta": ("<s>", "</s>", "<pad>")}
_UNKNOWN = {"bert": "[UNK]", "roberta": "<unk>"}


@dataclass(frozen=True)
class Encoding:
    """A whole text's tokens: ids and ``(start, end)`` character offsets into the text (no specials)."""

    ids: list[int]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Window:
    """One model input. ``offsets`` are character offsets into the document (or QA context) for its
    tokens, None for special and question tokens; ``doc_start:doc_end`` is the range of document
    token indices (into ``Encoding.ids``) the window covers; ``question_truncated`` says the
    question was cut to ``max_question_tokens``."""

    input_ids: list[int]
    token_type_ids: list[int]
    global_mask: list[bool]
    offsets: list[tuple[int, int] | None]
    doc_start: int
    doc_end: int
    question_truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class DocumentTokenizer:
    """The model's tokenizer with truncation and padding off, plus windowing for long documents."""

    def __init__(self, tokenizer: Tokenizer, family: str, max_tokens: int) -> None:
        if family not in _SPECIALS:
            raise LongdocError(f"tokenizer family must be 'bert' or 'roberta', not {family!r}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if hasattr(tokenizer, "encode_special_tokens"):  # "[SEP]" or "<s>" in a text is text
            tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.family = family
        self.max_tokens = int(max_tokens)
        ids = []
        for token in _SPECIALS[family]:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise LongdocError(f"the {family} tokenizer has no {token} token in its vocabulary")
            ids.append(i)
        self.cls_id, self.sep_id, self.pad_id = ids
        self.unk_id = tokenizer.token_to_id(_UNKNOWN[family])  # None: byte-level BPE needs none

    @classmethod
    def from_dir(cls, model_dir: str | Path, max_tokens: int | None = None) -> DocumentTokenizer:
        """Load ``tokenizer.json``, else ``vocab.txt`` (BERT WordPiece) or ``vocab.json`` + ``merges.txt``
        (RoBERTa byte-level BPE). ``max_tokens`` defaults to the model config's limit."""
        model_dir = Path(model_dir)
        tokenizer = load_tokenizer(model_dir)
        family = _family_of(tokenizer, model_dir)
        if max_tokens is None:
            max_tokens = _max_tokens_of(model_dir)
        return cls(tokenizer, family, max_tokens)

    # ------------------------------------------------------------------------------------------

    def encode(self, text: str) -> Encoding:
        """All tokens of ``text`` with character offsets into it (no specials, no truncation). A
        long text is encoded in pieces on every core (:func:`encode_in_pieces`), with the same
        result as one call."""
        if len(text) >= PARALLEL_MIN_CHARS:
            enc = encode_in_pieces(self.tokenizer, text)
            if enc is not None:
                return enc
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])

    def unknown_share(self, text: str, enc: Encoding) -> float:
        """The share of ``text``'s non-space characters that only the unknown token stands for (a
        script or symbols the vocabulary lacks, or a 'word' longer than WordPiece reads): 0 to 1."""
        if self.unk_id is None:
            return 0.0

        def visible(a: int, b: int) -> int:
            return len("".join(text[a:b].split()))

        pairs = zip(enc.offsets, enc.ids, strict=True)
        unknown = sum(visible(a, b) for (a, b), i in pairs if i == self.unk_id)
        return min(1.0, unknown / max(1, visible(0, len(text))))

    def _max(self, max_tokens: int | None) -> int:
        m = self.max_tokens if max_tokens is None else int(max_tokens)
        if m > self.max_tokens:
            raise LongdocError(f"max_tokens {m} exceeds the model's limit of {self.max_tokens} tokens")
        return m

    def document_windows(
        self, enc: Encoding, max_tokens: int | None = None, stride: int = 256
    ) -> list[Window]:
        """Windows covering every token of ``enc``; consecutive ones share ``stride`` tokens.
        Global attention on the first token ([CLS] / <s>). An empty encoding gives one window of
        specials only."""
        body = self._max(max_tokens) - 2
        spans = _spans(len(enc), body, stride, "stride")
        windows = []
        for a, b in spans:
            ids = [self.cls_id, *enc.ids[a:b], self.sep_id]
            offsets: list[tuple[int, int] | None] = [None, *enc.offsets[a:b], None]
            glob = [False] * len(ids)
            glob[0] = True
            windows.append(Window(ids, [0] * len(ids), glob, offsets, a, b))
        return windows

    def question_windows(
        self,
        question: str,
        context_enc: Encoding,
        max_tokens: int | None = None,
        doc_stride: int = 256,
        max_question_tokens: int = 64,
    ) -> list[Window]:
        """Question + context windows (context windows overlap by ``doc_stride`` tokens). Global
        attention on every token before the first separator. A question longer than
        ``max_question_tokens`` is cut, and every window says so (``question_truncated``)."""
        q, truncated = self._question_ids(question, max_question_tokens)
        if self.family == "bert":
            head, mid = [self.cls_id, *q, self.sep_id], []
            head_types, ctx_type = [0] * (len(q) + 2), 1
        else:
            head, mid = [self.cls_id, *q, self.sep_id], [self.sep_id]
            head_types, ctx_type = [0] * (len(q) + 2), 0
        prefix = head + mid
        budget = self._max(max_tokens) - len(prefix) - 1  # = context_budget(), without encoding again
        if budget <= 0:
            raise LongdocError(f"the question ({len(q)} tokens) leaves no room for context in a window")
        spans = _spans(len(context_enc), budget, doc_stride, "doc_stride")
        windows = []
        for a, b in spans:
            ids = [*prefix, *context_enc.ids[a:b], self.sep_id]
            types = head_types + [ctx_type] * (len(mid) + (b - a) + 1)
            glob = [i < len(head) - 1 for i in range(len(ids))]  # everything before the first separator
            offsets: list[tuple[int, int] | None] = (
                [None] * len(prefix) + list(context_enc.offsets[a:b]) + [None]
            )
            windows.append(Window(ids, types, glob, offsets, a, b, truncated))
        return windows

    def context_budget(
        self, question: str, max_tokens: int | None = None, max_question_tokens: int = 64
    ) -> int:
        """Context tokens per window beside ``question``: the window less the question (cut to
        ``max_question_tokens``) and its special tokens."""
        q, _ = self._question_ids(question, max_question_tokens)
        specials = 3 if self.family == "bert" else 4  # [CLS] q [SEP] c [SEP] / <s> q </s></s> c </s>
        return self._max(max_tokens) - len(q) - specials

    def _question_ids(self, question: str, max_question_tokens: int) -> tuple[list[int], bool]:
        q = self.tokenizer.encode(question, add_special_tokens=False).ids
        if not q:
            raise LongdocError("the question is empty (no tokens)")
        return q[:max_question_tokens], len(q) > max_question_tokens

    def collate(self, windows: list[Window]) -> dict[str, torch.Tensor]:
        """Pad to the longest window: input_ids, attention_mask, global_attention_mask, token_type_ids
        (all (B, T) int64; masks 1 = real / global)."""
        import torch

        if not windows:
            raise ValueError("collate needs at least one window")
        T = max(len(w) for w in windows)
        B = len(windows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        glob = torch.zeros((B, T), dtype=torch.long)
        types = torch.zeros((B, T), dtype=torch.long)
        for i, w in enumerate(windows):
            n = len(w)
            input_ids[i, :n] = torch.tensor(w.input_ids, dtype=torch.long)
            attention[i, :n] = 1
            glob[i, :n] = torch.tensor(w.global_mask, dtype=torch.long)
            types[i, :n] = torch.tensor(w.token_type_ids, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "global_attention_mask": glob,
            "token_type_ids": types,
        }


# A text this long is encoded in pieces, side by side (tokenizers' encode_batch runs on every core);
# one piece per PIECE_CHARS, each read OVERLAP_CHARS into the next one.
PARALLEL_MIN_CHARS = 100_000
PIECE_CHARS = 50_000
OVERLAP_CHARS = 2_000
_MARGIN_CHARS = 500  # the end of a piece's overlap, where the text it lacks may change its tokens
_MIN_AGREEING = 8  # tokens both pieces must give alike after the seam


def encode_in_pieces(tokenizer: Tokenizer, text: str) -> Encoding | None:
    """``text``'s encoding from pieces encoded in parallel, or None where the pieces cannot be
    joined with certainty (then the caller encodes the text in one call).

    Each piece is cut at a line break or space near its share of the text and runs
    OVERLAP_CHARS into the next piece. At each seam, the two pieces must give the same tokens (ids
    and offsets) from a common token start on, over the whole overlap but its last _MARGIN_CHARS
    (at least _MIN_AGREEING tokens): the earlier piece read that stretch with all its left context,
    the later one with all its right context, so where they agree neither context changed a token.
    The joined encoding takes the earlier piece's tokens before that token, the later piece's from
    it on. Whatever the tokenizer (WordPiece, byte-level BPE, a prefix space added to every piece,
    a word cut in two), a seam where they never agree gives None, never a different encoding."""
    n = len(text)
    k = max(1, round(n / PIECE_CHARS))
    if k < 2:
        return None
    cuts = [0]
    for i in range(1, k):
        cut = _cut_near(text, i * n // k, cuts[-1])
        if cut > cuts[-1]:
            cuts.append(cut)
    cuts.append(n)
    if len(cuts) < 3:
        return None
    ends = [min(n, b + OVERLAP_CHARS) for b in cuts[1:]]
    encodings = tokenizer.encode_batch(
        [text[a:e] for a, e in zip(cuts[:-1], ends, strict=True)], add_special_tokens=False
    )
    # each piece's offsets into the whole text, computed once (a seam reads two pieces)
    shifted = [[(a + c, b + c) for a, b in enc.offsets] for enc, c in zip(encodings, cuts[:-1], strict=True)]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0  # where the current piece's tokens begin (after the previous seam)
    for p, enc in enumerate(encodings):
        p_ids, p_offsets = enc.ids, shifted[p]
        if p == len(encodings) - 1:
            stop = len(p_ids)
            nxt = 0
        else:
            limit = ends[p] - _MARGIN_CHARS
            seam = _seam(p_ids, p_offsets, encodings[p + 1].ids, shifted[p + 1], cuts[p + 1], limit)
            if seam is None:
                return None
            stop, nxt = seam
        if stop < start:
            return None
        ids.extend(p_ids[start:stop])
        offsets.extend(p_offsets[start:stop])
        start = nxt
    return Encoding(ids, offsets)


def _cut_near(text: str, at: int, after: int) -> int:
    """A cut point near ``at`` (and beyond ``after``): just after a line break, else after a space,
    else ``at`` itself (the seam check copes with any cut)."""
    window = text[at : at + 1000]
    for mark in ("\n", " "):
        i = window.find(mark)
        if i >= 0:
            return at + i + 1
    return at if at > after else after


def _seam(
    a_ids: list[int],
    a_offsets: list[tuple[int, int]],
    b_ids: list[int],
    b_offsets: list[tuple[int, int]],
    cut: int,
    limit: int,
) -> tuple[int, int] | None:
    """(i, j): piece A's tokens before i and piece B's from j on join without a change, where A
    (read up to ``limit`` + the margin) and B (from ``cut``) agree from token A[i] = B[j] to the
    last token of A that ends by ``limit``. None where they do not."""
    a_start = {}
    for i in range(len(a_ids) - 1, -1, -1):
        if a_offsets[i][0] < cut:
            break
        a_start[a_offsets[i][0]] = i
    last = len(a_ids)
    while last > 0 and a_offsets[last - 1][1] > limit:
        last -= 1
    for j, (b_start, _) in enumerate(b_offsets):
        if b_start >= limit:
            return None
        i = a_start.get(b_start)
        if i is None or i >= last:
            continue
        k = last - i
        if (
            k >= _MIN_AGREEING
            and a_ids[i:last] == b_ids[j : j + k]
            and a_offsets[i:last] == b_offsets[j : j + k]
        ):
            return i, j
    return None


def _spans(n: int, body: int, overlap: int, name: str) -> list[tuple[int, int]]:
    """[a, b) ranges of ``body`` tokens covering 0..n, consecutive ranges sharing ``overlap``."""
    if body <= 0:
        raise LongdocError(f"windows of {body + 2} tokens leave no room for text")
    if n <= body:
        return [(0, n)]
    if not 0 <= overlap < body:
        raise LongdocError(f"{name} must be >= 0 and < {body} (the text tokens per window), got {overlap}")
    step = body - overlap
    spans = []
    a = 0
    while True:
        b = min(a + body, n)
        spans.append((a, b))
        if b == n:
            return spans
        a += step


# ----------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The directory's tokenizer, truncation and padding off."""
    from tokenizers import Tokenizer

    tj, vocab_txt = model_dir / "tokenizer.json", model_dir / "vocab.txt"
    vocab_json, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    try:
        if tj.is_file():
            tok = Tokenizer.from_file(str(tj))
        elif vocab_txt.is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lower = bool(_tokenizer_config(model_dir).get("do_lower_case", True))
            tok = BertWordPieceTokenizer(str(vocab_txt), lowercase=lower)._tokenizer
        elif vocab_json.is_file() and merges.is_file():
            from tokenizers.implementations import ByteLevelBPETokenizer

            prefix = bool(_tokenizer_config(model_dir).get("add_prefix_space", False))
            tok = ByteLevelBPETokenizer(
                str(vocab_json), str(merges), add_prefix_space=prefix, trim_offsets=True
            )._tokenizer
        else:
            raise LongdocError(
                f"{model_dir}: no tokenizer files (tokenizer.json, vocab.txt, or vocab.json + merges.txt)"
            )
    except LongdocError:
        raise
    except Exception as e:
        raise LongdocError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})") from e
    tok.no_truncation()
    tok.no_padding()
    return tok


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "tokenizer_config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        return {}


def _family_of(tokenizer: Tokenizer, model_dir: Path) -> str:
    vocab_has = tokenizer.token_to_id
    bert = vocab_has("[CLS]") is not None and vocab_has("[SEP]") is not None
    roberta = vocab_has("<s>") is not None and vocab_has("</s>") is not None
    if bert != roberta:
        return "bert" if bert else "roberta"
    cls_token = _tokenizer_config(model_dir).get("cls_token")
    if isinstance(cls_token, dict):
        cls_token = cls_token.get("content")
    if cls_token in ("[CLS]", "<s>"):
        return "bert" if cls_token == "[CLS]" else "roberta"
    raise LongdocError(f"{model_dir}: cannot tell whether the tokenizer is BERT ([CLS]) or RoBERTa (<s>)")


def _max_tokens_of(model_dir: Path) -> int:
    """The longest input (specials included) the model's position table allows."""
    from .model import LongformerConfig, read_config_json

    data = read_config_json(model_dir, required=False)
    model_type = data.get("model_type")
    if model_type == "longformer":
        return LongformerConfig.from_dict(data).max_tokens
    n = data.get("max_position_embeddings")
    if isinstance(n, int):
        if model_type in ("roberta", "xlm-roberta", "camembert"):
            return n - int(data.get("pad_token_id", 1)) - 1
        return n
    m = _tokenizer_config(model_dir).get("model_max_length")
    if isinstance(m, int) and 0 < m < 10**7:
        return m
    raise LongdocError(f"{model_dir}: cannot tell the model's maximum input length (no config.json)")
