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
from typing import Any

import typer
import typer.core

from . import __version__
from .errors import LongdocError, is_out_of_memory


def _usage_error_types() -> tuple[type[Exception], ...]:
    """The base class of usage errors: ``TyperException`` where Typer vendors click, else click's."""
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


class _LongdocGroup(typer.core.TyperGroup):
    """Usage errors (unknown option, `--iters abc`, ...) as one ``longdoc: error:`` line on stderr
    with exit code 2, like every other error, instead of Typer's boxed panel. Typer and click handle
    the error themselves in standalone mode, so the app runs non-standalone here and exits itself."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            code = rv if isinstance(rv, int) else 0  # an Exit's code; commands return None
        except typer.Abort:
            typer.echo("longdoc: aborted", err=True)
            code = 1
        except _usage_error_types() as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one (`longdoc` alone) printed the help
                typer.echo(f"longdoc: error: {usage_error_line(e)}", err=True)
            code = e.exit_code
        if not standalone_mode:
            return code
        sys.exit(code)


def usage_error_line(error: Exception) -> str:
    """One line for a click error: its message, then where the help is."""
    line = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        line += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return line


app = typer.Typer(
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
        raise fail(str(e), e.exit_code) from None
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
            raise LongdocError(f"--format must be {choices}, not {fmt!r}", exit_code=2)
        return fmt
    return "table" if sys.stdout.isatty() else "jsonl"


# The commands whose result is one report (bench, evaluate, models): a table or JSON, no TSV.
REPORT_FORMATS = ("table", "json", "jsonl")


def write_jsonl(record: dict[str, Any]) -> None:
    """One JSON object per line, flushed at once so pipelines see results as they come."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# Models: convert, models/env


@app.command()
def convert(
    src: str = typer.Argument(..., help="A Hugging Face BERT or RoBERTa directory with its tokenizer."),
    out: str = typer.Argument(..., help="New directory for the Longformer (must not exist or be empty)."),
    max_positions: int = typer.Option(
        4096, "--max-positions", help="Longest input of the result in tokens, special tokens included."
    ),
    attention_window: int = typer.Option(
        512, "--attention-window", help="Two-sided local attention width in tokens (512 = 256 each side)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty OUT (replaces same-named files, keeps the rest)."
    ),
) -> None:
    """Turn a short-context BERT/RoBERTa checkpoint into a Longformer (positions copied, global
    projections from the local ones, tokenizer length raised)."""

    with errors():
        from .convert import convert_checkpoint

        path = convert_checkpoint(src, out, max_positions, attention_window, force=force)
        typer.echo(f"longdoc: wrote a Longformer to {path}", err=True)


def _environment() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    from .envvars import env
    from .models import cache_entries, default_model_status, longdoc_home
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


