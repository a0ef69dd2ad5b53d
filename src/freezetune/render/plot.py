"""Figures of a comparison: what freezing buys, at a glance.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg), never through pyplot, so
plotting neither needs a display nor changes the backend of a caller's own matplotlib session.

Every frozen freeze spec may be run in several modes (:data:`freezetune.compare.arms.MODES`); each mode
keeps one colour in every panel: the plain ``requires_grad=False`` loop, freezetune's optimized
path, and that path with the feature cache. Any subset of modes plots, and so do results written
before modes existed (an arm without ``mode`` is the optimized path, ``full`` is the baseline).
Figures are drawn from result records alone (plain dicts), so this module imports no comparison code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from freezetune.atomic import atomic_write
from freezetune.render.format import fmt_speedup_short as _x
from freezetune.render.format import share_text, size_text

MEASURED = "#d1495b"  # measured figures: warm red
PREDICTED = "#00798c"  # FLOP arithmetic: teal
FORWARD, BACKWARD = "#30638e", "#9fc2e0"
MIB = 1024**2
# One colour and one legend name per mode, the same in every panel and both figures.
MODE_COLORS = {"full": "#2e4057", "plain": "#8d99ae", "optimized": MEASURED, "cached": "#edae49"}
MODE_LABELS = {
    "full": "full fine-tuning",
    "plain": "plain loop (requires_grad=False)",
    "optimized": "freezetune",
    "cached": "freezetune + feature cache",
}
# The modes of frozen arms in legend order; results name the full fine-tuning arm "full".
FROZEN_MODES = tuple(m for m in MODE_LABELS if m != "full")
# A panel switches to a log scale when its largest value is this many times its smallest, so
# that a cached arm 70x faster than full does not flatten the 1.1x differences of the others.
LOG_RATIO = 20.0
GROUP_WIDTH = 0.8  # share of a freeze point's x slot taken by its bars


def comparison_plot(result: dict, path: str | Path) -> Path:
    """Draws a comparison result to a PNG: one bar per arm for frozen-vs-full, grouped bars for depths.

    Args:
        result: What :func:`freezetune.compare.run.frozen_vs_full` or ``depths`` returned.
        path: The PNG to write (atomically).

    Returns:
        The path written.
    """
    fig = depths_figure(result) if result.get("kind") == "depths" else frozen_vs_full_figure(result)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


# --------------------------------------------------------------------------------------------
# Arms by freeze point and mode


def arm_mode(name: str, arm: dict) -> str:
    """An arm's mode; results written before modes existed get one from the arm's name.

    ``full`` is the baseline; a ``:plain`` or ``:cached`` suffix names those modes; anything else
    is freezetune's optimized path.
    """
    if arm.get("mode"):
        return arm["mode"]
    if name == "full":
        return "full"
    suffix = name.rpartition(":")[2] if ":" in name else ""
    return suffix if suffix in FROZEN_MODES else "optimized"


def arm_group(name: str, arm: dict) -> str:
    """The freeze point an arm belongs to: its ``depth``, else its name without the mode suffix."""
    return arm.get("depth") or name.split(":", 1)[0]


@dataclass
class Sweep:
    """The frozen arms of a depth sweep, laid out as freeze points (x groups) by modes (bars).

    Attributes:
        groups: Freeze points, shallowest first (the result's arm order for names that are not
            ResNet freeze points).
        modes: Modes that occur among the frozen arms, in :data:`FROZEN_MODES` order.
        cells: ``{(group, mode): arm name}`` for the arms that exist.
        baseline: The name of the full fine-tuning arm, or None if the result has none.
    """

    groups: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    baseline: str | None = None

    def offset(self, mode: str) -> float:
        """Where a mode's bar sits relative to its group's centre; every group uses the same slots."""
        return (self.modes.index(mode) - (len(self.modes) - 1) / 2) * self.width

    @property
    def width(self) -> float:
        """Width of one bar."""
        return GROUP_WIDTH / max(1, len(self.modes))

    def bars(self, mode: str) -> list[tuple[float, str]]:
        """``(x, arm name)`` of each of a mode's bars, in group order; groups without the mode are skipped."""
        return [(i + self.offset(mode), self.cells[(g, mode)])
                for i, g in enumerate(self.groups) if (g, mode) in self.cells]


