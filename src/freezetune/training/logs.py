"""A run's logs while it trains: steps, events, epochs and (optionally) TensorBoard, on rank 0 only.

Step rows go to ``metrics.jsonl`` and event rows to ``events.jsonl``, so a reader of either never
has to tell them apart. Every write is flushed at once (see :class:`MetricsLog`).
"""

from __future__ import annotations

from freezetune.config import Config
from freezetune.training.run_dir import MetricsLog, RunDir
from freezetune.training.tensorboard import TensorBoardLog


class RunLogs:
    """The open logs of one training process.

    Args:
        run_dir: The run folder.
        config: The run's config (``output.tensorboard``).
        main: Whether this process writes (rank 0); the others' logs keep nothing.
        resumed_from: The checkpoint's step when resuming (the logs are appended to), else None.

    Raises:
        ConfigError: If ``output.tensorboard`` is on but the tensorboard package is missing.
        WriteError: If a log cannot be opened.
    """

    def __init__(self, run_dir: RunDir, config: Config, main: bool, resumed_from: int | None):
        # TensorBoard first: a missing package leaves nothing open.
        self.tensorboard = (TensorBoardLog(run_dir.path, config, resumed_from=resumed_from)
                            if config.output.tensorboard and main else None)
        append = resumed_from is not None
        self._steps = MetricsLog(run_dir.metrics if main else None, append=append)
        self._events = MetricsLog(run_dir.events if main else None, append=append)
        self._epochs = MetricsLog(run_dir.epochs if main else None, append=append)
        self.closed = False

    def step(self, row: dict, optimizer) -> None:
        """Logs one step's ``metrics.jsonl`` row (and its learning rates to TensorBoard)."""
        self._steps.write(row)
        if self.tensorboard is not None:
            self.tensorboard.step(row, optimizer)

    def event(self, row: dict, line: str, step: int) -> None:
        """Logs a freeze event's row to ``events.jsonl`` and its line as TensorBoard text."""
        self._events.write(row)
        self.text(line, step)

    def text(self, line: str, step: int) -> None:
        """Logs an event line (an unfreeze or freeze) as TensorBoard text, if it is on."""
        if self.tensorboard is not None:
            self.tensorboard.text("events", line, step)

    def epoch(self, record) -> None:
        """Logs an :class:`~freezetune.training.summary.EpochRecord` to ``epochs.jsonl`` and TensorBoard."""
        self._epochs.write(record.as_dict())
        if self.tensorboard is not None:
            self.tensorboard.epoch(record)

    def close(self) -> None:
        """Closes every log (the TensorBoard hyperparameters can still be added after)."""
        self.closed = True
        try:
            self._steps.close()
            self._events.close()
            self._epochs.close()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
