"""The one training loop: every step and every epoch end of a run, and the freeze changes between them.

:class:`TrainingLoop` is the engine a :class:`~freezetune.training.recipe.Recipe` runs. It yields
a :class:`~freezetune.training.events.StepRecord` per optimizer step and an
:class:`~freezetune.training.events.EpochEnd` per epoch, asks the freeze controller after every
step and at every epoch start whether something changed, and rebuilds the execution path once
when it did. What to log, validate or save around those events is the recipe's; a comparison arm
takes the steps a block at a time and ignores the epoch ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from freezetune.config import Config
from freezetune.freezing.plan import set_train_mode
from freezetune.measure.timing import synchronize
from freezetune.training import distributed as dist
from freezetune.training.batches import epoch_batches
from freezetune.training.data import worker_count
from freezetune.training.events import EpochEnd, Progress, StepRecord
from freezetune.training.freeze_controller import FreezeChange, FreezeController
from freezetune.training.optim import set_lr
from freezetune.training.signals import StopFlag
from freezetune.training.state import Budget, RunState, StopReason
from freezetune.training.step import Batch, Engine, extend_cache, fill_cache, train_step
from freezetune.training.summary import INPUT_BOUND_SHARE, input_bound_notice

# Called with a line to report, the freeze event's row when the line is one (else None), and
# whether the line also goes into the run's logs.
Say = Callable[[str, dict | None, bool], None]


class TrainingLoop:
    """Steps, epochs and freeze changes of one run, from its current state to its budget.

    Args:
        config: The run's config.
        info: This process's place in the (possibly one-process) group.
        device: Where it trains.
        freeze: The run's freeze controller.
        optimizer: The run's optimizer.
        state: Where the run stands (a resumed run's comes from its checkpoint).
        budget: How long it trains.
        engine: The execution path for the current freeze state.
        rebuild: Builds a new execution path for the freeze state as it stands now.
        say: Reports (and logs) a freeze change's lines.
        data: The training set.
    """

    def __init__(self, config: Config, info: dist.DistInfo, device: torch.device, freeze: FreezeController,
                 optimizer: torch.optim.Optimizer, state: RunState, budget: Budget, engine: Engine,
                 rebuild: Callable[[], Engine], say: Say, data):
        self.config, self.info, self.device, self.freeze = config, info, device, freeze
        self.optimizer, self.state, self.budget, self.engine = optimizer, state, budget, engine
        self._rebuild, self._say, self._data = rebuild, say, data
        self.progress = Progress()
        self.loss_fn = nn.CrossEntropyLoss()
        self.stop_flag: StopFlag | None = None  # checked after every step; None: never stopped

    @property
    def finished(self) -> bool:
        """Whether the run has trained every step it planned."""
        return not self.budget.work_left(self.state)

    def run(self) -> Iterator[StepRecord | EpochEnd]:
        """Yields every step, and the end of every epoch, until the run stops; sets ``progress.stop_reason``."""
        self.progress.warmup_left = self.config.train.warmup_steps  # untimed steps of this process
        while self.budget.work_left(self.state):
            if self._signalled():  # arrived during validation or a checkpoint save
                self.progress.stop_reason = StopReason.INTERRUPTED
                return
            end = yield from self._epoch(self.state.epoch)
            if end is None:
                return  # _epoch set the stop reason
            yield end
        self.progress.stop_reason = StopReason.COMPLETED

    def _epoch(self, epoch: int) -> Iterator[StepRecord]:
        """One pass over the epoch's remaining batches; returns its EpochEnd, or None if the run stops.

        The epoch's time is training time: the steps, the waits for their batches and the
        freeze hooks. What the caller does with each step before asking for the next (logging
        it, saving a checkpoint) is timed apart, as the epoch's I/O.
        """
        # Timed from before the epoch-start hook: re-planning after a freeze change and filling a
        # feature cache from the old one are part of what the epoch cost.
        synchronize(self.device)
        start, steps, stopping, progress = time.perf_counter(), 0, False, self.progress
        io = wait = 0.0
        self._apply(self.freeze.on_epoch_start(epoch))
        # The check of the step a resumed run's checkpoint was saved at (saved before it ran);
        # a no-op otherwise, the step's check having run already.
        self._apply(self.freeze.on_step(self.state.step, epoch))
        batches, cached = self._start_batches(epoch)
        epoch_cached = cached  # a cached epoch is one that read no image
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)  # the wait for data: loading, decoding, or the cache
            if batch is None:
                break
            waited = time.perf_counter() - asked
            record = self._step(batch, epoch, cached, warmup=progress.warmup_left > 0, data_wait=waited)
            if record is None:
                progress.stop_reason = StopReason.NONFINITE
                return None
            progress.warmup_left, steps, wait = max(0, progress.warmup_left - 1), steps + 1, wait + waited
            self.state.epoch_loss_sum += record.loss
            handed = time.perf_counter()
            yield record
            io += time.perf_counter() - handed
            if self._apply(self.freeze.on_step(self.state.step, epoch)):
                # Mid-epoch: the rest of the epoch comes through the new execution path (and the
                # new cache, when it was filled at once from the old one), from where it stands.
                batches, cached = self._start_batches(epoch)
                epoch_cached = epoch_cached and cached
            stopping = self._stop_now()
            if stopping or self.state.step >= self.budget.total:
                break
        self._share_cache()
        synchronize(self.device)
        seconds = time.perf_counter() - start - io
        mean_loss = self.state.epoch_loss_sum / self.state.batch_in_epoch if self.state.batch_in_epoch else None
        end = EpochEnd(epoch, seconds, steps, epoch_cached, self.state.epoch_seconds + seconds, mean_loss, io, wait)
        progress.epoch_times.append(end.as_dict())
        self._say_if_input_bound(end)
        self.state.epoch_seconds = end.epoch_seconds
        if stopping and self.state.step < self.budget.total:
            progress.stop_reason = StopReason.INTERRUPTED
            return None  # a signal during the final step lets the run complete instead
        if self.state.batch_in_epoch >= self.budget.per_epoch:
            self.state.epoch, self.state.batch_in_epoch, self.state.epoch_seconds = self.state.epoch + 1, 0, 0.0
            self.state.epoch_loss_sum = 0.0
        return end

    def _start_batches(self, epoch: int) -> tuple[Iterator[Batch], bool]:
        """The epoch's remaining batches through the current engine, and whether they come from its cache."""
        set_train_mode(self.freeze.model, self.freeze.plan, True)  # a stage frozen since is in eval mode
        cached = self.engine.cache is not None and self.engine.cache.complete
        return iter(self.batches(epoch)), cached

    def _share_cache(self) -> None:
        """Under torchrun, gives every rank the features the others cached (timed with the epoch).

        Every rank ends the epoch at the same step (a stop is agreed on by all), so all of them
        reach this collective; a single process has nothing to share.
        """
        cache = self.engine.cache
        if self.info.enabled and cache is not None and not cache.complete:
            dist.share_cache(cache, self.info, self.device)

    def _say_if_input_bound(self, end: EpochEnd) -> None:
        """Says, once, that the run waits for its data: at the first epoch that spent over a fifth of its time so."""
        if self.progress.input_bound_said or end.seconds <= 0:
            return
        share = end.data_wait_seconds / end.seconds
        if share > INPUT_BOUND_SHARE:
            self.progress.input_bound_said = True
            data = self.config.data
            workers = worker_count(data, self.device, self.info.local_world_size)
            self._say(input_bound_notice(share, workers, data.num_workers, self.device.type), None, True)

    def _apply(self, change: FreezeChange | None) -> bool:
        """Rebuilds the execution path once for a freeze change, and says what changed.

        When the frozen prefix grew, the new feature cache is filled at once from the old one where
        there was a complete one in memory (see :func:`extend_cache`), and otherwise from the
        batches that follow.

        Returns:
            Whether there was a change (the caller then restarts its batches through the new engine).
        """
        if change is None:
            return False
        self.state.phases = len(self.freeze.phases)
        before = self.engine
        self.engine = self._rebuild()
        if change.froze and extend_cache(before, self.engine, self.config.data.batch_size):
            self._say(f"feature cache of {', '.join(self.engine.execution.frozen_prefix)} filled from the "
                      "cached output of the shorter prefix: training reads it from here", None, False)
        del before  # our last reference to the old engine: its cache is not kept to the next epoch
        for line in change.lines:
            self._say(line, None, True)
        for event in change.events:
            self._say(event.line, {"event": "auto_freeze", **event.as_dict()}, True)
        return True

    def _step(self, batch: Batch, epoch: int, cached: bool, warmup: bool, data_wait: float = 0.0) -> StepRecord | None:
        """Trains one batch at this step's learning rate; None if the loss was not finite."""
        set_lr(self.optimizer, self.config.optim, self.state.step, self.budget.total)
        loss, seconds = train_step(self.engine, batch, self.loss_fn)
        self.progress.step_times.append(seconds)
        loss = dist.mean(loss, self.info, self.device)  # what a single process would see
        if not math.isfinite(loss) and self.config.train.stop_on_nonfinite:
            # train_step skipped the update: the step did not happen.
            self.progress.nonfinite = f"loss became {loss} at step {self.state.step + 1}"
            return None
        self.state.step += 1
        self.state.batch_in_epoch += 1
        return StepRecord(self.state.step, epoch, loss, seconds, self.optimizer.param_groups[0]["lr"],
                          batch.size, warmup, cached, batch, data_wait)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's remaining batches, in the run's seeded order, from the cache once it is full."""
        return epoch_batches(self.config, self._data, epoch, self.state.batch_in_epoch, self.info,
                             self.device, self.engine.cache)

    def fill_cache(self) -> float:
        """Fills the feature cache from the current epoch's batches without training; returns seconds.

        Training fills the cache during its first epoch. A comparison fills it up front instead,
        so that each of its timed steps is a later-epoch step.

        Raises:
            ValueError: If this run has no feature cache.
        """
        return fill_cache(self.engine, self.batches(self.state.epoch) if self.engine.cache else ())

    def _signalled(self) -> bool:
        return self.stop_flag is not None and self.stop_flag.requested is not None

    def _stop_now(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it every step)."""
        requested = self._signalled()
        stop_now = dist.any_true(requested, self.info, self.device)
        if stop_now and not requested and self.stop_flag is not None:
            self.stop_flag.requested = "another rank's signal"
        return stop_now
