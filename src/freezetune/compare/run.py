"""Side-by-side measurement of freeze configs: frozen vs full, and the depth sweep.

Every arm starts from the same weights (built once here and handed to each arm as a file), sees the
same batches in the same order, and trains the same number of steps. Timing is fair: warm-up steps
are excluded, every step is synchronized, and arms take turns in blocks of steps (round-robin) so
that the drift of a shared, noisy machine hits all of them alike. Each arm runs in its own worker
process by default, which also makes its peak-memory figure its own.

Usable from Python::

    from freezetune.compare.run import frozen_vs_full
    from freezetune.config import load_config

    result = frozen_vs_full(load_config("configs/resnet18_linear_probe.yaml"), steps=10)
    print(result["speedup"])
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from freezetune import __version__
from freezetune.compare.worker import ArmSpec, InlineArm, ProcessArm
from freezetune.config import Config, FreezeConfig
from freezetune.errors import ConfigError
from freezetune.freezing.plan import apply_freeze
from freezetune.models.weights import build_model
from freezetune.speed.feature_cache import assess
from freezetune.training.run_dir import atomic_write, prepare_run_dir, write_json

# Freeze points of the depth sweep, shallowest first; the last one leaves only fc training.
DEPTHS = ("stem", "layer1", "layer2", "layer3", "layer4")
BASELINE = "full"
# Ways of running a frozen arm, measured side by side (see ArmSpec.mode): the plain requires_grad=False
# loop, freezetune's optimized path, and that path with the feature cache filled.
MODES = ("plain", "optimized", "cached")

# The memory pass (see measure): peak memory is reached in the first steps (gradients, momentum).
MEMORY_STEPS = 2
MEMORY_WARMUP = 1
# Called after every turn: (arm name, phase "fill"/"warmup"/"timed"/"memory", steps just run, steps per arm).
Progress = Callable[[str, str, int, int], None]


# --------------------------------------------------------------------------------------------
# Arms and schedule


def frozen_vs_full_arms(config: Config, modes: tuple[str, ...] = MODES) -> list[ArmSpec]:
    """The arms of ``compare frozen-vs-full``: everything trainable, and the config's freeze spec.

    The frozen spec is run once per mode: ``frozen`` (freezetune's path), ``frozen:plain`` and
    ``frozen:cached``. A ``freeze.schedule`` (gradual unfreezing) is not applied: the frozen arms
    keep their starting freeze state for every step, which is the state whose cost is measured.

    Raises:
        ConfigError: If the config freezes nothing, so both arms would be the same, or on a bad mode.
    """
    spec = config.freeze
    if spec.trainable is None and spec.frozen is None and spec.until is None:
        raise ConfigError(
            "the config freezes nothing (no freeze.trainable, freeze.frozen or freeze.until), "
            "so the frozen arm would equal the full one; e.g. add freeze.until=layer3"
        )
    full = ArmSpec(BASELINE, "all trainable", _freeze_dict(FreezeConfig(batchnorm=spec.batchnorm)), "full")
    return [full, *_mode_arms("frozen", _describe_freeze(spec), spec, check_modes(modes), None)]


def depth_arms(config: Config, stages: tuple[str, ...] = DEPTHS, modes: tuple[str, ...] = MODES) -> list[ArmSpec]:
    """The arms of ``compare depths``: full, then frozen through each stage up to layer4 (fc only).

    Each freeze point is run in every mode: ``layer3`` (freezetune's path), ``layer3:plain`` and
    ``layer3:cached``. The config's own freeze selectors are ignored; its BatchNorm policy applies.

    Args:
        config: The base config.
        stages: The freeze points to sweep, a subset of :data:`DEPTHS` (all of them by default).
        modes: A subset of :data:`MODES` that includes ``optimized``.

    Raises:
        ConfigError: On a stage that is not a freeze point, or a bad mode.
    """
    unknown = [s for s in stages if s not in DEPTHS]
    if unknown:
        raise ConfigError(f"unknown freeze point(s) {', '.join(unknown)}; choose from {', '.join(DEPTHS)}")
    modes = check_modes(modes)
    bn = config.freeze.batchnorm
    arms = [ArmSpec(BASELINE, "all trainable", _freeze_dict(FreezeConfig(batchnorm=bn)), "full")]
    for stage in (s for s in DEPTHS if s in stages):
        label = "fc only" if stage == DEPTHS[-1] else f"frozen ..{stage}"
        arms.extend(_mode_arms(stage, label, FreezeConfig(until=stage, batchnorm=bn), modes, stage))
    return arms


def check_modes(modes) -> tuple[str, ...]:
    """Validates a selection of :data:`MODES` (``optimized`` is required) and puts it in order.

    Raises:
        ConfigError: On an unknown mode, or one without ``optimized``.
    """
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if "optimized" not in modes:
        raise ConfigError("modes must include optimized: the other modes are reported against it")
    return tuple(m for m in MODES if m in modes)


def _mode_arms(name: str, label: str, spec: FreezeConfig, modes: tuple[str, ...], depth: str | None) -> list[ArmSpec]:
    return [ArmSpec(name if mode == "optimized" else f"{name}:{mode}", label, _freeze_dict(spec), mode, depth)
            for mode in modes]


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
    warmup = config.train.warmup_steps if warmup is None else warmup
    if warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more (got {warmup})")
    block = block or default_block(steps)
    with tempfile.TemporaryDirectory(prefix="freezetune-compare-") as tmp:
        weights_path, loaded, skipped = _initial_weights(config, arms, Path(tmp))
        arms = [a for a in arms if a.name not in skipped]
        if len(arms) < 2:
            raise ConfigError(f"nothing to compare: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
        configs = [arm_config(config, arm, weights_path, out_dir / "arms" / _folder(arm.name)) for arm in arms]
        runners = _start(configs, arms, isolate)
        fills = {}
        try:
            infos = _call_all(runners, "setup")
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
        arm["memory_saved_bytes"] = _saved(base, arm["memory"]["peak_bytes"])
    isolation = (f"timing: all arms in one process, interleaved; memory: each arm in its own process "
                 f"({MEMORY_WARMUP}+{MEMORY_STEPS} steps)")
    result["isolation"] = result["fairness"]["isolation"] = isolation
    result["memory_pass"] = {"steps": MEMORY_STEPS, "warmup": MEMORY_WARMUP, "fairness": peaks["fairness"]}


def arm_config(config: Config, arm: ArmSpec, weights_path: Path, arm_dir: Path) -> Config:
    """The config one arm trains with: its freeze spec and mode, the shared initial weights, its folder.

    Validation data is dropped because a comparison never evaluates, so no arm pays to build it.
    Only ``cached`` arms use the feature cache. ``plain`` arms put BatchNorm in train mode and turn
    the frozen-prefix path off (their optimizer is replaced by the arm itself).
    """
    data = config.to_dict()
    data["freeze"] = dict(arm.freeze)
    data["model"]["weights"] = str(weights_path)
    data["data"]["val_size"] = 0
    data["train"]["feature_cache"] = "on" if arm.mode == "cached" else "off"
    if arm.mode == "plain":
        data["freeze"]["batchnorm"] = "train"
        data["train"]["fold_batchnorm"] = False
    data["output"] = {"dir": str(arm_dir), "overwrite": True}
    return Config.model_validate(data)


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
    _, _, decision = assess(model, plan, auto)
    return None if decision.enabled else decision.reason


def _folder(arm_name: str) -> str:
    return arm_name.replace(":", "-")


def _start(configs: list[Config], arms: list[ArmSpec], isolate: bool) -> dict:
    runners = {}
    try:
        for cfg, arm in zip(configs, arms, strict=True):
            runners[arm.name] = ProcessArm(cfg, arm) if isolate else InlineArm(cfg, arm)
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def _call_all(runners: dict, command: str) -> dict:
    # Submit to every arm first, so that worker processes set up (import torch...) in parallel.
    for runner in runners.values():
        runner.submit(command)
    return {name: runner.wait() for name, runner in runners.items()}


def _plan(arms: list[ArmSpec], steps: int, warmup: int, block: int) -> list[tuple[str, str, int]]:
    names = [a.name for a in arms]
    # Cached arms fill their cache first, one after another, so each fill time is measured alone.
    turns = [(a.name, "fill", 0) for a in arms if a.mode == "cached"]
    turns += [(name, "warmup", warmup) for name in names] if warmup else []
    return turns + [(name, "timed", n) for name, n in schedule(names, steps, block)]


# --------------------------------------------------------------------------------------------
# Results


def assemble(arms: list[ArmSpec], infos: dict, finals: dict, meta: dict) -> dict:
    """Merges what each arm reported into the result: per-arm figures, speedups and fairness checks.

    Speedups are relative to the ``full`` arm: measured is its median step time over the arm's,
    FLOP-predicted is its FLOPs per step over the arm's.
    """
    out_arms = {}
    for arm in arms:
        info, final = infos[arm.name], finals[arm.name]
        out_arms[arm.name] = {
            "label": arm.label,
            "mode": arm.mode,
            "depth": arm.depth,
            "freeze": arm.freeze,
            "params": info["params"],
            "trainable_share": info["params"]["trainable"] / info["params"]["total"],
            "flops_per_step": info["flops"]["total"],
            "flops": info["flops"],
            "frozen_batchnorm_layers": info["frozen_batchnorm_layers"],
            "execution": info["execution"],
            "initial_weights_sha256": info["initial_weights_sha256"],
            **final,
        }
    base = out_arms[BASELINE]
    for name, arm in out_arms.items():
        arm["speedup"] = _speedups(base, arm)
        arm["memory_saved_bytes"] = _saved(base["memory"]["peak_bytes"], arm["memory"]["peak_bytes"])
        _against_siblings(name, arm, out_arms)
    devices = sorted({info["device"] for info in infos.values()})
    return {
        "freezetune_version": __version__,
        "device": devices[0] if len(devices) == 1 else devices,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "freezetune": __version__},
        **meta,
        "fairness": {
            "same_initial_weights": len({a["initial_weights_sha256"] for a in infos.values()}) == 1,
            "same_batches": len({f["batches_sha256"] for f in finals.values()}) == 1,
            "same_steps": len({f["steps"] for f in finals.values()}) == 1,
            "order": "round-robin blocks: " + " ".join(a.name for a in arms) + " ...",
            "isolation": meta["isolation"],
        },
        "arms": out_arms,
    }


def _speedups(base: dict, arm: dict) -> dict:
    base_t, arm_t = base["timing"]["step_median_s"], arm["timing"]["step_median_s"]
    return {
        "measured": base_t / arm_t if base_t and arm_t else None,
        "flop_predicted": base["flops_per_step"] / arm["flops_per_step"] if arm["flops_per_step"] else None,
    }


def _against_siblings(name: str, arm: dict, arms: dict) -> None:
    """Adds how an arm compares with the other modes of the same freeze spec.

    ``speedup.vs_plain`` is the plain arm's median step time over this arm's; a cached arm also
    gets ``loss_max_abs_diff_vs_optimized``, the largest per-step loss difference from the
    uncached optimized arm, which trains the same steps on the same weights and data.
    """
    stem = name.split(":", 1)[0]
    plain, optimized = arms.get(f"{stem}:plain"), arms.get(stem)
    if arm["mode"] in ("optimized", "cached") and plain is not None:
        arm["speedup"]["vs_plain"] = _ratio(plain["timing"]["step_median_s"], arm["timing"]["step_median_s"])
    if arm["mode"] == "cached" and optimized is not None:
        pairs = zip(arm["losses"], optimized["losses"], strict=False)
        arm["loss_max_abs_diff_vs_optimized"] = max((abs(a - b) for a, b in pairs), default=None)


def arm_mode(arm: dict, name: str) -> str:
    """An arm's mode; results written before modes existed count as ``optimized`` (or ``full``)."""
    return arm.get("mode") or ("full" if name == BASELINE else "optimized")


def by_depth(arms: dict) -> list[tuple[str | None, dict]]:
    """Groups arms by freeze spec, in order: ``[(depth or None for full, {mode: arm}), ...]``.

    Arms of a frozen-vs-full result all group under their name's stem (``frozen``).
    """
    groups: dict = {}
    for name, a in arms.items():
        depth = None if name == BASELINE else (a.get("depth") or name.split(":", 1)[0])
        groups.setdefault(depth, {})[arm_mode(a, name)] = a
    return list(groups.items())


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _saved(base: int | None, arm: int | None) -> int | None:
    return None if base is None or arm is None else base - arm


def headline(result: dict, arm_name: str) -> dict:
    """The frozen-vs-full headline for one arm: speedups, memory saved and freeze integrity."""
    arm, base = result["arms"][arm_name], result["arms"][BASELINE]
    saved = arm["memory_saved_bytes"]
    base_peak = base["memory"]["peak_bytes"]
    return {
        "speedup": arm["speedup"],
        "memory_saved": {"bytes": saved,
                         "fraction": saved / base_peak if saved is not None and base_peak else None},
        "freeze_integrity": arm["freeze_integrity"],
    }


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
    out_dir = prepare_run_dir(out or Path(config.output.dir) / "compare", config.output.overwrite)
    result = measure(config, arms, out_dir, steps, warmup, block, memory, progress)
    result = {"kind": "frozen-vs-full", **result, **headline(result, "frozen")}
    _write(result, out_dir, "compare")
    return result


def depths(
    config: Config,
    out: str | Path | None = None,
    steps: int = 20,
    warmup: int | None = None,
    block: int | None = None,
    memory: bool = True,
    progress: Progress | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Runs ``compare depths`` (full, then frozen through stem ... layer4) and writes depths.*.

    Arguments as for :func:`frozen_vs_full`; the output folder defaults to ``<output.dir>/depths``.

    Returns:
        The result; ``freeze_integrity.ok`` is true only if no arm's frozen tensors changed.
    """
    arms = depth_arms(config, modes=modes)
    out_dir = prepare_run_dir(out or Path(config.output.dir) / "depths", config.output.overwrite)
    result = measure(config, arms, out_dir, steps, warmup, block, memory, progress)
    integrity = {name: arm["freeze_integrity"]["ok"] for name, arm in result["arms"].items()}
    result = {"kind": "depths", **result, "freeze_integrity": {"ok": all(integrity.values()), "arms": integrity}}
    _write(result, out_dir, "depths")
    return result


def _write(result: dict, out_dir: Path, stem: str) -> None:
    from freezetune.render.plot import comparison_plot

    result["out_dir"] = str(out_dir)
    result["files"] = {ext: str(out_dir / f"{stem}.{ext}") for ext in ("json", "csv", "png")}
    write_json(out_dir / f"{stem}.json", result)
    atomic_write(out_dir / f"{stem}.csv", lambda f: f.write(to_csv(result)), mode="w")
    comparison_plot(result, out_dir / f"{stem}.png")


CSV_COLUMNS = (
    "arm", "label", "mode", "depth", "params_trainable", "params_frozen", "params_total", "trainable_share",
    "flops_per_step", "flops_forward", "flops_backward", "speedup_flop_predicted", "speedup_measured",
    "step_median_s", "step_p10_s", "step_p90_s", "samples_per_s", "steps_timed", "warmup_steps",
    "peak_memory_bytes", "memory_kind", "memory_saved_bytes", "optimizer_state_bytes", "loss_first",
    "loss_last", "freeze_integrity_ok", "frozen_tensors_checked", "speedup_vs_plain",
    "loss_max_abs_diff_vs_optimized", "frozen_bn_layers_changed", "cache_fill_s",
)


def csv_rows(result: dict) -> list[dict]:
    """One flat row per arm, with the columns of :data:`CSV_COLUMNS`."""
    rows = []
    for name, a in result["arms"].items():
        t, p = a["timing"], a["params"]
        rows.append({
            "arm": name, "label": a["label"], "mode": a["mode"], "depth": a["depth"],
            "params_trainable": p["trainable"],
            "params_frozen": p["frozen"], "params_total": p["total"],
            "trainable_share": a["trainable_share"], "flops_per_step": a["flops_per_step"],
            "flops_forward": a["flops"]["forward"], "flops_backward": a["flops"]["backward"],
            "speedup_flop_predicted": a["speedup"]["flop_predicted"], "speedup_measured": a["speedup"]["measured"],
            "step_median_s": t["step_median_s"], "step_p10_s": t["step_p10_s"], "step_p90_s": t["step_p90_s"],
            "samples_per_s": t["samples_per_s"], "steps_timed": t["steps_timed"],
            "warmup_steps": t["warmup_steps"], "peak_memory_bytes": a["memory"]["peak_bytes"],
            "memory_kind": a["memory"]["kind"], "memory_saved_bytes": a["memory_saved_bytes"],
            "optimizer_state_bytes": a["optimizer_state_bytes"], "loss_first": a["loss"]["first"],
            "loss_last": a["loss"]["last"], "freeze_integrity_ok": a["freeze_integrity"]["ok"],
            "frozen_tensors_checked": a["freeze_integrity"]["tensors_checked"],
            "speedup_vs_plain": a["speedup"].get("vs_plain"),
            "loss_max_abs_diff_vs_optimized": a.get("loss_max_abs_diff_vs_optimized"),
            "frozen_bn_layers_changed": a["frozen_batchnorm_drift"]["layers_changed"],
            "cache_fill_s": (a.get("cache") or {}).get("cache_fill_s"),
        })
    return rows


def to_csv(result: dict) -> str:
    """The result's per-arm rows as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


def _freeze_dict(spec: FreezeConfig) -> dict:
    # An unfreeze schedule is left out: a comparison times one freeze state, not a curriculum.
    data = spec.model_dump(mode="json", exclude={"schedule"})
    return {k: v for k, v in data.items() if v is not None}


def _describe_freeze(spec: FreezeConfig) -> str:
    if spec.until is not None:
        return "fc only" if spec.until == DEPTHS[-1] else f"frozen ..{spec.until}"
    if spec.trainable is not None:
        return "training " + ", ".join(spec.trainable)
    return "frozen " + ", ".join(spec.frozen or [])
