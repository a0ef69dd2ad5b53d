"""``freezetune sweep``: every arm at every rate of its grid, in one process, epoch by epoch.

Each (arm, rate, seed) is a real :class:`~freezetune.training.recipe.Recipe` with its own run folder, so
a run's validation accuracy after every epoch is exactly what ``freezetune train`` gives for its
config. The runs:

- share this process, so torch is imported once;
- start from the same weights and see the same batches per seed (the recipe seeds both from
  the config's seed);
- take turns epoch by epoch, so a drifting machine slows them all alike;
- never share RNG state: each keeps its own (torch, CUDA, Python) and gets it back for its turn,
  so its results do not depend on which other arms run.

Usable from Python::

    from freezetune.config import load_config
    from freezetune.sweep import sweep

    result = sweep(load_config("configs/quickstart.yaml"), out="runs/sweep")
    print(result["recommendation"]["reason"])
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from freezetune import __version__
from freezetune.atomic import atomic_write, write_json
from freezetune.compare.arms import BASELINE, ArmSpec
from freezetune.compare.run import memory_pass
from freezetune.config import Config, load_config
from freezetune.errors import ConfigError, RunDirError, RunsFailedError, WriteError
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import preview
from freezetune.lock import hold
from freezetune.measure.device import device_description, resolve_device
from freezetune.measure.memory import MEMORY_PARTS
from freezetune.render.sweep_plot import sweep_plot
from freezetune.speed.prefix import training_step_flops
from freezetune.sweep.analysis import DEFAULT_TOLERANCE, rungs
from freezetune.sweep.arms import DEFAULT_LR_GRID, SweepArm, arm_config, check_lr_grid
from freezetune.sweep.halving import HALVING_RULE, halving_rungs
from freezetune.sweep.jobs import PRUNE_MODES, Manifest, read_manifest, read_run, write_jobs
from freezetune.sweep.ray_tune import RayOptions, require_ray, run_on_ray
from freezetune.sweep.result import FINISHED, assemble, best_rate, seed_run, to_csv
from freezetune.sweep.trials import FAILURES_NAME, read_failures
from freezetune.sweep.turns import PRUNING_RULE, SweepReporter, make_slots, take_turns
from freezetune.training.recipe import StopFlag
from freezetune.training.run_dir import claim_run_dir

# --------------------------------------------------------------------------------------------
# Entry points


def sweep(config: Config, out: str | Path, arms: list[SweepArm] | None = None, seeds: int = 1,
          target: float | None = None, tolerance: float = DEFAULT_TOLERANCE, prune: bool | str = "halving",
          memory: bool = False, feature_cache: str = "auto", source: str = "<python>",
          reporter: SweepReporter | None = None, lr_grid=DEFAULT_LR_GRID, ray: RayOptions | None = None,
          allow_failed: bool = False) -> dict:
    """Runs a sweep (in this process, or on Ray Tune) and writes sweep.json, sweep.csv and sweep.png.

    Args:
        config: The user's config: its epochs are every run's budget.
        out: The sweep folder (it must be empty unless ``output.overwrite`` is set).
        arms: The arms; :func:`~freezetune.sweep.arms.default_arms` when None.
        seeds: Seeds ``config.seed``, ``config.seed + 1``, ...; statistics are mean ± sd over them.
        target: Target accuracy (a fraction); the best arm's mean final accuracy minus the
            tolerance when None.
        tolerance: Accuracy (a fraction) an arm may lose against the best and still be recommended.
        prune: ``halving`` (successive halving of each arm's rates, and the safe rule between
            arms), ``safe`` (the safe rule only) or ``off``; True and False mean ``safe`` and ``off``.
        memory: Measure each arm's peak memory in a process of its own, a few steps each.
        feature_cache: ``train.feature_cache`` for every arm.
        source: Where the config came from, for the job configs' headers.
        reporter: Receives progress.
        lr_grid: Multipliers of the config's learning rate every arm tries (an arm's own
            ``lr_grid`` replaces it); ``(1,)`` trains each arm at the config's rate only.
        ray: Run every (arm, rate, seed) as a Ray Tune trial with these options
            (:mod:`freezetune.sweep.ray_tune`); None trains them in this process, taking turns.
        allow_failed: With ``ray``, a trial that raised is reported as failed and the sweep
            returns; without it, :class:`RunsFailedError` is raised once the results are written.

    Returns:
        The ``sweep.json`` record; ``status`` is ``interrupted`` if Ctrl-C stopped it (resume it).

    Raises:
        RunsFailedError: If a trial raised and ``allow_failed`` is off (sweep.json names it too).
        MissingExtraError: With ``ray``, if Ray Tune is not installed (before anything is written).
    """
    options = _options(target, tolerance, prune, memory, feature_cache, lr_grid)
    if ray is not None:
        require_ray()
        options.update(ray=ray.checked().as_dict(), allow_failed=allow_failed)
    with claim_run_dir(out, config.output.overwrite, "sweep"):
        mode = "in-process" if ray is None else "ray"
        out, manifest, configs = _start(config, out, arms, seeds, options, source, mode)
        for stale in ("memory.json", FAILURES_NAME):  # an earlier sweep's, in an overwritten folder
            (out / stale).unlink(missing_ok=True)
        return _run(out, manifest, configs, reporter or SweepReporter(), resumed=False)


def _options(target, tolerance, prune, memory, feature_cache, lr_grid, job_threads=None) -> dict:
    """The manifest's options, checked: what every run of the sweep shares."""
    mode = {True: "safe", False: "off"}.get(prune, prune) if isinstance(prune, bool) else prune
    if mode not in PRUNE_MODES:
        raise ConfigError(f"--prune {prune!r}: choose {', '.join(PRUNE_MODES)}")
    return {"target": target, "tolerance": tolerance, "prune": mode, "memory": memory,
            "feature_cache": feature_cache, "lr_grid": list(check_lr_grid(lr_grid, "--lr-grid")),
            "job_threads": job_threads}


