"""The ``freezetune`` command line.

Commands only parse arguments and print; the work is done by the library modules, so that
everything here is also usable from Python.
"""

from __future__ import annotations

import typer

from freezetune import __version__
from freezetune.cli import (
    bench_cmd,
    compare_cmd,
    demo_cmd,
    evaluate_cmd,
    export_cmd,
    inspect_cmd,
    models_cmd,
    plot_cmd,
    sweep_cmd,
    train_cmd,
)
from freezetune.cli.common import OneLineGroup

app = typer.Typer(
    cls=OneLineGroup,
    name="freezetune",
    help="Fine-tune a pretrained torchvision ResNet with chosen layers frozen, and measure "
    "what freezing buys: trainable parameters, step time, memory and accuracy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freezetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """freezetune: measured fine-tuning with frozen layers."""


train_cmd.register(app)
inspect_cmd.register(app)
demo_cmd.register(app)
compare_cmd.register(app)
sweep_cmd.register(app)
export_cmd.register(app)
evaluate_cmd.register(app)
plot_cmd.register(app)
models_cmd.register(app)
bench_cmd.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; exits with the command's exit code.

    Args:
        argv: The arguments, e.g. ``["bench", "--ci"]``; default ``sys.argv[1:]``.
    """
    app(args=argv, prog_name=None if argv is None else "freezetune")
