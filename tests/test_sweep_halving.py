"""Successive halving of an arm's rates, on hand-made curves: rungs, the noise-aware rank, replay."""

from __future__ import annotations

import math
import random

import pytest

from freezetune.sweep.halving import (
    ETA,
    FIRST_RUNG,
    RateCurve,
    accuracy_noise,
    envelope,
    halving_at,
    halving_rungs,
    rank,
)


def curve(acc, loss=None, val_size=0) -> RateCurve:
    return RateCurve(list(acc), list(loss) if loss is not None else [None] * len(acc), val_size)


@pytest.mark.parametrize(("epochs", "expected"), [
    (1, []), (3, []),  # the first rung is epoch 3, and never the last epoch
    (4, [3]),
    (6, [3, 4]),  # 2/5 of 6 is 3 (ceil 2.4): one epoch after the first rung
    (8, [3, 4]),
    (10, [3, 4]),
    (15, [3, 6]),
    (20, [4, 8]),
    (100, [20, 40]),
])
def test_halving_rungs(epochs, expected):
    assert halving_rungs(epochs) == expected


@pytest.mark.parametrize("epochs", range(1, 80))
def test_rungs_are_increasing_never_early_and_never_the_last(epochs):
    rungs = halving_rungs(epochs)
    assert rungs == sorted(set(rungs))
    assert all(FIRST_RUNG <= r < epochs for r in rungs)


def test_accuracy_noise_is_a_standard_error():
    assert accuracy_noise(0.5, 100) == pytest.approx(0.05)
    assert accuracy_noise(0.9, 0) == 0.0  # unknown size: no guard
    assert accuracy_noise(1.0, 400) == pytest.approx(math.sqrt(1 / 400 / 400))  # never zero at the extremes


def test_rank_by_best_accuracy_so_far_without_noise():
    curves = {0.1: curve([0.2, 0.3, 0.25]), 1.0: curve([0.4, 0.5, 0.45]), 10.0: curve([0.1, 0.1, 0.1])}
    assert rank(curves, 3) == [1.0, 0.1, 10.0]


def test_rank_breaks_ties_within_the_noise_by_training_loss():
    """Both near chance on 100 samples: 0.12 vs 0.10 is noise, and the lower loss is the learner."""
    curves = {1.0: curve([0.11, 0.12, 0.12], [2.3, 2.3, 2.29], 100),
              10.0: curve([0.10, 0.10, 0.10], [2.2, 1.9, 1.5], 100)}
    assert rank(curves, 3) == [10.0, 1.0]
    # Without a validation size there is no noise guard: accuracy alone decides.
    assert rank({m: RateCurve(c.accuracy, c.train_loss, 0) for m, c in curves.items()}, 3) == [1.0, 10.0]


def test_a_gap_beyond_the_noise_is_not_a_tie():
    curves = {1.0: curve([0.5, 0.6, 0.7], [1.0, 0.9, 0.8], 400),
              10.0: curve([0.3, 0.4, 0.5], [0.5, 0.2, 0.1], 400)}
    assert rank(curves, 3) == [1.0, 10.0]


def test_rank_sees_only_epochs_up_to_the_rung():
    curves = {1.0: curve([0.5, 0.5, 0.5, 0.5]), 3.0: curve([0.4, 0.4, 0.4, 0.9])}
    assert rank(curves, 3) == [1.0, 3.0]
    assert rank(curves, 4) == [3.0, 1.0]


def test_a_missing_or_nonfinite_loss_ranks_last_within_a_tie():
    curves = {1.0: curve([0.1] * 3, [None] * 3, 100), 3.0: curve([0.1] * 3, [2.0, 2.0, float("nan")], 100),
              10.0: curve([0.1] * 3, [2.0, 2.0, 2.0], 100)}
    assert rank(curves, 3)[0] == 10.0


