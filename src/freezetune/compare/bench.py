"""The benchmark: the freeze-depth sweep over a fixed matrix of image and batch sizes on this device.

Each cell of the matrix is one :func:`freezetune.compare.run.run_comparison` of the depth arms (full,
frozen through stem ... layer4) on synthetic data with random-init weights (speed does not depend
on the weights' values), so the benchmark needs no download and no dataset. The result is written
as ``benchmarks/<device>-torch<version>.json`` plus a markdown table of the same figures.

:func:`gate` is the CI check: freezing everything but fc must pay off on CPU.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from pydantic import BaseModel, ConfigDict

from freezetune import __version__
from freezetune.atomic import write_json, write_text
from freezetune.compare.arms import BASELINE, DEPTHS, MODES, depth_arms
from freezetune.compare.result import arm_mode, by_depth, flat_row
from freezetune.compare.run import MEMORY_STEPS, MEMORY_WARMUP, measure
from freezetune.config import Config
from freezetune.measure.device import resolve_device
from freezetune.render.format import fmt_bytes, fmt_seconds, share_text
from freezetune.render.format import fmt_speedup as _x

DEFAULT_SIZES = (64, 224)
DEFAULT_BATCH_SIZES = (8, 32)
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 2
# The CI matrix: small enough for a few minutes on 2 CPU cores, both image sizes still covered.
CI_SIZES = (64, 224)
CI_BATCH_SIZES = (8,)
CI_STEPS = 10
CI_WARMUP = 2
GATE_ARM = "layer4"  # frozen through layer4: only fc trains
MIN_SPEEDUP = 1.5
MIN_FRACTION_OF_PREDICTED = 0.8
# freezetune's path must not be slower than the plain loop: across a cell's freeze points (geometric
# mean) at least as fast, and no single one much slower (10 steps on a shared CPU are noisy).
MIN_VS_PLAIN_MEAN = 1.0
MIN_VS_PLAIN = 0.8
# The cached arm trains on the very features the optimized arm computes, so their losses agree.
MAX_CACHED_LOSS_DIFF = 1e-3
BENCH_SCHEMA_VERSION = 1


def bench_config(image_size: int, batch_size: int, steps: int, warmup: int, device: str = "auto",
                 model: str = "resnet18") -> Config:
    """The config of one benchmark cell: synthetic data with just enough images for the steps."""
    return Config.model_validate({
        "seed": 0,
        "device": device,
        "model": {"name": model, "num_classes": 10, "weights": "none"},
        "data": {"source": "synthetic", "image_size": image_size, "batch_size": batch_size,
                 "train_size": batch_size * (steps + warmup), "val_size": 0},
        "train": {"warmup_steps": warmup},
        "output": {"dir": "unused", "overwrite": True},
    })


def run_bench(
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    device: str = "auto",
    block: int | None = None,
    memory: bool = True,
    on_cell: Callable[[dict], None] | None = None,
    depths: tuple[str, ...] = DEPTHS,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Runs the depth sweep for every (image size, batch size) cell.

    Timing and memory are measured in two passes (see :func:`freezetune.compare.run.measure`).

    Args:
        sizes: Image sizes in pixels.
        batch_sizes: Batch sizes.
        steps: Timed steps per arm and cell.
        warmup: Untimed steps per arm and cell.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        block: Steps per turn (see :func:`freezetune.compare.run.default_block`).
        memory: Run the memory pass (per-arm peak memory); without it memory is not measured.
        on_cell: Called with each cell's summary as soon as it is measured.
        depths: Freeze points swept besides full (all of them by default).
        modes: How each freeze point is run: plain, optimized, cached (all by default).

    Returns:
        ``{"device", "device_slug", "versions", "matrix", "cells": [...]}``.
    """
    resolved = resolve_device(device)
    started = time.time()
    load_before = _load_average()
    cells = []
    for size in sizes:
        for batch in batch_sizes:
            cfg = bench_config(size, batch, steps, warmup, device)
            with tempfile.TemporaryDirectory(prefix="freezetune-bench-") as tmp:
                result = measure(cfg, depth_arms(cfg, depths, modes), Path(tmp), steps, warmup, block, memory)
            cell = cell_summary(result)
            cells.append(cell)
            if on_cell:
                on_cell(cell)
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "freezetune_version": __version__,
        "device": cells[0]["device"] if cells else str(resolved),
        "device_slug": device_slug(resolved),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "freezetune": __version__},
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "wall_s": time.time() - started,
        # Other processes' load skews CPU timings; say how busy the machine was.
        "load_average_1min": {"start": load_before, "end": _load_average()},
        "matrix": {"image_sizes": list(sizes), "batch_sizes": list(batch_sizes), "steps": steps,
                   "warmup": warmup, "modes": list(modes),
                   "arms": [a.name for a in depth_arms(bench_config(64, 1, 1, 0), depths, modes)],
                   "model": "resnet18", "weights": "random init (speed does not depend on values)",
                   "data": "synthetic",
                   "isolation": "timing: all arms in one process, interleaved; "
                   + (f"memory: each arm in its own process ({MEMORY_WARMUP}+{MEMORY_STEPS} steps)" if memory
                      else "memory: not measured")},
        "cells": cells,
    }


