"""Keep large CPU tensors in glibc's heap instead of fresh mmaps, for faster CPU training steps.

glibc serves allocations above its mmap threshold (32 MB at most) with a new `mmap` and unmaps them on
free. A training step allocates and frees several such tensors (the (batch*time, vocab) logits, their
gradient, the log-softmax), so every step page-faults them in again from zeroed pages, and the kernel's
page-fault work becomes a visible share of the step. With mmap off and trimming raised, freed blocks stay
in the heap and the next step reuses warm pages (the effect on `make train` and on
benchmarks/train_throughput.py: docs/results/figures.md).

The cost is that the process keeps its peak heap until exit, which is what a training run does anyway.
Set LM_DEFAULT_MALLOC=1 to leave glibc's defaults alone. No-op where libc is not glibc.

The tokenizer is the other allocation-bound step: `tokenizers` spends more than half its cycles in
glibc's malloc/free (a small string per token), so `lm prepare`'s encode workers, fresh processes,
start with mimalloc preloaded (:func:`fast_allocator`, used by lm/data/preparation/encode.py), whose
per-thread free lists make those small allocations cheap (figures: docs/data.md). An allocator can't be
swapped inside a running process, hence workers only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h
MALLOC_ENV = "LM_ENCODE_MALLOC"  # "system", or the path of an allocator to preload into encode workers
_applied = False


def keep_large_allocations_in_heap() -> bool:
    """Apply once per process; returns whether glibc's settings were changed."""
    global _applied
    if _applied or os.environ.get("LM_DEFAULT_MALLOC") or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def fast_allocator() -> str | None:
    """The allocator library to preload into encode workers, or None for the C library's own.

    ``LM_ENCODE_MALLOC=system``: none; ``LM_ENCODE_MALLOC=/path/lib.so``: that one; unset: mimalloc from
    the ``cmeel-mimalloc`` package (the ``data`` extra, x86-64 Linux) or the system's ``libmimalloc``.
    """
    choice = os.environ.get(MALLOC_ENV, "").strip()
    if choice == "system":
        return None
    return choice or _installed_mimalloc()


@lru_cache(maxsize=1)
def _installed_mimalloc() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(Exception):  # not installed, or installed without its file list
        from importlib.metadata import distribution

        dist = distribution("cmeel-mimalloc")
        for file in dist.files or ():
            if file.name.startswith("libmimalloc.so"):
                return str(dist.locate_file(file))
    from ctypes.util import find_library

    return find_library("mimalloc")  # e.g. Debian's libmimalloc2.0
