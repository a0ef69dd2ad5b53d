"""``summary.json``: the typed record of one training run.

Every key that existed before this record did is kept (tools outside the project read them);
``schema_version`` says which layout a file has. Bump it when a key changes meaning or goes away.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torchvision

from freezetune import __version__
from freezetune.config import Config
from freezetune.measure.device import device_description
from freezetune.measure.memory import peak_memory
from freezetune.measure.timing import timing_stats
from freezetune.records import (
    CacheChoice,
    Execution,
    LossEnds,
    ParamCounts,
    Record,
    TimingStats,
    Versions,
    WeightsOrigin,
)
from freezetune.training import distributed as dist
from freezetune.training.data import worker_count
from freezetune.training.events import Outcome
from freezetune.training.optim import optimizer_state_bytes
from freezetune.training.run_dir import EPOCHS_NAME, RunDir
from freezetune.training.trainable import checkpoint_sizes

SUMMARY_SCHEMA_VERSION = 1
EPOCHS_SCHEMA_VERSION = 1
__all__ = ["EPOCHS_NAME", "EpochRecord", "RunFacts", "RunSummary", "build_summary"]
_TIMED_WHAT = "forward+loss+backward+SGD step incl. host-to-device copy, synchronized"
# A run that spends more of its training time than this waiting for batches is input-bound:
# faster steps (freezing more, the GPU) would not make it faster, more loading would.
INPUT_BOUND_SHARE = 0.2


class RunWeights(WeightsOrigin):
    """Where the run's starting weights came from, and whether the classifier was replaced."""

    head_replaced: bool


class ModuleParams(Record):
    """One top-level module's parameters by ``requires_grad``."""

    total: int
    trainable: int
    frozen: int


class RunParams(ParamCounts):
    """Parameter counts as the run started (``freezing.params.count_params``)."""

    by_module: dict[str, ModuleParams]  # keyed by top-level module name (``layer3``)


class RunFreeze(Record):
    """The BatchNorm policy, how many BatchNorm layers it keeps in eval mode, and ``adapt.method``."""

    batchnorm: str
    frozen_batchnorm_layers: int
    adapt: str = "none"  # absent from summaries written before adapt.method


class RunTiming(TimingStats):
    """Every timed step of the run (warm-up excluded), and what one step's time covers."""

    warmup_steps: int
    what: str


class TimingByPath(Record):
    """The timed steps split by whether they read cached features."""

    uncached: TimingStats
    cached: TimingStats


class EpochTime(Record):
    """One pass over an epoch's batches in this process (``training.recipe.EpochEnd``)."""

    epoch: int
    seconds: float  # this process's pass
    steps: int
    cached: bool
    epoch_seconds: float  # the whole epoch's, earlier processes' share included
    train_loss: float | None = None  # mean over the whole epoch's steps
    io_seconds: float = 0.0  # this pass's logging and checkpoints between steps, not in seconds
    data_wait_seconds: float = 0.0  # the part of seconds spent waiting for batches


class CacheUse(CacheChoice):
    """The feature-cache choice, with the cache's size and whether it is memory-mapped from the run folder."""

    bytes: int
    on_disk: bool


class Speed(Execution):
    """The execution path the run took (``summary.json``'s ``speed``)."""

    feature_cache: CacheUse


class PeakMemory(Record):
    """Peak memory (``measure.memory.peak_memory``)."""

    peak_bytes: int
    kind: str  # cuda_max_allocated | process_peak_rss


class CheckpointSizes(Record):
    """Sizes of checkpoint.pt, the trainable-only checkpoint and the frozen base (null if absent), and the step.

    ``full_bytes`` is checkpoint.pt's size; since checkpoint format 2 the frozen base it refers to
    is ``base.safetensors`` (``base_bytes``), written once per run.
    """

    full_bytes: int | None
    trainable_bytes: int | None
    step: int | None
    base_bytes: int | None = None


class ValFigures(Record):
    """The last validation's top-1 accuracy and mean loss (null without validation data)."""

    accuracy: float | None
    loss: float | None


class RunIntegrity(Record):
    """The run's freeze-integrity check: every still-frozen tensor against its hash from the start."""

    ok: bool
    tensors_checked: int
    changed: list[str]
    sha256: str
    checked_when_unfrozen: int  # tensors a freeze.schedule phase unfroze, checked when it did
    frozen_mid_run: int  # tensors freeze.auto froze
    ranks_ok: list[bool]  # per rank


