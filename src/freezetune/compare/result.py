"""Comparison results: the typed records written to compare.json/depths.json, and their flat rows.

:class:`CompareResult` and :class:`ArmResult` name every key a result holds (readers outside the
project depend on them) and carry ``schema_version``; bump it when a key changes meaning or goes
away. :func:`flat_row` is the one flattening of an arm, behind ``compare.csv`` and the benchmark.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Literal

import torch
import torchvision

from freezetune import __version__
from freezetune.compare.arms import BASELINE, ArmSpec
from freezetune.records import (
    Execution,
    LossEnds,
    ParamCounts,
    Record,
    TimingStats,
    Versions,
    WeightsOrigin,
)

COMPARE_SCHEMA_VERSION = 1


class CompareVersions(Versions):
    """The library versions a comparison ran with, freezetune's included."""

    freezetune: str


class ModuleFlops(Record):
    """One top-level module's FLOPs of a training step."""

    forward: int
    backward: int


class FlopCounts(Record):
    """FLOPs of one training step (``measure.flops.step_flops``; a cached arm's without its prefix)."""

    forward: int
    backward: int
    total: int
    by_module: dict[str, ModuleFlops]  # keyed by top-level module name (``layer3``)


class ArmTiming(TimingStats):
    """An arm's timed steps: their summary, the warm-up steps left out, and every timed step."""

    warmup_steps: int
    step_times_s: list[float]


class ArmMemory(Record):
    """An arm's peak memory; which keys are present depends on where and whether it was measured.

    Not measured (arms sharing one process): ``peak_bytes`` null and ``kind`` only. CUDA:
    ``allocated_before_bytes`` too. CPU: ``peak_rss_bytes``, ``rss_before_bytes`` and ``peak_reset``.
    Measured, its parts too (``measure.memory.memory_parts``): every weight, the trainable ones'
    gradients, the optimizer state, and what one step saved for backward (a saved-tensor hook).
    """

    peak_bytes: int | None
    kind: str  # cuda_max_allocated | cpu_peak_rss_growth | not measured (...)
    peak_rss_bytes: int | None = None
    allocated_before_bytes: int | None = None
    rss_before_bytes: int | None = None
    peak_reset: bool | None = None
    param_bytes: int | None = None
    grad_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    saved_activation_bytes: int | None = None


class BatchNormDrift(Record):
    """How many frozen layers' BatchNorm statistics changed while the arm trained."""

    layers_checked: int
    layers_changed: int
    changed: list[str]  # the first five changed layers


class ArmIntegrity(Record):
    """An arm's freeze-integrity check: every frozen tensor's hash before and after training."""

    ok: bool
    tensors_checked: int
    changed: list[str]
    sha256_before: str
    sha256_after: str


class DepthsIntegrity(Record):
    """``compare depths``' freeze integrity: true only if no arm's frozen tensors changed."""

    ok: bool
    arms: dict[str, bool]  # per arm, its own ``freeze_integrity.ok``


class CacheFill(Record):
    """A cached arm's feature-cache fill, timed alone before its steps."""

    cache_fill_s: float
    cache_bytes: int


class Speedup(Record):
    """Speedups against the ``full`` arm (``vs_plain``: against the same spec's plain arm, where there is one)."""

    measured: float | None
    flop_predicted: float | None
    vs_plain: float | None = None


class CompareData(Record):
    """The data every arm trained on."""

    source: str
    image_size: int
    batch_size: int


class CompareSteps(Record):
    """Steps per arm: timed, untimed warm-up, and per round-robin turn."""

    timed: int
    warmup: int
    block: int


class SkippedArm(Record):
    """An arm left out, and why (a cached arm whose cache would not be correct)."""

    arm: str
    reason: str


class Fairness(Record):
    """Whether every arm started alike, and how they took turns."""

    same_initial_weights: bool
    same_batches: bool
    same_steps: bool
    order: str
    isolation: str


class MemoryPass(Record):
    """The process-isolated pass that measured each arm's memory, and its own fairness checks."""

    steps: int
    warmup: int
    fairness: Fairness


class MemorySaved(Record):
    """The frozen arm's memory saved against ``full`` (null when either was not measured)."""

    bytes: int | None
    fraction: float | None


