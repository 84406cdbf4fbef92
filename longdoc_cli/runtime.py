"""Process-wide memory settings for longdoc's own processes (the CLI and the bench's children).

Called before torch is imported; a library user's process is left as it is. Both settings were
measured on the 2-core CPU (base model, 2 layers; benchmarks/README.md, "Memory settings"):

- ``THP_MEM_ALLOC_ENABLE=1``: torch asks for transparent huge pages for its large CPU tensors. A
  16384-token forward pass allocates hundreds of MB per layer; with 4 KiB pages the page faults
  (745 K per pass) took 10-14% of the time; with huge pages 29 K faults.
- glibc's mmap threshold at 1 MiB (it grows up to 32 MiB by default): freed activations go back to
  the system instead of staying in the heap, so the resident set follows the live tensors; the
  peak extra memory of a 4096-token pass fell from 286 to 171 MiB at the same speed.

A variable the user set (``THP_MEM_ALLOC_ENABLE``, ``MALLOC_MMAP_THRESHOLD_``) wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def tune_memory() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