def resume(out: str | Path, reporter: SweepReporter | None = None) -> dict:
    """Continues a sweep stopped by Ctrl-C (or a crash) where it stopped; finished epochs are not retrained.

    Raises:
        RunDirError: If ``out`` is not a sweep folder made by ``freezetune sweep``.
    """
    out = Path(out).resolve()
    manifest = read_manifest(out)
    if manifest.mode == "emitted":
        raise RunDirError(f"{out}: made by --emit; run its jobs with your scheduler, then use --collect")
    if manifest.mode == "ray":
        require_ray()
    configs = JobConfigs(out, manifest)
    with hold(out, "sweep --resume", create=False):
        return _run(out, manifest, configs, reporter or SweepReporter(), resumed=True)


def emit(config: Config, out: str | Path, arms: list[SweepArm] | None = None, seeds: int = 1,
         target: float | None = None, tolerance: float = DEFAULT_TOLERANCE, feature_cache: str = "auto",
         source: str = "<python>", lr_grid=DEFAULT_LR_GRID, job_threads: int | None = None) -> Manifest:
    """Writes one ready config per (arm, rate, seed), ``jobs.txt`` and the manifest, and trains nothing.

    Run each line of ``jobs.txt`` (a SLURM array, a Kubernetes job, ``torchrun`` per job), then
    :func:`collect`, which picks each arm's best rate. Every job trains its whole budget: pruning
    and halving need the runs side by side.

    Args:
        config: The user's config.
        out: The sweep folder.
        arms: The arms; the defaults when None.
        seeds: How many seeds, from ``config.seed``.
        target: Target accuracy for collect (None: the best arm's minus the tolerance).
        tolerance: As for :func:`sweep`.
        feature_cache: ``train.feature_cache`` for every job.
        source: Where the config came from, for the job configs' headers.
        lr_grid: Multipliers of the config's rate, as for :func:`sweep`.
        job_threads: ``train.threads`` of every job (None: torch's default, every core), so that
            jobs run side by side on one machine do not oversubscribe its cores.
    """
    options = _options(target, tolerance, "off", False, feature_cache, lr_grid, job_threads)
    with claim_run_dir(out, config.output.overwrite, "sweep --emit"):
        return _start(config, out, arms, seeds, options, source, "emitted")[1]


