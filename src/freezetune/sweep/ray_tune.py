"""``freezetune sweep --backend ray``: every (arm, rate, seed) a Ray Tune trial, across GPUs and machines.

Ray Tune places the trials on the cluster's CPUs and GPUs, runs as many at once as fit (or
``max_concurrent``), and restores an interrupted experiment. Each trial drives the same
:class:`~freezetune.training.recipe.Recipe` as the in-process sweep, epoch by epoch, in the same run
folder (``<out>/runs/<arm>/...``), and reports every epoch with :func:`ray.tune.report`, a copy of
its ``checkpoint.pt`` inside Tune's checkpoint. Its accuracies equal the in-process sweep's.

Pruning is :class:`SweepScheduler`, a Tune ``TrialScheduler`` that replays the in-process sweep's
rules (:func:`~freezetune.sweep.turns.pruning_decisions`) over the trials' curves. The rules rank
at rungs, so a trial that reaches a rung waits (Tune pauses it, and it resumes from its checkpoint)
until every trial it is compared with has reached it too: the decisions are the ones the
in-process sweep makes for the same curves. A stopped trial stays paused until the sweep ends, in
case the run that beat it diverges later, and is then ended with ``status: pruned`` like an
in-process one.

The results go through the same :func:`~freezetune.sweep.result.assemble`; a trial that raised is
reported ``failed`` with its one-line error, and the others go on.

Ray is an optional extra (``pip install 'freezetune[ray]'``); nothing here imports it at module level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from freezetune.config import Config, load_config
from freezetune.errors import ConfigError, FreezetuneError, MissingExtraError, first_line
from freezetune.sweep.jobs import Job, Manifest, read_manifest
from freezetune.sweep.trials import RunView, read_failures, read_views, write_failures
from freezetune.sweep.turns import SweepReporter, pruning_decisions
from freezetune.training.recipe import Recipe
from freezetune.training.run_dir import CHECKPOINT_NAME, RunDir
from freezetune.training.state import StopReason

EXPERIMENT = "tune"  # Tune's experiment folder, under <out>/ray
TUNE_STATE = "run.json"  # in each Tune checkpoint beside the copy of checkpoint.pt: which run, which step


@dataclass(frozen=True)
class RayOptions:
    """Where and how the trials run.

    Attributes:
        address: ``None`` starts a private Ray instance on this machine; ``auto`` joins the
            cluster this machine belongs to; ``HOST:PORT`` joins that cluster's head.
        gpus_per_trial: GPUs each trial takes (None: 1 when this machine has CUDA, else 0).
        cpus_per_trial: CPUs each trial takes; its torch thread count is pinned to it.
        max_concurrent: At most this many trials at once (None: as many as the resources allow).
    """

    address: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None

    def checked(self) -> RayOptions:
        """These options, validated, with the GPU default filled in.

        Raises:
            ConfigError: If a count is negative or zero where it must be positive.
        """
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial {self.cpus_per_trial:g}: must be more than 0")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial:g}: must be 0 or more")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {self.max_concurrent}: must be at least 1")
        gpus = self.gpus_per_trial
        if gpus is None:
            import torch

            gpus = 1.0 if torch.cuda.is_available() else 0.0
        return RayOptions(self.address, gpus, self.cpus_per_trial, self.max_concurrent)

    def as_dict(self) -> dict:
        """The options as the manifest keeps them (a resumed sweep runs with the same)."""
        return {"address": self.address, "gpus_per_trial": self.gpus_per_trial,
                "cpus_per_trial": self.cpus_per_trial, "max_concurrent": self.max_concurrent}


def require_ray():
    """Imports Ray Tune.

    Raises:
        MissingExtraError: One line with the pip command, when Ray Tune is not installed.
    """
    try:
        import ray
        from ray import tune
    except ImportError:
        raise MissingExtraError.of("--backend ray", "Ray Tune", "ray") from None
    return ray, tune


# --------------------------------------------------------------------------------------------
# One trial: one (arm, rate, seed), epoch by epoch


def trial(params: dict) -> None:
    """The Tune trainable: trains one job of the sweep in ``params["out"]``, reporting every epoch.

    A trial continues from its run folder's checkpoint when there is one (Tune paused it at a
    rung, or the sweep was interrupted and resumed; a new sweep starts with no run folders), after
    copying back Tune's copy of the checkpoint when the folder lacks it or holds an older one (a
    trial that moved to another machine).
    """
    from ray import tune

    # Tune starts a trial in a folder of its own; the config's relative paths (a weights file, a
    # data root) are relative to where the sweep was started.
    os.chdir(params["cwd"])
    out = Path(params["out"])
    manifest = read_manifest(out)
    job = manifest.jobs[params["job"]]
    config = job_config(out, job, params.get("threads"))
    run_dir = RunDir(out / job.run_dir)
    _restore_from_tune(tune.get_checkpoint(), run_dir)
    recipe = Recipe(config, resume=run_dir.has_checkpoint()).setup()
    try:
        recipe.start_training()
        while (record := recipe.train_epoch()) is not None:
            if recipe.finished:
                recipe.train_epoch()  # lets the loop end, so that the run reports completed
            with tempfile.TemporaryDirectory(prefix="freezetune-tune-") as folder:
                # The record as JSON text: Tune flattens nested metrics for its schedulers.
                tune.report({"epoch": record.epoch + 1, "record": json.dumps(record.as_dict())},
                            checkpoint=_tune_checkpoint(Path(folder), run_dir, recipe.state.step))
            if recipe.finished:
                break
    except BaseException:
        recipe.cleanup()
        raise
    result = recipe.finish()
    result.raise_if_moved(f"{job.arm} {job.lr_multiplier:g}x seed {job.seed}: ")
    tune.report({"epoch": recipe.state.epoch, "ended": result.status})


def job_config(out: Path, job: Job, threads: int | None) -> Config:
    """The job's config, its torch threads pinned to the trial's CPUs (``threads``, when given)."""
    config = load_config(out / job.config)
    if threads:
        config = config.model_copy(update={"train": config.train.model_copy(update={"threads": int(threads)})})
    return config


def _tune_checkpoint(folder: Path, run_dir: RunDir, step: int):
    """A Tune checkpoint in ``folder``: a copy of the run's ``checkpoint.pt``, and which run and step it is.

    Tune copies it into its storage as the report returns. The frozen base stays in the run
    folder (it is written once, and the checkpoint records its sha256).
    """
    from ray.tune import Checkpoint

    try:  # a hard link where the temp folder shares the run folder's filesystem
        os.link(run_dir.checkpoint, folder / CHECKPOINT_NAME)
    except OSError:
        shutil.copy2(run_dir.checkpoint, folder / CHECKPOINT_NAME)
    (folder / TUNE_STATE).write_text(json.dumps({"run_dir": str(run_dir), "step": step}))
    return Checkpoint.from_directory(str(folder))


def _restore_from_tune(checkpoint, run_dir: RunDir) -> None:
    """Copies Tune's copy of the run's checkpoint into the run folder when the folder's is missing or older."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        saved = Path(folder) / CHECKPOINT_NAME
        step = int(json.loads((Path(folder) / TUNE_STATE).read_text())["step"])
        if not run_dir.has_checkpoint() or _step(run_dir.checkpoint) < step:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            shutil.copy2(saved, run_dir.checkpoint)


