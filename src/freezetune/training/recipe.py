"""The fine-tuning recipe: ``setup()``, ``train()``, ``cleanup()``; every command drives it.

Usable from Python without the CLI::

    from freezetune.config import load_config
    from freezetune.training.recipe import run

    summary = run(load_config("configs/quickstart.yaml", ["train.max_steps=5"]))

``freezetune train`` calls :func:`run`. ``compare`` arms, the benchmark and ``demo frozen`` build a
:class:`Recipe` and pull steps from :meth:`Recipe.loop`, the one training loop, so the learning-rate
schedule, gradual unfreezing and the execution path are the same everywhere. Printing goes
through a :class:`Reporter`; the default one is silent.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from freezetune.atomic import remove_stale_temps, write_json, write_text
from freezetune.config import Config, dump_config, load_config
from freezetune.errors import (
    ConfigError,
    FreezeIntegrityError,
    NonFiniteLossError,
    RunDirError,
    WeightsError,
    WriteError,
    first_line,
)
from freezetune.freezing.auto import AutoFreezer, FreezeEvent
from freezetune.freezing.integrity import changed_tensors, combined_sha256, fingerprint, frozen_state
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import FreezePlan, apply_freeze, set_train_mode
from freezetune.freezing.schedule import PhaseRecord, phases_due, unfreeze_phase
from freezetune.lock import RunLock
from freezetune.measure.device import resolve_device
from freezetune.measure.memory import reset_peak_memory
from freezetune.measure.timing import synchronize
from freezetune.models.weights import build_model
from freezetune.speed.execution import ExecutionPlan, plan_execution
from freezetune.speed.feature_cache import FeatureCache, IndexedDataset, cache_key
from freezetune.speed.precision import check_precision, grad_scaler
from freezetune.speed.prefix import SplitForward
from freezetune.training import distributed as dist
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from freezetune.training.data import EpochSampler, build_data, make_loader
from freezetune.training.optim import (
    add_unfrozen,
    build_optimizer,
    check_optimizer,
    plain_optimizer,
    remove_frozen,
    set_lr,
    state_bytes,
)
from freezetune.training.run_dir import MetricsLog, claim_run_dir, read_jsonl
from freezetune.training.state import RunState, StopReason
from freezetune.training.step import (
    Batch,
    BatchSource,
    DDPForward,
    Engine,
    evaluate,
    extend_cache,
    fill_cache,
    train_step,
)
from freezetune.training.summary import EPOCHS_NAME, EpochRecord, build_summary
from freezetune.training.tensorboard import TensorBoardLog, summary_writer_class
from freezetune.training.trainable import save_trainable

FINGERPRINT_NAME = "frozen_sha256.json"


class Reporter:
    """Receives progress events; subclass it to print. Every method is optional."""

    def setup_done(self, run: Recipe) -> None:  # noqa: D102
        pass

    def train_start(self, total_steps: int, start_step: int) -> None:  # noqa: D102
        pass

    def step(self, record: dict) -> None:  # noqa: D102
        pass

    def validation(self, epoch: int, result: dict) -> None:  # noqa: D102
        pass

    def message(self, text: str) -> None:  # noqa: D102
        pass

    def train_end(self) -> None:  # noqa: D102
        pass


@dataclass
class StepRecord:
    """One optimizer step, as :meth:`Recipe.loop` yields it (one line of ``metrics.jsonl``)."""

    step: int
    epoch: int
    loss: float
    step_time_s: float
    lr: float
    batch_size: int
    warmup: bool
    cached: bool
    batch: Batch = field(repr=False, compare=False)

    def as_dict(self) -> dict:
        """The ``metrics.jsonl`` row (the batch itself is left out)."""
        return {k: v for k, v in asdict(self).items() if k != "batch"}


@dataclass
class EpochEnd:
    """The end of one pass over (what was left of) an epoch's batches.

    ``seconds`` is this process's pass; ``epoch_seconds`` adds what earlier processes spent on
    the same epoch before an interruption, so it is the whole epoch's training time.
    """

    epoch: int
    seconds: float
    steps: int
    cached: bool
    epoch_seconds: float = 0.0

    def as_dict(self) -> dict:
        """The ``summary.json`` ``epochs`` entry."""
        return asdict(self)


@dataclass
class Outcome:
    """What :meth:`Recipe.train` did."""

    status: str = StopReason.COMPLETED.value  # completed | interrupted | nonfinite
    val: dict | None = None
    error: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None


class Recipe:
    """Fine-tunes one config: ``setup()`` builds everything, ``train()`` runs, ``cleanup()`` releases.

    Args:
        config: The validated config.
        reporter: Receives progress events (only on the main rank).
        resume: Continue the run in ``config.output.dir`` from its checkpoint.
        plain_baseline: Hand *every* parameter to torch's default SGD, frozen ones included: the
            naive baseline that ``compare``'s ``plain`` arms measure. Never used for real training.
    """

    def __init__(self, config: Config, reporter: Reporter | None = None, resume: bool = False,
                 plain_baseline: bool = False):
        self.config = config
        self.reporter = reporter or Reporter()
        self.resume = resume
        self.plain_baseline = plain_baseline
        self.state = RunState()
        self.phases: list[PhaseRecord] = []
        self.step_times: list[float] = []
        self.epoch_times: list[dict] = []
        self.frozen_before: dict[str, str] = {}
        self.resumed_from_step: int | None = None
        self.saved_step: int | None = None  # step of the newest checkpoint on disk
        self.engine: Engine | None = None
        self.execution: ExecutionPlan | None = None
        self.stop_reason: StopReason | None = None
        self._restored_scaler: dict | None = None
        self._stop: StopFlag | None = None
        self._stop_requested: str | None = None
        self.nonfinite: str | None = None  # what the loss became, and at which step
        self.loss_fn = nn.CrossEntropyLoss()
        self._warmup_left = 0
        self.auto: AutoFreezer | None = None  # freeze.auto: stages freezing mid-run
        self._metrics: MetricsLog | None = None
        self._tensorboard: TensorBoardLog | None = None  # output.tensorboard, rank 0, opened by start_training
        self._lock: RunLock | None = None  # the run folder's one-writer lock (rank 0)

    # ----------------------------------------------------------------------------------------
    # setup

    def setup(self) -> Recipe:
        """Builds device, model and freeze plan, data, run folder, optimizer, state and execution path.

        Raises:
            FolderLockedError: If another live process writes the run folder.
        """
        if self.config.output.tensorboard:
            summary_writer_class()  # a missing package is refused before anything is written
        self._setup_distributed()
        self._setup_model()
        self._setup_data()
        try:
            self._setup_run_dir()
            self._setup_optimizer()
            self._setup_state()
            self._setup_execution()
        except BaseException:
            self.release_run_dir()  # a run that never started must not keep its folder locked
            raise
        return self

    def _setup_distributed(self) -> None:
        self.dist = dist.from_env()
        if self.dist.enabled:
            self.device = dist.init(self.dist, self.config.device)
        else:
            self.device = resolve_device(self.config.device)
        if not self.dist.is_main:
            self.reporter = Reporter()

    def _setup_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.loaded = build_model(cfg.model)
        self.plan = apply_freeze(self.loaded.model, cfg.freeze, cfg.model.name)
        self.params = count_params(self.loaded.model)
        if cfg.freeze.auto is not None:
            self.auto = AutoFreezer(cfg.freeze.auto, self.loaded.model, self.plan, cfg.model.name)

    def _setup_data(self) -> None:
        cfg = self.config
        self.data = build_data(cfg.data, cfg.model.num_classes, cfg.seed)
        self.per_epoch = math.ceil(len(self.data.train) // self.dist.world_size / cfg.data.batch_size)
        self.total = planned_steps(cfg, self.per_epoch)
        self.max_epochs = cfg.train.epochs

    def _setup_run_dir(self) -> None:
        # Rank 0 writes the folder, so it alone holds the folder's lock, until cleanup().
        if self.dist.is_main:
            self._lock = claim_run_dir(self.config.output.dir, self.config.output.overwrite,
                                       "train --resume" if self.resume else "train", resume=self.resume)
        dist.barrier(self.dist)
        self.run_dir = Path(self.config.output.dir)

    def release_run_dir(self) -> None:
        """Lets go of the run folder's lock (cleanup does it); another process may then write it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup_optimizer(self) -> None:
        self.model.to(self.device)
        if self.plain_baseline:
            self.optimizer = plain_optimizer(self.model, self.config.optim)
        else:
            self.optimizer = build_optimizer(self.model, self.config.optim)

    def _setup_state(self) -> None:
        if self.resume:
            self._restore()
            self._check_work_left()
            if self.dist.is_main:
                remove_stale_temps(self.run_dir)  # left by a process killed while saving
                self._truncate_metrics()
                # Record the train.* overrides, so that resuming again continues with them.
                write_text(self.run_dir / "config.yaml", dump_config(self.config))
        else:
            self.frozen_before = fingerprint(self.model, self.plan)
            if self.dist.is_main:
                write_json(self.run_dir / FINGERPRINT_NAME, self.frozen_before)
                write_text(self.run_dir / "config.yaml", dump_config(self.config))
        dist.barrier(self.dist)
        self._check_optimizer()

    def _setup_execution(self) -> None:
        """Builds the execution path that :func:`plan_execution` chose, for the current freeze state."""
        cfg, model = self.config, self.model
        check_precision(cfg.train.precision, self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        plan = plan_execution(model, self.plan, cfg, self.device, self.dist.enabled)
        engine = Engine(model, self.optimizer, self.device, cfg.train.precision, cfg.train.channels_last,
                        cfg.train.stop_on_nonfinite, scaler=self._scaler())
        if plan.prefix_without_autograd.enabled:
            engine.split = SplitForward(model, cfg.model.name, list(plan.frozen_prefix),
                                        fold=plan.fold_batchnorm.enabled,
                                        prefix_channels_last=plan.prefix_channels_last.enabled,
                                        suffix_channels_last=cfg.train.channels_last)
        if plan.feature_cache.enabled:
            key = cache_key(model, self.plan, cfg, self.data.train)
            engine.cache = FeatureCache(len(self.data.train), self.run_dir, key, cfg.train.feature_cache_max_bytes,
                                        device=self.device)
            # Validation features are kept in memory only, within what the training cache leaves.
            engine.val_features_max_bytes = cfg.train.feature_cache_max_bytes
        if plan.compile.enabled:
            if engine.split is not None:
                engine.split.prefix = torch.compile(engine.split.prefix)
                engine.split.head = torch.compile(engine.split.head)
            else:
                engine.compiled = torch.compile(model)
        # DDP registers the parameters that require grad when it is built, so it is (re)built
        # here, after every change of the freeze state.
        if plan.ddp.enabled:
            engine.ddp = dist.wrap(DDPForward(engine), self.dist, self.device)
        if self.auto is not None and self.auto.candidates():
            engine.grad_probe = self.auto.meter.observe
        self.engine, self.execution = engine, plan

    def _scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 gradient scaler: made once, so its loss scale survives a rebuild after unfreezing."""
        if self.engine is not None:
            return self.engine.scaler
        scaler = grad_scaler(self.config.train.precision, self.device)
        if scaler is not None and self._restored_scaler:
            # A resumed fp16 run continues with the loss scale it had reached, instead of
            # re-learning it from 65536 through a burst of skipped (overflowing) steps.
            scaler.load_state_dict(self._restored_scaler)
        return scaler

    def _check_optimizer(self) -> None:
        if not self.plain_baseline:  # the plain baseline holds frozen parameters on purpose
            check_optimizer(self.optimizer, self.model)

    @property
    def model(self) -> nn.Module:
        """The network being trained."""
        return self.loaded.model

    @property
    def speed(self) -> dict:
        """The execution path as the ``speed`` section of ``summary.json``, with the folded copy's bytes."""
        if not self.execution:
            return {}
        split = self.engine.split if self.engine is not None else None
        return {**self.execution.as_dict(), "folded_prefix_bytes": split.folded_bytes if split else 0}

    def extend_to(self, steps: int) -> None:
        """Lets the loop run at least ``steps`` steps in total, past the config's own length if need be.

        A comparison times the first steps of the run the config describes, at that run's learning
        rates; only when it needs more steps than the run has does the schedule stretch to them.
        """
        if steps > self.total:
            self.total = steps
            self.max_epochs = max(self.max_epochs, math.ceil(steps / max(1, self.per_epoch)))

    # ----------------------------------------------------------------------------------------
    # resume

    def _restore(self) -> None:
        path = self.run_dir / CHECKPOINT_NAME
        ckpt = load_checkpoint(path)
        fp = self.run_dir / FINGERPRINT_NAME
        self.frozen_before = json.loads(fp.read_text()) if fp.is_file() else fingerprint(self.model, self.plan)
        try:
            # Re-apply the unfreeze phases the run had reached first, so the freeze state and the
            # optimizer's param groups are exactly those the checkpoint was saved with.
            state = RunState.from_checkpoint(ckpt)
            self.apply_phases(state.phases, announce=False)
            replayed = self._replay_auto_freeze(state.auto_freeze)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise WeightsError(f"{path}: checkpoint does not fit this run's model ({first_line(e)})") from None
        self.state = state
        self._check_replayed(replayed, path)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        self._restored_scaler = ckpt.get("scaler")
        self.resumed_from_step = self.saved_step = state.step

    def _replay_auto_freeze(self, saved: dict | None) -> list[FreezeEvent]:
        """Re-freezes the stages the checkpoint had frozen, so model and optimizer match what was saved."""
        if self.auto is None or not saved:
            return []
        replayed = self.auto.load_state_dict(saved)
        remove_frozen(self.optimizer)
        return replayed

    def _check_replayed(self, replayed: list[FreezeEvent], path: Path) -> None:
        """Proves the restored weights of stages frozen mid-run are the ones hashed when they froze."""
        current = fingerprint(self.model, self.plan) if replayed else {}
        for event in replayed:
            moved = sorted(k for k, h in event.hashes.items() if current.get(k) != h)
            if moved:
                raise WeightsError(f"{path}: {event.stage} (frozen at step {event.step}) does not match "
                                   f"its hash from then: {', '.join(moved[:3])}")
            self.frozen_before.update(event.hashes)

    def _check_work_left(self) -> None:
        """Refuses to "resume" a run that already completed (it would only rewrite its summary)."""
        if self._work_left():
            return
        try:
            status = json.loads((self.run_dir / "summary.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = None  # killed after its last checkpoint: resuming writes the missing summary
        if status == "completed":
            raise RunDirError(
                f"{self.run_dir}: run already finished after {self.state.step} steps; "
                "to train longer, resume with a larger train.max_steps or train.epochs"
            )

    def _truncate_metrics(self) -> None:
        # Steps and epochs logged after the checkpoint by the interrupted process will be redone.
        for name in ("metrics.jsonl", EPOCHS_NAME):
            path = self.run_dir / name
            if path.exists():
                kept = [r for r in read_jsonl(path) if r["step"] <= self.state.step and self._event_kept(r)]
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _event_kept(self, row: dict) -> bool:
        """A freeze event logged after the checkpoint was saved is logged again when it recurs."""
        if row.get("event") != "auto_freeze":
            return True
        return self.auto is not None and row.get("stage") in {e.stage for e in self.auto.events}

    # ----------------------------------------------------------------------------------------
    # gradual unfreezing

    def apply_phases(self, upto: int, announce: bool = True) -> None:
        """Applies ``freeze.schedule`` phases until ``upto`` of them are in effect (gradual unfreezing).

        Each phase unfreezes its patterns (checking that those tensors were still bit-identical
        to the start), adds them to the optimizer as new groups with the phase's ``lr_mult``,
        re-checks optimizer hygiene and rebuilds the execution path (prefix, cache, DDP).
        ``announce`` tells the reporter; a resumed run re-applies its phases silently.
        """
        schedule = self.config.freeze.schedule
        while len(self.phases) < upto:
            phase = schedule[len(self.phases)]
            newly = unfreeze_phase(self.model, self.plan, phase, self.frozen_before)
            groups = []
            if not self.plain_baseline:  # the plain baseline already holds every parameter
                groups = add_unfrozen(self.optimizer, newly, self.config.optim, phase.lr_mult,
                                      f"unfreeze@{phase.epoch}")
            self._check_optimizer()
            record = PhaseRecord.of(phase, newly, groups)
            self.phases.append(record)
            self.state.phases = len(self.phases)
            if self.engine is not None:
                self._setup_execution()
            if not announce:
                continue
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            line = (f"epoch {phase.epoch}: unfreezing {', '.join(phase.unfreeze)} ({record.params:,} params, "
                    f"lr x{phase.lr_mult}); trainable now {trainable:,}")
            self.reporter.message(line)
            self.tensorboard_text(line)

    # ----------------------------------------------------------------------------------------
    # the training loop

    def loop(self) -> Iterator[StepRecord | EpochEnd]:
        """The training loop: yields every step, and the end of every epoch, until the run stops.

        Sets :attr:`stop_reason` when it ends. :meth:`train` logs, validates and checkpoints on
        the events; a comparison arm takes steps a block at a time and ignores epoch ends.
        """
        self._warmup_left = self.config.train.warmup_steps  # untimed steps of this process
        while self._work_left():
            if self._signalled():  # arrived during validation or a checkpoint save
                self.stop_reason = StopReason.INTERRUPTED
                return
            end = yield from self._epoch(self.state.epoch)
            if end is None:
                return  # _epoch set the stop reason
            yield end
        self.stop_reason = StopReason.COMPLETED

    def _epoch(self, epoch: int) -> Iterator[StepRecord]:
        """One pass over the epoch's remaining batches; returns its EpochEnd, or None if the run stops."""
        # Timed from before the epoch-start hooks: re-planning after a freeze and filling a
        # feature cache from the old one are part of what the epoch cost.
        synchronize(self.device)
        start, steps, stopping = time.perf_counter(), 0, False
        self._start_epoch(epoch)
        cached = self.engine.cache is not None and self.engine.cache.complete
        for batch in self.epoch_batches(epoch):
            record = self._step(batch, epoch, cached, warmup=self._warmup_left > 0)
            if record is None:
                self.stop_reason = StopReason.NONFINITE
                return None
            self._warmup_left, steps = max(0, self._warmup_left - 1), steps + 1
            yield record
            stopping = self._stop_now()
            if stopping or self.state.step >= self.total:
                break
        synchronize(self.device)
        seconds = time.perf_counter() - start
        end = EpochEnd(epoch, seconds, steps, cached, self.state.epoch_seconds + seconds)
        self.epoch_times.append(end.as_dict())
        self.state.epoch_seconds = end.epoch_seconds
        if stopping and self.state.step < self.total:
            self.stop_reason = StopReason.INTERRUPTED
            return None  # a signal during the final step lets the run complete instead
        if self.state.batch_in_epoch >= self.per_epoch:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.state.epoch_seconds = 0.0
        return end

    def _work_left(self) -> bool:
        return self.state.step < self.total and self.state.epoch < self.max_epochs

    def _start_epoch(self, epoch: int) -> None:
        self.apply_phases(phases_due(self.config.freeze.schedule, epoch))
        self.auto_freeze(epoch)
        set_train_mode(self.model, self.plan, True)

    # ----------------------------------------------------------------------------------------
    # adaptive freezing (freeze.auto)

    def auto_freeze(self, epoch: int) -> list[FreezeEvent]:
        """The epoch-start hook of ``freeze.auto``: freezes the stages that stopped learning.

        Each frozen stage leaves the optimizer (its momentum freed), its tensors' hashes join the
        integrity check, and the execution path is rebuilt once for the longer frozen prefix
        (no autograd, folded BatchNorm, a new feature cache, DDP). The new cache is filled at
        once from the old one where there was a complete one (see :func:`extend_cache`), and
        otherwise during this epoch.
        """
        if self.auto is None:
            return []
        events = self.auto.at_epoch_start(epoch, self.state.step)
        if not events:
            return []
        for event in events:
            event.optimizer_bytes_freed = state_bytes(self.optimizer, self.model, event.hashes)
            self.frozen_before.update(event.hashes)
        remove_frozen(self.optimizer)
        self._check_optimizer()
        before = self.engine
        self._setup_execution()
        if extend_cache(before, self.engine, self.config.data.batch_size):
            self.reporter.message(f"feature cache of {', '.join(self.execution.frozen_prefix)} filled from the "
                                  "cached output of the shorter prefix: this epoch trains from it")
        del before  # our last reference to the old engine: its cache is not kept to the next epoch
        for event in events:
            self.reporter.message(event.line)
            self.tensorboard_text(event.line)
            if self._metrics is not None:
                self._metrics.write({"event": "auto_freeze", **event.as_dict()})
        return events

    def _step(self, batch: Batch, epoch: int, cached: bool, warmup: bool) -> StepRecord | None:
        """Trains one batch at this step's learning rate; None if the loss was not finite."""
        set_lr(self.optimizer, self.config.optim, self.state.step, self.total)
        loss, seconds = train_step(self.engine, batch, self.loss_fn)
        self.step_times.append(seconds)
        loss = dist.mean(loss, self.dist, self.device)  # what a single process would see
        if not math.isfinite(loss) and self.config.train.stop_on_nonfinite:
            # train_step skipped the update: the step did not happen.
            self.nonfinite = f"loss became {loss} at step {self.state.step + 1}"
            return None
        self.state.step += 1
        self.state.batch_in_epoch += 1
        return StepRecord(self.state.step, epoch, loss, seconds, self.optimizer.param_groups[0]["lr"],
                          batch.size, warmup, cached, batch)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's remaining batches, in EpochSampler's order, from the cache once it is full."""
        cfg, cache = self.config, self.engine.cache
        bs = cfg.data.batch_size
        sampler = EpochSampler(len(self.data.train), cfg.seed, epoch, self.state.batch_in_epoch * bs,
                               rank=self.dist.rank, world_size=self.dist.world_size)
        if cache is not None and cache.complete:
            order = torch.tensor(list(sampler), dtype=torch.long)
            for chunk in order.split(bs):
                features, labels = cache.get(chunk)
                yield Batch(features, labels, chunk, BatchSource.FEATURES)
            return
        dataset = IndexedDataset(self.data.train) if cache is not None else self.data.train
        loader = make_loader(dataset, bs, cfg.data.num_workers, sampler, pin_memory=self.device.type == "cuda",
                             seed=cfg.seed * 1_000_003 + epoch)
        for b in loader:
            if cache is not None:
                yield Batch(b[0], b[1], b[2], BatchSource.IMAGES_FILL_CACHE)
            else:
                yield Batch(b[0], b[1], None, BatchSource.IMAGES)

    def fill_cache(self) -> float:
        """Fills the feature cache from the current epoch's batches without training; returns seconds.

        Training fills the cache during its first epoch. A comparison fills it up front instead,
        so that each of its timed steps is a later-epoch step; the time it took is the price the
        first epoch pays.

        Raises:
            ValueError: If this run has no feature cache.
        """
        return fill_cache(self.engine, self.epoch_batches(self.state.epoch) if self.engine.cache else ())

    def _signalled(self) -> bool:
        return self._stop is not None and self._stop.requested is not None

    def _stop_now(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it every step)."""
        requested = self._signalled()
        stop_now = dist.any_true(requested, self.dist, self.device)
        if stop_now and not requested and self._stop is not None:
            self._stop.requested = "another rank's signal"
        return stop_now

    def train(self) -> Outcome:
        """Runs :meth:`loop` with metrics, checkpoints, per-epoch validation and signal handling."""
        with StopFlag() as stop:
            self.start_training(stop)
            try:
                while self.train_epoch() is not None:
                    pass
            except BaseException:
                # Closing must not hide why training stopped (a full disk refuses the close too).
                with contextlib.suppress(Exception):
                    self.end_training()
                raise
            self.end_training()
        return self.outcome()

    def start_training(self, stop: StopFlag | None = None) -> None:
        """Opens the metrics log and starts :meth:`loop`; :meth:`train_epoch` then runs it an epoch at a time.

        :meth:`train` is the usual driver. A sweep drives several recipes through these three
        methods, so that its arms take turns epoch by epoch in one process.

        Args:
            stop: The signal flag the loop checks after every step (None: never stopped).

        Raises:
            ConfigError: If ``output.tensorboard`` is on but the tensorboard package is missing.
        """
        if self.config.output.tensorboard and self.dist.is_main:  # first: a missing package leaves nothing open
            self._tensorboard = TensorBoardLog(self.run_dir, self.config, resumed_from=self.resumed_from_step)
            self.reporter.message(f"TensorBoard events in {self._tensorboard.dir} (tensorboard --logdir "
                                  f"{self._tensorboard.dir})")
        self._metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None,
                                   append=self.resumed_from_step is not None)
        self._epochs_log = MetricsLog(self.run_dir / EPOCHS_NAME if self.dist.is_main else None,
                                      append=self.resumed_from_step is not None)
        self._outcome = Outcome()
        self._stop = stop
        reset_peak_memory(self.device)
        self.reporter.train_start(self.total, self.state.step)
        if self.config.train.feature_cache != "off":
            self.reporter.message(self.execution.feature_cache.reason)
        self._events = self.loop()

    def train_epoch(self) -> EpochRecord | None:
        """Trains until the next epoch ends, then validates and saves; None once the loop has ended.

        Raises:
            WriteError: If a checkpoint or a log cannot be written; its message says which
                checkpoint is intact and how to resume from it.
        """
        try:
            for event in self._events:
                if isinstance(event, StepRecord):
                    self._after_step(event, self._metrics, self._outcome)
                else:
                    return self._after_epoch(event, self._outcome)
        except WriteError as e:
            raise e.with_hint(self.resume_hint()) from e
        return None

    def resume_hint(self) -> str:
        """What to do after a write fault: which checkpoint survived, and the command that continues from it."""
        if self.saved_step is None:
            return "no checkpoint had been saved yet: start the run again (output.overwrite=true reuses this folder)"
        return (f"the checkpoint of step {self.saved_step} is intact; once the folder can be written again, "
                f"`freezetune train --resume {self.run_dir}` continues from it")

    def end_training(self) -> None:
        """Closes the logs; call it once the loop has ended or raised."""
        self._stop_requested = self._stop.requested if self._stop is not None else None
        self._stop = None
        self._metrics.close()
        self._epochs_log.close()
        if self._tensorboard is not None:
            self._tensorboard.close()  # summarize() still adds the hyperparameters, in a file of their own
        self.reporter.train_end()

    @property
    def finished(self) -> bool:
        """Whether the run has trained every step it planned."""
        return not self._work_left()

    def stop(self, reason: StopReason, why: str) -> None:
        """Ends the loop from outside at an epoch boundary (a sweep pruning this run), saying why."""
        self._events.close()
        self.stop_reason = reason
        self._outcome.error = why

    def outcome(self) -> Outcome:
        """What training did, once :meth:`train_epoch` returned None; saves an interrupted run."""
        outcome = self._outcome
        outcome.status = self.stop_reason.value
        if self.stop_reason is StopReason.NONFINITE:
            outcome.error = self.nonfinite
        elif self.stop_reason is StopReason.INTERRUPTED:
            requested = self._stop_requested or "a stop request"
            outcome.error = f"stopped by {requested} after step {self.state.step}"
            self.save()
        return outcome

    def _after_step(self, record: StepRecord, metrics: MetricsLog, outcome: Outcome) -> None:
        row = record.as_dict()
        metrics.write(row)
        if self._tensorboard is not None:
            self._tensorboard.step(row, self.optimizer)
        self.reporter.step(row)
        outcome.first_loss = record.loss if outcome.first_loss is None else outcome.first_loss
        outcome.last_loss = record.loss
        every = self.config.train.checkpoint_every
        if every and record.step % every == 0:
            self.save()

    def _after_epoch(self, end: EpochEnd, outcome: Outcome) -> EpochRecord:
        val, val_s = None, None
        if self.data.val is not None:
            cfg = self.config.data
            synchronize(self.device)
            start = time.perf_counter()
            val = evaluate(self.engine, self.plan, self.data.val, cfg.batch_size, cfg.num_workers, self.loss_fn)
            synchronize(self.device)
            val_s = time.perf_counter() - start
            outcome.val = val
            self.reporter.validation(end.epoch, val)
        record = EpochRecord(
            epoch=end.epoch, step=self.state.step, steps=end.steps, train_s=end.epoch_seconds, cached=end.cached,
            val_accuracy=val["accuracy"] if val else None, val_loss=val["loss"] if val else None, val_s=val_s,
            complete=self.state.epoch > end.epoch,
        )
        self._epochs_log.write(record.as_dict())
        if self._tensorboard is not None:
            self._tensorboard.epoch(record)
        self.save()
        return record

    def tensorboard_text(self, text: str) -> None:
        """Logs an event line (an unfreeze or freeze) as TensorBoard text at the current step, if it is on."""
        if self._tensorboard is not None:
            self._tensorboard.text("events", text, self.state.step)

    def save(self) -> None:
        """Writes the trainable-only checkpoint, then ``checkpoint.pt``; each atomically.

        ``checkpoint.pt`` goes last, so whenever it holds step N the trainable checkpoint holds
        step N or (if the process died in between) N+1.
        """
        if not self.dist.is_main:
            return  # every rank holds the same weights; rank 0 writes them
        # The base is what is frozen now, hashed as it was before training (a layer unfrozen
        # mid-run is saved with the trainable tensors instead).
        plan = self._base_plan()
        frozen_now = set(frozen_state(self.model, plan))
        cfg = self.config
        if self.auto is not None:
            self.state.auto_freeze = self.auto.state_dict()
        save_trainable(
            self.run_dir, self.model, plan,
            base=combined_sha256({k: h for k, h in self.frozen_before.items() if k in frozen_now}),
            step=self.state.step,
            model_name=cfg.model.name,
            num_classes=cfg.model.num_classes,
            weights_source=self.loaded.weights_source,
            seed=cfg.seed,
        )
        save_checkpoint(self.run_dir, self.model, self.optimizer, self.state, self.engine.scaler)
        self.saved_step = self.state.step

    def _base_plan(self) -> FreezePlan:
        """The plan as the trainable-only checkpoint sees it.

        Stages frozen mid-run changed since the start, so they are saved with the trainable
        tensors, not left to the base.
        """
        if self.auto is None or not self.auto.events:
            return self.plan
        mid_run = self.auto.frozen_names()
        return FreezePlan(trainable=self.plan.trainable + [n for n in self.plan.frozen if n in mid_run],
                          frozen=[n for n in self.plan.frozen if n not in mid_run],
                          frozen_bn=[n for n in self.plan.frozen_bn if not any(k.startswith(n + ".") for k in mid_run)],
                          batchnorm=self.plan.batchnorm)

    # ----------------------------------------------------------------------------------------
    # after training

    def freeze_integrity(self) -> dict:
        """Compares every still-frozen tensor with its hash from the start of the run (on every rank).

        Tensors unfrozen by a ``freeze.schedule`` phase were checked when they were unfrozen.
        """
        after = fingerprint(self.model, self.plan)
        changed = changed_tensors(self.frozen_before, after)
        ranks_ok = dist.gather(not changed, self.dist)
        return {
            "ok": all(ranks_ok),
            "tensors_checked": len(after),
            "changed": changed,
            "sha256": combined_sha256(after),
            "checked_when_unfrozen": sum(p.tensors for p in self.phases),
            "frozen_mid_run": sum(e.tensors for e in self.auto.events) if self.auto else 0,
            "ranks_ok": ranks_ok,
        }

    def summarize(self, outcome: Outcome) -> dict:
        """Checks freeze integrity and writes ``summary.json`` (rank 0); returns the summary dict."""
        integrity = self.freeze_integrity()
        summary = build_summary(self, outcome, integrity)
        if self.dist.is_main:
            try:
                write_json(self.run_dir / "summary.json", summary)
            except WriteError as e:
                raise e.with_hint(self.resume_hint() + " (it writes the missing summary)") from e
            if self._tensorboard is not None:
                self._tensorboard.hparams(self.config, summary)
        return summary

    def cleanup(self) -> None:
        """Releases DDP, the process group and the run folder's lock; safe to call after a failure."""
        # Drop the DDP wrapper (and any replaced by unfreezing) before the process group goes:
        # a reducer destroyed after its group can abort the process at exit.
        if self.engine is not None:
            self.engine.ddp = None
        gc.collect()
        dist.shutdown(self.dist)
        self.release_run_dir()


def run(config: Config, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Runs the whole recipe and returns the summary.

    Raises:
        NonFiniteLossError: After writing the summary, if the loss became NaN or infinite.
        FreezeIntegrityError: If a frozen tensor changed (a bug, never expected).
    """
    recipe = Recipe(config, reporter, resume).setup()
    try:
        recipe.reporter.setup_done(recipe)
        summary = recipe.summarize(recipe.train())
    finally:
        recipe.cleanup()
    return verdict(recipe, summary)


def verdict(recipe: Recipe, summary: dict) -> dict:
    """Returns the summary of a healthy run; raises for a non-finite loss or moved frozen tensors.

    Every rank raises alike (ranks other than 0 hold only ``rank`` and ``freeze_integrity``).
    """
    if recipe.stop_reason is StopReason.NONFINITE:
        if recipe.saved_step is None:
            kept = "no checkpoint had been saved yet (train.checkpoint_every saves every N steps)"
        else:
            kept = f"the last good checkpoint (step {recipe.saved_step}) is kept in {recipe.run_dir / CHECKPOINT_NAME}"
        raise NonFiniteLossError(f"{recipe.nonfinite}; stopped, {kept}")
    if not summary["freeze_integrity"]["ok"]:
        raise FreezeIntegrityError(
            f"frozen tensors changed during training: {', '.join(summary['freeze_integrity']['changed'][:5])}"
        )
    return summary


def planned_steps(config: Config, steps_per_epoch: int) -> int:
    """Total optimizer steps the run will take (epochs x batches, capped by max_steps)."""
    total = config.train.epochs * steps_per_epoch
    return min(total, config.train.max_steps) if config.train.max_steps else total


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """Loads a run folder's own config with overrides that may not change what was trained.

    Raises:
        ConfigError: If an override would change the model, freeze spec, data or seed.
        RunDirError: If the folder holds no resumable run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        raise RunDirError(f"{run_dir}: no config.yaml and checkpoint.pt to resume from")
    base = load_config(run_dir / "config.yaml")
    config = load_config(run_dir / "config.yaml", overrides)
    for section in ("seed", "model", "freeze", "data", "optim", "output"):
        if getattr(base, section) != getattr(config, section):
            raise ConfigError(
                f"resume {run_dir}: overrides may not change {section} "
                "(only train.* and device may change when resuming)"
            )
    return config


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who really means it.
    """

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
