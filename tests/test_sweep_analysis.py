"""The sweep's decision rules on hand-made curves: statistics, time to target, pruning, Pareto, recommendation.

Everything here is pure, so each rule is pinned by small tables. The pruning rule gets the most
attention: it must stop arms that cannot catch up, and never a slow starter that goes on to win.
Properties are checked over seeded random curves and with hypothesis.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freezetune.sweep.analysis import (
    DEFAULT_TOLERANCE,
    Candidate,
    Recommendation,
    Stat,
    mean_curve,
    optimistic_final,
    pareto,
    prune_at,
    recommend,
    rungs,
    stat,
    time_to_target,
)

TOL = DEFAULT_TOLERANCE

# --------------------------------------------------------------------------------------------
# stat and mean_curve


@pytest.mark.parametrize(("values", "mean", "sd", "n"), [
    ([0.5], 0.5, None, 1),
    ([0.7, 0.8, 0.9], 0.8, 0.1, 3),  # sample sd (n - 1), not population sd
    ([1.0, 3.0], 2.0, math.sqrt(2.0), 2),
    ([0.4, 0.4], 0.4, 0.0, 2),
    ([0.5, None, 0.7], None, None, 3),  # one seed never got there: no mean
    ([None], None, None, 1),
    ([], None, None, 0),
])
def test_stat(values, mean, sd, n):
    s = stat(values)
    assert s.n == n
    assert s.mean == (None if mean is None else pytest.approx(mean))
    assert s.sd == (None if sd is None else pytest.approx(sd))


def test_stat_as_dict():
    assert stat([0.25, 0.75]).as_dict() == {"mean": 0.5, "sd": pytest.approx(math.sqrt(0.125)), "n": 2}
    assert Stat(None, None, 0).as_dict() == {"mean": None, "sd": None, "n": 0}


@pytest.mark.parametrize(("curves", "expected"), [
    ([[0.1, 0.2, 0.3]], [0.1, 0.2, 0.3]),
    ([[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]], [0.2, 0.3, 0.4]),
    ([[0.1, 0.2, 0.3, 0.9], [0.3, 0.4]], [0.2, 0.3]),  # as long as the shortest seed
    ([[0.5], [0.6, 0.7], [0.7, 0.8, 0.9]], [0.6]),
    ([[0.1, 0.2], []], []),
    ([], []),
])
def test_mean_curve(curves, expected):
    assert mean_curve(curves) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# time_to_target (DAWNBench: training seconds up to and including the first epoch at the target)


@pytest.mark.parametrize(("accuracy", "epoch_s", "target", "expected"), [
    ([0.5, 0.7, 0.9], [10.0, 20.0, 30.0], 0.6, (30.0, 2)),
    ([0.5, 0.7, 0.9], [10.0, 20.0, 30.0], 0.4, (10.0, 1)),  # first epoch already there
    ([0.5, 0.7, 0.9], [10.0, 20.0, 30.0], 0.9, (60.0, 3)),  # equality counts as reached
    ([0.5, 0.7, 0.9], [10.0, 20.0, 30.0], 0.95, (None, None)),  # never reached
    ([0.5, 0.8, 0.6, 0.9], [1.0, 2.0, 3.0, 4.0], 0.75, (3.0, 2)),  # the first crossing, not a later one
    ([None, 0.8], [5.0, 7.0], 0.75, (12.0, 2)),  # a missing validation is skipped, its time still counts
    ([None, None], [5.0, 7.0], 0.1, (None, None)),
    ([0.1 + 0.2], [4.0], 0.3, (4.0, 1)),  # 0.30000000000000004 vs 0.3, and the other way round:
    ([0.3], [4.0], 0.1 + 0.2, (4.0, 1)),  # float noise must not hide a reached target
    ([], [], 0.5, (None, None)),
])
def test_time_to_target(accuracy, epoch_s, target, expected):
    assert time_to_target(accuracy, epoch_s, target) == expected


def test_time_to_target_counts_only_training_seconds_of_each_epoch():
    seconds, epoch = time_to_target([0.2, 0.4, 0.6, 0.8], [1.5, 2.5, 3.5, 4.5], 0.6)
    assert (seconds, epoch) == (pytest.approx(1.5 + 2.5 + 3.5), 3)


# --------------------------------------------------------------------------------------------
# rungs and optimistic_final


@pytest.mark.parametrize(("epochs", "expected"), [
    (0, []),
    (1, []),
    (2, []),  # half would be epoch 1 (< 2) and three quarters the last epoch
    (3, [2]),
    (4, [2, 3]),
    (5, [3, 4]),
    (8, [4, 6]),
    (10, [5, 8]),
    (15, [8, 12]),
    (100, [50, 75]),
])
def test_rungs(epochs, expected):
    assert rungs(epochs) == expected


@pytest.mark.parametrize("epochs", range(0, 60))
def test_rungs_never_before_second_epoch_nor_at_the_last(epochs):
    points = rungs(epochs)
    assert points == sorted(set(points))
    assert all(2 <= r < epochs for r in points)


@pytest.mark.parametrize(("curve", "epochs", "expected"), [
    ([0.5, 0.6, 0.6, 0.6], 8, 0.6),  # levelled off: stays at its best
    ([0.5, 0.62, 0.6, 0.6], 8, 0.62),  # a dip after the peak: still its best, and no gain
    ([0.1, 0.2, 0.3, 0.4], 8, 0.8),  # climbing 0.1 an epoch, 4 epochs left
    ([0.1, 0.2, 0.25, 0.4], 8, 1.0),  # larger of the last two gains (0.15), capped at 1
    ([0.1, 0.3, 0.35, 0.4], 8, 0.6),  # last two gains 0.05 and 0.05: the earlier 0.2 is not used
    ([0.1, 0.2, 0.3, 0.33], 8, 0.33 + 0.1 * 4),  # larger of 0.1 and 0.03
    ([0.4, 0.5, 0.45, 0.47], 8, 0.5),  # below its best: the best-so-far curve is flat
    ([0.2, 0.3], 4, 0.5),  # a single gain
    ([0.2], 4, 0.2),  # no gain measured yet
    ([0.2, 0.5, 0.8], 3, 0.8),  # no epochs left
    ([0.9, 0.95, 0.99], 10, 1.0),  # capped at 1
])
def test_optimistic_final(curve, epochs, expected):
    assert optimistic_final(curve, epochs) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# prune_at: hand-made cases

LEADER8 = [0.5, 0.55, 0.57, 0.58, 0.58, 0.58, 0.58, 0.58]
SLOW8 = [0.1, 0.15, 0.25, 0.4, 0.55, 0.65, 0.7, 0.72]
PLATEAU8 = [0.2, 0.25, 0.28, 0.3, 0.3, 0.3, 0.3, 0.3]


def winner(curves: dict[str, list[float]]) -> str:
    """The arm with the highest final value of its full curve."""
    return max(curves, key=lambda name: curves[name][-1])


def test_plateau_far_below_is_pruned_at_the_first_rung():
    curves = {"full": LEADER8, "head": PLATEAU8}
    assert prune_at(curves, 8, TOL) == {"head": 4}


def test_pruned_epoch_is_the_rung_reached():
    # 15 epochs: rungs 8 and 12; the plateau is stopped after 8 epochs
    leader = [0.3 + 0.04 * i for i in range(10)] + [0.66] * 5
    plateau = [0.2] * 15
    assert prune_at({"full": leader, "head": plateau}, 15, TOL) == {"head": 8}


MID8 = [0.2, 0.3, 0.4, 0.5, 0.52, 0.52, 0.52, 0.52]


def test_arm_caught_at_the_second_rung():
    # rung 4: still climbing (forecast 0.5 + 0.1 * 4 = 0.9 >= 0.57); rung 6: 0.52 + 0.02 * 2 = 0.56 < 0.57
    curves = {"full": LEADER8, "mid": MID8}
    assert prune_at(curves, 8, TOL) == {"mid": 6}


# (epochs, curves, rungs at which "slow" is still behind "leader")
SLOW_STARTERS = {
    "brief: plateau vs late climber, 8 epochs": (8, {"leader": LEADER8, "slow": SLOW8}, [4]),
    "decelerating climber, 8 epochs": (8, {
        "leader": [0.55, 0.58, 0.6, 0.61, 0.61, 0.62, 0.62, 0.62],
        "slow": [0.2, 0.3, 0.4, 0.48, 0.54, 0.59, 0.62, 0.64],
    }, [4, 6]),
    "15 epochs, behind at both rungs": (15, {
        "leader": [0.4, 0.5, 0.55, 0.58, 0.6, 0.61, 0.62, 0.62, 0.62, 0.62, 0.62, 0.62, 0.62, 0.62, 0.62],
        "slow": [0.05, 0.08, 0.12, 0.17, 0.23, 0.29, 0.35, 0.41, 0.47, 0.52, 0.56, 0.6, 0.63, 0.65, 0.67],
    }, [8, 12]),
    "three arms, a plateau among them": (8, {"leader": LEADER8, "slow": SLOW8, "head": PLATEAU8}, [4]),
    "noisy climber with a dip just before the rung": (8, {
        "leader": [0.6, 0.65, 0.68, 0.7, 0.7, 0.7, 0.7, 0.7],
        "slow": [0.2, 0.35, 0.5, 0.45, 0.62, 0.66, 0.69, 0.75],
    }, [4, 6]),
    "4 epochs, rungs at 2 and 3": (4, {
        "leader": [0.6, 0.65, 0.66, 0.66],
        "slow": [0.3, 0.5, 0.62, 0.7],
    }, [2, 3]),
    "20 epochs, steady small gains": (20, {
        "leader": [0.7] * 20,
        "slow": [0.3 + 0.025 * i for i in range(20)],
    }, [10, 15]),
}


@pytest.mark.parametrize(("epochs", "curves", "behind_at"), SLOW_STARTERS.values(), ids=SLOW_STARTERS.keys())
def test_slow_starter_that_wins_is_not_pruned(epochs, curves, behind_at):
    assert winner(curves) == "slow"
    for rung in behind_at:  # it really is a slow starter: behind the leader when judged
        assert max(curves["slow"][:rung]) < max(curves["leader"][:rung])
    assert "slow" not in prune_at(curves, epochs, TOL)


def test_slow_starter_overtakes_and_the_plateaued_leader_is_the_one_stopped():
    # at rung 6 the slow arm leads (0.65) and the old leader, flat at 0.58, cannot come within 0.01
    assert prune_at({"leader": LEADER8, "slow": SLOW8}, 8, TOL) == {"leader": 6}


@pytest.mark.parametrize(("gap", "pruned"), [
    (0.0, False),
    (0.005, False),
    (0.0099, False),  # within the tolerance
    (0.0101, True),  # just outside it
    (0.05, True),
])
def test_flat_arm_within_tolerance_is_kept(gap, pruned):
    leader = [0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    flat = [0.7, 0.8 - gap, 0.8 - gap, 0.8 - gap, 0.8 - gap, 0.8 - gap, 0.8 - gap, 0.8 - gap]
    result = prune_at({"full": leader, "close": flat}, 8, TOL)
    assert ("close" in result) is pruned
    assert "full" not in result


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.05, 0.2])
def test_arm_within_tolerance_at_every_rung_is_never_pruned(tolerance):
    leader = [0.5, 0.6, 0.7, 0.75, 0.78, 0.8, 0.8, 0.8]
    close = [v - tolerance for v in leader]
    close = [max(0.0, v) for v in close]
    assert prune_at({"full": leader, "close": close}, 8, tolerance) == {}


def test_wider_tolerance_prunes_less():
    curves = {"full": LEADER8, "head": PLATEAU8, "mid": MID8}
    narrow, wide = prune_at(curves, 8, 0.01), prune_at(curves, 8, 0.25)
    assert set(wide) <= set(narrow)
    assert prune_at(curves, 8, 1.0) == {}


UNFREEZE = [0.3, 0.31, 0.31, 0.31, 0.31, 0.31, 0.31, 0.31]  # flat until its phase at epoch k


@pytest.mark.parametrize(("protected", "expected"), [
    (0, {"staged": 4}),  # unprotected: pruned at the first rung
    (3, {"staged": 4}),  # its phase was before the rung: judged as usual
    (4, {"staged": 6}),  # rung 4 <= k: skipped, judged again at 6
    (5, {"staged": 6}),
    (6, {}),  # both rungs <= k
    (8, {}),
])
def test_protected_until_shields_rungs_up_to_the_phase(protected, expected):
    curves = {"full": LEADER8, "staged": UNFREEZE}
    assert prune_at(curves, 8, TOL, {"staged": protected}) == expected


def test_protected_arm_that_climbs_after_unfreezing_survives():
    # phase at epoch 4 (0-based start: trains unfrozen from the 5th epoch); judged at rung 6 on its climb
    staged = [0.3, 0.31, 0.31, 0.31, 0.5, 0.65, 0.7, 0.72]
    curves = {"full": LEADER8, "staged": staged}
    assert prune_at(curves, 8, TOL) == {"staged": 4}  # without the protection it would have been lost
    assert prune_at(curves, 8, TOL, {"staged": 4}) == {"full": 6}
    assert winner(curves) == "staged"


def test_protection_of_other_arms_does_not_matter():
    curves = {"full": LEADER8, "head": PLATEAU8}
    assert prune_at(curves, 8, TOL, {"full": 8, "other": 8}) == {"head": 4}


@pytest.mark.parametrize(("lengths", "expected"), [
    ((3, 3), {}),  # before the first rung: nothing decided
    ((4, 4), {"head": 4}),
    ((5, 5), {"head": 4}),
    ((8, 3), {}),  # one arm behind: wait for it, even though the other ran further
    ((3, 8), {}),
    ((8, 8), {"head": 4}),
    ((8, 4), {"head": 4}),  # a pruned arm's curve ends at its rung; the rest goes on
])
def test_short_curves_stop_evaluation(lengths, expected):
    full_len, head_len = lengths
    curves = {"full": LEADER8[:full_len], "head": PLATEAU8[:head_len]}
    assert prune_at(curves, 8, TOL) == expected


def test_nothing_decided_at_a_rung_not_yet_reached():
    # pruned at 6 with the full curves, but with 5 epochs run only rung 4 has been reached
    curves = {"full": LEADER8, "mid": MID8}
    assert prune_at({k: v[:5] for k, v in curves.items()}, 8, TOL) == {}
    assert prune_at({k: v[:6] for k, v in curves.items()}, 8, TOL) == {"mid": 6}


@pytest.mark.parametrize("curves", [
    {"only": PLATEAU8},
    {"only": [0.0] * 8},
    {},
])
def test_single_arm_is_never_pruned(curves):
    assert prune_at(curves, 8, TOL) == {}


def test_last_survivor_is_not_pruned_after_the_others():
    # two plateaus pruned at rung 4 leave one arm, which is then not judged at rung 6
    curves = {"full": LEADER8, "a": PLATEAU8, "b": [0.1] * 8}
    assert prune_at(curves, 8, TOL) == {"a": 4, "b": 4}
    curves = {"full": [0.5] * 8, "a": [0.1] * 8}
    assert prune_at(curves, 8, TOL) == {"a": 4}


@pytest.mark.parametrize("epochs", [1, 2])
def test_no_rungs_no_pruning(epochs):
    assert prune_at({"full": [0.9] * epochs, "head": [0.0] * epochs}, epochs, TOL) == {}


def test_leader_is_compared_on_the_common_epochs_only():
    # epoch 5 of the full curve (0.99) is not seen at rung 4
    full = [0.5, 0.55, 0.57, 0.58, 0.99, 0.99, 0.99, 0.99]
    other = [0.4, 0.45, 0.5, 0.57, 0.57, 0.57, 0.57, 0.57]
    assert prune_at({"full": full[:5], "other": other[:5]}, 8, TOL) == {}
    assert prune_at({"full": full, "other": other}, 8, TOL) == {"other": 6}


# --------------------------------------------------------------------------------------------
# prune_at: properties, over seeded random curves and with hypothesis


def check_replay(curves: dict[str, list[float]], epochs: int, tolerance: float, cut: int) -> None:
    """Decisions made on curves cut after ``cut`` epochs are a subset of the full run's, at the same epochs."""
    full = prune_at(curves, epochs, tolerance)
    partial = prune_at({k: v[:cut] for k, v in curves.items()}, epochs, tolerance)
    assert set(partial) <= set(full)
    assert all(full[name] == after for name, after in partial.items())
    assert all(after <= cut for after in partial.values())  # nothing decided at rungs not yet reached
    assert {k: v for k, v in full.items() if v <= cut} == partial
    # a sweep stops a pruned arm's curve at its rung; replaying the truncated curves changes nothing
    stopped = {k: v[: full[k]] if k in full else v for k, v in curves.items()}
    assert prune_at(stopped, epochs, tolerance) == full