def cell_summary(result: dict) -> dict:
    """The figures of one comparison that the benchmark keeps: each arm's flat row (see ``flat_row``)."""
    return {
        "image_size": result["data"]["image_size"],
        "batch_size": result["data"]["batch_size"],
        "device": result["device"],
        "fairness": result["fairness"],
        "skipped": result.get("skipped", []),
        "arms": {name: _without_name(flat_row(name, a)) for name, a in result["arms"].items()},
    }


def _without_name(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "arm"}


class BenchResult(BaseModel):
    """What the benchmark JSON holds; ``schema_version`` says which layout a file has."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = BENCH_SCHEMA_VERSION
    freezetune_version: str
    device: str
    device_slug: str
    versions: dict[str, str]
    created: str
    wall_s: float
    load_average_1min: dict[str, float | None]
    matrix: dict[str, Any]
    cells: list[dict[str, Any]]
    command: str | None = None


def gate(bench: dict, arm: str = GATE_ARM, min_speedup: float = MIN_SPEEDUP,
         min_fraction: float = MIN_FRACTION_OF_PREDICTED) -> list[str]:
    """The CI check. Returns one line per failure (empty: passed).

    Fails a cell when any arm's frozen tensors changed, the arms were not comparable (different
    initial weights, batches or step counts) or a cached arm's losses left the uncached ones'; and,
    on CPU, when optimized arms are slower than their plain siblings (:data:`MIN_VS_PLAIN_MEAN`,
    :data:`MIN_VS_PLAIN`) or
    the ``arm`` (fc only) measured speedup is below ``min_speedup`` or below ``min_fraction`` of its
    FLOP-predicted speedup.
    """
    failures = []
    for cell in bench["cells"]:
        where = f"{cell['image_size']}px batch {cell['batch_size']}"
        for key in ("same_initial_weights", "same_batches", "same_steps"):
            if not cell["fairness"][key]:
                failures.append(f"{where}: arms not comparable ({key} is false)")
        for name, a in cell["arms"].items():
            if not a["freeze_integrity_ok"]:
                failures.append(f"{where}: arm {name}: frozen tensors changed during training")
            diff = a.get("loss_max_abs_diff_vs_optimized")
            if diff is not None and diff > MAX_CACHED_LOSS_DIFF:
                failures.append(f"{where}: arm {name}: cached losses differ from uncached by {diff:.2g} "
                                f"(> {MAX_CACHED_LOSS_DIFF:g})")
        if not str(cell["device"]).startswith("cpu"):
            continue
        failures += _vs_plain_failures(where, cell["arms"])
        if arm not in cell["arms"]:
            continue
        measured = cell["arms"][arm]["speedup_measured"]
        predicted = cell["arms"][arm]["speedup_flop_predicted"]
        if measured is None or measured < min_speedup:
            failures.append(f"{where}: {arm} measured speedup {_x(measured)} < {min_speedup}x")
        elif predicted and measured < min_fraction * predicted:
            failures.append(f"{where}: {arm} measured speedup {_x(measured)} < {min_fraction} x "
                            f"FLOP-predicted {_x(predicted)} = {_x(min_fraction * predicted)}")
    return failures


SUMMARY_COLUMNS = ("image", "batch", "frozen through", "trainable", "FLOP-predicted",
                   "plain requires_grad=False", "freezetune", "freezetune vs plain", "freezetune + cache",
                   "cache FLOP-predicted", "BN layers drifted (plain)", "cache loss diff")
def _vs_plain_failures(where: str, arms: dict) -> list[str]:
    ratios = {n: a["speedup_vs_plain"] for n, a in arms.items()
              if a.get("mode") == "optimized" and a.get("speedup_vs_plain")}
    out = [f"{where}: arm {n}: freezetune's path is slower than the plain loop ({_x(r)} < {MIN_VS_PLAIN}x)"
           for n, r in ratios.items() if r < MIN_VS_PLAIN]
    if ratios:
        mean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        if mean < MIN_VS_PLAIN_MEAN:
            out.append(f"{where}: freezetune's path is slower than the plain loop on average over "
                       f"{', '.join(ratios)} ({_x(mean)} < {MIN_VS_PLAIN_MEAN}x, geometric mean)")
    return out


MD_COLUMNS = ("image", "batch", "arm", "mode", "trainable", "GFLOPs/step", "FLOP-predicted speedup",
              "measured speedup", "step median", "p10 / p90", "samples/s", "peak memory",
              "optimizer state", "loss first -> last", "frozen intact")


def markdown_table(bench: dict) -> str:
    """The benchmark as markdown: a line saying what it is, the per-depth summary, then every arm."""
    kind = next((a["memory_kind"] for c in bench["cells"] for a in c["arms"].values()), "-")
    lines = [
        f"Device: {bench['device']}; torch {bench['versions']['torch']}; {bench['matrix']['model']}, "
        f"{bench['matrix']['steps']} timed steps per arm after {bench['matrix']['warmup']} warm-up, "
        f"arms interleaved; peak memory = {kind}; speedups relative to full.",
        "Weights are random (step cost does not depend on their values), so the loss columns only "
        "show that every arm trained the same steps; they say nothing about accuracy." + _load_note(bench),
        "",
        summary_table(bench),
        "Every arm:",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "|".join("---" if c in ("arm", "mode", "trainable") else "--:" for c in MD_COLUMNS) + "|",
    ]
    for cell in bench["cells"]:
        for name, a in cell["arms"].items():
            arm = name if name == BASELINE else f"{name} ({a['label']})"
            lines.append("| " + " | ".join([
                f"{cell['image_size']}px", str(cell["batch_size"]), arm, arm_mode(a, name),
                share_text(a["trainable_share"]),
                f"{a['flops_per_step'] / 1e9:.2f}", _x(a["speedup_flop_predicted"]),
                f"**{_x(a['speedup_measured'])}**", fmt_seconds(a["step_median_s"]),
                f"{fmt_seconds(a['step_p10_s'])} / {fmt_seconds(a['step_p90_s'])}",
                f"{a['samples_per_s']:.1f}" if a["samples_per_s"] else "-",
                fmt_bytes(a["peak_memory_bytes"]), fmt_bytes(a["optimizer_state_bytes"]),
                f"{a['loss_first']:.3f} -> {a['loss_last']:.3f}",
                "OK" if a["freeze_integrity_ok"] else "CHANGED",
            ]) + " |")
    return "\n".join(lines) + "\n"


def summary_table(bench: dict) -> str:
    """One row per (cell, freeze point): plain vs freezetune vs freezetune + cache, speedups over full.

    Each speedup cell reads ``measured (step median)``. "BN layers drifted" counts the frozen
    layers whose BatchNorm statistics the plain loop changed; "cache loss diff" is the largest
    per-step loss difference between the cached and uncached freezetune arms.
    """
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |",
             "|" + "|".join("---" if c in ("frozen through", "trainable") else "--:" for c in SUMMARY_COLUMNS) + "|"]
    for cell in bench["cells"]:
        for depth, by_mode in by_depth(cell["arms"]):
            opt = by_mode.get("optimized") or by_mode.get("full")
            plain, cached = by_mode.get("plain"), by_mode.get("cached")
            drift = f"{plain['frozen_bn_layers_changed']} of {plain['frozen_bn_layers_checked']}" if plain else "-"
            diff = cached.get("loss_max_abs_diff_vs_optimized") if cached else None
            lines.append("| " + " | ".join([
                f"{cell['image_size']}px", str(cell["batch_size"]),
                "nothing (full fine-tuning)" if depth is None else _depth_label(depth, opt),
                share_text(opt["trainable_share"]), _x(opt["speedup_flop_predicted"]),
                _measured(plain), f"**{_measured(opt)}**", _x(opt.get("speedup_vs_plain")),
                f"**{_measured(cached)}**" if cached else "-",
                _x(cached["speedup_flop_predicted"]) if cached else "-", drift,
                "-" if diff is None else f"{diff:.1g}",
            ]) + " |")
    return "\n".join(lines) + "\n"


def _depth_label(depth: str, arm: dict) -> str:
    return f"{depth} (fc only)" if arm.get("label") == "fc only" else depth


def _measured(arm: dict | None) -> str:
    if arm is None:
        return "-"
    return f"{_x(arm['speedup_measured'])} ({fmt_seconds(arm['step_median_s'])})"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``cpu-2threads``, ``nvidia-h100-80gb-hbm3``..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device.index or 0)
    else:
        name = f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def output_stem(bench: dict) -> str:
    """``<device>-torch<version>``, e.g. ``cpu-2threads-torch2.14.1-cu130``."""
    version = re.sub(r"[^A-Za-z0-9.]+", "-", bench["versions"]["torch"])
    return f"{bench['device_slug']}-torch{version}"


def write_bench(bench: dict, out_dir: str | Path, command: str | None = None) -> tuple[Path, Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` (the table, and the command that made it).

    Returns:
        The JSON and markdown paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(bench)
    if command:
        bench = {**bench, "command": command}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(json_path, BenchResult.model_validate(bench).model_dump(mode="json", exclude_unset=True))
    made_by = f"Made by `{command}` on {bench['created']}.\n\n" if command else ""
    write_text(md_path, f"# freezetune benchmark: {stem}\n\n{made_by}{markdown_table(bench)}")
    return json_path, md_path


def _load_note(bench: dict) -> str:
    load = bench.get("load_average_1min") or {}
    if load.get("start") is None:
        return ""
    return f" Host load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end."


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