def sweep_layout(arms: dict) -> Sweep:
    """Groups a result's arms by freeze point and mode (see :class:`Sweep`).

    Args:
        arms: ``result["arms"]``.

    Returns:
        The layout; the full arm is kept apart as the baseline.
    """
    sweep = Sweep()
    found_modes = set()
    for name, arm in arms.items():
        mode = arm_mode(name, arm)
        if mode == "full":
            sweep.baseline = sweep.baseline or name
            continue
        group = arm_group(name, arm)
        if group not in sweep.groups:
            sweep.groups.append(group)
        sweep.cells.setdefault((group, mode), name)
        found_modes.add(mode)
    known = sorted((g for g in sweep.groups if _resnet_depth(g) is not None), key=_resnet_depth)
    sweep.groups = known + [g for g in sweep.groups if g not in known]
    sweep.modes = [m for m in FROZEN_MODES if m in found_modes] + sorted(found_modes - set(FROZEN_MODES))
    return sweep


def _resnet_depth(point: str) -> tuple[int, int] | None:
    """Where a ResNet freeze point sits, for ordering: ``stem`` first, ``layer2.0`` before ``layer2``."""
    if point == "stem":
        return (0, 0)
    match = re.fullmatch(r"layer(\d+)(?:\.(\d+))?", point)
    if match is None:
        return None
    return (int(match.group(1)), int(match.group(2)) if match.group(2) is not None else 10**6)


def needs_log(values, ratio: float = LOG_RATIO) -> bool:
    """Whether positive values span more than ``ratio`` (max over min); None and non-positive values are ignored."""
    vals = [v for v in values if v is not None and v > 0]
    return len(vals) > 1 and max(vals) / min(vals) > ratio


def mode_color(mode: str) -> str:
    """The colour of a mode (grey for a mode this module does not know)."""
    return MODE_COLORS.get(mode, "#999999")


def mode_label(mode: str) -> str:
    """What a legend calls a mode."""
    return MODE_LABELS.get(mode, mode)


# --------------------------------------------------------------------------------------------
# Depth sweep


