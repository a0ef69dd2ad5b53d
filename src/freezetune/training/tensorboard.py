"""TensorBoard event files for a run (``output.tensorboard: true``), in ``<run_dir>/tensorboard/``.

Written through torch's own :class:`torch.utils.tensorboard.SummaryWriter` (which needs the
``tensorboard`` package, the optional ``tensorboard`` extra). What goes in, under which tag:

- every step (the ``metrics.jsonl`` row): ``train/loss``, ``train/lr/<param group>``,
  ``train/step_time_s`` and ``train/samples_per_s``;
- every epoch, at its last step: ``val/loss``, ``val/accuracy`` and ``epoch/train_s``;
- unfreeze and auto-freeze events, as text under ``events``; the config, as text under ``config``;
- at the end, the flattened config as hyperparameters with the final metrics (``hparam/...``),
  in the same folder, so ``tensorboard --logdir runs/`` shows one row per run in its HParams tab.

A resumed run appends a new event file to the same folder, opened with ``purge_step`` at the
step after its checkpoint: TensorBoard then hides what the interrupted process logged beyond
the checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from freezetune.config import Config, dump_config
from freezetune.errors import MissingExtraError

TENSORBOARD_DIR = "tensorboard"
# Tags of the final metrics in the HParams tab; distinct from the per-step tags, as
# ``add_hparams`` asks, so the dashboard shows these values and not the last logged scalar.
_FINAL_METRICS = {
    "hparam/val_accuracy": ("val", "accuracy"),
    "hparam/val_loss": ("val", "loss"),
    "hparam/final_loss": ("loss", "last"),
    "hparam/samples_per_s": ("timing", "samples_per_s"),
    "hparam/step_median_s": ("timing", "step_median_s"),
}
# Seconds between flushes of pending events to disk, so a person watching sees a run progress.
_FLUSH_SECS = 10


def summary_writer_class():
    """Returns torch's ``SummaryWriter``.

    Raises:
        MissingExtraError: If the tensorboard package is not installed (one line saying how to get it).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtraError.of("output.tensorboard: true", "the tensorboard package", "tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """Writes a run's metrics as TensorBoard events; one per training process (rank 0 only).

    Args:
        run_dir: The run folder; events go to ``run_dir/tensorboard``.
        config: The run's config (logged as text).
        resumed_from: The checkpoint's step when resuming (events after it are purged), else None.
    """

    def __init__(self, run_dir: str | Path, config: Config, resumed_from: int | None = None):
        writer_class = summary_writer_class()
        self.dir = Path(run_dir) / TENSORBOARD_DIR
        purge = None if resumed_from is None else resumed_from + 1
        self._writer = writer_class(str(self.dir), purge_step=purge, flush_secs=_FLUSH_SECS)
        self.text("config", f"```yaml\n{dump_config(config)}```", resumed_from or 0)

    def step(self, row: dict, optimizer) -> None:
        """Logs one ``metrics.jsonl`` row and the learning rate of every param group."""
        s, w = row["step"], self._writer
        w.add_scalar("train/loss", row["loss"], s)
        w.add_scalar("train/step_time_s", row["step_time_s"], s)
        if row["step_time_s"] > 0:
            w.add_scalar("train/samples_per_s", row["batch_size"] / row["step_time_s"], s)
        for name, lr in group_lrs(optimizer).items():
            w.add_scalar(f"train/lr/{name}", lr, s)

    def epoch(self, record) -> None:
        """Logs an :class:`~freezetune.training.summary.EpochRecord` at its last step, then flushes."""
        w, s = self._writer, record.step
        if record.val_loss is not None:
            w.add_scalar("val/loss", record.val_loss, s)
            w.add_scalar("val/accuracy", record.val_accuracy, s)
        w.add_scalar("epoch/train_s", record.train_s, s)
        w.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """Logs markdown text (an unfreeze or freeze event) at a step."""
        self._writer.add_text(tag, text, step)

    def hparams(self, config: Config, summary: dict) -> None:
        """Logs the flattened config as hyperparameters, with the run's final metrics.

        Works after :meth:`close`: the hyperparameters go into their own event file in the same
        folder (``summarize`` runs once the training loop has closed its writer).
        """
        from torch.utils.tensorboard.summary import hparams

        metrics = final_metrics(summary)
        exp, ssi, sei = hparams(hparam_values(config, summary), metrics)
        step = summary.get("steps") or 0
        with summary_writer_class()(str(self.dir), filename_suffix=".hparams") as w:
            for event in (exp, ssi, sei):
                w.file_writer.add_summary(event, step)
            for tag, value in metrics.items():
                w.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._writer.close()


def group_lrs(optimizer) -> dict[str, float]:
    """Each param group's learning rate, by its ``name`` (``group<i>`` for an unnamed group)."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name") or f"group{i}")
        lrs[name if name not in lrs else f"{name}#{i}"] = group["lr"]
    return lrs


def hparam_values(config: Config, summary: dict) -> dict:
    """The config as ``{dotted.key: value}`` TensorBoard accepts (numbers and strings), plus the status.

    Lists (freeze patterns, schedules) become their JSON text; ``None`` becomes ``"none"``; bools
    become ``"true"``/``"false"`` (TensorBoard would show them as 1 and 0). The run folder is left
    out: it names the run already.
    """
    values = {}
    for key, value in _flatten(config.model_dump(mode="json")).items():
        if key == "output.dir":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "none"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        values[key] = value
    values["status"] = str(summary.get("status"))
    return values


def final_metrics(summary: dict) -> dict[str, float]:
    """The run's final metrics from ``summary.json``, leaving out those it did not measure."""
    metrics = {}
    for tag, (section, key) in _FINAL_METRICS.items():
        value = (summary.get(section) or {}).get(key)
        if value is not None:
            metrics[tag] = float(value)
    return metrics


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
