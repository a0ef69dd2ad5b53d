"""What every command shares: consoles, the --debug flag and turning user errors into exit 2."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from freezetune.errors import ConfigError, FreezetuneError

console = Console(log_path=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

DEBUG_OPTION = typer.Option(False, "--debug", help="Show the full traceback on errors.")
CONFIG_OPTION = typer.Option(..., "--config", "-c", help="YAML config file.", show_default=False)
OVERRIDES_ARG = typer.Argument(
    None, help="Config overrides as dotted.key=value, e.g. optim.lr=0.05 train.max_steps=5.",
    show_default=False,
)


def user_errors(func):
    """Runs a command, printing freezetune errors as one line each on stderr with exit code 2.

    The wrapped command must take a ``debug`` keyword; with ``--debug`` the traceback is shown.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FreezetuneError as e:
            if kwargs.get("debug"):
                raise
            for line in error_lines(e):
                err_console.print(f"[bold red]error:[/] {line}", markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def error_lines(e: FreezetuneError) -> list[str]:
    """The lines to print for an error: one per config problem, otherwise one."""
    if isinstance(e, ConfigError):
        return [_escape(p) for p in e.problems]
    text = str(e)
    # Errors raised in DataLoader workers arrive wrapped with the worker's traceback; the
    # original message is on the last line ("freezetune.errors.DataError: ...").
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return [_escape(text.strip().splitlines()[0] if text.strip() else type(e).__name__)]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_all(target: Console, parts: list) -> None:
    """Prints each part (a rich renderable or a console-markup string) with its own ``print``, in order."""
    for part in parts:
        target.print(part)