def check_leader_survives(curves: dict[str, list[float]], epochs: int, tolerance: float) -> None:
    """At each rung, the running arm with the highest accuracy so far is not stopped there."""
    pruned = prune_at(curves, epochs, tolerance)
    assert len(pruned) < max(len(curves), 1)  # somebody always survives
    for rung in rungs(epochs):
        alive = [name for name in curves if pruned.get(name, epochs + 1) >= rung]
        if len(alive) < 2:
            break
        top = max(max(curves[name][:rung]) for name in alive)
        for name in alive:
            if max(curves[name][:rung]) == top:
                assert pruned.get(name) != rung


def check_concave_winner_survives(curves: dict[str, list[float]], epochs: int, tolerance: float) -> None:
    """With non-decreasing curves whose gains never grow, the forecast is an upper bound: the winner stays."""
    best = max(v[-1] for v in curves.values())
    pruned = prune_at(curves, epochs, tolerance)
    for name, curve in curves.items():
        if curve[-1] == best:
            assert name not in pruned


def check_protected(curves: dict[str, list[float]], epochs: int, tolerance: float, until: dict[str, int]) -> None:
    """No arm is stopped at a rung at or before its protected epoch."""
    for name, after in prune_at(curves, epochs, tolerance, until).items():
        assert after > until.get(name, 0)
        assert after in rungs(epochs)


def clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def noisy_curve(start: float, steps: list[float]) -> list[float]:
    """A monotone-ish accuracy curve: a start and per-epoch changes (some negative), kept in [0, 1]."""
    out = [clip(start)]
    for step in steps:
        out.append(clip(out[-1] + step))
    return out


def concave_curve(start: float, first_gain: float, decays: list[float]) -> list[float]:
    """A non-decreasing curve whose per-epoch gain never grows (each gain = previous gain * decay)."""
    out, gain = [start], first_gain
    for decay in decays:
        gain *= decay
        out.append(out[-1] + gain)
    return out


def random_case(rng: random.Random, concave: bool = False) -> tuple[dict[str, list[float]], int, float]:
    epochs = rng.randint(2, 16)
    arms = rng.randint(1, 5)
    curves = {}
    for i in range(arms):
        if concave:
            gain = rng.uniform(0.0, 0.9 / epochs)
            curves[f"arm{i}"] = concave_curve(rng.uniform(0.0, 0.1), gain, [rng.uniform(0.0, 1.0)
                                                                             for _ in range(epochs - 1)])
        else:
            curves[f"arm{i}"] = noisy_curve(rng.uniform(0.0, 0.8), [rng.uniform(-0.05, 0.15)
                                                                    for _ in range(epochs - 1)])
    return curves, epochs, rng.choice([0.0, 0.005, 0.01, 0.03, rng.uniform(0.0, 0.1)])


