"""``freezetune sweep``: every arm trained for the whole budget, in one process, epoch by epoch.

Each (arm, seed) is a real :class:`~freezetune.training.recipe.Recipe` with its own run folder, so
an arm's validation accuracy after every epoch is exactly what ``freezetune train`` gives for that
arm's config. The arms:

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from freezetune import __version__
from freezetune.atomic import atomic_write, write_json
from freezetune.compare.arms import BASELINE, ArmSpec
from freezetune.compare.run import memory_pass
from freezetune.config import Config, load_config
from freezetune.errors import ConfigError, RunDirError, WriteError
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import preview
from freezetune.lock import hold
from freezetune.measure.device import device_description, resolve_device
from freezetune.render.sweep_plot import sweep_plot
from freezetune.speed.prefix import training_step_flops
from freezetune.sweep.analysis import DEFAULT_TOLERANCE, mean_curve, prune_at, rungs
from freezetune.sweep.arms import SweepArm
from freezetune.sweep.jobs import Manifest, read_manifest, read_run, write_jobs
from freezetune.sweep.result import FINISHED, assemble, seed_run, to_csv
from freezetune.training.checkpoint import rng_state, set_rng_state
from freezetune.training.recipe import Recipe, StopFlag
from freezetune.training.run_dir import RunDir, claim_run_dir
from freezetune.training.state import StopReason
from freezetune.training.summary import EpochRecord

PRUNING_RULE = (
    "at half and three quarters of the epochs, stop an arm if its best accuracy so far plus its "
    "recent gain per epoch for every epoch left stays more than the tolerance below the best arm"
)


class SweepReporter:
    """Receives a sweep's progress; subclass it to print. Every method is optional."""

    def start(self, jobs: int, epochs: int, resumed: int) -> None:  # noqa: D102
        pass

    def epoch(self, arm: str, seed: int, record: EpochRecord, epochs: int) -> None:  # noqa: D102
        pass

    def pruned(self, arm: str, epoch: int) -> None:  # noqa: D102
        pass

    def message(self, text: str) -> None:  # noqa: D102
        pass


@dataclass
class Slot:
    """One (arm, seed) trained a turn at a time, with RNG state of its own."""

    arm: str
    seed: int
    config: Config
    resume: bool
    history: list[EpochRecord] = field(default_factory=list)
    recipe: Recipe | None = None
    rng: dict | None = None
    done: bool = False
    status: str | None = None  # how its run ended, once done

    def setup(self, stop: StopFlag) -> None:
        """Builds the recipe (seeding it as ``freezetune train`` would) and keeps its RNG state."""
        before = rng_state()
        self.recipe = Recipe(self.config, resume=self.resume).setup()
        if self.resume:  # the epochs the checkpoint holds (the recipe dropped any logged after it)
            self.history = [EpochRecord.from_dict(e) for e in read_run(self.recipe.run_dir)[0]]
        self.recipe.start_training(stop)
        self.rng = rng_state()
        set_rng_state(before)

    def epoch(self) -> EpochRecord | None:
        """Trains one more epoch under this slot's RNG state; None when the run has ended."""
        set_rng_state(self.rng)
        try:
            record = self.recipe.train_epoch()
        finally:
            self.rng = rng_state()
        if record is not None:
            self.history.append(record)
        return record

    def finish(self, pruned_after: int | None = None) -> None:
        """Ends the run (pruned, or after its loop ended), writes its summary and frees it."""
        recipe, self.recipe = self.recipe, None
        if pruned_after is None:
            result = recipe.finish()
        else:
            result = recipe.finish(StopReason.PRUNED, f"pruned by the sweep after epoch {pruned_after}: {PRUNING_RULE}")
        result.raise_if_moved(f"arm {self.arm} seed {self.seed}: ")  # a bug, never expected: stop the sweep loudly
        self.status = result.status
        self.done = self.status != StopReason.INTERRUPTED.value

    def park(self) -> None:
        """Releases a run left at an epoch boundary (its checkpoint is saved) when the sweep stops."""
        if self.recipe is not None:
            recipe, self.recipe = self.recipe, None
            recipe.finish(summary=False)


# --------------------------------------------------------------------------------------------
# Entry points


