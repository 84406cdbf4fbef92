"""Loading a model for a task and running token windows through it in length-sorted batches."""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LongdocError, UsageError
from ..model import (
    LongformerConfig,
    LongformerEncoder,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    load_hf_config,
)
from ..runtime import cpu_pass_workers, pick_device, pick_dtype, reuse_freed_memory
from ..tokenize import DocumentTokenizer, Encoding, Window


@dataclass
class TaskModel:
    """A loaded model with what the tasks need to drive it."""

    model: nn.Module
    head: str  # "encoder" (no task head), "classification" or "qa"
    tokenizer: DocumentTokenizer
    config: LongformerConfig
    device: torch.device
    dtype: torch.dtype
    pooling: str  # how the checkpoint was trained to pool token states: "mean" or "cls"
    path: Path
    max_length: int  # tokens per window, specials included


def load_task_model(
    model_dir: str | Path,
    *,
    task: str,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    max_length: int | None = None,
    max_length_cap: int | None = None,
    attention_window: int | None = None,
    attention_dilation: int | list[Any] | None = None,
) -> TaskModel:
    """Load ``model_dir`` for ``task`` ("classify" or "qa"); a checkpoint with the other task's head
    is refused, one without a head runs zero-shot with its encoder.

    Windows are ``max_length`` tokens (an error above the model's limit), else the model's limit
    lowered to ``max_length_cap`` (a config's value, which may exceed a small model's limit)."""
    if task not in ("classify", "qa"):
        raise UsageError(f"task must be 'classify' or 'qa', not {task!r}")
    model_dir = Path(model_dir)
    config = load_hf_config(model_dir).with_attention_window(attention_window)
    config = config.with_attention_dilation(attention_dilation)
    head = config.head
    wanted = {"classify": "classification", "qa": "qa"}[task]
    if head not in ("encoder", wanted):
        other = "question-answering" if head == "qa" else "sequence-classification"
        raise LongdocError(
            f"{model_dir}: this is a {other} checkpoint; `longdoc {task}` needs a "
            f"{'sequence-classification' if task == 'classify' else 'question-answering'} checkpoint "
            "or a plain encoder (zero-shot)"
        )
    cls = {"encoder": LongformerEncoder, "classification": LongformerForSequenceClassification,
           "qa": LongformerForQuestionAnswering}[head]  # fmt: skip
    model = cls.from_pretrained(model_dir, config=config)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, task, quantize)
    model = model.to(device=dev, dtype=dt).eval()
    if quantize == "int8":
        from ..quantize import quantize_int8

        model = quantize_int8(model)
    elif quantize != "none":
        raise UsageError(f"--quantize must be none or int8, not {quantize!r}")
    tokenizer = DocumentTokenizer.from_dir(model_dir)
    limit = min(tokenizer.max_tokens, config.max_tokens)
    length = int(max_length) if max_length is not None else min(limit, max_length_cap or limit)
    if not 8 <= length <= limit:
        raise UsageError(f"--max-length {length}: must be between 8 and the model's limit of {limit} tokens")
    return TaskModel(model, head, tokenizer, config, dev, dt, config.pooling, model_dir, length)


def in_memory_task_model(
    model: nn.Module, tokenizer: DocumentTokenizer, head: str, max_length: int
) -> TaskModel:
    """A :class:`TaskModel` around a model already in memory (training's dev evaluation)."""
    p, config = next(model.parameters()), model.config
    length = min(max_length, config.max_tokens, tokenizer.max_tokens)
    return TaskModel(
        model, head, tokenizer, config, p.device, p.dtype, config.pooling, Path("<memory>"), length
    )


