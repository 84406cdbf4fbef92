"""The sweep, described as data: a :class:`BenchSpec` from flags or a YAML file (configs/bench.yaml),
each value converted by config.py's converter (the rules every YAML key follows), every problem
reported at once naming its key."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEVICE_PATTERN, convert_value
from ..errors import LongdocError, UsageError

IMPLS = ("longdoc", "longdoc-int8", "longdoc-compiled", "hf", "bert", "full", "longdoc-attn")
DTYPES = ("auto", "fp32", "bf16", "fp16")
MODES = ("infer", "train")


# ----------------------------------------------------------------------------------------------
# The sweep, described as data


@dataclass(frozen=True)
class BenchSpec:
    """One sweep. YAML keys = these field names; list fields also accept a single value."""

    models: tuple[str, ...] = ("base",)  # base | large | tiny | a model path or name
    seq_lens: tuple[int, ...] = (4096,)
    batch_sizes: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("auto",)  # auto = bf16 on CUDA and on CPUs with native bf16, else fp32
    modes: tuple[str, ...] = ("infer",)  # train = forward + backward
    impls: tuple[str, ...] = ("longdoc", "hf", "full")
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    globals: int = 1  # the first G tokens of every row are global
    layers: int | None = None  # override the depth (time is linear in layers)
    dilation: int | None = None  # every layer's and head's attention dilation (None: the model's)
    warmup: int = 1
    iters: int = 5
    rounds: int = 1  # the whole grid this many times, round-robin; each row pools its rounds' runs
    check: bool = True  # the correctness gate before timing
    check_len: int = 1024  # length of the model-vs-transformers check (capped by the model)
    isolate: bool = True  # one child process per measurement (peak memory, OOM safety)
    time_budget: float = 300.0  # seconds per measurement; longer baselines are skipped or cut short
    allow_download: bool = False  # for model names that resolve through the hub cache

    def validate(self) -> BenchSpec:
        problems = []
        if not self.models:
            problems.append("models: give at least one model")
        if not self.seq_lens:
            problems.append("seq_lens: give at least one length")
        for n in self.seq_lens:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                problems.append(f"seq_lens: {n!r} is not a positive whole number of tokens")
        for b in self.batch_sizes:
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
                problems.append(f"batch_sizes: {b!r} is not a positive whole number")
        problems += [
            f"dtypes: {d!r} is not one of {', '.join(DTYPES)}" for d in self.dtypes if d not in DTYPES
        ]
        problems += [f"modes: {m!r} is not one of {', '.join(MODES)}" for m in self.modes if m not in MODES]
        problems += [f"impls: {i!r} is not one of {', '.join(IMPLS)}" for i in self.impls if i not in IMPLS]
        if not self.impls:
            problems.append("impls: give at least one implementation")
        if self.globals < 0:
            problems.append(f"globals: {self.globals} is negative")
        if self.layers is not None and self.layers <= 0:
            problems.append(f"layers: {self.layers} is not a positive number of layers")
        if self.dilation is not None and self.dilation < 1:
            problems.append(f"dilation: {self.dilation} must be at least 1")
        if self.warmup < 0 or self.iters < 1:
            problems.append(f"warmup {self.warmup} / iters {self.iters}: need warmup >= 0 and iters >= 1")
        if self.rounds < 1:
            problems.append(f"rounds: {self.rounds} is not a positive number of rounds")
        if self.check_len < 2:
            problems.append(f"check_len: {self.check_len} is too short")
        if self.time_budget <= 0:
            problems.append(f"time_budget: {self.time_budget} is not a positive number of seconds")
        if not DEVICE_PATTERN.fullmatch(self.device):
            problems.append(f"device: {self.device!r} is not auto, cpu, cuda, cuda:N or mps")
        if problems:
            raise UsageError("; ".join(problems))
        return self


_LIST_FIELDS = {"models": str, "seq_lens": int, "batch_sizes": int, "dtypes": str, "modes": str, "impls": str}
_SCALAR_FIELDS = {"device": str, "globals": int, "layers": int, "dilation": int, "warmup": int, "iters": int,
                  "rounds": int, "check": bool, "check_len": int, "isolate": bool, "time_budget": float,
                  "allow_download": bool}  # fmt: skip


_KIND = {int: "a whole number", str: "a string", float: "a number", bool: "true or false"}


def spec_from_dict(data: dict[str, Any], source: str = "config") -> BenchSpec:
    """A validated spec from plain data; every problem is reported at once, naming its key."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of bench options, got {type(data).__name__}")
    names = list(_LIST_FIELDS) + list(_SCALAR_FIELDS)
    values: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(names)})"
            problems.append(f"{source}: {key}: unknown key{hint}")
            continue
        want = _LIST_FIELDS.get(key) or _SCALAR_FIELDS[key]
        items = value if isinstance(value, list) else [value]
        if key in _SCALAR_FIELDS and isinstance(value, list):
            problems.append(f"{source}: {key}: expected {_KIND[want]}, got a list")
            continue
        if key in ("layers", "dilation") and value is None:
            values[key] = None
            continue
        converted = []
        for item in items:
            try:
                converted.append(convert_value(item, want))
            except ValueError:
                problems.append(f"{source}: {key}: {item!r} is not {_KIND[want]}")
        if len(converted) == len(items):
            values[key] = tuple(converted) if key in _LIST_FIELDS else converted[0]
    try:
        spec = BenchSpec(**values).validate()
    except LongdocError as e:
        problems += [f"{source}: {p}" for p in str(e).split("; ")]
    if problems:
        raise UsageError("; ".join(problems))
    return spec


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep's data with ``key=value`` pairs (``bench --set``) applied, each value read as YAML
    as config.py reads ``--set`` (``seq_lens=[1024, 4096]``); validated with the rest by
    :func:`spec_from_dict`."""
    from ..config import _parse_scalar

    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, for example check_len=64")
        key, text = item.split("=", 1)
        out[key.strip().removeprefix("--")] = _parse_scalar(text)
    return out


def load_spec(path: str | Path) -> BenchSpec:
    """A spec from a YAML file (e.g. configs/bench.yaml), read as configs are (bounded, strict,
    aliases on a budget)."""
    from ..config import read_yaml

    return spec_from_dict(read_yaml(Path(path)) or {}, source=str(path))


def parse_lengths(text: str) -> tuple[int, ...]:
    """'1024,4096' -> (1024, 4096); a bad or non-positive length is a usage error."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:  # '4k' = 4096
            n = int(part[:-1]) * 1024 if part[-1] in "kK" else int(part)
        except ValueError:
            raise UsageError(f"--seq-lens: {part!r} is not a whole number of tokens") from None
        if n <= 0:
            raise UsageError(f"--seq-lens: {n} is not a positive length")
        out.append(n)
    if not out:
        raise UsageError("--seq-lens: give at least one length")
    return tuple(out)
