"""Successive halving of an arm's learning rates, as pure functions of their curves.

Within one arm, the rates of its grid compete at rungs (Jamieson & Talwalkar 2016, the rule
behind Hyperband and ASHA): at each rung the rates still running are ranked and the best
``1/eta`` of them go on, the others stop. Nothing here trains or reads files, so the decisions are
replayed from the curves alone and a resumed sweep makes the same ones.

Where the rungs sit and what they rank on were chosen by replaying this rule over the curves of
unpruned grid sweeps (docs/sweep.md, "Choosing the rungs"): slow starters, the best rate of an
arm scoring no better than chance for the first epochs, are why a rung ranks on training loss
as well as on validation accuracy and why the first rung is not before the third epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ETA = 3  # keep the best third at every rung
FIRST_RUNG = 3  # never rank before this many epochs: a slow starter's best rate looks like chance until then
RUNG_FRACTIONS = (1 / 5, 2 / 5)  # of the budget, rounded up, and never before FIRST_RUNG

HALVING_RULE = (
    f"within each arm, its learning rates compete at rungs ({', '.join(f'{f:.0%}' for f in RUNG_FRACTIONS)} of the "
    f"epochs, never before epoch {FIRST_RUNG}): each rung keeps the best 1/{ETA} of the rates still running, "
    "ranked by validation accuracy (best so far), ties within the validation set's noise broken by the lower "
    "training loss of the rung's epoch"
)


@dataclass(frozen=True)
class RateCurve:
    """One rate of an arm, per epoch, averaged over seeds.

    Attributes:
        accuracy: Validation accuracy after each epoch.
        train_loss: Mean training loss of each epoch (None where not recorded).
        val_size: Validation samples per evaluation, for the noise of an accuracy (0: unknown).
    """

    accuracy: Sequence[float]
    train_loss: Sequence[float | None]
    val_size: int = 0


def halving_rungs(epochs: int) -> list[int]:
    """The epochs after which an arm's rates are ranked: :data:`RUNG_FRACTIONS` of the budget.

    Never before :data:`FIRST_RUNG`, never at the last epoch (nothing is left to save), and each
    rung at least one epoch after the previous one.
    """
    rungs: list[int] = []
    for fraction in RUNG_FRACTIONS:
        rung = max(FIRST_RUNG, math.ceil(epochs * fraction), (rungs[-1] + 1) if rungs else 0)
        if rung < epochs:
            rungs.append(rung)
    return rungs


def accuracy_noise(accuracy: float, val_size: int) -> float:
    """One standard error of an accuracy measured on ``val_size`` samples (0 when the size is unknown)."""
    if val_size <= 0:
        return 0.0
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1 / val_size) / val_size)


def rank(curves: dict[float, RateCurve], rung: int) -> list[float]:
    """The rates, best first, as they stand after ``rung`` epochs.

    Validation accuracy (the best so far) decides; two rates within one standard error of each
    other count as tied, and a tie goes to the lower training loss of the rung's epoch, then to
    the higher accuracy, then to the larger rate. The noise guard matters early: at chance level
    every rate scores about the same, and the loss already tells which one is learning.
    """
    best = {m: max(c.accuracy[:rung]) for m, c in curves.items()}
    order = sorted(curves, key=lambda m: (best[m], m), reverse=True)
    # Group rates whose accuracy is within the leader-of-group's noise, then order groups' members by loss.
    ranked: list[float] = []
    while order:
        head = order[0]
        noise = accuracy_noise(best[head], curves[head].val_size)
        group = [m for m in order if best[head] - best[m] <= noise + 1e-12]
        ranked += sorted(group, key=lambda m: (_loss(curves[m], rung), -best[m], -m))
        order = [m for m in order if m not in group]
    return ranked


def _loss(curve: RateCurve, rung: int) -> float:
    loss = curve.train_loss[rung - 1] if len(curve.train_loss) >= rung else None
    return math.inf if loss is None or not math.isfinite(loss) else loss


def halving_at(curves: dict[float, RateCurve], epochs: int, protected_until: int = 0) -> dict[float, int]:
    """Which rates successive halving stops, and after how many epochs.

    Args:
        curves: Per rate multiplier, its curve so far (rates whose loss diverged left out: they
            ended early and are no candidate).
        epochs: The budget in epochs.
        protected_until: The epoch of the arm's last ``freeze.schedule`` phase: rungs up to it
            are skipped, so that no rate is ranked before the phase has had an epoch to show.

    Returns:
        ``{multiplier: epochs it ran}`` for the stopped rates. A rung is decided only once every
        rate still running has reached it, so the answer is the same however the sweep was split.
    """
    stopped: dict[float, int] = {}
    for rung in (r for r in halving_rungs(epochs) if r > protected_until):
        alive = {m: c for m, c in curves.items() if m not in stopped}
        if len(alive) < 2 or any(len(c.accuracy) < rung for c in alive.values()):
            break
        keep = max(1, math.ceil(len(alive) / ETA))
        for m in rank(alive, rung)[keep:]:
            stopped[m] = rung
    return stopped


def envelope(curves: Sequence[Sequence[float]]) -> list[float]:
    """Epoch by epoch, the best of an arm's rates that ran that epoch: the arm's curve between arms."""
    length = max((len(c) for c in curves), default=0)
    return [max(c[i] for c in curves if len(c) > i) for i in range(length)]