@app.command("models")
def models_cmd(
    fmt: str = typer.Option(None, "--format", "-f", help="table (default on a TTY) or json."),
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
            from .models import model_info, resolve_model

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


@app.command()
def bench(
    seq_len: int = typer.Option(None, "--seq-len", "-n", help="One input length in tokens."),
    seq_lens: str = typer.Option(None, "--seq-lens", help="Comma-separated lengths, e.g. 1024,4096,16384."),
    model: str = typer.Option(
        None, "--model", "-m", help="base | large | tiny (random weights, published sizes) or a model PATH."
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Rows per batch."),
    device: str = typer.Option(None, "--device", help="auto (CUDA if available), cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16.",
    ),
    mode: str = typer.Option(None, "--mode", help="infer, or train (forward + backward)."),
    globals_: int = typer.Option(None, "--globals", help="Global tokens per row (the first G)."),
    impls: str = typer.Option(
        None,
        "--impls",
        help="Comma-separated: longdoc, longdoc-int8, longdoc-compiled, hf, full, longdoc-attn.",
    ),
    quantize: str = typer.Option(
        None, "--quantize", help="int8: also time longdoc with int8 dynamic quantization (CPU)."
    ),
    layers: int = typer.Option(None, "--layers", help="Use only the first N layers (time is linear in N)."),
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
        None, "--config", "-c", help="YAML sweep (configs/bench.yaml); flags override it."
    ),
    fmt: str = typer.Option(None, "--format", "-f", help="table (default on a TTY), json or jsonl."),
) -> None:
    """Time longdoc against transformers' Longformer and full attention on the same weights:
    median/p95 latency, tokens/s, peak memory, FLOPs and GFLOP/s against the measured matmul peak."""
    with errors():
        from .bench import load_spec, parse_lengths, run_bench, spec_from_dict

        kind = output_format(fmt, REPORT_FORMATS)
        import dataclasses

        data = dataclasses.asdict(load_spec(config)) if config else {}
        if seq_len is not None and seq_lens is not None:
            raise LongdocError("give --seq-len or --seq-lens, not both", exit_code=2)
        if seq_len is not None:
            if seq_len <= 0:
                raise LongdocError(f"--seq-len: {seq_len} is not a positive length", exit_code=2)
            data["seq_lens"] = [seq_len]
        if seq_lens is not None:
            data["seq_lens"] = list(parse_lengths(seq_lens))
        singles = {"models": model, "batch_sizes": batch_size, "dtypes": dtype, "modes": mode}
        data.update({k: [v] for k, v in singles.items() if v is not None})
        if impls is not None:
            data["impls"] = [x.strip() for x in impls.split(",") if x.strip()]
        scalars = {"device": device, "globals": globals_, "layers": layers, "warmup": warmup,
                   "iters": iters, "rounds": rounds, "check": check, "isolate": isolate,
                   "time_budget": time_budget}  # fmt: skip
        data.update({k: v for k, v in scalars.items() if v is not None})
        if quantize not in (None, "none", "int8"):
            raise LongdocError(f"--quantize must be int8 or none, not {quantize!r}", exit_code=2)
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
    vs_hf = ratios(report, "hf")
    if kind == "jsonl":
        write_jsonl({"type": "environment", **report.environment})
        for p in report.peaks:
            write_jsonl({"type": "matmul_peak", **dataclasses_asdict(p)})
        for c in report.checks:
            write_jsonl({"type": "check", **dataclasses_asdict(c)})
        for m in report.measurements:
            key = (m.model, m.seq_len, m.batch_size, m.dtype, m.mode, m.impl)
            write_jsonl({"type": "measurement", **dataclasses_asdict(m), "time_vs_hf": vs_hf.get(key)})
        return
    from rich.table import Table

    def num(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    env = report.environment
    table = Table(
        title=f"longdoc bench: {env['device_name']}, {env['threads']} threads, torch {env['torch']}"
    )
    for col in ("model", "impl", "n", "batch", "dtype", "mode", "median s", "p95 s", "tokens/s", "peak MiB",
                "GFLOP", "GFLOP/s", "peak GFLOP/s", "% peak", "× hf", "note"):  # fmt: skip
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

config_app = typer.Typer(help="Write and check longdoc YAML configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("init")
def config_init(
    path: str = typer.Argument("-", help="Where to write the config ('-' = stdout)."),
    task: str = typer.Option("classify", "--task", "-t", help="classify | qa"),
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
            raise LongdocError(
                f"{path}: is a directory; give a file name such as {path}/longdoc.yaml", exit_code=2
            )
        if target.exists() and not force:
            raise LongdocError(f"{path}: exists; pass --force to overwrite it", exit_code=2)
        if not target.parent.is_dir():
            raise LongdocError(f"{path}: the directory {target.parent} does not exist", exit_code=2)
        try:
            from .runtime import clean_stale

            clean_stale(target.parent, target.name)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-init")  # a kill leaves no half file
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        except OSError as e:
            raise LongdocError(f"{path}: cannot write it ({e.strerror or e})") from None
        typer.echo(f"wrote {path}", err=True)


@config_app.command("validate")
def config_validate(
    path: str = typer.Argument(..., help="A YAML config ('-' = stdin)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    show: bool = typer.Option(False, "--show", help="Print the resolved config."),
) -> None:
    """Check a config strictly: every unknown key, wrong type or bad value, one line each."""
    from .config import config_to_yaml, load_config

    with errors():
        cfg = load_config(path, overrides)
        if show:
            sys.stdout.write(config_to_yaml(cfg))
        typer.echo(f"{path}: ok ({cfg.task})", err=True)


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="YAML config (see `longdoc config init`)."),
    output: str = typer.Option(
        "runs/longdoc", "--output", "-o", help="Output directory (best/, last/, log)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Start from this model (overrides model.name)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/last exactly."),
    force: bool = typer.Option(False, "--force", help="Replace best/, last/ and the log in OUTPUT."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed records (counted)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Fine-tune a classification or QA head (and the encoder) on your data; writes OUTPUT/best and
    OUTPUT/last as Hugging Face-format model directories that `classify`/`qa` load with -m."""
    from .config import load_config

    with errors():
        extra = [f"model.name={model}"] if model else []
        extra += ["data.skip_bad_lines=true"] if skip_bad_lines else []
        cfg = load_config(config, [*overrides, *extra])
        from .train import _dist_info, train

        console = stderr_console(quiet=quiet or _dist_info()[0] != 0)
        with _TrainDisplay(console) as display:
            result = train(cfg, output, resume=resume, force=force, on_event=display)
        if result.best_metric is None:  # no dev set, or no evaluation yet: best/ is the last model
            best = "no dev evaluation, best/ holds the last step's model"
        else:
            best = f"best dev {result.metric} {result.best_metric:.4f} at step {result.best_step}"
        console.print(
            f"done: {result.steps}/{result.total_steps} steps"
            f"{' (stopped early)' if result.stopped_early else ''}; {best}; model in {result.output_dir}/best"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _TrainDisplay:
    """Live loss / lr / metric / ETA on stderr: a transient rich bar on a TTY, a line per eval otherwise."""

    def __init__(self, console) -> None:
        self.console = console
        self.progress = None
        self.task = None
        self.metric = ""
        self.t0: float | None = None  # first progress event (log lines with an ETA)
        self.last = 0.0
        self.first_step = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
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

    def _line(self, event: dict[str, Any]) -> None:
        import time

        now = time.monotonic()
        if self.t0 is None:
            self.t0, self.last, self.first_step = now, now, event["step"] - 1
            return
        step, total = event["step"], event["total_steps"]
        if now - self.last < 30 and step < total:
            return
        self.last = now
        rate = (now - self.t0) / max(1, step - self.first_step)
        what = "embedded batch" if event["event"] == "embed" else "step"
        loss = f", loss {event['loss']:.4f}" if "loss" in event else ""
        self.console.print(f"{what} {step}/{total}{loss}, ETA {_duration(rate * (total - step))}")


@app.command("evaluate")
def evaluate_cmd(
    data: str = typer.Argument(..., help="Labelled JSONL/CSV (classification) or SQuAD-format JSONL (QA)."),
    model: str = typer.Option("default", "--model", "-m", help="A model directory saved by `train`."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Config (default: the model's longdoc.yaml)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="table, json or jsonl (default: table on a TTY, else JSON)."
    ),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed records (counted)."),
) -> None:
    """Score a fine-tuned model: accuracy, macro-F1, per-label P/R/F1, confusion matrix and length
    buckets (classification); SQuAD EM/F1, also for answers beyond the first 512 tokens (QA)."""
    from .config import load_config
    from .evaluate import evaluate_model
    from .runtime import return_freed_memory

    return_freed_memory()  # inference only
    with errors():
        out_fmt = output_format(fmt, REPORT_FORMATS)
        cfg = load_config(config) if config else None
        extra = ["data.skip_bad_lines=true"] if skip_bad_lines else []
        report = evaluate_model(model, data, cfg, [*overrides, *extra])
        for line in report.skipped + report.not_in_context:
            typer.echo(f"longdoc: warning: {line}", err=True)
        if out_fmt != "table":
            write_jsonl(report.to_dict())
            return
        _render_eval(report)


def _render_eval(report: Any) -> None:
    from rich.table import Table

    console = stdout_console()
    console.print(f"{report.task} · {report.model} · {report.data} · n = {report.n}")
    table = Table("metric", "value")
    for k, v in report.metrics.items():
        table.add_row(k, "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
    console.print(table)
    m = report.classification
    if m is None:
        return
    per = Table("label", "precision", "recall", "f1", "support", title="per label")
    for label, s in m.per_label.items():
        per.add_row(label, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", str(s.support))
    console.print(per)
    if m.confusion is not None:
        conf = Table("gold \\ predicted", *m.labels, title="confusion matrix")
        for label, row in zip(m.labels, m.confusion, strict=True):
            conf.add_row(label, *map(str, row))
        console.print(conf)
    buckets = Table("tokens", "n", "accuracy", "macro_f1", title="by document length")
    for name, b in m.by_length.items():
        buckets.add_row(name, str(b["n"]), f"{b['accuracy']:.3f}", f"{b['macro_f1']:.3f}")
    console.print(buckets)


# ----------------------------------------------------------------------------------------------
# The main jobs: classify and qa

_MODEL_HELP = "default, a model directory (Longformer, or BERT/RoBERTa converted on the fly) or a hub id."


def _task_setup(task: str, config_path: str | None, model: str | None, allow_download: bool):
    """The effective config and model directory: --config, else the model directory's own config,
    else the defaults; command-line options override either afterwards."""
    from .config import check_task, default_config, load_config, load_model_dir_config
    from .models import resolve_model
    from .runtime import return_freed_memory

    return_freed_memory()  # classify / qa: inference only

    cfg = load_config(config_path) if config_path else None
    if cfg is not None:
        check_task(cfg, task, config_path)
    from .envvars import env

    from_env = model is None and env("LONGDOC_MODEL") is not None
    name = (
        model
        or env("LONGDOC_MODEL")
        or (cfg.model.name if cfg is not None and cfg.model.name != "default" else None)
    )
    allow = allow_download or (cfg is not None and cfg.model.allow_download)
    try:
        model_dir = resolve_model(name, allow_download=allow)
    except LongdocError as e:
        if not from_env:
            raise
        raise LongdocError(f"LONGDOC_MODEL={name!r}: {e}", exit_code=2) from None
    if cfg is None:
        cfg = load_model_dir_config(model_dir) or default_config(task)
    return cfg, model_dir


def _load(cfg, model_dir, task: str, device, dtype, quantize, max_length, quiet: bool = False):
    """The task model, command-line options first, then the config's model section."""
    import torch

    from .runtime import cpu_has_native_bf16, int8_offered
    from .tasks.runner import load_task_model

    mc = cfg.model
    tm = load_task_model(
        model_dir, task=task, device=_pick(device, mc.device), dtype=_pick(dtype, mc.dtype),
        quantize=_pick(quantize, mc.quantize), max_length=max_length, max_length_cap=mc.max_length,
        attention_window=mc.attention_window,
    )  # fmt: skip
    if tm.device.type == "cpu" and tm.dtype == torch.bfloat16 and not quiet and not cpu_has_native_bf16():
        typer.echo(
            "longdoc: warning: this CPU has no native bf16 (AMX or AVX512-BF16): bf16 runs slower "
            "than fp32 here",
            err=True,
        )
    if tm.device.type == "cpu" and _pick(quantize, mc.quantize) == "int8" and not quiet:
        offered, why = int8_offered("cpu")
        if not offered:
            typer.echo(f"longdoc: warning: --quantize int8 is {why}; --dtype auto runs bf16", err=True)
    return tm


def _inputs(cfg, paths, recursive: bool, text_key, id_key, shard, max_bytes: str | None):
    from .tasks.inputs import iter_inputs, parse_shard
    from .textio import MAX_DOCUMENT_BYTES, parse_size

    return iter_inputs(
        _paths_or_stdin(paths), recursive=recursive, text_key=_pick(text_key, cfg.data.text_key),
        id_key=_pick(id_key, cfg.data.id_key), shard=parse_shard(shard),
        max_bytes=MAX_DOCUMENT_BYTES if max_bytes is None else parse_size(max_bytes),
    )  # fmt: skip


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
    """(doc, result) for ``docs`` run together; when the batch fails, each document alone, so one
    document's failure is its own error (the result is then the error's text) and not the batch's."""
    if not docs:
        return
    try:
        results = run([(d.id, d.text) for d in docs])
    except (RuntimeError, ValueError, MemoryError) as e:
        if debug_enabled():
            raise
        if len(docs) == 1:
            yield docs[0], _short(e)
            return
        for doc in docs:
            yield from _each_or_alone(run, [doc])
        return
    yield from zip(docs, results, strict=True)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _paths_or_stdin(paths: list[str] | None) -> list[str]:
    if paths:
        return paths
    if not sys.stdin.isatty():
        return ["-"]
    raise LongdocError("give at least one PATH (or - for stdin)", exit_code=2)


class _Emitter:
    """Writes records as they come: JSON lines / TSV streamed, a table or a JSON array at the end."""

    def __init__(self, fmt: str, columns: list[str]) -> None:
        self.fmt, self.columns, self.rows = fmt, columns, []
        if fmt == "tsv":
            sys.stdout.write("\t".join(columns) + "\n")

    def __call__(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            write_jsonl(record)
        elif self.fmt == "tsv":
            cells = [_tsv_cell(record.get(c)) for c in self.columns]
            sys.stdout.write("\t".join(cells) + "\n")
            sys.stdout.flush()
        else:
            self.rows.append(record)

    def close(self, title: str) -> None:
        if self.fmt == "json":
            sys.stdout.write(json.dumps(self.rows, ensure_ascii=False, indent=2) + "\n")
        elif self.fmt == "table" and self.rows:
            from rich.table import Table

            table = Table(title=title, show_lines=False)
            for c in self.columns:
                table.add_column(c, overflow="fold", justify="right" if c in ("score", "tokens") else "left")
            for r in self.rows:
                table.add_row(*[_cell(r, c) for c in self.columns])
            stdout_console().print(table)


def _tsv_cell(value: Any) -> str:
    """A TSV cell: text as is (tabs and line breaks as spaces), anything else as JSON (a dict of
    scores as an object, booleans as true/false, a missing value as the empty cell)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _cell(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if column == "scores" and isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in value.items())
    if column == "evidence":
        return "\n".join(f"[{p['start']}:{p['end']}] {p['text']}" for p in record.get("passages", []))
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def _progress(console, label: str):
    """A transient counter on stderr (only on a TTY)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(), TextColumn(f"{label} {{task.completed}}"), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal or console.quiet,
    )  # fmt: skip


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


# Options shared by classify and qa (one definition each).
_PATHS = typer.Argument(None, help="Text files, - for stdin, directories (with -r), .jsonl files.")
_MODEL = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Default: $LONGDOC_MODEL, else default.")
_ALLOW_DOWNLOAD = typer.Option(False, "--allow-download", help="Allow fetching a hub model.")
_CONFIG = typer.Option(None, "--config", help="YAML config (options given here override it).")
_RECURSIVE = typer.Option(False, "--recursive", "-r", help="Read the files under directories.")
_TEXT_KEY = typer.Option(None, "--text-key", help="JSON-lines key holding the text.")
_ID_KEY = typer.Option(None, "--id-key", help="JSON-lines key holding the document id.")
_BATCH_SIZE = typer.Option(None, "--batch-size", help="Windows per forward pass.")
_MAX_LENGTH = typer.Option(None, "--max-length", help="Tokens per window, specials included.")
_DEVICE = typer.Option(None, "--device", help="auto, cpu or cuda.")
_DTYPE = typer.Option(
    None, "--dtype", help="auto (bf16 on a CPU with native bf16 or a GPU, else fp32), fp32, bf16 or fp16."
)
_QUANTIZE = typer.Option(
    None, "--quantize", help="none or int8: CPU, opt-in, faster but less accurate (README)."
)
_SHARD = typer.Option(None, "--shard", help="K/N: process every N-th document starting at K.")
_FMT = typer.Option(
    None, "--format", "-f", help="table, jsonl, json or tsv (default: table on a TTY, else jsonl)."
)
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress or warnings on stderr.")
_MAX_BYTES = typer.Option(
    None, "--max-bytes", help="Largest document (or JSON-lines record) read, e.g. 64M or 1G (default 64M)."
)


@app.command()
def classify(
    paths: list[str] = _PATHS,
    model: str | None = _MODEL,
    allow_download: bool = _ALLOW_DOWNLOAD,
    config: str | None = _CONFIG,
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="Zero-shot labels, comma-separated; or @NAME, a preset listed by `longdoc models` "
        "(@topics is the default, @iptc the 17 IPTC media topics), or @FILE, a labels file.",
    ),
    labels_file: str | None = typer.Option(
        None, "--labels-file", help="Zero-shot labels, one per line (optionally a tab and a description)."
    ),
    recursive: bool = _RECURSIVE,
    text_key: str | None = _TEXT_KEY,
    id_key: str | None = _ID_KEY,
    aggregate: str | None = typer.Option(
        None,
        "--aggregate",
        help="Combine windows: mean or max; first = read only the first window (truncates).",
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="How many labels to report in scores."),
    threshold: float | None = typer.Option(None, "--threshold", help="Multi-label decision threshold."),
    explain: int | None = typer.Option(
        None, "--explain", help="Report the N passages that most support the label."
    ),
    batch_size: int | None = _BATCH_SIZE,
    max_length: int | None = _MAX_LENGTH,
    stride: int | None = typer.Option(None, "--stride", help="Tokens shared by consecutive windows."),
    device: str | None = _DEVICE,
    dtype: str | None = _DTYPE,
    quantize: str | None = _QUANTIZE,
    shard: str | None = _SHARD,
    fmt: str | None = _FMT,
    quiet: bool = _QUIET,
    max_bytes: str | None = _MAX_BYTES,
) -> None:
    """Classify long documents: with a fine-tuned checkpoint its labels, else zero-shot against
    --labels (or the default topics, @topics). One result per document."""
    with errors():
        from .tasks.classify import Classifier, load_labels
        from .tasks.inputs import InputError
        from .tasks.runner import batched

        fmt = output_format(fmt)
        cfg, model_dir = _task_setup("classify", config, model, allow_download)
        inf, tk = cfg.inference, cfg.tokenization
        if labels is not None and not labels.strip(" ,"):
            raise LongdocError("--labels: no labels given (a comma-separated list)", exit_code=2)
        label_list = labels.split(",") if labels else list(inf.labels) or None
        chosen = (
            load_labels(label_list, labels_file or inf.labels_file)
            if label_list or labels_file or inf.labels_file
            else None
        )
        tm = _load(cfg, model_dir, "classify", device, dtype, quantize, max_length, quiet)
        bs = _pick(batch_size, inf.batch_size)
        clf = Classifier(
            tm, chosen, aggregate=_pick(aggregate, inf.aggregate), top_k=_pick(top_k, inf.top_k),
            threshold=_pick(threshold, inf.threshold), explain=_pick(explain, inf.explain), batch_size=bs,
            stride=_pick(stride, tk.stride), strict_stride=stride is not None,
        )  # fmt: skip
        items = _inputs(cfg, paths, recursive, text_key, id_key, shard, max_bytes)
        columns = ["path", "label", "score", "scores", "n_tokens", "n_windows", "truncated"]
        emit = _Emitter(fmt, columns + (["evidence"] if clf.explain and fmt == "table" else []))
        console = stderr_console(quiet)
        failed = False
        with _progress(console, "documents") as progress:
            task = progress.add_task("classify", total=None)
            for chunk in batched(items, max(4 * bs, 8), idle_s=FLUSH_IDLE_S):
                docs = [x for x in chunk if not _report_input(console, x) and not isinstance(x, InputError)]
                failed |= any(isinstance(x, InputError) and not x.warning for x in chunk)
                for doc, result in _each_or_alone(clf.classify, docs):
                    if isinstance(result, str):
                        typer.echo(
                            f"longdoc: error: {bounded(f'{doc.id}: cannot classify it ({result})')}", err=True
                        )
                        failed = True
                        continue
                    _warn_unknown(quiet, doc.id, result.unknown_share)
                    record = result.to_record(doc.key)
                    emit(
                        {"path": record.get("path", record.get("id")), **record} if fmt != "jsonl" else record
                    )
                    progress.advance(task)
        emit.close(f"longdoc classify ({'zero-shot' if clf.zero_shot else 'fine-tuned'}: {tm.path.name})")
        if failed:
            raise typer.Exit(1)


@app.command()
def qa(
    paths: list[str] = _PATHS,
    question: list[str] = typer.Option([], "--question", "-Q", help="A question (repeatable)."),
    questions_file: str | None = typer.Option(
        None, "--questions", help='A file of questions, one per line (.jsonl: a "question" key per line).'
    ),
    model: str | None = _MODEL,
    allow_download: bool = _ALLOW_DOWNLOAD,
    config: str | None = _CONFIG,
    recursive: bool = _RECURSIVE,
    text_key: str | None = _TEXT_KEY,
    id_key: str | None = _ID_KEY,
    top_k: int | None = typer.Option(None, "--top-k", help="Answers per question."),
    n_best: int | None = typer.Option(None, "--n-best", help="Start/end candidates per window (QA head)."),
    max_answer_len: int | None = typer.Option(
        None, "--max-answer-len", help="Longest answer in tokens (QA head)."
    ),
    null_threshold: float | None = typer.Option(
        None, "--null-threshold", help="No answer when the null score beats the best span by this (QA head)."
    ),
    min_score: float | None = typer.Option(
        None, "--min-score", help="No answer (answer: null) when the best score is below this (README)."
    ),
    doc_stride: int | None = typer.Option(None, "--doc-stride", help="Tokens shared by consecutive windows."),
    max_question_len: int | None = typer.Option(None, "--max-question-len", help="Question tokens kept."),
    batch_size: int | None = _BATCH_SIZE,
    max_length: int | None = _MAX_LENGTH,
    device: str | None = _DEVICE,
    dtype: str | None = _DTYPE,
    quantize: str | None = _QUANTIZE,
    shard: str | None = _SHARD,
    fmt: str | None = _FMT,
    quiet: bool = _QUIET,
    max_bytes: str | None = _MAX_BYTES,
) -> None:
    """Answer questions from long documents: a span with a QA checkpoint, else (the default model)
    the sentence that best answers it. One result per question and document."""
    with errors():
        from .tasks.inputs import InputError
        from .tasks.qa import QuestionAnswerer

        fmt = output_format(fmt)
        asked = [q.strip() for q in question if q.strip()]
        question_ids: list[Any] = [None] * len(asked)
        if questions_file:
            from .textio import read_text_file

            text = read_text_file(questions_file, "questions file")
            from_file = read_questions(text, questions_file)
            if not from_file:
                raise LongdocError(f"{questions_file}: holds no questions", exit_code=2)
            asked += [q for q, _ in from_file]
            question_ids += [i for _, i in from_file]
        if not asked:
            raise LongdocError(
                "give a question with --question (or a file of them with --questions)", exit_code=2
            )
        if questions_file == "-" and (not paths or "-" in paths):
            raise LongdocError("stdin cannot hold both the questions and a document", exit_code=2)
        cfg, model_dir = _task_setup("qa", config, model, allow_download)
        inf, tk = cfg.inference, cfg.tokenization
        tm = _load(cfg, model_dir, "qa", device, dtype, quantize, max_length, quiet)
        answerer = QuestionAnswerer(
            tm, top_k=_pick(top_k, 1), n_best=_pick(n_best, inf.n_best),
            max_answer_length=_pick(max_answer_len, inf.max_answer_length),
            null_threshold=_pick(null_threshold, inf.null_threshold),
            batch_size=_pick(batch_size, inf.batch_size), doc_stride=_pick(doc_stride, tk.stride),
            max_question_length=_pick(max_question_len, tk.max_question_length),
            strict_stride=doc_stride is not None, min_score=_pick(min_score, inf.min_score),
        )  # fmt: skip
        items = _inputs(cfg, paths, recursive, text_key, id_key, shard, max_bytes)
        emit = _Emitter(fmt, ["path", "question", "rank", "answer", "score", "start", "end", "context"])
        console = stderr_console(quiet)
        failed = False
        with _progress(console, "answers") as progress:
            task = progress.add_task("qa", total=None)
            for item in items:
                if _report_input(console, item):
                    failed = True
                    continue
                if isinstance(item, InputError):  # a warning: skipped
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
                    continue
                _warn_unknown(quiet, item.id, results[0].unknown_share if results else 0.0)
                for result, question_id in zip(results, question_ids, strict=True):
                    record = result.to_record(item.key)
                    if question_id is not None:
                        record["question_id"] = question_id
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
        emit.close(
            f"longdoc qa ({'extractive span' if tm.head == 'qa' else 'zero-shot sentence'}: {tm.path.name})"
        )
        if failed:
            raise typer.Exit(1)


def _answer_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A QA record as table/TSV rows: one per answer (rank 1 = best), each with its own context;
    one row with an empty answer when there is none."""
    base = {"path": record.get("path", record.get("id")), "question": record["question"]}
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
            raise LongdocError(f"{source}:{number}: not valid JSON ({e.msg})", exit_code=2) from None
        except (ValueError, RecursionError):  # a number over 4300 digits, nesting too deep
            raise LongdocError(
                f"{source}:{number}: not readable JSON (a huge number or deep nesting)", 2
            ) from None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise LongdocError(f'{source}:{number}: needs a non-empty string "question"', exit_code=2)
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
