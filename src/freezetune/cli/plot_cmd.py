"""``freezetune plot``: loss, learning rate, validation accuracy and step time of runs, overlaid, as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, console, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("plot", cls=OneLineCommand)(plot)


@user_errors
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders (each with metrics.jsonl).", show_default=False),
    out: Path = typer.Option(None, "--out", "-o", help="PNG to write \\[default: training.png in the run folder, "
                             "or in the runs' common parent folder for several].", show_default=False),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Plot training curves over steps: loss, learning rate, validation accuracy, step time.

    Several runs are overlaid, one colour each, labelled by their folder names. Works on a run
    that is still training (it plots the steps logged so far).
    """
    from rich.markup import escape

    from freezetune.render.run_plot import read_run, run_labels, training_plot

    dirs = list(dict.fromkeys(Path(d) for d in run_dirs))  # a folder given twice is drawn once
    target = _target(out, dirs)
    runs = [read_run(d) for d in dirs]
    labels = run_labels(dirs)
    training_plot(runs, labels, target)
    steps = ", ".join(f"{escape(lab)} ({r['step'][-1]} steps)" for lab, r in zip(labels, runs, strict=True))
    console.print(f"wrote {escape(str(target))}: {steps}", soft_wrap=True)


def _target(out: Path | None, dirs: list[Path]) -> Path:
    from freezetune.errors import RunDirError
    from freezetune.render.run_plot import PLOT_NAME

    if out is None:
        parent = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
        return parent / PLOT_NAME
    if out.suffix.lower() != ".png":
        raise RunDirError(f"--out {out}: must end with .png")
    if out.is_dir():
        raise RunDirError(f"--out {out}: is a folder; give a file name ending with .png")
    if not out.parent.is_dir():
        raise RunDirError(f"--out {out}: folder {out.parent} does not exist")
    return out