class ArmResult(Record):
    """One arm of a comparison."""

    label: str
    mode: str
    depth: str | None
    # The arm's ``freeze`` config section as plain data (``config.FreezeConfig`` without unset keys):
    # its shape is the config's, so it is left open here rather than declared a second time.
    freeze: dict[str, Any]
    params: ParamCounts
    trainable_share: float
    flops_per_step: int
    flops: FlopCounts
    frozen_batchnorm_layers: int
    execution: Execution
    initial_weights_sha256: str
    timing: ArmTiming
    memory: ArmMemory
    optimizer_state_bytes: int
    loss: LossEnds
    losses: list[float]
    frozen_batchnorm_drift: BatchNormDrift
    steps: int
    batches_sha256: str
    freeze_integrity: ArmIntegrity
    speedup: Speedup
    memory_saved_bytes: int | None
    cache: CacheFill | None = None
    loss_max_abs_diff_vs_optimized: float | None = None


class CompareResult(Record):
    """What ``compare frozen-vs-full`` (``kind: frozen-vs-full``) or ``compare depths`` writes."""

    schema_version: int = COMPARE_SCHEMA_VERSION
    kind: Literal["frozen-vs-full", "depths"]
    freezetune_version: str
    device: str | list[str]
    versions: CompareVersions
    model: str
    weights: WeightsOrigin
    data: CompareData
    steps: CompareSteps
    isolation: str
    skipped: list[SkippedArm]
    fairness: Fairness
    arms: dict[str, ArmResult]
    memory_pass: MemoryPass | None = None
    speedup: Speedup | None = None  # frozen-vs-full: the frozen arm's headline
    memory_saved: MemorySaved | None = None
    # frozen-vs-full: the frozen arm's check; depths: every arm's ``ok``
    freeze_integrity: ArmIntegrity | DepthsIntegrity | None = None
    out_dir: str | None = None
    files: dict[str, str] | None = None  # by extension: json, csv, png

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        """Validates a result dict against the record (raises pydantic's error on a missing key)."""
        return cls.model_validate({"schema_version": COMPARE_SCHEMA_VERSION, **data})

    def to_dict(self) -> dict:
        """Plain data for JSON: exactly the keys the result has (optional ones only where set)."""
        return self.model_dump(mode="json", exclude_unset=True)


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
        arm["memory_saved_bytes"] = saved_bytes(base["memory"]["peak_bytes"], arm["memory"]["peak_bytes"])
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


def saved_bytes(base: int | None, arm: int | None) -> int | None:
    """Bytes the arm saves against the baseline (None when either was not measured)."""
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




CSV_COLUMNS = (
    "arm", "label", "mode", "depth", "params_trainable", "params_frozen", "params_total", "trainable_share",
    "flops_per_step", "flops_forward", "flops_backward", "speedup_flop_predicted", "speedup_measured",
    "step_median_s", "step_p10_s", "step_p90_s", "samples_per_s", "steps_timed", "warmup_steps",
    "peak_memory_bytes", "memory_kind", "memory_saved_bytes", "optimizer_state_bytes", "loss_first",
    "loss_last", "freeze_integrity_ok", "frozen_tensors_checked", "speedup_vs_plain",
    "loss_max_abs_diff_vs_optimized", "frozen_bn_layers_changed", "frozen_bn_layers_checked", "cache_fill_s",
)


def flat_row(name: str, a: dict) -> dict:
    """One arm as a flat row: the one flattening behind compare.csv and the benchmark's tables."""
    t, p = a["timing"], a["params"]
    drift = a["frozen_batchnorm_drift"]
    return {
        "arm": name, "label": a["label"], "mode": a["mode"], "depth": a["depth"],
        "params_trainable": p["trainable"], "params_frozen": p["frozen"], "params_total": p["total"],
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
        "frozen_bn_layers_changed": drift["layers_changed"],
        "frozen_bn_layers_checked": drift["layers_checked"],
        "cache_fill_s": (a.get("cache") or {}).get("cache_fill_s"),
    }


def csv_rows(result: dict) -> list[dict]:
    """One flat row per arm (:func:`flat_row`), in arm order."""
    return [flat_row(name, a) for name, a in result["arms"].items()]


def to_csv(result: dict) -> str:
    """The result's per-arm rows as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


