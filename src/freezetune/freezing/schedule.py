"""Gradual unfreezing: which ``freeze.schedule`` phases are due, and applying one safely.

Like Lightning's BackboneFinetuning, a phase takes effect at the start of its epoch. Before a
phase makes tensors trainable, they are checked against their fingerprint from the start of the
run: they were frozen until now, so they must still be bit-identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from freezetune.config import UnfreezeStep
from freezetune.errors import FreezeIntegrityError
from freezetune.freezing.integrity import changed_tensors, fingerprint
from freezetune.freezing.plan import FreezePlan, unfreeze


@dataclass
class PhaseRecord:
    """One applied phase, as ``summary.json`` lists it under ``schedule``."""

    epoch: int
    unfreeze: list[str]
    tensors: int
    params: int
    lr_mult: float
    groups: list[str]
    unchanged_while_frozen: bool = True

    @classmethod
    def of(cls, phase: UnfreezeStep, newly: list[tuple[str, nn.Parameter]], groups: list[str]) -> PhaseRecord:
        """The record of ``phase``, which made ``newly`` trainable in optimizer ``groups``."""
        return cls(phase.epoch, list(phase.unfreeze), len(newly), sum(p.numel() for _, p in newly),
                   phase.lr_mult, list(groups))

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


def phases_due(schedule: list[UnfreezeStep], epoch: int) -> int:
    """How many phases are in effect during ``epoch`` (0-based): those starting at or before it."""
    return sum(phase.epoch <= epoch for phase in schedule)


def unfreeze_phase(model: nn.Module, plan: FreezePlan, phase: UnfreezeStep,
                   frozen_before: dict[str, str]) -> list[tuple[str, nn.Parameter]]:
    """Makes the phase's patterns trainable, after proving those tensors never moved while frozen.

    Returns:
        The (name, parameter) pairs that now train.

    Raises:
        FreezeError: If a pattern matches no module.
        FreezeIntegrityError: If a tensor changed while it was frozen (a bug, never expected).
    """
    newly = unfreeze(model, plan, phase.unfreeze)
    current = fingerprint(model, FreezePlan(frozen=[n for n, _ in newly]))
    # A tensor without a starting hash has nothing to compare against (as before): not moved.
    moved = changed_tensors({n: frozen_before.get(n, h) for n, h in current.items()}, current)
    if moved:
        raise FreezeIntegrityError(f"tensors changed while frozen, before epoch {phase.epoch}: {moved[:5]}")
    return newly