@pytest.mark.parametrize("seed", range(20))
def test_prune_properties_on_seeded_random_curves(seed):
    rng = random.Random(seed)
    for _ in range(25):
        curves, epochs, tolerance = random_case(rng)
        check_replay(curves, epochs, tolerance, rng.randint(0, epochs))
        check_leader_survives(curves, epochs, tolerance)
        until = {name: rng.randint(0, epochs) for name in curves if rng.random() < 0.5}
        check_protected(curves, epochs, tolerance, until)
        curves, epochs, tolerance = random_case(rng, concave=True)
        check_concave_winner_survives(curves, epochs, tolerance)


accuracies = st.floats(0.0, 1.0, allow_nan=False)
steps = st.floats(-0.05, 0.15, allow_nan=False)
tolerances = st.floats(0.0, 0.1, allow_nan=False)

@st.composite
def sweeps(draw, concave: bool = False):
    epochs = draw(st.integers(2, 16))
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=5, unique=True))
    curves = {}
    for name in names:
        if concave:
            gain = draw(st.floats(0.0, 0.9 / epochs))
            decays = draw(st.lists(st.floats(0.0, 1.0), min_size=epochs - 1, max_size=epochs - 1))
            curves[name] = concave_curve(draw(st.floats(0.0, 0.1)), gain, decays)
        else:
            curves[name] = noisy_curve(draw(accuracies),
                                       draw(st.lists(steps, min_size=epochs - 1, max_size=epochs - 1)))
    return curves, epochs, draw(tolerances)

