"""The `longdoc` command line: parse options, call the library, render results.

Results go to stdout (a rich table on a TTY, JSON lines when piped or with --format); progress,
logs and warnings go to stderr. Errors are one line on stderr with exit code 1 (2 for usage and
config errors), or a full traceback with LONGDOC_DEBUG=1. Heavy imports (torch, transformers)
happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal

import typer
import typer.core

from . import __version__
from .config import InferenceSection, TokenizationSection
from .errors import LongdocError, UsageError, is_out_of_memory


def _usage_error_types() -> tuple[type[Exception], ...]:
    """The base class of usage errors: ``TyperException`` where Typer vendors click, else click's."""
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


# The main jobs first in `longdoc --help`; the others in the order they are defined.
FIRST_COMMANDS = ("classify", "qa")


def _plain_flags(params: list[Any]) -> list[Any]:
    """On/off flags shown without a ``<bool>`` metavar in the help (they take no value)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _LongdocGroup(typer.core.TyperGroup):
    """Usage errors (unknown option, `--iters abc`, ...) as one ``longdoc: error:`` line on stderr
    with exit code 2, like every other error, instead of Typer's boxed panel. Typer and click handle
    the error themselves in standalone mode, so the app runs non-standalone here and exits itself.
    The help lists classify and qa first and shows flags without a ``<bool>`` metavar."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in FIRST_COMMANDS if n in names] + [n for n in names if n not in FIRST_COMMANDS]

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            code = rv if isinstance(rv, int) else 0  # an Exit's code; commands return None
        except typer.Abort:
            typer.echo("longdoc: aborted", err=True)
            code = 1
        except _usage_error_types() as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one (`longdoc` alone) printed the help
                typer.echo(f"longdoc: error: {bounded(usage_error_line(e))}", err=True)
            code = e.exit_code
        if not standalone_mode:
            return code
        sys.exit(code)


class _LongdocCommand(typer.core.TyperCommand):
    """A command whose help shows flags (--help included) without a ``<bool>`` metavar."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Typer(typer.Typer):
    """Typer whose commands are :class:`_LongdocCommand`."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _LongdocCommand, **kwargs)


def usage_error_line(error: Exception) -> str:
    """One line for a click error: its message, then where the help is."""
    line = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        line += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return line