def _start(config: Config, out, arms: list[SweepArm] | None, seeds: int, options: dict, source: str,
           mode: str) -> tuple[Path, Manifest, dict]:
    """Checks the options and data and writes the jobs (nothing trains yet); the caller claimed ``out``."""
    from freezetune.sweep.arms import default_arms

    arms = arms if arms is not None else default_arms(config)
    _check_options(seeds, options["target"], options["tolerance"])
    check_validation_data(config)
    out = Path(out)
    seed_list = list(range(config.seed, config.seed + seeds))
    manifest, configs = write_jobs(out, config, source, arms, seed_list, options, mode)
    return out, manifest, configs


def collect(out: str | Path, target: float | None = None, tolerance: float | None = None) -> dict:
    """Reads a sweep folder's finished runs and writes sweep.json, sweep.csv, sweep.png.

    Works on an emitted sweep whose jobs ran elsewhere and on an in-process one. ``target`` and
    ``tolerance`` default to the sweep's own. Each arm is reported at its best rate.

    Raises:
        RunDirError: If a job has not finished (naming it and its run folder).
    """
    out = Path(out).resolve()
    manifest = read_manifest(out)
    runs, summaries = _read_runs(out, manifest, read_failures(out))
    unfinished = [j for j in manifest.jobs if runs[j.key].status not in (*FINISHED, "failed")]
    if unfinished:
        job = unfinished[0]
        rated = manifest.label(job)
        raise RunDirError(f"{out / job.run_dir}: job {rated} seed {job.seed} "
                          f"is {runs[job.key].status} ({len(unfinished)} of {len(manifest.jobs)} jobs have not "
                          f"finished); run: freezetune train --config {out / job.config}")
    options = dict(manifest.options)
    if target is not None:
        options["target"] = target
    if tolerance is not None:
        options["tolerance"] = tolerance
    _check_options(1, options["target"], options["tolerance"])
    memory = _memory_from_summaries(summaries) if manifest.mode == "emitted" else _read_memory(out)
    with hold(out, "sweep --collect", create=False):
        return _write(out, manifest, runs, summaries, options, memory, "collected", None)


# --------------------------------------------------------------------------------------------
# Running


def _run(out: Path, manifest: Manifest, configs: dict, reporter: SweepReporter, resumed: bool) -> dict:
    start = time.perf_counter()
    options = manifest.options
    if manifest.mode == "ray":
        ran = run_on_ray(out, manifest, RayOptions(**options["ray"]), reporter, resumed)
        interrupted, failed = ran["interrupted"], ran["failed"]
    else:
        interrupted, failed = _take_turns(out, manifest, configs, reporter, resumed), {}
    if interrupted:
        reporter.message(f"interrupted; continue with: freezetune sweep --resume {out}")
        return {"status": "interrupted", "out_dir": str(out)}
    memory = _read_memory(out)
    if options["memory"] and not memory:
        reporter.message("measuring each arm's peak memory in its own process")
        memory = _measure_memory(out, manifest, configs)
        write_json(out / "memory.json", memory)
    runs, summaries = _read_runs(out, manifest, failed)
    result = _write(out, manifest, runs, summaries, options, memory, manifest.mode,
                    time.perf_counter() - start)
    if failed and not options.get("allow_failed"):
        raise RunsFailedError(_failures_line(manifest, failed, out))
    return result


def _take_turns(out: Path, manifest: Manifest, configs: dict, reporter: SweepReporter, resumed: bool) -> bool:
    """Trains the jobs in this process, taking turns epoch by epoch; True if a signal stopped them."""
    slots = make_slots(out, manifest, configs, resumed)
    reporter.start(len(manifest.jobs), manifest.base_config().train.epochs, sum(s.done for s in slots))
    with StopFlag() as stop:
        try:
            return take_turns(slots, manifest, stop, reporter)
        except WriteError as e:
            if e.path is None:
                raise
            raise WriteError.of(e.path, e.cause, e.errno, hint="each run's last checkpoint is intact; once the "
                                f"folder can be written again, `freezetune sweep --resume {out}` continues") from e
        finally:
            for slot in slots:
                slot.park()


