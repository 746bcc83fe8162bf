"""Memory of this process: host resident set (every backend) and the device allocator's figures (CUDA)."""

from __future__ import annotations

import os

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_rss_bytes() -> float:
    """Resident set size now, from /proc (a read of a few bytes; 0 where /proc does not exist)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except OSError:
        return 0.0


def device_memory_bytes(device: torch.device) -> tuple[float, float]:
    """(peak allocated since the last call, reserved now) on a CUDA device; (0, 0) elsewhere. The peak is reset,
    so each logging window reports its own."""
    if device.type != "cuda":
        return 0.0, 0.0
    peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    return float(peak), float(reserved)
