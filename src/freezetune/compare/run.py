"""Side-by-side measurement of freeze configs: frozen vs full, and the depth sweep.

Every arm starts from the same weights (built once here and handed to each arm as a file), sees the
same batches in the same order, and trains the same number of steps through the same recipe as
``freezetune train``. Timing is fair: warm-up steps are excluded, every step is synchronized, and
arms take turns in blocks of steps (round-robin) so that the drift of a shared, noisy machine hits
all of them alike. :func:`measure` times every arm in this process, then measures each arm's peak
memory in a worker process of its own (see its docstring for why).

Usable from Python::

    from freezetune.compare import frozen_vs_full
    from freezetune.config import load_config

    result = frozen_vs_full(load_config("configs/resnet18_linear_probe.yaml"), steps=10)
    print(result["speedup"])
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from freezetune.atomic import atomic_write, write_json
from freezetune.compare.arms import BASELINE, MODES, ArmSpec, arm_config, arm_folder, depth_arms, frozen_vs_full_arms
from freezetune.compare.forkserver import ForkServer, FreshWorkers, start_workers
from freezetune.compare.result import CompareResult, assemble, headline, saved_bytes, to_csv
from freezetune.compare.worker import InlineArm, ProcessArm, worker_env
from freezetune.config import Config, FreezeConfig
from freezetune.errors import ConfigError
from freezetune.freezing.plan import apply_freeze
from freezetune.models.weights import build_model
from freezetune.render.plot import comparison_plot
from freezetune.speed.execution import plan_execution
from freezetune.training.run_dir import claim_run_dir

# The memory pass (see measure): peak memory is reached in the first steps (gradients, momentum).
MEMORY_STEPS = 2
MEMORY_WARMUP = 1
# Called after every turn: (arm name, phase "fill"/"warmup"/"timed"/"memory", steps just run, steps per arm).
Progress = Callable[[str, str, int, int], None]


# --------------------------------------------------------------------------------------------
# Turns


def schedule(names: list[str], steps: int, block: int) -> list[tuple[str, int]]:
    """Interleaves the arms' timed steps: round-robin blocks ``A B A B ...``.

    Args:
        names: Arm names, in the order they take turns.
        steps: Timed steps each arm runs in total.
        block: Steps per turn (the last turn may be shorter).

    Returns:
        ``(arm name, steps)`` turns in the order they run; each arm's steps sum to ``steps``.
    """
    if block < 1:
        raise ValueError("block must be at least 1")
    turns = []
    done = 0
    while done < steps:
        n = min(block, steps - done)
        turns.extend((name, n) for name in names)
        done += n
    return turns


def default_block(steps: int) -> int:
    """Steps per turn: about four turns per arm, and never more than 10 steps in a row."""
    return max(1, min(10, steps // 4))


# --------------------------------------------------------------------------------------------
# Running


def run_comparison(
    config: Config,
    arms: list[ArmSpec],
    out_dir: Path,
    steps: int,
    warmup: int | None = None,
    block: int | None = None,
    isolate: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Trains every arm with the same weights, batches and step count, interleaved; returns the result.

    Args:
        config: The base config; each arm replaces its ``freeze`` section.
        arms: The arms; the first must be the ``full`` baseline.
        out_dir: Folder for the arms' own folders (resolved config, frozen fingerprints).
        steps: Timed steps per arm.
        warmup: Untimed steps per arm before timing; ``train.warmup_steps`` when None.
        block: Steps per turn; :func:`default_block` when None.
        isolate: Run each arm in its own worker process (needed for per-arm memory figures).
        progress: Called after each turn.

    Returns:
        The result dict (see :func:`assemble`).

    Raises:
        ConfigError: On a step count below 1 or a freeze spec that cannot be applied.
    """
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1 (got {steps})")
    if config.adapt.method != "none":
        # Each arm is a freeze spec on top of the config; a sliver method on top of "full" would
        # no longer be the baseline every speedup is measured against.
        method = config.adapt.method
        raise ConfigError(f"compare measures freeze specs against full fine-tuning; adapt.method: {method} "
                          f"belongs in train or in a sweep arm (--only full,{method})")
    warmup = config.train.warmup_steps if warmup is None else warmup
    if warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more (got {warmup})")
    block = block or default_block(steps)
    with tempfile.TemporaryDirectory(prefix="freezetune-compare-") as tmp:
        weights_path, loaded, skipped = _initial_weights(config, arms, Path(tmp))
        arms = [a for a in arms if a.name not in skipped]
        if len(arms) < 2:
            raise ConfigError(f"nothing to compare: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
        configs = [arm_config(config, arm, weights_path, out_dir / "arms" / arm_folder(arm.name)) for arm in arms]
        infos, finals, fills = run_arms(configs, arms, steps, warmup, block, isolate, progress)
    for name, info in fills.items():
        finals[name]["cache"] = info
    meta = {
        "model": config.model.name,
        "weights": {"source": loaded.weights_source, "notice": loaded.notice},
        "data": {"source": config.data.source, "image_size": config.data.image_size,
                 "batch_size": config.data.batch_size},
        "steps": {"timed": steps, "warmup": warmup, "block": block},
        "isolation": "process" if isolate else "inline",
        "skipped": [{"arm": k, "reason": v} for k, v in skipped.items()],
    }
    return assemble(arms, infos, finals, meta)


def run_arms(configs: list[Config], arms: list[ArmSpec], steps: int, warmup: int, block: int, isolate: bool,
             progress: Progress | None = None) -> tuple[dict, dict, dict]:
    """Trains each arm's own config: set up together, then warm-up and timed steps in turns.

    Returns:
        Per arm name: what setup knew, what finish measured, and (cached arms) the cache fill.
    """
    server = start_workers(worker_env()) if isolate else None
    try:
        return _run_turns(_start(configs, arms, server), arms, steps, warmup, block, progress)
    finally:
        if server is not None:
            server.close()


def _run_turns(runners: dict, arms: list[ArmSpec], steps: int, warmup: int, block: int,
               progress: Progress | None) -> tuple[dict, dict, dict]:
    fills = {}
    try:
        infos = _call_all(runners, "setup", warmup + steps)
        for name, phase, n in _plan(arms, steps, warmup, block):
            if phase == "fill":
                runners[name].submit("fill")
                fills[name] = runners[name].wait()
            else:
                runners[name].submit("steps", n, phase == "warmup")
                runners[name].wait()
            if progress:
                progress(name, phase, n, steps + warmup)
        finals = _call_all(runners, "finish")
    finally:
        for runner in runners.values():
            runner.close()
    return infos, finals, fills


def memory_pass(configs: list[Config], arms: list[ArmSpec]) -> dict[str, dict]:
    """Each arm in a worker process of its own for a few steps, so that its peak memory is its own.

    The sweep's memory pass; a comparison's is :func:`run_comparison` with ``isolate`` on, which
    runs through the same :func:`run_arms` with the same step counts.

    Returns:
        Each arm's ``memory`` record (see ``compare.result.ArmMemory``), by arm name.
    """
    _, finals, _ = run_arms(configs, arms, MEMORY_STEPS, MEMORY_WARMUP, default_block(MEMORY_STEPS), isolate=True)
    return {name: final["memory"] for name, final in finals.items()}


def measure(
    config: Config,
    arms: list[ArmSpec],
    out_dir: Path,
    steps: int,
    warmup: int | None = None,
    block: int | None = None,
    memory: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Times the arms, then measures their memory: two passes, each fair in its own way.

    The timed pass runs every arm in this process, interleaved. On a small shared VM, worker
    processes were measured to run the same arm at two persistently different speeds (ResNet18
    frozen through layer3, 64 px, batch 8: 23 or 40 ms a step, process to process), which no
    interleaving removes, while arms sharing one process agree run to run. The memory pass runs
    each arm in its own process for a few steps, because a peak resident set size (or CUDA
    high-water mark) can only be attributed to an arm that has the process to itself.

    Args:
        config: The base config.
        arms: The arms; the first must be the ``full`` baseline.
        out_dir: Folder for the timed arms' own folders.
        steps: Timed steps per arm.
        warmup: Untimed steps per arm; ``train.warmup_steps`` when None.
        block: Steps per turn; :func:`default_block` when None.
        memory: Run the memory pass; without it, memory is reported as not measured.
        progress: Called after each turn of the timed pass, and with phase ``memory`` once
            before the memory pass.

    Returns:
        The timed pass's result with each arm's ``memory`` (and ``memory_saved_bytes``) from the
        memory pass.
    """
    result = run_comparison(config, arms, out_dir, steps, warmup, block, isolate=False, progress=progress)
    if not memory:
        return result
    if progress:
        progress("all arms", "memory", 0, 0)
    kept = [a for a in arms if a.name in result["arms"]]
    with tempfile.TemporaryDirectory(prefix="freezetune-memory-") as tmp:
        peaks = run_comparison(config, kept, Path(tmp), MEMORY_STEPS, MEMORY_WARMUP, isolate=True)
    merge_memory(result, peaks)
    return result


def merge_memory(result: dict, peaks: dict) -> None:
    """Takes each arm's memory figures from a process-isolated comparison of the same arms."""
    base = peaks["arms"][BASELINE]["memory"]["peak_bytes"]
    for name, arm in result["arms"].items():
        arm["memory"] = peaks["arms"][name]["memory"]
        arm["memory_saved_bytes"] = saved_bytes(base, arm["memory"]["peak_bytes"])
    isolation = (f"timing: all arms in one process, interleaved; memory: each arm in its own process "
                 f"({MEMORY_WARMUP}+{MEMORY_STEPS} steps)")
    result["isolation"] = result["fairness"]["isolation"] = isolation
    result["memory_pass"] = {"steps": MEMORY_STEPS, "warmup": MEMORY_WARMUP, "fairness": peaks["fairness"]}


def _initial_weights(config: Config, arms: list[ArmSpec], tmp: Path):
    """Builds the model once (seeded), checks every arm's freeze spec on it, and saves its weights.

    Returns:
        The weights file, the loaded model, and ``{arm name: reason}`` for cached arms whose
        feature cache would not be correct (they are left out).
    """
    from safetensors.torch import save_file

    torch.manual_seed(config.seed)
    loaded = build_model(config.model)
    skipped = {}
    for arm in arms:
        plan = apply_freeze(loaded.model, FreezeConfig.model_validate(arm.freeze), config.model.name)
        if arm.mode == "cached":
            reason = _why_no_cache(config, loaded.model, plan)
            if reason:
                skipped[arm.name] = reason
    path = tmp / "initial.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
    return path, loaded, skipped


def _why_no_cache(config: Config, model, plan) -> str | None:
    auto = config.model_copy(update={"train": config.train.model_copy(update={"feature_cache": "auto"})})
    # A cached arm measures the cache wherever it is correct, including where auto would not take it.
    decision = plan_execution(model, plan, auto, judge_cost=False).feature_cache
    return None if decision.enabled else decision.reason


def _start(configs: list[Config], arms: list[ArmSpec], server: ForkServer | FreshWorkers | None) -> dict:
    """One runner per arm: in this process, or in a worker ``server`` starts when there is one."""
    runners = {}
    try:
        for cfg, arm in zip(configs, arms, strict=True):
            runners[arm.name] = ProcessArm(cfg, arm, server) if server else InlineArm(cfg, arm)
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def _call_all(runners: dict, command: str, *args) -> dict:
    # Submit to every arm first, so that worker processes set up (import torch...) in parallel.
    for runner in runners.values():
        runner.submit(command, *args)
    return {name: runner.wait() for name, runner in runners.items()}


def _plan(arms: list[ArmSpec], steps: int, warmup: int, block: int) -> list[tuple[str, str, int]]:
    names = [a.name for a in arms]
    # Cached arms fill their cache first, one after another, so each fill time is measured alone.
    turns = [(a.name, "fill", 0) for a in arms if a.mode == "cached"]
    turns += [(name, "warmup", warmup) for name in names] if warmup else []
    return turns + [(name, "timed", n) for name, n in schedule(names, steps, block)]


def frozen_vs_full(
    config: Config,
    out: str | Path | None = None,
    steps: int = 20,
    warmup: int | None = None,
    block: int | None = None,
    memory: bool = True,
    progress: Progress | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Runs ``compare frozen-vs-full`` and writes compare.json, compare.csv and compare.png.

    Args:
        config: The config; its freeze spec is the frozen arm.
        out: Output folder; ``<output.dir>/compare`` when None.
        steps: Timed steps per arm.
        warmup: Untimed steps per arm; ``train.warmup_steps`` when None.
        block: Steps per turn; see :func:`default_block`.
        memory: Measure each arm's peak memory in a second, process-isolated pass (see :func:`measure`).
        progress: Called after each turn.
        modes: Which ways of running the frozen spec to measure (:data:`MODES`); a cached arm
            whose cache would not be correct is left out, with the reason in ``skipped``.

    Returns:
        The result, with ``speedup``, ``memory_saved`` and ``freeze_integrity`` of the frozen arm
        at the top level.
    """
    arms = frozen_vs_full_arms(config, modes=modes)
    out_dir = Path(out or Path(config.output.dir) / "compare")
    with claim_run_dir(out_dir, config.output.overwrite, "compare frozen-vs-full"):
        result = measure(config, arms, out_dir, steps, warmup, block, memory, progress)
        result = {"kind": "frozen-vs-full", **result, **headline(result, "frozen")}
        return _write(result, out_dir, "compare")


def depths(
    config: Config,
    out: str | Path | None = None,
    steps: int = 20,
    warmup: int | None = None,
    block: int | None = None,
    memory: bool = True,
    progress: Progress | None = None,
    modes: tuple[str, ...] = MODES,
    points: tuple[str, ...] | None = None,
) -> dict:
    """Runs ``compare depths`` (full, then frozen through stem ... layer4) and writes depths.*.

    Arguments as for :func:`frozen_vs_full`; the output folder defaults to ``<output.dir>/depths``.
    ``points`` chooses the freeze points (see :func:`freezetune.compare.arms.chosen_points`).

    Returns:
        The result; ``freeze_integrity.ok`` is true only if no arm's frozen tensors changed.
    """
    arms = depth_arms(config, points, modes=modes)
    out_dir = Path(out or Path(config.output.dir) / "depths")
    with claim_run_dir(out_dir, config.output.overwrite, "compare depths"):
        result = measure(config, arms, out_dir, steps, warmup, block, memory, progress)
        integrity = {name: arm["freeze_integrity"]["ok"] for name, arm in result["arms"].items()}
        result = {"kind": "depths", **result, "freeze_integrity": {"ok": all(integrity.values()), "arms": integrity}}
        return _write(result, out_dir, "depths")


def _write(result: dict, out_dir: Path, stem: str) -> dict:
    """Writes the result as JSON (through its typed record), CSV and PNG; returns the record's dict."""
    result["out_dir"] = str(out_dir)
    result["files"] = {ext: str(out_dir / f"{stem}.{ext}") for ext in ("json", "csv", "png")}
    record = CompareResult.from_dict(result)
    data = record.to_dict()
    write_json(out_dir / f"{stem}.json", data)
    atomic_write(out_dir / f"{stem}.csv", lambda f: f.write(to_csv(data)), mode="w")
    comparison_plot(data, out_dir / f"{stem}.png")
    return data
