"""The sweep's pruning plumbing on hand-made curves: no rule is monkeypatched, no run is trained.

``sweep.turns._prune`` replays the real rules (``halving_at`` within an arm, ``prune_at`` between
arms) over slots whose histories are written by hand, and ends or takes back their runs.
"""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from freezetune.config import load_config
from freezetune.sweep.arms import SweepArm
from freezetune.sweep.halving import HALVING_RULE
from freezetune.sweep.jobs import write_jobs
from freezetune.sweep.turns import PRUNING_RULE, Slot, _prune, pruning_decisions
from freezetune.training.summary import EpochRecord

LEADER = [0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.9]
FLAT = [0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]


class _Result:
    def __init__(self, status):
        self.status = status

    def raise_if_moved(self, prefix):
        pass


class _Recipe:
    """Stands in for a live run: records how the sweep ended it."""

    def __init__(self):
        self.ended = None

    def finish(self, stop=None, why=None, summary=True):
        self.ended = (stop, why)
        return _Result("pruned" if stop is not None else "completed")


class _Reporter:
    def __init__(self):
        self.stops, self.messages = [], []

    def pruned(self, arm, epoch, why=""):
        self.stops.append((arm, epoch, why))

    def message(self, text):
        self.messages.append(text)


def _history(accuracy, loss=None, samples=100):
    loss = loss or [2.0] * len(accuracy)
    return [EpochRecord(epoch=i, step=i + 1, steps=1, train_s=1.0, cached=False, val_accuracy=a, val_loss=1.0,
                        val_s=0.1, train_loss=loss[i], val_samples=samples) for i, a in enumerate(accuracy)]


def _setup(tmp_path, arms, options=None, epochs=8):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"train.epochs": epochs}))
    opts = {"target": None, "tolerance": 0.01, "prune": "halving", "memory": False, "feature_cache": "auto",
            "lr_grid": [1.0], **(options or {})}
    manifest, configs = write_jobs(tmp_path / "s", cfg, "<test>", arms, [0], opts, "in-process")
    slots = []
    for job in manifest.jobs:
        slot = Slot(job.arm, job.seed, configs[job.key], resume=False, multiplier=job.lr_multiplier,
                    rated=len(manifest.grid(job.arm)) > 1)
        slot.recipe = _Recipe()
        slots.append(slot)
    return manifest, slots


def _slot(slots, arm, multiplier=1.0):
    return next(s for s in slots if s.arm == arm and s.multiplier == multiplier)


def test_the_safe_rule_stops_an_arm_that_cannot_catch_up(tmp_path):
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("head", "head")])
    _slot(slots, "full").history = _history(LEADER[:4])
    head = _slot(slots, "head")
    head.history = _history(FLAT[:4])
    recipe, log = head.recipe, _Reporter()
    _prune(slots, manifest, 8, log)
    assert head.done and head.status == "pruned" and head.recipe is None
    assert recipe.ended[1].startswith("pruned by the sweep after epoch 4") and PRUNING_RULE in recipe.ended[1]
    assert log.stops == [("head", 4, PRUNING_RULE)]
    assert not _slot(slots, "full").done


def test_a_wider_tolerance_keeps_the_arm(tmp_path):
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("head", "head")], {"tolerance": 0.6})
    _slot(slots, "full").history = _history(LEADER[:4])
    _slot(slots, "head").history = _history(FLAT[:4])
    _prune(slots, manifest, 8, _Reporter())
    assert not any(s.done for s in slots)


def test_an_arm_with_a_schedule_phase_ahead_is_protected_until_it_shows(tmp_path):
    staged = SweepArm("staged", "staged", {"freeze.trainable": ["fc"],
                                           "freeze.schedule": [{"epoch": 5, "unfreeze": ["layer4"]}]})
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), staged])
    _slot(slots, "full").history = _history(LEADER[:4])
    _slot(slots, "staged").history = _history(FLAT[:4])
    _prune(slots, manifest, 8, _Reporter())
    assert not _slot(slots, "staged").done  # its phase at epoch 5 has not had an epoch yet
    for slot, curve in ((_slot(slots, "full"), LEADER), (_slot(slots, "staged"), FLAT)):
        slot.history = _history(curve[:6])
    _prune(slots, manifest, 8, _Reporter())
    assert _slot(slots, "staged").status == "pruned"  # at the next rung (6), after the phase


def test_a_run_pruned_by_a_leader_that_diverged_is_taken_back(tmp_path):
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("head", "head"),
                                        SweepArm("mid", "mid")])
    full, head, mid = _slot(slots, "full"), _slot(slots, "head"), _slot(slots, "mid")
    full.history, head.history, mid.history = _history(LEADER[:4]), _history(FLAT[:4]), _history(FLAT[:4])
    _prune(slots, manifest, 8, _Reporter())
    assert head.status == mid.status == "pruned"
    # The leader's loss then diverges: without it, nothing stopped head or mid at epoch 4.
    full.status, full.done, full.recipe = "nonfinite", True, None
    log = _Reporter()
    _prune(slots, manifest, 8, log)
    assert not head.done and head.status is None and head.resume  # resumes from the checkpoint it stopped at
    assert not mid.done and len(log.messages) == 2 and "diverged" in log.messages[0]


def test_halving_stops_all_but_the_best_third_of_an_arms_rates(tmp_path):
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("head", "head")],
                             {"lr_grid": [0.3, 1.0, 3.0], "tolerance": 0.99}, epochs=15)
    for slot in slots:
        slot.history = _history([0.2, 0.3, 0.4 + slot.multiplier / 10])
    stopped = pruning_decisions(slots, manifest, 15)
    assert stopped == {(arm, m): (3, HALVING_RULE) for arm in ("full", "head") for m in (0.3, 1.0)}
    log = _Reporter()
    _prune(slots, manifest, 15, log)
    assert sorted(log.stops) == sorted((f"{arm} x{m:g}", 3, HALVING_RULE) for arm in ("full", "head")
                                       for m in (0.3, 1.0))
    assert [s.multiplier for s in slots if not s.done] == [3.0, 3.0]


def test_the_safe_rule_reads_an_arm_at_its_best_rate_so_far(tmp_path):
    """An arm whose best rate keeps up is not stopped because its other rates lag."""
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("probe", "probe")],
                             {"lr_grid": [1.0, 10.0], "prune": "safe"})
    for slot in slots:
        slot.history = _history(LEADER[:4] if slot.arm == "full" or slot.multiplier == 10.0 else FLAT[:4])
    assert pruning_decisions(slots, manifest, 8) == {}


@pytest.mark.parametrize(("mode", "stopped"), [("halving", 2), ("safe", 0), ("off", 0)])
def test_only_halving_halves_and_off_stops_nothing(tmp_path, mode, stopped):
    manifest, slots = _setup(tmp_path, [SweepArm("full", "full"), SweepArm("head", "head")],
                             {"lr_grid": [0.3, 1.0, 3.0], "prune": mode}, epochs=15)
    for slot in slots:
        slot.history = _history([0.2, 0.3, 0.4 + slot.multiplier / 10])
    decisions = pruning_decisions(slots, manifest, 15)
    assert sorted(decisions) == sorted((arm, m) for arm in ("full", "head") for m in (0.3, 1.0))[: 2 * stopped]