class SchedulePhase(Record):
    """One applied ``freeze.schedule`` phase (``freezing.schedule.PhaseRecord``)."""

    epoch: int
    unfreeze: list[str]
    tensors: int
    params: int
    lr_mult: float
    groups: list[str]
    unchanged_while_frozen: bool


class AutoFreezeEvent(Record):
    """One stage ``freeze.auto`` froze (``freezing.auto.FreezeEvent`` without its per-tensor hashes)."""

    step: int
    epoch: int
    stage: str
    change: float
    cut: float
    criterion: str
    grad_norm: float
    tensors: int
    params: int
    sha256: str
    optimizer_bytes_freed: int
    bound: float | None = None  # change + noise_z standard errors; absent before the noise-aware rule


class AutoFreezeCheck(Record):
    """One check's criterion values, whether a stage froze or not (the step that closed an interval)."""

    epoch: int  # the epoch the step fell in
    step: int
    changes: dict[str, float]  # per trainable stage, its relative change of mean gradient norm
    cut: float
    candidates: list[str]
    froze: list[str]
    # The noise-aware rule's figures (absent from summaries written before it): each stage's
    # change plus noise_z standard errors, the steps each interval measured, each stage's
    # [mean, sd] gradient norm per step over the interval, and why nothing could freeze, if so.
    bounds: dict[str, float] = {}
    steps: int | None = None
    grad_norm: dict[str, list[float]] = {}
    reason: str | None = None


class AccuracyDropRecord(Record):
    """One validation more than the tolerance below the best so far, after a freeze (``freezing.auto.AccuracyDrop``)."""

    epoch: int
    step: int
    accuracy: float
    best: float
    best_epoch: int
    drop: float
    tolerance: float
    frozen: list[str]


class AutoFreezeGuard(Record):
    """The accuracy guard: the best validation accuracy so far, and every drop below it after a freeze."""

    tolerance: float
    best_accuracy: float | None
    best_epoch: int | None
    drops: list[AccuracyDropRecord]


class AutoFreezeSummary(Record):
    """What ``freeze.auto`` did (``freezing.auto.AutoFreezer.summary``)."""

    # The ``freeze.auto`` config section as dumped (``config.AutoFreezeConfig``'s fields): its shape
    # is the config's, declared there; here only the kinds of its values.
    config: dict[str, int | float | str | None]
    events: list[AutoFreezeEvent]
    checks: list[AutoFreezeCheck]
    stages_frozen: list[str]
    params_frozen: int
    optimizer_bytes_freed: int
    guard: AutoFreezeGuard | None = None  # absent from summaries written before the guard


class OptimizerGroup(Record):
    """One optimizer parameter group as the run ended."""

    name: str | None
    lr: float
    lr_mult: float
    params: int


class OptimizerSummary(Record):
    """The optimizer's parameter groups and the learning-rate schedule."""

    groups: list[OptimizerGroup]
    scheduler: str


class DistributedSummary(Record):
    """The number of processes, and each rank's own step times."""

    world_size: int
    timing_per_rank: list[TimingStats]


class DataFeed(Record):
    """How long the run's steps waited for their batches, and what that did to its throughput.

    ``timing.samples_per_s`` counts the steps alone; ``end_to_end_samples_per_s`` divides the
    samples by the training time, waits for data included (not validation, logging or saving).
    """

    wait_s: float  # every step's wait for its batch (loading, decoding, or reading the cache), summed
    train_s: float  # the epochs' training time: steps, their waits, freeze changes
    wait_share: float | None  # wait_s / train_s
    samples: int
    end_to_end_samples_per_s: float | None
    input_bound: bool  # wait_share above INPUT_BOUND_SHARE
    notice: str | None  # what to do about it, when input-bound
    num_workers: int | None = None  # the loader workers data.num_workers gave (auto decided)
    num_workers_setting: int | str | None = None  # data.num_workers as configured


