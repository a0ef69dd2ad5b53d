"""``freezetune train`` and ``freezetune validate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.syntax import Syntax

from freezetune.cli.common import (
    CONFIG_OPTION,
    DEBUG_OPTION,
    OVERRIDES_ARG,
    OneLineCommand,
    console,
    err_console,
    user_errors,
)
from freezetune.config import dump_config, load_config


def register(app: typer.Typer) -> None:
    """Adds the commands to the app."""
    app.command("train", cls=OneLineCommand)(train)
    app.command("validate", cls=OneLineCommand)(validate)


@user_errors
def train(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML config file (not needed with --resume).", show_default=False
    ),
    resume: Path = typer.Option(
        None, "--resume", help="Continue the run in this folder from its last checkpoint, "
        "with its own config.yaml (overrides may change train.* and device only).",
        show_default=False,
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Fine-tune one model with the config's layers frozen, measuring every step.

    Writes config.yaml, metrics.jsonl, summary.json and checkpoint.pt to output.dir.
    """
    from freezetune.errors import ConfigError
    from freezetune.render.console import ConsoleReporter, summary_table
    from freezetune.training.recipe import run
    from freezetune.training.resume import resume_config

    if resume is not None:
        if config is not None:
            raise ConfigError("give either --config or --resume, not both (a resumed run uses its own config)")
        cfg = resume_config(resume, overrides or [])
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(resume)})})
    elif config is None:
        raise ConfigError("missing --config PATH (or --resume RUN_DIR)")
    else:
        cfg = load_config(config, overrides or [])
    summary = run(cfg, ConsoleReporter(console), resume=resume is not None)
    if summary.get("rank", 0) != 0:
        return  # under torchrun, rank 0 prints and writes the run folder
    console.print(summary_table(summary))
    if summary["status"] == "interrupted":
        folder = summary["run_dir"]
        err_console.print(f"interrupted: checkpoint saved; resume with: freezetune train --resume {folder}")
        raise typer.Exit(130)


@user_errors
def validate(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Check a config (and overrides), including its freeze patterns, and print the resolved config."""
    cfg = load_config(config, overrides or [])  # before torch is imported: a bad file is refused at once
    from freezetune.freezing.params import count_params, trainable_line
    from freezetune.freezing.plan import preview

    model, _ = preview(cfg.model, cfg.freeze, cfg.adapt)
    console.print(Syntax(dump_config(cfg), "yaml", theme="ansi_dark", background_color="default"))
    console.print(trainable_line(count_params(model)))
    console.print(f"[green]ok[/]: {config} is valid")
