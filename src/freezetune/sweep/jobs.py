"""A sweep's jobs on disk: the manifest, one ready config per (arm, seed), and reading runs back.

Both ways of running a sweep share this layout under the output folder::

    manifest.json                       what the sweep is: config, arms, seeds, options, jobs
    configs/<arm>/<rate>/seed-<s>.yaml  the complete config of each job (``freezetune train`` runs it)
    jobs.txt                            one ``freezetune train`` command per line (a scheduler array)
    runs/<arm>/<rate>/seed-<s>/         each job's run folder (epochs.jsonl, summary.json, ...)

``<rate>`` names the learning-rate multiplier (``x0.3``, ``x1``, ``x10``); an arm with a single rate
(``--lr-grid 1``) has no such level, as sweeps had before the rate grid.

``freezetune sweep`` runs the jobs in one process; ``--emit`` only writes them, for SLURM, Kubernetes
or ``torchrun`` to run, and ``--collect`` reads the finished run folders back.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from freezetune.atomic import write_json, write_text
from freezetune.config import Config, dump_config
from freezetune.errors import RunDirError
from freezetune.sweep.arms import DEFAULT_LR_GRID, SweepArm, arm_config, multiplier_name
from freezetune.training.run_dir import RunDir

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 2  # 2: learning-rate grids (jobs' lr_multiplier, options' lr_grid, prune by name)
PRUNE_MODES = ("off", "safe", "halving")


class Job(BaseModel):
    """One (arm, rate, seed): where its config and run folder are, relative to the sweep folder."""

    model_config = ConfigDict(extra="forbid")

    arm: str
    seed: int
    config: str
    run_dir: str
    lr_multiplier: float = 1.0

    @property
    def key(self) -> tuple[str, float, int]:
        """(arm, rate multiplier, seed): what tells the sweep's runs apart."""
        return self.arm, self.lr_multiplier, self.seed


class Manifest(BaseModel):
    """``manifest.json``: everything needed to run, resume or collect a sweep."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    kind: str = "sweep-manifest"
    mode: str  # in-process | emitted
    config: dict[str, Any]
    config_source: str
    arms: list[dict[str, Any]]
    seeds: list[int]
    options: dict[str, Any]
    jobs: list[Job]

    def arm_list(self) -> list[SweepArm]:
        """The arms, as :class:`SweepArm`."""
        return [SweepArm(a["name"], a["label"], dict(a["overrides"]),
                         None if a.get("lr_grid") is None else tuple(a["lr_grid"])) for a in self.arms]

    def base_config(self) -> Config:
        """The user's config, as it was when the sweep began."""
        return Config.model_validate(self.config)

    def grid(self, arm: str) -> list[float]:
        """The rate multipliers of one arm, as its jobs have them, smallest first."""
        return sorted({j.lr_multiplier for j in self.jobs if j.arm == arm})

    def label(self, job: Job) -> str:
        """The job's run as the sweep names it: ``layer1 x0.3``, or ``layer1`` for an arm with one rate."""
        return rated_name(job.arm, job.lr_multiplier, len(self.grid(job.arm)) > 1)

    @property
    def prune_mode(self) -> str:
        """``off``, ``safe`` or ``halving``; a version-1 manifest's ``prune: true`` was ``safe``."""
        prune = self.options.get("prune", False)
        if isinstance(prune, bool):
            return "safe" if prune else "off"
        return prune


def rated_name(arm: str, multiplier: float, rated: bool) -> str:
    """``layer1 x0.3`` for an arm that tries several rates, else ``layer1``."""
    return f"{arm} {multiplier_name(multiplier)}" if rated else arm


def job_paths(arm: str, seed: int, multiplier: float | None = None) -> tuple[str, str]:
    """(config, run folder) of one job, relative to the sweep folder; no rate level when ``multiplier`` is None."""
    rate = "" if multiplier is None else f"{multiplier_name(multiplier)}/"
    return f"configs/{arm}/{rate}seed-{seed}.yaml", f"runs/{arm}/{rate}seed-{seed}"


def arm_grid(arm: SweepArm, options: dict) -> tuple[float, ...]:
    """The arm's own grid (from the arms file), else the sweep's (``--lr-grid``)."""
    if arm.lr_grid is not None:
        return tuple(arm.lr_grid)
    return tuple(options.get("lr_grid") or DEFAULT_LR_GRID)


def write_jobs(out: Path, config: Config, source: str, arms: list[SweepArm], seeds: list[int],
               options: dict, mode: str) -> tuple[Manifest, dict[tuple[str, int], Config]]:
    """Writes every job's config, ``jobs.txt`` and the manifest; returns them.

    Raises:
        ConfigError: If an arm's overrides make an invalid config (nothing is written then).
    """
    out = out.resolve()
    configs, jobs = {}, []
    threads = options.get("job_threads")
    for arm in arms:
        grid = arm_grid(arm, options)
        for multiplier in grid:
            for seed in seeds:
                cfg_rel, run_rel = job_paths(arm.name, seed, None if grid == (1.0,) else multiplier)
                cfg = arm_config(config, arm, seed, out / run_rel, options["feature_cache"], multiplier)
                if threads is not None:
                    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})})
                job = Job(arm=arm.name, seed=seed, config=cfg_rel, run_dir=run_rel, lr_multiplier=multiplier)
                configs[job.key] = cfg
                jobs.append(job)
    lines = []
    for job in jobs:
        path = out / job.config
        path.parent.mkdir(parents=True, exist_ok=True)
        command = f"freezetune train --config {shlex.quote(str(path))}"
        cfg = configs[job.key]
        header = (f"# freezetune sweep: arm {job.arm}, lr {cfg.optim.lr:g} ({multiplier_name(job.lr_multiplier)}), "
                  f"seed {job.seed} (from {source}).\n# Run it with:\n#   {command}\n")
        write_text(path, header + dump_config(cfg))
        lines.append(command)
    write_text(out / "jobs.txt", "\n".join(lines) + "\n")
    manifest = Manifest(mode=mode, config=config.to_dict(), config_source=source, arms=[a.as_dict() for a in arms],
                        seeds=list(seeds), options=options, jobs=jobs)
    write_json(out / MANIFEST_NAME, manifest.model_dump(mode="json"))
    return manifest, configs


def read_manifest(out: Path) -> Manifest:
    """Reads ``manifest.json`` of a sweep folder (version 1, from before rate grids, too).

    Raises:
        RunDirError: If the folder holds no (valid) sweep manifest.
    """
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise RunDirError(f"{out}: no {MANIFEST_NAME}; not a sweep folder (made by freezetune sweep or --emit)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {**data, "schema_version": MANIFEST_SCHEMA_VERSION}  # every v1 job is at its arm's one rate
        return Manifest.model_validate(data)
    except (OSError, ValueError, ValidationError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise RunDirError(f"{path}: not a readable sweep manifest ({first})") from None


def read_run(run_dir: Path) -> tuple[list[dict], dict | None]:
    """A job's epoch rows (the last word per epoch) and its summary (None while it has not finished).

    Raises:
        RunDirError: If the summary is there but not readable JSON.
    """
    folder = RunDir(run_dir)
    return folder.epoch_rows(), folder.summary()