def sweep(config: Config, out: str | Path, arms: list[SweepArm] | None = None, seeds: int = 1,
          target: float | None = None, tolerance: float = DEFAULT_TOLERANCE, prune: bool = True,
          memory: bool = False, feature_cache: str = "auto", source: str = "<python>",
          reporter: SweepReporter | None = None) -> dict:
    """Runs a sweep in this process and writes sweep.json, sweep.csv and sweep.png.

    Args:
        config: The user's config: its epochs are every arm's budget.
        out: The sweep folder (it must be empty unless ``output.overwrite`` is set).
        arms: The arms; :func:`~freezetune.sweep.arms.default_arms` when None.
        seeds: Seeds ``config.seed``, ``config.seed + 1``, ...; statistics are mean ± sd over them.
        target: Target accuracy (a fraction); the best arm's mean final accuracy minus the
            tolerance when None.
        tolerance: Accuracy (a fraction) an arm may lose against the best and still be recommended.
        prune: Stop arms that cannot come within the tolerance of the best (see :func:`prune_at`).
        memory: Measure each arm's peak memory in a process of its own, a few steps each.
        feature_cache: ``train.feature_cache`` for every arm.
        source: Where the config came from, for the job configs' headers.
        reporter: Receives progress.

    Returns:
        The ``sweep.json`` record; ``status`` is ``interrupted`` if Ctrl-C stopped it (resume it).
    """
    options = {"target": target, "tolerance": tolerance, "prune": prune, "memory": memory,
               "feature_cache": feature_cache}
    with claim_run_dir(out, config.output.overwrite, "sweep"):
        out, manifest, configs = _start(config, out, arms, seeds, options, source, "in-process")
        (out / "memory.json").unlink(missing_ok=True)  # an earlier sweep's, in an overwritten folder
        return _run(out, manifest, configs, reporter or SweepReporter(), resumed=False)


def resume(out: str | Path, reporter: SweepReporter | None = None) -> dict:
    """Continues a sweep stopped by Ctrl-C (or a crash) where it stopped; finished epochs are not retrained.

    Raises:
        RunDirError: If ``out`` is not a sweep folder made by ``freezetune sweep``.
    """
    out = Path(out).resolve()
    manifest = read_manifest(out)
    if manifest.mode != "in-process":
        raise RunDirError(f"{out}: made by --emit; run its jobs with your scheduler, then use --collect")
    configs = {(j.arm, j.seed): _job_config(out, j) for j in manifest.jobs}
    with hold(out, "sweep --resume", create=False):
        return _run(out, manifest, configs, reporter or SweepReporter(), resumed=True)