@settings(max_examples=60, deadline=None, database=None)
@given(sweeps(), st.data())
def test_replay_on_cut_curves_is_consistent(case, data):
    curves, epochs, tolerance = case
    check_replay(curves, epochs, tolerance, data.draw(st.integers(0, epochs)))

@settings(max_examples=60, deadline=None, database=None)
@given(sweeps())
def test_leader_at_each_rung_is_never_pruned_there(case):
    check_leader_survives(*case)

@settings(max_examples=60, deadline=None, database=None)
@given(sweeps(concave=True))
def test_winner_with_decelerating_curve_is_never_pruned(case):
    check_concave_winner_survives(*case)

@settings(max_examples=40, deadline=None, database=None)
@given(sweeps(), st.data())
def test_protected_arms_are_not_pruned_before_their_phase(case, data):
    curves, epochs, tolerance = case
    until = {name: data.draw(st.integers(0, epochs)) for name in curves}
    check_protected(curves, epochs, tolerance, until)

@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(accuracies, min_size=1, max_size=20), st.integers(0, 30))
def test_optimistic_final_bounds(curve, extra):
    forecast = optimistic_final(curve, len(curve) + extra)
    assert max(curve) <= forecast <= 1.0
    if extra == 0:
        assert forecast == max(curve)


# --------------------------------------------------------------------------------------------
# pareto


