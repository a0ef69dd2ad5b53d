"""Where a run is: the counters a checkpoint saves and a resumed run continues from."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field


@dataclass
class RunState:
    """The run's position, saved in every checkpoint.

    Attributes:
        step: Optimizer steps taken.
        epoch: Completed passes over the training set (the epoch being trained, 0-based).
        batch_in_epoch: Batches of ``epoch`` already trained; a resumed run skips them.
        phases: How many ``freeze.schedule`` phases (gradual unfreezing) are in effect.
        epoch_seconds: Training seconds already spent on ``epoch`` by earlier processes, so an
            epoch split by an interruption is still timed whole in ``epochs.jsonl``.
        epoch_loss_sum: The summed loss of ``epoch``'s steps so far, earlier processes' included,
            so an epoch's mean training loss is the same however the run was split.
        auto_freeze: :meth:`freezetune.freezing.auto.AutoFreezer.state_dict` (None without ``freeze.auto``).
        started_at: Unix time the run first started (0: not recorded, a checkpoint from before it was).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    phases: int = 0
    epoch_seconds: float = 0.0
    auto_freeze: dict | None = field(default=None)
    epoch_loss_sum: float = 0.0
    started_at: float = field(default=0.0, compare=False)  # when, not where: two states at one step are equal

    def as_dict(self) -> dict:
        """The state as checkpoint keys.

        ``step``, ``epoch``, ``batch_in_epoch``, ``phases``, ``epoch_seconds``, ``auto_freeze``
        (the events, last interval and gradient-norm sums of ``freeze.auto``), ``epoch_loss_sum`` and
        ``started_at``.
        """
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        """Reads the counters of a loaded checkpoint; older checkpoints may lack the newer ones."""
        counters = {k: int(ckpt.get(k, 0)) for k in ("step", "epoch", "batch_in_epoch", "phases")}
        return cls(**counters, epoch_seconds=float(ckpt.get("epoch_seconds", 0.0)),
                   auto_freeze=ckpt.get("auto_freeze"), epoch_loss_sum=float(ckpt.get("epoch_loss_sum", 0.0)),
                   started_at=float(ckpt.get("started_at", 0.0)))


class StopReason(enum.Enum):
    """Why the training loop ended: the one answer every caller reads."""

    COMPLETED = "completed"  # the planned steps or epochs are done
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM (on any rank) with work left
    NONFINITE = "nonfinite"  # the loss became NaN or infinite (train.stop_on_nonfinite)
    PRUNED = "pruned"  # a sweep stopped the run: it could not come within the tolerance of the best arm


@dataclass
class Budget:
    """How long the run trains: steps per epoch, the planned total, and the epoch limit.

    Attributes:
        per_epoch: Optimizer steps in one epoch (of this rank's share of the data).
        total: Steps the run will take (epochs x batches, capped by ``train.max_steps``).
        max_epochs: Epochs the run may start.
    """

    per_epoch: int
    total: int
    max_epochs: int

    @classmethod
    def of(cls, epochs: int, max_steps: int | None, per_epoch: int) -> Budget:
        """The budget of ``epochs`` epochs of ``per_epoch`` steps, capped by ``max_steps`` (0/None: no cap)."""
        total = epochs * per_epoch
        return cls(per_epoch, min(total, max_steps) if max_steps else total, epochs)

    def extend_to(self, steps: int) -> None:
        """Lets the run take at least ``steps`` steps, adding the epochs they need."""
        if steps > self.total:
            self.total = steps
            self.max_epochs = max(self.max_epochs, math.ceil(steps / max(1, self.per_epoch)))

    def work_left(self, state: RunState) -> bool:
        """Whether a run at ``state`` has steps left to train."""
        return state.step < self.total and state.epoch < self.max_epochs
