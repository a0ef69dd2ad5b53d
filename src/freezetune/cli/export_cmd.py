"""``freezetune export``: a run's trainable-only checkpoint merged with its base into full weights."""

from __future__ import annotations

from pathlib import Path

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, console, print_all, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("export", cls=OneLineCommand)(export)


@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder holding checkpoint.trainable.safetensors.",
                                   show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Full weights to write (.safetensors).",
                             show_default=False),
    base: Path = typer.Option(
        None, "--base", help="Weights file the run started from (default: rebuild it from the run's "
        "config: random init from its seed, ImageNet, or its weights file).", show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Merge base weights + trainable checkpoint into full weights for model.weights=PATH.

    Refuses a base whose frozen weights differ (sha256) from the ones the run trained on.
    """
    from freezetune.export import export_run
    from freezetune.render.export import export_lines

    done = export_run(run_dir, out, base=base, overwrite=overwrite)
    print_all(console, export_lines(done))