@pytest.mark.parametrize(("points", "expected"), [
    ({}, []),
    ({"a": (10.0, 0.5)}, ["a"]),
    ({"full": (100.0, 0.9), "half": (50.0, 0.85), "head": (10.0, 0.7)}, ["head", "half", "full"]),
    ({"full": (100.0, 0.9), "slow_bad": (120.0, 0.8), "head": (10.0, 0.7)}, ["head", "full"]),
    ({"full": (100.0, 0.9), "cheap_best": (50.0, 0.95)}, ["cheap_best"]),
    ({"a": (50.0, 0.8), "b": (50.0, 0.7)}, ["a"]),  # same cost, less accurate: dominated
    ({"a": (50.0, 0.8), "b": (60.0, 0.8)}, ["a"]),  # same accuracy, dearer: dominated
    ({"a": (50.0, 0.8), "b": (50.0, 0.8)}, ["a", "b"]),  # identical: neither beats the other
    ({"x": (30.0, 0.6), "y": (20.0, 0.5), "z": (10.0, 0.4)}, ["z", "y", "x"]),  # sorted cheapest first
])
def test_pareto(points, expected):
    assert pareto(points) == expected


def test_pareto_front_members_are_not_dominated():
    rng = random.Random(7)
    for _ in range(50):
        points = {f"p{i}": (float(rng.randint(1, 6)), rng.randint(1, 6) / 10) for i in range(rng.randint(1, 8))}
        front = pareto(points)
        assert [points[n][0] for n in front] == sorted(points[n][0] for n in front)
        for name, (cost, acc) in points.items():
            beaten = any(c <= cost and a >= acc and (c, a) != (cost, acc) for c, a in points.values())
            assert (name in front) is not beaten


@pytest.mark.parametrize(("peaks", "expected"), [
    ({"full": 900, "layer3": 300, "bn": 800}, ["layer3", "bn", "full"]),
    ({"full": 900, "layer3": 300, "bn": 950}, ["layer3", "full"]),  # more memory, less accurate
    ({"full": 900, "layer3": None, "bn": 800}, []),  # an arm without a figure: no front at all
    ({}, []),
])
def test_the_memory_front_weighs_peak_memory_against_accuracy(peaks, expected):
    from freezetune.sweep.result import memory_pareto

    accuracy = {"full": 0.9, "layer3": 0.7, "bn": 0.85}
    records = {n: {"peak_memory_bytes": p, "val_accuracy": {"mean": accuracy[n]}} for n, p in peaks.items()}
    assert memory_pareto(records) == expected


# --------------------------------------------------------------------------------------------
# recommend


def cand(name: str, acc: float, *, sd: float | None = None, n: int = 1, wall: float = 100.0,
         ttt: float | None = None) -> Candidate:
    return Candidate(name, name.title(), Stat(acc, sd, n), wall, ttt)


def test_no_candidates():
    rec = recommend([], TOL)
    assert rec == Recommendation(None, rec.reason, None, [], [])
    assert "nothing to recommend" in rec.reason