def _failures_line(manifest: Manifest, failed: dict[int, str], out: Path) -> str:
    """One line naming the runs that raised, the first one's error, and what was written anyway."""
    first = manifest.jobs[min(failed)]
    name = manifest.label(first)
    return (f"{out}: {len(failed)} of {len(manifest.jobs)} runs failed, first {name} seed {first.seed}: "
            f"{failed[min(failed)]} (sweep.json reports them as failed; --allow-failed accepts this)")


# --------------------------------------------------------------------------------------------
# Reading back and writing


class JobConfigs(dict):
    """A sweep folder's job configs by job key, each read when first asked for.

    A collected or resumed sweep needs only some of them (a job that failed may have a config
    that no longer loads).
    """

    def __init__(self, out: Path, manifest: Manifest):
        super().__init__()
        self._paths = {j.key: out / j.config for j in manifest.jobs}

    def __missing__(self, key) -> Config:
        self[key] = config = load_config(self._paths[key])
        return config


def _read_runs(out: Path, manifest: Manifest, failed: dict[int, str] | None = None) -> tuple[dict, dict]:
    """Every job's run read once: per (arm, rate, seed) its :class:`SeedRun` and its summary.

    A job in ``failed`` (a Ray trial that raised) is reported ``failed`` with its error.
    """
    runs, summaries = {}, {}
    for i, job in enumerate(manifest.jobs):
        epochs, summary = read_run(out / job.run_dir)
        runs[job.key] = seed_run(job.seed, job.run_dir, epochs, summary, (failed or {}).get(i))
        summaries[job.key] = summary
    return runs, summaries


def _grids(manifest: Manifest, runs: dict) -> dict[str, dict[float, list]]:
    """Per arm, per rate, its seeds' runs, in the manifest's order."""
    grids: dict[str, dict[float, list]] = {a["name"]: {} for a in manifest.arms}
    for job in manifest.jobs:
        grids[job.arm].setdefault(job.lr_multiplier, []).append(runs[job.key])
    return grids


def arm_facts(config: Config, summary: dict) -> dict:
    """What an arm is, apart from its seed: trainable share, FLOPs per step, whether it caches.

    Counted on a randomly initialised model of the arm's shape (FLOPs and the parameter split do
    not depend on weight values). Whether it cached, and which prefix, is what its run's
    ``summary.json`` says; with the feature cache, FLOPs are those of a step after the first
    epoch, which reads the frozen prefix's output instead of computing it.
    """
    model, _ = preview(config.model, config.freeze, config.adapt)
    params = count_params(model)
    speed = summary.get("speed", {})
    cached = bool(speed.get("feature_cache", {}).get("enabled", False))
    flops = training_step_flops(model, config, speed.get("frozen_prefix", []) if cached else None)
    return {"trainable_params": int(params["trainable"]), "trainable_pct": float(params["trainable_pct"]),
            "flops_per_step": int(flops["total"]), "feature_cache": cached}


def _write(out: Path, manifest: Manifest, runs: dict, summaries: dict, options: dict,
           memory: dict, mode: str, wall_s: float | None) -> dict:
    base = manifest.base_config()
    grids = _grids(manifest, runs)
    facts = {}
    for arm in manifest.arm_list():
        job = _facts_job(manifest, arm.name, grids[arm.name])
        # Rebuilt from the manifest, not read back: a failed job's config file may not load.
        config = arm_config(base, arm, job.seed, out / job.run_dir, options.get("feature_cache", "auto"),
                            job.lr_multiplier)
        mem = memory.get(arm.name, {})
        facts[arm.name] = {**arm_facts(config, summaries[job.key] or {}),
                           "peak_memory_bytes": mem.get("peak_bytes"),
                           "memory_kind": mem.get("kind", "not measured (run with --memory)"),
                           "saved_activation_bytes": mem.get("saved_activation_bytes"),
                           "base_lr": config.optim.lr / job.lr_multiplier, "config": str(out / job.config)}
    device = resolve_device(base.device)
    meta = {
        "freezetune_version": __version__, "model": base.model.name,
        "data": {k: getattr(base.data, k) for k in ("source", "root", "image_size", "batch_size", "train_size",
                                                     "val_size")},
        "epochs": base.train.epochs, "seeds": manifest.seeds, "prune": manifest.prune_mode != "off",
        "pruning": {"rule": PRUNING_RULE, "rungs": rungs(base.train.epochs), "mode": manifest.prune_mode,
                    "halving": HALVING_RULE if manifest.prune_mode == "halving" else None,
                    "halving_rungs": halving_rungs(base.train.epochs) if manifest.prune_mode == "halving" else []},
        "mode": mode, "wall_s": wall_s, "device": device_description(device), "base_lr": base.optim.lr,
        **_overhead(runs, wall_s),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "out_dir": str(out), "files": {ext: str(out / f"sweep.{ext}") for ext in ("json", "csv", "png")},
    }
    result = assemble(manifest.arms, grids, facts, meta, options["target"], options["tolerance"])
    write_json(out / "sweep.json", result)
    atomic_write(out / "sweep.csv", lambda f: f.write(to_csv(result)), mode="w")
    sweep_plot(result, out / "sweep.png")
    return result


