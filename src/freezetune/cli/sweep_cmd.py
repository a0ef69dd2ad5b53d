"""``freezetune sweep``: which layers should I freeze? Every arm trained, measured, and one recommended."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from freezetune.cli.common import (
    DEBUG_OPTION,
    OVERRIDES_ARG,
    OneLineCommand,
    console,
    err_console,
    print_all,
    user_errors,
)


def register(app: typer.Typer) -> None:
    """Adds ``sweep`` to the app."""
    app.command("sweep", cls=OneLineCommand)(sweep)


@user_errors
def sweep(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = typer.Option(None, "--config", "-c", help="YAML config: its epochs are every arm's budget.",
                                show_default=False),
    out: Path = typer.Option(None, "--out", help="Sweep folder \\[default: <output.dir>/sweep].", show_default=False),
    arms: Path = typer.Option(None, "--arms", help="YAML list of {name, label, overrides} arms that add to or "
                              "replace the defaults (full and one per freeze point).", show_default=False),
    only: str = typer.Option(None, "--only", help="Run only these arms, comma-separated; also picks the arms "
                              "that run only when named: bn, bias and lora-r8 (adapt.method), and a ResNet's "
                              "block points inside a stage (layer2.0: frozen through layer2's first block).",
                              show_default=False),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds seed, seed+1, ...; figures become mean ± sd."),
    target: float = typer.Option(None, "--target", help="Target validation accuracy for time to target, a "
                                 "fraction \\[default: the best arm's mean final accuracy minus the tolerance].",
                                 show_default=False),
    tolerance: float = typer.Option(None, "--tolerance", min=0, help="Accuracy points an arm may lose against "
                                    "the best and still be recommended (1 = 0.01) \\[default: 1].",
                                    show_default=False),
    lr_grid: str = typer.Option("0.1,0.3,1,3,10", "--lr-grid", help="Learning rates every arm tries, as "
                                "multipliers of the config's optim.lr (an arms file's lr_grid replaces it per arm); "
                                "1 trains each arm at the config's rate only."),
    prune: str = typer.Option("halving", "--prune", help="halving: each arm's rates compete at rungs and the "
                              "best third go on, and arms that cannot come within the tolerance of the best stop; "
                              "safe: only the latter; off: everything trains its whole budget (docs/sweep.md)."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Same as --prune off.", hidden=True),
    job_threads: int = typer.Option(None, "--job-threads", min=1, help="With --emit: train.threads of every job "
                                    "\\[default: half this machine's cores, for two jobs side by side].",
                                    show_default=False),
    memory: bool = typer.Option(False, "--memory/--no-memory", help="Measure each arm's peak memory in a "
                                "process of its own, a few steps each (about 5 s an arm on 2 CPU cores)."),
    feature_cache: str = typer.Option("auto", "--feature-cache", help="train.feature_cache for every arm: "
                                      "auto, on or off."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N \\[default: the config's].",
                               show_default=False),
    emit: Path = typer.Option(None, "--emit", help="Write one config per (arm, seed), jobs.txt and a manifest "
                              "to this folder for a scheduler to run, and train nothing.", show_default=False),
    collect: Path = typer.Option(None, "--collect", help="Read this sweep folder's finished runs and write "
                                 "sweep.json/csv/png and the recommendation.", show_default=False),
    resume: Path = typer.Option(None, "--resume", help="Continue the sweep in this folder where it stopped.",
                                show_default=False),
    backend: str = typer.Option("in-process", "--backend", help="in-process: the runs take turns in this "
                                "process; ray: each (arm, rate, seed) is a Ray Tune trial, on this machine's "
                                "GPUs and CPUs or a Ray cluster's (pip install 'freezetune[ray]')."),
    address: str = typer.Option(None, "--address", help="With --backend ray: auto (the cluster this machine "
                                r"belongs to) or HOST:PORT \[default: a private Ray instance here].",
                                show_default=False),
    gpus_per_trial: float = typer.Option(None, "--gpus-per-trial", min=0, help="With --backend ray: GPUs per "
                                         r"trial \[default: 1 with CUDA, else 0].", show_default=False),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", min=0, help="With --backend ray: CPUs per "
                                         "trial; its torch threads are pinned to them."),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1, help="With --backend ray: at most "
                                       r"this many trials at once \[default: as many as fit].", show_default=False),
    allow_failed: bool = typer.Option(False, "--allow-failed", help="With --backend ray: a trial that raised "
                                      "is reported as failed and the sweep exits 0."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train every freeze depth (and your own arms) for the config's whole budget and recommend one.

    Every arm tries each rate of --lr-grid and is reported at its best one. Reports validation
    accuracy per epoch, time to target accuracy, training time, FLOPs and memory per arm, the
    Pareto front, and the cheapest arm (and its rate) within the tolerance of the best. Writes
    sweep.json, sweep.csv and sweep.png.
    """
    from freezetune import sweep as lib
    from freezetune.errors import ConfigError
    from freezetune.sweep.analysis import DEFAULT_TOLERANCE
    from freezetune.sweep.arms import parse_lr_grid

    modes = [name for name, v in (("--emit", emit), ("--collect", collect), ("--resume", resume)) if v is not None]
    if len(modes) > 1:
        raise ConfigError(f"give only one of {', '.join(modes)}")
    ray = _ray_options(backend, address, gpus_per_trial, cpus_per_trial, max_concurrent, bool(emit or collect))
    if feature_cache not in ("auto", "on", "off"):
        raise ConfigError(f"--feature-cache {feature_cache!r}: choose auto, on or off")
    grid = parse_lr_grid(lr_grid)
    prune = "off" if no_prune else prune
    tol = None if tolerance is None else tolerance / 100
    if collect is not None:
        _show(lib.collect(collect, target, tol))  # the sweep's own target and tolerance unless given
        return
    if resume is not None:
        _finish(lib.resume(resume, _Progress()))
        return
    cfg, source = _config(config, overrides, device)
    chosen = _arms(cfg, arms, only)
    tol = DEFAULT_TOLERANCE if tol is None else tol
    if emit is not None:
        threads = job_threads or max(1, (os.cpu_count() or 2) // 2)
        manifest = lib.emit(cfg, emit, chosen, seeds, target, tol, feature_cache, source, grid, threads)
        console.print(f"wrote {len(manifest.jobs)} job configs (train.threads {threads} each), "
                      f"{emit / 'jobs.txt'} and {emit / 'manifest.json'}", soft_wrap=True)
        console.print(f"run each line of {emit / 'jobs.txt'}, then: freezetune sweep --collect {emit}", soft_wrap=True)
        return
    result = lib.sweep(cfg, out or Path(cfg.output.dir) / "sweep", chosen, seeds, target, tol, prune, memory,
                       feature_cache, source, _Progress(), grid, ray, allow_failed)
    _finish(result)


def _ray_options(backend: str, address, gpus, cpus, max_concurrent, elsewhere: bool):
    """The Ray options of ``--backend ray`` (None in-process); refuses Ray options without it."""
    from freezetune.errors import ConfigError
    from freezetune.sweep.ray_tune import RayOptions

    if backend not in ("in-process", "ray"):
        raise ConfigError(f"--backend {backend!r}: choose in-process or ray")
    given = [name for name, v in (("--address", address), ("--gpus-per-trial", gpus),
                                  ("--max-concurrent", max_concurrent)) if v is not None]
    if backend != "ray":
        if given:
            raise ConfigError(f"{given[0]} needs --backend ray")
        return None
    if elsewhere:
        raise ConfigError("--backend ray runs the sweep; --emit and --collect leave running it to your scheduler")
    return RayOptions(address, gpus, cpus, max_concurrent)


def _config(config: Path | None, overrides: list[str] | None, device: str | None):
    from freezetune.config import load_config
    from freezetune.errors import ConfigError

    if config is None:
        raise ConfigError("missing --config PATH (or --resume / --collect SWEEP_DIR)")
    extra = list(overrides or []) + ([f"device={device}"] if device else [])
    return load_config(config, extra), str(config)


def _arms(cfg, arms_file: Path | None, only: str | None):
    from freezetune.sweep import default_arms, load_arms_file, merge_arms, optional_arms

    extra = load_arms_file(arms_file) if arms_file is not None else []
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    return merge_arms(default_arms(cfg), extra, names, optional_arms(cfg))


def _finish(result: dict) -> None:
    if result.get("status") == "interrupted":
        err_console.print(f"interrupted; continue with: freezetune sweep --resume {result['out_dir']}")
        raise typer.Exit(130)
    _show(result)


def _show(result: dict) -> None:
    from freezetune.render.sweep import recommendation_lines, sweep_table

    print_all(console, [sweep_table(result), *recommendation_lines(result)])


class _Progress:
    """Prints one line per (arm, seed, epoch) and every pruning decision."""

    def start(self, jobs: int, epochs: int, resumed: int) -> None:
        done = f" ({resumed} already finished)" if resumed else ""
        console.print(f"sweep: {jobs} runs x {epochs} epochs{done}")

    def epoch(self, arm, seed, record, epochs) -> None:
        from freezetune.render.sweep import epoch_line

        console.print(epoch_line(arm, seed, record, epochs))

    def pruned(self, arm: str, epoch: int, why: str = "") -> None:
        from freezetune.sweep.halving import HALVING_RULE

        reason = ("successive halving: not among the best third of its arm's rates" if why == HALVING_RULE
                  else "it cannot come within the tolerance of the best")
        console.print(f"[yellow]pruned {arm} after epoch {epoch}[/]: {reason}")

    def message(self, text: str) -> None:
        console.print(text)
