"""Honest timing: synchronized step times, percentiles and their summary.

CUDA kernels run asynchronously, so a wall clock read without ``torch.cuda.synchronize()`` times
the kernel *launches*, not the work. Every timing here synchronizes on both ends.
"""

from __future__ import annotations

import statistics

import torch


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
