"""``freezetune compare frozen-vs-full`` and ``freezetune compare depths``."""

from __future__ import annotations

from pathlib import Path

import typer

from freezetune.cli.common import (
    CONFIG_OPTION,
    DEBUG_OPTION,
    OVERRIDES_ARG,
    OneLineCommand,
    OneLineGroup,
    console,
    err_console,
    print_all,
    user_errors,
)

compare_app = typer.Typer(
    cls=OneLineGroup,
    help="Measure what freezing buys: arms trained side by side from the same weights and batches, "
    "timed fairly (warm-up excluded, synchronized, interleaved), with FLOP predictions beside.",
    no_args_is_help=True,
)

STEPS_OPTION = typer.Option(20, "--steps", min=1, help="Timed training steps per arm.")
WARMUP_OPTION = typer.Option(
    None, "--warmup", min=0, help="Untimed steps per arm first \\[default: train.warmup_steps].", show_default=False
)
BLOCK_OPTION = typer.Option(
    None, "--block", min=1, help="Steps per turn when arms take turns \\[default: steps/4, at most 10].",
    show_default=False,
)
DEVICE_OPTION = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N \\[default: the config's].",
                             show_default=False)
MODES_OPTION = typer.Option(
    "plain,optimized,cached", "--modes",
    help="How to run each frozen spec, comma-separated: plain (requires_grad=False loop: BatchNorm in train "
    "mode, no fast path, every parameter to SGD), optimized (freezetune's path), cached (optimized with "
    "the feature cache filled; left out with the reason where it would not be correct).",
)
NO_MEMORY_OPTION = typer.Option(
    False, "--no-memory",
    help="Skip the memory pass (each arm a few steps in its own process): faster, but peak memory is not measured.",
)


def register(app: typer.Typer) -> None:
    """Adds the ``compare`` command group to the app."""
    compare_app.command("frozen-vs-full", cls=OneLineCommand)(frozen_vs_full)
    compare_app.command("depths", cls=OneLineCommand)(depths)
    app.add_typer(compare_app, name="compare")


@user_errors
def frozen_vs_full(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    out: Path = typer.Option(None, "--out", help="Output folder \\[default: <output.dir>/compare].",
                             show_default=False),
    device: str = DEVICE_OPTION,
    block: int = BLOCK_OPTION,
    no_memory: bool = NO_MEMORY_OPTION,
    modes: str = MODES_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train the config's freeze spec against full fine-tuning and show what freezing buys.

    The frozen spec runs in every mode of --modes (frozen:plain, frozen, frozen:cached). Writes
    compare.json, compare.csv and compare.png.
    """
    from freezetune import compare
    from freezetune.render.compare import arms_table, headline

    cfg = _config(config, overrides, device)
    chosen = _modes(modes)
    with _progress(len(compare.frozen_vs_full_arms(cfg, chosen)), steps, warmup, cfg) as report:
        result = compare.frozen_vs_full(cfg, out, steps, warmup, block, not no_memory, report, chosen)
    _print_notice(result)
    console.print(arms_table(result, "frozen vs full"))
    print_all(console, headline(result))
    _exit_on_problems(result)


@user_errors
def depths(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    out: Path = typer.Option(None, "--out", help="Output folder \\[default: <output.dir>/depths].",
                             show_default=False),
    device: str = DEVICE_OPTION,
    block: int = BLOCK_OPTION,
    no_memory: bool = NO_MEMORY_OPTION,
    modes: str = MODES_OPTION,
    points: str = typer.Option(
        None, "--points", show_default=False,
        help="Freeze points to sweep, comma-separated: stages or ResNet blocks (layer1,layer2.0,layer3), or "
        "blocks for every block \\[default: the model's stages]."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Sweep the freeze point: full, then frozen through stem, layer1 ... layer4 (fc only).

    Each freeze point runs in every mode of --modes. --points blocks sweeps a ResNet block by block
    (layer1.0 ... layer4.1). The config's freeze selectors are ignored (its batchnorm policy
    applies). Writes depths.json, depths.csv and depths.png.
    """
    from freezetune import compare
    from freezetune.render.compare import depths_table, files_line

    cfg = _config(config, overrides, device)
    chosen = _modes(modes)
    where = None if points is None else tuple(p.strip() for p in points.split(",") if p.strip())
    with _progress(len(compare.depth_arms(cfg, where, modes=chosen)), steps, warmup, cfg) as report:
        result = compare.depths(cfg, out, steps, warmup, block, not no_memory, report, chosen, where)
    _print_notice(result)
    console.print(depths_table(result, compare.by_depth(result["arms"])))
    console.print(files_line(result))
    _exit_on_problems(result)


def _modes(text: str) -> tuple[str, ...]:
    from freezetune.compare.arms import check_modes

    return check_modes(m.strip() for m in text.split(",") if m.strip())


def _exit_on_problems(result: dict) -> None:
    problems = [k for k in ("same_initial_weights", "same_batches", "same_steps") if not result["fairness"][k]]
    if not result["freeze_integrity"]["ok"]:
        problems.append("frozen tensors changed during training")
    if problems:
        from freezetune.render.compare import problems_line

        err_console.print(problems_line(problems))
        raise typer.Exit(1)


def _config(path: Path, overrides: list[str] | None, device: str | None):
    from freezetune.config import load_config

    extra = [f"device={device}"] if device else []
    return load_config(path, [*(overrides or []), *extra])


def _print_notice(result: dict) -> None:
    from freezetune.render.compare import notice_line

    line = notice_line(result)
    if line:
        err_console.print(line)


def _progress(n_arms: int, steps: int, warmup: int | None, cfg):
    """A progress bar over every arm's steps (warm-up included), advanced after each turn."""
    from freezetune.render.compare import ArmsProgress

    per_arm = steps + (cfg.train.warmup_steps if warmup is None else warmup)
    return ArmsProgress(console, n_arms, per_arm)