def test_halving_keeps_the_best_third_at_each_rung():
    # 15 epochs: rungs 3 and 6. Five rates -> 2 after epoch 3 -> 1 after epoch 6.
    accs = {0.1: 0.2, 0.3: 0.4, 1.0: 0.6, 3.0: 0.7, 10.0: 0.3}
    curves = {m: curve([a] * 15) for m, a in accs.items()}
    assert halving_at(curves, 15) == {0.1: 3, 0.3: 3, 10.0: 3, 1.0: 6}
    assert math.ceil(5 / ETA) == 2


def test_halving_waits_until_every_live_rate_reached_the_rung():
    curves = {0.1: curve([0.2] * 3), 1.0: curve([0.6] * 2), 10.0: curve([0.3] * 3)}
    assert halving_at(curves, 15) == {}
    curves[1.0] = curve([0.6] * 3)
    assert halving_at(curves, 15) == {0.1: 3, 10.0: 3}


def test_one_rate_is_never_halved():
    assert halving_at({1.0: curve([0.1] * 15)}, 15) == {}


def test_the_slow_starter_survives_when_its_loss_already_falls():
    """An arm's best rate at chance for two epochs, as on the input-shift task, is kept by its loss."""
    flat = [0.10, 0.11, 0.12]
    curves = {
        0.1: curve(flat, [2.30, 2.29, 2.28], 597),
        1.0: curve([0.10, 0.12, 0.13], [2.25, 2.20, 2.15], 597),
        10.0: curve([0.09, 0.11, 0.12], [2.0, 1.6, 1.1], 597),  # learning, not yet generalizing
    }
    assert 10.0 not in halving_at(curves, 15)


def _random_curves(rng: random.Random, rates: int, epochs: int) -> dict[float, RateCurve]:
    out = {}
    for i in range(rates):
        acc, loss, a, lo = [], [], rng.uniform(0, 0.3), rng.uniform(1.5, 2.5)
        for _ in range(epochs):
            a = min(1.0, max(0.0, a + rng.uniform(-0.05, 0.15)))
            lo = max(0.01, lo * rng.uniform(0.6, 1.05))
            acc.append(round(a, 3))
            loss.append(lo)
        out[3.0 ** (i - 2)] = RateCurve(acc, loss, rng.choice([0, 100, 1000]))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_replaying_the_curves_of_a_stopped_sweep_gives_the_same_decisions(seed):
    """What a resumed sweep relies on: the decisions depend on the curves only, however they were cut."""
    rng = random.Random(seed)
    epochs = rng.randint(4, 20)
    curves = _random_curves(rng, rng.randint(2, 7), epochs)
    full = halving_at(curves, epochs)
    # Each stopped rate's curve ends at its rung, as it does in a real sweep.
    stopped = {m: RateCurve(c.accuracy[: full.get(m, epochs)], c.train_loss[: full.get(m, epochs)], c.val_size)
               for m, c in curves.items()}
    assert halving_at(stopped, epochs) == full
    cut = rng.randint(1, epochs)
    partial = halving_at({m: RateCurve(c.accuracy[:cut], c.train_loss[:cut], c.val_size)
                          for m, c in stopped.items()}, epochs)
    assert all(full[m] == r for m, r in partial.items())  # never a decision the whole curve would not make
    left = len(curves)
    for _ in halving_rungs(epochs):
        left = max(1, math.ceil(left / ETA)) if left > 1 else left
    assert len([m for m in curves if m not in full]) == left


def test_envelope_is_the_best_rate_epoch_by_epoch():
    assert envelope([[0.1, 0.5, 0.6], [0.3, 0.4], [0.2]]) == [0.3, 0.5, 0.6]
    assert envelope([]) == []


def test_an_arm_with_a_schedule_phase_ahead_skips_the_rungs_before_it():
    curves = {m: curve([a] * 15) for m, a in {0.1: 0.2, 1.0: 0.6, 10.0: 0.3}.items()}
    assert halving_at(curves, 15) == {0.1: 3, 10.0: 3}
    assert halving_at(curves, 15, protected_until=4) == {0.1: 6, 10.0: 6}  # ranked at the rung after the phase
    assert halving_at(curves, 15, protected_until=6) == {}
