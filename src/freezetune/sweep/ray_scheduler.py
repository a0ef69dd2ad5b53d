"""The Ray Tune side of ``freezetune sweep --backend ray``: its trial scheduler and progress callback.

Both subclass Tune's own classes, so this module imports Ray; :mod:`freezetune.sweep.ray_tune`
imports it only once Ray is known to be there. They are module-level classes so that Tune can
save them with an experiment and a restored experiment finds this module's state (the reporter
of the sweep running now), not a copy of an earlier one's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from freezetune.sweep.jobs import Manifest
from freezetune.sweep.trials import RunView, barriers, read_failures, read_views
from freezetune.sweep.turns import SweepReporter, pruning_decisions
from freezetune.training.summary import EpochRecord

# The reporter of the sweep running in this process, by sweep folder: Tune keeps the callback
# with the experiment, and a restored experiment must report to its new caller.
REPORTERS: dict[str, SweepReporter] = {}


class SweepScheduler(FIFOScheduler):
    """Replays the sweep's pruning rules over the trials' curves; trials wait at the rungs for each other.

    Rungs come from the same pure rules as in-process, so the same curves give the same
    decisions: a stopped trial is paused (not ended) until no decision can take it back, then
    ended and reported as pruned; a trial at a rung waits until every trial it is compared
    with has reached the rung. Its state is the run folders themselves: after a restore, it
    reads every job's curve back from them.
    """

    _supports_buffered_results = False  # a decision after every epoch, as in-process

    def __init__(self, out: Path, manifest: Manifest):
        super().__init__()
        self.out, self.manifest = str(out), manifest
        self.barriers = barriers(manifest)
        self.epochs = manifest.base_config().train.epochs  # read once: Tune asks for a decision often
        self.views: list[RunView] | None = None
        self.waiting: dict[str, int] = {}  # paused at a rung: trial id -> the rung

    def __getstate__(self):  # Tune saves the scheduler with the experiment: the views are re-read
        return {**self.__dict__, "views": None, "waiting": {}}

    def _views(self) -> list[RunView]:
        if self.views is None:
            self.views = read_views(Path(self.out), self.manifest)
            for job in read_failures(Path(self.out)):
                self.views[job].status = "failed"
        return self.views

    def on_trial_result(self, tune_controller, trial, result):
        """Records the epoch in the trial's curve, then CONTINUE, PAUSE (at a rung, or stopped) as the rules say."""
        job, views = int(trial.config["job"]), self._views()
        view = views[job]
        if result.get("ended"):
            view.status = result["ended"]
            return TrialScheduler.CONTINUE
        record = EpochRecord.from_dict(json.loads(result["record"]))
        view.history = [r for r in view.history if r.epoch < record.epoch] + [record]
        return self._decide(tune_controller, trial, view)

    def on_trial_complete(self, tune_controller, trial, result):
        """A trial ended: waiting trials may go on, and stopped ones may be ended for good."""
        self._settle(tune_controller)

    def on_trial_error(self, tune_controller, trial):
        """A trial raised: it is left out of the rules, as a run whose loss diverged is."""
        self._views()[int(trial.config["job"])].status = "failed"
        self._settle(tune_controller)

    def _decide(self, tune_controller, trial, view: RunView) -> str:
        stopped = self._stopped()
        epoch = len(view.history)
        self._settle(tune_controller, stopped)
        if (view.arm, view.multiplier) in stopped:
            return TrialScheduler.PAUSE
        if epoch in self.barriers and not self._all_reached(epoch, stopped):
            self.waiting[trial.trial_id] = epoch
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def _stopped(self) -> dict:
        return pruning_decisions(self._views(), self.manifest, self.epochs)

    def _all_reached(self, epoch: int, stopped: dict) -> bool:
        return all(len(v.history) >= epoch for v in self._views()
                   if v.status is None and (v.arm, v.multiplier) not in stopped)

    def _settle(self, tune_controller, stopped: dict | None = None) -> None:
        """Lets waiting trials go once their rung is decided; ends the stopped ones once nothing can revive them."""
        stopped = self._stopped() if stopped is None else stopped
        for trial_id, epoch in list(self.waiting.items()):
            if self._all_reached(epoch, stopped):
                del self.waiting[trial_id]
        live = [v for v in self._views() if v.status is None and (v.arm, v.multiplier) not in stopped]
        if live:
            return
        for t in tune_controller.get_trials():  # every other run ended: no decision can change now
            if t.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(t)

    def choose_trial_to_run(self, tune_controller):
        """A pending trial first, then a paused one whose rung is decided; never a stopped one."""
        stopped, views = self._stopped(), self._views()
        for status in (Trial.PENDING, Trial.PAUSED):
            for t in tune_controller.get_trials():
                view = views[int(t.config["job"])]
                if (t.status == status and t.trial_id not in self.waiting
                        and (view.arm, view.multiplier) not in stopped and view.status is None):
                    return t
        return None

    def debug_string(self) -> str:
        """What Tune prints of this scheduler."""
        return f"freezetune sweep: {self.manifest.prune_mode} pruning, waiting at epochs {self.barriers}"


class Progress(Callback):
    """Passes each trial's epochs to the reporter of the sweep in ``out``, as in-process."""

    def __init__(self, out: Path, manifest: Manifest):
        self.out, self.manifest = str(out), manifest
        self.epochs = manifest.base_config().train.epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: D102
        reporter = REPORTERS.get(self.out)
        if "record" in result and reporter is not None:
            job = self.manifest.jobs[int(trial.config["job"])]
            record = EpochRecord.from_dict(json.loads(result["record"]))
            reporter.epoch(self.manifest.label(job), job.seed, record, self.epochs)