def _facts_job(manifest: Manifest, arm: str, grid: dict[float, list]):
    """The job an arm's facts are read from: its first seed at its best rate (a pruned rate's run caches too)."""
    multiplier = best_rate(grid)
    return next(j for j in manifest.jobs if j.arm == arm and j.lr_multiplier == multiplier)


def _overhead(runs: dict, wall_s: float | None) -> dict:
    """The runs' own training and validation seconds, and the sweep's wall time as a multiple of them."""
    busy = sum(r.wall_s + r.val_s for r in runs.values())
    return {"runs_train_s": busy, "overhead": wall_s / busy if wall_s is not None and busy > 0 else None}


def check_validation_data(config: Config) -> None:
    """A sweep compares validation accuracy: refuses, before anything trains, a config without any.

    Raises:
        ConfigError: If the config has no validation data.
    """
    data = config.data
    has_val = data.val_size > 0 if data.source == "synthetic" else (
        data.source == "cifar10" or (Path(data.root) / "val").is_dir())
    if not has_val:
        where = "data.val_size is 0" if data.source == "synthetic" else f"{Path(data.root) / 'val'} is not a folder"
        raise ConfigError(f"a sweep compares validation accuracy, so it needs validation data ({where})")


def _check_options(seeds: int, target: float | None, tolerance: float) -> None:
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"--target {target}: give the accuracy as a fraction in (0, 1], e.g. 0.7")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance {tolerance}: must be in [0, 1) as a fraction (0.01 is one point)")


# --------------------------------------------------------------------------------------------
# Memory: each arm in a process of its own (a peak RSS is only an arm's own if it has the process)


def _measure_memory(out: Path, manifest: Manifest, configs: dict) -> dict:
    first = {}
    for job in manifest.jobs:  # the rate does not change an arm's memory: one job an arm
        first.setdefault(job.arm, job.key)
    with tempfile.TemporaryDirectory(prefix="freezetune-sweep-memory-") as tmp:
        cfgs, specs = [], []
        for arm in manifest.arm_list():
            cfg = configs[first[arm.name]]
            cfgs.append(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": f"{tmp}/{arm.name}"})}))
            specs.append(ArmSpec(arm.name, arm.label, cfg.freeze.model_dump(mode="json"),
                                 "full" if arm.name == BASELINE else "optimized"))
        peaks = memory_pass(cfgs, specs)
    return {name: {"peak_bytes": m.get("peak_bytes"), "kind": m.get("kind"), **{k: m.get(k) for k in MEMORY_PARTS}}
            for name, m in peaks.items()}


def _read_memory(out: Path) -> dict:
    path = out / "memory.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _memory_from_summaries(summaries: dict) -> dict:
    """An emitted sweep's jobs each had a process of their own, so their summaries' peaks are theirs."""
    memory = {}
    for (arm, _, _), summary in summaries.items():
        peak = (summary or {}).get("memory", {})
        if peak.get("peak_bytes") is not None:
            prev = memory.get(arm, {}).get("peak_bytes") or 0
            memory[arm] = {"peak_bytes": max(prev, int(peak["peak_bytes"])), "kind": peak.get("kind")}
    return memory