app = _Typer(
    cls=_LongdocGroup,
    name="longdoc",
    help="Classify long documents and answer questions over them with a Longformer encoder.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"longdoc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Classify long documents and answer questions over them with a Longformer encoder."""
    from .envvars import check_environment

    with errors():
        check_environment()


# ----------------------------------------------------------------------------------------------
# Shared plumbing: errors, stderr console, output of records


def debug_enabled() -> bool:
    from .envvars import env

    try:
        return env("LONGDOC_DEBUG", False)
    except LongdocError:  # reported by _root's check
        return False


# An error line longer than this is cut (a bad value's preview must not flood the terminal).
MAX_ERROR_LINE = 1000
MAX_ERROR_LINES = 50


def bounded(message: str) -> str:
    """``message`` with each line cut to about MAX_ERROR_LINE characters (its start and its end) and
    at most MAX_ERROR_LINES lines."""
    lines = message.splitlines() or [""]
    head, tail = MAX_ERROR_LINE * 2 // 3, MAX_ERROR_LINE // 3  # the end often says what is wrong
    cut = [
        line
        if len(line) <= MAX_ERROR_LINE
        else f"{line[:head]} ...[{len(line) - head - tail} characters]... {line[-tail:]}"
        for line in lines[:MAX_ERROR_LINES]
    ]
    if len(lines) > MAX_ERROR_LINES:
        cut.append(f"... {len(lines) - MAX_ERROR_LINES} more line(s)")
    return "\n".join(cut)


def exit_code(error: LongdocError) -> int:
    """2 for a usage error (a bad option, argument, config or environment variable), else 1."""
    return 2 if isinstance(error, UsageError) else 1


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr (bounded) and return the Exit to raise."""
    typer.echo(f"longdoc: error: {bounded(message)}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr and an exit code (traceback with LONGDOC_DEBUG=1)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except LongdocError as e:
        if debug_enabled():
            raise
        raise fail(str(e), exit_code(e)) from None
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        typer.echo("longdoc: interrupted", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise typer.Exit(0) from None
    except (OSError, MemoryError, RuntimeError, ValueError, OverflowError) as e:  # and RecursionError
        if debug_enabled():
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_out_of_memory(e):
            text = f"out of memory ({text[:160]}); try a smaller batch or shorter inputs"
        raise fail(f"{type(e).__name__}: {text}") from None
    except Exception as e:  # a bug of longdoc's: still one line (the traceback with LONGDOC_DEBUG=1)
        if debug_enabled():
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise fail(f"internal error {type(e).__name__}: {text[:300]} (LONGDOC_DEBUG=1 shows where)") from None


def _quiet_broken_pipe() -> None:
    # `longdoc ... | head`: the reader went away; silence Python's flush error at exit.
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def stderr_console(quiet: bool = False):
    """A rich console on stderr (colour off with NO_COLOR or when not a TTY)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, no_color=bool(os.environ.get("NO_COLOR")) or None)


def stdout_console():
    """A rich console for results: the terminal's width, or wide enough for whole tables in a file."""
    from rich.console import Console

    wide = None if sys.stdout.isatty() else 240
    console = Console(width=wide, no_color=bool(os.environ.get("NO_COLOR")) or None)
    console.on_broken_pipe = _results_pipe_closed  # rich's own handler exits with 1
    return console


def _results_pipe_closed() -> None:
    """`longdoc ... | head`: the reader has what it wanted; quiet, exit 0 (as for JSON lines)."""
    _quiet_broken_pipe()
    raise typer.Exit(0)


def output_format(fmt: str | None, allowed: tuple[str, ...] = ("table", "jsonl", "json", "tsv")) -> str:
    """'table' on a TTY, else 'jsonl', unless --format says otherwise (one of ``allowed``)."""
    if fmt:
        if fmt not in allowed:
            choices = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise UsageError(f"--format must be {choices}, not {fmt!r}")
        return fmt
    return "table" if sys.stdout.isatty() else "jsonl"


# The commands whose result is one report (bench, evaluate, models): a table or JSON, no TSV.
REPORT_FORMATS = ("table", "json", "jsonl")


def write_jsonl(record: dict[str, Any]) -> None:
    """One JSON object per line, flushed at once so pipelines see results as they come."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# Options shared by the commands (one definition each; one name per setting everywhere)

_MODEL_HELP = "default, a model directory (Longformer, or BERT/RoBERTa converted on the fly) or a hub id."
_INF, _TOK = InferenceSection(), TokenizationSection()


def _default(value: Any, path: str) -> str:
    """The effective default of an option that comes from the config: ``[default: VALUE, PATH]``."""
    shown = "none" if value is None else value
    return f" [default: {shown}, config {path}]"


Format = Literal["table", "jsonl", "json", "tsv"]
ReportFormat = Literal["table", "json", "jsonl"]
Aggregate = Literal["mean", "max", "first"]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Quantize = Literal["none", "int8"]
BenchMode = Literal["infer", "train"]
InputFormat = Literal["auto", "text", "lines", "jsonl"]  # tasks.inputs.INPUT_FORMATS
DEVICES = ("auto", "cpu", "cuda", "cuda:0", "mps")


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in DEVICES if d.startswith(incomplete)]


_PATHS = typer.Argument(None, help="Text files, - for stdin, directories (with -r), .jsonl files.")
_MODEL = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Default: $LONGDOC_MODEL, else default.")
_ALLOW_DOWNLOAD = typer.Option(
    False,
    "--allow-download",
    help="Allow fetching a hub model (one in the Hugging Face cache needs no flag).",
)
_CONFIG = typer.Option(
    None, "--config", "-c", help="YAML config (default: the model's longdoc.yaml); options override it."
)
_SET = typer.Option(
    [], "--set", help="Override a config key: section.key=value (repeatable), e.g. inference.top_k=5."
)
_RECURSIVE = typer.Option(False, "--recursive", "-r", help="Read the files under directories.")
_TEXT_KEY = typer.Option(None, "--text-key", help="JSON-lines key holding the text. [default: text]")
_ID_KEY = typer.Option(None, "--id-key", help="JSON-lines key holding the document id. [default: id]")
_BATCH_SIZE = typer.Option(
    None, "--batch-size", help="Windows per forward pass." + _default(_INF.batch_size, "inference.batch_size")
)
_MAX_LENGTH = typer.Option(
    None,
    "--max-length",
    help="Tokens per window, specials included. [default: the model's limit, capped by model.max_length]",
)
_STRIDE = typer.Option(
    None,
    "--stride",
    help="Tokens shared by consecutive windows." + _default(_TOK.stride, "tokenization.stride"),
)
_DEVICE = typer.Option(
    None,
    "--device",
    help="auto (CUDA when available), cpu, cuda, cuda:N or mps. [default: auto, from model.device]",
    autocompletion=_complete_device,
)
_DTYPE = typer.Option(
    None,
    "--dtype",
    help="Weights and activations. [default: auto: bf16 on a GPU and on a CPU with native bf16, else fp32]",
)
_QUANTIZE = typer.Option(
    None, "--quantize", help="int8: CPU, opt-in, faster but less accurate (README). [default: none]"
)
_SHARD = typer.Option(None, "--shard", help="K/N: process every N-th document starting at K.")
_FMT = typer.Option(None, "--format", "-f", help="[default: table on a TTY, else jsonl]")
_REPORT_FMT = typer.Option(None, "--format", "-f", help="[default: table on a TTY, else JSON]")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress, summary line or warnings on stderr.")
_MAX_BYTES = typer.Option(
    None, "--max-bytes", help="Largest document (or JSON-lines record) read, e.g. 64M or 1G. [default: 64M]"
)
_INPUT_FORMAT = typer.Option(
    "auto",
    "--input-format",
    help="text: a document per file; lines: a document per line; auto: .jsonl files "
    "and stdin starting with '{' (or with --text-key) are JSON lines, the rest text.",
)
_SKIP_BAD = typer.Option(
    False, "--skip-bad-lines", help="Skip bad JSON-lines/lines records (counted, exit 0) instead of failing."
)
_TIMINGS = typer.Option(
    False, "--timings", help="Add each record's seconds, and a final summary record (jsonl, json)."
)


# ----------------------------------------------------------------------------------------------
# Models: convert, models/env


@app.command(
    epilog="Examples: `longdoc convert ./bert-base ./bert-long --max-positions 8192` · "
    "`longdoc convert ./minilm ./minilm-dilated --dilation '[1,1,2,2,4,4]'` (per layer)"
)
def convert(
    src: str = typer.Argument(..., help="A Hugging Face BERT or RoBERTa directory with its tokenizer."),
    out: str = typer.Argument(..., help="New directory for the Longformer (must not exist or be empty)."),
    max_positions: int = typer.Option(
        4096, "--max-positions", help="Longest input of the result in tokens, special tokens included."
    ),
    attention_window: int = typer.Option(
        512, "--attention-window", help="Two-sided local attention width in tokens (512 = 256 each side)."
    ),
    dilation: str | None = typer.Option(
        None,
        "--dilation",
        help="Attention dilation saved in config.json: an int, a list per layer ('[1,2,...]'), or per layer "
        "per head ('[[1,2,...],...]'). [default: 1]",
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty OUT (replaces same-named files, keeps the rest)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr unless it fails."),
) -> None:
    """Turn a short-context BERT/RoBERTa checkpoint into a Longformer (positions copied, global
    projections from the local ones, tokenizer length raised)."""

    with errors():
        from .config import parse_dilation
        from .convert import convert_checkpoint
        from .timing import Stopwatch

        watch = Stopwatch()
        dil = None if dilation is None else parse_dilation(dilation)
        path = convert_checkpoint(src, out, max_positions, attention_window, force=force, dilation=dil)
        if not quiet:
            typer.echo(f"longdoc: wrote a Longformer to {path}", err=True)
            _summary(stderr_console(), _convert_stats(path, watch.seconds))


def _convert_stats(path, seconds: float):
    """convert's summary: the model written (layers, parameters, bytes) and the time it took."""
    from .hub import model_info
    from .timing import RunStats

    info = model_info(path)
    stats = RunStats("convert", device="cpu", dtype="fp32", compute_s=seconds, total_s=seconds)
    size = info.get("weights_bytes") or 0
    stats.extra = {"layers": info["layers"], "max_tokens": info["max_tokens"],
                   "attention_window": info["attention_window"],
                   "weights_MiB": round(size / (1 << 20), 1)}  # fmt: skip
    if seconds > 0 and size:
        stats.extra["MiB_per_s"] = round(size / (1 << 20) / seconds, 1)
    return stats


def _environment() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    from .envvars import env
    from .hub import cache_entries, default_model_status, longdoc_home
    from .runtime import auto_dtype, cpu_has_native_bf16, int8_offered

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    int8, int8_why = int8_offered(device)
    return {
        "default_model": default_model_status(),
        "longdoc_model": env("LONGDOC_MODEL", "default"),
        "longdoc_home": str(longdoc_home()),
        "cached_models": cache_entries(),
        "device": "cuda" if cuda else "cpu",
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),  # AMX or AVX512-BF16: `--dtype bf16` is fast here
        "auto_dtype": {  # what `--dtype auto` runs, per task, on this machine's device
            task: dict(zip(("dtype", "reason"), auto_dtype(device, task), strict=True))
            for task in ("classify", "qa")
        },
        "int8_offered": {"offered": int8, "reason": int8_why},
        "versions": {
            "longdoc": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
    }


def _dtype_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """`longdoc models`' rows on `--dtype auto` (per task) and `--quantize int8`."""
    auto = env["auto_dtype"]
    if auto["classify"] == auto["qa"]:
        rows = [("--dtype auto", f"{auto['qa']['dtype']} (classify, qa): {auto['qa']['reason']}")]
    else:
        rows = [(f"--dtype auto ({t})", f"{a['dtype']}: {a['reason']}") for t, a in auto.items()]
    i8 = env["int8_offered"]
    return [*rows, ("--quantize int8", ("offered: " if i8["offered"] else "not offered: ") + i8["reason"])]


@app.command("models", epilog="Examples: `longdoc models` · `longdoc models -m ./my-bert --format json`")
def models_cmd(
    fmt: ReportFormat | None = _REPORT_FMT,
    model: str = typer.Option(
        None, "--model", "-m", help="Also resolve this model (converting it if needed) and describe it."
    ),
    allow_download: bool = typer.Option(
        False, "--allow-download", help="Allow fetching a Hugging Face hub id given to --model."
    ),
) -> None:
    """Show the default model (source, sha256, cache path, converted yet?), LONGDOC_HOME, the device
    and library versions."""
    with errors():
        kind = output_format(fmt, REPORT_FORMATS)
        env = _environment()
        if model is not None:
            from .hub import model_info, resolve_model

            env["model"] = model_info(resolve_model(model, allow_download=allow_download))
        from .tasks.classify import DEFAULT_PRESET, preset_names

        env["label_presets"] = preset_names()
        env["default_labels"] = DEFAULT_PRESET
        if kind != "table":
            sys.stdout.write(json.dumps(env, indent=None if kind == "jsonl" else 2) + "\n")
            return
        from rich.table import Table

        d = env["default_model"]
        bf16 = "native" if env["cpu_native_bf16"] else "emulated (slow)"
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        rows = [
            ("default model", d["source"]),
            ("  sha256", d["sha256"]),
            ("  package", d.get("package_dir") or d.get("problem", "not installed")),
            ("  cache", d["cache_path"]),
            ("  converted", "yes" if d["converted"] else "no (converted on first use)"),
            ("  max tokens / window", f"{d['max_tokens']} / {d['attention_window']} (two-sided)"),
            ("LONGDOC_MODEL", env["longdoc_model"]),
            ("LONGDOC_HOME", env["longdoc_home"]),
            ("cached models", ", ".join(env["cached_models"]) or "none"),
            ("device", env["device"] + (f" ({env['cuda_device']})" if env["cuda_device"] else "")),
            ("CPU", f"{env['cpu_capability']}, bf16 {bf16}"),
            *_dtype_rows(env),
            (
                "label presets",
                ", ".join(f"@{n}" for n in env["label_presets"]) + f" (default @{DEFAULT_PRESET})",
            ),
        ]
        rows += [(name, version) for name, version in env["versions"].items()]
        rows += [(f"model {k}", v) for k, v in env.get("model", {}).items()]
        for k, v in rows:
            table.add_row(k, str(v))
        stdout_console().print(table)


@app.command("env", hidden=True)
def env_cmd(
    fmt: str = typer.Option(None, "--format", "-f", help="table (default on a TTY) or json."),
    model: str = typer.Option(None, "--model", "-m", help="Also resolve and describe this model."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow fetching a hub id."),
) -> None:
    """Alias of `longdoc models`."""
    models_cmd(fmt, model, allow_download)


# ----------------------------------------------------------------------------------------------
# bench


@app.command(
    epilog="Examples: `longdoc bench -m tiny --seq-lens 1024,4096` · "
    "`longdoc bench -m base -n 4096 --device cuda --dtype bf16 --dilation 2`"
)
def bench(
    seq_len: int = typer.Option(None, "--seq-len", "-n", help="One input length in tokens. [default: 4096]"),
    seq_lens: str = typer.Option(None, "--seq-lens", help="Comma-separated lengths, e.g. 1024,4096,16384."),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="base | large | tiny (random weights, published sizes) or a model PATH. [default: base]",
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Rows per batch. [default: 1]"),
    device: str = typer.Option(
        None,
        "--device",
        help="auto (CUDA if available), cpu, cuda, cuda:N or mps. [default: auto]",
        autocompletion=_complete_device,
    ),
    dtype: Dtype | None = typer.Option(
        None, "--dtype", help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32. [default: auto]"
    ),
    mode: BenchMode | None = typer.Option(
        None, "--mode", help="infer, or train (forward + backward). [default: infer]"
    ),
    globals_: int = typer.Option(None, "--globals", help="Global tokens per row (the first G). [default: 1]"),
    impls: str = typer.Option(
        None,
        "--impls",
        help="Comma-separated: longdoc, longdoc-int8, longdoc-compiled, hf, bert, full, longdoc-attn. "
        "[default: longdoc,hf,full]",
    ),
    quantize: Quantize | None = typer.Option(
        None,
        "--quantize",
        help="int8: also time longdoc with int8 dynamic quantization (CPU). [default: none]",
    ),
    layers: int = typer.Option(None, "--layers", help="Use only the first N layers (time is linear in N)."),
    dilation: int = typer.Option(
        None, "--dilation", help="Attention dilation of every layer and head (default: the model's)."
    ),
    warmup: int = typer.Option(None, "--warmup", help="Untimed runs first (default 1)."),
    iters: int = typer.Option(None, "--iters", help="Timed runs (default 5)."),
    rounds: int = typer.Option(
        None, "--rounds", help="Repeat the whole sweep round-robin N times; rows pool their runs (default 1)."
    ),
    check: bool = typer.Option(
        None, "--check/--no-check", help="Correctness gate before timing (default on)."
    ),
    isolate: bool = typer.Option(
        None, "--isolate/--no-isolate", help="One child process per measurement (peak memory; default on)."
    ),
    time_budget: float = typer.Option(
        None, "--time-budget", help="Seconds per measurement; slower baselines are skipped (default 300)."
    ),
    config: str = typer.Option(
        None, "--config", "-c", help="YAML sweep (configs/bench.yaml); --set and flags override it."
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a sweep key: key=value (repeatable), e.g. check_len=64 or seq_lens='[1024, 4096]'.",
    ),
    fmt: ReportFormat | None = _REPORT_FMT,
) -> None:
    """Time longdoc against transformers' Longformer and full attention on the same weights:
    median/p95 latency, tokens/s, peak memory, FLOPs and GFLOP/s against the measured matmul peak."""
    with errors():
        from .bench import load_spec, parse_lengths, run_bench, spec_from_dict

        kind = output_format(fmt, REPORT_FORMATS)
        import dataclasses

        from .bench.spec import apply_overrides

        data = apply_overrides(dataclasses.asdict(load_spec(config)) if config else {}, overrides)
        if seq_len is not None and seq_lens is not None:
            raise UsageError("give --seq-len or --seq-lens, not both")
        if seq_len is not None:
            if seq_len <= 0:
                raise UsageError(f"--seq-len: {seq_len} is not a positive length")
            data["seq_lens"] = [seq_len]
        if seq_lens is not None:
            data["seq_lens"] = list(parse_lengths(seq_lens))
        singles = {"models": model, "batch_sizes": batch_size, "dtypes": dtype, "modes": mode}
        data.update({k: [v] for k, v in singles.items() if v is not None})
        if impls is not None:
            data["impls"] = [x.strip() for x in impls.split(",") if x.strip()]
        scalars = {"device": device, "globals": globals_, "layers": layers, "dilation": dilation,
                   "warmup": warmup, "iters": iters, "rounds": rounds, "check": check, "isolate": isolate,
                   "time_budget": time_budget}  # fmt: skip
        data.update({k: v for k, v in scalars.items() if v is not None})
        if quantize not in (None, "none", "int8"):
            raise UsageError(f"--quantize must be int8 or none, not {quantize!r}")
        if quantize == "int8":
            names = list(data.get("impls") or ("longdoc", "hf", "full"))
            if "longdoc-int8" not in names:
                at = names.index("longdoc") + 1 if "longdoc" in names else 0
                names.insert(at, "longdoc-int8")
            data["impls"] = names
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        spec = spec_from_dict(data, source="bench options")
        console = stderr_console()
        progress = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if console.is_terminal else None
        report = run_bench(spec, progress=progress)
        for note in report.notes:
            typer.echo(f"longdoc: warning: {note}", err=True)
        _render_bench(report, kind)


def _render_bench(report: Any, kind: str) -> None:
    from .bench import ratios

    if kind == "json":
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    vs_hf, vs_bert = ratios(report, "hf"), ratios(report, "bert")
    if kind == "jsonl":
        write_jsonl({"type": "environment", **report.environment})
        for p in report.peaks:
            write_jsonl({"type": "matmul_peak", **dataclasses_asdict(p)})
        for c in report.checks:
            write_jsonl({"type": "check", **dataclasses_asdict(c)})
        for m in report.measurements:
            key = (m.model, m.seq_len, m.batch_size, m.dtype, m.mode, m.impl)
            write_jsonl({"type": "measurement", **dataclasses_asdict(m), "time_vs_hf": vs_hf.get(key),
                         "time_vs_bert": vs_bert.get(key)})  # fmt: skip
        return
    from rich.table import Table

    def num(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    env = report.environment
    table = Table(
        title=f"longdoc bench: {env['device_name']}, {env['threads']} threads, torch {env['torch']}"
    )
    with_bert = any(m.impl == "bert" for m in report.measurements)
    for col in ("model", "impl", "n", "batch", "dtype", "mode", "median s", "p95 s", "tokens/s", "peak MiB",
                "GFLOP", "GFLOP/s", "peak GFLOP/s", "% peak", "× hf", *(["× bert"] if with_bert else []),
                "note"):  # fmt: skip
        table.add_column(
            col, justify="left" if col in ("model", "impl", "dtype", "mode", "note") else "right"
        )
    for m in report.measurements:
        key = (m.model, m.seq_len, m.batch_size, m.dtype, m.mode, m.impl)
        table.add_row(
            m.model, m.impl, str(m.seq_len), str(m.batch_size), m.dtype, m.mode, num(m.median_s, ".4f"),
            num(m.p95_s, ".4f"), num(m.tokens_per_s, ".0f"), num(m.peak_mem_mib, ".0f"),
            num(m.flops and m.flops / 1e9, ".3g"), num(m.gflops, ".1f"), num(m.matmul_peak_gflops, ".0f"),
            num(m.peak_share and 100 * m.peak_share, ".0f"), num(vs_hf.get(key), ".2f"),
            *([num(vs_bert.get(key), ".2f")] if with_bert else []),
            m.note if m.status == "ok" else f"skipped: {m.note}",
        )  # fmt: skip
    console = stdout_console()
    console.print(table)
    for p in report.peaks:
        console.print(
            f"matmul peak ({p.device}, {p.dtype}, {p.size}x{p.size}) before the sweep: "
            f"{p.gflops:.0f} GFLOP/s (each row's '% peak' uses its 'peak GFLOP/s',"
            " measured right after its runs)"
        )
    for c in report.checks:
        diff = "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.2e}"
        mark = "ok" if c.passed else "FAILED"
        console.print(f"check {c.name} (n={c.length}): {diff} <= {c.tolerance:g} {mark} {c.note}")


def dataclasses_asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------------------------
# train / evaluate / config (fine-tuning from one YAML config)

config_app = _Typer(cls=_LongdocGroup, help="Write and check longdoc YAML configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command(
    "init", epilog="Examples: `longdoc config init my.yaml` · `longdoc config init --task qa > qa.yaml`"
)
def config_init(
    path: str = typer.Argument("-", help="Where to write the config ('-' = stdout)."),
    task: Literal["classify", "qa"] = typer.Option("classify", "--task", "-t", help="Which task's defaults."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a complete, commented config with every key at its default."""
    from pathlib import Path

    from .config import config_to_yaml, default_config

    with errors():
        text = config_to_yaml(default_config(task))
        if path == "-":
            sys.stdout.write(text)
            return
        target = Path(path)
        if target.is_dir():
            raise UsageError(f"{path}: is a directory; give a file name such as {path}/longdoc.yaml")
        if target.exists() and not force:
            raise UsageError(f"{path}: exists; pass --force to overwrite it")
        if not target.parent.is_dir():
            raise UsageError(f"{path}: the directory {target.parent} does not exist")
        try:
            from .runtime import clean_stale

            clean_stale(target.parent, target.name)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-init")  # a kill leaves no half file
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        except OSError as e:
            raise LongdocError(f"{path}: cannot write it ({e.strerror or e})") from None
        typer.echo(f"wrote {path}", err=True)


@config_app.command(
    "validate",
    epilog="Example: `longdoc config validate my.yaml --set model.attention_dilation='[1,1,2,2,4,4]' --show`",
)
def config_validate(
    path: str = typer.Argument(..., help="A YAML config ('-' = stdin)."),
    overrides: list[str] = _SET,
    show: bool = typer.Option(False, "--show", help="Print the resolved config."),
) -> None:
    """Check a config strictly: every unknown key, wrong type or bad value, one line each."""
    from .config import config_to_yaml, resolve_run

    with errors():
        cfg = resolve_run(config=path, overrides=overrides, find_model=False).config
        if show:
            sys.stdout.write(config_to_yaml(cfg))
        typer.echo(f"{path}: ok ({cfg.task})", err=True)


@app.command(
    "train",
    epilog="Examples: `longdoc config init --task classify > my.yaml` then "
    "`longdoc train my.yaml --set data.train=train.jsonl -o runs/x` · "
    "`longdoc train my.yaml --device cuda:1 --seed 7 --set train.epochs=5`",
)
def train_cmd(
    config: str | None = typer.Argument(
        None, help="YAML config (see `longdoc config init`); or give it with --config/-c.", show_default=False
    ),
    config_opt: str | None = typer.Option(
        None, "--config", "-c", help="YAML config, as the other commands take it (same as the argument)."
    ),
    output: str = typer.Option(
        "runs/longdoc", "--output", "-o", help="Output directory (best/, last/, log)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Start from this model (overrides model.name)."
    ),
    overrides: list[str] = _SET,
    device: str | None = _DEVICE,
    seed: int | None = typer.Option(
        None,
        "--seed",
        help="Seeds python, torch, the data order and the dev split. [default: 42, train.seed]",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/last exactly."),
    force: bool = typer.Option(False, "--force", help="Replace best/, last/ and the log in OUTPUT."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed records (counted)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, step lines or summary on stderr."),
) -> None:
    """Fine-tune a classification or QA head (and the encoder) on your data; writes OUTPUT/best and
    OUTPUT/last as Hugging Face-format model directories that `classify`/`qa` load with -m."""
    from .config import resolve_run

    with errors():
        if config is not None and config_opt is not None:
            raise UsageError("give the config as the argument or with --config/-c, not both")
        config = config if config is not None else config_opt
        if config is None:
            raise UsageError("train needs a YAML config: longdoc train my.yaml (see longdoc config init)")
        flags = {
            "model.name": ("--model", model),
            "data.skip_bad_lines": ("--skip-bad-lines", skip_bad_lines or None),
            "model.device": ("--device", device),
            "train.seed": ("--seed", seed),
        }
        cfg = resolve_run(config=config, overrides=overrides, flags=flags, find_model=False).config
        from .data import check_data_file

        for path in (cfg.data.train, cfg.data.dev):  # at once: before torch and the model load
            if path:
                check_data_file(path)
        from .train import _dist_info, train

        console = stderr_console(quiet=quiet or _dist_info()[0] != 0)
        with _TrainDisplay(console, cfg.train.log_every) as display:
            result = train(cfg, output, resume=resume, force=force, on_event=display)
        if result.best_metric is None:  # no dev set, or no evaluation yet: best/ is the last model
            best = "no dev evaluation, best/ holds the last step's model"
        else:
            best = f"best dev {result.metric} {result.best_metric:.4f} at step {result.best_step}"
        console.print(
            f"done: {result.steps}/{result.total_steps} steps"
            f"{' (stopped early)' if result.stopped_early else ''}; {best}; model in {result.output_dir}/best"
        )
        _summary(console, display.stats(result))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _TrainDisplay:
    """Live loss / lr / metric / ETA on stderr: a transient rich bar on a TTY; otherwise (piped,
    nohup) a line every ``log_every`` steps and one per evaluation. Keeps the times of the run's
    phases for the summary line."""

    def __init__(self, console, log_every: int = 10) -> None:
        import time

        self.console, self.log_every = console, max(1, log_every)
        self.progress = None
        self.task = None
        self.metric = ""
        self.t_begin = time.perf_counter()  # the command's start: loading until the start event
        self.t_start: float | None = None  # the start event: training from here
        self.t_end: float | None = None
        self.start_event: dict[str, Any] = {}
        self.t_prev: float | None = None  # the previous step event (the step time)
        self.first_step = 0

    def stats(self, result):
        """The run's :class:`timing.RunStats`: examples, windows, steps; load (model and data)
        and training time."""
        import time

        from .timing import RunStats

        now = time.perf_counter()
        start = self.t_start if self.t_start is not None else now
        end = self.t_end if self.t_end is not None else now
        ev = self.start_event
        stats = RunStats(
            "train", device=str(ev.get("device", "")), dtype="bf16" if ev.get("bf16") else "fp32",
            documents=result.n_train, windows=int(ev.get("n_features") or 0), load_s=start - self.t_begin,
            compute_s=end - start, total_s=now - self.t_begin, steps=result.steps - self.first_step,
        )  # fmt: skip
        if result.best_metric is not None:
            stats.extra[f"best_{result.metric}"] = round(result.best_metric, 4)
        return stats

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        import time

        kind = event["event"]
        if kind == "start":
            self.t_start = self.t_prev = time.perf_counter()
            self.start_event, self.first_step = event, event["step"]
            notes = event["notes"]
            for note in notes[:20]:  # warnings: shown even with --quiet
                typer.echo(f"longdoc: warning: {note}", err=True)
            if len(notes) > 20:
                typer.echo(f"longdoc: warning: ... {len(notes) - 20} more (all in the model card)", err=True)
            where = f"{event['device']}{' bf16' if event['bf16'] else ''}"
            if event.get("frozen"):
                self.console.print(
                    f"fitting a head on the frozen encoder: {event['n_train']} documents "
                    f"({event['n_features']} windows, embedded once in {event['total_steps']} batches), "
                    f"dev {event['n_dev']}, {where}"
                )
            else:
                self.console.print(
                    f"training on {event['n_train']} examples ({event['n_features']} windows), "
                    f"dev {event['n_dev']}, {event['total_steps']} steps, {where}, "
                    f"{event['world_size']} process(es)"
                )
            if self.console.is_terminal and not self.console.quiet:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=self.console, transient=True,
                )  # fmt: skip
                self.progress.start()
                self.task = self.progress.add_task("train", total=event["total_steps"], info="")
                self.progress.update(self.task, completed=event["step"])
        elif kind in ("step", "embed") and self.progress is not None:
            info = (
                "embedding"
                if kind == "embed"
                else f"loss {event['loss']:.4f} lr {event['lr']:.2e} {self.metric}"
            )
            self.progress.update(self.task, completed=event["step"], info=info)
        elif kind in ("step", "embed"):  # not a terminal (a log file): a line with the ETA every 30 s
            self._line(event)
        elif kind == "eval":
            value = "n/a" if event["value"] is None else f"{event['value']:.4f}"
            self.metric = f"{event['metric']} {value}"
            self.console.print(
                f"step {event['step']}: dev {event['metric']} {value} (best {event['best']:.4f})"
            )
        elif kind == "early_stop":
            self.console.print(f"early stopping at step {event['step']}")
        elif kind == "end":
            self.t_end = time.perf_counter()

    def _line(self, event: dict[str, Any]) -> None:
        """Every ``log_every`` steps (and the last): loss, lr, this step's time, the ETA."""
        import time

        now = time.perf_counter()
        step_s = now - (self.t_prev if self.t_prev is not None else now)
        self.t_prev = now
        step, total = event["step"], event["total_steps"]
        if step % self.log_every and step < total:
            return
        done = max(1, step - self.first_step)
        rate = (now - (self.t_start if self.t_start is not None else now)) / done
        what = "embedded batch" if event["event"] == "embed" else "step"
        details = f", loss {event['loss']:.4f}, lr {event['lr']:.2e}" if "loss" in event else ""
        self.console.print(
            f"{what} {step}/{total}{details}, {step_s:.2f} s/step, ETA {_duration(rate * (total - step))}"
        )


@app.command(
    "evaluate",
    epilog="Examples: `longdoc evaluate test.jsonl -m runs/x/best` · "
    "`longdoc evaluate test.jsonl` (the default model, zero-shot over the data's labels: the baseline) · "
    "`longdoc evaluate squad_dev.jsonl -m runs/qa/best --device cuda --batch-size 16`",
)
def evaluate_cmd(
    data: str = typer.Argument(..., help="Labelled JSONL/CSV (classification) or SQuAD-format JSONL (QA)."),
    model: str = typer.Option(
        "default", "--model", "-m", help="A model directory saved by `train`, or any model -m takes."
    ),
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    device: str | None = _DEVICE,
    batch_size: int | None = _BATCH_SIZE,
    fmt: ReportFormat | None = _REPORT_FMT,
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed records (counted)."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress, summary line or warnings on stderr."
    ),
) -> None:
    """Score a fine-tuned model: accuracy, macro-F1, per-label P/R/F1, confusion matrix and length
    buckets (classification); SQuAD EM/F1, also for answers beyond the first 512 tokens (QA)."""
    from .evaluate import evaluate_model
    from .runtime import return_freed_memory

    return_freed_memory()  # inference only
    with errors():
        out_fmt = output_format(fmt, REPORT_FORMATS)
        flags = {
            "data.skip_bad_lines": ("--skip-bad-lines", skip_bad_lines or None),
            "model.device": ("--device", device),
            "inference.batch_size": ("--batch-size", batch_size),
        }
        from .tasks.inputs import check_paths

        check_paths([data])  # before the model loads
        console = stderr_console(quiet)
        with _progress(console, "evaluate", 0) as progress:
            task = progress.add_task("evaluate", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            report = evaluate_model(model, data, config, overrides, flags, on_progress=advance)
        for line in [] if quiet else report.skipped + report.not_in_context:
            typer.echo(f"longdoc: warning: {line}", err=True)
        if report.run is not None:
            _summary(console, report.run)
        if out_fmt != "table":
            write_jsonl(report.to_dict())
            return
        _render_eval(report)


def _render_eval(report: Any) -> None:
    from rich.table import Column, Table

    from .hub import display_name

    def right(*names: str) -> list[Column]:  # numbers right-aligned, as in classify's and qa's tables
        return [Column(x, justify="right") for x in names]

    console = stdout_console()
    console.print(f"{report.task} · {display_name(report.model)} · {report.data} · n = {report.n}")
    table = Table("metric", *right("value"))
    for k, v in report.metrics.items():
        table.add_row(k, "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
    console.print(table)
    m = report.classification
    if m is None:
        return
    per = Table("label", *right("precision", "recall", "f1", "support"), title="per label")
    for label, s in m.per_label.items():
        per.add_row(label, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", str(s.support))
    console.print(per)
    if m.confusion is not None:
        conf = Table("gold \\ predicted", *right(*m.labels), title="confusion matrix")
        for label, row in zip(m.labels, m.confusion, strict=True):
            conf.add_row(label, *map(str, row))
        console.print(conf)
    buckets = Table("tokens", *right("n", "accuracy", "macro_f1"), title="by document length")
    for name, b in m.by_length.items():
        buckets.add_row(name, str(b["n"]), f"{b['accuracy']:.3f}", f"{b['macro_f1']:.3f}")
    console.print(buckets)


# ----------------------------------------------------------------------------------------------
# The main jobs: classify and qa


def _load(run, task: str, max_length, quiet: bool = False):
    """The task model as the run's config says (api.load_for_run), with the CPU bf16 warning."""
    import torch

    from .api import load_for_run
    from .runtime import cpu_has_native_bf16, int8_offered

    tm = load_for_run(run, task, max_length)
    if tm.device.type == "cpu" and tm.dtype == torch.bfloat16 and not quiet and not cpu_has_native_bf16():
        typer.echo(
            "longdoc: warning: this CPU has no native bf16 (AMX or AVX512-BF16): bf16 runs slower "
            "than fp32 here",
            err=True,
        )
    if tm.device.type == "cpu" and run.config.model.quantize == "int8" and not quiet:
        offered, why = int8_offered("cpu")
        if not offered:
            typer.echo(f"longdoc: warning: --quantize int8 is {why}; --dtype auto runs bf16", err=True)
    return tm


def _checked_sources(paths: list[str] | None, input_format: str) -> list[str]:
    """The paths to read (stdin when none is given and it is not a terminal), each checked to exist
    before a model loads."""
    from .tasks.inputs import INPUT_FORMATS, check_paths

    if input_format not in INPUT_FORMATS:
        choices = ", ".join(INPUT_FORMATS[:-1]) + f" or {INPUT_FORMATS[-1]}"
        raise UsageError(f"--input-format must be {choices}, not {input_format!r}")
    sources = _paths_or_stdin(paths)
    check_paths(sources)
    return sources


def _inputs(
    cfg,
    sources,
    recursive: bool,
    text_key,
    shard,
    max_bytes: str | None,
    input_format: str,
    count: bool,
):
    """The documents (an iterator) and, with ``count`` (a progress bar will show it), how many
    there are (None when unknown: stdin, huge files; or not counted). ``text_key``: the
    --text-key given, if any (it says stdin holds JSON lines); the keys read are the config's."""
    from .tasks.inputs import count_documents, iter_inputs, parse_shard
    from .textio import MAX_DOCUMENT_BYTES, parse_size

    shard_kn = parse_shard(shard)
    stdin_jsonl = text_key is not None  # `--text-key` says stdin holds JSON lines
    items = iter_inputs(
        sources, recursive=recursive, text_key=cfg.data.text_key,
        id_key=cfg.data.id_key, shard=shard_kn,
        max_bytes=MAX_DOCUMENT_BYTES if max_bytes is None else parse_size(max_bytes),
        input_format=input_format, stdin_jsonl=stdin_jsonl,
    )  # fmt: skip
    if not count:
        return items, None
    n_docs = count_documents(
        sources, recursive=recursive, shard=shard_kn, input_format=input_format, stdin_jsonl=stdin_jsonl
    )
    return items, n_docs


# Seconds without a new input after which the documents read so far are classified and printed:
# results are not held back for a batch behind a slow (or blocked) input.
FLUSH_IDLE_S = 0.5


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = f"{type(error).__name__}: {text[:200]}"
    return (
        f"out of memory; try --max-bytes lower or a smaller batch ({text})"
        if is_out_of_memory(error)
        else text
    )


def _each_or_alone(run, docs: list) -> Iterator[tuple[Any, Any]]:
    """(doc, result) for ``docs`` run together, as ``run`` yields them; when the run fails, each
    document it had not finished alone, so one document's failure is its own error (the result is
    then the error's text) and not the batch's."""
    if not docs:
        return
    done = 0
    try:
        for result in run([(d.id, d.text) for d in docs]):
            yield docs[done], result
            done += 1
    except (RuntimeError, ValueError, MemoryError) as e:
        if debug_enabled():
            raise
        rest = docs[done:]
        if len(rest) == 1:
            yield rest[0], _short(e)
            return
        for doc in rest:
            yield from _each_or_alone(run, [doc])


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _paths_or_stdin(paths: list[str] | None) -> list[str]:
    if paths:
        return paths
    if not sys.stdin.isatty():
        return ["-"]
    raise UsageError("give at least one PATH (or - for stdin)")


class _Emitter:
    """Writes records as they come: JSON lines / TSV streamed, a table or a JSON array at the end.
    With ``timings`` the run's summary ends the output where the format allows it: the last JSON
    lines record, the last element of the JSON array (``{"schema_version": ..., "summary": {...}}``)."""

    def __init__(self, fmt: str, columns: list[str], timings: bool = False) -> None:
        self.fmt, self.rows, self.timings = fmt, [], timings
        self.columns = columns + (["seconds"] if timings and fmt in ("table", "tsv") else [])
        if fmt == "tsv":
            sys.stdout.write("\t".join(self.columns) + "\n")

    def __call__(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            write_jsonl(record)
        elif self.fmt == "tsv":
            cells = [_tsv_cell(record.get(c)) for c in self.columns]
            sys.stdout.write("\t".join(cells) + "\n")
            sys.stdout.flush()
        else:
            self.rows.append(record)

    def close(self, title: str, summary: dict[str, Any] | None = None, schema_version: int = 0) -> None:
        last = {"schema_version": schema_version, "summary": summary} if self.timings and summary else None
        if self.fmt == "jsonl" and last is not None:
            write_jsonl(last)
        elif self.fmt == "json":
            rows = self.rows + ([last] if last is not None else [])
            sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        elif self.fmt == "table" and self.rows:
            from rich.table import Table

            table = Table(title=title, show_lines=any(isinstance(r.get("scores"), dict) for r in self.rows))
            for c in self.columns:
                table.add_column(c, overflow="fold", justify="right" if c in NUMERIC_COLUMNS else "left")
            for r in self.rows:
                table.add_row(*[_cell(r, c) for c in self.columns])
            stdout_console().print(table)


# Table columns holding numbers (right-aligned).
NUMERIC_COLUMNS = ("score", "n_tokens", "n_windows", "rank", "start", "end", "seconds")


def _tsv_cell(value: Any) -> str:
    """A TSV cell: text as is (tabs and line breaks as spaces), anything else as JSON (a dict of
    scores as an object, booleans as true/false, a missing value as the empty cell)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _cell(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if column == "scores" and isinstance(value, dict):  # one per line: labels may hold commas
        return "\n".join(f"{k} {v:.3f}" for k, v in value.items())
    if column == "evidence":
        return "\n".join(f"[{p['start']}:{p['end']}] {p['text']}" for p in record.get("passages", []))
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def _progress(console, label: str, total: int | None = None):
    """A transient per-document progress bar on stderr (only on a TTY): done / total and the ETA
    when the total is known, else a counter."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
         TimeRemainingColumn()]
        if total is not None
        else [SpinnerColumn(), TextColumn(f"{label} {{task.completed}}"), TimeElapsedColumn()]
    )  # fmt: skip
    return Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal or console.quiet
    )


class _InputReport:
    """Reports input problems as they come, counting what ``--skip-bad-lines`` skips."""

    def __init__(self, console, skip_bad_lines: bool) -> None:
        self.console, self.skip = console, skip_bad_lines
        self.failed = False
        self.skipped = 0
        self.first_skipped: str | None = None

    def __call__(self, item) -> bool:
        """Whether ``item`` is an input error (reported here), not a document to process."""
        from .tasks.inputs import InputError

        if isinstance(item, InputError) and item.record and self.skip:
            self.skipped += item.count
            self.first_skipped = self.first_skipped or item.message
            return True
        if _report_input(self.console, item):
            self.failed = True
        return isinstance(item, InputError)

    def close(self) -> None:
        if self.skipped and not self.console.quiet:
            first = bounded(self.first_skipped or "")
            typer.echo(
                f"longdoc: warning: skipped {self.skipped} bad record(s) (--skip-bad-lines); "
                f"the first: {first}",
                err=True,
            )


def _summary(console, stats, failed: bool = False) -> None:
    """The run's one summary line on stderr (not with --quiet; not after a failure that left
    nothing processed: the error line says all there is, and bad input stays one line)."""
    if console.quiet or (failed and not (stats.documents or stats.questions)):
        return
    typer.echo(f"longdoc: {stats.line()}", err=True)


def _report_input(console, item) -> bool:
    """Report an input problem; True if the item is an error (a failure for the exit code)."""
    from .tasks.inputs import InputError

    if isinstance(item, InputError):
        if item.warning:
            if not console.quiet:
                typer.echo(f"longdoc: warning: {bounded(item.message)}", err=True)
            return False
        typer.echo(f"longdoc: error: {bounded(item.message)}", err=True)
        return True
    if item.n_replaced and not console.quiet:
        typer.echo(
            f"longdoc: warning: {item.id}: {item.n_replaced} invalid UTF-8 sequence(s) replaced", err=True
        )
    return False


# A result is flagged when this share of its text is only the tokenizer's unknown token.
UNKNOWN_WARN = 0.5


def _warn_unknown(quiet: bool, doc_id: str, share: float) -> None:
    if share >= UNKNOWN_WARN and not quiet:
        typer.echo(
            f"longdoc: warning: {doc_id}: {share:.0%} of the text is unknown to the model's tokenizer "
            "(a script or symbols it lacks, or words too long to read); the result says little",
            err=True,
        )


@app.command(
    epilog="Examples: `longdoc classify report.txt --labels sport,politics,science` · "
    "`longdoc classify -r docs/ -m runs/x/best --format jsonl > labels.jsonl` · "
    "`longdoc classify big.txt --set inference.aggregate=max --device cuda:1`"
)
def classify(
    paths: list[str] = _PATHS,
    model: str | None = _MODEL,
    allow_download: bool = _ALLOW_DOWNLOAD,
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="Zero-shot labels, comma-separated; or @NAME, a preset listed by `longdoc models` "
        "(@iptc: the 17 IPTC media topics), or @FILE, a labels file. [default: a fine-tuned model's "
        "own labels, else inference.labels, else @topics]",
    ),
    labels_file: str | None = typer.Option(
        None, "--labels-file", help="Zero-shot labels, one per line (optionally a tab and a description)."
    ),
    recursive: bool = _RECURSIVE,
    text_key: str | None = _TEXT_KEY,
    id_key: str | None = _ID_KEY,
    aggregate: Aggregate | None = typer.Option(
        None,
        "--aggregate",
        help="Combine windows: mean or max; first = read only the first window (truncates)."
        + _default(_INF.aggregate, "inference.aggregate"),
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", help="How many labels to report in scores." + _default(_INF.top_k, "inference.top_k")
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Multi-label decision threshold." + _default(_INF.threshold, "inference.threshold"),
    ),
    explain: int | None = typer.Option(
        None,
        "--explain",
        help="Report the N passages that most support the label."
        + _default(_INF.explain, "inference.explain"),
    ),
    batch_size: int | None = _BATCH_SIZE,
    max_length: int | None = _MAX_LENGTH,
    stride: int | None = _STRIDE,
    device: str | None = _DEVICE,
    dtype: Dtype | None = _DTYPE,
    quantize: Quantize | None = _QUANTIZE,
    shard: str | None = _SHARD,
    fmt: Format | None = _FMT,
    quiet: bool = _QUIET,
    max_bytes: str | None = _MAX_BYTES,
    input_format: InputFormat = _INPUT_FORMAT,
    skip_bad_lines: bool = _SKIP_BAD,
    timings: bool = _TIMINGS,
) -> None:
    """Classify long documents: with a fine-tuned checkpoint its labels, else zero-shot against
    --labels (or the default topics, @topics). One result per document."""
    with errors():
        from .api import classifier_for_run, labels_for_run, resolve
        from .hub import display_name
        from .timing import RunStats, Stopwatch, dtype_label, timed

        fmt = output_format(fmt)
        flags = {
            "inference.aggregate": ("--aggregate", aggregate), "inference.top_k": ("--top-k", top_k),
            "inference.threshold": ("--threshold", threshold), "inference.explain": ("--explain", explain),
            "inference.batch_size": ("--batch-size", batch_size), "tokenization.stride": ("--stride", stride),
            "data.text_key": ("--text-key", text_key), "data.id_key": ("--id-key", id_key),
            "model.device": ("--device", device), "model.dtype": ("--dtype", dtype),
            "model.quantize": ("--quantize", quantize),
        }  # fmt: skip
        total = Stopwatch()
        stats = RunStats("classify")
        sources = _checked_sources(paths, input_format)
        # torch comes in with the tasks: after the paths are checked, so a missing file fails at once
        from .tasks.classify import SCHEMA_VERSION
        from .tasks.runner import batched

        with timed(stats, "load_s"):
            run = resolve("classify", model, config=config, overrides=overrides, flags=flags,
                          allow_download=allow_download)  # fmt: skip
            chosen = labels_for_run(run, labels, labels_file)  # before the model loads: fail at once
            tm = _load(run, "classify", max_length, quiet)
            clf = classifier_for_run(run, chosen, strict_stride=stride is not None, tm=tm)
        bs, cfg = clf.batch_size, run.config
        stats.device, stats.dtype = str(tm.device), dtype_label(tm.dtype)
        console = stderr_console(quiet)
        bar = console.is_terminal and not quiet
        items, n_docs = _inputs(cfg, sources, recursive, text_key, shard, max_bytes, input_format, bar)
        columns = ["path", "label", "score", "scores", "n_tokens", "n_windows", "truncated"]
        emit = _Emitter(fmt, columns + (["evidence"] if clf.explain and fmt == "table" else []), timings)
        bad_input = _InputReport(console, skip_bad_lines)
        failed = False
        with _progress(console, "classify", n_docs) as progress:
            task = progress.add_task("classify", total=n_docs)
            # A chunk holds at most one forward pass's worth of documents (classify_iter groups no
            # more windows than that): a result waits for no more input than its own pass needs.
            for chunk in batched(items, bs, idle_s=FLUSH_IDLE_S):
                docs = [x for x in chunk if not bad_input(x)]
                for doc, result in _each_or_alone(clf.classify_iter, docs):
                    progress.advance(task)
                    if isinstance(result, str):
                        typer.echo(
                            f"longdoc: error: {bounded(f'{doc.id}: cannot classify it ({result})')}", err=True
                        )
                        failed = True
                        stats.failed += 1
                        continue
                    _warn_unknown(quiet, doc.id, result.unknown_share)
                    stats.documents += 1
                    stats.windows += result.n_windows
                    stats.tokens += result.n_tokens
                    stats.compute_s += result.seconds
                    record = result.to_record(doc.key)
                    if timings:
                        record["seconds"] = round(result.seconds, 4)
                    emit(
                        {"path": record.get("path", record.get("id")), **record} if fmt != "jsonl" else record
                    )
        bad_input.close()
        stats.skipped, stats.total_s = bad_input.skipped, total.seconds
        kind = "zero-shot" if clf.zero_shot else "fine-tuned"
        emit.close(f"longdoc classify · {display_name(tm.path)} ({kind})", stats.to_dict(), SCHEMA_VERSION)
        _summary(console, stats, failed or bad_input.failed)
        if failed or bad_input.failed:
            raise typer.Exit(1)


@app.command(
    epilog='Examples: `longdoc qa manual.txt -Q "How do I reset it?"` · '
    "`longdoc qa -r docs/ --questions questions.txt --top-k 3 --format jsonl` · "
    '`longdoc qa paper.txt -Q "What data?" -m runs/squad/best --stride 128`'
)
def qa(
    paths: list[str] = _PATHS,
    question: list[str] = typer.Option([], "--question", "-Q", help="A question (repeatable)."),
    questions_file: str | None = typer.Option(
        None, "--questions", help='A file of questions, one per line (.jsonl: a "question" key per line).'
    ),
    model: str | None = _MODEL,
    allow_download: bool = _ALLOW_DOWNLOAD,
    config: str | None = _CONFIG,
    overrides: list[str] = _SET,
    recursive: bool = _RECURSIVE,
    text_key: str | None = _TEXT_KEY,
    id_key: str | None = _ID_KEY,
    top_k: int | None = typer.Option(None, "--top-k", help="Answers per question. [default: 1]"),
    n_best: int | None = typer.Option(
        None,
        "--n-best",
        help="Start/end candidates per window (QA head)." + _default(_INF.n_best, "inference.n_best"),
    ),
    max_answer_len: int | None = typer.Option(
        None,
        "--max-answer-len",
        help="Longest answer in tokens (QA head)."
        + _default(_INF.max_answer_length, "inference.max_answer_length"),
    ),
    null_threshold: float | None = typer.Option(
        None,
        "--null-threshold",
        help="No answer when the null score beats the best span by this (QA head)."
        + _default(_INF.null_threshold, "inference.null_threshold"),
    ),
    min_score: float | None = typer.Option(
        None,
        "--min-score",
        help="No answer (answer: null) when the best score is below this (README)."
        + _default(_INF.min_score, "inference.min_score"),
    ),
    stride: int | None = _STRIDE,
    doc_stride: int | None = typer.Option(None, "--doc-stride", hidden=True, help="Alias of --stride."),
    max_question_len: int | None = typer.Option(
        None,
        "--max-question-len",
        help="Question tokens kept." + _default(_TOK.max_question_length, "tokenization.max_question_length"),
    ),
    batch_size: int | None = _BATCH_SIZE,
    max_length: int | None = _MAX_LENGTH,
    device: str | None = _DEVICE,
    dtype: Dtype | None = _DTYPE,
    quantize: Quantize | None = _QUANTIZE,
    shard: str | None = _SHARD,
    fmt: Format | None = _FMT,
    quiet: bool = _QUIET,
    max_bytes: str | None = _MAX_BYTES,
    input_format: InputFormat = _INPUT_FORMAT,
    skip_bad_lines: bool = _SKIP_BAD,
    timings: bool = _TIMINGS,
) -> None:
    """Answer questions from long documents: a span with a QA checkpoint, else (the default model)
    the sentence that best answers it. One result per question and document."""
    with errors():
        from .api import answerer_for_run, resolve
        from .hub import display_name
        from .timing import RunStats, Stopwatch, dtype_label, timed

        fmt = output_format(fmt)
        total = Stopwatch()
        stats = RunStats("qa")
        if stride is not None and doc_stride is not None:
            raise UsageError("give --stride or its old name --doc-stride, not both")
        stride = _pick(stride, doc_stride)
        asked = [q.strip() for q in question if q.strip()]
        question_ids: list[Any] = [None] * len(asked)
        if questions_file:
            from .textio import read_text_file

            text = read_text_file(questions_file, "questions file")
            from_file = read_questions(text, questions_file)
            if not from_file:
                raise UsageError(f"{questions_file}: holds no questions")
            asked += [q for q, _ in from_file]
            question_ids += [i for _, i in from_file]
        if not asked:
            raise UsageError("give a question with --question (or a file of them with --questions)")
        if questions_file == "-" and (not paths or "-" in paths):
            raise UsageError("stdin cannot hold both the questions and a document")
        flags = {
            "inference.n_best": ("--n-best", n_best),
            "inference.max_answer_length": ("--max-answer-len", max_answer_len),
            "inference.null_threshold": ("--null-threshold", null_threshold),
            "inference.min_score": ("--min-score", min_score),
            "inference.batch_size": ("--batch-size", batch_size),
            "tokenization.stride": ("--stride" if doc_stride is None else "--doc-stride", stride),
            "tokenization.max_question_length": ("--max-question-len", max_question_len),
            "data.text_key": ("--text-key", text_key), "data.id_key": ("--id-key", id_key),
            "model.device": ("--device", device), "model.dtype": ("--dtype", dtype),
            "model.quantize": ("--quantize", quantize),
        }  # fmt: skip
        if top_k is not None and top_k < 1:  # answers per question: not the config's inference.top_k
            raise UsageError(f"--top-k {top_k}: must be at least 1")
        sources = _checked_sources(paths, input_format)
        from .tasks.qa import SCHEMA_VERSION  # torch: after the paths are checked (fail at once)

        with timed(stats, "load_s"):
            run = resolve("qa", model, config=config, overrides=overrides, flags=flags,
                          allow_download=allow_download)  # fmt: skip
            cfg = run.config
            tm = _load(run, "qa", max_length, quiet)
            answerer = answerer_for_run(run, top_k=_pick(top_k, 1), strict_stride=stride is not None, tm=tm)
        stats.device, stats.dtype = str(tm.device), dtype_label(tm.dtype)
        console = stderr_console(quiet)
        bar = console.is_terminal and not quiet
        items, n_docs = _inputs(cfg, sources, recursive, text_key, shard, max_bytes, input_format, bar)
        emit = _Emitter(
            fmt, ["path", "question", "rank", "answer", "score", "start", "end", "context"], timings
        )
        bad_input = _InputReport(console, skip_bad_lines)
        failed = False
        with _progress(console, "qa", n_docs) as progress:
            task = progress.add_task("qa", total=n_docs)
            for item in items:
                if bad_input(item):
                    continue
                try:
                    results = answerer.answer(item.id, item.text, asked)
                except (RuntimeError, ValueError, MemoryError) as e:  # this document's failure only
                    if debug_enabled():
                        raise
                    typer.echo(
                        f"longdoc: error: {bounded(f'{item.id}: cannot answer over it ({_short(e)})')}",
                        err=True,
                    )
                    failed = True
                    stats.failed += 1
                    progress.advance(task)
                    continue
                _warn_unknown(quiet, item.id, results[0].unknown_share if results else 0.0)
                stats.documents += 1
                stats.tokens += results[0].n_tokens if results else 0
                for result, question_id in zip(results, question_ids, strict=True):
                    stats.questions += 1
                    stats.windows += result.n_windows
                    stats.compute_s += result.seconds
                    record = result.to_record(item.key)
                    if question_id is not None:
                        record["question_id"] = question_id
                    if timings:
                        record["seconds"] = round(result.seconds, 4)
                    if fmt in ("table", "tsv"):
                        for row in _answer_rows(record):
                            emit(row)
                    else:
                        emit(
                            {"path": record.get("path", record.get("id")), **record}
                            if fmt == "json"
                            else record
                        )
                    if result.truncated and not quiet:
                        cut = answerer.max_question_length
                        typer.echo(
                            f"longdoc: warning: question cut to {cut} tokens: {result.question[:60]}",
                            err=True,
                        )
                progress.advance(task)
        bad_input.close()
        stats.skipped, stats.total_s = bad_input.skipped, total.seconds
        kind = "extractive span" if tm.head == "qa" else "zero-shot sentence"
        emit.close(f"longdoc qa · {display_name(tm.path)} ({kind})", stats.to_dict(), SCHEMA_VERSION)
        _summary(console, stats, failed or bad_input.failed)
        if failed or bad_input.failed:
            raise typer.Exit(1)


def _answer_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A QA record as table/TSV rows: one per answer (rank 1 = best), each with its own context;
    one row with an empty answer when there is none."""
    base = {"path": record.get("path", record.get("id")), "question": record["question"]}
    if "seconds" in record:
        base["seconds"] = record["seconds"]
    answers = record.get("answers") or ([record] if record["answer"] is not None else [])
    if not answers:
        return [
            {**base, "rank": None, "answer": None, "score": None, "start": None, "end": None, "context": ""}
        ]
    return [
        {**base, "rank": rank, "answer": a.get("text", a.get("answer")), "score": a["score"],
         "start": a["start"], "end": a["end"], "context": a["context"]}
        for rank, a in enumerate(answers, 1)
    ]  # fmt: skip


def read_questions(text: str, source: str) -> list[tuple[str, Any]]:
    """(question, id) pairs from a file: one question per line (no id), or in a .jsonl file one JSON
    object per line with a "question" key and an optional "id" (copied to the results as
    ``question_id``). Blank lines are skipped."""
    if not source.lower().endswith((".jsonl", ".ndjson")):
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{source}:{number}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError):  # a number over 4300 digits, nesting too deep
            raise UsageError(
                f"{source}:{number}: not readable JSON (a huge number or deep nesting)"
            ) from None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f'{source}:{number}: needs a non-empty string "question"')
        questions.append((question.strip(), record.get("id")))
    return questions


def main() -> None:
    """Console-script entry point."""
    from .runtime import tune_memory

    tune_memory()  # before anything imports torch
    try:
        app()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