def run_windows(tm: TaskModel, windows: Sequence[Window], batch_size: int) -> Iterator[tuple[int, Any]]:
    """Yield (window index, output) for every window, batching windows of similar length.

    Output per head: encoder -> token states (T, d) float32 on CPU; classification -> logits
    (num_labels,); qa -> (start_logits (T,), end_logits (T,)). T is the window's own length.
    On the CPU, several passes run side by side (:func:`runtime.cpu_pass_workers`), and freed
    activations are kept between passes (:func:`runtime.reuse_freed_memory`).
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    chunks = list(_batches(order, [len(w) for w in windows], batch_size))
    workers = cpu_pass_workers(tm.device.type, len(chunks))
    with reuse_freed_memory() if len(chunks) > 1 else contextlib.nullcontext():
        if workers > 1:
            passes = _side_by_side(tm, windows, chunks, workers)
        else:
            passes = ((chunk, _forward(tm, windows, chunk)) for chunk in chunks)
        for chunk, out in passes:
            for row, i in enumerate(chunk):
                n = len(windows[i])
                if tm.head == "encoder":
                    yield i, out[row, :n].float().cpu()
                elif tm.head == "classification":
                    yield i, out[row].float().cpu()
                else:
                    yield i, (out[0][row, :n].float().cpu(), out[1][row, :n].float().cpu())


def _forward(tm: TaskModel, windows: Sequence[Window], chunk: list[int]) -> Any:
    """One inference pass over the windows ``chunk`` (indices into ``windows``), padded together."""
    batch = {k: v.to(tm.device) for k, v in tm.tokenizer.collate([windows[i] for i in chunk]).items()}
    with torch.inference_mode():
        return tm.model(
            batch["input_ids"], batch["attention_mask"], batch["global_attention_mask"],
            batch["token_type_ids"] if tm.config.type_vocab_size > 1 else None,
        )  # fmt: skip


def _side_by_side(
    tm: TaskModel, windows: Sequence[Window], chunks: list[list[int]], workers: int
) -> Iterator[tuple[list[int], Any]]:
    """(chunk, output) for every chunk, in order, the passes run by ``workers`` threads at once, each
    with its share of torch's threads (the GIL is released inside every op). Two passes of one
    thread each instead of one pass of two threads: no OpenMP fork/join and barrier per op. On the
    2-core AMX CPU, shared with other jobs (load 5), the passes took 0.54x the wall time and CPU
    time in bf16, 0.64x in fp32; the outputs were the same numbers (``torch.equal``); the peak
    memory grows by one pass's activations per extra worker (benchmarks/README.md, "Passes side by
    side")."""
    threads = torch.get_num_threads()
    per_worker = max(1, threads // workers)
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="longdoc-pass", initializer=torch.set_num_threads, initargs=(per_worker,)
    )
    ahead: collections.deque[tuple[list[int], Future]] = collections.deque()
    # This thread's own ops (each window's states to fp32, the caller's pooling between yields) run on
    # one thread while the workers hold the cores: with all of torch's threads, each small op waited
    # for cores the passes held (the 1 MB document, bf16: 833 `.float()` and 833 `.mean()` of 256 x 384
    # took 1.6 s each, 2 ms apiece against 0.03 ms on an idle core; benchmarks/README.md, "The floor of
    # CPU inference here"). Element-wise ops and a mean over the tokens give the same numbers on any
    # number of threads.
    torch.set_num_threads(1)
    try:
        todo = iter(chunks)
        for chunk in itertools.islice(todo, 2 * workers):  # a pass or two queued per worker
            ahead.append((chunk, pool.submit(_forward, tm, windows, chunk)))
        while ahead:
            chunk, future = ahead.popleft()
            out = future.result()
            following = next(todo, None)
            if following is not None:
                ahead.append((following, pool.submit(_forward, tm, windows, following)))
            yield chunk, out
    finally:
        for _, future in ahead:
            future.cancel()
        pool.shutdown(wait=True)
        # This thread's count was set to 1 above, and a worker's set_num_threads also became torch's
        # default for threads started later. Put the default back.
        torch.set_num_threads(threads)


# Short windows (zero-shot passages, sentences) go more than ``batch_size`` to a forward pass, up to
# this many tokens: 31 passages of 256 tokens took 0.70x the CPU time in bf16 at 16 per pass as at 4
# (fp32: 0.92x; one thread, benchmarks/README.md "bf16 by default"). Long windows keep ``batch_size``.
BATCH_TOKENS = 4096


