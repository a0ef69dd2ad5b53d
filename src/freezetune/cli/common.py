"""What every command shares: consoles, the --debug flag and turning user errors into exit 2."""

from __future__ import annotations

import contextlib
import functools

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

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
    """The text as one safe line: rich markup escaped, and control characters (which may break a line) written out."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def print_all(target: Console, parts: list) -> None:
    """Prints each part (a rich renderable or a console-markup string) with its own ``print``, in order."""
    for part in parts:
        target.print(part)


# typer re-exports BadParameter from the click it runs on (its own vendored copy since 0.2x); the
# base class of every usage error is found through it rather than through a private module.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineCommand(TyperCommand):
    """A command whose usage errors (bad option value, missing or unknown option) are one line, exit 2.

    Typer prints the usage, a hint and a boxed message over six lines; ``--depth abc`` needs one
    line naming the option, what is wrong and what was given. ``--debug`` keeps Typer's output.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Parses as Typer does, printing a usage error as one line."""
        with one_line_usage_errors(args):
            return super().parse_args(ctx, args)


class OneLineGroup(TyperGroup):
    """A command group whose usage errors (``No such command``, bad options) are one line, exit 2."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Parses as Typer does, printing a usage error as one line."""
        with one_line_usage_errors(args):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args: list[str]):
        """Finds the subcommand as Typer does, printing an unknown one as one line."""
        with one_line_usage_errors(args):
            return super().resolve_command(ctx, args)


@contextlib.contextmanager
def one_line_usage_errors(args: list[str]):
    """Turns a usage error raised inside into one ``error:`` line on stderr and its exit code (2).

    Args:
        args: The command's arguments as given: they hold the rejected value and ``--debug``.
    """
    args = list(args)  # the parser consumes the list it is given
    try:
        yield
    except _UsageError as e:
        # A bare group (``freezetune demo``) shows its help, as Typer does; --debug shows everything.
        if type(e).__name__ == "NoArgsIsHelpError" or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {_escape(usage_line(e, args))}", markup=True, highlight=False)
        raise typer.Exit(e.exit_code) from None


def usage_line(e: Exception, args: list[str]) -> str:
    """One line for a usage error: Typer's message, the value given, and where the help is."""
    text = " ".join(e.format_message().split()).rstrip(".")
    param = getattr(e, "param", None)
    opts = getattr(param, "opts", None) or []
    if type(e).__name__ == "BadParameter" and opts and not getattr(param, "multiple", False):
        given = _given(opts, args)
        if given is not None:
            text += f" (got {given!r})"
    ctx = getattr(e, "ctx", None)
    return f"{text}; see {ctx.command_path} --help" if ctx is not None else text


def _given(opts: list[str], args: list[str]) -> str | None:
    """The value given for an option (its last occurrence, which is the one used), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg in opts and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--") and arg.partition("=")[0] in opts:
            value = arg.partition("=")[2]
    return value