def emit(config: Config, out: str | Path, arms: list[SweepArm] | None = None, seeds: int = 1,
         target: float | None = None, tolerance: float = DEFAULT_TOLERANCE, feature_cache: str = "auto",
         source: str = "<python>") -> Manifest:
    """Writes one ready config per (arm, seed), ``jobs.txt`` and the manifest, and trains nothing.

    Run each line of ``jobs.txt`` (a SLURM array, a Kubernetes job, ``torchrun`` per job), then
    :func:`collect`. Every job trains its whole budget: pruning needs the arms side by side.
    """
    options = {"target": target, "tolerance": tolerance, "prune": False, "memory": False,
               "feature_cache": feature_cache}
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
    ``tolerance`` default to the sweep's own.

    Raises:
        RunDirError: If a job has not finished (naming it and its run folder).
    """
    out = Path(out).resolve()
    manifest = read_manifest(out)
    runs, summaries = _read_runs(out, manifest)
    unfinished = [(j, r) for j in manifest.jobs for r in [runs[j.arm][manifest.seeds.index(j.seed)]]
                  if r.status not in FINISHED]
    if unfinished:
        job, run = unfinished[0]
        raise RunDirError(f"{out / job.run_dir}: job {job.arm} seed {job.seed} is {run.status} "
                          f"({len(unfinished)} of {len(manifest.jobs)} jobs have not finished); "
                          f"run: freezetune train --config {out / job.config}")
    options = dict(manifest.options)
    if target is not None:
        options["target"] = target
    if tolerance is not None:
        options["tolerance"] = tolerance
    _check_options(1, options["target"], options["tolerance"])
    memory = _memory_from_summaries(summaries) if manifest.mode == "emitted" else _read_memory(out)
    configs = {(j.arm, j.seed): _job_config(out, j) for j in manifest.jobs}
    with hold(out, "sweep --collect", create=False):
        return _write(out, manifest, configs, runs, summaries, options, memory, "collected", None)


# --------------------------------------------------------------------------------------------
# Running


def _run(out: Path, manifest: Manifest, configs: dict, reporter: SweepReporter, resumed: bool) -> dict:
    start = time.perf_counter()
    options = manifest.options
    slots = _slots(out, manifest, configs, resumed)
    reporter.start(len(manifest.jobs), manifest.base_config().train.epochs, sum(s.done for s in slots))
    interrupted = False
    with StopFlag() as stop:
        try:
            for slot in (s for s in slots if not s.done):
                slot.setup(stop)
            interrupted = _turns(slots, manifest, stop, reporter)
        except WriteError as e:
            if e.path is None:
                raise
            raise WriteError.of(e.path, e.cause, e.errno, hint="each run's last checkpoint is intact; once the "
                                f"folder can be written again, `freezetune sweep --resume {out}` continues") from e
        finally:
            for slot in slots:
                slot.park()
    if interrupted:
        reporter.message(f"interrupted; continue with: freezetune sweep --resume {out}")
        return {"status": "interrupted", "out_dir": str(out)}
    memory = _read_memory(out)
    if options["memory"] and not memory:
        reporter.message("measuring each arm's peak memory in its own process")
        memory = _measure_memory(out, manifest, configs)
        write_json(out / "memory.json", memory)
    runs, summaries = _read_runs(out, manifest)
    return _write(out, manifest, configs, runs, summaries, options, memory, "in-process",
                  time.perf_counter() - start)


def _slots(out: Path, manifest: Manifest, configs: dict, resumed: bool) -> list[Slot]:
    """Every job: finished ones with their epochs read back, the others to train (resumed where they can be).

    A new sweep (``resumed`` False) trains every job from the start, even in a folder that holds
    an earlier sweep's runs (``output.overwrite``).
    """
    slots = []
    for job in manifest.jobs:
        run_dir = out / job.run_dir
        if not resumed:
            slots.append(Slot(job.arm, job.seed, configs[(job.arm, job.seed)], resume=False))
            continue
        epochs, summary = read_run(run_dir)
        status = (summary or {}).get("status")
        slot = Slot(job.arm, job.seed, configs[(job.arm, job.seed)], resume=RunDir(run_dir).has_checkpoint())
        if status in FINISHED:
            slot.done, slot.status = True, status
            slot.history = [EpochRecord.from_dict(e) for e in epochs]
        slots.append(slot)
    return slots


def _turns(slots: list[Slot], manifest: Manifest, stop: StopFlag, reporter: SweepReporter) -> bool:
    """Trains the slots epoch by epoch until every one is done; True if a signal stopped the sweep.

    Each round trains one epoch of every unfinished slot that is furthest behind, so after a
    resume the slots line up again before pruning compares them.
    """
    epochs = manifest.base_config().train.epochs
    while True:
        active = [s for s in slots if not s.done]
        if not active:
            return False
        low = min(len(s.history) for s in active)
        for slot in [s for s in active if len(s.history) == low]:
            record = slot.epoch()
            if record is not None:
                reporter.epoch(slot.arm, slot.seed, record, epochs)
            if record is None or slot.recipe.finished:
                if record is not None:
                    slot.epoch()  # lets the loop end, so that the run reports completed
                slot.finish()
                if slot.status == StopReason.INTERRUPTED.value:
                    return True  # its checkpoint is saved mid-epoch
            if stop.requested:
                return True
        if manifest.options["prune"]:
            _prune(slots, manifest, epochs, reporter)


def _prune(slots: list[Slot], manifest: Manifest, epochs: int, reporter: SweepReporter) -> None:
    """Replays the pruning rule over every arm's mean curve and stops the arms it prunes.

    The rule reads accuracies only, so replaying it after a resume gives the same decisions.
    Arms whose loss diverged are left out: they end early and are no candidate.
    """
    by_arm: dict[str, list[Slot]] = {}
    for slot in slots:
        by_arm.setdefault(slot.arm, []).append(slot)
    curves = {arm: mean_curve([[r.val_accuracy for r in s.history] for s in group])
              for arm, group in by_arm.items() if not any(s.status == "nonfinite" for s in group)}
    protected = {a.name: max((p["epoch"] for p in a.overrides.get("freeze.schedule") or []), default=0)
                 for a in manifest.arm_list()}
    for arm, after in prune_at(curves, epochs, manifest.options["tolerance"], protected).items():
        live = [s for s in by_arm[arm] if not s.done]
        for slot in live:
            slot.finish(pruned_after=after)
        if live:
            reporter.pruned(arm, after)


# --------------------------------------------------------------------------------------------
# Reading back and writing


def _job_config(out: Path, job) -> Config:
    return load_config(out / job.config)


def _read_runs(out: Path, manifest: Manifest) -> tuple[dict, dict]:
    """Every job's run read once: per arm its :class:`SeedRun` list, and per (arm, seed) its summary."""
    runs: dict[str, list] = {a["name"]: [] for a in manifest.arms}
    summaries: dict[tuple[str, int], dict | None] = {}
    for job in manifest.jobs:
        epochs, summary = read_run(out / job.run_dir)
        runs[job.arm].append(seed_run(job.seed, job.run_dir, epochs, summary))
        summaries[(job.arm, job.seed)] = summary
    return runs, summaries


