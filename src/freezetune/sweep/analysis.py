"""The sweep's decisions, as pure functions of the arms' accuracy curves and times.

Nothing here trains or reads files, so every rule is tested on hand-made curves: statistics over
seeds, time to target accuracy, the pruning rule, the Pareto front and the recommendation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from freezetune.config import DEFAULT_TOLERANCE  # noqa: F401  (the sweep's callers read it here)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (sd is None for a single seed)."""

    mean: float | None
    sd: float | None
    n: int

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def stat(values: Sequence[float | None]) -> Stat:
    """Mean ± sd of the values; the mean is None if any value is None (e.g. a seed's run did not finish)."""
    if not values or any(v is None for v in values):
        return Stat(None, None, len(values))
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Stat(mean, sd, len(values))


def reached_stat(values: Sequence[float | None]) -> Stat:
    """Mean ± sd over the seeds that have a value (time to target: those that reached it); ``n`` counts them."""
    return stat([v for v in values if v is not None])


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Epoch-by-epoch mean over seeds, as long as the shortest curve."""
    length = min((len(c) for c in curves), default=0)
    return [statistics.fmean(c[i] for c in curves) for i in range(length)]


def time_to_target(accuracy: Sequence[float | None], epoch_s: Sequence[float],
                   target: float) -> tuple[float | None, int | None]:
    """DAWNBench's time to accuracy: training seconds until the first validation at or above ``target``.

    Args:
        accuracy: Validation accuracy after each epoch.
        epoch_s: Training seconds of each epoch (validation excluded).
        target: The accuracy to reach.

    Returns:
        Seconds (the epochs' training time up to and including that epoch) and the 1-based epoch
        count, or ``(None, None)`` if it was never reached.
    """
    elapsed = 0.0
    for i, (acc, seconds) in enumerate(zip(accuracy, epoch_s, strict=False)):
        elapsed += seconds
        if acc is not None and acc >= target - 1e-12:
            return elapsed, i + 1
    return None, None


# --------------------------------------------------------------------------------------------
# Pruning


def rungs(epochs: int) -> list[int]:
    """The epochs after which pruning is considered: half and three quarters of the budget.

    Never before the second epoch (the rule needs a gain between two validations) and never
    after the last (nothing is left to save).
    """
    points = {math.ceil(epochs / 2), math.ceil(3 * epochs / 4)}
    return sorted(r for r in points if 2 <= r < epochs)


def optimistic_final(curve: Sequence[float], epochs: int) -> float:
    """The best accuracy an arm could plausibly end with, from its curve so far.

    The arm's best accuracy so far, plus its recent gain per epoch (the larger of the last two
    one-epoch gains of its best-so-far curve) for every epoch left, capped at 1. An arm that is
    still climbing keeps a high forecast, so a slow starter is not cut off; an arm that has levelled
    off is forecast to stay where it is.
    """
    best = [max(curve[: i + 1]) for i in range(len(curve))]
    gains = [b - a for a, b in zip(best, best[1:], strict=False)]
    recent = max(gains[-2:], default=0.0)
    return min(1.0, best[-1] + recent * (epochs - len(curve)))


def prune_at(curves: dict[str, Sequence[float]], epochs: int, tolerance: float,
             protected_until: dict[str, int] | None = None) -> dict[str, int]:
    """Which arms the rule stops, and after how many epochs; replayed from the curves alone.

    At each rung, an arm is stopped if even its :func:`optimistic_final` falls more than
    ``tolerance`` short of the best accuracy any arm still running has reached. Arms are compared
    on the epochs all of them have run, so the decision is the same however the run was split by
    interruptions. An arm with an unfreeze phase still ahead (``protected_until``: the epoch of
    its last phase) is never stopped before that phase has had an epoch to show its effect.

    Args:
        curves: Mean validation accuracy after each epoch, per arm.
        epochs: The budget in epochs.
        tolerance: How far below the best an arm may end and still count as a candidate.
        protected_until: Per arm, the epoch before which it may not be stopped.

    Returns:
        ``{arm: epochs it ran}`` for the stopped arms.
    """
    protected_until = protected_until or {}
    pruned: dict[str, int] = {}
    for rung in rungs(epochs):
        alive = {name: c for name, c in curves.items() if name not in pruned}
        if len(alive) < 2 or any(len(c) < rung for c in alive.values()):
            break
        leader = max(max(c[:rung]) for c in alive.values())
        for name, curve in alive.items():
            if rung <= protected_until.get(name, 0):
                continue
            if optimistic_final(curve[:rung], epochs) < leader - tolerance:
                pruned[name] = rung
    return pruned


# --------------------------------------------------------------------------------------------
# Pareto front and recommendation


@dataclass(frozen=True)
class Candidate:
    """What the recommendation knows of an arm (means over seeds)."""

    name: str
    label: str
    accuracy: Stat  # final validation accuracy
    wall_s: float  # training seconds (validation excluded)
    time_to_target_s: float | None  # mean over the seeds that reached the target
    reached: int | None = None  # seeds that reached it (None: all of them if time_to_target_s is set, else none)

    @property
    def seeds_reached(self) -> int:
        """How many of the seeds reached the target."""
        if self.reached is not None:
            return self.reached
        return self.accuracy.n if self.time_to_target_s is not None else 0


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Arms no other arm beats on both cost and accuracy: ``{name: (seconds, accuracy)}``, cheapest first."""
    front = []
    for name, (cost, acc) in points.items():
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc)
            for other, (c, a) in points.items() if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