def test_picks_cheapest_eligible_by_time_to_target():
    cands = [cand("full", 0.80, wall=100.0, ttt=80.0), cand("half", 0.795, wall=60.0, ttt=30.0),
             cand("quarter", 0.792, wall=40.0, ttt=35.0), cand("head", 0.70, wall=10.0, ttt=None)]
    rec = recommend(cands, TOL)
    assert rec.arm == "half"  # quarter trains faster but reaches the target later; head is too far below
    assert rec.best == "full"
    assert rec.eligible == ["full", "half", "quarter"]
    assert "0.005 below the best (Full, 0.800)" in rec.reason
    assert "within the tolerance of 0.010" in rec.reason
    assert "2.7× sooner than full" in rec.reason  # 80 / 30
    assert "the best," not in rec.reason


def test_eligibility_boundary_is_inclusive():
    rec = recommend([cand("full", 0.80, ttt=50.0), cand("half", 0.79, ttt=10.0)], 0.01)
    assert rec.eligible == ["full", "half"]
    assert rec.arm == "half"


@pytest.mark.parametrize(("cands", "pick"), [
    # reaching the target beats not reaching it, whatever the wall time
    ([cand("full", 0.80, wall=100.0, ttt=90.0), cand("head", 0.80, wall=5.0, ttt=None)], "full"),
    # none reaches it: compared by wall time
    ([cand("full", 0.80, wall=100.0), cand("half", 0.80, wall=50.0), cand("head", 0.795, wall=70.0)], "half"),
    # time to target, not wall time
    ([cand("full", 0.80, wall=100.0, ttt=20.0), cand("half", 0.80, wall=50.0, ttt=40.0)], "full"),
])
def test_ranking(cands, pick):
    assert recommend(cands, TOL).arm == pick


def test_pick_is_the_best():
    rec = recommend([cand("full", 0.78, ttt=80.0), cand("half", 0.81, ttt=20.0)], TOL)
    assert (rec.arm, rec.best) == ("half", "half")
    assert rec.reason.startswith("Half: 0.810, the best, and reaches the target 4.0× sooner than full.")
    assert rec.eligible == ["half"]


@pytest.mark.parametrize(("cands", "phrase"), [
    ([cand("full", 0.80, wall=100.0, ttt=60.0), cand("half", 0.80, wall=40.0, ttt=20.0)],
     "reaches the target 3.0× sooner than full"),
    ([cand("full", 0.80, wall=100.0, ttt=None), cand("half", 0.80, wall=40.0, ttt=20.0)],
     "reaches the target, which full fine-tuning never does"),
    ([cand("full", 0.80, wall=100.0), cand("half", 0.80, wall=40.0)],
     "trains 2.5× faster than full"),
    # full cheaper but not eligible: the pick is slower, and said to be
    ([cand("full", 0.60, wall=100.0, ttt=10.0), cand("half", 0.80, wall=100.0, ttt=20.0)],
     "though it reaches the target 2.0× later than full, which is not within the tolerance"),
    ([cand("full", 0.60, wall=10.0), cand("half", 0.80, wall=20.0)],
     "though it trains 2.0× slower than full, which is not within the tolerance"),
])
def test_comparison_with_full(cands, phrase):
    rec = recommend(cands, TOL)
    assert rec.arm == "half"
    assert phrase in rec.reason
    if "though" in phrase:
        assert "sooner than full" not in rec.reason and "faster than full" not in rec.reason


@pytest.mark.parametrize("cands", [
    [cand("full", 0.80, ttt=10.0), cand("half", 0.70, ttt=5.0)],  # full is the pick
    [cand("half", 0.80, ttt=10.0), cand("head", 0.70, ttt=5.0)],  # no full arm
])
def test_no_comparison_when_full_is_the_pick_or_absent(cands):
    rec = recommend(cands, TOL)
    assert "than full" not in rec.reason
    assert "full fine-tuning" not in rec.reason


def test_baseline_name_is_configurable():
    rec = recommend([cand("base", 0.80, wall=100.0), cand("half", 0.80, wall=25.0)], TOL, baseline="base")
    assert "trains 4.0× faster than full" in rec.reason


def test_one_seed_is_said():
    rec = recommend([cand("full", 0.80, ttt=10.0), cand("half", 0.80, ttt=5.0)], TOL)
    assert "One seed" in rec.reason
    assert rec.indistinguishable == []


