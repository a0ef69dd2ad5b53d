"""Side-by-side measurement of freeze configs (arms), and the benchmark built on it.

The public API, usable from Python::

    from freezetune import compare
    from freezetune.config import load_config

    result = compare.frozen_vs_full(load_config("configs/resnet18_linear_probe.yaml"), steps=10)
    print(result["speedup"])

Modules: :mod:`~freezetune.compare.arms` (which arms, in which modes),
:mod:`~freezetune.compare.worker` (an arm trained through the recipe, in or out of process),
:mod:`~freezetune.compare.run` (turns, the timing and memory passes),
:mod:`~freezetune.compare.result` (typed records and flat rows), :mod:`~freezetune.compare.bench`.
"""

from freezetune.compare.arms import (
    BASELINE,
    DEPTHS,
    MODES,
    ArmSpec,
    arm_config,
    check_modes,
    depth_arms,
    freeze_points,
    frozen_vs_full_arms,
)
from freezetune.compare.result import CompareResult, arm_mode, assemble, by_depth, csv_rows, headline, to_csv
from freezetune.compare.run import (
    MEMORY_STEPS,
    MEMORY_WARMUP,
    default_block,
    depths,
    frozen_vs_full,
    measure,
    merge_memory,
    run_comparison,
    schedule,
)

__all__ = [
    "BASELINE", "DEPTHS", "MEMORY_STEPS", "MEMORY_WARMUP", "MODES", "ArmSpec", "CompareResult", "arm_config",
    "arm_mode", "assemble", "by_depth", "check_modes", "csv_rows", "default_block", "depth_arms", "depths",
    "freeze_points", "frozen_vs_full", "frozen_vs_full_arms", "headline", "measure", "merge_memory",
    "run_comparison", "schedule", "to_csv",
]