def _step(path: Path) -> int:
    from freezetune.models.weights import safe_torch_load

    return int(safe_torch_load(path, "checkpoint", mmap=True).get("step", 0))


# --------------------------------------------------------------------------------------------
# The driver


def run_on_ray(out: Path, manifest: Manifest, ray_options: RayOptions, reporter: SweepReporter,
               resumed: bool) -> dict:
    """Runs (or continues) the sweep's jobs as Tune trials, until each has ended or Ctrl-C stops them.

    Returns:
        ``{"interrupted": bool, "failed": {job index: one-line error}}``.

    Raises:
        MissingExtraError: If Ray Tune is not installed.
        ConfigError: If ``address`` names no Ray cluster.
    """
    ray, tune = require_ray()
    out = out.resolve()
    from freezetune.sweep.ray_scheduler import REPORTERS, Progress, SweepScheduler

    REPORTERS[str(out)] = reporter  # where the progress callback sends epochs, also once Tune restored it
    failed = read_failures(out)
    _init(ray, ray_options)
    storage = out / "ray"
    if not resumed:  # an earlier sweep's runs in an overwritten folder: a trial resumes whatever it finds
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    todo = [i for i, v in enumerate(read_views(out, manifest)) if v.status is None and i not in failed]
    epochs = manifest.base_config().train.epochs
    reporter.start(len(manifest.jobs), epochs, len(manifest.jobs) - len(todo))
    trainable = tune.with_resources(trial, _resources(ray, ray_options))
    if resumed and tune.Tuner.can_restore(str(storage / EXPERIMENT)):
        tuner = tune.Tuner.restore(str(storage / EXPERIMENT), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"out": str(out), "cwd": os.getcwd(), "threads": max(1, int(ray_options.cpus_per_trial)),
                         "job": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(scheduler=SweepScheduler(out, manifest), reuse_actors=True,
                                        trial_name_creator=_namer(manifest), trial_dirname_creator=_namer(manifest)),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=0,
                                      callbacks=[Progress(out, manifest)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    with _quiet_tune():
        results = tuner.fit()
    for result in results:
        if result.error is not None:
            failed[int(result.config["job"])] = error_line(result.error)
    write_failures(out, failed)
    views = read_views(out, manifest)
    stopped = pruning_decisions(views, manifest, epochs)
    unfinished = [i for i, v in enumerate(views) if v.status is None and i not in failed
                  and stopped.get((v.arm, v.multiplier), (None,))[0] != len(v.history)]
    if not unfinished:
        _end_pruned(out, manifest, views, stopped, reporter)
    return {"interrupted": bool(unfinished), "failed": failed}


@contextlib.contextmanager
def _quiet_tune():
    """Keeps Tune's own progress and advice off the console: the sweep prints its own lines."""
    # Keeping one checkpoint per trial makes Tune snapshot its state often; it warns about that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _resources(ray, options: RayOptions) -> dict:
    """What each trial reserves: its CPUs and GPUs, more CPUs when ``max_concurrent`` must hold fewer at once.

    Tune's own ``max_concurrent_trials`` counts paused trials as running, so trials waiting at a
    rung would keep the others from starting; reserving a share of the cluster's CPUs limits the
    trials running at once instead, and a paused trial reserves nothing. The trial's torch threads
    stay at ``cpus_per_trial``.
    """
    cpus = options.cpus_per_trial
    if options.max_concurrent:
        cpus = max(cpus, float(ray.cluster_resources().get("CPU", cpus)) / options.max_concurrent)
    return {"cpu": cpus, "gpu": options.gpus_per_trial or 0}


def _init(ray, options: RayOptions) -> None:
    """Starts a private Ray instance, or joins a cluster; keeps the one already started in this process."""
    if ray.is_initialized():
        return
    kwargs = {"address": options.address} if options.address else {"include_dashboard": False}
    try:
        ray.init(**kwargs, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise ConfigError(f"--address {options.address}: no Ray cluster there ({first_line(e)})") from None


def _namer(manifest: Manifest):
    def name(t) -> str:
        job = manifest.jobs[int(t.config["job"])]
        return f"{manifest.label(job)}-seed{job.seed}".replace(" ", "-")
    return name


def _end_pruned(out: Path, manifest: Manifest, views: list[RunView], stopped: dict,
                reporter: SweepReporter) -> None:
    """Ends the runs the rules stopped (Tune stopped their trials) as in-process: ``status: pruned``."""
    for job, view in zip(manifest.jobs, views, strict=True):
        decision = stopped.get((job.arm, job.lr_multiplier))
        if decision is None or view.status is not None:
            continue
        after, rule = decision
        recipe = Recipe(load_config(out / job.config), resume=True).setup()
        try:
            recipe.start_training()
            recipe.finish(StopReason.PRUNED, f"pruned by the sweep after epoch {after}: {rule}")
        finally:
            recipe.cleanup()
        reporter.pruned(manifest.label(job), after, rule)


def error_line(error: BaseException) -> str:
    """The one line that says why a trial failed: the error raised in the trial, not Ray's wrapper of it.

    Ray wraps a trial's exception (``RayTaskError``: its first line names the actor and process);
    the original is its ``cause``. A freezetune error is quoted as it is, another one with its type.
    """
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    text = first_line(error, 300)
    return text if isinstance(error, FreezetuneError) else f"{type(error).__name__}: {text}"
