"""Process-level helpers. Memory settings for longdoc's own processes (the CLI and the bench's
children; a library user's process is left as it is), measured on the 2-core CPU (base model,
2 layers; benchmarks/README.md, "Memory settings"), where a variable the user set wins; whether the
CPU computes bf16 natively; the device and dtype a model runs on (tasks, training and the bench
choose them here); what the environment asks of the attention kernels (LONGDOC_ATTENTION,
LONGDOC_FLEX_OPTIONS) and the compiled FlexAttention with its dynamo settings, handed to the pure
functions of attention.py as arguments; the umask's mode for the files longdoc writes; an exclusive
file lock; temporary entries named for their process, and the clean-up of those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .envvars import env
from .errors import UsageError

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def tune_memory() -> None:
    """``THP_MEM_ALLOC_ENABLE=1``, before torch is imported (it reads it once): torch asks for
    transparent huge pages for its large CPU tensors. A 16384-token forward pass allocates hundreds
    of MB per layer; with 4 KiB pages its 745 K page faults took 10-14% of the time (29 K with huge
    pages)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_freed_memory() -> None:
    """For inference: glibc's mmap threshold at 1 MiB (by default it grows to 32 MiB), so freed
    activations go back to the system and the resident set follows the live tensors: the peak extra
    memory of a 4096-token pass fell from 262 to 169 MiB at the same speed. Not for training, whose
    forward + backward ran 10-20% slower with it. ``MALLOC_MMAP_THRESHOLD_`` set by the user wins.
    Many passes in a row keep their freed activations between passes: :func:`reuse_freed_memory`."""
    global _libc
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            _libc = libc


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
REUSE_MMAP_THRESHOLD = 32 << 20  # glibc's own cap for its dynamic threshold
REUSE_TRIM_THRESHOLD = 0  # the free top of the heap still goes back at once: less memory held
_DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's default
_libc: Any = None  # set when return_freed_memory lowered the threshold in this process
_reusing = 0  # reuse_freed_memory() blocks open (threads may nest them)
_reuse_lock = threading.Lock()


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """While many inference passes run one after another (the windows of a long document): blocks
    under 32 MiB come from the heap, where a freed activation is reused by the next pass instead of
    going back to the system and being faulted in and zeroed again. ``longdoc classify`` of 300,000
    characters (59 K tokens, bf16, two passes side by side, these thresholds set through glibc's
    variables for the whole process): 625 K minor page faults and 2.0 s of system time with the
    1 MiB threshold, 170 K and 0.6 s with these, peak memory 430 -> 543 MB (benchmarks/README.md,
    "Passes side by side"). Afterwards the 1 MiB threshold is back and
    ``malloc_trim`` returns the free heap. Only where :func:`return_freed_memory` set the threshold
    (longdoc's own inference processes); elsewhere nothing changes."""
    global _reusing
    libc = _libc
    if libc is None:
        yield
        return
    with _reuse_lock:
        _reusing += 1
        if _reusing == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _reuse_lock:
            _reusing -= 1
            if _reusing == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                with contextlib.suppress(AttributeError):
                    libc.malloc_trim(0)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16). With AMX, bf16 matmuls
    ran 10x faster than fp32 here (2.4 TFLOP/s vs 248 GFLOP/s on 2 cores); without either, torch
    emulates bf16 and it is slower than fp32. Asks torch (its cpuinfo probes); a torch without them
    falls back on the kernel's CPU flags (Linux ``/proc/cpuinfo``), else "emulated"."""
    import torch.cpu

    probes = [getattr(torch.cpu, name, None) for name in BF16_PROBES]
    if all(callable(p) for p in probes):
        return any(p() for p in probes)
    return bool(_cpuinfo_flags() & set(BF16_FLAGS))


# torch.cpu's probes of native bf16 (private API), and the same features as /proc/cpuinfo flags.
BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    return _read_flags(Path("/proc/cpuinfo"))


