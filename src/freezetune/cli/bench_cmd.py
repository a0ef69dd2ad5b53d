"""``freezetune bench``: the freeze-depth sweep over image and batch sizes on this device, and the CI gate.

The work is done by :mod:`freezetune.compare.bench` and the lines are made by
:mod:`freezetune.render.bench`; this module parses options and prints.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, user_errors

# Where BenchCommand keeps the arguments as given, for the command recorded in the benchmark files.
_ARGS_KEY = "freezetune.bench.args"
_LISTS = "repeat the option or separate values with commas"

# Help texts name the benchmark's defaults and thresholds ({...}), read from freezetune.compare.bench
# only when the help is shown: importing it (torch, torchvision) at start-up would slow every command.
CI_HELP = (
    "CI mode: sizes {CI_SIZES}, batch sizes {CI_BATCH_SIZES}, {CI_STEPS} steps; exit 1 if on CPU the fc-only "
    "measured speedup is below {MIN_SPEEDUP}x or below {MIN_FRACTION_OF_PREDICTED} x the FLOP-predicted one or "
    "freezetune's path is slower than the plain loop (geometric mean over depths, or any depth below "
    "{MIN_VS_PLAIN}x), or if cached losses leave the uncached ones or any frozen tensor changed"
)


class BenchCommand(OneLineCommand):
    """``freezetune bench``: fills in the help's ``{...}`` when shown, and keeps the arguments as given."""

    def format_help(self, ctx, formatter) -> None:
        """Fills in the option help texts, then formats the help as Typer does."""
        values = _help_values()
        for param in self.params:
            if param.help and "{" in param.help:
                param.help = param.help.format(**values)
        super().format_help(ctx, formatter)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Keeps the arguments as given in ``ctx.meta``, then parses them as Typer does."""
        ctx.meta[_ARGS_KEY] = list(args)
        return super().parse_args(ctx, args)


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    # Extra arguments are let through to say what to write instead (the script took `--sizes 64 224`).
    app.command("bench", cls=BenchCommand, context_settings={"allow_extra_args": True})(bench)


@user_errors
def bench(
    ctx: typer.Context,
    ci: bool = typer.Option(False, "--ci", help=CI_HELP),
    sizes: list[str] = typer.Option(
        None, "--sizes", metavar="SIZE", show_default=False,
        help=f"image sizes ({_LISTS}: --sizes 64,224) \\[default: {{DEFAULT_SIZES}}]",
    ),
    batch_sizes: list[str] = typer.Option(
        None, "--batch-sizes", metavar="BATCH", show_default=False,
        help=f"batch sizes ({_LISTS}) \\[default: {{DEFAULT_BATCH_SIZES}}]",
    ),
    steps: int = typer.Option(None, "--steps", show_default=False,
                              help="timed steps per arm \\[default: {DEFAULT_STEPS}]"),
    warmup: int = typer.Option(None, "--warmup", show_default=False,
                               help="warm-up steps per arm \\[default: {DEFAULT_WARMUP}]"),
    depths: list[str] = typer.Option(
        None, "--depths", metavar="STAGE", show_default=False,
        help=f"freeze points to sweep besides full ({_LISTS}) \\[default: all: {{DEPTHS}}]",
    ),
    modes: list[str] = typer.Option(
        None, "--modes", metavar="MODE", show_default=False,
        help=f"how each freeze point runs ({_LISTS}) \\[default: all: {{MODES}}]",
    ),
    block: int = typer.Option(None, "--block", show_default=False, help="steps per turn when arms take turns"),
    device: str = typer.Option("auto", "--device", show_default=False,
                               help="auto, cpu, cuda or cuda:N \\[default: auto]"),
    no_memory: bool = typer.Option(False, "--no-memory",
                                   help="skip the memory pass (each arm in its own process); implied by --ci"),
    out: Path = typer.Option(
        None, "--out", show_default=False,
        help="output folder, relative to the current directory \\[default: benchmarks/, or runs/bench-ci/ with --ci]",
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Benchmark what freezing buys on this device: the depth sweep over image and batch sizes.

    Writes benchmarks/<device>-torch<version>.json and .md (the table, and the command that made
    it). With --ci: a small matrix, and exit 1 if fc-only freezing does not pay.

    List options take several values: --sizes 64 --sizes 224, or --sizes 64,224.
    """
    from freezetune.compare import bench as b
    from freezetune.errors import ConfigError
    from freezetune.render.bench import cell_line, gate_failed_lines, gate_passed_line, wrote_line

    if ctx.args:
        raise ConfigError(f"unexpected argument(s) {' '.join(ctx.args)}: give a list option several values by "
                          "repeating it (--sizes 64 --sizes 224) or with commas (--sizes 64,224)")
    size_list = _ints(sizes, "--sizes") or (b.CI_SIZES if ci else b.DEFAULT_SIZES)
    batch_list = _ints(batch_sizes, "--batch-sizes") or (b.CI_BATCH_SIZES if ci else b.DEFAULT_BATCH_SIZES)
    # `is None`, not `or`: --steps 0 is a mistake to report, not a request for the default.
    steps = steps if steps is not None else (b.CI_STEPS if ci else b.DEFAULT_STEPS)
    warmup = warmup if warmup is not None else (b.CI_WARMUP if ci else b.DEFAULT_WARMUP)
    out = out or Path("runs/bench-ci" if ci else "benchmarks")
    for name, values in (("--sizes", size_list), ("--batch-sizes", batch_list)):
        if any(v < 1 for v in values):
            raise ConfigError(f"{name} must be positive")
    if steps < 1 or warmup < 0:
        raise ConfigError("--steps must be at least 1 and --warmup at least 0")
    if block is not None and block < 1:
        raise ConfigError(f"--block {block}: must be at least 1")
    _check_device(device)
    _check_out(out)  # before the benchmark's minutes, not after them
    command = ("freezetune bench " + shlex.join(ctx.meta.get(_ARGS_KEY, []))).strip()

    def on_cell(cell: dict) -> None:
        typer.echo(cell_line(cell, b.GATE_ARM), err=True)

    result = b.run_bench(size_list, batch_list, steps, warmup, device, block, not (no_memory or ci), on_cell,
                         tuple(_split(depths)) or tuple(b.DEPTHS), tuple(_split(modes)) or tuple(b.MODES))
    json_path, md_path = b.write_bench(result, out, command)
    typer.echo(b.markdown_table(result))
    typer.echo(wrote_line(json_path, md_path, result["wall_s"]))
    if ci:
        failures = b.gate(result)
        for line in gate_failed_lines(failures):
            typer.echo(line, err=True)
        if failures:
            raise typer.Exit(1)
        typer.echo(gate_passed_line(b.MIN_SPEEDUP, b.MIN_FRACTION_OF_PREDICTED, b.MIN_VS_PLAIN,
                                    b.MAX_CACHED_LOSS_DIFF))


