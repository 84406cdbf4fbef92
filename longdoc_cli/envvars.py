"""The environment variables longdoc reads, each validated in one place: a bad value is a one-line
error (exit code 2) naming the variable, never silently read as the default."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from .errors import LongdocError, UsageError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
ATTENTION_CHOICES = ("auto", "band", "flex")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _preview(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...") + (
        f" ({len(value)} characters)" if len(value) > limit else ""
    )


def _bad(name: str, value: str, expected: str) -> LongdocError:
    return UsageError(f"{name}={_preview(value)}: expected {expected}; fix or unset it")


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise _bad(name, value, "1 or 0 (also true/false, yes/no, on/off)")


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, value: str) -> str:
        v = value.strip().lower() or choices[0]
        if v not in choices:
            raise _bad(name, value, "one of " + ", ".join(choices))
        return v

    return parse


def _path(name: str, value: str) -> str | None:
    if "\x00" in value:
        raise _bad(name, value, "a path (it holds a NUL character)")
    return value if value.strip() else None  # empty: unset in effect (the default)


def _model(name: str, value: str) -> str | None:
    if "\x00" in value or "\n" in value:
        raise _bad(name, value, "a model name or directory (it holds a NUL or a line break)")
    return value.strip() or None


def _json_object(name: str, value: str) -> dict[str, Any]:
    if not value.strip():
        return {}
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        raise _bad(name, value, 'a JSON object, e.g. {"BLOCK_M": 64}') from None
    if not isinstance(data, dict):
        raise _bad(name, value, 'a JSON object, e.g. {"BLOCK_M": 64}')
    return data


def _count(low: int) -> Callable[[str, str], int | None]:
    def parse(name: str, value: str) -> int | None:
        v = value.strip()
        if not v:
            return None
        if not (v.isascii() and v.isdigit()) or len(v) > 9 or int(v) < low:
            raise _bad(name, value, f"an integer >= {low}")
        return int(v)

    return parse


# name -> parser(name, raw value); an unset variable is never parsed (the caller's default applies).
VARIABLES: dict[str, Callable[[str, str], Any]] = {
    "LONGDOC_HOME": _path,
    "LONGDOC_MODEL": _model,
    "LONGDOC_DEBUG": _flag,
    "LONGDOC_ATTENTION": _choice(ATTENTION_CHOICES),
    "LONGDOC_FLEX_OPTIONS": _json_object,
    "LONGDOC_COMPILE_MODE": _choice(COMPILE_MODES),
    "LONGDOC_CPU_WORKERS": _count(1),
    # Hugging Face's: where its cache is, and whether the network may be used (`huggingface_hub`'s meaning)
    "HF_HOME": _path,
    "HF_HUB_CACHE": _path,
    "HF_HUB_OFFLINE": _flag,
    # torchrun's, read by `train` only
    "RANK": _count(0),
    "WORLD_SIZE": _count(1),
    "LOCAL_RANK": _count(0),
}
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def env(name: str, default: Any = None) -> Any:
    """The validated value of ``name``, or ``default`` when it is unset (or empty where empty means
    unset). Raises LongdocError (exit code 2) for a bad value."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = VARIABLES[name](name, raw)
    return default if value is None else value


def check_environment(torchrun: bool = False) -> None:
    """Validate every LONGDOC_* variable that is set (and torchrun's with ``torchrun``), so a typo
    is an error at once, whichever command runs."""
    for name in VARIABLES:
        if torchrun or name not in _TORCHRUN:
            env(name)
    if torchrun:
        rank, world = env("RANK", 0), env("WORLD_SIZE", 1)
        if rank >= world:
            raise UsageError(f"RANK={rank} must be less than WORLD_SIZE={world}")
