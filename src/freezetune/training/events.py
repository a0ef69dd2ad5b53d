"""What a run produces as it goes: each step, each epoch end, and the tallies of this process.

:class:`StepRecord` and :class:`EpochEnd` are what :meth:`~freezetune.training.recipe.Recipe.loop`
yields; :class:`Progress` is what this process counted on the way (step times, losses, the last
validation, the newest checkpoint), which the run's summary is built from; :class:`RunResult` is
what :meth:`~freezetune.training.recipe.Recipe.finish` hands back when the run has ended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from freezetune.errors import FreezeIntegrityError
from freezetune.training.state import StopReason
from freezetune.training.step import Batch


@dataclass
class StepRecord:
    """One optimizer step, as :meth:`Recipe.loop` yields it (one line of ``metrics.jsonl``)."""

    step: int
    epoch: int
    loss: float
    step_time_s: float
    lr: float
    batch_size: int
    warmup: bool
    cached: bool
    batch: Batch = field(repr=False, compare=False)
    data_wait_s: float = 0.0  # waiting for this batch before the step: loading, decoding (not in step_time_s)

    def as_dict(self) -> dict:
        """The ``metrics.jsonl`` row (the batch itself is left out)."""
        return {k: v for k, v in asdict(self).items() if k != "batch"}


@dataclass
class EpochEnd:
    """The end of one pass over (what was left of) an epoch's batches.

    ``seconds`` is this process's pass: training time (steps, the waits for their batches,
    freeze changes), not what the caller did with each step (``io_seconds``: logging it, saving
    checkpoints). ``epoch_seconds`` adds what earlier processes spent on the same epoch before an
    interruption, so it is the whole epoch's training time; ``train_loss`` is the mean loss of all
    the epoch's steps, earlier processes' included; ``data_wait_seconds`` is the part of
    ``seconds`` spent waiting for batches.
    """

    epoch: int
    seconds: float
    steps: int
    cached: bool
    epoch_seconds: float = 0.0
    train_loss: float | None = None
    io_seconds: float = 0.0
    data_wait_seconds: float = 0.0

    def as_dict(self) -> dict:
        """The ``summary.json`` ``epochs`` entry."""
        return asdict(self)


@dataclass
class Outcome:
    """How training went: its status, why it stopped early, its first and last loss, the last validation."""

    status: str = StopReason.COMPLETED.value  # completed | interrupted | nonfinite | pruned
    val: dict | None = None
    error: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None


@dataclass
class Progress:
    """What this process has done so far; a resumed run starts a new one.

    Attributes:
        step_times: Every step's synchronized seconds, warm-up included.
        epoch_times: Every :class:`EpochEnd` as a dict (``summary.json``'s ``epochs``).
        resumed_from_step: The checkpoint's step when the run was resumed, else None.
        saved_step: The step of the newest checkpoint on disk, else None.
        warmup_left: Untimed warm-up steps still to come in this process.
        nonfinite: What the loss became, and at which step, if it stopped the run.
        stop_requested: What asked the run to stop (a signal's name), once training has ended.
        stop_reason: Why the loop ended, once it has.
        outcome: The outcome as it stands.
        input_bound_said: Whether the notice that the run waits for its data was printed.
    """

    step_times: list[float] = field(default_factory=list)
    epoch_times: list[dict] = field(default_factory=list)
    resumed_from_step: int | None = None
    saved_step: int | None = None
    warmup_left: int = 0
    nonfinite: str | None = None
    stop_requested: str | None = None
    stop_reason: StopReason | None = None
    outcome: Outcome = field(default_factory=Outcome)
    input_bound_said: bool = False

    def record_loss(self, loss: float) -> None:
        """Notes a trained step's loss (the first one stays the first)."""
        if self.outcome.first_loss is None:
            self.outcome.first_loss = loss
        self.outcome.last_loss = loss


@dataclass
class RunResult:
    """How a run ended, as :meth:`Recipe.finish` returns it: the one record a caller reads.

    Attributes:
        status: ``completed``, ``interrupted``, ``nonfinite`` or ``pruned``.
        error: Why it stopped early, else None.
        integrity: The freeze-integrity check (``summary.json``'s ``freeze_integrity``).
        frozen_sha256_before: The combined hash of the frozen tensors as the run started.
        summary: ``summary.json`` as written, or None for a run ended without one.
        saved_step: The step of the newest checkpoint, else None.
        run_dir: The run folder.
        nonfinite: What the loss became, if that stopped the run.
    """

    status: str
    error: str | None
    integrity: dict
    frozen_sha256_before: str
    summary: dict | None
    saved_step: int | None
    run_dir: str
    nonfinite: str | None = None

    def raise_if_moved(self, who: str = "") -> None:
        """Raises when a frozen tensor changed (a bug, never expected).

        Args:
            who: What to name in the message (``"arm layer4 seed 0: "``); the run's own wording when empty.

        Raises:
            FreezeIntegrityError: If the integrity check failed on any rank.
        """
        if self.integrity["ok"]:
            return
        changed = ", ".join(self.integrity["changed"][:5])
        if who:
            raise FreezeIntegrityError(f"{who}frozen tensors changed: {changed}")
        raise FreezeIntegrityError(f"frozen tensors changed during training: {changed}")
