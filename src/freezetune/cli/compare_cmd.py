"""``freezetune compare frozen-vs-full`` and ``freezetune compare depths``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from freezetune.cli.common import CONFIG_OPTION, DEBUG_OPTION, OVERRIDES_ARG, console, err_console, user_errors

compare_app = typer.Typer(
    help="Measure what freezing buys: arms trained side by side from the same weights and batches, "
    "timed fairly (warm-up excluded, synchronized, interleaved), with FLOP predictions beside.",
    no_args_is_help=True,
)

STEPS_OPTION = typer.Option(20, "--steps", min=1, help="Timed training steps per arm.")
WARMUP_OPTION = typer.Option(
    None, "--warmup", min=0, help="Untimed steps per arm first [default: train.warmup_steps].", show_default=False
)
BLOCK_OPTION = typer.Option(
    None, "--block", min=1, help="Steps per turn when arms take turns [default: steps/4, at most 10].",
    show_default=False,
)
DEVICE_OPTION = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N [default: the config's].",
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
    compare_app.command("frozen-vs-full")(frozen_vs_full)
    compare_app.command("depths")(depths)
    app.add_typer(compare_app, name="compare")


@user_errors
def frozen_vs_full(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    out: Path = typer.Option(None, "--out", help="Output folder [default: <output.dir>/compare].",
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
    from freezetune.compare import run as compare

    cfg = _config(config, overrides, device)
    chosen = _modes(modes)
    with _progress(len(compare.frozen_vs_full_arms(cfg, chosen)), steps, warmup, cfg) as report:
        result = compare.frozen_vs_full(cfg, out, steps, warmup, block, not no_memory, report, chosen)
    _print_notice(result)
    console.print(arms_table(result, "frozen vs full"))
    _print_headline(result)
    _exit_on_problems(result)


@user_errors
def depths(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    out: Path = typer.Option(None, "--out", help="Output folder [default: <output.dir>/depths].",
                             show_default=False),
    device: str = DEVICE_OPTION,
    block: int = BLOCK_OPTION,
    no_memory: bool = NO_MEMORY_OPTION,
    modes: str = MODES_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Sweep the freeze point: full, then frozen through stem, layer1 ... layer4 (fc only).

    Each freeze point runs in every mode of --modes. The config's freeze selectors are ignored (its
    batchnorm policy applies). Writes depths.json, depths.csv and depths.png.
    """
    from freezetune.compare import run as compare

    cfg = _config(config, overrides, device)
    chosen = _modes(modes)
    with _progress(len(compare.depth_arms(cfg, modes=chosen)), steps, warmup, cfg) as report:
        result = compare.depths(cfg, out, steps, warmup, block, not no_memory, report, chosen)
    _print_notice(result)
    console.print(depths_table(result))
    console.print(f"files: {result['files']['json']}, .csv, .png")
    _exit_on_problems(result)


def arms_table(result: dict, title: str) -> Table:
    """One column per arm, one row per figure: parameters, FLOPs, speedups, time, memory, loss.

    Row names and cells are kept short so that full and three frozen modes fit 80 columns.
    """
    from rich import box

    from freezetune.render.console import fmt_bytes, fmt_seconds
    from freezetune.render.plot import share_text

    d, arms = result["data"], result["arms"]
    table = Table(title=f"{result['model']} {title} | {result['device']} | {d['image_size']}px, batch "
                  f"{d['batch_size']} | {result['steps']['timed']} timed steps/arm (+{result['steps']['warmup']} "
                  f"warm-up) | torch {result['versions']['torch']}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("", no_wrap=True)
    for name in arms:
        table.add_column(name, justify="right")

    def row(what: str, fmt) -> None:
        table.add_row(what, *(fmt(a) for a in arms.values()))

    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.1f}"

    row("freeze", lambda a: a["label"])
    row("mode", lambda a: a.get("mode", "-"))
    row("trainable", lambda a: f"{_count(a['params']['trainable'])} {share_text(a['trainable_share'])}")
    row("GFLOPs fwd+bwd", lambda a: f"{a['flops']['forward'] / 1e9:.2f}+{a['flops']['backward'] / 1e9:.2f}")
    row("FLOP-predicted", lambda a: _x(a["speedup"]["flop_predicted"]))
    row("measured", lambda a: f"[bold]{_x(a['speedup']['measured'])}[/]")
    row("vs plain", lambda a: _x(a["speedup"].get("vs_plain")))
    row("step median", lambda a: fmt_seconds(a["timing"]["step_median_s"]))
    row("p10-p90 ms", lambda a: f"{ms(a['timing']['step_p10_s'])}-{ms(a['timing']['step_p90_s'])}")
    row("samples/s", lambda a: f"{a['timing']['samples_per_s']:.1f}" if a["timing"]["samples_per_s"] else "-")
    row("peak memory", lambda a: fmt_bytes(a["memory"]["peak_bytes"]))
    row("optimizer state", lambda a: fmt_bytes(a["optimizer_state_bytes"]))
    row("loss 1st->last", lambda a: f"{a['loss']['first']:.3f}->{a['loss']['last']:.3f}")
    row("frozen intact", lambda a: ("[green]OK[/]" if a["freeze_integrity"]["ok"] else "[red]CHANGED[/]")
        + f" ({a['freeze_integrity']['tensors_checked']})")
    row("BN stats moved", lambda a: f"{a['frozen_batchnorm_drift']['layers_changed']} layers"
        if "frozen_batchnorm_drift" in a else "-")
    row("cache fill", lambda a: fmt_seconds(a["cache"]["cache_fill_s"]) if a.get("cache") else "-")
    kind = next(iter(arms.values()))["memory"]["kind"]
    skipped = "; ".join(f"{s['arm']}: {s['reason']}" for s in result.get("skipped", []))
    table.caption = (f"speedups over full; vs plain: over the plain requires_grad=False loop; BN stats moved: "
                     f"frozen layers whose BatchNorm statistics changed; peak memory: {kind}"
                     + (f"; left out: {skipped}" if skipped else ""))
    table.caption_justify = "left"
    return table


