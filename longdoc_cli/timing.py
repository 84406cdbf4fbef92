"""What a run processed and how long it took: the counts, the load and compute times, the device,
and the one summary line the commands print on stderr (`--timings` also puts them in the output).

Times are wall-clock (``time.perf_counter``). ``load_s`` is resolving and loading the model (and,
zero-shot, embedding the labels; for evaluate also reading the data); ``compute_s`` the documents'
own time: tokenization, forward passes and decoding, not waiting for input or writing results
(train: from the first step to the end; convert: the conversion); ``total_s`` the whole command.
Throughput is over ``compute_s``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_label(dtype: Any) -> str:
    """'fp32', 'bf16', 'fp16' for a torch dtype (its str otherwise)."""
    return DTYPE_NAMES.get(str(dtype), str(dtype))


class Stopwatch:
    """Seconds since it was made (or last :meth:`restart`)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def restart(self) -> float:
        """The seconds so far, and start again from now."""
        now = time.perf_counter()
        elapsed, self.t0 = now - self.t0, now
        return elapsed


@contextmanager
def timed(stats: RunStats, what: str) -> Iterator[None]:
    """Add the block's wall time to ``stats.load_s`` or ``stats.compute_s`` (``what``)."""
    watch = Stopwatch()
    try:
        yield
    finally:
        setattr(stats, what, getattr(stats, what) + watch.seconds)


@dataclass
class RunStats:
    """One command's run. Counts that do not apply stay 0 and are left out of the line."""

    command: str
    device: str = ""
    dtype: str = ""
    documents: int = 0
    questions: int = 0  # qa: answers given (questions x documents)
    windows: int = 0
    tokens: int = 0
    failed: int = 0  # documents that could not be processed
    skipped: int = 0  # bad input records skipped (--skip-bad-lines)
    load_s: float = 0.0
    compute_s: float = 0.0
    total_s: float | None = None  # train, convert: the whole run
    steps: int | None = None  # train: optimizer steps run
    extra: dict[str, Any] = field(default_factory=dict)  # command-specific figures, shown as "key value"

    def rates(self) -> dict[str, float]:
        """Throughput over the compute time: tokens/s, documents/s (and steps/s for train)."""
        if self.compute_s <= 0:
            return {}
        out = {}
        for name, n in (
            ("tokens", self.tokens),
            ("documents", self.documents),
            ("questions", self.questions),
        ):
            if n:
                out[f"{name}_per_s"] = n / self.compute_s
        return out

    def to_dict(self) -> dict[str, Any]:
        """The summary record (``{"summary": ...}`` in the output with ``--timings``)."""
        out: dict[str, Any] = {"command": self.command, "device": self.device, "dtype": self.dtype}
        for name in ("documents", "questions", "windows", "tokens", "failed", "skipped"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        out["load_s"] = round(self.load_s, 4)
        out["compute_s"] = round(self.compute_s, 4)
        if self.total_s is not None:
            out["total_s"] = round(self.total_s, 4)
        if self.steps is not None:
            out["steps"] = self.steps
            if self.steps:
                out["s_per_step"] = round(self.compute_s / self.steps, 4)
        out.update({k: round(v, 3) for k, v in self.rates().items()})
        out.update(self.extra)
        return out

    def line(self) -> str:
        """One line: what was processed; load, compute (and total) time; throughput; device."""
        counts = [
            f"{n:,} {name if n != 1 else name[:-1]}"
            for name, n in (
                ("documents", self.documents),
                ("questions", self.questions),
                ("windows", self.windows),
                ("tokens", self.tokens),
            )  # fmt: skip
            if n
        ]
        if self.failed:
            counts.append(f"{self.failed:,} failed")
        if self.skipped:
            counts.append(f"{self.skipped:,} bad records skipped")
        parts = [", ".join(counts) or ("" if self.extra else "nothing processed")]
        times = [f"load {seconds(self.load_s)}"] if self.load_s > 0 else []
        times.append(f"compute {seconds(self.compute_s)}")
        if self.total_s is not None:
            times.append(f"total {seconds(self.total_s)}")
        if self.steps:
            times.append(f"{seconds(self.compute_s / self.steps)}/step")
        parts.append(", ".join(times))
        rates = self.rates()
        shown = [f"{rates[k]:,.0f} tokens/s" for k in ("tokens_per_s",) if k in rates]
        shown += [
            f"{rates[k]:.2f} {k.split('_')[0]}/s"
            for k in ("documents_per_s", "questions_per_s")
            if k in rates
        ]
        if shown:
            parts.append(", ".join(shown))
        parts += [f"{k.replace('_', ' ')} {v}" for k, v in self.extra.items()]
        parts.append(" ".join(x for x in (self.device, self.dtype) if x))
        return f"{self.command}: " + " | ".join(p for p in parts if p)


def seconds(s: float) -> str:
    """'0.042 s', '3.21 s', '2m05s'."""
    if s >= 60:
        whole = round(s)
        return (
            f"{whole // 3600}h{whole // 60 % 60:02d}m"
            if whole >= 3600
            else f"{whole // 60}m{whole % 60:02d}s"
        )
    return f"{s:.3f} s" if s < 1 else f"{s:.2f} s"
