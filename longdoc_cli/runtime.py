"""Process-level helpers. Memory settings for longdoc's own processes (the CLI and the bench's
children; a library user's process is left as it is), measured on the 2-core CPU (base model,
2 layers; benchmarks/README.md, "Memory settings"), where a variable the user set wins; whether the
CPU computes bf16 natively; the umask's mode for the files longdoc writes; an exclusive file lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

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
    forward + backward ran 10-20% slower with it. ``MALLOC_MMAP_THRESHOLD_`` set by the user wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16). With AMX, bf16 matmuls
    ran 10x faster than fp32 here (2.4 TFLOP/s vs 248 GFLOP/s on 2 cores); without either, torch
    emulates bf16 and it is slower than fp32."""
    import torch.cpu

    return any(getattr(torch.cpu, name, lambda: False)() for name in BF16_PROBES)


# torch.cpu's probes of native bf16 (private API: a torch without them reads as "emulated").
BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


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
