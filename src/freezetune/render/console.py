"""Rich rendering of training runs: parameter tables, the progress bar, and the final summary.

Numbers are formatted by :mod:`freezetune.render.format`.
"""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from freezetune.freezing.params import trainable_line
from freezetune.render.format import fmt_bytes, fmt_int, fmt_rate, fmt_seconds
from freezetune.training.recipe import Recipe, Reporter


def params_table(counts: dict, title: str = "Parameters by module") -> Table:
    """A table of total / trainable / frozen parameters per top-level module."""
    table = Table(title=title, title_justify="left")
    table.add_column("module")
    for col in ("total", "trainable", "frozen"):
        table.add_column(col, justify="right")
    table.add_column("state")
    for name, row in counts["by_module"].items():
        state = "trainable" if not row["frozen"] else "frozen" if not row["trainable"] else "partial"
        style = {"trainable": "green", "frozen": "cyan", "partial": "yellow"}[state]
        table.add_row(name, fmt_int(row["total"]), fmt_int(row["trainable"]), fmt_int(row["frozen"]),
                      f"[{style}]{state}[/]")
    table.add_section()
    table.add_row("total", fmt_int(counts["total"]), fmt_int(counts["trainable"]), fmt_int(counts["frozen"]), "")
    return table


def summary_table(summary: dict) -> Table:
    """The end-of-run table: timing, memory, loss, accuracy and freeze integrity."""
    t, integ = summary["timing"], summary["freeze_integrity"]
    table = Table(title="Run summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("status", summary["status"])
    table.add_row("device", summary["device"])
    table.add_row("weights", summary["weights"]["source"])
    table.add_row("steps", f"{summary['steps']} ({t['steps_timed']} timed after warm-up)")
    table.add_row("step time median", fmt_seconds(t["step_median_s"]))
    table.add_row("step time p10 / p90", f"{fmt_seconds(t['step_p10_s'])} / {fmt_seconds(t['step_p90_s'])}")
    table.add_row("samples/s, steps", fmt_rate(t["samples_per_s"]))
    feed = summary.get("data")
    if feed is not None:
        table.add_row("samples/s, end to end", fmt_rate(feed["end_to_end_samples_per_s"]))
        share = "" if feed["wait_share"] is None else f" ({feed['wait_share']:.0%})"
        bound = " [yellow]input-bound[/]" if feed["input_bound"] else ""
        table.add_row("waiting for data", f"{fmt_seconds(feed['wait_s'])} of {fmt_seconds(feed['train_s'])}"
                                          f"{share}{bound}")
    table.add_row("peak memory", f"{fmt_bytes(summary['memory']['peak_bytes'])} ({summary['memory']['kind']})")
    table.add_row("optimizer state", fmt_bytes(summary["optimizer_state_bytes"]))
    loss = summary["loss"]
    if loss["first"] is not None:
        table.add_row("loss first -> last", f"{loss['first']:.4f} -> {loss['last']:.4f}")
    acc = summary["val"]["accuracy"]
    table.add_row("val accuracy", f"{acc:.3f}" if acc is not None else "- (no validation set)")
    ok = "[green]OK[/]" if integ["ok"] else f"[red]CHANGED: {', '.join(integ['changed'][:3])}[/]"
    table.add_row("freeze integrity", f"{ok} ({integ['tensors_checked']} frozen tensors, sha256)")
    table.add_row("run folder", summary["run_dir"])
    return table


class ConsoleReporter(Reporter):
    """Prints a run to a rich console: setup tables, a progress bar, validation lines."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task = None
        self._log_every = 10

    def setup_done(self, run: Recipe) -> None:
        """Prints device, weights, the parameter table and the trainable line."""
        c = self.console
        self._log_every = run.config.train.log_every
        c.print(f"[bold]freezetune[/] {run.config.model.name} on {run.device}  run folder: {run.run_dir}")
        if run.loaded.notice:
            c.print(Panel(run.loaded.notice, title="NOTICE: random init", border_style="red"))
        else:
            c.print(f"weights: {run.loaded.weights_source}")
        if run.progress.resumed_from_step is not None:
            c.print(f"resuming from step {run.progress.resumed_from_step}")
        c.print(params_table(run.freeze.initial_params))
        c.print(trainable_line(run.freeze.initial_params))
        bn = run.plan.frozen_bn
        c.print(f"batchnorm: {run.plan.batchnorm} ({len(bn)} BatchNorm layers kept in eval mode)")
        if run.plan.adapt != "none":
            c.print(f"adapt.method: {run.plan.adapt} (every other pretrained weight frozen; the head trains)")

    def train_start(self, total_steps: int, start_step: int) -> None:
        """Starts the progress bar."""
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                             loss="-", sps="-")
        self._progress.start()

    def step(self, record: dict) -> None:
        """Advances the bar; logs a line every ``train.log_every`` steps."""
        sps = record["batch_size"] / record["step_time_s"] if record["step_time_s"] > 0 else 0.0
        self._progress.update(self._task, completed=record["step"], loss=f"{record['loss']:.4f}",
                              sps=f"{sps:.0f}")
        if record["step"] % self._log_every == 0:
            self.console.log(f"step {record['step']} epoch {record['epoch']} loss {record['loss']:.4f} "
                             f"{fmt_seconds(record['step_time_s'])}/step")

    def validation(self, epoch: int, result: dict) -> None:
        """Prints one validation line."""
        self.console.log(f"epoch {epoch} validation: loss {result['loss']:.4f} "
                         f"accuracy {result['accuracy']:.3f} ({result['samples']} samples)")

    def message(self, text: str) -> None:
        """Prints a free-form line."""
        self.console.print(text)

    def train_end(self) -> None:
        """Stops the progress bar."""
        if self._progress is not None:
            self._progress.stop()
