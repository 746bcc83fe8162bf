"""`training.reuse_host_memory`: on a CPU device, glibc's malloc keeps the memory a step frees for the next step,
instead of handing it back to the kernel and page-faulting it in again.

Why by hand: glibc serves large allocations with fresh mmap'd pages (above its mmap threshold, which it only raises
up to 32 MB) and returns them on free, so a step's activations, megabytes each, are zero-filled page by page on
every micro-batch. mallopt(M_MMAP_MAX, 0) serves every allocation from the heap, and M_TRIM_THRESHOLD of 1 GiB
keeps what is freed there for reuse: on SmolLM2-135M a step then takes 3.5x fewer page faults, half the system
time, and 4-6% less time, at the same peak RSS (bench/RESULTS.md). Freed memory then goes back to the system only
beyond 1 GiB free at the top of the heap. jemalloc, tcmalloc or mimalloc preloaded (LD_PRELOAD) do the same from
outside the process; this needs no package. The user's own allocator settings win: with a preloaded allocator,
any MALLOC_* variable or GLIBC_TUNABLES set, nothing changes. Used by one-process CPU runs only: the per-rank
memory of multi-process runs (FSDP above all) was measured with glibc's defaults."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
KEPT_AT_TOP = 2**30  # bytes of free heap top before glibc trims it


def reuse_freed_host_memory(own_settings: tuple[str, ...]) -> str:
    """Tune glibc's malloc for reuse, unless the process has `own_settings` (LaunchSettings.allocator); returns what
    was done, for the log."""
    if own_settings:
        return f"left to this process's own allocator settings ({', '.join(own_settings)})"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError, TypeError):  # TypeError: Windows, which loads no library by None
        return "unchanged: this C library has no mallopt (not glibc)"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, KEPT_AT_TOP) != 1:
        return "unchanged: mallopt refused the settings"
    return "glibc keeps freed memory in its heap (no mmap, trim above 1 GiB)"