def arm_facts(config: Config, summary: dict) -> dict:
    """What an arm is, apart from its seed: trainable share, FLOPs per step, whether it caches.

    Counted on a randomly initialised model of the arm's shape (FLOPs and the parameter split do
    not depend on weight values). Whether it cached, and which prefix, is what its run's
    ``summary.json`` says; with the feature cache, FLOPs are those of a step after the first
    epoch, which reads the frozen prefix's output instead of computing it.
    """
    model, _ = preview(config.model, config.freeze)
    params = count_params(model)
    speed = summary.get("speed", {})
    cached = bool(speed.get("feature_cache", {}).get("enabled", False))
    flops = training_step_flops(model, config, speed.get("frozen_prefix", []) if cached else None)
    return {"trainable_params": int(params["trainable"]), "trainable_pct": float(params["trainable_pct"]),
            "flops_per_step": int(flops["total"]), "feature_cache": cached}


def _write(out: Path, manifest: Manifest, configs: dict, runs: dict, summaries: dict, options: dict,
           memory: dict, mode: str, wall_s: float | None) -> dict:
    base = manifest.base_config()
    facts = {}
    first = manifest.seeds[0]
    for arm in manifest.arms:
        key = (arm["name"], first)
        mem = memory.get(arm["name"], {})
        facts[arm["name"]] = {**arm_facts(configs[key], summaries[key]),
                              "peak_memory_bytes": mem.get("peak_bytes"),
                              "memory_kind": mem.get("kind", "not measured (run with --memory)")}
    device = resolve_device(base.device)
    meta = {
        "freezetune_version": __version__, "model": base.model.name,
        "data": {k: getattr(base.data, k) for k in ("source", "root", "image_size", "batch_size", "train_size",
                                                     "val_size")},
        "epochs": base.train.epochs, "seeds": manifest.seeds, "prune": bool(options["prune"]),
        "pruning": {"rule": PRUNING_RULE, "rungs": rungs(base.train.epochs)},
        "mode": mode, "wall_s": wall_s, "device": device_description(device),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "out_dir": str(out), "files": {ext: str(out / f"sweep.{ext}") for ext in ("json", "csv", "png")},
    }
    result = assemble(manifest.arms, runs, facts, meta, options["target"], options["tolerance"])
    write_json(out / "sweep.json", result)
    atomic_write(out / "sweep.csv", lambda f: f.write(to_csv(result)), mode="w")
    sweep_plot(result, out / "sweep.png")
    return result


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
    seed = manifest.seeds[0]
    with tempfile.TemporaryDirectory(prefix="freezetune-sweep-memory-") as tmp:
        cfgs, specs = [], []
        for arm in manifest.arm_list():
            cfg = configs[(arm.name, seed)]
            cfgs.append(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": f"{tmp}/{arm.name}"})}))
            specs.append(ArmSpec(arm.name, arm.label, cfg.freeze.model_dump(mode="json"),
                                 "full" if arm.name == BASELINE else "optimized"))
        peaks = memory_pass(cfgs, specs)
    return {name: {"peak_bytes": m.get("peak_bytes"), "kind": m.get("kind")} for name, m in peaks.items()}


def _read_memory(out: Path) -> dict:
    path = out / "memory.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _memory_from_summaries(summaries: dict) -> dict:
    """An emitted sweep's jobs each had a process of their own, so their summaries' peaks are theirs."""
    memory = {}
    for (arm, _), summary in summaries.items():
        peak = (summary or {}).get("memory", {})
        if peak.get("peak_bytes") is not None:
            prev = memory.get(arm, {}).get("peak_bytes") or 0
            memory[arm] = {"peak_bytes": max(prev, int(peak["peak_bytes"])), "kind": peak.get("kind")}
    return memory
