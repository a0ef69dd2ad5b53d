"""Runs taking turns in one process, epoch by epoch, each with RNG state of its own; pruning replayed each round.

A :class:`Slot` is one (arm, rate, seed): a :class:`~freezetune.training.recipe.Recipe` trained an
epoch at a time (:meth:`Slot.epoch`) under its own saved RNG state, and ended through
:meth:`~freezetune.training.recipe.Recipe.finish`. :func:`take_turns` trains the slots until every
one is done; before each round :func:`pruning_decisions` replays the pruning rules over every run's
curve (pure: the same curves give the same decisions, so a resumed sweep decides as before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freezetune.config import Config
from freezetune.sweep.analysis import mean_curve, prune_at
from freezetune.sweep.halving import HALVING_RULE, RateCurve, envelope, halving_at
from freezetune.sweep.jobs import Manifest, rated_name, read_run
from freezetune.sweep.result import FINISHED
from freezetune.training.checkpoint import rng_state, set_rng_state
from freezetune.training.recipe import Recipe, StopFlag
from freezetune.training.run_dir import RunDir
from freezetune.training.state import StopReason
from freezetune.training.summary import EpochRecord

PRUNING_RULE = (
    "at half and three quarters of the epochs, stop an arm if its best accuracy so far plus its "
    "recent gain per epoch for every epoch left stays more than the tolerance below the best arm"
)


class SweepReporter:
    """Receives a sweep's progress; subclass it to print. Every method is optional."""

    def start(self, jobs: int, epochs: int, resumed: int) -> None:  # noqa: D102
        pass

    def epoch(self, arm: str, seed: int, record: EpochRecord, epochs: int) -> None:  # noqa: D102
        pass

    def pruned(self, arm: str, epoch: int, why: str = "") -> None:  # noqa: D102
        pass

    def message(self, text: str) -> None:  # noqa: D102
        pass


@dataclass
class Slot:
    """One (arm, rate, seed) trained a turn at a time, with RNG state of its own."""

    arm: str
    seed: int
    config: Config
    resume: bool
    multiplier: float = 1.0
    rated: bool = False  # its arm tries several rates, so its name says which
    history: list[EpochRecord] = field(default_factory=list)
    recipe: Recipe | None = None
    rng: dict | None = None
    done: bool = False
    status: str | None = None  # how its run ended, once done

    def setup(self, stop: StopFlag) -> None:
        """Builds the recipe (seeding it as ``freezetune train`` would) and keeps its RNG state."""
        before = rng_state()
        self.recipe = Recipe(self.config, resume=self.resume).setup()
        if self.resume:  # the epochs the checkpoint holds (the recipe dropped any logged after it)
            self.history = [EpochRecord.from_dict(e) for e in read_run(self.recipe.run_dir)[0]]
        self.recipe.start_training(stop)
        self.rng = rng_state()
        set_rng_state(before)

    def epoch(self) -> EpochRecord | None:
        """Trains one more epoch under this slot's RNG state; None when the run has ended."""
        set_rng_state(self.rng)
        try:
            record = self.recipe.train_epoch()
        finally:
            self.rng = rng_state()
        if record is not None:
            self.history.append(record)
        return record

    @property
    def name(self) -> str:
        """``arm layer1 x0.3 seed 1`` (``arm layer1 seed 1`` with one rate): the run, as errors name it."""
        return f"arm {self.label} seed {self.seed}"

    @property
    def label(self) -> str:
        """``layer1 x0.3`` (``layer1`` when its arm has one rate): the run in progress lines."""
        return rated_name(self.arm, self.multiplier, self.rated)

    def finish(self, pruned_after: int | None = None, rule: str = PRUNING_RULE) -> None:
        """Ends the run (pruned by ``rule``, or after its loop ended), writes its summary and frees it."""
        recipe, self.recipe = self.recipe, None
        if pruned_after is None:
            result = recipe.finish()
        else:
            result = recipe.finish(StopReason.PRUNED, f"pruned by the sweep after epoch {pruned_after}: {rule}")
        result.raise_if_moved(f"{self.name}: ")  # a bug, never expected: stop the sweep loudly
        self.status = result.status
        self.done = self.status != StopReason.INTERRUPTED.value

    def revive(self) -> None:
        """Takes a pruned run back: the decision that stopped it no longer holds (its leader diverged)."""
        self.done, self.status, self.resume = False, None, True

    def park(self) -> None:
        """Releases a run left at an epoch boundary (its checkpoint is saved) when the sweep stops."""
        if self.recipe is not None:
            recipe, self.recipe = self.recipe, None
            recipe.finish(summary=False)



def make_slots(out: Path, manifest: Manifest, configs: dict, resumed: bool) -> list[Slot]:
    """Every job: finished ones with their epochs read back, the others to train (resumed where they can be).

    A new sweep (``resumed`` False) trains every job from the start, even in a folder that holds
    an earlier sweep's runs (``output.overwrite``).
    """
    slots = []
    for job in manifest.jobs:
        run_dir = out / job.run_dir
        if not resumed:
            slots.append(Slot(job.arm, job.seed, configs[job.key], resume=False, multiplier=job.lr_multiplier,
                              rated=len(manifest.grid(job.arm)) > 1))
            continue
        epochs, summary = read_run(run_dir)
        status = (summary or {}).get("status")
        slot = Slot(job.arm, job.seed, configs[job.key], resume=RunDir(run_dir).has_checkpoint(),
                    multiplier=job.lr_multiplier, rated=len(manifest.grid(job.arm)) > 1)
        if status in FINISHED:
            slot.done, slot.status = True, status
            slot.history = [EpochRecord.from_dict(e) for e in epochs]
        slots.append(slot)
    return slots


