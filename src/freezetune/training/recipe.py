"""The fine-tuning recipe: ``setup()``, ``train()``, ``finish()``; every command drives it.

Usable from Python without the CLI::

    from freezetune.config import load_config
    from freezetune.training.recipe import run

    summary = run(load_config("configs/quickstart.yaml", ["train.max_steps=5"]))

``freezetune train`` calls :func:`run`. ``compare`` arms, the benchmark and ``demo frozen`` build a
:class:`Recipe` and pull steps from :meth:`Recipe.loop`, the one training loop; a sweep drives it an
epoch at a time. Every run ends in :meth:`Recipe.finish`, whoever drives it. Freeze changes are the
:class:`~freezetune.training.freeze_controller.FreezeController`'s; the run folder's files are
:class:`~freezetune.training.run_dir.RunDir`'s. Printing goes through a :class:`Reporter`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch import nn

from freezetune.atomic import remove_stale_temps, settle
from freezetune.config import Config
from freezetune.errors import NonFiniteLossError, WriteError
from freezetune.freezing.integrity import combined_sha256
from freezetune.freezing.plan import apply_freeze
from freezetune.measure.device import resolve_device
from freezetune.measure.memory import reset_peak_memory
from freezetune.measure.timing import synchronize
from freezetune.models.lean import make_lean
from freezetune.models.weights import build_model
from freezetune.speed.precision import grad_scaler
from freezetune.training import distributed as dist
from freezetune.training.data import build_data, worker_count
from freezetune.training.engine_build import build_engine
from freezetune.training.events import EpochEnd, Outcome, Progress, RunResult, StepRecord
from freezetune.training.freeze_controller import FreezeController
from freezetune.training.logs import RunLogs
from freezetune.training.loop import TrainingLoop
from freezetune.training.optim import build_optimizer, plain_optimizer
from freezetune.training.reporter import Reporter
from freezetune.training.resume import check_work_left, restore, resume_config
from freezetune.training.run_dir import RunDir
from freezetune.training.saving import RunSaver
from freezetune.training.signals import StopFlag
from freezetune.training.state import Budget, RunState, StopReason
from freezetune.training.step import Engine, evaluate
from freezetune.training.summary import EpochRecord, RunFacts, build_summary
from freezetune.training.tensorboard import summary_writer_class

__all__ = ["EpochEnd", "Outcome", "Recipe", "Reporter", "RunResult", "StepRecord", "StopFlag", "planned_steps",
           "resume_config", "run", "verdict"]


class Recipe:
    """Fine-tunes one config: ``setup()`` builds everything, ``train()`` runs, ``finish()`` ends it.

    Args:
        config: The validated config.
        reporter: Receives progress events (only on the main rank).
        resume: Continue the run in ``config.output.dir`` from its checkpoint.
        plain_baseline: Hand *every* parameter to torch's default SGD, frozen ones included: the
            naive baseline that ``compare``'s ``plain`` arms measure. Never used for real training.
    """

    def __init__(self, config: Config, reporter: Reporter | None = None, resume: bool = False,
                 plain_baseline: bool = False):
        self.config, self.reporter = config, reporter or Reporter()
        self.resume, self.plain_baseline = resume, plain_baseline
        self.run_dir = RunDir(config.output.dir)
        self.scaler: torch.amp.GradScaler | None = None
        self.training: TrainingLoop | None = None  # the engine, built by setup()
        self.logs: RunLogs | None = None  # opened by start_training, closed by end_training
        self._events: Iterator | None = None  # the running loop
        self._threads_before: int | None = None  # torch's thread count before train.threads, restored by cleanup

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
            self.training.engine = self._build_engine()
        except BaseException:
            self.run_dir.release()  # a run that never started must not keep its folder locked
            raise
        return self

    def _setup_distributed(self) -> None:
        if self.config.train.threads is not None:
            # Several jobs on one machine (a sweep's emitted jobs under xargs -P, a SLURM array)
            # would each take every core and oversubscribe them.
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.config.train.threads)
        self.dist = dist.from_env()
        self.device = dist.init(self.dist, self.config.device) if self.dist.enabled else resolve_device(
            self.config.device)
        if not self.dist.is_main:
            self.reporter = Reporter()

    def _setup_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.loaded = build_model(cfg.model)
        plan = apply_freeze(self.loaded.model, cfg.freeze, cfg.model.name, cfg.adapt)
        if cfg.train.lean_backward:
            make_lean(self.loaded.model)  # after the adapters, so that their frozen base convs are lean too
        self.freeze = FreezeController(cfg, self.loaded.model, plan, self.plain_baseline)

    def _setup_data(self) -> None:
        cfg = self.config
        self.data = build_data(cfg.data, cfg.model.num_classes, cfg.seed)
        per_epoch = math.ceil(len(self.data.train) // self.dist.world_size / cfg.data.batch_size)
        self.budget = Budget.of(cfg.train.epochs, cfg.train.max_steps, per_epoch)
        self.freeze.plan_checks(self.budget.total)

    def _setup_run_dir(self) -> None:
        # Rank 0 writes the folder, so it alone holds the folder's lock, until cleanup().
        if self.dist.is_main:
            self.run_dir.claim(self.config.output.overwrite, "train --resume" if self.resume else "train",
                               resume=self.resume)
        dist.barrier(self.dist)

    def _setup_optimizer(self) -> None:
        self.model.to(self.device)
        make = plain_optimizer if self.plain_baseline else build_optimizer
        self.optimizer = make(self.model, self.config.optim)

    def _setup_state(self) -> None:
        self.scaler = grad_scaler(self.config.train.precision, self.device)
        self.training = TrainingLoop(self.config, self.dist, self.device, self.freeze, self.optimizer,
                                     RunState(started_at=time.time()),
                                     self.budget, None, self._build_engine, self._say, self.data.train)
        self.saver = RunSaver(self.config, self.run_dir, self.freeze, self.loaded, self.optimizer, self.progress,
                              self.dist.is_main)
        if self.resume:
            state = self.training.state = restore(self.run_dir, self.freeze, self.model, self.optimizer, self.scaler)
            self.progress.resumed_from_step = self.progress.saved_step = state.step
            check_work_left(self.run_dir, self.budget.work_left(state), state.step)
            if self.dist.is_main:
                remove_stale_temps(self.run_dir.path)  # left by a process killed while saving
                # Steps, events and epochs logged after the checkpoint will be redone.
                self.run_dir.truncate_logs(state.step, self.freeze.logged_event_kept)
                # Record the train.* overrides, so that resuming again continues with them.
                self.run_dir.write_config(self.config)
        else:
            hashes = self.freeze.start(self.optimizer)
            if self.dist.is_main:
                self.run_dir.write_fingerprints(hashes)
                self.run_dir.write_config(self.config)
        dist.barrier(self.dist)

    def _build_engine(self) -> Engine:
        """The execution path that ``plan_execution`` chooses for the current freeze state."""
        return build_engine(self.model, self.plan, self.config, self.optimizer, self.device, self.dist,
                            self.data.train, self.run_dir.path, self.scaler, self.freeze.grad_probe())

    def _say(self, line: str, event: dict | None, log: bool) -> None:
        """Reports a freeze change's line, and logs it (as a text, or with its event row)."""
        self.reporter.message(line)
        if self.logs is None or not log:  # a comparison arm logs nothing
            return
        if event is None:
            self.logs.text(line, self.state.step)
        else:
            self.logs.event(event, line, self.state.step)

    # ----------------------------------------------------------------------------------------
    # what the run is (read by the console, compare, the demo and tests)

    @property
    def model(self) -> nn.Module:
        """The network being trained."""
        return self.loaded.model

    @property
    def plan(self):
        """The freeze plan as it stands (it changes as stages freeze or unfreeze)."""
        return self.freeze.plan

    @property
    def auto(self):
        """``freeze.auto``'s state, or None."""
        return self.freeze.auto

    @property
    def engine(self) -> Engine | None:
        """The execution path every step runs through (rebuilt at each freeze change)."""
        return self.training.engine if self.training is not None else None

    @property
    def state(self) -> RunState:
        """Where the run stands: step, epoch, position in the epoch."""
        return self.training.state

    @property
    def progress(self) -> Progress:
        """What this process has done so far."""
        return self.training.progress

    @property
    def loss_fn(self) -> nn.Module:
        """The training loss."""
        return self.training.loss_fn

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the loop ended, once it has."""
        return self.progress.stop_reason

    @property
    def finished(self) -> bool:
        """Whether the run has trained every step it planned."""
        return self.training.finished

    def extend_to(self, steps: int) -> None:
        """Lets the loop run at least ``steps`` steps in total, past the config's own length if need be.

        A comparison times the first steps of the run the config describes, at that run's learning
        rates; only when it needs more steps than the run has does the schedule stretch to them.
        """
        self.budget.extend_to(steps)

    def loop(self) -> Iterator[StepRecord | EpochEnd]:
        """The training loop (:meth:`TrainingLoop.run`): every step and epoch end, until the run stops."""
        return self.training.run()

    def fill_cache(self) -> float:
        """Fills the feature cache up front, so that a comparison times only later-epoch steps; returns seconds."""
        return self.training.fill_cache()

    # ----------------------------------------------------------------------------------------
    # training: logs, validation and checkpoints around the loop

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
        return self.progress.outcome

    def start_training(self, stop: StopFlag | None = None) -> None:
        """Opens the logs and starts :meth:`loop`; :meth:`train_epoch` then runs it an epoch at a time.

        :meth:`train` is the usual driver. A sweep drives several recipes through these methods and
        :meth:`finish`, so that its arms take turns epoch by epoch in one process.

        Args:
            stop: The signal flag the loop checks after every step (None: never stopped).

        Raises:
            ConfigError: If ``output.tensorboard`` is on but the tensorboard package is missing.
        """
        self.logs = RunLogs(self.run_dir, self.config, self.dist.is_main, self.progress.resumed_from_step)
        if self.logs.tensorboard is not None:
            tb = self.logs.tensorboard.dir
            self.reporter.message(f"TensorBoard events in {tb} (tensorboard --logdir {tb})")
        self.training.stop_flag = stop
        reset_peak_memory(self.device)
        self.reporter.train_start(self.budget.total, self.state.step)
        if self.config.train.feature_cache != "off":
            self.reporter.message(self.engine.execution.feature_cache.reason)
        self._events = self.loop()

    def train_epoch(self) -> EpochRecord | None:
        """Trains until the next epoch ends, then validates and saves; None once the loop has ended.

        Raises:
            WriteError: If a checkpoint or a log cannot be written; its message says which
                checkpoint is intact and how to resume from it.
        """
        try:
            for event in self._events:
                if not isinstance(event, StepRecord):
                    return self._after_epoch(event)
                row = event.as_dict()
                self.logs.step(row, self.optimizer)
                self.reporter.step(row)
                self.progress.record_loss(event.loss)
                every = self.config.train.checkpoint_every
                if every and event.step % every == 0:
                    self.save()
        except WriteError as e:
            raise e.with_hint(self.saver.hint()) from e
        return None

    def _after_epoch(self, end: EpochEnd) -> EpochRecord:
        val, val_s = None, None
        if self.data.val is not None:
            cfg = self.config.data
            synchronize(self.device)
            start = time.perf_counter()
            val = evaluate(self.engine, self.plan, self.data.val, cfg.batch_size,
                           worker_count(cfg, self.device, self.dist.local_world_size), self.loss_fn)
            synchronize(self.device)
            val_s = time.perf_counter() - start
            self.progress.outcome.val = val
            self.reporter.validation(end.epoch, val)
            self._guard(end.epoch, val["accuracy"])
        record = EpochRecord(
            epoch=end.epoch, step=self.state.step, steps=end.steps, train_s=end.epoch_seconds, cached=end.cached,
            train_loss=end.train_loss, io_s=end.io_seconds, data_wait_s=end.data_wait_seconds,
            val_accuracy=val["accuracy"] if val else None, val_loss=val["loss"] if val else None, val_s=val_s,
            val_samples=val["samples"] if val else None,
            complete=self.state.epoch > end.epoch,
        )
        self.logs.epoch(record)
        self.save()
        return record

    def _guard(self, epoch: int, accuracy: float) -> None:
        """Says when a ``freeze.auto`` run fell below its best accuracy so far after a freeze (console, logs)."""
        drop = self.auto.validated(epoch, self.state.step, accuracy) if self.auto is not None else None
        if drop is not None:
            self._say(drop.line, {"event": "accuracy_drop", **asdict(drop)}, True)

    def end_training(self) -> None:
        """Closes the logs; call it once the loop has ended or raised (:meth:`finish` does)."""
        if self.logs is None or self.logs.closed:
            return
        flag, self.training.stop_flag = self.training.stop_flag, None
        self.progress.stop_requested = flag.requested if flag is not None else None
        self.logs.close()  # summarize() still adds the TensorBoard hyperparameters, in a file of their own
        self.reporter.train_end()

    def stop(self, reason: StopReason, why: str) -> None:
        """Ends the loop from outside at an epoch boundary (a sweep pruning this run), saying why."""
        if self._events is not None:
            self._events.close()
        self.progress.stop_reason = reason
        self.progress.outcome.error = why

    def save(self) -> None:
        """Writes ``checkpoint.pt`` now (:meth:`RunSaver.save`)."""
        self.saver.save(self.state, self.engine.scaler)

    # ----------------------------------------------------------------------------------------
    # the end of a run: one way, whoever drives it

    def finish(self, stop: StopReason | None = None, why: str | None = None, summary: bool = True) -> RunResult:
        """Ends the run: closes its logs, checks freeze integrity, writes the summary, releases the folder.

        Every run ends here: ``train``, a sweep's arms (completed, pruned or parked), ``compare``'s
        arms and the demos.

        Args:
            stop: Stop the loop now for this reason (a sweep pruning the run), else None.
            why: What to record as the run's ``error`` when ``stop`` is given.
            summary: Whether to write ``summary.json`` (and save an interrupted run); a comparison
                arm or a parked sweep run ends without one.

        Returns:
            How the run ended; read it instead of the recipe's attributes.

        Raises:
            WriteError: If the summary cannot be written (its message says how to resume).
        """
        try:
            if stop is not None:
                self.stop(stop, why or stop.value)
            self.end_training()
            outcome = self.outcome() if summary else self._unsummarized()
            # A run the sweep stopped is a dead end: its checkpoint holds its weights for export.
            self.saver.finish(self.state.step, weights=summary and outcome.status != StopReason.PRUNED.value)
            written = self.summarize(outcome) if summary else None
            integrity = written["freeze_integrity"] if written else self.freeze_integrity()
            return RunResult(status=outcome.status, error=outcome.error, integrity=integrity,
                             frozen_sha256_before=combined_sha256(self.freeze.frozen_before), summary=written,
                             saved_step=self.progress.saved_step, run_dir=str(self.run_dir),
                             nonfinite=self.progress.nonfinite)
        finally:
            self.cleanup()

    def outcome(self) -> Outcome:
        """What training did, once the loop has ended; saves an interrupted run."""
        outcome, reason = self.progress.outcome, self.progress.stop_reason
        outcome.status = (reason or StopReason.INTERRUPTED).value
        if reason is StopReason.NONFINITE:
            outcome.error = self.progress.nonfinite
        elif reason is StopReason.INTERRUPTED:
            requested = self.progress.stop_requested or "a stop request"
            outcome.error = f"stopped by {requested} after step {self.state.step}"
            self.save()
        return outcome

    def _unsummarized(self) -> Outcome:
        """The outcome of a run ended without a summary: one with work left is resumable, so interrupted."""
        outcome, reason = self.progress.outcome, self.progress.stop_reason
        outcome.status = reason.value if reason is not None and self.finished else StopReason.INTERRUPTED.value
        return outcome

    def freeze_integrity(self) -> dict:
        """The freeze-integrity check (on every rank); see :meth:`FreezeController.integrity`."""
        return self.freeze.integrity(self.dist)

    def summarize(self, outcome: Outcome) -> dict:
        """Checks freeze integrity and writes ``summary.json`` (rank 0); returns the summary dict."""
        summary = build_summary(self.facts(outcome, self.freeze_integrity()))
        if self.dist.is_main:
            try:
                self.run_dir.write_summary(summary)
            except WriteError as e:
                raise e.with_hint(self.saver.hint() + " (it writes the missing summary)") from e
            if self.logs is not None and self.logs.tensorboard is not None:
                self.logs.tensorboard.hparams(self.config, summary)
        return summary

    def facts(self, outcome: Outcome, integrity: dict) -> RunFacts:
        """What the summary is built from, taken from this run as it ended."""
        cache, loaded, plan = self.engine.cache, self.loaded, self.plan
        return RunFacts(
            config=self.config, info=self.dist, device=self.device, run_dir=self.run_dir, outcome=outcome,
            integrity=integrity, step_times=self.progress.step_times, epochs=self.progress.epoch_times,
            steps=self.state.step, epochs_completed=self.state.epoch,
            weights={"source": loaded.weights_source, "notice": loaded.notice, "head_replaced": loaded.head_replaced},
            params=self.freeze.initial_params, batchnorm=plan.batchnorm, frozen_batchnorm_layers=len(plan.frozen_bn),
            adapt=plan.adapt,
            speed=self.engine.speed(), cache_bytes=cache.nbytes if cache else 0,
            cache_on_disk=bool(cache and cache.on_disk), optimizer=self.optimizer, saved_step=self.progress.saved_step,
            schedule=[p.as_dict() for p in self.freeze.phases],
            auto_freeze=self.auto.summary() if self.auto is not None else None,
            started_at=self.state.started_at or None,
        )

    def cleanup(self) -> None:
        """Releases DDP, the process group and the run folder's lock; safe to call twice, or after a failure."""
        # Drop the DDP wrapper (and any replaced by a freeze change) before the process group goes:
        # a reducer destroyed after its group can abort the process at exit.
        if self.engine is not None:
            self.engine.ddp = None
        if self.dist.enabled:
            gc.collect()  # a quarter of a second with torch loaded: only where a process group goes
        dist.shutdown(self.dist)
        with contextlib.suppress(WriteError):
            settle()  # a failure was raised by finish(), or another error is already on its way
        self.run_dir.release()
        if self._threads_before is not None:  # a library caller's process keeps its own thread count
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def run(config: Config, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Runs the whole recipe and returns the summary.

    Raises:
        NonFiniteLossError: After writing the summary, if the loss became NaN or infinite.
        FreezeIntegrityError: If a frozen tensor changed (a bug, never expected).
    """
    recipe = Recipe(config, reporter, resume).setup()
    try:
        recipe.reporter.setup_done(recipe)
        recipe.train()
    except BaseException:
        recipe.cleanup()
        raise
    return verdict(recipe.finish())


def verdict(result: RunResult) -> dict:
    """Returns the summary of a healthy run; raises for a non-finite loss or moved frozen tensors.

    Every rank raises alike (ranks other than 0 hold only ``rank`` and ``freeze_integrity``).
    """
    if result.status == StopReason.NONFINITE.value:
        if result.saved_step is None:
            kept = "no checkpoint had been saved yet (train.checkpoint_every saves every N steps)"
        else:
            kept = (f"the last good checkpoint (step {result.saved_step}) is kept in "
                    f"{RunDir(result.run_dir).checkpoint}")
        raise NonFiniteLossError(f"{result.nonfinite}; stopped, {kept}")
    result.raise_if_moved()
    return result.summary


def planned_steps(config: Config, steps_per_epoch: int) -> int:
    """Total optimizer steps the run will take (epochs x batches, capped by max_steps)."""
    return Budget.of(config.train.epochs, config.train.max_steps, steps_per_epoch).total