def depths_table(result: dict) -> Table:
    """One row per freeze point: plain vs freezetune vs freezetune + cache, as speedups over full.

    Narrow enough for an 80-column terminal; step times and everything else are in depths.json/.csv.
    """
    from rich import box

    from freezetune.compare.run import BASELINE, by_depth
    from freezetune.render.console import fmt_seconds
    from freezetune.render.plot import share_text

    d = result["data"]
    table = Table(title=f"{result['model']} freeze depth sweep | {result['device']} | {d['image_size']}px, batch "
                  f"{d['batch_size']} | {result['steps']['timed']} timed steps/arm (+{result['steps']['warmup']} "
                  f"warm-up) | torch {result['versions']['torch']}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col in ("frozen to", "trainable", "predicted", "plain", "freezetune", "+cache", "BN drift"):
        table.add_column(col, justify="left" if col == "frozen to" else "right", no_wrap=True)
    intact = True
    for depth, arms in by_depth(result["arms"]):
        opt = arms.get("optimized") or arms.get("full")
        plain, cached = arms.get("plain"), arms.get("cached")
        drift = plain["frozen_batchnorm_drift"] if plain else None
        intact = intact and all(a["freeze_integrity"]["ok"] for a in arms.values())
        table.add_row(
            "full" if depth is None else f"{depth}{' (fc)' if opt['label'] == 'fc only' else ''}",
            share_text(opt["trainable_share"]), _x(opt["speedup"]["flop_predicted"]),
            _x(plain["speedup"]["measured"]) if plain else "-", f"[bold]{_x(opt['speedup']['measured'])}[/]",
            f"[bold]{_x(cached['speedup']['measured'])}[/]" if cached else "-",
            f"{drift['layers_changed']}/{drift['layers_checked']}" if drift else "-",
        )
    full = result["arms"][BASELINE]["timing"]["step_median_s"]
    skipped = "; ".join(f"{s['arm']}: {s['reason']}" for s in result.get("skipped", []))
    table.caption = (
        f"measured speedup over full ({fmt_seconds(full)}/step); predicted: FLOPs, uncached; BN drift: frozen "
        f"layers whose BatchNorm statistics the plain loop changed; frozen tensors "
        + ("[green]intact[/]" if intact else "[red]CHANGED[/]") + (f"; left out: {skipped}" if skipped else "")
    )
    table.caption_justify = "left"
    return table


def _modes(text: str) -> tuple[str, ...]:
    from freezetune.compare.run import check_modes

    return check_modes(m.strip() for m in text.split(",") if m.strip())


def _print_headline(result: dict) -> None:
    from freezetune.render.console import fmt_bytes

    s, mem, integ = result["speedup"], result["memory_saved"], result["freeze_integrity"]
    frozen = result["arms"]["frozen"]["label"]
    console.print(f"[bold]{frozen}[/]: step [bold]{_x(s['measured'])}[/] faster measured; "
                  f"FLOPs predict {_x(s['flop_predicted'])}")
    if mem["bytes"] is not None:
        pct = f" ({100 * mem['fraction']:.0f}%)" if mem["fraction"] is not None else ""
        kind = result["arms"]["frozen"]["memory"]["kind"]
        console.print(f"peak memory saved: {fmt_bytes(mem['bytes'])}{pct} [dim]({kind})[/]")
    else:
        console.print("peak memory: not measured (--no-memory)")
    if integ["ok"]:
        console.print(f"freeze integrity: [green]OK[/] ({integ['tensors_checked']} frozen tensors, "
                      f"sha256 {integ['sha256_after'][:12]} before and after)")
    console.print(f"files: {result['files']['json']}, .csv, .png")


def _print_notice(result: dict) -> None:
    notice = result["weights"]["notice"]
    if notice:
        err_console.print(f"[bold yellow]notice:[/] {escape(notice)}")


def _exit_on_problems(result: dict) -> None:
    problems = [k for k in ("same_initial_weights", "same_batches", "same_steps") if not result["fairness"][k]]
    if not result["freeze_integrity"]["ok"]:
        problems.append("frozen tensors changed during training")
    if problems:
        err_console.print(f"[bold red]error:[/] comparison is not valid: {', '.join(problems)}")
        raise typer.Exit(1)


def _config(path: Path, overrides: list[str] | None, device: str | None):
    from freezetune.config import load_config

    extra = [f"device={device}"] if device else []
    return load_config(path, [*(overrides or []), *extra])


class _progress:
    """A progress bar over every arm's steps, advanced after each turn."""

    def __init__(self, n_arms: int, steps: int, warmup: int | None, cfg):
        per_arm = steps + (cfg.train.warmup_steps if warmup is None else warmup)
        self._bar = Progress(TextColumn("[bold]compare[/] {task.fields[arm]}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self._task = self._bar.add_task("compare", total=n_arms * per_arm, arm="starting workers")

    def __enter__(self):
        self._bar.start()
        return self._advance

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def _advance(self, arm: str, phase: str, n: int, per_arm: int) -> None:
        if phase == "memory":
            self._bar.update(self._task, arm="memory pass: each arm a few steps in its own process")
        else:
            self._bar.update(self._task, advance=n, arm=f"{arm} ({phase})")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
