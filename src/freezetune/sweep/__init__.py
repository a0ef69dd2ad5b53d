"""``freezetune sweep``: which layers to freeze, measured: accuracy, time to accuracy, a recommendation."""

from freezetune.sweep.arms import SweepArm, default_arms, load_arms_file, merge_arms, optional_arms
from freezetune.sweep.run import collect, emit, resume, sweep
from freezetune.sweep.turns import SweepReporter

__all__ = ["SweepArm", "SweepReporter", "collect", "default_arms", "emit", "load_arms_file", "merge_arms",
           "optional_arms", "resume", "sweep"]