def test_overlapping_seeds_are_indistinguishable():
    cands = [cand("full", 0.800, sd=0.010, n=3, ttt=60.0), cand("half", 0.795, sd=0.008, n=3, ttt=20.0),
             cand("quarter", 0.792, sd=0.004, n=3, ttt=25.0), cand("head", 0.70, sd=0.01, n=3, ttt=None)]
    rec = recommend(cands, TOL)
    assert rec.arm == "half"
    assert rec.indistinguishable == ["full", "quarter"]  # |diff| < max(sd): 0.005 < 0.010, 0.003 < 0.008
    assert "With 3 seeds, full, quarter cannot be told apart from it" in rec.reason
    assert "sd up to 0.010" in rec.reason
    assert "One seed" not in rec.reason
    assert "0.795 ± 0.008" in rec.reason


# Binary fractions, so that a gap and an sd meant to be equal are equal in floats too (0.81 - 0.80
# is not 0.01, and would let a "<" mutated into "<=" pass).
@pytest.mark.parametrize(("other_mean", "other_sd", "close"), [
    (0.75, 1 / 64, True),
    (0.75 + 1 / 128, 1 / 256, True),  # the pick's sd (1/64) is the larger
    (0.75 + 1 / 64, 1 / 256, False),  # a gap exactly equal to the larger sd is not "less than"
    (0.75 - 1 / 32, 1 / 32, False),  # likewise, with the other's sd the larger
    (0.75 + 3 / 64, 1 / 32, False),
    (0.75 - 1 / 128, None, False),  # no sd measured for it
])
def test_indistinguishable_rule(other_mean, other_sd, close):
    pick = cand("half", 0.75, sd=1 / 64, n=3, ttt=10.0)
    other = cand("other", other_mean, sd=other_sd, n=3, ttt=50.0)
    rec = recommend([pick, other], 0.05)
    assert rec.arm == "half"
    assert (rec.indistinguishable == ["other"]) is close
    assert ("cannot be told apart" in rec.reason) is close


def test_separated_seeds_are_not_called_indistinguishable():
    cands = [cand("full", 0.80, sd=0.002, n=3, ttt=50.0), cand("half", 0.79, sd=0.002, n=3, ttt=10.0)]
    rec = recommend(cands, TOL)
    assert rec.indistinguishable == []
    assert "cannot be told apart" not in rec.reason
    assert "One seed" not in rec.reason


def test_recommendation_as_dict():
    rec = recommend([cand("full", 0.80, ttt=10.0), cand("half", 0.795, ttt=5.0)], TOL)
    data = rec.as_dict()
    assert data == {"arm": "half", "reason": rec.reason, "best": "full", "eligible": ["full", "half"],
                    "indistinguishable": []}
    data["eligible"].append("x")
    assert rec.eligible == ["full", "half"]  # a copy, not the record's own list


# --------------------------------------------------------------------------------------------
# several seeds, some of which miss the target


def test_reached_stat_is_over_the_seeds_that_reached_it():
    from freezetune.sweep.analysis import reached_stat

    assert reached_stat([10.0, None, 14.0]).as_dict() == {"mean": 12.0, "sd": pytest.approx(math.sqrt(8)), "n": 2}
    assert reached_stat([None, None]).as_dict() == {"mean": None, "sd": None, "n": 0}


def _seeds(name, acc, ttt, reached, wall=100.0):
    return Candidate(name, name.title(), Stat(acc, 0.01, 3), wall, ttt, reached)


def test_an_arm_that_reached_the_target_in_every_seed_ranks_before_one_that_did_in_some():
    from freezetune.sweep.analysis import cost_of

    every, some = _seeds("every", 0.80, 30.0, 3), _seeds("some", 0.80, 5.0, 2)
    none = _seeds("none", 0.80, None, 0, 1.0)
    assert sorted([none, some, every], key=cost_of) == [every, some, none]
    assert recommend([none, some, every], TOL).arm == "every"


def test_the_reason_says_how_many_seeds_of_full_reached_the_target():
    rec = recommend([_seeds("full", 0.80, 40.0, 2), _seeds("half", 0.80, 10.0, 3)], TOL)
    assert rec.arm == "half" and "which full fine-tuning does in only 2 of 3 seeds" in rec.reason
    assert "never does" not in rec.reason
    rec = recommend([_seeds("full", 0.80, None, 0), _seeds("half", 0.80, 10.0, 3)], TOL)
    assert "which full fine-tuning never does" in rec.reason


def test_a_pick_that_reached_the_target_in_some_seeds_says_so():
    rec = recommend([_seeds("full", 0.70, None, 0), _seeds("half", 0.80, 10.0, 2)], TOL)
    assert rec.arm == "half" and "reached the target in 2 of its 3 seeds" in rec.reason
