"""A sweep's runs seen from outside, as trials: their curves and ends, read from the run folders.

What the Ray Tune backend needs besides Ray: each job's curve and status (:class:`RunView`, the
same attributes :func:`~freezetune.sweep.turns.pruning_decisions` reads of an in-process slot),
the epochs at which a trial waits for the others (:func:`barriers`), and the record of trials
that raised (``failures.json``). Nothing here imports Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from freezetune.atomic import write_json
from freezetune.errors import RunDirError, first_line
from freezetune.sweep.analysis import rungs
from freezetune.sweep.halving import halving_rungs
from freezetune.sweep.jobs import Manifest, read_run
from freezetune.sweep.result import FINISHED
from freezetune.training.summary import EpochRecord

FAILURES_NAME = "failures.json"  # the trials that raised: job index -> its one-line error


@dataclass
class RunView:
    """One job as the scheduler sees it: what :func:`pruning_decisions` reads of a run."""

    arm: str
    multiplier: float
    seed: int
    history: list[EpochRecord] = field(default_factory=list)
    status: str | None = None  # completed, nonfinite, pruned (decided), failed; None while it runs


def barriers(manifest: Manifest) -> list[int]:
    """The epochs after which a decision can fall: a trial waits there for the others."""
    if manifest.prune_mode == "off":
        return []
    epochs = manifest.base_config().train.epochs
    points = set(rungs(epochs))
    if manifest.prune_mode == "halving":
        points |= set(halving_rungs(epochs))
    return sorted(points)


def read_views(out: Path, manifest: Manifest) -> list[RunView]:
    """Every job's curve and status as its run folder has them (the pure replay's input after a restart)."""
    views = []
    for job in manifest.jobs:
        epochs, summary = read_run(out / job.run_dir)
        status = (summary or {}).get("status")
        views.append(RunView(job.arm, job.lr_multiplier, job.seed, [EpochRecord.from_dict(e) for e in epochs],
                             status if status in FINISHED else None))
    return views


def read_failures(out: Path) -> dict[int, str]:
    """The jobs whose trials raised (job index -> one-line error), as the sweep recorded them."""
    path = out / FAILURES_NAME
    if not path.is_file():
        return {}
    try:
        return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: not readable ({first_line(e)})") from None


def write_failures(out: Path, failed: dict[int, str]) -> None:
    """Records the trials that raised (``failures.json``), so that resume and collect report them."""
    write_json(out / FAILURES_NAME, {str(k): v for k, v in sorted(failed.items())})