def _batches(order: list[int], lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (indices sorted by length): ``batch_size`` windows, or more while
    the batch, padded to its longest window, holds at most BATCH_TOKENS tokens."""
    chunk: list[int] = []
    for i in order:
        if chunk and len(chunk) >= batch_size and (len(chunk) + 1) * lengths[i] > BATCH_TOKENS:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def pool(states: Tensor, pooling: str) -> Tensor:
    """One vector for a window's token states (T, d): the mean (sentence-transformers style, specials
    included) or the first token."""
    return states.mean(dim=0) if pooling == "mean" else states[0]


def embed_texts(tm: TaskModel, texts: Sequence[str], batch_size: int) -> Tensor:
    """L2-normalised embeddings (len(texts), d) of short texts (labels, passages, questions).

    A text longer than one window is embedded as the token-weighted mean of its windows."""
    return embed_encodings(tm, [tm.tokenizer.encode(text) for text in texts], batch_size)


def embed_encodings(
    tm: TaskModel,
    encodings: Sequence[Encoding],
    batch_size: int,
    on_window: Callable[[int, Window, Tensor], None] | None = None,
) -> Tensor:
    """:func:`embed_texts` of texts already encoded; ``on_window(text index, window, token states)``
    is called with each window's output as it comes (the token states of its rows, specials
    included)."""
    windows: list[Window] = []
    owner: list[int] = []
    stride = min(64, (tm.max_length - 2) // 2)
    for t, enc in enumerate(encodings):
        for w in tm.tokenizer.document_windows(enc, tm.max_length, stride):
            windows.append(w)
            owner.append(t)
    sums = torch.zeros(len(encodings), tm.config.hidden_size)
    weights = torch.zeros(len(encodings), 1)
    for i, states in run_windows(tm, windows, batch_size):
        sums[owner[i]] += pool(states, tm.pooling) * len(windows[i])
        weights[owner[i]] += len(windows[i])
        if on_window is not None:
            on_window(owner[i], windows[i], states)
    return F.normalize(sums / weights.clamp(min=1), dim=-1)


def window_overlap(option: str, value: int, limit: int, strict: bool) -> int:
    """The tokens consecutive windows share: at most ``limit`` (half a window's text, so that windows
    advance). A larger value given by the user (``strict``) is an error; a default is capped."""
    if value < 0:
        raise UsageError(f"{option} {value}: must be at least 0")
    if value > limit and strict:
        raise UsageError(
            f"{option} {value}: consecutive windows can share at most {limit} tokens at this --max-length",
        )
    return min(value, limit)


def batched(
    items: Sequence[Any] | Iterator[Any], size: int, idle_s: float | None = None
) -> Iterator[list[Any]]:
    """Lists of up to ``size`` items. With ``idle_s``, items are read ahead in a thread and a
    shorter list is given as soon as no new item came for ``idle_s`` seconds: what was read is
    processed at once, not held back behind a slow or blocked input (a pipe that waits)."""
    if idle_s is None:
        chunk: list[Any] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    yield from _batched_ahead(iter(items), size, idle_s)


_END = object()


def _batched_ahead(items: Iterator[Any], size: int, idle_s: float) -> Iterator[list[Any]]:
    ahead: queue.Queue = queue.Queue(maxsize=2 * size)  # bounded: the reader stays a batch or two ahead
    stop = threading.Event()

    def read() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ahead.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            ahead.put((_END, e))

    threading.Thread(target=read, name="longdoc-read-ahead", daemon=True).start()
    chunk: list[Any] = []
    try:
        while True:
            try:
                item, error = ahead.get(timeout=idle_s if chunk else 1.0)
            except queue.Empty:  # the input is slow: process what there is
                if chunk:
                    yield chunk
                    chunk = []
                continue
            if item is _END:
                if chunk:
                    yield chunk
                if error is not None:
                    raise error
                return
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    finally:
        stop.set()
