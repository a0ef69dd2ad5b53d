"""Peak memory: CUDA's high-water mark, or the process's resident set size on CPU.

A CPU peak can only be attributed to one arm of a comparison if the arm has the process to
itself; :func:`reset_peak_rss` and :func:`high_water_rss_bytes` bracket such a window on Linux.
"""

from __future__ import annotations

import re
import resource
import sys

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new CUDA peak-memory window (CPU peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Returns the peak memory figure for the device and what it means.

    On CUDA: ``torch.cuda.max_memory_allocated`` since the last reset. On CPU: the process's peak
    resident set size, which includes the Python interpreter and libraries.
    """
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    return {"peak_bytes": peak_rss_bytes(), "kind": "process_peak_rss"}


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def current_rss_bytes() -> int:
    """The process's current resident set size in bytes (Linux; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
