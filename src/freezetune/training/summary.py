"""``summary.json``: the typed record of one training run.

Every key that existed before this record did is kept (tools outside the project read them);
``schema_version`` says which layout a file has. Bump it when a key changes meaning or goes away.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torchvision

from freezetune import __version__
from freezetune.measure.device import device_description
from freezetune.measure.memory import peak_memory
from freezetune.measure.timing import timing_stats
from freezetune.training import distributed as dist
from freezetune.training.optim import optimizer_state_bytes
from freezetune.training.run_dir import read_jsonl
from freezetune.training.trainable import checkpoint_sizes

if TYPE_CHECKING:
    from freezetune.training.recipe import Outcome, Recipe

SUMMARY_SCHEMA_VERSION = 1
EPOCHS_SCHEMA_VERSION = 1
EPOCHS_NAME = "epochs.jsonl"
_TIMED_WHAT = "forward+loss+backward+SGD step incl. host-to-device copy, synchronized"


@dataclass
class RunSummary:
    """What ``summary.json`` holds; see the guide for the meaning of each section."""

    status: str
    error: str | None
    freezetune_version: str
    device: str
    versions: dict
    model: str
    weights: dict
    params: dict
    freeze: dict
    steps: int
    epochs_completed: int
    timing: dict
    timing_by_path: dict
    epochs: list[dict]
    speed: dict
    memory: dict
    optimizer_state_bytes: int
    checkpoint: dict
    loss: dict
    val: dict
    freeze_integrity: dict
    schedule: list[dict]
    auto_freeze: dict | None
    optimizer: dict
    distributed: dict
    run_dir: str
    schema_version: int = SUMMARY_SCHEMA_VERSION

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


@dataclass
class EpochRecord:
    """One line of ``epochs.jsonl``: an epoch's training time and its validation, written at its end.

    Attributes:
        epoch: The epoch (0-based).
        step: Optimizer steps taken when it ended.
        steps: Steps this process trained in it (fewer than an epoch's after a resume).
        train_s: Training seconds of the whole epoch, synchronized, cache filling included and
            validation excluded; an epoch split by an interruption is timed whole.
        cached: Whether its steps read cached features.
        val_accuracy: Top-1 accuracy on the validation set after it, or None without one.
        val_loss: Mean validation loss, or None.
        val_s: Seconds the validation pass took, or None.
        complete: False when ``train.max_steps`` ended the run inside the epoch.
    """

    epoch: int
    step: int
    steps: int
    train_s: float
    cached: bool
    val_accuracy: float | None
    val_loss: float | None
    val_s: float | None
    complete: bool = True
    schema_version: int = EPOCHS_SCHEMA_VERSION

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EpochRecord:
        """Reads one line back; keys written by newer versions are ignored."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def build_summary(recipe: Recipe, outcome: Outcome, integrity: dict) -> dict:
    """The summary of a finished (or stopped) run; on ranks other than 0, only rank and integrity.

    Per-step records come from ``metrics.jsonl``, so a resumed run's summary covers every step
    of the run, not only those of the last process.
    """
    cfg, bs = recipe.config, recipe.config.data.batch_size
    per_rank = dist.gather(timing_stats(recipe.step_times[cfg.train.warmup_steps:], bs), recipe.dist)
    if not recipe.dist.is_main:
        return {"rank": recipe.dist.rank, "freeze_integrity": integrity}
    records = [r for r in read_jsonl(recipe.run_dir / "metrics.jsonl") if "event" not in r]  # steps only
    timed = [r for r in records if not r.get("warmup")]
    losses = [r["loss"] for r in records]
    cache = recipe.engine.cache
    return RunSummary(
        status=outcome.status,
        error=outcome.error,
        freezetune_version=__version__,
        device=device_description(recipe.device),
        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
        model=cfg.model.name,
        weights={"source": recipe.loaded.weights_source, "notice": recipe.loaded.notice,
                 "head_replaced": recipe.loaded.head_replaced},
        params=recipe.params,
        freeze={"batchnorm": recipe.plan.batchnorm, "frozen_batchnorm_layers": len(recipe.plan.frozen_bn)},
        steps=recipe.state.step,
        epochs_completed=recipe.state.epoch,
        timing={**timing_stats([r["step_time_s"] for r in timed], bs),
                "warmup_steps": cfg.train.warmup_steps, "what": _TIMED_WHAT},
        timing_by_path={
            "uncached": timing_stats([r["step_time_s"] for r in timed if not r.get("cached")], bs),
            "cached": timing_stats([r["step_time_s"] for r in timed if r.get("cached")], bs),
        },
        epochs=recipe.epoch_times,
        speed={**recipe.speed, "feature_cache": {
            **recipe.speed.get("feature_cache", {}),
            "bytes": cache.nbytes if cache else 0,
            "on_disk": bool(cache and cache.on_disk),
        }},
        memory=peak_memory(recipe.device),
        optimizer_state_bytes=optimizer_state_bytes(recipe.optimizer),
        checkpoint={**checkpoint_sizes(recipe.run_dir), "step": recipe.saved_step},
        loss={"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        val={"accuracy": outcome.val["accuracy"] if outcome.val else None,
             "loss": outcome.val["loss"] if outcome.val else None},
        freeze_integrity=integrity,
        schedule=[p.as_dict() for p in recipe.phases],
        auto_freeze=recipe.auto.summary() if recipe.auto is not None else None,
        optimizer={"groups": [{"name": g.get("name"), "lr": g["lr"], "lr_mult": g.get("lr_mult", 1.0),
                               "params": sum(p.numel() for p in g["params"])}
                              for g in recipe.optimizer.param_groups],
                   "scheduler": cfg.optim.scheduler},
        distributed={"world_size": recipe.dist.world_size, "timing_per_rank": per_rank},
        run_dir=str(recipe.run_dir),
    ).as_dict()