class RunSummary(Record):
    """What ``summary.json`` holds; see the guide for the meaning of each section."""

    status: str  # completed | interrupted | nonfinite | pruned
    error: str | None
    freezetune_version: str
    device: str
    versions: Versions
    model: str
    weights: RunWeights
    params: RunParams
    freeze: RunFreeze
    steps: int
    epochs_completed: int
    timing: RunTiming
    timing_by_path: TimingByPath
    epochs: list[EpochTime]
    speed: Speed
    memory: PeakMemory
    optimizer_state_bytes: int
    checkpoint: CheckpointSizes
    loss: LossEnds
    val: ValFigures
    freeze_integrity: RunIntegrity
    schedule: list[SchedulePhase]
    auto_freeze: AutoFreezeSummary | None
    optimizer: OptimizerSummary
    distributed: DistributedSummary
    run_dir: str
    data: DataFeed | None = None  # absent in summaries from before data waits were timed
    started_at: float | None = None  # Unix time the run first started (a resumed run keeps its first start)
    ended_at: float | None = None  # Unix time the summary was written
    schema_version: int = SUMMARY_SCHEMA_VERSION

    def as_dict(self) -> dict:
        """Plain data for JSON: every key, in declaration order."""
        return self.model_dump()


class EpochRecord(Record):
    """One line of ``epochs.jsonl``: an epoch's training time and its validation, written at its end.

    Attributes:
        epoch: The epoch (0-based).
        step: Optimizer steps taken when it ended.
        steps: Steps this process trained in it (fewer than an epoch's after a resume).
        train_s: Training seconds of the whole epoch, synchronized: its steps, the waits for their
            batches (``data_wait_s``) and cache filling; validation and the logging and saving
            between steps (``io_s``) excluded. An epoch split by an interruption is timed whole.
        cached: Whether its steps read cached features.
        train_loss: Mean training loss over the epoch's steps (None in files from before it was kept).
        val_samples: How many samples the validation counted (None without one, or in older files).
        val_accuracy: Top-1 accuracy on the validation set after it, or None without one.
        val_loss: Mean validation loss, or None.
        val_s: Seconds the validation pass took, or None.
        complete: False when ``train.max_steps`` ended the run inside the epoch.
        io_s: Seconds this process spent between steps on logging and checkpoints (None in older files).
        data_wait_s: Seconds of ``train_s`` spent waiting for batches (None in older files).
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
    train_loss: float | None = None
    val_samples: int | None = None
    io_s: float | None = None
    data_wait_s: float | None = None
    schema_version: int = EPOCHS_SCHEMA_VERSION

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict) -> EpochRecord:
        """Reads one line back; keys written by newer versions are ignored (the record itself forbids them)."""
        return cls(**{k: data[k] for k in cls.model_fields if k in data})


@dataclass
class RunFacts:
    """What an ended run hands to :func:`build_summary`: the facts, not the live recipe.

    Attributes:
        config: The run's config.
        info: The distributed setup.
        device: Where it trained.
        run_dir: The run folder (its ``metrics.jsonl`` holds every step of the run).
        outcome: How training went.
        integrity: The freeze-integrity check.
        step_times: This process's step times, warm-up included (for the per-rank timing).
        epochs: This process's epoch ends (``EpochEnd`` dicts).
        steps: Optimizer steps taken in the whole run.
        epochs_completed: Completed epochs.
        weights: ``source``, ``notice`` and ``head_replaced`` of the loaded weights.
        params: Parameter counts as the run started.
        batchnorm: The BatchNorm policy.
        frozen_batchnorm_layers: BatchNorm layers kept in eval mode.
        adapt: The ``adapt.method``.
        speed: The execution path (``summary.json``'s ``speed`` without the cache's size).
        cache_bytes: Bytes of the feature cache (0 without one).
        cache_on_disk: Whether the cache is memory-mapped from the run folder.
        optimizer: The optimizer as it ended.
        saved_step: The newest checkpoint's step, else None.
        schedule: The applied unfreeze phases (``PhaseRecord`` dicts).
        auto_freeze: ``freeze.auto``'s summary, else None.
        started_at: Unix time the run first started (kept across resumes), else None.
    """

    config: Config
    info: dist.DistInfo
    device: torch.device
    run_dir: RunDir
    outcome: Outcome
    integrity: dict
    step_times: list[float]
    epochs: list[dict]
    steps: int
    epochs_completed: int
    weights: dict
    params: dict
    batchnorm: str
    frozen_batchnorm_layers: int
    adapt: str
    speed: dict
    cache_bytes: int
    cache_on_disk: bool
    optimizer: torch.optim.Optimizer
    saved_step: int | None
    schedule: list[dict]
    auto_freeze: dict | None
    started_at: float | None = None


def build_summary(facts: RunFacts) -> dict:
    """The summary of a finished (or stopped) run; on ranks other than 0, only rank and integrity.

    Per-step records come from ``metrics.jsonl``, so a resumed run's summary covers every step
    of the run, not only those of the last process.
    """
    cfg, bs = facts.config, facts.config.data.batch_size
    per_rank = dist.gather(timing_stats(facts.step_times[cfg.train.warmup_steps:], bs), facts.info)
    if not facts.info.is_main:
        return {"rank": facts.info.rank, "freeze_integrity": facts.integrity}
    records = facts.run_dir.step_rows()
    timed = [r for r in records if not r.get("warmup")]
    losses = [r["loss"] for r in records]
    outcome = facts.outcome
    return RunSummary(
        status=outcome.status,
        error=outcome.error,
        freezetune_version=__version__,
        device=device_description(facts.device),
        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
        model=cfg.model.name,
        weights=facts.weights,
        params=facts.params,
        freeze={"batchnorm": facts.batchnorm, "frozen_batchnorm_layers": facts.frozen_batchnorm_layers,
                "adapt": facts.adapt},
        steps=facts.steps,
        epochs_completed=facts.epochs_completed,
        timing={**timing_stats([r["step_time_s"] for r in timed], bs),
                "warmup_steps": cfg.train.warmup_steps, "what": _TIMED_WHAT},
        timing_by_path={
            "uncached": timing_stats([r["step_time_s"] for r in timed if not r.get("cached")], bs),
            "cached": timing_stats([r["step_time_s"] for r in timed if r.get("cached")], bs),
        },
        epochs=facts.epochs,
        speed={**facts.speed, "feature_cache": {
            **facts.speed.get("feature_cache", {}),
            "bytes": facts.cache_bytes,
            "on_disk": facts.cache_on_disk,
        }},
        memory=peak_memory(facts.device),
        optimizer_state_bytes=optimizer_state_bytes(facts.optimizer),
        checkpoint={**checkpoint_sizes(facts.run_dir.path), "step": facts.saved_step},
        loss={"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        val={"accuracy": outcome.val["accuracy"] if outcome.val else None,
             "loss": outcome.val["loss"] if outcome.val else None},
        freeze_integrity=facts.integrity,
        schedule=facts.schedule,
        auto_freeze=facts.auto_freeze,
        optimizer={"groups": [{"name": g.get("name"), "lr": g["lr"], "lr_mult": g.get("lr_mult", 1.0),
                               "params": sum(p.numel() for p in g["params"])}
                              for g in facts.optimizer.param_groups],
                   "scheduler": cfg.optim.scheduler},
        distributed={"world_size": facts.info.world_size, "timing_per_rank": per_rank},
        run_dir=str(facts.run_dir),
        data=data_feed(records, facts.run_dir.epoch_rows(), cfg.data.num_workers,
                       worker_count(cfg.data, facts.device, facts.info.local_world_size), facts.device.type),
        started_at=facts.started_at,
        ended_at=time.time(),
    ).as_dict()


def data_feed(steps: list[dict], epochs: list[dict], setting: int | str, workers: int,
              device_type: str = "cpu") -> dict:
    """The run's waits for data, from every step row and epoch row of the run (resumed processes' too)."""
    wait = sum(r.get("data_wait_s") or 0.0 for r in steps)
    train = sum(e["train_s"] for e in epochs)
    samples = sum(r["batch_size"] for r in steps)
    share = wait / train if train > 0 else None
    bound = share is not None and share > INPUT_BOUND_SHARE
    return {"wait_s": wait, "train_s": train, "wait_share": share, "samples": samples,
            "end_to_end_samples_per_s": samples / train if train > 0 else None, "input_bound": bound,
            "notice": input_bound_notice(share, workers, setting, device_type) if bound else None,
            "num_workers": workers, "num_workers_setting": setting}


def input_bound_notice(share: float, workers: int, setting: int | str, device_type: str = "cpu") -> str:
    """One line for an input-bound run: how much it waited, and the remedies that apply on its device."""
    given = f"{workers} loader workers" + (" from data.num_workers: auto" if setting == "auto" else "")
    cache = "the feature cache (train.feature_cache: auto, with the augmentation off)"
    if device_type == "cpu":  # workers take cores from the step's threads (measured: docs/benchmarks.md)
        remedy = f"{cache} or smaller images to decode would feed it faster; loader workers compete with a CPU step"
    else:
        remedy = f"more data.num_workers, {cache} or smaller images to decode would feed it faster"
    return f"input-bound: {share:.0%} of the training time went to waiting for data ({given}); {remedy}"
