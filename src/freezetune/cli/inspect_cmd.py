"""``freezetune inspect``: what the config's freeze plan does, without training."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from freezetune.cli.common import (
    CONFIG_OPTION,
    DEBUG_OPTION,
    OVERRIDES_ARG,
    OneLineCommand,
    console,
    user_errors,
)
from freezetune.config import load_config


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("inspect", cls=OneLineCommand)(inspect)


@user_errors
def inspect(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    depth: int = typer.Option(2, "--depth", min=1, help="Module levels to list (1: top-level only)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Show what freezing does to one training step, without training or downloading.

    Module tree: trainable, parameters, forward FLOPs, BatchNorm mode, reached by backward.

    One step, freeze plan vs all trainable: FLOPs, activations saved for backward, graph nodes.
    """
    from freezetune.inspection import inspect_config
    from freezetune.render.inspection import render

    report = inspect_config(load_config(config, overrides or []), depth=depth)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    console.print(render(report.to_dict()))