def take_turns(slots: list[Slot], manifest: Manifest, stop: StopFlag, reporter: SweepReporter) -> bool:
    """Trains the slots epoch by epoch until every one is done; True if a signal stopped the sweep.

    Each round trains one epoch of every unfinished slot that is furthest behind, so after a
    resume the slots line up again before pruning compares them. A resumed sweep replays the
    pruning decisions first, so runs it had stopped stay stopped.
    """
    epochs = manifest.base_config().train.epochs
    while True:
        for slot in (s for s in slots if not s.done and s.recipe is None):
            slot.setup(stop)  # a new or resumed run, or one taken back from pruning
        if manifest.prune_mode != "off":
            _prune(slots, manifest, epochs, reporter)  # first of all after a resume: the same decisions again
        active = [s for s in slots if not s.done]
        if not active:
            return False
        if any(s.recipe is None for s in active):
            continue  # taken back from pruning: set up before it trains
        low = min(len(s.history) for s in active)
        for slot in [s for s in active if len(s.history) == low]:
            record = slot.epoch()
            if record is not None:
                reporter.epoch(slot.label, slot.seed, record, epochs)
            if record is None or slot.recipe.finished:
                if record is not None:
                    slot.epoch()  # lets the loop end, so that the run reports completed
                slot.finish()
                if slot.status == StopReason.INTERRUPTED.value:
                    return True  # its checkpoint is saved mid-epoch
            if stop.requested:
                return True


def _prune(slots: list[Slot], manifest: Manifest, epochs: int, reporter: SweepReporter) -> None:
    """Replays the pruning rules over every run's curve, stops the runs they stop, and takes back the others.

    The rules read the curves only, so replaying them after a resume gives the same decisions.
    Runs whose loss diverged are left out: they end early and are no candidate. A run pruned
    earlier whose decision no longer holds (the leader that beat it diverged since) is taken back
    and continues from the checkpoint it stopped at.
    """
    stopped = pruning_decisions(slots, manifest, epochs)
    for (arm, multiplier), (after, rule) in stopped.items():
        live = [s for s in slots if s.arm == arm and s.multiplier == multiplier and not s.done]
        for slot in live:
            slot.finish(pruned_after=after, rule=rule)
        if live:
            reporter.pruned(live[0].label, after, rule)
    for slot in slots:
        if slot.status == StopReason.PRUNED.value and (slot.arm, slot.multiplier) not in stopped:
            slot.revive()
            reporter.message(f"{slot.label} seed {slot.seed} continues: the run that beat it "
                             "diverged, so the decision that stopped it no longer holds")


def pruning_decisions(slots: list[Slot], manifest: Manifest, epochs: int) -> dict[tuple[str, float], tuple[int, str]]:
    """``{(arm, rate): (epochs it ran, rule)}`` for every rate the rules stop, from the curves alone.

    With ``halving``, each arm's rates first compete among themselves (:func:`halving_at`, mean
    over seeds); then, in both modes, the arms compete by the safe rule (:func:`prune_at`) on
    their best rate's curve epoch by epoch, and an arm it stops stops all of its rates.
    """
    if manifest.prune_mode == "off":
        return {}
    groups: dict[tuple[str, float], list[Slot]] = {}
    for slot in slots:
        groups.setdefault((slot.arm, slot.multiplier), []).append(slot)
    live = {k: g for k, g in groups.items() if not any(s.status == "nonfinite" for s in g)}
    curves = {k: RateCurve(mean_curve([[r.val_accuracy for r in s.history] for s in g]),
                           mean_curve([[_nan(r.train_loss) for r in s.history] for s in g]),
                           _val_samples(g)) for k, g in live.items()}
    stopped: dict[tuple[str, float], tuple[int, str]] = {}
    by_arm: dict[str, dict[float, RateCurve]] = {}
    for (arm, m), curve in curves.items():
        by_arm.setdefault(arm, {})[m] = curve
    protected = {a.name: max((p["epoch"] for p in a.overrides.get("freeze.schedule") or []), default=0)
                 for a in manifest.arm_list()}
    if manifest.prune_mode == "halving":
        for arm, rates in by_arm.items():
            for m, after in halving_at(rates, epochs, protected.get(arm, 0)).items():
                stopped[(arm, m)] = (after, HALVING_RULE)
    arm_curves = {arm: envelope([c.accuracy for m, c in rates.items()]) for arm, rates in by_arm.items()}
    for arm, after in prune_at(arm_curves, epochs, manifest.options["tolerance"], protected).items():
        for m in by_arm[arm]:
            stopped.setdefault((arm, m), (after, PRUNING_RULE))
    return stopped


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _val_samples(group: list[Slot]) -> int:
    """Validation samples behind one point of a rate's mean curve, all seeds together (0: not recorded)."""
    counts = [r.val_samples or 0 for s in group for r in s.history[-1:]]
    return sum(counts) if counts and all(counts) else 0