def _split(values: list[str] | None) -> list[str]:
    """The values of a list option: each occurrence, split on commas (``--sizes 64,224 --sizes 32``)."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _ints(values: list[str] | None, option: str) -> tuple[int, ...]:
    from freezetune.errors import ConfigError

    if values and not _split(values):
        raise ConfigError(f"{option} {values[0]!r}: no values given")
    ints = []
    for text in _split(values):
        try:
            ints.append(int(text))
        except ValueError:
            raise ConfigError(f"{option}: invalid int value: {text!r}") from None
    return tuple(ints)


def _check_device(device: str) -> None:
    """Refuses a device name the config would refuse (``gpu``, ``cuda:x``), before torch sees it."""
    from pydantic import ValidationError

    from freezetune.config import Config
    from freezetune.errors import ConfigError

    try:
        Config.model_validate({"device": device})
    except ValidationError:
        raise ConfigError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N") from None


def _check_out(out: Path) -> None:
    """Refuses an --out folder that could not be created or written."""
    import tempfile

    from freezetune.errors import ConfigError

    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == out else f"{existing} is a file, not a folder"
        raise ConfigError(f"--out {out}: {what}")
    try:
        # A real write, not os.access: root passes every permission check, not /proc or a read-only mount.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


def _help_values() -> dict:
    from freezetune.compare import bench as b

    def spaced(values) -> str:
        return " ".join(str(v) for v in values)

    return {
        "CI_SIZES": b.CI_SIZES, "CI_BATCH_SIZES": b.CI_BATCH_SIZES, "CI_STEPS": b.CI_STEPS,
        "MIN_SPEEDUP": b.MIN_SPEEDUP, "MIN_FRACTION_OF_PREDICTED": b.MIN_FRACTION_OF_PREDICTED,
        "MIN_VS_PLAIN": b.MIN_VS_PLAIN, "DEFAULT_STEPS": b.DEFAULT_STEPS, "DEFAULT_WARMUP": b.DEFAULT_WARMUP,
        "DEFAULT_SIZES": spaced(b.DEFAULT_SIZES), "DEFAULT_BATCH_SIZES": spaced(b.DEFAULT_BATCH_SIZES),
        "DEPTHS": spaced(b.DEPTHS), "MODES": spaced(b.MODES),
    }
