"""``freezetune evaluate``: a run's model on its own split or an ImageFolder: top-1/top-5, per class, confusion."""

from __future__ import annotations

from pathlib import Path

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, console, err_console, print_all, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("evaluate", cls=OneLineCommand)(evaluate)


@user_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder (output.dir of freezetune train).", show_default=False),
    data: str = typer.Option(
        None, "--data", help="val or train (the run's own split, as it was built), or an ImageFolder with the "
        "run's classes: a root holding train/ and val/ (its val/ is used) or a folder of class folders "
        "\\[default: val].", show_default=False,
    ),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="Weights to evaluate: a checkpoint.pt, a trainable-only or exported "
        ".safetensors, or a .pth state dict \\[default: the run's checkpoint.pt, else its trainable "
        "checkpoint].", show_default=False,
    ),
    out: Path = typer.Option(None, "--out", help="Folder for eval.json and confusion.png \\[default: RUN_DIR].",
                             show_default=False),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N \\[default: the run's].",
                               show_default=False),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="\\[default: the run's data.batch_size].",
                                   show_default=False),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Evaluate a trained run: top-1/top-5 accuracy, per-class accuracy and loss, a confusion matrix.

    Runs the model as the run's own validation did (eval mode, its precision and batch size), so
    on its val split the accuracy equals summary.json's. Writes eval.json and confusion.png.
    """
    from freezetune import evaluation
    from freezetune.render.evaluation import eval_table, files_line, notes_lines, per_class_table

    target = evaluation.check_out(out) if out is not None else run_dir  # a bad --out fails before the pass
    with _Progress() as progress:
        result = evaluation.evaluate_run(run_dir, data, checkpoint, device, batch_size, progress)
    paths = evaluation.save_evaluation(result, target)
    record = result.model_dump()
    print_all(err_console, notes_lines(record))
    print_all(console, [eval_table(record), per_class_table(record), files_line(paths)])


class _Progress:
    """A transient progress bar over the samples, on stderr (stdout keeps only the results)."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=err_console, transient=True)
        self._task = None
        self._bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task("evaluate", total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc) -> None:
        self._bar.stop()