def _read_flags(path: Path) -> set[str]:
    """The first ``flags`` line of a cpuinfo file (empty where there is no such file or line)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


# Issue 18's quality gate, per task, of bf16 against fp32 on the default model (benchmarks/README.md,
# "bf16 by default on CPUs that compute it"). classify: zero-shot top-label agreement >= 99% with
# the plain and the default labels on the 719 documents of ../shared/data (benchmarks/eval_dtype.py:
# 100% and 99.58%). qa: hit@1 within 0.01 (benchmarks/eval_qa.py --dtype: 42.6 in both; with the
# paragraph scoring of issue 12's second round 51.0 in both). A task that failed it keeps fp32 under
# ``--dtype auto``.
BF16_GATE_PASSED = {"classify": True, "qa": True}


def auto_dtype(device_type: str, task: str | None = None, quantize: str = "none") -> tuple[str, str]:
    """What ``--dtype auto`` means: (``"fp32"``, ``"bf16"`` or ``"fp16"``, the reason in words).

    CUDA: bf16 where the GPU has it, else fp16. CPU: bf16 where the CPU computes it natively (AMX or
    AVX512-BF16) and ``task`` passed the quality gate (None: the encoder alone, as ``bench`` runs
    it), else fp32; always fp32 under ``--quantize int8`` (its kernels take an fp32 model)."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU computes bf16"
        return "fp16", "the GPU has no bf16"
    if quantize == "int8":
        return "fp32", "--quantize int8 quantizes an fp32 model"
    if not cpu_has_native_bf16():
        return "fp32", "this CPU has no native bf16 (AMX or AVX512-BF16): bf16 would be emulated, slower"
    if task is not None and not BF16_GATE_PASSED.get(task, False):
        return "fp32", f"bf16 did not pass the quality gate against fp32 for {task}"
    return "bf16", "this CPU computes bf16 natively (AMX or AVX512-BF16); bf16 passed the quality gate"


def int8_offered(device_type: str) -> tuple[bool, str]:
    """Whether ``--quantize int8`` is offered as the faster mode here, and why. Its dynamic int8
    linear layers run on the CPU only; on a CPU with native bf16 the bf16 path was faster (issue 18's
    1 MB document, 2 threads: bf16 20.1 s, int8 28.1 s, fp32 34.9 s; benchmarks/README.md, a 100 K
    character one, one thread: 8.8, 11.0, 13.2 CPU s), elsewhere int8 is faster than fp32."""
    if device_type != "cpu":
        return False, "int8 runs on the CPU only"
    if cpu_has_native_bf16():
        return False, "slower than bf16 on this CPU (native bf16)"
    return True, "faster than fp32 on this CPU (no native bf16)"


# ----------------------------------------------------------------------------------------------
# Device and dtype: one choice for the tasks, training and the bench

TORCH_DTYPES = ("fp32", "bf16", "fp16")