def depths_figure(result: dict) -> Figure:
    """The depth sweep: per freeze point one bar per mode, in four panels.

    Speedup over full (measured bars, FLOP-predicted markers), step time, memory, and the loss
    after the same steps; the full baseline is a horizontal line in each panel.
    """
    arms = result["arms"]
    sweep = sweep_layout(arms)
    fig = Figure(figsize=(14, 9.5), layout="constrained")
    panels = fig.subplot_mosaic([["speed", "speed", "speed"], ["time", "mem", "loss"]],
                                height_ratios=[1.15, 1])
    _speedup_panel(panels["speed"], sweep, arms)
    _time_panel(panels["time"], sweep, arms)
    _memory_panel(panels["mem"], sweep, arms)
    _loss_panel(panels["loss"], sweep, arms, result)
    x = list(range(len(sweep.groups)))
    for key, ax in panels.items():
        # The narrow bottom panels name the freeze point only; the wide top one adds the trainable share.
        ax.set_xticks(x, [_group_tick(sweep, arms, g, key == "speed") for g in sweep.groups], fontsize=8)
        ax.set_xlim(-0.6, len(sweep.groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    panels["speed"].set_xlabel("frozen through (trainable share of parameters)", fontsize=9)
    fig.suptitle(_title(result, "depth sweep"), fontsize=11)
    return fig


def _group_tick(sweep: Sweep, arms: dict, group: str, share: bool) -> str:
    arm = arms[next(name for (g, _), name in sweep.cells.items() if g == group)]
    fc = "(fc only)" if arm.get("label") == "fc only" else ""
    if share:
        return f"{group} {fc}\n{share_text(arm['trainable_share'])} trainable".replace(" \n", "\n")
    return f"{group}\n{fc}".rstrip()


def _speedup_panel(ax, sweep: Sweep, arms: dict) -> None:
    measured = [arms[n]["speedup"].get("measured") for n in sweep.cells.values()]
    predicted = [arms[n]["speedup"].get("flop_predicted") for n in sweep.cells.values()]
    log = needs_log([1.0, *measured, *predicted])
    # A cached arm's FLOP prediction can be 10,000x (the whole backbone skipped): on the axis it
    # would squeeze every measured bar into the bottom decade, so it is drawn at the top, labelled.
    uncached = [arms[n]["speedup"].get("flop_predicted") for (_, m), n in sweep.cells.items() if m != "cached"]
    top = max(v for v in [1.0, *measured, *uncached] if v) * (4 if log else 1.15)
    if log:
        ax.set_yscale("log")
    for mode in sweep.modes:
        bars = sweep.bars(mode)
        values = [arms[n]["speedup"].get("measured") or 0 for _, n in bars]
        ax.bar([x for x, _ in bars], values, sweep.width * 0.92, color=mode_color(mode), label=mode_label(mode))
    _predicted_markers(ax, sweep, arms, top if log else None)
    for x, name in (xn for mode in sweep.modes for xn in sweep.bars(mode)):
        speedup = arms[name]["speedup"]
        v, p = speedup.get("measured"), speedup.get("flop_predicted")
        if v:
            # Above the bar, or above its prediction marker where that sits just over the bar.
            y = max(v, p) if p and p < top and p < v * 1.5 else v
            ax.annotate(_x(v), (x, y), xytext=(0, 5 if y > v else 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7.5)
    ax.axhline(1, color=mode_color("full"), lw=1, ls="--", label="full fine-tuning (1x)")
    if log:
        ax.set_ylim(min(v for v in [1.0, *measured, *predicted] if v) / 1.6, top * 1.6)
    else:
        ax.set_ylim(0, max([1.0, *(v or 0 for v in measured + predicted)]) * 1.15)
    ax.set_title("Speedup over full fine-tuning per training step (higher is better)"
                 + (", log scale" if log else ""))
    ax.set_ylabel("x faster per step")
    ax.legend(fontsize=8, loc="upper left", ncols=2)


def _predicted_markers(ax, sweep: Sweep, arms: dict, ceiling: float | None) -> None:
    """FLOP predictions: a line across each uncached bar, a diamond over each cached one.

    A cached prediction above ``ceiling`` is drawn at the ceiling as a triangle, with its value.
    """
    half = sweep.width * 0.46
    labelled = set()
    for mode in sweep.modes:
        cached = mode == "cached"
        for x, name in sweep.bars(mode):
            p = arms[name]["speedup"].get("flop_predicted")
            if not p:
                continue
            what = "cached" if cached else "uncached"
            label = None if what in labelled else ("FLOP-predicted, cached (prefix not computed; ▲ off scale)"
                                                   if cached else "FLOP-predicted (uncached)")
            labelled.add(what)
            if not cached:
                ax.hlines(p, x - half, x + half, color=PREDICTED, lw=2.5, label=label)
                continue
            off = ceiling is not None and p > ceiling
            ax.plot([x], [ceiling if off else p], "^" if off else "D", color=PREDICTED, markeredgecolor="k",
                    markersize=7 if off else 6, label=label)
            if off:  # below the triangle: to its right it would leave the axes at the last group
                ax.annotate(f"{_x(p)}\npredicted", (x, ceiling), xytext=(0, -7), textcoords="offset points",
                            ha="center", va="top", fontsize=7, color=PREDICTED)
            else:
                ax.annotate(_x(p), (x, p), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7,
                            color=PREDICTED)


def _time_panel(ax, sweep: Sweep, arms: dict) -> None:
    names = list(sweep.cells.values()) + ([sweep.baseline] if sweep.baseline else [])
    log = needs_log([arms[n]["timing"].get("step_p90_s") for n in names]
                    + [arms[n]["timing"].get("step_p10_s") for n in names])
    if log:
        ax.set_yscale("log")
    for mode in sweep.modes:
        bars = sweep.bars(mode)
        medians, lo, hi = _spread([arms[n]["timing"] for _, n in bars])
        ax.bar([x for x, _ in bars], medians, sweep.width * 0.92, color=mode_color(mode), yerr=[lo, hi],
               capsize=2, error_kw={"lw": 0.8})
    if sweep.baseline:
        t = arms[sweep.baseline]["timing"]
        median = _ms(t["step_median_s"])
        ax.axhspan(_ms(t.get("step_p10_s")) or median, _ms(t.get("step_p90_s")) or median,
                   color=mode_color("full"), alpha=0.08)
        ax.axhline(median, color=mode_color("full"), lw=1, ls="--", label=f"full: {median:.3g} ms (band p10-p90)")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Step time (median, whiskers p10-p90)" + (", log scale" if log else ""), fontsize=10)
    ax.set_ylabel("ms per training step")


def _memory_panel(ax, sweep: Sweep, arms: dict) -> None:
    for mode in sweep.modes:
        bars = sweep.bars(mode)
        _memory_bars(ax, [x for x, _ in bars], [n for _, n in bars], arms, sweep.width * 0.92, mode_color(mode))
    names = list(sweep.cells.values())
    _label_small_state(ax, [xn for mode in sweep.modes for xn in sweep.bars(mode)], arms, horizontal=False)
    memory = arms[names[0]]["memory"] if names else {}
    ax.set_title(_memory_title(memory, [arms[n]["memory"].get("peak_bytes") for n in names]), fontsize=10)
    handles = _memory_handles(any(arms[n]["memory"].get("peak_bytes") is not None for n in names))
    if sweep.baseline:
        base = arms[sweep.baseline]
        if base["memory"].get("peak_bytes") is not None:
            handles.append(ax.axhline(base["memory"]["peak_bytes"] / MIB, color=mode_color("full"), lw=1,
                                      ls="--", label="full: peak"))
        handles.append(ax.axhline(base["optimizer_state_bytes"] / MIB, color=mode_color("full"), lw=1, ls=":",
                                  label="full: optimizer state"))
    ax.set_ylabel("MiB")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom for the legend
    ax.legend(handles=handles, fontsize=7, loc="upper right", ncols=2)


def _loss_panel(ax, sweep: Sweep, arms: dict, result: dict) -> None:
    drifted = False
    for mode in sweep.modes:
        bars = sweep.bars(mode)
        last = [arms[n]["loss"].get("last") or 0 for _, n in bars]
        # A plain loop keeps updating frozen BatchNorm statistics: hatch the arms where it did.
        hatch = ["xxx" if (arms[n].get("frozen_batchnorm_drift") or {}).get("layers_changed") else ""
                 for _, n in bars]
        drifted = drifted or any(hatch)
        ax.bar([x for x, _ in bars], last, sweep.width * 0.92, color=mode_color(mode), hatch=hatch,
               edgecolor="white", lw=0)
        first = [(x, arms[n]["loss"].get("first")) for x, n in bars if arms[n]["loss"].get("first") is not None]
        ax.plot([x for x, _ in first], [f for _, f in first], "kD", markersize=3.5,
                label="first step" if mode == sweep.modes[0] else None)
    if sweep.baseline and arms[sweep.baseline]["loss"].get("last") is not None:
        ax.axhline(arms[sweep.baseline]["loss"]["last"], color=mode_color("full"), lw=1, ls="--",
                   label="full: last step")
    if drifted:
        ax.bar([0], [0], color="#bbbbbb", hatch="xxx", edgecolor="white", lw=0,
               label="frozen BatchNorm statistics drifted")
    steps = result["steps"]["timed"] + result["steps"]["warmup"]
    ax.set_title(f"Training loss after the same {steps} steps (bars: last step)", fontsize=10)
    ax.set_ylabel("cross-entropy")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper right", ncols=2)


# --------------------------------------------------------------------------------------------
# Frozen vs full


def frozen_vs_full_figure(result: dict) -> Figure:
    """Step time, FLOPs per step and peak memory of each arm, one bar per arm, with the speedups."""
    arms = result["arms"]
    names = list(arms)
    modes = [arm_mode(n, arms[n]) for n in names]
    colors = [mode_color(m) for m in modes]
    fig = Figure(figsize=(14, 1.6 + 1.0 * len(names)), layout="constrained")
    ax_time, ax_flops, ax_mem = fig.subplots(1, 3)
    y = list(range(len(names)))[::-1]  # first arm (full) on top
    labels = [f"{mode_label(m)}\n{n}: {arms[n]['label']}" for n, m in zip(names, modes, strict=True)]

    timings = [arms[n]["timing"] for n in names]
    medians, lo, hi = _spread(timings)
    steps = [[s * 1000 for s in t.get("step_times_s", [])] for t in timings]
    if needs_log([v for s in steps for v in s] + medians):
        ax_time.set_xscale("log")
    ax_time.barh(y, medians, color=colors, alpha=0.9, xerr=[lo, hi], capsize=4)
    for yi, s in zip(y, steps, strict=True):
        ax_time.plot(s, [yi] * len(s), "k.", alpha=0.35, markersize=4)
    ax_time.set_title("Step time (median, whiskers p10-p90, dots = steps)")
    ax_time.set_xlabel("ms per training step")
    ends = [max([m + h, *s]) for m, h, s in zip(medians, hi, steps, strict=True)]
    _label_bars(ax_time, y, ends, [_speedup_text(arms[n]["speedup"]) for n in names])

    fwd = [arms[n]["flops"]["forward"] / 1e9 for n in names]
    bwd = [arms[n]["flops"]["backward"] / 1e9 for n in names]
    ax_flops.barh(y, fwd, color=FORWARD, label="forward")
    ax_flops.barh(y, bwd, left=fwd, color=BACKWARD, label="backward")
    ax_flops.set_title("FLOPs per training step")
    ax_flops.set_xlabel("GFLOPs (multiply-add = 2)")
    ax_flops.legend(loc="lower right", fontsize=8)
    totals = [f + b for f, b in zip(fwd, bwd, strict=True)]
    _label_bars(ax_flops, y, totals, [_times(arms[n]["speedup"]["flop_predicted"], "predicted") for n in names])

    _memory_bars(ax_mem, y, names, arms, 0.8, colors, horizontal=True)
    _label_small_state(ax_mem, list(zip(y, names, strict=True)), arms, horizontal=True)
    peaks = [arms[n]["memory"].get("peak_bytes") for n in names]
    ax_mem.set_title(_memory_title(arms[names[0]]["memory"], peaks))
    ax_mem.set_xlabel("MiB")
    ax_mem.legend(handles=_memory_handles(any(p is not None for p in peaks)), fontsize=8, loc="lower right")
    for ax in (ax_time, ax_flops, ax_mem):
        ax.set_yticks(y, labels if ax is ax_time else [""] * len(y), fontsize=8)
        ax.margins(x=0.3)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_title(result, "frozen vs full"), fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Shared pieces


def _memory_bars(ax, pos: list[float], names: list[str], arms: dict, width: float, color,
                 horizontal: bool = False) -> None:
    """Peak memory (light) with the optimizer state (solid, hatched) drawn over it: the state is part of the peak."""
    bar = ax.barh if horizontal else ax.bar
    peaks = [arms[n]["memory"].get("peak_bytes") for n in names]
    if any(p is not None for p in peaks):
        bar(pos, [(p or 0) / MIB for p in peaks], width, color=color, alpha=0.4)
    bar(pos, [arms[n]["optimizer_state_bytes"] / MIB for n in names], width * 0.6, color=color,
        hatch="///", edgecolor="k", lw=0.5)


def _memory_handles(peak: bool) -> list:
    """Legend entries of :func:`_memory_bars` (mode colours vary, so the entries are grey)."""
    state = Patch(facecolor="#777777", hatch="///", edgecolor="k", label="optimizer state")
    return [Patch(facecolor="#bbbbbb", label="peak memory"), state] if peak else [state]


def _label_small_state(ax, bars: list[tuple[float, str]], arms: dict, horizontal: bool) -> None:
    """Writes the optimizer state next to bars too short to see (fc only: kilobytes beside megabytes)."""
    sizes = [v for _, n in bars for v in (arms[n]["memory"].get("peak_bytes"), arms[n]["optimizer_state_bytes"])
             if v]
    scale = max(sizes, default=0)
    for pos, name in bars:
        state = arms[name]["optimizer_state_bytes"]
        if scale and state < 0.03 * scale:
            xy, offset = ((state / MIB, pos), (3, 0)) if horizontal else ((pos, state / MIB), (0, 3))
            ax.annotate(size_text(state), xy, xytext=offset, textcoords="offset points", fontsize=7,
                        ha="left" if horizontal else "center", va="center" if horizontal else "bottom",
                        rotation=0 if horizontal else 90)


def _memory_title(memory: dict, peaks: list) -> str:
    if not any(p is not None for p in peaks):
        return f"Memory: optimizer state\n(peak memory {memory.get('kind') or 'not measured'})"
    what = {"cpu_peak_rss_growth": "peak RSS growth while training",
            "cuda_max_allocated": "CUDA max allocated"}.get(memory.get("kind"), memory.get("kind"))
    return f"Memory ({what})"


def _spread(timings: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Median step times in ms and the distances down to p10 and up to p90 (whisker lengths)."""
    medians = [_ms(t["step_median_s"]) for t in timings]
    lo = [max(0.0, m - _ms(t.get("step_p10_s", t["step_median_s"]))) for m, t in zip(medians, timings, strict=True)]
    hi = [max(0.0, _ms(t.get("step_p90_s", t["step_median_s"])) - m) for m, t in zip(medians, timings, strict=True)]
    return medians, lo, hi


def _label_bars(ax, pos: list[float], ends: list[float], texts: list[str]) -> None:
    for p, end, text in zip(pos, ends, texts, strict=True):
        if text:
            ax.annotate(f"  {text}", (end, p), va="center", fontsize=8.5, fontweight="bold")


def _speedup_text(speedup: dict) -> str:
    text = _times(speedup.get("measured"), "faster")
    vs_plain = speedup.get("vs_plain")
    return f"{text}\n  {vs_plain:.2f}x vs plain" if text and vs_plain else text


def _times(value: float | None, what: str) -> str:
    return "" if value is None or abs(value - 1) < 1e-9 else f"{_x(value)} {what}"


def _ms(seconds: float | None) -> float:
    return 0.0 if seconds is None else seconds * 1000


def _title(result: dict, what: str) -> str:
    d = result["data"]
    torch_version = result.get("versions", {}).get("torch", "?")
    title = (f"{result['model']} {what} | {result['device']} | {d['image_size']}px, batch {d['batch_size']} | "
             f"{result['steps']['timed']} timed steps/arm | torch {torch_version}")
    skipped = result.get("skipped") or []
    if skipped:
        title += "\nnot run: " + "; ".join(f"{s['arm']} ({s['reason']})" for s in skipped)
    return title
