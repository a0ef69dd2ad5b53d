"""Honest measurement: device choice, synchronized step timing, percentiles, peak memory.

CUDA kernels run asynchronously, so a wall clock read without ``torch.cuda.synchronize()`` times
the kernel *launches*, not the work. Every timing here synchronizes on both ends.
"""

from __future__ import annotations

import resource
import statistics
import sys

import torch

from freezetune.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """Turns ``auto``/``cpu``/``cuda``/``cuda:N`` into a usable device.

    Raises:
        DeviceError: If CUDA (or that CUDA index) is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timing_stats(step_times: list[float], batch_size: int) -> dict:
    """Summarises step times (warm-up already removed) as median/p10/p90 and samples/s.

    Returns nulls when no step was timed, so a run stopped during warm-up still reports honestly.
    """
    if not step_times:
        return {"steps_timed": 0, "step_median_s": None, "step_p10_s": None,
                "step_p90_s": None, "step_mean_s": None, "samples_per_s": None}
    median = statistics.median(step_times)
    return {
        "steps_timed": len(step_times),
        "step_median_s": median,
        "step_p10_s": percentile(step_times, 10),
        "step_p90_s": percentile(step_times, 90),
        "step_mean_s": statistics.fmean(step_times),
        "samples_per_s": batch_size / median if median > 0 else None,
    }


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


def device_description(device: torch.device) -> str:
    """A short human-readable name for the device, e.g. ``cuda:0 (NVIDIA H100)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