def pick_device(name: str = "auto"):
    """The ``torch.device`` for auto (CUDA when there is a GPU), cpu, cuda, cuda:N or mps."""
    import torch

    from .config import DEVICE_PATTERN

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name}: no CUDA GPU is available here (use cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"device {name}: there are {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("device mps: Apple's Metal (MPS) is not available here (use cpu)")
    return torch.device(name)


def dtype_name(name: str, device, task: str | None = None, quantize: str = "none") -> str:
    """fp32, bf16 or fp16 for ``name``; auto: :func:`auto_dtype` (bf16 on a CUDA GPU that has it,
    else fp16; on the CPU bf16 where it is native and ``task`` passed the quality gate, else fp32)."""
    if name == "auto":
        import torch

        return auto_dtype(torch.device(device).type, task, quantize)[0]
    if name not in TORCH_DTYPES:
        raise UsageError(f"--dtype must be auto, fp32, bf16 or fp16, not {name!r}")
    return name


def torch_dtype(name: str):
    """The torch dtype of fp32, bf16 or fp16."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_dtype(name: str, device, task: str | None = None, quantize: str = "none"):
    """The torch dtype a model runs in (:func:`dtype_name`); fp16 is refused on the CPU."""
    chosen = dtype_name(name, device, task, quantize)
    if device.type == "cpu" and chosen == "fp16":
        raise UsageError("--dtype fp16 is not supported on the CPU (use fp32)")
    return torch_dtype(chosen)


CPU_PASS_WORKERS = 2  # passes side by side on the CPU by default (measured on 2 cores only)


def cpu_pass_workers(device_type: str, passes: int) -> int:
    """How many inference passes run side by side (threads, each with its share of torch's
    threads) when ``passes`` passes are to run on ``device_type``: ``LONGDOC_CPU_WORKERS`` (1: one
    pass at a time, on all of torch's threads), else up to CPU_PASS_WORKERS; never more than torch's
    threads or the passes, and 1 off the CPU."""
    if device_type != "cpu" or passes < 2:
        return 1
    import torch

    threads = torch.get_num_threads()
    return max(1, min(env("LONGDOC_CPU_WORKERS", min(CPU_PASS_WORKERS, threads)), threads, passes))


# ----------------------------------------------------------------------------------------------
# Attention settings (attention.py takes them as arguments)


def attention_kernel() -> str:
    """``LONGDOC_ATTENTION``: "auto" (FlexAttention on CUDA, else the band kernels), "band" (always
    the band kernels) or "flex" (FlexAttention also on the CPU, compiled, for inference)."""
    return env("LONGDOC_ATTENTION", "auto")


@functools.cache
def flex_options() -> dict[str, Any]:
    """FlexAttention kernel options from ``LONGDOC_FLEX_OPTIONS`` (JSON, e.g. '{"BLOCK_M": 64}'), for
    tuning on a new GPU; ``"contiguous": false`` passes the strided head views as they are, ``"tile"``
    sets the mask's tile (default 128; kernel BLOCK_M/BLOCK_N must divide it)."""
    return env("LONGDOC_FLEX_OPTIONS", {})


@functools.cache
def compiled_flex(device_type: str):
    """``flex_attention`` compiled once per process and device type, or None in a torch without it.
    CUDA recompiles once, dynamic in the length, when a second length comes; the CPU build is static
    per length (inductor's dynamic CPU flex code fails to compile in torch 2.13)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    import torch
    import torch._dynamo.config as dynamo_config

    # Past dynamo's recompile limit (8 by default) a function silently runs eagerly, and eager
    # FlexAttention builds the (n, n) scores. Kinds of mask x static/dynamic length x grad mode x dtype
    # can pass 8 in a long process (training with dev evaluation), so the limit is raised.
    if getattr(dynamo_config, "recompile_limit", 64) < 64:
        dynamo_config.recompile_limit = 64
    return torch.compile(flex_attention, dynamic=None if device_type == "cuda" else False)


def umask_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have had under the process umask.
    Temporary directories (mkdtemp) are 0700 and safetensors writes 0600, which would leave the
    models longdoc writes (the cache, ``convert``, ``train``) unreadable to other users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block. Without
    ``wait``, a lock another process holds raises BlockingIOError at once. Where there is no flock
    (Windows) no lock is taken: the callers' atomic renames keep their files sound without it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Temporary entries of longdoc's writes, and the one rule that cleans them up

# ".NAME.tmp-PID-XXXX": a temporary entry next to NAME, made by process PID. The NAME of a nested
# one (a conversion into the cache's temporary directory) is itself a temporary entry's name.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<tag>[^.]*)$")


def temp_dir(parent: Path, name: str) -> Path:
    """A new temporary directory next to ``parent/name``, named for this process, with the umask's
    mode. :func:`clean_stale` removes it once this process is gone, however it ended."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))
    umask_mode(path)  # mkdtemp makes it 0700
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a PID we cannot ask about: leave its files
    return True


def replace_dir(new: Path, final: Path) -> None:
    """Put the directory ``new`` at ``final``, replacing what is there. The old one is renamed
    aside first (``.NAME.tmp-PID-old``) and removed last: a kill at any moment leaves ``final``
    old or new, or (between the two renames) its old version aside, which :func:`clean_stale`
    puts back."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.tmp-{os.getpid()}-old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the temporary entries in ``parent`` (of ``name`` only, when given) whose process is
    gone: what a killed conversion, cache build or checkpoint save left. An old version set aside
    by :func:`replace_dir` goes back to its place when that place is empty. Returns what it removed."""
    removed = []
    try:
        entries = sorted(parent.iterdir(), key=lambda p: not p.name.endswith("-old"))
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m is None or (name is not None and not _owned_by(m["name"], name)) or _alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        with contextlib.suppress(OSError):
            if m["tag"] == "old" and not final.exists() and not final.is_symlink():
                os.rename(p, final)
                continue
            remove_entry(p)
            removed.append(p)
    return removed


def remove_entry(p: Path) -> None:
    """Remove a file, a link (not its target) or a whole directory."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _owned_by(entry: str, name: str) -> bool:
    """Whether a temporary entry's NAME is ``name`` or a temporary entry of it (nested)."""
    while entry != name:
        m = _TEMP.match(entry)
        if m is None:
            return False
        entry = m["name"]
    return True