@dataclass(frozen=True)
class Recommendation:
    """The arm to use, and why, in plain sentences."""

    arm: str | None
    reason: str
    best: str | None
    eligible: list[str]
    indistinguishable: list[str]

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {"arm": self.arm, "reason": self.reason, "best": self.best, "eligible": list(self.eligible),
                "indistinguishable": list(self.indistinguishable)}


def cost_of(c: Candidate) -> tuple[int, float]:
    """Sort key: fewest seeds that missed the target first, then the time to it (the training time if none reached it).

    With one seed: arms that reached the target by their time to it, then the others by
    training time. With several, an arm that reached it in every seed ranks before one that
    reached it in some, whatever their times (a mean over the lucky seeds is no promise).
    """
    reached = c.seeds_reached
    return (c.accuracy.n - reached, c.time_to_target_s if reached else c.wall_s)


def recommend(candidates: list[Candidate], tolerance: float, baseline: str = "full") -> Recommendation:
    """The cheapest arm whose mean final accuracy is within ``tolerance`` of the best arm's.

    Cheapest means by time to the target accuracy, else by training time. The reason says how
    it compares with the best arm and with ``baseline`` (full fine-tuning), and, with several
    seeds, whether their spread makes it indistinguishable from others.
    """
    if not candidates:
        return Recommendation(None, "no arm finished, so there is nothing to recommend", None, [], [])
    best = max(candidates, key=lambda c: c.accuracy.mean)
    eligible = [c for c in candidates if c.accuracy.mean >= best.accuracy.mean - tolerance - 1e-12]
    pick = min(eligible, key=cost_of)
    close = _indistinguishable(pick, candidates)
    reason = _reason(pick, best, tolerance, next((c for c in candidates if c.name == baseline), None))
    if 0 < pick.seeds_reached < pick.accuracy.n:
        reason += f" It reached the target in {pick.seeds_reached} of its {pick.accuracy.n} seeds."
    if close:
        spread = max(c.accuracy.sd or 0.0 for c in [pick, *close])
        reason += (f" With {pick.accuracy.n} seeds, {', '.join(c.name for c in close)} cannot be told apart from it "
                   f"(the gap is within the seeds' spread, sd up to {spread:.3f}); more seeds would separate them.")
    elif pick.accuracy.n == 1:
        reason += " One seed: the spread between runs is not measured (--seeds 3 measures it)."
    return Recommendation(pick.name, reason, best.name, [c.name for c in eligible], [c.name for c in close])


def _indistinguishable(pick: Candidate, candidates: list[Candidate]) -> list[Candidate]:
    """Arms whose mean accuracy differs from the pick's by less than the larger of their two sds."""
    if pick.accuracy.sd is None:
        return []
    out = []
    for c in candidates:
        if c.name == pick.name or c.accuracy.sd is None:
            continue
        if abs(c.accuracy.mean - pick.accuracy.mean) < max(c.accuracy.sd, pick.accuracy.sd):
            out.append(c)
    return out


def _acc(s: Stat) -> str:
    return f"{s.mean:.3f}" if s.sd is None else f"{s.mean:.3f} ± {s.sd:.3f}"


def _reason(pick: Candidate, best: Candidate, tolerance: float, baseline: Candidate | None) -> str:
    if pick.name == best.name:
        first = f"{pick.label}: {_acc(pick.accuracy)}, the best"
    else:
        gap = best.accuracy.mean - pick.accuracy.mean
        first = (f"{pick.label}: {_acc(pick.accuracy)}, {gap:.3f} below the best ({best.label}, "
                 f"{best.accuracy.mean:.3f}) and within the tolerance of {tolerance:.3f}")
    return first + _cheaper(pick, baseline) + "."


def _cheaper(pick: Candidate, baseline: Candidate | None) -> str:
    """How the pick's cost compares with full fine-tuning's, in the right direction."""
    if baseline is None or baseline.name == pick.name:
        return ""
    if pick.seeds_reached and not baseline.seeds_reached:
        return ", and reaches the target, which full fine-tuning never does"
    if pick.seeds_reached and baseline.seeds_reached < baseline.accuracy.n:
        return (f", and reaches the target, which full fine-tuning does in only {baseline.seeds_reached} of "
                f"{baseline.accuracy.n} seeds")
    if pick.seeds_reached and baseline.seeds_reached:
        return _ratio_text(baseline.time_to_target_s, pick.time_to_target_s, "reaches the target", "sooner", "later")
    return _ratio_text(baseline.wall_s, pick.wall_s, "trains", "faster", "slower")


def _ratio_text(full_s: float, pick_s: float, verb: str, better: str, worse: str) -> str:
    if pick_s <= 0 or full_s <= 0:
        return ""
    if full_s >= pick_s:
        return f", and {verb} {full_s / pick_s:.1f}× {better} than full"
    # Full is cheaper but not eligible: more than the tolerance less accurate.
    return f", though it {verb} {pick_s / full_s:.1f}× {worse} than full, which is not within the tolerance"
